//! Cluster-wide dead letters (replicated mode): one record per letter in a key-value bucket
//! that every replica reads and changes, so a letter kept by one replica is listed, replayed or
//! purged from any. Every change is a compare-and-set on the entry's revision, so two replicas
//! never both create a letter, lose a repeat count, or replay it twice: a replay first claims
//! the letter (writes `replaying_since` at the revision it read), and only the replica whose
//! claim succeeds applies it, then removes it at the claim's revision.
//!
//! What the bucket is (a JetStream KV bucket) is the adapter's business
//! (`crate::jetstream::DeadLetterBucket` implements [`LetterBucket`]); this module knows no
//! NATS. It holds no copy of the letters: every read of one goes to the bucket, so what a
//! replica answers is what the cluster holds. It keeps only each letter's first arrival (its
//! place in listings, which never changes) and a count of the letters read now and then
//! (each read of the bucket's keys reads every key's last entry).

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use super::{
    Cursor, DeadLetter, DeadLetterError, DeadLetterId, Page, PageBuilder, Purge, Purged, decode,
    encode,
};
use crate::error::Error;

/// How long a replay's claim on a letter holds. A replica that dies between claiming and
/// removing leaves the claim behind; past this, another replica may claim the letter again
/// (replaying it twice then is harmless: an update applied twice is unchanged the second time).
pub const REPLAY_CLAIM_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a change is tried again while other replicas change the letter in between. Each
/// lost compare-and-set means another writer's change went through, so a writer waits for at
/// most the writers ahead of it: a count of five gave the sixth of many copies of one
/// delivery 503 (adversarial round 40b; 24 writers over three servers needed up to 21). The
/// time bounds a writer that loses every round to others that never stop.
const CONTENDED_FOR: Duration = Duration::from_secs(2);
/// The first pause's bound between two attempts; each pause is random up to its bound (so
/// writers that lost together do not try together again), which doubles up to
/// [`MOST_PAUSE`].
const FIRST_PAUSE: Duration = Duration::from_millis(1);
const MOST_PAUSE: Duration = Duration::from_millis(32);
/// How long the count of letters last read from the bucket stands in for a new read when a new
/// letter is kept (this replica's own changes counted meanwhile). Each read of the keys reads
/// every key's last entry (up to 10,000, through a NATS consumer made and deleted for it):
/// per new letter, a burst's cost would grow with the square of its size. A second: the
/// cluster passes the limit by at most a second of letters (10 s let a burst over three
/// replicas pass it by 40%, found by an adversarial run).
const COUNT_FRESH_FOR: Duration = Duration::from_secs(1);

/// How long an entry found not to be a letter is taken as one without reading it again: a
/// listing read each of them on every page and logged each (10,000 of them: 3.8 s and 30,000
/// WARN lines a page; found by an adversarial run), and another replica may replace one with
/// its letter meanwhile.
const UNREADABLE_RECHECK: Duration = Duration::from_secs(10);

/// A future a [`LetterBucket`] returns.
pub type BucketFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, BucketError>> + Send + 'a>>;

/// Why a bucket operation failed.
#[derive(Debug, thiserror::Error)]
pub enum BucketError {
    /// The entry is no longer at the revision the change named.
    #[error("the entry changed in between")]
    Conflict,
    /// The bucket could not be reached or answered an error.
    #[error("{0}")]
    Failed(String),
}

/// A key-value bucket with compare-and-set, shared by every replica.
pub trait LetterBucket: Send + Sync + 'static {
    /// Stores a new entry; `None` if one with this key exists.
    fn create<'a>(&'a self, key: &'a str, value: Vec<u8>) -> BucketFuture<'a, Option<u64>>;
    /// The entry's value and revision, if there is one.
    fn get<'a>(&'a self, key: &'a str) -> BucketFuture<'a, Option<(Vec<u8>, u64)>>;
    /// Replaces the entry if it is still at `revision` ([`BucketError::Conflict`] if not).
    fn update<'a>(&'a self, key: &'a str, value: Vec<u8>, revision: u64) -> BucketFuture<'a, u64>;
    /// Removes the entry if it is still at `revision` ([`BucketError::Conflict`] if not).
    fn remove<'a>(&'a self, key: &'a str, revision: u64) -> BucketFuture<'a, ()>;
    /// Every key.
    fn keys(&self) -> BucketFuture<'_, Vec<String>>;
    /// The largest value the bucket takes, in bytes.
    fn max_value_bytes(&self) -> usize;
}

impl From<BucketError> for DeadLetterError {
    fn from(error: BucketError) -> DeadLetterError {
        DeadLetterError::Bucket(error.to_string())
    }
}

/// Whether a replay claim made at `since` still holds at `now`.
fn claimed_at(since: Option<DateTime<Utc>>, now: DateTime<Utc>) -> bool {
    let timeout = chrono::Duration::from_std(REPLAY_CLAIM_TIMEOUT).expect("a short timeout");
    since.is_some_and(|since| now < since + timeout)
}

