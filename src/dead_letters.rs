//! Dead letters: deliveries whose signature was valid but that could not be applied (a
//! validation error, a schema we do not understand), kept with their reason, raw body and
//! arrival time until an operator replays or purges them.
//!
//! A letter's id is the lowercase hex SHA-1 of its raw body, so the same body arriving again is
//! the same letter: it is stored once, keeps its first arrival time and counts the repeat.
//! Durably (the default), each letter is one JSON file `<data-dir>/dead-letters/<id>.json`,
//! written atomically (temp file, fsync, rename, fsync the directory) before the sender is
//! answered, and all of them are loaded at start-up: a file that does not load stops start-up
//! naming it. Under `--ephemeral` they live in memory only. At most [`MAX_LETTERS`] are kept, so
//! a sender stuck on a bad schema cannot fill the disk the journal needs; past that, storing
//! fails and the webhook answers 503 (Gameball retries) until an operator replays or purges.
//!
//! That is a single node's backend, [`LocalLetters`]. In replicated mode letters are the
//! cluster's, in a key-value bucket (`shared`); [`DeadLetters`] (`handle`) is the one handle
//! over either, and what callers use.
//!
//! This module keeps letters and nothing else: validating and applying them (on arrival and on
//! replay) is `crate::ingest`'s path, and HTTP or gRPC are the adapters' business.
//!
//! Over 700 lines with its tests (about 170 of them): one concept, its storage and its loading
//! rules, tested beside the code.

use std::collections::{BTreeSet, HashMap};
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use sha1::{Digest, Sha1};

use crate::data_dir::{LockRef, sync_dir, write_atomically};
use crate::error::Error;
use crate::io_error::IoError;
use crate::poison::lock;

mod handle;
pub mod shared;

pub use handle::{DeadLetters, ReplayClaim};
pub use shared::{BucketError, LetterBucket, REPLAY_CLAIM_TIMEOUT};

/// The directory, inside the data directory, that holds one file per letter.
pub const DIR: &str = "dead-letters";
/// The most letters kept; storing a new one past this fails until some are replayed or purged.
pub const MAX_LETTERS: usize = 10_000;
/// The most bytes of bodies a node keeps in its letters together (each is held in memory as
/// well as on disk); a new letter past this fails as past [`MAX_LETTERS`]. Ten thousand
/// letters of 64 KiB took 700 MB of memory, and at a larger `--max-body-bytes` the count alone
/// bounded nothing (600 letters of 2 MB took 1.3 GB: found by an adversarial run).
pub const MAX_LETTER_BYTES: usize = 256 * 1024 * 1024;
/// Refusals of letters past [`MAX_LETTERS`] or [`MAX_LETTER_BYTES`], logged at most every
/// [`WARN_EVERY`](crate::logging::WARN_EVERY).
static FULL_WARNINGS: crate::logging::RateLimited = crate::logging::RateLimited::new();
/// The version of a letter file's format.
const FORMAT: u32 = 1;

/// A dead letter's id: the lowercase hex SHA-1 of its raw body.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeadLetterId(String);

impl DeadLetterId {
    /// The id of the letter holding `body`.
    pub fn of(body: &[u8]) -> DeadLetterId {
        DeadLetterId(hex::encode(Sha1::digest(body)))
    }

    /// An id as a caller wrote it; anything but 40 lowercase hex digits is invalid (field `id`).
    pub fn parse(text: &str) -> Result<DeadLetterId, Error> {
        let hex = |b: u8| b.is_ascii_digit() || (b'a'..=b'f').contains(&b);
        if text.len() == 40 && text.bytes().all(hex) {
            Ok(DeadLetterId(text.to_owned()))
        } else {
            Err(Error::invalid(
                "id",
                "must be 40 lowercase hex digits (the SHA-1 of the body)",
            ))
        }
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for DeadLetterId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// One kept delivery.
#[derive(Clone, Debug, PartialEq)]
pub struct DeadLetter {
    /// The SHA-1 of `body`.
    pub id: DeadLetterId,
    /// When the body first arrived.
    pub received_at: DateTime<Utc>,
    /// When it last arrived (equal to `received_at` if it arrived once).
    pub last_received_at: DateTime<Utc>,
    /// How many times it arrived.
    pub deliveries: u64,
    /// Why it cannot be applied, as last found (on arrival or on a failed replay).
    pub reason: String,
    /// The field the reason is about, if any (`data.tier_order`, `body`).
    pub field: Option<String>,
    /// The raw body, exactly as it arrived (not necessarily UTF-8).
    pub body: Vec<u8>,
}

impl DeadLetter {
    /// Where this letter sits in listings.
    pub fn cursor(&self) -> Cursor {
        Cursor {
            received_at: self.received_at,
            id: self.id.clone(),
        }
    }
}

/// A position in the listing order: first arrival, then id. Letters only join at their arrival
/// time, so paging from a cursor never returns a letter twice.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Cursor {
    /// The first arrival of the last letter seen.
    pub received_at: DateTime<Utc>,
    /// Its id.
    pub id: DeadLetterId,
}

impl Cursor {
    /// An opaque page token for this cursor.
    pub fn encode(&self) -> String {
        let text = format!("v1 {} {}", rfc3339(self.received_at), self.id);
        URL_SAFE_NO_PAD.encode(text)
    }

