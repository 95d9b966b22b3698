//! `profile-state restore FILE --data-dir DIR`: a backup (`profile-state backup`) made into a
//! new data directory that `profile-state --data-dir DIR` then serves.
//!
//! The backup is checked first (every frame's checksum, its profile count, and each profile:
//! ids, revisions). DIR must be missing or empty: a restore never overwrites a store, so there
//! is no flag to force it (move the old directory aside first). The restored store gets a new
//! store id and keeps the backup's revisions: revisions continue from the backup's, and a
//! watcher that resumes with the old store id is reset rather than handed revisions that now
//! mean other changes (the same rule as `--discard-journal-from`). The restore is then recovered, as start-up would, to
//! prove it starts. DIR's lock is held throughout, and DIR is marked (`RESTORING`) from before
//! anything else is written until that proof: a restore killed on the way leaves a directory
//! that no server opens and that a restore starts over. Exit statuses: 0 restored; 64 a usage
//! error (FILE unreadable or not a regular file, DIR not empty, in use, a link to nothing or
//! where no directory can be made: found before anything is written); 1 a damaged backup or a
//! failure writing DIR. Dead letters are not part of a backup.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use super::{Failure, Sources};
use crate::data_dir::DataDir;
use crate::journal::{JournalError, snapshot};

/// History kept while checking the restore: nothing is replayed, so the ring stays empty.
const CHECK_HISTORY: usize = 16;

/// `profile-state restore ...`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The backup file.
    file: PathBuf,
    /// The data directory to create (it must be missing or empty).
    #[arg(long, env = "PROFILE_STATE_DATA_DIR", value_name = "DIR")]
    data_dir: PathBuf,
}

/// Runs the restore; returns the exit status.
pub fn run(args: Args, sources: &Sources) -> ExitCode {
    super::block_on(sources, async move { restore(&args) })
}

/// The revision and profile count of the backup `file`, every frame checked, and every
/// profile ([`BackupProfiles`]).
pub fn check(file: &Path) -> Result<(u64, u64), Failure> {
    if let Err(error) = std::fs::File::open(file) {
        let error = crate::io_error::IoError::new(file, "open", error);
        return Err(Failure::Usage(error.to_string()));
    }
    let mut contents = BackupProfiles::default();
    let revision = snapshot::read(file, |_, chunks| {
        for chunk in chunks {
            contents.add(&chunk);
        }
    })
    .map_err(|error| {
        // The journal's advice for a damaged snapshot is to restore a backup: this file is
        // the backup, so the advice here is another one.
        let what = match error {
            JournalError::DamagedSnapshot { offset, reason, .. } => {
                format!("the block at offset {offset} is damaged ({reason})")
            }
            // Not the backup's fault (a directory, an I/O error): no advice about backups.
            JournalError::Io(error) => return Failure::Usage(error.to_string()),
            other => other.to_string(),
        };
        Failure::Failed(format!(
            "{} is not a whole backup: {what}; take the backup again (`profile-state backup`) \
             or restore an older one",
            file.display()
        ))
    })?;
    contents.check(revision).map_err(|what| {
        Failure::Failed(format!(
            "{} is not a backup a server can serve: {what}; take the backup again \
             (`profile-state backup`) or restore an older one",
            file.display()
        ))
    })?;
    Ok((revision, contents.profiles))
}

/// What a backup's profiles must be, checksums aside: every id one a webhook could carry, and
/// revisions that are the store's own (each change its own revision, none past the backup's).
/// A file crafted with valid checksums and profiles past its revision was restored, and the
/// server then gave revision 1 twice, and watches of the initial state were reset for ever
/// (found by an adversarial run).
#[derive(Default)]
struct BackupProfiles {
    profiles: u64,
    /// Each profile's revision, checked for repeats once all are read.
    revisions: Vec<u64>,
    /// The first profile found wrong, and why.
    wrong: Option<String>,
    /// The highest revision, and its profile.
    highest: Option<(u64, String)>,
}

impl BackupProfiles {
    fn add(&mut self, profiles: &[crate::profile::Profile]) {
        self.profiles += profiles.len() as u64;
        for profile in profiles {
            self.revisions.push(profile.revision);
            if self
                .highest
                .as_ref()
                .is_none_or(|(at, _)| profile.revision > *at)
            {
                self.highest = Some((profile.revision, named(profile)));
            }
            if self.wrong.is_none() {
                self.wrong = wrong(profile).map(|why| format!("{} {why}", named(profile)));
            }
        }
    }

