//! The on-disk format: file headers, checksummed frames, and the protobuf records inside them.
//!
//! Every journal segment and snapshot starts with an 8-byte magic and a little-endian `u32`
//! format version; the frames after it follow that version:
//!
//! - format 3 (written for snapshots): format 2's frames; a snapshot's profiles carry their
//!   modeled registers as the store packs them ([`ProfileRecord::packed_registers`]) instead
//!   of a [`FieldRecord`] per field, so loading one is a check and a copy. Builds that read
//!   only formats 1 and 2 would skip that field and load empty profiles: the new number makes
//!   them refuse the file instead.
//! - format 2 (written for journal segments and the head file; read for snapshots): `len: u32
//!   LE`, `crc32c(payload): u32 LE`, `crc32c(len and payload crc): u32 LE`, `payload`. The
//!   header has its own checksum, so a damaged length is told apart from a frame cut off by a
//!   crash: only a sound header's length is believed.
//! - format 1 (read only, written by earlier builds): `len: u32 LE`, `crc32c(payload): u32 LE`,
//!   `payload`. The length is unprotected.
//!
//! After a crash, the newest journal segment's frames may be followed by zeros (the writer's
//! runway, `super::writer`): recovery reads them as the end of its frames. The frame layout is
//! format 2's either way, so the version stays 2.
//!
//! A journal frame holds one [`BatchRecord`] (one group commit); a snapshot holds a
//! [`SnapshotHeader`] frame and then [`ProfileBatch`] frames. Records are protobuf (prost
//! derive), so fields can be added without a format break. This module does no I/O.
//!
//! Over 700 lines with its tests (about 160 of them): one format, its writer and its reader,
//! kept together so a change to one is seen beside the other and their round-trip tests.

use prost::Message;

use crate::profile::{
    EventTime, ExtraValue, Field, Origin, Profile, ProfileKey, ProfileUpdate, Register, Scalar,
    ScalarRef,
};

/// The oldest format version this build reads.
pub const OLDEST_READABLE_VERSION: u32 = 1;
/// Magic of a journal segment file.
pub const SEGMENT_MAGIC: [u8; 8] = *b"PSJOURNL";
/// Magic of a snapshot file.
pub const SNAPSHOT_MAGIC: [u8; 8] = *b"PSSNAPSH";
/// Magic of the journal's head file (`JOURNAL_HEAD`).
pub const HEAD_MAGIC: [u8; 8] = *b"PSJHEAD\0";
/// Bytes of the file header: magic and version.
pub const HEADER_LEN: usize = 12;
/// Largest frame this build writes, and the largest builds before it read. A format 1
/// frame's length has no checksum: a larger one is corruption, not data. A later format's
/// header is checksummed, so its length is believed however large (builds before this one
/// wrote larger frames of acknowledged data, which they then refused: found by an adversarial
/// run).
pub const MAX_FRAME: usize = 256 * 1024 * 1024;
/// A batch or snapshot frame whose payload has reached this many bytes is closed, and the next
/// record or profile starts a new frame: the frames written stay far below [`MAX_FRAME`]
/// whatever a batch or a snapshot holds. Counting records or profiles alone did not: 1,024
/// profiles of 300 KB each (five text fields of 60 KB, within the default body limit) made a
/// 307 MB snapshot frame that every reader then refused as damage (found by an adversarial
/// run).
pub const FRAME_SPLIT_BYTES: usize = 32 * 1024 * 1024;
/// The largest `--max-body-bytes`: what one body can put in one frame stays well under
/// [`MAX_FRAME`] beside [`FRAME_SPLIT_BYTES`]. A record is at most about 4.5 times its body
/// (numbers of extras are written back out in full: `1e15` as `1000000000000000.0`), a profile
/// at most five text fields of a body each and its extras ([`crate::profile::MAX_EXTRAS_JSON_BYTES`]).
pub const MAX_BODY_BYTES: usize = 16 * 1024 * 1024;
const _: () = assert!(
    FRAME_SPLIT_BYTES + MAX_BODY_BYTES * 5 + crate::profile::MAX_EXTRAS_JSON_BYTES * 2 < MAX_FRAME
);

/// How the frames of a file are laid out, by its format version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameFormat {
    /// Format 1: length and payload checksum.
    V1,
    /// Format 2: length, payload checksum and a checksum of those two.
    V2,
    /// Format 3: format 2's frames, and snapshots' registers packed.
    V3,
}

impl FrameFormat {
    /// The format this build writes journal segments and the head file in.
    pub const CURRENT: FrameFormat = FrameFormat::V2;
    /// The format this build writes snapshots in.
    pub const SNAPSHOTS: FrameFormat = FrameFormat::V3;

    /// The newest format a file with `magic` may have: what this build writes it in. A
    /// segment or head file claiming format 3 is damaged or from a newer build, not read.
    pub fn newest_for(magic: [u8; 8]) -> FrameFormat {
        if magic == SNAPSHOT_MAGIC {
            FrameFormat::SNAPSHOTS
        } else {
            FrameFormat::CURRENT
        }
    }

    /// Bytes before a frame's payload.
    pub const fn overhead(self) -> usize {
        match self {
            FrameFormat::V1 => 8,
            FrameFormat::V2 | FrameFormat::V3 => 12,
        }
    }

