//! What gRPC answers may hold while they wait to be sent: bytes per connection and in all.
//!
//! tonic encodes an answer whole and hyper hands it to h2, which keeps it until the client's
//! flow-control window lets it go: a client that asked for large answers and never read them
//! had the server hold them all, up to `--grpc-max-concurrent-streams` calls per connection
//! (about 6 MB each for a 4 MB ListProfiles page: 1.7 GB from 300 calls on two connections;
//! found by an adversarial run). Here an answer's first message, read as soon as the call
//! returns (hyper would not poll the body while the client's window is shut), draws its bytes
//! from its connection's budget (four times `--grpc-max-message-bytes`) and the server's (32
//! times it). It is handed to hyper in chunks of 16 KiB at most, each counted until h2 lets
//! go of it ([`CountedChunk`]: written to the socket, or dropped with its stream or
//! connection). hyper takes a chunk whenever the stream's window has a byte of room, and h2
//! keeps up to 400 KiB per stream that the socket has not taken: a client that opened huge
//! windows and never read held 475 MB on one connection when chunks were given back as hyper
//! took them (found by an adversarial run). An answer past either budget is
//! RESOURCE_EXHAUSTED instead, naming the budget.
//! Answers that clients read take their budget back as fast as the network carries them; only
//! clients that stop reading (or read far slower than they ask) meet the limits.
//!
//! Chunks are given back as h2 drops them, not as the socket writes: the socket also writes
//! bytes no answer counted (PING and SETTINGS acknowledgements, refused calls' trailers), and
//! giving back as many as it wrote let a client that sent PINGs repay answers h2 still held
//! behind windows it kept shut, and park them past every budget (found by an adversarial run).
//!
//! A call refused because the server's budget is spent cuts a stalled connection, the one
//! whose client read the smallest share of what it holds (`Holders`): one client that stops
//! reading on enough connections would otherwise refuse every other client's larger answers
//! for as long as it stayed. Answers to clients that have not read ([`Unsent::has_read`], a
//! new connection's first among them) hold at most half of the server's budget between
//! them: a client that read nothing and kept opening connections, each gone before a
//! refusal could find it stalled, held all of it (found by an adversarial run); what clients
//! that read hold never refuses the others. A health check's answer draws on its
//! connection's budget alone (`byte_budgets::server_budget_for`), so probes are answered
//! whatever other clients hold.
//!
//! An answer's first message also draws what its call holds besides its bytes
//! ([`CALL_BYTES`](super::byte_budgets::CALL_BYTES)) from the server's budget (and its half),
//! until h2 lets go of the chunk that ends that message (written, or dropped with its stream),
//! so the server's budget bounds how many answers wait, not only their bytes (40-byte answers
//! parked by the thousand held 12 KB each), and a stream's does not hold it for the stream's
//! life. Not from the connection's budget, nor in what a connection is weighed and judged by
//! (its shares of the server's budget, [`Unsent::has_read`]): see [`Budgets::take_answer`].
//!
//! A stream's later messages (a watch stream's changes and initial state, a backup's chunks)
//! count too, in the connection's budget only, a chunk at a time as they are handed to hyper,
//! and they wait for room instead of failing: a stream whose client reads slowly is slowed to
//! its pace. Before they were not counted, and h2 kept up to 400 KiB of each stream of a
//! client that stopped reading: about 0.6 MiB per stalled watch stream, 5.7 GiB at the default
//! `--max-watch-streams` (found by an adversarial run). Not in the server's budget: streams
//! that waited for it were stalled by a client that held it while reading a few bytes a
//! second, which is never cut, so every other client's watches stopped (found by the next
//! adversarial run). So a client's streams wait only for what its own connection holds.
//!
//! Counted bytes go back only as h2 lets go of them: giving back on a guess (a stream that
//! waited a second for room took everything its connection counted for lost) let a client
//! park answers past every budget (found by an adversarial run). A connection whose budget
//! stays spent while its client reads almost none of it is cut instead
//! ([`Unsent::found_spent`]). A client reads what its socket takes of DATA frames
//! ([`DataFrames`]): not PING acknowledgements, and not chunks h2 dropped with streams the
//! client reset (a client that reset and re-asked a few calls a second, reading nothing, held
//! the server's budget for good when those counted: found by an adversarial run).
//!
//! What a stream holds before it is handed over (one frame of tonic's, at most
//! [`STREAM_FRAME_BYTES`] or one message: a watch's initial state, encoded per stream) beyond
//! what its budgets count is counted too, per connection and in all, and past the server's
//! budget the connections whose clients read the least of what they hold are cut (`frames`):
//! 2,500 streams of clients that answered PINGs but gave no window back held one 550 KB
//! profile each, 1.68 GB, counted nowhere (found by an adversarial run). Streams never wait
//! for what other connections hold, for the reason above; a watch stream ([`TakesTurns`])
//! waits to take its next frame while its own connection's streams hold its budget's worth,
//! or past the bound any (`frames`).
//!
//! What this module does not do: give a stalled answer a time limit (only a connection whose
//! budget stays spent has one), bound what streams' frames hold before that cut comes below
//! the bound plus about a message per connection, or a stream's outbox of events (see
//! `grpc::watch`).

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use prometheus::{IntCounterVec, IntGauge, Opts};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::futures::OwnedNotified;
use tokio::time::Sleep;
use tokio_util::sync::CancellationToken;

use tonic::Status;
use tonic::body::Body;
use tonic::codegen::{Body as HttpBody, Bytes, http};

use super::byte_budgets::{Budget, Budgets, Held, Room, SpentBy, call_bytes, server_budget_for};
use super::control_frames::{self, ControlFrames};
use super::data_frames::DataFrames;
use super::transport::Connection;
use crate::logging::RateLimited;
use crate::poison::lock;

mod frames;

use frames::{FrameWait, HeldFrames};

/// A connection's budget: this many of the largest messages.
const PER_CONNECTION: usize = 4;
/// The server's budget: this many of the largest messages.
const IN_ALL: usize = 32;
/// The part of it answers to clients that have not read may hold between them
/// ([`Unsent::has_read`]): half.
const UNREAD: usize = IN_ALL / 2;

/// The bytes of answers a connection may hold unsent at once, and those h2 holds.
#[derive(Clone)]
pub struct ConnectionAnswerBytes {
    budget: Budget,
    /// What it holds of the server's budget ([`Budgets::connection_share`]).
    share: Budget,
    unsent: Arc<Unsent>,
}

/// Answer bytes handed to hyper that h2 has not let go of yet: still drawn from the
/// connection's budget (and the first messages' from the server's), given back chunk by
/// chunk as h2 drops them ([`CountedChunk`]).
struct Unsent {
    /// The bytes of answers ever handed to h2 (wrapping): those it holds are these less
    /// `let_go_bytes`, one count each way per chunk.
    handed_bytes: AtomicUsize,
    connection: Budget,
    in_all: Budget,
    /// The part of `in_all` answers to clients that have not read may hold.
    unread: Budget,
    /// What the connection holds of `unread`: weighed when that part is spent.
    unread_share: Budget,
    /// What the connection holds of `in_all`: weighed when the server's budget is spent.
    share: Budget,
    /// Cancelled to cut the connection (`crate::server::cut`): see [`Unsent::cut_for`].
    cut: CancellationToken,
    /// Cuts counted and their warnings, by reason.
    cuts: Arc<Cuts>,
    peer: SocketAddr,
    /// The bytes of answers h2 ever let go of (wrapping): written, or dropped with streams
    /// the client reset.
    let_go_bytes: AtomicUsize,
    /// The DATA payload bytes its socket ever took (wrapping): moves only while the client
    /// reads its answers.
    data_read: AtomicUsize,
    /// The bytes its calls' first messages ever took of its share of the server's budget
    /// (wrapping): what it owes reading, whether it still holds them or reset their streams.
    shared_bytes: AtomicUsize,
    /// The socket's last write had to wait: the client is not reading, and what is counted
    /// may still go out.
    blocked: AtomicBool,
    /// Since when its client has not read, as refusals for the server's budget have seen it
    /// ([`Unsent::stalled`]).
    stalled: NotReading,
    /// Since when its client has not read while its budget was found spent
    /// ([`Unsent::found_spent`]).
    spent: NotReading,
    /// What its streams' frames hold before they are handed over, not counted in its budgets
    /// (`frames`).
    frame_bytes: AtomicUsize,
    /// What its watches' outboxes hold past their bound (`frames`: counted with the frames'
    /// bytes in all and toward its cut, not in its streams' turns).
    queued_bytes: AtomicUsize,
    /// The same, in all.
    frames: Arc<HeldFrames>,
    /// Since when its client has not read while its frames were held
    /// ([`Unsent::frames_unread`]).
    frames_stalled: NotReading,
    /// Its streams waiting for their turn to take a frame (`frames::poll_frame_turn`), told
    /// when its streams' frames come under its budget or to none.
    frames_room: Room,
}

/// Why a connection was cut: the `reason` label of `profile_state_connections_cut_total`.
#[derive(Clone, Copy, Debug)]
enum CutReason {
    /// Its own budget, for [`IDLE_CUT`] ([`Unsent::found_spent`]).
    ConnectionBudget,
    /// The server's budget ([`Holders::cut_least_reading`]).
    ServerBudget,
    /// Streams' frames, past their bound (`frames`).
    StreamBytes,
    /// Control frames the client sent past their allowance (`super::control_frames`): not
    /// about answers, but cut, counted and warned of alike.
    ControlFrames,
}

impl CutReason {
    fn label(self) -> &'static str {
        match self {
            CutReason::ConnectionBudget => "connection_budget",
            CutReason::ServerBudget => "server_budget",
            CutReason::StreamBytes => "stream_bytes",
            CutReason::ControlFrames => "control_frames",
        }
    }
}

/// The server's cuts: counted (`profile_state_connections_cut_total`), and warned of at most
/// every [`WARN_EVERY`](crate::logging::WARN_EVERY) per reason: clients that reconnect as
/// soon as they are cut made a WARN line for each of 1,122 cuts in 30 s (found by an
/// adversarial run).
struct Cuts {
    counted: IntCounterVec,
    /// By [`CutReason`], in its order.
    warnings: [RateLimited; 4],
}

impl Unsent {
    /// Cuts the connection, counted under `reason` (once: the callers pass over connections
    /// cut already); `Some(cuts not warned of since the last warning)` when one is due.
    fn cut_for(&self, reason: CutReason) -> Option<usize> {
        self.cut.cancel();
        let cuts = &self.cuts;
        cuts.counted
            .with_label_values(&["grpc", reason.label()])
            .inc();
        cuts.warnings[reason as usize].due()
    }

    /// h2 let go of a chunk of `bytes`, `shared` of them drawn from the server's budget too
    /// (and from its part for clients that have not read).
    fn let_go(&self, bytes: usize, shared: Shared) {
        // (Not reading: a stream the client reset drops its chunks too.)
        self.let_go_bytes.fetch_add(bytes, Ordering::Relaxed);
        self.connection.give_back(bytes);
        self.in_all.give_back(shared.in_all);
        self.share.give_back(shared.in_all);
        self.unread.give_back(shared.unread);
        self.unread_share.give_back(shared.unread);
    }

    /// The socket took `bytes` of DATA frames' payload.
    fn data_read(&self, bytes: usize) {
        if bytes > 0 {
            self.data_read.fetch_add(bytes, Ordering::Relaxed);
        }
    }

