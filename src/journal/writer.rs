//! The append side of the journal: one frame per group commit, synced, segments rotated by
//! size, and a failed write cut off again.
//!
//! This module does not read the journal back (see [`super::recovery`]) and does not decide
//! what goes into a frame (the sequencer does).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use super::codec::{self, BatchRecord, SEGMENT_MAGIC};
use super::{FaultSwitch, JournalError, SEGMENT_PREFIX, SEGMENT_SUFFIX};
use crate::data_dir::sync_dir;

/// Where appends continue after recovery.
#[derive(Debug)]
pub struct Tail {
    /// The last segment.
    pub path: PathBuf,
    /// Its length up to the last valid frame.
    pub len: u64,
}

/// The append side of the journal, owned by the sequencer.
pub struct Journal {
    dir: PathBuf,
    file: File,
    path: PathBuf,
    /// Bytes known good: the header and whole, synced frames.
    len: u64,
    segment_bytes: u64,
    faults: FaultSwitch,
    /// A failed append left bytes after `len` that could not be cut off yet.
    needs_repair: bool,
}

pub(super) fn segment_path(dir: &Path, first_revision: u64) -> PathBuf {
    dir.join(format!(
        "{SEGMENT_PREFIX}{first_revision:020}{SEGMENT_SUFFIX}"
    ))
}

impl Journal {
    /// Opens the journal for appending: at the recovered tail, or in a new segment whose first
    /// revision is `next_revision`.
    pub fn open(
        dir: &Path,
        tail: Option<Tail>,
        next_revision: u64,
        segment_bytes: u64,
        faults: FaultSwitch,
    ) -> Result<Journal, JournalError> {
        let (path, file, len) = match tail {
            Some(Tail { path, len }) => {
                let file = OpenOptions::new()
                    .append(true)
                    .open(&path)
                    .map_err(JournalError::io(&path, "open for append"))?;
                (path, file, len)
            }
            None => {
                let path = segment_path(dir, next_revision);
                let file = create_segment(&path)?;
                (path, file, codec::HEADER_LEN as u64)
            }
        };
        Ok(Journal {
            dir: dir.to_owned(),
            file,
            path,
            len,
            segment_bytes: segment_bytes.max(codec::HEADER_LEN as u64 + 1),
            faults,
            needs_repair: false,
        })
    }

    /// Appends one batch as one frame and syncs it. Returns the bytes written. On failure,
    /// nothing of the batch stays in the file (or it is cut off before the next append).
    pub fn append(&mut self, batch: &BatchRecord) -> std::io::Result<u64> {
        if self.needs_repair {
            self.repair()?;
        }
        if let Some(first) = batch.updates.first()
            && self.len >= self.segment_bytes
        {
            self.rotate(first.revision)?;
        }
        let mut frame = Vec::new();
        codec::encode_frame(batch, &mut frame);
        let written = self
            .faults
            .check()
            .and_then(|()| self.file.write_all(&frame))
            .and_then(|()| self.faults.check())
            .and_then(|()| self.file.sync_data());
        match written {
            Ok(()) => {
                self.len += frame.len() as u64;
                Ok(frame.len() as u64)
            }
            Err(error) => {
                self.needs_repair = true;
                // Best effort now; if this fails too, the next append retries it first.
                let _ = self.repair();
                Err(error)
            }
        }
    }

    /// Cuts the file back to its last good frame.
    fn repair(&mut self) -> std::io::Result<()> {
        self.faults.check()?;
        self.file.set_len(self.len)?;
        self.file.sync_data()?;
        self.needs_repair = false;
        Ok(())
    }

    fn rotate(&mut self, first_revision: u64) -> std::io::Result<()> {
        let path = segment_path(&self.dir, first_revision);
        let file = create_segment(&path).map_err(|error| match error {
            JournalError::Io { source, .. } => source,
            other => std::io::Error::other(other.to_string()),
        })?;
        tracing::info!(segment = %path.display(), "journal segment started");
        self.file = file;
        self.path = path;
        self.len = codec::HEADER_LEN as u64;
        Ok(())
    }

    /// The directory the journal lives in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

fn create_segment(path: &Path) -> Result<File, JournalError> {
    let mut file = OpenOptions::new()
        .create_new(true)
        .append(true)
        .open(path)
        .map_err(JournalError::io(path, "create segment"))?;
    file.write_all(&codec::file_header(SEGMENT_MAGIC))
        .and_then(|()| file.sync_all())
        .map_err(JournalError::io(path, "write segment header"))?;
    sync_dir(path.parent().unwrap_or(Path::new(".")))
        .map_err(JournalError::io(path, "sync directory"))?;
    Ok(file)
}
