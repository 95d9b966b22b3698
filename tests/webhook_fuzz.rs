//! The webhook fuzz target as a proptest, so `cargo test` runs it: random deliveries (any
//! Content-Type, signed right or wrong or not at all, raw bytes or Gameball's sample payload
//! edited as JSON and as bytes, in one piece or in chunks) go through the real axum router
//! in-process, and none may panic or get an answer the webhook's contract does not allow.
//!
//! The input model and the checks are `fuzz/webhook_model.rs`, shared with the cargo-fuzz
//! target `fuzz/fuzz_targets/webhook.rs` (which decodes the same [`Input`] from raw bytes with
//! `arbitrary`); here proptest generates it. `fuzz/README.md` says how to run the fuzzer.

use crate::common;
#[path = "../fuzz/webhook_model.rs"]
mod webhook_model;

// The fuzz model's `crate::fixtures` (the cargo-fuzz target declares its own).
use common::fixtures;

use std::sync::OnceLock;

use proptest::collection::vec;
use proptest::prelude::*;
use prost::Message;
use serde_json::{Value, json};

use common::TestService;
use profile_state::ingest::payload::{self, Delivery};
use profile_state::journal::codec::UpdateRecord;

use webhook_model::{
    Answer, BodySpec, ByteEdit, ContentType, Edit, Harness, Input, Key, MAX_BODY_BYTES, Signature,
    Val,
};

fn content_type() -> impl Strategy<Value = ContentType> {
    prop_oneof![
        6 => Just(ContentType::Json),
        2 => Just(ContentType::Absent),
        1 => Just(ContentType::JsonCharset),
        1 => Just(ContentType::JsonUppercase),
        1 => Just(ContentType::JsonSuffix),
        1 => Just(ContentType::TextPlain),
        1 => Just(ContentType::Form),
        1 => vec(any::<u8>(), 0..32).prop_map(ContentType::Raw),
        1 => "[ -~]{0,40}".prop_map(|text| ContentType::Raw(text.into_bytes())),
    ]
}

fn signature() -> impl Strategy<Value = Signature> {
    prop_oneof![
        8 => Just(Signature::Correct),
        1 => Just(Signature::Absent),
        1 => Just(Signature::CorrectUppercase),
        1 => Just(Signature::CorrectPadded),
        2 => Just(Signature::CorrectCompact),
        1 => Just(Signature::Rotated),
        1 => Just(Signature::WrongSecret),
        1 => vec(any::<u8>(), 0..48).prop_map(Signature::Garbage),
        1 => "[0-9a-fA-F]{40}".prop_map(|hex| Signature::Garbage(hex.into_bytes())),
    ]
}

fn key() -> impl Strategy<Value = Key> {
    prop_oneof![
        4 => any::<usize>().prop_map(Key::Known),
        1 => ".{0,12}".prop_map(Key::Other),
    ]
}

fn val() -> impl Strategy<Value = Val> {
    let edges = prop_oneof![
        Just(0i64),
        Just(-1),
        Just(i64::from(i32::MAX)),
        Just(i64::from(i32::MAX) + 1),
        Just(i64::from(i32::MIN)),
        Just(i64::from(i32::MIN) - 1),
        Just(i64::MAX),
        Just(i64::MIN),
    ];
    let leaf = prop_oneof![
        4 => any::<usize>().prop_map(Val::Known),
        1 => Just(Val::Null),
        1 => any::<bool>().prop_map(Val::Bool),
        2 => edges.prop_map(Val::Int),
        1 => any::<i64>().prop_map(Val::Int),
        1 => any::<u64>().prop_map(Val::Big),
        1 => any::<f64>().prop_map(Val::Float),
        2 => ".{0,16}".prop_map(Val::Str),
        1 => (0..3 * MAX_BODY_BYTES).prop_map(Val::Long),
        1 => (0..300usize).prop_map(Val::Deep),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..4).prop_map(Val::Array),
            vec((key(), inner), 0..4).prop_map(Val::Object),
        ]
    })
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        3 => (key(), val()).prop_map(|(key, val)| Edit::SetData(key, val)),
        3 => (key(), val()).prop_map(|(key, val)| Edit::SetTop(key, val)),
        1 => key().prop_map(Edit::RemoveData),
        2 => key().prop_map(Edit::RemoveTop),
        1 => val().prop_map(Edit::Root),
    ]
}

