//! The `tollgate` command: `run` (the default), `check`, `explain`, `replay`, `hash-key` and
//! `healthcheck`. A thin layer over the library.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use tollgate::config;

use tollgate::logging::{self, Format};

#[derive(Parser)]
#[command(name = "tollgate", version, about = "A rate-limiting reverse proxy")]
struct Cli {
    /// The policy file.
    #[arg(long, global = true, default_value = "proxy.toml")]
    config: PathBuf,
    /// Log format: text, or one JSON object per line.
    #[arg(long, global = true, value_enum, default_value_t = Format::Text)]
    log_format: Format,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve (the default).
    Run,
    /// Validate the config: print a summary and exit 0, or the errors and exit 1.
    Check,
    /// Say what tollgate would do with one request: route, limits, keys and, with a reachable
    /// Redis, each limit's current budget. Consumes nothing.
    Explain {
        /// The request method, e.g. GET.
        method: String,
        /// The request URL, e.g. http://api.example.com/v1/users?page=2
        url: String,
        /// A request header, `Name: value` (repeatable).
        #[arg(short = 'H', long = "header")]
        headers: Vec<String>,
        /// The TCP peer address the request comes from.
        #[arg(long, default_value = "127.0.0.1")]
        client_ip: std::net::IpAddr,
    },
    /// Exit 0 when the admin listener of the config answers GET /healthz with 200, else 1
    /// (for container health checks).
    Healthcheck,
    /// Run access logs (nginx/Apache "combined", or tollgate's JSON access log) through the
    /// policy in time order on a memory store, and print what each route and limit would have
    /// admitted and rejected. Contacts no store and no upstream.
    Replay {
        /// Log files, read in full and merged by time.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Read one API key from standard input (a trailing newline is ignored) and print its hash
    /// as consumers.toml lists it: `b3:` and 64 hex digits.
    HashKey {
        /// Hash every line of standard input (one key per line), one hash per line, in order:
        /// for importing many keys at once.
        #[arg(long)]
        each_line: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Run) {
        Command::Check => check(&cli.config),
        Command::Explain {
            method,
            url,
            headers,
            client_ip,
        } => explain(&cli.config, &method, &url, &headers, client_ip),
        Command::Healthcheck => healthcheck(&cli.config),
        Command::HashKey { each_line } => hash_key(each_line),
        Command::Replay { files } => replay(&cli.config, &files),
        Command::Run => {
            logging::init(cli.log_format);
            match run(&cli.config) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("tollgate: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn check(path: &Path) -> ExitCode {
    match config::load(path) {
        Ok(policy) => {
            if let Err(e) = tollgate::app::check_files(&policy) {
                eprintln!("{}: {e}", path.display());
                return ExitCode::FAILURE;
            }
            print!(
                "{}",
                tollgate::report::summary(&policy, &path.display().to_string())
            );
            ExitCode::SUCCESS
        }
        Err(errors) => {
            eprintln!("{errors}");
            ExitCode::FAILURE
        }
    }
}

fn explain(
    path: &Path,
    method: &str,
    url: &str,
    headers: &[String],
    peer: std::net::IpAddr,
) -> ExitCode {
    let policy = match config::load(path) {
        Ok(p) => p,
        Err(errors) => {
            eprintln!("{errors}");
            return ExitCode::FAILURE;
        }
    };
    let request = match build_request(method, url, headers) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("tollgate explain: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("tollgate explain: {e}");
            return ExitCode::FAILURE;
        }
    };
    print!(
        "{}",
        runtime.block_on(tollgate::report::explain(&policy, &request, peer))
    );
    ExitCode::SUCCESS
}

fn build_request(method: &str, url: &str, headers: &[String]) -> anyhow::Result<http::Request<()>> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e| anyhow::anyhow!("invalid URL {url:?}: {e}"))?;
    let mut builder = http::Request::builder().method(method.to_ascii_uppercase().as_str());
    if let Some(authority) = uri.authority() {
        builder = builder.header(http::header::HOST, authority.as_str());
    }
    let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_string();
    builder = builder.uri(path);
    for h in headers {
        let (name, value) = h
            .split_once(':')
            .ok_or_else(|| anyhow::anyhow!("invalid header {h:?}; expected 'Name: value'"))?;
        builder = builder.header(name.trim(), value.trim());
    }
    Ok(builder.body(())?)
}

fn replay(path: &Path, files: &[PathBuf]) -> ExitCode {
    let policy = match config::load(path) {
        Ok(p) => p,
        Err(errors) => {
            eprintln!("{errors}");
            return ExitCode::FAILURE;
        }
    };
    let mut entries = Vec::new();
    let mut unparsed = Vec::new();
    for file in files {
        let text = match std::fs::read(file) {
            Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
            Err(e) => {
                eprintln!("tollgate replay: {}: {e}", file.display());
                return ExitCode::FAILURE;
            }
        };
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            match tollgate::replay::parse_line(line) {
                Some(entry) => entries.push(entry),
                // tollgate's JSON logs hold other events too; only access lines count.
                None if line.trim_start().starts_with('{') => {}
                None => unparsed.push((file.display().to_string(), i + 1)),
            }
        }
    }
    let report = tollgate::replay::replay(&policy, entries);
    print!("{}", tollgate::replay::render(&policy, &report, &unparsed));
    ExitCode::SUCCESS
}

