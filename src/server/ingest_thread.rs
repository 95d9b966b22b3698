//! The ingest thread: a single-threaded tokio runtime on an OS thread of its own, where the
//! webhook listener, its connections and handlers, and the store's one writer on a single node
//! (the sequencer) run. gRPC, watch streams, monitoring, reconcile jobs and a replica's
//! publisher and applier (which start snapshot uploads) stay on the main (multi-thread)
//! runtime.
//!
//! Why one thread: every webhook is handed to the one writer and answered by it. On the
//! multi-thread runtime the handler and the writer ran on different workers: each update was
//! built on one core and freed on the other, every answer woke a task that had to be stolen
//! back, and the connections' state moved between the cores' caches. On one thread the
//! hand-off is a push onto a local run queue. Measured (BENCHMARKS.md, session 12): about a
//! fifth less CPU per webhook, and more webhooks per second on this 2-core machine. The cost:
//! webhook handling uses at most one core (about 30,000 a second here), which is far beyond
//! what Gameball sends one service; the writer was already one task.
//!
//! What may take long goes elsewhere: dead-letter files to this runtime's blocking threads, a
//! webhook's signature check over its compact form to a thread of its own
//! (`webhook::compact_checks`).
//!
//! Not here: what runs on the thread (the server's wiring decides), HTTP, the sequencer.

use std::io;
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::runtime::{Builder, Handle};
use tokio::sync::oneshot;

/// How often (in tasks run) the runtime looks at tasks woken from other threads before its own
/// queue. Such a wake is the journal's thread saying a sync is done: until the sequencer runs,
/// the next batch waits and the synced batch's callers get no answer. At tokio's default (31)
/// it can wait behind 31 connection tasks; measured from a sync's end to the sequencer
/// running: 0.18-0.22 ms at 31, 0.14-0.16 ms at 2, and more durable webhooks/s. Looking more
/// often costs an atomic load per task while nothing is there.
const GLOBAL_QUEUE_INTERVAL: u32 = 2;

/// How long the runtime's end waits for blocking tasks still running on it.
const BLOCKING_GRACE: Duration = Duration::from_secs(1);

/// The running ingest thread. Stopping it (or dropping it) ends the runtime: tasks still on
/// it are dropped, so the server stops it only after its ordered shutdown has waited for them.
pub(super) struct IngestThread {
    handle: Handle,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl IngestThread {
    /// Starts the thread and its runtime (timers and I/O enabled). The runtime is built on the
    /// thread itself, so a failure to build it is an error here, not a runtime dropped on an
    /// async thread. The thread logs where the caller logs: the caller's default subscriber
    /// (the global one in production, a test's capture in tests) is made the thread's.
    pub(super) async fn start() -> io::Result<IngestThread> {
        let logs = tracing::dispatcher::get_default(Clone::clone);
        let (started, handle) = oneshot::channel::<io::Result<Handle>>();
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("ingest".into())
            .spawn(move || {
                tracing::dispatcher::with_default(&logs, || {
                    let runtime = match Builder::new_current_thread()
                        .enable_all()
                        .global_queue_interval(GLOBAL_QUEUE_INTERVAL)
                        .build()
                    {
                        Ok(runtime) => runtime,
                        Err(error) => {
                            let _ = started.send(Err(error));
                            return;
                        }
                    };
                    let _ = started.send(Ok(runtime.handle().clone()));
                    // A current-thread runtime runs its spawned tasks while its thread waits
                    // in `block_on`; an `Err` means the `IngestThread` was dropped: stop too.
                    runtime.block_on(async move {
                        let _ = stopped.await;
                    });
                    // The server's shutdown waited for what it needs; blocking work still
                    // running (it should be none) does not hold the process past this.
                    runtime.shutdown_timeout(BLOCKING_GRACE);
                });
            })?;
        let handle = handle
            .await
            .unwrap_or_else(|_| Err(io::Error::other("the ingest thread ended at its start")))?;
        Ok(IngestThread {
            handle,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Where to spawn: `handle().spawn(..)`, or `handle().enter()` around code that spawns
    /// with `tokio::spawn`.
    pub(super) fn handle(&self) -> &Handle {
        &self.handle
    }

    /// Ends the runtime and waits for the thread (off the caller's runtime).
    pub(super) async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let joined = tokio::task::spawn_blocking(move || thread.join()).await;
            if !matches!(joined, Ok(Ok(()))) {
                tracing::warn!("the ingest thread did not end cleanly");
            }
        }
    }
}

impl Drop for IngestThread {
    fn drop(&mut self) {
        // Not joined here: a drop may happen on an async thread, which must not block.
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn spawned_tasks_run_on_the_ingest_thread_until_it_stops() {
        let ingest = IngestThread::start().await.unwrap();
        let on = ingest
            .handle()
            .spawn(async { std::thread::current().name().map(str::to_owned) })
            .await
            .unwrap();
        assert_eq!(on.as_deref(), Some("ingest"));

        let (_keep, never) = oneshot::channel::<()>();
        let pending = ingest.handle().spawn(async move {
            let _ = never.await;
        });
        ingest.stop().await;
        let ended = pending.await.unwrap_err();
        assert!(
            ended.is_cancelled(),
            "a task left on the runtime is dropped"
        );
    }
}
