//! The data directory: its lock, its store id, and where files go.
//!
//! One process at a time: `LOCK` is held with an OS file lock for the life of the process, so a
//! second process on the same directory refuses to start (a crashed process releases it).
//! `RESTORING` marks a directory that `profile-state restore` is filling, from before anything
//! else is written until the restored store is proven to recover: a restore killed half-way
//! leaves it, and no server opens such a directory (a new restore starts it over). The
//! store id is created with the directory and changes only when acknowledged records are given
//! up (an operator's `--discard-journal-from`): clients compare it to tell a store whose
//! revisions they know from one whose revisions mean something else (wiped, or cut back). The journal and snapshots live directly in the directory;
//! their format is `crate::journal`'s business, not this module's.
//!
//! The lock outlives the [`DataDir`] while work that writes into the directory still runs: the
//! journal's thread, each snapshot and each change of a dead letter holds a [`LockShare`], and
//! the OS lock is released only when the handle and every share are gone. A stop that gave up
//! waiting for one of them (a sync stuck on a failing disk) thus never lets another server into
//! the directory while that work may still write or remove files there. What lives as long as
//! the server and only sometimes writes (the sequencer, a replica's applier, the dead letters)
//! keeps a [`LockRef`] and takes a share for each piece of work: once the [`DataDir`] was
//! dropped (the server stopped), it gets none and must not write, even while an earlier share
//! still holds the lock. An OS lock holds a file, not a path: work that writes by path first
//! checks that the `LOCK` at the path is still the locked file ([`LockShare::check_in_place`]),
//! and writes nothing when the directory was moved or replaced, or its `LOCK` removed.

use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};

use crate::io_error::IoError;

/// The name of the lock file.
const LOCK_FILE: &str = "LOCK";
/// The name of the file holding the store id.
const STORE_ID_FILE: &str = "STORE_ID";
/// The name of the file a restore keeps in the directory until the restored store is whole and
/// proven to recover. A directory holding it is a restore that did not finish (killed, the
/// machine lost): no server may open it, since it would serve part of the backup, or nothing,
/// as the store.
const RESTORING_FILE: &str = "RESTORING";

/// Whether `dir` is a data directory (it holds a store id): a place nothing else may write.
pub fn is_data_dir(dir: &Path) -> bool {
    dir.join(STORE_ID_FILE).exists()
}

/// An opened, locked data directory.
pub struct DataDir {
    path: PathBuf,
    store_id: String,
    // The OS lock lives as long as this handle and every share of it.
    lock: Arc<Lock>,
}

/// The locked file, and whether its [`DataDir`] is gone (no new shares then).
struct Lock {
    // Held, never read.
    _file: File,
    /// The locked file's device and inode: what `LOCK` must still be ([`LockShare::check_in_place`]).
    identity: (u64, u64),
    handle_dropped: AtomicBool,
}

impl Lock {
    fn new(file: File) -> Lock {
        use std::os::unix::fs::MetadataExt;
        // An fstat of an open file does not fail short of a bad descriptor; (0, 0) would only
        // make every check fail, refusing writes rather than risking them.
        let identity = file
            .metadata()
            .map_or((0, 0), |meta| (meta.dev(), meta.ino()));
        Lock {
            _file: file,
            identity,
            handle_dropped: AtomicBool::new(false),
        }
    }
}

impl Drop for DataDir {
    fn drop(&mut self) {
        self.lock.handle_dropped.store(true, Ordering::SeqCst);
    }
}

/// A share of a data directory's lock, held by work that writes into the directory: the lock
/// is released only once every share and the [`DataDir`] are dropped.
#[derive(Clone)]
pub struct LockShare {
    // Held, never read (`None`: a directory nobody locked).
    _lock: Option<Arc<Lock>>,
}

