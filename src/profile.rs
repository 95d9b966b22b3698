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
//! fields' registers are packed into one allocation (see `Registers`), read back as borrowed
//! [`ScalarRef`]s, and accounts share one `client_id` string. The packing changes no rule: clocks
//! keep chrono's exact seconds and nanoseconds, and values compare as [`Scalar`]s do.
//!
//! This module does not know where updates come from (the webhook adapter builds them), nor
//! assigns revisions (only the sequencer does), nor stores anything.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::sync::{Arc, LazyLock, Mutex, PoisonError};

use chrono::{DateTime, Utc};

/// When Gameball created the event that carried a value: the clock of every register.
pub type EventTime = DateTime<Utc>;

/// Identifies a profile: the Gameball account and the integrator's own customer id.
///
/// The strings are reference counted, so cloning a key (the store keeps it in two places) costs
/// two counter increments, not two allocations.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ProfileKey {
    /// Gameball account (`client_id`).
    pub client_id: Arc<str>,
    /// The integrator's id of the customer (`customer_id`).
    pub customer_id: Arc<str>,
}

impl ProfileKey {
    /// Builds a key from its two parts.
    pub fn new(client_id: impl Into<Arc<str>>, customer_id: impl Into<Arc<str>>) -> Self {
        Self {
            client_id: client_id.into(),
            customer_id: customer_id.into(),
        }
    }
}

impl fmt::Debug for ProfileKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.client_id, self.customer_id)
    }
}

/// The fields this version models, besides the key. Anything else Gameball sends in `data`
/// lands in [`Profile::extra`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Field {
    /// Gameball's internal customer id (top level of every webhook).
    GbCustomerId,
    /// `data.email`.
    Email,
    /// `data.mobile_number`.
    MobileNumber,
    /// `data.tier_name`.
    TierName,
    /// `data.tier_order`.
    TierOrder,
    /// `data.referral_code`.
    ReferralCode,
    /// `data.referral_link`.
    ReferralLink,
    /// `data.activated_points`.
    ActivatedPoints,
    /// `data.pending_points`.
    PendingPoints,
    /// `data.total_points`.
    TotalPoints,
}

/// What values a modeled field takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FieldKind {
    /// A string.
    Text,
    /// An integer that fits `i32`.
    Int32,
    /// An integer that fits `i64`.
    Int64,
}

impl Field {
    /// Every modeled field, in the order of the `Profile` message.
    pub const ALL: [Field; 10] = [
        Field::GbCustomerId,
        Field::Email,
        Field::MobileNumber,
        Field::TierName,
        Field::TierOrder,
        Field::ReferralCode,
        Field::ReferralLink,
        Field::ActivatedPoints,
        Field::PendingPoints,
        Field::TotalPoints,
    ];

    /// The field's name, as in the webhook's `data` and the gRPC `Profile` message.
    pub fn name(self) -> &'static str {
        match self {
            Field::GbCustomerId => "gb_customer_id",
            Field::Email => "email",
            Field::MobileNumber => "mobile_number",
            Field::TierName => "tier_name",
            Field::TierOrder => "tier_order",
            Field::ReferralCode => "referral_code",
            Field::ReferralLink => "referral_link",
            Field::ActivatedPoints => "activated_points",
            Field::PendingPoints => "pending_points",
            Field::TotalPoints => "total_points",
        }
    }

    /// The field with this name, if it is modeled.
    pub fn from_name(name: &str) -> Option<Field> {
        Field::ALL.into_iter().find(|field| field.name() == name)
    }

    /// What values the field takes.
    pub fn kind(self) -> FieldKind {
        match self {
            Field::Email
            | Field::MobileNumber
            | Field::TierName
            | Field::ReferralCode
            | Field::ReferralLink => FieldKind::Text,
            Field::TierOrder => FieldKind::Int32,
            Field::GbCustomerId
            | Field::ActivatedPoints
            | Field::PendingPoints
            | Field::TotalPoints => FieldKind::Int64,
        }
    }

    /// The field's number in the `Profile` message: a stable id for stored data.
    pub fn number(self) -> u32 {
        match self {
            Field::GbCustomerId => 3,
            Field::Email => 4,
            Field::MobileNumber => 5,
            Field::TierName => 6,
            Field::TierOrder => 7,
            Field::ReferralCode => 8,
            Field::ReferralLink => 9,
            Field::ActivatedPoints => 10,
            Field::PendingPoints => 11,
            Field::TotalPoints => 12,
        }
    }

    /// The field with this `Profile` message number.
    pub fn from_number(number: u32) -> Option<Field> {
        Field::ALL
            .into_iter()
            .find(|field| field.number() == number)
    }

    /// Whether the field is one of the three points balances.
    pub fn is_points(self) -> bool {
        matches!(
            self,
            Field::ActivatedPoints | Field::PendingPoints | Field::TotalPoints
        )
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// A value of a modeled field. Ordered (integers before text), which breaks timestamp ties.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scalar {
    /// An integer field's value (range checked against the field's kind by whoever builds it).
    Int(i64),
    /// A text field's value.
    Text(Box<str>),
}

impl Scalar {
    /// The integer, if this is one.
    pub fn as_int(&self) -> Option<i64> {
        match self {
            Scalar::Int(value) => Some(*value),
            Scalar::Text(_) => None,
        }
    }

    /// The text, if this is text.
    pub fn as_text(&self) -> Option<&str> {
        match self {
            Scalar::Text(value) => Some(value),
            Scalar::Int(_) => None,
        }
    }

