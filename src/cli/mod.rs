//! The `profile-state` command line: serving (the default: `profile-state [FLAGS]`) and the
//! operators' subcommands beside it, one module each.
//!
//! Adding a subcommand: a module with a `clap::Args` struct (`Args`) and
//! `pub fn run(args: Args, sources: &Sources) -> ExitCode`, a variant of [`Command`], and its
//! arm in [`run`]. A subcommand that talks to a running server flattens
//! [`client::Connection`] into its arguments and returns its problems as [`Failure`]s through
//! [`block_on`].
//!
//! Every usage problem exits 64 (EX_USAGE): clap's own errors (an unknown flag, a value that
//! does not parse, flags that conflict), the configuration checks after parsing, and files the
//! configuration names that cannot be used. Whenever such an error names a flag whose value
//! came from its environment variable, a note says which variable, because a value nobody typed
//! is the hardest to find. `--help` and `--version` exit 0. This module parses and explains;
//! serving is `crate::server`'s, and each subcommand's work is its own module's.

use std::ffi::OsString;
use std::io::Write as _;
use std::process::ExitCode;

use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser};

use crate::config::Config;

pub mod backup;
pub mod client;
pub mod dead_letters;
pub mod reconcile;
pub mod restore;
pub mod serve;

/// Exit status for a usage or configuration error (EX_USAGE), before anything is served.
pub const EXIT_USAGE: u8 = 64;

/// The whole command line.
#[derive(Parser)]
#[command(
    name = "profile-state",
    version,
    about = "Keeps Gameball customer profiles, fed by signed webhooks, and serves them over gRPC"
)]
#[command(args_conflicts_with_subcommands = true)]
pub struct Cli {
    /// An operator's subcommand; none means serve.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// The server's flags: what `profile-state` without a subcommand serves with.
    #[command(flatten)]
    pub serve: Config,
}

/// The subcommands beside serving.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Lists, shows, replays or purges the dead letters of a running server (AdminService).
    DeadLetters(dead_letters::Args),
    /// Writes an online backup of a running server to a file (AdminService.Backup).
    Backup(backup::Args),
    /// Makes a backup into a new data directory, to serve with `--data-dir`.
    Restore(restore::Args),
    /// Reads profiles back from Gameball's REST API and heals what lost webhooks left wrong,
    /// as a job of a running server (AdminService).
    Reconcile(reconcile::Args),
}

/// Why a subcommand did not do what it was asked.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    /// The command line cannot work (a flag's file unreadable, an address that is not one):
    /// exit 64.
    #[error("{0}")]
    Usage(String),
    /// The server could not be reached, refused, or something failed on the way: exit 1.
    #[error("{0}")]
    Failed(String),
    /// A job the subcommand followed stopped early (`reconcile --wait`): exit 2.
    #[error("{0}")]
    Stopped(String),
}

impl Failure {
    /// Prints the failure (with notes on flags set from the environment); the exit status.
    pub fn report(&self, sources: &Sources) -> ExitCode {
        print_error(sources, &self.to_string());
        match self {
            Failure::Usage(_) => ExitCode::from(EXIT_USAGE),
            Failure::Failed(_) => ExitCode::FAILURE,
            Failure::Stopped(_) => ExitCode::from(2),
        }
    }
}

/// Runs a subcommand's work on a single-threaded runtime: its logs (`RUST_LOG`, default
/// `warn`) go to stderr, its failure is reported; returns the exit status.
pub fn block_on(
    sources: &Sources,
    work: impl std::future::Future<Output = Result<(), Failure>>,
) -> ExitCode {
    let filter = std::env::var("RUST_LOG").ok();
    match crate::logging::filter(
        filter.as_deref(),
        tracing_subscriber::filter::LevelFilter::WARN,
    ) {
        Ok(filter) => crate::logging::init(
            crate::config::LogFormat::Text,
            filter,
            crate::logging::Output::Stderr,
        ),
        Err(error) => return Failure::Usage(error.to_string()).report(sources),
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            let failure = Failure::Failed(format!("cannot start the async runtime: {error}"));
            return failure.report(sources);
        }
    };
    match runtime.block_on(work) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => failure.report(sources),
    }
}

/// Which flags were set (not left at their defaults), and which of those by an environment
/// variable, to explain errors about them.
#[derive(Debug, Default)]
pub struct Sources {
    /// `(flag without dashes, variable)` for every flag set from the environment.
    from_env: Vec<(String, String)>,
    /// Every flag (without dashes) set on the command line or from the environment.
    set: Vec<String>,
}

impl Sources {
    /// The flags of `command` (and of the subcommand used) that `matches` took from the
    /// environment.
    fn of(command: &clap::Command, matches: &ArgMatches) -> Sources {
        let mut sources = Sources::default();
        sources.collect(command, matches);
        sources
    }

