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
//! loses its backup (it ends DEADLINE_EXCEEDED after the pieces already queued), so one stuck
//! client cannot hold the slot for as long as its connection lives (found by the next run).
//! This module reads the store; it writes nothing, and restoring is `crate::cli::restore`'s.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::runtime::Handle;
use tokio::sync::mpsc::error::SendTimeoutError;
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Response, Status};

use crate::error::Error;
use crate::journal::codec::SnapshotHeader;
use crate::journal::snapshot;
use crate::pb;
use crate::status::grpc_status;
use crate::store::Store;

/// The largest piece of the file in one message: well under the 4 MiB gRPC clients accept by
/// default (less when `--grpc-max-message-bytes` is lower).
pub const PIECE_BYTES: usize = 1 << 20;
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
    /// One permit: the thread reading and encoding a backup holds it while it has the copy.
    one_at_a_time: Arc<Semaphore>,
    /// `--backup-stall-timeout`: how long a piece waits for the client to take the ones before.
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
        let (sender, stream) = mpsc::channel(BUFFERED);
        let last_words = Arc::new(Mutex::new(None));
        let pieces = Pieces {
            sender,
            stall_timeout: self.stall_timeout,
            runtime: Handle::current(),
            last_words: Arc::clone(&last_words),
        };
        let (store, piece_bytes) = (self.store.clone(), self.piece_bytes);
        // Ends when the backup is sent, the client is gone or stalls; the slot with it.
        tokio::task::spawn_blocking(move || {
            send(&store, piece_bytes, &pieces);
            drop(permit);
        });
        // After the pieces queued, why the backup was abandoned (if it was): without it the
        // stream would end OK, and the client would take a truncated backup for a whole one.
        let abandoned =
            futures_util::stream::once(
                async move { last_words.lock().expect("not poisoned").take() },
            );
        let stream =
            ReceiverStream::new(stream).chain(abandoned.filter_map(|status| status.map(Err)));
        Ok(Response::new(Box::pin(stream)))
    }
}

/// Where the encoding thread sends a backup's messages.
struct Pieces {
    sender: mpsc::Sender<Result<pb::BackupResponse, Status>>,
    stall_timeout: Duration,
    /// The runtime the stream is on: the thread waits for room on it, with a timer.
    runtime: Handle,
    /// The error the stream ends with when its client stalled (the channel is full then).
    last_words: Arc<Mutex<Option<Status>>>,
}

impl Pieces {
    /// Queues `message` for the client, waiting at most the stall timeout for room: past it,
    /// the backup is abandoned and the stream ends with an error after what is queued.
    fn send(&self, message: Result<pb::BackupResponse, Status>) -> std::io::Result<()> {
        let sent = self
            .runtime
            .block_on(self.sender.send_timeout(message, self.stall_timeout));
        match sent {
            Ok(()) => Ok(()),
            Err(SendTimeoutError::Closed(_)) => Err(std::io::ErrorKind::BrokenPipe.into()),
            Err(SendTimeoutError::Timeout(_)) => {
                let stalled = Error::BackupStalled {
                    timeout: self.stall_timeout,
                };
                *self.last_words.lock().expect("not poisoned") = Some(grpc_status(stalled));
                Err(std::io::ErrorKind::TimedOut.into())
            }
        }
    }
}

/// Reads, encodes and sends the backup; a failed send (the client left or stalled) stops it.
fn send(store: &Store, piece_bytes: usize, pieces: &Pieces) {
    let (revision, profiles) = match snapshot::consistent_state(store, None) {
        Ok(state) => state,
        Err(error) => {
            tracing::warn!(error = %error, "backup failed");
            let error = Error::Unavailable {
                reason: "writes outpaced the watch history while the state was read; retry (or \
                         raise --history-events)"
                    .into(),
            };
            let _ = pieces.send(Err(grpc_status(error)));
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
            pieces.send(Ok(message))?;
        }
        Ok(())
    });
    match sent {
        Ok(()) => tracing::info!(revision, profiles = profiles.len(), "backup sent"),
        Err(error) if error.kind() == std::io::ErrorKind::TimedOut => tracing::warn!(
            revision,
            "backup abandoned: the client took no piece within --backup-stall-timeout"
        ),
        Err(_) => tracing::info!(revision, "backup abandoned: the client left"),
    }
}
