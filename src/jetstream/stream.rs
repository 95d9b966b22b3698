//! The update stream: created once (with the cluster's store id in its metadata) or checked,
//! published to, measured and purged.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::ErrorCode;
use async_nats::jetstream::context::{CreateStreamErrorKind, PublishErrorKind};
use async_nats::jetstream::message::StreamMessage;
use async_nats::jetstream::stream::{
    self, DiscardPolicy, PersistenceMode, RawMessageErrorKind, RetentionPolicy, StorageType,
};
use prost::Message;

use super::incarnation::{Incarnation, StreamCreated};
use super::quorum::quorum_heard;
use super::republish::Republish;
use super::store_id::{self, STORE_ID_KEY};
use super::{JetStreamError, Nats, UpdateBatch};
use crate::config::NatsConfig;
use crate::poison::lock;

/// The pauses between publishes of a batch the stream did not take yet (no responders, or
/// the same message id being stored): doubling from the first to the last, until the request
/// timeout.
const PUBLISH_AGAIN_PAUSES: (Duration, Duration) =
    (Duration::from_millis(5), Duration::from_millis(100));

/// Stream metadata key holding the message format version.
const FORMAT_KEY: &str = "profile_state_format";
/// The message format this build writes and reads ([`UpdateBatch`], version 1).
const FORMAT: &str = "1";
/// Stream metadata key holding the version of the merge rules every replica applies the stream
/// with. Revisions are assigned by each replica from the stream, so replicas with different
/// rules would assign different ones: a replica refuses a stream of rules it does not
/// implement, and a release that changes a merge rule (anything `Profile::merge` or the bound
/// on profile growth decides) bumps this; its upgrade stops every replica of the earlier
/// release and takes the stream over ([`UpdateStream::upgrade_rules`]; README, "Upgrades").
const RULES_KEY: &str = "profile_state_rules";
/// The merge rules this build implements. 2: an update that would grow a profile's extras
/// past the bound is refused (`crate::profile::check_growth`); a replica of rules 1 applies it.
pub const RULES: &str = "2";
/// The rules this build can take a stream over from ([`UpdateStream::upgrade_rules`]): rules 1
/// are rules 2 without the bound, so messages applied under them are applied here with the
/// bound waived, exactly as they were.
const UPGRADABLE_RULES: &str = "1";
/// Stream metadata key holding the first stream sequence applied under rules 2, on a stream
/// that began under rules 1 (absent: every message).
const RULES_FROM_KEY: &str = "profile_state_rules_2_from";

/// What the stream must look like; derived from the `--nats-*` flags.
#[derive(Clone, Debug)]
pub struct StreamSettings {
    /// The stream's name (`--nats-stream`).
    pub name: String,
    /// Replicas of the stream and of the buckets this service creates.
    pub replicas: usize,
    /// The shortest duplicate window this service accepts, and the one it creates.
    pub duplicate_window: Duration,
    /// The stream's size limit; publishes are refused beyond it (`None`: unlimited).
    pub max_bytes: Option<u64>,
}

impl StreamSettings {
    /// The settings the flags ask for.
    pub fn from_config(config: &NatsConfig) -> StreamSettings {
        StreamSettings {
            name: config.stream.clone(),
            replicas: config.replicas,
            duplicate_window: config.duplicate_window,
            max_bytes: config.max_bytes,
        }
    }

    /// The one subject updates are published on: `<stream>.updates`.
    pub fn subject(&self) -> String {
        format!("{}.updates", self.name)
    }

    /// The configuration this service creates the stream with. File storage, acknowledged
    /// only once stored (never `persist_mode: async`), limits retention without removal by age
    /// or count (only our purge below a snapshot removes messages), refusing new messages
    /// when a size limit is reached instead of discarding old ones, and no deletes of single
    /// messages, so every sequence up to the last is present or purged from the front.
    fn stream_config(&self, store_id: &str) -> stream::Config {
        stream::Config {
            name: self.name.clone(),
            description: Some("profile-state: normalized Gameball profile updates".into()),
            subjects: vec![self.subject()],
            retention: RetentionPolicy::Limits,
            storage: StorageType::File,
            num_replicas: self.replicas,
            duplicate_window: self.duplicate_window,
            max_bytes: self
                .max_bytes
                .map_or(-1, |bytes| i64::try_from(bytes).unwrap_or(i64::MAX)),
            max_messages: -1,
            discard: DiscardPolicy::New,
            deny_delete: true,
            metadata: HashMap::from([
                (STORE_ID_KEY.to_string(), store_id.to_string()),
                (FORMAT_KEY.to_string(), FORMAT.to_string()),
                (RULES_KEY.to_string(), RULES.to_string()),
            ]),
            ..Default::default()
        }
    }
}

/// The acknowledgement of a publish.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Published {
    /// The stream sequence of the message: the original one if this was a duplicate.
    pub sequence: u64,
    /// The server dropped this publish as a repeat of an earlier one with the same id.
    pub duplicate: bool,
}

/// The sequences the stream holds now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bounds {
    /// The lowest sequence still held; `last + 1` when the stream is empty after a purge, and
    /// 0 when nothing was ever published.
    pub first: u64,
    /// The sequence of the last message ever stored (0 if none).
    pub last: u64,
    /// Bytes the stream may still take before it refuses publishes (`--nats-max-bytes` less
    /// what it holds); `None` without a size limit.
    pub room: Option<u64>,
    /// How long before it answered the stream's leader last heard from a quorum of its group
    /// (zero outside a cluster, and for one replica): `last` bounds what was acknowledged
    /// anywhere before the read was sent less this. Within it, a peer cut off from the leader
    /// alone may have won the vote of a peer the leader heard from, and had more acknowledged
    /// (nats-server's Raft grants a vote for a later term at once): only a quorum heard since
    /// shows that none was.
    pub heard: Duration,
}

