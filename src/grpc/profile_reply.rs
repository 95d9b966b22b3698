//! GetProfile's answer written straight from the stored profile: a `GetProfileResponse` on the
//! wire without building the generated `pb::Profile` first.
//!
//! The generated path unpacks the profile's registers, copies each text into its own `String`
//! (seven allocations), then prost walks that copy to encode it. [`ProfileReply`] unpacks once
//! and writes the same fields, in the same order and with the same presence rules as prost
//! writes `pb::GetProfileResponse`, from borrowed texts; the tests compare the bytes with the
//! generated message's for every kind of field. Extra attributes (rare) and `updated_at` are
//! converted by `convert` as before and encoded by prost.
//!
//! What it does not do: decode (it is only ever sent), find the profile (`super`), route the
//! method (`watch::ProfileServiceRoutes`).

use std::sync::Arc;

use prost::Message;
use prost::bytes::{Buf, BufMut};
use prost::encoding::{self, DecodeContext, WireType};

use super::convert;
use crate::profile::{Field, FieldValues, Profile};

/// A whole `GetProfileResponse` for one profile.
#[derive(Debug)]
pub struct ProfileReply {
    profile: Arc<Profile>,
    store_revision: u64,
    store_id: Arc<str>,
    /// `extra` and `updated_at`, converted once (both encoded sizes are needed twice).
    extra: Option<prost_types::Struct>,
    updated_at: Option<prost_types::Timestamp>,
    /// The encoded size of the `Profile` message, computed once.
    profile_len: usize,
}

impl ProfileReply {
    pub fn new(profile: Arc<Profile>, store_revision: u64, store_id: Arc<str>) -> Self {
        let mut reply = ProfileReply {
            extra: convert::extra(&profile),
            updated_at: profile.updated_at().map(convert::timestamp),
            profile,
            store_revision,
            store_id,
            profile_len: 0,
        };
        reply.profile_len = reply.profile_fields(&mut Counter(0)).0;
        reply
    }

    /// The profile answered.
    pub fn profile(&self) -> &Profile {
        &self.profile
    }

    /// Writes the answer's fields after the profile into `out`: the store revision and the
    /// store id it belongs to.
    fn answer_fields<'b, O: Out>(&self, out: &'b mut O) -> &'b mut O {
        out.uint64(2, self.store_revision);
        out.string(3, &self.store_id, false);
        out
    }

    /// Writes the `Profile` message's fields (prost's order and rules) into `out`.
    fn profile_fields<'b, O: Out>(&self, out: &'b mut O) -> &'b mut O {
        let profile = &*self.profile;
        let values: FieldValues<'_> = profile.values();
        out.string(1, &profile.key.client_id, false);
        out.string(2, &profile.key.customer_id, false);
        out.int64(
            3,
            values.int(Field::GbCustomerId).unwrap_or_default(),
            false,
        );
        for (tag, field) in [
            (4, Field::Email),
            (5, Field::MobileNumber),
            (6, Field::TierName),
        ] {
            if let Some(text) = values.text(field) {
                out.string(tag, text, true);
            }
        }
        // The webhook adapter only lets i32-range values into this field (as `convert`).
        if let Some(order) = values
            .int(Field::TierOrder)
            .and_then(|order| i32::try_from(order).ok())
        {
            out.int64(7, i64::from(order), true);
        }
        for (tag, field) in [(8, Field::ReferralCode), (9, Field::ReferralLink)] {
            if let Some(text) = values.text(field) {
                out.string(tag, text, true);
            }
        }
        for (tag, field) in [
            (10, Field::ActivatedPoints),
            (11, Field::PendingPoints),
            (12, Field::TotalPoints),
        ] {
            if let Some(value) = values.int(field) {
                out.int64(tag, value, true);
            }
        }
        if let Some(extra) = &self.extra {
            out.message(13, extra);
        }
        if let Some(updated_at) = &self.updated_at {
            out.message(14, updated_at);
        }
        out.uint64(15, profile.revision);
        out.uint64(16, profile.create_revision);
        out.uint64(17, profile.version);
        out
    }
}

/// Where the fields go: a size count or a buffer.
trait Out {
    /// A string field; `always` for proto3 `optional` (present even when empty).
    fn string(&mut self, tag: u32, value: &str, always: bool);
    /// An int64 or int32 field (int32 is written as its sign-extended int64).
    fn int64(&mut self, tag: u32, value: i64, always: bool);
    /// A uint64 field, left out when 0.
    fn uint64(&mut self, tag: u32, value: u64);
    fn message(&mut self, tag: u32, value: &impl Message);
}

struct Counter(usize);

impl Out for Counter {
    fn string(&mut self, tag: u32, value: &str, always: bool) {
        if always || !value.is_empty() {
            self.0 += encoding::key_len(tag)
                + encoding::encoded_len_varint(value.len() as u64)
                + value.len();
        }
    }

    fn int64(&mut self, tag: u32, value: i64, always: bool) {
        if always || value != 0 {
            self.0 += encoding::key_len(tag) + encoding::encoded_len_varint(value as u64);
        }
    }

    fn uint64(&mut self, tag: u32, value: u64) {
        if value != 0 {
            self.0 += encoding::key_len(tag) + encoding::encoded_len_varint(value);
        }
    }

    fn message(&mut self, tag: u32, value: &impl Message) {
        self.0 += encoding::message::encoded_len(tag, value);
    }
}

struct Writer<'a, B>(&'a mut B);

