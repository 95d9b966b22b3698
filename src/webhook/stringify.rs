//! `JSON.stringify` of a parsed body, byte for byte as ECMAScript writes it: the compact form
//! Gameball's own verifier hashes (`JSON.stringify(JSON.parse(body))`), which the signature
//! check computes when a body's raw bytes match no secret.
//!
//! serde_json's compact output differs from it in two ways, each of which refused correctly
//! signed deliveries with 401 (found by an adversarial run):
//! - Numbers. JavaScript reads every number as an IEEE double (to the nearest one, ties to
//!   even) and writes it as `Number.prototype.toString` does: the shortest digits that read
//!   back as that double, laid out by the exponent (`1.0` -> `1`, `1E3` -> `1000`, `-0` -> `0`,
//!   `1e21` -> `1e+21`, `1e-7` -> `1e-7`, an integer past 2^53 rounded to a double).
//! - Key order. An object's "array index" keys (canonical decimal integers 0 to 2^32 - 2) come
//!   first, ascending, then the other keys in the order they first appear. A repeated key
//!   keeps its first place and its last value, which serde_json's `preserve_order` map does
//!   too.
//!
//! Strings are escaped as `JSON.stringify` escapes them (`"`, `\`, and characters below U+0020,
//! as `\b \t \n \f \r` or lowercase `\u00xx`; everything else as it is, `/`, U+2028 and
//! non-ASCII included), which is what serde_json's string writer does: strings are written
//! through it.
//!
//! Two ways in, one output: [`stringify_body`] reads a body's bytes and writes as it reads (the
//! signature check's way: it runs before anything says who sent the body, so it must cost
//! little more than reading it), and [`stringify`] writes a `serde_json::Value` already read
//! (the reference the first is tested against). Both read as serde_json does with
//! `preserve_order` and `float_roundtrip`, so every number is the nearest double, as
//! JavaScript reads it. A body serde_json refuses has no compact form, though `JSON.parse`
//! reads some of them: a number past the double range (JavaScript's `Infinity`, written
//! `null`) and a lone surrogate escape.

use std::collections::HashMap;
use std::collections::hash_map::Entry as Slot;
use std::fmt;
use std::ops::Range;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

/// `JSON.stringify(value)`, as UTF-8.
pub fn stringify(value: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    write_value(&mut out, value);
    out
}

/// `JSON.stringify(JSON.parse(body))`, written as the body is read: the same bytes as
/// [`stringify`] of the `Value` serde_json reads from `body`, and `None` for a body it
/// refuses, mostly without building that `Value`. Through a `Value`, a 64 KiB body of small
/// numbers, signed with no secret, took 5.6 ms of the ingest thread, 24 times a plain body of
/// that size (found by an adversarial run): every element allocated, once to read and once to
/// write. Here an array is written element by element, and an object's entries where they
/// come, moved only when JavaScript's order is not the body's (an array-index key, a repeated
/// key). Such an object moves all it holds, nested objects included, so objects nested deep
/// that each needed it moved the body once per level: more than the `Value` costs (found by
/// an adversarial run). A body nested deeper than [`ONE_PASS_DEPTH`] is read into a `Value`,
/// as before, unless it is larger than [`VALUE_PATH_MAX_BYTES`]; a count of its brackets says
/// so before anything is written.
pub fn stringify_body(body: &[u8]) -> Option<Vec<u8>> {
    if body.len() <= VALUE_PATH_MAX_BYTES && nesting(body) > ONE_PASS_DEPTH {
        return serde_json::from_slice(body)
            .ok()
            .map(|json| stringify(&json));
    }
    in_one_pass(body)
}

/// The deepest nesting of objects and arrays written in one pass: re-ordering objects then
/// moves each byte at most twice this many times. A delivery nests three or four levels
/// (`data`, an extra's object).
const ONE_PASS_DEPTH: usize = 8;

/// The largest body nested deeper than [`ONE_PASS_DEPTH`] whose compact form is written
/// through a `Value`. A `Value` takes up to ~140 times its body (an array of empty arrays):
/// 16 MiB nested 9 levels took 2.3 GB before the signature was checked (found by an
/// adversarial run). Larger bodies are written in one pass at any depth: their moves cost CPU
/// (at most twice the body per level), never more memory than the body and its compact form.
const VALUE_PATH_MAX_BYTES: usize = 256 << 10;

