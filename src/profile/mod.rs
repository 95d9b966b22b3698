//! The profile and its merge rules: a pure function of (current state, update).
//!
//! A profile is a set of last-writer-wins registers, one per field. Each register remembers the
//! value it holds (or that it was cleared) and the `created_at` of the webhook that wrote it. An
//! update writes a register only when it is newer; equal timestamps are broken by comparing the
//! values, so the register holds `max((at, value))`. That makes merging commutative, associative
//! and idempotent: any delivery order of the same updates, with duplicates, ends in the same
//! profile. Cleared fields keep their timestamp, so an older value cannot resurrect them.
//!
//! The store holds a million profiles or more, so a profile is kept compact: its modeled
//! fields' registers are packed into one allocation (`registers`), read back as borrowed
//! [`ScalarRef`]s, and the store gives the profiles of an account one shared `client_id`
//! string. The packing changes no rule: clocks keep chrono's exact seconds and nanoseconds, and
//! values compare as [`Scalar`]s do.
//!
//! - `key`: [`ProfileKey`].
//! - `field`: the field table ([`Field`]: names, kinds, numbers) and values ([`Scalar`],
//!   [`ScalarRef`], [`ExtraValue`], [`FieldPath`]).
//! - `merge`: the merge rules ([`Register`], [`Profile::merge`]).
//! - `limit`: how large an update may grow a profile's extras ([`check_growth`]).
//! - `registers`: the packed register codec.
//! - `change`: [`Change`], and the tier change and points delta derived from it.
//! - [`time`]: which instants are kept and served (no leap seconds, years 1 to 9999).
//! - here: [`Profile`] and [`ProfileUpdate`].
//!
//! This module does not know where updates come from (the ingest path builds them), nor
//! assigns revisions (only the sequencer does), nor stores anything.

mod change;
mod field;
mod key;
mod limit;
mod merge;
mod registers;
#[cfg(test)]
mod testing;
pub mod time;

use std::collections::BTreeMap;
use std::fmt;

use chrono::{DateTime, Utc};

pub use change::{
    Change, ChangeKind, ChangedFields, Origin, PointsDelta, TierChange, TierDirection,
};
pub use field::{ExtraValue, Field, FieldKind, FieldPath, Scalar, ScalarRef};
pub use key::{MAX_CLIENT_ID_BYTES, MAX_CUSTOMER_ID_BYTES, ProfileKey};
pub use limit::{MAX_EXTRAS_JSON_BYTES, TooLarge, check_growth};
pub use merge::Register;
use registers::{Clock, Registers, Slot, Slots};

/// When Gameball created the event that carried a value: the clock of every register. What the
/// ingest path lets in is within [`time`]'s rule.
pub type EventTime = DateTime<Utc>;

/// A modeled field's register as a snapshot stores it: its value, borrowed, and its time as
/// a protobuf `Timestamp` holds it (seconds since the epoch, nanoseconds within the second).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StampedRef<'a> {
    /// The value; `None` when the newest write cleared the field.
    pub value: Option<ScalarRef<'a>>,
    /// Seconds since the epoch.
    pub seconds: i64,
    /// Nanoseconds within the second (10^9 and more: a leap second).
    pub nanos: u32,
}

/// The registers of unmodeled `data` keys, ordered by key.
type Extras = BTreeMap<Box<str>, Register<ExtraValue>>;

/// A validated update: a `customer.profile.updated` event, or a customer read back from
/// Gameball's API (`origin`): which profile, when, and what it writes.
///
/// `None` values clear the field (the webhook carried JSON `null`).
#[derive(Clone, Debug, PartialEq)]
pub struct ProfileUpdate {
    /// The profile it is about.
    pub key: ProfileKey,
    /// `created_at` of the webhook.
    pub at: EventTime,
    /// Modeled fields it carries, each at most once.
    pub fields: Vec<(Field, Option<Scalar>)>,
    /// Unmodeled `data` keys it carries, each at most once.
    pub extras: Vec<(Box<str>, Option<serde_json::Value>)>,
    /// What produced it; the merge ignores it.
    pub origin: Origin,
}

/// The state of one profile: its registers plus the revision bookkeeping the sequencer keeps.
///
/// Compact, because the store holds a million of them: the modeled fields' registers are packed
/// into one allocation (`registers::Registers`), extras (which most profiles lack) sit behind
/// one pointer, and the store gives all profiles of an account one shared `client_id`. Cloning
/// costs one allocation (two with extras).
#[derive(Clone, PartialEq)]
pub struct Profile {
    /// Which profile this is.
    pub key: ProfileKey,
    /// The modeled fields' registers, packed.
    registers: Registers,
    /// Registers of unmodeled `data` keys; `None` when there are none (never an empty map, so
    /// equal content compares equal).
    extra: Option<Box<Extras>>,
    /// Revision of the last change to this profile.
    pub revision: u64,
    /// Revision of the change that created this profile.
    pub create_revision: u64,
    /// How many changes were applied to this profile.
    pub version: u64,
}