    fn collect(&mut self, command: &clap::Command, matches: &ArgMatches) {
        for arg in command.get_arguments() {
            let (Some(long), Some(env)) = (arg.get_long(), arg.get_env()) else {
                continue;
            };
            let id = arg.get_id().as_str();
            let source = matches.value_source(id);
            if matches!(
                source,
                Some(ValueSource::EnvVariable | ValueSource::CommandLine)
            ) {
                self.set.push(long.to_owned());
            }
            if source == Some(ValueSource::EnvVariable) {
                let env = env.to_string_lossy().into_owned();
                self.from_env.push((long.to_owned(), env));
            }
        }
        if let Some((name, sub_matches)) = matches.subcommand()
            && let Some(sub) = command.find_subcommand(name)
        {
            self.collect(sub, sub_matches);
        }
    }

    /// Whether `--<flag>` was given (on the command line or by its variable), not defaulted.
    pub fn is_set(&self, flag: &str) -> bool {
        self.set.iter().any(|set| set == flag)
    }

    /// For a parse that failed: every flag of `command` (and its subcommands) whose variable
    /// is set while the flag itself is not on the command line.
    fn guessed(command: &clap::Command, argv: &[OsString]) -> Sources {
        let mut sources = Sources::default();
        let mut commands = vec![command];
        while let Some(command) = commands.pop() {
            commands.extend(command.get_subcommands());
            for arg in command.get_arguments() {
                let (Some(long), Some(env)) = (arg.get_long(), arg.get_env()) else {
                    continue;
                };
                let flag = format!("--{long}");
                let typed = argv.iter().any(|word| {
                    let word = word.to_string_lossy();
                    word == flag || word.starts_with(&format!("{flag}="))
                });
                if !typed && std::env::var_os(env).is_some() {
                    let env = env.to_string_lossy().into_owned();
                    sources.from_env.push((long.to_owned(), env));
                }
            }
        }
        sources
    }

    /// `message` with a note, after its first line, for each flag its first paragraph names
    /// (`--flag`) that was set from the environment. Not the usage lines after it: a flag they
    /// list had its note put inside the list of missing arguments (found by a first-user
    /// review).
    pub fn explain(&self, message: &str) -> String {
        let message = message.trim_end();
        let (first, rest) = message.split_once('\n').unwrap_or((message, ""));
        let error = message.split("\n\n").next().unwrap_or(message);
        let mut explained = first.to_owned();
        let mut noted = Vec::new();
        for flag in flags_named(error) {
            let Some((long, env)) = self.from_env.iter().find(|(long, _)| *long == flag) else {
                continue;
            };
            if !noted.contains(&long) {
                noted.push(long);
                explained.push_str(&format!(
                    "\n  note: --{long} was set by the environment variable {env}"
                ));
            }
        }
        if !rest.is_empty() {
            explained.push('\n');
            explained.push_str(rest);
        }
        explained
    }
}

/// The flags (without dashes) a message names as `--flag`.
fn flags_named(message: &str) -> Vec<&str> {
    message
        .match_indices("--")
        .filter_map(|(at, _)| {
            let rest = &message[at + 2..];
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
                .unwrap_or(rest.len());
            let flag = rest[..end].trim_end_matches('-');
            (!flag.is_empty()).then_some(flag)
        })
        .collect()
}

/// A parsed command line and where its values came from; or the exit status when parsing
/// already answered (help, version, a usage error, all printed).
pub fn parse(argv: Vec<OsString>) -> Result<(Cli, Sources), ExitCode> {
    let command = Cli::command();
    let parsed = command
        .clone()
        .try_get_matches_from(&argv)
        .and_then(|matches| Ok((Cli::from_arg_matches(&matches)?, matches)));
    match parsed {
        Ok((cli, matches)) => Ok((cli, Sources::of(&command, &matches))),
        Err(error) => Err(report_clap_error(&error, &command, &argv)),
    }
}

fn report_clap_error(error: &clap::Error, command: &clap::Command, argv: &[OsString]) -> ExitCode {
    use clap::error::ErrorKind;
    let text = error.render().to_string();
    match error.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
            // A closed stdout (`profile-state --help | head -1`) is no error worth reporting.
            let _ = std::io::stdout().write_all(text.as_bytes());
            ExitCode::SUCCESS
        }
        _ => {
            let explained = Sources::guessed(command, argv).explain(&text);
            let _ = writeln!(std::io::stderr(), "{explained}");
            ExitCode::from(EXIT_USAGE)
        }
    }
}

/// Runs what the command line asks for; returns the exit status.
pub fn run(cli: Cli, sources: &Sources) -> ExitCode {
    owner_only_files();
    match cli.command {
        None => serve::run(cli.serve, sources),
        Some(Command::DeadLetters(args)) => dead_letters::run(args, sources),
        Some(Command::Backup(args)) => backup::run(args, sources),
        Some(Command::Restore(args)) => restore::run(args, sources),
        Some(Command::Reconcile(args)) => reconcile::run(args, sources),
    }
}

