//! The on-disk format: file headers, checksummed frames, and the protobuf records inside them.
//!
//! Every journal segment and snapshot starts with an 8-byte magic and a little-endian `u32`
//! format version. After it come frames: `len: u32 LE`, `crc32c(payload): u32 LE`, `payload`.
//! A journal frame holds one [`BatchRecord`] (one group commit); a snapshot holds a
//! [`SnapshotHeader`] frame and then [`ProfileBatch`] frames. Records are protobuf (prost
//! derive), so fields can be added without a format break. This module does no I/O.

use prost::Message;

use crate::profile::{
    EventTime, ExtraValue, Field, Profile, ProfileKey, ProfileUpdate, Register, Scalar, ScalarRef,
};

/// The format version this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// Magic of a journal segment file.
pub const SEGMENT_MAGIC: [u8; 8] = *b"PSJOURNL";
/// Magic of a snapshot file.
pub const SNAPSHOT_MAGIC: [u8; 8] = *b"PSSNAPSH";
/// Bytes of the file header: magic and version.
pub const HEADER_LEN: usize = 12;
/// Bytes before a frame's payload: length and checksum.
pub const FRAME_OVERHEAD: usize = 8;
/// Largest frame accepted on read: larger lengths are corruption, not data.
pub const MAX_FRAME: usize = 256 * 1024 * 1024;

/// The header of a file with this magic.
pub fn file_header(magic: [u8; 8]) -> [u8; HEADER_LEN] {
    let mut header = [0u8; HEADER_LEN];
    header[..8].copy_from_slice(&magic);
    header[8..].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    header
}

/// What is wrong with a file header.
#[derive(Debug, PartialEq, Eq)]
pub enum HeaderError {
    /// Shorter than a header: a file whose creation was cut off.
    Short,
    /// Not this kind of file.
    WrongMagic,
    /// Written by a format this build does not read.
    UnknownVersion(u32),
}

/// Checks a file's header against `magic`.
pub fn check_header(bytes: &[u8], magic: [u8; 8]) -> Result<(), HeaderError> {
    if bytes.len() < HEADER_LEN {
        return Err(HeaderError::Short);
    }
    if bytes[..8] != magic {
        return Err(HeaderError::WrongMagic);
    }
    let version = u32::from_le_bytes(bytes[8..12].try_into().expect("four bytes"));
    if version != FORMAT_VERSION {
        return Err(HeaderError::UnknownVersion(version));
    }
    Ok(())
}

/// Appends one frame carrying `message` to `out`.
pub fn encode_frame(message: &impl Message, out: &mut Vec<u8>) {
    let payload = message.encode_to_vec();
    let len = u32::try_from(payload.len()).expect("a frame under 4 GiB");
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&crc32c::crc32c(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
}

/// One frame read from a buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    /// A frame whose checksum matches; the next frame starts at `next`.
    Valid {
        /// The payload.
        payload: &'a [u8],
        /// Offset of the following frame.
        next: usize,
    },
    /// Nothing left at this offset.
    End,
    /// No valid frame here.
    Invalid {
        /// Why.
        reason: &'static str,
        /// Where the frame claims to end, when its length is plausible.
        claimed_end: Option<usize>,
    },
}

