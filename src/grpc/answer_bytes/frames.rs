//! What streams' frames hold before they are handed over, in all, and the cut that bounds it.
//!
//! A stream's later frame (a watch's initial-state profile or change, a backup's chunk) is
//! read from tonic whole, and handed to hyper a chunk at a time, each chunk drawing on its
//! connection's budget. The part not handed over yet ([`Sending`](super::Sending)'s `rest`
//! beyond what its budgets count) was counted nowhere: a client that reads its socket and
//! answers PINGs (so keepalive never cuts it) but never gives window back had each stream hold
//! about one message, and 2,500 such streams on one 550 KB profile held 1.68 GB, 6.5 GB at
//! the default `--max-watch-streams` (found by an adversarial run). Per connection, a bound
//! does not do: 20 such streams on each of 500 connections stay under every connection's
//! budget and still hold GBs.
//!
//! Here those bytes are counted per connection and in all ([`HeldFrames`], exported as
//! `profile_state_stream_unsent_bytes`), and while the total is past the server's answer
//! budget (`IN_ALL` times `--grpc-max-message-bytes`), a look every [`LOOK`] cuts the
//! connections whose clients read less than a sixteenth of what they hold in a second
//! ([`Unsent::frames_unread`](super::Unsent)), those that read the smallest share first, until
//! what the others hold is under it. Cut, the connection's streams are dropped with their
//! frames; a watcher resumes from its revision. Streams never wait for what other connections
//! hold: streams that waited for the server's budget were stalled by a client that held it
//! while reading a few bytes a second, which is never cut, and every other client's watches
//! stopped (found by an adversarial run). A client that reads a sixteenth of what it holds
//! each second is never cut, and what such readers hold goes out at their pace; one
//! reading slower (many large initial states over a slow link) is cut while the total is past
//! the bound (the rule, not a stall, is what cuts it).
//!
//! A connection's watch streams (answers marked [`TakesTurns`](super::TakesTurns)) take turns
//! ([`poll_frame_turn`]): one takes its next frame from tonic only while its connection's
//! streams hold less than the connection's own answer budget (`PER_CONNECTION` messages),
//! and, while the total is past the bound, only while they hold none. The first: one client
//! alone asking for more large messages than the bound (many initial states over a slow link)
//! held them all and was cut, again on every try (found by an adversarial run); it now holds
//! about its budget and is paced by its reading. The second: clients that never read and
//! reconnected as soon as they were cut had every stream of each new connection take one
//! (about a message each) in the second before a look could judge it, and held 1.1 GB at the
//! default flags, 8.5 times the bound (found by an adversarial run); past the bound each
//! connection now adds about one message. A connection whose client reads takes turns among
//! its watches at its own pace; it never waits for what other connections hold. Other answers
//! never wait for a turn: a unary answer's trailers come after its message, and held back
//! they kept the call open (found by an adversarial run).
//!
//! Counted bytes go back exactly once: as a chunk of them is handed over (it is counted in the
//! budgets from then on, until h2 lets go of it) or taken into the budgets, and when the
//! stream is dropped with what it held. A stream's frame that goes out at once (a change
//! smaller than a chunk, to a client whose window is open) is never counted: no shared count is
//! written on that path.
//!
//! What this module does not do: bound the total below the bound plus about a message per
//! connection before the cut, or cut a client that reads a sixteenth of what it holds each
//! second.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use prometheus::IntGauge;
use tokio::sync::futures::OwnedNotified;

use super::ConnectionAnswerBytes;
use super::{
    Counts, CutReason, Holders, IN_ALL, OWED_FOR, PER_CONNECTION, SLOWEST_SHARE, STALLED, Unsent,
    least_share_read_first,
};
use crate::grpc::byte_budgets::Room;
use crate::poison::lock;
use crate::watch::QueuedBytes;

/// How often the connections holding frames are looked at while the total is past its bound.
const LOOK: Duration = Duration::from_millis(250);

