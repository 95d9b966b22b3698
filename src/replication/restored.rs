//! Start-up on a stream restored from a backup (`nats stream backup`, `nats stream restore`):
//! another incarnation of the stream (the server gives it a new creation time) holding the
//! earlier one's messages at the same sequences. Purged below a snapshot before the backup,
//! it cannot be replayed from its start, and its own incarnation has published no snapshot;
//! the earlier incarnation's snapshots cover it, and each records the digest of the stream's
//! message it was taken after (`UpdateStream::message_digest`: message id, stored time,
//! payload). The stream continues each of them whose sequence it holds, with the same message
//! there; start-up tries those newest first.
//!
//! What it decides: which earlier snapshots the stream continues, if any, and why each other
//! one was refused (with what to restore when every one is newer than the stream). It does
//! not download or load them, nor pass over one that fails to (`startup`), and it proves no
//! more than that one message is the same: a backup restores every message before it too, and
//! a stream created again and fed other messages holds another message there (another id,
//! another stored time).

use std::fmt;

use crate::jetstream::{Bounds, EarlierSnapshot, JetStreamError, SnapshotBucket, UpdateStream};

/// Why a snapshot of an earlier incarnation cannot start the stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Refusal {
    /// It records no digest of the stream's message: published by an earlier release, or once
    /// the stream no longer held that message.
    NoDigest,
    /// The stream does not hold its sequence (purged below it, or it ends before it).
    Outside { first: u64, last: u64 },
    /// The stream held its sequence a moment ago, and holds no message there now (purged).
    NoMessage,
    /// The stream's message at its sequence is not the one it was taken after.
    Differs,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::NoDigest => f.write_str(
                "no digest of the stream's message at its sequence (published by an earlier \
                 release, or once the stream no longer held that message)",
            ),
            Refusal::Outside { first, last } if first > last => {
                write!(
                    f,
                    "the stream holds no message (it starts at sequence {first})"
                )
            }
            Refusal::Outside { first, last } => {
                write!(f, "outside the stream's sequences {first}..={last}")
            }
            Refusal::NoMessage => f.write_str("the stream no longer holds its sequence"),
            Refusal::Differs => f.write_str(
                "the stream's message at its sequence differs from the one it was taken after",
            ),
        }
    }
}

/// What the bucket offers a stream that none of its own snapshots can start.
#[derive(Debug, Default)]
pub(super) struct Earlier {
    /// Each snapshot of an earlier incarnation the stream continues, newest first: start-up
    /// tries them in turn, as a damaged one is never replaced (the stream's own replicas
    /// publish none until one of them has started).
    pub(super) continued: Vec<EarlierSnapshot>,
    /// Each other one, newest first, and why it was refused.
    pub(super) refused: Vec<(EarlierSnapshot, Refusal)>,
}

/// The snapshots of an earlier incarnation of `stream` (holding `bounds`) that the stream
/// continues: their sequence within the stream, and the stream's message there the one they
/// were taken after; and every other one, with why not. One read of the stream per snapshot
/// compared.
pub(super) async fn earlier_start(
    stream: &UpdateStream,
    bucket: &SnapshotBucket,
    bounds: Bounds,
) -> Result<Earlier, JetStreamError> {
    let mut earlier = Earlier::default();
    for snapshot in bucket.of_earlier_streams().await? {
        let sequence = snapshot.snapshot.stream_sequence;
        let refusal = match &snapshot.message_digest {
            None => Refusal::NoDigest,
            Some(_) if sequence < bounds.first || sequence > bounds.last => Refusal::Outside {
                first: bounds.first,
                last: bounds.last,
            },
            Some(recorded) => match stream.message_digest(sequence).await? {
                None => Refusal::NoMessage,
                Some(digest) if digest == *recorded => {
                    earlier.continued.push(snapshot);
                    continue;
                }
                Some(_) => Refusal::Differs,
            },
        };
        earlier.refused.push((snapshot, refusal));
    }
    Ok(earlier)
}

