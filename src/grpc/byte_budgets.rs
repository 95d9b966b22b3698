//! Byte budgets a gRPC connection's calls draw on, one per connection and one for the server,
//! each a multiple of `--grpc-max-message-bytes`: what requests still arriving
//! (`request_bytes`) and answers not yet read (`answer_bytes`) may hold. Bytes are only ever
//! taken if there is room (nothing waits for a budget), so a budget is one atomic count: no
//! lock on a call's path.
//!
//! Not here: when bytes are taken and given back (the two modules decide).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tonic::Status;

/// One budget: `messages` times the largest message.
#[derive(Clone)]
pub(super) struct Budget {
    /// The bytes left.
    left: Arc<AtomicUsize>,
    /// The bytes ever taken (wrapping), with `left` what was ever given back: only where
    /// that is asked ([`Budget::given_back`], a connection's answers), not on the server's
    /// budgets, which every call shares.
    taken: Option<Arc<AtomicUsize>>,
    messages: usize,
    total: usize,
}

impl Budget {
    pub(super) fn new(max_message_bytes: usize, messages: usize) -> Budget {
        let total = max_message_bytes.saturating_mul(messages);
        Budget {
            left: Arc::new(AtomicUsize::new(total)),
            taken: None,
            messages,
            total,
        }
    }

    /// [`Budget::new`], and counting what it gives back ([`Budget::given_back`]).
    pub(super) fn counting_given_back(max_message_bytes: usize, messages: usize) -> Budget {
        Budget {
            taken: Some(Arc::default()),
            ..Budget::new(max_message_bytes, messages)
        }
    }

    /// The bytes taken from it now.
    pub(super) fn used(&self) -> usize {
        self.total.saturating_sub(self.left.load(Ordering::Acquire))
    }

    /// The bytes ever given back (wrapping): it moves only as bytes come back. Only a budget
    /// made by [`Budget::counting_given_back`] counts it.
    pub(super) fn given_back(&self) -> usize {
        let taken = self.taken.as_ref().map_or(0, |t| t.load(Ordering::Acquire));
        taken.wrapping_sub(self.used())
    }

    /// Gives `bytes` back that were handed over out of a [`Held`] ([`Held::hand_over`]).
    pub(super) fn give_back(&self, bytes: usize) {
        self.left.fetch_add(bytes, Ordering::AcqRel);
    }

    /// `bytes` from this budget, if it has them.
    fn take(&self, bytes: usize) -> Option<Taken> {
        self.left
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |left| {
                left.checked_sub(bytes)
            })
            .ok()?;
        if let Some(taken) = &self.taken {
            taken.fetch_add(bytes, Ordering::AcqRel);
        }
        Some(Taken {
            left: Arc::clone(&self.left),
            bytes,
        })
    }
}

/// Bytes taken from a budget, given back when dropped.
struct Taken {
    left: Arc<AtomicUsize>,
    bytes: usize,
}

impl Drop for Taken {
    fn drop(&mut self) {
        self.left.fetch_add(self.bytes, Ordering::AcqRel);
    }
}

/// What a call draws on: its connection's budget and the server's.
pub(super) struct Budgets {
    /// Absent for a connection that did not come through the capped listener (tests).
    pub(super) connection: Option<Budget>,
    pub(super) in_all: Budget,
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
        // The budget is named by the flag it is a multiple of, so an operator knows what to
        // raise (found by a first-user review).
        let exhausted = |whose: &str, budget: &Budget, advice: &str| {
            Status::resource_exhausted(format!(
                "{whose} {} hold too many bytes already (at most {} times \
                 --grpc-max-message-bytes): {advice}",
                self.what, budget.messages
            ))
        };
        // The connection's first: a connection past its own budget is told so, whatever the
        // server's (what it took goes back if the server's is spent).
        let connection = match &self.connection {
            Some(budget) => Some(budget.take(bytes).ok_or_else(|| Spent {
                status: exhausted("this connection's", budget, self.advice),
                by_server: false,
            })?),
            None => None,
        };
        let in_all = (self.in_all.take(bytes)).ok_or_else(|| Spent {
            status: exhausted("the server's", &self.in_all, SERVER_ADVICE),
            by_server: true,
        })?;
        merge(&mut held.in_all, in_all);
        if let Some(connection) = connection {
            merge(&mut held.connection, connection);
        }
        Ok(())
    }
}

/// A budget found spent: the RESOURCE_EXHAUSTED status that says which.
pub(super) struct Spent {
    pub(super) status: Status,
    /// The server's budget, not the connection's.
    pub(super) by_server: bool,
}

/// Adds `taken` to `held` (a body draws on the same budgets every time).
fn merge(held: &mut Option<Taken>, mut taken: Taken) {
    match held {
        Some(held) => held.bytes += std::mem::take(&mut taken.bytes),
        None => *held = Some(taken),
    }
}

/// The bytes a body holds from its budgets, given back when dropped (or replaced by the
/// default).
#[derive(Default)]
pub(super) struct Held {
    in_all: Option<Taken>,
    connection: Option<Taken>,
}

impl Held {
    /// Gives `bytes` of what is held back to each budget.
    pub(super) fn give_back(&mut self, bytes: usize) {
        for taken in [&mut self.in_all, &mut self.connection]
            .into_iter()
            .flatten()
        {
            let given = bytes.min(taken.bytes);
            taken.bytes -= given;
            taken.left.fetch_add(given, Ordering::AcqRel);
        }
    }

    /// Stops holding `bytes` without giving them back: whoever they were handed to gives them
    /// back to the budgets ([`Budget::give_back`]) when done with them.
    pub(super) fn hand_over(&mut self, bytes: usize) {
        for taken in [&mut self.in_all, &mut self.connection]
            .into_iter()
            .flatten()
        {
            taken.bytes -= bytes.min(taken.bytes);
        }
    }
}