    /// The format version number in file headers.
    pub const fn version(self) -> u32 {
        match self {
            FrameFormat::V1 => 1,
            FrameFormat::V2 => 2,
            FrameFormat::V3 => 3,
        }
    }
}

/// The header of a file with this magic, in `format`.
pub fn file_header(magic: [u8; 8], format: FrameFormat) -> [u8; HEADER_LEN] {
    let mut header = [0u8; HEADER_LEN];
    header[..8].copy_from_slice(&magic);
    header[8..].copy_from_slice(&format.version().to_le_bytes());
    header
}

/// What is wrong with a file header.
#[derive(Debug, PartialEq, Eq)]
pub enum HeaderError {
    /// Shorter than a header: a file whose creation was cut off.
    Short,
    /// Not this kind of file.
    WrongMagic,
    /// Written by a format this build does not read in this kind of file (`newest` is the
    /// newest it does).
    UnknownVersion {
        /// The version the header names.
        version: u32,
        /// The newest version this build reads in this kind of file.
        newest: u32,
    },
    /// A version no build writes, far past the newest: a damaged header (a flipped bit), not
    /// a file from a newer build, whose advice ("run the newer build") would mislead.
    ImplausibleVersion {
        /// The version the header names.
        version: u32,
    },
}

/// How many formats past its newest a build takes a file's version for one a newer build
/// wrote; beyond, the header is damaged. Formats come one at a time, a few a year at most.
const NEWER_FORMATS: u32 = 16;

impl std::fmt::Display for HeaderError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HeaderError::Short => write!(f, "the file header is cut off"),
            HeaderError::WrongMagic => write!(f, "not this kind of file (wrong magic bytes)"),
            HeaderError::UnknownVersion { version, newest } if version > newest => write!(
                f,
                "written in format {version} by a newer profile-state; this build reads formats \
                 {OLDEST_READABLE_VERSION} to {newest}: run the newer build (or restore a backup \
                 taken before the upgrade)"
            ),
            HeaderError::UnknownVersion { version, newest } => write!(
                f,
                "format {version} is not one this build reads (formats \
                 {OLDEST_READABLE_VERSION} to {newest})"
            ),
            HeaderError::ImplausibleVersion { version } => write!(
                f,
                "the file header is damaged (format version {version}, which no build writes)"
            ),
        }
    }
}

/// Checks a file's header against `magic`; returns how its frames are laid out.
pub fn check_header(bytes: &[u8], magic: [u8; 8]) -> Result<FrameFormat, HeaderError> {
    if bytes.len() < HEADER_LEN {
        return Err(HeaderError::Short);
    }
    if bytes[..8] != magic {
        return Err(HeaderError::WrongMagic);
    }
    let newest = FrameFormat::newest_for(magic);
    match u32::from_le_bytes(bytes[8..12].try_into().expect("four bytes")) {
        1 => Ok(FrameFormat::V1),
        2 => Ok(FrameFormat::V2),
        3 if newest == FrameFormat::V3 => Ok(FrameFormat::V3),
        version if version > newest.version().saturating_add(NEWER_FORMATS) => {
            Err(HeaderError::ImplausibleVersion { version })
        }
        version => Err(HeaderError::UnknownVersion {
            version,
            newest: newest.version(),
        }),
    }
}

/// Appends one frame carrying `message` to `out`, in the current format.
pub fn encode_frame(message: &impl Message, out: &mut Vec<u8>) {
    // Encoded in place after a header filled in afterwards: no copy of the payload.
    let start = out.len();
    out.reserve(FRAME_HEADER_LEN + message.encoded_len());
    out.extend_from_slice(&[0u8; FRAME_HEADER_LEN]);
    message
        .encode(out)
        .expect("a Vec grows to take any message");
    fill_frame_header(&mut out[start..]);
}

/// A frame of the current format around `payload` as it is (tests build payloads no build
/// writes).
#[cfg(test)]
pub(super) fn frame_of(payload: &[u8]) -> Vec<u8> {
    let mut frame = vec![0; FRAME_HEADER_LEN];
    frame.extend_from_slice(payload);
    fill_frame_header(&mut frame);
    frame
}

/// Bytes before a frame's payload in the current format.
const FRAME_HEADER_LEN: usize = FrameFormat::CURRENT.overhead();

/// Fills the header of `frame` (header room, then the payload) in the current format.
fn fill_frame_header(frame: &mut [u8]) {
    let (header, payload) = frame.split_at_mut(FRAME_HEADER_LEN);
    let len = u32::try_from(payload.len()).expect("a frame under 4 GiB");
    header[..4].copy_from_slice(&len.to_le_bytes());
    header[4..8].copy_from_slice(&crc32c::crc32c(payload).to_le_bytes());
    let header_crc = crc32c::crc32c(&header[..8]);
    header[8..].copy_from_slice(&header_crc.to_le_bytes());
}