impl fmt::Debug for Profile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Profile")
            .field("key", &self.key)
            .field("fields", &self.field_registers().collect::<Vec<_>>())
            .field("extra", &self.extra_registers().collect::<Vec<_>>())
            .field("revision", &self.revision)
            .field("create_revision", &self.create_revision)
            .field("version", &self.version)
            .finish()
    }
}

/// Every modeled field's current value, unpacked once ([`Profile::values`]).
#[derive(Clone, Copy, Debug)]
pub struct FieldValues<'a>([Option<ScalarRef<'a>>; Field::ALL.len()]);

impl<'a> FieldValues<'a> {
    /// The current value of a field; `None` when unset or cleared.
    pub fn get(&self, field: Field) -> Option<ScalarRef<'a>> {
        self.0[field.index()]
    }

    /// The current integer value of an integer field.
    pub fn int(&self, field: Field) -> Option<i64> {
        self.get(field).and_then(ScalarRef::as_int)
    }

    /// The current text value of a text field.
    pub fn text(&self, field: Field) -> Option<&'a str> {
        self.get(field).and_then(ScalarRef::as_text)
    }
}

impl Profile {
    /// An empty profile (no field ever written), not yet in any revision.
    ///
    /// The key is kept as given; the store gives it its account's shared `client_id`
    /// ([`crate::store::Store::shared_key`]).
    pub fn empty(key: ProfileKey) -> Self {
        Self {
            key,
            registers: Registers::default(),
            extra: None,
            revision: 0,
            create_revision: 0,
            version: 0,
        }
    }