impl LockShare {
    /// Whether the lock this share holds is still the `LOCK` file of `dir`: an error when the
    /// file there is gone or is another (the directory was moved or replaced, by a restore
    /// say, or its `LOCK` removed), where another process may now write. Work that writes by
    /// path checks this first; writing on would mix two stores' files (adversary round 12, F4
    /// and F5). A stat: the journal makes it before an append that creates or cuts a file, and
    /// otherwise at most 50 ms apart (`journal::appender`).
    pub fn check_in_place(&self, dir: &Path) -> std::io::Result<()> {
        use std::os::unix::fs::MetadataExt;
        let Some(lock) = &self._lock else {
            return Ok(());
        };
        let at_path = fs::symlink_metadata(dir.join(LOCK_FILE))
            .map(|meta| (meta.dev(), meta.ino()))
            .ok();
        match at_path == Some(lock.identity) {
            true => Ok(()),
            false => Err(std::io::Error::other(format!(
                "{} is not the LOCK file this server locked (the data directory was moved or \
                 replaced, or its LOCK removed): nothing more is written there; stop this \
                 server, and start one on the directory you mean to serve",
                dir.join(LOCK_FILE).display()
            ))),
        }
    }
}

/// Where to take a [`LockShare`] from for each piece of work, without holding the lock in
/// between.
#[derive(Clone)]
pub struct LockRef(Option<Weak<Lock>>);

impl LockRef {
    /// For a directory nobody locked (tests, and what lives in memory only): every share is
    /// given, and holds nothing.
    pub fn unlocked() -> LockRef {
        LockRef(None)
    }

    /// A share for one piece of work; `None` once the [`DataDir`] was dropped (the server
    /// stopped), whether or not earlier shares still hold the lock: then nothing new may be
    /// written there.
    pub fn share(&self) -> Option<LockShare> {
        match &self.0 {
            None => Some(LockShare { _lock: None }),
            Some(lock) => lock
                .upgrade()
                .filter(|lock| !lock.handle_dropped.load(Ordering::SeqCst))
                .map(|lock| LockShare { _lock: Some(lock) }),
        }
    }
}

/// Why a data directory cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
    /// Another process holds the lock.
    #[error(
        "data directory {path} is in use by another profile-state process (its LOCK file is \
         held); stop that process or choose another --data-dir"
    )]
    Locked {
        /// The directory.
        path: PathBuf,
    },
    /// Something other than a directory is at the path (it was told "create: File exists":
    /// found by a first-user review). Named by its flag, as a configuration error is.
    #[error("--data-dir: {path} is not a directory (a file is in its place)")]
    NotADirectory {
        /// The path.
        path: PathBuf,
    },
    /// A filesystem operation failed.
    #[error("data directory {0}")]
    Io(IoError),
    /// A restore into the directory did not finish.
    #[error(
        "data directory {path} holds a restore that did not finish (its RESTORING file): run \
         `profile-state restore` into it again (which refuses, naming a file, if a server wrote \
         there since), or move it aside"
    )]
    RestoreUnfinished {
        /// The directory.
        path: PathBuf,
    },
    /// The store id file holds something else than an id.
    #[error(
        "{path} does not hold a store id (32 lowercase hex digits and a newline, as this service \
         writes it): it was damaged or edited; restore it from a backup of the data directory, \
         or remove it to start under a new store id (every watcher then starts over)"
    )]
    BadStoreId {
        /// The file.
        path: PathBuf,
    },
}

impl From<IoError> for DataDirError {
    fn from(error: IoError) -> DataDirError {
        DataDirError::Io(error)
    }
}

/// Creates `path` (and missing parents) if missing, readable by its owner only: it holds every customer's personal data, and was created readable by everyone under a
/// usual umask outside systemd (whose unit sets `UMask=0077`; found by a fresh-eyes run). An
/// existing directory keeps its mode: the operator chose it.
fn create_private_dir(path: &Path) -> std::io::Result<()> {
    if path.is_dir() {
        return Ok(());
    }
    // Missing parents too (as `create_dir_all`, whose errors it keeps: a file in the way is
    // "Not a directory").
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(path)
}

