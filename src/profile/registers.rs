//! The packed form of a profile's modeled-field registers: one allocation per profile.
//!
//! Only [`Registers::pack`] writes the bytes and only this module reads them; the rest of the
//! profile module sees [`Slot`]s (a register's clock and borrowed value) and [`Clock`]s.

use chrono::DateTime;

use super::{EventTime, Field, ScalarRef};

/// A register's clock as the profile stores it: seconds since the epoch and the nanoseconds
/// within that second, exactly as chrono gives them.
///
/// Every [`EventTime`] converts to a clock and back unchanged (the whole chrono range, which an
/// `i64` of nanoseconds would not cover), and clocks order exactly like the times they came from:
/// chrono orders by (date, second of day, nanoseconds), which is the order of (seconds since the
/// epoch, nanoseconds). A leap second keeps its nanoseconds of 10^9 and more in the 59th second,
/// so it sorts after every other instant of that second and before the next one, as in chrono.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct Clock {
    secs: i64,
    nanos: u32,
}

impl Clock {
    /// Bytes of a clock in the packed registers.
    const LEN: usize = 12;

    pub(super) fn of(at: EventTime) -> Clock {
        Clock {
            secs: at.timestamp(),
            nanos: at.timestamp_subsec_nanos(),
        }
    }

    /// The clock of the time `secs` seconds and `nanos` nanoseconds after the epoch: exactly
    /// `DateTime::from_timestamp(secs, nanos).map(Clock::of)`, without building (and taking
    /// apart again) a date for the ordinary times of years 1 to 9999, which chrono always
    /// holds unchanged. Snapshot loading reads a clock per register, millions at start-up.
    pub(super) fn from_timestamp(secs: i64, nanos: u32) -> Option<Clock> {
        if nanos < 1_000_000_000 && (YEAR_1..=YEAR_9999_END).contains(&secs) {
            return Some(Clock { secs, nanos });
        }
        DateTime::from_timestamp(secs, nanos).map(Clock::of)
    }

    pub(super) fn time(self) -> EventTime {
        // Clocks are only made from `EventTime`s (`Clock::of`), and those convert back.
        DateTime::from_timestamp(self.secs, self.nanos)
            .expect("a clock converts back to the time it was taken from")
    }
}

/// 0001-01-01T00:00:00Z and 9999-12-31T23:59:59Z in seconds since the epoch.
const YEAR_1: i64 = -62_135_596_800;
const YEAR_9999_END: i64 = 253_402_300_799;

/// One modeled field's register, unpacked: borrowed from the packed bytes or from an update.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) struct Slot<'a> {
    pub(super) at: Clock,
    pub(super) value: Option<ScalarRef<'a>>,
}

/// Every modeled field's register, indexed by `Field as usize`; `None` = never written.
pub(super) type Slots<'a> = [Option<Slot<'a>>; Field::ALL.len()];

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
pub(super) struct Registers(pub(super) Box<[u8]>);

impl Registers {
    /// Bytes before the clock table: the three masks and the table's length.
    const HEADER: usize = 7;

    pub(super) fn pack(slots: &Slots<'_>) -> Registers {
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

    pub(super) fn unpack(&self) -> Slots<'_> {
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
    pub(super) fn newest(&self) -> Option<Clock> {
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

#[cfg(test)]
mod tests {
    use chrono::Utc;
    use proptest::prelude::*;

    use super::super::testing::{at, key, text, update};
    use super::*;
    use crate::profile::{Profile, Scalar};

    proptest! {
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

        #[test]
        fn clocks_from_timestamps_are_chronos(
            secs in -300_000_000_000i64..300_000_000_000,
            nanos in 0u32..2_100_000_000,
        ) {
            prop_assert_eq!(
                Clock::from_timestamp(secs, nanos),
                DateTime::from_timestamp(secs, nanos).map(Clock::of)
            );
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
    fn a_clock_from_a_timestamp_is_what_chrono_makes_of_it() {
        let through_chrono = |secs, nanos| DateTime::from_timestamp(secs, nanos).map(Clock::of);
        let edges = [YEAR_1, YEAR_9999_END];
        let seconds = edges
            .iter()
            .flat_map(|edge| [edge - 86_400, edge - 1, *edge, edge + 1, edge + 86_400])
            .chain([0, -1, 1_483_228_799, 1_483_228_800, i64::MIN, i64::MAX])
            .chain([i64::MIN / 1000, i64::MAX / 1000]);
        for secs in seconds {
            for nanos in [
                0,
                1,
                999_999_999,
                1_000_000_000,
                1_500_000_000,
                1_999_999_999,
                2_000_000_000,
                u32::MAX,
            ] {
                assert_eq!(
                    Clock::from_timestamp(secs, nanos),
                    through_chrono(secs, nanos),
                    "{secs}s {nanos}ns"
                );
            }
        }
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
    fn a_profile_is_small() {
        // Key (two thin strings), packed registers, extras pointer, three counters: 64 bytes,
        // so an `Arc<Profile>` (two more counters) fits mimalloc's 80-byte class, not the 96.
        assert!(std::mem::size_of::<Profile>() <= 64);
        assert!(
            Profile::empty(key()).registers.0.is_empty(),
            "no allocation until written"
        );
    }
}
