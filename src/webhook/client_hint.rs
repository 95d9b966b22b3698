//! The `client_id` of a body that no JSON reader here takes: which account's secrets its
//! signature is checked with. Also the `client_id` a refused delivery's log line names when
//! the body was not read (no account has secrets of its own: `super::Ingress::authenticate`).
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
//! Not here: validating anything (the ingest path does, and answers 422), or choosing secrets
//! by a `client_id` written with escapes (`client_id` gives `None`: such a body is refused as
//! before; `claimed_client_id`, for a log line, decodes them).

/// The top-level `client_id` of `raw` when it is a plain string (no escapes, valid UTF-8) of an
/// object shaped as JSON down to its top-level keys; `None` otherwise.
pub fn client_id(raw: &[u8]) -> Option<&str> {
    let text = &raw[client_id_at(raw)?];
    match text.contains(&b'\\') {
        true => None,
        false => std::str::from_utf8(text).ok(),
    }
}

/// What [`client_id`] finds, its escapes decoded (`"215\u0035"` is `2155`): the `client_id` a
/// body claims, for a log line. `None` for a string JSON does not allow.
pub fn claimed_client_id(raw: &[u8]) -> Option<String> {
    let text = client_id_at(raw)?;
    serde_json::from_slice(&raw[text.start - 1..text.end + 1]).ok()
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

    /// The claimed id of a log line: escapes decoded, still only the top-level string.
    #[test]
    fn a_claimed_client_id_has_its_escapes_decoded() {
        let claimed = |body: &str| claimed_client_id(body.as_bytes());
        assert_eq!(claimed(r#"{"client_id":"2155"}"#).as_deref(), Some("2155"));
        assert_eq!(
            claimed(r#"{"client_id":"215\u0035"}"#).as_deref(),
            Some("2155")
        );
        let forged = claimed(r#"{"x":[1],"client_id":"2155\nINFO forged"}"#);
        assert_eq!(forged.as_deref(), Some("2155\nINFO forged"));
        assert_eq!(
            claimed(r#"{"client_id":"\ud800"}"#),
            None,
            "a lone surrogate"
        );
        assert_eq!(claimed(r#"{"o":{"client_id":"nested"}}"#), None);
        assert_eq!(claimed(r#"{"client_id":2155}"#), None);
    }
}