/// A letter as read from the bucket, with the revision a change must name.
struct Entry {
    letter: DeadLetter,
    replaying_since: Option<DateTime<Utc>>,
    revision: u64,
}

/// What the bucket holds under a letter's key.
enum Read {
    Letter(Entry),
    /// A value that is not a letter record, or the letter of another id (put there by hand or
    /// by another tool): listings pass it over, naming it in the log, `show` and `replay` name
    /// it and why, a purge removes it, and the letter of its id replaces it. It failed every
    /// listing and purge, and could not be removed but with a NATS client (found by an
    /// adversarial run).
    Unreadable {
        reason: String,
        revision: u64,
    },
}

/// The cluster-wide letters. Cloning is cheap.
#[derive(Clone)]
pub(super) struct SharedLetters {
    bucket: Arc<dyn LetterBucket>,
    max_letters: usize,
    /// The count last seen in the bucket, for the gauge (`len` cannot wait on NATS), and
    /// this replica's changes since.
    count: Arc<AtomicUsize>,
    /// When the keys were last read.
    counted_at: Arc<Mutex<Option<Instant>>>,
    /// Each letter's first arrival, by id: its place in listings (see [`SharedLetters::list`]).
    arrivals: Arc<Mutex<HashMap<DeadLetterId, DateTime<Utc>>>>,
    /// Entries under letter ids found not to be letters (`Read::Unreadable`), and when: not
    /// listed, not counted, read again after [`UNREADABLE_RECHECK`].
    unreadable: Arc<Mutex<HashMap<DeadLetterId, (tokio::time::Instant, String)>>>,
}

impl SharedLetters {
    pub(super) fn new(bucket: Arc<dyn LetterBucket>, max_letters: usize) -> SharedLetters {
        SharedLetters {
            bucket,
            max_letters,
            count: Arc::default(),
            counted_at: Arc::default(),
            arrivals: Arc::default(),
            unreadable: Arc::default(),
        }
    }

