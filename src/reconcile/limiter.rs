//! The client-side rate limiter: how often the reconciler may call one of Gameball's rate
//! buckets, with every window Gameball enforces on it at once.
//!
//! Gameball limits each resource twice: a number of requests per second and a number per 30
//! seconds, and answers 429 beyond either. Its documentation does not say whether the windows
//! are fixed or sliding, so [`RateLimiter`] keeps the stricter reading: in *every* interval of a
//! window's length, wherever it starts, at most that window's limit of requests are sent. It
//! remembers the send times of the last `max(limit)` requests (1,200 instants, about 19 KB, for
//! Customers GET) and lets a request go once each window holds fewer than its limit.
//!
//! Why not `governor`: its GCRA admits a burst and then a steady rate, which bounds a window of
//! length `w` only by `burst + w × rate`. With one quota per limiter, meeting both of Gameball's
//! windows would take two chained limiters and a burst of one, capping a short job at the
//! 30-second rate (40/s for Customers GET) instead of letting it use the per-second rate while
//! the 30-second quota lasts. A sliding log is exact for both windows and fits on a screen.
//!
//! Gameball counts arrivals, the limiter counts sends: a request held up on its way (a new
//! connection, a busy host) arrives later than it was counted and can land in the next window
//! with the requests sent after it (seen in the stand-in tests: the first requests of a run,
//! delayed 10 ms by their connections, made a 200 ms window hold 12 where 8 were sent). So each
//! window is kept a little longer than its length ([`GUARD`], at most a quarter of the length),
//! and the limits themselves are a share of Gameball's (see `account`), which absorbs longer
//! delays such as a TLS handshake across the world.
//!
//! A 429 pauses the whole resource ([`RateLimiter::pause_for`]), not only the request that got
//! it, so a storm of concurrent requests backs off together. This module does not retry, time
//! out or know HTTP: the client does.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// How much longer than its length each window is kept: the delay between counting a request
/// and its arrival at Gameball that can never add one to a window.
pub const GUARD: Duration = Duration::from_millis(100);

/// One of Gameball's windows: at most `limit` requests in any interval of `length`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    /// Requests allowed per window (at least 1).
    pub limit: u32,
    /// The window's length.
    pub length: Duration,
}

impl Window {
    /// A window of `limit` requests per `length`.
    pub const fn new(limit: u32, length: Duration) -> Window {
        Window { limit, length }
    }

    /// This window with its limit scaled by `share` (rounded down, at least 1).
    pub fn share(self, share: f64) -> Window {
        let limit = (f64::from(self.limit) * share).floor().max(1.0);
        Window {
            // In range: `share` is at most 1, so the product is at most `self.limit`.
            limit: limit as u32,
            length: self.length,
        }
    }
}

/// Limits one rate bucket by all of its windows at once.
///
/// Shared by every task that calls the bucket (behind an `Arc`); the lock is a std `Mutex`
/// because it is held only to read and push a few instants, never across an `.await`.
#[derive(Debug)]
pub struct RateLimiter {
    windows: Vec<Window>,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// Send times of the most recent requests, oldest first; at most the largest limit.
    sent: VecDeque<Instant>,
    /// No request is sent before this instant (set by a 429).
    paused_until: Option<Instant>,
}

impl RateLimiter {
    /// A limiter for `windows` (each with a limit of at least 1).
    pub fn new(windows: &[Window]) -> RateLimiter {
        assert!(
            windows.iter().all(|window| window.limit > 0),
            "a rate window allows at least one request"
        );
        RateLimiter {
            windows: windows.to_vec(),
            state: Mutex::new(State::default()),
        }
    }

    /// The windows this limiter keeps.
    pub fn windows(&self) -> &[Window] {
        &self.windows
    }

    /// Waits until a request may be sent without breaking any window, and counts it as sent.
    pub async fn acquire(&self) {
        loop {
            let ready_at = {
                let mut state = self.state.lock().expect("rate limiter lock poisoned");
                let now = Instant::now();
                match self.ready_at(&state, now) {
                    None => {
                        self.record(&mut state, now);
                        return;
                    }
                    Some(ready_at) => ready_at,
                }
            };
            // Another task may take the slot first; then this one computes a new time.
            tokio::time::sleep_until(ready_at).await;
        }
    }

    /// Sends nothing on this bucket for `delay` from now (or longer, if already paused longer):
    /// what a 429 asks for. Returns how much longer the bucket is now paused than it was: the
    /// 429s of requests in flight together overlap, and their pauses counted one by one added
    /// up to more seconds than had passed (found by an adversarial run).
    pub fn pause_for(&self, delay: Duration) -> Duration {
        let now = Instant::now();
        let until = now + delay;
        let mut state = self.state.lock().expect("rate limiter lock poisoned");
        let paused_until = state.paused_until.unwrap_or(now).max(now);
        if paused_until < until {
            state.paused_until = Some(until);
        }
        until.saturating_duration_since(paused_until)
    }

