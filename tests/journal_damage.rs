//! Journal damage through the real binary: a flipped bit refuses start-up naming file and
//! offset; the operator's `--discard-journal-from` gives records up only where start-up
//! stopped, and then under a new store id, so a watcher resuming with the old one is reset; a
//! removed newest segment is noticed; a data directory of the previous format is taken over.

use crate::common;
use crate::common::binary;

use std::path::{Path, PathBuf};

use binary::{Binary, refused};
use common::{at, profile_updated};
use profile_state::journal::codec::{self, Frame, FrameFormat};
use profile_state::pb::profile_service_client::ProfileServiceClient;
use profile_state::pb::{self, watch_profiles_response::Event};
use serde_json::json;

/// Posts `count` webhooks, the n-th for customer `c<n>`: each gets revision n.
async fn post_each(binary: &Binary, count: u32) {
    for n in 1..=count {
        let body = profile_updated(&format!("c{n}"), &at(n), json!({"total_points": n}));
        let (status, answer) = binary.post(&body).await;
        assert_eq!(
            (status, answer),
            (200, json!({"outcome": "applied", "revision": n}))
        );
    }
}

fn segments(dir: &Path) -> Vec<PathBuf> {
    binary::file_names(dir)
        .into_iter()
        .filter(|name| name.starts_with("journal-") && name.ends_with(".log"))
        .map(|name| dir.join(name))
        .collect()
}

fn flip(path: &Path, byte: usize, bit: u8) {
    let mut bytes = std::fs::read(path).unwrap();
    bytes[byte] ^= 1 << bit;
    std::fs::write(path, bytes).unwrap();
}

/// The offsets of the frames in a segment this build wrote.
fn frame_offsets(path: &Path) -> Vec<usize> {
    let bytes = std::fs::read(path).unwrap();
    let mut offsets = Vec::new();
    let mut offset = codec::HEADER_LEN;
    while let Frame::Valid { next, .. } = codec::read_frame(&bytes, offset, FrameFormat::CURRENT) {
        offsets.push(offset);
        offset = next;
    }
    offsets
}

/// The value a refusal tells the operator to pass to `--discard-journal-from`.
fn discard_point(stderr: &str) -> String {
    let (_, after) = stderr
        .split_once("--discard-journal-from ")
        .unwrap_or_else(|| panic!("no --discard-journal-from in: {stderr}"));
    after.split_whitespace().next().unwrap().to_owned()
}

/// The first revision a refusal says would be given up.
fn first_lost(stderr: &str) -> u64 {
    let (_, after) = stderr
        .split_once("give up revision ")
        .unwrap_or_else(|| panic!("no revision to give up in: {stderr}"));
    after.split_whitespace().next().unwrap().parse().unwrap()
}

async fn client(binary: &Binary) -> ProfileServiceClient<tonic::transport::Channel> {
    ProfileServiceClient::connect(format!("http://{}", binary.grpc))
        .await
        .unwrap()
}

async fn exists(binary: &Binary, customer: &str) -> bool {
    let found = client(binary)
        .await
        .get_profile(pb::GetProfileRequest {
            client_id: "2155".into(),
            customer_id: customer.into(),
            ..Default::default()
        })
        .await;
    match found {
        Ok(_) => true,
        Err(status) if status.code() == tonic::Code::NotFound => false,
        Err(status) => panic!("GetProfile {customer}: {status}"),
    }
}

/// The files named `<prefix><20 digits><suffix>` in `dir`, by number.
fn numbered(dir: &Path, prefix: &str, suffix: &str) -> Vec<(u64, PathBuf)> {
    let number = |name: &str| {
        name.strip_prefix(prefix)?
            .strip_suffix(suffix)?
            .parse()
            .ok()
    };
    binary::file_names(dir)
        .into_iter()
        .filter_map(|name| Some((number(&name)?, dir.join(name))))
        .collect()
}

/// Every customer `c1` to `c<count>` is there, with the points its webhook gave.
async fn assert_all_there(binary: &Binary, count: u32, store_id: &str) {
    let info = binary.server_info().await;
    assert_eq!(
        (info.revision, info.profile_count, info.store_id.as_str()),
        (u64::from(count), u64::from(count), store_id),
        "every acknowledged update, under the same store id"
    );
    for n in [1, count / 2, count] {
        assert!(exists(binary, &format!("c{n}")).await, "c{n}");
    }
}

