//! Log output: the level filter from `RUST_LOG`, and the two formats.
//!
//! - The filter is `RUST_LOG` (default `info`, with `async_nats` off: the service logs
//!   the NATS connection's events itself, without a line every few seconds while NATS is
//!   down; and `h2` at `error`: its warnings are clients' protocol errors, a line each). A
//!   value that does not parse is an error, and so is a bare word that is neither a level
//!   nor a target of this program (`RUST_LOG=warning` would otherwise mean "everything of a
//!   module named `warning`", which is nothing at all).
//! - `text`: colours only when stdout is a terminal and `NO_COLOR` is not set (no-color.org),
//!   so files, pipes and log collectors get plain text.
//! - `json`: one object per line, the event's fields at the top level beside `timestamp`,
//!   `level`, `target` and `message`; no span objects. Fields are recorded with `Display`
//!   (`%value`), never Rust's `Debug`, anywhere in the crate.
//!
//! This module sets up output; what is logged, and that no personal data is, is each module's
//! business.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::filter::LevelFilter;

use crate::config::LogFormat;

/// Where log lines go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    /// The server's logs.
    Stdout,
    /// A command's diagnostics, so its results on stdout stay clean.
    Stderr,
}

/// `RUST_LOG` cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("RUST_LOG={value:?} is not a usable filter: {reason}")]
pub struct FilterError {
    value: String,
    reason: String,
}

/// The crates whose targets a bare word in `RUST_LOG` may name (`RUST_LOG=tonic`).
const KNOWN_TARGETS: &[&str] = &[
    "profile_state",
    "async_nats",
    "axum",
    "h2",
    "hyper",
    "hyper_util",
    "mio",
    "reqwest",
    "rustls",
    "tokio",
    "tonic",
    "tower",
];

/// What the filter holds back when `RUST_LOG` is unset: async-nats itself. It logs every
/// connection event at INFO, and the cause of a failed attempt at ERROR on every attempt, a
/// hundred a second against a port that closes unanswered ("expected INFO, got nothing").
/// Every one of those also reaches `jetstream::Nats` as an event, which logs it in our words,
/// rate-limited and naming the servers; `RUST_LOG=async_nats=debug` shows the library's own.
/// And h2's warnings: each is a client breaking the protocol (such as resetting more streams
/// than it may), one line per connection, which one client without credentials repeated 2,000
/// times a second (found by an adversarial run); the connection is closed either way.
const QUIET_BY_DEFAULT: &str = "async_nats=off,h2=error";

/// The filter `RUST_LOG` (`value`, `None` when unset) asks for, with `default` when it is unset
/// or empty.
pub fn filter(value: Option<&str>, default: LevelFilter) -> Result<EnvFilter, FilterError> {
    let builder = EnvFilter::builder().with_default_directive(default.into());
    let Some(value) = value.filter(|value| !value.trim().is_empty()) else {
        // (The default directive only counts when no other is given.)
        return Ok(builder.parse_lossy(format!("{default},{QUIET_BY_DEFAULT}")));
    };
    let error = |reason: String| FilterError {
        value: value.to_owned(),
        reason,
    };
    for directive in value.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        let bare = !directive.contains(['=', '[', ':']);
        let is_level = directive.parse::<LevelFilter>().is_ok();
        let crate_name = directive.split("::").next().unwrap_or_default();
        if bare && !is_level && !KNOWN_TARGETS.contains(&crate_name) {
            return Err(error(format!(
                "`{directive}` is neither a level (off, error, warn, info, debug, trace) nor a \
                 target of this program; write a level, or TARGET=LEVEL"
            )));
        }
    }
    // tracing-subscriber does not trim directives; `h2=warn, hyper=info` is what people write.
    let directives: Vec<&str> = value.split(',').map(str::trim).collect();
    builder
        .parse(directives.join(","))
        .map_err(|parse| error(parse.to_string()))
}