/// Why the bucket `bucket` holds no snapshot this stream (`incarnation`) can start from:
/// it is empty, or each of its earlier incarnation's snapshots, and why it was refused; when
/// every one is newer than the stream, what to restore ([`newer_than_the_stream`]).
pub(super) fn refusals(
    bucket: &str,
    incarnation: &str,
    refused: &[(EarlierSnapshot, Refusal)],
) -> String {
    if refused.is_empty() {
        return format!("bucket {bucket} is empty");
    }
    let mut text = format!(
        "bucket {bucket} holds {} snapshot(s) of an earlier incarnation of the stream, none of \
         which this one ({incarnation}) continues: {}",
        refused.len(),
        each(refused)
    );
    if let Some(last) = newer_than_the_stream(refused) {
        text.push_str(&format!(
            "; every one is as of a sequence past the stream's last ({last}): if the stream was \
             restored from a backup, they were published after that backup was taken, and the \
             bucket's own backup taken with it holds the snapshots it continues: delete stream \
             OBJ_{bucket} (`nats stream rm -f OBJ_{bucket}`), restore that backup (`nats stream \
             restore`) and start again"
        ));
    }
    text
}

/// Why none of the snapshots of an earlier incarnation that this stream (`incarnation`)
/// continues could start it: each one tried, newest first, with its failure (damaged, a
/// download that stalled, a file that does not load), then each other one in the bucket
/// `bucket` with why it was refused. An operator told of one failure alone would delete
/// that snapshot and meet the next.
pub(super) fn failures(
    bucket: &str,
    incarnation: &str,
    failed: &[(EarlierSnapshot, String)],
    refused: &[(EarlierSnapshot, Refusal)],
) -> String {
    let mut text = format!(
        "bucket {bucket} holds {} snapshot(s) of an earlier incarnation of the stream that this \
         one ({incarnation}) continues, and none of them could be used: {}",
        failed.len(),
        each(failed)
    );
    if !refused.is_empty() {
        text.push_str(&format!(
            "; it holds {} other(s), which this one does not continue: {}",
            refused.len(),
            each(refused)
        ));
    }
    text
}

/// Each snapshot named, with the stream it was taken from, its sequence, and `why`.
fn each(snapshots: &[(EarlierSnapshot, impl fmt::Display)]) -> String {
    let each: Vec<String> = snapshots
        .iter()
        .map(|(earlier, why)| {
            format!(
                "{} (stream created {}, as of sequence {}): {why}",
                earlier.snapshot.name, earlier.stream_created, earlier.snapshot.stream_sequence
            )
        })
        .collect();
    each.join("; ")
}