/// The update stream. Cloning is cheap (handles onto the connection).
#[derive(Clone)]
pub struct UpdateStream {
    nats: Nats,
    stream: stream::Stream<()>,
    settings: StreamSettings,
    subject: String,
    store_id: String,
    /// The first sequence applied with the bound on profile growth (see [`RULES_FROM_KEY`]).
    rules_from: u64,
    /// Which incarnation of the stream name it is, as the stream info it was opened on said.
    incarnation: Incarnation,
    /// When it was created, as that stream info said.
    created: StreamCreated,
    /// The incarnation and record this handle follows, moved forward as they drift.
    followed: Arc<Mutex<Followed>>,
    /// Whether the stream's metadata recorded which incarnation its store id is of when it was
    /// opened (`super::store_id`): if so, the store id tells incarnations apart.
    recorded_before: bool,
    /// The stream's `max_msg_size` (-1 or 0: none) as the latest stream info said: an operator
    /// may change it while replicas run, and the publisher's cap follows
    /// ([`UpdateStream::message_cap`]).
    max_message_size: Arc<AtomicI64>,
    /// Warns, at most every 10 s, of a setting changed while replicas run to one start-up
    /// refuses ([`refused_setting`]).
    refused_log: Arc<crate::logging::RateLimited>,
}

/// What a handle follows, poll after poll ([`UpdateStream::bounds`]).
#[derive(Debug)]
struct Followed {
    /// The stream's incarnation as last seen to be this one: one mark may drift at a time.
    incarnation: Incarnation,
    /// The metadata's store id and record as last seen (`store_id::record_of`).
    record: (String, Option<Incarnation>),
}

impl UpdateStream {
    /// Creates the stream with a new store id if it does not exist, else checks it. Replicas
    /// racing to create it agree: the server accepts one creation, and the others read the
    /// stream (and store id) it made.
    pub async fn ensure(
        nats: &Nats,
        settings: &StreamSettings,
    ) -> Result<UpdateStream, JetStreamError> {
        let context = nats.context();
        let info = match context.get_stream(&settings.name).await {
            Ok(stream) => stream.cached_info().clone(),
            Err(err) if is_not_found(&err) => {
                refuse_if_lost(context, &settings.name).await?;
                let store_id = crate::data_dir::new_store_id();
                match context
                    .create_stream(settings.stream_config(&store_id))
                    .await
                {
                    Ok(stream) => {
                        // Right for a new cluster; for a replica of a running one, a mistyped
                        // --nats-stream: it would serve an empty store of its own.
                        tracing::warn!(
                            stream = %settings.name,
                            %store_id,
                            "created the update stream, which did not exist: a new, empty \
                             store; if other replicas already run, check --nats-stream"
                        );
                        stream.cached_info().clone()
                    }
                    Err(err) if created_meanwhile(&err) => context
                        .get_stream(&settings.name)
                        .await
                        .map_err(unavailable("stream info"))?
                        .cached_info()
                        .clone(),
                    Err(err) => return Err(create_failed(settings, err)),
                }
            }
            Err(err) => return Err(unavailable("stream info")(err)),
        };
        let rules_from = verify(settings, &info.config)?;
        let incarnation = Incarnation::of(&info);
        warn_if_limit_differs(settings, &info.config);
        let served = store_id::served(&info.config.metadata, &incarnation);
        if served.other_incarnation {
            tracing::warn!(
                stream = %info.config.name,
                incarnation = %incarnation,
                recorded = %store_id::recorded_text(&info.config.metadata),
                store_id = %served.store_id,
                "the stream is another incarnation of the one its store id was made for \
                 (restored from a backup, or created again with its definition): it is a new \
                 store to clients, whose watches are reset"
            );
        }
        let mut record = store_id::record_of(&info.config.metadata);
        if let Some(incarnation) = &served.record {
            match record_incarnation(context, &settings.name, &served.store_id, incarnation).await {
                Ok(Some(written)) => record = written,
                Ok(None) => {}
                // Should the update fail (an account not allowed to update streams), every
                // replica still derives the same id.
                Err(error) => tracing::warn!(
                    %error,
                    "could not record the stream's incarnation in its metadata"
                ),
            }
        }
        let followed = Followed {
            incarnation: incarnation.clone(),
            record,
        };
        let stream = context
            .get_stream_no_info(&settings.name)
            .await
            .map_err(unavailable("stream info"))?;
        Ok(UpdateStream {
            nats: nats.clone(),
            stream,
            subject: settings.subject(),
            settings: settings.clone(),
            store_id: served.store_id,
            rules_from,
            incarnation,
            created: StreamCreated(info.created),
            followed: Arc::new(Mutex::new(followed)),
            recorded_before: served.recorded_before,
            max_message_size: Arc::new(AtomicI64::new(info.config.max_message_size.into())),
            refused_log: Arc::default(),
        })
    }

    /// Whether a stream named `name` exists (one stream-info request).
    pub async fn exists(nats: &Nats, name: &str) -> Result<bool, JetStreamError> {
        match nats.context().get_stream(name).await {
            Ok(_) => Ok(true),
            Err(err) if is_not_found(&err) => Ok(false),
            Err(err) => Err(unavailable("stream info")(err)),
        }
    }

    /// When the stream this handle was opened on was created, as the server that answered
    /// said (servers of a cluster may not agree: [`UpdateStream::incarnation`] tells streams
    /// apart).
    pub fn created(&self) -> StreamCreated {
        self.created
    }

    /// Which incarnation of the stream name this handle was opened on.
    pub fn incarnation(&self) -> &Incarnation {
        &self.incarnation
    }

    /// Whether the stream's metadata recorded which incarnation its store id is of when this
    /// handle was opened: if so, a data directory or snapshot of another store id is of
    /// another incarnation, and one of this store id of this one. If not (a stream of a
    /// release before the record), the store id is the same for every incarnation.
    pub fn recorded_before(&self) -> bool {
        self.recorded_before
    }

