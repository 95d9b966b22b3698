//! AdminService.Backup: an online backup, streamed.
//!
//! The state is read as of one revision while webhooks keep being applied
//! (`journal::snapshot::consistent_state`, the snapshots' own read), then encoded in the
//! journal's snapshot format and streamed in pieces of at most [`PIECE_BYTES`]. Reading and
//! encoding run on a blocking thread that stops as soon as the client is gone (a send fails).
//! One backup at a time: each holds a copy of the state (about three times the store's size
//! in memory until it is sent), and concurrent ones added up unbounded (eight stalled clients
//! took 1 GB; found by an adversarial run); another call meanwhile gets RESOURCE_EXHAUSTED.
//! This module reads the store; it writes nothing, and restoring is `crate::cli::restore`'s.

use std::pin::Pin;
use std::sync::Arc;

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
    /// One permit: the backup being streamed holds it until its stream is dropped.
    one_at_a_time: Arc<Semaphore>,
}

impl BackupApi {
    /// Backups of `store`, in messages of at most `max_message_bytes`.
    pub fn new(store: Store, max_message_bytes: usize) -> BackupApi {
        let piece_bytes = PIECE_BYTES
            .min(max_message_bytes.saturating_sub(MESSAGE_OVERHEAD))
            .max(1);
        let one_at_a_time = Arc::new(Semaphore::new(1));
        BackupApi {
            store,
            piece_bytes,
            one_at_a_time,
        }
    }

    /// Starts streaming a backup, unless one is being streamed already.
    pub fn backup(&self) -> Result<Response<BackupStream>, Status> {
        let running = Arc::clone(&self.one_at_a_time).try_acquire_owned();
        let permit = running.map_err(|_| grpc_status(Error::BackupRunning))?;
        let (pieces, stream) = mpsc::channel(BUFFERED);
        let (store, piece_bytes) = (self.store.clone(), self.piece_bytes);
        // Ends when the backup is sent or the client is gone: its owner is the stream.
        tokio::task::spawn_blocking(move || send(&store, piece_bytes, &pieces));
        // The permit goes with the stream: when the client has it all, or is gone.
        let stream = ReceiverStream::new(stream).map(move |piece| {
            let _held = &permit;
            piece
        });
        Ok(Response::new(Box::pin(stream)))
    }
}

/// Reads, encodes and sends the backup; a failed send (the client left) stops it.
fn send(
    store: &Store,
    piece_bytes: usize,
    pieces: &mpsc::Sender<Result<pb::BackupResponse, Status>>,
) {
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
        Err(_) => tracing::info!(revision, "backup abandoned: the client left"),
    }
}
