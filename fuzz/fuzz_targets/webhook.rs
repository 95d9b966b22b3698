//! Fuzzes the webhook path from raw bytes and headers to the outcome: each input is decoded
//! (with `arbitrary`) into a Content-Type, an `X-GB-Signature` choice, a body and its chunking,
//! posted to the real axum router in-process, and checked against the webhook's contract; the
//! body also goes straight through `payload::parse`, `Profile::merge` and the journal records.
//! See `webhook_model.rs` for what is checked, and `fuzz/README.md` for how to run it.
//!
//! Bodies lean towards JSON: by default Gameball's sample payload, edited as JSON (keys and
//! values that matter to the payload, any others) and then as bytes; else raw bytes.
#![no_main]

#[path = "../../tests/fixtures/mod.rs"]
mod fixtures;
#[path = "../webhook_model.rs"]
mod webhook_model;

use std::sync::OnceLock;

use arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;

use webhook_model::{BodySpec, ByteEdit, ContentType, Edit, Harness, Input, Key, Signature, Val};

/// One runtime and one ingress per process: state (profiles, revisions) carries over between
/// inputs, as in a running service.
static HARNESS: OnceLock<Harness> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let Ok(input) = input(&mut Unstructured::new(data)) else {
        return;
    };
    if let Err(broken) = HARNESS.get_or_init(Harness::new).check(&input) {
        panic!("webhook contract broken: {broken}\ninput: {input:?}");
    }
});

/// An all-zero (or empty) input decodes to the fixture, signed, as `application/json`.
fn input(u: &mut Unstructured) -> Result<Input> {
    let content_type = match u.int_in_range(0..=9u8)? {
        0..=2 => ContentType::Json,
        3 => ContentType::Absent,
        4 => ContentType::JsonCharset,
        5 => ContentType::JsonUppercase,
        6 => ContentType::JsonSuffix,
        7 => ContentType::TextPlain,
        8 => ContentType::Form,
        _ => ContentType::Raw(short_bytes(u)?),
    };
    let signature = match u.int_in_range(0..=11u8)? {
        0..=3 => Signature::Correct,
        4 => Signature::Absent,
        5 => Signature::CorrectUppercase,
        6 => Signature::CorrectPadded,
        7 => Signature::CorrectCompact,
        8 => Signature::Rotated,
        9 => Signature::WrongSecret,
        _ => Signature::Garbage(short_bytes(u)?),
    };
    let (chunks, broken_off) = if u.ratio(1, 5)? {
        let count = u.int_in_range(1..=4u8)?;
        let chunks = (0..count)
            .map(|_| u.int_in_range(0..=512u16).map(usize::from))
            .collect::<Result<_>>()?;
        (chunks, u.ratio(1, 4)?)
    } else {
        (Vec::new(), false)
    };
    let body = if u.ratio(3, 4)? {
        let count = u.int_in_range(0..=4u8)?;
        let edits = (0..count).map(|_| edit(u)).collect::<Result<_>>()?;
        let pretty = u.ratio(1, 8)?;
        let count = if u.ratio(2, 3)? {
            0
        } else {
            u.int_in_range(1..=3u8)?
        };
        let bytes = (0..count).map(|_| byte_edit(u)).collect::<Result<_>>()?;
        BodySpec::Fixture {
            edits,
            pretty,
            bytes,
        }
    } else {
        BodySpec::Raw(u.bytes(u.len())?.to_vec())
    };
    Ok(Input {
        content_type,
        signature,
        body,
        chunks,
        broken_off,
    })
}

fn short_bytes(u: &mut Unstructured) -> Result<Vec<u8>> {
    let len = u.int_in_range(0..=48usize)?;
    Ok(u.bytes(len.min(u.len()))?.to_vec())
}

fn text(u: &mut Unstructured) -> Result<String> {
    let bytes = short_bytes(u)?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

fn key(u: &mut Unstructured) -> Result<Key> {
    Ok(if u.ratio(4, 5)? {
        Key::Known(u.arbitrary()?)
    } else {
        Key::Other(text(u)?)
    })
}

fn val(u: &mut Unstructured, depth: u8) -> Result<Val> {
    let last = if depth == 0 { 9 } else { 11 };
    Ok(match u.int_in_range(0..=last)? {
        0 => Val::Known(u.arbitrary()?),
        1 => Val::Null,
        2 => Val::Bool(u.arbitrary()?),
        3 => Val::Int(interesting_int(u)?),
        4 => Val::Big(u.arbitrary()?),
        5 => Val::Float(u.arbitrary()?),
        6 => Val::Str(text(u)?),
        7 => Val::Long(u.arbitrary::<u16>()?.into()),
        8 => Val::Deep(u.int_in_range(0..=300usize)?),
        9 => Val::Int(u.arbitrary()?),
        10 => {
            let count = u.int_in_range(0..=4u8)?;
            Val::Array(
                (0..count)
                    .map(|_| val(u, depth - 1))
                    .collect::<Result<_>>()?,
            )
        }
        _ => {
            let count = u.int_in_range(0..=4u8)?;
            Val::Object(
                (0..count)
                    .map(|_| Ok((key(u)?, val(u, depth - 1)?)))
                    .collect::<Result<_>>()?,
            )
        }
    })
}

/// Integers at the edges of the fields' ranges.
fn interesting_int(u: &mut Unstructured) -> Result<i64> {
    const EDGES: [i64; 9] = [
        0,
        1,
        -1,
        i32::MAX as i64,
        i32::MAX as i64 + 1,
        i32::MIN as i64,
        i32::MIN as i64 - 1,
        i64::MAX,
        i64::MIN,
    ];
    u.choose(&EDGES).copied()
}

fn edit(u: &mut Unstructured) -> Result<Edit> {
    Ok(match u.int_in_range(0..=9u8)? {
        0..=2 => Edit::SetData(key(u)?, val(u, 2)?),
        3..=5 => Edit::SetTop(key(u)?, val(u, 2)?),
        6 => Edit::RemoveData(key(u)?),
        7 | 8 => Edit::RemoveTop(key(u)?),
        _ => Edit::Root(val(u, 3)?),
    })
}

fn byte_edit(u: &mut Unstructured) -> Result<ByteEdit> {
    Ok(match u.int_in_range(0..=3u8)? {
        0 => ByteEdit::Truncate(u.arbitrary::<u16>()?.into()),
        1 => ByteEdit::Set(u.arbitrary::<u16>()?.into(), u.arbitrary()?),
        2 => ByteEdit::Insert(u.arbitrary::<u16>()?.into(), short_bytes(u)?),
        _ => ByteEdit::Remove(u.arbitrary::<u16>()?.into(), u.int_in_range(1..=64usize)?),
    })
}
