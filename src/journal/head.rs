//! `JOURNAL_HEAD`: the little the journal must remember outside its segments, so that recovery
//! notices records that are gone rather than reusing their revisions.
//!
//! It holds the first revision of the newest segment ever started (updated at every rotation,
//! before the new segment gets a record), and, after a clean shutdown, where the journal ended
//! (revision and length of the newest segment; cleared by the next start before anything is
//! appended). So recovery can tell that the newest segment was removed, and, after a clean
//! shutdown, that the journal was cut short or damaged at its end, which a crash's torn write
//! would otherwise excuse. It is written atomically (temp file, fsync, rename, fsync the
//! directory), as a checksummed frame after a file header.
//!
//! A data directory written by a build without it has none: recovery then runs without these
//! checks, and the journal writes one when it opens. This module does not decide what the
//! checks conclude (recovery does).

use std::fs;
use std::path::{Path, PathBuf};

use prost::Message;

use super::JournalError;
use super::codec::{self, Frame, HEAD_MAGIC, JournalHead};
use crate::data_dir::write_atomically;

/// The file's name in the data directory.
pub const FILE: &str = "JOURNAL_HEAD";

/// The path of the head file in `dir`.
pub fn path(dir: &Path) -> PathBuf {
    dir.join(FILE)
}

/// Reads the head file; `None` when there is none (a directory from an earlier build).
pub fn read(dir: &Path) -> Result<Option<JournalHead>, JournalError> {
    let path = path(dir);
    let bytes = match fs::read(&path) {
        Ok(bytes) => bytes,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(JournalError::io(&path, "read")(error)),
    };
    let damaged = |reason: String| JournalError::DamagedHead {
        path: path.clone(),
        reason,
    };
    let format =
        codec::check_header(&bytes, HEAD_MAGIC).map_err(|error| damaged(error.to_string()))?;
    match codec::read_frame(&bytes, codec::HEADER_LEN, format) {
        Frame::Valid { payload, next } if next == bytes.len() => JournalHead::decode(payload)
            .map(Some)
            .map_err(|error| damaged(error.to_string())),
        Frame::Valid { .. } => Err(damaged("bytes after its record".into())),
        Frame::End => Err(damaged("no record".into())),
        Frame::Invalid(invalid) => Err(damaged(invalid.reason().into())),
    }
}

/// Whether the head file is missing from a directory whose journal a build that writes one
/// wrote (a segment of format 2 or later: the two came together): it was removed or lost, so
/// recovery cannot tell a cut or removed end of the journal from a whole one. A directory of
/// format 1 segments alone is an earlier build's, not a loss. A head that is there but damaged
/// is recovery's to refuse, and a segment whose header cannot be read, recovery's to report.
pub fn lost(dir: &Path) -> Result<bool, JournalError> {
    if path(dir).exists() {
        return Ok(false);
    }
    for (_, segment) in super::segments(dir)? {
        let mut header = [0; codec::HEADER_LEN];
        let read = fs::File::open(&segment)
            .and_then(|mut file| std::io::Read::read_exact(&mut file, &mut header));
        if read.is_ok()
            && codec::check_header(&header, codec::SEGMENT_MAGIC)
                .is_ok_and(|format| format != codec::FrameFormat::V1)
        {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Replaces the head file with `head`, atomically.
pub fn write(dir: &Path, head: &JournalHead) -> Result<(), JournalError> {
    let path = path(dir);
    let mut bytes = codec::file_header(HEAD_MAGIC, codec::FrameFormat::CURRENT).to_vec();
    codec::encode_frame(head, &mut bytes);
    write_atomically(&path, &bytes).map_err(JournalError::io(&path, "write"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::codec::ClosedAt;

    #[test]
    fn the_head_round_trips_and_damage_is_named() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read(dir.path()).unwrap(), None, "none yet");
        let head = JournalHead {
            newest_segment: 42,
            closed: Some(ClosedAt {
                revision: 50,
                segment_len: 1234,
            }),
        };
        write(dir.path(), &head).unwrap();
        assert_eq!(read(dir.path()).unwrap(), Some(head));

        let mut bytes = fs::read(path(dir.path())).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x01;
        fs::write(path(dir.path()), &bytes).unwrap();
        let error = read(dir.path()).unwrap_err();
        assert!(
            matches!(&error, JournalError::DamagedHead { reason, .. } if reason == "checksum mismatch"),
            "{error}"
        );
    }
}