    /// Takes the stream `settings` name over from rules 1 ([`UPGRADABLE_RULES`]) to this
    /// build's: its metadata then says rules 2 from the sequence after its last message, so
    /// every replica of this build applies what came before exactly as replicas of rules 1 did,
    /// and what comes after with the bound. Only while no replica of rules 1 runs (one would
    /// apply the later messages without the bound, and publish snapshots of that): refused
    /// while any consumer reads the stream (a replica's lasts 30 s after it stops). Every
    /// other setting is checked first, so a refusal leaves the stream as it was.
    /// `Ok(None)`: nothing to take over (no such stream, or rules 2 already);
    /// `Ok(Some(sequence))`: the first sequence of rules 2.
    pub async fn upgrade_rules(
        nats: &Nats,
        settings: &StreamSettings,
    ) -> Result<Option<u64>, JetStreamError> {
        let context = nats.context();
        let info = match context.get_stream(&settings.name).await {
            Ok(stream) => stream.cached_info().clone(),
            Err(err) if is_not_found(&err) => return Ok(None),
            Err(err) => return Err(unavailable("stream info")(err)),
        };
        let mut config = info.config;
        if config.metadata.get(RULES_KEY).map(String::as_str) != Some(UPGRADABLE_RULES) {
            return Ok(None);
        }
        let from = info.state.last_sequence + 1;
        config.metadata.insert(RULES_KEY.into(), RULES.into());
        config
            .metadata
            .insert(RULES_FROM_KEY.into(), from.to_string());
        verify(settings, &config)?;
        if info.state.consumer_count > 0 {
            return Err(JetStreamError::Mismatch {
                name: settings.name.clone(),
                setting: "consumers (for --nats-upgrade-rules)",
                expected: "none: stop every replica of the earlier release, wait 30 s for their \
                           consumers to expire, then start again"
                    .into(),
                found: info.state.consumer_count.to_string(),
            });
        }
        context
            .update_stream(config)
            .await
            .map_err(unavailable("stream update"))?;
        Ok(Some(from))
    }

    /// The first stream sequence applied with the bound on profile growth: 0 on a stream
    /// created under rules 2, else the sequence [`UpdateStream::upgrade_rules`] recorded.
    pub fn rules_from(&self) -> u64 {
        self.rules_from
    }

    /// The store id every replica of this stream reports.
    pub fn store_id(&self) -> &str {
        &self.store_id
    }

    /// The stream's name.
    pub fn name(&self) -> &str {
        &self.settings.name
    }

    /// The settings it was ensured with.
    pub fn settings(&self) -> &StreamSettings {
        &self.settings
    }

    /// The largest payload a message of this stream may carry: the NATS server's
    /// `max_payload`, or the stream's `max_msg_size` when that is smaller (headers included:
    /// the publisher leaves room for them). Follows the stream's setting as each poll of the
    /// stream's info reads it ([`UpdateStream::bounds`]).
    pub fn message_cap(&self) -> usize {
        message_cap(
            self.nats.max_payload(),
            self.max_message_size.load(Ordering::Relaxed),
        )
    }

    /// The connection it publishes on.
    pub fn nats(&self) -> &Nats {
        &self.nats
    }

    pub(super) fn subject(&self) -> &str {
        &self.subject
    }

    pub(super) fn handle(&self) -> &stream::Stream<()> {
        &self.stream
    }

    /// Publishes a batch with its content-derived `Nats-Msg-Id` and waits for the stream's
    /// acknowledgement (a quorum has stored it; synced, with `sync_interval: always`).
    pub async fn publish(&self, batch: &UpdateBatch) -> Result<Published, JetStreamError> {
        self.publish_as(batch, &batch.message_id()).await
    }

    /// [`UpdateStream::publish`] under the message id `id`: a repeat the stream must take as
    /// a new message (one whose original the merge refused, `crate::replication`).
    pub async fn publish_as(
        &self,
        batch: &UpdateBatch,
        id: &str,
    ) -> Result<Published, JetStreamError> {
        let payload = batch.encode_to_vec();
        let max = self.message_cap();
        if payload.len() > max {
            return Err(JetStreamError::TooLarge {
                bytes: payload.len(),
                max,
            });
        }
        let payload = bytes::Bytes::from(payload);
        // No responders: no server holds the stream's subject for a moment, while a new
        // stream's or a failed leader's Raft group elects a leader. The message id makes a
        // repeat harmless, so try again until the request timeout rather than answer 503.
        let deadline = tokio::time::Instant::now() + self.nats.request_timeout();
        let mut again = Republish::until(deadline, PUBLISH_AGAIN_PAUSES);
        loop {
            let message = async_nats::jetstream::message::PublishMessage::build()
                .payload(payload.clone())
                .message_id(id);
            let sent = match self
                .nats
                .context()
                .send_publish(self.subject.clone(), message)
                .await
            {
                Ok(ack) => ack.await,
                Err(err) => Err(err),
            };
            match sent {
                Ok(ack) => {
                    return Ok(Published {
                        sequence: ack.sequence,
                        duplicate: ack.duplicate,
                    });
                }
                Err(err) => {
                    // No responders for the stream yet; or the same message id being proposed
                    // by another publish (the same delivery taken by two replicas at once, a
                    // retry racing its original): the message is not refused, its first copy
                    // is just not stored yet, and once it is, this publish is acknowledged as
                    // its duplicate, with its sequence.
                    let again_later = err.kind() == PublishErrorKind::StreamNotFound
                        || jetstream_code(&err)
                            == Some(ErrorCode::STREAM_DUPLICATE_MESSAGE_CONFLICT);
                    let Some(pause) = again.next_pause().filter(|_| again_later) else {
                        return Err(publish_failed(err));
                    };
                    tracing::debug!(%err, "publishing again: no responders, or being stored");
                    tokio::time::sleep(pause).await;
                }
            }
        }
    }

