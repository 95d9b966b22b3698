//! `profile-state backup [--grpc ADDR] FILE`: an online backup of a running server
//! (AdminService.Backup) written to FILE.
//!
//! The stream goes to a partial file of its own beside FILE (`FILE.<random>.partial`, created
//! new), is synced and read back and checked (every frame's checksum, the profile count and
//! revision the server announced), and only then renamed to FILE: FILE is only ever a whole,
//! checked backup, and two backups to one FILE at once each write their own file (the last
//! to finish is kept). Exit statuses: 0 written and checked; 1 the server
//! refused or the file could not be written or did not check; 64 a usage error (FILE, or its
//! directory, cannot be used: found before connecting). The file
//! format and its check are the journal's (`crate::journal::snapshot`); restoring is
//! `super::restore`.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use tempfile::NamedTempFile;

use super::client::{Connection, broke_off, refused, timeout_help};
use super::{Failure, Sources};
use crate::io_error::IoError;
use crate::pb;

/// `profile-state backup ...`.
#[derive(Debug, clap::Args)]
#[command(mut_arg(
    "timeout",
    timeout_help("the backup's first answer and each piece after it")
))]
pub struct Args {
    /// Where to write the backup (a regular file replaced if it exists, only once the new one
    /// is whole; a directory, link or device is refused).
    file: PathBuf,
    #[command(flatten)]
    connection: Connection,
}

/// What the first message of the stream announced.
struct Announced {
    revision: u64,
    store_id: String,
    profiles: u64,
}

/// Runs the backup; returns the exit status.
pub fn run(args: Args, sources: &Sources) -> ExitCode {
    super::block_on(sources, backup(args))
}

async fn backup(args: Args) -> Result<(), Failure> {
    check_target(&args.file)?;
    // Removed when dropped, on every failure below.
    let mut partial = partial_file(&args.file)?;
    let path = partial.path().to_owned();
    let announced = receive(&args.connection, partial.as_file_mut(), &path).await?;
    let (revision, profiles) = super::restore::check(&path)?;
    if (revision, profiles) != (announced.revision, announced.profiles) {
        return Err(Failure::Failed(format!(
            "{} holds {profiles} profiles as of revision {revision}, but the server announced \
             {} as of revision {}",
            path.display(),
            announced.profiles,
            announced.revision
        )));
    }
    partial
        .persist(&args.file)
        .map_err(|error| failed(IoError::new(&path, "rename", error.error)))?;
    crate::data_dir::sync_dir(directory_of(&args.file))
        .map_err(|error| failed(IoError::new(&args.file, "sync the directory of", error)))?;
    let done = format!(
        "backup of store {} written to {}: {profiles} profiles as of revision {revision}\n",
        announced.store_id,
        args.file.display()
    );
    std::io::stdout()
        .write_all(done.as_bytes())
        .map_err(|error| Failure::Failed(format!("writing to stdout: {error}")))
}

/// Streams the backup into `file` (at `path`, for messages), synced.
async fn receive(
    connection: &Connection,
    file: &mut std::fs::File,
    path: &Path,
) -> Result<Announced, Failure> {
    let mut client = connection.admin().await?;
    let mut stream = client
        .backup(pb::BackupRequest {})
        .await
        .map_err(|status| refused("backup", &status))?
        .into_inner();
    let mut announced = None;
    let mut received = 0;
    // Each piece within --timeout: a server that stopped mid-stream (hung, or a partition
    // without a reset) kept the backup waiting for ever (found by an adversarial run).
    let waited = connection.timeout;
    let stalled = || Failure::Failed(format!("backup: no data for {waited:?} (--timeout)"));
    while let Some(message) = tokio::time::timeout(waited, stream.message())
        .await
        .map_err(|_| stalled())?
        .map_err(|status| match announced {
            None => refused("backup", &status),
            Some(_) => broke_off("backup", &format!("{received} bytes (not kept)"), &status),
        })?
    {
        received += message.chunk.len();
        announced.get_or_insert_with(|| Announced {
            revision: message.revision,
            store_id: message.store_id.clone(),
            profiles: message.profile_count,
        });
        file.write_all(&message.chunk)
            .map_err(|error| failed(IoError::new(path, "write", error)))?;
    }
    file.sync_all()
        .map_err(|error| failed(IoError::new(path, "sync", error)))?;
    announced.ok_or_else(|| Failure::Failed("backup: the server sent nothing".to_owned()))
}

