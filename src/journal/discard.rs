//! Giving records up, on an operator's explicit word (`--discard-journal-from`): the journal is
//! cut at the point a refused start-up named, every later segment is removed, and
//! `JOURNAL_HEAD` is made to agree. Snapshots past the point stay: each holds acknowledged
//! updates the cut journal no longer does, and start-up then starts from the newest that loads
//! (`crate::startup`; removing them lost what intact snapshots held, found by an adversarial
//! run).
//!
//! This module does not decide whether to discard (start-up compares the operator's point with
//! the one recovery refused at) and does not change the store id: the caller renews it first,
//! so that no revision is ever reused under the same id.

use std::fs::{self, OpenOptions};
use std::path::PathBuf;

use super::codec::{self, JournalHead};
use super::{DiscardPoint, JournalError, head, segments};
use crate::data_dir::sync_dir;

/// What giving records up did.
#[derive(Debug)]
pub struct Discarded {
    /// The segment cut short, and its new length.
    pub cut: Option<(PathBuf, u64)>,
    /// The segments removed.
    pub removed: Vec<PathBuf>,
}

/// Gives up the journal of `dir` from `point` on (its first revision given up, `first_lost`,
/// is what the caller reports).
pub fn discard(dir: &std::path::Path, point: &DiscardPoint) -> Result<Discarded, JournalError> {
    let mut discarded = Discarded {
        cut: None,
        removed: Vec::new(),
    };
    let mut newest_kept = 0;
    for (first, path) in segments(dir)? {
        let whole =
            first > point.segment_first || (first == point.segment_first && point.offset == 0);
        if whole {
            fs::remove_file(&path).map_err(JournalError::io(&path, "remove"))?;
            discarded.removed.push(path);
            continue;
        }
        newest_kept = first;
        if first == point.segment_first {
            // Never into the file header: an empty segment keeps its header.
            let len = point.offset.max(codec::HEADER_LEN as u64);
            OpenOptions::new()
                .write(true)
                .open(&path)
                .and_then(|file| file.set_len(len).and_then(|()| file.sync_all()))
                .map_err(JournalError::io(&path, "cut"))?;
            discarded.cut = Some((path, len));
        }
    }
    sync_dir(dir).map_err(JournalError::io(dir, "sync directory"))?;
    head::write(
        dir,
        &JournalHead {
            newest_segment: newest_kept,
            closed: None,
        },
    )?;
    Ok(discarded)
}
