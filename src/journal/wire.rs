//! Journal records read straight from their bytes, in the formats `codec` defines with prost
//! (nothing about the format changes): a snapshot frame's profiles (format 3's packed
//! registers, or the field records of formats 1 and 2), a segment batch's updates (recovery's
//! replay: each text copied once, straight into its update), and a batch's last revision.
//!
//! Decoding a snapshot through the prost records allocated about twenty small objects per
//! profile (a `String` per id and text value, a `Vec` of field records, a timestamp each) only to
//! pack them into the profile and free them again; with a million profiles that was most of the
//! decoding thread's time at start-up. Here the texts are borrowed from the frame and packed
//! directly: a profile costs its customer id and its packed registers. Extras, which few profiles
//! have, still go through `codec::ExtraRecord`. Likewise recovery skips the batches a snapshot
//! already holds by their last revision, without decoding their updates.
//!
//! It reads what prost reads: unknown fields are skipped, a repeated singular field keeps its
//! last value, and anything prost would refuse (a bad varint, a wrong wire type, a length past
//! the end, text that is not UTF-8) is an error, as is what `ProfileRecord::into_profile`
//! refuses, and per update what `UpdateRecord::into_update` refuses. It does not write
//! (`codec` does).

use arcstr::ArcStr;
use prost::Message;

use super::codec::{self, ExtraRecord, Malformed};
use crate::profile::{Field, Profile, ProfileKey, ProfileUpdate, ScalarRef, StampedRef};

/// The profiles of a snapshot frame's payload (a `ProfileBatch`), appended to `out`.
/// `accounts` is the last `client_id` read, reused while runs of one account go on (snapshots
/// are in key order), so a profile does not allocate its own copy.
pub fn decode_batch(
    payload: &[u8],
    accounts: &mut Option<ArcStr>,
    out: &mut Vec<Profile>,
) -> Result<(), Malformed> {
    let mut wire = Wire(payload);
    while let Some((tag, kind)) = wire.key()? {
        match (tag, kind) {
            (1, LEN) => out.push(decode_profile(wire.bytes()?, accounts)?),
            (1, _) => return Err(wrong_type("ProfileBatch.profiles")),
            _ => wire.skip(tag, kind, 0)?,
        }
    }
    Ok(())
}

/// How many profiles a snapshot frame's payload (a `ProfileBatch`) holds, counted without
/// decoding them: what compaction checks a snapshot's frames against its header by.
pub fn batch_len(payload: &[u8]) -> Result<u64, Malformed> {
    let mut wire = Wire(payload);
    let mut count = 0;
    while let Some((tag, kind)) = wire.key()? {
        match (tag, kind) {
            (1, LEN) => {
                wire.bytes()?;
                count += 1;
            }
            (1, _) => return Err(wrong_type("ProfileBatch.profiles")),
            _ => wire.skip(tag, kind, 0)?,
        }
    }
    Ok(count)
}

/// The revision of the last update of a journal frame's payload (a `BatchRecord`); `None`
/// when it holds none. The batch's updates are only delimited, and the last one's revision
/// read: recovery skips the batches a snapshot holds by it, and reading every update's
/// revision was a quarter of the replay's decoding thread at a million profiles. What a skipped
/// batch's other updates hold is never used, and their frame's checksum held.
pub fn last_revision(payload: &[u8]) -> Result<Option<u64>, Malformed> {
    let mut wire = Wire(payload);
    let mut last = None;
    while let Some((tag, kind)) = wire.key()? {
        match (tag, kind) {
            (1, LEN) => last = Some(wire.bytes()?),
            (1, _) => return Err(wrong_type("BatchRecord.updates")),
            _ => wire.skip(tag, kind, 0)?,
        }
    }
    last.map(update_revision).transpose()
}

/// A batch's updates decoded, each with its revision: the update, or why it does not make
/// sense (as `UpdateRecord::into_update` says, in the same order of checks).
pub type DecodedUpdates = Vec<(u64, Result<ProfileUpdate, Malformed>)>;

/// The updates of a journal frame's payload (a `BatchRecord`) from revision `floor` on, as
/// `BatchRecord::decode` and `UpdateRecord::into_update` give them: an error when prost would
/// refuse the payload (every record is read, those below `floor` included), and per record
/// when `into_update` would refuse it. Texts are copied once, straight into the update, and
/// runs of one account share `accounts`' `client_id`.
pub fn decode_updates(
    payload: &[u8],
    floor: u64,
    accounts: &mut Option<ArcStr>,
) -> Result<DecodedUpdates, Malformed> {
    let mut wire = Wire(payload);
    let mut updates = Vec::new();
    while let Some((tag, kind)) = wire.key()? {
        match (tag, kind) {
            (1, LEN) => {
                let record = UpdateRef::decode(wire.bytes()?)?;
                if record.revision >= floor {
                    updates.push((record.revision, record.into_update(accounts)));
                }
            }
            (1, _) => return Err(wrong_type("BatchRecord.updates")),
            _ => wire.skip(tag, kind, 0)?,
        }
    }
    Ok(updates)
}