    /// First and last sequence, read from the stream leader: `last` is a barrier, since every
    /// message acknowledged before this call has a sequence at or below it. A stream created
    /// again since this handle was opened is [`JetStreamError::Replaced`]: its sequences are
    /// not this one's. An answer that names no leader is no answer
    /// ([`JetStreamError::Unavailable`]): a clustered stream without one (its servers short of
    /// a quorum) is answered by a follower, from its own copy, which may end before what the
    /// cluster acknowledged; taken for a barrier, it made every replica ready while no webhook
    /// could be recorded, for as long as the quorum was lost (found by an adversarial run). Nor
    /// is a leader's that has not heard from a quorum of its group lately
    /// ([`JetStreamError::NoQuorum`], `super::quorum`): cut off from its peers, it still says
    /// it leads, for 8 to 20 s, while they may elect another leader and acknowledge more.
    pub async fn bounds(&self) -> Result<Bounds, JetStreamError> {
        let info = self.stream.get_info().await.map_err(|err| {
            if jetstream_code(&err) == Some(ErrorCode::STREAM_NOT_FOUND) {
                JetStreamError::Refused {
                    operation: "stream info",
                    reason: format!("stream {} not found", self.settings.name),
                }
            } else {
                unavailable("stream info")(err)
            }
        })?;
        if !has_leader(&info) {
            return Err(JetStreamError::Unavailable {
                operation: "stream info",
                reason: format!(
                    "stream {} has no leader (its servers are short of a quorum); the answer \
                     came from a follower's copy",
                    self.settings.name
                ),
            });
        }
        let heard = quorum_heard(&info).map_err(|reason| JetStreamError::NoQuorum {
            stream: self.settings.name.clone(),
            reason,
        })?;
        self.follow(&info)?;
        self.max_message_size
            .store(info.config.max_message_size.into(), Ordering::Relaxed);
        if let Err((setting, expected, found)) = refused_setting(&info.config)
            && let Some(suppressed) = self.refused_log.due()
        {
            // Start-up refuses it; a running replica cannot undo an operator's edit, so it
            // says so loudly, and what the setting does meanwhile (README, "Start-up").
            tracing::error!(
                stream = %self.settings.name,
                setting,
                %expected,
                %found,
                suppressed,
                "the stream was changed to a setting replicas refuse at start-up: change it \
                 back (`nats stream edit`), or no replica will start again"
            );
        }
        let limit = u64::try_from(info.config.max_bytes)
            .ok()
            .filter(|max| *max > 0);
        Ok(Bounds {
            first: info.state.first_sequence,
            last: info.state.last_sequence,
            room: limit.map(|max| max.saturating_sub(info.state.bytes)),
            heard,
        })
    }

    /// [`JetStreamError::Replaced`] when `info` is not the stream this handle follows.
    /// While the metadata's record is the one last seen, the marks decide: either one the same
    /// is this stream, and the reference moves forward to `info`'s marks, so that a stream
    /// whose marks change one at a time (its leader moves, it is scaled down to one replica
    /// and up again) is followed throughout; compared with the first observation alone, that
    /// made every replica take it for replaced (found by an adversarial run). A record changed
    /// since was written by a replica started meanwhile (which took the stream for another
    /// incarnation), or came with a restore or a re-creation: the store id it gives decides,
    /// so that no two replicas serve different ids for long. The record is not brought up to
    /// date here: a stream update carries the whole configuration, and one made from a read a
    /// moment old undid operators' changes made meanwhile, a scale-up included (found by an
    /// adversarial run).
    fn follow(&self, info: &stream::Info) -> Result<(), JetStreamError> {
        let now = Incarnation::of(info);
        let record = store_id::record_of(&info.config.metadata);
        let mut followed = lock(&self.followed);
        let served = || store_id::served(&info.config.metadata, &now);
        let same = if record == followed.record {
            followed.incarnation.is(&now)
        } else {
            let served = served();
            served.store_id == self.store_id
                && (served.recorded_before || followed.incarnation.is(&now))
        };
        if !same {
            return Err(JetStreamError::Replaced {
                stream: self.settings.name.clone(),
                was: format!("{}, store id {}", followed.incarnation, self.store_id),
                now: format!("{now}, store id {}", served().store_id),
            });
        }
        *followed = Followed {
            incarnation: now,
            record,
        };
        Ok(())
    }

    /// The digest of the message at `sequence` ([`message_digest`]): what a snapshot as of
    /// that sequence records, so that a stream restored from a backup, another incarnation
    /// whose messages are the same, can be told to continue from it. `None` when the stream does
    /// not hold that message (purged, or not yet stored); [`UpdateStream::message`] for the rest.
    pub async fn message_digest(&self, sequence: u64) -> Result<Option<String>, JetStreamError> {
        let message = self.message(sequence).await?;
        Ok(message.as_ref().map(message_digest))
    }

    /// The message at `sequence` (0: none), if the stream holds it. One read from the stream
    /// leader; a stream created again since this handle was opened (or taken for another
    /// incarnation by a replica started since) is [`JetStreamError::Replaced`], with or without
    /// the message, so that what is returned is never another incarnation's message, nor its
    /// absence.
    pub(super) async fn message(
        &self,
        sequence: u64,
    ) -> Result<Option<StreamMessage>, JetStreamError> {
        let message = match sequence {
            0 => None,
            _ => match self.stream.get_raw_message(sequence).await {
                Ok(message) => Some(message),
                Err(err) if err.kind() == RawMessageErrorKind::NoMessageFound => None,
                Err(err) => return Err(unavailable("message get")(err)),
            },
        };
        // Read after the get: a stream replaced before it answered is caught here.
        self.bounds().await?;
        Ok(message)
    }

    /// Removes every message below `sequence` (those a snapshot covers); returns how many.
    pub async fn purge_below(&self, sequence: u64) -> Result<u64, JetStreamError> {
        let response = self
            .stream
            .purge()
            .sequence(sequence)
            .await
            .map_err(unavailable("purge"))?;
        Ok(response.purged)
    }
}

