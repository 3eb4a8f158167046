//! What a response settles. A limit with `count`, `cost_from` or `algorithm = "concurrency"`
//! (and a request a `delay` limit holds) reserves at admission; this module brings each such
//! reservation to what the response cost, in one store call ([`crate::limiter::Limiter::settle`]):
//!
//! - at the response head: `count` gives the reservation back when the status is not listed,
//!   `cost_from = "header:NAME"` settles to the header's figure;
//! - at the end of the body ([`Settled`]): a concurrency slot is released, and
//!   `cost_from = "openai:…"` settles to the `usage` the body reported (read on the way by a
//!   [`Scanner`] of bounded memory, the body streaming to the client unchanged). The body's
//!   last frame waits for that store call: a client that has the whole response finds the
//!   budget settled on its next request;
//! - when the request ends early ([`Pending`] dropped): the client went away before the
//!   response (`count`: not listed, a slot released, a held request's slot given back) or in
//!   the middle of the body (the slot released; a reported cost not seen: the reservation
//!   stands).

use std::future::Future;
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
use crate::usage::{Field, Format, Scanner};

/// What decides one limit's settlement.
enum Rule {
    Count(StatusSet),
    Header(HeaderName),
    /// `cost_from = "openai:…"`: the scanner is there once the head said the body can carry
    /// the figure (JSON or an event stream, not compressed).
    Usage(Field, Option<Box<Scanner>>),
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
                    Settlement::CostFrom(CostFrom::OpenAi(field)) => Rule::Usage(*field, None),
                    Settlement::Release => Rule::Release,
                    Settlement::Stands => Rule::Held,
                };
                // Until the response says otherwise: a count or a slot is given back, a
                // reported cost or a held slot stands.
                let cost = match rule {
                    Rule::Count(_) | Rule::Release => 0,
                    Rule::Header(_) | Rule::Usage(..) | Rule::Held => item.cost,
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
            let cost = match &mut e.rule {
                Rule::Count(set) if set.counts(status) => e.settle.item.cost,
                Rule::Count(_) => 0,
                Rule::Header(name) => reported(headers, name).unwrap_or(e.settle.item.cost),
                Rule::Held => e.settle.item.cost,
                Rule::Usage(field, scanner) => match Format::of(headers) {
                    // Read from the body as it streams; settled at its end.
                    Some(format) => {
                        *scanner = Some(Box::new(Scanner::new(*field, format)));
                        continue;
                    }
                    // No usable figure can come: the reservation stands.
                    None => e.settle.item.cost,
                },
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

    /// Whether the body's bytes matter (a usage figure is read from them).
    fn scans(&self) -> bool {
        self.entries
            .iter()
            .any(|e| matches!(e.rule, Rule::Usage(_, Some(_))))
    }

    /// The next bytes of the response body.
    fn feed(&mut self, data: &[u8]) {
        for e in self.entries.iter_mut() {
            if let Rule::Usage(_, Some(scanner)) = &mut e.rule {
                scanner.feed(data);
            }
        }
    }

    /// The body ended whole: each usage limit settles to the figure it reported (none: the
    /// reservation stands).
    fn complete(&mut self) {
        for e in self.entries.iter_mut() {
            if let Rule::Usage(_, scanner) = &mut e.rule
                && let Some(scanner) = scanner.take()
                && let Some(figure) = scanner.finish().filter(|&n| n < 1 << 52)
            {
                e.settle.cost = figure;
            }
        }
    }

    /// What is left to settle (marked settled): the entries whose cost moved from their
    /// reservation.
    fn left(&mut self) -> Vec<Settle> {
        let held = self.held;
        self.entries
            .iter_mut()
            .filter(|e| !e.done)
            .map(|e| {
                e.done = true;
                Settle {
                    cost: if held { 0 } else { e.settle.cost },
                    ..e.settle
                }
            })
            .filter(|s| s.cost != s.item.cost)
            .collect()
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
        let left = self.left();
        if left.is_empty() {
            return;
        }
        let rt = self.rt.clone();
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move { rt.limiter.settle(&left).await });
        }
    }
}

/// A store call settling what the end of a body decided, and the body's last frame, given to
/// the client once the call is done.
struct Closing {
    settling: Pin<Box<dyn Future<Output = ()> + Send>>,
    last: Option<Result<Frame<Bytes>, hyper::Error>>,
}

/// An upstream body that settles what is left of its request's reservations when it ends
/// (or is dropped: the client went away).
pub struct Settled {
    inner: PooledBody,
    pending: Option<Box<Pending>>,
    closing: Option<Box<Closing>>,
}

impl Settled {
    pub fn new(inner: PooledBody, pending: Option<Pending>) -> Settled {
        let mut body = Settled {
            inner,
            pending: pending.filter(Pending::open).map(Box::new),
            closing: None,
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
        let this = &mut *self;
        if let Some(closing) = this.closing.as_mut() {
            std::task::ready!(closing.settling.as_mut().poll(cx));
            let last = closing.last.take();
            this.closing = None;
            return Poll::Ready(last);
        }
        let polled = std::task::ready!(Pin::new(&mut this.inner).poll_frame(cx));
        let Some(pending) = this.pending.as_mut() else {
            return Poll::Ready(polled);
        };
        match &polled {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref()
                    && pending.scans()
                {
                    pending.feed(data);
                }
                if !this.inner.is_end_stream() {
                    return Poll::Ready(polled);
                }
                pending.complete();
            }
            None => pending.complete(),
            // The upstream failed mid-body: slots are released, a figure not seen whole
            // leaves the reservation as it is.
            Some(Err(_)) => {}
        }
        let mut pending = this.pending.take().expect("pending");
        let left = pending.left();
        if left.is_empty() {
            return Poll::Ready(polled);
        }
        let rt = pending.rt.clone();
        this.closing = Some(Box::new(Closing {
            settling: Box::pin(async move { rt.limiter.settle(&left).await }),
            last: polled,
        }));
        self.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.closing.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Settled {
    /// A client gone while the end of the body settles: the store call still completes.
    fn drop(&mut self) {
        if let Some(closing) = self.closing.take()
            && let Ok(handle) = tokio::runtime::Handle::try_current()
        {
            handle.spawn(closing.settling);
        }
    }
}
