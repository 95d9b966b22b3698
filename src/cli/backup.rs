//! `profile-state backup [--grpc ADDR] FILE`: an online backup of a running server
//! (AdminService.Backup) written to FILE.
//!
//! The stream goes to `FILE.partial`, is synced, then renamed to FILE, so FILE is only ever a
//! whole backup; it is then read back and checked (every frame's checksum, the profile count
//! and revision the server announced). Exit statuses: 0 written and checked; 1 the server
//! refused or the file could not be written or did not check; 64 a usage error. The file
//! format and its check are the journal's (`crate::journal::snapshot`); restoring is
//! `super::restore`.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use super::client::{Connection, refused};
use super::{Failure, Sources};
use crate::io_error::IoError;
use crate::pb;

/// `profile-state backup ...`.
#[derive(Debug, clap::Args)]
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
    let partial = partial_path(&args.file);
    let received = receive(&args.connection, &partial).await;
    let announced = match received {
        Ok(announced) => announced,
        Err(failure) => {
            let _ = std::fs::remove_file(&partial);
            return Err(failure);
        }
    };
    if let Err(error) = std::fs::rename(&partial, &args.file) {
        let _ = std::fs::remove_file(&partial);
        return Err(failed(IoError::new(&partial, "rename", error)));
    }
    let parent = args.file.parent().filter(|p| !p.as_os_str().is_empty());
    crate::data_dir::sync_dir(parent.unwrap_or(Path::new(".")))
        .map_err(|error| failed(IoError::new(&args.file, "sync the directory of", error)))?;
    let (revision, profiles) = super::restore::check(&args.file)?;
    if (revision, profiles) != (announced.revision, announced.profiles) {
        return Err(Failure::Failed(format!(
            "{} holds {profiles} profiles as of revision {revision}, but the server announced \
             {} as of revision {}",
            args.file.display(),
            announced.profiles,
            announced.revision
        )));
    }
    let done = format!(
        "backup of store {} written to {}: {profiles} profiles as of revision {revision}\n",
        announced.store_id,
        args.file.display()
    );
    std::io::stdout()
        .write_all(done.as_bytes())
        .map_err(|error| Failure::Failed(format!("writing to stdout: {error}")))
}

/// Streams the backup into `partial`, synced.
async fn receive(connection: &Connection, partial: &Path) -> Result<Announced, Failure> {
    let mut client = connection.admin().await?;
    let mut stream = client
        .backup(pb::BackupRequest {})
        .await
        .map_err(|status| refused("backup", &status))?
        .into_inner();
    let mut file =
        private_file(partial).map_err(|error| failed(IoError::new(partial, "create", error)))?;
    let mut announced = None;
    while let Some(message) = stream
        .message()
        .await
        .map_err(|status| refused("backup", &status))?
    {
        announced.get_or_insert_with(|| Announced {
            revision: message.revision,
            store_id: message.store_id.clone(),
            profiles: message.profile_count,
        });
        file.write_all(&message.chunk)
            .map_err(|error| failed(IoError::new(partial, "write", error)))?;
    }
    file.sync_all()
        .map_err(|error| failed(IoError::new(partial, "sync", error)))?;
    announced.ok_or_else(|| Failure::Failed("backup: the server sent nothing".to_owned()))
}

/// FILE is replaced by a rename, which would replace a link, a device or a directory's entry
/// itself rather than write where it points: only a regular file (or none) is replaced.
fn check_target(file: &Path) -> Result<(), Failure> {
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

/// A new (or emptied) file only its owner may read: a backup holds every customer's personal
/// data, and it was left readable by everyone under a usual umask (found by a fresh-eyes run).
fn private_file(path: &Path) -> std::io::Result<std::fs::File> {
    let file = std::fs::File::create(path)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        // Also a leftover `.partial` of an interrupted backup, which keeps its old mode.
        file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(file)
}

fn partial_path(file: &Path) -> PathBuf {
    let mut name = file.as_os_str().to_owned();
    name.push(".partial");
    PathBuf::from(name)
}

fn failed(error: IoError) -> Failure {
    Failure::Failed(error.to_string())
}
