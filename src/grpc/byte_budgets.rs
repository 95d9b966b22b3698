//! Byte budgets a gRPC connection's calls draw on, one per connection and one for the server,
//! each a multiple of `--grpc-max-message-bytes`: what requests still arriving
//! (`request_bytes`) and answers not yet read (`answer_bytes`, with a part of the server's for
//! answers to clients that have not read, and none of the server's for health checks) may
//! hold. Bytes are only ever taken if there is room (taking never blocks: a stream that must
//! wait for room looks again when told, in `answer_bytes`), so a budget is one atomic count:
//! no lock on a call's path.
//!
//! Not here: when bytes are taken and given back (the two modules decide).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering, fence};

use tokio::sync::Notify;
use tokio::sync::futures::OwnedNotified;
use tonic::Status;

/// What a call holds besides its messages while it waits (for its request to arrive whole, or
/// for its client to read its answer): its HTTP/2 stream and what hyper and tonic keep for it,
/// 12 to 15 KB measured. Counted by their messages' bytes alone, 19,800 answers of 40 bytes
/// parked behind shut windows held 230 MiB, and 19,800 calls whose requests never came held
/// 300 MiB, none refused: about 24 GB on every connection the listener allows (found by
/// adversarial runs). At most a sixty-fourth of the message limit ([`call_bytes`]), so the
/// smallest limits leave room for calls: a connection's requests still arriving hold 128 such
/// calls then.
pub(super) const CALL_BYTES: usize = 12 * 1024;

/// [`CALL_BYTES`] for messages of at most `max_message_bytes`.
pub(super) fn call_bytes(max_message_bytes: usize) -> usize {
    CALL_BYTES.min(max_message_bytes / 64)
}

/// One budget: `messages` times the largest message.
#[derive(Clone)]
pub(super) struct Budget {
    counts: Arc<Counts>,
    messages: usize,
    total: usize,
}

/// A budget's counts, shared by its clones and by what was taken from it.
struct Counts {
    /// The bytes left.
    left: AtomicUsize,
    /// Who waits for bytes to come back (a connection's answers).
    room: Option<Room>,
}

impl Counts {
    fn give_back(&self, bytes: usize) {
        if bytes == 0 {
            return;
        }
        self.left.fetch_add(bytes, Ordering::AcqRel);
        if let Some(room) = &self.room {
            room.tell();
        }
    }
}

/// Streams waiting for bytes to come back to a budget, told whenever some do (also: streams
/// waiting for their turn to take a frame, `answer_bytes::frames`).
#[derive(Default)]
pub(super) struct Room {
    told: Arc<Notify>,
    waiting: AtomicUsize,
}

impl Room {
    /// Wakes the waiters, if any: a fence and one load when there are none (this runs for
    /// every write of a connection's socket).
    pub(super) fn tell(&self) {
        // Pairs with the fence in `start_waiting`: either the waiter's next look sees the
        // bytes given back, or this sees it waiting.
        fence(Ordering::SeqCst);
        if self.waiting.load(Ordering::SeqCst) > 0 {
            self.told.notify_waiters();
        }
    }

    /// Counts a waiter in; look at the budget again after this (and after enabling
    /// [`Room::told`]), so bytes given back meanwhile are not missed.
    pub(super) fn start_waiting(&self) {
        self.waiting.fetch_add(1, Ordering::SeqCst);
        fence(Ordering::SeqCst);
    }

    pub(super) fn stop_waiting(&self) {
        self.waiting.fetch_sub(1, Ordering::SeqCst);
    }

    /// Ready once bytes come back after it is enabled (or first polled).
    pub(super) fn told(&self) -> OwnedNotified {
        Arc::clone(&self.told).notified_owned()
    }
}

impl Budget {
    pub(super) fn new(max_message_bytes: usize, messages: usize) -> Budget {
        Budget::with(max_message_bytes, messages, None)
    }

    /// [`Budget::new`], telling those waiting for room when bytes come back
    /// ([`Budget::room`]).
    pub(super) fn with_room(max_message_bytes: usize, messages: usize) -> Budget {
        Budget::with(max_message_bytes, messages, Some(Room::default()))
    }