    pub(super) fn len(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    /// This replica's count of the letters, one fewer (never below 0).
    fn count_one_fewer(&self) {
        let fewer = |count: usize| Some(count.saturating_sub(1));
        let _ = (self.count).fetch_update(Ordering::Relaxed, Ordering::Relaxed, fewer);
    }

    /// The bucket's keys that are letter ids. Others (put there by hand or by another tool)
    /// are left alone, named in one WARN per read, and not counted: 10,000 of them refused
    /// every new letter as past the limit while listings showed none and purges removed none
    /// (found by an adversarial run).
    async fn ids(&self) -> Result<Vec<DeadLetterId>, DeadLetterError> {
        let keys = self.bucket.keys().await?;
        let mut others = Vec::new();
        let ids: Vec<DeadLetterId> = (keys.into_iter())
            .filter_map(|key| match DeadLetterId::parse(&key) {
                Ok(id) => Some(id),
                Err(_) => {
                    others.push(key);
                    None
                }
            })
            .collect();
        if let Some(first) = others.first() {
            let first = crate::error::cut_to(first, 64);
            tracing::warn!(
                keys = others.len(),
                %first,
                "keys of the dead-letter bucket that are not dead letter ids: left alone, not \
                 counted"
            );
        }
        let letters = {
            let mut unreadable = self.unreadable();
            let kept: HashSet<&DeadLetterId> = ids.iter().collect();
            unreadable.retain(|id, _| kept.contains(id));
            ids.len() - unreadable.len()
        };
        self.count.store(letters, Ordering::Relaxed);
        *self.counted_at() = Some(Instant::now());
        Ok(ids)
    }

    fn counted_at(&self) -> std::sync::MutexGuard<'_, Option<Instant>> {
        // An instant: a poisoned lock still holds a valid one.
        self.counted_at
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// How many letters the cluster keeps, for the [`DeadLetterError::Full`] check: read from
    /// the bucket at most every [`COUNT_FRESH_FOR`] while this replica's count is far from the
    /// limit, and for every new letter within a tenth of it. Letters other replicas keep in
    /// between are seen at the next read, so the cluster may pass the limit by what it keeps
    /// in that time: a bound on the bucket's size, not an exact one. At the limit, a count
    /// read within [`COUNT_FRESH_FOR`] stands: reading every key for each refused letter kept
    /// NATS so busy that a sender retrying at the limit starved the listings an operator needs
    /// to make room (found by an adversarial run), and a letter refused on a count a second
    /// old costs its sender one retry. A read that fails counts as one too, and far from the
    /// limit the last count stands for it: while a NATS node restarted, every new letter
    /// started a read of its own, each timed out, and a third of the deliveries to be kept got
    /// 503 instead of 422 (found by an adversarial run).
    async fn count(&self) -> Result<usize, DeadLetterError> {
        let count = self.count.load(Ordering::Relaxed);
        let near_the_limit = count >= self.max_letters - self.max_letters / 10;
        let recent = self
            .counted_at()
            .is_some_and(|at| at.elapsed() < COUNT_FRESH_FOR);
        if recent && (!near_the_limit || count >= self.max_letters) {
            return Ok(count);
        }
        *self.counted_at() = Some(Instant::now());
        match self.ids().await {
            // The letters: `ids` counts them, less the entries known not to be letters.
            Ok(_) => Ok(self.count.load(Ordering::Relaxed)),
            Err(error) if !near_the_limit => {
                tracing::debug!(%error, count, "letters not counted: the last count stands");
                Ok(count)
            }
            Err(error) => Err(error),
        }
    }

    async fn read(&self, id: &DeadLetterId) -> Result<Option<Read>, DeadLetterError> {
        let Some((bytes, revision)) = self.bucket.get(id.as_str()).await? else {
            return Ok(None);
        };
        let read = match decode(&bytes) {
            Ok((letter, _)) if letter.id != *id => Read::Unreadable {
                reason: format!("it holds the letter of another body (id {})", letter.id),
                revision,
            },
            Ok((letter, replaying_since)) => Read::Letter(Entry {
                letter,
                replaying_since,
                revision,
            }),
            Err(reason) => Read::Unreadable { reason, revision },
        };
        match &read {
            Read::Letter(_) => {
                self.unreadable().remove(id);
            }
            Read::Unreadable { reason, .. } => {
                let found = (tokio::time::Instant::now(), reason.clone());
                self.unreadable().insert(id.clone(), found);
            }
        }
        Ok(Some(read))
    }

    /// The letter kept under `id`: [`DeadLetterError::Unreadable`] if the entry is not one.
    async fn entry(&self, id: &DeadLetterId) -> Result<Option<Entry>, DeadLetterError> {
        match self.read(id).await? {
            None => Ok(None),
            Some(Read::Letter(entry)) => Ok(Some(entry)),
            Some(Read::Unreadable { reason, .. }) => Err(DeadLetterError::Unreadable {
                id: id.to_string(),
                reason,
            }),
        }
    }

    /// The letter kept under `id`, `None` for an entry that is not one (the listing names
    /// those in one WARN: [`SharedLetters::warn_of_unreadable`]).
    async fn listable(&self, id: &DeadLetterId) -> Result<Option<Entry>, DeadLetterError> {
        match self.read(id).await? {
            Some(Read::Letter(entry)) => Ok(Some(entry)),
            Some(Read::Unreadable { .. }) | None => Ok(None),
        }
    }

    /// One WARN for the entries under letter ids known not to be letters, if any: how many,
    /// and the first with why. One per entry, per page, was 30,000 lines a page for 10,000
    /// of them (found by an adversarial run).
    fn warn_of_unreadable(&self) {
        let unreadable = self.unreadable();
        let Some((first, (_, reason))) = unreadable.iter().min_by_key(|(id, _)| *id) else {
            return;
        };
        tracing::warn!(
            entries = unreadable.len(),
            %first,
            %reason,
            "entries of the dead-letter bucket that are not dead letters: not listed \
             (`dead-letters purge <key>` removes one, `purge --all` every one)"
        );
    }

    fn encoded(
        &self,
        letter: &DeadLetter,
        since: Option<DateTime<Utc>>,
    ) -> Result<Vec<u8>, DeadLetterError> {
        let bytes = encode(letter, since);
        let limit = self.bucket.max_value_bytes();
        if bytes.len() > limit {
            return Err(DeadLetterError::TooLarge {
                id: letter.id.clone(),
                bytes: bytes.len(),
                limit,
            });
        }
        Ok(bytes)
    }

    pub(super) async fn store(
        &self,
        letter: DeadLetter,
        now: DateTime<Utc>,
    ) -> Result<DeadLetterId, DeadLetterError> {
        let id = letter.id.clone();
        let mut attempts = Attempts::new();
        while attempts.next().await {
            match self.read(&id).await? {
                Some(Read::Unreadable { reason, revision }) => {
                    tracing::warn!(
                        key = %id,
                        %reason,
                        "an entry of the dead-letter bucket was not a dead letter: replaced by \
                         the letter of its id"
                    );
                    let bytes = self.encoded(&letter, None)?;
                    match self.bucket.update(id.as_str(), bytes, revision).await {
                        Err(BucketError::Conflict) => continue,
                        result => {
                            self.unreadable().remove(&id);
                            return result.map(|_| id).map_err(Into::into);
                        }
                    }
                }
                Some(Read::Letter(old)) => {
                    let repeat = DeadLetter {
                        last_received_at: now.max(old.letter.last_received_at),
                        deliveries: old.letter.deliveries + 1,
                        reason: letter.reason.clone(),
                        field: letter.field.clone(),
                        ..old.letter
                    };
                    let bytes = self.encoded(&repeat, old.replaying_since)?;
                    match self.bucket.update(id.as_str(), bytes, old.revision).await {
                        Err(BucketError::Conflict) => continue,
                        result => return result.map(|_| id).map_err(Into::into),
                    }
                }
                None => {
                    if self.count().await? >= self.max_letters {
                        return Err(DeadLetterError::Full {
                            limit: self.max_letters,
                        });
                    }
                    let bytes = self.encoded(&letter, None)?;
                    if self.bucket.create(id.as_str(), bytes).await?.is_some() {
                        self.count.fetch_add(1, Ordering::Relaxed);
                        return Ok(id);
                    }
                }
            }
        }
        Err(attempts.contended(&id))
    }

    pub(super) async fn get(
        &self,
        id: &DeadLetterId,
    ) -> Result<Option<DeadLetter>, DeadLetterError> {
        Ok(self.entry(id).await?.map(|entry| entry.letter))
    }

    /// A page of letters in listing order (first arrival, then id). The bucket has no order
    /// of its own, so the order comes from each letter's first arrival, which never changes
    /// (a repeat of the body is counted in the letter, not a new one): it is read once per
    /// letter and kept here by id. A page then reads the keys and only its own letters, where
    /// reading every letter for every page took 49 s to list 1,500 letters of 60 KB.
    pub(super) async fn list(
        &self,
        after: Option<&Cursor>,
        limit: usize,
        max_body_bytes: usize,
    ) -> Result<Page, DeadLetterError> {
        let mut attempt = 0;
        'listing: loop {
            attempt += 1;
            let mut page = PageBuilder::new(limit, max_body_bytes);
            let order = self.listing_order().await?;
            for cursor in order
                .into_iter()
                .filter(|cursor| after.is_none_or(|after| cursor > after))
            {
                // Gone since the keys were read (replayed or purged), or no letter any more:
                // not counted either.
                let Some(entry) = self.listable(&cursor.id).await? else {
                    if self.arrivals().remove(&cursor.id).is_some() {
                        self.count_one_fewer();
                    }
                    continue;
                };
                let letter = entry.letter;
                // Removed and kept anew since its arrival was read: a later place in the
                // order. Read the order again (once more at most, so a body sent over and
                // over while it is purged cannot hold a listing up).
                if letter.received_at != cursor.received_at && attempt < 3 {
                    self.arrivals().insert(cursor.id, letter.received_at);
                    continue 'listing;
                }
                if !page.offer(Arc::new(letter)) {
                    break;
                }
            }
            return Ok(page.finish());
        }
    }