/// The bytes streams' frames hold before they are handed over, server-wide, and the bound past
/// which stalled connections holding them are cut.
pub(super) struct HeldFrames {
    /// The bytes, frames' and watch queues': what decides, each change seeing the count
    /// before it (so the one that brings it down to the bound knows it did).
    held: AtomicUsize,
    /// The frames' part, exported.
    bytes: IntGauge,
    /// The watch queues' part (`QueuedBytes`), exported.
    queued: IntGauge,
    /// The server's answer budget.
    bound: usize,
    /// What one connection's streams' frames may hold before its watch streams take turns,
    /// past the bound or not: its own answer budget ([`poll_frame_turn`]).
    per_connection: usize,
    /// A look is running ([`HeldFrames::look_while_over`]).
    looking: AtomicBool,
    holders: Holders,
    /// Streams waiting for their turn to take a frame ([`poll_frame_turn`]), told when the
    /// total comes down to the bound. Not at every change within it: streams of connections
    /// that hold their own budget wait within the bound too, and would all wake for every
    /// chunk any connection hands over.
    room: Room,
}

impl HeldFrames {
    /// Counted in `bytes` (frames) and `queued` (watch queues), bounded by the server's answer
    /// budget for messages of at most `max_message_bytes` (each connection's streams' frames
    /// by its own), cutting among `holders`.
    pub(super) fn new(
        (bytes, queued): (IntGauge, IntGauge),
        max_message_bytes: usize,
        holders: &Holders,
    ) -> Arc<HeldFrames> {
        Arc::new(HeldFrames {
            held: AtomicUsize::new(0),
            bytes,
            queued,
            bound: max_message_bytes.saturating_mul(IN_ALL),
            per_connection: max_message_bytes.saturating_mul(PER_CONNECTION),
            looking: AtomicBool::new(false),
            holders: holders.clone(),
            room: Room::default(),
        })
    }

    /// The bytes held now.
    pub(super) fn total(&self) -> usize {
        self.held.load(Ordering::SeqCst)
    }

    /// `more` bytes held by frames; past the bound, starts looking for stalled holders to cut.
    fn hold(self: &Arc<Self>, more: usize) {
        self.add(more, &self.bytes);
    }

    /// `more` bytes held by watch queues, counted as [`hold`](HeldFrames::hold) counts frames'.
    fn hold_queued(self: &Arc<Self>, more: usize) {
        self.add(more, &self.queued);
    }

    fn add(self: &Arc<Self>, more: usize, gauge: &IntGauge) {
        self.held.fetch_add(more, Ordering::SeqCst);
        gauge.add(i64::try_from(more).unwrap_or(i64::MAX));
        if self.over() && !self.looking.swap(true, Ordering::SeqCst) {
            // Outside a runtime (unit tests) nothing looks: nothing is served either.
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(look_while_over(Arc::downgrade(self)));
            } else {
                self.looking.store(false, Ordering::SeqCst);
            }
        }
    }

    fn let_go(&self, bytes: usize) {
        self.subtract(bytes, &self.bytes);
    }

    fn let_go_queued(&self, bytes: usize) {
        self.subtract(bytes, &self.queued);
    }

    fn subtract(&self, bytes: usize, gauge: &IntGauge) {
        let before = self.held.fetch_sub(bytes, Ordering::SeqCst);
        gauge.sub(i64::try_from(bytes).unwrap_or(i64::MAX));
        if before > self.bound && before - bytes <= self.bound {
            self.room.tell();
        }
    }

    /// Whether the total is past the bound: streams of connections that hold frames wait for
    /// their turn ([`poll_frame_turn`]).
    fn over(&self) -> bool {
        self.total() > self.bound
    }
}