    fn with(max_message_bytes: usize, messages: usize, room: Option<Room>) -> Budget {
        let total = max_message_bytes.saturating_mul(messages);
        let counts = Counts {
            left: AtomicUsize::new(total),
            room,
        };
        Budget {
            counts: Arc::new(counts),
            messages,
            total,
        }
    }

    /// The bytes taken from it now.
    pub(super) fn used(&self) -> usize {
        let left = self.counts.left.load(Ordering::Acquire);
        self.total.saturating_sub(left)
    }

    /// Where to wait for bytes to come back: only a budget made by [`Budget::with_room`]
    /// says.
    pub(super) fn room(&self) -> Option<&Room> {
        self.counts.room.as_ref()
    }

    /// Gives `bytes` back that were handed over out of a [`Held`] ([`Held::hand_over`]).
    pub(super) fn give_back(&self, bytes: usize) {
        self.counts.give_back(bytes);
    }

    /// `bytes` from this budget, if it has them.
    fn take(&self, bytes: usize) -> Option<Taken> {
        let fewer = |left: usize| left.checked_sub(bytes);
        (self.counts.left)
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, fewer)
            .ok()?;
        Some(Taken {
            counts: Arc::clone(&self.counts),
            bytes,
        })
    }

    /// `bytes` from this budget into `held` (which holds bytes of this budget, or none), if
    /// it has them. A body that takes again adds to what it holds: no new reference to the
    /// counts for every message of a stream.
    fn take_into(&self, bytes: usize, held: &mut Option<Taken>) -> bool {
        match held {
            Some(taken) => {
                let fewer = |left: usize| left.checked_sub(bytes);
                let counts = &self.counts.left;
                let took = counts.fetch_update(Ordering::AcqRel, Ordering::Acquire, fewer);
                taken.bytes += if took.is_ok() { bytes } else { 0 };
                took.is_ok()
            }
            None => {
                *held = self.take(bytes);
                held.is_some()
            }
        }
    }
}

/// Bytes taken from a budget, given back when dropped.
struct Taken {
    counts: Arc<Counts>,
    bytes: usize,
}

impl Taken {
    /// Puts `bytes` of these back as if never taken: waiters are not told (the room was
    /// theirs before; two streams that each take and put back would wake each other without
    /// end).
    fn put_back(&mut self, bytes: usize) {
        let bytes = bytes.min(self.bytes);
        self.bytes -= bytes;
        self.counts.left.fetch_add(bytes, Ordering::AcqRel);
    }
}

impl Drop for Taken {
    fn drop(&mut self) {
        self.counts.give_back(self.bytes);
    }
}

/// What a call draws on: its connection's budget and the server's.
pub(super) struct Budgets {
    /// Absent for a connection that did not come through the capped listener (tests).
    pub(super) connection: Option<Budget>,
    /// Absent for a health check's answer ([`server_budget_for`]).
    pub(super) in_all: Option<Budget>,
    /// What the connection holds of the server's budget (as large as it, so never the
    /// limit): for the server to weigh connections when its budget is spent. A stream's later
    /// messages are in the connection's budget but not in this.
    pub(super) connection_share: Option<Budget>,
    /// What the bytes are, for the status of a call that finds a budget spent: "requests
    /// still arriving".
    pub(super) what: &'static str,
    /// What the caller can do when its connection's budget is spent.
    pub(super) advice: &'static str,
}

/// What a caller can do when the server's budget is spent: it may hold nothing of it (a
/// client that stops reading can spend it all; the advice to read earlier answers misled the
/// others, found by an adversarial run).
const SERVER_ADVICE: &str = "they may be other clients' calls, not this one's: retry in a moment";

impl Budgets {
    /// `bytes` more from both budgets, added to `held`, or the RESOURCE_EXHAUSTED status
    /// saying which one ran out (nothing taken then).
    pub(super) fn take(&self, bytes: usize, held: &mut Held) -> Result<(), Spent> {
        (self.try_take(bytes, held, None)).map_err(|spent| self.spent(spent))
    }