/// An `UpdateRecord` read in place: what prost reads, texts borrowed from the frame.
#[derive(Default)]
struct UpdateRef<'a> {
    revision: u64,
    client_id: &'a str,
    customer_id: &'a str,
    at: Option<prost_types::Timestamp>,
    fields: Vec<(u32, Option<ScalarRef<'a>>)>,
    extras: Vec<ExtraRecord>,
    origin: u32,
}

impl<'a> UpdateRef<'a> {
    fn decode(bytes: &'a [u8]) -> Result<Self, Malformed> {
        let mut wire = Wire(bytes);
        let mut record = UpdateRef::default();
        while let Some((tag, kind)) = wire.key()? {
            match (tag, kind) {
                (1, VARINT) => record.revision = wire.varint()?,
                (2, LEN) => record.client_id = text(wire.bytes()?)?,
                (3, LEN) => record.customer_id = text(wire.bytes()?)?,
                (4, LEN) => decode_timestamp(wire.bytes()?, record.at.get_or_insert_default(), 2)?,
                (5, LEN) => {
                    if record.fields.capacity() == 0 {
                        record.fields.reserve_exact(Field::ALL.len());
                    }
                    record.fields.push(update_field(wire.bytes()?)?);
                }
                (6, LEN) => record.extras.push(
                    ExtraRecord::decode(wire.bytes()?)
                        .map_err(|error| Malformed(error.to_string()))?,
                ),
                // prost reads a uint32 as a varint cut to 32 bits.
                (7, VARINT) => record.origin = wire.varint()? as u32,
                (1..=7, _) => return Err(wrong_type("UpdateRecord")),
                _ => wire.skip(tag, kind, 1)?,
            }
        }
        Ok(record)
    }

    /// `UpdateRecord::into_update`, from borrowed texts (each copied once, here).
    fn into_update(self, accounts: &mut Option<ArcStr>) -> Result<ProfileUpdate, Malformed> {
        codec::update_of(
            ProfileKey::new(shared_account(accounts, self.client_id), self.customer_id),
            self.at.as_ref(),
            self.fields
                .into_iter()
                .map(|(number, value)| (number, value.map(ScalarRef::to_scalar))),
            self.extras,
            self.origin,
        )
    }
}

/// One `FieldRecord` of an update: its field number and value (the oneof's last member read).
/// Its clock, which updates do not use, is still read, as prost reads it.
fn update_field(bytes: &[u8]) -> Result<(u32, Option<ScalarRef<'_>>), Malformed> {
    let mut wire = Wire(bytes);
    let mut number = 0u32;
    let mut value = None;
    let mut unused_clock = prost_types::Timestamp::default();
    while let Some((tag, kind)) = wire.key()? {
        match (tag, kind) {
            (1, VARINT) => number = wire.varint()? as u32,
            (2, VARINT) => value = Some(ScalarRef::Int(wire.varint()? as i64)),
            (3, LEN) => value = Some(ScalarRef::Text(text(wire.bytes()?)?)),
            (4, LEN) => decode_timestamp(wire.bytes()?, &mut unused_clock, 3)?,
            (1..=4, _) => return Err(wrong_type("FieldRecord")),
            _ => wire.skip(tag, kind, 2)?,
        }
    }
    Ok((number, value))
}

/// The shared copy of `client_id` when it is the last account read, else a new one that
/// becomes the last.
fn shared_account(accounts: &mut Option<ArcStr>, client_id: &str) -> ArcStr {
    match accounts {
        Some(shared) if *shared == client_id => shared.clone(),
        _ => {
            let shared: ArcStr = client_id.into();
            *accounts = Some(shared.clone());
            shared
        }
    }
}

/// The revision of one `UpdateRecord` (0 when absent, as prost reads it).
fn update_revision(bytes: &[u8]) -> Result<u64, Malformed> {
    let mut wire = Wire(bytes);
    let mut revision = 0;
    while let Some((tag, kind)) = wire.key()? {
        match (tag, kind) {
            (1, VARINT) => revision = wire.varint()?,
            (1, _) => return Err(wrong_type("UpdateRecord.revision")),
            _ => wire.skip(tag, kind, 1)?,
        }
    }
    Ok(revision)
}