    /// The bytes h2 holds (near enough: the two counts are read apart).
    fn held_by_h2(&self) -> usize {
        let handed = self.handed_bytes.load(Ordering::Relaxed);
        handed.wrapping_sub(self.let_go_bytes.load(Ordering::Relaxed))
    }

    /// Notes whether a write of the socket had to wait.
    fn wrote(&self, write: &Poll<std::io::Result<usize>>) {
        let blocked = write.is_pending();
        if self.blocked.load(Ordering::Relaxed) != blocked {
            self.blocked.store(blocked, Ordering::Relaxed);
        }
    }

    /// The connection's budget was found spent at `now` (a call refused, a stream's frame
    /// waiting for room): cuts the connection once it has been found so for [`IDLE_CUT`]
    /// while its client read less than a sixteenth of what the budget holds
    /// ([`SLOWEST_SHARE`]) and its socket did not wait to write. Its client then reads
    /// nothing, and what is counted waits for windows it keeps shut: the connection goes (its
    /// client can connect again). Giving back everything counted instead let a client park
    /// answers past every budget (found by an adversarial run).
    fn found_spent(&self, now: Instant) {
        let read = self.data_read.load(Ordering::Relaxed);
        // A socket waiting to write is a client reading slowly: what is counted may go out.
        let reading = match self.blocked.load(Ordering::Relaxed) {
            true => 0,
            false => self.connection.used().div_ceil(SLOWEST_SHARE),
        };
        let counts = Counts {
            read,
            ..Counts::default()
        };
        let limits = (SPENT_LOOKS, Duration::MAX);
        let not_reading = (self.spent).for_how_long(counts, |_| reading, now, limits);
        if not_reading < IDLE_CUT || self.cut.is_cancelled() {
            return;
        }
        let Some(suppressed) = self.cut_for(CutReason::ConnectionBudget) else {
            return;
        };
        tracing::warn!(
            peer = %self.peer,
            answer_bytes = self.held_by_h2(),
            suppressed,
            "cut a gRPC connection whose answers took its whole budget and almost none went out \
             for ten seconds (a client that reads nothing)"
        );
    }

    /// Whether the connection holds answer bytes and its client read less than a sixteenth
    /// ([`SLOWEST_SHARE`]) of them, or of what it took since, for [`STALLED`] or longer, as
    /// refusals have seen it. Any byte used to do: a client that kept its windows at one byte
    /// and read a trickle held its share for good and was never cut. A look that found it
    /// holding nothing used to end the window: a client that reset every call on one
    /// connection after another, each holding its answers less than a second, held the
    /// server's budget for good (both found by adversarial runs).
    fn stalled(&self, now: Instant) -> bool {
        // Of the server's budget: what a cut would free. A stream's later messages and credit
        // are not in it, so an idle connection of watch streams is never taken for stalled.
        let used = self.share.used();
        let counts = Counts {
            read: self.data_read.load(Ordering::Relaxed),
            took: self.shared_bytes.load(Ordering::Relaxed),
            held: used,
        };
        // What it held when the window started and what it took since, or what it holds.
        let owed = |start: Counts| {
            let took = (start.held).saturating_add(counts.took.wrapping_sub(start.took));
            used.max(took).div_ceil(SLOWEST_SHARE)
        };
        // Refusals look now and then: no gap restarts the window, but its age does.
        let limits = (Duration::MAX, OWED_FOR);
        let not_reading = (self.stalled).for_how_long(counts, owed, now, limits);
        used > 0 && not_reading >= STALLED
    }

    /// What its client read in the window [`Unsent::stalled`] last judged.
    fn stalled_read(&self) -> usize {
        (self.stalled).read_in_window(self.data_read.load(Ordering::Relaxed))
    }

    /// Whether its client has read at least a sixteenth ([`SLOWEST_SHARE`]) of what its
    /// calls' first messages took of the server's budget over the connection's life, `bytes`
    /// more included: answers to clients that have not hold at most [`UNREAD`] of that budget
    /// between them ([`Budgets::take_answer`]). Judged at each take, so a client that opens
    /// connection after connection, each gone before a refusal could find it stalled, is
    /// held to it too, a new connection's first answer among them. With the answer's bytes:
    /// judged on what it took before alone, one byte of a health check's answer (or of a
    /// watch's initial state: neither draws on the server's budget) let a new connection's
    /// next answer of any size draw on the whole, and a client reconnecting faster than any
    /// cut held all of it again for 60 bytes read a second (found by an adversarial run).
    fn has_read(&self, bytes: usize) -> bool {
        let read = self.data_read.load(Ordering::Relaxed);
        let took = self.shared_bytes.load(Ordering::Relaxed);
        read.saturating_mul(SLOWEST_SHARE) >= took.saturating_add(bytes)
    }

    /// The part of the server's budget for clients that have not read, and what the
    /// connection holds of it.
    fn unread_part(&self) -> (&Budget, &Budget) {
        (&self.unread, &self.unread_share)
    }

    /// A call's first message took `bytes` of its share of the server's budget.
    fn took_share(&self, bytes: usize) {
        self.shared_bytes.fetch_add(bytes, Ordering::Relaxed);
    }
}

/// Since when a connection's client has read too few of its answer bytes to count as reading,
/// as looks have seen it: the one rule behind both cuts.
#[derive(Default)]
struct NotReading(Mutex<Option<Look>>);

/// A connection's counts as a look saw them.
#[derive(Clone, Copy, Default)]
struct Counts {
    /// `Unsent::data_read`.
    read: usize,
    /// `Unsent::shared_bytes`.
    took: usize,
    /// Its share of the server's budget in use.
    held: usize,
}

/// The window a [`NotReading`] measures.
#[derive(Clone, Copy)]
struct Look {
    /// The counts when the window started.
    start: Counts,
    since: Instant,
    /// The last look: a window not looked at for longer than a look's gap starts again.
    last: Instant,
}

impl NotReading {
    /// How long, as of `now`, the client has read fewer bytes than it `owed` since the window
    /// started (`counts` are its counts now; `owed` is given those at the start). Zero when
    /// this look starts a window: at the first, once it read what it owed, when the last look
    /// was more than `gap` ago, and when the window is older than `longest`.
    fn for_how_long(
        &self,
        counts: Counts,
        owed: impl Fn(Counts) -> usize,
        now: Instant,
        (gap, longest): (Duration, Duration),
    ) -> Duration {
        let mut look = lock(&self.0);
        match &mut *look {
            Some(seen)
                if counts.read.wrapping_sub(seen.start.read) < owed(seen.start)
                    && now.saturating_duration_since(seen.last) <= gap
                    && now.saturating_duration_since(seen.since) <= longest =>
            {
                seen.last = now;
                now.saturating_duration_since(seen.since)
            }
            _ => {
                let (since, last) = (now, now);
                *look = Some(Look {
                    start: counts,
                    since,
                    last,
                });
                Duration::ZERO
            }
        }
    }

    /// What the client read since the window started, `read` being its count now; nothing
    /// before a first look.
    fn read_in_window(&self, read: usize) -> usize {
        let look = lock(&self.0);
        look.map_or(0, |seen| read.wrapping_sub(seen.start.read))
    }
}

/// How long a connection holding answer bytes must take too few of them before a refusal for
/// the server's budget may cut it.
const STALLED: Duration = Duration::from_secs(1);

/// The longest a connection owes reading what it took, held or reset: long enough to span
/// connections taking turns (each emptied within a second), short enough that a client whose
/// calls were cancelled unread once is not cut, reading, a minute later with no second's
/// grace (its debt never expired: found by an adversarial run).
const OWED_FOR: Duration = Duration::from_secs(5);

/// A client reading less than this share of what its connection holds of the server's budget
/// in a [`STALLED`] window may be cut when that budget is spent: one reading at least this
/// never is (16 MiB held: 1 MiB a second).
const SLOWEST_SHARE: usize = 16;

/// The layer that makes every answer body draw on its budgets.
#[derive(Clone)]
pub struct AnswerBytesLayer {
    in_all: Budget,
    /// The part of `in_all` answers to clients that have not read may hold.
    unread: Budget,
    max_message_bytes: usize,
    holders: Holders,
    /// [`CHUNK`], or less: see [`AnswerBytesLayer::new`].
    chunk: usize,
    /// [`CALL_BYTES`](super::byte_budgets::CALL_BYTES), or less: see [`AnswerBytesLayer::new`].
    call_bytes: usize,
    /// What streams' frames hold before they are handed over, in all (`frames`).
    frames: Arc<HeldFrames>,
    /// Connections cut, by [`CutReason`].
    cuts: Arc<Cuts>,
}

impl AnswerBytesLayer {
    /// Budgets for messages of at most `max_message_bytes`, on connections that may have
    /// `open_streams` streams open at once (watches, health and reflection watches, a backup).
    /// Chunks are small enough that those streams, each holding one in h2 behind a window its
    /// client keeps shut and at most a chunk of credit, take at most half of a connection's
    /// budget: the others spent it when a client read some streams and not the others, and
    /// its other calls were refused (with `--grpc-max-message-bytes 262144`, 100 streams took
    /// 1.6 MiB of 1 MiB). Never under [`SMALLEST_CHUNK`] (or the message limit): smaller, every
    /// byte went out in a frame of its own with nine bytes of header (found by an adversarial
    /// run, at `--grpc-max-message-bytes 4096` and 10,000 watch streams per connection); such
    /// settings give up the half. What a call's own state holds
    /// ([`CALL_BYTES`](super::byte_budgets::CALL_BYTES)) is counted as at most a sixty-fourth
    /// of the message limit, so the smallest limits leave room for calls.
    pub fn new(max_message_bytes: usize, open_streams: usize) -> Self {
        let budget = max_message_bytes.saturating_mul(PER_CONNECTION);
        let chunk = CHUNK
            .min(budget / 4 / open_streams.max(1))
            .max(SMALLEST_CHUNK)
            .min(max_message_bytes)
            .max(1);
        let holders = Holders::default();
        // Counted until the server exports them (`counting_frames_in`, `counting_cuts_in`).
        let gauge = IntGauge::new("unsent_stream_bytes", "not exported").expect("a valid name");
        let queued = IntGauge::new("watch_queued_bytes", "not exported").expect("a valid name");
        let labels = ["listener", "reason"];
        let counted = IntCounterVec::new(Opts::new("connections_cut", "not exported"), &labels)
            .expect("a valid name");
        let cuts = Arc::new(Cuts {
            counted,
            warnings: Default::default(),
        });
        AnswerBytesLayer {
            in_all: Budget::new(max_message_bytes, IN_ALL),
            unread: Budget::new(max_message_bytes, UNREAD),
            max_message_bytes,
            frames: HeldFrames::new((gauge, queued), max_message_bytes, &holders),
            holders,
            chunk,
            call_bytes: call_bytes(max_message_bytes),
            cuts,
        }
    }

    /// These budgets, counting what streams' frames hold before they are handed over in
    /// `frames`, and what watch queues tell them (`QueuedBytes`) in `queued` (`frames`).
    /// Before any connection is made.
    pub fn counting_frames_in(self, frames: IntGauge, queued: IntGauge) -> Self {
        let frames = HeldFrames::new((frames, queued), self.max_message_bytes, &self.holders);
        AnswerBytesLayer { frames, ..self }
    }

