//! The `client_id` of a body that no JSON reader here takes: which account's secrets its
//! signature is checked with.
//!
//! A correctly signed body that serde_json refuses (a number past the double range such as
//! `1e400`, nesting past its limit, a lone surrogate, an invalid UTF-8 byte in a value) is a
//! 422 kept as a dead letter; but its `client_id` was read through serde_json too, so without a
//! default secret no account's secrets applied and it was a 401, which Gameball retries three
//! times and then drops, with nothing kept (found by an adversarial run). Here the top-level
//! object alone is walked, byte by byte, without recursion: every other value is skipped by
//! its brackets and quotes, never read. The signature covers the whole body, so a wrong hint
//! only fails the check.
//!
//! Also the `client_id` a body names as the service will read it, before it is read
//! ([`named_client_id`]: a walk of the whole top level, escapes decoded, a repeated key's last
//! value): which account's secrets check its signature, and what a refusal's log line names.
//!
//! Not here: validating anything (the ingest path does, and answers 422).

/// The top-level `client_id` of `raw` when it is a plain string (no escapes, valid UTF-8) of an
/// object shaped as JSON down to its top-level keys; `None` otherwise.
pub fn client_id(raw: &[u8]) -> Option<&str> {
    let text = &raw[client_id_at(raw)?];
    match text.contains(&b'\\') {
        true => None,
        false => std::str::from_utf8(text).ok(),
    }
}

/// Where the text of the top-level `client_id` string is, between its quotes.
fn client_id_at(raw: &[u8]) -> Option<std::ops::Range<usize>> {
    let mut at = skip_space(raw, 0);
    (raw.get(at) == Some(&b'{')).then_some(())?;
    at += 1;
    loop {
        at = skip_space(raw, at);
        let key = string_at(raw, at)?;
        at = skip_space(raw, key.end);
        (raw.get(at) == Some(&b':')).then_some(())?;
        at = skip_space(raw, at + 1);
        if &raw[key.start + 1..key.end - 1] == b"client_id" {
            let value = string_at(raw, at)?;
            return Some(value.start + 1..value.end - 1);
        }
        at = skip_space(raw, value_end(raw, at)?);
        match raw.get(at) {
            Some(b',') => at += 1,
            _ => return None,
        }
    }
}

/// The `client_id` a body names, as the service reads it once the body is authenticated,
/// found without parsing the body: which account's secrets check its signature, so that an
/// unauthenticated body costs no more than its size. For a body that is JSON it is what a
/// parse gives (a repeated key's last value, escapes decoded, `None` when it is not a string
/// or there is none, as for a body that is not an object); for one that is not, what
/// [`client_id`] gives, as the service reads such a body. The caller checks the parse agrees
/// once the body is read.
pub fn named_client_id(raw: &[u8]) -> Option<String> {
    match top_level_client_id(raw) {
        Some(named) => named,
        None => client_id(raw).map(str::to_owned),
    }
}

/// Walks the top-level object of `raw` to its end: `Some` of its last `client_id` (`None`
/// inside when it has none, or when it is not a string; and when the body is not an object at
/// all), or `None` when the top level is not shaped as JSON (a missing colon or comma,
/// anything after the object, a key or `client_id` string JSON does not allow).
fn top_level_client_id(raw: &[u8]) -> Option<Option<String>> {
    let mut at = skip_space(raw, 0);
    if raw.get(at) != Some(&b'{') {
        return Some(None);
    }
    let mut named = None;
    at = skip_space(raw, at + 1);
    if raw.get(at) == Some(&b'}') {
        return (skip_space(raw, at + 1) == raw.len()).then_some(None);
    }
    loop {
        let key = string_at(raw, at)?;
        let is_client_id = match raw[key.clone()].contains(&b'\\') {
            true => serde_json::from_slice::<String>(&raw[key.clone()]).ok()? == "client_id",
            false => &raw[key.start + 1..key.end - 1] == b"client_id",
        };
        at = skip_space(raw, key.end);
        (raw.get(at) == Some(&b':')).then_some(())?;
        at = skip_space(raw, at + 1);
        let end = value_end(raw, at)?;
        if is_client_id {
            named = match raw[at] {
                b'"' => Some(serde_json::from_slice::<String>(&raw[at..end]).ok()?),
                _ => None,
            };
        }
        at = skip_space(raw, end);
        match raw.get(at) {
            Some(b',') => at = skip_space(raw, at + 1),
            Some(b'}') => break,
            _ => return None,
        }
    }
    (skip_space(raw, at + 1) == raw.len()).then_some(named)
}