/// What the passed-damage tests start from: snapshots every 20 records, a history of 100 and
/// segments of 2 KiB.
const SNAPSHOTS_AND_SEGMENTS: [&str; 6] = [
    "--snapshot-every-records",
    "20",
    "--history-events",
    "100",
    "--segment-bytes",
    "2048",
];

/// The segments, not the newest, that recovery reads after the oldest snapshot in `data`.
fn segments_read_before_the_newest(data: &Path) -> Vec<PathBuf> {
    let oldest = numbered(data, "snapshot-", ".snap")[0].0;
    let segments = numbered(data, "journal-", ".log");
    (segments.windows(2))
        .filter(|pair| pair[1].0 > oldest + 1)
        .map(|pair| pair[0].1.clone())
        .collect()
}

/// Damage that a newer snapshot covers is passed rather than refused: a flipped bit in the
/// snapshot recovery starts from (the oldest the journal continues from), in a segment before
/// the newest, and a segment removed before the newest. Every acknowledged update is there under
/// the same store id; a damaged snapshot is set aside; only the watch history before the
/// snapshot started from is gone. Adversary round 12, F1 and F2: start-up refused, "restore it
/// from a backup", and the refusal's --discard-journal-from gave up revisions the directory
/// still held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damage_a_newer_snapshot_covers_is_passed_with_every_update_kept() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    let args = SNAPSHOTS_AND_SEGMENTS;
    let binary = Binary::start(data, &args).await;
    post_each(&binary, 300).await;
    let store_id = binary.server_info().await.store_id;
    binary.stop();

    // The snapshot recovery starts from: the oldest the journal continues from.
    let snapshots = numbered(data, "snapshot-", ".snap");
    assert!(snapshots.len() >= 3, "{snapshots:?}");
    let (base, base_path) = snapshots[0].clone();
    let len = std::fs::metadata(&base_path).unwrap().len() as usize;
    flip(&base_path, len / 2, 3);
    let binary = Binary::start(data, &args).await;
    assert_all_there(&binary, 300, &store_id).await;
    assert!(binary.server_info().await.oldest_revision > base + 1);
    binary.stop();
    let mut aside = base_path.clone().into_os_string();
    aside.push(".damaged");
    assert!(Path::new(&aside).exists(), "set aside");
    assert!(!base_path.exists());

    // A record of a segment recovery reads (past the oldest snapshot), not the newest.
    let read = segments_read_before_the_newest(data);
    assert!(read.len() >= 2, "{read:?}");
    let offsets = frame_offsets(&read[0]);
    let damaged = offsets[offsets.len() / 2] + 20;
    flip(&read[0], damaged, 2);
    for _ in 0..2 {
        // Passed at every start, until compaction removes the segment.
        let binary = Binary::start(data, &args).await;
        assert_all_there(&binary, 300, &store_id).await;
        binary.stop();
    }
    flip(&read[0], damaged, 2);

    // A segment removed before the newest (the revisions jump from one segment to the next):
    // the records it held are in a newer snapshot.
    std::fs::remove_file(&read[1]).unwrap();
    let binary = Binary::start(data, &args).await;
    assert_all_there(&binary, 300, &store_id).await;
    // And the store goes on, snapshots and compaction included.
    for n in 301..=360 {
        let body = profile_updated(&format!("c{n}"), &at(n), json!({"total_points": n}));
        assert_eq!(binary.post(&body).await.0, 200);
    }
    binary.stop();
    let binary = Binary::start(data, &args).await;
    assert_all_there(&binary, 360, &store_id).await;
    binary.stop();
}