/// How deep `body`'s objects and arrays nest, counted from its brackets outside strings, and
/// only up to one past [`ONE_PASS_DEPTH`]. What it says of a body that is not JSON does not
/// matter: either way of writing refuses it.
fn nesting(body: &[u8]) -> usize {
    let (mut depth, mut deepest) = (0_usize, 0);
    let mut rest = body;
    while let Some(at) = rest
        .iter()
        .position(|&byte| matches!(byte, b'"' | b'{' | b'[' | b'}' | b']'))
    {
        match rest[at] {
            b'"' => {
                // To the string's closing quote: the first one no backslash escapes.
                let mut end = at + 1;
                loop {
                    let Some(next) = rest.get(end..).and_then(|tail| {
                        tail.iter().position(|&byte| matches!(byte, b'"' | b'\\'))
                    }) else {
                        // Cut inside a string: nothing more nests.
                        return deepest;
                    };
                    end += next;
                    if rest[end] == b'"' {
                        break;
                    }
                    end += 2;
                }
                rest = rest.get(end + 1..).unwrap_or_default();
                continue;
            }
            b'{' | b'[' => {
                depth += 1;
                deepest = deepest.max(depth);
                if deepest > ONE_PASS_DEPTH {
                    return deepest;
                }
            }
            _ => depth = depth.saturating_sub(1),
        }
        rest = &rest[at + 1..];
    }
    deepest
}

/// The body written in one pass (`None`: serde_json refuses it).
fn in_one_pass(body: &[u8]) -> Option<Vec<u8>> {
    let mut output = Output {
        bytes: Vec::with_capacity(body.len()),
        scratch: Vec::new(),
    };
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    Written(&mut output).deserialize(&mut deserializer).ok()?;
    deserializer.end().ok()?;
    Some(output.bytes)
}

/// What [`stringify_body`] writes into.
struct Output {
    bytes: Vec<u8>,
    /// Where a re-ordered object is put together: one buffer for all, as objects are
    /// re-ordered one at a time, innermost first.
    scratch: Vec<u8>,
}

/// A value read from a deserializer and written into the output as `JSON.stringify` writes
/// it. serde_json's deserializer keeps its recursion limit (128 levels) for it as for a
/// `Value`.
struct Written<'o>(&'o mut Output);

impl<'de> DeserializeSeed<'de> for Written<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Written<'_> {
    type Value = ();

    fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
        formatter.write_str("any JSON value")
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.0.bytes.extend_from_slice(b"null");
        Ok(())
    }
    fn visit_bool<E: de::Error>(self, value: bool) -> Result<(), E> {
        let text: &[u8] = if value { b"true" } else { b"false" };
        self.0.bytes.extend_from_slice(text);
        Ok(())
    }
    fn visit_u64<E: de::Error>(self, value: u64) -> Result<(), E> {
        write_integer(&mut self.0.bytes, value, false);
        Ok(())
    }
    fn visit_i64<E: de::Error>(self, value: i64) -> Result<(), E> {
        write_integer(&mut self.0.bytes, value.unsigned_abs(), value < 0);
        Ok(())
    }
    fn visit_f64<E: de::Error>(self, value: f64) -> Result<(), E> {
        write_double(&mut self.0.bytes, value);
        Ok(())
    }
    fn visit_str<E: de::Error>(self, text: &str) -> Result<(), E> {
        write_string(&mut self.0.bytes, text);
        Ok(())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut items: A) -> Result<(), A::Error> {
        let out = self.0;
        out.bytes.push(b'[');
        let mut any = false;
        while items.next_element_seed(Written(&mut *out))?.is_some() {
            out.bytes.push(b',');
            any = true;
        }
        if any {
            out.bytes.pop();
        }
        out.bytes.push(b']');
        Ok(())
    }
    fn visit_map<A: MapAccess<'de>>(self, entries: A) -> Result<(), A::Error> {
        write_entries(self.0, entries)
    }
}

/// Where one entry of an object was written: its key (quoted), its value, and the key as an
/// array index.
struct Entry {
    key: Range<usize>,
    value: Range<usize>,
    index: Option<u32>,
}

