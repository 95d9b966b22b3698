//! The store id clients are given for a stream, from its metadata and the incarnation a stream
//! info describes.
//!
//! The metadata holds the store id and a record of the incarnation it is the id of
//! ([`STORE_CREATED_KEY`], [`STORE_RAFT_GROUP_KEY`]). A stream restored from a backup, or
//! created again with its definition, keeps the metadata, yet its revisions from the backup's
//! point on mean other changes: with the same id, a watcher resuming on it was handed them with
//! no Reset, and kept profiles the stream no longer had (found by an adversarial run). So:
//! - on the incarnation the record is of (`Incarnation::is`), the metadata's id;
//! - on another, an id derived from the metadata's and the incarnation's, alike on every
//!   replica, recorded in the metadata with the incarnation by the first replica to start;
//! - without a record (a stream of a release before it), the metadata's id, and this
//!   incarnation recorded.
//!
//! The record is written only then, never when one of its marks merely drifted: a stream
//! update carries the whole configuration, and replicas that rewrote the record at each drift
//! undid operators' changes made a moment before, a scale-up back to one replica included (a
//! stream leader's answer lags a change being applied; found by an adversarial run). Running
//! replicas follow the drift themselves (`super::stream`). So a record both of whose marks
//! drifted since it was written (a restored stream whose leader moved, later scaled down to one
//! replica and up again) reads as another incarnation at the next start: every replica comes
//! back under one new id, once.
//!
//! It decides; `super::stream` reads the stream info and writes the metadata.

use std::collections::HashMap;

use super::Incarnation;

/// Stream metadata key holding the cluster-wide store id.
pub(super) const STORE_ID_KEY: &str = "profile_state_store_id";
/// Stream metadata key holding when the server created the incarnation of the stream its store
/// id is of.
const STORE_CREATED_KEY: &str = "profile_state_store_created";
/// Stream metadata key holding the Raft group of that incarnation (absent on a single server,
/// for a one-replica stream, and on streams of releases before it was recorded).
const STORE_RAFT_GROUP_KEY: &str = "profile_state_store_raft_group";

/// What the metadata and a stream info give clients.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Served {
    /// The store id to serve.
    pub store_id: String,
    /// Whether the metadata held a record of an incarnation (if not, the store id is the same
    /// for every incarnation until one is recorded).
    pub recorded_before: bool,
    /// The stream is another incarnation than the record's: the id is derived.
    pub other_incarnation: bool,
    /// The record to write (this incarnation, the id served): where there is none, or it is
    /// of another incarnation; never where one of its marks merely drifted (see the module).
    pub record: Option<Incarnation>,
}

/// The store id the stream of `metadata` serves on incarnation `now`.
pub(super) fn served(metadata: &HashMap<String, String>, now: &Incarnation) -> Served {
    let (metadata_id, recorded) = record_of(metadata);
    match recorded {
        None => Served {
            store_id: metadata_id,
            recorded_before: false,
            other_incarnation: false,
            record: Some(now.clone()),
        },
        Some(recorded) if recorded.is(now) => Served {
            store_id: metadata_id,
            recorded_before: true,
            other_incarnation: false,
            record: None,
        },
        Some(_) => Served {
            store_id: derived(&metadata_id, now),
            recorded_before: true,
            other_incarnation: true,
            record: Some(now.clone()),
        },
    }
}

/// Writes into `metadata` that `store_id` is the id of incarnation `now`.
pub(super) fn record(metadata: &mut HashMap<String, String>, store_id: &str, now: &Incarnation) {
    metadata.insert(STORE_ID_KEY.into(), store_id.into());
    match &now.created {
        Some(created) => metadata.insert(STORE_CREATED_KEY.into(), created.to_string()),
        None => metadata.remove(STORE_CREATED_KEY),
    };
    match &now.raft_group {
        Some(group) => metadata.insert(STORE_RAFT_GROUP_KEY.into(), group.clone()),
        None => metadata.remove(STORE_RAFT_GROUP_KEY),
    };
}

/// The metadata's store id and its record of the incarnation it is the id of: what a running
/// replica compares, poll after poll, to see whether a replica started since, a restore or a
/// re-creation decided another store for the stream.
pub(super) fn record_of(metadata: &HashMap<String, String>) -> (String, Option<Incarnation>) {
    let recorded = Incarnation::recorded(
        metadata.get(STORE_CREATED_KEY).map(String::as_str),
        metadata.get(STORE_RAFT_GROUP_KEY).map(String::as_str),
    );
    (
        metadata.get(STORE_ID_KEY).cloned().unwrap_or_default(),
        recorded,
    )
}

