//! What a connection is doing, as the service that answers its requests sees it: the requests
//! in progress, those of them whose body is still arriving, and when the last one ended. The
//! listeners read it to close the connection idle the longest at their cap
//! (`server::connections`), or else one whose requests are all still arriving, and the webhook
//! listener's idle deadline counts from the last end; a request marks itself with
//! [`Activity::begin`] (the webhook and admin services, and the gRPC layer in
//! `grpc::transport`), and its body with [`Activity::body_arriving`] until the body's last byte
//! is read (`server::connections`). Nothing here knows a protocol.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// Requests in progress on one connection, as its service sees them, and when the last one
/// ended: the connection's idle deadline counts from there. No wake-up when a request ends
/// (hyper does not read an idle HTTP/1 connection again by itself): while a request is in
/// progress the connection's timer stays armed, and when it fires after the request ended
/// the idle deadline is set from the end. Waking the connection at the end of every request
/// instead cost an extra poll of it per webhook.
pub struct Activity {
    in_progress: AtomicUsize,
    /// Requests in progress whose body is still arriving.
    arriving: AtomicUsize,
    /// When `arriving` last rose from zero, as a place in [`ARRIVALS`]'s order.
    arriving_since: AtomicU64,
    /// When the connection was accepted: what `last_end` counts from.
    epoch: Instant,
    /// Nanoseconds from `epoch` to the end of the last request.
    last_end: AtomicU64,
}

impl Default for Activity {
    fn default() -> Self {
        Activity {
            in_progress: AtomicUsize::new(0),
            arriving: AtomicUsize::new(0),
            arriving_since: AtomicU64::new(0),
            epoch: Instant::now(),
            last_end: AtomicU64::new(0),
        }
    }
}

/// One request in progress; ends when dropped.
pub struct Busy(Arc<Activity>);

/// Bodies that started to arrive, on any connection: their order, not a clock read per request.
static ARRIVALS: AtomicU64 = AtomicU64::new(0);

/// One request's body still arriving; arrived (or given up) when dropped.
pub struct Arriving(Arc<Activity>);

impl Activity {
    /// A request started.
    pub fn begin(self: &Arc<Self>) -> Busy {
        self.in_progress.fetch_add(1, Ordering::SeqCst);
        Busy(Arc::clone(self))
    }

    /// Whether a request is in progress.
    pub fn in_progress(&self) -> bool {
        self.in_progress.load(Ordering::SeqCst) > 0
    }

    /// When the last request ended (the accept, if none has).
    pub fn last_end(&self) -> Instant {
        self.epoch + Duration::from_nanos(self.last_end.load(Ordering::SeqCst))
    }

    /// Whether no request has ended on the connection yet and it was accepted less than
    /// `within` ago: a new connection whose first request may still be on its way.
    pub fn new_within(&self, within: Duration) -> bool {
        self.last_end.load(Ordering::SeqCst) == 0 && self.epoch.elapsed() < within
    }

    /// A request's body started to arrive (its request began with [`Activity::begin`]).
    pub fn body_arriving(self: &Arc<Self>) -> Arriving {
        if self.arriving.fetch_add(1, Ordering::SeqCst) == 0 {
            let place = ARRIVALS.fetch_add(1, Ordering::Relaxed);
            self.arriving_since.store(place, Ordering::SeqCst);
        }
        Arriving(Arc::clone(self))
    }

    /// If every request in progress is still waiting for its body (so closing the connection
    /// cuts no answer), since when, as a place in the order bodies started to arrive on any
    /// connection (smaller: earlier); `None` when idle or when one is being answered.
    pub fn only_arriving_since(&self) -> Option<u64> {
        let in_progress = self.in_progress.load(Ordering::SeqCst);
        let all_arriving = in_progress > 0 && self.arriving.load(Ordering::SeqCst) >= in_progress;
        all_arriving.then(|| self.arriving_since.load(Ordering::SeqCst))
    }
}

impl Drop for Arriving {
    fn drop(&mut self) {
        self.0.arriving.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        let activity = &self.0;
        let ended = u64::try_from(activity.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
        activity.last_end.fetch_max(ended, Ordering::SeqCst);
        activity.in_progress.fetch_sub(1, Ordering::SeqCst);
    }
}