    /// The cursor of a token made by [`Cursor::encode`]; anything else is invalid (field
    /// `page_token`).
    pub fn decode(token: &str) -> Result<Cursor, Error> {
        let invalid = || Error::invalid("page_token", "is not a token ListDeadLetters returned");
        let bytes = URL_SAFE_NO_PAD.decode(token).map_err(|_| invalid())?;
        let text = String::from_utf8(bytes).map_err(|_| invalid())?;
        let mut parts = text.split(' ');
        let (Some("v1"), Some(at), Some(id), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(invalid());
        };
        Ok(Cursor {
            received_at: parse_time(at).ok_or_else(invalid)?,
            id: DeadLetterId::parse(id).map_err(|_| invalid())?,
        })
    }
}

/// One page of a listing.
#[derive(Debug)]
pub struct Page {
    /// The letters, oldest first arrival first.
    pub letters: Vec<Arc<DeadLetter>>,
    /// Where the next page starts; `None` on the last page.
    pub next: Option<Cursor>,
}

/// Which letters to purge.
#[derive(Clone, Debug)]
pub enum Purge {
    /// Every letter.
    All,
    /// These letters (ids that are not kept are skipped).
    Ids(Vec<DeadLetterId>),
}

/// What a purge did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Purged {
    /// The letters removed.
    pub removed: Vec<DeadLetterId>,
    /// The letters left because a replay held them: the replay removes its letter once
    /// applied, and gives it back, still kept, when it cannot apply it.
    pub replaying: Vec<DeadLetterId>,
}