/// What the metadata says of the incarnation its store id is of, for messages.
pub(super) fn recorded_text(metadata: &HashMap<String, String>) -> String {
    let (_, recorded) = record_of(metadata);
    recorded.map_or_else(|| "none".into(), |recorded| recorded.to_string())
}

/// The store id of incarnation `now` of a stream whose metadata names `store_id`: 32 hex
/// digits, as [`crate::data_dir::new_store_id`] makes.
fn derived(store_id: &str, now: &Incarnation) -> String {
    use sha1::Digest as _;
    let digest = sha1::Sha1::new()
        .chain_update(store_id.as_bytes())
        .chain_update(b"@")
        .chain_update(now.derivation_key().as_bytes())
        .finalize();
    digest[..16]
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn incarnation(created: &str, raft_group: Option<&str>) -> Incarnation {
        Incarnation::recorded(Some(created), raft_group).unwrap()
    }

    const T1: &str = "2026-12-05T07:58:43.936846386Z";
    const T2: &str = "2026-12-05T07:58:44.006391025Z";
    const T3: &str = "2026-12-05T09:00:00Z";

    fn metadata(record: Option<&Incarnation>) -> HashMap<String, String> {
        let mut metadata = HashMap::from([(STORE_ID_KEY.to_string(), "id".to_string())]);
        if let Some(record) = record {
            super::record(&mut metadata, "id", record);
        }
        metadata
    }

    /// A restored stream's leader moves (another creation time), or it is scaled to one
    /// replica (no group): one mark drifted, and the record still gives its id. Both drifted
    /// (then scaled up again: a new group) reads as another incarnation: running replicas
    /// follow each drift themselves, and the record is not rewritten (see the module).
    #[test]
    fn a_record_one_drift_behind_gives_its_id_and_two_behind_another() {
        let metadata = metadata(Some(&incarnation(T2, Some("S-R3F-a"))));
        for now in [incarnation(T1, Some("S-R3F-a")), incarnation(T2, None)] {
            let served = served(&metadata, &now);
            assert_eq!(served.store_id, "id");
            assert!(served.recorded_before && !served.other_incarnation);
            assert_eq!(served.record, None, "not rewritten on a drift");
        }
        let exact = served(&metadata, &incarnation(T2, Some("S-R3F-a")));
        assert_eq!((exact.store_id.as_str(), exact.record), ("id", None));
        let both = served(&metadata, &incarnation(T1, Some("S-R3F-b")));
        assert!(both.other_incarnation);
        assert_ne!(both.store_id, "id");
    }

    #[test]
    fn another_incarnation_gets_an_id_derived_from_its_group_the_same_on_every_server() {
        let metadata = metadata(Some(&incarnation(T1, Some("S-R3F-a"))));
        let on_one = served(&metadata, &incarnation(T3, Some("S-R3F-new")));
        let on_other = served(&metadata, &incarnation(T2, Some("S-R3F-new")));
        assert!(on_one.other_incarnation);
        assert_ne!(on_one.store_id, "id");
        assert_eq!(on_one.store_id, on_other.store_id);
        assert_eq!(on_one.store_id.len(), 32);
        // Restored again: another group, another id.
        let again = served(&metadata, &incarnation(T3, Some("S-R3F-newer")));
        assert_ne!(again.store_id, on_one.store_id);
    }

    #[test]
    fn a_stream_without_a_record_keeps_its_id_and_gets_one() {
        let now = incarnation(T1, Some("S-R3F-a"));
        let served = served(&metadata(None), &now);
        assert_eq!(
            served,
            Served {
                store_id: "id".into(),
                recorded_before: false,
                other_incarnation: false,
                record: Some(now),
            }
        );
    }

    #[test]
    fn a_garbled_time_in_the_record_leaves_its_group_to_tell_the_stream() {
        let mut metadata = metadata(Some(&incarnation(T1, Some("S-R3F-a"))));
        metadata.insert(STORE_CREATED_KEY.into(), "garbage".into());
        let served = served(&metadata, &incarnation(T1, Some("S-R3F-a")));
        assert_eq!(served.store_id, "id");
        assert!(!served.other_incarnation);
        assert_eq!(served.record, None, "not rewritten");
    }
}
