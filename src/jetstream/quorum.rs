//! Whether a clustered stream's leader still holds its quorum, judged from its own stream info:
//! only then is the last sequence it answers a barrier (`UpdateStream::bounds`).
//!
//! A leader cut off from its peers by a silent partition keeps saying it leads, and keeps
//! answering stream info with its own last sequence, until nats-server's Raft notices the lost
//! quorum; meanwhile the peers may elect another leader and acknowledge more. A replica caught
//! up to that stale end took a revision acknowledged on the other side for one never assigned
//! (OUT_OF_RANGE), and said it was ready, for 5 to 11 s (found by an adversarial run). The facts
//! used here are nats-server's (2.15, `server/raft.go` and `clusterInfo` in
//! `server/jetstream_cluster.go`):
//!
//! - The leader's answer lists every other peer of the group in `cluster.replicas`, with
//!   `active`: the time since the leader last took an append-entry response (or a vote) from it;
//!   zero when it never has. A follower answering lists the leader there instead.
//! - `current` on the leader says a peer has every committed entry; it turns false only once the
//!   peer has been silent for `lostQuorumInterval` (10 s), so on an idle stream a stopped peer
//!   stays current for 10 s: it says nothing here. `offline` is the meta layer's view: a peer so
//!   marked is not counted.
//! - An idle leader sends a heartbeat when it has sent nothing for `hbInterval` (1 s), on a 1 s
//!   ticker: a healthy follower is heard from at least every 2 s.
//! - A follower calls an election no sooner than `minElectionTimeout` (4 s) after the last append
//!   entry it took; a leader steps down only when its check every `lostQuorumCheck` (10 s) finds
//!   no quorum heard from within `lostQuorumInterval` (10 s): 8 to 20 s after it was cut off.
//!
//! What it deliberately does not do: read a clock (the ages come from the leader), or decide
//! what a caller does with an unconfirmed answer.

use std::time::Duration;

use async_nats::jetstream::stream;

/// The longest a leader may have gone without hearing from a quorum of its group for its answer
/// to count. Above a healthy follower's 2 s between heartbeats (with a second for a loaded box,
/// where a healthy peer's response taken late makes it seem silent: that errs toward an
/// unconfirmed answer, UNAVAILABLE, never toward a stale barrier); below the 4 s a peer cut off
/// together with the others waits before it calls an election, so that while the leader's
/// answer counts, no other leader can have been elected, let alone acknowledged anything. (A
/// peer cut off from the leader alone may campaign at any time, and nats-server's Raft grants
/// it the vote of a peer the leader still hears from: barriers against that wait for a read
/// whose quorum was heard after they began, `Bounds::heard`.)
pub(super) const QUORUM_WINDOW: Duration = Duration::from_secs(3);

/// How long before it answered the stream's leader last heard from enough of its group to make a
/// quorum with itself: zero outside a cluster and for one replica. `Err` says why the answer
/// does not count: that was longer than [`QUORUM_WINDOW`] ago (naming the silent peers and for
/// how long), or the answer is not the leader's.
pub(super) fn quorum_heard(info: &stream::Info) -> Result<Duration, String> {
    let Some(cluster) = &info.cluster else {
        return Ok(Duration::ZERO);
    };
    let leader = cluster.leader.as_deref().unwrap_or_default();
    if cluster.replicas.iter().any(|peer| peer.name == leader) {
        return Err(format!(
            "the answer came from a follower of leader {leader}, which cannot tell whether the \
             leader still holds its quorum"
        ));
    }
    // The group as configured, when the leader lists fewer peers (a scale-up under way): the
    // larger of the two needs the larger quorum.
    let group = (cluster.replicas.len() + 1).max(info.config.num_replicas);
    let needed = group / 2;
    let Some(nth) = needed.checked_sub(1) else {
        return Ok(Duration::ZERO);
    };
    let mut heard: Vec<Duration> = (cluster.replicas.iter())
        .filter(|peer| !peer.offline && !peer.active.is_zero())
        .map(|peer| peer.active)
        .collect();
    heard.sort_unstable();
    match heard.get(nth) {
        Some(age) if *age <= QUORUM_WINDOW => Ok(*age),
        _ => Err(format!(
            "its leader {leader} has not heard from a quorum of its {group} servers within {} \
             ({}): it may be cut off from them, and they may have elected another leader that \
             acknowledged more",
            seconds(QUORUM_WINDOW),
            silent_peers(&cluster.replicas)
        )),
    }
}

/// Each peer the leader has not heard from within [`QUORUM_WINDOW`], and for how long.
fn silent_peers(peers: &[stream::PeerInfo]) -> String {
    let silent: Vec<String> = (peers.iter())
        .filter_map(|peer| match peer.active {
            _ if peer.offline => Some(format!("{} offline", peer.name)),
            active if active.is_zero() => Some(format!("{} never heard from", peer.name)),
            active if active > QUORUM_WINDOW => {
                Some(format!("{} silent for {}", peer.name, seconds(active)))
            }
            _ => None,
        })
        .collect();
    match silent.is_empty() {
        true => "no peers listed".to_owned(),
        false => silent.join(", "),
    }
}

