//! The line of scheduled reconcile jobs waiting for room (`--reconcile-max-jobs`, or the
//! account's last job still running): who goes first when a place frees.
//!
//! Schedules of one period fall due at the same instant. When a period held fewer jobs than
//! there were accounts, whichever waiting schedule woke first took each freed place: one
//! account went 7 periods without a job while others ran back to back (an adversarial run),
//! and `ProfileStateReconcileScheduleLate` fires after 2.5. In this line the waiting account
//! whose last scheduled job started the longest ago (or never) goes first, ties in the order
//! they began to wait, so every account gets its turn.
//!
//! What it does not do: hold places or wake anyone. `ReconcileJobs` asks it under its table's
//! lock, beside the running jobs, and wakes the waiting schedules when the line moves.

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

/// The waiting schedules, and when each account's last scheduled job started.
#[derive(Debug, Default)]
pub struct WaitingLine {
    /// Each waiting schedule's account, by the ticket it took when it began to wait.
    waiting: BTreeMap<u64, String>,
    /// When each account's last scheduled job started (a schedule per account: bounded by
    /// `--reconcile-every`).
    last_started: HashMap<String, Instant>,
    next_ticket: u64,
}

impl WaitingLine {
    /// `client_id`'s schedule begins to wait; its ticket.
    pub fn join(&mut self, client_id: &str) -> u64 {
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        self.waiting.insert(ticket, client_id.to_owned());
        ticket
    }

    /// The schedule holding `ticket` stops waiting (started, gave up, or stopped).
    pub fn leave(&mut self, ticket: u64) {
        self.waiting.remove(&ticket);
    }

    /// A scheduled job of `client_id` started at `at`.
    pub fn started(&mut self, client_id: &str, at: Instant) {
        self.last_started.insert(client_id.to_owned(), at);
    }

    /// Whether the schedule holding `ticket` goes before every other waiting one that could
    /// start now (`can_start`: its account has no job running). One whose account still runs
    /// its last job waits for that job, and keeps no one else from a free place.
    pub fn is_next(&self, ticket: u64, can_start: impl Fn(&str) -> bool) -> bool {
        let Some(mine) = self.waiting.get(&ticket) else {
            return true;
        };
        let mine = self.place(ticket, mine);
        self.waiting
            .iter()
            .filter(|(other, client_id)| **other != ticket && can_start(client_id))
            .all(|(other, client_id)| self.place(*other, client_id) > mine)
    }

    /// Where a waiting schedule stands: never started first, then the oldest last start, then
    /// the earliest ticket.
    fn place(&self, ticket: u64, client_id: &str) -> (Option<Instant>, u64) {
        (self.last_started.get(client_id).copied(), ticket)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_account_waiting_since_the_oldest_start_goes_first_then_the_earliest_ticket() {
        let now = Instant::now();
        let mut line = WaitingLine::default();
        line.started("ran-last", now);
        line.started("ran-earlier", now - Duration::from_secs(60));
        let ran_last = line.join("ran-last");
        let ran_earlier = line.join("ran-earlier");
        let never_a = line.join("never-a");
        let never_b = line.join("never-b");
        let anyone = |_: &str| true;
        assert!(line.is_next(never_a, anyone), "never ran, and waited first");
        for behind in [never_b, ran_earlier, ran_last] {
            assert!(!line.is_next(behind, anyone));
        }
        line.leave(never_a);
        assert!(line.is_next(never_b, anyone));
        line.leave(never_b);
        assert!(line.is_next(ran_earlier, anyone));
        assert!(!line.is_next(ran_last, anyone));
        // ran-earlier starts: now it ran last of the two.
        line.leave(ran_earlier);
        line.started("ran-earlier", now + Duration::from_secs(1));
        let again = line.join("ran-earlier");
        assert!(line.is_next(ran_last, anyone));
        assert!(!line.is_next(again, anyone));
    }

    #[test]
    fn one_waiting_for_its_own_last_job_keeps_no_one_from_a_free_place() {
        let mut line = WaitingLine::default();
        let busy = line.join("busy");
        let other = line.join("other");
        assert!(!line.is_next(other, |_| true));
        assert!(line.is_next(other, |account| account != "busy"));
        // A ticket not in the line (it left) is not held back.
        line.leave(busy);
        assert!(line.is_next(busy, |_| true));
    }
}