/// One `ProfileRecord`.
fn decode_profile(bytes: &[u8], accounts: &mut Option<ArcStr>) -> Result<Profile, Malformed> {
    let mut wire = Wire(bytes);
    let (mut client_id, mut customer_id) = ("", "");
    let (mut revision, mut create_revision, mut version) = (0, 0, 0);
    // Field records are only in formats 1 and 2: no allocation for a format 3 profile.
    let mut fields: Vec<(Field, StampedRef<'_>)> = Vec::new();
    let mut extras = Vec::new();
    let mut packed: &[u8] = &[];
    while let Some((tag, kind)) = wire.key()? {
        match (tag, kind) {
            (1, LEN) => client_id = text(wire.bytes()?)?,
            (2, LEN) => customer_id = text(wire.bytes()?)?,
            (3, VARINT) => revision = wire.varint()?,
            (4, VARINT) => create_revision = wire.varint()?,
            (5, VARINT) => version = wire.varint()?,
            (6, LEN) => {
                if fields.capacity() == 0 {
                    fields.reserve_exact(Field::ALL.len());
                }
                fields.push(decode_field(wire.bytes()?)?);
            }
            (7, LEN) => {
                let record = ExtraRecord::decode(wire.bytes()?)
                    .map_err(|error| Malformed(error.to_string()))?;
                extras.push(record.into_register()?);
            }
            (8, LEN) => packed = wire.bytes()?,
            (1..=8, _) => return Err(wrong_type("ProfileRecord")),
            _ => wire.skip(tag, kind, 1)?,
        }
    }
    let key = ProfileKey::new(shared_account(accounts, client_id), customer_id);
    if !packed.is_empty() {
        let bookkeeping = (revision, create_revision, version);
        return codec::packed_profile(key, packed, !fields.is_empty(), extras, bookkeeping);
    }
    Profile::from_stamped_refs(key, fields, extras, revision, create_revision, version)
        .map_err(|(_, seconds)| Malformed(format!("timestamp {seconds}s out of range")))
}

/// One `FieldRecord`: the field, its register's value (the oneof's last member read) and time
/// (as stored: checked when the profile is packed).
fn decode_field(bytes: &[u8]) -> Result<(Field, StampedRef<'_>), Malformed> {
    let mut wire = Wire(bytes);
    let mut number = 0u32;
    let mut value = None;
    let mut at: Option<prost_types::Timestamp> = None;
    while let Some((tag, kind)) = wire.key()? {
        match (tag, kind) {
            // prost reads a uint32 as a varint cut to 32 bits, an int64 as one cast.
            (1, VARINT) => number = wire.varint()? as u32,
            (2, VARINT) => value = Some(ScalarRef::Int(wire.varint()? as i64)),
            (3, LEN) => value = Some(ScalarRef::Text(text(wire.bytes()?)?)),
            (4, LEN) => decode_timestamp(wire.bytes()?, at.get_or_insert_default(), 3)?,
            (1..=4, _) => return Err(wrong_type("FieldRecord")),
            _ => wire.skip(tag, kind, 2)?,
        }
    }
    // As `codec::event_time` refuses them, in the same order.
    let at = at.ok_or_else(|| Malformed("missing timestamp".into()))?;
    let nanos = u32::try_from(at.nanos).map_err(|_| Malformed("negative nanos".into()))?;
    let stamped = StampedRef {
        value,
        seconds: at.seconds,
        nanos,
    };
    Ok((codec::field(number)?, stamped))
}

/// A `google.protobuf.Timestamp`, merged into `at` as prost merges a repeated message field;
/// `depth` is how deep it is nested (see [`Wire::skip`]).
fn decode_timestamp(
    bytes: &[u8],
    at: &mut prost_types::Timestamp,
    depth: u32,
) -> Result<(), Malformed> {
    let mut wire = Wire(bytes);
    while let Some((tag, kind)) = wire.key()? {
        match (tag, kind) {
            (1, VARINT) => at.seconds = wire.varint()? as i64,
            (2, VARINT) => at.nanos = wire.varint()? as i32,
            (1..=2, _) => return Err(wrong_type("Timestamp")),
            _ => wire.skip(tag, kind, depth)?,
        }
    }
    Ok(())
}

fn text(bytes: &[u8]) -> Result<&str, Malformed> {
    std::str::from_utf8(bytes).map_err(|_| Malformed("text that is not UTF-8".into()))
}

fn unexpected_group_end() -> Malformed {
    Malformed("a group's end without its start".into())
}

fn wrong_type(message: &str) -> Malformed {
    Malformed(format!("a field of {message} with the wrong wire type"))
}

const VARINT: u8 = 0;
const FIXED64: u8 = 1;
const LEN: u8 = 2;
const START_GROUP: u8 = 3;
const END_GROUP: u8 = 4;
const FIXED32: u8 = 5;

/// prost's nesting limit: messages, and groups inside them, nested this deep are refused.
const RECURSION_LIMIT: u32 = 100;

/// The unread rest of a message.
struct Wire<'a>(&'a [u8]);