/// Every file and directory the binary creates (a data directory's journal, snapshots, dead
/// letters; a restore; a backup) is its owner's only, whatever umask it was started under: they
/// hold customers' personal data. A shell or a container usually gives 022, under which an
/// existing data directory's files were readable by everyone (the systemd unit sets
/// `UMask=0077` too). The library leaves the umask of a process that embeds it alone.
fn owner_only_files() {
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
}

/// Prints `profile-state: <message>` (with notes on flags set from the environment) to stderr,
/// its lines made [`printable`]: a message may quote a server's or Gameball's text.
pub fn print_error(sources: &Sources, message: &str) {
    let message = message.split('\n').map(printable).collect::<Vec<_>>();
    // One write, newline included: a log line written meanwhile by a thread still stopping
    // (the NATS client's "closed") landed between the message and its newline.
    let line = format!(
        "{}\n",
        sources.explain(&format!("profile-state: {}", message.join("\n")))
    );
    let _ = std::io::stderr().write_all(line.as_bytes());
}

/// `text` with each character a terminal does not simply print written as its Rust escape
/// (`\n`, `\u{1b}`, `\u{202e}`): every character [`hidden`] finds. What a subcommand prints
/// from a server or from Gameball (a reconcile job's failures, a dead letter's reason) could
/// otherwise move the terminal's cursor, recolour it, reorder a line or forge lines of a
/// tab-separated listing (found by adversarial runs).
pub fn printable(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(hidden) {
        return text.into();
    }
    let escape = |c: char| match hidden(c) {
        true => c.escape_debug().to_string(),
        false => c.to_string(),
    };
    text.chars().map(escape).collect::<String>().into()
}

/// Whether `c` is one a terminal does not simply print: a control character (newline and tab
/// included), or an invisible one that reorders or hides text (bidi marks, overrides and
/// isolates, zero-width characters, line and paragraph separators). One list for everything
/// the subcommands print, so that no output escapes fewer than the others (`dead-letters
/// show` escaped control bytes only, and printed a body's U+202E raw: a first-user review).
pub fn hidden(c: char) -> bool {
    // Listed rather than `escape_debug`'s own test, which also escapes combining marks (the
    // vowel marks of Arabic names among them).
    c.is_control()
        || matches!(c,
            '\u{061c}' | '\u{200b}'..='\u{200f}' | '\u{2028}'..='\u{202e}'
            | '\u{2060}'..='\u{206f}' | '\u{feff}' | '\u{fff9}'..='\u{fffb}')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_printed_escaped() {
        assert_eq!(
            printable("plain: text, \"quoted\" \\ 'é'"),
            "plain: text, \"quoted\" \\ 'é'"
        );
        assert_eq!(
            printable("left\u{202e}right\u{200b}\u{2028}\u{2066}"),
            "left\\u{202e}right\\u{200b}\\u{2028}\\u{2066}"
        );
        // An Arabic name with its vowel marks (combining characters) is printed as it is.
        assert_eq!(printable("مُحَمَّد"), "مُحَمَّد");
        assert_eq!(
            printable("a\tb\nc\u{1b}[2Jd\u{7f}é"),
            "a\\tb\\nc\\u{1b}[2Jd\\u{7f}é"
        );
    }

    #[test]
    fn flags_are_found_in_messages_of_both_kinds() {
        assert_eq!(
            flags_named("invalid value 'x' for '--max-body-bytes <MAX_BODY_BYTES>': invalid"),
            ["max-body-bytes"]
        );
        assert_eq!(
            flags_named("--history-events must be at least 1; see --help, not -- alone"),
            ["history-events", "help"]
        );
    }

    #[test]
    fn a_note_names_the_variable_of_each_flag_set_from_it() {
        let sources = Sources {
            from_env: vec![("data-dir".into(), "PROFILE_STATE_DATA_DIR".into())],
            set: vec!["data-dir".into()],
        };
        let explained = sources.explain(
            "the argument '--ephemeral' cannot be used with '--data-dir <DIR>'\n\nUsage: x\n",
        );
        assert_eq!(
            explained,
            "the argument '--ephemeral' cannot be used with '--data-dir <DIR>'\n  note: \
             --data-dir was set by the environment variable PROFILE_STATE_DATA_DIR\n\nUsage: x"
        );
        assert_eq!(sources.explain("--ephemeral alone"), "--ephemeral alone");
        // A flag only the usage names is not the error's.
        let missing = "the following required arguments were not provided:\n  <IDS>...\n\n\
                       Usage: x --data-dir <DIR> <IDS>...";
        assert_eq!(sources.explain(missing), missing);
    }

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }
}