/// [`JetStreamError::Lost`] when the stream `name`, found missing, has a snapshot bucket that
/// holds anything: replicas of a stream of that name published snapshots, so it was deleted or
/// lost, and an empty one made now would take webhooks that its restore drops. Its bucket's
/// own stream is asked (`OBJ_<name>_SNAPSHOTS`): the bucket cannot be opened without the
/// update stream. A bucket that does not exist, or holds nothing, is a new cluster's.
async fn refuse_if_lost(
    context: &async_nats::jetstream::Context,
    name: &str,
) -> Result<(), JetStreamError> {
    let bucket = format!("{name}_SNAPSHOTS");
    let chunks = match context.get_stream(format!("OBJ_{bucket}")).await {
        Ok(chunks) => chunks,
        Err(err) if is_not_found(&err) => return Ok(()),
        Err(err) => return Err(unavailable("snapshot bucket info")(err)),
    };
    match chunks.cached_info().state.messages {
        0 => Ok(()),
        _ => Err(JetStreamError::Lost {
            stream: name.to_owned(),
            bucket,
        }),
    }
}

/// Hex SHA-256 of what makes a stored message this one and no other: its `Nats-Msg-Id` (a
/// hash of its updates), the time the stream stored it (to the nanosecond) and its payload. A
/// backup restores all three; a stream created again and fed the same webhooks does not have
/// the same times, so its message is not taken for the earlier one.
fn message_digest(message: &StreamMessage) -> String {
    use sha2::Digest as _;
    let id = message
        .headers
        .get(async_nats::header::NATS_MESSAGE_ID)
        .map_or("", |id| id.as_str());
    let stored = message.time.timestamp_nanos_opt().unwrap_or_default();
    let digest = sha2::Sha256::new()
        .chain_update((id.len() as u64).to_be_bytes())
        .chain_update(id.as_bytes())
        .chain_update(stored.to_be_bytes())
        .chain_update(&message.payload)
        .finalize();
    hex::encode(digest)
}

/// Checks an existing stream against what this service relies on; returns the first sequence
/// applied with rules 2 ([`RULES_FROM_KEY`]). The store id it serves is
/// `store_id::served`'s to decide. Not checked, deliberately: `max_msg_size` (adapted to:
/// [`UpdateStream::message_cap`]), `deny_delete` (this service creates streams with it; a stream
/// without it stays accepted as before, and a deleted message stops the applier, never
/// skipped), and what needs a publisher's header or changes nothing of the updates' stream
/// (message TTLs, schedules, atomic or batch publishes, republish, direct gets, compression,
/// placement, consumer limits, description).
fn verify(settings: &StreamSettings, config: &stream::Config) -> Result<u64, JetStreamError> {
    check_source(config)
        .and_then(|()| check_layout(settings, config))
        .and_then(|()| check_durability(settings, config))
        .and_then(|()| check_limits(config))
        .and_then(|()| check_features(config))
        .and_then(|()| check_metadata(config))
        .map_err(|(setting, expected, found)| JetStreamError::Mismatch {
            name: settings.name.clone(),
            setting,
            expected,
            found,
        })
}