    /// These budgets, counting the connections they cut in `cuts` (labels `listener`, always
    /// `grpc`, and `reason`).
    /// Before any connection is made.
    pub fn counting_cuts_in(self, counted: IntCounterVec) -> Self {
        let warnings = Default::default();
        let cuts = Arc::new(Cuts { counted, warnings });
        AnswerBytesLayer { cuts, ..self }
    }

    /// A new connection's budget, drawing on this server's too; `cut` cuts the connection
    /// (from `peer`) if it is stalled and reads the least when the server's budget is spent.
    pub fn connection(&self, peer: SocketAddr, cut: CancellationToken) -> ConnectionAnswerBytes {
        let budget = Budget::with_room(self.max_message_bytes, PER_CONNECTION);
        let share = Budget::new(self.max_message_bytes, IN_ALL);
        let unsent = Arc::new(Unsent {
            handed_bytes: AtomicUsize::new(0),
            connection: budget.clone(),
            in_all: self.in_all.clone(),
            unread: self.unread.clone(),
            unread_share: Budget::new(self.max_message_bytes, UNREAD),
            share: share.clone(),
            cut,
            cuts: Arc::clone(&self.cuts),
            peer,
            let_go_bytes: AtomicUsize::new(0),
            data_read: AtomicUsize::new(0),
            shared_bytes: AtomicUsize::new(0),
            blocked: AtomicBool::new(false),
            stalled: NotReading::default(),
            spent: NotReading::default(),
            frame_bytes: AtomicUsize::new(0),
            queued_bytes: AtomicUsize::new(0),
            frames: Arc::clone(&self.frames),
            frames_stalled: NotReading::default(),
            frames_room: Room::default(),
        });
        self.holders.add(&unsent);
        ConnectionAnswerBytes {
            budget,
            share,
            unsent,
        }
    }
}

/// Every connection's answer bytes, for the server to cut the one that reads the least of
/// what it holds, of those whose clients are not reading ([`Unsent::stalled`]), when its
/// budget is spent: one
/// client that stops reading on enough connections could otherwise refuse every other
/// client's larger answers for as long as it stayed (found by an adversarial run). Cut, its
/// calls fail and its bytes come back; the calls refused meanwhile are told to retry in a
/// moment. Clients still reading are never cut.
#[derive(Clone, Default)]
struct Holders(Arc<Mutex<Vec<Weak<Unsent>>>>);

impl Holders {
    fn add(&self, unsent: &Arc<Unsent>) {
        let mut holders = lock(&self.0);
        // Closed connections go whenever the list doubles: amortized, no timer.
        if holders.len() == holders.capacity() {
            holders.retain(|holder| holder.strong_count() > 0);
        }
        holders.push(Arc::downgrade(unsent));
    }

    /// Cuts one stalled connection other than `calling`'s, if any: of those holding answer
    /// bytes (when the part for clients that have not read was spent, `unread`: bytes of that
    /// part), the one whose client read the smallest share of them in its stall window, the
    /// heaviest of equal shares. Weighing by whether a client had read did not do: a client
    /// that filled the part, then read a sixteenth of it once, was never cut again, and every
    /// new connection was refused for as long as it stayed; and heaviest first alone cut a
    /// client reading steadily, a little slower than the rule asks, before those reading
    /// nothing (both found by adversarial runs, the second at the frames' cut).
    fn cut_least_reading(&self, calling: Option<&Arc<Unsent>>, unread: bool, now: Instant) {
        let held = |holder: &Unsent| match unread {
            true => holder.unread_share.used(),
            false => holder.share.used(),
        };
        let chosen = {
            let mut holders = lock(&self.0);
            holders.retain(|holder| holder.strong_count() > 0);
            holders
                .iter()
                .filter_map(Weak::upgrade)
                .filter(|holder| !holder.cut.is_cancelled())
                .filter(|holder| calling.is_none_or(|calling| !Arc::ptr_eq(holder, calling)))
                .filter(|holder| held(holder) > 0 && holder.stalled(now))
                .map(|holder| ((held(&holder), holder.stalled_read()), holder))
                .min_by(|(a, _), (b, _)| least_share_read_first(*a, *b))
        };
        let Some((_, heaviest)) = chosen else {
            return;
        };
        let Some(suppressed) = heaviest.cut_for(CutReason::ServerBudget) else {
            return;
        };
        // Which part was spent is a field (and `answer_bytes` what it held of it): the message
        // stays one line to search for.
        let spent = match unread {
            true => "the half for clients that have not read",
            false => "all of it",
        };
        tracing::warn!(
            peer = %heaviest.peer,
            answer_bytes = held(&heaviest),
            spent,
            suppressed,
            "cut the gRPC connection holding the most answers not yet read, none read for a \
             second: the server's budget for them was spent (a client that stops reading its \
             answers)"
        );
    }
}

/// Orders two holders, each `(held, read)` (what it holds, what its client read in its stall
/// window), by the share read, least first, the heaviest of equal shares first: the order in
/// which stalled connections are cut. Shares are compared as fractions, in `u128` (no
/// overflow).
fn least_share_read_first(
    (a_held, a_read): (usize, usize),
    (b_held, b_read): (usize, usize),
) -> std::cmp::Ordering {
    let wide = |bytes: usize| bytes as u128;
    let (a_share, b_share) = (wide(a_read) * wide(b_held), wide(b_read) * wide(a_held));
    a_share.cmp(&b_share).then(b_held.cmp(&a_held))
}

/// A connection's stream that tells its answer budgets how many bytes of answers its socket
/// took ([`DataFrames`]), and whether its writes wait (a client not reading its socket: what
/// h2 holds may still go out, so the connection is not cut for it); and that cuts the
/// connection once its client sent more control frames than its requests and the DATA frames
/// its socket took account for ([`ControlFrames`]).
pub struct FramesWatched<S> {
    io: S,
    unsent: Arc<Unsent>,
    frames: DataFrames,
    control: ControlFrames,
}

impl<S> FramesWatched<S> {
    /// `io`, the stream of the connection that `answer_bytes` belong to.
    pub fn new(io: S, answer_bytes: &ConnectionAnswerBytes) -> Self {
        FramesWatched {
            io,
            unsent: Arc::clone(&answer_bytes.unsent),
            frames: DataFrames::default(),
            control: ControlFrames::default(),
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for FramesWatched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let read = Pin::new(&mut self.io).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = read
            && !self.control.read(&buf.filled()[before..])
        {
            self.cut_for_control_frames();
            // What was read is not handed on: h2 would parse the rest of the flood first.
            buf.set_filled(before);
            return Poll::Ready(Err(std::io::Error::other("too many HTTP/2 control frames")));
        }
        read
    }
}

impl<S> FramesWatched<S> {
    /// Tells the control frames' allowance of the DATA frames the socket took since the last
    /// call (the client's WINDOW_UPDATEs and PINGs for reading them are its due).
    fn sent_data_frames(&mut self) {
        let frames = self.frames.take_data_frames();
        if frames > 0 {
            self.control.sent_data(frames);
        }
    }