/// The stream's last sequence, when every refused snapshot is as of a sequence past it: a
/// stream restored from a backup beside the live bucket, whose replicas published newer
/// snapshots after the backup and retired every one it covers (the bucket keeps two). The
/// bucket's backup taken with the stream's holds those; the live bucket no longer does.
fn newer_than_the_stream(refused: &[(EarlierSnapshot, Refusal)]) -> Option<u64> {
    let mut stream_last = None;
    for (earlier, refusal) in refused {
        match refusal {
            Refusal::Outside { last, .. } if earlier.snapshot.stream_sequence > *last => {
                stream_last = Some(*last);
            }
            _ => return None,
        }
    }
    stream_last
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jetstream::SnapshotInfo;

    fn earlier(sequence: u64, digest: Option<&str>) -> EarlierSnapshot {
        EarlierSnapshot {
            snapshot: SnapshotInfo {
                name: format!("snapshot-{sequence:020}"),
                revision: sequence * 2,
                stream_sequence: sequence,
                size: 10,
            },
            stream_created: "2025-01-01T00:00:00.000000001Z".into(),
            message_digest: digest.map(str::to_owned),
        }
    }

    /// An operator told only "cannot use" looked for the wrong cause: each snapshot is named
    /// with its own reason.
    #[test]
    fn a_refusal_names_each_snapshot_and_its_reason() {
        assert_eq!(
            refusals("S_SNAPSHOTS", "created now", &[]),
            "bucket S_SNAPSHOTS is empty"
        );
        let refused = [
            (earlier(60, Some("d")), Refusal::Differs),
            (earlier(50, None), Refusal::NoDigest),
            (
                earlier(40, Some("d")),
                Refusal::Outside {
                    first: 41,
                    last: 70,
                },
            ),
            (
                earlier(30, Some("d")),
                Refusal::Outside {
                    first: 41,
                    last: 40,
                },
            ),
            (earlier(45, Some("d")), Refusal::NoMessage),
        ];
        let text = refusals("S_SNAPSHOTS", "created now", &refused);
        assert!(
            text.starts_with(
                "bucket S_SNAPSHOTS holds 5 snapshot(s) of an earlier incarnation of the stream, \
                 none of which this one (created now) continues: snapshot-00000000000000000060 \
                 (stream created 2025-01-01T00:00:00.000000001Z, as of sequence 60): the \
                 stream's message at its sequence differs from the one it was taken after; "
            ),
            "{text}"
        );
        for reason in [
            "as of sequence 50): no digest of the stream's message at its sequence (published \
             by an earlier release, or once the stream no longer held that message)",
            "as of sequence 40): outside the stream's sequences 41..=70",
            "as of sequence 30): the stream holds no message (it starts at sequence 41)",
            "as of sequence 45): the stream no longer holds its sequence",
        ] {
            assert!(text.contains(reason), "{reason}: {text}");
        }
        assert!(!text.contains("delete stream"), "{text}");
    }

    /// Every snapshot the stream continues failed: start-up's error named only the newest
    /// when it gave up on it, and an operator who deleted it met the next. Each one tried is
    /// named with its failure, then each refused one with its reason.
    #[test]
    fn when_every_continued_snapshot_fails_each_is_named_with_its_failure() {
        let failed = [
            (earlier(60, Some("d")), "wrong digest".to_string()),
            (earlier(40, Some("d")), "no byte arrived for 6s".to_string()),
        ];
        let text = failures("S_SNAPSHOTS", "created now", &failed, &[]);
        assert_eq!(
            text,
            "bucket S_SNAPSHOTS holds 2 snapshot(s) of an earlier incarnation of the stream that \
             this one (created now) continues, and none of them could be used: \
             snapshot-00000000000000000060 (stream created 2025-01-01T00:00:00.000000001Z, as \
             of sequence 60): wrong digest; snapshot-00000000000000000040 (stream created \
             2025-01-01T00:00:00.000000001Z, as of sequence 40): no byte arrived for 6s"
        );
        let refused = [(earlier(80, Some("d")), Refusal::Differs)];
        let text = failures("S_SNAPSHOTS", "created now", &failed[..1], &refused);
        assert!(
            text.ends_with(
                "as of sequence 60): wrong digest; it holds 1 other(s), which this one does not \
                 continue: snapshot-00000000000000000080 (stream created \
                 2025-01-01T00:00:00.000000001Z, as of sequence 80): the stream's message at \
                 its sequence differs from the one it was taken after"
            ),
            "{text}"
        );
    }

    /// A stream restored from a backup beside the live bucket, whose replicas published two
    /// snapshots after the backup, was refused with each named "outside the stream's
    /// sequences", which does not say what to do: the bucket's backup taken with the stream's
    /// holds the snapshots it continues. Said only when every snapshot is past the stream's
    /// last: one it was purged past, or another message, is another story.
    #[test]
    fn snapshots_all_newer_than_the_stream_send_the_operator_to_the_buckets_backup() {
        let newer = |sequence| {
            let outside = Refusal::Outside {
                first: 36,
                last: 60,
            };
            (earlier(sequence, Some("d")), outside)
        };
        let text = refusals("S_SNAPSHOTS", "created now", &[newer(100), newer(80)]);
        assert!(
            text.ends_with(
                "as of sequence 80): outside the stream's sequences 36..=60; every one is as of \
                 a sequence past the stream's last (60): if the stream was restored from a \
                 backup, they were published after that backup was taken, and the bucket's own \
                 backup taken with it holds the snapshots it continues: delete stream \
                 OBJ_S_SNAPSHOTS (`nats stream rm -f OBJ_S_SNAPSHOTS`), restore that backup \
                 (`nats stream restore`) and start again"
            ),
            "{text}"
        );
        let below = (
            earlier(30, Some("d")),
            Refusal::Outside {
                first: 36,
                last: 60,
            },
        );
        let differs = (earlier(50, Some("d")), Refusal::Differs);
        for others in [below, differs] {
            let text = refusals("S_SNAPSHOTS", "created now", &[newer(100), others]);
            assert!(!text.contains("delete stream"), "{text}");
        }
    }
}
