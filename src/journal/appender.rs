//! The journal's own thread: appends (write + `fdatasync`), probes and the close, one at a
//! time in the order they were asked for, off the async runtime.
//!
//! A dedicated thread rather than a `spawn_blocking` per batch: the sequencer hands it a
//! frame it encoded and goes on sequencing and encoding the next batch while this one syncs
//! (a pipeline; see `crate::sequencer`). Order is the point: appends are written strictly in
//! the order they were sent. After a failed append every later append is refused without
//! touching the file, until [`Appender::resume`]: a batch numbered after a failed one must
//! never reach the disk, or its revisions would follow a gap. This module does not decide
//! what goes into a frame, or when to retry.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::{Journal, JournalError};
use crate::data_dir::LockShare;

/// An append that was written and synced.
#[derive(Debug, Clone, Copy)]
pub struct Appended {
    /// The frame's bytes.
    pub bytes: u64,
    /// How long the write and sync took.
    pub took: Duration,
}

enum Job {
    Append {
        frame: Vec<u8>,
        revisions: Option<(u64, u64)>,
        done: oneshot::Sender<io::Result<Appended>>,
    },
    Resume,
    Probe {
        next_revision: u64,
        done: oneshot::Sender<io::Result<()>>,
    },
    Close {
        done: oneshot::Sender<Result<(), JournalError>>,
    },
}

/// How long the append in progress has taken: its start in microseconds since `epoch`, plus
/// one (0 while none is in progress), set and cleared by the journal's thread. What the
/// sequencer's stall watch reads (a disk that hangs rather than fails).
pub struct WriteClock {
    epoch: Instant,
    started: AtomicU64,
}

impl WriteClock {
    fn new() -> WriteClock {
        WriteClock {
            epoch: Instant::now(),
            started: AtomicU64::new(0),
        }
    }

    fn start(&self, at: Instant) {
        let since = at.saturating_duration_since(self.epoch).as_micros() as u64;
        self.started.store(since + 1, Ordering::Release);
    }

    fn stop(&self) {
        self.started.store(0, Ordering::Release);
    }

    /// How long the append in progress has taken, if one is.
    pub fn waited(&self) -> Option<Duration> {
        let started = self.started.load(Ordering::Acquire).checked_sub(1)?;
        let now = self.epoch.elapsed().as_micros() as u64;
        Some(Duration::from_micros(now.saturating_sub(started)))
    }
}

/// Handle to the journal's thread. The thread ends once the handle is dropped (or closed),
/// after finishing what it was given.
pub struct Appender {
    jobs: mpsc::Sender<Job>,
    dir: PathBuf,
    clock: Arc<WriteClock>,
}

/// What the thread says when it stopped before answering (it cannot: it answers every job
/// it takes, unless it panicked).
fn gone() -> io::Error {
    io::Error::other("the journal thread has stopped")
}

impl Appender {
    /// Starts the thread that owns `journal`, holding `lock` (a share of the data directory's
    /// lock) until it has closed the journal's files and ends: a stop that gives up waiting
    /// for a sync does not let another server into the directory while this thread may still
    /// write there.
    pub fn start(lock: LockShare, journal: Journal) -> io::Result<Appender> {
        let dir = journal.dir().to_owned();
        let (jobs, inbox) = mpsc::channel();
        let clock = Arc::new(WriteClock::new());
        let thread_clock = Arc::clone(&clock);
        std::thread::Builder::new()
            .name("journal".into())
            .spawn(move || run(lock, journal, inbox, &thread_clock))?;
        Ok(Appender { jobs, dir, clock })
    }

    /// How long the append in progress has taken.
    pub fn write_clock(&self) -> Arc<WriteClock> {
        Arc::clone(&self.clock)
    }

