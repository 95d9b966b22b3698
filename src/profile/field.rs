//! The field table: which fields a profile models, their names, kinds and stable numbers, and
//! the values they hold. Anything else Gameball sends in `data` is an extra, kept as JSON.

use std::fmt;

/// The fields this version models, besides the key. Anything else Gameball sends in `data`
/// lands in the profile's extras (`Profile::extras`).
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

    pub(super) fn index(self) -> usize {
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
    pub(super) fn sort_key(&self) -> String {
        self.0.to_string()
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
