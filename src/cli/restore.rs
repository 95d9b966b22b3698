//! `profile-state restore FILE --data-dir DIR`: a backup (`profile-state backup`) made into a
//! new data directory that `profile-state --data-dir DIR` then serves.
//!
//! The backup is checked first (every frame's checksum, its profile count). DIR must be
//! missing or empty: a restore never overwrites a store, so there is no flag to force it (move
//! the old directory aside first). The restored store gets a new store id and keeps the
//! backup's revisions: revisions continue from the backup's, and a watcher that resumes with the
//! old store id is reset rather than handed revisions that now mean other changes (the same
//! rule as `--discard-journal-from`). The restore is then recovered, as start-up would, to
//! prove it starts. Exit statuses: 0 restored; 64 a usage error (FILE unreadable, DIR not
//! empty); 1 a damaged backup or a failure writing DIR. Dead letters are not part of a backup.

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

/// The revision and profile count of the backup `file`, every frame checked.
pub fn check(file: &Path) -> Result<(u64, u64), Failure> {
    if let Err(error) = std::fs::File::open(file) {
        let error = crate::io_error::IoError::new(file, "open", error);
        return Err(Failure::Usage(error.to_string()));
    }
    let mut profiles = 0;
    let revision = snapshot::read(file, |_, chunks| {
        for chunk in chunks {
            profiles += chunk.len() as u64;
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
    Ok((revision, profiles))
}

fn restore(args: &Args) -> Result<(), Failure> {
    let (revision, profiles) = check(&args.file)?;
    let dir = &args.data_dir;
    let existed = match std::fs::read_dir(dir) {
        Ok(entries) => {
            // A file system's own `lost+found` (a volume mounted as the data directory) is
            // not the operator's: the service tolerates it too.
            let mut entries = entries.filter(|entry| {
                entry
                    .as_ref()
                    .map_or(true, |entry| entry.file_name() != "lost+found")
            });
            if entries.next().is_some() {
                return Err(Failure::Usage(format!(
                    "--data-dir {} is not empty: restore into a new directory (move the old \
                     one aside first)",
                    dir.display()
                )));
            }
            true
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => false,
        Err(error) => {
            let error = crate::io_error::IoError::new(dir, "read", error);
            return Err(Failure::Usage(format!("--data-dir {error}")));
        }
    };
    install(args, (revision, profiles)).map_err(|failure| undo(dir, existed, failure))
}

/// Makes `args.data_dir` a data directory holding the backup, and proves it recovers to what
/// `check` read; prints what was restored.
fn install(args: &Args, (revision, profiles): (u64, u64)) -> Result<(), Failure> {
    let dir = &args.data_dir;
    let data_dir = DataDir::open(dir).map_err(|error| Failure::Failed(error.to_string()))?;
    snapshot::install(data_dir.path(), revision, &args.file)
        .map_err(|error| Failure::Failed(error.to_string()))?;
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
    let done = format!(
        "restored {profiles} profiles as of revision {revision} into {}, store id {} (new)\n",
        dir.display(),
        data_dir.store_id()
    );
    std::io::stdout()
        .write_all(done.as_bytes())
        .map_err(|error| Failure::Failed(format!("writing to stdout: {error}")))
}

/// After a failed restore, removes what it made: the directory if it created it, else what it
/// put in it. A half-made directory was refused by the retry as "not empty", and served as an
/// empty store with a new id (found by an adversarial run).
fn undo(dir: &Path, existed: bool, failure: Failure) -> Failure {
    let removed = match existed {
        false => std::fs::remove_dir_all(dir),
        true => std::fs::read_dir(dir).and_then(|entries| {
            entries.into_iter().try_for_each(|entry| {
                let entry = entry?;
                let path = entry.path();
                if entry.file_name() == "lost+found" {
                    return Ok(());
                }
                match path.is_dir() {
                    true => std::fs::remove_dir_all(&path),
                    false => std::fs::remove_file(&path),
                }
            })
        }),
    };
    // Every failure after the checks is `Failed` (exit 1).
    Failure::Failed(match removed {
        Ok(()) => format!(
            "{failure} (nothing was left in --data-dir {})",
            dir.display()
        ),
        Err(error) => format!(
            "{failure} (and what was made in --data-dir {} could not be removed: {error}; \
             remove it before restoring again)",
            dir.display()
        ),
    })
}
