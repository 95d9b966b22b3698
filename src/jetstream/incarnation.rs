//! Which incarnation of a stream name a stream is: the one a replica followed, or another (the
//! stream was deleted and created again, or restored from a backup, since).
//!
//! NATS gives each incarnation two marks: when it was created, and, on a cluster, the name of
//! its Raft group. A new incarnation is a new stream assignment, and both change. Neither alone
//! is a reliable identity:
//! - a restored stream's creation time is the restoring server's own clock on that server, and
//!   the assignment's (some milliseconds earlier) on the others, until it restarts (nats-server
//!   2.15). Replicas that went by it took the first change of stream leader after a restore for
//!   the stream replaced: every one stopped, and came back under another store id (found by an
//!   adversarial run);
//! - a one-replica stream's group is renamed when it is scaled up.
//!
//! So two observations are of the same incarnation when either mark is the same, and the
//! reference an observation is compared with moves forward whenever one mark drifts (the
//! stream's metadata record, `super::store_id`): both marks may change over a stream's life,
//! one at a time (a restored stream's leader moves, it is scaled down to one replica, which a
//! cluster reports no group for, then up again, which names a new one), and compared with
//! the first observation alone, that made replicas take it for replaced (found by an
//! adversarial run). On a single server, which has no group, its one clock decides.
//!
//! It decides nothing about what a replica does with another incarnation (stop, set snapshots
//! aside, serve another store id): `super::store_id`, `super::stream`, `super::snapshots` and
//! `crate::replication::startup` do.

/// When a stream was created, as the server that answered says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamCreated(pub chrono::DateTime<chrono::Utc>);

impl StreamCreated {
    /// The stored form (`STREAM_CREATED` in a replica's data directory, stream and object
    /// metadata): RFC 3339 to the nanosecond, which parses back to the same instant.
    pub fn parse(text: &str) -> Option<StreamCreated> {
        chrono::DateTime::parse_from_rfc3339(text.trim())
            .ok()
            .map(|at| StreamCreated(at.to_utc()))
    }
}

impl std::fmt::Display for StreamCreated {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0.to_rfc3339_opts(chrono::SecondsFormat::Nanos, true))
    }
}

/// One incarnation of a stream name, as one stream info described it, or as a record of one
/// says (where either mark may be missing or unreadable).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Incarnation {
    /// When it was created, as the server that answered says.
    pub created: Option<StreamCreated>,
    /// The name of its Raft group; `None` on a server that is not part of a cluster, and for
    /// a one-replica stream on a cluster.
    pub raft_group: Option<String>,
}

impl Incarnation {
    /// The incarnation a stream info describes.
    pub fn of(info: &async_nats::jetstream::stream::Info) -> Incarnation {
        let raft_group = info
            .cluster
            .as_ref()
            .and_then(|cluster| cluster.raft_group.clone())
            .filter(|group| !group.is_empty());
        Incarnation {
            created: Some(StreamCreated(info.created)),
            raft_group,
        }
    }

    /// The incarnation recorded as `created` and `raft_group` (either absent in records of
    /// earlier builds, and the group on a single server); `None` when neither is there and
    /// readable: no record.
    pub fn recorded(created: Option<&str>, raft_group: Option<&str>) -> Option<Incarnation> {
        let recorded = Incarnation {
            created: created.and_then(StreamCreated::parse),
            raft_group: raft_group
                .map(str::trim)
                .filter(|group| !group.is_empty())
                .map(str::to_owned),
        };
        (recorded.created.is_some() || recorded.raft_group.is_some()).then_some(recorded)
    }

    /// Whether `other` is this same incarnation: the same creation time or the same Raft group
    /// (see the module's documentation for why either).
    pub fn is(&self, other: &Incarnation) -> bool {
        fn same<T: PartialEq>(this: &Option<T>, that: &Option<T>) -> bool {
            this.is_some() && this == that
        }
        same(&self.created, &other.created) || same(&self.raft_group, &other.raft_group)
    }

    /// What a store id of this incarnation is derived from (`super::store_id`): a mark every
    /// server reports alike, so that every replica derives the same id. The Raft group; on a
    /// single server, which has one clock, and for a one-replica stream, the creation time.
    pub fn derivation_key(&self) -> String {
        match (&self.raft_group, &self.created) {
            (Some(group), _) => group.clone(),
            (None, Some(created)) => created.to_string(),
            (None, None) => String::new(),
        }
    }
}

impl std::fmt::Display for Incarnation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.created {
            Some(created) => write!(f, "created {created}")?,
            None => f.write_str("creation unknown")?,
        }
        if let Some(group) = &self.raft_group {
            write!(f, ", Raft group {group}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn incarnation(created: &str, raft_group: Option<&str>) -> Incarnation {
        let recorded = Incarnation::recorded(Some(created), raft_group).expect("a record");
        assert!(recorded.created.is_some(), "a valid time");
        recorded
    }

    const T1: &str = "2026-12-05T07:58:43.936846386Z";
    const T2: &str = "2026-12-05T07:58:44.006391025Z";

    #[test]
    fn either_mark_makes_the_same_incarnation_and_both_changed_another() {
        let followed = incarnation(T2, Some("S-R3F-abc"));
        // A restored stream, asked of another server.
        assert!(followed.is(&incarnation(T1, Some("S-R3F-abc"))));
        // A one-replica stream scaled up, or a stream scaled down to one replica.
        assert!(followed.is(&incarnation(T2, Some("S-R3F-xyz"))));
        assert!(followed.is(&incarnation(T2, None)));
        // Deleted and created again, or restored again.
        assert!(!followed.is(&incarnation(T1, Some("S-R3F-xyz"))));
        assert!(!followed.is(&incarnation(T1, None)));
    }

    #[test]
    fn without_a_group_the_creation_time_alone_decides() {
        let single = incarnation(T1, None);
        assert!(single.is(&incarnation(T1, None)));
        assert!(!single.is(&incarnation(T2, None)));
        // A record of an earlier build, which kept no group.
        assert!(!incarnation(T1, None).is(&incarnation(T2, Some("S-R3F-abc"))));
        assert!(incarnation(T1, None).is(&incarnation(T1, Some("S-R3F-abc"))));
    }

    #[test]
    fn a_record_keeps_the_mark_it_can_read() {
        let recorded = incarnation(T1, Some("S-R3F-abc"));
        let created = recorded.created.unwrap().to_string();
        let again = Incarnation::recorded(Some(&created), Some("S-R3F-abc\n"));
        assert_eq!(again, Some(recorded.clone()));
        // A garbled time: the group still tells the stream.
        let garbled = Incarnation::recorded(Some("yesterday"), Some("S-R3F-abc")).unwrap();
        assert_eq!(garbled.created, None);
        assert!(garbled.is(&recorded));
        assert_eq!(incarnation(T1, Some(" ")).raft_group, None);
        assert_eq!(Incarnation::recorded(Some("yesterday"), None), None);
        assert_eq!(Incarnation::recorded(None, Some("")), None);
        // Nothing known matches nothing.
        let unknown = Incarnation {
            created: None,
            raft_group: None,
        };
        assert!(!unknown.is(&unknown));
    }

    #[test]
    fn the_derivation_key_is_the_group_where_there_is_one() {
        assert_eq!(
            incarnation(T1, Some("S-R3F-abc")).derivation_key(),
            "S-R3F-abc"
        );
        assert_eq!(incarnation(T1, None).derivation_key(), T1);
    }
}