fn hash_key(each_line: bool) -> ExitCode {
    use std::io::{Read, Write};
    let mut key = Vec::new();
    if let Err(e) = std::io::stdin().read_to_end(&mut key) {
        eprintln!("tollgate hash-key: cannot read standard input: {e}");
        return ExitCode::FAILURE;
    }
    if each_line {
        let mut out = std::io::BufWriter::new(std::io::stdout().lock());
        for line in key.split(|b| *b == b'\n') {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if !line.is_empty() && writeln!(out, "{}", tollgate::consumers::hash_key(line)).is_err()
            {
                return ExitCode::FAILURE;
            }
        }
        return match out.flush() {
            Ok(()) => ExitCode::SUCCESS,
            Err(_) => ExitCode::FAILURE,
        };
    }
    if key.ends_with(b"\n") {
        key.pop();
        if key.ends_with(b"\r") {
            key.pop();
        }
    }
    if key.is_empty() {
        eprintln!("tollgate hash-key: no key on standard input");
        return ExitCode::FAILURE;
    }
    println!("{}", tollgate::consumers::hash_key(&key));
    ExitCode::SUCCESS
}

fn healthcheck(path: &Path) -> ExitCode {
    let Ok(policy) = config::load(path) else {
        eprintln!("tollgate healthcheck: config invalid");
        return ExitCode::FAILURE;
    };
    let Some(mut admin) = policy.server.admin else {
        eprintln!("tollgate healthcheck: no [server] admin listener configured");
        return ExitCode::FAILURE;
    };
    if admin.ip().is_unspecified() {
        admin.set_ip(if admin.is_ipv4() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        });
    }
    use std::io::{Read, Write};
    let timeout = std::time::Duration::from_secs(3);
    let result = (|| -> std::io::Result<String> {
        let mut s = std::net::TcpStream::connect_timeout(&admin, timeout)?;
        s.set_read_timeout(Some(timeout))?;
        s.write_all(
            format!("GET /healthz HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )?;
        let mut response = String::new();
        s.read_to_string(&mut response)?;
        Ok(response)
    })();
    match result {
        Ok(r) if r.starts_with("HTTP/1.1 200") => ExitCode::SUCCESS,
        Ok(r) => {
            eprintln!(
                "tollgate healthcheck: {}",
                r.lines().next().unwrap_or("no response")
            );
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("tollgate healthcheck: {admin}: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(path: &Path) -> anyhow::Result<()> {
    let policy = config::load(path).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut runtime = match policy.server.workers {
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        Some(n) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    let runtime = runtime.enable_all().build()?;
    let result = runtime.block_on(async {
        let running = tollgate::start(policy, Some(path.to_path_buf()), termination()).await?;
        let admin = running.admin_addr.map(|a| a.to_string());
        tracing::info!(
            listen = %running.addr,
            admin = admin.as_deref().unwrap_or("none"),
            store = running.app.runtime().limiter.store().backend_name(),
            "tollgate serving"
        );
        running.wait().await;
        tracing::info!("stopped");
        anyhow::Ok(())
    });
    runtime.shutdown_timeout(std::time::Duration::from_millis(200));
    result
}

/// Resolves on SIGTERM or SIGINT.
async fn termination() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            return std::future::pending().await;
        };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: stopping"),
            _ = int.recv() => tracing::info!("SIGINT: stopping"),
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