impl<'a> Wire<'a> {
    #[inline]
    fn varint(&mut self) -> Result<u64, Malformed> {
        // Keys, most lengths and small numbers take one byte: read those without the loop
        // (with the indexed loop below, 0.8% fewer instructions per start-up at 1M profiles).
        if let Some((&byte, rest)) = self.0.split_first()
            && byte < 0x80
        {
            self.0 = rest;
            return Ok(u64::from(byte));
        }
        let bytes = self.0;
        let mut value = 0u64;
        let mut index = 0;
        while index < bytes.len().min(10) {
            let byte = bytes[index];
            value |= u64::from(byte & 0x7f) << (7 * index);
            index += 1;
            if byte < 0x80 {
                // The tenth byte may only carry the top bit of a u64.
                if index == 10 && byte > 1 {
                    break;
                }
                self.0 = &bytes[index..];
                return Ok(value);
            }
        }
        Err(Malformed("a varint that is cut short or too long".into()))
    }

    /// The next field's tag and wire type; `None` at the end.
    #[inline]
    fn key(&mut self) -> Result<Option<(u32, u8)>, Malformed> {
        // Every field this build writes has a one-byte key: that case small enough to inline
        // (a call per key was a fifth of the replay's decoding thread).
        match self.0.split_first() {
            None => Ok(None),
            Some((&key, rest)) if (8..0x80).contains(&key) => {
                self.0 = rest;
                Ok(Some((u32::from(key >> 3), key & 7)))
            }
            Some(_) => self.any_key(),
        }
    }

    /// [`Wire::key`] of any length, tag 0 refused.
    #[inline(never)]
    fn any_key(&mut self) -> Result<Option<(u32, u8)>, Malformed> {
        let key = self.varint()?;
        // As prost: a key is a u32, and tag 0 does not exist.
        let tag = u32::try_from(key)
            .ok()
            .map(|key| key >> 3)
            .filter(|tag| *tag > 0)
            .ok_or_else(|| Malformed(format!("field key {key} out of range")))?;
        Ok(Some((tag, (key & 7) as u8)))
    }