fn byte_edit() -> impl Strategy<Value = ByteEdit> {
    let at = any::<u16>().prop_map(usize::from);
    prop_oneof![
        at.clone().prop_map(ByteEdit::Truncate),
        (at.clone(), any::<u8>()).prop_map(|(at, byte)| ByteEdit::Set(at, byte)),
        (at.clone(), vec(any::<u8>(), 0..16)).prop_map(|(at, bytes)| ByteEdit::Insert(at, bytes)),
        (at, 1..64usize).prop_map(|(at, count)| ByteEdit::Remove(at, count)),
    ]
}

fn body() -> impl Strategy<Value = BodySpec> {
    let byte_edits = prop_oneof![2 => Just(Vec::new()), 1 => vec(byte_edit(), 1..4)];
    prop_oneof![
        6 => (vec(edit(), 0..5), prop::bool::weighted(0.125), byte_edits).prop_map(
            |(edits, pretty, bytes)| BodySpec::Fixture { edits, pretty, bytes }
        ),
        1 => vec(any::<u8>(), 0..256).prop_map(BodySpec::Raw),
        1 => "[\\[\\]{}\":,0-9a-z .eE+-]{0,96}".prop_map(|text| BodySpec::Raw(text.into_bytes())),
    ]
}

fn input() -> impl Strategy<Value = Input> {
    let upload = prop_oneof![
        12 => Just((Vec::new(), false)),
        3 => (vec(0..512usize, 1..5), Just(false)),
        1 => (vec(0..512usize, 0..5), Just(true)),
    ];
    (content_type(), signature(), body(), upload).prop_map(
        |(content_type, signature, body, (chunks, broken_off))| Input {
            content_type,
            signature,
            body,
            chunks,
            broken_off,
        },
    )
}

/// This test's own router (tests run in parallel; the harness checks revisions in order).
static HARNESS: OnceLock<Harness> = OnceLock::new();

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn no_delivery_panics_or_breaks_the_webhook_contract(input in input()) {
        let harness = HARNESS.get_or_init(Harness::new);
        if let Err(broken) = harness.check(&input) {
            prop_assert!(false, "{}", broken);
        }
    }
}

fn fixture(edits: Vec<Edit>) -> BodySpec {
    BodySpec::Fixture {
        edits,
        pretty: false,
        bytes: Vec::new(),
    }
}

fn signed(body: BodySpec) -> Input {
    Input {
        content_type: ContentType::Json,
        signature: Signature::Correct,
        body,
        chunks: Vec::new(),
        broken_off: false,
    }
}

/// The index of `name` in the model's key list.
fn known_key(name: &str) -> Key {
    Key::Known(webhook_model::KEYS.iter().position(|k| *k == name).unwrap())
}

/// The index of `text` in the model's string list.
fn known(text: &str) -> Val {
    Val::Known(
        webhook_model::STRINGS
            .iter()
            .position(|s| *s == text)
            .unwrap(),
    )
}

