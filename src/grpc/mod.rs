//! The gRPC adapter: `gameball.profiles.v1.ProfileService` over the store and watch feeds.
//!
//! Each RPC checks its request, calls the domain, and converts the result; errors go through
//! `crate::status`. Reads never touch the sequencer. A read with `min_revision` waits until the
//! store has applied it, bounded by the call's deadline (`grpc-timeout`). Open watch streams are
//! capped (`--max-watch-streams`, and `--max-watch-streams-per-connection` on each connection).
//! Health and reflection are wired up in `crate::server`, not here;
//! `auth` checks bearer tokens and `transport` sets up TLS, keepalive and per-call metrics;
//! `open_streams` caps health's and reflection's open-ended streams.

pub mod admin;
pub mod answer_bytes;
pub mod auth;
pub mod backup;
mod byte_budgets;
pub mod certificates;
pub mod codec;
pub mod control_frames;
mod convert;
mod data_frames;
pub mod dead_letters;
pub mod open_streams;
mod page_token;
mod profile_reply;
mod reconcile;
pub mod request_bytes;
pub mod transport;
mod watch;

pub use watch::ProfileServiceRoutes;

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arcstr::ArcStr;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_stream::Stream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::{Request, Response, Status};

use crate::error::Error;
use crate::metrics::{InProgress, Metrics};
use crate::pb;
use crate::pb::profile_service_server::ProfileService;
use crate::profile::{Field, Profile, ProfileKey};
use crate::replication::ReplicaStatus;
use crate::status::grpc_status;
use crate::store::{self, Store};
use crate::watch::Watchers;

/// Most ids one BatchGetProfiles may ask for.
pub const MAX_BATCH_IDS: usize = 1000;
/// ListProfiles page size when the request says 0.
pub const DEFAULT_PAGE_SIZE: usize = 100;
/// Largest ListProfiles page; larger requests are capped.
pub const MAX_PAGE_SIZE: usize = 1000;
/// Progress interval when the request says 0.
pub const DEFAULT_PROGRESS_INTERVAL: Duration = Duration::from_secs(10);
/// The stream limit when none is set: as many as `streams_closed` can count.
const UNLIMITED_STREAMS: usize = u32::MAX as usize;
/// The largest answer until [`ProfileApi::with_max_message_bytes`]: gRPC's usual 4 MiB.
const DEFAULT_MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;
/// Most customer ids one WatchProfiles filter may name.
pub const MAX_WATCH_IDS: usize = 1000;
/// Most bytes of customer ids one WatchProfiles filter may name (256 bytes each for the most
/// ids): a stream keeps its filter while it is open, and 1,000 ids of 4 KB each kept 4 MB a
/// stream (found by an adversarial run). The longest one id may be, so webhooks refuse longer.
pub const MAX_WATCH_ID_BYTES: usize = crate::profile::MAX_CUSTOMER_ID_BYTES;
/// Most field names one WatchProfiles filter may name.
pub const MAX_WATCH_FIELDS: usize = 100;
/// Most bytes of field names one WatchProfiles filter may name, all together; and most bytes
/// of its `client_id`, and of its `store_id`. Kept while the stream is open, as its ids are:
/// unbounded, 100 names of 40 KB (or one 4 MB `client_id`) kept 4.4 MB a stream (adversary
/// round 11, F1). The longest a `client_id` may be, so webhooks refuse longer.
pub const MAX_WATCH_TEXT_BYTES: usize = crate::profile::MAX_CLIENT_ID_BYTES;
/// The request compressions every service but reflection takes (tonic inflates a message
/// within the message limit); answers are not compressed.
pub const ACCEPTED_ENCODINGS: [tonic::codec::CompressionEncoding; 2] = [
    tonic::codec::CompressionEncoding::Gzip,
    tonic::codec::CompressionEncoding::Deflate,
];
/// Longest a `min_revision` read waits, whatever its deadline.
pub const MAX_MIN_REVISION_WAIT: Duration = Duration::from_secs(30);
/// How long a replica's `min_revision` read waits before it asks the stream whether the
/// revision was ever assigned (a request to NATS; most reads are answered well before).
const NEVER_ASSIGNED_CHECK_AFTER: Duration = Duration::from_millis(500);