/// Why letters could not be kept, loaded or removed.
#[derive(Debug, thiserror::Error)]
pub enum DeadLetterError {
    /// [`MAX_LETTERS`] are kept already.
    #[error("{limit} dead letters are kept already; replay or purge some to keep new ones")]
    Full {
        /// The limit.
        limit: usize,
    },
    /// Keeping it would pass [`MAX_LETTER_BYTES`] of bodies.
    #[error(
        "dead letters hold {held} bytes of bodies already, and this one's {bytes} would pass the \
         {limit} kept at most; replay or purge some to keep new ones"
    )]
    FullOfBytes {
        /// What the kept letters' bodies hold.
        held: usize,
        /// This body's size.
        bytes: usize,
        /// The limit.
        limit: usize,
    },
    /// A filesystem operation failed.
    #[error("dead letters: {0}")]
    Io(IoError),
    /// The cluster-wide bucket could not be read or changed (NATS unreachable, a timeout).
    #[error("dead letter bucket: {0}")]
    Bucket(String),
    /// A letter is larger than one bucket value may be.
    #[error(
        "dead letter {id} takes {bytes} bytes stored, more than the {limit} one bucket value may \
         hold (the NATS server's max_payload); lower --max-body-bytes or raise max_payload"
    )]
    TooLarge {
        /// The letter.
        id: DeadLetterId,
        /// Its stored size.
        bytes: usize,
        /// The bucket's limit.
        limit: usize,
    },
    /// The server stopped and released its data directory: nothing is written there any more.
    #[error("the server is stopping: dead letters are no longer changed")]
    Stopping,
    /// A purge removed `removed` letters, then failed: the rest stay kept.
    #[error("{removed} dead letter(s) purged, then: {error}")]
    PurgeBrokeOff {
        /// How many letters it removed before (and, on one node, after) the failure.
        removed: usize,
        /// The (first) failure.
        error: Box<DeadLetterError>,
    },
    /// An entry of the cluster-wide bucket is not a letter, or the letter of another id.
    #[error("entry {id} of the dead-letter bucket is not a dead letter: {reason}")]
    Unreadable {
        /// Its key.
        id: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A letter file does not hold a valid letter.
    #[error("dead letter file {path} is damaged: {reason}; move it away to start")]
    Damaged {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
}

impl DeadLetterError {
    /// This error, from a purge that had removed `removed` letters: the caller is told so.
    pub(crate) fn after_removing(self, removed: usize) -> DeadLetterError {
        match removed {
            0 => self,
            removed => DeadLetterError::PurgeBrokeOff {
                removed,
                error: Box::new(self),
            },
        }
    }

    /// The error to answer a caller with: a storage failure is logged in full, and the caller
    /// gets a generic UNAVAILABLE (storage details are the operators', not the client's); a
    /// stop is UNAVAILABLE too, and an entry that is not a letter is named
    /// ([`Error::DeadLetterUnreadable`]).
    pub fn unavailable(self) -> Error {
        if let DeadLetterError::Stopping = self {
            // Not a storage failure: the caller retries against the next server.
            tracing::info!("dead letter not changed: the server is stopping");
            return Error::Unavailable {
                reason: "the server is stopping; retry later".into(),
            };
        }
        if let DeadLetterError::Unreadable { id, reason } = self {
            // Not a storage failure either: what is wrong is named, with the way out.
            tracing::warn!(key = %id, %reason, "an entry of the dead-letter bucket is not a dead letter");
            return Error::DeadLetterUnreadable { id, reason };
        }
        if let DeadLetterError::Full { .. } | DeadLetterError::FullOfBytes { .. } = self {
            // One line in a while: a sender of undeliverable bodies made one per refusal
            // (found by an adversarial run).
            if let Some(suppressed) = FULL_WARNINGS.due() {
                tracing::error!(error = %self, suppressed, "dead letter not kept: the dead letters are full");
            }
        } else {
            tracing::error!(error = %self, "dead letter storage failed");
        }
        if let DeadLetterError::PurgeBrokeOff { removed, .. } = self {
            // The caller learns what was done: a purge is not all or nothing.
            return Error::Unavailable {
                reason: format!(
                    "{removed} dead letter(s) were purged, then the rest could not be (the \
                     server's log says why); purge again to remove them"
                ),
            };
        }
        Error::Unavailable {
            reason: "the dead letters could not be read or changed (the server's log says why); \
                     retry later"
                .into(),
        }
    }
}

impl From<IoError> for DeadLetterError {
    fn from(error: IoError) -> DeadLetterError {
        DeadLetterError::Io(error)
    }
}

/// The dead letters of one server. Cloning it is one reference-count increment; every clone
/// shares the same letters (and, when durable, the same directory).
#[derive(Clone)]
pub struct LocalLetters {
    inner: Arc<Inner>,
}

struct Inner {
    /// `None` under `--ephemeral`.
    dir: Option<PathBuf>,
    /// Where each change takes its share of the data directory's lock (unlocked in memory).
    lock: LockRef,
    max_letters: usize,
    /// [`MAX_LETTER_BYTES`], or less in tests.
    max_bytes: usize,
    /// What readers see. A plain mutex, held only to look up or swap entries and never during
    /// I/O: letters are few and rarely touched, so a concurrent map would buy nothing.
    index: Mutex<Index>,
    /// Serializes changes: each one reads a letter, writes its file, then swaps the index
    /// entry, so two arrivals of the same body cannot both create it or lose a repeat count.
    /// Held across file I/O (on a blocking thread), never by readers.
    writer: Mutex<()>,
    /// The letters a replay holds, and since when: one replay at a time, and a purge leaves
    /// them to it. A claim lapses after [`shared::REPLAY_CLAIM_TIMEOUT`], as a replica's does.
    replaying: Mutex<HashMap<DeadLetterId, std::time::Instant>>,
}

#[derive(Default)]
struct Index {
    by_id: HashMap<DeadLetterId, Arc<DeadLetter>>,
    order: BTreeSet<(DateTime<Utc>, DeadLetterId)>,
    /// The bytes of the letters' bodies.
    body_bytes: usize,
}

impl Index {
    fn insert(&mut self, letter: Arc<DeadLetter>) {
        self.order.insert((letter.received_at, letter.id.clone()));
        self.body_bytes += letter.body.len();
        if let Some(old) = self.by_id.insert(letter.id.clone(), letter) {
            // A rewrite keeps the first arrival, so the order entry is the same one.
            debug_assert!(self.order.contains(&(old.received_at, old.id.clone())));
            self.body_bytes -= old.body.len();
        }
    }

    fn remove(&mut self, id: &DeadLetterId) -> Option<Arc<DeadLetter>> {
        let letter = self.by_id.remove(id)?;
        self.order.remove(&(letter.received_at, letter.id.clone()));
        self.body_bytes -= letter.body.len();
        Some(letter)
    }

    /// Refused if a new letter of `bytes` would pass `max_letters` or `max_bytes`.
    fn room_for(
        &self,
        bytes: usize,
        (max_letters, max_bytes): (usize, usize),
    ) -> Result<(), DeadLetterError> {
        if self.by_id.len() >= max_letters {
            return Err(DeadLetterError::Full { limit: max_letters });
        }
        if self.body_bytes.saturating_add(bytes) > max_bytes {
            let (held, limit) = (self.body_bytes, max_bytes);
            return Err(DeadLetterError::FullOfBytes { held, bytes, limit });
        }
        Ok(())
    }
}

impl LocalLetters {
    /// Letters kept in memory only (`--ephemeral`, and ingresses built without a data
    /// directory).
    pub fn in_memory() -> LocalLetters {
        let limits = (MAX_LETTERS, MAX_LETTER_BYTES);
        LocalLetters::new(None, LockRef::unlocked(), limits, Index::default())
    }

    /// Opens `<data_dir>/dead-letters` (created if missing) and loads every letter in it; each
    /// later change holds a share of `lock` while it writes ([`LockRef::unlocked`] only where
    /// nobody locked the directory). Blocking: call it where blocking is fine (start-up's recovery thread).
    pub fn open(data_dir: &Path, lock: LockRef) -> Result<LocalLetters, DeadLetterError> {
        let dir = data_dir.join(DIR);
        if !dir.is_dir() {
            std::fs::create_dir_all(&dir).map_err(IoError::on(&dir, "create"))?;
            sync_dir(data_dir).map_err(IoError::on(data_dir, "sync"))?;
        }
        let mut index = Index::default();
        for entry in std::fs::read_dir(&dir).map_err(IoError::on(&dir, "list"))? {
            let path = entry.map_err(IoError::on(&dir, "list"))?.path();
            match path.extension().and_then(|ext| ext.to_str()) {
                Some("json") => index.insert(Arc::new(load(&path)?)),
                // A write interrupted before its rename: the letter's previous version, if
                // any, is intact, and the sender was not answered 422 for this one.
                Some("tmp") => std::fs::remove_file(&path).map_err(IoError::on(&path, "remove"))?,
                _ => tracing::warn!(file = %path.display(), "not a dead letter file; left alone"),
            }
        }
        tracing::info!(dir = %dir.display(), letters = index.by_id.len(), "dead letters loaded");
        Ok(LocalLetters::new(
            Some(dir),
            lock,
            (MAX_LETTERS, MAX_LETTER_BYTES),
            index,
        ))
    }

    /// Letters kept in `dir`, each change holding a share of `lock`, or in memory only.
    fn new(
        dir: Option<PathBuf>,
        lock: LockRef,
        (max_letters, max_bytes): (usize, usize),
        index: Index,
    ) -> LocalLetters {
        LocalLetters {
            inner: Arc::new(Inner {
                dir,
                lock,
                max_letters,
                max_bytes,
                index: Mutex::new(index),
                writer: Mutex::new(()),
                replaying: Mutex::default(),
            }),
        }
    }

    /// Keeps `body`, which cannot be applied because of `error`, as received at `now`, and
    /// returns its id once it is kept (on disk when durable). The same body again is the same
    /// letter: its first arrival stays, its delivery count grows and its reason is refreshed.
    pub async fn store(
        &self,
        body: &[u8],
        error: &Error,
        now: DateTime<Utc>,
    ) -> Result<DeadLetterId, DeadLetterError> {
        let body = body.to_vec();
        let (reason, field) = (error.to_string(), error.field().map(str::to_owned));
        self.change(move |inner| {
            let id = DeadLetterId::of(&body);
            let existing = lock(&inner.index).by_id.get(&id).cloned();
            let letter = match existing {
                Some(old) => DeadLetter {
                    last_received_at: now.max(old.last_received_at),
                    deliveries: old.deliveries + 1,
                    reason,
                    field,
                    ..DeadLetter::clone(&old)
                },
                None => {
                    let limits = (inner.max_letters, inner.max_bytes);
                    lock(&inner.index).room_for(body.len(), limits)?;
                    DeadLetter {
                        id: id.clone(),
                        received_at: now,
                        last_received_at: now,
                        deliveries: 1,
                        reason,
                        field,
                        body,
                    }
                }
            };
            inner.write(&letter)?;
            lock(&inner.index).insert(Arc::new(letter));
            Ok(id)
        })
        .await
    }

    /// Records why a kept letter still cannot be applied (after a failed replay). Returns
    /// false if the letter is no longer kept.
    pub async fn set_reason(
        &self,
        id: &DeadLetterId,
        error: &Error,
    ) -> Result<bool, DeadLetterError> {
        let id = id.clone();
        let (reason, field) = (error.to_string(), error.field().map(str::to_owned));
        self.change(move |inner| {
            let Some(old) = lock(&inner.index).by_id.get(&id).cloned() else {
                return Ok(false);
            };
            if old.reason == reason && old.field == field {
                return Ok(true);
            }
            let letter = DeadLetter {
                reason,
                field,
                ..DeadLetter::clone(&old)
            };
            inner.write(&letter)?;
            lock(&inner.index).insert(Arc::new(letter));
            Ok(true)
        })
        .await
    }

    /// The letter with this id, if kept.
    pub fn get(&self, id: &DeadLetterId) -> Option<Arc<DeadLetter>> {
        lock(&self.inner.index).by_id.get(id).cloned()
    }

    /// How many letters are kept.
    pub fn len(&self) -> usize {
        lock(&self.inner.index).by_id.len()
    }

    /// Whether no letter is kept.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Up to `limit` letters (at least one) after `after`, oldest first arrival first. Past the
    /// first letter, a page stops before its bodies would exceed `max_body_bytes`, so a page
    /// stays a reasonable message whatever the bodies weigh.
    pub fn list(&self, after: Option<&Cursor>, limit: usize, max_body_bytes: usize) -> Page {
        let index = lock(&self.inner.index);
        let start = match after {
            Some(cursor) => Bound::Excluded((cursor.received_at, cursor.id.clone())),
            None => Bound::Unbounded,
        };
        let letters = index
            .order
            .range((start, Bound::Unbounded))
            .map(|(_, id)| &index.by_id[id]);
        page(letters, limit, max_body_bytes)
    }

    /// Removes one letter (replayed, or no longer wanted). Returns false if it was not kept.
    pub async fn remove(&self, id: &DeadLetterId) -> Result<bool, DeadLetterError> {
        let purged = self.delete(Purge::Ids(vec![id.clone()]), false).await?;
        Ok(!purged.removed.is_empty())
    }

    /// Removes these letters, or all of them, except those a replay holds. Ids that are not
    /// kept are skipped. A letter whose file cannot be removed stays kept, the others are
    /// removed, and the first such error is returned.
    pub async fn purge(&self, which: Purge) -> Result<Purged, DeadLetterError> {
        self.delete(which, true).await
    }

    /// Removes letters; those a replay holds too unless `leave_held` (a purge leaves them to
    /// the replay, which removes its letter once applied).
    async fn delete(&self, which: Purge, leave_held: bool) -> Result<Purged, DeadLetterError> {
        self.change(move |inner| {
            let ids = match which {
                Purge::All => lock(&inner.index).by_id.keys().cloned().collect(),
                Purge::Ids(ids) => ids,
            };
            let mut purged = Purged::default();
            let mut result = Ok(());
            for id in ids {
                let letter = match inner.take_unless_held(&id, leave_held) {
                    Taken::Letter(letter) => letter,
                    Taken::NotKept => continue,
                    Taken::Held => {
                        purged.replaying.push(id);
                        continue;
                    }
                };
                if let Err(error) = inner.delete(&id) {
                    // Its file is still there: still kept. The others go on: stopping here
                    // left every letter after it kept, however often the purge was retried
                    // (found by an adversarial run).
                    lock(&inner.index).insert(letter);
                    if result.is_ok() {
                        result = Err(error);
                    }
                    continue;
                }
                purged.removed.push(id);
            }
            if let Some(dir) = &inner.dir
                && !purged.removed.is_empty()
                && let Err(error) = sync_dir(dir)
            {
                result = result.and(Err(IoError::on(dir, "sync")(error).into()));
            }
            let removed = purged.removed.len();
            result
                .map(|()| purged)
                .map_err(|error| error.after_removing(removed))
        })
        .await
    }

    /// Claims `id` for a replay: the letter, unless it is not kept or another replay holds
    /// it. Its presence is read and the claim made under the claims' lock, which a purge holds
    /// while it takes a letter out ([`Inner::take_unless_held`]), so a purge and a replay of
    /// one letter never both go ahead: read apart, a replay that started while a purge removed
    /// the letter's file claimed it, and both said they had done it (found by an adversarial
    /// run).
    pub fn claim_replay(&self, id: &DeadLetterId) -> Result<Arc<DeadLetter>, Error> {
        let mut replaying = lock(&self.inner.replaying);
        if replaying.get(id).is_some_and(claim_holds) {
            return Err(Error::DeadLetterBeingReplayed { id: id.to_string() });
        }
        let letter = lock(&self.inner.index).by_id.get(id).cloned();
        let letter = letter.ok_or_else(|| Error::DeadLetterNotFound { id: id.to_string() })?;
        replaying.insert(id.clone(), std::time::Instant::now());
        Ok(letter)
    }

    /// The replay of `id` is over (applied or not).
    pub fn end_replay(&self, id: &DeadLetterId) {
        lock(&self.inner.replaying).remove(id);
    }

    /// Runs a change with the writer lock held: inline in memory, on a blocking thread when it
    /// touches files.
    async fn change<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Inner) -> Result<T, DeadLetterError> + Send + 'static,
    ) -> Result<T, DeadLetterError> {
        let inner = Arc::clone(&self.inner);
        let Some(dir) = self.inner.dir.clone() else {
            let _writing = lock(&inner.writer);
            return work(&inner);
        };
        // Held until the change is done, even if its caller stopped waiting: the directory
        // stays locked while a file is written or removed. None once the server released it.
        let share = self.inner.lock.share().ok_or(DeadLetterError::Stopping)?;
        let data_dir = dir.parent().unwrap_or(&dir).to_owned();
        let run = move || {
            // Not into a data directory that is no longer this server's (moved or replaced).
            let data_dir = data_dir.as_path();
            (share.check_in_place(data_dir)).map_err(IoError::on(data_dir, "write a letter in"))?;
            let _writing = lock(&inner.writer);
            let done = work(&inner);
            drop(share);
            done
        };
        match tokio::task::spawn_blocking(run).await {
            Ok(result) => result,
            Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
            Err(error) => {
                Err(IoError::new(&dir, "finish a change", std::io::Error::other(error)).into())
            }
        }
    }
}

