//! A subscriber's outbox: the queue between its feed and its stream, bounded in events and in
//! the bytes of the changes and profiles it holds.
//!
//! A count alone did not bound memory: a queued change holds its profile, and a subscriber
//! that stopped reading kept its 64 queued changes alive after the history had dropped them;
//! with large profiles that was 18 MB per stalled stream, without end (found by an adversarial
//! run). The byte bound counts an event's profiles as the history does
//! ([`crate::store::change_bytes`]); an event larger than the whole bound still goes through
//! when the queue is empty, so no change is too large to be sent.
//!
//! One feed sends into an outbox (a single producer), so the bytes checked before a send are
//! still there when it adds its own.
//!
//! The one larger event is not bounded by the queue: a client that opens many streams and
//! never reads had each hold one, and 1,000 stalled streams on a large profile that changed
//! between their stalls held 6 GB (found by an adversarial run). What a queue holds past its
//! byte bound is told to its [`QueuedBytes`], given by the adapter (the gRPC one counts it
//! with what its connection's streams hold, whose cut ends connections that do not read).
//! Within the bound nothing is told: no shared count is written on a stream's usual path, and
//! a profile queued for many streams (an initial state) is not counted once per stream.
//!
//! What this module does not do: decide what is sent, encode it, or cut anything.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use tokio::sync::{Notify, mpsc};

use super::WatchEvent;

/// Events a subscriber's queue holds at most.
pub const OUTBOX_EVENTS: usize = 64;
/// Bytes of changes and profiles a subscriber's queue holds at most (one larger event passes
/// alone): 64 ordinary changes of about 1 KiB are far below it, so it binds only for large
/// profiles.
pub const OUTBOX_BYTES: usize = 256 * 1024;

/// Told the bytes a queue holds beyond its byte bound, event by event: each event's part past
/// it is told `queued` as it joins the queue and `left` once it leaves it (taken by the
/// stream, or dropped with it), so the two always balance and `left` never comes first.
pub trait QueuedBytes: Send + Sync {
    /// `bytes` more are queued.
    fn queued(&self, bytes: usize);
    /// `bytes` told before left the queue.
    fn left(&self, bytes: usize);
}

/// The feed's end.
pub struct Outbox {
    events: mpsc::Sender<Weighed>,
    budget: Arc<Budget>,
}

/// The stream's end: yields the events in order, and frees their bytes as it takes them.
pub struct Inbox {
    events: mpsc::Receiver<Weighed>,
    budget: Arc<Budget>,
}

/// An event and the bytes it counts for.
struct Weighed {
    event: WatchEvent,
    bytes: usize,
    /// Its part told to the queue's [`QueuedBytes`], told back when it is dropped.
    _told: Told,
}

/// Bytes told to a [`QueuedBytes`] as `queued`, told `left` when dropped.
struct Told(Option<(usize, Arc<dyn QueuedBytes>)>);

impl Drop for Told {
    fn drop(&mut self) {
        if let Some((bytes, queue)) = &self.0 {
            queue.left(*bytes);
        }
    }
}

struct Budget {
    /// Bytes of the events in the queue.
    queued: AtomicUsize,
    limit: usize,
    /// Signalled whenever the stream takes an event.
    taken: Notify,
    /// Told what the queue holds past `limit`.
    tell: Option<Arc<dyn QueuedBytes>>,
}

/// An outbox of at most `events` events and `bytes` bytes (one larger event passes alone).
pub fn outbox(events: usize, bytes: usize) -> (Outbox, Inbox) {
    outbox_telling(events, bytes, None)
}

/// [`outbox`], telling `tell` what it holds past its `bytes`.
pub fn outbox_telling(
    events: usize,
    bytes: usize,
    tell: Option<Arc<dyn QueuedBytes>>,
) -> (Outbox, Inbox) {
    let (sender, receiver) = mpsc::channel(events.max(1));
    let budget = Arc::new(Budget {
        queued: AtomicUsize::new(0),
        limit: bytes,
        taken: Notify::new(),
        tell,
    });
    let outbox = Outbox {
        events: sender,
        budget: Arc::clone(&budget),
    };
    (
        outbox,
        Inbox {
            events: receiver,
            budget,
        },
    )
}

/// Why an event was not queued; the event comes back.
pub enum TrySendError {
    /// No room now, in events or in bytes.
    Full(WatchEvent),
    /// The stream is gone.
    Closed,
}

