//! Warnings for refused signatures, at most one per interval.
//!
//! A delivery with a missing or wrong `X-GB-Signature`, or one for an account with no secret
//! (its own line: it is not a bad signature), is logged at WARN with the `client_id`
//! the body claims (trimmed to 64 characters; control characters, white space, invisible format
//! characters, `"` and `=` replaced: it is unauthenticated input) and the reason; never the body, the signature, or anything else from the body, which
//! may hold personal data. Whoever can reach the webhook port can send such deliveries as fast
//! as they like, so at most one line is written per [`INTERVAL`]; the next line says how many
//! were left out (`suppressed`), and `profile_state_webhook_signature_failures_total` counts
//! every one. This module decides what to log and when; the handler decides what is refused.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// The shortest time between two warnings.
pub const INTERVAL: Duration = Duration::from_secs(10);
/// The longest `client_id` logged, in characters.
const MAX_CLIENT_ID: usize = 64;

/// Logs refused signatures, rate-limited. Shared by every request (one per ingress).
#[derive(Debug, Default)]
pub struct RejectionLog {
    state: Mutex<State>,
}

/// Why a delivery was refused, which names the log line.
#[derive(Clone, Copy)]
enum Kind {
    BadSignature,
    NoSecret,
}

#[derive(Debug, Default)]
struct State {
    /// When the next line may be written; `None` before the first.
    next: Option<Instant>,
    /// Refusals since the last line that were not logged.
    suppressed: u64,
}

impl RejectionLog {
    /// Notes one delivery refused for its signature: logs it, unless a line was written less
    /// than [`INTERVAL`] ago. `client_id` is asked for only when a line is written: a body
    /// is not read before it is authenticated unless its account must choose the secrets.
    pub fn refused(&self, client_id: impl FnOnce() -> Option<String>, reason: &str) {
        self.log(Kind::BadSignature, client_id, reason);
    }

    /// Notes one delivery refused because no secret applies to its `client_id` (an account
    /// not in the secrets file, and no default): not a bad signature, there was nothing to
    /// check it with. Rate-limited with [`RejectionLog::refused`].
    pub fn no_secret(&self, client_id: Option<&str>, reason: &str) {
        self.log(Kind::NoSecret, || client_id.map(str::to_owned), reason);
    }

    fn log(&self, kind: Kind, client_id: impl FnOnce() -> Option<String>, reason: &str) {
        let Some(suppressed) = self.admit(Instant::now()) else {
            return;
        };
        let client_id = client_id().map_or_else(|| "(none)".to_owned(), |id| printable(&id));
        match kind {
            Kind::BadSignature => tracing::warn!(
                client_id = %client_id,
                reason,
                suppressed,
                "webhook refused: bad signature"
            ),
            Kind::NoSecret => tracing::warn!(
                client_id = %client_id,
                reason,
                suppressed,
                "webhook refused: no secret for the account"
            ),
        }
    }

    /// Whether a line may be written at `now`, and how many were suppressed before it.
    fn admit(&self, now: Instant) -> Option<u64> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if state.next.is_some_and(|next| now < next) {
            state.suppressed += 1;
            return None;
        }
        state.next = Some(now + INTERVAL);
        Some(std::mem::take(&mut state.suppressed))
    }
}

/// `text` safe for one log line: at most [`MAX_CLIENT_ID`] characters, `…` when cut, and `?`
/// for control characters, white space (line and paragraph separators included), Unicode's
/// invisible format characters (bidirectional overrides: what a reader sees is not what is
/// there), and `"` and `=`: the text format writes the value unquoted, so `2155 reason="ok"`
/// read as fields of the line (all found by an adversarial run).
fn printable(text: &str) -> String {
    let unsafe_char =
        |c: char| c.is_control() || c.is_whitespace() || matches!(c, '"' | '=') || is_format(c);
    let mut out: String = text
        .chars()
        .take(MAX_CLIENT_ID)
        .map(|c| if unsafe_char(c) { '?' } else { c })
        .collect();
    if text.chars().nth(MAX_CLIENT_ID).is_some() {
        out.push('…');
    }
    out
}

/// Unicode's format characters (general category Cf): invisible, and some reorder the text
/// around them.
fn is_format(c: char) -> bool {
    matches!(c,
        '\u{AD}' | '\u{600}'..='\u{605}' | '\u{61C}' | '\u{6DD}' | '\u{70F}' | '\u{180E}'
        | '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2060}'..='\u{2064}'
        | '\u{2066}'..='\u{206F}' | '\u{FEFF}' | '\u{FFF9}'..='\u{FFFB}'
        | '\u{E0001}' | '\u{E0020}'..='\u{E007F}')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn one_line_per_interval_then_the_count_of_those_left_out() {
        let log = RejectionLog::default();
        let start = Instant::now();
        assert_eq!(log.admit(start), Some(0), "the first is logged");
        for _ in 0..5 {
            assert_eq!(log.admit(start + Duration::from_secs(1)), None);
        }
        assert_eq!(log.admit(start + INTERVAL - Duration::from_millis(1)), None);
        assert_eq!(log.admit(start + INTERVAL), Some(6), "then with the count");
        assert_eq!(log.admit(start + INTERVAL + Duration::from_secs(1)), None);
        assert_eq!(log.admit(start + 3 * INTERVAL), Some(1));
    }

    #[tokio::test(start_paused = true)]
    async fn the_client_id_is_asked_for_only_when_a_line_is_written() {
        let log = RejectionLog::default();
        let asked = std::cell::Cell::new(0);
        let client_id = || {
            asked.set(asked.get() + 1);
            Some("2155".to_owned())
        };
        for _ in 0..3 {
            log.refused(client_id, "X-GB-Signature does not match");
        }
        assert_eq!(
            asked.get(),
            1,
            "the first refusal is logged, the others counted"
        );
    }

    #[test]
    fn a_claimed_client_id_is_printable_and_short() {
        assert_eq!(printable("2155"), "2155");
        assert_eq!(printable("a\nFAKE LINE\u{1b}[31m"), "a?FAKE?LINE?[31m");
        assert_eq!(printable("2155 reason=\"ok\""), "2155?reason??ok?");
        assert_eq!(printable("21\u{2028}55\u{202E}x\u{200B}"), "21?55?x?");
        assert_eq!(printable("é2155-ü"), "é2155-ü", "letters stay");
        let long = "x".repeat(100);
        assert_eq!(printable(&long), format!("{}…", "x".repeat(64)));
        assert_eq!(printable(&"y".repeat(64)), "y".repeat(64));
    }
}