/// Damage a newer snapshot passes beside damage in the newest segment, which none does: the
/// refusal names the newest segment's, whose `--discard-journal-from` gives up only what
/// follows it, and the other is then passed. It named the first damage met, and giving up from
/// there lost every revision after it (adversary round 13).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_refusal_names_the_damage_no_snapshot_passes() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    let args = SNAPSHOTS_AND_SEGMENTS;
    let binary = Binary::start(data, &args).await;
    post_each(&binary, 300).await;
    binary.stop();
    let segments = numbered(data, "journal-", ".log");
    let read = segments_read_before_the_newest(data);
    let offsets = frame_offsets(&read[0]);
    flip(&read[0], offsets[offsets.len() / 2] + 20, 2);
    let (newest_first, newest) = segments.last().unwrap().clone();
    let offsets = frame_offsets(&newest);
    flip(&newest, offsets[offsets.len() / 2] + 20, 2);

    let output = refused(data, &args).await;
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    let point = discard_point(&stderr);
    assert!(
        point.starts_with(newest.file_name().unwrap().to_str().unwrap()),
        "{stderr}"
    );
    let lost = first_lost(&stderr);
    assert!(lost > newest_first, "{stderr}");
    let discard = ["--discard-journal-from", point.as_str()];
    let newest_snapshot = numbered(data, "snapshot-", ".snap").last().unwrap().0;
    let binary = Binary::start(data, &[&args[..], &discard].concat()).await;
    // A snapshot past the point gives back what it holds (round 42: discarding removed them).
    let kept = newest_snapshot.max(lost - 1);
    assert_eq!(binary.server_info().await.revision, kept);
    assert!(exists(&binary, &format!("c{}", lost - 1)).await);
    assert!(exists(&binary, &format!("c{kept}")).await);
    binary.stop();
}

/// Damage in the newest segment, which every start reads, is refused as before even with newer
/// snapshots about: no snapshot passes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damage_in_the_newest_segment_is_refused_whatever_snapshots_there_are() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    let args = ["--snapshot-every-records", "20", "--segment-bytes", "2048"];
    let binary = Binary::start(data, &args).await;
    post_each(&binary, 100).await;
    binary.stop();
    let newest = segments(data).pop().unwrap();
    let offsets = frame_offsets(&newest);
    assert!(offsets.len() >= 2, "{newest:?}");
    flip(&newest, offsets[0] + 20, 2);
    let output = refused(data, &args).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("damaged record"), "{stderr}");
    assert!(stderr.contains("--discard-journal-from"), "{stderr}");
}

/// Posts webhooks of customers `<prefix>0`, `<prefix>1`, ... to `binary` until it answers
/// 503, which it must within a bounded number (it checks its directory at most 50 ms apart
/// while appends only write to the open segment); then it is not ready. Returns how many it
/// acknowledged before.
async fn acknowledged_until_refused(binary: &Binary, prefix: &str) -> u32 {
    for n in 0..1000 {
        let body = profile_updated(&format!("{prefix}{n}"), &at(n), json!({"total_points": 1}));
        match binary.post(&body).await {
            (200, _) => continue,
            (503, _) => {
                assert_eq!(binary.ready().await, 503);
                let body = profile_updated("refused", &at(1), json!({"total_points": 1}));
                assert_eq!(binary.post(&body).await.0, 503, "and every one after it");
                return n;
            }
            other => panic!("{other:?}"),
        }
    }
    panic!("still acknowledging 1,000 webhooks after its directory was taken away")
}

/// Every customer `<prefix>0` to `<prefix><count - 1>` is there.
async fn all_there(binary: &Binary, prefix: &str, count: u32) {
    for n in 0..count {
        assert!(exists(binary, &format!("{prefix}{n}")).await, "{prefix}{n}");
    }
}