impl<B: BufMut> Out for Writer<'_, B> {
    fn string(&mut self, tag: u32, value: &str, always: bool) {
        if always || !value.is_empty() {
            encoding::encode_key(tag, WireType::LengthDelimited, self.0);
            encoding::encode_varint(value.len() as u64, self.0);
            self.0.put_slice(value.as_bytes());
        }
    }

    fn int64(&mut self, tag: u32, value: i64, always: bool) {
        if always || value != 0 {
            encoding::encode_key(tag, WireType::Varint, self.0);
            encoding::encode_varint(value as u64, self.0);
        }
    }

    fn uint64(&mut self, tag: u32, value: u64) {
        if value != 0 {
            encoding::encode_key(tag, WireType::Varint, self.0);
            encoding::encode_varint(value, self.0);
        }
    }

    fn message(&mut self, tag: u32, value: &impl Message) {
        encoding::message::encode(tag, value, self.0);
    }
}

impl Message for ProfileReply {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        // Field 1, the profile: always present in an answer.
        encoding::encode_key(1, WireType::LengthDelimited, buf);
        encoding::encode_varint(self.profile_len as u64, buf);
        self.profile_fields(&mut Writer(buf));
        self.answer_fields(&mut Writer(buf));
    }

    fn encoded_len(&self) -> usize {
        encoding::key_len(1)
            + encoding::encoded_len_varint(self.profile_len as u64)
            + self.profile_len
            + self.answer_fields(&mut Counter(0)).0
    }

    /// Never decoded: a reply is only sent. Skips whatever it is given.
    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        encoding::skip_field(wire_type, tag, buf, ctx)
    }

    fn clear(&mut self) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb;
    use crate::profile::{ExtraValue, ProfileKey, Register, Scalar};

    fn at(seconds: i64) -> chrono::DateTime<chrono::Utc> {
        chrono::DateTime::from_timestamp(seconds, 5).expect("a time")
    }

    fn generated(profile: &Arc<Profile>, store_revision: u64, store_id: &str) -> Vec<u8> {
        pb::GetProfileResponse {
            profile: Some(convert::profile(profile)),
            store_revision,
            store_id: store_id.to_owned(),
        }
        .encode_to_vec()
    }

    /// Encoded by hand as prost encodes the generated message, with a store id of each length
    /// class (none, one byte of length, two).
    fn assert_same_bytes(profile: Profile, store_revision: u64) {
        let profile = Arc::new(profile);
        for store_id in ["", "0123456789abcdef0123456789abcdef", &"s".repeat(200)] {
            let reply = ProfileReply::new(Arc::clone(&profile), store_revision, store_id.into());
            let bytes = reply.encode_to_vec();
            assert_eq!(bytes.len(), reply.encoded_len());
            let expected = generated(&profile, store_revision, store_id);
            assert_eq!(bytes, expected, "{profile:?} {store_id}");
        }
    }

    fn register(value: Option<Scalar>, seconds: i64) -> Register<Scalar> {
        Register {
            value,
            at: at(seconds),
        }
    }

    #[test]
    fn every_field_set_encodes_as_the_generated_message() {
        let text = |s: &str| Some(Scalar::Text(s.into()));
        let registers = [
            (Field::GbCustomerId, register(Some(Scalar::Int(42)), 10)),
            (Field::Email, register(text("a@example.com"), 11)),
            (Field::MobileNumber, register(text("+201000000000"), 12)),
            (Field::TierName, register(text("Gold ✨"), 13)),
            (Field::TierOrder, register(Some(Scalar::Int(-3)), 14)),
            (Field::ReferralCode, register(text("ABC"), 15)),
            (
                Field::ReferralLink,
                register(text("https://r.example/x"), 16),
            ),
            (Field::ActivatedPoints, register(Some(Scalar::Int(-7)), 17)),
            (Field::PendingPoints, register(Some(Scalar::Int(0)), 18)),
            (
                Field::TotalPoints,
                register(Some(Scalar::Int(i64::MAX)), 19),
            ),
        ];
        let profile = Profile::from_registers(
            ProfileKey::new("2155", "c-1"),
            registers,
            [],
            300,
            7,
            1 << 40,
        );
        assert_same_bytes(profile, 301);
    }

    #[test]
    fn cleared_empty_and_unset_fields_encode_as_the_generated_message() {
        let registers = [
            // Cleared: no value, a clock.
            (Field::Email, register(None, 10)),
            // Set to empty text: present in proto3 `optional`.
            (
                Field::MobileNumber,
                register(Some(Scalar::Text("".into())), 11),
            ),
            // Out of int32 range: left out, as `convert` does.
            (
                Field::TierOrder,
                register(Some(Scalar::Int(i64::from(i32::MAX) + 1)), 12),
            ),
            (Field::GbCustomerId, register(Some(Scalar::Int(0)), 13)),
        ];
        let profile =
            Profile::from_registers(ProfileKey::new("2155", "c-2"), registers, [], 1, 1, 1);
        assert_same_bytes(profile, 0);
        let empty = Profile::from_registers(ProfileKey::new("", ""), [], [], 0, 0, 0);
        assert_same_bytes(empty, 0);
    }

    #[test]
    fn extra_attributes_encode_as_the_generated_message() {
        let extra = |value: serde_json::Value, seconds| Register {
            value: Some(ExtraValue(value)),
            at: at(seconds),
        };
        let extras = [
            (
                Box::from("b"),
                extra(serde_json::json!({"nested": [1, "two", null, true]}), 20),
            ),
            (Box::from("a"), extra(serde_json::json!(1.5), 21)),
        ];
        let registers = [(Field::TotalPoints, register(Some(Scalar::Int(9)), 30))];
        let profile =
            Profile::from_registers(ProfileKey::new("2155", "c-3"), registers, extras, 5, 2, 3);
        assert_same_bytes(profile, 9);
    }
}