/// An object's entries, written where they come; then, if JavaScript's order is not the
/// body's, written again in it ([`write_in_order`]).
fn write_entries<'de, A: MapAccess<'de>>(out: &mut Output, mut map: A) -> Result<(), A::Error> {
    let start = out.bytes.len();
    out.bytes.push(b'{');
    let mut entries = Vec::new();
    loop {
        let key_start = out.bytes.len();
        let Some(index) = map.next_key_seed(WrittenKey(&mut out.bytes))? else {
            break;
        };
        let key = key_start..out.bytes.len();
        out.bytes.push(b':');
        let value_start = out.bytes.len();
        map.next_value_seed(Written(&mut *out))?;
        entries.push(Entry {
            key,
            value: value_start..out.bytes.len(),
            index,
        });
        out.bytes.push(b',');
    }
    if !entries.is_empty() {
        out.bytes.pop();
    }
    let kept = first_and_last(&out.bytes, &entries);
    if kept.is_none() && entries.iter().all(|entry| entry.index.is_none()) {
        out.bytes.push(b'}');
        return Ok(());
    }
    let kept = kept.unwrap_or_else(|| (0..entries.len()).map(|at| (at, at)).collect());
    write_in_order(&out.bytes, &entries, kept, &mut out.scratch);
    out.bytes.truncate(start);
    out.bytes.extend_from_slice(&out.scratch);
    Ok(())
}

/// A key read and written, quoted; what it says as an array index.
struct WrittenKey<'o>(&'o mut Vec<u8>);

impl<'de> DeserializeSeed<'de> for WrittenKey<'_> {
    type Value = Option<u32>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for WrittenKey<'_> {
    type Value = Option<u32>;

    fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
        formatter.write_str("an object key")
    }
    fn visit_str<E: de::Error>(self, key: &str) -> Result<Self::Value, E> {
        write_string(self.0, key);
        Ok(array_index(key))
    }
}

/// Each key once, in the order of its first place, with the entry of its last value; `None`
/// when no key repeats. Keys are compared as written: serde_json writes equal strings alike
/// and different ones differently. A few entries are compared pairwise, more through a map.
fn first_and_last(out: &[u8], entries: &[Entry]) -> Option<Vec<(usize, usize)>> {
    let key = |at: usize| &out[entries[at].key.clone()];
    let mut kept: Vec<(usize, usize)> = Vec::new();
    if entries.len() <= 16 {
        let repeated = (0..entries.len()).any(|at| (0..at).any(|earlier| key(earlier) == key(at)));
        if !repeated {
            return None;
        }
        for at in 0..entries.len() {
            match kept.iter_mut().find(|(first, _)| key(*first) == key(at)) {
                Some((_, last)) => *last = at,
                None => kept.push((at, at)),
            }
        }
        return Some(kept);
    }
    kept.reserve(entries.len());
    let mut slots: HashMap<&[u8], usize> = HashMap::with_capacity(entries.len());
    for at in 0..entries.len() {
        match slots.entry(key(at)) {
            Slot::Occupied(slot) => kept[*slot.get()].1 = at,
            Slot::Vacant(slot) => {
                slot.insert(kept.len());
                kept.push((at, at));
            }
        }
    }
    (kept.len() < entries.len()).then_some(kept)
}

/// An object as ECMAScript orders it (see [`write_object`]) from its entries as written in
/// `out`, into `object`: each key once, in its first place with its last value (`kept`);
/// array indices first, ascending.
fn write_in_order(
    out: &[u8],
    entries: &[Entry],
    mut kept: Vec<(usize, usize)>,
    object: &mut Vec<u8>,
) {
    // Stable, and the keys that are not indices are in first-place order already.
    kept.sort_by_key(|&(first, _)| match entries[first].index {
        Some(index) => (0, u64::from(index)),
        None => (1, first as u64),
    });
    object.clear();
    object.push(b'{');
    for (at, &(first, last)) in kept.iter().enumerate() {
        if at > 0 {
            object.push(b',');
        }
        object.extend_from_slice(&out[entries[first].key.clone()]);
        object.push(b':');
        object.extend_from_slice(&out[entries[last].value.clone()]);
    }
    object.push(b'}');
}

// Recursive: a `Value` serde_json read nests at most 128 levels (its recursion limit).
fn write_value(out: &mut Vec<u8>, value: &Value) {
    match value {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(true) => out.extend_from_slice(b"true"),
        Value::Bool(false) => out.extend_from_slice(b"false"),
        Value::Number(number) => write_number(out, number),
        Value::String(text) => write_string(out, text),
        Value::Array(items) => {
            out.push(b'[');
            for (at, item) in items.iter().enumerate() {
                if at > 0 {
                    out.push(b',');
                }
                write_value(out, item);
            }
            out.push(b']');
        }
        Value::Object(entries) => write_object(out, entries),
    }
}