fn seconds(duration: Duration) -> String {
    format!("{:.1} s", duration.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(name: &str, active_ms: u64) -> stream::PeerInfo {
        stream::PeerInfo {
            name: name.into(),
            current: true,
            active: Duration::from_millis(active_ms),
            offline: false,
            lag: None,
        }
    }

    fn info(replicas: usize, cluster: Option<(&str, Vec<stream::PeerInfo>)>) -> stream::Info {
        let config = stream::Config {
            name: "S".into(),
            num_replicas: replicas,
            ..Default::default()
        };
        let mut info: stream::Info = serde_json::from_value(serde_json::json!({
            "config": config,
            "created": "2026-01-01T00:00:00Z",
            "state": {
                "messages": 0, "bytes": 0, "first_seq": 0, "first_ts": "2026-01-01T00:00:00Z",
                "last_seq": 0, "last_ts": "2026-01-01T00:00:00Z", "consumer_count": 0
            },
        }))
        .expect("a stream info");
        info.cluster = cluster.map(|(leader, replicas)| stream::ClusterInfo {
            leader: Some(leader.into()),
            replicas,
            ..Default::default()
        });
        info
    }

    /// A single server (no cluster in the answer) and an R1 stream are their own quorum.
    #[test]
    fn a_single_server_and_one_replica_need_no_peer() {
        assert_eq!(quorum_heard(&info(1, None)), Ok(Duration::ZERO));
        assert_eq!(
            quorum_heard(&info(1, Some(("n1", vec![])))),
            Ok(Duration::ZERO)
        );
    }

    /// Three replicas: the leader and one peer heard from within the window are a quorum, the
    /// other peer's silence notwithstanding; the age is that peer's.
    #[test]
    fn one_peer_heard_lately_makes_a_quorum_of_three() {
        let heard = info(3, Some(("n1", vec![peer("n2", 1_500), peer("n3", 60_000)])));
        assert_eq!(quorum_heard(&heard), Ok(Duration::from_millis(1_500)));
        let both = info(3, Some(("n1", vec![peer("n2", 900), peer("n3", 200)])));
        assert_eq!(quorum_heard(&both), Ok(Duration::from_millis(200)));
    }

    /// A leader cut off from both peers: `current` still true (as nats-server says for 10 s), yet
    /// the answer does not count, and the reason names each silent peer and for how long.
    #[test]
    fn a_leader_that_has_heard_from_no_quorum_lately_does_not_count() {
        let cut_off = info(3, Some(("n1", vec![peer("n2", 3_200), peer("n3", 4_000)])));
        let reason = quorum_heard(&cut_off).unwrap_err();
        assert!(reason.contains("leader n1"), "{reason}");
        assert!(reason.contains("n2 silent for 3.2 s"), "{reason}");
        assert!(reason.contains("n3 silent for 4.0 s"), "{reason}");
    }

    /// A peer never heard from (`active` zero) or marked offline is not part of the quorum,
    /// however recent its `active`.
    #[test]
    fn peers_never_heard_from_or_offline_do_not_count() {
        let never = info(3, Some(("n1", vec![peer("n2", 0), peer("n3", 5_000)])));
        let reason = quorum_heard(&never).unwrap_err();
        assert!(reason.contains("n2 never heard from"), "{reason}");
        let mut offline = peer("n2", 100);
        offline.offline = true;
        let reason = quorum_heard(&info(3, Some(("n1", vec![offline, peer("n3", 9_000)]))));
        assert!(reason.unwrap_err().contains("n2 offline"));
    }

    /// Five replicas need two peers: the age is the second most recent.
    #[test]
    fn five_replicas_need_two_peers() {
        let peers = vec![
            peer("n2", 100),
            peer("n3", 2_000),
            peer("n4", 8_000),
            peer("n5", 9_000),
        ];
        assert_eq!(
            quorum_heard(&info(5, Some(("n1", peers)))),
            Ok(Duration::from_secs(2))
        );
        let one = vec![peer("n2", 100), peer("n3", 4_000), peer("n4", 8_000)];
        assert!(quorum_heard(&info(5, Some(("n1", one)))).is_err());
    }

    /// A follower's answer (the leader listed among the replicas) knows nothing of the leader's
    /// quorum; a group listing fewer peers than its configured replicas needs the larger quorum.
    #[test]
    fn a_followers_answer_and_a_short_listing_do_not_count_as_more() {
        let follower = info(3, Some(("n1", vec![peer("n1", 100), peer("n3", 100)])));
        assert!(quorum_heard(&follower).unwrap_err().contains("follower"));
        // R5 configured, the leader lists two peers: one heard is not two.
        let short = info(5, Some(("n1", vec![peer("n2", 100), peer("n3", 5_000)])));
        assert!(quorum_heard(&short).is_err());
    }
}