/// The ProfileService implementation.
pub struct ProfileApi {
    store: Store,
    watchers: Watchers,
    durable: bool,
    started: Instant,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    /// One permit per open watch stream, held by the stream until tonic drops it. A semaphore
    /// rather than a counter: the permit is released by `Drop`, so every way a stream ends
    /// (client gone, feed ended, shutdown) gives its slot back exactly once.
    watch_streams: Arc<Semaphore>,
    max_watch_streams: usize,
    metrics: Metrics,
    /// The replica's standing, in replicated mode (GetServerInfo reports it).
    replica: Option<ReplicaStatus>,
    /// Encoded changes shared by every watch stream (`watch.rs`).
    encodings: Arc<watch::SharedEncodings>,
    /// The largest message sent: ListProfiles pages stop short of it, and a BatchGetProfiles
    /// answer past it is refused by name.
    max_message_bytes: usize,
}

impl ProfileApi {
    /// A service reading `store` (persisted when `durable`) and opening watches through
    /// `watchers` (the same store's watch layer); watch feeds run on `tracker` and end on
    /// `shutdown`; watch activity is counted in `metrics`. Open watch streams are not limited
    /// until [`ProfileApi::with_max_watch_streams`].
    pub fn new(
        store: Store,
        watchers: Watchers,
        durable: bool,
        shutdown: CancellationToken,
        tracker: TaskTracker,
        metrics: Metrics,
    ) -> Self {
        ProfileApi {
            store,
            watchers,
            durable,
            started: Instant::now(),
            shutdown,
            tracker,
            watch_streams: Arc::new(Semaphore::new(UNLIMITED_STREAMS)),
            max_watch_streams: UNLIMITED_STREAMS,
            metrics,
            replica: None,
            encodings: Arc::default(),
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
        }
    }

    /// Answers of at most `max` bytes (the transport's limit, `--grpc-max-message-bytes`).
    pub fn with_max_message_bytes(mut self, max: usize) -> Self {
        self.max_message_bytes = max;
        self
    }

    /// A replica's API: GetServerInfo also reports `replica`'s name, position and lag.
    pub fn with_replica(mut self, replica: ReplicaStatus) -> Self {
        self.replica = Some(replica);
        self
    }

    /// A ListProfiles page as of `as_of` (read before it): up to `page_size` profiles of
    /// `client_id` after `after` in tier `tier_name` at `as_of` (`Store::as_of`), and the last
    /// key examined when keys remain. Never empty while keys remain: a page that came out
    /// empty (all its profiles created, or moved out of the tier, while it was read) goes on
    /// to the next keys.
    async fn page_as_of(
        &self,
        (client_id, tier_name): (&str, &str),
        mut after: Option<ProfileKey>,
        page_size: usize,
        as_of: u64,
    ) -> Result<(Vec<Arc<Profile>>, Option<ProfileKey>), Status> {
        loop {
            let (mut profiles, next) = self
                .scan_yielding((client_id, tier_name), after, page_size, as_of)
                .await;
            let changed_meanwhile = profiles.iter().any(|profile| profile.revision > as_of);
            (self.store.as_of(&mut profiles, as_of)).map_err(changed_too_fast)?;
            if changed_meanwhile && !tier_name.is_empty() {
                profiles.retain(|profile| in_tier(profile, tier_name));
            }
            match next {
                Some(next) if profiles.is_empty() => after = Some(next),
                next => return Ok((profiles, next)),
            }
        }
    }

    /// Up to `page_size` profiles of `client_id` (empty: every account) after `after`, of
    /// tier `tier_name` (empty: any) or changed after `as_of` (whose tier at `as_of` the
    /// caller decides: skipped for their tier now, those that left the tier while the page
    /// was read were missing from it; found by an adversarial run), and the last key examined
    /// when keys remain. Yields to the worker's other tasks every
    /// [`store::EXAMINE_PER_TURN`] keys: a filter that matches little would otherwise hold a
    /// tokio worker, and the calls and watch streams queued on it, for the whole scan of the
    /// account.
    async fn scan_yielding(
        &self,
        (client_id, tier_name): (&str, &str),
        mut after: Option<ProfileKey>,
        page_size: usize,
        as_of: u64,
    ) -> (Vec<Arc<Profile>>, Option<ProfileKey>) {
        let client_id = Some(client_id).filter(|id| !id.is_empty());
        let keep = |profile: &Profile| profile.revision > as_of || in_tier(profile, tier_name);
        let mut profiles = Vec::new();
        loop {
            let wanted = page_size - profiles.len();
            let examine = store::EXAMINE_PER_TURN;
            let scan = self
                .store
                .scan_at_most(client_id, after.as_ref(), wanted, examine, keep);
            profiles.extend(scan.profiles);
            match scan.next {
                Some(next) if profiles.len() < page_size => {
                    after = Some(next);
                    tokio::task::yield_now().await;
                }
                next => return (profiles, next),
            }
        }
    }