/// The frame of a [`BatchRecord`], built one update at a time: each is encoded once, where it
/// will be written (the same bytes as [`batch_frame`] of the whole batch). A batch whose
/// records pass [`FRAME_SPLIT_BYTES`] becomes several frames, one after the other, each written
/// and synced before the next (so that only the last can be torn): recovery reads them as it
/// reads frames of consecutive batches.
///
/// Every batch frame ends in [`BATCH_END_MARK`], field 15 holding `u64::MAX`, which no reader
/// knows and every reader skips (prost and `wire` skip unknown fields; so did every earlier
/// build). Recovery reads a frame over the runway whose last bytes, from a page boundary on,
/// are zeros as a write a kill stopped there only if what is left before them is the start of
/// the mark: a record can end in a zero byte (an integer field of value 0), and a damaged
/// frame of an earlier build, which has no mark, must not pass for such a write.
pub struct BatchFrame {
    bytes: Vec<u8>,
    /// Where the frame being filled starts in `bytes` (its header room).
    open_frame: usize,
    revisions: Option<(u64, u64)>,
}

/// The field number of a batch frame's end mark (see [`BatchFrame`]).
pub const BATCH_END_TAG: u32 = 15;

/// The last bytes of every batch frame: the key of field 15 as a fixed64, and `u64::MAX`.
pub const BATCH_END_MARK: [u8; 9] = [0x79, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff];

/// The frame the journal writes for `batch`: its records and the end mark.
pub fn batch_frame(batch: &BatchRecord) -> Vec<u8> {
    let mut frame = BatchFrame::default();
    for record in &batch.updates {
        frame.push(record);
    }
    frame.finish()
}

impl Default for BatchFrame {
    fn default() -> Self {
        BatchFrame {
            bytes: vec![0; FRAME_HEADER_LEN],
            open_frame: 0,
            revisions: None,
        }
    }
}

impl BatchFrame {
    /// Adds `record`, whose revision follows the last one added.
    pub fn push(&mut self, record: &UpdateRecord) {
        if self.bytes.len() - self.open_frame - FRAME_HEADER_LEN >= FRAME_SPLIT_BYTES {
            self.close_frame();
            self.open_frame = self.bytes.len();
            self.bytes.extend_from_slice(&[0; FRAME_HEADER_LEN]);
        }
        prost::encoding::message::encode(1, record, &mut self.bytes);
        let first = self.revisions.map_or(record.revision, |(first, _)| first);
        self.revisions = Some((first, record.revision));
    }

    /// The first and last revision added; `None` when nothing was.
    pub fn revisions(&self) -> Option<(u64, u64)> {
        self.revisions
    }

    /// The finished frames (one, unless the records passed [`FRAME_SPLIT_BYTES`]), each with
    /// its end mark.
    pub fn finish(mut self) -> Vec<u8> {
        self.close_frame();
        self.bytes
    }

    fn close_frame(&mut self) {
        prost::encoding::fixed64::encode(BATCH_END_TAG, &u64::MAX, &mut self.bytes);
        fill_frame_header(&mut self.bytes[self.open_frame..]);
    }
}

/// Where each frame of `frames` ends: frames of the current format one after the other, as
/// [`BatchFrame::finish`] makes them (their lengths are read, not checked).
pub fn frame_ends(frames: &[u8]) -> impl Iterator<Item = usize> + '_ {
    let mut start = 0;
    std::iter::from_fn(move || {
        let header = frames.get(start..start + FRAME_HEADER_LEN)?;
        let len = u32::from_le_bytes(header[..4].try_into().expect("four bytes"));
        start += FRAME_HEADER_LEN + len as usize;
        Some(start.min(frames.len()))
    })
}

/// One frame read from a buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    /// A frame whose checksums match; the next frame starts at `next`.
    Valid {
        /// The payload.
        payload: &'a [u8],
        /// Offset of the following frame.
        next: usize,
    },
    /// Nothing left at this offset.
    End,
    /// No valid frame here.
    Invalid(Invalid),
}

/// Why there is no valid frame at an offset, and what is known about where it would end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Invalid {
    /// Fewer bytes are left than a frame header has: a write cut off.
    HeaderCutOff,
    /// The header's checksum does not match (format 2): its length means nothing.
    HeaderDamaged,
    /// A length no frame has: a damaged header (format 1 has no header checksum).
    ImplausibleLength,
    /// The header is sound (format 1: plausible) but the data ends before the payload does.
    PayloadCutOff {
        /// Where the frame would end.
        claimed_end: usize,
    },
    /// The payload's checksum does not match.
    PayloadDamaged {
        /// Where the frame ends.
        claimed_end: usize,
    },
}

impl Invalid {
    /// What is wrong, in words.
    pub fn reason(self) -> &'static str {
        match self {
            Invalid::HeaderCutOff => "frame header cut off",
            Invalid::HeaderDamaged => "frame header checksum mismatch",
            Invalid::ImplausibleLength => "implausible frame length",
            Invalid::PayloadCutOff { .. } => "frame cut off",
            Invalid::PayloadDamaged { .. } => "checksum mismatch",
        }
    }
}

