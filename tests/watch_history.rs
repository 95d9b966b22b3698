//! `--history-bytes` end to end, through the binary's flag and the real gRPC surface: the watch
//! history is bounded by memory as well as by count (issue 10 item 10), oldest first, and a
//! watcher resuming from a revision that fell out gets the usual Reset.

use crate::common;
use crate::watch::next;

use common::binary::Binary;
use common::{at, profile_updated};
use profile_state::pb;
use profile_state::pb::profile_service_client::ProfileServiceClient;
use profile_state::pb::watch_profiles_response::Event;
use serde_json::json;
use tonic::Streaming;

/// The bound the binary runs with, in bytes.
const HISTORY_BYTES: usize = 200_000;
/// Changes posted, each with about `EXTRA_BYTES` of extras: several times the bound in all,
/// and nowhere near `--history-events` (100000 by default).
const CHANGES: u64 = 30;
const EXTRA_BYTES: usize = 20_000;

async fn watch(
    binary: &Binary,
    request: pb::WatchProfilesRequest,
) -> Result<Streaming<pb::WatchProfilesResponse>, tonic::Status> {
    let mut client = ProfileServiceClient::connect(format!("http://{}", binary.grpc))
        .await
        .unwrap();
    Ok(client.watch_profiles(request).await?.into_inner())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_history_is_bounded_by_history_bytes_and_a_watcher_behind_it_gets_a_reset() {
    let dir = tempfile::tempdir().unwrap();
    let bound = HISTORY_BYTES.to_string();
    let binary = Binary::start(dir.path(), &["--history-bytes", &bound]).await;
    for n in 1..=CHANGES {
        let data = json!({"notes": "x".repeat(EXTRA_BYTES)});
        let (status, answer) = binary
            .post(&profile_updated(&format!("c{n}"), &at(1), data))
            .await;
        assert_eq!(status, 200, "{answer}");
    }

    let info = binary.server_info().await;
    assert_eq!(info.revision, CHANGES);
    let oldest = info.oldest_revision;
    let kept = usize::try_from(CHANGES - oldest + 1).unwrap();
    assert!(
        oldest > 1 && kept * EXTRA_BYTES <= HISTORY_BYTES,
        "oldest revision {oldest}: {kept} changes of {EXTRA_BYTES} bytes kept"
    );
    assert!(kept >= 2, "the history keeps the newest changes ({kept})");
    let metrics = reqwest::get(format!("http://{}/metrics", binary.admin))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let held: f64 = metrics
        .lines()
        .find_map(|line| {
            line.strip_prefix("profile_state_watch_history_bytes ")?
                .parse()
                .ok()
        })
        .expect("the history gauge is exported");
    assert!(
        held > 0.0 && held <= HISTORY_BYTES as f64,
        "{held} bytes held"
    );

    // Resuming from inside the history: the changes from there on, in order, then Synced.
    let mut inside = watch(
        &binary,
        pb::WatchProfilesRequest {
            start_revision: oldest,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    for revision in oldest..=CHANGES {
        match next(&mut inside).await {
            Event::Change(change) => {
                assert_eq!(change.revision, revision);
                assert_eq!(change.profile.unwrap().customer_id, format!("c{revision}"));
            }
            other => panic!("expected the change of revision {revision}, got {other:?}"),
        }
    }
    assert!(matches!(next(&mut inside).await, Event::Synced(s) if s.revision == CHANGES));

    // Resuming from a revision that fell out: Reset naming the oldest one left, then every
    // profile as it is and Synced.
    let fell_out = oldest - 1;
    let mut behind = watch(
        &binary,
        pb::WatchProfilesRequest {
            start_revision: fell_out,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    match next(&mut behind).await {
        Event::Reset(reset) => {
            assert_eq!(reset.revision, oldest, "{reset:?}");
            let named = format!("start_revision {fell_out}");
            assert!(reset.reason.contains(&named), "{}", reset.reason);
        }
        other => panic!("expected Reset, got {other:?}"),
    }
    let mut existing = 0;
    let synced = loop {
        match next(&mut behind).await {
            Event::Change(_) => existing += 1,
            Event::Synced(synced) => break synced.revision,
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!((existing, synced), (CHANGES, CHANGES));

    // And with fail_if_compacted, the call fails naming the oldest revision still available.
    let request = pb::WatchProfilesRequest {
        start_revision: fell_out,
        fail_if_compacted: true,
        ..Default::default()
    };
    let refused = match watch(&binary, request).await {
        Err(status) => status,
        Ok(mut stream) => stream.message().await.expect_err("refused"),
    };
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    assert!(
        refused.message().contains(&oldest.to_string()),
        "{}",
        refused.message()
    );
    binary.stop();
}