/// Whether a replay claim made at `since` still holds.
fn claim_holds(since: &std::time::Instant) -> bool {
    since.elapsed() < shared::REPLAY_CLAIM_TIMEOUT
}

/// What [`Inner::take_unless_held`] found.
enum Taken {
    Letter(Arc<DeadLetter>),
    NotKept,
    Held,
}

impl Inner {
    /// Takes `id` out of the index, unless it is not kept or (with `leave_held`) a replay
    /// holds it. The claims' lock is taken first and held throughout, as
    /// [`LocalLetters::claim_replay`] takes it (the same order: claims, then the index).
    fn take_unless_held(&self, id: &DeadLetterId, leave_held: bool) -> Taken {
        let replaying = lock(&self.replaying);
        if leave_held && replaying.get(id).is_some_and(claim_holds) {
            return Taken::Held;
        }
        match lock(&self.index).remove(id) {
            Some(letter) => Taken::Letter(letter),
            None => Taken::NotKept,
        }
    }

    fn path(&self, id: &DeadLetterId) -> Option<PathBuf> {
        self.dir.as_ref().map(|dir| dir.join(format!("{id}.json")))
    }

    /// Writes a letter's file atomically (nothing in memory mode).
    fn write(&self, letter: &DeadLetter) -> Result<(), DeadLetterError> {
        let Some(path) = self.path(&letter.id) else {
            return Ok(());
        };
        let bytes = encode(letter, None);
        Ok(write_atomically(&path, &bytes).map_err(IoError::on(&path, "write"))?)
    }