    /// The first thing wrong with the profiles of a backup as of `revision`.
    fn check(&mut self, revision: u64) -> Result<(), String> {
        if let Some(wrong) = self.wrong.take() {
            return Err(wrong);
        }
        if let Some((highest, profile)) = &self.highest
            && *highest > revision
        {
            return Err(format!(
                "{profile} has revision {highest}, past the backup's {revision}"
            ));
        }
        self.revisions.sort_unstable();
        match self.revisions.windows(2).find(|pair| pair[0] == pair[1]) {
            Some(pair) => Err(format!("two profiles have revision {}", pair[0])),
            None => Ok(()),
        }
    }
}

/// A profile as an error names it.
fn named(profile: &crate::profile::Profile) -> String {
    let key = &profile.key;
    format!(
        "the profile of customer {:?} of account {:?}",
        crate::error::cut_to(&key.customer_id, 64),
        crate::error::cut_to(&key.client_id, 64)
    )
}

/// Why `profile` is not one the store could hold, if it is not.
fn wrong(profile: &crate::profile::Profile) -> Option<String> {
    let key = &profile.key;
    let id_wrong = |id: &str| id.is_empty() || id.contains('\0');
    if id_wrong(&key.client_id) || id_wrong(&key.customer_id) {
        return Some("has an empty id or one with a NUL character".into());
    }
    if profile.revision == 0 || profile.create_revision == 0 || profile.version == 0 {
        return Some("has a revision, creation revision or version of 0".into());
    }
    (profile.create_revision > profile.revision).then(|| {
        format!(
            "was created at revision {}, after its last change at {}",
            profile.create_revision, profile.revision
        )
    })
}

fn restore(args: &Args) -> Result<(), Failure> {
    let dir = &args.data_dir;
    // What needs no reading of the backup first: a large one takes a while to check.
    refuse_unless_regular(&args.file)?;
    refuse_dangling_link(dir)?;
    let (revision, profiles) = check(&args.file)?;
    refuse_file_inside(&args.file, dir)?;
    let existed = match contents(dir) {
        Ok(Contents::Missing) => false,
        Ok(Contents::Restorable) => true,
        Ok(Contents::Refused(refusal)) => return Err(not_empty(dir, &refusal)),
        Err(error) => {
            let error = crate::io_error::IoError::new(dir, "read", error);
            return Err(Failure::Usage(format!("--data-dir {error}")));
        }
    };
    let mut data_dir = lock(dir)?;
    install(&mut data_dir, args, (revision, profiles))
        .map_err(|failure| undo(&data_dir, existed, failure))
}

/// The backup is read twice, checked and then copied: a pipe gives its bytes once, and was
/// refused only once the copy found it empty, after DIR was made; one with no writer held the
/// check forever (found by an adversarial run). A missing or unreadable FILE, or a directory,
/// is left to `check`, which says which.
fn refuse_unless_regular(file: &Path) -> Result<(), Failure> {
    match std::fs::metadata(file) {
        Ok(metadata) if !metadata.is_file() && !metadata.is_dir() => Err(Failure::Usage(format!(
            "{} is not a regular file (a pipe, socket or device): a restore reads the backup \
             twice, to check it and then to copy it, so save it to a file first",
            file.display()
        ))),
        _ => Ok(()),
    }
}

/// DIR a symbolic link to nothing: it is not missing (the link is there), so creating it
/// failed with "File exists" (found by an adversarial run). Said as it is instead.
fn refuse_dangling_link(dir: &Path) -> Result<(), Failure> {
    let is_link = std::fs::symlink_metadata(dir).is_ok_and(|metadata| metadata.is_symlink());
    let dangling =
        std::fs::metadata(dir).is_err_and(|error| error.kind() == std::io::ErrorKind::NotFound);
    if !(is_link && dangling) {
        return Ok(());
    }
    let target = std::fs::read_link(dir).unwrap_or_else(|_| "?".into());
    Err(Failure::Usage(format!(
        "--data-dir {} is a symbolic link to {}, which does not exist: create that directory \
         first, or give the directory's own path",
        dir.display(),
        target.display()
    )))
}

/// The backup must not be in DIR: the restore clears DIR, and a backup there was overwritten
/// and removed (found by adversarial runs). Each directory above FILE is compared with DIR by
/// device and inode, so that a bind mount of DIR elsewhere is DIR too.
fn refuse_file_inside(file: &Path, dir: &Path) -> Result<(), Failure> {
    use std::os::unix::fs::MetadataExt;
    let (Ok(file), Ok(dir_metadata)) = (file.canonicalize(), std::fs::metadata(dir)) else {
        return Ok(()); // DIR missing: nothing can be in it.
    };
    let is_dir = |path: &Path| {
        std::fs::metadata(path).is_ok_and(|metadata| {
            (metadata.dev(), metadata.ino()) == (dir_metadata.dev(), dir_metadata.ino())
        })
    };
    match file.ancestors().skip(1).any(is_dir) {
        true => Err(Failure::Usage(format!(
            "{} is inside --data-dir {}, which the restore fills: move the backup out first",
            file.display(),
            dir.display()
        ))),
        false => Ok(()),
    }
}

