//! The no-op durable server: a plain server that answers a webhook only once it is on disk,
//! as the baseline of `ingest`'s durable row.
//!
//! Run as a child process of this binary (the hidden `noop-durable` command). It takes webhooks
//! over HTTP (axum, as the no-op HTTP baseline), and a thread of its own writes the bodies that
//! arrived together as one frame and `fdatasync`s it (group commit; while it syncs, the next
//! frame gathers), then each is answered 200. The file is written with zeros and synced before
//! the first webhook, and frames overwrite it from the start when they reach its end, so no sync
//! ever grows the file: the service's journal gets the same from its runway. Nothing is parsed,
//! verified, merged, encoded or stored. Its rate against the no-op HTTP server's is what the
//! disk takes from such a server with the same senders; a cleverer design might keep more, so
//! it bounds nothing (BENCHMARKS.md, Session 17).

use std::fs::File;
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::baseline::answer_when_done;
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};

/// The file's size: frames wrap around to its start past this.
const FILE_BYTES: u64 = 64 << 20;

/// Most bodies in one frame (the service's `MAX_BATCH`).
const MAX_PER_FRAME: usize = 512;

/// A body waiting for its frame's sync.
type Waiting = (Bytes, oneshot::Sender<bool>);

/// Serves the no-op durable server on 127.0.0.1 port 0, its file in `dir`, and prints its
/// address as one JSON line (`{"http": ...}`); runs until killed.
pub async fn serve(dir: &Path) -> anyhow::Result<()> {
    let file = zeroed_file(dir)?;
    let (waiting, inbox) = mpsc::channel::<Waiting>(4 * MAX_PER_FRAME);
    // Detached: it ends when the last handler's sender is gone.
    std::thread::Builder::new()
        .name("noop-journal".into())
        .spawn(move || write_frames(&file, inbox))?;

    let http = TcpListener::bind("127.0.0.1:0").await?;
    let addr: SocketAddr = http.local_addr()?;
    println!("{}", serde_json::json!({ "http": addr }));
    let router = Router::new()
        .route(profile_state::webhook::PATH, post(take))
        .with_state(waiting);
    let listener = {
        use axum::serve::ListenerExt;
        http.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        })
    };
    axum::serve(listener, router).await?;
    Ok(())
}

/// An unnamed file in `dir` (gone when the process is), zeros written and synced.
fn zeroed_file(dir: &Path) -> anyhow::Result<File> {
    let mut file = tempfile::tempfile_in(dir)?;
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..FILE_BYTES / zeros.len() as u64 {
        file.write_all(&zeros)?;
    }
    file.sync_all()?;
    Ok(file)
}

/// One webhook: answered once the frame holding its body is synced.
async fn take(State(waiting): State<mpsc::Sender<Waiting>>, body: Bytes) -> StatusCode {
    answer_when_done(&waiting, body).await
}

/// Writes and syncs everything waiting as one frame (length-prefixed bodies), answers each,
/// and again, until every sender is gone.
fn write_frames(file: &File, mut inbox: mpsc::Receiver<Waiting>) {
    let (mut batch, mut frame) = (Vec::with_capacity(MAX_PER_FRAME), Vec::new());
    let mut offset = 0u64;
    while inbox.blocking_recv_many(&mut batch, MAX_PER_FRAME) > 0 {
        frame.clear();
        for (body, _) in &batch {
            frame.extend_from_slice(&(body.len() as u32).to_le_bytes());
            frame.extend_from_slice(body);
        }
        if offset + frame.len() as u64 > FILE_BYTES {
            offset = 0;
        }
        let synced = file
            .write_all_at(&frame, offset)
            .and_then(|()| file.sync_data());
        if let Err(error) = &synced {
            eprintln!("noop-durable: write failed: {error}");
        }
        offset += frame.len() as u64;
        for (_, reply) in batch.drain(..) {
            let _ = reply.send(synced.is_ok());
        }
    }
}