    /// Removes a letter's file; the caller syncs the directory (once for many removals).
    fn delete(&self, id: &DeadLetterId) -> Result<(), DeadLetterError> {
        let Some(path) = self.path(id) else {
            return Ok(());
        };
        match std::fs::remove_file(&path) {
            Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
                Err(IoError::new(&path, "remove", error).into())
            }
            _ => Ok(()),
        }
    }
}

/// A letter file: JSON, readable with `jq` (`.body | @base64d` gives the raw body back).
#[derive(Serialize, Deserialize)]
struct Record {
    format: u32,
    id: String,
    received_at: String,
    last_received_at: String,
    deliveries: u64,
    reason: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    field: Option<String>,
    body: String,
    /// When a replica claimed the letter to replay it (cluster-wide letters only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    replaying_since: Option<String>,
}

/// Reads one letter file, checking everything it claims (the id is the body's SHA-1 and the
/// file's name).
fn load(path: &Path) -> Result<DeadLetter, DeadLetterError> {
    let damaged = |reason: &str| DeadLetterError::Damaged {
        path: path.to_owned(),
        reason: reason.to_owned(),
    };
    let bytes = std::fs::read(path).map_err(IoError::on(path, "read"))?;
    let (letter, _) = decode(&bytes).map_err(|reason| damaged(&reason))?;
    if path.file_stem().and_then(|stem| stem.to_str()) != Some(letter.id.as_str()) {
        return Err(damaged("its name is not its id"));
    }
    Ok(letter)
}

/// Room a letter's record takes besides its body: id, times, count, reason (values it echoes
/// are cut short) and field name, with the JSON around them.
const RECORD_ROOM: usize = 16 * 1024;