/// Every documented answer but 503 (which needs a failing disk or a stopping service) is
/// reachable by the model, and the model predicts it (`check` fails otherwise).
#[test]
fn the_model_reaches_every_documented_answer() {
    let harness = Harness::new();
    let answer = |input: Input| -> Answer {
        harness
            .check(&input)
            .unwrap_or_else(|broken| panic!("{broken}\n{input:?}"))
    };
    let outcome = |input: Input| answer(input).outcome;
    let status = |input: Input| answer(input).status;

    assert_eq!(outcome(signed(fixture(vec![]))), "applied");
    assert_eq!(outcome(signed(fixture(vec![]))), "unchanged");
    let push = vec![Edit::SetTop(
        known_key("event"),
        known("customer.notification.push"),
    )];
    assert_eq!(outcome(signed(fixture(push))), "ignored");
    for signature in [
        Signature::CorrectUppercase,
        Signature::CorrectPadded,
        Signature::CorrectCompact,
        Signature::Rotated,
    ] {
        let input = Input {
            signature,
            ..signed(fixture(vec![]))
        };
        assert_eq!(outcome(input), "unchanged");
    }
    let pretty = Input {
        signature: Signature::CorrectCompact,
        ..signed(BodySpec::Fixture {
            edits: vec![],
            pretty: true,
            bytes: vec![],
        })
    };
    assert_eq!(outcome(pretty), "unchanged");
    let leap = vec![Edit::SetTop(
        known_key("created_at"),
        known("2016-12-31T23:59:60.999999999+01:30"),
    )];
    assert_eq!(status(signed(fixture(leap))), 200);

    let other_client = vec![Edit::SetTop(known_key("client_id"), known("webhook-test"))];
    for signature in [
        Signature::Absent,
        Signature::WrongSecret,
        Signature::Garbage(b"zz".to_vec()),
        Signature::Garbage(vec![0xff; 40]),
    ] {
        let input = Input {
            signature,
            ..signed(fixture(vec![]))
        };
        assert_eq!(status(input), 401);
    }
    let rotated_elsewhere = Input {
        signature: Signature::Rotated,
        ..signed(fixture(other_client))
    };
    assert_eq!(status(rotated_elsewhere), 401);

    for content_type in [
        ContentType::TextPlain,
        ContentType::Form,
        ContentType::Raw(b"text/html; charset=utf-8".to_vec()),
        ContentType::Raw("application/jsön".as_bytes().to_vec()),
    ] {
        let input = Input {
            content_type,
            ..signed(fixture(vec![]))
        };
        assert_eq!(status(input), 415);
    }

    let large = || {
        fixture(vec![Edit::SetData(
            Key::Other("pad".into()),
            Val::Long(5000),
        )])
    };
    assert_eq!(status(signed(large())), 413);
    let streamed = Input {
        chunks: vec![0, 100, 4000],
        ..signed(large())
    };
    assert_eq!(status(streamed), 413);
    let streamed_small = Input {
        chunks: vec![1, 0, 7],
        ..signed(fixture(vec![]))
    };
    assert_eq!(outcome(streamed_small), "unchanged");

    for invalid in [
        BodySpec::Raw(b"not json".to_vec()),
        BodySpec::Raw(Vec::new()),
        fixture(vec![Edit::Root(Val::Deep(300))]),
        fixture(vec![Edit::SetData(
            known_key("tier_order"),
            Val::Int(i64::from(i32::MAX) + 1),
        )]),
        fixture(vec![Edit::SetTop(
            known_key("gb_customer_id"),
            Val::Big(u64::MAX),
        )]),
        fixture(vec![Edit::SetTop(
            known_key("created_at"),
            known("2024-11-19T17:34:42"),
        )]),
        fixture(vec![Edit::RemoveTop(known_key("customer_id"))]),
        BodySpec::Fixture {
            edits: vec![],
            pretty: false,
            bytes: vec![ByteEdit::Truncate(100)],
        },
    ] {
        assert_eq!(status(signed(invalid)), 422);
    }
    // The same body again is the same dead letter.
    assert_eq!(status(signed(BodySpec::Raw(b"not json".to_vec()))), 422);
    // More letters than are kept before the harness checks their files and purges them.
    for n in 0..webhook_model::LETTERS_BEFORE_PURGE + 2 {
        let body = BodySpec::Raw(format!("not json {n}").into_bytes());
        assert_eq!(status(signed(body)), 422);
    }

    for chunks in [vec![], vec![10, 0]] {
        let broken = Input {
            chunks,
            broken_off: true,
            ..signed(fixture(vec![]))
        };
        assert_eq!(status(broken), 400);
    }
}