    /// The directory the journal lives in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Appends `frame` (a [`BatchRecord`](super::codec::BatchRecord) frame holding the
    /// revisions `first..=last`) after everything sent before it; resolves once it is synced,
    /// or refused because an earlier append failed and [`Appender::resume`] was not called
    /// since.
    pub fn append(
        &self,
        frame: Vec<u8>,
        revisions: Option<(u64, u64)>,
    ) -> impl Future<Output = io::Result<Appended>> + Send + 'static {
        let (done, answer) = oneshot::channel();
        let sent = self.jobs.send(Job::Append {
            frame,
            revisions,
            done,
        });
        async move {
            sent.map_err(|_| gone())?;
            answer.await.map_err(|_| gone())?
        }
    }

    /// After a failed append, and once every append sent after it was answered: appends sent
    /// from now on are written again.
    pub fn resume(&self) {
        let _ = self.jobs.send(Job::Resume);
    }

    /// [`Journal::probe`] on the thread, after what was sent before.
    pub async fn probe(&self, next_revision: u64) -> io::Result<()> {
        let (done, answer) = oneshot::channel();
        self.jobs
            .send(Job::Probe {
                next_revision,
                done,
            })
            .map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }

    /// [`Journal::close`] on the thread, after what was sent before; the thread then ends.
    pub async fn close(self) -> Result<(), JournalError> {
        let (done, answer) = oneshot::channel();
        let gone = || JournalError::Io(crate::io_error::IoError::on(&self.dir, "close")(gone()));
        self.jobs.send(Job::Close { done }).map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }
}

/// Longest time between two checks that the data directory is still the one locked, while
/// appends only write to the open segment.
const IN_PLACE_EVERY: Duration = Duration::from_millis(50);

/// Takes jobs until the close or the handle's drop; `lock` is held until then. (First among
/// the parameters: they drop in reverse order, so on a panic too the journal's files are
/// closed before the share goes.)
fn run(lock: LockShare, mut journal: Journal, inbox: mpsc::Receiver<Job>, clock: &WriteClock) {
    // Set by a failed append, cleared by `Resume`: what was numbered after the failure is
    // refused, never written.
    let mut refusing = false;
    let dir = journal.dir().to_owned();
    // When the directory was last seen to be still this server's (`LockShare::check_in_place`).
    let mut in_place_at: Option<Instant> = None;
    for job in inbox {
        match job {
            Job::Append {
                frame,
                revisions,
                done,
            } => {
                let outcome = if refusing {
                    Err(io::Error::other(
                        "not written: an earlier journal append failed",
                    ))
                } else {
                    let started = Instant::now();
                    clock.start(started);
                    // Checked before anything is written by path (a new segment, the head) or
                    // cut, and otherwise at most IN_PLACE_EVERY apart: a stat before every
                    // append cost durable ingest about 0.8 µs a webhook (BENCHMARKS.md,
                    // session 45), and appends between checks go to the open segment, in the
                    // directory the server locked (moved or not).
                    let due = journal.next_append_does_more()
                        || in_place_at.is_none_or(|at| started - at >= IN_PLACE_EVERY);
                    let in_place = match due {
                        true => lock.check_in_place(&dir),
                        false => Ok(()),
                    };
                    // Failed, every append checks again until one passes.
                    in_place_at = match (due, &in_place) {
                        (true, Ok(())) => Some(started),
                        (true, Err(_)) => None,
                        (false, _) => in_place_at,
                    };
                    let appended =
                        in_place.and_then(|()| journal.append_encoded(&frame, revisions));
                    // Before the answer: whoever has the answer sees no write in progress.
                    clock.stop();
                    appended
                        .map(|bytes| Appended {
                            bytes,
                            took: started.elapsed(),
                        })
                        .inspect_err(|_| refusing = true)
                };
                let _ = done.send(outcome);
            }
            Job::Resume => refusing = false,
            Job::Probe {
                next_revision,
                done,
            } => {
                let probed = lock.check_in_place(&dir);
                let _ = done.send(probed.and_then(|()| journal.probe(next_revision)));
            }
            Job::Close { done } => {
                // Files closed and the lock's share given back before the answer: once a
                // clean stop has its answer, nothing of this thread keeps the directory.
                // Not in a directory that is no longer this server's: closing cuts the
                // segment to its length and writes the head, over another server's records.
                let closed = super::in_place(&lock, &dir, "close the journal in")
                    .and_then(|()| journal.close());
                drop(journal);
                drop(lock);
                let _ = done.send(closed);
                return;
            }
        }
    }
    // The handle is gone without a close: the files first, then the lock's share.
    drop(journal);
    drop(lock);
}