/// The largest body a letter of at most `max_record_bytes` keeps: the record holds the body
/// base64-encoded (4 bytes for every 3) beside the rest.
pub fn largest_body_kept(max_record_bytes: usize) -> usize {
    max_record_bytes.saturating_sub(RECORD_ROOM) / 4 * 3
}

/// A letter as one JSON record (a file's contents, or a bucket entry's value), with the time a
/// replica claimed it for a replay, if one did.
fn encode(letter: &DeadLetter, replaying_since: Option<DateTime<Utc>>) -> Vec<u8> {
    let record = Record {
        format: FORMAT,
        id: letter.id.to_string(),
        received_at: rfc3339(letter.received_at),
        last_received_at: rfc3339(letter.last_received_at),
        deliveries: letter.deliveries,
        reason: letter.reason.clone(),
        field: letter.field.clone(),
        body: STANDARD.encode(&letter.body),
        replaying_since: replaying_since.map(rfc3339),
    };
    let mut bytes = serde_json::to_vec_pretty(&record).expect("a record serializes");
    bytes.push(b'\n');
    bytes
}

/// Reads a record made by [`encode`], checking everything it claims (the id is the body's
/// SHA-1); what is wrong with it otherwise.
fn decode(bytes: &[u8]) -> Result<(DeadLetter, Option<DateTime<Utc>>), String> {
    let record: Record =
        serde_json::from_slice(bytes).map_err(|err| format!("not a dead letter record: {err}"))?;
    if record.format != FORMAT {
        return Err(format!("unknown format {}", record.format));
    }
    let body = STANDARD
        .decode(&record.body)
        .map_err(|_| "body is not base64".to_string())?;
    let id = DeadLetterId::of(&body);
    if record.id != id.as_str() {
        return Err("its id is not the SHA-1 of its body".into());
    }
    let time = |text: &str, what: &str| {
        parse_time(text).ok_or_else(|| format!("{what} is not an RFC 3339 timestamp"))
    };
    let replaying_since = match &record.replaying_since {
        Some(text) => Some(time(text, "replaying_since")?),
        None => None,
    };
    let letter = DeadLetter {
        id,
        received_at: time(&record.received_at, "received_at")?,
        last_received_at: time(&record.last_received_at, "last_received_at")?,
        deliveries: record.deliveries,
        reason: record.reason,
        field: record.field,
        body,
    };
    Ok((letter, replaying_since))
}

/// Up to `limit` letters (at least one) of `letters`, which are in listing order. Past the
/// first letter, a page stops before its bodies would exceed `max_body_bytes`.
fn page<'a>(
    letters: impl Iterator<Item = &'a Arc<DeadLetter>>,
    limit: usize,
    max_body_bytes: usize,
) -> Page {
    let mut page = PageBuilder::new(limit, max_body_bytes);
    for letter in letters {
        if !page.offer(Arc::clone(letter)) {
            break;
        }
    }
    page.finish()
}

/// A page filled letter by letter in listing order, so that letters read one at a time (from
/// the cluster's bucket) are read only as far as the page goes: at most `limit` letters, and
/// no more bodies than `max_body_bytes` once it holds one.
struct PageBuilder {
    kept: Vec<Arc<DeadLetter>>,
    bytes: usize,
    limit: usize,
    max_body_bytes: usize,
    next: Option<Cursor>,
}

impl PageBuilder {
    fn new(limit: usize, max_body_bytes: usize) -> PageBuilder {
        PageBuilder {
            kept: Vec::new(),
            bytes: 0,
            limit: limit.max(1),
            max_body_bytes,
            next: None,
        }
    }

    /// Takes the next letter; false when the page is full (it goes to a later page).
    fn offer(&mut self, letter: Arc<DeadLetter>) -> bool {
        let full = self.kept.len() >= self.limit
            || (!self.kept.is_empty() && self.bytes + letter.body.len() > self.max_body_bytes);
        if full {
            self.next = self.kept.last().map(|last| last.cursor());
            return false;
        }
        self.bytes += letter.body.len();
        self.kept.push(letter);
        true
    }

    fn finish(self) -> Page {
        Page {
            letters: self.kept,
            next: self.next,
        }
    }
}

/// RFC 3339 in UTC with as many fractional digits as needed to read back the same instant.
fn rfc3339(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::AutoSi, true)
}