    fn unreadable(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<DeadLetterId, (tokio::time::Instant, String)>> {
        // Plain inserts and removals: a poisoned map is still consistent.
        self.unreadable
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn arrivals(&self) -> std::sync::MutexGuard<'_, HashMap<DeadLetterId, DateTime<Utc>>> {
        // Plain inserts and removals: a poisoned map is still consistent.
        self.arrivals
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Every letter's place in the listing order, sorted: the keys read now, each letter's
    /// first arrival read once (the letters unknown here), and letters gone forgotten.
    async fn listing_order(&self) -> Result<Vec<Cursor>, DeadLetterError> {
        let ids = self.ids().await?;
        let unknown: Vec<DeadLetterId> = {
            let arrivals = self.arrivals();
            let unreadable = self.unreadable();
            let fresh = |id: &DeadLetterId| {
                (unreadable.get(id)).is_some_and(|(at, _)| at.elapsed() < UNREADABLE_RECHECK)
            };
            ids.iter()
                .filter(|id| !arrivals.contains_key(*id) && !fresh(id))
                .cloned()
                .collect()
        };
        for id in unknown {
            if let Some(entry) = self.listable(&id).await? {
                self.arrivals().insert(id, entry.letter.received_at);
            }
        }
        let kept: HashSet<&DeadLetterId> = ids.iter().collect();
        let mut arrivals = self.arrivals();
        arrivals.retain(|id, _| kept.contains(id));
        let mut order: Vec<Cursor> = arrivals
            .iter()
            .map(|(id, &received_at)| Cursor {
                received_at,
                id: id.clone(),
            })
            .collect();
        order.sort();
        // The letters, not the entries that are not (see `Read::Unreadable`).
        self.count.store(order.len(), Ordering::Relaxed);
        drop(arrivals);
        self.warn_of_unreadable();
        Ok(order)
    }

    pub(super) async fn purge(&self, which: Purge) -> Result<Purged, DeadLetterError> {
        let ids = match which {
            Purge::All => self.ids().await?,
            Purge::Ids(ids) => ids,
        };
        let mut purged = Purged::default();
        // The first failure ends it (the bucket is most likely unreachable for the rest too),
        // and says how many were removed before it.
        let broke_off =
            |error: DeadLetterError, purged: &Purged| error.after_removing(purged.removed.len());
        for id in ids {
            match self.remove_any(&id).await {
                Ok(Removal::Removed) => purged.removed.push(id),
                Ok(Removal::Held) => purged.replaying.push(id),
                Ok(Removal::NotKept) => {}
                Err(error) => return Err(broke_off(error, &purged)),
            }
        }
        if let Err(error) = self.ids().await {
            return Err(broke_off(error, &purged));
        }
        Ok(purged)
    }

    /// Removes a letter whatever its revision, unless it is not kept or a replay holds it
    /// (the replay removes it once applied: a purge that went ahead said "purged" of a letter
    /// the replay then applied). The removal is conditional on the revision read, so a claim
    /// made in between makes it look again.
    async fn remove_any(&self, id: &DeadLetterId) -> Result<Removal, DeadLetterError> {
        let mut attempts = Attempts::new();
        while attempts.next().await {
            let revision = match self.read(id).await? {
                None => return Ok(Removal::NotKept),
                Some(Read::Letter(entry)) if claimed_at(entry.replaying_since, Utc::now()) => {
                    return Ok(Removal::Held);
                }
                Some(Read::Letter(entry)) => entry.revision,
                // No replay can hold what is not a letter.
                Some(Read::Unreadable { reason, revision }) => {
                    tracing::warn!(
                        key = %id,
                        %reason,
                        "purging an entry of the dead-letter bucket that is not a dead letter"
                    );
                    revision
                }
            };
            match self.bucket.remove(id.as_str(), revision).await {
                Err(BucketError::Conflict) => continue,
                result => return result.map(|()| Removal::Removed).map_err(Into::into),
            }
        }
        Err(attempts.contended(id))
    }

    /// Claims a letter for a replay: the letter and the claim's revision, or
    /// [`Error::DeadLetterBeingReplayed`] if another replica holds (or just won) it.
    pub(super) async fn claim(
        &self,
        id: &DeadLetterId,
        now: DateTime<Utc>,
    ) -> Result<(DeadLetter, u64), Error> {
        let entry = self
            .entry(id)
            .await
            .map_err(DeadLetterError::unavailable)?
            .ok_or_else(|| Error::DeadLetterNotFound { id: id.to_string() })?;
        if claimed_at(entry.replaying_since, now) {
            return Err(being_replayed(id));
        }
        let bytes = self
            .encoded(&entry.letter, Some(now))
            .map_err(DeadLetterError::unavailable)?;
        match self.bucket.update(id.as_str(), bytes, entry.revision).await {
            Ok(revision) => Ok((entry.letter, revision)),
            Err(BucketError::Conflict) => Err(being_replayed(id)),
            Err(error) => Err(DeadLetterError::from(error).unavailable()),
        }
    }

    /// Removes a replayed letter, if the claim still holds it.
    pub(super) async fn finish(&self, id: &DeadLetterId, claim: u64) -> Result<(), Error> {
        match self.bucket.remove(id.as_str(), claim).await {
            Ok(()) => {
                self.count_one_fewer();
                Ok(())
            }
            // Changed since: a repeat delivery counted it (then it stays, to be replayed again
            // harmlessly), or the claim expired and another replica took it.
            Err(BucketError::Conflict) => {
                tracing::warn!(dead_letter_id = %id, "replayed dead letter changed during the replay; kept");
                Ok(())
            }
            Err(error) => Err(DeadLetterError::from(error).unavailable()),
        }
    }

    /// Gives a claim back (the replay did not apply the letter), with the reason found if the
    /// letter is still invalid.
    pub(super) async fn release(
        &self,
        letter: &DeadLetter,
        claim: u64,
        cause: Option<&Error>,
    ) -> Result<(), DeadLetterError> {
        let letter = match cause {
            Some(cause) => DeadLetter {
                reason: cause.to_string(),
                field: cause.field().map(str::to_owned),
                ..letter.clone()
            },
            None => letter.clone(),
        };
        let bytes = self.encoded(&letter, None)?;
        match self.bucket.update(letter.id.as_str(), bytes, claim).await {
            // Changed since (a repeat delivery): the claim was kept in it and expires.
            Ok(_) | Err(BucketError::Conflict) => Ok(()),
            Err(error) => Err(error.into()),
        }
    }
}

fn being_replayed(id: &DeadLetterId) -> Error {
    Error::DeadLetterBeingReplayed { id: id.to_string() }
}

/// What a purge's removal of one letter found.
enum Removal {
    Removed,
    Held,
    NotKept,
}

/// The attempts at one compare-and-set change of a letter (see [`CONTENDED_FOR`]).
struct Attempts {
    /// Tokio's clock, which a test can stop.
    started: tokio::time::Instant,
    made: usize,
    pause: Duration,
}

impl Attempts {
    fn new() -> Attempts {
        Attempts {
            started: tokio::time::Instant::now(),
            made: 0,
            pause: FIRST_PAUSE,
        }
    }

    /// Whether to make another attempt: the first at once; each next after a random pause,
    /// unless [`CONTENDED_FOR`] has passed.
    async fn next(&mut self) -> bool {
        if self.made > 0 {
            if self.started.elapsed() >= CONTENDED_FOR {
                return false;
            }
            tokio::time::sleep(self.pause.mul_f64(fastrand::f64())).await;
            self.pause = (self.pause * 2).min(MOST_PAUSE);
        }
        self.made += 1;
        true
    }

    fn contended(&self, id: &DeadLetterId) -> DeadLetterError {
        DeadLetterError::Bucket(format!(
            "entry {id} kept changing under {} attempts to change it in {:.1} s",
            self.made,
            self.started.elapsed().as_secs_f64()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Entries in memory, counting the reads of every key (each a listing of the whole bucket
    /// in the real one, `crate::jetstream::DeadLetterBucket`).
    #[derive(Default)]
    struct MemoryBucket {
        entries: Mutex<HashMap<String, (Vec<u8>, u64)>>,
        key_reads: AtomicUsize,
        reads: AtomicUsize,
        /// Reads of the keys fail (a NATS node restarting).
        keys_fail: std::sync::atomic::AtomicBool,
        /// The removal of this key fails (NATS gone part way through a purge).
        remove_fails: Mutex<Option<String>>,
        /// Every update loses to another writer.
        updates_conflict: std::sync::atomic::AtomicBool,
    }

    impl LetterBucket for MemoryBucket {
        fn create<'a>(&'a self, key: &'a str, value: Vec<u8>) -> BucketFuture<'a, Option<u64>> {
            let mut entries = self.entries.lock().unwrap();
            let created = match entries.contains_key(key) {
                true => None,
                false => {
                    entries.insert(key.to_owned(), (value, 1));
                    Some(1)
                }
            };
            Box::pin(async move { Ok(created) })
        }

        fn get<'a>(&'a self, key: &'a str) -> BucketFuture<'a, Option<(Vec<u8>, u64)>> {
            self.reads.fetch_add(1, Ordering::SeqCst);
            let entry = self.entries.lock().unwrap().get(key).cloned();
            Box::pin(async move { Ok(entry) })
        }

        fn update<'a>(&'a self, _: &'a str, _: Vec<u8>, _: u64) -> BucketFuture<'a, u64> {
            if self.updates_conflict.load(Ordering::SeqCst) {
                return Box::pin(async { Err(BucketError::Conflict) });
            }
            Box::pin(async { Err(BucketError::Failed("not in this test".into())) })
        }

        fn remove<'a>(&'a self, key: &'a str, _: u64) -> BucketFuture<'a, ()> {
            if self.remove_fails.lock().unwrap().as_deref() == Some(key) {
                return Box::pin(async { Err(BucketError::Failed("timed out".into())) });
            }
            self.entries.lock().unwrap().remove(key);
            Box::pin(async { Ok(()) })
        }

        fn keys(&self) -> BucketFuture<'_, Vec<String>> {
            self.key_reads.fetch_add(1, Ordering::SeqCst);
            if self.keys_fail.load(Ordering::SeqCst) {
                return Box::pin(async { Err(BucketError::Failed("timed out".into())) });
            }
            let keys = self.entries.lock().unwrap().keys().cloned().collect();
            Box::pin(async move { Ok(keys) })
        }

        fn max_value_bytes(&self) -> usize {
            1 << 20
        }
    }

    fn letter(n: usize, now: DateTime<Utc>) -> DeadLetter {
        let body = format!("body {n}").into_bytes();
        DeadLetter {
            id: DeadLetterId::of(&body),
            received_at: now,
            last_received_at: now,
            deliveries: 1,
            reason: "is required".into(),
            field: Some("customer_id".into()),
            body,
        }
    }

    /// A writer that loses every compare-and-set (others change the letter without end) tries
    /// again after random pauses, and gives up once [`CONTENDED_FOR`] has passed, saying so:
    /// it neither gives up after a handful of losses nor waits forever.
    #[tokio::test(start_paused = true)]
    async fn a_letter_that_keeps_changing_is_given_up_after_its_time() {
        let bucket = Arc::new(MemoryBucket::default());
        let letters = SharedLetters::new(Arc::clone(&bucket) as Arc<dyn LetterBucket>, 150);
        let now = Utc::now();
        letters.store(letter(1, now), now).await.unwrap();
        bucket.updates_conflict.store(true, Ordering::SeqCst);
        let reads_before = bucket.reads.load(Ordering::SeqCst);
        let started = tokio::time::Instant::now();
        let err = letters.store(letter(1, now), now).await.unwrap_err();
        let waited = started.elapsed();
        assert!(err.to_string().contains("kept changing under"), "{err}");
        assert!(
            waited >= CONTENDED_FOR && waited <= CONTENDED_FOR + MOST_PAUSE,
            "{waited:?}"
        );
        // Doubling pauses up to 32 ms over 2 s: dozens of attempts, not five.
        let attempts = bucket.reads.load(Ordering::SeqCst) - reads_before;
        assert!(attempts > 50, "{attempts} attempts");
    }

    /// Every new letter read every key to check the limit: a NATS consumer each, which the
    /// server then kept 30 s, and after about 1,000 in half a minute it refused more, so every
    /// further letter got 503 (found by measuring a burst; the listing now deletes its
    /// consumer, `jetstream::listing`). The count is read once a while, and the limit still
    /// holds on the letters this replica keeps in between.
    #[tokio::test]
    async fn new_letters_read_the_keys_once_a_while_and_the_limit_still_holds() {
        let bucket = Arc::new(MemoryBucket::default());
        let letters = SharedLetters::new(Arc::clone(&bucket) as Arc<dyn LetterBucket>, 150);
        let now = Utc::now();
        for n in 0..135 {
            letters.store(letter(n, now), now).await.unwrap();
        }
        assert_eq!(bucket.key_reads.load(Ordering::SeqCst), 1);
        // Within a tenth of the limit, every new letter reads the count: other replicas'
        // letters cannot carry the cluster far past it.
        for n in 135..150 {
            letters.store(letter(n, now), now).await.unwrap();
        }
        assert_eq!(bucket.key_reads.load(Ordering::SeqCst), 16);
        assert_eq!(letters.len(), 150);
        // At the limit, refusals stand on the count just read: one read for them all, not one
        // each (a sender retrying at the limit kept NATS busy reading every key).
        for n in 150..200 {
            let refused = letters.store(letter(n, now), now).await;
            assert!(
                matches!(refused, Err(DeadLetterError::Full { limit: 150 })),
                "{refused:?}"
            );
        }
        assert!(bucket.key_reads.load(Ordering::SeqCst) <= 17);
    }

    /// While a NATS node restarted, the count's reads failed and were not counted as reads:
    /// every new letter started one of its own, each timed out, and a third of the deliveries
    /// to be kept got 503 (found by an adversarial run). A failed read waits its turn as a
    /// good one does, and far from the limit the last count stands; within a tenth of it, a
    /// count that cannot be read refuses the letter (503: retried), as before.
    #[tokio::test]
    async fn a_count_that_cannot_be_read_is_tried_once_a_while_and_the_last_one_stands() {
        let bucket = Arc::new(MemoryBucket::default());
        let letters = SharedLetters::new(Arc::clone(&bucket) as Arc<dyn LetterBucket>, 100);
        let now = Utc::now();
        for n in 0..10 {
            letters.store(letter(n, now), now).await.unwrap();
        }
        assert_eq!(bucket.key_reads.load(Ordering::SeqCst), 1);
        bucket.keys_fail.store(true, Ordering::SeqCst);
        *letters.counted_at() = None;
        for n in 10..90 {
            letters.store(letter(n, now), now).await.unwrap();
        }
        assert_eq!(
            bucket.key_reads.load(Ordering::SeqCst),
            2,
            "one failed read, then the count it left stands"
        );
        let refused = letters.store(letter(90, now), now).await;
        assert!(
            matches!(refused, Err(DeadLetterError::Bucket(_))),
            "{refused:?}"
        );
        assert_eq!(letters.len(), 90);
        bucket.keys_fail.store(false, Ordering::SeqCst);
        letters.store(letter(90, now), now).await.unwrap();
        assert_eq!(letters.len(), 91);
    }

    async fn listed(letters: &SharedLetters, limit: usize) -> Vec<Vec<usize>> {
        let mut pages = Vec::new();
        let mut after = None;
        loop {
            let page = letters.list(after.as_ref(), limit, 1 << 20).await.unwrap();
            let numbers = page.letters.iter().map(|letter| {
                let body = String::from_utf8(letter.body.clone()).unwrap();
                body.trim_start_matches("body ").parse().unwrap()
            });
            pages.push(numbers.collect());
            match page.next {
                Some(next) => after = Some(next),
                None => return pages,
            }
        }
    }

    /// Every page read every letter of the bucket (N reads a page, so listing 1,500 letters of
    /// 60 KB took 49 s against a real nats-server): a page now reads the keys and its own
    /// letters, each letter's place being read once. Letters gone, or kept anew, since their
    /// place was read are listed where they are now.
    #[tokio::test]
    async fn a_page_reads_its_own_letters_not_every_one() {
        let bucket = Arc::new(MemoryBucket::default());
        let letters = SharedLetters::new(Arc::clone(&bucket) as Arc<dyn LetterBucket>, 1000);
        let start = Utc::now();
        let arrival = |n: usize| start + chrono::Duration::milliseconds(n as i64);
        for n in 0..100 {
            letters
                .store(letter(n, arrival(n)), arrival(n))
                .await
                .unwrap();
        }
        bucket.reads.store(0, Ordering::SeqCst);
        let pages = listed(&letters, 10).await;
        let expected: Vec<Vec<usize>> = (0..10).map(|p| (p * 10..p * 10 + 10).collect()).collect();
        assert_eq!(pages, expected);
        // 100 places once, then each page its 10 letters and the first of the next.
        let reads = bucket.reads.swap(0, Ordering::SeqCst);
        assert!(reads <= 100 + 10 * 11, "{reads} reads");
        assert_eq!(listed(&letters, 10).await, expected);
        assert!(bucket.reads.swap(0, Ordering::SeqCst) <= 10 * 11);

        // 5 replayed, 7 purged and kept anew later (a repeat arriving after its purge).
        let id = |n: usize| letter(n, start).id;
        letters.bucket.remove(id(5).as_str(), 1).await.unwrap();
        letters.bucket.remove(id(7).as_str(), 1).await.unwrap();
        letters
            .store(letter(7, arrival(500)), arrival(500))
            .await
            .unwrap();
        let order: Vec<usize> = listed(&letters, 10).await.concat();
        let mut expected: Vec<usize> = (0..100).filter(|n| ![5, 7].contains(n)).collect();
        expected.push(7);
        assert_eq!(order, expected);
    }

    /// A purge that fails part way says how many letters it removed, and keeps the rest for
    /// the next purge: it answered only the generic "could not be changed", as if nothing had
    /// been done (a session-41 leftover).
    #[tokio::test]
    async fn a_purge_that_breaks_off_says_how_many_it_removed() {
        let bucket = Arc::new(MemoryBucket::default());
        let letters = SharedLetters::new(Arc::clone(&bucket) as Arc<dyn LetterBucket>, 10);
        let now = Utc::now();
        let ids: Vec<DeadLetterId> = (0..3).map(|n| letter(n, now).id).collect();
        for n in 0..3 {
            letters.store(letter(n, now), now).await.unwrap();
        }
        *bucket.remove_fails.lock().unwrap() = Some(ids[1].to_string());
        let error = letters.purge(Purge::Ids(ids.clone())).await.unwrap_err();
        assert!(
            matches!(error, DeadLetterError::PurgeBrokeOff { removed: 1, .. }),
            "{error}"
        );
        let Error::Unavailable { reason } = error.unavailable() else {
            panic!("UNAVAILABLE");
        };
        assert!(
            reason.starts_with("1 dead letter(s) were purged, then the rest could not be"),
            "{reason}"
        );
        let kept = bucket.entries.lock().unwrap();
        assert!(!kept.contains_key(ids[0].as_str()));
        assert!(kept.contains_key(ids[1].as_str()) && kept.contains_key(ids[2].as_str()));
    }

    /// Keys that are not letter ids (put there by another tool) are not counted: 10,000 of
    /// them refused every new letter as past the limit while listings showed none (found by
    /// an adversarial run).
    #[tokio::test]
    async fn keys_that_are_not_letter_ids_do_not_count_toward_the_limit() {
        let bucket = Arc::new(MemoryBucket::default());
        for n in 0..5 {
            let key = format!("junk-{n}");
            bucket.create(&key, b"junk".to_vec()).await.unwrap();
        }
        let letters = SharedLetters::new(Arc::clone(&bucket) as Arc<dyn LetterBucket>, 10);
        let now = Utc::now();
        for n in 0..10 {
            letters.store(letter(n, now), now).await.unwrap();
        }
        assert_eq!(letters.len(), 10);
        let refused = letters.store(letter(10, now), now).await;
        assert!(matches!(refused, Err(DeadLetterError::Full { limit: 10 })));
    }

    /// Entries under letter ids that are not letters are read once by a listing and then
    /// neither read again by its pages (for [`UNREADABLE_RECHECK`]) nor counted: each page
    /// read and logged each of them, and they counted toward the limit (found by an
    /// adversarial run).
    #[tokio::test]
    async fn entries_under_letter_ids_that_are_not_letters_are_read_once_and_not_counted() {
        let bucket = Arc::new(MemoryBucket::default());
        let letters = SharedLetters::new(Arc::clone(&bucket) as Arc<dyn LetterBucket>, 10);
        let now = Utc::now();
        for n in 0..3 {
            letters.store(letter(n, now), now).await.unwrap();
        }
        for n in 100..105 {
            let id = letter(n, now).id;
            bucket.create(id.as_str(), b"junk".to_vec()).await.unwrap();
        }
        bucket.reads.store(0, Ordering::SeqCst);
        let mut listed = listed(&letters, 1).await.concat();
        listed.sort();
        assert_eq!(listed, [0, 1, 2]);
        // The junk once, then each page its letter and the first of the next.
        let reads = bucket.reads.load(Ordering::SeqCst);
        assert!(reads <= 5 + 3 + 3 * 2, "{reads} reads");
        assert_eq!(letters.len(), 3);
        for n in 3..10 {
            letters.store(letter(n, now), now).await.unwrap();
        }
        let refused = letters.store(letter(10, now), now).await;
        assert!(matches!(refused, Err(DeadLetterError::Full { limit: 10 })));
    }

    /// An entry found not to be a letter is read again after [`UNREADABLE_RECHECK`], so a
    /// letter another replica stored in its place is then listed.
    #[tokio::test(start_paused = true)]
    async fn an_entry_that_was_not_a_letter_is_read_again_after_the_recheck() {
        let bucket = Arc::new(MemoryBucket::default());
        let letters = SharedLetters::new(Arc::clone(&bucket) as Arc<dyn LetterBucket>, 10);
        let now = Utc::now();
        letters.store(letter(0, now), now).await.unwrap();
        let later = letter(1, now);
        let key = later.id.to_string();
        bucket.create(&key, b"junk".to_vec()).await.unwrap();
        assert_eq!(listed(&letters, 10).await.concat(), [0]);
        let bytes = letters.encoded(&later, None).unwrap();
        bucket.entries.lock().unwrap().insert(key, (bytes, 2));
        assert_eq!(
            listed(&letters, 10).await.concat(),
            [0],
            "not read again yet"
        );
        tokio::time::advance(UNREADABLE_RECHECK).await;
        let mut listed = listed(&letters, 10).await.concat();
        listed.sort();
        assert_eq!(listed, [0, 1], "read again, and listed");
    }
}