/// What a `--data-dir` holds, as far as a restore is concerned.
#[derive(Debug, PartialEq)]
enum Contents {
    Missing,
    /// Nothing of a store: empty, or only the directory's own files and a file system's
    /// `lost+found`, or what a restore that did not finish left (its marker, snapshots).
    Restorable,
    /// Something else.
    Refused(Refusal),
}

/// What makes a `--data-dir` no place to restore to.
#[derive(Debug, PartialEq)]
struct Refusal {
    /// A file that is in the way, the first by name.
    example: std::ffi::OsString,
    /// Whether other files are in the way too.
    among_others: bool,
    /// Beside a restore's marker: files only a server writes (a server that does not know the
    /// marker, an older version, served the directory since). Otherwise a store, or a
    /// stranger's files.
    served_since: bool,
}

fn contents(dir: &Path) -> std::io::Result<Contents> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            return Ok(Contents::Missing);
        }
        Err(error) => return Err(error),
    };
    let (mut unfinished, mut snapshots, mut others) = (false, None, None);
    let (mut snapshot_count, mut other_count) = (0_usize, 0_usize);
    for entry in entries {
        let name = entry?.file_name();
        unfinished |= DataDir::is_restore_marker(&name);
        // A file system's own `lost+found` (a volume mounted as the data directory) is not
        // the operator's: the service tolerates it too.
        if DataDir::is_own_file(&name) || name == "lost+found" {
            continue;
        }
        // The first by name, so that a message names the same file each time.
        let first = |seen: &mut Option<std::ffi::OsString>| match seen {
            Some(seen) if *seen <= name => {}
            _ => *seen = Some(name.clone()),
        };
        match snapshot::is_snapshot_file(&name) {
            true => (first(&mut snapshots), snapshot_count += 1),
            false => (first(&mut others), other_count += 1),
        };
    }
    // What an unfinished restore left was never served (no server opens it): started over.
    let refused = |example, served_since: bool| {
        // A restore's own snapshots are not in the way of finishing it.
        let in_the_way = other_count + if served_since { 0 } else { snapshot_count };
        Contents::Refused(Refusal {
            example,
            among_others: in_the_way > 1,
            served_since,
        })
    };
    Ok(match (unfinished, others, snapshots) {
        (true, Some(example), _) => refused(example, true),
        (false, Some(example), _) | (false, None, Some(example)) => refused(example, false),
        (true, None, _) | (false, None, None) => Contents::Restorable,
    })
}

fn not_empty(dir: &Path, refusal: &Refusal) -> Failure {
    let (dir, example) = (dir.display(), refusal.example.to_string_lossy());
    Failure::Usage(match refusal.served_since {
        true => format!(
            "--data-dir {dir} holds a restore that did not finish (its RESTORING file), but also \
             files a server wrote since ({example}): a version that does not know the marker \
             served it; move it aside and restore into a new directory"
        ),
        false => format!(
            "--data-dir {dir} is not empty ({example}{}): restore into a new directory (move \
             the old one aside first)",
            if refusal.among_others {
                " among others"
            } else {
                " is there"
            }
        ),
    })
}

/// Takes the directory's lock, and under it looks again: a server may have started there
/// since the first look. Nothing is undone on a refusal here: what is there is not ours.
fn lock(dir: &Path) -> Result<DataDir, Failure> {
    // In use, or no directory can be made there (its parent a file, no permission): DIR
    // cannot be used, found before anything is written, so a usage error as FILE's problems
    // are (it was exit 1, a first-user review found the statuses of path problems differ).
    let data_dir =
        DataDir::open_for_restore(dir).map_err(|error| Failure::Usage(error.to_string()))?;
    let contents = contents(dir).map_err(|error| {
        Failure::Failed(crate::io_error::IoError::new(dir, "read", error).to_string())
    })?;
    match contents {
        Contents::Restorable => Ok(data_dir),
        Contents::Refused(refusal) => Err(not_empty(dir, &refusal)),
        // Locked, then removed by another process: nothing of ours to undo.
        Contents::Missing => Err(Failure::Failed(format!(
            "--data-dir {} was removed while the restore began",
            dir.display()
        ))),
    }
}