/// The payload length the frame header `header` (at least `format.overhead()` bytes) gives, if
/// it can be believed: a checksummed header's when its checksum matches, a format 1 header's
/// when it is at most [`MAX_FRAME`]. What a reader that streams a file reads before
/// [`read_frame`] judges the frame: a damaged length never makes it read more.
pub fn believed_len(header: &[u8], format: FrameFormat) -> Option<usize> {
    let word = |at: usize| u32::from_le_bytes(header[at..at + 4].try_into().expect("four bytes"));
    let len = word(0) as usize;
    let sound = match format {
        FrameFormat::V1 => len <= MAX_FRAME,
        FrameFormat::V2 | FrameFormat::V3 => crc32c::crc32c(&header[..8]) == word(8),
    };
    sound.then_some(len)
}

/// Reads the frame at `offset` of `bytes`, laid out as `format`.
pub fn read_frame(bytes: &[u8], offset: usize, format: FrameFormat) -> Frame<'_> {
    let rest = &bytes[offset.min(bytes.len())..];
    if rest.is_empty() {
        return Frame::End;
    }
    let overhead = format.overhead();
    if rest.len() < overhead {
        return Frame::Invalid(Invalid::HeaderCutOff);
    }
    let word = |at: usize| u32::from_le_bytes(rest[at..at + 4].try_into().expect("four bytes"));
    let Some(len) = believed_len(rest, format) else {
        return Frame::Invalid(match format {
            FrameFormat::V1 => Invalid::ImplausibleLength,
            FrameFormat::V2 | FrameFormat::V3 => Invalid::HeaderDamaged,
        });
    };
    let claimed_end = offset + overhead + len;
    let Some(payload) = rest.get(overhead..overhead + len) else {
        return Frame::Invalid(Invalid::PayloadCutOff { claimed_end });
    };
    if crc32c::crc32c(payload) != word(4) {
        return Frame::Invalid(Invalid::PayloadDamaged { claimed_end });
    }
    Frame::Valid {
        payload,
        next: claimed_end,
    }
}

/// Where the frame at `offset` would end if its header can be believed: the length of a
/// header whose own checksum matches (format 2), or any plausible length (format 1).
pub fn claimed_end(bytes: &[u8], offset: usize, format: FrameFormat) -> Option<usize> {
    match read_frame(bytes, offset, format) {
        Frame::Valid { next, .. } => Some(next),
        Frame::Invalid(
            Invalid::PayloadCutOff { claimed_end } | Invalid::PayloadDamaged { claimed_end },
        ) => Some(claimed_end),
        _ => None,
    }
}

/// One group commit: the updates that got revisions together, in revision order.
#[derive(Clone, PartialEq, Message)]
pub struct BatchRecord {
    /// The updates.
    #[prost(message, repeated, tag = "1")]
    pub updates: Vec<UpdateRecord>,
}

/// A validated update and the revision the sequencer gave it.
#[derive(Clone, PartialEq, Message)]
pub struct UpdateRecord {
    /// The revision of the change it made.
    #[prost(uint64, tag = "1")]
    pub revision: u64,
    /// `client_id`.
    #[prost(string, tag = "2")]
    pub client_id: String,
    /// `customer_id`.
    #[prost(string, tag = "3")]
    pub customer_id: String,
    /// `created_at`.
    #[prost(message, optional, tag = "4")]
    pub at: Option<prost_types::Timestamp>,
    /// Modeled fields it writes.
    #[prost(message, repeated, tag = "5")]
    pub fields: Vec<FieldRecord>,
    /// Extra keys it writes.
    #[prost(message, repeated, tag = "6")]
    pub extras: Vec<ExtraRecord>,
    /// What produced the update: 0 a webhook (so records written before this field existed
    /// read as webhooks), 1 a reconciliation. Unknown numbers are refused as malformed.
    #[prost(uint32, tag = "7")]
    pub origin: u32,
}

/// A modeled field's value (absent = cleared), and in snapshots its register's clock.
#[derive(Clone, PartialEq, Message)]
pub struct FieldRecord {
    /// `Field::number`.
    #[prost(uint32, tag = "1")]
    pub field: u32,
    /// The value; `None` when cleared.
    #[prost(oneof = "ScalarRecord", tags = "2, 3")]
    pub value: Option<ScalarRecord>,
    /// The register's clock (snapshots only).
    #[prost(message, optional, tag = "4")]
    pub at: Option<prost_types::Timestamp>,
}

/// A modeled field's value.
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum ScalarRecord {
    /// An integer.
    #[prost(int64, tag = "2")]
    Int(i64),
    /// Text.
    #[prost(string, tag = "3")]
    Text(String),
}

/// An extra key's value as compact JSON (absent = cleared), and in snapshots its clock.
#[derive(Clone, PartialEq, Message)]
pub struct ExtraRecord {
    /// The `data` key.
    #[prost(string, tag = "1")]
    pub key: String,
    /// The JSON value; `None` when cleared.
    #[prost(string, optional, tag = "2")]
    pub json: Option<String>,
    /// The register's clock (snapshots only).
    #[prost(message, optional, tag = "3")]
    pub at: Option<prost_types::Timestamp>,
}

/// The first frame of a snapshot.
#[derive(Clone, PartialEq, Message)]
pub struct SnapshotHeader {
    /// The revision the snapshot is as of.
    #[prost(uint64, tag = "1")]
    pub revision: u64,
    /// How many profiles follow.
    #[prost(uint64, tag = "2")]
    pub profiles: u64,
    /// In replicated mode, the last stream sequence applied in this state (a replica follows
    /// the stream after it); 0 in a single node's snapshots. A field added without a format
    /// change: older builds skip it.
    #[prost(uint64, tag = "3")]
    pub stream_sequence: u64,
}