impl DataDir {
    /// Opens `path`, creating it if missing; takes the lock; refuses a restore that did not
    /// finish; reads or creates the store id.
    pub fn open(path: &Path) -> Result<DataDir, DataDirError> {
        let lock = lock(path)?;
        if restore_unfinished(path)? {
            return Err(DataDirError::RestoreUnfinished {
                path: path.to_owned(),
            });
        }
        DataDir::with_lock(path, lock)
    }

    /// For `restore` only: creates `path` if missing and takes its lock, reading nothing and
    /// writing nothing else; the store id is empty until [`DataDir::renew_store_id`].
    pub fn open_for_restore(path: &Path) -> Result<DataDir, DataDirError> {
        let lock = lock(path)?;
        Ok(DataDir {
            path: path.to_owned(),
            store_id: String::new(),
            lock: Arc::new(Lock::new(lock)),
        })
    }

    fn with_lock(path: &Path, lock: File) -> Result<DataDir, DataDirError> {
        let store_id = read_or_create_store_id(path)?;
        Ok(DataDir {
            path: path.to_owned(),
            store_id,
            lock: Arc::new(Lock::new(lock)),
        })
    }

    /// Marks the directory as holding a restore that has not finished, durably, before anything
    /// else is written: until [`DataDir::finish_restore`], no server opens it. Created in place,
    /// not renamed into place: a marker cut short by a kill is still a marker.
    pub fn begin_restore(&self) -> Result<(), IoError> {
        let marker = self.path.join(RESTORING_FILE);
        match fs::symlink_metadata(&marker) {
            // An unfinished restore's marker: kept, so that the directory is never without one.
            Ok(found) if found.is_file() => return Ok(()),
            // Anything else under its name is replaced, never written through: a link planted
            // there was followed, and its target overwritten (found by an adversarial run).
            Ok(_) => fs::remove_file(&marker).map_err(IoError::on(&marker, "remove"))?,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => return Err(IoError::new(&marker, "look for", error)),
        }
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&marker)
            .map_err(IoError::on(&marker, "create"))?;
        file.write_all(b"a profile-state restore is filling this directory\n")
            .and_then(|()| file.sync_all())
            .map_err(IoError::on(&marker, "write"))?;
        sync_dir(&self.path).map_err(IoError::on(&self.path, "sync"))
    }

    /// Ends what [`DataDir::begin_restore`] began, durably: the directory is a store again.
    pub fn finish_restore(&self) -> Result<(), IoError> {
        let marker = self.path.join(RESTORING_FILE);
        fs::remove_file(&marker).map_err(IoError::on(&marker, "remove"))?;
        sync_dir(&self.path).map_err(IoError::on(&self.path, "sync"))
    }

    /// For `restore`, holding the lock: removes everything but the lock, the restore marker and
    /// a file system's `lost+found`.
    pub fn clear_for_restore(&self) -> Result<(), IoError> {
        let entries = fs::read_dir(&self.path).map_err(IoError::on(&self.path, "read"))?;
        for entry in entries {
            let entry = entry.map_err(IoError::on(&self.path, "read"))?;
            let name = entry.file_name();
            if [LOCK_FILE, RESTORING_FILE, "lost+found"]
                .map(OsStr::new)
                .contains(&&*name)
            {
                continue;
            }
            let path = entry.path();
            let removed = match entry.file_type().map(|kind| kind.is_dir()) {
                Ok(true) => fs::remove_dir_all(&path),
                Ok(false) => fs::remove_file(&path),
                Err(error) => Err(error),
            };
            removed.map_err(IoError::on(&path, "remove"))?;
        }
        Ok(())
    }

    /// For a failed `restore`, still holding the lock: removes what it made, the restore marker
    /// last (a removal that fails half-way still leaves a directory no server opens), then, if
    /// `remove_dir` (the restore created it), the lock file and the directory, which fails
    /// rather than remove what another process wrote there meanwhile.
    pub fn undo_restore(&self, remove_dir: bool) -> Result<(), IoError> {
        self.clear_for_restore()?;
        let marker = self.path.join(RESTORING_FILE);
        match fs::remove_file(&marker) {
            Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
                return Err(IoError::new(&marker, "remove", error));
            }
            _ => {}
        }
        let lock = self.path.join(LOCK_FILE);
        fs::remove_file(&lock).map_err(IoError::on(&lock, "remove"))?;
        if remove_dir {
            fs::remove_dir(&self.path).map_err(IoError::on(&self.path, "remove"))?;
        }
        Ok(())
    }

    /// Whether `name` is one of the directory's own files (its lock, store id or restore
    /// marker, or the temporary file of one being written), not the store's.
    pub fn is_own_file(name: &OsStr) -> bool {
        let name = name.to_string_lossy();
        let name = name.strip_suffix(".tmp").unwrap_or(&name);
        [LOCK_FILE, STORE_ID_FILE, RESTORING_FILE].contains(&name)
    }

    /// Whether `name` is the restore marker.
    pub fn is_restore_marker(name: &OsStr) -> bool {
        name == RESTORING_FILE
    }
}