    /// The value, borrowed.
    pub fn view(&self) -> ScalarRef<'_> {
        match self {
            Scalar::Int(value) => ScalarRef::Int(*value),
            Scalar::Text(value) => ScalarRef::Text(value),
        }
    }
}

/// A modeled field's value borrowed from a profile (which keeps its values packed, not as
/// [`Scalar`]s). Ordered exactly like [`Scalar`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ScalarRef<'a> {
    /// An integer field's value.
    Int(i64),
    /// A text field's value.
    Text(&'a str),
}

impl<'a> ScalarRef<'a> {
    /// The integer, if this is one.
    pub fn as_int(self) -> Option<i64> {
        match self {
            ScalarRef::Int(value) => Some(value),
            ScalarRef::Text(_) => None,
        }
    }

    /// The text, if this is text.
    pub fn as_text(self) -> Option<&'a str> {
        match self {
            ScalarRef::Text(value) => Some(value),
            ScalarRef::Int(_) => None,
        }
    }

    /// An owned copy.
    pub fn to_scalar(self) -> Scalar {
        match self {
            ScalarRef::Int(value) => Scalar::Int(value),
            ScalarRef::Text(value) => Scalar::Text(value.into()),
        }
    }
}

/// A value of an unmodeled `data` field, kept as the JSON Gameball sent.
///
/// Ordered by its compact JSON text: timestamp ties between two different extras are broken by
/// that order, which is total and the same on every replica.
#[derive(Clone, Debug, PartialEq)]
pub struct ExtraValue(pub serde_json::Value);

impl ExtraValue {
    fn sort_key(&self) -> String {
        self.0.to_string()
    }
}

/// One last-writer-wins register: the value (or `None` once cleared) and when it was written.
///
/// Extras are kept as `Register<ExtraValue>`; modeled fields are packed inside the profile and
/// read out as `Register<ScalarRef>` ([`Profile::field_registers`]) or rebuilt from
/// `Register<Scalar>` ([`Profile::from_registers`]).
#[derive(Clone, Debug, PartialEq)]
pub struct Register<T> {
    /// The current value; `None` when the newest write cleared the field.
    pub value: Option<T>,
    /// `created_at` of the webhook that wrote the current value.
    pub at: EventTime,
}

/// Decides whether a write `(at, value)` beats a register's current `(at, value)` content
/// (`None`: never written).
///
/// The winner is the larger `(at, value)` pair with `None` (cleared) below every value, so the
/// outcome does not depend on the order writes arrive in. `cmp_values` orders two values.
fn beats<C: Ord, T>(
    current: Option<(&C, Option<&T>)>,
    at: &C,
    value: Option<&T>,
    cmp_values: impl Fn(&T, &T) -> std::cmp::Ordering,
) -> bool {
    use std::cmp::Ordering;
    let Some((current_at, current_value)) = current else {
        return true;
    };
    match at.cmp(current_at) {
        Ordering::Greater => true,
        Ordering::Less => false,
        Ordering::Equal => match (value, current_value) {
            (None, _) => false,
            (Some(_), None) => true,
            (Some(new), Some(old)) => cmp_values(new, old) == Ordering::Greater,
        },
    }
}

/// A register's clock as the profile stores it: seconds since the epoch and the nanoseconds
/// within that second, exactly as chrono gives them.
///
/// Every [`EventTime`] converts to a clock and back unchanged (the whole chrono range, which an
/// `i64` of nanoseconds would not cover), and clocks order exactly like the times they came from:
/// chrono orders by (date, second of day, nanoseconds), which is the order of (seconds since the
/// epoch, nanoseconds). A leap second keeps its nanoseconds of 10^9 and more in the 59th second,
/// so it sorts after every other instant of that second and before the next one, as in chrono.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Clock {
    secs: i64,
    nanos: u32,
}

impl Clock {
    /// Bytes of a clock in the packed registers.
    const LEN: usize = 12;

    fn of(at: EventTime) -> Clock {
        Clock {
            secs: at.timestamp(),
            nanos: at.timestamp_subsec_nanos(),
        }
    }

    fn time(self) -> EventTime {
        // Clocks are only made from `EventTime`s (`Clock::of`), and those convert back.
        DateTime::from_timestamp(self.secs, self.nanos)
            .expect("a clock converts back to the time it was taken from")
    }
}

/// One modeled field's register, unpacked: borrowed from the packed bytes or from an update.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Slot<'a> {
    at: Clock,
    value: Option<ScalarRef<'a>>,
}

/// Every modeled field's register, indexed by `Field as usize`; `None` = never written.
type Slots<'a> = [Option<Slot<'a>>; Field::ALL.len()];

/// The modeled fields' registers packed into one allocation (none while nothing was written).
///
/// A profile used to hold ten `Option<Register<Scalar>>` of 40 bytes each plus one allocation
/// per text value; most of it was padding and pointers. The packed form holds the same
/// registers in about a third of the memory, and cloning it is one allocation. The bytes:
///
/// ```text
/// written  u16 LE   bit i: field i's register was ever written
/// cleared  u16 LE   bit i: it holds no value (the newest write cleared it)
/// text     u16 LE   bit i: its value is text (else an integer)
/// clocks   u8 n, then n distinct clocks (i64 LE seconds, u32 LE nanoseconds), in order of
///          first use by the registers in field order
/// then per written register, in field order:
///          u8 index of its clock
///          unless cleared: an integer as zigzag LEB128, or text as LEB128 length and UTF-8
/// ```
///
/// Registers written by one webhook share a clock, so a profile usually stores one or two.
/// The encoding is canonical (one byte string per content), so comparing bytes compares
/// registers. Only [`Registers::pack`] writes the bytes, and unpacking relies on that.
#[derive(Clone, Default, PartialEq, Eq)]
struct Registers(Box<[u8]>);