    /// When the next request may go, or `None` if it may go `now`.
    fn ready_at(&self, state: &State, now: Instant) -> Option<Instant> {
        let mut ready_at = state.paused_until.filter(|until| *until > now);
        for window in &self.windows {
            let limit = window.limit as usize;
            if state.sent.len() < limit {
                continue;
            }
            // The window is full while the limit-th most recent send is inside it.
            let oldest_counted = state.sent[state.sent.len() - limit];
            let frees_at = oldest_counted + window.length + GUARD.min(window.length / 4);
            if frees_at > now {
                ready_at = Some(ready_at.map_or(frees_at, |at: Instant| at.max(frees_at)));
            }
        }
        ready_at
    }

    fn record(&self, state: &mut State, now: Instant) {
        let keep = self
            .windows
            .iter()
            .map(|window| window.limit as usize)
            .max()
            .unwrap_or(0);
        state.sent.push_back(now);
        while state.sent.len() > keep {
            state.sent.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    /// The largest number of `times` in any interval `[t, t + length)`.
    fn busiest(times: &[Instant], length: Duration) -> usize {
        let mut sorted = times.to_vec();
        sorted.sort();
        let mut start = 0;
        let mut most = 0;
        for end in 0..sorted.len() {
            while sorted[end] - sorted[start] >= length {
                start += 1;
            }
            most = most.max(end - start + 1);
        }
        most
    }

    async fn send_all(limiter: Arc<RateLimiter>, tasks: usize, each: usize) -> Vec<Instant> {
        let mut handles = Vec::new();
        for _ in 0..tasks {
            let limiter = Arc::clone(&limiter);
            handles.push(tokio::spawn(async move {
                let mut times = Vec::new();
                for _ in 0..each {
                    limiter.acquire().await;
                    times.push(Instant::now());
                }
                times
            }));
        }
        let mut times = Vec::new();
        for handle in handles {
            times.extend(handle.await.unwrap());
        }
        times
    }

    #[tokio::test(start_paused = true)]
    async fn both_windows_hold_in_every_interval_and_the_short_one_allows_bursts() {
        let per_second = Window::new(10, Duration::from_secs(1));
        let per_30s = Window::new(40, Duration::from_secs(30));
        let limiter = Arc::new(RateLimiter::new(&[per_second, per_30s]));
        let start = Instant::now();
        let times = send_all(limiter, 4, 20).await;
        assert_eq!(times.len(), 80);
        assert_eq!(busiest(&times, per_second.length), 10);
        assert_eq!(busiest(&times, per_30s.length), 40);
        // 40 within the first 30 s, in bursts of 10 per second (so within 4 s), then the
        // next 40 only once the first ones leave the 30 s window.
        let first_40 = times
            .iter()
            .filter(|t| **t - start < Duration::from_secs(5));
        assert_eq!(first_40.count(), 40);
        // Each window is kept for its length plus the guard.
        let burst = times
            .iter()
            .filter(|t| **t - start < Duration::from_millis(1100));
        assert_eq!(
            burst.count(),
            10,
            "the second ten wait for 1 s and the guard"
        );
        let last = times.iter().max().unwrap();
        assert!(
            *last - start >= Duration::from_millis(33_100),
            "{:?}",
            *last - start
        );
        assert!(
            *last - start < Duration::from_secs(35),
            "{:?}",
            *last - start
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_pause_holds_every_caller_back() {
        let limiter = Arc::new(RateLimiter::new(&[Window::new(
            100,
            Duration::from_secs(1),
        )]));
        let start = Instant::now();
        assert_eq!(
            limiter.pause_for(Duration::from_secs(3)),
            Duration::from_secs(3)
        );
        // A shorter pause does not shorten the longer one, nor add to it.
        assert_eq!(limiter.pause_for(Duration::from_secs(1)), Duration::ZERO);
        tokio::time::advance(Duration::from_secs(1)).await;
        // A longer one adds what it goes past the first.
        assert_eq!(limiter.pause_for(Duration::from_secs(2)), Duration::ZERO);
        assert_eq!(
            limiter.pause_for(Duration::from_millis(2500)),
            Duration::from_millis(500)
        );
        limiter.pause_for(Duration::from_millis(1500));
        let times = send_all(Arc::clone(&limiter), 3, 2).await;
        assert!(
            times
                .iter()
                .all(|t| *t - start >= Duration::from_millis(3500))
        );
        assert!(
            times
                .iter()
                .all(|t| *t - start < Duration::from_millis(3600))
        );
    }

    #[test]
    fn a_share_rounds_down_and_keeps_at_least_one() {
        let window = Window::new(100, Duration::from_secs(1));
        assert_eq!(window.share(0.5).limit, 50);
        assert_eq!(window.share(0.333).limit, 33);
        assert_eq!(window.share(0.001).limit, 1);
        assert_eq!(window.share(1.0).limit, 100);
    }
}