/// A server whose data directory is no longer at its path, or whose `LOCK` was removed, stops
/// writing there within 50 ms: its webhooks get 503 and it is not ready; what it acknowledged
/// before is kept. Before, a second server started beside it once `LOCK` was gone, both
/// answered 200, and a restart lost what they had acknowledged (the first one's clean stop cut
/// the second one's records); and a server whose directory was moved aside for a restore wrote
/// its segments and snapshots into the restored one (adversary round 12, F4 and F5).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_writes_nothing_once_its_directory_is_moved_or_its_lock_removed() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let args = ["--snapshot-every-records", "5"];
    let first = Binary::start(&data, &args).await;
    post_each(&first, 10).await;
    std::fs::remove_file(data.join("LOCK")).unwrap();
    let late = acknowledged_until_refused(&first, "late").await;
    // The second server, which the missing LOCK let in, is the only one writing.
    let second = Binary::start(&data, &args).await;
    let revision = u64::from(10 + late);
    assert_eq!(second.server_info().await.revision, revision);
    let body = profile_updated("second", &at(101), json!({"total_points": 1}));
    assert_eq!(
        second.post(&body).await,
        (200, json!({"outcome": "applied", "revision": revision + 1}))
    );
    assert_eq!(first.post(&body).await.0, 503);
    first.stop();
    second.stop();
    let binary = Binary::start(&data, &args).await;
    let store_id = binary.server_info().await.store_id;
    assert_eq!(binary.server_info().await.revision, revision + 1);
    assert!(exists(&binary, "second").await);
    all_there(&binary, "late", late).await;

    // Moved aside, and a new store made in its place (as a restore would).
    let aside = dir.path().join("data.old");
    std::fs::rename(&data, &aside).unwrap();
    let replacement = Binary::start(&data, &[]).await;
    let moved = acknowledged_until_refused(&binary, "moved").await;
    binary.stop();
    let replaced = replacement.server_info().await;
    assert_eq!((replaced.revision, replaced.profile_count), (0, 0));
    replacement.stop();
    assert_eq!(
        numbered(&data, "journal-", ".log").len(),
        1,
        "no segment of the old store in the new directory"
    );
    assert!(numbered(&data, "snapshot-", ".snap").is_empty());
    let binary = Binary::start(&data, &[]).await;
    let info = binary.server_info().await;
    assert_eq!((info.revision, info.profile_count), (0, 0));
    assert_ne!(info.store_id, store_id);
    binary.stop();
    // The moved directory holds everything acknowledged, nothing refused.
    let binary = Binary::start(&aside, &args).await;
    let info = binary.server_info().await;
    let revision = revision + 1 + u64::from(moved);
    assert_eq!((info.revision, info.store_id), (revision, store_id));
    all_there(&binary, "moved", moved).await;
    assert!(!exists(&binary, "refused").await);
    binary.stop();
}