impl Registers {
    /// Bytes before the clock table: the three masks and the table's length.
    const HEADER: usize = 7;

    fn pack(slots: &Slots<'_>) -> Registers {
        let (mut written, mut cleared, mut text) = (0u16, 0u16, 0u16);
        let mut clocks = [Clock { secs: 0, nanos: 0 }; Field::ALL.len()];
        let mut clock_count = 0;
        let mut len = Self::HEADER;
        for (index, slot) in slots.iter().enumerate() {
            let Some(slot) = slot else { continue };
            let bit = 1 << index;
            written |= bit;
            if !clocks[..clock_count].contains(&slot.at) {
                clocks[clock_count] = slot.at;
                clock_count += 1;
                len += Clock::LEN;
            }
            len += 1;
            match slot.value {
                None => cleared |= bit,
                Some(ScalarRef::Int(value)) => len += varint_len(zigzag(value)),
                Some(ScalarRef::Text(value)) => {
                    text |= bit;
                    len += varint_len(value.len() as u64) + value.len();
                }
            }
        }
        if written == 0 {
            return Registers::default();
        }
        let mut out = Vec::with_capacity(len);
        out.extend_from_slice(&written.to_le_bytes());
        out.extend_from_slice(&cleared.to_le_bytes());
        out.extend_from_slice(&text.to_le_bytes());
        out.push(clock_count as u8);
        for clock in &clocks[..clock_count] {
            out.extend_from_slice(&clock.secs.to_le_bytes());
            out.extend_from_slice(&clock.nanos.to_le_bytes());
        }
        for slot in slots.iter().flatten() {
            let clock = clocks[..clock_count]
                .iter()
                .position(|clock| *clock == slot.at)
                .expect("every register's clock is in the table");
            out.push(clock as u8);
            match slot.value {
                None => {}
                Some(ScalarRef::Int(value)) => put_varint(&mut out, zigzag(value)),
                Some(ScalarRef::Text(value)) => {
                    put_varint(&mut out, value.len() as u64);
                    out.extend_from_slice(value.as_bytes());
                }
            }
        }
        debug_assert_eq!(out.len(), len, "packed length computed ahead");
        Registers(out.into_boxed_slice())
    }

    fn unpack(&self) -> Slots<'_> {
        let mut slots = [None; Field::ALL.len()];
        if self.0.is_empty() {
            return slots;
        }
        let mut bytes = Reader(&self.0);
        let written = bytes.u16();
        let cleared = bytes.u16();
        let text = bytes.u16();
        let clock_count = usize::from(bytes.u8());
        let clocks = bytes.take(clock_count * Clock::LEN);
        for (index, slot) in slots.iter_mut().enumerate() {
            let bit = 1 << index;
            if written & bit == 0 {
                continue;
            }
            let at = Reader(&clocks[usize::from(bytes.u8()) * Clock::LEN..]).clock();
            let value = if cleared & bit != 0 {
                None
            } else if text & bit != 0 {
                let len = usize::try_from(bytes.varint()).expect("a text length fits usize");
                let text = std::str::from_utf8(bytes.take(len))
                    .expect("packed text is the UTF-8 it was packed from");
                Some(ScalarRef::Text(text))
            } else {
                Some(ScalarRef::Int(unzigzag(bytes.varint())))
            };
            *slot = Some(Slot { at, value });
        }
        slots
    }

    /// The newest clock of any register.
    fn newest(&self) -> Option<Clock> {
        if self.0.is_empty() {
            return None;
        }
        let count = usize::from(self.0[Self::HEADER - 1]);
        let clocks = &self.0[Self::HEADER..Self::HEADER + count * Clock::LEN];
        clocks
            .chunks_exact(Clock::LEN)
            .map(|clock| Reader(clock).clock())
            .max()
    }
}

/// Reads the packed registers front to back. The bytes were written by [`Registers::pack`], so
/// running short of them is a bug, not bad input.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, len: usize) -> &'a [u8] {
        let (taken, rest) = self.0.split_at(len);
        self.0 = rest;
        taken
    }

    fn array<const N: usize>(&mut self) -> [u8; N] {
        self.take(N).try_into().expect("took N bytes")
    }

    fn u8(&mut self) -> u8 {
        u8::from_le_bytes(self.array())
    }

    fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.array())
    }

    fn clock(&mut self) -> Clock {
        Clock {
            secs: i64::from_le_bytes(self.array()),
            nanos: u32::from_le_bytes(self.array()),
        }
    }

    fn varint(&mut self) -> u64 {
        let mut value = 0u64;
        let mut shift = 0;
        loop {
            let byte = self.u8();
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return value;
            }
            shift += 7;
        }
    }
}

// Zigzag maps small negative and positive integers alike to small unsigned ones (LEB128 then
// stores points balances and tier orders in one to three bytes instead of eight).
fn zigzag(value: i64) -> u64 {
    ((value << 1) ^ (value >> 63)) as u64
}

fn unzigzag(value: u64) -> i64 {
    ((value >> 1) as i64) ^ -((value & 1) as i64)
}

fn varint_len(value: u64) -> usize {
    (u64::BITS - value.leading_zeros()).div_ceil(7).max(1) as usize
}

fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8 & 0x7f) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// The registers of unmodeled `data` keys, ordered by key.
type Extras = BTreeMap<Box<str>, Register<ExtraValue>>;