impl DataDir {
    /// Where work that writes into the directory now and then takes its shares from.
    pub fn lock_ref(&self) -> LockRef {
        LockRef(Some(Arc::downgrade(&self.lock)))
    }

    /// How many [`LockShare`]s are still held: above zero when this handle is dropped, the
    /// directory stays locked until they are.
    pub fn lock_shares(&self) -> usize {
        Arc::strong_count(&self.lock) - 1
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The store id, created with the directory (or by the last [`DataDir::renew_store_id`]).
    pub fn store_id(&self) -> &str {
        &self.store_id
    }

    /// Gives the store a new id, durably, and returns it: for when acknowledged records are
    /// given up, so that no revision is ever reused under the same id (clients that compare
    /// ids then start over). Written before anything is discarded: a crash in between leaves a
    /// new id and the old records, which is harmless.
    pub fn renew_store_id(&mut self) -> Result<&str, DataDirError> {
        let path = self.path.join(STORE_ID_FILE);
        let id = new_store_id();
        write_atomically(&path, format!("{id}\n").as_bytes())
            .map_err(IoError::on(&path, "write store id"))?;
        self.store_id = id;
        Ok(&self.store_id)
    }
}

impl DataDir {
    /// Takes `id` as this directory's store id, durably: a replica's directory records the id
    /// of the cluster (its stream) whose state it holds, so that a replaced stream is noticed.
    pub fn adopt_store_id(&mut self, id: &str) -> Result<(), DataDirError> {
        let path = self.path.join(STORE_ID_FILE);
        write_atomically(&path, format!("{id}\n").as_bytes())
            .map_err(IoError::on(&path, "write store id"))?;
        self.store_id = id.to_owned();
        Ok(())
    }
}

/// Refuses a `path` where something other than a directory is (a link to a directory is a
/// directory); a missing one is fine, it will be created. Reads nothing inside, writes
/// nothing: the server checks this with the rest of its configuration, before it binds.
pub fn check_kind(path: &Path) -> Result<(), DataDirError> {
    match fs::metadata(path).is_ok_and(|found| !found.is_dir()) {
        true => Err(DataDirError::NotADirectory {
            path: path.to_owned(),
        }),
        false => Ok(()),
    }
}

/// Creates `path` if missing and takes its lock.
fn lock(path: &Path) -> Result<File, DataDirError> {
    // Checked again: the path may have changed since the configuration was.
    check_kind(path)?;
    create_private_dir(path).map_err(IoError::on(path, "create"))?;
    let lock_path = path.join(LOCK_FILE);
    let mut options = OpenOptions::new();
    options.create(true).truncate(false).write(true);
    // Never through a link planted under its name: its target, outside the directory, was
    // created or locked (found by an adversarial run).
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::custom_flags(
        &mut options,
        rustix::fs::OFlags::NOFOLLOW.bits() as i32,
    );
    let lock = options
        .open(&lock_path)
        .map_err(IoError::on(path, "open its lock file, LOCK"))?;
    match lock.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            return Err(DataDirError::Locked {
                path: path.to_owned(),
            });
        }
        Err(std::fs::TryLockError::Error(source)) => {
            return Err(IoError::new(path, "lock its lock file, LOCK", source).into());
        }
    }
    Ok(lock)
}