/// Looks every [`LOOK`] while what frames hold is past its bound, cutting stalled holders;
/// ends once it is not (or the server is gone). The frames' counts own it: one runs at a time,
/// started by the count that passed the bound.
async fn look_while_over(frames: Weak<HeldFrames>) {
    loop {
        let Some(held) = frames.upgrade() else {
            return;
        };
        if held.total() <= held.bound {
            held.looking.store(false, Ordering::SeqCst);
            // A count past the bound meanwhile saw it still looking, and left it to this one.
            if held.total() <= held.bound || held.looking.swap(true, Ordering::SeqCst) {
                return;
            }
        }
        (held.holders).cut_frame_holders(held.total(), held.bound, Instant::now());
        drop(held);
        tokio::time::sleep(LOOK).await;
    }
}

impl ConnectionAnswerBytes {
    /// Where the outboxes of this connection's watches tell what they hold past their bound
    /// (a change larger than it, queued alone): counted with its streams' frames, in all and
    /// toward its cut, so that a client whose streams each hold a large change it never reads
    /// is cut like one whose frames wait for window (an outbox is behind the frame: a stream
    /// whose window is shut is not polled, and what it would have sent stays there).
    pub fn queued_events(&self) -> Arc<dyn QueuedBytes> {
        Arc::clone(&self.unsent) as Arc<dyn QueuedBytes>
    }
}

impl QueuedBytes for Unsent {
    fn queued(&self, bytes: usize) {
        self.queued_bytes.fetch_add(bytes, Ordering::SeqCst);
        self.frames.hold_queued(bytes);
    }

    fn left(&self, bytes: usize) {
        self.queued_bytes.fetch_sub(bytes, Ordering::SeqCst);
        self.frames.let_go_queued(bytes);
    }
}

impl Unsent {
    /// What its streams hold that its budgets do not count: their frames' bytes and what their
    /// outboxes tell.
    fn held_unsent(&self) -> usize {
        let frames = self.frame_bytes.load(Ordering::Relaxed);
        frames.saturating_add(self.queued_bytes.load(Ordering::Relaxed))
    }

    /// One of its streams' frames holds `now` bytes not counted in its budgets, `was` before.
    pub(super) fn frame_holds(&self, was: usize, now: usize) {
        if now > was {
            self.frame_bytes.fetch_add(now - was, Ordering::SeqCst);
            self.frames.hold(now - was);
        } else {
            let less = was - now;
            let before = self.frame_bytes.fetch_sub(less, Ordering::SeqCst);
            self.frames.let_go(less);
            // What may let its waiting streams go: holding none, or coming under its budget.
            let cap = self.frames.per_connection;
            if before == less || (before >= cap && before - less < cap) {
                self.frames_room.tell();
            }
        }
    }

    /// Whether one of its watch streams may take its next frame now: its streams hold none,
    /// or less than its own budget while what all streams hold is within the bound.
    fn may_take_frame(&self) -> bool {
        let held = self.frame_bytes.load(Ordering::SeqCst);
        held == 0 || (held < self.frames.per_connection && !self.frames.over())
    }

    /// Whether its streams' frames hold bytes and its client read less than a sixteenth
    /// ([`SLOWEST_SHARE`]) of them in a [`STALLED`] window or longer, as looks have seen it;
    /// if so, what it read in that window.
    pub(super) fn frames_unread(&self, now: Instant) -> Option<usize> {
        let held = self.held_unsent();
        let counts = Counts {
            read: self.data_read.load(Ordering::Relaxed),
            took: 0,
            held,
        };
        let owed = |start: Counts| start.held.max(held).div_ceil(SLOWEST_SHARE);
        let limits = (Duration::MAX, OWED_FOR);
        let not_reading = (self.frames_stalled).for_how_long(counts, owed, now, limits);
        let stalled = held > 0 && not_reading >= STALLED;
        stalled.then(|| (self.frames_stalled).read_in_window(counts.read))
    }
}

