//! AdminService.Backup: an online backup, streamed.
//!
//! The state is read as of one revision while webhooks keep being applied
//! (`journal::snapshot::consistent_state`, the snapshots' own read), then encoded in the
//! journal's snapshot format and streamed in pieces of at most [`PIECE_BYTES`]. Reading and
//! encoding run on a blocking thread that stops as soon as the client is gone (a send fails).
//! One backup at a time: each holds a copy of the state (about three times the store's size
//! in memory until it is sent), and concurrent ones added up unbounded (eight stalled clients
//! took 1 GB; found by an adversarial run); another call meanwhile gets RESOURCE_EXHAUSTED.
//! The slot goes with the copy: a client that takes no piece for `--backup-stall-timeout`
//! loses its backup (it ends DEADLINE_EXCEEDED after what HTTP/2 already holds; the pieces
//! queued for it are dropped), so one stuck client cannot hold the slot, or those pieces, for
//! as long as its connection lives (found by the next runs).
//! This module reads the store; it writes nothing, and restoring is `crate::cli::restore`'s.

use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::Poll;
use std::time::Duration;

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_stream::{Stream, StreamExt};
use tonic::{Response, Status};

use crate::error::Error;
use crate::journal::codec::SnapshotHeader;
use crate::journal::snapshot;
use crate::pb;
use crate::status::grpc_status;
use crate::store::Store;

/// The largest piece of the file in one message (less when `--grpc-max-message-bytes` is
/// lower). Small: a stream whose client keeps its window shut holds the message it has in
/// hand (and tonic the buffer it was encoded in) until the client resets it, also once the
/// backup is abandoned. With pieces of 1 MiB, a client that kept starting backups on one
/// connection and reading none held about 1.7 MiB for each (found by an adversarial run).
pub const PIECE_BYTES: usize = 16 * 1024;
/// Room in a message for everything but the piece (field tags, the first message's details).
const MESSAGE_OVERHEAD: usize = 512;
/// Messages buffered between the encoding thread and the stream.
const BUFFERED: usize = 4;

/// The stream a Backup call answers with.
pub type BackupStream = Pin<Box<dyn Stream<Item = Result<pb::BackupResponse, Status>> + Send>>;

/// Backs up the store.
#[derive(Clone)]
pub struct BackupApi {
    store: Store,
    piece_bytes: usize,
    /// One permit: held while a backup's thread has the copy of the state or its queue has
    /// pieces the client has not taken.
    one_at_a_time: Arc<Semaphore>,
    /// `--backup-stall-timeout`: how long queued pieces wait for the client to take one (the
    /// watch looks once per timeout, so a stall is found within twice that).
    stall_timeout: Duration,
}

impl BackupApi {
    /// Backups of `store`, in messages of at most `max_message_bytes`, abandoned when the
    /// client takes no piece for `stall_timeout`.
    pub fn new(store: Store, max_message_bytes: usize, stall_timeout: Duration) -> BackupApi {
        let piece_bytes = PIECE_BYTES
            .min(max_message_bytes.saturating_sub(MESSAGE_OVERHEAD))
            .max(1);
        let one_at_a_time = Arc::new(Semaphore::new(1));
        BackupApi {
            store,
            piece_bytes,
            one_at_a_time,
            stall_timeout,
        }
    }

    /// Starts streaming a backup, unless one is being streamed already.
    pub fn backup(&self) -> Result<Response<BackupStream>, Status> {
        let running = Arc::clone(&self.one_at_a_time).try_acquire_owned();
        let permit = running.map_err(|_| grpc_status(Error::BackupRunning))?;
        // Held by the thread while it has the copy of the state, and by the queue until the
        // backup is all taken, is abandoned, or its stream is gone.
        let slot = Arc::new(permit);
        let (sender, receiver) = mpsc::channel(BUFFERED);
        let queue = Arc::new(Queue {
            receiver: Mutex::new(receiver),
            taken: Arc::new(Notify::new()),
            last_words: Mutex::new(None),
            slot: Mutex::new(Some(Arc::clone(&slot))),
        });
        // Weak: the watch must not keep the queue open for a client that has left.
        let watched = Watched {
            queue: Arc::downgrade(&queue),
            taken: Arc::clone(&queue.taken),
            sender: sender.downgrade(),
        };
        tokio::spawn(watched.abandon_if_stalled(self.stall_timeout));
        let (store, piece_bytes) = (self.store.clone(), self.piece_bytes);
        // Ends when the backup is all queued, or its queue is closed (the client left or
        // stalled).
        tokio::task::spawn_blocking(move || {
            send(&store, piece_bytes, &sender);
            drop(slot);
        });
        Ok(Response::new(Box::pin(queue.into_stream())))
    }
}