/// FILE is replaced by a rename, which would replace a link, a device or a directory's entry
/// itself rather than write where it points: only a regular file (or none) is replaced.
/// Nor a file in a data directory: replacing its journal segment, head or a snapshot under a
/// running server lost acknowledged webhooks and stopped the next start (found by an
/// adversarial run).
fn check_target(file: &Path) -> Result<(), Failure> {
    check_directory(file)?;
    // Its directory or any above it (`dead-letters/` is in one too, and a start-up reads or
    // removes the files there), links resolved.
    let directory = std::fs::canonicalize(directory_of(file))
        .map_err(|error| failed(IoError::new(directory_of(file), "resolve", error)))?;
    if let Some(data_dir) = (directory.ancestors()).find(|dir| crate::data_dir::is_data_dir(dir)) {
        return Err(Failure::Usage(format!(
            "{} is in the data directory {} (it holds a STORE_ID): write the backup elsewhere",
            file.display(),
            data_dir.display()
        )));
    }
    match std::fs::symlink_metadata(file) {
        Ok(found) if !found.file_type().is_file() => Err(Failure::Usage(format!(
            "{} exists and is not a regular file (a directory, a link or a device): name a \
             new file, or a regular file to replace",
            file.display()
        ))),
        Ok(_) => Ok(()),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(error) => Err(failed(IoError::new(file, "inspect", error))),
    }
}

/// FILE's directory must exist: creating the partial file in a missing one said only "No such
/// file or directory" of the partial file's name, and exited 1 (a first-user review). A path
/// the command line names that cannot be used is a usage error, as `restore`'s FILE is.
fn check_directory(file: &Path) -> Result<(), Failure> {
    let dir = directory_of(file);
    let cannot = |why: &str| {
        let (file, dir) = (file.display(), dir.display());
        Err(Failure::Usage(format!("cannot write {file}: {dir} {why}")))
    };
    match std::fs::metadata(dir) {
        Ok(found) if found.is_dir() => Ok(()),
        Ok(_) => cannot("is not a directory"),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            cannot("does not exist: create the directory first, or name a file in one that does")
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotADirectory => {
            cannot("is not a directory (a part of its path is a file)")
        }
        Err(error) => Err(Failure::Usage(
            IoError::new(dir, "inspect", error).to_string(),
        )),
    }
}

/// A new file beside FILE, `FILE.<random>.partial`, only its owner may read (tempfile creates
/// it `0600`: a backup holds every customer's personal data). New, under a name of its own: a
/// fixed `FILE.partial` was opened following a link planted there (writing the backup
/// wherever it pointed, then renaming the link to FILE), and two backups to one FILE at once
/// wrote into the same file (both found by an adversarial run).
fn partial_file(file: &Path) -> Result<NamedTempFile, Failure> {
    let name = file
        .file_name()
        .ok_or_else(|| Failure::Usage(format!("{} names no file", file.display())))?;
    let mut prefix = name.to_owned();
    prefix.push(".");
    tempfile::Builder::new()
        .prefix(&prefix)
        .suffix(".partial")
        .tempfile_in(directory_of(file))
        // Before anything is asked of the server: FILE's place cannot be written (no
        // permission, a read-only file system), a usage error as a missing directory is.
        .map_err(|error| {
            let error = IoError::new(file, "create a partial file beside", error);
            Failure::Usage(error.to_string())
        })
}

/// The directory FILE is in (`.` for a bare name).
fn directory_of(file: &Path) -> &Path {
    let parent = file.parent().filter(|p| !p.as_os_str().is_empty());
    parent.unwrap_or(Path::new("."))
}

fn failed(error: IoError) -> Failure {
    Failure::Failed(error.to_string())
}