    /// Every modeled field's current value. Cheaper than a `get` per field when reading several
    /// (each `get` unpacks the registers).
    pub fn values(&self) -> FieldValues<'_> {
        FieldValues(
            self.registers
                .unpack()
                .map(|slot| slot.and_then(|slot| slot.value)),
        )
    }

    /// The current value of a modeled field; `None` when unset or cleared.
    pub fn get(&self, field: Field) -> Option<ScalarRef<'_>> {
        self.registers.unpack()[field.index()]?.value
    }

    /// The current integer value of an integer field.
    pub fn get_int(&self, field: Field) -> Option<i64> {
        self.get(field).and_then(ScalarRef::as_int)
    }

    /// The current text value of a text field.
    pub fn get_text(&self, field: Field) -> Option<&str> {
        self.get(field).and_then(ScalarRef::as_text)
    }

    /// The extras currently set (cleared keys left out), ordered by key.
    pub fn extras(&self) -> impl Iterator<Item = (&str, &serde_json::Value)> {
        self.extra_registers()
            .filter_map(|(key, register)| Some((key, &register.value.as_ref()?.0)))
    }

    /// The registers of modeled fields ever written (cleared ones included), in field order.
    pub fn field_registers(&self) -> impl Iterator<Item = (Field, Register<ScalarRef<'_>>)> {
        Field::ALL
            .into_iter()
            .zip(self.registers.unpack())
            .filter_map(|(field, slot)| {
                let slot = slot?;
                let register = Register {
                    value: slot.value,
                    at: slot.at.time(),
                };
                Some((field, register))
            })
    }

    /// The registers of extra keys ever written (cleared ones included), ordered by key.
    pub fn extra_registers(&self) -> impl Iterator<Item = (&str, &Register<ExtraValue>)> {
        self.extra
            .iter()
            .flat_map(|extra| extra.iter())
            .map(|(key, register)| (&**key, register))
    }

    /// Rebuilds a profile from its registers and bookkeeping, as [`Profile::field_registers`]
    /// and [`Profile::extra_registers`] gave them (the journal's snapshots).
    pub fn from_registers(
        key: ProfileKey,
        fields: impl IntoIterator<Item = (Field, Register<Scalar>)>,
        extras: impl IntoIterator<Item = (Box<str>, Register<ExtraValue>)>,
        revision: u64,
        create_revision: u64,
        version: u64,
    ) -> Profile {
        let fields: Vec<(Field, Register<Scalar>)> = fields.into_iter().collect();
        let borrowed = fields.iter().map(|(field, register)| {
            let value = register.value.as_ref().map(Scalar::view);
            (
                *field,
                Register {
                    at: register.at,
                    value,
                },
            )
        });
        Profile::from_register_refs(key, borrowed, extras, revision, create_revision, version)
    }

    /// [`Profile::from_register_refs`] from registers whose times are still a protobuf
    /// `Timestamp`'s seconds and nanoseconds (a snapshot's, read straight from its bytes): the
    /// clocks are stored as they are rather than made into dates and back. A time chrono
    /// cannot hold refuses the profile, with its field and seconds.
    pub fn from_stamped_refs<'a>(
        key: ProfileKey,
        fields: impl IntoIterator<Item = (Field, StampedRef<'a>)>,
        extras: impl IntoIterator<Item = (Box<str>, Register<ExtraValue>)>,
        revision: u64,
        create_revision: u64,
        version: u64,
    ) -> Result<Profile, (Field, i64)> {
        let mut slots: Slots<'a> = [None; Field::ALL.len()];
        for (field, stamped) in fields {
            let at = Clock::from_timestamp(stamped.seconds, stamped.nanos)
                .ok_or((field, stamped.seconds))?;
            slots[field.index()] = Some(Slot {
                at,
                value: stamped.value,
            });
        }
        let bookkeeping = (revision, create_revision, version);
        Ok(Profile::from_slots(key, &slots, extras, bookkeeping))
    }

    /// The modeled fields' registers in their packed form: what a snapshot stores, so that
    /// loading it is a check and a copy instead of a field-by-field decode. The layout is this
    /// module's (`registers::Registers`); only [`Profile::from_packed`] reads it back.
    pub fn packed_registers(&self) -> &[u8] {
        &self.registers.0
    }

    /// The profile of `key` whose modeled registers are `packed`, as
    /// [`Profile::packed_registers`] gave them; `None` unless `packed` is exactly what that
    /// gives for some registers (damaged or foreign bytes are refused, never trusted).
    pub fn from_packed(
        key: ProfileKey,
        packed: &[u8],
        extras: impl IntoIterator<Item = (Box<str>, Register<ExtraValue>)>,
        (revision, create_revision, version): (u64, u64, u64),
    ) -> Option<Profile> {
        let registers = Registers::from_packed(packed)?;
        let mut profile = Profile::from_slots(
            key,
            &[None; Field::ALL.len()],
            extras,
            (revision, create_revision, version),
        );
        profile.registers = registers;
        Some(profile)
    }

    /// [`Profile::from_registers`] from borrowed values: a snapshot's profiles are packed
    /// straight from the bytes they were read into. A field given twice keeps the later
    /// register.
    pub fn from_register_refs<'a>(
        key: ProfileKey,
        fields: impl IntoIterator<Item = (Field, Register<ScalarRef<'a>>)>,
        extras: impl IntoIterator<Item = (Box<str>, Register<ExtraValue>)>,
        revision: u64,
        create_revision: u64,
        version: u64,
    ) -> Profile {
        let mut slots: Slots<'a> = [None; Field::ALL.len()];
        for (field, register) in fields {
            slots[field.index()] = Some(Slot {
                at: Clock::of(register.at),
                value: register.value,
            });
        }
        Profile::from_slots(key, &slots, extras, (revision, create_revision, version))
    }

    /// The profile of `key` holding `slots` and `extras`, with its `(revision,
    /// create_revision, version)`.
    fn from_slots(
        key: ProfileKey,
        slots: &Slots<'_>,
        extras: impl IntoIterator<Item = (Box<str>, Register<ExtraValue>)>,
        (revision, create_revision, version): (u64, u64, u64),
    ) -> Profile {
        let mut profile = Profile::empty(key);
        profile.registers = Registers::pack(slots);
        let extra: Extras = extras.into_iter().collect();
        profile.extra = (!extra.is_empty()).then(|| Box::new(extra));
        profile.revision = revision;
        profile.create_revision = create_revision;
        profile.version = version;
        profile
    }

    /// The newest `created_at` among the registers, cleared ones included: when this profile's
    /// content last changed at the source. Independent of delivery order.
    pub fn updated_at(&self) -> Option<EventTime> {
        let fields = self.registers.newest().map(Clock::time);
        let extras = self.extra_registers().map(|(_, register)| register.at);
        fields.into_iter().chain(extras).max()
    }

    /// About how many bytes of memory this profile holds: itself, its customer id, its
    /// packed registers and its extras (their JSON values estimated from their structure).
    /// The account's `client_id` is shared by its profiles and not counted. An estimate for
    /// memory bounds (the watch history's `--history-bytes`), not an exact allocator figure.
    pub fn memory_bytes(&self) -> usize {
        let extras = self.extra.as_deref().map_or(0, |extras| {
            extras
                .iter()
                .map(|(key, register)| {
                    let value = register.value.as_ref().map_or(0, |v| json_bytes(&v.0));
                    // A B-tree entry: the key's box, the register, and the node's share.
                    key.len() + std::mem::size_of::<Register<ExtraValue>>() + 16 + value
                })
                .sum::<usize>()
        });
        std::mem::size_of::<Profile>()
            + self.key.customer_id.len()
            + self.registers.0.len()
            + extras
    }

    /// Whether two profiles hold the same content, revision bookkeeping aside.
    pub fn same_content(&self, other: &Profile) -> bool {
        self.key == other.key && self.registers == other.registers && self.extra == other.extra
    }
}

/// About how many heap bytes a JSON value holds beyond its own `Value` slot.
fn json_bytes(value: &serde_json::Value) -> usize {
    use serde_json::Value;
    const SLOT: usize = std::mem::size_of::<Value>();
    match value {
        Value::Null | Value::Bool(_) | Value::Number(_) => 0,
        Value::String(text) => text.len(),
        Value::Array(items) => items.iter().map(|item| SLOT + json_bytes(item)).sum(),
        // An entry of a map: key, value slot and the map's own bookkeeping.
        Value::Object(entries) => entries
            .iter()
            .map(|(key, item)| key.len() + SLOT + 48 + json_bytes(item))
            .sum(),
    }
}