/// Whether text logs on stdout get colours: only on a terminal, and never with `NO_COLOR` set
/// to anything but the empty string.
pub fn colours(stdout_is_terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    stdout_is_terminal && no_color.is_none_or(|value| value.is_empty())
}

/// Installs the global subscriber: `format` to `output`, filtered by `filter`.
pub fn init(format: LogFormat, filter: EnvFilter, output: Output) {
    let terminal = match output {
        Output::Stdout => std::io::stdout().is_terminal(),
        Output::Stderr => std::io::stderr().is_terminal(),
    };
    let ansi = colours(terminal, std::env::var_os("NO_COLOR").as_deref());
    let logs = tracing_subscriber::fmt().with_env_filter(filter);
    match (format, output) {
        (LogFormat::Text, Output::Stdout) => logs.with_ansi(ansi).init(),
        (LogFormat::Text, Output::Stderr) => {
            logs.with_ansi(ansi).with_writer(std::io::stderr).init()
        }
        (LogFormat::Json, output) => {
            let logs = logs
                .json()
                .flatten_event(true)
                .with_current_span(false)
                .with_span_list(false);
            match output {
                Output::Stdout => logs.init(),
                Output::Stderr => logs.with_writer(std::io::stderr).init(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsStr;

    #[test]
    fn levels_targets_and_directives_are_accepted() {
        for good in [
            "info",
            "WARN",
            "off",
            "profile_state=debug",
            "info,profile_state::sequencer=debug",
            "tonic",
            "profile_state::journal",
            "h2=warn, hyper=info",
            "[span]=debug",
        ] {
            assert!(filter(Some(good), LevelFilter::INFO).is_ok(), "{good}");
        }
        for unset in [None, Some(""), Some("  ")] {
            let filter = filter(unset, LevelFilter::INFO).unwrap();
            assert_eq!(
                filter.max_level_hint(),
                Some(LevelFilter::INFO),
                "{unset:?}"
            );
            assert_eq!(filter.to_string(), "async_nats=off,h2=error,info");
        }
    }

    #[test]
    fn typos_and_bad_levels_are_errors_naming_the_variable() {
        for (bad, says) in [
            ("warning", "`warning` is neither a level"),
            ("info,debg", "`debg` is neither a level"),
            (
                "profile_state=verbose",
                "RUST_LOG=\"profile_state=verbose\"",
            ),
            ("a=b=c", "not a usable filter"),
        ] {
            let error = filter(Some(bad), LevelFilter::INFO)
                .unwrap_err()
                .to_string();
            assert!(error.starts_with("RUST_LOG="), "{error}");
            assert!(error.contains(says), "{bad}: {error}");
        }
    }

    #[test]
    fn colours_only_on_a_terminal_without_no_color() {
        assert!(colours(true, None));
        assert!(
            colours(true, Some(OsStr::new(""))),
            "empty NO_COLOR does not count"
        );
        assert!(!colours(true, Some(OsStr::new("1"))));
        assert!(!colours(false, None));
    }
}

/// How often at most a warning repeated by [`RateLimited`] is logged.
pub const WARN_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// Allows a repeated log line (a refused connection, a refused publish) at most every
/// [`WARN_EVERY`], counting the ones it held back, so a flood of the same failure is a line
/// every ten seconds rather than one per event.
#[derive(Default)]
pub struct RateLimited {
    last: std::sync::Mutex<Option<std::time::Instant>>,
    suppressed: std::sync::atomic::AtomicUsize,
}

impl RateLimited {
    /// None logged yet: the first is due at once (for a `static`).
    pub const fn new() -> RateLimited {
        RateLimited {
            last: std::sync::Mutex::new(None),
            suppressed: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    /// `Some(how many were held back since the last one)` when one may be logged now.
    pub fn due(&self) -> Option<usize> {
        use std::sync::atomic::Ordering;
        let mut last = self
            .last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = std::time::Instant::now();
        if last.is_some_and(|at| now.duration_since(at) < WARN_EVERY) {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        *last = Some(now);
        Some(self.suppressed.swap(0, Ordering::Relaxed))
    }
}