    /// [`Budgets::take`] for an answer's first message of `bytes`, and `call` more (what the
    /// call holds besides, [`CALL_BYTES`]) from the server's budget alone, returned in a `Held`
    /// of its own. Not from the connection's: answers computed faster than a loaded connection
    /// writes them pile up there, and bursts of calls at small message limits were refused
    /// (found by an adversarial run); the server's bounds them all the same. Nor in the
    /// connection's shares: they weigh the bytes its client reads.
    ///
    /// With `unread`, for an answer whose client has not read what it asked for before
    /// (`answer_bytes`): from the part of the server's budget such answers may hold between
    /// them too (none without the server's), so clients that read always find the rest. A
    /// client that read nothing and kept opening connections, each gone before a refusal
    /// could find it stalled, held all of it (found by an adversarial run). Counting what
    /// those clients hold, not how much of the whole is free: a rule that kept half of the
    /// whole free for them refused every new connection's first answer while readers held
    /// half (found by the next one). Its `share` counts what the connection holds of it, for
    /// a refusal to weigh connections.
    pub(super) fn take_answer(
        &self,
        (bytes, call): (usize, usize),
        held: &mut Held,
        unread: Option<(&Budget, &Budget)>,
    ) -> Result<Held, Spent> {
        let unread = unread.filter(|_| self.in_all.is_some());
        (self.try_take(bytes, held, unread)).map_err(|spent| self.spent(spent))?;
        let mut calls = Held::default();
        let spent = match (unread, &self.in_all) {
            (Some((part, _)), _) if !part.take_into(call, &mut calls.unread) => {
                (SpentBy::Unread, part)
            }
            (_, Some(in_all)) if !in_all.take_into(call, &mut calls.in_all) => {
                (SpentBy::Server, in_all)
            }
            _ => return Ok(calls),
        };
        // Its bytes go back too (`calls`' with it).
        *held = Held::default();
        Err(self.spent(spent))
    }

    /// The status of a call that found `spent` spent.
    fn spent(&self, (by, budget): (SpentBy, &Budget)) -> Spent {
        // The budget is named by the flag it is a multiple of, so an operator knows what to
        // raise (found by a first-user review).
        let (what, advice) = match by {
            SpentBy::Connection => (format!("this connection's {}", self.what), self.advice),
            SpentBy::Server => (format!("the server's {}", self.what), SERVER_ADVICE),
            SpentBy::Unread => (UNREAD_ANSWERS.to_owned(), SERVER_ADVICE),
        };
        let status = Status::resource_exhausted(format!(
            "{what} hold too many bytes already (at most {} times \
             --grpc-max-message-bytes): {advice}",
            budget.messages
        ));
        Spent { status, by }
    }

    /// `bytes` more from the connection's budget alone (if it has one) into `held`, if it has
    /// them: what a stream's later messages draw on.
    pub(super) fn try_take_connection(&self, bytes: usize, held: &mut Held) -> bool {
        (self.connection.as_ref())
            .is_none_or(|budget| budget.take_into(bytes, &mut held.connection))
    }

    /// Whether the connection's budget (if it has one) would stay at least half free after
    /// `bytes` more.
    pub(super) fn connection_roomy(&self, bytes: usize) -> bool {
        (self.connection.as_ref()).is_none_or(|budget| {
            let left = budget.counts.left.load(Ordering::Relaxed);
            left >= budget.total / 2 + bytes
        })
    }