/// Issue 10, bug 2, and what an operator can do about damage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damage_refuses_start_up_until_the_operator_gives_records_up_under_a_new_store_id() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    // The defaults, as in the issue: one segment, so the damage is in the newest one.
    let args: [&str; 0] = [];
    let binary = Binary::start(data, &args).await;
    post_each(&binary, 300).await;
    let old_id = binary.server_info().await.store_id;
    binary.stop();
    assert_eq!(segments(data).len(), 1);

    // The bit: the high byte of the first record's length.
    let first = data.join("journal-00000000000000000001.log");
    flip(&first, 15, 7);
    let output = refused(data, &args).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    for expected in [
        &format!("{}: damaged record at offset 12", first.display()),
        "--discard-journal-from journal-00000000000000000001.log:12",
    ] {
        assert!(stderr.contains(expected), "{expected:?} not in {stderr}");
    }
    // Refusing changed nothing: undone, the store is all there, under its id.
    flip(&first, 15, 7);
    let binary = Binary::start(data, &args).await;
    let info = binary.server_info().await;
    assert_eq!(
        (info.revision, info.store_id.as_str()),
        (300, old_id.as_str())
    );
    binary.stop();

    // A payload bit in the middle of the journal: acknowledged, and not at the end.
    let newest = segments(data).pop().unwrap();
    let offsets = frame_offsets(&newest);
    let middle = offsets[offsets.len() / 2];
    flip(&newest, middle + 20, 2);
    let output = refused(data, &args).await;
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(
        stderr.contains(&format!("damaged record at offset {middle}")),
        "{stderr}"
    );
    let point = discard_point(&stderr);
    let lost = first_lost(&stderr);
    let newest_first: u64 = newest.file_name().unwrap().to_str().unwrap()[8..28]
        .parse()
        .unwrap();
    assert!((newest_first + 1..300).contains(&lost), "{stderr}");

    // A point that is not where start-up stopped gives nothing up.
    let wrong = [
        "--discard-journal-from",
        "journal-00000000000000000001.log:12",
    ];
    let output = refused(data, &[&args[..], &wrong].concat()).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("does not name where start-up stopped, so nothing was given up"),
        "{stderr}"
    );

    // The point the refusal printed: everything before it, under a new store id.
    let discard = ["--discard-journal-from", point.as_str()];
    let binary = Binary::start(data, &[&args[..], &discard].concat()).await;
    let info = binary.server_info().await;
    assert_ne!(info.store_id, old_id, "a new store id");
    assert_eq!(info.revision, lost - 1);
    assert!(exists(&binary, &format!("c{}", lost - 1)).await);
    assert!(!exists(&binary, &format!("c{lost}")).await);

    // A watcher that saw revision 299 of the old store resumes: it is reset, not fed the new
    // store's revisions as if they were the old ones.
    let mut stream = client(&binary)
        .await
        .watch_profiles(pb::WatchProfilesRequest {
            start_revision: 300,
            store_id: old_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    match stream.message().await.unwrap().unwrap().event {
        Some(Event::Reset(reset)) => {
            assert_eq!(reset.store_id, info.store_id);
            assert!(reset.reason.contains(&old_id), "{}", reset.reason);
        }
        other => panic!("expected Reset, got {other:?}"),
    }
    // One that resumes within the new store is not.
    let mut stream = client(&binary)
        .await
        .watch_profiles(pb::WatchProfilesRequest {
            start_revision: lost - 1,
            store_id: info.store_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    match stream.message().await.unwrap().unwrap().event {
        Some(Event::Change(change)) => assert_eq!(change.revision, lost - 1),
        other => panic!("expected the change {}, got {other:?}", lost - 1),
    }
    drop(stream);

    // Revisions go on from the first one lost, under the new id.
    let body = profile_updated("after", &at(1000), json!({"total_points": 1}));
    assert_eq!(
        binary.post(&body).await,
        (200, json!({"outcome": "applied", "revision": lost}))
    );
    binary.stop();

    // The flag, left set, gives nothing more up.
    let binary = Binary::start(data, &[&args[..], &discard].concat()).await;
    let again = binary.server_info().await;
    assert_eq!(
        (again.revision, again.store_id.as_str()),
        (lost, info.store_id.as_str())
    );
    binary.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_newest_segment_is_noticed_and_giving_it_up_renews_the_store_id() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    let args = ["--segment-bytes", "2048"];
    let binary = Binary::start(data, &args).await;
    post_each(&binary, 100).await;
    let old_id = binary.server_info().await.store_id;
    binary.stop();

    let newest = segments(data).pop().unwrap();
    std::fs::remove_file(&newest).unwrap();
    let output = refused(data, &args).await;
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(
        stderr.contains(&format!("{} is missing", newest.display())),
        "{stderr}"
    );
    let name = newest.file_name().unwrap().to_str().unwrap();
    assert_eq!(discard_point(&stderr), format!("{name}:0"));

    let discard = ["--discard-journal-from", &format!("{name}:0")];
    let binary = Binary::start(data, &[&args[..], &discard].concat()).await;
    // Nothing was there to remove: the line has no `removed` field, not an empty one (which
    // read as a value left out: found by a first-user review).
    let gave_up = binary
        .seen
        .iter()
        .find(|line| {
            line["message"]
                .as_str()
                .is_some_and(|message| message.starts_with("gave up the journal"))
        })
        .unwrap_or_else(|| panic!("no line about giving up: {:?}", binary.seen));
    assert_eq!(gave_up["level"], "WARN", "{gave_up}");
    assert!(gave_up.get("removed").is_none(), "{gave_up}");
    let info = binary.server_info().await;
    assert_ne!(info.store_id, old_id);
    assert_eq!(info.revision, first_lost(&stderr) - 1);
    assert!(info.revision < 100);
    binary.stop();
}

/// `JOURNAL_HEAD` removed (as the refusal of a damaged one allows) or lost: recovery cannot check
/// the journal's end, so the store gets a new id. With the newest segment gone too, the
/// revisions it held were reused under the old id, and a watcher that had seen them resumed
/// past the new ones (found by an adversarial run).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_journal_head_the_store_gets_a_new_id_so_no_revision_is_reused_under_the_old() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    let args = ["--segment-bytes", "2048"];
    let binary = Binary::start(data, &args).await;
    post_each(&binary, 100).await;
    let first_id = binary.server_info().await.store_id;
    binary.stop();

    // The head alone: everything is recovered, under a new id.
    std::fs::remove_file(data.join("JOURNAL_HEAD")).unwrap();
    let binary = Binary::start(data, &args).await;
    let info = binary.server_info().await;
    assert_eq!(info.revision, 100);
    assert_ne!(info.store_id, first_id);
    let second_id = info.store_id;
    binary.stop();

    // The head written again by that start is honoured: the id stays.
    let binary = Binary::start(data, &args).await;
    assert_eq!(binary.server_info().await.store_id, second_id);
    binary.stop();

    // The head and the newest segment (two faults): fewer revisions, under yet another id.
    std::fs::remove_file(data.join("JOURNAL_HEAD")).unwrap();
    std::fs::remove_file(segments(data).pop().unwrap()).unwrap();
    let binary = Binary::start(data, &args).await;
    let info = binary.server_info().await;
    assert!(info.revision < 100, "{info:?}");
    assert!(
        info.store_id != first_id && info.store_id != second_id,
        "{info:?}"
    );
    binary.stop();
}

/// Production data directories were written in format 1: a newer build takes them over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_directory_of_format_1_is_recovered_and_continued() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/format-1");
    for name in binary::file_names(&fixture) {
        if !name.ends_with(".py") {
            std::fs::copy(fixture.join(&name), data.join(&name)).unwrap();
        }
    }
    let store_id = std::fs::read_to_string(data.join("STORE_ID")).unwrap();
    let binary = Binary::start(data, &[]).await;
    let info = binary.server_info().await;
    assert_eq!(
        (info.revision, info.profile_count, info.store_id.as_str()),
        (60, 7, store_id.trim())
    );
    // Replayed from format 1 records after the format 1 snapshot: the history is back.
    assert_eq!(info.oldest_revision, 41);
    let body = profile_updated("c1", &at(86_000), json!({"total_points": 1}));
    assert_eq!(
        binary.post(&body).await,
        (200, json!({"outcome": "applied", "revision": 61}))
    );
    binary.stop();

    let new = std::fs::read(data.join("journal-00000000000000000061.log")).unwrap();
    assert_eq!(
        codec::check_header(&new, codec::SEGMENT_MAGIC),
        Ok(FrameFormat::V2),
        "the records written now are in format 2"
    );
    let binary = Binary::start(data, &[]).await;
    assert_eq!(binary.server_info().await.revision, 61);
    binary.stop();
}

/// The cut-journal tests' flags: a snapshot every 50 records.
const CUT_BEHIND_SNAPSHOTS: [&str; 2] = ["--snapshot-every-records", "50"];

/// A service in `data` given 120 webhooks (`c1` to `c120`), then SIGKILLed (no clean-shutdown
/// mark, so its end may be torn); its store id.
async fn killed_after_120(data: &Path) -> String {
    let binary = Binary::start(data, &CUT_BEHIND_SNAPSHOTS).await;
    post_each(&binary, 120).await;
    let id = binary.server_info().await.store_id;
    drop(binary);
    id
}

/// Cuts the newest segment of `data` five bytes into its 31st frame: the journal ends at 30.
fn cut_in_frame_31(data: &Path) {
    let segment = segments(data).pop().unwrap();
    let cut = frame_offsets(&segment)[30] + 5;
    let file = std::fs::File::options().write(true).open(&segment).unwrap();
    file.set_len(cut as u64).unwrap();
}

/// A journal cut back behind a snapshot (the newest segment's end lost after an
/// unclean stop, which recovery takes for a torn write): the snapshot proves that the part cut
/// had been synced, so acknowledged. Start-up starts from that snapshot, keeping every update
/// up to it, under a new store id (revisions past it may have been acknowledged too, and will
/// be assigned again), and the store goes on from there, through later starts. It served the
/// cut journal under the same id and set the snapshot aside: acknowledged updates gone that
/// the snapshot held, and their revisions assigned to other changes under the id watchers
/// resume with (adversarial round 41a, F1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_journal_cut_back_behind_a_snapshot_starts_from_it_under_a_new_store_id() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    let args = CUT_BEHIND_SNAPSHOTS;
    let first_id = killed_after_120(data).await;
    // Taken in the background once 100 records are due: as of revision 100 or a little later.
    let snapshot = numbered(data, "snapshot-", ".snap").last().unwrap().0;
    assert!((100..120).contains(&snapshot), "{snapshot}");
    cut_in_frame_31(data);

    let binary = Binary::start(data, &args).await;
    let info = binary.server_info().await;
    assert_eq!((info.revision, info.profile_count), (snapshot, snapshot));
    assert_ne!(
        info.store_id, first_id,
        "revisions past the snapshot will be assigned again"
    );
    for n in [1, 31, snapshot] {
        assert!(exists(&binary, &format!("c{n}")).await, "c{n}");
    }
    let body = profile_updated("new", &at(1001), json!({"total_points": 1}));
    assert_eq!(
        binary.post(&body).await,
        (200, json!({"outcome": "applied", "revision": snapshot + 1}))
    );
    let second_id = info.store_id;
    drop(binary);

    // Later starts, unclean and clean, recover the same store under the same id.
    for _ in 0..2 {
        let binary = Binary::start(data, &args).await;
        let info = binary.server_info().await;
        assert_eq!(
            (info.revision, info.store_id.as_str()),
            (snapshot + 1, second_id.as_str())
        );
        assert!(exists(&binary, "new").await && exists(&binary, "c50").await);
        binary.stop();
    }
}