/// An object's entries in the order ECMAScript's OrdinaryOwnPropertyKeys gives them: array
/// indices ascending, then the other keys in the map's (first-seen) order.
fn write_object(out: &mut Vec<u8>, entries: &Map<String, Value>) {
    let mut indices: Vec<(u32, &str, &Value)> = entries
        .iter()
        .filter_map(|(key, value)| Some((array_index(key)?, key.as_str(), value)))
        .collect();
    // Distinct keys have distinct indices (an index is written one way only).
    indices.sort_unstable_by_key(|&(index, _, _)| index);
    let others = entries
        .iter()
        .filter(|(key, _)| array_index(key).is_none())
        .map(|(key, value)| (key.as_str(), value));
    out.push(b'{');
    let ordered = indices.into_iter().map(|(_, key, value)| (key, value));
    for (at, (key, value)) in ordered.chain(others).enumerate() {
        if at > 0 {
            out.push(b',');
        }
        write_string(out, key);
        out.push(b':');
        write_value(out, value);
    }
    out.push(b'}');
}

/// `key` as an ECMAScript array index: the canonical decimal form (no sign, no leading zero
/// but in `0` itself) of an integer from 0 to 2^32 - 2. `None` for any other key.
fn array_index(key: &str) -> Option<u32> {
    let bytes = key.as_bytes();
    let canonical = !bytes.is_empty()
        && bytes.len() <= 10
        && bytes.iter().all(u8::is_ascii_digit)
        && (bytes[0] != b'0' || bytes.len() == 1);
    if !canonical {
        return None;
    }
    // Ten digits at most: the parse cannot overflow a u64.
    let index: u64 = key.parse().ok()?;
    u32::try_from(index).ok().filter(|&index| index < u32::MAX)
}

/// A number as JavaScript holds it (the nearest double: `as f64` rounds an integer past 2^53
/// to nearest, ties to even, as `JSON.parse` does) written as `Number.prototype.toString(10)`.
fn write_number(out: &mut Vec<u8>, number: &Number) {
    if let Some(value) = number.as_u64() {
        write_integer(out, value, false);
    } else if let Some(value) = number.as_i64() {
        write_integer(out, value.unsigned_abs(), value < 0);
    } else {
        // `as_f64` is `Some` for every number a Value holds without `arbitrary_precision`.
        write_double(out, number.as_f64().unwrap_or(f64::NAN));
    }
}

/// An integer (its magnitude and sign) as JavaScript writes the double it reads it as: as it
/// is up to 2^53, where every integer is a double and Number::toString writes its digits;
/// past that, through the nearest double.
fn write_integer(out: &mut Vec<u8>, magnitude: u64, negative: bool) {
    if magnitude > 1 << 53 {
        let value = magnitude as f64;
        write_double(out, if negative { -value } else { value });
        return;
    }
    if negative && magnitude != 0 {
        out.push(b'-');
    }
    out.extend_from_slice(itoa::Buffer::new().format(magnitude).as_bytes());
}

/// ECMAScript's Number::toString(x, 10) (ECMA-262, 6.1.6.1.20), and JSON.stringify's `null`
/// for a number that is not finite.
fn write_double(out: &mut Vec<u8>, value: f64) {
    if !value.is_finite() {
        out.extend_from_slice(b"null");
        return;
    }
    // Step 2: +0 and -0 are both "0".
    if value == 0.0 {
        out.push(b'0');
        return;
    }
    if value < 0.0 {
        out.push(b'-');
    }
    // Step 5: the fewest digits s (k of them) with s * 10^(n-k) == x, the closest to x of
    // those and, of two as close, the even one (the spec's note, and V8). Ryu gives exactly
    // that. Rust's `{:e}` does not: of two as close it takes the larger (-126430982921026.625
    // is `.63` there, `.62` in JavaScript; found by a differential run against node).
    let mut buffer = ryu::Buffer::new();
    let (digits, n) = digits_and_point(buffer.format_finite(value.abs()));
    let k = digits.len() as i32;
    let exponent = n - 1;
    if k <= n && n <= 21 {
        // Step 6: an integer of n digits, the digits then n - k zeros.
        out.extend_from_slice(&digits);
        out.resize(out.len() + (n - k) as usize, b'0');
    } else if 0 < n && n <= 21 {
        // Step 7: the decimal point within the digits.
        let (whole, fraction) = digits.split_at(n as usize);
        out.extend_from_slice(whole);
        out.push(b'.');
        out.extend_from_slice(fraction);
    } else if -6 < n && n <= 0 {
        // Step 8: "0.", -n zeros, the digits.
        out.extend_from_slice(b"0.");
        out.resize(out.len() + (-n) as usize, b'0');
        out.extend_from_slice(&digits);
    } else {
        // Steps 9 and 10: exponential, a sign always written.
        out.push(digits[0]);
        if k > 1 {
            out.push(b'.');
            out.extend_from_slice(&digits[1..]);
        }
        out.push(b'e');
        out.push(if exponent >= 0 { b'+' } else { b'-' });
        out.extend_from_slice(
            itoa::Buffer::new()
                .format(exponent.unsigned_abs())
                .as_bytes(),
        );
    }
}

