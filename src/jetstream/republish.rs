//! Publishing again for a while: the pauses between publishes of one message (one message id)
//! while the stream answers that the same id is still being stored (error 10158: an earlier
//! publish of it is proposed and not yet committed), or while nothing answers for its subject
//! yet. Shared by the update stream's publish (`stream`) and a snapshot chunk's (`snapshots`):
//! one rule for how long and how often.
//!
//! Not here: which errors are worth publishing again (each caller decides), or the publish.

use std::time::Duration;

use tokio::time::Instant;

/// The pauses before publishing again, doubling from a first to a last, none ending at or past
/// a deadline.
#[derive(Debug)]
pub(super) struct Republish {
    deadline: Instant,
    pause: Duration,
    last: Duration,
}

impl Republish {
    /// Pauses from `first` doubling to `last`, until `deadline`.
    pub(super) fn until(deadline: Instant, (first, last): (Duration, Duration)) -> Republish {
        Republish {
            deadline,
            pause: first,
            last,
        }
    }

    /// The pause before the next publish, or `None` once it would end at or past the
    /// deadline: time to give up.
    pub(super) fn next_pause(&mut self) -> Option<Duration> {
        if Instant::now() + self.pause >= self.deadline {
            return None;
        }
        let this = self.pause;
        self.pause = (self.pause * 2).min(self.last);
        Some(this)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pauses double up to the last, and none ends past the deadline.
    #[tokio::test(start_paused = true)]
    async fn pauses_double_to_the_last_and_end_before_the_deadline() {
        let (first, last) = (Duration::from_millis(10), Duration::from_millis(40));
        let deadline = Instant::now() + Duration::from_millis(200);
        let mut again = Republish::until(deadline, (first, last));
        let mut pauses = Vec::new();
        while let Some(pause) = again.next_pause() {
            pauses.push(pause);
            tokio::time::advance(pause).await;
        }
        let ms = Duration::from_millis;
        assert_eq!(pauses, [ms(10), ms(20), ms(40), ms(40), ms(40), ms(40)]);
        assert!(Instant::now() < deadline);
    }
}