/// Reads the frame at `offset` of `bytes`.
pub fn read_frame(bytes: &[u8], offset: usize) -> Frame<'_> {
    let rest = &bytes[offset.min(bytes.len())..];
    if rest.is_empty() {
        return Frame::End;
    }
    if rest.len() < FRAME_OVERHEAD {
        return Frame::Invalid {
            reason: "frame header cut off",
            claimed_end: None,
        };
    }
    let len = u32::from_le_bytes(rest[..4].try_into().expect("four bytes")) as usize;
    let crc = u32::from_le_bytes(rest[4..8].try_into().expect("four bytes"));
    if len > MAX_FRAME {
        return Frame::Invalid {
            reason: "implausible frame length",
            claimed_end: None,
        };
    }
    let claimed_end = offset + FRAME_OVERHEAD + len;
    let Some(payload) = rest.get(FRAME_OVERHEAD..FRAME_OVERHEAD + len) else {
        return Frame::Invalid {
            reason: "frame cut off",
            claimed_end: Some(claimed_end),
        };
    };
    if crc32c::crc32c(payload) != crc {
        return Frame::Invalid {
            reason: "checksum mismatch",
            claimed_end: Some(claimed_end),
        };
    }
    Frame::Valid {
        payload,
        next: claimed_end,
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
    /// Modeled field registers.
    #[prost(message, repeated, tag = "6")]
    pub fields: Vec<FieldRecord>,
    /// Extra registers.
    #[prost(message, repeated, tag = "7")]
    pub extras: Vec<ExtraRecord>,
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

fn event_time(at: Option<&prost_types::Timestamp>) -> Result<EventTime, Malformed> {
    let at = at.ok_or_else(|| Malformed("missing timestamp".into()))?;
    let nanos = u32::try_from(at.nanos).map_err(|_| Malformed("negative nanos".into()))?;
    EventTime::from_timestamp(at.seconds, nanos)
        .ok_or_else(|| Malformed(format!("timestamp {}s out of range", at.seconds)))
}

fn field(number: u32) -> Result<Field, Malformed> {
    Field::from_number(number).ok_or_else(|| Malformed(format!("unknown field number {number}")))
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
        }
    }

    /// The update this record holds.
    pub fn into_update(self) -> Result<ProfileUpdate, Malformed> {
        let at = event_time(self.at.as_ref())?;
        let fields = self
            .fields
            .into_iter()
            .map(|record| Ok((field(record.field)?, scalar(record.value))))
            .collect::<Result<_, Malformed>>()?;
        let extras = self
            .extras
            .into_iter()
            .map(|record| Ok((record.key.into_boxed_str(), json(record.json)?)))
            .collect::<Result<_, Malformed>>()?;
        Ok(ProfileUpdate {
            key: ProfileKey::new(self.client_id, self.customer_id),
            at,
            fields,
            extras,
        })
    }
}

impl ProfileRecord {
    /// The record of a whole profile.
    pub fn new(profile: &Profile) -> ProfileRecord {
        ProfileRecord {
            client_id: profile.key.client_id.to_string(),
            customer_id: profile.key.customer_id.to_string(),
            revision: profile.revision,
            create_revision: profile.create_revision,
            version: profile.version,
            fields: profile
                .field_registers()
                .map(|(field, register)| FieldRecord {
                    field: field.number(),
                    value: scalar_record(register.value),
                    at: Some(timestamp(register.at)),
                })
                .collect(),
            extras: profile
                .extra_registers()
                .map(|(key, register)| ExtraRecord {
                    key: key.to_owned(),
                    json: register.value.as_ref().map(|value| value.0.to_string()),
                    at: Some(timestamp(register.at)),
                })
                .collect(),
        }
    }

    /// The profile this record holds.
    pub fn into_profile(self) -> Result<Profile, Malformed> {
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
        let extras = self
            .extras
            .into_iter()
            .map(|record| {
                let register = Register {
                    at: event_time(record.at.as_ref())?,
                    value: json(record.json)?.map(ExtraValue),
                };
                Ok((record.key.into_boxed_str(), register))
            })
            .collect::<Result<Vec<_>, Malformed>>()?;
        Ok(Profile::from_registers(
            ProfileKey::new(self.client_id, self.customer_id),
            fields,
            extras,
            self.revision,
            self.create_revision,
            self.version,
        ))
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
    fn frames_detect_corruption_and_cut_offs() {
        let mut bytes = Vec::new();
        encode_frame(&UpdateRecord::new(1, &update()), &mut bytes);
        let end = bytes.len();
        encode_frame(&UpdateRecord::new(2, &update()), &mut bytes);
        assert!(matches!(read_frame(&bytes, 0), Frame::Valid { next, .. } if next == end));
        assert_eq!(read_frame(&bytes, bytes.len()), Frame::End);
        assert!(matches!(
            read_frame(&bytes[..bytes.len() - 1], end),
            Frame::Invalid {
                reason: "frame cut off",
                ..
            }
        ));
        bytes[FRAME_OVERHEAD + 3] ^= 0x40;
        assert!(matches!(
            read_frame(&bytes, 0),
            Frame::Invalid { reason: "checksum mismatch", claimed_end: Some(e) } if e == end
        ));
    }

    #[test]
    fn headers_name_what_is_wrong() {
        let header = file_header(SEGMENT_MAGIC);
        assert_eq!(check_header(&header, SEGMENT_MAGIC), Ok(()));
        assert_eq!(
            check_header(&header[..5], SEGMENT_MAGIC),
            Err(HeaderError::Short)
        );
        assert_eq!(
            check_header(&header, SNAPSHOT_MAGIC),
            Err(HeaderError::WrongMagic)
        );
        let mut future = header;
        future[8] = 9;
        assert_eq!(
            check_header(&future, SEGMENT_MAGIC),
            Err(HeaderError::UnknownVersion(9))
        );
    }
}
