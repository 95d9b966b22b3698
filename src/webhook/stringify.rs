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
//! This module does not parse: it writes a `serde_json::Value` (read with `preserve_order` and
//! `float_roundtrip`, so every number is the nearest double, as JavaScript reads it). A body
//! serde_json refuses has no compact form, though `JSON.parse` reads some of them: a number
//! past the double range (JavaScript's `Infinity`, written `null`) and a lone surrogate
//! escape.

use serde_json::{Map, Number, Value};

/// `JSON.stringify(value)`, as UTF-8.
pub fn stringify(value: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    write_value(&mut out, value);
    out
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
    // `as_f64` is `Some` for every number a Value holds without `arbitrary_precision`.
    let value = number.as_f64().unwrap_or(f64::NAN);
    write_double(out, value);
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
        out.extend_from_slice(exponent.unsigned_abs().to_string().as_bytes());
    }
}

/// The significant digits of a positive decimal written as Ryu writes it (`123.45`, `0.001`,
/// `1e21`, `1.5e-7`), without leading or trailing zeros, and n: where the decimal point falls
/// relative to them (the value is 0.d1d2... * 10^n).
fn digits_and_point(written: &str) -> (Vec<u8>, i32) {
    let (mantissa, exponent) = written.split_once('e').unwrap_or((written, "0"));
    let exponent: i32 = exponent.parse().expect("Ryu writes a decimal exponent");
    let (whole, fraction) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let mut digits: Vec<u8> = whole.bytes().chain(fraction.bytes()).collect();
    let mut point = whole.len() as i32 + exponent;
    let leading = digits.iter().take_while(|&&digit| digit == b'0').count();
    digits.drain(..leading);
    point -= leading as i32;
    while digits.last() == Some(&b'0') {
        digits.pop();
    }
    (digits, point)
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

    proptest! {
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