/// Makes the locked `data_dir` hold the backup, and proves it recovers to what `check` read;
/// prints what was restored. Marked as a restore before anything else is written (what an
/// unfinished restore left is then removed, and the store gets a new id), until the end:
/// killed on the way, the directory is refused by servers and started over by a restore.
fn install(
    data_dir: &mut DataDir,
    args: &Args,
    (revision, profiles): (u64, u64),
) -> Result<(), Failure> {
    let dir = &args.data_dir;
    let failed = |error: &dyn std::fmt::Display| Failure::Failed(error.to_string());
    data_dir.begin_restore().map_err(|error| failed(&error))?;
    data_dir
        .clear_for_restore()
        .map_err(|error| failed(&error))?;
    // A new id whatever was there: the restored store is not the one any client knew.
    data_dir.renew_store_id().map_err(|error| failed(&error))?;
    snapshot::install(data_dir.path(), revision, &args.file).map_err(|error| failed(&error))?;
    let (store, _) = crate::startup::recover_store(
        dir,
        crate::store::HistoryLimits::events(CHECK_HISTORY),
        data_dir.store_id(),
    )
    .map_err(|error| Failure::Failed(format!("the restored store does not recover: {error}")))?;
    if (store.revision(), store.len() as u64) != (revision, profiles) {
        return Err(Failure::Failed(format!(
            "the restored store recovers {} profiles at revision {}, not {profiles} at {revision}",
            store.len(),
            store.revision()
        )));
    }
    data_dir.finish_restore().map_err(|error| failed(&error))?;
    let done = format!(
        "restored {profiles} profiles as of revision {revision} into {}, store id {} (new)\n",
        dir.display(),
        data_dir.store_id()
    );
    std::io::stdout()
        .write_all(done.as_bytes())
        .map_err(|error| Failure::Failed(format!("writing to stdout: {error}")))
}

/// After a failed restore, still holding the lock, removes what it made: the directory if it
/// created it, else what it put in it. A half-made directory was refused by the retry as "not
/// empty", and served as an empty store with a new id (found by an adversarial run).
fn undo(data_dir: &DataDir, existed: bool, failure: Failure) -> Failure {
    let dir = data_dir.path();
    let removed = data_dir.undo_restore(!existed);
    // Every failure after the checks is `Failed` (exit 1).
    Failure::Failed(match removed {
        Ok(()) => format!(
            "{failure} (nothing was left in --data-dir {})",
            dir.display()
        ),
        // The directory itself not empty once the restore's files were gone: another process
        // wrote there meanwhile, and its files were left alone.
        Err(error) if error.kind() == std::io::ErrorKind::DirectoryNotEmpty => format!(
            "{failure} (what the restore made in --data-dir {} was removed; another process has \
             written there since, and its files were left alone)",
            dir.display()
        ),
        // The marker is removed last: what is left is still marked.
        Err(error) => format!(
            "{failure} (and what was made in --data-dir {} could not all be removed: {error}; \
             no server serves what is left, and a restore starts it over once that is fixed)",
            dir.display()
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server may start in the directory between the restore's first look and its lock: the
    /// restore then refuses without touching its files (it removed them as "what it made").
    #[test]
    fn a_server_that_came_first_keeps_its_files() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        assert_eq!(contents(&data).unwrap(), Contents::Missing);
        let server = DataDir::open(&data).unwrap();
        let journal = data.join("journal-00000000000000000001.log");
        std::fs::write(&journal, b"acknowledged").unwrap();
        match lock(&data) {
            Err(Failure::Usage(said)) => assert!(said.contains("in use"), "{said}"),
            other => panic!("{:?}", other.map(|dir| dir.store_id().to_owned())),
        }
        drop(server);
        // Stopped since, its files still there: not empty, seen under the lock.
        match lock(&data) {
            Err(Failure::Usage(said)) => assert!(said.contains("is not empty"), "{said}"),
            other => panic!("{:?}", other.map(|dir| dir.store_id().to_owned())),
        }
        assert_eq!(std::fs::read(&journal).unwrap(), b"acknowledged");
    }

    /// A lone file in the way is named as such ("(.keep among others)" said there was more).
    #[test]
    fn a_lone_file_in_the_way_is_not_called_one_among_others() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(".keep"), b"").unwrap();
        let said = |dir: &Path| match contents(dir).unwrap() {
            Contents::Refused(refusal) => match not_empty(dir, &refusal) {
                Failure::Usage(said) => said,
                other => panic!("{other:?}"),
            },
            _ => panic!("not refused"),
        };
        assert!(said(dir.path()).contains("(.keep is there)"));
        std::fs::write(dir.path().join("notes"), b"").unwrap();
        assert!(said(dir.path()).contains("(.keep among others)"));
    }
}