/// The string starting at `at` (its opening quote), as the range of its quotes.
fn string_at(raw: &[u8], at: usize) -> Option<std::ops::Range<usize>> {
    (raw.get(at) == Some(&b'"')).then_some(())?;
    let mut next = at + 1;
    loop {
        match raw.get(next)? {
            b'"' => return Some(at..next + 1),
            b'\\' => next += 2,
            _ => next += 1,
        }
    }
}

/// Where the value starting at `at` ends: past its closing quote or bracket, or at the first
/// byte that ends a number or a literal (a comma, a closing bracket, a space).
fn value_end(raw: &[u8], at: usize) -> Option<usize> {
    let mut depth = 0_usize;
    let mut next = at;
    loop {
        match raw.get(next)? {
            b'"' => next = string_at(raw, next)?.end,
            b'{' | b'[' => {
                depth += 1;
                next += 1;
            }
            b'}' | b']' if depth > 0 => {
                depth -= 1;
                next += 1;
            }
            b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r' if depth == 0 => return Some(next),
            _ => next += 1,
        }
        if depth == 0 && next > at && matches!(raw[next - 1], b'"' | b'}' | b']') {
            return Some(next);
        }
    }
}

fn skip_space(raw: &[u8], mut at: usize) -> usize {
    while matches!(raw.get(at), Some(b' ' | b'\t' | b'\n' | b'\r')) {
        at += 1;
    }
    at
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Found past values no reader here takes, at any depth and of any kind.
    #[test]
    fn the_top_level_client_id_is_found_past_values_serde_refuses() {
        let deep = format!("{}1{}", "[".repeat(130), "]".repeat(130));
        let bodies = [
            r#"{"client_id":"2155"}"#.to_owned(),
            r#" { "x" : 1e400 , "client_id" : "2155" }"#.to_owned(),
            format!(r#"{{"data":{{"a":{deep}}},"client_id":"2155","z":1}}"#),
            r#"{"s":"\ud800 \" } ] ,","client_id":"2155"}"#.to_owned(),
            r#"{"o":{"client_id":"nested"},"a":[{"client_id":"x"}],"client_id":"2155"}"#.to_owned(),
            r#"{"t":true,"n":null,"f":-1.5e3,"client_id":"2155"}"#.to_owned(),
            // Cut off after it: a hint still (the body is refused as not JSON once its
            // signature holds, and kept as a dead letter).
            r#"{"client_id":"2155""#.to_owned(),
        ];
        for body in bodies {
            assert_eq!(client_id(body.as_bytes()), Some("2155"), "{body}");
        }
        let mut invalid = br#"{"s":"x"#.to_vec();
        invalid.extend([0xff, b'"', b',']);
        invalid.extend(br#""client_id":"2155"}"#);
        assert_eq!(client_id(&invalid), Some("2155"));
    }

    /// No hint from anything else: nested only, escaped, not a string, not an object, cut off.
    #[test]
    fn no_client_id_is_made_up() {
        let bodies = [
            r#"{"o":{"client_id":"nested"}}"#,
            r#"{"client_id":"21\u0035"}"#,
            r#"{"client\u005fid":"2155"}"#,
            r#"{"client_id":2155}"#,
            r#"["client_id","2155"]"#,
            r#"{"x":1 "client_id":"2155"}"#,
            r#"{"x":"unterminated,"client_id":"2155"}"#,
            "",
            "{",
        ];
        for body in bodies {
            assert_eq!(client_id(body.as_bytes()), None, "{body}");
        }
    }

    /// Bodies whose top level holds `client_id` keys (repeated, written with escapes), among
    /// values that hide brackets, quotes and other `client_id` keys.
    fn object_text() -> impl Strategy<Value = String> {
        let space = prop::sample::select(vec!["", " ", "\n\t"]);
        let key = prop::sample::select(vec![
            r#""client_id""#,
            r#""client\u005fid""#,
            r#""client_id ""#,
            r#""a""#,
            r#""data""#,
        ]);
        let value = prop::sample::select(vec![
            r#""2155""#,
            r#""3000""#,
            r#""215\u0035""#,
            r#""\ud83d\ude00""#,
            r#""a\"b""#,
            r#""}]\\""#,
            "2155",
            "-1.5e3",
            "null",
            "true",
            r#"{"client_id":"nested","x":[1,{"y":"]"}]}"#,
            r#"[[],{},"client_id",["2155"]]"#,
        ]);
        let entry = (space.clone(), key, space.clone(), value, space.clone())
            .prop_map(|(a, key, b, value, c)| format!("{a}{key}{b}:{value}{c}"));
        (prop::collection::vec(entry, 0..6), space)
            .prop_map(|(entries, after)| format!("{{{}}}{after}", entries.join(",")))
    }

    proptest! {
        /// For every body that is JSON, the walk names what a parse names; with a byte of it
        /// changed (most of them then not JSON), it never panics.
        #[test]
        fn the_walk_names_what_a_parse_names(
            body in object_text(),
            flip in proptest::option::of((any::<prop::sample::Index>(), any::<u8>())),
        ) {
            let mut body = body.into_bytes();
            if let (Some((at, byte)), false) = (flip, body.is_empty()) {
                let at = at.index(body.len());
                body[at] = byte;
            }
            let named = named_client_id(&body);
            if let Ok(parsed) = serde_json::from_slice::<serde_json::Value>(&body) {
                let read = parsed.get("client_id").and_then(|id| id.as_str());
                prop_assert_eq!(named.as_deref(), read, "{}", String::from_utf8_lossy(&body));
            }
        }
    }

    /// Not an object: named as a parse names it (none); the top level not shaped as JSON: as
    /// [`client_id`] names it.
    #[test]
    fn the_walk_falls_back_as_the_service_reads_such_bodies() {
        for body in ["[1,2]", r#""client_id""#, "", "  "] {
            assert_eq!(named_client_id(body.as_bytes()), None, "{body}");
        }
        let cut = r#"{"client_id":"2155","x":[1"#;
        assert_eq!(named_client_id(cut.as_bytes()).as_deref(), Some("2155"));
        let repeated = r#"{"client_id":"3000","client_id":"2155"}"#;
        assert_eq!(
            named_client_id(repeated.as_bytes()).as_deref(),
            Some("2155")
        );
        let trailing = r#"{"client_id":"3000","client_id":"2155"} x"#;
        assert_eq!(
            named_client_id(trailing.as_bytes()).as_deref(),
            Some("3000")
        );
    }

    /// Escapes decoded (in the value and in the key), still only the top-level string: what a
    /// log line names, a forged line's newline left for the log to replace.
    #[test]
    fn a_named_client_id_has_its_escapes_decoded() {
        let named = |body: &str| named_client_id(body.as_bytes());
        assert_eq!(named(r#"{"client_id":"2155"}"#).as_deref(), Some("2155"));
        assert_eq!(
            named(r#"{"client_id":"215\u0035"}"#).as_deref(),
            Some("2155")
        );
        assert_eq!(
            named(r#"{"client\u005fid":"2155"}"#).as_deref(),
            Some("2155")
        );
        let forged = named(r#"{"x":[1],"client_id":"2155\nINFO forged"}"#);
        assert_eq!(forged.as_deref(), Some("2155\nINFO forged"));
        assert_eq!(named(r#"{"o":{"client_id":"nested"}}"#), None);
        assert_eq!(named(r#"{"client_id":2155}"#), None);
    }
}