/// Gives `client_id` the process's one shared copy of that string.
///
/// Every profile of an account has the same `client_id`; sharing one `Arc<str>` per account
/// instead of one per profile saves its allocation (32 bytes) per profile. The set only grows,
/// by the accounts that own a profile; profiles are never removed, so it never holds more than
/// the store does.
fn shared_client_id(client_id: Arc<str>) -> Arc<str> {
    static CLIENT_IDS: LazyLock<Mutex<HashSet<Arc<str>>>> = LazyLock::new(Mutex::default);
    // A panic elsewhere while holding the lock cannot leave the set half-changed.
    let mut ids = CLIENT_IDS.lock().unwrap_or_else(PoisonError::into_inner);
    match ids.get(&*client_id) {
        Some(shared) => Arc::clone(shared),
        None => {
            ids.insert(Arc::clone(&client_id));
            client_id
        }
    }
}

/// A field an update writes: a modeled field or an extra `data` key.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FieldPath {
    /// A modeled field.
    Field(Field),
    /// An unmodeled `data` key.
    Extra(Box<str>),
}

impl fmt::Display for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FieldPath::Field(field) => f.write_str(field.name()),
            FieldPath::Extra(key) => write!(f, "extra.{key}"),
        }
    }
}

/// A validated `customer.profile.updated` event: which profile, when, and what it writes.
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
}

/// The state of one profile: its registers plus the revision bookkeeping the sequencer keeps.
///
/// Compact, because the store holds a million of them: the modeled fields' registers are packed
/// into one allocation ([`Registers`]), extras (which most profiles lack) sit behind one
/// pointer, and the key's `client_id` is shared by all profiles of an account. Cloning costs one
/// allocation (two with extras).
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
    /// Its key's `client_id` becomes the copy shared by all profiles of the account.
    pub fn empty(key: ProfileKey) -> Self {
        Self {
            key: ProfileKey {
                client_id: shared_client_id(key.client_id),
                customer_id: key.customer_id,
            },
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
        let mut profile = Profile::empty(key);
        let fields: Vec<(Field, Register<Scalar>)> = fields.into_iter().collect();
        let mut slots: Slots<'_> = [None; Field::ALL.len()];
        for (field, register) in &fields {
            slots[field.index()] = Some(Slot {
                at: Clock::of(register.at),
                value: register.value.as_ref().map(Scalar::view),
            });
        }
        profile.registers = Registers::pack(&slots);
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

    /// Whether two profiles hold the same content, revision bookkeeping aside.
    pub fn same_content(&self, other: &Profile) -> bool {
        self.key == other.key && self.registers == other.registers && self.extra == other.extra
    }

    /// Merges an update into this profile's content.
    ///
    /// Returns `None` when the profile is exactly as before (a duplicate, or an update older
    /// than every field it carries). Otherwise returns the fields whose visible value changed,
    /// sorted: it may be empty when a newer webhook only repeated the values it holds, which
    /// still moves their clocks (and `updated_at`). The clock move must be kept: without it an
    /// update between the two timestamps would win in one delivery order and lose in another.
    ///
    /// Only content changes: revision, create_revision and version are the sequencer's to set.
    pub fn merge(&mut self, update: &ProfileUpdate) -> Option<Vec<FieldPath>> {
        debug_assert_eq!(
            self.key, update.key,
            "an update merged into another profile"
        );
        let mut wrote = false;
        let mut changed = Vec::new();
        if !update.fields.is_empty() {
            let at = Clock::of(update.at);
            let mut slots = self.registers.unpack();
            let mut wrote_fields = false;
            for (field, value) in &update.fields {
                let value = value.as_ref().map(Scalar::view);
                let slot = &mut slots[field.index()];
                let current = slot.as_ref().map(|slot| (&slot.at, slot.value.as_ref()));
                if beats(current, &at, value.as_ref(), Ord::cmp) {
                    wrote_fields = true;
                    if slot.map(|slot| slot.value) != Some(value) {
                        changed.push(FieldPath::Field(*field));
                    }
                    *slot = Some(Slot { at, value });
                }
            }
            if wrote_fields {
                wrote = true;
                self.registers = Registers::pack(&slots);
            }
        }
        for (key, value) in &update.extras {
            let value = value.clone().map(ExtraValue);
            let current = self.extra.as_ref().and_then(|extra| extra.get(key));
            let by_text = |new: &ExtraValue, old: &ExtraValue| new.sort_key().cmp(&old.sort_key());
            let current_register = current.map(|register| (&register.at, register.value.as_ref()));
            if beats(current_register, &update.at, value.as_ref(), by_text) {
                wrote = true;
                if current.map(|register| &register.value) != Some(&value) {
                    changed.push(FieldPath::Extra(key.clone()));
                }
                self.extra.get_or_insert_default().insert(
                    key.clone(),
                    Register {
                        value,
                        at: update.at,
                    },
                );
            }
        }
        changed.sort();
        wrote.then_some(changed)
    }
}

/// How a tier moved, judged by `tier_order`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TierDirection {
    /// One side has no tier order.
    Unknown,
    /// To a higher order.
    Up,
    /// To a lower order.
    Down,
    /// Same order (for example a renamed tier).
    SameOrder,
}

/// A change of VIP tier, derived from the profile before and after.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TierChange {
    /// Tier name before (`None` when unset).
    pub from_name: Option<String>,
    /// Tier order before.
    pub from_order: Option<i64>,
    /// Tier name after.
    pub to_name: Option<String>,
    /// Tier order after.
    pub to_order: Option<i64>,
    /// Direction, from the orders.
    pub direction: TierDirection,
}

/// Points balances after minus before, an unset balance counting as zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PointsDelta {
    /// Change of activated points.
    pub activated: i64,
    /// Change of pending points.
    pub pending: i64,
    /// Change of total points.
    pub total: i64,
}