/// Whether `dir` holds a restore's marker.
fn restore_unfinished(dir: &Path) -> Result<bool, DataDirError> {
    let marker = dir.join(RESTORING_FILE);
    match fs::symlink_metadata(&marker) {
        Ok(_) => Ok(true),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(error) => Err(IoError::new(&marker, "look for", error).into()),
    }
}

/// A new random store id: 32 lowercase hex digits.
pub fn new_store_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// Whether `id` is a store id as this service makes them ([`new_store_id`], and a replica's
/// cluster id, derived in `jetstream::store_id`): 32 lowercase hex digits. Anything else in
/// `STORE_ID` is damage: a flipped bit, an upper-case digit or a cut was taken as another id,
/// silently (found by an adversarial run). A flip that leaves a lowercase hex digit cannot be
/// told from an id: watchers resuming with the old one are reset, nothing is lost.
fn is_store_id(id: &str) -> bool {
    id.len() == 32
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn read_or_create_store_id(dir: &Path) -> Result<String, DataDirError> {
    let path = dir.join(STORE_ID_FILE);
    match fs::read_to_string(&path) {
        Ok(text) => match text.trim_end_matches('\n') {
            id if is_store_id(id) => Ok(id.to_owned()),
            _ => Err(DataDirError::BadStoreId { path }),
        },
        // Not UTF-8: not an id either (it was a bare "stream did not contain valid UTF-8").
        Err(err) if err.kind() == std::io::ErrorKind::InvalidData => {
            Err(DataDirError::BadStoreId { path })
        }
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            let id = new_store_id();
            write_atomically(&path, format!("{id}\n").as_bytes())
                .map_err(IoError::on(&path, "write store id"))?;
            if holds_a_journal(dir) {
                // Removed on purpose (a copy put back by hand) or lost: either way watchers
                // start over, and the operator should know (it was silent).
                tracing::warn!(
                    store_id = %id,
                    "STORE_ID is missing from a data directory that holds a journal: the store \
                     gets a new id, and every watcher starts over"
                );
            }
            Ok(id)
        }
        Err(err) => Err(IoError::new(&path, "read store id", err).into()),
    }
}

/// Whether `dir` holds journal segments.
fn holds_a_journal(dir: &Path) -> bool {
    fs::read_dir(dir).is_ok_and(|entries| {
        entries.flatten().any(|entry| {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            name.starts_with(crate::journal::SEGMENT_PREFIX)
                && name.ends_with(crate::journal::SEGMENT_SUFFIX)
        })
    })
}

/// Writes `bytes` to `path` so that a crash leaves either the old file or the whole new one:
/// temp file, fsync, rename, fsync the directory. A failure removes the temp file.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let temp = path.with_extension("tmp");
    let written = (|| {
        // A new file, never through a leftover: a link planted under the temporary name was
        // followed, and its target overwritten (found by an adversarial run).
        match fs::remove_file(&temp) {
            Err(error) if error.kind() != std::io::ErrorKind::NotFound => return Err(error),
            _ => {}
        }
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&temp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::rename(&temp, path)
    })();
    if written.is_err() {
        let _ = fs::remove_file(&temp);
    }
    written?;
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}