    /// Refuses a `store_id` (if set) that is not this store's, then waits until the store has
    /// applied `min_revision` (0: no wait), at most until shortly
    /// before the call's deadline (so the caller gets this answer, not its own timeout) and
    /// [`MAX_MIN_REVISION_WAIT`]; past it, `RevisionNotApplied` with the applied revision, and
    /// at shutdown at once `StoppedBeforeRevision`. A revision the store never assigned is
    /// `RevisionNeverAssigned`: at once on a single node, and on a replica once it has caught
    /// up with what its cluster had acknowledged when the read came.
    async fn wait_for(
        &self,
        (store_id, min_revision): (&str, u64),
        metadata: &tonic::metadata::MetadataMap,
    ) -> Result<(), Status> {
        // Revisions of another store (one emptied or restored since) mean other changes here:
        // once this one has passed the number, waiting would be satisfied by them.
        if !store_id.is_empty() && store_id != self.store.store_id() {
            return Err(grpc_status(Error::StoreChanged {
                requested: store_id.to_owned(),
                current: self.store.store_id().to_owned(),
            }));
        }
        let current = self.store.revision();
        if min_revision == 0 || current >= min_revision {
            return Ok(());
        }
        // A single node answers a webhook once its revision is visible here: one beyond the
        // store's was never assigned by it, and waiting would only let unrelated writes reach
        // the number (found by an adversarial run). A replica may be behind its cluster: it
        // waits.
        if self.replica.is_none() {
            return Err(grpc_status(Error::RevisionNeverAssigned {
                requested: min_revision,
                current,
            }));
        }
        let budget = deadline(metadata).map_or(MAX_MIN_REVISION_WAIT, |timeout| {
            // A tenth of the time (at most 100 ms) is left for the answer to travel.
            let margin = (timeout / 10).min(Duration::from_millis(100));
            timeout.saturating_sub(margin).min(MAX_MIN_REVISION_WAIT)
        });
        let mut revisions = self.store.subscribe();
        let applied = revisions.wait_for(|revision| *revision >= min_revision);
        // Once this replica holds everything its cluster had acknowledged when the read came
        // (the barrier a resumed watch waits for), a revision it still lacks was never
        // assigned: answered so at once, as a single node does. It waited out the whole
        // budget, 30 s, and then said to retry (found by two reviews).
        let never_assigned = async {
            // Reads that a write elsewhere just passed wait milliseconds: asked only after
            // that, so that they do not each send the stream a request.
            tokio::time::sleep(NEVER_ASSIGNED_CHECK_AFTER).await;
            let caught_up = match self.watchers.catch_up() {
                Some(catch_up) => catch_up.caught_up().await.is_ok(),
                None => false,
            };
            if !caught_up || self.store.revision() >= min_revision {
                std::future::pending::<()>().await;
            }
        };
        // Ends at shutdown too, as watch feeds do: a pending read held the drain for the
        // whole --shutdown-grace and was then cut with a transport error, not a status
        // (found by an adversarial run).
        tokio::select! {
            waited = tokio::time::timeout(budget, applied) => match waited {
                Ok(Ok(_)) => Ok(()),
                _ => Err(grpc_status(Error::RevisionNotApplied {
                    requested: min_revision,
                    applied: self.store.revision(),
                })),
            },
            () = never_assigned => Err(grpc_status(Error::RevisionNeverAssigned {
                requested: min_revision,
                current: self.store.revision(),
            })),
            () = self.shutdown.cancelled() => Err(grpc_status(Error::StoppedBeforeRevision {
                requested: min_revision,
                applied: self.store.revision(),
            })),
        }
    }

