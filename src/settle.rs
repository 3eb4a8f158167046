//! What a response settles. A limit with `count`, `cost_from` or `algorithm = "concurrency"`
//! (and a request a `delay` limit holds) reserves at admission; this module brings each such
//! reservation to what the response cost, in one store call ([`crate::limiter::Limiter::settle`]):
//!
//! - at the response head: `count` gives the reservation back when the status is not listed,
//!   `cost_from = "header:NAME"` settles to the header's figure;
//! - at the end of the body ([`Settled`]): a concurrency slot is released;
//! - when the request ends early ([`Pending`] dropped): the client went away before the
//!   response (`count`: not listed, a slot released, a held request's slot given back) or in
//!   the middle of the body (the slot released; a reported cost not seen: the reservation
//!   stands).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http::header::HeaderName;
use http_body::{Body as HttpBody, Frame, SizeHint};

use crate::app::Runtime;
use crate::limiter::{Decision, Item, Settle};
use crate::policy::{CostFrom, Limit, Settlement, StatusSet};
use crate::upstream::PooledBody;

/// What decides one limit's settlement.
enum Rule {
    Count(StatusSet),
    Header(HeaderName),
    Release,
    /// A `delay` limit whose reservation stands once the request is forwarded.
    Held,
}

struct Entry {
    /// `settle.cost` is what the entry settles to when nothing more is learnt.
    settle: Settle,
    rule: Rule,
    done: bool,
}

/// The reservations of one admitted request still to be settled. Dropped unsettled (the client
/// went away, the body ended), it settles what is left in a task of its own.
pub struct Pending {
    rt: Arc<Runtime>,
    entries: Vec<Entry>,
    /// Held for a `delay` limit, not yet forwarded: going away now gives every reservation
    /// of the request back.
    held: bool,
}

impl Pending {
    /// The reservations of an admitted request that its response settles, if any; `held`:
    /// the request waits for its slot before it is forwarded ([`Decision::hold`]).
    pub fn new(
        rt: &Arc<Runtime>,
        limits: &[Limit],
        items: &[Item],
        decision: &Decision,
        held: bool,
    ) -> Option<Pending> {
        let entries: Vec<Entry> = limits
            .iter()
            .zip(items)
            .enumerate()
            .filter(|(i, (_, item))| {
                item.settles_later() && decision.outcomes.get(*i).is_some_and(|o| o.allowed)
            })
            .map(|(i, (limit, item))| {
                let rule = match &limit.settle {
                    Settlement::Count(set) => Rule::Count(set.clone()),
                    Settlement::CostFrom(CostFrom::Header(name)) => Rule::Header(name.clone()),
                    Settlement::Release => Rule::Release,
                    Settlement::Stands => Rule::Held,
                };
                // Until the response says otherwise: a count or a slot is given back, a
                // reported cost or a held slot stands.
                let cost = match rule {
                    Rule::Count(_) | Rule::Release => 0,
                    Rule::Header(_) | Rule::Held => item.cost,
                };
                Entry {
                    settle: Settle {
                        item: *item,
                        receipt: decision.receipts.get(i).copied().unwrap_or(0),
                        cost,
                    },
                    rule,
                    done: false,
                }
            })
            .collect();
        (!entries.is_empty()).then(|| Pending {
            rt: rt.clone(),
            entries,
            held,
        })
    }

    /// The request is forwarded: its held slots are used.
    pub fn forwarded(&mut self) {
        self.held = false;
    }

    /// Settles what the response head decides (`count` by `status`, `cost_from` by
    /// `headers`), in one store call when anything changes.
    pub async fn at_head(&mut self, status: u16, headers: &HeaderMap) {
        self.held = false;
        let mut now = Vec::new();
        for e in self.entries.iter_mut() {
            let cost = match &e.rule {
                Rule::Count(set) if set.counts(status) => e.settle.item.cost,
                Rule::Count(_) => 0,
                Rule::Header(name) => reported(headers, name).unwrap_or(e.settle.item.cost),
                Rule::Held => e.settle.item.cost,
                Rule::Release => continue,
            };
            e.settle.cost = cost;
            e.done = true;
            now.push(e.settle);
        }
        self.rt.limiter.settle(&now).await;
    }

    /// Whether anything is left for the end of the body.
    pub fn open(&self) -> bool {
        self.entries.iter().any(|e| !e.done)
    }
}

/// A cost figure in a response header: a whole number, nothing else.
fn reported(headers: &HeaderMap, name: &HeaderName) -> Option<u64> {
    let v = headers.get(name)?.to_str().ok()?.trim();
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    v.parse().ok().filter(|&n: &u64| n < 1 << 52)
}

impl Drop for Pending {
    fn drop(&mut self) {
        let held = self.held;
        let left: Vec<Settle> = self
            .entries
            .iter()
            .filter(|e| !e.done)
            .map(|e| Settle {
                cost: if held { 0 } else { e.settle.cost },
                ..e.settle
            })
            .filter(|s| s.cost != s.item.cost)
            .collect();
        if left.is_empty() {
            return;
        }
        let rt = self.rt.clone();
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move { rt.limiter.settle(&left).await });
        }
    }
}

/// An upstream body that settles what is left of its request's reservations when it ends
/// (or is dropped: the client went away).
pub struct Settled {
    inner: PooledBody,
    pending: Option<Box<Pending>>,
}

impl Settled {
    pub fn new(inner: PooledBody, pending: Option<Pending>) -> Settled {
        let mut body = Settled {
            inner,
            pending: pending.filter(Pending::open).map(Box::new),
        };
        if body.inner.is_end_stream() {
            body.pending = None;
        }
        body
    }
}

impl HttpBody for Settled {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if self.pending.is_some() {
            let ended = match &polled {
                Poll::Ready(None | Some(Err(_))) => true,
                Poll::Ready(Some(Ok(_))) => self.inner.is_end_stream(),
                Poll::Pending => false,
            };
            if ended {
                // Settles in its own task (Drop).
                self.pending = None;
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
