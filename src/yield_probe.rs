//! For tests: a task that counts how often its thread let it run, to prove that other work on
//! the same (current-thread) runtime yields instead of holding the thread.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// A spawned task that runs once per turn it is given; aborted when dropped.
pub(crate) struct YieldProbe {
    turns: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl YieldProbe {
    /// Spawns the probe on the current runtime.
    pub(crate) fn spawn() -> YieldProbe {
        let turns = Arc::new(AtomicUsize::new(0));
        let counting = Arc::clone(&turns);
        let task = tokio::spawn(async move {
            loop {
                counting.fetch_add(1, Ordering::Relaxed);
                tokio::task::yield_now().await;
            }
        });
        YieldProbe { turns, task }
    }

    /// The turns it has had so far.
    pub(crate) fn turns(&self) -> usize {
        self.turns.load(Ordering::Relaxed)
    }
}

impl Drop for YieldProbe {
    fn drop(&mut self) {
        self.task.abort();
    }
}