    #[inline]
    fn bytes(&mut self) -> Result<&'a [u8], Malformed> {
        // A one-byte length that fits, inlined; anything else through the general path.
        if let Some((&len, rest)) = self.0.split_first()
            && len < 0x80
            && usize::from(len) <= rest.len()
        {
            let (bytes, rest) = rest.split_at(usize::from(len));
            self.0 = rest;
            return Ok(bytes);
        }
        self.any_bytes()
    }

    /// [`Wire::bytes`] with a length of any size.
    #[inline(never)]
    fn any_bytes(&mut self) -> Result<&'a [u8], Malformed> {
        let len = self.varint()?;
        let len = usize::try_from(len)
            .ok()
            .filter(|len| *len <= self.0.len())
            .ok_or_else(|| Malformed(format!("a length of {len} past the end")))?;
        let (bytes, rest) = self.0.split_at(len);
        self.0 = rest;
        Ok(bytes)
    }

    fn advance(&mut self, len: usize) -> Result<(), Malformed> {
        self.0 = self
            .0
            .get(len..)
            .ok_or_else(|| Malformed("a fixed-size field past the end".into()))?;
        Ok(())
    }

    /// Skips a field this build does not know (written by a newer one), as prost skips it:
    /// a group (wire types 3 and 4, which nothing here writes, but which a damaged byte can
    /// make) up to its matching end, groups inside it included. `depth` is how deep the
    /// message being read is nested (the outermost is 0); with the groups around the field it
    /// counts against prost's recursion limit as it does in prost. Reading a damaged frame
    /// exactly as prost reads it is what the tests hold this reader to.
    fn skip(&mut self, tag: u32, kind: u8, depth: u32) -> Result<(), Malformed> {
        if depth >= RECURSION_LIMIT {
            return Err(Malformed("groups nested past the recursion limit".into()));
        }
        match kind {
            VARINT => self.varint().map(drop),
            FIXED64 => self.advance(8),
            LEN => self.bytes().map(drop),
            FIXED32 => self.advance(4),
            START_GROUP => loop {
                match self.key()? {
                    None => return Err(Malformed("a group without its end".into())),
                    Some((inner, END_GROUP)) if inner == tag => return Ok(()),
                    Some((_, END_GROUP)) => return Err(unexpected_group_end()),
                    Some((inner, kind)) => self.skip(inner, kind, depth + 1)?,
                }
            },
            END_GROUP => Err(unexpected_group_end()),
            other => Err(Malformed(format!("unknown wire type {other}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::codec::{ProfileBatch, ProfileRecord};
    use crate::profile::{ExtraValue, Register, Scalar};
    use proptest::prelude::*;

    fn decode_both(payload: &[u8]) -> (Result<Vec<Profile>, String>, Result<Vec<Profile>, String>) {
        let by_prost = ProfileBatch::decode(payload)
            .map_err(|error| error.to_string())
            .and_then(|batch| {
                batch
                    .profiles
                    .into_iter()
                    .map(|record| record.into_profile().map_err(|error| error.to_string()))
                    .collect()
            });
        let mut direct = Vec::new();
        let by_wire = decode_batch(payload, &mut None, &mut direct)
            .map(|()| direct)
            .map_err(|error| error.to_string());
        (by_prost, by_wire)
    }

    /// A profile's record as format 3 writes it (`packed`) or as formats 1 and 2 did.
    fn record(packed: bool) -> fn(&Profile) -> ProfileRecord {
        if packed {
            ProfileRecord::new
        } else {
            ProfileRecord::with_field_records
        }
    }

    fn scalar(field: Field, seed: i64, text: &str) -> Option<Scalar> {
        match field {
            Field::GbCustomerId
            | Field::TierOrder
            | Field::ActivatedPoints
            | Field::PendingPoints
            | Field::TotalPoints => Some(Scalar::Int(seed)),
            _ => Some(Scalar::Text(text.into())),
        }
    }

    prop_compose! {
        fn profile()(
            client in "[a-z0-9]{1,8}",
            customer in "\\PC{0,40}",
            written in proptest::collection::vec(any::<bool>(), Field::ALL.len()),
            cleared in proptest::collection::vec(any::<bool>(), Field::ALL.len()),
            seed in any::<i64>(),
            text in "\\PC{0,30}",
            seconds in -62_135_596_800i64..253_402_300_799,
            nanos in 0u32..1_000_000_000,
            revisions in (1u64..u64::MAX / 2, any::<u32>()),
            extra in proptest::option::of(("[a-z]{1,6}", proptest::option::of(any::<i32>()))),
        ) -> Profile {
            let at = chrono::DateTime::from_timestamp(seconds, nanos).unwrap();
            let later = chrono::DateTime::from_timestamp(seconds / 2, nanos / 3).unwrap();
            let fields = Field::ALL.into_iter().enumerate().filter(|(i, _)| written[*i]).map(|(i, field)| {
                let value = if cleared[i] { None } else { scalar(field, seed ^ i as i64, &text) };
                (field, Register { at: if i % 2 == 0 { at } else { later }, value })
            });
            let extras = extra.map(|(key, value)| {
                let value = value.map(|n| ExtraValue(serde_json::json!({ "n": n })));
                (key.into_boxed_str(), Register { at, value })
            });
            let (revision, version) = revisions;
            Profile::from_registers(
                ProfileKey::new(client, customer),
                fields,
                extras,
                revision,
                revision / 2,
                u64::from(version),
            )
        }
    }

    proptest! {
        /// Whatever `ProfileRecord::new` writes (format 3), or formats 1 and 2 wrote, both
        /// readings give the same profiles.
        #[test]
        fn reads_what_prost_reads(
            profiles in proptest::collection::vec(profile(), 0..6),
            packed in any::<bool>(),
        ) {
            let batch = ProfileBatch { profiles: profiles.iter().map(record(packed)).collect() };
            let (by_prost, by_wire) = decode_both(&batch.encode_to_vec());
            prop_assert_eq!(by_prost.as_ref().unwrap(), &profiles);
            prop_assert_eq!(by_wire.unwrap(), profiles);
        }

        /// A varint reads as prost reads it: the same value and rest, or an error where prost
        /// has one (cut short, more than ten bytes, a tenth byte past a u64's top bit).
        #[test]
        fn varints_read_as_prost_reads_them(
            value in any::<u64>(),
            // Mostly continuation bytes, so that long and overlong varints come up.
            noise in proptest::collection::vec(prop_oneof![3 => 0x80u8..=0xff, 1 => any::<u8>()], 0..12),
        ) {
            let mut encoded = Vec::new();
            prost::encoding::encode_varint(value, &mut encoded);
            let mut wire = Wire(&encoded);
            prop_assert_eq!(wire.varint().unwrap(), value);
            prop_assert!(wire.0.is_empty());
            let mut by_prost = &noise[..];
            let expected = prost::encoding::decode_varint(&mut by_prost).ok();
            let mut wire = Wire(&noise);
            let read = wire.varint().ok();
            prop_assert_eq!(read, expected);
            if read.is_some() {
                prop_assert_eq!(wire.0, by_prost);
            }
        }

        /// Arbitrary bytes never panic, and the two readings agree on what they accept.
        #[test]
        fn damaged_bytes_are_refused_alike(
            profiles in proptest::collection::vec(profile(), 1..3),
            packed in any::<bool>(),
            flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        ) {
            let batch = ProfileBatch { profiles: profiles.iter().map(record(packed)).collect() };
            let mut bytes = batch.encode_to_vec();
            for (index, byte) in flips {
                let at = index.index(bytes.len());
                bytes[at] = byte;
            }
            let (by_prost, by_wire) = decode_both(&bytes);
            prop_assert_eq!(by_prost.ok(), by_wire.ok());
        }
    }

    prop_compose! {
        /// An `UpdateRecord` as the journal writes them, or one `into_update` refuses: field
        /// numbers and origins out of range, a missing or impossible time, JSON that is not.
        fn update_record()(
            revision in 0u64..40,
            client in prop_oneof!["[a-b]{1}", "\\PC{0,6}"],
            customer in "\\PC{0,12}",
            at in proptest::option::weighted(0.95, (-62_135_596_800i64..253_402_300_799, -2i32..1_000_000_000)),
            fields in proptest::collection::vec(
                (0u32..12, proptest::option::of(prop_oneof![
                    any::<i64>().prop_map(codec::ScalarRecord::Int),
                    "\\PC{0,10}".prop_map(codec::ScalarRecord::Text),
                ])),
                0..5,
            ),
            extras in proptest::collection::vec(
                ("[a-z]{1,4}", proptest::option::of(prop_oneof!["[0-9]{1,3}", "\\{\"a\":[0-9]\\}", "\\PC{0,3}"])),
                0..2,
            ),
            origin in prop_oneof![9 => 0u32..2, 1 => 2u32..5],
        ) -> codec::UpdateRecord {
            codec::UpdateRecord {
                revision,
                client_id: client,
                customer_id: customer,
                at: at.map(|(seconds, nanos)| prost_types::Timestamp { seconds, nanos }),
                // A clock on a field is a snapshot's, but prost reads it in an update too.
                fields: fields.into_iter().enumerate().map(|(index, (field, value))| codec::FieldRecord {
                    field,
                    value,
                    at: (index == 1).then_some(prost_types::Timestamp { seconds: revision as i64, nanos: 5 }),
                }).collect(),
                extras: extras.into_iter().map(|(key, json)| ExtraRecord { key, json, at: None }).collect(),
                origin,
            }
        }
    }

    /// A batch read: its updates with their revisions, or why it was refused (as text).
    type BatchReading = Result<Vec<(u64, Result<ProfileUpdate, String>)>, String>;

    /// Both readings of a journal batch: prost's records converted, and `decode_updates`.
    fn updates_both(payload: &[u8], floor: u64) -> (BatchReading, BatchReading) {
        let by_prost = codec::BatchRecord::decode(payload)
            .map(|batch| {
                batch
                    .updates
                    .into_iter()
                    .filter(|update| update.revision >= floor)
                    .map(|update| {
                        (
                            update.revision,
                            update.into_update().map_err(|error| error.to_string()),
                        )
                    })
                    .collect()
            })
            .map_err(|error| error.to_string());
        let by_wire = decode_updates(payload, floor, &mut None)
            .map(|updates| {
                updates
                    .into_iter()
                    .map(|(revision, update)| (revision, update.map_err(|error| error.to_string())))
                    .collect()
            })
            .map_err(|error| error.to_string());
        (by_prost, by_wire)
    }

    proptest! {
        /// Whatever records a batch holds, the direct reading gives the updates (or the same
        /// reasons to refuse them) that prost's records converted give, from any floor.
        #[test]
        fn journal_updates_read_as_prost_reads_them(
            records in proptest::collection::vec(update_record(), 0..6),
            floor in 0u64..40,
        ) {
            let payload = codec::BatchRecord { updates: records }.encode_to_vec();
            let (by_prost, by_wire) = updates_both(&payload, floor);
            prop_assert!(by_prost.is_ok());
            prop_assert_eq!(by_wire, by_prost);
        }

        /// Damaged batches: accepted alike, with the same updates, or refused alike.
        #[test]
        fn damaged_journal_batches_are_refused_alike(
            records in proptest::collection::vec(update_record(), 1..4),
            flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        ) {
            let mut payload = codec::BatchRecord { updates: records }.encode_to_vec();
            for (index, byte) in flips {
                let at = index.index(payload.len());
                payload[at] = byte;
            }
            let (by_prost, by_wire) = updates_both(&payload, 0);
            prop_assert_eq!(by_wire.ok(), by_prost.ok());
        }
    }

    #[test]
    fn varints_at_the_edges_of_a_u64() {
        let read = |bytes: &[u8]| Wire(bytes).varint().ok();
        let mut longest = vec![0xff; 9];
        longest.push(0x01);
        assert_eq!(read(&longest), Some(u64::MAX));
        *longest.last_mut().unwrap() = 0x02;
        assert_eq!(read(&longest), None, "a tenth byte past a u64's top bit");
        assert_eq!(read(&[0x80; 10]), None, "more than ten bytes");
        assert_eq!(read(&[0x80, 0x80]), None, "cut short");
        assert_eq!(read(&[]), None, "nothing");
        assert_eq!(read(&[0x7f, 0xff]), Some(127));
        assert_eq!(read(&[0x80, 0x01]), Some(128));
    }

    #[test]
    fn a_batch_is_known_by_its_last_revision() {
        use crate::journal::codec::{BatchRecord, UpdateRecord};
        use crate::profile::{Origin, ProfileUpdate};
        let update = ProfileUpdate {
            key: ProfileKey::new("2155", "c1"),
            at: chrono::DateTime::from_timestamp(1_700_000_000, 0).unwrap(),
            fields: vec![(Field::Email, Some(Scalar::Text("a@example.com".into())))],
            extras: vec![("k".into(), Some(serde_json::json!([1, 2])))],
            origin: Origin::Reconcile,
        };
        let batch = |revisions: &[u64]| BatchRecord {
            updates: revisions
                .iter()
                .map(|revision| UpdateRecord::new(*revision, &update))
                .collect(),
        };
        let revision = |revisions: &[u64]| last_revision(&batch(revisions).encode_to_vec());
        assert_eq!(revision(&[7, 8, 300_000]).unwrap(), Some(300_000));
        assert_eq!(revision(&[1]).unwrap(), Some(1));
        assert_eq!(revision(&[]).unwrap(), None);
        let mut cut = batch(&[5, 6]).encode_to_vec();
        cut.pop();
        assert!(last_revision(&cut).is_err());
        // Only the last update is read: one before it whose revision has the wrong wire type
        // (a length-delimited field 1) goes unread, the same as the last is refused.
        let wrong_revision = [0x0a, 0x02, 0x0a, 0x00];
        let with = |before: &[u64], odd: &[u8], after: &[u64]| {
            let mut payload = batch(before).encode_to_vec();
            payload.extend_from_slice(odd);
            payload.extend(batch(after).encode_to_vec());
            last_revision(&payload)
        };
        assert_eq!(with(&[7], &wrong_revision, &[9]).unwrap(), Some(9));
        let error = with(&[7], &wrong_revision, &[]).unwrap_err();
        assert!(error.0.contains("UpdateRecord.revision"), "{error}");
    }

    /// Groups (wire types 3 and 4) are skipped as prost skips them, nested or not, and refused
    /// where prost refuses them; found by the damaged-batch property, where one flipped byte
    /// turned a text field's key into `9, varint` and its length and first byte into an empty
    /// group (`33 34`), which prost skipped and this reader refused.
    #[test]
    fn groups_are_skipped_and_refused_as_prost_does() {
        let update = |extra: &[u8]| {
            let mut record = codec::UpdateRecord {
                revision: 3,
                client_id: "2155".into(),
                customer_id: "c".into(),
                ..Default::default()
            }
            .encode_to_vec();
            record.extend_from_slice(extra);
            let mut payload = vec![(1 << 3) | 2];
            prost::encoding::encode_varint(record.len() as u64, &mut payload);
            payload.extend_from_slice(&record);
            payload
        };
        let group = |tag: u8, inner: &[u8], end: u8| {
            let mut bytes = vec![(tag << 3) | 3];
            bytes.extend_from_slice(inner);
            bytes.push((end << 3) | 4);
            bytes
        };
        let cases = [
            ("empty", group(9, &[], 9)),
            (
                "with fields",
                group(9, &[(1 << 3), 5, (2 << 3) | 2, 1, b'x'], 9),
            ),
            ("nested", group(9, &group(10, &[(1 << 3), 1], 10), 9)),
            ("the wrong end", group(9, &[], 10)),
            ("no end", vec![(9 << 3) | 3, (1 << 3), 1]),
            ("an end alone", vec![(9 << 3) | 4]),
            ("nested past the limit", {
                let mut deep = Vec::new();
                for _ in 0..RECURSION_LIMIT {
                    deep = group(9, &deep, 9);
                }
                deep
            }),
        ];
        let mut accepted = 0;
        for (case, extra) in cases {
            let (by_prost, by_wire) = updates_both(&update(&extra), 0);
            accepted += usize::from(by_prost.is_ok());
            assert_eq!(by_wire.ok(), by_prost.ok(), "{case}");
        }
        assert_eq!(accepted, 3, "the first three are whole groups");
    }

    #[test]
    fn unknown_fields_are_skipped_and_one_account_shares_its_id() {
        let profiles: Vec<Profile> = (0..3)
            .map(|n| {
                let fields = [(
                    Field::Email,
                    Register {
                        at: chrono::DateTime::from_timestamp(1_700_000_000 + n, 0).unwrap(),
                        value: Some(Scalar::Text(format!("c{n}@example.com").into())),
                    },
                )];
                Profile::from_registers(
                    ProfileKey::new("2155", format!("c{n}")),
                    fields,
                    [],
                    1,
                    1,
                    1,
                )
            })
            .collect();
        let mut bytes = Vec::new();
        for profile in &profiles {
            let mut record = ProfileRecord::new(profile).encode_to_vec();
            // A field a newer build might add to ProfileRecord: tag 20, varint, and tag 21, bytes.
            record.extend_from_slice(&[20 << 3, 7, (21 << 3) | 2, 2, b'h', b'i']);
            bytes.push(1 << 3 | 2);
            prost::encoding::encode_varint(record.len() as u64, &mut bytes);
            bytes.extend_from_slice(&record);
        }
        let mut decoded = Vec::new();
        decode_batch(&bytes, &mut None, &mut decoded).unwrap();
        assert_eq!(decoded, profiles);
        assert!(arcstr::ArcStr::ptr_eq(
            &decoded[0].key.client_id,
            &decoded[2].key.client_id
        ));
    }

    #[test]
    fn a_field_key_of_tag_0_is_refused_as_prost_refuses_it() {
        use crate::journal::codec::BatchRecord;
        // Keys 0 to 7 (tag 0, any wire type) in one byte, and key 0 in two.
        let keys: Vec<Vec<u8>> = (0u8..8)
            .map(|key| vec![key])
            .chain([vec![0x80, 0]])
            .collect();
        for key in keys {
            let mut payload = key.clone();
            payload.extend_from_slice(&[0; 8]);
            assert!(ProfileBatch::decode(payload.as_slice()).is_err(), "{key:?}");
            assert!(BatchRecord::decode(payload.as_slice()).is_err(), "{key:?}");
            let profiles = decode_batch(&payload, &mut None, &mut Vec::new());
            assert!(profiles.unwrap_err().0.contains("out of range"), "{key:?}");
            assert!(decode_updates(&payload, 0, &mut None).is_err(), "{key:?}");
            assert!(last_revision(&payload).is_err(), "{key:?}");
        }
    }

    #[test]
    fn malformed_records_name_what_is_wrong() {
        // A ProfileRecord whose field record names a field number that does not exist.
        let bad_field = ProfileRecord {
            fields: vec![codec::FieldRecord {
                field: 99,
                value: None,
                at: Some(Default::default()),
            }],
            ..ProfileRecord::new(&Profile::empty(ProfileKey::new("a", "b")))
        };
        let batch = ProfileBatch {
            profiles: vec![bad_field],
        };
        let error = decode_batch(&batch.encode_to_vec(), &mut None, &mut Vec::new()).unwrap_err();
        assert_eq!(
            error.to_string(),
            "malformed record: unknown field number 99"
        );
        // Both forms of registers in one record.
        let register = Register {
            at: chrono::DateTime::from_timestamp(1_700_000_000, 0).unwrap(),
            value: Some(ScalarRef::Int(5)),
        };
        let key = ProfileKey::new("a", "b");
        let profile = Profile::from_register_refs(key, [(Field::TierOrder, register)], [], 1, 1, 1);
        let both = ProfileRecord {
            packed_registers: profile.packed_registers().to_vec(),
            ..ProfileRecord::with_field_records(&profile)
        };
        let packed_damaged = ProfileRecord {
            packed_registers: vec![1, 0, 0, 0, 0, 0, 0],
            ..ProfileRecord::new(&profile)
        };
        for (record, expected) in [
            (
                both,
                "a profile with both packed registers and field records",
            ),
            (packed_damaged, "packed registers that no profile packs to"),
        ] {
            let bytes = ProfileBatch {
                profiles: vec![record.clone()],
            }
            .encode_to_vec();
            let error = decode_batch(&bytes, &mut None, &mut Vec::new()).unwrap_err();
            assert_eq!(error.to_string(), format!("malformed record: {expected}"));
            assert_eq!(
                record.into_profile().unwrap_err().to_string(),
                error.to_string()
            );
        }
        // A field's clock cut short inside an update: prost refuses the batch, and so do we.
        let field = [0x08, 0x01, 0x22, 0x02, 0x08, 0x80];
        let mut update = vec![0x2a, field.len() as u8];
        update.extend_from_slice(&field);
        let mut batch = vec![0x0a, update.len() as u8];
        batch.extend_from_slice(&update);
        assert!(codec::BatchRecord::decode(batch.as_slice()).is_err());
        let error = decode_updates(&batch, 0, &mut None).unwrap_err();
        assert_eq!(
            error.to_string(),
            "malformed record: a varint that is cut short or too long"
        );
        // A length running past the end.
        let error = decode_batch(&[1 << 3 | 2, 50, 1], &mut None, &mut Vec::new()).unwrap_err();
        assert_eq!(
            error.to_string(),
            "malformed record: a length of 50 past the end"
        );
        // Text that is not UTF-8.
        let error = decode_batch(
            &[1 << 3 | 2, 3, 1 << 3 | 2, 1, 0xff],
            &mut None,
            &mut Vec::new(),
        )
        .unwrap_err();
        assert_eq!(
            error.to_string(),
            "malformed record: text that is not UTF-8"
        );
    }
}