    fn cut_for_control_frames(&self) {
        if let Some(suppressed) = self.unsent.cut_for(CutReason::ControlFrames) {
            tracing::warn!(
                listener = "grpc",
                peer = %self.unsent.peer,
                burst = control_frames::BURST,
                per_second = control_frames::PER_SECOND,
                suppressed,
                "{}",
                control_frames::CUT
            );
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for FramesWatched<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let write = Pin::new(&mut self.io).poll_write(cx, buf);
        self.unsent.wrote(&write);
        if let Poll::Ready(Ok(written)) = write {
            let data = self.frames.scan(&buf[..written.min(buf.len())]);
            self.unsent.data_read(data);
            self.sent_data_frames();
        }
        write
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let write = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.unsent.wrote(&write);
        if let Poll::Ready(Ok(written)) = write {
            let data = self.frames.scan_vectored(bufs, written);
            self.unsent.data_read(data);
            self.sent_data_frames();
        }
        write
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

impl<S> tower::Layer<S> for AnswerBytesLayer {
    type Service = AnswerBytesService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AnswerBytesService {
            inner,
            in_all: self.in_all.clone(),
            holders: self.holders.clone(),
            chunk: self.chunk,
            call_bytes: self.call_bytes,
        }
    }
}

/// The service [`AnswerBytesLayer`] wraps.
#[derive(Clone)]
pub struct AnswerBytesService<S> {
    inner: S,
    in_all: Budget,
    holders: Holders,
    /// [`CHUNK`], or less where it would not fit a connection's empty budget.
    chunk: usize,
    /// [`CALL_BYTES`](super::byte_budgets::CALL_BYTES), or less.
    call_bytes: usize,
}

type Answer<R, E> = Result<http::Response<AnswerBody<R>>, E>;

impl<S, B, R> tower::Service<http::Request<B>> for AnswerBytesService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    R: HttpBody<Data = Bytes, Error = Status> + Unpin,
{
    type Response = http::Response<AnswerBody<R>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Answer<R, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let answer_bytes = Connection::of_http(&request).map(|c| c.answer_bytes.clone());
        let budgets = Budgets {
            connection: answer_bytes.as_ref().map(|bytes| bytes.budget.clone()),
            in_all: server_budget_for(request.uri().path(), &self.in_all),
            connection_share: answer_bytes.as_ref().map(|bytes| bytes.share.clone()),
            what: "answers not yet read by their clients",
            advice: "read the answers of earlier calls first, then call again",
        };
        let counting = Counting {
            budgets,
            unsent: answer_bytes.map(|bytes| bytes.unsent),
            holders: self.holders.clone(),
            chunk: self.chunk,
            call_bytes: self.call_bytes,
            takes_turns: false,
        };
        let answer = self.inner.call(request);
        Box::pin(async move {
            let answer = answer.await?;
            Ok(Sending::first_frame(answer, counting))
        })
    }
}

/// At most this much of a counted message is handed to hyper at once. hyper takes a chunk
/// whenever the stream has a byte of window, and h2 keeps what the window does not let out:
/// a message handed over whole would be out of the count while still unsent (a client with a
/// window of 64 KiB that never reads held 4 MB pages that way).
const CHUNK: usize = 16 * 1024;

/// The smallest chunk, whatever the budgets ([`AnswerBytesLayer::new`]).
const SMALLEST_CHUNK: usize = 1024;

/// The most a stream's frame holds before it is counted: tonic gathers a stream's messages
/// into a frame until it holds this much (or none is ready), and a stream waiting for room
/// holds that frame. One larger message makes a larger frame alone.
pub const STREAM_FRAME_BYTES: usize = 8 * 1024;

/// Bytes a stream takes beyond what its frame needs while its connection's budget stays at
/// least half free, kept for its next frames: a change to many streams would otherwise have
/// each of them update the connection's count, which both cores share, for every message. At
/// most half of the budget is ever held this way, so a chunk (at most a quarter of it) always
/// fits the rest once it drains.
const CREDIT: usize = 4 * 1024;

/// How often a stream waiting for room in its connection's budget looks again, though no
/// bytes came back: each look that finds the budget spent counts toward [`IDLE_CUT`].
const IDLE_SOCKET: Duration = Duration::from_secs(1);

/// The longest a connection's budget may go without being found spent and still count as
/// spent all along (streams waiting for room look each [`IDLE_SOCKET`]): past it, it is
/// taken to have had room meanwhile, and [`IDLE_CUT`] starts again. Without it, a budget
/// found spent once, then freed, then spent a minute later was cut at once.
const SPENT_LOOKS: Duration = Duration::from_secs(3);

/// How long a connection's budget may be found spent while h2 lets go of almost none of
/// its bytes before the connection is cut ([`Unsent::found_spent`]): long enough for a client
/// that pauses reading, short enough that one that reads nothing does not keep its budget
/// (and its calls refused) for long.
const IDLE_CUT: Duration = Duration::from_secs(10);

/// The mark of an answer (in its response's extensions) whose later messages take turns with
/// its connection's other such answers once their frames hold its budget, or any while
/// streams' frames in all hold more than their bound (`frames::poll_frame_turn`): a watch
/// stream's. Unmarked answers never wait for a turn: a unary answer's trailers, polled after
/// its message, waited behind the connection's stalled watch stream, and the call did not end
/// (found by an adversarial run).
#[derive(Clone, Copy, Debug)]
pub struct TakesTurns;

/// An answer's body as its budgets count it: the inner body in place, not boxed again (a
/// body boxed at each layer is one more pointer to follow, often to memory out of the cache,
/// for every frame of every watch stream).
pub struct AnswerBody<R>(Answered<R>);

/// The size of a [`Sending`] either way: tonic boxes the body once, and a body that is not
/// counted (an error, an empty answer) is rare.
#[allow(clippy::large_enum_variant)]
enum Answered<R> {
    Counted(Sending<R>),
    /// Nothing to count: no message, only a status, or trailers alone.
    Whole(Body),
}

impl<R> AnswerBody<R> {
    fn whole(answer: http::Response<Body>) -> http::Response<AnswerBody<R>> {
        answer.map(|body| AnswerBody(Answered::Whole(body)))
    }
}

impl<R> HttpBody for AnswerBody<R>
where
    R: HttpBody<Data = Bytes, Error = Status> + Unpin,
{
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Status>>> {
        match &mut self.get_mut().0 {
            Answered::Counted(sending) => Pin::new(sending).poll_frame(cx),
            Answered::Whole(body) => Pin::new(body).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.0 {
            Answered::Counted(sending) => sending.is_end_stream(),
            Answered::Whole(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match &self.0 {
            Answered::Counted(sending) => sending.size_hint(),
            Answered::Whole(body) => body.size_hint(),
        }
    }
}

/// Where an answer's bytes are counted, and what they draw on.
struct Counting {
    budgets: Budgets,
    /// Where handed-over bytes are counted until sent; none for a connection that did not
    /// come through the capped listener (tests), whose bytes are given back as handed over.
    unsent: Option<Arc<Unsent>>,
    holders: Holders,
    /// [`CHUNK`], or less where it would not fit a connection's empty budget.
    chunk: usize,
    /// What the call's own state draws ([`CALL_BYTES`](super::byte_budgets::CALL_BYTES), or less).
    call_bytes: usize,
    /// Its later messages take turns ([`TakesTurns`]).
    takes_turns: bool,
}

impl Counting {
    /// [`CREDIT`], or a chunk where that is less.
    fn credit(&self) -> usize {
        CREDIT.min(self.chunk)
    }

    /// An answer's first message of `bytes` into `held`, with what the call's own state holds
    /// ([`CALL_BYTES`](super::byte_budgets::CALL_BYTES)) in the `Held` returned, from the half of the server's budget for
    /// clients that have not read too if its client has not ([`Unsent::has_read`]). Past the
    /// connection's budget, the refusal counts toward its cut ([`Unsent::found_spent`]); past
    /// the server's (or its half), the heaviest stalled holder of it is cut.
    fn take_first(&self, bytes: usize, held: &mut Held) -> Result<Held, Status> {
        let unread = match &self.unsent {
            Some(unsent) if !unsent.has_read(bytes) => Some(unsent.unread_part()),
            _ => None,
        };
        let spent = match (self.budgets).take_answer((bytes, self.call_bytes), held, unread) {
            Ok(call) => {
                // What it owes reading is what it took of the server's budget.
                if let Some(unsent) = &self.unsent
                    && self.budgets.in_all.is_some()
                {
                    unsent.took_share(bytes);
                }
                return Ok(call);
            }
            Err(spent) => spent,
        };
        match (spent.by, &self.unsent) {
            (SpentBy::Connection, Some(unsent)) => unsent.found_spent(Instant::now()),
            (SpentBy::Connection, None) => {}
            (by, calling) => {
                let unread = by == SpentBy::Unread;
                (self.holders).cut_least_reading(calling.as_ref(), unread, Instant::now());
            }
        }
        Err(spent.status)
    }
}

/// An answer's body, handed to hyper a chunk at a time as the client's window lets hyper take
/// them, each chunk counted until h2 lets go of it. The first message's bytes are taken whole
/// from both budgets when the call returns (a refusal if they do not fit); a stream's later
/// frames take theirs from the connection's budget chunk by chunk and wait for room while it
/// is spent.
struct Sending<R> {
    body: R,
    /// What is left of the frame being handed over.
    rest: Bytes,
    /// How many bytes `held` has that are not handed over yet: all of the first message, and
    /// the credit a stream took ahead ([`CREDIT`]).
    prepaid: usize,
    /// Of `rest`, the bytes beyond `prepaid` counted among what frames hold (`frames`).
    unprepaid: usize,
    held: Held,
    /// What the call's own state holds ([`CALL_BYTES`](super::byte_budgets::CALL_BYTES)), until
    /// it goes with the chunk that ends the first message.
    call: Option<Held>,
    counting: Counting,
    /// While waiting for room: the connection's budget's word that bytes came back (its
    /// h2 let go of a chunk, or an answer ended), and a timer ([`IDLE_SOCKET`]).
    room: Option<Pin<Box<OwnedNotified>>>,
    retry: Option<Pin<Box<Sleep>>>,
    /// Counted in the connection's budget's waiters.
    waiting: bool,
    /// While waiting for its turn to take its next frame (`frames::poll_frame_turn`).
    frame_turn: Option<FrameWait>,
}

impl<R> Sending<R>
where
    R: HttpBody<Data = Bytes, Error = Status> + Unpin,
{
    /// `answer`, its first frame taken from its budgets at once when it is ready (a unary
    /// answer's whole message: tonic encodes it when its body is first polled). hyper polls a
    /// body only once the client's window has room, so a client whose window is shut would
    /// hold every answer unencoded and uncounted. Past a budget: RESOURCE_EXHAUSTED naming
    /// it ([`Counting::take_first`]).
    fn first_frame(answer: http::Response<R>, counting: Counting) -> http::Response<AnswerBody<R>> {
        let (parts, mut body) = answer.into_parts();
        let counting = Counting {
            takes_turns: parts.extensions.get::<TakesTurns>().is_some(),
            ..counting
        };
        let waker = futures_util::task::noop_waker();
        let first = match Pin::new(&mut body).poll_frame(&mut Context::from_waker(&waker)) {
            Poll::Ready(Some(Ok(frame))) => frame,
            // Nothing yet (a stream's first message to come): counted as it comes.
            Poll::Pending => {
                let held = (Held::default(), Held::default());
                let sending = Sending::new(body, counting, Bytes::new(), held);
                return http::Response::from_parts(parts, sending.into_body());
            }
            Poll::Ready(None) => {
                let empty = http::Response::from_parts(parts, Body::empty());
                return AnswerBody::whole(empty);
            }
            Poll::Ready(Some(Err(status))) => return AnswerBody::whole(status.into_http()),
        };
        let rest = match first.into_data() {
            Ok(data) => data,
            // Trailers first: the answer is over.
            Err(trailers) => {
                let only =
                    futures_util::stream::once(std::future::ready(Ok::<_, Status>(trailers)));
                let body = Body::new(http_body_util::StreamBody::new(only));
                return AnswerBody::whole(http::Response::from_parts(parts, body));
            }
        };
        let mut held = Held::default();
        let call = match counting.take_first(rest.len(), &mut held) {
            Ok(call) => call,
            Err(status) => return AnswerBody::whole(status.into_http()),
        };
        let sending = Sending::new(body, counting, rest, (held, call));
        http::Response::from_parts(parts, sending.into_body())
    }
}

impl<R> Sending<R> {
    /// `body`, with `rest` of its first frame taken already into `held`, and what its call
    /// holds into `call`.
    fn new(body: R, counting: Counting, rest: Bytes, (held, call): (Held, Held)) -> Sending<R> {
        Sending {
            body,
            prepaid: rest.len(),
            unprepaid: 0,
            rest,
            held,
            call: Some(call),
            counting,
            room: None,
            retry: None,
            waiting: false,
            frame_turn: None,
        }
    }

    fn into_body(self) -> AnswerBody<R> {
        AnswerBody(Answered::Counted(self))
    }

    /// Ready once `need` more bytes are taken from the connection's budget; waits for room
    /// while it is spent. The first look is one attempt: no lock, no allocation.
    fn poll_room(&mut self, cx: &mut Context<'_>, need: usize) -> Poll<()> {
        if need == 0 {
            return Poll::Ready(());
        }
        if !self.woken(cx) {
            return Poll::Pending;
        }
        if self.take(need) {
            self.set_waiting(false);
            return Poll::Ready(());
        }
        // Told of room from here on, then one more look: room given back in between is
        // not missed.
        self.set_waiting(true);
        if let Some(room) = self.connection_room() {
            let mut told = Box::pin(room.told());
            told.as_mut().enable();
            self.room = Some(told);
        }
        if self.take(need) {
            self.room = None;
            self.set_waiting(false);
            return Poll::Ready(());
        }
        if let Some(unsent) = &self.counting.unsent {
            unsent.found_spent(Instant::now());
        }
        self.retry = Some(Box::pin(tokio::time::sleep(IDLE_SOCKET)));
        if self.woken(cx) {
            // Room came already: look again.
            cx.waker().wake_by_ref();
        }
        Poll::Pending
    }

    /// `need` bytes more from the connection's budget into `held`, and a credit ahead while
    /// it stays half free; false if it does not have them.
    fn take(&mut self, need: usize) -> bool {
        let (budgets, ahead) = (&self.counting.budgets, need + self.counting.credit());
        let taken = if budgets.connection_roomy(ahead)
            && budgets.try_take_connection(ahead, &mut self.held)
        {
            ahead
        } else if budgets.try_take_connection(need, &mut self.held) {
            need
        } else {
            return false;
        };
        self.prepaid += taken;
        true
    }

    /// Whether no wait is on, or the one that was is over (its futures are then dropped);
    /// otherwise they are registered with `cx`.
    fn woken(&mut self, cx: &mut Context<'_>) -> bool {
        if self.room.is_none() && self.retry.is_none() {
            return true;
        }
        let room = (self.room.as_mut()).is_some_and(|room| room.as_mut().poll(cx).is_ready());
        let retry = (self.retry.as_mut()).is_some_and(|retry| retry.as_mut().poll(cx).is_ready());
        if room || retry {
            self.room = None;
            self.retry = None;
        }
        room || retry
    }

    fn connection_room(&self) -> Option<&Room> {
        self.counting.budgets.connection.as_ref()?.room()
    }

    fn set_waiting(&mut self, waiting: bool) {
        if self.waiting == waiting {
            return;
        }
        self.waiting = waiting;
        if let Some(room) = self.connection_room() {
            if waiting {
                room.start_waiting();
            } else {
                room.stop_waiting();
            }
        }
    }

    /// Hands `chunk`, its bytes taken already, to hyper: counted until h2 lets go of it, with
    /// what the call holds if it ends the first message (one that did not, let go of, left an
    /// answer's last bytes parked with nothing of the call counted: found by an adversarial
    /// run).
    fn hand_over(&mut self, chunk: Bytes) -> Bytes {
        let len = chunk.len();
        self.prepaid = self.prepaid.saturating_sub(len);
        let call = match self.rest.is_empty() {
            true => self.call.take(),
            false => None,
        };
        match &self.counting.unsent {
            Some(unsent) => CountedChunk::handed_over(chunk, (&mut self.held, call), unsent),
            None => {
                self.held.give_back(len);
                chunk
            }
        }
    }
}

/// A chunk handed to hyper, counted until h2 lets go of it: written to the socket (h2 drops a
/// chunk once all of it is written, or once copied into its write buffer if small), or
/// dropped with its stream (reset by the client, or ended with the connection). One
/// allocation per chunk, to know exactly when h2 is done with it.
struct CountedChunk {
    bytes: Bytes,
    unsent: Arc<Unsent>,
    /// Of its bytes, those drawn from the server's budget too.
    shared: Shared,
    /// What its call holds ([`CALL_BYTES`](super::byte_budgets::CALL_BYTES)), with the chunk
    /// that ends an answer's first message.
    _call: Option<Held>,
}

/// Of a chunk's bytes, those drawn from the server's budget too, and of those, from its part
/// for clients that have not read.
#[derive(Clone, Copy)]
struct Shared {
    in_all: usize,
    unread: usize,
}

impl CountedChunk {
    /// `chunk`, its bytes moved from `held` to what `unsent` counts, with `call`.
    fn handed_over(
        chunk: Bytes,
        (held, call): (&mut Held, Option<Held>),
        unsent: &Arc<Unsent>,
    ) -> Bytes {
        let (in_all, unread) = held.hand_over(chunk.len());
        unsent
            .handed_bytes
            .fetch_add(chunk.len(), Ordering::Relaxed);
        Bytes::from_owner(CountedChunk {
            bytes: chunk,
            unsent: Arc::clone(unsent),
            shared: Shared { in_all, unread },
            _call: call,
        })
    }
}

impl AsRef<[u8]> for CountedChunk {
    fn as_ref(&self) -> &[u8] {
        &self.bytes
    }
}

impl Drop for CountedChunk {
    fn drop(&mut self) {
        self.unsent.let_go(self.bytes.len(), self.shared);
    }
}

impl<R> Sending<R> {
    /// Counts what `rest` holds beyond what its budgets count among what frames hold
    /// (`frames`), once it changed: a frame that went out whole at once never is.
    fn count_unprepaid(&mut self) {
        let unprepaid = self.rest.len().saturating_sub(self.prepaid);
        if unprepaid == self.unprepaid {
            return;
        }
        if let Some(unsent) = &self.counting.unsent {
            unsent.frame_holds(self.unprepaid, unprepaid);
            self.unprepaid = unprepaid;
        }
    }
}

impl<R> Drop for Sending<R> {
    fn drop(&mut self) {
        self.set_waiting(false);
        // Dropped with the stream: what its frame held goes with it.
        self.rest = Bytes::new();
        self.count_unprepaid();
    }
}

impl<R> HttpBody for Sending<R>
where
    R: HttpBody<Data = Bytes, Error = Status> + Unpin,
{
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Status>>> {
        let this = self.get_mut();
        let frame = this.poll_chunk(cx);
        this.count_unprepaid();
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_empty() && self.body.is_end_stream()
    }

    /// The inner body's, with what is left of the first message: hyper sets a length from an
    /// exact hint, which without `rest` would be short.
    fn size_hint(&self) -> http_body::SizeHint {
        let mut hint = self.body.size_hint();
        let rest = self.rest.len() as u64;
        if let Some(upper) = hint.upper() {
            hint.set_upper(upper + rest);
        }
        hint.set_lower(hint.lower() + rest);
        hint
    }
}

impl<R> Sending<R>
where
    R: HttpBody<Data = Bytes, Error = Status> + Unpin,
{
    /// The next chunk of `rest`, once the connection's budget has room for it; a new frame
    /// from the inner body into `rest` first when it is empty.
    fn poll_chunk(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Status>>> {
        if self.rest.is_empty() {
            if let Some(unsent) =
                (self.counting.unsent.as_ref()).filter(|_| self.counting.takes_turns)
            {
                ready!(frames::poll_frame_turn(unsent, &mut self.frame_turn, cx));
            }
            match ready!(Pin::new(&mut self.body).poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) if !data.is_empty() => self.rest = data,
                    Ok(empty) => return Poll::Ready(Some(Ok(http_body::Frame::data(empty)))),
                    Err(trailers) => return Poll::Ready(Some(Ok(trailers))),
                },
                other => return Poll::Ready(other),
            }
        }
        let len = self.rest.len().min(self.counting.chunk);
        ready!(self.poll_room(cx, len.saturating_sub(self.prepaid)));
        let chunk = self.rest.split_to(len);
        let chunk = self.hand_over(chunk);
        Poll::Ready(Some(Ok(http_body::Frame::data(chunk))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grpc::byte_budgets::CALL_BYTES;

    /// A layer for messages of `max_message_bytes`, a connection of it, and the budgets its
    /// calls draw on.
    fn connection(max_message_bytes: usize) -> (AnswerBytesLayer, ConnectionAnswerBytes, Budgets) {
        let layer = AnswerBytesLayer::new(max_message_bytes, 1);
        let (bytes, budgets, _) = another(&layer);
        (layer, bytes, budgets)
    }

    /// Another connection of `layer`, the budgets its calls draw on, and nothing held.
    fn another(layer: &AnswerBytesLayer) -> (ConnectionAnswerBytes, Budgets, Held) {
        let peer = SocketAddr::from(([127, 0, 0, 1], 1));
        let bytes = layer.connection(peer, CancellationToken::new());
        let budgets = budgets_of(layer, &bytes);
        (bytes, budgets, Held::default())
    }

    /// The budgets a call on `bytes`' connection draws on.
    fn budgets_of(layer: &AnswerBytesLayer, bytes: &ConnectionAnswerBytes) -> Budgets {
        Budgets {
            connection: Some(bytes.budget.clone()),
            in_all: Some(layer.in_all.clone()),
            connection_share: Some(bytes.share.clone()),
            what: "answers",
            advice: "wait",
        }
    }

    /// `len` bytes of `held` handed to h2 as a chunk of `bytes`' connection: counted until
    /// the chunk is dropped.
    fn handed_over(bytes: &ConnectionAnswerBytes, held: &mut Held, len: usize) -> Bytes {
        CountedChunk::handed_over(Bytes::from(vec![7; len]), (held, None), &bytes.unsent)
    }

    /// A stream's answer on `bytes`' connection drawing on `budgets`, handed over in chunks of
    /// `chunk`, and where to send its frames (none ready when the call returns).
    fn stream_answer(
        connection: (&AnswerBytesLayer, &ConnectionAnswerBytes, Budgets),
        chunk: usize,
    ) -> (FrameSender, AnswerBody<Body>) {
        stream_answer_marked(connection, chunk, Some(TakesTurns))
    }

    /// [`stream_answer`], its response marked with `mark` (a watch's is [`TakesTurns`]).
    fn stream_answer_marked(
        (layer, bytes, budgets): (&AnswerBytesLayer, &ConnectionAnswerBytes, Budgets),
        chunk: usize,
        mark: Option<TakesTurns>,
    ) -> (FrameSender, AnswerBody<Body>) {
        let (frames, stream) = tokio::sync::mpsc::channel(2);
        let stream = tokio_stream::wrappers::ReceiverStream::new(stream);
        let mut answer = http::Response::new(Body::new(http_body_util::StreamBody::new(stream)));
        if let Some(mark) = mark {
            answer.extensions_mut().insert(mark);
        }
        let counting = Counting {
            budgets,
            unsent: Some(Arc::clone(&bytes.unsent)),
            holders: layer.holders.clone(),
            chunk,
            call_bytes: layer.call_bytes,
            takes_turns: false,
        };
        (frames, Sending::first_frame(answer, counting).into_body())
    }

    type FrameSender = tokio::sync::mpsc::Sender<Result<http_body::Frame<Bytes>, Status>>;

    /// Answers to clients that have not read a sixteenth of what they asked for (a new
    /// connection's among them) hold at most half the server's budget between them, whatever
    /// their connections; clients that read take from the whole, and what they hold never
    /// refuses the others (a rule that kept half of the whole free for non-readers refused
    /// every new connection's first answer while readers held half: found by an adversarial
    /// run). What a chunk drew on comes back as h2 lets go of it.
    #[test]
    fn clients_that_have_not_read_hold_at_most_half_the_server_budget() {
        let (layer, _, _) = connection(1000);
        let open = || another(&layer);
        // Readers hold three quarters of the server's budget: a new connection (it has read
        // nothing) is still answered.
        let mut readers: Vec<_> = (0..6).map(|_| open()).collect();
        for (bytes, budgets, held) in &mut readers {
            bytes.unsent.took_share(1600);
            bytes.unsent.data_read(350);
            assert!(bytes.unsent.has_read(4000));
            assert!(budgets.take(4000, held).is_ok());
        }
        let (new, budgets, mut held) = open();
        assert!(!new.unsent.has_read(4000));
        // Nor a client whose reading paid for less than its answer: a health check's few
        // bytes pay for sixteen times as many, not for a page.
        new.unsent.data_read(7);
        assert!(new.unsent.has_read(112));
        assert!(!new.unsent.has_read(4000));
        assert!(
            budgets
                .take_answer((4000, 0), &mut held, Some(new.unsent.unread_part()))
                .is_ok()
        );
        // It and three more that read nothing, each at its budget: half the server's.
        drop(readers);
        let mut unread: Vec<_> = (0..3).map(|_| open()).collect();
        for (bytes, budgets, held) in &mut unread {
            assert!(
                budgets
                    .take_answer((4000, 0), held, Some(bytes.unsent.unread_part()))
                    .is_ok()
            );
        }
        let (fifth, budgets, mut refused) = open();
        let part = Some(fifth.unsent.unread_part());
        let Err(spent) = budgets.take_answer((1, 0), &mut refused, part) else {
            panic!("past half the server's budget");
        };
        assert_eq!(spent.by, SpentBy::Unread);
        assert!(
            spent
                .status
                .message()
                .contains("clients that have not read")
        );
        assert!(spent.status.message().contains("at most 16 times"));
        // A client that read a sixteenth of what it took, this answer included, is answered
        // from the rest.
        let (reader, budgets, mut read) = open();
        reader.unsent.took_share(1600);
        reader.unsent.data_read(349);
        assert!(!reader.unsent.has_read(4000));
        reader.unsent.data_read(1);
        assert!(reader.unsent.has_read(4000));
        assert!(budgets.take(4000, &mut read).is_ok());
        // A chunk h2 lets go of gives its part back.
        let chunk = handed_over(&new, &mut held, 1000);
        assert_eq!(layer.unread.used(), 16_000);
        drop(chunk);
        assert_eq!((layer.unread.used(), layer.in_all.used()), (15_000, 19_000));
        drop((held, unread));
        assert_eq!((layer.unread.used(), layer.in_all.used()), (0, 4000));
    }

    /// A refusal for the half of the server's budget answers to clients that have not read
    /// may hold cuts the stalled connection that holds the most of that half: a client that
    /// read before and now reads slowly holds none of it, and was cut at such refusals,
    /// freeing nothing of it; and one that filled it, then read a sixteenth of it once, was
    /// never cut when only clients that had not read were weighed (both found by adversarial
    /// runs). A refusal for the whole budget may cut the slow reader.
    #[test]
    fn a_refusal_for_the_unread_half_cuts_the_stalled_connection_holding_most_of_it() {
        let (layer, _, _) = connection(1000);
        let open = || another(&layer);
        let (slow, budgets, mut slow_held) = open();
        slow.unsent.took_share(1600);
        slow.unsent.data_read(100);
        assert!(budgets.take(4000, &mut slow_held).is_ok());
        let (new, budgets, mut new_held) = open();
        let part = Some(new.unsent.unread_part());
        let unread = budgets.take_answer((3000, 0), &mut new_held, part);
        assert!(unread.is_ok());
        new.unsent.took_share(3000);
        // It reads a sixteenth of it once, then nothing.
        new.unsent.data_read(188);
        assert!(new.unsent.has_read(0));
        let start = Instant::now();
        for now in [start, start + STALLED] {
            layer.holders.cut_least_reading(None, true, now);
        }
        assert!(new.unsent.cut.is_cancelled(), "it holds the half, stalled");
        assert!(!slow.unsent.cut.is_cancelled());
        for now in [start + STALLED, start + 2 * STALLED] {
            layer.holders.cut_least_reading(None, false, now);
        }
        assert!(
            slow.unsent.cut.is_cancelled(),
            "stalled, at a refusal for the whole"
        );
    }

    /// A refusal for the server's budget cuts, of the stalled connections, the one whose client
    /// read the smallest share of what it holds: one that reads nothing before a heavier one
    /// reading steadily, a little slower than the rule asks (heaviest first cut such a reader
    /// and left those reading nothing: found by an adversarial run at the frames' cut).
    #[test]
    fn a_refusal_for_the_server_budget_cuts_the_stalled_connection_reading_least_first() {
        let (layer, _, _) = connection(1000);
        let open = || another(&layer);
        let (slow, budgets, mut slow_held) = open();
        assert!(budgets.take(3200, &mut slow_held).is_ok());
        let (idle, budgets, mut idle_held) = open();
        assert!(budgets.take(1000, &mut idle_held).is_ok());
        let start = Instant::now();
        layer.holders.cut_least_reading(None, false, start);
        slow.unsent.data_read(3200 / SLOWEST_SHARE - 10);
        layer
            .holders
            .cut_least_reading(None, false, start + STALLED);
        assert!(idle.unsent.cut.is_cancelled(), "it read nothing");
        assert!(!slow.unsent.cut.is_cancelled());
        layer
            .holders
            .cut_least_reading(None, false, start + STALLED);
        assert!(
            slow.unsent.cut.is_cancelled(),
            "stalled too, at the next refusal"
        );
    }

    /// Only a connection that holds answer bytes and gives (nearly) none back for a second, as
    /// refusals see it, may be cut: one whose client reads a sixteenth of them a second may
    /// not.
    #[test]
    fn a_connection_is_stalled_only_after_a_second_without_giving_bytes_back() {
        let (_layer, bytes, budgets) = connection(1000);
        let start = Instant::now();
        assert!(!bytes.unsent.stalled(start), "holds nothing");
        let mut held = Held::default();
        assert!(budgets.take(600, &mut held).is_ok());
        let second = Duration::from_secs(1);
        assert!(!bytes.unsent.stalled(start), "first seen");
        assert!(!bytes.unsent.stalled(start + second / 2));
        assert!(bytes.unsent.stalled(start + second));
        // Some read: not stalled, and a second more before it is again.
        bytes.unsent.data_read(50);
        assert!(!bytes.unsent.stalled(start + 2 * second));
        assert!(!bytes.unsent.stalled(start + 2 * second + second / 2));
        assert!(bytes.unsent.stalled(start + 3 * second));
        // Taking more is not reading.
        assert!(budgets.take(100, &mut held).is_ok());
        assert!(bytes.unsent.stalled(start + 3 * second));
    }

    /// Only DATA the socket takes counts as the client reading: not a take the server's budget
    /// refuses (the connection's bytes are put back), nor an answer dropped before it was
    /// handed over, nor a chunk h2 dropped with a stream the client reset, nor other bytes
    /// the socket writes (a PING's acknowledgement). A connection whose streams keep trying
    /// while its client reads nothing still looks stalled, so it may be cut.
    #[test]
    fn only_data_the_socket_takes_counts_as_reading() {
        let (layer, bytes, budgets) = connection(1000);
        let server_only = Budgets {
            connection: None,
            in_all: Some(layer.in_all.clone()),
            connection_share: None,
            ..budgets
        };
        let mut others = Held::default();
        assert!(server_only.take(32 * 1000 - 1000, &mut others).is_ok());
        let budgets = Budgets {
            connection: Some(bytes.budget.clone()),
            connection_share: Some(bytes.share.clone()),
            ..server_only
        };
        let (mut unread, mut dropped) = (Held::default(), Held::default());
        assert!(budgets.take(300, &mut unread).is_ok());
        assert!(budgets.take(300, &mut dropped).is_ok());
        let start = Instant::now();
        assert!(!bytes.unsent.stalled(start), "first seen");

        let mut refused = Held::default();
        let Err(spent) = budgets.take(500, &mut refused) else {
            panic!("the server's budget has 400 bytes left");
        };
        assert_eq!(spent.by, SpentBy::Server);
        assert_eq!(bytes.budget.used(), 600, "put back");
        drop(dropped);
        drop(handed_over(&bytes, &mut unread, 100));
        bytes.unsent.wrote(&Poll::Ready(Ok(17)));
        assert!(bytes.unsent.stalled(start + STALLED), "nothing was read");
    }

    /// A health check's answer draws on its connection's budget alone: answered while other
    /// connections hold the whole server's budget, and not owed reading for (nothing of the
    /// server's is held). Any other call is refused.
    #[test]
    fn a_health_checks_answer_draws_on_its_connections_budget_alone() {
        let (layer, bytes, _) = connection(1000);
        let on = |path| Budgets {
            connection: Some(bytes.budget.clone()),
            in_all: server_budget_for(path, &layer.in_all),
            connection_share: Some(bytes.share.clone()),
            what: "answers",
            advice: "wait",
        };
        let others = Budgets {
            connection: None,
            connection_share: None,
            ..on("/gameball.profiles.v1.ProfileService/ListProfiles")
        };
        let mut theirs = Held::default();
        assert!(others.take(32 * 1000, &mut theirs).is_ok());
        let check = on("/grpc.health.v1.Health/Check");
        let mut held = Held::default();
        assert!(check.take(7, &mut held).is_ok());
        assert_eq!((bytes.budget.used(), bytes.share.used()), (7, 0));
        let get = on("/gameball.profiles.v1.ProfileService/GetProfile");
        let Err(spent) = get.take(7, &mut Held::default()) else {
            panic!("the server's budget is spent");
        };
        assert_eq!(spent.by, SpentBy::Server);
    }

    /// An answer's first message draws what its call's own state holds too
    /// ([`CALL_BYTES`](super::byte_budgets::CALL_BYTES), at most a sixty-fourth of the message
    /// limit) from the server's budget (and its half for clients that have not read), until h2
    /// lets go of the chunk that ends the message; not from its connection's budget, nor toward
    /// what its connection is weighed by or owes reading. Counted by their bytes alone,
    /// answers of 40 bytes parked by the thousand held 12 KB each, and with the first chunk
    /// alone, answers of a chunk and 40 bytes (found by adversarial runs).
    #[tokio::test]
    async fn an_answer_holds_its_calls_own_bytes_until_it_is_done_with() {
        let (layer, bytes, budgets) = connection(4 << 20);
        let counting = Counting {
            budgets,
            unsent: Some(Arc::clone(&bytes.unsent)),
            holders: layer.holders.clone(),
            chunk: layer.chunk,
            call_bytes: layer.call_bytes,
            takes_turns: false,
        };
        let full = http_body_util::Full::new(Bytes::from(vec![7; 100]));
        let answer = Sending::first_frame(http::Response::new(Body::new(full)), counting);
        let used = || {
            let server = (layer.in_all.used(), layer.unread.used());
            (bytes.budget.used(), server, bytes.share.used())
        };
        let call = 100 + CALL_BYTES;
        assert_eq!(
            used(),
            (100, (call, call), 100),
            "a new connection's answer"
        );
        let owed = bytes.unsent.shared_bytes.load(Ordering::Relaxed);
        assert_eq!(owed, 100, "owes reading its message");

        // Handed to h2 as a chunk, counted until h2 lets go of it, the call's bytes with it (a
        // stream's do not stay for its life).
        let mut body = answer.into_body();
        let frame = http_body_util::BodyExt::frame(&mut body).await;
        let message = frame.expect("a frame").expect("data").into_data().unwrap();
        assert_eq!(message.len(), 100);
        assert_eq!(used(), (100, (call, call), 100), "held by h2");
        drop(message);
        assert_eq!(used(), (0, (0, 0), 0));

        // A message of two chunks: the call's bytes go with the second.
        let bytes_of = |len| http_body_util::Full::new(Bytes::from(vec![7; len]));
        let counting = Counting {
            budgets: another(&layer).1,
            unsent: Some(Arc::clone(&bytes.unsent)),
            holders: layer.holders.clone(),
            chunk: layer.chunk,
            call_bytes: layer.call_bytes,
            takes_turns: false,
        };
        let two = http::Response::new(Body::new(bytes_of(CHUNK + 40)));
        let mut body = Sending::first_frame(two, counting).into_body();
        let mut next = async || {
            let frame = http_body_util::BodyExt::frame(&mut body).await;
            frame.expect("a frame").expect("data").into_data().unwrap()
        };
        let first = next().await;
        drop(first);
        assert_eq!(
            layer.in_all.used(),
            40 + CALL_BYTES,
            "the last chunk's and the call's"
        );
        let last = next().await;
        assert_eq!(last.len(), 40);
        drop(last);
        assert_eq!(layer.in_all.used(), 0);

        let call_bytes = |max_message| AnswerBytesLayer::new(max_message, 1).call_bytes;
        assert_eq!(call_bytes(65_536), 1024, "a sixty-fourth of a small limit");
        assert_eq!(call_bytes(1024), 16, "the smallest limit");
    }

    /// A trickle is not reading: a client that keeps its windows at one byte reads a few
    /// bytes now and then, and held its share for good. Reading a sixteenth of what it holds in
    /// a second is.
    #[test]
    fn a_trickle_of_bytes_is_not_reading() {
        let (_layer, bytes, budgets) = connection(16_000);
        let mut held = Held::default();
        assert!(budgets.take(16_000, &mut held).is_ok());
        let start = Instant::now();
        assert!(!bytes.unsent.stalled(start), "first seen");
        bytes.unsent.data_read(17);
        assert!(!bytes.unsent.stalled(start + STALLED / 2));
        assert!(
            bytes.unsent.stalled(start + STALLED),
            "17 bytes in a second"
        );
        bytes.unsent.data_read(1_000);
        assert!(
            !bytes.unsent.stalled(start + 2 * STALLED),
            "a sixteenth read"
        );
        assert!(!bytes.unsent.stalled(start + 2 * STALLED + STALLED / 2));
        assert!(bytes.unsent.stalled(start + 3 * STALLED), "nothing since");
    }

    /// A connection that holds its answers less than a second at a time, resetting them all
    /// and asking again, reading none, is stalled all the same: what it took since the window
    /// started is owed reading, and a look that finds it holding nothing does not end the
    /// window (such a client held the server's budget for good: found by an adversarial run).
    /// Once it reads a sixteenth of what it took, it is not.
    #[test]
    fn a_connection_that_keeps_emptying_and_refilling_without_reading_is_stalled() {
        let (_layer, bytes, budgets) = connection(1000);
        let start = Instant::now();
        let at = |millis| start + Duration::from_millis(millis);
        let take = |held: &mut Held| {
            assert!(budgets.take(600, held).is_ok());
            bytes.unsent.took_share(600);
        };
        let mut held = Held::default();
        take(&mut held);
        assert!(!bytes.unsent.stalled(at(0)), "first seen");
        drop(held);
        assert!(!bytes.unsent.stalled(at(600)), "holds nothing");
        let mut held = Held::default();
        take(&mut held);
        assert!(bytes.unsent.stalled(at(1_100)), "1,200 taken, none read");
        bytes.unsent.data_read(1_200 / SLOWEST_SHARE);
        assert!(!bytes.unsent.stalled(at(1_200)), "a sixteenth read");
        assert!(!bytes.unsent.stalled(at(2_100)));
        assert!(bytes.unsent.stalled(at(2_200)), "nothing read since");
    }

    /// What a connection owes reading expires with its window ([`OWED_FOR`]): one whose
    /// calls were reset unread, then idle, is given its second again when it next holds an
    /// answer, and reading it, is never stalled (it was cut at once: found by an adversarial
    /// run).
    #[test]
    fn what_a_connection_owes_reading_expires() {
        let (_layer, bytes, budgets) = connection(1000);
        let start = Instant::now();
        let at = |millis| start + Duration::from_millis(millis);
        let mut held = Held::default();
        assert!(budgets.take(600, &mut held).is_ok());
        bytes.unsent.took_share(600);
        assert!(!bytes.unsent.stalled(at(0)), "first seen");
        drop(held);
        assert!(
            !bytes.unsent.stalled(at(500)),
            "reset unread: holds nothing"
        );
        assert!(!bytes.unsent.stalled(at(5_600)), "a new window");
        let mut held = Held::default();
        assert!(budgets.take(600, &mut held).is_ok());
        bytes.unsent.took_share(600);
        assert!(!bytes.unsent.stalled(at(6_000)), "its second");
        bytes.unsent.data_read(600);
        assert!(!bytes.unsent.stalled(at(6_700)), "read");
    }

    /// A stream's later messages and credit are in the connection's budget, not in what it
    /// holds of the server's: a connection whose watch streams hold only those (an idle one,
    /// with credit ahead) is never weighed as stalled when the server's budget is spent.
    #[test]
    fn stream_bytes_do_not_make_a_connection_look_stalled() {
        let (_layer, bytes, budgets) = connection(1000);
        let mut stream = Held::default();
        assert!(budgets.try_take_connection(600, &mut stream));
        assert_eq!(bytes.budget.used(), 600);
        let start = Instant::now();
        assert!(!bytes.unsent.stalled(start));
        assert!(
            !bytes.unsent.stalled(start + 2 * STALLED),
            "holds none of the server's"
        );

        let mut answer = Held::default();
        assert!(budgets.take(100, &mut answer).is_ok());
        assert_eq!(bytes.share.used(), 100);
        assert!(!bytes.unsent.stalled(start + 2 * STALLED), "first seen");
        assert!(bytes.unsent.stalled(start + 3 * STALLED));
        drop(handed_over(&bytes, &mut answer, 100));
        assert_eq!(bytes.share.used(), 0, "given back as h2 lets go of it");
    }

    /// A chunk handed to h2 stays counted in every budget it drew on, whatever the socket
    /// writes meanwhile (PING acknowledgements repaid answers h2 still held: found by an
    /// adversarial run), until h2 lets go of it; then all of it comes back.
    #[test]
    fn a_chunk_counts_until_h2_lets_go_of_it_whatever_the_socket_writes() {
        let (layer, bytes, budgets) = connection(1000);
        let mut held = Held::default();
        assert!(budgets.take(1000, &mut held).is_ok());
        let first = handed_over(&bytes, &mut held, 600);
        let second = handed_over(&bytes, &mut held, 400);
        drop(held);
        for _ in 0..100 {
            bytes.unsent.wrote(&Poll::Ready(Ok(17)));
        }
        let used = || (bytes.budget.used(), bytes.share.used(), layer.in_all.used());
        assert_eq!(used(), (1000, 1000, 1000), "nothing given back by writes");
        assert_eq!(bytes.unsent.held_by_h2(), 1000);
        drop(first);
        assert_eq!(used(), (400, 400, 400));
        let copy = second.clone();
        drop(second);
        assert_eq!(used(), (400, 400, 400), "a part of it is still in h2");
        drop(copy);
        assert_eq!(used(), (0, 0, 0));
        assert_eq!(bytes.unsent.held_by_h2(), 0);
    }

    /// A connection whose budget is found spent for ten seconds while its client reads none
    /// of its bytes and its socket does not wait to write is cut; nothing counted is given
    /// back before (giving it back let a client park answers past every budget: found by an
    /// adversarial run). Bytes read, or a socket waiting to write, start the ten seconds
    /// again.
    #[test]
    fn a_connection_found_spent_with_nothing_read_for_ten_seconds_is_cut() {
        let (_layer, bytes, budgets) = connection(1000);
        let mut held = Held::default();
        assert!(budgets.take(600, &mut held).is_ok());
        let _parked = handed_over(&bytes, &mut held, 600);
        let start = Instant::now();
        let at = |seconds| start + Duration::from_secs(seconds);
        let cut = || bytes.unsent.cut.is_cancelled();

        bytes.unsent.found_spent(at(0));
        bytes.unsent.wrote(&Poll::Ready(Ok(100)));
        bytes.unsent.data_read(100);
        bytes.unsent.found_spent(at(9));
        bytes.unsent.found_spent(at(10));
        assert!(!cut(), "the client read some at 9 s: from there");
        bytes.unsent.wrote(&Poll::Pending);
        bytes.unsent.found_spent(at(19));
        assert!(!cut(), "the socket waits to write: its bytes may go out");
        bytes.unsent.wrote(&Poll::Ready(Ok(0)));
        for second in 20..=28 {
            bytes.unsent.found_spent(at(second));
        }
        assert!(!cut());
        assert_eq!(bytes.budget.used(), 600, "nothing given back meanwhile");
        bytes.unsent.found_spent(at(29));
        assert!(cut(), "ten seconds with nothing taken since 19 s");
    }

    /// A budget not found spent for a while had room meanwhile: the ten seconds start again
    /// at the next look, not from the first one.
    #[test]
    fn a_budget_not_found_spent_for_a_while_starts_its_ten_seconds_again() {
        let (_layer, bytes, budgets) = connection(1000);
        let mut held = Held::default();
        assert!(budgets.take(600, &mut held).is_ok());
        let _parked = handed_over(&bytes, &mut held, 600);
        let start = Instant::now();
        let at = |seconds| start + Duration::from_secs(seconds);
        bytes.unsent.found_spent(at(0));
        bytes.unsent.found_spent(at(3));
        bytes.unsent.found_spent(at(7));
        for second in 8..=16 {
            bytes.unsent.found_spent(at(second));
        }
        assert!(!bytes.unsent.cut.is_cancelled(), "from 7 s on");
        bytes.unsent.found_spent(at(17));
        assert!(bytes.unsent.cut.is_cancelled());
    }

    /// A stream's frame waits while its connection's budget is spent, and goes once bytes
    /// come back, however they do: here another answer dropped before it was handed over.
    #[tokio::test(start_paused = true)]
    async fn a_streams_frame_waits_for_room_and_goes_when_bytes_come_back() {
        use std::future::poll_fn;
        use std::pin::pin;

        // 4 KiB a connection, 32 KiB in all.
        let (layer, bytes, budgets) = connection(1024);
        let mut other = Held::default();
        assert!(
            budgets.take(4096, &mut other).is_ok(),
            "the whole connection's"
        );

        let (frames, mut body) = stream_answer((&layer, &bytes, budgets), CHUNK.min(1024));
        let frame = http_body::Frame::data(Bytes::from(vec![7; 1000]));
        frames.send(Ok::<_, Status>(frame)).await.unwrap();
        let mut next = pin!(http_body_util::BodyExt::frame(&mut body));
        let first = poll_fn(|cx| Poll::Ready(next.as_mut().poll(cx))).await;
        assert!(first.is_pending(), "the connection's budget is spent");

        // Time stands still but for timers: the frame goes at once, not at the next look.
        let dropped = tokio::time::Instant::now();
        drop(other);
        let frame = next.await.expect("a frame").expect("not an error");
        assert!(
            dropped.elapsed() < IDLE_SOCKET,
            "woken by the bytes given back"
        );
        let data = frame.into_data().expect("data");
        assert_eq!(data.len(), 1000);
        // The frame, counted until h2 lets go of it, and a credit ahead (the budget is more
        // than half free again).
        assert_eq!(bytes.budget.used(), 1000 + 1024);
        drop(data);
        assert_eq!(bytes.budget.used(), 1024, "the credit alone");
    }

    /// A stream's frame that stays (its chunks not all handed over) counts what its budgets do
    /// not among what frames hold, per connection and in all, less as chunks go, and the rest
    /// when the stream is dropped; a frame handed over whole at once is never counted.
    #[tokio::test]
    async fn what_a_streams_frame_holds_before_it_is_handed_over_is_counted_until_let_go() {
        use std::future::poll_fn;

        let (layer, bytes, budgets) = connection(1 << 20);
        let (frames, mut body) = stream_answer((&layer, &bytes, budgets), CHUNK);
        let held = || {
            let connection = bytes.unsent.frame_bytes.load(Ordering::Relaxed);
            (connection, layer.frames.total())
        };
        let mut next = async || {
            let frame = poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await;
            frame.expect("a frame").expect("data").into_data().unwrap()
        };
        let small = Bytes::from(vec![7; 100]);
        frames
            .send(Ok::<_, Status>(http_body::Frame::data(small)))
            .await
            .unwrap();
        assert_eq!(next().await.len(), 100);
        assert_eq!(held(), (0, 0), "handed over whole at once");

        let large = Bytes::from(vec![7; 3 * CHUNK]);
        frames
            .send(Ok(http_body::Frame::data(large)))
            .await
            .unwrap();
        let first = next().await;
        assert_eq!(first.len(), CHUNK);
        // Its credit, taken with the first chunk, is counted in the connection's budget.
        let unprepaid = 2 * CHUNK - CREDIT;
        assert_eq!(held(), (unprepaid, unprepaid));
        let second = next().await;
        assert_eq!(held(), (CHUNK - CREDIT, CHUNK - CREDIT));
        drop(body);
        assert_eq!(held(), (0, 0), "dropped with the stream");
        drop((first, second));
        assert_eq!(bytes.budget.used(), 0);
    }

    /// Past the bound, a watch stream whose connection's streams hold a frame takes no other from
    /// tonic until they let go of it, or until the total is back within the bound: reconnecting
    /// clients that never read held one message per stream on every new connection, 8.5 times
    /// the bound (found by an adversarial run). Within the bound, streams take theirs at once.
    #[tokio::test]
    async fn past_the_bound_a_connection_holding_a_frame_takes_no_other_until_it_goes() {
        use std::future::poll_fn;
        use std::time::Duration;

        let (layer, bytes, budgets) = connection(1 << 20);
        let stream = |budgets| stream_answer((&layer, &bytes, budgets), CHUNK);
        let frame = |len| Ok::<_, Status>(http_body::Frame::data(Bytes::from(vec![7; len])));
        let next = async |body: &mut AnswerBody<Body>| {
            let frame = poll_fn(|cx| Pin::new(&mut *body).poll_frame(cx)).await;
            frame.expect("a frame").expect("data").into_data().unwrap()
        };
        let pending = |body: &mut AnswerBody<Body>| {
            let waker = futures_util::task::noop_waker();
            let mut cx = Context::from_waker(&waker);
            Pin::new(body).poll_frame(&mut cx).is_pending()
        };
        // A stream of the connection holds a frame.
        let (holding_frames_of, mut holding) = stream(budgets);
        holding_frames_of.send(frame(3 * CHUNK)).await.unwrap();
        let _first = next(&mut holding).await;
        assert!(bytes.unsent.frame_bytes.load(Ordering::Relaxed) > 0);

        // Within the bound, another stream of it takes its frame.
        let (sender, mut within) = stream(budgets_of(&layer, &bytes));
        sender.send(frame(100)).await.unwrap();
        assert_eq!(next(&mut within).await.len(), 100);

        // Past it (another connection holds 40 MiB), it does not, until the frame goes.
        let other = holding_frames(&layer, 40 << 20);
        sender.send(frame(100)).await.unwrap();
        assert!(pending(&mut within));
        assert_eq!(sender.capacity(), 1, "left with tonic");
        let waited = tokio::spawn(async move { next(&mut within).await.len() });
        tokio::task::yield_now().await;
        drop(holding);
        let told = tokio::time::timeout(Duration::from_secs(5), waited).await;
        assert_eq!(told.expect("told").unwrap(), 100);

        // Or until the total is back within the bound.
        let (holding_frames_of, mut holding) = stream(budgets_of(&layer, &bytes));
        holding_frames_of.send(frame(3 * CHUNK)).await.unwrap();
        let _first = next(&mut holding).await;
        let (sender, mut waiting) = stream(budgets_of(&layer, &bytes));
        sender.send(frame(100)).await.unwrap();
        assert!(pending(&mut waiting));
        let waited = tokio::spawn(async move { next(&mut waiting).await.len() });
        tokio::task::yield_now().await;
        other.unsent.frame_holds(40 << 20, 0);
        let told = tokio::time::timeout(Duration::from_secs(5), waited).await;
        assert_eq!(told.expect("told").unwrap(), 100);
        drop(holding);
        assert_eq!(layer.frames.total(), 0);
    }

    /// Within the bound too, a connection whose streams' frames hold its own budget's worth
    /// (four messages) takes turns until they hold less: one client alone with many streams
    /// of large messages, read slowly, held more than the server's bound and was cut on every
    /// try (found by an adversarial run), where it now holds about its budget and is paced.
    #[tokio::test]
    async fn a_connection_holding_its_budget_in_frames_takes_turns_within_the_bound() {
        use std::future::poll_fn;
        use std::time::Duration;

        let (layer, bytes, budgets) = connection(1000);
        bytes.unsent.frame_holds(0, 4000);
        assert!(layer.frames.total() < 32_000, "within the bound");
        let (sender, mut waiting) = stream_answer((&layer, &bytes, budgets), CHUNK);
        let frame = http_body::Frame::data(Bytes::from(vec![7; 100]));
        sender.send(Ok(frame)).await.unwrap();
        let waker = futures_util::task::noop_waker();
        let polled = Pin::new(&mut waiting).poll_frame(&mut Context::from_waker(&waker));
        assert!(polled.is_pending(), "its budget's worth held");
        let waited = tokio::spawn(async move {
            let frame = poll_fn(|cx| Pin::new(&mut waiting).poll_frame(cx)).await;
            frame
                .expect("a frame")
                .expect("data")
                .into_data()
                .unwrap()
                .len()
        });
        tokio::task::yield_now().await;
        bytes.unsent.frame_holds(4000, 3999);
        let told = tokio::time::timeout(Duration::from_secs(5), waited).await;
        assert_eq!(told.expect("told").unwrap(), 100);
    }

    /// An answer not marked [`TakesTurns`] (a unary answer: its trailers come after its
    /// message) never waits for a turn: its trailers, behind a stream of its connection holding
    /// a frame past the bound, held the call open.
    #[tokio::test]
    async fn an_answer_that_does_not_take_turns_is_not_held_back_past_the_bound() {
        use std::future::poll_fn;

        let (layer, bytes, budgets) = connection(1 << 20);
        let frame = |len| Ok::<_, Status>(http_body::Frame::data(Bytes::from(vec![7; len])));
        let (holding_frames_of, mut holding) = stream_answer((&layer, &bytes, budgets), CHUNK);
        holding_frames_of.send(frame(3 * CHUNK)).await.unwrap();
        let first = poll_fn(|cx| Pin::new(&mut holding).poll_frame(cx)).await;
        assert!(first.is_some_and(|frame| frame.is_ok()));
        let _other = holding_frames(&layer, 40 << 20);

        let connection = (&layer, &bytes, budgets_of(&layer, &bytes));
        let (sender, mut unary) = stream_answer_marked(connection, CHUNK, None);
        let trailers = http_body::Frame::trailers(http::HeaderMap::new());
        sender.send(Ok(trailers)).await.unwrap();
        let waker = futures_util::task::noop_waker();
        let polled = Pin::new(&mut unary).poll_frame(&mut Context::from_waker(&waker));
        let Poll::Ready(Some(Ok(frame))) = polled else {
            panic!("held back: {polled:?}");
        };
        assert!(frame.is_trailers());
    }

    /// Past the bound, what streams' frames hold is cut down to it: the connections holding the
    /// most whose clients read less than a sixteenth of it for a second, heaviest first, and
    /// no more than needed; a client that reads is not cut, and connections cut already count
    /// as gone before their bytes come back.
    #[test]
    fn past_the_bound_the_stalled_connections_holding_the_most_frame_bytes_are_cut() {
        let (layer, _, _) = connection(1000);
        let open = |held| holding_frames(&layer, held);
        let (large, small, other, reader) = (open(20_000), open(5_000), open(2_000), open(30_000));
        assert_eq!(layer.frames.total(), 57_000);
        let look = |now| frames_looked_at(&layer, now);
        let start = Instant::now();
        look(start);
        assert!(
            ![&large, &small, &other, &reader].into_iter().any(cut),
            "first seen"
        );
        reader.unsent.data_read(30_000 / SLOWEST_SHARE);
        look(start + STALLED);
        assert!(
            cut(&large) && cut(&small),
            "57,000 less the two heaviest stalled"
        );
        assert!(!cut(&other) && !cut(&reader));
        look(start + 2 * STALLED);
        assert!(!cut(&other), "what the cut ones hold is going");
        large.unsent.frame_holds(20_000, 0);
        assert_eq!(layer.frames.total(), 37_000);
    }

    /// Those that read nothing are cut before a client that reads, a little slower than a
    /// sixteenth a second, however much more it holds: heaviest first cut such a client and
    /// left ten that read nothing, then under the bound (found by an adversarial run).
    #[test]
    fn past_the_bound_those_reading_the_least_of_what_they_hold_are_cut_first() {
        let (layer, _, _) = connection(1000);
        let open = |held| holding_frames(&layer, held);
        let (slow, idle, trickle) = (open(30_000), open(10_000), open(10_000));
        let start = Instant::now();
        frames_looked_at(&layer, start);
        slow.unsent.data_read(30_000 / SLOWEST_SHARE - 100);
        trickle.unsent.data_read(1);
        frames_looked_at(&layer, start + STALLED);
        assert!(
            cut(&idle) && cut(&trickle),
            "50,000 less the two reading least"
        );
        assert!(!cut(&slow));
    }

    /// Every cut is counted by its reason; a warning is due for the first of each reason,
    /// then not again within [`WARN_EVERY`](crate::logging::WARN_EVERY), the next saying how
    /// many were left out (clients reconnecting as soon as they are cut made a line per cut).
    #[test]
    fn every_cut_is_counted_and_warned_of_at_most_every_interval_per_reason() {
        let (layer, _, _) = connection(1000);
        let counted = IntCounterVec::new(Opts::new("cuts", "test"), &["listener", "reason"]);
        let counted = counted.expect("a valid name");
        let layer = layer.counting_cuts_in(counted.clone());
        let cut = |reason| holding_frames(&layer, 1).unsent.cut_for(reason);
        assert_eq!(cut(CutReason::StreamBytes), Some(0));
        assert_eq!(cut(CutReason::StreamBytes), None);
        assert_eq!(cut(CutReason::StreamBytes), None);
        assert_eq!(cut(CutReason::ServerBudget), Some(0), "its own interval");
        let count = |reason| counted.with_label_values(&["grpc", reason]).get();
        assert_eq!(count("stream_bytes"), 3);
        assert_eq!(count("server_budget"), 1);
        assert_eq!(count("connection_budget"), 0);
    }

    /// A connection of `layer` whose streams' frames hold `held` bytes.
    fn holding_frames(layer: &AnswerBytesLayer, held: usize) -> ConnectionAnswerBytes {
        let (bytes, _, _) = another(layer);
        bytes.unsent.frame_holds(0, held);
        bytes
    }

    /// The look at what `layer`'s streams' frames hold, at `now`, against a bound of 32 times
    /// the message limit of [`connection`]'s layers.
    fn frames_looked_at(layer: &AnswerBytesLayer, now: Instant) {
        let bound = 32 * 1000;
        layer
            .holders
            .cut_frame_holders(layer.frames.total(), bound, now);
    }

    fn cut(bytes: &ConnectionAnswerBytes) -> bool {
        bytes.unsent.cut.is_cancelled()
    }

    /// Chunks leave half a connection's budget to other calls when every stream it may hold
    /// keeps one (and a chunk of credit), are 16 KiB at most and 1 KiB at least (or the
    /// message limit, if smaller).
    #[test]
    fn chunks_leave_half_the_budget_within_their_bounds() {
        let chunk = |max_message, streams| AnswerBytesLayer::new(max_message, streams).chunk;
        assert_eq!(chunk(4 << 20, 109), CHUNK, "the default limits");
        assert_eq!(chunk(262_144, 109), 262_144 * 4 / 4 / 109);
        assert_eq!(chunk(65_536, 10_009), SMALLEST_CHUNK, "not 6 bytes");
        assert_eq!(chunk(512, 109), 512, "the message limit");
    }

    /// hyper sets a content length from an exact size hint: the first message read ahead
    /// still counts in it.
    #[test]
    fn the_size_hint_counts_the_first_message_read_ahead() {
        let full = http_body_util::Full::new(Bytes::from(vec![7; 100]));
        let answer = http::Response::new(Body::new(full));
        let budgets = Budgets {
            connection: None,
            in_all: Some(Budget::new(1000, 1)),
            connection_share: None,
            what: "answers",
            advice: "wait",
        };
        let counting = Counting {
            budgets,
            unsent: None,
            holders: Holders::default(),
            chunk: CHUNK,
            call_bytes: 0,
            takes_turns: false,
        };
        let answer = Sending::first_frame(answer, counting);
        let (_, body) = answer.into_parts();
        assert_eq!(body.size_hint().exact(), Some(100));
    }
}
