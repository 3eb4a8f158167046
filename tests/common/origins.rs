//! Real origin servers of other makers, for tests that must hold against backends as they read
//! requests: an nginx (Debian's package) and a Python ASGI app under hypercorn (PyPI), each in
//! a temp dir on a free loopback port, ready when the port accepts, stopped by PID on drop.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::free_port;

/// Waits until `port` on 127.0.0.1 accepts a connection, or panics after 15 s.
fn wait_for_port(port: u16, what: &str, child: &mut Child, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "{what} exited with {status}: {}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!(
        "{what} did not listen on {port}: {}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
}

fn stop(child: &mut Option<Child>) {
    if let Some(mut c) = child.take() {
        // SIGTERM first (nginx's master stops its workers on it), then make sure.
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = c.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// An nginx serving `servers` (the `server { ... }` blocks, with `{port}` for its port).
pub struct Nginx {
    pub port: u16,
    child: Option<Child>,
    _dir: tempfile::TempDir,
}

impl Nginx {
    pub fn start(servers: &str) -> Nginx {
        let dir = tempfile::tempdir().expect("temp dir");
        let port = free_port();
        let prefix = dir.path();
        let servers = servers.replace("{port}", &port.to_string());
        let conf = format!(
            "worker_processes 1;\nerror_log {p}/error.log warn;\npid {p}/nginx.pid;\n\
             events {{ worker_connections 4096; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {p}/body;\n  \
             proxy_temp_path {p}/proxy;\n  fastcgi_temp_path {p}/fastcgi;\n  \
             uwsgi_temp_path {p}/uwsgi;\n  scgi_temp_path {p}/scgi;\n  default_type text/plain;\n\
             {servers}\n}}\n",
            p = prefix.display()
        );
        std::fs::write(prefix.join("nginx.conf"), conf).unwrap();
        let log = prefix.join("error.log");
        let mut child = Command::new(nginx_binary())
            .args(["-p"])
            .arg(prefix)
            .arg("-c")
            .arg(prefix.join("nginx.conf"))
            .args(["-g", "daemon off;"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nginx must be installed (the README's test command installs it)");
        wait_for_port(port, "nginx", &mut child, &log);
        Nginx {
            port,
            child: Some(child),
            _dir: dir,
        }
    }

    pub fn target(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        stop(&mut self.child);
    }
}

fn nginx_binary() -> &'static str {
    if Path::new("/usr/sbin/nginx").exists() {
        "/usr/sbin/nginx"
    } else {
        "nginx"
    }
}

/// A Python ASGI app (`app` in `source`) under hypercorn, which speaks HTTP/1.1 and accepts
/// `Upgrade: h2c` like a real h2c-capable backend.
pub struct Hypercorn {
    pub port: u16,
    child: Option<Child>,
    _dir: tempfile::TempDir,
}

impl Hypercorn {
    pub fn start(source: &str) -> Hypercorn {
        let dir = tempfile::tempdir().expect("temp dir");
        let port = free_port();
        std::fs::write(dir.path().join("origin.py"), source).unwrap();
        let log = dir.path().join("hypercorn.log");
        let mut child = Command::new("python3")
            .current_dir(dir.path())
            .args([
                "-m",
                "hypercorn",
                "--bind",
                &format!("127.0.0.1:{port}"),
                "--workers",
                "0",
            ])
            .arg("--error-logfile")
            .arg(&log)
            .arg("origin:app")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("hypercorn must be installed (the README's test command installs it)");
        wait_for_port(port, "hypercorn", &mut child, &log);
        Hypercorn {
            port,
            child: Some(child),
            _dir: dir,
        }
    }

    pub fn target(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for Hypercorn {
    fn drop(&mut self) {
        stop(&mut self.child);
    }
}
