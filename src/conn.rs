//! What tollgate knows about one client connection, shared by the listener, the pipeline and
//! the forwarder: the peer and scheme ([`ConnInfo`]), its framing notes, whether its socket is
//! full, and the shutdown [`Cut`] under which its tasks run.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use http::HeaderValue;
use http::uri::Scheme;

/// Facts about the client connection a request arrived on.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    /// `http` or `https`.
    pub scheme: Scheme,
    /// The peer's address as an `X-Forwarded-For` entry, formatted once per connection.
    pub peer_entry: HeaderValue,
    /// Request heads of this connection that carried both framing headers.
    pub ambiguous: Arc<crate::framing::AmbiguousHeads>,
    /// Ends the tasks this connection starts (upgraded tunnels) when shutdown cuts it.
    pub cut: Cut,
    /// Whether the client's socket is full (HTTP/1: upstream bodies wait for it).
    pub writes: Option<Arc<crate::timeouts::ClientWrites>>,
}

impl ConnInfo {
    pub fn new(
        peer: SocketAddr,
        scheme: Scheme,
        ambiguous: Arc<crate::framing::AmbiguousHeads>,
    ) -> ConnInfo {
        let peer_entry = HeaderValue::from_str(&peer.ip().to_canonical().to_string())
            .expect("an IP address is a valid header value");
        ConnInfo {
            peer,
            scheme,
            peer_entry,
            ambiguous,
            cut: Cut::never(),
            writes: None,
        }
    }

    /// The client socket's fullness, reported by its writer.
    pub fn with_writes(mut self, writes: Arc<crate::timeouts::ClientWrites>) -> ConnInfo {
        self.writes = Some(writes);
        self
    }

    /// The shutdown cut of the listener this connection came from.
    pub fn with_cut(mut self, cut: Cut) -> ConnInfo {
        self.cut = cut;
        self
    }
}

/// The signal that cuts every task of the listener once the shutdown grace is over: connection
/// tasks, HTTP/2 stream tasks and upgraded tunnels all run under it, so [`serve`] (and the
/// library's `run`) really ends them, whatever runtime it runs on.
#[derive(Clone, Debug)]
pub struct Cut(Option<tokio::sync::watch::Receiver<bool>>);

impl Cut {
    /// A signal that never fires (a connection made outside a listener).
    pub fn never() -> Cut {
        Cut(None)
    }

    /// A cut that comes when `signal` turns true.
    pub fn on(signal: tokio::sync::watch::Receiver<bool>) -> Cut {
        Cut(Some(signal))
    }

    /// Runs `fut` until it ends or the cut comes.
    pub fn spawn<F>(&self, fut: F)
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let Some(mut cut) = self.0.clone() else {
            tokio::spawn(fut);
            return;
        };
        tokio::spawn(async move {
            tokio::select! {
                _ = fut => {}
                _ = cut.wait_for(|c| *c) => {}
            }
        });
    }
}