/// A chunk of a snapshot's profiles.
#[derive(Clone, PartialEq, Message)]
pub struct ProfileBatch {
    /// The profiles.
    #[prost(message, repeated, tag = "1")]
    pub profiles: Vec<ProfileRecord>,
}

/// A whole profile: every register with its clock, and the revision bookkeeping.
#[derive(Clone, PartialEq, Message)]
pub struct ProfileRecord {
    /// `client_id`.
    #[prost(string, tag = "1")]
    pub client_id: String,
    /// `customer_id`.
    #[prost(string, tag = "2")]
    pub customer_id: String,
    /// Revision of the last change.
    #[prost(uint64, tag = "3")]
    pub revision: u64,
    /// Revision of the creating change.
    #[prost(uint64, tag = "4")]
    pub create_revision: u64,
    /// Number of changes.
    #[prost(uint64, tag = "5")]
    pub version: u64,
    /// Modeled field registers, one record each (formats 1 and 2; empty in format 3).
    #[prost(message, repeated, tag = "6")]
    pub fields: Vec<FieldRecord>,
    /// Extra registers.
    #[prost(message, repeated, tag = "7")]
    pub extras: Vec<ExtraRecord>,
    /// Modeled field registers as the store packs them ([`Profile::packed_registers`]),
    /// format 3 on; a record holds these or `fields`, never both.
    #[prost(bytes = "vec", tag = "8")]
    pub packed_registers: Vec<u8>,
}

/// The journal's head file (`JOURNAL_HEAD`): what recovery must find, so that a segment
/// removed or cut short by hand is noticed instead of its records being silently lost.
#[derive(Clone, PartialEq, Message)]
pub struct JournalHead {
    /// First revision of the newest segment ever started: it, or a newer one, must be there.
    #[prost(uint64, tag = "1")]
    pub newest_segment: u64,
    /// Set by a clean shutdown, cleared by the next start: where the journal ended.
    #[prost(message, optional, tag = "2")]
    pub closed: Option<ClosedAt>,
}

/// Where a cleanly closed journal ended: nothing after it can be a torn write.
#[derive(Clone, PartialEq, Message)]
pub struct ClosedAt {
    /// The last revision written.
    #[prost(uint64, tag = "1")]
    pub revision: u64,
    /// The length of the newest segment.
    #[prost(uint64, tag = "2")]
    pub segment_len: u64,
}

/// A record that does not make sense (a bug or a foreign file, since checksums passed).
#[derive(Debug, thiserror::Error)]
#[error("malformed record: {0}")]
pub struct Malformed(pub String);

fn timestamp(at: EventTime) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: at.timestamp(),
        nanos: i32::try_from(at.timestamp_subsec_nanos()).expect("nanos below 10^9"),
    }
}

pub(super) fn event_time(at: Option<&prost_types::Timestamp>) -> Result<EventTime, Malformed> {
    let at = at.ok_or_else(|| Malformed("missing timestamp".into()))?;
    let nanos = u32::try_from(at.nanos).map_err(|_| Malformed("negative nanos".into()))?;
    EventTime::from_timestamp(at.seconds, nanos)
        .ok_or_else(|| Malformed(format!("timestamp {}s out of range", at.seconds)))
}

pub(super) fn field(number: u32) -> Result<Field, Malformed> {
    Field::from_number(number).ok_or_else(|| Malformed(format!("unknown field number {number}")))
}

fn origin_number(origin: Origin) -> u32 {
    match origin {
        Origin::Webhook => 0,
        Origin::Reconcile => 1,
    }
}

fn origin(number: u32) -> Result<Origin, Malformed> {
    match number {
        0 => Ok(Origin::Webhook),
        1 => Ok(Origin::Reconcile),
        other => Err(Malformed(format!("unknown origin number {other}"))),
    }
}

fn scalar_record(value: Option<ScalarRef<'_>>) -> Option<ScalarRecord> {
    value.map(|value| match value {
        ScalarRef::Int(n) => ScalarRecord::Int(n),
        ScalarRef::Text(text) => ScalarRecord::Text(text.to_owned()),
    })
}

fn scalar(record: Option<ScalarRecord>) -> Option<Scalar> {
    record.map(|record| match record {
        ScalarRecord::Int(n) => Scalar::Int(n),
        ScalarRecord::Text(text) => Scalar::Text(text.into()),
    })
}

fn json(text: Option<String>) -> Result<Option<serde_json::Value>, Malformed> {
    text.map(|text| serde_json::from_str(&text).map_err(|err| Malformed(err.to_string())))
        .transpose()
}

