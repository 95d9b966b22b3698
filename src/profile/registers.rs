//! The packed form of a profile's modeled-field registers: one allocation per profile.
//!
//! Only [`Registers::pack`] writes the bytes and only this module reads them; the rest of the
//! profile module sees [`Slot`]s (a register's clock and borrowed value) and [`Clock`]s.
//! Snapshots carry the bytes as they are (format 3), and bytes coming back from disk are taken
//! only when they are exactly what `pack` writes ([`Registers::from_packed`]).

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
        unpack_checked(&self.0).expect("registers unpack as they were packed")
    }

    /// The registers whose packed bytes are `bytes` (a snapshot's, read from disk), or `None`
    /// unless they are exactly what [`Registers::pack`] writes for some registers: every clock
    /// a time chrono holds, every text UTF-8, nothing left over, and the one canonical
    /// encoding (clocks distinct and in order of first use, shortest varints), so that
    /// comparing bytes still compares registers and unpacking can trust them.
    ///
    /// Checked in one pass and copied: unpacking into registers and packing them again (the
    /// obvious check) cost about 4,000 instructions a profile, most of a snapshot's loading.
    /// The tests hold the two checks to the same answer.
    pub(super) fn from_packed(bytes: &[u8]) -> Option<Registers> {
        is_canonical(bytes).then(|| Registers(bytes.into()))
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
            .filter_map(|clock| Reader(clock).clock())
            .max()
    }
}

/// The registers packed in `bytes`, read with every length, index, clock and text checked:
/// `None` for bytes [`Registers::pack`] cannot have written (it may still accept some that are
/// not canonical; [`Registers::from_packed`] tells those apart).
fn unpack_checked(bytes: &[u8]) -> Option<Slots<'_>> {
    let mut slots = [None; Field::ALL.len()];
    if bytes.is_empty() {
        return Some(slots);
    }
    let mut bytes = Reader(bytes);
    let written = bytes.u16()?;
    let cleared = bytes.u16()?;
    let text = bytes.u16()?;
    let clock_count = usize::from(bytes.u8()?);
    let clocks = bytes.take(clock_count * Clock::LEN)?;
    for (index, slot) in slots.iter_mut().enumerate() {
        let bit = 1 << index;
        if written & bit == 0 {
            continue;
        }
        let at = Reader(clocks.get(usize::from(bytes.u8()?) * Clock::LEN..)?).clock()?;
        let value = if cleared & bit != 0 {
            None
        } else if text & bit != 0 {
            let len = usize::try_from(bytes.varint()?).ok()?;
            Some(ScalarRef::Text(std::str::from_utf8(bytes.take(len)?).ok()?))
        } else {
            Some(ScalarRef::Int(unzigzag(bytes.varint()?)))
        };
        *slot = Some(Slot { at, value });
    }
    Some(slots)
}

/// Whether `bytes` are exactly what [`Registers::pack`] writes for some registers (see
/// [`Registers::from_packed`]), checked without building them.
fn is_canonical(bytes: &[u8]) -> bool {
    if bytes.is_empty() {
        return true;
    }
    let mut reader = Reader(bytes);
    let (Some(written), Some(cleared), Some(text), Some(clock_count)) =
        (reader.u16(), reader.u16(), reader.u16(), reader.u8())
    else {
        return false;
    };
    let fields = (1u32 << Field::ALL.len()) - 1;
    let masks_agree = written != 0
        && u32::from(written) & !fields == 0
        && cleared & !written == 0
        && text & !(written & !cleared) == 0;
    let clock_count = usize::from(clock_count);
    let Some(clocks) = reader.take(clock_count * Clock::LEN) else {
        return false;
    };
    if !masks_agree || !distinct_valid_clocks(clocks) {
        return false;
    }
    // Each register's clock is one already used or the next new one (order of first use).
    let mut clocks_used = 0;
    for index in 0..Field::ALL.len() {
        let bit = 1 << index;
        if written & bit == 0 {
            continue;
        }
        match reader.u8().map(usize::from) {
            Some(clock) if clock < clocks_used => {}
            Some(clock) if clock == clocks_used && clock < clock_count => clocks_used += 1,
            _ => return false,
        }
        let value_fits = if cleared & bit != 0 {
            true
        } else if text & bit != 0 {
            reader
                .shortest_varint()
                .and_then(|len| usize::try_from(len).ok())
                .and_then(|len| reader.take(len))
                // Most texts are ASCII, which is checked in a fraction of UTF-8's time.
                .is_some_and(|text| text.is_ascii() || std::str::from_utf8(text).is_ok())
        } else {
            reader.shortest_varint().is_some()
        };
        if !value_fits {
            return false;
        }
    }
    clocks_used == clock_count && reader.0.is_empty()
}