    /// [`Budgets::take`] before its status is written: the budget found spent. Takes from
    /// `unread` too, when given. (A stream's later messages take from the connection's alone:
    /// [`Budgets::try_take_connection`].)
    fn try_take<'a>(
        &'a self,
        bytes: usize,
        held: &mut Held,
        unread: Option<(&'a Budget, &Budget)>,
    ) -> Result<(), (SpentBy, &'a Budget)> {
        // The connection's first: a connection past its own budget is told so, whatever the
        // server's (what it took goes back if a budget after it is spent).
        if let Some(budget) = &self.connection
            && !budget.take_into(bytes, &mut held.connection)
        {
            return Err((SpentBy::Connection, budget));
        }
        let put_back = |held: &mut Option<Taken>| {
            if let Some(taken) = held {
                taken.put_back(bytes);
            }
        };
        if let Some((budget, share)) = unread {
            if !budget.take_into(bytes, &mut held.unread) {
                put_back(&mut held.connection);
                return Err((SpentBy::Unread, budget));
            }
            // As large as the part: there is room.
            share.take_into(bytes, &mut held.unread_share);
        }
        let Some(in_all) = &self.in_all else {
            return Ok(());
        };
        if !in_all.take_into(bytes, &mut held.in_all) {
            put_back(&mut held.connection);
            if unread.is_some() {
                put_back(&mut held.unread);
                put_back(&mut held.unread_share);
            }
            return Err((SpentBy::Server, in_all));
        }
        if let Some(share) = &self.connection_share {
            // No more than the server's budget lets go: there is room.
            share.take_into(bytes, &mut held.connection_share);
        }
        Ok(())
    }
}

/// The server's budget a call to `path` draws on besides its connection's: `in_all`, but
/// none for a health check's answer. A probe's answer is a status of a few bytes, and what
/// those hold on a connection is bounded by its budget and its streams; drawn from the
/// server's budget too, a client that kept it spent (reading nothing on connections it keeps
/// renewing, which no cut catches) had a third to two thirds of health checks refused, and a
/// Kubernetes liveness probe restarts a pod for fewer (found by adversarial runs). A health
/// check's request still draws on the server's budget for requests: a request's bytes are
/// up to 16 KiB the client sends, not a few the server writes.
pub(super) fn server_budget_for(path: &str, in_all: &Budget) -> Option<Budget> {
    let health_check = path.starts_with("/grpc.health.v1.Health/");
    (!health_check).then(|| in_all.clone())
}

/// What a refusal for the part of the server's budget for clients that have not read names.
const UNREAD_ANSWERS: &str = "the server's answers to clients that have not read what they \
                              asked for before (new connections among them)";

/// The budget a take found spent.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum SpentBy {
    /// The connection's.
    Connection,
    /// The server's part for answers to clients that have not read.
    Unread,
    /// The server's.
    Server,
}

/// A budget found spent: the RESOURCE_EXHAUSTED status that says which.
pub(super) struct Spent {
    pub(super) status: Status,
    pub(super) by: SpentBy,
}

/// The bytes a body holds from its budgets, given back when dropped (or replaced by the
/// default).
#[derive(Default)]
pub(super) struct Held {
    in_all: Option<Taken>,
    connection: Option<Taken>,
    connection_share: Option<Taken>,
    unread: Option<Taken>,
    /// What the connection holds of `unread`.
    unread_share: Option<Taken>,
}

impl Held {
    /// Gives `bytes` of what is held back to each budget.
    pub(super) fn give_back(&mut self, bytes: usize) {
        let all = [
            &mut self.in_all,
            &mut self.connection,
            &mut self.connection_share,
            &mut self.unread,
            &mut self.unread_share,
        ];
        for taken in all.into_iter().flatten() {
            let given = bytes.min(taken.bytes);
            taken.bytes -= given;
            taken.counts.give_back(given);
        }
    }

    /// Stops holding `bytes` without giving them back: whoever they were handed to gives them
    /// back to the budgets ([`Budget::give_back`]) when done with them. Returns how many of
    /// them were the server budget's too (a stream's later messages draw on the connection's
    /// alone), and how many of those the part for clients that have not read.
    pub(super) fn hand_over(&mut self, bytes: usize) -> (usize, usize) {
        let mut in_all = 0;
        if let Some(taken) = &mut self.in_all {
            in_all = bytes.min(taken.bytes);
            taken.bytes -= in_all;
        }
        let mut unread = 0;
        if let Some(taken) = &mut self.unread {
            unread = in_all.min(taken.bytes);
            taken.bytes -= unread;
        }
        if let Some(taken) = &mut self.unread_share {
            taken.bytes -= unread.min(taken.bytes);
        }
        if let Some(taken) = &mut self.connection_share {
            taken.bytes -= in_all.min(taken.bytes);
        }
        if let Some(taken) = &mut self.connection {
            taken.bytes -= bytes.min(taken.bytes);
        }
        (in_all, unread)
    }
}