/// A refusal's advice is `profile-state restore`, which gives the store a new id, never
/// "restore the file from a backup": a copy of the segment put back by hand, older than the
/// damage, rolled the store back under the same id, and the revisions after the copy were
/// assigned again to other changes that resuming watchers took for the ones they had missed
/// (adversarial round 41a, F5). A copy started without its STORE_ID, as the advice says, gets a
/// new id, with a WARN.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_refusal_advises_a_restore_and_a_copy_without_its_store_id_gets_a_new_one() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    let binary = Binary::start(data, &[]).await;
    post_each(&binary, 10).await;
    let first_id = binary.server_info().await.store_id;
    binary.stop();
    let segment = segments(data).pop().unwrap();
    let copy = std::fs::read(&segment).unwrap();
    let binary = Binary::start(data, &[]).await;
    for n in 11..=20 {
        let body = profile_updated(&format!("c{n}"), &at(n), json!({"total_points": n}));
        assert_eq!(binary.post(&body).await.0, 200);
    }
    drop(binary);
    let offsets = frame_offsets(&segment);
    flip(&segment, offsets[15] + 20, 2);
    let stderr = String::from_utf8_lossy(&refused(data, &[]).await.stderr).into_owned();
    assert!(stderr.contains("with `profile-state restore`"), "{stderr}");
    assert!(!stderr.contains("restore the file"), "{stderr}");

    // The copy put back, its STORE_ID removed as the advice says: a new id, said.
    std::fs::write(&segment, copy).unwrap();
    std::fs::remove_file(data.join("STORE_ID")).unwrap();
    let binary = Binary::start(data, &[]).await;
    let info = binary.server_info().await;
    assert_eq!(info.revision, 10);
    assert_ne!(info.store_id, first_id);
    let lines = binary.stop_collecting();
    assert!(
        lines.iter().any(|line| line["message"]
            .as_str()
            .is_some_and(|message| message.starts_with("STORE_ID is missing"))),
        "{lines:?}"
    );
}