fn parse_time(text: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(text)
        .ok()
        .map(|at| at.with_timezone(&Utc))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(second: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_700_000_000 + second, 123_456_789).unwrap()
    }

    /// A body of the largest size kept, with a long reason and field and a replay's claim,
    /// encodes within the record bound; one byte more of body (in base64's next group) does
    /// not, at the NATS default of 1 MiB.
    #[test]
    fn the_largest_body_kept_fits_its_record_with_room_for_the_rest() {
        let max = 1024 * 1024;
        let largest = largest_body_kept(max);
        assert!(largest > 700_000, "{largest}");
        let letter = |body_bytes: usize| {
            let body = vec![b'{'; body_bytes];
            DeadLetter {
                id: DeadLetterId::of(&body),
                received_at: at(1),
                last_received_at: at(2),
                deliveries: u64::MAX,
                reason: "\u{1F600}\"".repeat(1_000),
                field: Some(format!("data.{}", "k".repeat(2_000))),
                body,
            }
        };
        assert!(encode(&letter(largest), Some(at(3))).len() <= max);
        let beyond = largest + RECORD_ROOM * 3 / 4 + 3;
        assert!(encode(&letter(beyond), None).len() > max);
    }

    fn invalid(field: &str) -> Error {
        Error::invalid(field, "is required")
    }

    #[test]
    fn ids_are_the_sha1_of_the_body_and_parse_strictly() {
        let id = DeadLetterId::of(b"abc");
        assert_eq!(id.as_str(), "a9993e364706816aba3e25717850c26c9cd0d89d");
        assert_eq!(DeadLetterId::parse(id.as_str()).unwrap(), id);
        for bad in [
            "",
            "A9993E364706816ABA3E25717850C26C9CD0D89D",
            "a9993e",
            "../etc",
        ] {
            assert!(DeadLetterId::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn page_tokens_round_trip_and_junk_is_refused() {
        let cursor = Cursor {
            received_at: at(5),
            id: DeadLetterId::of(b"x"),
        };
        assert_eq!(Cursor::decode(&cursor.encode()).unwrap(), cursor);
        for junk in ["", "nope", &URL_SAFE_NO_PAD.encode("v2 x y")] {
            let Err(Error::InvalidArgument { field, .. }) = Cursor::decode(junk) else {
                panic!("{junk:?} decoded");
            };
            assert_eq!(field, "page_token");
        }
    }

    #[tokio::test]
    async fn the_same_body_is_one_letter_counting_repeats() {
        let letters = LocalLetters::in_memory();
        let id = letters.store(b"{", &invalid("body"), at(1)).await.unwrap();
        let again = letters.store(b"{", &invalid("event"), at(2)).await.unwrap();
        assert_eq!(id, again);
        assert_eq!(letters.len(), 1);
        let letter = letters.get(&id).unwrap();
        assert_eq!(
            (letter.received_at, letter.last_received_at),
            (at(1), at(2))
        );
        assert_eq!(letter.deliveries, 2);
        assert_eq!(letter.field.as_deref(), Some("event"), "the newest reason");
        assert_eq!(letter.body, b"{");
    }

    #[tokio::test]
    async fn pages_follow_first_arrival_and_respect_the_byte_budget() {
        let letters = LocalLetters::in_memory();
        let mut ids = Vec::new();
        for n in 0..5u8 {
            let body = vec![n; 10];
            ids.push(
                letters
                    .store(&body, &invalid("body"), at(10 - i64::from(n)))
                    .await
                    .unwrap(),
            );
        }
        ids.reverse(); // the last stored arrived first
        let mut seen = Vec::new();
        let mut after = None;
        loop {
            let page = letters.list(after.as_ref(), 2, 1000);
            assert!(page.letters.len() <= 2);
            seen.extend(page.letters.iter().map(|l| l.id.clone()));
            match page.next {
                Some(next) => after = Some(next),
                None => break,
            }
        }
        assert_eq!(seen, ids);
        let page = letters.list(None, 100, 25);
        assert_eq!(
            page.letters.len(),
            2,
            "10 + 10 bytes fit in 25, a third does not"
        );
        let page = letters.list(None, 100, 0);
        assert_eq!(page.letters.len(), 1, "a page holds at least one letter");
    }

    #[tokio::test]
    async fn no_change_once_the_data_directory_was_released() {
        let data = tempfile::tempdir().unwrap();
        let dir = crate::data_dir::DataDir::open(data.path()).unwrap();
        let letters = LocalLetters::open(data.path(), dir.lock_ref()).unwrap();
        letters.store(b"1", &invalid("body"), at(1)).await.unwrap();
        // A journal thread stuck in a sync keeps the lock past the stop: the directory is
        // still locked, and still nothing new may start writing there.
        let stuck_journal = dir.lock_ref().share().unwrap();
        drop(dir);
        assert!(matches!(
            crate::data_dir::DataDir::open(data.path()),
            Err(crate::data_dir::DataDirError::Locked { .. })
        ));
        let refused = letters.store(b"2", &invalid("body"), at(2)).await;
        assert!(
            matches!(refused, Err(DeadLetterError::Stopping)),
            "refused after the stop, got {refused:?}"
        );
        drop(stuck_journal);
        let answered = refused.unwrap_err().unavailable().to_string();
        assert!(answered.contains("stopping"), "{answered}");
        assert_eq!(
            LocalLetters::open(data.path(), LockRef::unlocked())
                .unwrap()
                .list(None, 10, usize::MAX)
                .letters
                .len(),
            1,
            "nothing written after the release"
        );
    }

    /// Past [`MAX_LETTER_BYTES`] of bodies a new letter is refused as past the count, repeats
    /// of kept ones still count, and what is purged or replayed makes room again.
    #[tokio::test]
    async fn a_store_full_of_bytes_refuses_new_bodies_until_some_go() {
        let limits = (MAX_LETTERS, 5);
        let letters = LocalLetters::new(None, LockRef::unlocked(), limits, Index::default());
        letters
            .store(b"123", &invalid("body"), at(1))
            .await
            .unwrap();
        let refused = letters.store(b"456", &invalid("body"), at(2)).await;
        let full = DeadLetterError::FullOfBytes {
            held: 3,
            bytes: 3,
            limit: 5,
        };
        assert_eq!(refused.unwrap_err().to_string(), full.to_string());
        letters
            .store(b"123", &invalid("body"), at(3))
            .await
            .unwrap();
        letters.store(b"45", &invalid("body"), at(4)).await.unwrap();
        let purged = letters.purge(Purge::All).await.unwrap();
        assert_eq!(purged.removed.len(), 2);
        letters
            .store(b"45678", &invalid("body"), at(5))
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn a_full_store_refuses_new_bodies_but_counts_repeats() {
        let limits = (1, MAX_LETTER_BYTES);
        let letters = LocalLetters::new(None, LockRef::unlocked(), limits, Index::default());
        letters.store(b"1", &invalid("body"), at(1)).await.unwrap();
        let refused = letters.store(b"2", &invalid("body"), at(2)).await;
        assert!(matches!(refused, Err(DeadLetterError::Full { limit: 1 })));
        letters.store(b"1", &invalid("body"), at(3)).await.unwrap();
        let purged = letters.purge(Purge::All).await.unwrap();
        assert_eq!(purged.removed.len(), 1);
        letters.store(b"2", &invalid("body"), at(4)).await.unwrap();
    }

    #[tokio::test]
    async fn letters_survive_reopening_and_removals_stick() {
        let data = tempfile::tempdir().unwrap();
        let body = b"\xff\xfe not utf-8".to_vec();
        let letters = LocalLetters::open(data.path(), LockRef::unlocked()).unwrap();
        let id = letters
            .store(&body, &invalid("data.tier_order"), at(1))
            .await
            .unwrap();
        letters
            .store(&body, &invalid("data.tier_order"), at(2))
            .await
            .unwrap();
        let other = letters.store(b"[]", &invalid("body"), at(3)).await.unwrap();
        assert!(letters.set_reason(&other, &invalid("event")).await.unwrap());
        let before: Vec<_> = letters.list(None, 10, usize::MAX).letters;
        drop(letters);

        let reopened = LocalLetters::open(data.path(), LockRef::unlocked()).unwrap();
        let after = reopened.list(None, 10, usize::MAX).letters;
        assert_eq!(after, before);
        assert_eq!(reopened.get(&id).unwrap().deliveries, 2);
        assert_eq!(
            reopened.get(&other).unwrap().field.as_deref(),
            Some("event")
        );

        assert!(reopened.remove(&id).await.unwrap());
        assert!(!reopened.remove(&id).await.unwrap());
        drop(reopened);
        let again = LocalLetters::open(data.path(), LockRef::unlocked()).unwrap();
        assert_eq!(again.len(), 1);
        assert!(again.get(&other).is_some());
    }

    /// Letters kept in `data` holding one, its id and its file.
    async fn one_letter(data: &Path) -> (LocalLetters, DeadLetterId, PathBuf) {
        let letters = LocalLetters::open(data, LockRef::unlocked()).unwrap();
        let id = letters
            .store(b"{}", &invalid("event"), at(1))
            .await
            .unwrap();
        let path = data.join(DIR).join(format!("{id}.json"));
        (letters, id, path)
    }

    /// A purge takes a letter out of the index before removing its file: a file that cannot
    /// be removed puts it back, since it is still kept (and would be back after a restart).
    #[tokio::test]
    async fn a_letter_whose_file_cannot_be_removed_stays_kept() {
        let data = tempfile::tempdir().unwrap();
        let (letters, id, path) = one_letter(data.path()).await;
        std::fs::remove_file(&path).unwrap();
        // A directory in its place: removing it as a file fails.
        std::fs::create_dir_all(path.join("inside")).unwrap();
        let mut others = Vec::new();
        for n in 0..3 {
            let body = format!("[{n}]");
            others.push(
                letters
                    .store(body.as_bytes(), &invalid("body"), at(2))
                    .await
                    .unwrap(),
            );
        }
        // The failing letter first: the others after it are purged all the same.
        let ids = [vec![id.clone()], others.clone()].concat();
        let Err(error) = letters.purge(Purge::Ids(ids)).await else {
            panic!("a letter was not removed: the purge must say so");
        };
        // ... and what it did remove (a failed purge said nothing of it).
        assert!(
            matches!(error, DeadLetterError::PurgeBrokeOff { removed: 3, .. }),
            "{error:?}"
        );
        let Error::Unavailable { reason } = error.unavailable() else {
            panic!("answered UNAVAILABLE");
        };
        assert!(
            reason.starts_with("3 dead letter(s) were purged"),
            "{reason}"
        );
        assert!(letters.get(&id).is_some(), "still kept");
        assert!(others.iter().all(|other| letters.get(other).is_none()));
        assert_eq!(letters.list(None, 10, usize::MAX).letters.len(), 1);
        assert!(letters.claim_replay(&id).is_ok(), "and replayable");
    }

    #[tokio::test]
    async fn a_damaged_file_stops_opening_and_names_it() {
        let data = tempfile::tempdir().unwrap();
        let (letters, _, path) = one_letter(data.path()).await;
        drop(letters);
        let text = std::fs::read_to_string(&path).unwrap();
        let tampered = text.replace(&STANDARD.encode(b"{}"), &STANDARD.encode(b"[]"));
        std::fs::write(&path, tampered).unwrap();
        // A leftover temp file is an interrupted write, not damage.
        std::fs::write(data.path().join(DIR).join("x.tmp"), b"half").unwrap();

        let Err(error) = LocalLetters::open(data.path(), LockRef::unlocked()) else {
            panic!("a tampered letter must not load");
        };
        let message = error.to_string();
        assert!(message.contains(&path.display().to_string()), "{message}");
        assert!(message.contains("SHA-1"), "{message}");
        assert!(!data.path().join(DIR).join("x.tmp").exists());

        std::fs::write(&path, b"not json").unwrap();
        let Err(error) = LocalLetters::open(data.path(), LockRef::unlocked()) else {
            panic!("junk must not load");
        };
        assert!(
            error.to_string().contains(&path.display().to_string()),
            "{error}"
        );
    }
}