    /// At most `max` watch streams open at once; more get RESOURCE_EXHAUSTED.
    pub fn with_max_watch_streams(mut self, max: usize) -> Self {
        let max = max.min(UNLIMITED_STREAMS);
        self.watch_streams = Arc::new(Semaphore::new(max));
        self.max_watch_streams = max;
        self
    }

    /// Completes once every watch stream this service opened has been closed (each holds a
    /// permit until tonic drops it, after its last message).
    pub fn streams_closed(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let streams = Arc::clone(&self.watch_streams);
        let all = u32::try_from(self.max_watch_streams).expect("at most u32::MAX streams");
        async move {
            // The semaphore is never closed, so acquiring only waits.
            let _all = streams.acquire_many(all).await;
        }
    }
}

/// What an open watch stream holds until tonic drops it: its slot under `--max-watch-streams`
/// and its count in the open-streams gauge. Fields drop in order, so the slot is free by the
/// time the gauge goes down.
struct OpenWatch {
    _slot: OwnedSemaphorePermit,
    // Its slot under `--max-watch-streams-per-connection`.
    _connection_slot: Option<OwnedSemaphorePermit>,
    _gauge: InProgress,
}

/// A request's `page_size`: 0 means the RPC's `default`, larger than its `max` is capped,
/// negative is refused. Shared by every paged RPC, each with the sizes its proto documents.
pub(crate) fn page_size(requested: i32, default: usize, max: usize) -> Result<usize, Status> {
    match usize::try_from(requested) {
        Err(_) => Err(grpc_status(Error::invalid(
            "page_size",
            "must not be negative",
        ))),
        Ok(0) => Ok(default),
        Ok(size) => Ok(size.min(max)),
    }
}

fn required<'a>(value: &'a str, field: &str) -> Result<&'a str, Status> {
    if value.is_empty() {
        return Err(grpc_status(Error::invalid(field, "is required")));
    }
    Ok(value)
}

/// Every read answers with a store revision R such that what it returns is the state at R:
/// each change up to R is in it and none after. R is read before the profiles (a commit makes
/// its profiles visible before its revision: `Store::commit`), and a profile read at a later
/// revision is given as it was at R (`Store::as_of`). Read after them, R could count a change
/// that a profile read earlier lacked, and a client watching on from R + 1 never got it.
impl ProfileApi {
    /// GetProfile without its answer: checks the request, waits for `min_revision`, finds the
    /// profile; returns it with the revision the read is served at.
    async fn find_profile(
        &self,
        request: Request<pb::GetProfileRequest>,
    ) -> Result<(Arc<Profile>, u64), Status> {
        let (metadata, _, request) = request.into_parts();
        let client_id = required(&request.client_id, "client_id")?;
        let customer_id = required(&request.customer_id, "customer_id")?;
        self.wait_for((&request.store_id, request.min_revision), &metadata)
            .await?;
        // Read first: every change up to it is visible to the read that follows (`commit`).
        let before = self.store.revision();
        let profile = self
            .store
            .get(&ProfileKey::new(client_id, customer_id))
            .ok_or_else(|| {
                grpc_status(Error::NotFound {
                    client_id: client_id.to_owned(),
                    customer_id: customer_id.to_owned(),
                })
            })?;
        // One profile: as of its own revision if it changed since, else as of `before`.
        let store_revision = before.max(profile.revision);
        Ok((profile, store_revision))
    }
}

/// Refuses an answer of `bytes` that carries `profile` (at `revision`) when it is larger than
/// a message may be, naming the profile: tonic's own refusal, as it writes the answer, is a
/// bare "encoded message length too large".
pub(crate) fn fits_alone(
    profile: &Profile,
    revision: u64,
    bytes: usize,
    limit: usize,
) -> Result<(), Status> {
    if bytes <= limit {
        return Ok(());
    }
    Err(grpc_status(Error::ProfileTooLarge {
        client_id: profile.key.client_id.to_string(),
        customer_id: profile.key.customer_id.to_string(),
        revision,
        bytes,
        limit,
    }))
}