impl Holders {
    /// Cuts the connections whose clients do not read ([`Unsent::frames_unread`]), those that
    /// read the smallest share of what they hold first (the heaviest of equals first), until
    /// what the others hold of `total` is at most `bound`. Connections cut already count as
    /// gone. Heaviest first alone cut a client reading steadily, a little slower than the rule
    /// asks, beside ten that read nothing, which then held less than the bound and stayed
    /// (found by an adversarial run).
    pub(super) fn cut_frame_holders(&self, total: usize, bound: usize, now: Instant) {
        let (mut left, mut stalled) = (total, Vec::new());
        {
            let mut holders = lock(&self.0);
            holders.retain(|holder| holder.strong_count() > 0);
            for holder in holders.iter().filter_map(Weak::upgrade) {
                let held = holder.held_unsent();
                if holder.cut.is_cancelled() {
                    left = left.saturating_sub(held);
                } else if let Some(read) = holder.frames_unread(now) {
                    stalled.push((held, read, holder));
                }
            }
        }
        stalled.sort_unstable_by(|(a_held, a_read, _), (b_held, b_read, _)| {
            least_share_read_first((*a_held, *a_read), (*b_held, *b_read))
        });
        for (held, _, holder) in stalled {
            if left <= bound {
                return;
            }
            let warn = holder.cut_for(CutReason::StreamBytes);
            left = left.saturating_sub(held);
            let Some(suppressed) = warn else {
                continue;
            };
            tracing::warn!(
                peer = %holder.peer,
                unsent_stream_bytes = held,
                suppressed,
                "cut a gRPC connection whose streams held messages its client read less than a \
                 sixteenth of in a second, while such messages held more than the server's \
                 answer budget (a client that stopped giving window back, or reads too slowly \
                 for what its streams hold)"
            );
        }
    }
}

/// Ready once a watch stream of `unsent`'s connection may take its next frame from tonic
/// ([`Unsent::may_take_frame`]: its connection's streams hold less than its budget, and none
/// while the total is past the bound); until then `wait` holds its registration to be told.
/// What such a stream would have sent stays in its watch's outbox, shared with the store, and
/// falls behind into a reset as a slow reader's does.
pub(super) fn poll_frame_turn(
    unsent: &Arc<Unsent>,
    wait: &mut Option<FrameWait>,
    cx: &mut Context<'_>,
) -> Poll<()> {
    loop {
        if let Some(waiting) = wait.as_mut() {
            if !waiting.told(cx) {
                return Poll::Pending;
            }
            *wait = None;
        }
        if unsent.may_take_frame() {
            return Poll::Ready(());
        }
        // Told from here on, then one more look: a turn given in between is not missed.
        let waiting = FrameWait::start(unsent);
        if unsent.may_take_frame() {
            return Poll::Ready(());
        }
        *wait = Some(waiting);
    }
}

/// A stream waiting for its turn to take a frame: told when its connection's streams' frames
/// come under its budget or to none, or when the total comes down to the bound.
pub(super) struct FrameWait {
    unsent: Arc<Unsent>,
    connection: Pin<Box<OwnedNotified>>,
    server: Pin<Box<OwnedNotified>>,
}

impl FrameWait {
    fn start(unsent: &Arc<Unsent>) -> FrameWait {
        let (connection, server) = (&unsent.frames_room, &unsent.frames.room);
        connection.start_waiting();
        server.start_waiting();
        let (mut connection, mut server) = (Box::pin(connection.told()), Box::pin(server.told()));
        connection.as_mut().enable();
        server.as_mut().enable();
        FrameWait {
            unsent: Arc::clone(unsent),
            connection,
            server,
        }
    }

    /// Whether either told it; otherwise both are registered with `cx`.
    fn told(&mut self, cx: &mut Context<'_>) -> bool {
        let connection = self.connection.as_mut().poll(cx).is_ready();
        connection || self.server.as_mut().poll(cx).is_ready()
    }
}

impl Drop for FrameWait {
    fn drop(&mut self) {
        self.unsent.frames_room.stop_waiting();
        self.unsent.frames.room.stop_waiting();
    }
}