/// The significant digits of a positive decimal written as Ryu writes it (`123.45`, `0.001`,
/// `1e21`, `1.5e-7`), without leading or trailing zeros, and n: where the decimal point falls
/// relative to them (the value is 0.d1d2... * 10^n).
fn digits_and_point(written: &str) -> (Digits, i32) {
    let (mantissa, exponent) = written.split_once('e').unwrap_or((written, "0"));
    let exponent: i32 = exponent.parse().expect("Ryu writes a decimal exponent");
    let (whole, fraction) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let mut digits = Digits::default();
    for digit in whole.bytes().chain(fraction.bytes()) {
        // Ryu writes at most 24 characters (`Digits`' room), the point and exponent among them.
        digits.bytes[digits.len] = digit;
        digits.len += 1;
    }
    let mut point = whole.len() as i32 + exponent;
    let leading = digits.iter().take_while(|&&digit| digit == b'0').count();
    digits.bytes.copy_within(leading..digits.len, 0);
    digits.len -= leading;
    point -= leading as i32;
    while digits.last() == Some(&b'0') {
        digits.len -= 1;
    }
    (digits, point)
}

/// Up to 24 decimal digits (the longest Ryu writes a double is 24 characters), kept on the
/// stack: a number written is not an allocation.
#[derive(Default)]
struct Digits {
    bytes: [u8; 24],
    len: usize,
}