/// Whether a change created the profile or updated it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChangeKind {
    /// The first change to this profile.
    Created,
    /// A later change.
    Updated,
}

/// One applied change: the unit the sequencer records, the history keeps and watchers receive.
#[derive(Clone, Debug)]
pub struct Change {
    /// The store revision this change produced.
    pub revision: u64,
    /// The profile after the change.
    pub profile: Arc<Profile>,
    /// The profile before the change; `None` when the change created it.
    pub previous: Option<Arc<Profile>>,
    /// The fields the change modified, sorted.
    pub changed_fields: Vec<FieldPath>,
}

impl Change {
    /// Created or updated.
    pub fn kind(&self) -> ChangeKind {
        match self.previous {
            None => ChangeKind::Created,
            Some(_) => ChangeKind::Updated,
        }
    }

    /// Whether the change modified this field.
    pub fn touches(&self, path: &FieldPath) -> bool {
        self.changed_fields.binary_search(path).is_ok()
    }

    /// Whether the change modified any extra key.
    pub fn touches_any_extra(&self) -> bool {
        self.changed_fields
            .iter()
            .any(|path| matches!(path, FieldPath::Extra(_)))
    }

    /// The tier change, when `tier_name` or `tier_order` changed.
    pub fn tier_change(&self) -> Option<TierChange> {
        let tier = [Field::TierName, Field::TierOrder];
        if !tier.iter().any(|f| self.touches(&FieldPath::Field(*f))) {
            return None;
        }
        // Unpacked once per profile: this runs for every delivery to every subscriber.
        let before = self.previous.as_deref().map(Profile::values);
        let after = self.profile.values();
        let from_order = before.and_then(|p| p.int(Field::TierOrder));
        let to_order = after.int(Field::TierOrder);
        let direction = match (from_order, to_order) {
            (Some(from), Some(to)) if to > from => TierDirection::Up,
            (Some(from), Some(to)) if to < from => TierDirection::Down,
            (Some(_), Some(_)) => TierDirection::SameOrder,
            _ => TierDirection::Unknown,
        };
        Some(TierChange {
            from_name: before.and_then(|p| p.text(Field::TierName).map(str::to_owned)),
            from_order,
            to_name: after.text(Field::TierName).map(str::to_owned),
            to_order,
            direction,
        })
    }