/// A long run sends the fixture's customer new extra keys over and over: once they would grow
/// its extras past the bound, the ingress refuses them (422) and the model must predict it,
/// or a million-input run would report a false finding.
#[test]
fn the_model_predicts_refusals_of_a_profile_grown_to_the_bound() {
    let harness = Harness::new();
    let mut statuses = Vec::new();
    for n in 0..120 {
        let filler = "x".repeat(webhook_model::MAX_BODY_BYTES - 1000);
        let edit = Edit::SetData(Key::Other(format!("key-{n}")), Val::Str(filler));
        let answer = harness.check(&signed(fixture(vec![edit])));
        statuses.push(
            answer
                .unwrap_or_else(|broken| panic!("input {n}: {broken}"))
                .status,
        );
    }
    let first_refused = statuses.iter().position(|status| *status == 422);
    let first_refused = first_refused.unwrap_or_else(|| panic!("never refused: {statuses:?}"));
    assert!(first_refused > 50, "{statuses:?}");
    assert!(
        statuses[..first_refused]
            .iter()
            .all(|status| *status == 200)
    );
    assert!(
        statuses[first_refused..]
            .iter()
            .all(|status| *status == 422)
    );
}

/// Regression cases the fuzzer found, as it decoded them (`fuzz/artifacts/webhook/`).
#[test]
fn fuzzer_findings_stay_fixed() {
    let harness = Harness::new();
    let findings = [
        // crash-f5df4d3cb821e07907ca6203b171b4ab4c373853 (17 bytes,
        // 0fc0090909010901adadad0909010901ad): a float extra drifted by an ulp through the
        // journal record while serde_json parsed floats lossily; fixed by its float_roundtrip
        // feature (`float_extras_survive_the_journal_exactly` below).
        Input {
            content_type: ContentType::JsonUppercase,
            signature: Signature::Correct,
            body: BodySpec::Fixture {
                edits: vec![
                    Edit::SetData(
                        Key::Other("\u{fffd}".into()),
                        Val::Float(2.065156457477422e-305),
                    ),
                    Edit::SetData(Key::Known(0), Val::Known(0)),
                ],
                pretty: true,
                bytes: vec![],
            },
            chunks: vec![],
            broken_off: false,
        },
    ];
    for input in findings {
        if let Err(broken) = harness.check(&input) {
            panic!("{broken}\n{input:?}");
        }
    }
}

/// A float sent in `data`, as Gameball's sender wrote it.
const DRIFTING: f64 = 2.065156457477422e-305;

fn with_float_extra() -> Value {
    let mut body = fixtures::json(webhook_model::FIXTURE);
    body["data"]["ratio"] = json!(DRIFTING);
    body
}

/// Found by the fuzzer: without serde_json's `float_roundtrip` feature, floats are parsed
/// lossily, so a float in `data` was not stored as sent (`2.065156457477422e-305` became
/// `...218e-305`), and the journal's text of it read back as yet another float (`...215e-305`):
/// live and recovered state differed.
#[test]
fn float_extras_survive_the_journal_exactly() {
    // As the ingress does: the bytes as sent, parsed once.
    let sent = serde_json::to_vec(&with_float_extra()).unwrap();
    let parsed: Value = serde_json::from_slice(&sent).unwrap();
    let Ok(Delivery::ProfileUpdated(update)) = payload::parse(&parsed) else {
        panic!("a valid update");
    };
    let encoded = UpdateRecord::new(1, &update).encode_to_vec();
    let replayed = UpdateRecord::decode(encoded.as_slice())
        .unwrap()
        .into_update()
        .unwrap();
    assert_eq!(replayed, update, "the journal record gives back the update");
    let (_, value) = update
        .extras
        .iter()
        .find(|(key, _)| &**key == "ratio")
        .unwrap();
    assert_eq!(value, &Some(json!(DRIFTING)), "stored as sent");
}

/// What that drift did end to end: after a restart (the journal replayed), Gameball's retry of
/// the same delivery was applied again as a new revision instead of being `unchanged`, because
/// the stored float was no longer the one the retry parses to.
#[tokio::test]
async fn a_retry_after_a_restart_changes_nothing_even_with_a_float_extra() {
    let dir = tempfile::tempdir().unwrap();
    let durable = || common::durable_config(dir.path());
    let body = with_float_extra();
    let service = TestService::start_with(durable()).await;
    assert_eq!(
        service.update(&body).await,
        json!({"outcome": "applied", "revision": 1})
    );
    service.stop().await;

    let service = TestService::start_with(durable()).await;
    assert_eq!(
        service.update(&body).await,
        json!({"outcome": "unchanged", "revision": 1}),
        "the same delivery again, after a restart"
    );
    service.stop().await;
}