/// A ListProfiles answer of the scanned `profiles` that fits in `max_message_bytes`: as many
/// as fit, and the token of the next page (`next` when all fit, else the last profile kept:
/// the rest come after it), made by `token`. A first profile too large for any answer is
/// named in `too_large` instead and the page ends after it, so a listing goes past it.
/// Sizes are summed as the profiles are converted rather than by encoding the answer twice.
fn fitted_page(
    (store, as_of): (&Store, u64),
    profiles: &[Arc<Profile>],
    next: Option<ProfileKey>,
    max_message_bytes: usize,
    token: impl Fn(&ProfileKey) -> String,
) -> pb::ListProfilesResponse {
    let mut page = Vec::with_capacity(profiles.len());
    let mut sizes = Vec::with_capacity(profiles.len());
    let (mut next, mut used) = (next, 0);
    for profile in profiles {
        let converted = convert::profile(profile);
        let size = prost::encoding::message::encoded_len(1, &converted);
        // The answer's other fields (a revision, a token holding a key) are added below, which
        // may take a profile or more off again.
        if used + size > max_message_bytes && !page.is_empty() {
            next = Some(profiles[page.len() - 1].key.clone());
            break;
        }
        used += size;
        sizes.push(size);
        page.push(converted);
    }
    loop {
        let kept = page.len();
        let rest = pb::ListProfilesResponse {
            profiles: Vec::new(),
            store_revision: as_of,
            next_page_token: next.as_ref().map(&token).unwrap_or_default(),
            store_id: store.store_id().to_owned(),
            too_large: Vec::new(),
        };
        if used + prost::Message::encoded_len(&rest) <= max_message_bytes || kept == 0 {
            return pb::ListProfilesResponse {
                profiles: page,
                ..rest
            };
        }
        if kept == 1 {
            // Alone and still too large: no page can carry it. The listing goes on after it.
            let key = &profiles[0].key;
            return pb::ListProfilesResponse {
                next_page_token: token(key),
                too_large: vec![pb::ProfileKey {
                    client_id: key.client_id.to_string(),
                    customer_id: key.customer_id.to_string(),
                }],
                ..rest
            };
        }
        page.pop();
        used -= sizes.pop().unwrap_or_default();
        next = Some(profiles[kept - 2].key.clone());
    }
}

/// About the largest WatchProfiles change a profile can make, its previous state included,
/// when webhooks carry at most `max_body_bytes`: the extras at the bound as a protobuf
/// `Struct` (at most 5.5 times their JSON, a list of one-digit numbers being the worst case),
/// and each text field and id as large as a body. A server whose message limit is below it
/// may hold a profile it cannot send (the start-up log warns).
pub fn largest_change_bytes(max_body_bytes: usize) -> usize {
    let extras = crate::profile::MAX_EXTRAS_JSON_BYTES * 11 / 2;
    let texts = 7 * max_body_bytes;
    2 * (extras + texts + 1024) + 1024
}

/// BatchGetProfiles' missing ids in request order (duplicates included): those not found,
/// and those found but `created` after the revision answered.
fn missing_in_request_order(
    requested: &[String],
    not_found: Vec<String>,
    created: &[ProfileKey],
) -> Vec<String> {
    if created.is_empty() {
        return not_found;
    }
    let missing: std::collections::HashSet<&str> = (not_found.iter().map(String::as_str))
        .chain(created.iter().map(|key| &*key.customer_id))
        .collect();
    (requested.iter())
        .filter(|id| missing.contains(id.as_str()))
        .cloned()
        .collect()
}

/// Whether `profile` passes ListProfiles' `tier_name` filter (empty: every profile does).
fn in_tier(profile: &Profile, tier_name: &str) -> bool {
    tier_name.is_empty() || profile.get_text(Field::TierName) == Some(tier_name)
}