/// Makes a directory's entries (created, renamed, removed files) durable.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_store_id_persists_and_a_second_opener_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data");
        let first = DataDir::open(&path).unwrap();
        let id = first.store_id().to_owned();
        assert_eq!(id.len(), 32);
        match DataDir::open(&path) {
            Err(DataDirError::Locked { .. }) => {}
            other => panic!(
                "expected Locked, got {:?}",
                other.map(|d| d.store_id().to_owned())
            ),
        }
        drop(first);
        let mut again = DataDir::open(&path).unwrap();
        assert_eq!(again.store_id(), id, "the id survives a restart");

        let renewed = again.renew_store_id().unwrap().to_owned();
        assert_ne!(renewed, id);
        drop(again);
        assert_eq!(DataDir::open(&path).unwrap().store_id(), renewed, "durably");
    }

    /// Anything but 32 lowercase hex digits (and the newline written after them) in STORE_ID
    /// is refused, naming the file: an upper-case digit, a cut, a character flipped out of the
    /// hex digits, bytes appended, bytes that are not UTF-8 were served as another id, or
    /// refused without advice (found by an adversarial run).
    #[test]
    fn a_damaged_store_id_is_refused_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data");
        let id = DataDir::open(&path).unwrap().store_id().to_owned();
        let file = path.join(STORE_ID_FILE);
        assert_eq!(fs::read_to_string(&file).unwrap(), format!("{id}\n"));
        let mut upper = id.clone().into_bytes();
        let letter = upper.iter().position(u8::is_ascii_lowercase).unwrap();
        upper[letter] = upper[letter].to_ascii_uppercase();
        let mut not_utf8 = format!("{id}\n").into_bytes();
        not_utf8.extend([0xff, 0xfe]);
        let damaged: [Vec<u8>; 5] = [
            upper,
            id[..20].into(),
            format!("{}g", &id[..31]).into(),
            format!("{id}\ngarbage").into(),
            not_utf8,
        ];
        for bytes in damaged {
            fs::write(&file, &bytes).unwrap();
            match DataDir::open(&path) {
                Err(error @ DataDirError::BadStoreId { .. }) => {
                    let said = error.to_string();
                    assert!(
                        said.contains("STORE_ID") && said.contains("remove it"),
                        "{said}"
                    );
                }
                other => panic!("{bytes:?}: {:?}", other.map(|d| d.store_id().to_owned())),
            }
        }
        fs::write(&file, format!("{id}\n")).unwrap();
        assert_eq!(DataDir::open(&path).unwrap().store_id(), id);
    }

    /// A link planted under the store id's temporary name was followed, and its target
    /// overwritten with the id (found by an adversarial run).
    #[test]
    fn the_store_id_is_written_through_no_planted_link() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        fs::create_dir(&data).unwrap();
        let victim = dir.path().join("victim");
        fs::write(&victim, b"precious").unwrap();
        std::os::unix::fs::symlink(&victim, data.join("STORE_ID.tmp")).unwrap();
        let opened = DataDir::open(&data).unwrap();
        assert_eq!(fs::read(&victim).unwrap(), b"precious");
        let written = fs::read_to_string(data.join(STORE_ID_FILE)).unwrap();
        assert_eq!(written.trim(), opened.store_id());
    }

    /// A link planted under the lock's name was followed: its target, outside the directory,
    /// was created and locked (found by an adversarial run). Refused, the target not made.
    #[test]
    fn the_lock_is_taken_through_no_planted_link() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        fs::create_dir(&data).unwrap();
        let target = dir.path().join("elsewhere");
        std::os::unix::fs::symlink(&target, data.join(LOCK_FILE)).unwrap();
        match DataDir::open(&data) {
            Err(DataDirError::Io(error)) => assert!(error.to_string().contains("LOCK"), "{error}"),
            other => panic!("{:?}", other.map(|dir| dir.store_id().to_owned())),
        }
        assert!(!target.exists(), "the link's target was created");
    }

    #[test]
    fn a_share_keeps_the_lock_after_the_handle_and_a_ref_does_not() {
        let dir = tempfile::tempdir().unwrap();
        let opened = DataDir::open(dir.path()).unwrap();
        let lock_ref = opened.lock_ref();
        let share = lock_ref.share().expect("held");
        assert_eq!(opened.lock_shares(), 1);
        drop(opened);
        assert!(
            matches!(DataDir::open(dir.path()), Err(DataDirError::Locked { .. })),
            "a share outlives the handle"
        );
        assert!(
            lock_ref.share().is_none(),
            "the handle is gone: no new share, though the lock is still held"
        );
        drop(share);
        assert!(lock_ref.share().is_none(), "released: no more shares");
        let reopened = DataDir::open(dir.path()).expect("the last share released the lock");
        assert_eq!(reopened.lock_shares(), 0, "the old ref does not count");
    }
}