/// What a backup's stream takes its messages from.
struct Queue {
    receiver: Mutex<mpsc::Receiver<Piece>>,
    /// Notified each time the stream takes a message.
    taken: Arc<Notify>,
    /// Why the backup was abandoned, once it was.
    last_words: Mutex<Option<Status>>,
    /// The queue's share of the one backup slot: a client that stopped reading after the
    /// last piece was queued kept it, and the pieces, while the slot went to the next backup
    /// (15 such clients of a small store took 65 MB; found by an adversarial run).
    slot: Mutex<Option<Arc<OwnedSemaphorePermit>>>,
}

type Piece = Result<pb::BackupResponse, Status>;

impl Queue {
    /// The queue's messages, then why the backup was abandoned (if it was): without it the
    /// stream would end OK, and the client would take a truncated backup for a whole one.
    fn into_stream(self: Arc<Self>) -> impl Stream<Item = Piece> + Send + 'static {
        let queue = Arc::clone(&self);
        let taken = futures_util::stream::poll_fn(move |cx| {
            let piece = queue.receiver.lock().expect("not poisoned").poll_recv(cx);
            if let Poll::Ready(Some(_)) = piece {
                queue.taken.notify_one();
            }
            piece
        });
        let abandoned = futures_util::stream::once(async move {
            self.last_words
                .lock()
                .expect("not poisoned")
                .take()
                .map(Err)
        });
        taken.chain(abandoned.filter_map(|status| status))
    }

    /// Gives up on the backup: closes the queue, which stops the encoding thread at its next
    /// message, and drops what was queued, so a client that stopped reading does not keep it
    /// for as long as its connection lives (about 4 MiB; found by an adversarial run).
    fn abandon(&self, timeout: Duration) {
        let stalled = grpc_status(Error::BackupStalled { timeout });
        *self.last_words.lock().expect("not poisoned") = Some(stalled);
        let mut receiver = self.receiver.lock().expect("not poisoned");
        receiver.close();
        while receiver.try_recv().is_ok() {}
        self.let_go();
        tracing::warn!("backup abandoned: the client took no piece within --backup-stall-timeout");
    }

    /// Gives up the queue's share of the slot.
    fn let_go(&self) {
        self.slot.lock().expect("not poisoned").take();
    }

    /// Messages waiting to be taken.
    fn waiting(&self) -> usize {
        self.receiver.lock().expect("not poisoned").len()
    }
}

/// A backup as its watch sees it: nothing it holds keeps the queue or the sender alive.
struct Watched {
    queue: Weak<Queue>,
    taken: Arc<Notify>,
    sender: mpsc::WeakSender<Piece>,
}

impl Watched {
    /// Watches until the backup is all taken from the queue (the queue then lets go of the
    /// slot: the rest is HTTP/2's) or its stream is gone, and abandons it once messages have
    /// waited `timeout` with none taken. A task of its own rather than a timed wait in the
    /// thread: a tokio timer polled from a blocking thread while the runtime shuts down panics.
    async fn abandon_if_stalled(self, timeout: Duration) {
        loop {
            let taken = tokio::time::timeout(timeout, self.taken.notified()).await;
            let Some(queue) = self.queue.upgrade() else {
                return;
            };
            let waiting = queue.waiting();
            if waiting == 0 && self.sender.upgrade().is_none() {
                return queue.let_go();
            }
            if taken.is_err() && waiting > 0 {
                return queue.abandon(timeout);
            }
        }
    }
}

/// Reads, encodes and sends the backup; a failed send (the client left, or the backup was
/// abandoned) stops it.
fn send(store: &Store, piece_bytes: usize, pieces: &mpsc::Sender<Piece>) {
    let (revision, profiles) = match snapshot::consistent_state(store, None) {
        Ok(state) => state,
        Err(error) => {
            tracing::warn!(error = %error, "backup failed");
            let error = Error::Unavailable {
                reason: "writes outpaced the watch history while the state was read; retry (or \
                         raise --history-events)"
                    .into(),
            };
            let _ = pieces.blocking_send(Err(grpc_status(error)));
            return;
        }
    };
    let mut first = Some(pb::BackupResponse {
        chunk: Vec::new(),
        revision,
        store_id: store.store_id().to_owned(),
        profile_count: profiles.len() as u64,
    });
    // A backup is restored as a single node's data: no stream position.
    let header = SnapshotHeader {
        revision,
        profiles: profiles.len() as u64,
        stream_sequence: 0,
    };
    let sent = snapshot::encode(&header, &profiles, |bytes| {
        for piece in bytes.chunks(piece_bytes) {
            let mut message = first.take().unwrap_or_default();
            message.chunk = piece.to_vec();
            pieces
                .blocking_send(Ok(message))
                .map_err(|_| std::io::Error::from(std::io::ErrorKind::BrokenPipe))?;
        }
        Ok(())
    });
    match sent {
        Ok(()) => tracing::info!(revision, profiles = profiles.len(), "backup sent"),
        Err(_) => tracing::info!(revision, "backup ended early: the client left or stalled"),
    }
}