/// A read of many profiles that could not be made consistent: more changes landed while it ran
/// than the history keeps.
fn changed_too_fast(compacted: store::Compacted) -> Status {
    grpc_status(Error::Unavailable {
        reason: format!(
            "the store changed faster than this read could be answered as of one revision \
             (its history now starts at {}): retry",
            compacted.oldest
        ),
    })
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchProfilesResponse, Status>> + Send>>;

#[tonic::async_trait]
impl ProfileService for ProfileApi {
    /// Served by [`ProfileServiceRoutes`] (`profile_reply`) rather than through here; kept
    /// whole, as the generated message, for whoever calls the trait directly.
    async fn get_profile(
        &self,
        request: Request<pb::GetProfileRequest>,
    ) -> Result<Response<pb::GetProfileResponse>, Status> {
        let (profile, store_revision) = self.find_profile(request).await?;
        let response = pb::GetProfileResponse {
            store_revision,
            profile: Some(convert::profile(&profile)),
            store_id: self.store.store_id().to_owned(),
        };
        let bytes = prost::Message::encoded_len(&response);
        fits_alone(&profile, profile.revision, bytes, self.max_message_bytes)?;
        Ok(Response::new(response))
    }

    async fn batch_get_profiles(
        &self,
        request: Request<pb::BatchGetProfilesRequest>,
    ) -> Result<Response<pb::BatchGetProfilesResponse>, Status> {
        let (metadata, _, request) = request.into_parts();
        // The key's own string type: each id's key shares it rather than copying it.
        let client_id: ArcStr = required(&request.client_id, "client_id")?.into();
        if request.customer_ids.len() > MAX_BATCH_IDS {
            let reason = format!(
                "at most {MAX_BATCH_IDS} ids per call, got {}",
                request.customer_ids.len()
            );
            return Err(grpc_status(Error::invalid("customer_ids", reason)));
        }
        for (index, customer_id) in request.customer_ids.iter().enumerate() {
            required(customer_id, &format!("customer_ids[{index}]"))?;
        }
        self.wait_for((&request.store_id, request.min_revision), &metadata)
            .await?;
        let as_of = self.store.revision();
        let mut found = Vec::with_capacity(request.customer_ids.len());
        let mut missing_customer_ids = Vec::new();
        for customer_id in &request.customer_ids {
            let key = ProfileKey::new(client_id.clone(), customer_id.as_str());
            match self.store.get(&key) {
                Some(profile) => found.push(profile),
                None => missing_customer_ids.push(customer_id.clone()),
            }
        }
        // Created after `as_of`: not there yet at the revision answered.
        let created = (self.store.as_of(&mut found, as_of)).map_err(changed_too_fast)?;
        let missing_customer_ids =
            missing_in_request_order(&request.customer_ids, missing_customer_ids, &created);
        let mut response = pb::BatchGetProfilesResponse {
            store_revision: as_of,
            profiles: Vec::with_capacity(found.len()),
            missing_customer_ids,
            store_id: self.store.store_id().to_owned(),
        };
        // Sizes summed while converting, so that an answer past the limit stops there rather
        // than after a thousand large profiles were copied.
        let limit = self.max_message_bytes;
        let mut bytes = prost::Message::encoded_len(&response);
        for profile in &found {
            let converted = convert::profile(profile);
            let size = prost::encoding::message::encoded_len(1, &converted);
            bytes += size;
            if bytes > limit {
                // One that no answer can carry (alone, with no missing ids): asking for fewer
                // ids would not help.
                let alone = pb::BatchGetProfilesResponse {
                    store_revision: as_of,
                    store_id: response.store_id.clone(),
                    ..Default::default()
                };
                let alone = prost::Message::encoded_len(&alone) + size;
                fits_alone(profile, profile.revision, alone, limit)?;
                return Err(grpc_status(Error::ResponseTooLarge {
                    field: "customer_ids".into(),
                    bytes,
                    limit: self.max_message_bytes,
                }));
            }
            response.profiles.push(converted);
        }
        Ok(Response::new(response))
    }

    async fn list_profiles(
        &self,
        request: Request<pb::ListProfilesRequest>,
    ) -> Result<Response<pb::ListProfilesResponse>, Status> {
        let (metadata, _, request) = request.into_parts();
        let page_size = page_size(request.page_size, DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)?;
        let (client_id, tier_name) = (request.client_id.as_str(), request.tier_name.as_str());
        let after = match request.page_token.as_str() {
            "" => None,
            token => {
                Some(page_token::decode(token, client_id, tier_name).map_err(|e| grpc_status(&e))?)
            }
        };
        self.wait_for((&request.store_id, request.min_revision), &metadata)
            .await?;
        let as_of = self.store.revision();
        let (profiles, next) = self
            .page_as_of((client_id, tier_name), after, page_size, as_of)
            .await?;
        let response = fitted_page(
            (&self.store, as_of),
            &profiles,
            next,
            self.max_message_bytes,
            |next| page_token::encode(client_id, tier_name, next),
        );
        Ok(Response::new(response))
    }

    type WatchProfilesStream = WatchStream;

    /// Never called: [`ProfileServiceRoutes`] serves this path with shared encodings
    /// (`watch.rs`) before the generated router sees it. Answers rather than panics, should a
    /// future wiring bypass it.
    async fn watch_profiles(
        &self,
        _request: Request<pb::WatchProfilesRequest>,
    ) -> Result<Response<WatchStream>, Status> {
        Err(Status::internal(
            "WatchProfiles is served by grpc::watch, not the generated router",
        ))
    }

    async fn get_server_info(
        &self,
        _request: Request<pb::GetServerInfoRequest>,
    ) -> Result<Response<pb::GetServerInfoResponse>, Status> {
        let mut info = pb::GetServerInfoResponse {
            store_id: self.store.store_id().to_owned(),
            revision: self.store.revision(),
            oldest_revision: self.store.oldest_in_history(),
            profile_count: self.store.len() as u64,
            uptime: Some(duration(self.started.elapsed())),
            durable: self.durable,
            ..Default::default()
        };
        if let Some(replica) = &self.replica {
            let position = replica.position();
            let lag = replica.lag();
            info.replica = replica.name().to_owned();
            info.applied_sequence = position.sequence;
            // The revision this position left, read together with it: the store's own may
            // already be one message further.
            info.revision = position.revision;
            info.stream_last_sequence = replica.stream_last().max(position.sequence);
            info.lag_messages = lag.messages;
            info.lag = Some(duration(Duration::from_secs_f64(lag.seconds)));
        }
        Ok(Response::new(info))
    }
}

fn duration(elapsed: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(elapsed.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(elapsed.subsec_nanos()).unwrap_or(0),
    }
}

/// The call's deadline from its `grpc-timeout` header (`<digits><unit>`, unit one of `H M S m
/// u n`), as the gRPC over HTTP/2 specification writes it; `None` without one.
fn deadline(metadata: &tonic::metadata::MetadataMap) -> Option<Duration> {
    let value = metadata.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount.saturating_mul(3600)),
        "M" => Duration::from_secs(amount.saturating_mul(60)),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The defaults fit: with 64 KiB bodies no profile outgrows a 4 MiB message, so the
    /// start-up warning stays silent unless an operator moves one limit against the other.
    #[test]
    fn the_largest_change_fits_the_default_message_limit() {
        let defaults = crate::Config::for_tests("s");
        let largest = largest_change_bytes(defaults.max_body_bytes);
        assert!(largest <= defaults.grpc_max_message_bytes, "{largest}");
        assert!(largest_change_bytes(256 * 1024) > defaults.grpc_max_message_bytes);
    }

    /// A tier filter that matches nothing examines every key; the other tasks of the worker
    /// (other calls, watch streams) run in between, and the page is right.
    #[test]
    fn missing_ids_keep_the_request_order_when_some_were_created_meanwhile() {
        let requested = ["a", "new", "b", "gone", "new"].map(String::from);
        let not_found = vec!["gone".to_owned()];
        assert_eq!(
            missing_in_request_order(&requested, not_found.clone(), &[]),
            not_found
        );
        let created = [ProfileKey::new("x", "new"), ProfileKey::new("x", "new")];
        assert_eq!(
            missing_in_request_order(&requested, not_found, &created),
            ["new", "gone", "new"]
        );
    }

    #[tokio::test]
    async fn a_filtered_list_yields_to_the_workers_other_tasks_while_it_scans() {
        let store = crate::sequencer::store_of_basic_profiles(10 * store::EXAMINE_PER_TURN);
        let watchers = Watchers::new(store.clone());
        let (stopping, tracker) = (CancellationToken::new(), TaskTracker::new());
        let api = ProfileApi::new(store, watchers, false, stopping, tracker, Metrics::new());
        let probe = crate::yield_probe::YieldProbe::spawn();
        let (profiles, next) = api.scan_yielding(("a", "gold"), None, 100, u64::MAX).await;
        let turns = probe.turns();
        drop(probe);
        assert!(
            profiles.is_empty() && next.is_none(),
            "no gold, every key examined"
        );
        assert!(
            turns >= 9,
            "the other task ran {turns} times during the scan"
        );

        let (basic, next) = api.scan_yielding(("a", "basic"), None, 100, u64::MAX).await;
        assert_eq!(basic.len(), 100);
        assert_eq!(next, Some(ProfileKey::new("a", "c000099")));
    }

    /// Moves the basic profiles `ids` of `store_of_basic_profiles` to tier gold, in one batch.
    fn to_gold(store: &Store, ids: impl Iterator<Item = usize>) {
        use crate::profile::{Origin, ProfileUpdate, Scalar};
        let updates: Vec<_> = ids
            .map(|i| ProfileUpdate {
                key: ProfileKey::new("a", format!("c{i:06}")),
                at: chrono::DateTime::from_timestamp(1_700_000_001, 0).unwrap(),
                fields: vec![(Field::TierName, Some(Scalar::Text("gold".into())))],
                extras: vec![],
                origin: Origin::Webhook,
            })
            .collect();
        let bound = crate::sequencer::Bound::Checked;
        store.commit(&crate::sequencer::sequence(store, &updates, bound).changes);
    }

    /// Matches spread over many turns make the same page as one unbounded scan.
    #[tokio::test]
    async fn a_filtered_list_gathers_its_page_across_turns() {
        let store = crate::sequencer::store_of_basic_profiles(10 * store::EXAMINE_PER_TURN);
        // Every 1,000th profile (41 of them) moves to gold.
        to_gold(&store, (0..10 * store::EXAMINE_PER_TURN).step_by(1000));
        let watchers = Watchers::new(store.clone());
        let (stopping, tracker) = (CancellationToken::new(), TaskTracker::new());
        let api = ProfileApi::new(
            store.clone(),
            watchers,
            false,
            stopping,
            tracker,
            Metrics::new(),
        );
        let is_gold = |p: &Profile| p.get_text(Field::TierName) == Some("gold");
        let keys = |page: &[Arc<Profile>]| page.iter().map(|p| p.key.clone()).collect::<Vec<_>>();

        let (page, next) = api.scan_yielding(("a", "gold"), None, 30, u64::MAX).await;
        let whole = store.scan(Some("a"), None, 30, is_gold);
        assert_eq!(keys(&page), keys(&whole.profiles));
        assert_eq!(page.len(), 30);
        assert_eq!(next, whole.next);

        let (rest, next) = api.scan_yielding(("a", "gold"), next, 30, u64::MAX).await;
        assert_eq!(rest.len(), 11);
        assert_eq!(next, None);
    }

    /// A tier page emptied by the as-of step (its profiles entered the tier after the page's
    /// revision) goes on to the next keys, instead of answering an empty page.
    #[tokio::test]
    async fn a_tier_page_emptied_by_the_as_of_step_goes_on_to_the_next_keys() {
        let store = crate::sequencer::store_of_basic_profiles(10);
        to_gold(&store, [3].into_iter());
        let as_of = store.revision();
        // Gold now, basic at `as_of`: the first two pages of one are empty after the as-of step.
        to_gold(&store, [0, 1].into_iter());
        let watchers = Watchers::new(store.clone());
        let (stopping, tracker) = (CancellationToken::new(), TaskTracker::new());
        let api = ProfileApi::new(store, watchers, false, stopping, tracker, Metrics::new());
        let (page, next) = api.page_as_of(("a", "gold"), None, 1, as_of).await.unwrap();
        let keys: Vec<_> = page.iter().map(|profile| profile.key.clone()).collect();
        assert_eq!(keys, [ProfileKey::new("a", "c000003")]);
        assert_eq!(next, Some(ProfileKey::new("a", "c000003")));
    }

    #[test]
    fn grpc_timeouts_are_read_in_every_unit_and_garbage_is_none() {
        let with = |value: &str| {
            let mut metadata = tonic::metadata::MetadataMap::new();
            metadata.insert("grpc-timeout", value.parse().unwrap());
            deadline(&metadata)
        };
        assert_eq!(with("2S"), Some(Duration::from_secs(2)));
        assert_eq!(with("250m"), Some(Duration::from_millis(250)));
        assert_eq!(with("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(with("7u"), Some(Duration::from_micros(7)));
        assert_eq!(with("x"), None);
        assert_eq!(with("10Q"), None);
        assert_eq!(deadline(&tonic::metadata::MetadataMap::new()), None);
    }
}