/// Whether the clock table holds only clocks of times chrono holds, each once.
fn distinct_valid_clocks(table: &[u8]) -> bool {
    let mut clocks = [Clock { secs: 0, nanos: 0 }; Field::ALL.len()];
    let mut count = 0;
    for bytes in table.chunks_exact(Clock::LEN) {
        let mut reader = Reader(bytes);
        let (secs, nanos) = match (reader.array(), reader.array()) {
            (Some(secs), Some(nanos)) => (i64::from_le_bytes(secs), u32::from_le_bytes(nanos)),
            _ => return false,
        };
        match Clock::from_timestamp(secs, nanos) {
            Some(clock) if clock == (Clock { secs, nanos }) && count < clocks.len() => {
                if clocks[..count].contains(&clock) {
                    return false;
                }
                clocks[count] = clock;
                count += 1;
            }
            _ => return false,
        }
    }
    true
}

/// Reads packed registers front to back; `None` when they run short or hold what no clock or
/// varint can be. In memory only [`Registers::pack`] writes them, so there a `None` is a bug.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, len: usize) -> Option<&'a [u8]> {
        let (taken, rest) = self.0.split_at_checked(len)?;
        self.0 = rest;
        Some(taken)
    }

    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N)?.try_into().ok()
    }

    fn u8(&mut self) -> Option<u8> {
        self.array().map(u8::from_le_bytes)
    }

    fn u16(&mut self) -> Option<u16> {
        self.array().map(u16::from_le_bytes)
    }

    /// A clock of a time chrono holds (as every [`Clock`] is).
    fn clock(&mut self) -> Option<Clock> {
        let secs = i64::from_le_bytes(self.array()?);
        let nanos = u32::from_le_bytes(self.array()?);
        Clock::from_timestamp(secs, nanos)
    }

    /// LEB128 as [`put_varint`] writes it: at most ten bytes, no needless trailing zero group.
    #[inline]
    fn shortest_varint(&mut self) -> Option<u64> {
        // Most lengths and numbers take one byte, which is always the shortest form: without
        // the general loop (the check of a snapshot's registers reads ten varints a profile).
        if let Some((&byte, rest)) = self.0.split_first()
            && byte < 0x80
        {
            self.0 = rest;
            return Some(u64::from(byte));
        }
        let before = self.0;
        let value = self.varint()?;
        let used = before.len() - self.0.len();
        (used == varint_len(value)).then_some(value)
    }

    /// LEB128 of at most ten bytes (a u64's).
    fn varint(&mut self) -> Option<u64> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = self.u8()?;
            if shift == 63 && byte > 1 {
                return None; // bits past a u64's
            }
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Some(value);
            }
        }
        None
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

    /// A profile with a text, integers, a cleared register and two clocks.
    fn written() -> Profile {
        let mut profile = Profile::empty(key());
        profile.merge(&update(
            1,
            &[
                (Field::Email, text("ö@example.com")),
                (Field::TotalPoints, Some(Scalar::Int(-300))),
                (Field::MobileNumber, None),
            ],
        ));
        profile.merge(&update(
            2,
            &[(Field::TierOrder, Some(Scalar::Int(1 << 40)))],
        ));
        profile
    }

    #[test]
    fn packed_registers_are_taken_back_exactly() {
        let profile = written();
        let packed = &profile.registers.0;
        let taken = Registers::from_packed(packed).expect("taken");
        assert!(taken == profile.registers);
        assert!(Registers::from_packed(&[]).is_some_and(|taken| taken.0.is_empty()));
    }

    #[test]
    fn packed_registers_no_profile_packs_to_are_refused() {
        let packed = written().registers.0.to_vec();
        let edited = |edit: &dyn Fn(&mut Vec<u8>)| {
            let mut bytes = packed.clone();
            edit(&mut bytes);
            Registers::from_packed(&bytes).map(|registers| registers.0)
        };
        let table = Registers::HEADER;
        let first_register = table + 2 * Clock::LEN;
        type Edit<'a> = &'a dyn Fn(&mut Vec<u8>);
        let refused: [(&str, Edit); 10] = [
            ("cut short", &|bytes| bytes.truncate(bytes.len() - 1)),
            ("a byte left over", &|bytes| bytes.push(0)),
            ("header only", &|bytes| bytes.truncate(3)),
            ("a clock index past the table", &|bytes| {
                bytes[first_register] = 2
            }),
            ("two clocks alike", &|bytes| {
                let first: Vec<u8> = bytes[table..table + Clock::LEN].to_vec();
                bytes[table + Clock::LEN..table + 2 * Clock::LEN].copy_from_slice(&first);
            }),
            ("nanoseconds no clock has", &|bytes| {
                bytes[table + 8..table + 12].copy_from_slice(&u32::MAX.to_le_bytes());
            }),
            ("seconds chrono cannot hold", &|bytes| {
                bytes[table..table + 8].copy_from_slice(&i64::MAX.to_le_bytes());
            }),
            ("a field no profile has", &|bytes| bytes[1] |= 0x80),
            ("cleared but never written", &|bytes| bytes[2] |= 1),
            ("text that is not UTF-8", &|bytes| {
                let at = bytes.iter().position(|byte| *byte == 0xc3).unwrap();
                bytes[at] = 0xff;
            }),
        ];
        for (what, edit) in refused {
            assert_eq!(edited(edit), None, "{what}");
        }
        // Every single damaged byte is refused unless it makes other registers' exact bytes.
        for at in 0..packed.len() {
            for flip in [0x01, 0x02, 0x80, 0xff] {
                let mut bytes = packed.clone();
                bytes[at] ^= flip;
                assert_eq!(
                    Registers::from_packed(&bytes).is_some(),
                    packs_to_itself(&bytes),
                    "byte {at} ^ {flip:#x}"
                );
            }
        }
    }

    #[test]
    fn varints_longer_than_needed_are_refused() {
        for value in [Some(Scalar::Int(1)), text("x")] {
            let mut profile = Profile::empty(key());
            profile.merge(&update(1, &[(Field::TierOrder, value.clone())]));
            let packed = profile.registers.0.to_vec();
            assert!(Registers::from_packed(&packed).is_some());
            // The integer (zigzag 2), or the text's length (1), in two bytes instead of one.
            let at = if matches!(value, Some(Scalar::Int(_))) {
                packed.len() - 1
            } else {
                packed.len() - 2
            };
            let mut longer = packed.clone();
            longer[at] |= 0x80;
            longer.insert(at + 1, 0x00);
            assert!(Registers::from_packed(&longer).is_none(), "{value:?}");
            assert!(!packs_to_itself(&longer), "{value:?}");
        }
    }

    /// The obvious check `from_packed` must agree with: read with checks, pack again, compare.
    fn packs_to_itself(bytes: &[u8]) -> bool {
        unpack_checked(bytes).is_some_and(|slots| *Registers::pack(&slots).0 == *bytes)
    }

    proptest! {
        /// Packed registers with bytes replaced, cut or added are taken exactly when they are
        /// what some registers pack to.
        #[test]
        fn packed_bytes_are_taken_exactly_when_registers_pack_to_them(
            edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0..3u8), 1..4),
            ints in proptest::collection::vec(any::<i64>(), 2),
        ) {
            let mut profile = written();
            profile.merge(&update(3, &[
                (Field::PendingPoints, Some(Scalar::Int(ints[0]))),
                (Field::ActivatedPoints, Some(Scalar::Int(ints[1]))),
            ]));
            let mut bytes = profile.registers.0.to_vec();
            prop_assert!(Registers::from_packed(&bytes).is_some());
            for (index, byte, kind) in edits {
                let at = index.index(bytes.len());
                match kind {
                    0 => bytes[at] = byte,
                    1 => bytes.insert(at, byte),
                    _ => drop(bytes.remove(at)),
                }
                if bytes.is_empty() {
                    break;
                }
            }
            prop_assert_eq!(Registers::from_packed(&bytes).is_some(), packs_to_itself(&bytes));
        }
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