impl UpdateRecord {
    /// The record of `update` applied as `revision`.
    pub fn new(revision: u64, update: &ProfileUpdate) -> UpdateRecord {
        UpdateRecord {
            revision,
            client_id: update.key.client_id.to_string(),
            customer_id: update.key.customer_id.to_string(),
            at: Some(timestamp(update.at)),
            fields: update
                .fields
                .iter()
                .map(|(field, value)| FieldRecord {
                    field: field.number(),
                    value: scalar_record(value.as_ref().map(Scalar::view)),
                    at: None,
                })
                .collect(),
            extras: update
                .extras
                .iter()
                .map(|(key, value)| ExtraRecord {
                    key: key.to_string(),
                    json: value.as_ref().map(ToString::to_string),
                    at: None,
                })
                .collect(),
            origin: origin_number(update.origin),
        }
    }

    /// The update this record holds.
    pub fn into_update(self) -> Result<ProfileUpdate, Malformed> {
        update_of(
            ProfileKey::new(self.client_id, self.customer_id),
            self.at.as_ref(),
            self.fields
                .into_iter()
                .map(|record| (record.field, scalar(record.value))),
            self.extras,
            self.origin,
        )
    }
}

/// The update an `UpdateRecord`'s parts make, checked in this order (the first failure is the
/// error): its time, each field number, each extra's JSON, its origin. Both readings of the
/// journal (prost's records and `wire`'s in-place one) come through here.
pub(super) fn update_of(
    key: ProfileKey,
    at: Option<&prost_types::Timestamp>,
    fields: impl IntoIterator<Item = (u32, Option<Scalar>)>,
    extras: Vec<ExtraRecord>,
    origin_number: u32,
) -> Result<ProfileUpdate, Malformed> {
    let at = event_time(at)?;
    let fields = fields
        .into_iter()
        .map(|(number, value)| Ok((field(number)?, value)))
        .collect::<Result<_, Malformed>>()?;
    let extras = extras
        .into_iter()
        .map(|record| Ok((record.key.into_boxed_str(), json(record.json)?)))
        .collect::<Result<_, Malformed>>()?;
    Ok(ProfileUpdate {
        key,
        at,
        fields,
        extras,
        origin: origin(origin_number)?,
    })
}

impl ProfileRecord {
    /// The record of a whole profile, as format 3 writes it (registers packed).
    pub fn new(profile: &Profile) -> ProfileRecord {
        ProfileRecord {
            packed_registers: profile.packed_registers().to_vec(),
            fields: Vec::new(),
            ..ProfileRecord::without_registers(profile)
        }
    }

    /// The record of a whole profile as formats 1 and 2 wrote it (a record per register):
    /// the snapshots of earlier builds, which this one still reads.
    #[cfg(test)]
    pub fn with_field_records(profile: &Profile) -> ProfileRecord {
        ProfileRecord {
            fields: profile
                .field_registers()
                .map(|(field, register)| FieldRecord {
                    field: field.number(),
                    value: scalar_record(register.value),
                    at: Some(timestamp(register.at)),
                })
                .collect(),
            ..ProfileRecord::without_registers(profile)
        }
    }

    fn without_registers(profile: &Profile) -> ProfileRecord {
        ProfileRecord {
            client_id: profile.key.client_id.to_string(),
            customer_id: profile.key.customer_id.to_string(),
            revision: profile.revision,
            create_revision: profile.create_revision,
            version: profile.version,
            fields: Vec::new(),
            extras: profile
                .extra_registers()
                .map(|(key, register)| ExtraRecord {
                    key: key.to_owned(),
                    json: register.value.as_ref().map(|value| value.0.to_string()),
                    at: Some(timestamp(register.at)),
                })
                .collect(),
            packed_registers: Vec::new(),
        }
    }

    /// The profile this record holds.
    pub fn into_profile(self) -> Result<Profile, Malformed> {
        let extras = self
            .extras
            .into_iter()
            .map(ExtraRecord::into_register)
            .collect::<Result<Vec<_>, Malformed>>()?;
        let key = ProfileKey::new(self.client_id, self.customer_id);
        let bookkeeping = (self.revision, self.create_revision, self.version);
        if !self.packed_registers.is_empty() {
            let has_fields = !self.fields.is_empty();
            return packed_profile(key, &self.packed_registers, has_fields, extras, bookkeeping);
        }
        let fields = self
            .fields
            .into_iter()
            .map(|record| {
                let register = Register {
                    at: event_time(record.at.as_ref())?,
                    value: scalar(record.value),
                };
                Ok((field(record.field)?, register))
            })
            .collect::<Result<Vec<_>, Malformed>>()?;
        let (revision, create_revision, version) = bookkeeping;
        Ok(Profile::from_registers(
            key,
            fields,
            extras,
            revision,
            create_revision,
            version,
        ))
    }
}

/// The profile of a format 3 record, whose registers are `packed` (never empty here); a
/// record that also has field records, or registers no profile packs to, is malformed. Both
/// readings of a snapshot (prost's records and `wire`'s in-place one) come through here.
pub(super) fn packed_profile(
    key: ProfileKey,
    packed: &[u8],
    has_fields: bool,
    extras: Vec<(Box<str>, Register<ExtraValue>)>,
    bookkeeping: (u64, u64, u64),
) -> Result<Profile, Malformed> {
    if has_fields {
        return Err(Malformed(
            "a profile with both packed registers and field records".into(),
        ));
    }
    Profile::from_packed(key, packed, extras, bookkeeping)
        .ok_or_else(|| Malformed("packed registers that no profile packs to".into()))
}