/// Two snapshots past a journal cut back behind them, the newest damaged: start-up sets that one
/// aside and starts from the older, under a new store id. Setting every snapshot past the end
/// aside when the newest could not be loaded lost what the older, intact one held
/// (adversarial round 42).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_journal_cut_behind_a_damaged_snapshot_starts_from_an_older_one_past_it() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    let args = CUT_BEHIND_SNAPSHOTS;
    let first_id = killed_after_120(data).await;
    let snapshots = numbered(data, "snapshot-", ".snap");
    let [.., (older, _), (_, newest)] = snapshots.as_slice() else {
        panic!("{snapshots:?}");
    };
    let older = *older;
    assert!(older >= 50, "{snapshots:?}");
    let len = std::fs::metadata(newest).unwrap().len() as usize;
    flip(newest, len / 2, 3);
    cut_in_frame_31(data);

    let binary = Binary::start(data, &args).await;
    let info = binary.server_info().await;
    assert_eq!((info.revision, info.profile_count), (older, older));
    assert_ne!(info.store_id, first_id);
    assert!(exists(&binary, &format!("c{older}")).await);
    binary.stop();
    let mut aside = newest.clone().into_os_string();
    aside.push(".damaged");
    assert!(Path::new(&aside).exists(), "the damaged one set aside");
}
