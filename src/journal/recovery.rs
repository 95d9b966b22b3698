//! Recovery: the newest usable snapshot, then every later journal record replayed through the
//! sequencer's merge; a torn last frame cut off, any other damage refused.
//!
//! This module does not merge or number anything itself (the `replay` callback does) and does
//! not write the journal beyond cutting a torn tail.

use std::fs::{self, OpenOptions};
use std::path::Path;

use prost::Message;

use super::codec::{self, BatchRecord, Frame, HeaderError, SEGMENT_MAGIC};
use super::writer::{TEMP_SUFFIX, Tail};
use super::{JournalError, SEGMENT_PREFIX, segments, snapshot};
use crate::store::Store;

/// What recovery found and did.
#[derive(Debug)]
pub struct Recovered {
    /// The snapshot loaded, if any.
    pub snapshot: Option<u64>,
    /// How many update records were replayed after it.
    pub replayed: u64,
    /// Where appends continue; `None` when there is no segment yet.
    pub tail: Option<Tail>,
}

/// Rebuilds `store` from the snapshot and journal in `dir`: profiles, revision and history.
///
/// `replay` applies one batch of `(revision, update)` records to the store and fails if they
/// do not produce exactly those revisions (it is the sequencer's merge).
pub fn recover(
    dir: &Path,
    store: &Store,
    mut replay: impl FnMut(Vec<codec::UpdateRecord>) -> Result<(), String>,
) -> Result<Recovered, JournalError> {
    remove_temporary_files(dir)?;
    let segments = segments(dir)?;
    let snapshot = snapshot::choose(dir, &segments)?;
    if let Some((revision, path)) = &snapshot {
        let read = snapshot::read(path, |profiles| store.restore(profiles, *revision))?;
        if read != *revision {
            return Err(JournalError::Corrupt {
                path: path.clone(),
                offset: codec::HEADER_LEN as u64,
                reason: format!("the snapshot's header says revision {read}, its name {revision}"),
            });
        }
    }
    let mut replayed = 0;
    let mut tail = None;
    for (index, (_, path)) in segments.iter().enumerate() {
        let is_last = index + 1 == segments.len();
        // A segment wholly covered by the snapshot needs no reading.
        if let Some((next_first, _)) = segments.get(index + 1)
            && *next_first <= store.revision() + 1
        {
            continue;
        }
        let bytes = fs::read(path).map_err(JournalError::io(path, "read"))?;
        match codec::check_header(&bytes, SEGMENT_MAGIC) {
            Ok(()) => {}
            Err(HeaderError::Short) if is_last => {
                // Its creation was cut off by a crash: it never held a record.
                tracing::warn!(segment = %path.display(), "removing a segment whose header was never completed");
                fs::remove_file(path).map_err(JournalError::io(path, "remove"))?;
                continue;
            }
            Err(error) => {
                return Err(JournalError::Format {
                    path: path.clone(),
                    reason: format!(
                        "not a journal segment of format {}: {error:?}",
                        codec::FORMAT_VERSION
                    ),
                });
            }
        }
        let mut offset = codec::HEADER_LEN;
        loop {
            match codec::read_frame(&bytes, offset) {
                Frame::End => break,
                Frame::Valid { payload, next } => {
                    let batch =
                        BatchRecord::decode(payload).map_err(|error| JournalError::Corrupt {
                            path: path.clone(),
                            offset: offset as u64,
                            reason: format!("undecodable batch: {error}"),
                        })?;
                    let pending: Vec<_> = batch
                        .updates
                        .into_iter()
                        .filter(|update| update.revision > store.revision())
                        .collect();
                    if let Some(update) = pending.first()
                        && update.revision != store.revision() + 1
                    {
                        return Err(JournalError::Gap {
                            path: path.clone(),
                            expected: store.revision() + 1,
                            found: update.revision,
                        });
                    }
                    replayed += pending.len() as u64;
                    if !pending.is_empty() {
                        replay(pending).map_err(|reason| JournalError::Corrupt {
                            path: path.clone(),
                            offset: offset as u64,
                            reason,
                        })?;
                    }
                    offset = next;
                }
                Frame::Invalid {
                    reason,
                    claimed_end,
                } => {
                    // Only the last frame written can be torn, and nothing valid follows it.
                    let valid_after = claimed_end.is_some_and(|end| {
                        matches!(codec::read_frame(&bytes, end), Frame::Valid { .. })
                    });
                    if !is_last || valid_after {
                        return Err(JournalError::Corrupt {
                            path: path.clone(),
                            offset: offset as u64,
                            reason: reason.into(),
                        });
                    }
                    let dropped = bytes.len() - offset;
                    tracing::warn!(
                        segment = %path.display(),
                        offset,
                        dropped_bytes = dropped,
                        reason,
                        "cutting off a torn last record (a crash mid-write; it was never acknowledged)"
                    );
                    let file = OpenOptions::new()
                        .write(true)
                        .open(path)
                        .map_err(JournalError::io(path, "open to cut the torn tail"))?;
                    file.set_len(offset as u64)
                        .and_then(|()| file.sync_all())
                        .map_err(JournalError::io(path, "cut the torn tail"))?;
                    break;
                }
            }
        }
        if is_last {
            tail = Some(Tail {
                path: path.clone(),
                len: offset as u64,
            });
        }
    }
    Ok(Recovered {
        snapshot: snapshot.map(|(revision, _)| revision),
        replayed,
        tail,
    })
}

/// Removes what an interrupted segment creation or snapshot left: a temporary file never
/// renamed into place holds nothing recovery needs (and a snapshot's can be large).
fn remove_temporary_files(dir: &Path) -> Result<(), JournalError> {
    let temporary = [
        (SEGMENT_PREFIX, TEMP_SUFFIX),
        (snapshot::PREFIX, snapshot::TEMP_SUFFIX),
    ];
    for entry in fs::read_dir(dir).map_err(JournalError::io(dir, "list"))? {
        let path = entry.map_err(JournalError::io(dir, "list"))?.path();
        let Some(name) = path.file_name().and_then(|name| name.to_str()) else {
            continue;
        };
        if temporary
            .iter()
            .any(|(prefix, suffix)| name.starts_with(prefix) && name.ends_with(suffix))
        {
            tracing::info!(file = %path.display(), "removing a file whose writing was cut off");
            fs::remove_file(&path).map_err(JournalError::io(&path, "remove"))?;
        }
    }
    Ok(())
}