impl ExtraRecord {
    /// The register of a snapshot's extra key.
    pub fn into_register(self) -> Result<(Box<str>, Register<ExtraValue>), Malformed> {
        let register = Register {
            at: event_time(self.at.as_ref())?,
            value: json(self.json)?.map(ExtraValue),
        };
        Ok((self.key.into_boxed_str(), register))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn update() -> ProfileUpdate {
        ProfileUpdate {
            key: ProfileKey::new("2155", "c1"),
            at: EventTime::from_timestamp(1_732_037_682, 297_000_000).unwrap(),
            fields: vec![
                (Field::GbCustomerId, Some(Scalar::Int(1234))),
                (Field::Email, None),
                (Field::TierName, Some(Scalar::Text("gold".into()))),
            ],
            extras: vec![
                ("birthday".into(), Some(serde_json::json!({"d": [1, 2]}))),
                ("gone".into(), None),
            ],
            origin: Origin::Webhook,
        }
    }

    #[test]
    fn updates_and_profiles_round_trip() {
        let record = UpdateRecord::new(7, &update());
        let decoded = UpdateRecord::decode(record.encode_to_vec().as_slice()).unwrap();
        assert_eq!(decoded.revision, 7);
        assert_eq!(decoded.into_update().unwrap(), update());

        let mut profile = Profile::empty(update().key);
        profile.merge(&update());
        profile.revision = 7;
        profile.create_revision = 3;
        profile.version = 2;
        let decoded =
            ProfileRecord::decode(ProfileRecord::new(&profile).encode_to_vec().as_slice())
                .unwrap()
                .into_profile()
                .unwrap();
        assert_eq!(decoded, profile);
    }

    #[test]
    fn origins_round_trip_and_webhook_records_are_unchanged_on_disk() {
        let webhook = update();
        let reconcile = ProfileUpdate {
            origin: Origin::Reconcile,
            ..update()
        };
        let webhook_bytes = UpdateRecord::new(7, &webhook).encode_to_vec();
        let reconcile_bytes = UpdateRecord::new(7, &reconcile).encode_to_vec();
        // A webhook's record is byte for byte what builds before the field wrote, so records
        // written before it existed (field 7 absent) read as webhooks.
        assert!(reconcile_bytes.len() > webhook_bytes.len());
        let decode = |bytes: &[u8]| UpdateRecord::decode(bytes).unwrap().into_update().unwrap();
        assert_eq!(decode(&webhook_bytes).origin, Origin::Webhook);
        assert_eq!(decode(&reconcile_bytes), reconcile);

        let mut unknown = UpdateRecord::new(7, &webhook);
        unknown.origin = 9;
        let error = unknown.into_update().unwrap_err();
        assert!(
            error.to_string().contains("unknown origin number 9"),
            "{error}"
        );
    }

    /// A frame as format 1 wrote it (this build no longer writes that format).
    fn v1_frame(message: &impl Message, out: &mut Vec<u8>) {
        let payload = message.encode_to_vec();
        out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        out.extend_from_slice(&crc32c::crc32c(&payload).to_le_bytes());
        out.extend_from_slice(&payload);
    }

    #[test]
    fn frames_detect_corruption_and_cut_offs() {
        let v2 = FrameFormat::V2;
        let mut bytes = Vec::new();
        encode_frame(&UpdateRecord::new(1, &update()), &mut bytes);
        let end = bytes.len();
        encode_frame(&UpdateRecord::new(2, &update()), &mut bytes);
        assert!(matches!(read_frame(&bytes, 0, v2), Frame::Valid { next, .. } if next == end));
        assert_eq!(read_frame(&bytes, bytes.len(), v2), Frame::End);
        assert_eq!(
            read_frame(&bytes[..bytes.len() - 1], end, v2),
            Frame::Invalid(Invalid::PayloadCutOff {
                claimed_end: bytes.len()
            })
        );
        assert_eq!(
            read_frame(&bytes[..end + 11], end, v2),
            Frame::Invalid(Invalid::HeaderCutOff)
        );
        let mut damaged = bytes.clone();
        damaged[v2.overhead() + 3] ^= 0x40;
        assert_eq!(
            read_frame(&damaged, 0, v2),
            Frame::Invalid(Invalid::PayloadDamaged { claimed_end: end })
        );
        assert_eq!(claimed_end(&damaged, 0, v2), Some(end));
    }

    #[test]
    fn every_flipped_bit_of_a_header_is_caught_by_its_checksum() {
        let mut bytes = Vec::new();
        encode_frame(&UpdateRecord::new(1, &update()), &mut bytes);
        for bit in 0..FrameFormat::V2.overhead() * 8 {
            let mut damaged = bytes.clone();
            damaged[bit / 8] ^= 1 << (bit % 8);
            assert_eq!(
                read_frame(&damaged, 0, FrameFormat::V2),
                Frame::Invalid(Invalid::HeaderDamaged),
                "bit {bit}"
            );
            assert_eq!(claimed_end(&damaged, 0, FrameFormat::V2), None);
        }
    }

    /// Frames larger than this build writes, from a build before it: a checksummed header's
    /// length is believed (the payload the file lacks is a cut-off frame, not a damaged
    /// header), a format 1 header's is not.
    #[test]
    fn a_checksummed_length_past_the_largest_frame_written_is_believed() {
        let header = |len: usize, format: FrameFormat| {
            let mut frame = vec![0; FRAME_HEADER_LEN];
            frame.extend_from_slice(b"some of the payload");
            let mut header = frame.clone();
            header[..4].copy_from_slice(&u32::try_from(len).unwrap().to_le_bytes());
            let crc = crc32c::crc32c(&header[..8]);
            header[8..12].copy_from_slice(&crc.to_le_bytes());
            header.truncate(format.overhead());
            header.extend_from_slice(&frame[FRAME_HEADER_LEN..]);
            header
        };
        let len = MAX_FRAME + 1;
        let large = header(len, FrameFormat::V3);
        assert_eq!(believed_len(&large, FrameFormat::V3), Some(len));
        let claimed_end = FRAME_HEADER_LEN + len;
        assert_eq!(
            read_frame(&large, 0, FrameFormat::V3),
            Frame::Invalid(Invalid::PayloadCutOff { claimed_end })
        );
        let mut damaged = large.clone();
        damaged[2] ^= 1;
        assert_eq!(believed_len(&damaged, FrameFormat::V3), None);
        let v1 = header(len, FrameFormat::V1);
        assert_eq!(believed_len(&v1, FrameFormat::V1), None);
        assert_eq!(
            read_frame(&v1, 0, FrameFormat::V1),
            Frame::Invalid(Invalid::ImplausibleLength)
        );
    }

    #[test]
    fn format_1_frames_are_still_read() {
        let v1 = FrameFormat::V1;
        let mut bytes = Vec::new();
        v1_frame(&UpdateRecord::new(1, &update()), &mut bytes);
        let end = bytes.len();
        let Frame::Valid { payload, next } = read_frame(&bytes, 0, v1) else {
            panic!("a format 1 frame reads back")
        };
        assert_eq!(next, end);
        let decoded = UpdateRecord::decode(payload).unwrap();
        assert_eq!(decoded.into_update().unwrap(), update());
        // Its length is unprotected: only an impossible one is known to be damaged.
        bytes[3] ^= 0x80;
        assert_eq!(
            read_frame(&bytes, 0, v1),
            Frame::Invalid(Invalid::ImplausibleLength)
        );
    }

    #[test]
    fn headers_name_what_is_wrong() {
        let header = file_header(SEGMENT_MAGIC, FrameFormat::CURRENT);
        assert_eq!(check_header(&header, SEGMENT_MAGIC), Ok(FrameFormat::V2));
        let snapshot = file_header(SNAPSHOT_MAGIC, FrameFormat::SNAPSHOTS);
        assert_eq!(check_header(&snapshot, SNAPSHOT_MAGIC), Ok(FrameFormat::V3));
        assert_eq!(
            check_header(&header[..5], SEGMENT_MAGIC),
            Err(HeaderError::Short)
        );
        assert_eq!(
            check_header(&header, SNAPSHOT_MAGIC),
            Err(HeaderError::WrongMagic)
        );
        let mut old = header;
        old[8] = 1;
        assert_eq!(check_header(&old, SEGMENT_MAGIC), Ok(FrameFormat::V1));
        let mut future = header;
        future[8] = 9;
        let error = check_header(&future, SEGMENT_MAGIC).unwrap_err();
        assert_eq!(
            error,
            HeaderError::UnknownVersion {
                version: 9,
                newest: 2
            }
        );
        // Only snapshots are written in format 3: a segment claiming it is not read as one.
        let mut three = header;
        three[8] = 3;
        assert!(check_header(&three, SEGMENT_MAGIC).is_err());
        three[..8].copy_from_slice(&SNAPSHOT_MAGIC);
        assert_eq!(check_header(&three, SNAPSHOT_MAGIC), Ok(FrameFormat::V3));
        three[8] = 4;
        let error = check_header(&three, SNAPSHOT_MAGIC)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains(
                "written in format 4 by a newer profile-state; this build reads \
                 formats 1 to 3"
            ),
            "{error}"
        );
        assert!(error.to_string().contains("newer profile-state"), "{error}");
    }

    #[test]
    fn a_batch_frame_built_record_by_record_is_the_frame_of_the_batch() {
        let records: Vec<UpdateRecord> = (1..=3).map(|r| UpdateRecord::new(r, &update())).collect();
        let mut built = BatchFrame::default();
        for record in &records {
            built.push(record);
        }
        assert_eq!(built.revisions(), Some((1, 3)));
        let batch = BatchRecord { updates: records };
        let built = built.finish();
        assert_eq!(built, batch_frame(&batch));
        // The records as prost encodes the batch, then the end mark, which prost skips.
        let mut whole = Vec::new();
        encode_frame(&batch, &mut whole);
        assert_eq!(built[12..whole.len()], whole[12..]);
        assert_eq!(built[whole.len()..], BATCH_END_MARK);
        assert_eq!(BatchRecord::decode(&built[12..]).unwrap(), batch);
        let empty = batch_frame(&BatchRecord::default());
        assert_ne!(empty.last(), Some(&0), "no batch frame ends in a zero byte");
    }
}