/// The bytes `event` keeps alive while it is queued.
fn bytes_of(event: &WatchEvent) -> usize {
    match event {
        WatchEvent::Change(change) => crate::store::change_bytes(change),
        WatchEvent::Existing(profile) => profile.memory_bytes(),
        _ => 0,
    }
}

impl Budget {
    fn has_room_for(&self, bytes: usize) -> bool {
        let queued = self.queued.load(Ordering::Acquire);
        queued == 0 || queued.saturating_add(bytes) <= self.limit
    }

    /// Counts `event` of `bytes` into the queue, telling its part past the bound.
    fn weigh(&self, event: WatchEvent, bytes: usize) -> Weighed {
        let before = self.queued.fetch_add(bytes, Ordering::AcqRel);
        let told = match before.saturating_add(bytes) > self.limit {
            true => self.tell_past(before, bytes),
            false => Told(None),
        };
        Weighed {
            event,
            bytes,
            _told: told,
        }
    }

    /// The part of an event of `bytes`, queued on top of `before`, past the bound, told. Out of
    /// line: every delivery weighs its event, and almost none is past the bound.
    #[cold]
    #[inline(never)]
    fn tell_past(&self, before: usize, bytes: usize) -> Told {
        let past = |queued: usize| queued.saturating_sub(self.limit);
        let told = past(before.saturating_add(bytes)) - past(before);
        match &self.tell {
            Some(queue) if told > 0 => {
                queue.queued(told);
                Told(Some((told, Arc::clone(queue))))
            }
            _ => Told(None),
        }
    }
}

impl Outbox {
    /// Queues `event` if there is room for it now.
    pub fn try_send(&self, event: WatchEvent) -> Result<(), TrySendError> {
        let bytes = bytes_of(&event);
        if !self.budget.has_room_for(bytes) {
            return match self.events.is_closed() {
                true => Err(TrySendError::Closed),
                false => Err(TrySendError::Full(event)),
            };
        }
        self.queue(event, bytes)
    }

    fn queue(&self, event: WatchEvent, bytes: usize) -> Result<(), TrySendError> {
        // Counted before it is in the queue, so the stream never frees more than was added.
        let weighed = self.budget.weigh(event, bytes);
        match self.events.try_send(weighed) {
            Ok(()) => Ok(()),
            Err(error) => {
                self.budget.queued.fetch_sub(bytes, Ordering::AcqRel);
                match error {
                    mpsc::error::TrySendError::Full(weighed) => {
                        Err(TrySendError::Full(weighed.event))
                    }
                    mpsc::error::TrySendError::Closed(_) => Err(TrySendError::Closed),
                }
            }
        }
    }

    /// Queues `event`, waiting for room; `Err` when the stream is gone.
    pub async fn send(&self, event: WatchEvent) -> Result<(), ()> {
        let bytes = bytes_of(&event);
        loop {
            // Registered before the check, so a take between the two is not missed.
            let taken = self.budget.taken.notified();
            tokio::pin!(taken);
            taken.as_mut().enable();
            if self.budget.has_room_for(bytes) {
                break;
            }
            tokio::select! {
                () = taken => {}
                () = self.events.closed() => return Err(()),
            }
        }
        let permit = self.events.reserve().await.map_err(|_| ())?;
        permit.send(self.budget.weigh(event, bytes));
        Ok(())
    }

    /// Resolves when the stream is gone.
    pub async fn closed(&self) {
        self.events.closed().await;
    }

    /// Whether the stream is gone.
    pub fn is_closed(&self) -> bool {
        self.events.is_closed()
    }
}

impl Inbox {
    /// The next event; `None` once the feed has ended and everything was taken.
    pub async fn recv(&mut self) -> Option<WatchEvent> {
        std::future::poll_fn(|cx| self.poll_recv(cx)).await
    }

    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<WatchEvent>> {
        self.events.poll_recv(cx).map(|weighed| {
            weighed.map(
                |Weighed {
                     event,
                     bytes,
                     _told,
                 }| {
                    self.budget.queued.fetch_sub(bytes, Ordering::AcqRel);
                    drop(_told);
                    self.budget.taken.notify_one();
                    event
                },
            )
        })
    }
}

impl tokio_stream::Stream for Inbox {
    type Item = WatchEvent;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<WatchEvent>> {
        self.poll_recv(cx)
    }
}