    /// The points delta, when a points field changed.
    pub fn points_delta(&self) -> Option<PointsDelta> {
        if !Field::ALL
            .iter()
            .any(|f| f.is_points() && self.touches(&FieldPath::Field(*f)))
        {
            return None;
        }
        // Unpacked once per profile, not once per balance (see `tier_change`).
        let before = self.previous.as_deref().map(Profile::values);
        let after = self.profile.values();
        let delta = |field| {
            let before = before.and_then(|p| p.int(field));
            after
                .int(field)
                .unwrap_or(0)
                .saturating_sub(before.unwrap_or(0))
        };
        Some(PointsDelta {
            activated: delta(Field::ActivatedPoints),
            pending: delta(Field::PendingPoints),
            total: delta(Field::TotalPoints),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn at(second: i64) -> EventTime {
        DateTime::from_timestamp(1_700_000_000 + second, 0).unwrap()
    }

    fn key() -> ProfileKey {
        ProfileKey::new("2155", "c1")
    }

    fn update(second: i64, fields: &[(Field, Option<Scalar>)]) -> ProfileUpdate {
        ProfileUpdate {
            key: key(),
            at: at(second),
            fields: fields.to_vec(),
            extras: vec![],
        }
    }

    fn text(value: &str) -> Option<Scalar> {
        Some(Scalar::Text(value.into()))
    }

    #[test]
    fn newer_write_wins_and_older_is_ignored() {
        let mut profile = Profile::empty(key());
        let changed = profile.merge(&update(10, &[(Field::TierName, text("gold"))]));
        assert_eq!(changed, Some(vec![FieldPath::Field(Field::TierName)]));

        let changed = profile.merge(&update(5, &[(Field::TierName, text("basic"))]));
        assert_eq!(changed, None, "an older write must not overwrite");
        assert_eq!(profile.get_text(Field::TierName), Some("gold"));

        let changed = profile.merge(&update(11, &[(Field::TierName, text("silver"))]));
        assert_eq!(changed, Some(vec![FieldPath::Field(Field::TierName)]));
        assert_eq!(profile.get_text(Field::TierName), Some("silver"));
    }

    #[test]
    fn omitted_fields_stay_and_null_clears() {
        let mut profile = Profile::empty(key());
        profile.merge(&update(
            1,
            &[
                (Field::Email, text("a@example.com")),
                (Field::TotalPoints, Some(Scalar::Int(100))),
            ],
        ));
        let changed = profile.merge(&update(2, &[(Field::Email, None)]));
        assert_eq!(changed, Some(vec![FieldPath::Field(Field::Email)]));
        assert_eq!(profile.get(Field::Email), None);
        assert_eq!(profile.get_int(Field::TotalPoints), Some(100));

        // The clear keeps its clock: an older value must not bring the email back.
        let changed = profile.merge(&update(1, &[(Field::Email, text("old@example.com"))]));
        assert_eq!(changed, None);
        assert_eq!(profile.get(Field::Email), None);
        assert_eq!(profile.updated_at(), Some(at(2)));
    }

    #[test]
    fn equal_timestamps_pick_the_larger_value_in_any_order() {
        let gold = update(3, &[(Field::TierName, text("gold"))]);
        let basic = update(3, &[(Field::TierName, text("basic"))]);
        let mut one = Profile::empty(key());
        one.merge(&gold);
        one.merge(&basic);
        let mut other = Profile::empty(key());
        other.merge(&basic);
        other.merge(&gold);
        assert_eq!(one.get_text(Field::TierName), Some("gold"));
        assert!(one.same_content(&other));
    }

    #[test]
    fn same_value_newer_moves_the_clock_but_changes_no_field() {
        let mut profile = Profile::empty(key());
        profile.merge(&update(1, &[(Field::TotalPoints, Some(Scalar::Int(5)))]));
        let newer = update(3, &[(Field::TotalPoints, Some(Scalar::Int(5)))]);
        assert_eq!(profile.merge(&newer), Some(vec![]));
        assert_eq!(profile.updated_at(), Some(at(3)));
        assert_eq!(profile.merge(&newer), None, "a duplicate changes nothing");
        // The moved clock is what keeps a write from between the two from winning.
        let between = update(2, &[(Field::TotalPoints, Some(Scalar::Int(7)))]);
        assert_eq!(profile.merge(&between), None);
        assert_eq!(profile.get_int(Field::TotalPoints), Some(5));
    }

    #[test]
    fn extras_follow_the_same_rules() {
        let mut profile = Profile::empty(key());
        let mut with_extra = update(1, &[]);
        with_extra.extras = vec![("birthday".into(), Some(serde_json::json!("1990-01-01")))];
        assert_eq!(
            profile.merge(&with_extra),
            Some(vec![FieldPath::Extra("birthday".into())])
        );
        assert_eq!(
            profile.extras().collect::<Vec<_>>(),
            vec![("birthday", &serde_json::json!("1990-01-01"))]
        );
        let mut cleared = update(2, &[]);
        cleared.extras = vec![("birthday".into(), None)];
        assert_eq!(
            profile.merge(&cleared),
            Some(vec![FieldPath::Extra("birthday".into())])
        );
        assert_eq!(profile.extras().count(), 0);
        assert_eq!(profile.merge(&with_extra), None, "older extra resurrected");
    }

    fn change(before: Option<Profile>, after: Profile, changed: Vec<FieldPath>) -> Change {
        Change {
            revision: 2,
            profile: Arc::new(after),
            previous: before.map(Arc::new),
            changed_fields: changed,
        }
    }

    #[test]
    fn tier_change_and_points_delta_are_derived_from_before_and_after() {
        let mut before = Profile::empty(key());
        before.merge(&update(
            1,
            &[
                (Field::TierName, text("basic")),
                (Field::TierOrder, Some(Scalar::Int(1))),
                (Field::ActivatedPoints, Some(Scalar::Int(90))),
                (Field::TotalPoints, Some(Scalar::Int(100))),
            ],
        ));
        let mut after = before.clone();
        let changed = after
            .merge(&update(
                2,
                &[
                    (Field::TierName, text("silver")),
                    (Field::TierOrder, Some(Scalar::Int(2))),
                    (Field::ActivatedPoints, Some(Scalar::Int(190))),
                    (Field::PendingPoints, Some(Scalar::Int(10))),
                    (Field::TotalPoints, Some(Scalar::Int(200))),
                ],
            ))
            .unwrap();
        let change = change(Some(before), after, changed);
        let tier = change.tier_change().unwrap();
        assert_eq!(tier.from_name.as_deref(), Some("basic"));
        assert_eq!(tier.to_order, Some(2));
        assert_eq!(tier.direction, TierDirection::Up);
        assert_eq!(
            change.points_delta(),
            Some(PointsDelta {
                activated: 100,
                pending: 10,
                total: 100
            })
        );
    }

    #[test]
    fn no_tier_change_or_points_delta_when_those_fields_did_not_change() {
        let mut before = Profile::empty(key());
        before.merge(&update(1, &[(Field::TierOrder, Some(Scalar::Int(3)))]));
        let mut after = before.clone();
        let changed = after
            .merge(&update(2, &[(Field::Email, text("x@example.com"))]))
            .unwrap();
        let change = change(Some(before), after, changed);
        assert_eq!(change.tier_change(), None);
        assert_eq!(change.points_delta(), None);
    }

    #[test]
    fn tier_direction_down_same_and_unknown() {
        let tiers = |from: Option<i64>, to: Option<i64>| {
            let mut before = Profile::empty(key());
            before.merge(&update(1, &[(Field::TierOrder, from.map(Scalar::Int))]));
            let mut after = before.clone();
            let changed = after.merge(&update(
                2,
                &[
                    (Field::TierOrder, to.map(Scalar::Int)),
                    (Field::TierName, text("renamed")),
                ],
            ));
            let changed = changed.unwrap();
            change(Some(before), after, changed)
                .tier_change()
                .unwrap()
                .direction
        };
        assert_eq!(tiers(Some(3), Some(1)), TierDirection::Down);
        assert_eq!(tiers(Some(2), Some(2)), TierDirection::SameOrder);
        assert_eq!(tiers(None, Some(2)), TierDirection::Unknown);
    }

    // A small value space makes timestamp ties and repeated values frequent.
    fn arb_update() -> impl Strategy<Value = ProfileUpdate> {
        let scalar = prop_oneof![
            Just(None),
            (0i64..3).prop_map(|n| Some(Scalar::Int(n))),
            "[ab]".prop_map(|s| Some(Scalar::Text(s.into()))),
        ];
        let field = (0..Field::ALL.len()).prop_map(|i| Field::ALL[i]);
        let extra_value = prop_oneof![
            Just(None),
            (0i64..3).prop_map(|n| Some(serde_json::json!(n))),
            Just(Some(serde_json::json!({"a": [1, 2]}))),
        ];
        (
            0i64..4,
            proptest::collection::btree_map(field, scalar, 0..4),
            proptest::collection::btree_map("[xy]", extra_value, 0..2),
        )
            .prop_map(|(second, fields, extras)| ProfileUpdate {
                key: key(),
                at: at(second),
                fields: fields.into_iter().collect(),
                extras: extras
                    .into_iter()
                    .map(|(k, v)| (k.into_boxed_str(), v))
                    .collect(),
            })
    }

    fn merged(updates: &[ProfileUpdate]) -> Profile {
        let mut profile = Profile::empty(key());
        for update in updates {
            profile.merge(update);
        }
        profile
    }

    proptest! {
        #[test]
        fn any_order_with_duplicates_converges(
            updates in proptest::collection::vec(arb_update(), 1..8),
            order in proptest::collection::vec(any::<prop::sample::Index>(), 1..24),
        ) {
            let in_order = merged(&updates);
            // Any sequence that delivers each update at least once, shuffled, with repeats.
            let mut delivered: Vec<ProfileUpdate> = updates.clone();
            delivered.extend(order.iter().map(|index| index.get(&updates).clone()));
            let mut shuffled = delivered.clone();
            let len = shuffled.len();
            for (i, index) in order.iter().enumerate() {
                shuffled.swap(i % len, index.index(len));
            }
            let other = merged(&shuffled);
            prop_assert!(in_order.same_content(&other), "{in_order:?}\n!=\n{other:?}");
            prop_assert_eq!(in_order.updated_at(), other.updated_at());
        }

        #[test]
        fn merging_again_changes_nothing(updates in proptest::collection::vec(arb_update(), 1..6)) {
            let mut profile = merged(&updates);
            for update in &updates {
                prop_assert_eq!(profile.merge(update), None);
            }
        }
    }

    /// The merge as it was before the registers were packed (ten `Option<Register<Scalar>>`
    /// with `DateTime` clocks, extras in a map), written as the rule it implements: a register
    /// holds the largest `(at, value)` written to it, cleared below every value.
    #[derive(Default)]
    struct Reference {
        fields: BTreeMap<Field, Register<Scalar>>,
        extra: BTreeMap<Box<str>, Register<ExtraValue>>,
    }

    impl Reference {
        fn merge(&mut self, update: &ProfileUpdate) -> Option<Vec<FieldPath>> {
            let mut wrote = false;
            let mut changed = Vec::new();
            for (field, value) in &update.fields {
                let current = self.fields.get(field);
                if current.is_none_or(|old| (&update.at, value) > (&old.at, &old.value)) {
                    wrote = true;
                    if current.map(|old| &old.value) != Some(value) {
                        changed.push(FieldPath::Field(*field));
                    }
                    let register = Register {
                        value: value.clone(),
                        at: update.at,
                    };
                    self.fields.insert(*field, register);
                }
            }
            for (key, value) in &update.extras {
                let value = value.clone().map(ExtraValue);
                let text = |value: &Option<ExtraValue>| value.as_ref().map(ExtraValue::sort_key);
                let current = self.extra.get(key);
                if current.is_none_or(|old| (update.at, text(&value)) > (old.at, text(&old.value)))
                {
                    wrote = true;
                    if current.map(|old| &old.value) != Some(&value) {
                        changed.push(FieldPath::Extra(key.clone()));
                    }
                    let register = Register {
                        value,
                        at: update.at,
                    };
                    self.extra.insert(key.clone(), register);
                }
            }
            changed.sort();
            wrote.then_some(changed)
        }
    }

    // Clocks from across chrono's range (beyond i64 nanoseconds), a leap second, and instants
    // one nanosecond apart, few enough that ties are frequent.
    fn arb_time() -> impl Strategy<Value = EventTime> {
        let leap = DateTime::parse_from_rfc3339("2016-12-31T23:59:60.5Z")
            .unwrap()
            .with_timezone(&Utc);
        prop_oneof![
            Just(DateTime::<Utc>::MIN_UTC),
            Just(DateTime::<Utc>::MAX_UTC),
            Just(DateTime::from_timestamp(-1, 999_999_999).unwrap()),
            Just(DateTime::from_timestamp(0, 0).unwrap()),
            Just(leap),
            Just(DateTime::from_timestamp(1_483_228_799, 999_999_999).unwrap()),
            Just(DateTime::from_timestamp(1_483_228_800, 0).unwrap()),
            (0i64..3, 0u32..2)
                .prop_map(|(s, n)| DateTime::from_timestamp(1_700_000_000 + s, n).unwrap()),
        ]
    }

    fn arb_wide_update() -> impl Strategy<Value = ProfileUpdate> {
        let text = prop_oneof![
            Just(String::new()),
            "[ab]",
            Just("é".repeat(100)),
            Just("customer.00000001@example-mail.com".to_owned()),
        ];
        let scalar = prop_oneof![
            Just(None),
            prop_oneof![
                Just(i64::MIN),
                Just(-1i64),
                Just(0i64),
                Just(1i64),
                Just(300i64),
                Just(i64::MAX)
            ]
            .prop_map(|n| Some(Scalar::Int(n))),
            text.prop_map(|s| Some(Scalar::Text(s.into()))),
        ];
        let field = (0..Field::ALL.len()).prop_map(|i| Field::ALL[i]);
        let extra_value = prop_oneof![
            Just(None),
            (0i64..3).prop_map(|n| Some(serde_json::json!(n))),
        ];
        (
            arb_time(),
            proptest::collection::btree_map(field, scalar, 0..6),
            proptest::collection::btree_map("[xy]", extra_value, 0..2),
        )
            .prop_map(|(at, fields, extras)| ProfileUpdate {
                key: key(),
                at,
                fields: fields.into_iter().collect(),
                extras: extras
                    .into_iter()
                    .map(|(k, v)| (k.into_boxed_str(), v))
                    .collect(),
            })
    }

    fn owned_registers(profile: &Profile) -> BTreeMap<Field, Register<Scalar>> {
        profile
            .field_registers()
            .map(|(field, register)| {
                let value = register.value.map(ScalarRef::to_scalar);
                (
                    field,
                    Register {
                        value,
                        at: register.at,
                    },
                )
            })
            .collect()
    }

    proptest! {
        #[test]
        fn packed_registers_merge_exactly_like_the_reference(
            updates in proptest::collection::vec(arb_wide_update(), 1..10),
        ) {
            let mut profile = Profile::empty(key());
            let mut reference = Reference::default();
            for update in &updates {
                prop_assert_eq!(profile.merge(update), reference.merge(update));
                prop_assert_eq!(owned_registers(&profile), reference.fields.clone());
                let extras: BTreeMap<_, _> = profile
                    .extra_registers()
                    .map(|(key, register)| (Box::<str>::from(key), register.clone()))
                    .collect();
                prop_assert_eq!(&extras, &reference.extra);
                let newest = reference.fields.values().map(|register| register.at);
                let newest = newest.chain(reference.extra.values().map(|register| register.at));
                prop_assert_eq!(profile.updated_at(), newest.max());
                for field in Field::ALL {
                    let expected = reference.fields.get(&field).and_then(|r| r.value.as_ref());
                    prop_assert_eq!(profile.get(field), expected.map(Scalar::view));
                    prop_assert_eq!(profile.values().get(field), expected.map(Scalar::view));
                }
                // The snapshot path rebuilds the very same profile.
                let rebuilt = Profile::from_registers(
                    key(),
                    owned_registers(&profile),
                    extras,
                    0,
                    0,
                    0,
                );
                prop_assert_eq!(&rebuilt, &profile);
            }
        }

        #[test]
        fn clocks_order_and_convert_back_like_chrono(
            a in (-8_000_000_000_000i64..8_000_000_000_000, 0u32..1_000_000_000),
            b in (-8_000_000_000_000i64..8_000_000_000_000, 0u32..1_000_000_000),
        ) {
            let (Some(a), Some(b)) = (
                DateTime::from_timestamp(a.0, a.1),
                DateTime::from_timestamp(b.0, b.1),
            ) else {
                return Ok(());
            };
            prop_assert_eq!(Clock::of(a).cmp(&Clock::of(b)), a.cmp(&b));
            prop_assert_eq!(Clock::of(a).time(), a);
        }
    }

    #[test]
    fn clocks_keep_the_ends_of_the_range_and_leap_seconds() {
        let leap = DateTime::parse_from_rfc3339("2016-12-31T23:59:60.5Z")
            .unwrap()
            .with_timezone(&Utc);
        let before = DateTime::from_timestamp(1_483_228_799, 999_999_999).unwrap();
        let after = DateTime::from_timestamp(1_483_228_800, 0).unwrap();
        for at in [
            DateTime::<Utc>::MIN_UTC,
            DateTime::<Utc>::MAX_UTC,
            leap,
            before,
            after,
        ] {
            assert_eq!(Clock::of(at).time(), at);
        }
        assert!(Clock::of(before) < Clock::of(leap) && Clock::of(leap) < Clock::of(after));
        assert!(before < leap && leap < after);
    }

    #[test]
    fn registers_written_together_share_one_clock() {
        let mut profile = Profile::empty(key());
        profile.merge(&update(
            1,
            &[
                (Field::GbCustomerId, Some(Scalar::Int(1234))),
                (Field::Email, text("customer.00000001@example-mail.com")),
                (Field::TierOrder, Some(Scalar::Int(2))),
                (Field::TotalPoints, Some(Scalar::Int(-5))),
            ],
        ));
        // Masks and table length, one clock, a clock index per register, 2 + 1 + 1 bytes of
        // integers, and the e-mail with its length byte.
        assert_eq!(profile.registers.0.len(), 7 + 12 + 4 + 4 + 35);
        profile.merge(&update(2, &[(Field::TierOrder, Some(Scalar::Int(3)))]));
        assert_eq!(profile.registers.0.len(), 7 + 2 * 12 + 4 + 4 + 35);
        assert_eq!(profile.get_int(Field::TotalPoints), Some(-5));
        assert_eq!(profile.updated_at(), Some(at(2)));
    }

    #[test]
    fn profiles_of_one_account_share_their_client_id() {
        let one = Profile::empty(ProfileKey::new(String::from("shared-account"), "a"));
        let other = Profile::empty(ProfileKey::new(String::from("shared-account"), "b"));
        assert!(Arc::ptr_eq(&one.key.client_id, &other.key.client_id));
        let rebuilt = Profile::from_registers(
            ProfileKey::new(String::from("shared-account"), "c"),
            [],
            [],
            1,
            1,
            1,
        );
        assert!(Arc::ptr_eq(&one.key.client_id, &rebuilt.key.client_id));
    }

    #[test]
    fn a_profile_is_small() {
        // Key (two `Arc<str>`), packed registers, extras pointer, three counters.
        assert!(std::mem::size_of::<Profile>() <= 80);
        assert!(
            Profile::empty(key()).registers.0.is_empty(),
            "no allocation until written"
        );
    }
}
