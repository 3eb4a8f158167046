//! The `tollgate` command: `run` (the default) and `check`. A thin layer over the library.

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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Run) {
        Command::Check => check(&cli.config),
        Command::Run => {
            logging::init(cli.log_format);
            match run(&cli.config) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("tollgate: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn check(path: &Path) -> ExitCode {
    match config::load(path) {
        Ok(policy) => {
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
        tracing::info!(
            listen = %running.addr,
            admin = ?running.admin_addr,
            store = running.app.runtime().limiter.store.backend_name(),
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