/// A setting of an existing stream that differs from what this service relies on:
/// `(setting, expected, found)`.
type Mismatch = (&'static str, String, String);

/// The smaller of the server's `max_payload` and a stream's `max_msg_size` (`max_message_size`
/// below 1: none).
fn message_cap(max_payload: usize, max_message_size: i64) -> usize {
    match usize::try_from(max_message_size) {
        Ok(size) if size > 0 => size.min(max_payload),
        _ => max_payload,
    }
}

/// The settings start-up refuses that an operator can change while replicas run (everything
/// [`verify`] checks but the ones only creation sets, and the metadata, which
/// [`UpdateStream::follow`] follows).
fn refused_setting(config: &stream::Config) -> Result<(), Mismatch> {
    check_source(config)
        .and_then(|()| check_limits(config))
        .and_then(|()| check_features(config))
}

/// Where the messages come from: publishes, not another stream, and a stream still open to
/// them. A mirror refuses publishes, a sealed stream refuses publishes and purges, and a
/// source's messages would be numbered among ours (messages no replica could read).
fn check_source(config: &stream::Config) -> Result<(), Mismatch> {
    if let Some(mirror) = &config.mirror {
        return Err((
            "mirror",
            "none (a mirror cannot be published to: give --nats-stream a stream of its own)".into(),
            format!("{:?}", mirror.name),
        ));
    }
    if let Some(sources) = config
        .sources
        .as_ref()
        .filter(|sources| !sources.is_empty())
    {
        let names: Vec<&str> = sources.iter().map(|source| source.name.as_str()).collect();
        return Err((
            "sources",
            "none (another stream's messages would be numbered among the updates)".into(),
            format!("{names:?}"),
        ));
    }
    if config.sealed {
        return Err((
            "sealed",
            "false (a sealed stream refuses every publish and purge; seal a copy instead)".into(),
            "true".into(),
        ));
    }
    Ok(())
}

/// Where the messages go: exactly our subject, in files, kept by limits.
fn check_layout(settings: &StreamSettings, config: &stream::Config) -> Result<(), Mismatch> {
    // Exactly our subject: another subject's messages would be gaps in our sequence.
    if config.subjects != [settings.subject()] {
        return Err((
            "subjects",
            format!("[{}]", settings.subject()),
            format!("{:?}", config.subjects),
        ));
    }
    if config.storage != StorageType::File {
        return Err(("storage", "file".into(), format!("{:?}", config.storage)));
    }
    if config.retention != RetentionPolicy::Limits {
        return Err((
            "retention",
            "limits".into(),
            format!("{:?}", config.retention),
        ));
    }
    Ok(())
}

/// That an acknowledged publish is stored, on as many replicas as configured, and that a
/// repeated publish is recognised for at least the duplicate window.
fn check_durability(settings: &StreamSettings, config: &stream::Config) -> Result<(), Mismatch> {
    if config.persist_mode == Some(PersistenceMode::Async) {
        return Err((
            "persist_mode",
            "default (acknowledge once stored)".into(),
            "async".into(),
        ));
    }
    if config.num_replicas.max(1) != settings.replicas {
        return Err((
            "replicas",
            settings.replicas.to_string(),
            config.num_replicas.to_string(),
        ));
    }
    if config.duplicate_window < settings.duplicate_window {
        let expected = format!(
            "at least {}",
            humantime::format_duration(settings.duplicate_window)
        );
        return Err((
            "duplicate_window",
            expected,
            humantime::format_duration(config.duplicate_window).to_string(),
        ));
    }
    Ok(())
}

/// `--nats-max-bytes` sets the limit of a stream this service creates; an existing stream
/// keeps its own (changing it is the NATS operator's call: `nats stream edit`), which a replica
/// started with another says, rather than let the flag look applied.
fn warn_if_limit_differs(settings: &StreamSettings, config: &stream::Config) {
    let stream_limit = u64::try_from(config.max_bytes)
        .ok()
        .filter(|bytes| *bytes > 0);
    if let Some(flag) = settings.max_bytes
        && stream_limit != Some(flag)
    {
        let stream_limit = stream_limit.map_or("none".to_owned(), |bytes| bytes.to_string());
        tracing::warn!(
            stream = %settings.name,
            nats_max_bytes = flag,
            stream_max_bytes = %stream_limit,
            "--nats-max-bytes differs from the existing stream's limit, which applies; change \
             the stream's with `nats stream edit --max-bytes`"
        );
    }
}

/// Limits that remove messages on their own would remove what no snapshot covers yet.
/// Every update is published on the one subject, so a per-subject limit is a limit on the
/// whole stream; it discards the oldest messages whatever `discard` says, unless
/// `discard_new_per_subject` (with discard new) makes it refuse publishes instead. The
/// stream's `max_msg_size` is not refused: the publisher keeps its messages under it
/// ([`UpdateStream::message_cap`]), and start-up checks `--max-body-bytes` against it.
fn check_limits(config: &stream::Config) -> Result<(), Mismatch> {
    if !config.max_age.is_zero() {
        let found = humantime::format_duration(config.max_age).to_string();
        return Err((
            "max_age",
            "none (purged below snapshots instead)".into(),
            found,
        ));
    }
    let limited = config.max_bytes > 0 || config.max_messages > 0;
    if limited && config.discard != DiscardPolicy::New {
        return Err((
            "discard",
            "new (refuse when full)".into(),
            format!("{:?}", config.discard),
        ));
    }
    if config.max_messages_per_subject > 0
        && !(config.discard == DiscardPolicy::New && config.discard_new_per_subject)
    {
        return Err((
            "max_msgs_per_subject",
            "none (every update is on one subject, so this limit removes acknowledged \
             updates no snapshot covers; remove it with `nats stream edit \
             --max-msgs-per-subject=-1`)"
                .into(),
            config.max_messages_per_subject.to_string(),
        ));
    }
    Ok(())
}

/// Features that make a publish go unacknowledged or refused, or a purge impossible.
fn check_features(config: &stream::Config) -> Result<(), Mismatch> {
    if config.no_ack {
        return Err((
            "no_ack",
            "false (a publish must be acknowledged once stored)".into(),
            "true".into(),
        ));
    }
    if config.deny_purge {
        return Err((
            "deny_purge",
            "false (the stream is purged below published snapshots, and a full one to make \
             room)"
                .into(),
            "true".into(),
        ));
    }
    if config.allow_rollup {
        return Err((
            "allow_rollup",
            "false (one rollup message on the updates' subject would remove every update)".into(),
            "true".into(),
        ));
    }
    if config.max_consumers > 0 {
        return Err((
            "max_consumers",
            "none (each replica reads through a consumer it recreates after every gap, the \
             one it left lingering 30 s: a cap leaves replicas unable to follow)"
                .into(),
            config.max_consumers.to_string(),
        ));
    }
    if let Some(transform) = config
        .subject_transform
        .as_ref()
        .filter(|transform| !transform.destination.is_empty())
    {
        return Err((
            "subject_transform",
            "none (the updates must stay on their subject)".into(),
            format!("{} -> {}", transform.source, transform.destination),
        ));
    }
    if config.allow_message_counter {
        return Err((
            "allow_msg_counter",
            "false (a counter stream refuses ordinary publishes)".into(),
            "true".into(),
        ));
    }
    Ok(())
}

/// The stream's metadata: our message format, our merge rules (and since when: returned), a
/// store id (returned).
fn check_metadata(config: &stream::Config) -> Result<u64, Mismatch> {
    match config.metadata.get(FORMAT_KEY).map(String::as_str) {
        Some(FORMAT) => {}
        found => {
            return Err(("metadata format", FORMAT.into(), format!("{found:?}")));
        }
    }
    match config.metadata.get(RULES_KEY).map(String::as_str) {
        Some(RULES) => {}
        Some(UPGRADABLE_RULES) => {
            return Err((
                "metadata merge rules version",
                format!(
                    "{RULES}, the rules of this build (the stream's are those of an earlier \
                     build: stop every replica, start one of this build with \
                     --nats-upgrade-rules, then the others)"
                ),
                format!("{UPGRADABLE_RULES:?}"),
            ));
        }
        found => {
            return Err((
                "metadata merge rules version",
                format!(
                    "{RULES}, the rules of this build (a stream of other rules is applied only \
                     by a build that implements them)"
                ),
                format!("{found:?}"),
            ));
        }
    }
    let rules_from = match config.metadata.get(RULES_FROM_KEY) {
        None => 0,
        Some(from) => from.parse().map_err(|_| {
            let expected = "a stream sequence".to_string();
            ("metadata rules 2 start", expected, format!("{from:?}"))
        })?,
    };
    match config.metadata.get(STORE_ID_KEY) {
        Some(id) if !id.is_empty() => Ok(rules_from),
        _ => Err(("metadata store id", "a store id".into(), "none".into())),
    }
}

fn is_not_found(err: &async_nats::jetstream::context::GetStreamError) -> bool {
    use async_nats::jetstream::context::GetStreamErrorKind;
    matches!(err.kind(), GetStreamErrorKind::JetStream(err) if err.error_code() == ErrorCode::STREAM_NOT_FOUND)
}

/// Records in the metadata of stream `name` that `store_id` is the id of incarnation `this`:
/// the record written (or found written), or `None` when the stream is no longer `this` (it
/// moved on meanwhile: the next start records it). Only where there was no record, and on a
/// new incarnation: an update carries the whole configuration, and may undo an operator's
/// change made a moment before (the configuration is read again right before it, which
/// narrows that, but a stream leader's answer may lag a change being applied). Every replica
/// that races here writes the same id and group.
async fn record_incarnation(
    context: &async_nats::jetstream::Context,
    name: &str,
    store_id: &str,
    this: &Incarnation,
) -> Result<Option<(String, Option<Incarnation>)>, JetStreamError> {
    let info = context
        .get_stream(name)
        .await
        .map_err(unavailable("stream info"))?
        .cached_info()
        .clone();
    if Incarnation::of(&info) != *this {
        return Ok(None);
    }
    let written = (store_id.to_owned(), Some(this.clone()));
    if store_id::record_of(&info.config.metadata) == written {
        // Another replica wrote it.
        return Ok(Some(written));
    }
    let mut config = info.config;
    store_id::record(&mut config.metadata, store_id, this);
    let record = store_id::record_of(&config.metadata);
    context
        .update_stream(config)
        .await
        .map_err(unavailable("stream update"))?;
    Ok(Some(record))
}

/// Another replica created the stream between our lookup and our creation, with its own
/// store id (so "a different configuration").
fn created_meanwhile(err: &async_nats::jetstream::context::CreateStreamError) -> bool {
    matches!(err.kind(), CreateStreamErrorKind::JetStream(err) if err.error_code() == ErrorCode::STREAM_NAME_EXIST)
}

/// How JetStream's "no suitable peers for placement" (`CLUSTER_NO_PEERS`) says that a server of
/// the cluster has not been heard from: "peer offline" while its first statistics are still to
/// come (just started), "miscellaneous issue" while the server answering knows nothing of it
/// yet (it restarted without it). Both pass once that server is heard from; the other reasons
/// (storage, tags, a cluster too small) do not.
const UNHEARD_PEER: [&str; 2] = ["peer offline", "miscellaneous issue"];

fn create_failed(
    settings: &StreamSettings,
    err: async_nats::jetstream::context::CreateStreamError,
) -> JetStreamError {
    match err.kind() {
        CreateStreamErrorKind::JetStream(inner)
            if inner.error_code() == ErrorCode::STREAM_REPLICAS_NOT_SUPPORTED =>
        {
            JetStreamError::ReplicasNotSupported {
                replicas: settings.replicas,
                reason: inner.to_string(),
            }
        }
        // A server of the cluster the meta leader has not heard from yet: placement works once
        // it is, so this is worth another attempt. Refused, it stopped a replica started with
        // its cluster (seen in the load tool's smoke test).
        CreateStreamErrorKind::JetStream(inner)
            if inner.error_code() == ErrorCode::CLUSTER_NO_PEERS
                && UNHEARD_PEER
                    .iter()
                    .any(|reason| inner.to_string().contains(reason)) =>
        {
            JetStreamError::Unavailable {
                operation: "stream create",
                reason: format!(
                    "{inner} (a JetStream server of the cluster has not been heard from since \
                     it or the cluster started)"
                ),
            }
        }
        CreateStreamErrorKind::JetStream(inner) => {
            let mut reason = inner.to_string();
            if settings.replicas > 1 && inner.error_code() == ErrorCode::INSUFFICIENT_RESOURCES {
                reason.push_str(&format!(
                    " (--nats-replicas {} needs that many JetStream servers in the cluster)",
                    settings.replicas
                ));
            }
            JetStreamError::Refused {
                operation: "stream create",
                reason,
            }
        }
        _ => unavailable("stream create")(err),
    }
}

fn publish_failed(err: async_nats::jetstream::context::PublishError) -> JetStreamError {
    // Still being stored by another publish of the same id when time ran out: it may well be
    // in the stream, like a publish whose acknowledgement did not come.
    let in_process = jetstream_code(&err) == Some(ErrorCode::STREAM_DUPLICATE_MESSAGE_CONFLICT);
    match err.kind() {
        PublishErrorKind::TimedOut => JetStreamError::Unconfirmed {
            operation: "publish",
            reason: err.to_string(),
        },
        _ if in_process => JetStreamError::Unconfirmed {
            operation: "publish",
            reason: err.to_string(),
        },
        PublishErrorKind::BrokenPipe
        | PublishErrorKind::StreamNotFound
        | PublishErrorKind::MaxAckPending => unavailable("publish")(err),
        PublishErrorKind::WrongLastMessageId
        | PublishErrorKind::WrongLastSequence
        | PublishErrorKind::MaxPayloadExceeded
        | PublishErrorKind::Other => JetStreamError::Refused {
            operation: "publish",
            reason: err.to_string(),
        },
    }
}

/// The JetStream error code somewhere in an error's source chain.
pub(super) fn jetstream_code(err: &(dyn std::error::Error + 'static)) -> Option<ErrorCode> {
    let mut current = Some(err);
    while let Some(err) = current {
        if let Some(js) = err.downcast_ref::<async_nats::jetstream::Error>() {
            return Some(js.error_code());
        }
        current = err.source();
    }
    None
}

/// Maps any client error of `operation` to [`JetStreamError::Unavailable`].
pub(super) fn unavailable<E: std::fmt::Display>(
    operation: &'static str,
) -> impl Fn(E) -> JetStreamError {
    move |err| JetStreamError::Unavailable {
        operation,
        reason: err.to_string(),
    }
}

/// Whether a stream's info names its leader: a server outside a cluster names itself; a
/// clustered stream's follower answering without a leader leaves it out.
fn has_leader(info: &stream::Info) -> bool {
    info.cluster.as_ref().is_none_or(|cluster| {
        cluster
            .leader
            .as_deref()
            .is_some_and(|leader| !leader.is_empty())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use async_nats::jetstream::context::PublishError;

    fn refusal(code: u64, description: &str) -> PublishError {
        let error: async_nats::jetstream::Error = serde_json::from_value(serde_json::json!({
            "code": 409,
            "err_code": code,
            "description": description,
        }))
        .expect("a JetStream error");
        PublishError::with_source(PublishErrorKind::Other, error)
    }

    /// The digest that tells a restored stream's message from another: the same message id,
    /// stored time and payload give the same digest; any one of them different, another.
    #[test]
    fn a_message_digest_covers_its_id_its_stored_time_and_its_payload() {
        let message = |id: &str, nanos: i64, payload: &'static [u8]| {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert(async_nats::header::NATS_MESSAGE_ID, id);
            StreamMessage {
                subject: "S.updates".into(),
                sequence: 7,
                headers,
                payload: bytes::Bytes::from_static(payload),
                time: chrono::DateTime::from_timestamp_nanos(nanos),
            }
        };
        let digest = message_digest(&message("id", 1_000_000_001, b"batch"));
        assert_eq!(digest.len(), 64);
        assert_eq!(
            digest,
            message_digest(&message("id", 1_000_000_001, b"batch"))
        );
        for other in [
            message("other", 1_000_000_001, b"batch"),
            message("id", 1_000_000_002, b"batch"),
            message("id", 1_000_000_001, b"other"),
            // The bytes cut at another place between id and what follows.
            message("i", 1_000_000_001, b"batch"),
        ] {
            assert_ne!(digest, message_digest(&other));
        }
    }

    /// Every setting that would lose acknowledged updates or refuse every publish or purge is
    /// refused by name; the configuration this service creates passes.
    #[test]
    fn start_up_refuses_each_setting_that_breaks_the_stream_by_name() {
        let settings = StreamSettings {
            name: "S".into(),
            replicas: 1,
            duplicate_window: Duration::from_secs(7200),
            max_bytes: Some(1 << 30),
        };
        let made = settings.stream_config("id");
        assert_eq!(verify(&settings, &made).unwrap(), 0);
        type Edit = fn(&mut stream::Config);
        let refused: [(&str, Edit); 11] = [
            ("max_msgs_per_subject", |c| c.max_messages_per_subject = 50),
            ("sealed", |c| c.sealed = true),
            ("mirror", |c| {
                c.mirror = Some(stream::Source {
                    name: "OTHER".into(),
                    ..Default::default()
                });
            }),
            ("sources", |c| {
                c.sources = Some(vec![stream::Source {
                    name: "OTHER".into(),
                    ..Default::default()
                }]);
            }),
            ("no_ack", |c| c.no_ack = true),
            ("deny_purge", |c| c.deny_purge = true),
            ("allow_rollup", |c| c.allow_rollup = true),
            ("max_consumers", |c| c.max_consumers = 10),
            ("subject_transform", |c| {
                c.subject_transform = Some(stream::SubjectTransform {
                    source: "S.updates".into(),
                    destination: "S.other".into(),
                });
            }),
            ("allow_msg_counter", |c| c.allow_message_counter = true),
            ("max_age", |c| c.max_age = Duration::from_secs(60)),
        ];
        for (setting, edit) in refused {
            let mut config = made.clone();
            edit(&mut config);
            let error = verify(&settings, &config).unwrap_err().to_string();
            assert!(error.starts_with(&format!("S: {setting} is ")), "{error}");
            assert!(refused_setting(&config).is_err(), "{setting} while running");
        }
        // A per-subject limit that refuses publishes instead of discarding is a size limit
        // like max_msgs with discard new; a smaller max_msg_size is adapted to.
        let mut config = made.clone();
        config.max_messages_per_subject = 50;
        config.discard_new_per_subject = true;
        config.max_message_size = 4096;
        assert!(verify(&settings, &config).is_ok());
        assert_eq!(message_cap(1 << 20, 4096), 4096);
        assert_eq!(message_cap(1 << 20, -1), 1 << 20);
        assert_eq!(message_cap(1 << 20, 0), 1 << 20);
        assert_eq!(message_cap(1024, 4096), 1024);
    }

    /// A publish whose id another publish was still storing when time ran out may be in the
    /// stream: not a refusal. A refusal with another code stays one.
    #[test]
    fn a_publish_still_in_process_at_the_deadline_is_unconfirmed_not_refused() {
        let in_process = refusal(10158, "duplicate message id is in process");
        assert!(matches!(
            publish_failed(in_process),
            JetStreamError::Unconfirmed {
                operation: "publish",
                ..
            }
        ));
        let full = refusal(10077, "maximum bytes exceeded");
        assert!(matches!(
            publish_failed(full),
            JetStreamError::Refused {
                operation: "publish",
                ..
            }
        ));
    }

    /// A stream placed while a server of the cluster has not been heard from is tried again; a
    /// placement that cannot work (storage, tags) stays refused, and so does a cluster too small
    /// for the replicas asked, with the hint.
    #[test]
    fn a_placement_refused_for_a_server_not_heard_from_is_tried_again_and_others_are_refused() {
        let settings = StreamSettings {
            name: "S".into(),
            replicas: 3,
            duplicate_window: Duration::from_secs(120),
            max_bytes: None,
        };
        let refused = |code: u64, description: &str| {
            let error: async_nats::jetstream::Error = serde_json::from_value(serde_json::json!({
                "code": 500,
                "err_code": code,
                "description": description,
            }))
            .expect("a JetStream error");
            create_failed(&settings, error.into())
        };
        for unheard in ["peer offline", "miscellaneous issue"] {
            let description = format!("no suitable peers for placement, {unheard}");
            let tried_again = refused(10005, &description);
            assert!(
                matches!(&tried_again, JetStreamError::Unavailable { operation: "stream create", reason }
                    if reason.contains(&description) && reason.contains("not been heard from")),
                "{tried_again:?}"
            );
        }
        let storage = refused(
            10005,
            "no suitable peers for placement, insufficient storage",
        );
        assert!(
            matches!(
                &storage,
                JetStreamError::Refused {
                    operation: "stream create",
                    ..
                }
            ),
            "{storage:?}"
        );
        let small = refused(10023, "insufficient resources");
        assert!(
            matches!(&small, JetStreamError::Refused { reason, .. }
                if reason.contains("--nats-replicas 3 needs that many")),
            "{small:?}"
        );
    }
}
