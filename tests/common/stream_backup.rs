//! `nats stream backup` and `nats stream restore` through the JetStream API, as the NATS CLI
//! does them (nats-io/jsm.go, `snapshots.go`): a stream snapshot whose chunks the server sends
//! to a subject of ours, each acknowledged as it comes, then restored under the stream's own
//! configuration and state. What comes back is what an operator gets: the same configuration
//! (metadata included) and messages at the same sequences, and a new creation time. A bucket's
//! stream (`OBJ_<bucket>`, `KV_<bucket>`) is backed up and restored the same way, under its
//! stream's name.

use std::time::Duration;

use async_nats::Client;
use bytes::Bytes;
use serde_json::{Value, json};
use tokio_stream::StreamExt;

/// The chunk size asked of the server and sent back (the CLI's restore chunk).
const CHUNK: usize = 64 * 1024;
/// How long a test waits for the next chunk, or for an answer.
const PATIENCE: Duration = Duration::from_secs(30);
/// JetStream's `JSClusterNoPeersErrF`: "no suitable peers for placement".
const NO_SUITABLE_PEERS: u64 = 10005;

/// A stream's backup: its configuration and state as the snapshot request answered them, and
/// the snapshot's bytes (an s2-compressed tar, passed through untouched).
pub struct StreamBackup {
    /// `{"config": …, "state": …}`: the restore request.
    pub meta: Value,
    /// The snapshot.
    pub data: Vec<u8>,
}

impl StreamBackup {
    /// The first and last sequence the stream held when it was backed up.
    pub fn sequences(&self) -> (u64, u64) {
        let state = &self.meta["state"];
        let sequence = |key: &str| {
            state[key]
                .as_u64()
                .unwrap_or_else(|| panic!("the backup's state has {key}: {state}"))
        };
        (sequence("first_seq"), sequence("last_seq"))
    }
}

/// A client of its own on `url`, for the API requests below.
pub async fn client(url: &str) -> Client {
    async_nats::connect(url).await.expect("nats connects")
}

/// Backs up `stream`, without its consumers.
pub async fn backup(client: &Client, stream: &str) -> StreamBackup {
    let inbox = client.new_inbox();
    // Subscribed before asking: the server sends the first chunk once it sees interest.
    let mut chunks = client.subscribe(inbox.clone()).await.unwrap();
    let request = json!({"deliver_subject": inbox, "no_consumers": true, "chunk_size": CHUNK});
    let answer = api(
        client,
        &format!("$JS.API.STREAM.SNAPSHOT.{stream}"),
        &request,
    )
    .await;
    let mut data = Vec::new();
    loop {
        let chunk = tokio::time::timeout(PATIENCE, chunks.next())
            .await
            .expect("the next chunk of the snapshot")
            .expect("the subscription stays open");
        if let Some(status) = chunk.status {
            assert!(status.is_success(), "{status}: {:?}", chunk.description);
        }
        // An empty message ends the snapshot.
        if chunk.payload.is_empty() {
            break;
        }
        data.extend_from_slice(&chunk.payload);
        // Flow control: the server waits for these once enough is outstanding.
        if let Some(reply) = chunk.reply {
            client.publish(reply, Bytes::new()).await.unwrap();
        }
    }
    client.flush().await.unwrap();
    assert!(!data.is_empty(), "the snapshot holds the stream's files");
    let meta = json!({"config": answer["config"], "state": answer["state"]});
    StreamBackup { meta, data }
}

/// Restores `backup` as `stream` (which must not exist): the restore request, the chunks, then
/// an empty message, answered once the server has rebuilt the stream.
///
/// A cluster's meta leader that has not heard from a server for a moment (a loaded machine)
/// answers "no suitable peers for placement, peer offline": asked again until PATIENCE runs out.
pub async fn restore(client: &Client, stream: &str, backup: &StreamBackup) {
    let subject = format!("$JS.API.STREAM.RESTORE.{stream}");
    let body: Bytes = serde_json::to_vec(&backup.meta).unwrap().into();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let answer = loop {
        let answer = request(client, &subject, body.clone()).await;
        let no_peers = answer["error"]["err_code"] == json!(NO_SUITABLE_PEERS);
        if !no_peers || tokio::time::Instant::now() >= deadline {
            assert!(answer.get("error").is_none(), "{subject}: {answer}");
            break answer;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let deliver = answer["deliver_subject"]
        .as_str()
        .unwrap_or_else(|| panic!("a subject to send the chunks to: {answer}"))
        .to_owned();
    for chunk in backup.data.chunks(CHUNK) {
        let reply = chunk_request(client, &deliver, Bytes::copy_from_slice(chunk)).await;
        assert!(
            reply.is_null() || reply.get("error").is_none(),
            "chunk refused: {reply}"
        );
    }
    let created = chunk_request(client, &deliver, Bytes::new()).await;
    assert!(created.get("error").is_none(), "restore refused: {created}");
}

/// [`request`] of a restore's chunk, asked again while nobody listens on `deliver` yet: the
/// server that took the restore subscribes there, and a loaded cluster may not yet have told
/// the server this client is connected to (a chunk answered "no responders" failed the test
/// once in CI). No listener means nobody got the chunk, so sending it again sends it once.
async fn chunk_request(client: &Client, deliver: &str, payload: Bytes) -> Value {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let answer = loop {
        let asked = tokio::time::timeout(
            PATIENCE,
            client.request(deliver.to_owned(), payload.clone()),
        )
        .await
        .unwrap_or_else(|_| panic!("{deliver} answers"));
        match asked {
            Ok(answer) => break answer,
            Err(error)
                if error.kind() == async_nats::RequestErrorKind::NoResponders
                    && tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(error) => panic!("{deliver}: {error}"),
        }
    };
    json(deliver, &answer.payload)
}

/// An answer's payload as JSON (`null` when empty).
fn json(subject: &str, payload: &[u8]) -> Value {
    match payload.is_empty() {
        true => Value::Null,
        false => serde_json::from_slice(payload)
            .unwrap_or_else(|error| panic!("{subject} answered no JSON: {error}")),
    }
}

/// A JetStream API request; its answer, which must not be an error.
async fn api(client: &Client, subject: &str, body: &Value) -> Value {
    let answer = request(client, subject, serde_json::to_vec(body).unwrap().into()).await;
    assert!(answer.get("error").is_none(), "{subject}: {answer}");
    answer
}

/// A request; its answer as JSON (`null` when empty).
async fn request(client: &Client, subject: &str, payload: Bytes) -> Value {
    let answer = tokio::time::timeout(PATIENCE, client.request(subject.to_owned(), payload))
        .await
        .unwrap_or_else(|_| panic!("{subject} answers"))
        .unwrap_or_else(|error| panic!("{subject}: {error}"));
    json(subject, &answer.payload)
}
