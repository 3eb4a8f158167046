//! Reload triggers: `SIGHUP`, and any change of the content of the config file or of a file
//! it names (the consumers file), unless `[server] watch_config = false`. Files are polled
//! (every 500 ms, reading through symlinks), which sees every way files really change (in-place
//! writes, write-then-rename, a swapped symlink target, delete then recreate) without depending
//! on inotify semantics. A change is loaded only once two reads 200 ms apart agree, so a
//! half-written file is never loaded.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::app::App;

const POLL: Duration = Duration::from_millis(500);
const SETTLE: Duration = Duration::from_millis(200);

fn read(path: &PathBuf) -> Option<Vec<u8>> {
    std::fs::read(path).ok()
}

/// The content hash of the file now, as `Policy::source_hash` names a loaded one.
fn digest(path: &PathBuf) -> Option<String> {
    read(path).map(|bytes| crate::config::source_hash(&bytes))
}

/// Watches until `shutdown` resolves.
pub async fn watch(app: Arc<App>, shutdown: impl std::future::Future<Output = ()>) {
    let Some(path) = app.config_path.clone() else {
        return;
    };
    tokio::pin!(shutdown);
    let mut hangups = hangup_stream();
    // What is in force, not what the file holds by the time this task runs: a change made
    // right after startup must not be mistaken for the loaded content.
    let mut seen = Some(app.runtime().policy.source_hash.clone());
    let mut missing_logged = false;
    // What the other files held when last looked at: a bad consumers file is tried once, and
    // a file whose size, mtime and inode stay the same is not read again.
    let mut tried = Others::default();
    let mut tick = tokio::time::interval(POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let signalled = tokio::select! {
            () = &mut shutdown => return,
            _ = tick.tick() => false,
            Some(()) = next_hangup(&mut hangups) => true,
        };
        if signalled {
            tracing::info!("SIGHUP: reloading");
            seen = digest(&path);
            let _ = app.reload(None);
            continue;
        }
        if !app.runtime().policy.server.watch_config {
            continue;
        }
        let current = read(&path);
        if current.as_deref().map(crate::config::source_hash) == seen {
            if also_read_changed(&app, &mut tried).await {
                tracing::info!("a file the config names changed: reloading");
                let _ = app.reload(None);
            }
            continue;
        }
        let Some(first) = current else {
            if !missing_logged {
                tracing::warn!(path = %path.display(), "config file is gone; the loaded config keeps serving");
                missing_logged = true;
            }
            seen = None;
            continue;
        };
        missing_logged = false;
        // Let a writer finish: load only content that holds still.
        tokio::time::sleep(SETTLE).await;
        if read(&path).as_ref() != Some(&first) {
            continue;
        }
        seen = Some(crate::config::source_hash(&first));
        match std::str::from_utf8(&first) {
            Ok(text) => {
                let _ = app.reload(Some(text));
            }
            Err(_) => {
                app.metrics.reload(false);
                tracing::error!(path = %path.display(), "config file is not UTF-8; the previous config keeps serving");
            }
        }
    }
}

/// Whether a file the loaded policy read besides the config (the consumers file) now holds
/// content neither loaded nor tried before, and holds it still (two reads a settle apart
/// agree). `tried` remembers what was tried, so a bad file is refused once, not every poll;
/// and the metadata it was read with, so an unchanged file (a consumers file may be megabytes)
/// costs one `stat` a poll, not a read and a hash.
async fn also_read_changed(app: &App, tried: &mut Others) -> bool {
    let files = app.runtime().policy.also_read.clone();
    for (path, loaded) in files {
        let meta = stamp(&path);
        if meta.is_some() && tried.stamps.iter().any(|(p, m)| *p == path && *m == meta) {
            continue;
        }
        let Some(now) = read(&path) else { continue };
        let hash = crate::config::source_hash(&now);
        if hash == loaded || tried.hashes.iter().any(|(p, h)| *p == path && *h == hash) {
            tried.stamps.retain(|(p, _)| *p != path);
            tried.stamps.push((path, meta));
            continue;
        }
        tokio::time::sleep(SETTLE).await;
        if read(&path).as_ref() == Some(&now) {
            tried.hashes.retain(|(p, _)| *p != path);
            tried.hashes.push((path, hash));
            return true;
        }
    }
    false
}

/// What the watcher knows of the files a config names.
#[derive(Default)]
struct Others {
    /// Content hashes tried (loaded or refused).
    hashes: Vec<(PathBuf, String)>,
    /// Size, modification time and inode when the file was last read.
    stamps: Vec<(PathBuf, Option<Stamp>)>,
}

type Stamp = (u64, std::time::SystemTime, u64);

/// A file's size, mtime and inode (through symlinks), to skip reading it when none changed.
fn stamp(path: &PathBuf) -> Option<Stamp> {
    let meta = std::fs::metadata(path).ok()?;
    #[cfg(unix)]
    let inode = std::os::unix::fs::MetadataExt::ino(&meta);
    #[cfg(not(unix))]
    let inode = 0;
    Some((meta.len(), meta.modified().ok()?, inode))
}

#[cfg(unix)]
type Hangups = Option<tokio::signal::unix::Signal>;
#[cfg(not(unix))]
type Hangups = Option<()>;

#[cfg(unix)]
fn hangup_stream() -> Hangups {
    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok()
}

#[cfg(not(unix))]
fn hangup_stream() -> Hangups {
    None
}

#[cfg(unix)]
async fn next_hangup(h: &mut Hangups) -> Option<()> {
    match h {
        Some(s) => s.recv().await,
        None => std::future::pending().await,
    }
}

#[cfg(not(unix))]
async fn next_hangup(_: &mut Hangups) -> Option<()> {
    std::future::pending().await
}