impl std::ops::Deref for Digits {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

/// ECMAScript's QuoteJSONString for a Rust string (which holds no lone surrogate, the one case
/// it would write as `\udxxx`): serde_json's string writer escapes exactly the same characters
/// the same way (the node vectors below hold every kind).
fn write_string(out: &mut Vec<u8>, text: &str) {
    // Writing a string into a Vec cannot fail.
    serde_json::to_writer(&mut *out, text).expect("a Vec takes any write");
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Hand-picked inputs and what node's `JSON.stringify(JSON.parse(input))` gave for each
    /// (`tests/fixtures/stringify/make-vectors.js` wrote them from `cases.txt`): numbers in
    /// every layout range and at the double's limits, integers past 2^53 and 2^64, array-index
    /// keys and keys that only look like them, repeated keys, every kind of escape, and a body
    /// of a differential run against node that found std's tie rule wrong for this.
    const CASES: &str = include_str!("../../tests/fixtures/stringify/cases.jsonl");
    /// Number literals from a fixed-seed generator (random double bit patterns written with
    /// 17 and with fewer digits, integers of 1 to 30 digits, decimals with exponents around
    /// the layout boundaries and far out, exact ties between two shortest candidates) and
    /// node's output for each, by the same script.
    const NUMBERS: &str = include_str!("../../tests/fixtures/stringify/numbers.jsonl");

    /// Every `[input, expected]` pair of `vectors` on which this module disagrees with node.
    fn disagreements(vectors: &str) -> Vec<String> {
        let mut wrong = Vec::new();
        for line in vectors.lines() {
            let (input, expected): (String, String) = serde_json::from_str(line).unwrap();
            let parsed: Value = serde_json::from_str(&input).unwrap();
            let ours = String::from_utf8(stringify(&parsed)).unwrap();
            if ours != expected {
                wrong.push(format!("{input}: node {expected}, ours {ours}"));
            }
            let read = stringify_body(input.as_bytes()).map(|out| String::from_utf8(out).unwrap());
            if read.as_deref() != Some(&expected) {
                wrong.push(format!(
                    "{input}: node {expected}, read in one pass {read:?}"
                ));
            }
        }
        wrong
    }

    #[test]
    fn agrees_with_node_on_the_hand_picked_cases() {
        assert_eq!(CASES.lines().count(), 74);
        assert_eq!(disagreements(CASES), Vec::<String>::new());
    }

    #[test]
    fn agrees_with_node_on_thousands_of_numbers() {
        assert!(NUMBERS.lines().count() > 3000);
        assert_eq!(disagreements(NUMBERS), Vec::<String>::new());
    }

    /// The differences from serde_json's compact output that refused signed deliveries, spelt
    /// out (the vectors above hold them too).
    #[test]
    fn what_serde_json_writes_otherwise() {
        let cases = [
            (r#"{"a":1.0,"b":1E3,"c":-0}"#, r#"{"a":1,"b":1000,"c":0}"#),
            (r#"{"n":9007199254740993}"#, r#"{"n":9007199254740992}"#),
            (r#"{"x":1,"10":"a","2":"b"}"#, r#"{"2":"b","10":"a","x":1}"#),
        ];
        for (input, expected) in cases {
            let parsed: Value = serde_json::from_str(input).unwrap();
            assert_ne!(serde_json::to_string(&parsed).unwrap(), expected, "{input}");
            assert_eq!(String::from_utf8(stringify(&parsed)).unwrap(), expected);
        }
        // A repeated key: its first place, its last value, in both.
        let parsed: Value = serde_json::from_str(r#"{"a":1,"b":2,"a":3}"#).unwrap();
        assert_eq!(stringify(&parsed), br#"{"a":3,"b":2}"#);
    }

    #[test]
    fn array_indices_are_the_canonical_integers_below_2_to_the_32_minus_1() {
        for (key, index) in [
            ("0", Some(0)),
            ("7", Some(7)),
            ("4294967294", Some(u32::MAX - 1)),
        ] {
            assert_eq!(array_index(key), index, "{key}");
        }
        for key in [
            "",
            "01",
            "-1",
            "+1",
            "1.0",
            " 1",
            "1e3",
            "4294967295",
            "99999999999",
        ] {
            assert_eq!(array_index(key), None, "{key}");
        }
    }

    /// Bodies serde_json refuses have no compact form either way, whatever part refuses them.
    #[test]
    fn a_body_serde_json_refuses_has_no_compact_form_in_one_pass() {
        let deep = format!("{}1{}", "[".repeat(129), "]".repeat(129));
        let bodies: [&[u8]; 8] = [
            b"{\"a\":1}x",
            b"{\"a\":1e400}",
            b"{\"a\":\"\\ud800\"}",
            b"{\"a\":\"\xff\"}",
            b"{\"a\":[1,2,]}",
            b"{\"a\" 1}",
            b"",
            deep.as_bytes(),
        ];
        for body in bodies {
            assert!(serde_json::from_slice::<Value>(body).is_err());
            assert_eq!(
                stringify_body(body),
                None,
                "{}",
                String::from_utf8_lossy(body)
            );
        }
        // serde_json's recursion limit holds alike for both: the deepest body it reads, read.
        let nested = |depth| format!("{}1{}", "[".repeat(depth), "]".repeat(depth));
        let deepest = (100..130)
            .rev()
            .find(|&depth| serde_json::from_str::<Value>(&nested(depth)).is_ok())
            .unwrap();
        assert_eq!(
            stringify_body(nested(deepest).as_bytes()),
            Some(nested(deepest).into_bytes())
        );
        assert_eq!(stringify_body(nested(deepest + 1).as_bytes()), None);
    }

    /// What the signature check does with every body no secret signed costs a number of
    /// allocations that does not grow with the body. Through a `Value` every key took one (a
    /// `String`), and every number took one more to be written (its digits), besides the
    /// `Value`s' own room: a 64 KiB body of 30,000 small numbers took 5.6 ms of the ingest
    /// thread, 24 times a plain body of that size (found by an adversarial run).
    #[test]
    fn a_body_is_written_in_one_pass_with_a_few_allocations_whatever_its_size() {
        let numbers = vec!["1"; 30_000].join(",");
        let keys: Vec<String> = (0..5_000)
            .rev()
            .map(|at| format!("\"{at}\":{at}.5"))
            .collect();
        let body = format!(
            r#"{{"client_id":"2155","data":{{"x":[{numbers}],"y":{{{}}},"z":"text"}}}}"#,
            keys.join(",")
        );
        let mut written = None;
        let allocations =
            allocation_counter::measure(|| written = stringify_body(body.as_bytes())).count_total;
        let through_value = stringify(&serde_json::from_str(&body).unwrap());
        assert_eq!(written.as_ref(), Some(&through_value));
        // The output, and per object its entries (grown by doubling: 13 times for 5,000)
        // and, reordered, the map of its keys, their order and the object written again.
        assert!(allocations <= 40, "{allocations} allocations");
        let through_value = allocation_counter::measure(|| {
            stringify(&serde_json::from_str(&body).unwrap());
        })
        .count_total;
        assert!(
            through_value > 5_000,
            "{through_value} allocations through a Value"
        );
    }

    /// Objects nested deep, each of which JavaScript orders otherwise than the body: each level
    /// moved all it holds, and 125 levels of a 64 KiB body took more of the ingest thread than
    /// a `Value` (found by an adversarial run). Past 8 levels the body is read into a `Value`,
    /// with the same output; up to them, in one pass.
    #[test]
    fn bodies_nested_past_8_levels_are_read_into_a_value() {
        let bottom = vec!["1e20"; 2_000].join(",");
        let nested = |depth| {
            let head = r#"{"1":0,"x":"#.repeat(depth);
            format!("{head}[{bottom}]{}", r#","0":0}"#.repeat(depth))
        };
        for depth in [1, 7, 8, 9, 125] {
            let body = nested(depth);
            let through_value = stringify(&serde_json::from_str(&body).unwrap());
            assert_eq!(nesting(body.as_bytes()), (depth + 1).min(9), "{depth}");
            assert_eq!(
                stringify_body(body.as_bytes()).as_ref(),
                Some(&through_value)
            );
            assert_eq!(in_one_pass(body.as_bytes()).as_ref(), Some(&through_value));
        }
    }

    /// A body past [`VALUE_PATH_MAX_BYTES`] nested deeper than 8 levels is written in one pass:
    /// through a `Value`, an array of arrays 9 levels deep took about 140 times its size (16
    /// MiB: 2.3 GB, found by an adversarial run). The same output, and at most the body's size
    /// a few times over at once (the output and the scratch a re-ordered object is put
    /// together in), re-ordered objects at every level included.
    #[test]
    fn large_bodies_nested_deep_are_written_in_one_pass() {
        let arrays = format!(
            "{}{}{}",
            "[".repeat(9),
            vec!["[]"; 200_000].join(","),
            "]".repeat(9)
        );
        let objects = format!(
            "{}[{}]{}",
            r#"{"1":0,"x":"#.repeat(12),
            vec!["1e20"; 60_000].join(","),
            r#","0":0}"#.repeat(12)
        );
        for (body, value_costs_more) in [(arrays, true), (objects, false)] {
            assert!(body.len() > VALUE_PATH_MAX_BYTES && nesting(body.as_bytes()) > ONE_PASS_DEPTH);
            let through_value = stringify(&serde_json::from_str(&body).unwrap());
            let mut written = None;
            let peak =
                allocation_counter::measure(|| written = stringify_body(body.as_bytes())).bytes_max;
            assert_eq!(written.as_ref(), Some(&through_value));
            let bound = 4 * (body.len() + through_value.len()) as u64;
            assert!(
                peak <= bound,
                "{peak} bytes at once for a {} byte body",
                body.len()
            );
            if value_costs_more {
                let value_peak = allocation_counter::measure(|| {
                    stringify(&serde_json::from_str(&body).unwrap());
                })
                .bytes_max;
                assert!(
                    value_peak > bound,
                    "{value_peak} bytes at once through a Value"
                );
            }
        }
    }

    /// Brackets inside strings do not count, escaped quotes included; a body cut inside a
    /// string counts what came before it.
    #[test]
    fn nesting_counts_brackets_outside_strings() {
        for (body, depth) in [
            (r#"{"a":"[[[{{{","b":[1,[2]]}"#, 3),
            (r#"{"a\"[[[":"\\","b":{}}"#, 2),
            (r#"["\\\"{{{{{{{{{{{"]"#, 1),
            (r#"[["unfinished \"[[["#, 2),
            ("", 0),
            ("1", 0),
            ("]]]{", 1),
        ] {
            assert_eq!(nesting(body.as_bytes()), depth, "{body}");
        }
    }

    /// JSON text with what makes `JSON.stringify`'s output differ from the body's: spaces,
    /// numbers in every layout, escapes, array-index keys and repeated keys, nested.
    fn json_text() -> impl Strategy<Value = String> {
        let space = prop::sample::select(vec!["", " ", "\n  ", "\t"]);
        let number = prop::sample::select(vec![
            "0",
            "-0",
            "1",
            "-1",
            "1.0",
            "1E3",
            "1e21",
            "1e-7",
            "0.000001",
            "123.456",
            "9007199254740993",
            "-9007199254740993",
            "18446744073709551615",
            "18446744073709551616",
            "-9223372036854775808",
            "1e400",
            "2.5e-324",
            "1.7976931348623157e308",
            "100000000000000000000",
            "-126430982921026.625",
        ]);
        let text = prop::sample::select(vec![
            "\"\"",
            "\"a\"",
            "\"\\u00e9\\n\"",
            "\"\\/\\u2028\"",
            "\"é\"",
            "\"\\ud83d\\ude00\"",
        ]);
        let key = prop::sample::select(vec![
            "\"a\"",
            "\"b\"",
            "\"0\"",
            "\"1\"",
            "\"10\"",
            "\"01\"",
            "\"4294967294\"",
            "\"4294967295\"",
            "\"\\u0061\"",
            "\"-1\"",
        ]);
        let leaf = prop_oneof![
            number.prop_map(str::to_owned),
            text.prop_map(str::to_owned),
            Just("true".to_owned()),
            Just("null".to_owned()),
        ];
        leaf.prop_recursive(4, 48, 12, move |inner| {
            let item = (space.clone(), inner.clone(), space.clone())
                .prop_map(|(before, value, after)| format!("{before}{value}{after}"));
            prop_oneof![
                prop::collection::vec(item.clone(), 0..6)
                    .prop_map(|items| format!("[{}]", items.join(","))),
                prop::collection::vec((key.clone(), space.clone(), item), 0..12).prop_map(
                    |entries| {
                        let entries: Vec<String> = entries
                            .into_iter()
                            .map(|(key, space, value)| format!("{key}{space}:{value}"))
                            .collect();
                        format!("{{{}}}", entries.join(","))
                    }
                ),
            ]
        })
    }

    proptest! {
        /// Read in one pass, every body gives what its `Value` gives: the same bytes, or no
        /// compact form for both, at any depth (the one pass itself, and as the signature
        /// check chooses between the two). Also with a byte of it changed, which makes many of
        /// them something serde_json refuses, at any depth.
        #[test]
        fn one_pass_writes_what_the_value_writes(
            body in json_text(),
            flip in proptest::option::of((any::<prop::sample::Index>(), any::<u8>())),
        ) {
            let mut body = body.into_bytes();
            if let (Some((at, byte)), false) = (flip, body.is_empty()) {
                let at = at.index(body.len());
                body[at] = byte;
            }
            let through_value = serde_json::from_slice::<Value>(&body).ok().map(|json| stringify(&json));
            let one_pass = in_one_pass(&body);
            let shown = String::from_utf8_lossy(&body);
            prop_assert_eq!(&one_pass, &through_value, "{}", shown);
            prop_assert_eq!(stringify_body(&body), through_value, "{}", shown);
        }

        /// Any finite double reads back from what is written as itself, and the layout follows
        /// the exponent: plain for 1e-6 <= |x| < 1e21 (and 0), exponential (with a signed exponent)
        /// outside.
        #[test]
        fn every_double_round_trips_in_its_layout(bits in any::<u64>()) {
            let value = f64::from_bits(bits);
            prop_assume!(value.is_finite());
            let mut out = Vec::new();
            write_double(&mut out, value);
            let text = String::from_utf8(out).unwrap();
            let back: f64 = text.parse().unwrap();
            prop_assert!(back == value, "{text} read back as {back}, not {value}");
            let magnitude = value.abs();
            let plain = magnitude == 0.0 || (1e-6..1e21).contains(&magnitude);
            prop_assert_eq!(!text.contains('e'), plain, "{}", text);
            if !plain {
                prop_assert!(text.contains("e+") || text.contains("e-"), "{}", text);
            }
        }
    }
}
