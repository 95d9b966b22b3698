//! `profile-state dead-letters list|show|replay|purge`: the dead letters of a running server,
//! over AdminService, so operators need not write grpcurl calls.
//!
//! Results go to stdout (`list` one letter a line, or one JSON object a line with `--json`;
//! `show` the letter then its body, escaped as `super::printable` escapes, or raw with
//! `--body-only`), problems to stderr. Exit statuses: 0 when everything
//! asked for was done; 64 for a usage error (an id that is not 40 lowercase hex digits
//! included, found before connecting); 1 when the server cannot be reached or refuses (for
//! `replay`, when any letter could not be replayed: the others still are). This module
//! formats; the connection is `super::client`'s, the rules the server's.

use std::io::Write as _;
use std::process::ExitCode;

use serde_json::json;
use sha1::{Digest as _, Sha1};

use super::client::{AdminClient, Connection, refused, timeout_help};
use super::{Failure, Sources, hidden, printable};
use crate::dead_letters::DeadLetterId;
use crate::pb;

/// `profile-state dead-letters ...`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    action: Action,
}

#[derive(Debug, clap::Subcommand)]
enum Action {
    /// Lists every kept letter, oldest first: id, first arrival, deliveries, field, reason.
    #[command(mut_arg("timeout", timeout_help("each page of the list")))]
    List {
        /// One JSON object a line (without the body) instead of columns.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        connection: Connection,
    },
    /// Prints one letter's details, a blank line, then its raw body.
    #[command(mut_arg(
        "timeout",
        timeout_help("each part of the letter (a large body comes in several)")
    ))]
    Show {
        /// The letter's id (40 lowercase hex digits, as `list` prints).
        #[arg(value_parser = letter_id)]
        id: String,
        /// Print only the raw body, byte for byte.
        #[arg(long)]
        body_only: bool,
        #[command(flatten)]
        connection: Connection,
    },
    /// Applies letters again (after a fix), as their webhooks would have been; each one that
    /// applies is removed, each one that still cannot is kept with the new reason.
    #[command(mut_arg("timeout", timeout_help("each letter's replay")))]
    Replay {
        /// The letters' ids.
        #[arg(required = true, value_parser = letter_id)]
        ids: Vec<String>,
        #[command(flatten)]
        connection: Connection,
    },
    /// Removes letters for good: the given ones, or all with --all.
    #[command(mut_arg("timeout", timeout_help("the purge")))]
    Purge {
        /// The letters' ids.
        #[arg(value_parser = letter_id, required_unless_present = "all", conflicts_with = "all")]
        ids: Vec<String>,
        /// Remove every kept letter.
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        connection: Connection,
    },
}

/// An id as the server keeps them; anything else is refused before connecting.
fn letter_id(text: &str) -> Result<String, String> {
    DeadLetterId::parse(text)
        .map(|id| id.to_string())
        .map_err(|error| error.to_string())
}

/// Runs the action; returns the exit status.
pub fn run(args: Args, sources: &Sources) -> ExitCode {
    super::block_on(sources, async move {
        match args.action {
            Action::List { json, connection } => list(&mut connection.admin().await?, json).await,
            Action::Show {
                id,
                body_only,
                connection,
            } => show(&mut connection.admin().await?, id, body_only).await,
            Action::Replay { ids, connection } => {
                replay(&mut connection.admin().await?, ids, sources).await
            }
            Action::Purge {
                ids,
                all,
                connection,
            } => purge(&mut connection.admin().await?, ids, all).await,
        }
    })
}

async fn list(client: &mut AdminClient, json: bool) -> Result<(), Failure> {
    let mut out = std::io::stdout().lock();
    let mut page_token = String::new();
    let mut count = 0;
    let mut first_page = true;
    loop {
        let request = pb::ListDeadLettersRequest {
            page_size: 500,
            page_token,
        };
        let page = client
            .list_dead_letters(request)
            .await
            .map_err(|status| refused("listing dead letters", &status))?
            .into_inner();
        // After the first answer: a refusal prints no header over nothing.
        if !json && std::mem::take(&mut first_page) {
            write(&mut out, "ID\tFIRST ARRIVAL\tDELIVERIES\tFIELD\tREASON\n")?;
        }
        for letter in &page.dead_letters {
            let line = if json {
                format!("{}\n", summary(letter))
            } else {
                format!(
                    "{}\t{}\t{}\t{}\t{}\n",
                    letter.id,
                    time(letter.received_at.as_ref()),
                    letter.delivery_count,
                    if letter.field.is_empty() {
                        "-".into()
                    } else {
                        printable(&letter.field)
                    },
                    printable(&letter.reason)
                )
            };
            write(&mut out, &line)?;
        }
        count += page.dead_letters.len();
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    if count == 0 {
        eprintln!("no dead letters");
    }
    Ok(())
}

/// A letter without its body, as one JSON object.
fn summary(letter: &pb::DeadLetter) -> serde_json::Value {
    json!({
        "id": letter.id,
        "received_at": time(letter.received_at.as_ref()),
        "last_received_at": time(letter.last_received_at.as_ref()),
        "delivery_count": letter.delivery_count,
        "field": letter.field,
        "reason": letter.reason,
        "body_bytes": letter.body_size.max(letter.body.len() as u64),
    })
}

async fn show(client: &mut AdminClient, id: String, body_only: bool) -> Result<(), Failure> {
    let what = format!("dead letter {id}");
    let letter = body_part(client, &id, 0, &what).await?;
    let mut out = std::io::stdout().lock();
    if !body_only {
        let details = format!(
            "id: {}\nfirst arrival: {}\nlast arrival: {}\ndeliveries: {}\nfield: {}\nreason: {}\n\n",
            letter.id,
            time(letter.received_at.as_ref()),
            time(letter.last_received_at.as_ref()),
            letter.delivery_count,
            if letter.field.is_empty() {
                "-".into()
            } else {
                printable(&letter.field)
            },
            printable(&letter.reason),
        );
        write(&mut out, &details)?;
    }
    // A body too large for one response comes in parts.
    let mut digest = Sha1::new();
    let mut read = 0;
    let mut part = letter;
    let mut readable = Readable::default();
    loop {
        digest.update(&part.body);
        let shown = match body_only {
            true => std::borrow::Cow::Borrowed(&part.body[..]),
            false => readable.text(&part.body, !part.body_truncated).into(),
        };
        out.write_all(&shown)
            .map_err(|error| Failure::Failed(format!("writing to stdout: {error}")))?;
        read += part.body.len() as u64;
        if !part.body_truncated {
            break;
        }
        if part.body.is_empty() {
            return Err(Failure::Failed(format!(
                "{what}: the server sent an empty part of a body it said goes on"
            )));
        }
        let size = part.body_size;
        part = body_part(client, &id, read, &what)
            .await
            .map_err(|failure| {
                // Part of the body is on stdout already: say it is not all of it.
                Failure::Failed(format!(
                    "{failure}; the output holds only the first {read} of the body's {size} bytes"
                ))
            })?;
    }
    out.flush()
        .map_err(|error| Failure::Failed(format!("writing to stdout: {error}")))?;
    // A letter's id is its body's SHA-1: a body put together wrongly from its parts shows.
    if hex::encode(digest.finalize()) != id {
        return Err(Failure::Failed(format!(
            "{what}: the body read does not match the letter's id"
        )));
    }
    Ok(())
}

/// A body for a person to read, as it comes in parts: decoded as UTF-8, each character
/// [`hidden`] finds but newline and tab written as its escape (`\u{1b}`, `\u{202e}`), each
/// byte that is not UTF-8 as `\xNN`. An escape sequence in a body that is not JSON cleared or
/// recoloured the terminal (an adversarial run), and a bidi override reordered the lines after
/// it (a first-user review). `--body-only` keeps the bytes as they are.
#[derive(Default)]
struct Readable {
    /// The first bytes of a character that the last part ended in, the rest of which opens
    /// the next part (a part ends wherever the response's size limit falls).
    unfinished: Vec<u8>,
}

impl Readable {
    /// The text of `part`, after what the part before left unfinished; `last` when no part
    /// follows, so that a character left unfinished then is bytes that are not UTF-8.
    fn text(&mut self, part: &[u8], last: bool) -> Vec<u8> {
        let mut bytes = std::mem::take(&mut self.unfinished);
        bytes.extend_from_slice(part);
        let mut text = String::with_capacity(bytes.len() + 16);
        let mut chunks = bytes.utf8_chunks().peekable();
        while let Some(chunk) = chunks.next() {
            for c in chunk.valid().chars() {
                match hidden(c) && !matches!(c, '\n' | '\t') {
                    true => text.extend(c.escape_debug()),
                    false => text.push(c),
                }
            }
            let invalid = chunk.invalid();
            // A sequence cut short by the end of the bytes, not by a wrong byte.
            let cut_short = std::str::from_utf8(invalid).is_err_and(|e| e.error_len().is_none());
            if chunks.peek().is_none() && cut_short && !last {
                self.unfinished = invalid.to_vec();
            } else {
                text.extend(invalid.iter().map(|byte| format!("\\x{byte:02x}")));
            }
        }
        text.into_bytes()
    }
}

/// The letter with the part of its body from `offset` on.
async fn body_part(
    client: &mut AdminClient,
    id: &str,
    offset: u64,
    what: &str,
) -> Result<pb::DeadLetter, Failure> {
    let request = pb::GetDeadLetterRequest {
        id: id.to_owned(),
        body_offset: offset,
    };
    client
        .get_dead_letter(request)
        .await
        .map_err(|status| refused(what, &status))?
        .into_inner()
        .dead_letter
        .ok_or_else(|| Failure::Failed(format!("{what}: the server sent no letter")))
}

/// Replays each letter in turn, printing each refusal as it comes and going on with the next;
/// a `Failed` at the end if any was refused.
async fn replay(
    client: &mut AdminClient,
    ids: Vec<String>,
    sources: &Sources,
) -> Result<(), Failure> {
    let mut failed = 0;
    for id in ids {
        let request = pb::ReplayDeadLetterRequest { id: id.clone() };
        match client.replay_dead_letter(request).await {
            Ok(answer) => {
                let answer = answer.into_inner();
                let done = match answer.outcome() {
                    pb::ReplayOutcome::Applied => {
                        format!("applied at revision {}", answer.revision)
                    }
                    pb::ReplayOutcome::Unchanged => {
                        format!("unchanged at revision {}", answer.revision)
                    }
                    pb::ReplayOutcome::Ignored => format!("ignored event {}", answer.event),
                    pb::ReplayOutcome::Unspecified => "replayed".to_owned(),
                };
                write(&mut std::io::stdout(), &format!("{id}: {done}; removed\n"))?;
            }
            Err(status) => {
                failed += 1;
                // Printed as every subcommand's failure is (`Failure::report`): with the note
                // on a flag the refusal names that the environment set (`--token` by
                // PROFILE_STATE_TOKEN), which `eprintln!` left out.
                let failure = refused(&format!("replaying {id}"), &status);
                super::print_error(sources, &failure.to_string());
            }
        }
    }
    match failed {
        0 => Ok(()),
        n => Err(Failure::Failed(format!("{n} dead letter(s) not replayed"))),
    }
}

async fn purge(client: &mut AdminClient, ids: Vec<String>, all: bool) -> Result<(), Failure> {
    let answer = client
        .purge_dead_letters(pb::PurgeDeadLettersRequest { ids, all })
        .await
        .map_err(|status| refused("purging dead letters", &status))?
        .into_inner();
    let mut out = std::io::stdout().lock();
    write(&mut out, &format!("purged {}\n", answer.purged_count))?;
    for id in answer.missing_ids {
        write(&mut out, &format!("{id}: not kept\n"))?;
    }
    for id in &answer.replaying_ids {
        write(&mut out, &format!("{id}: being replayed, not purged\n"))?;
    }
    match answer.replaying_ids.len() {
        0 => Ok(()),
        n => Err(Failure::Failed(format!(
            "{n} dead letter(s) not purged: a replay held them (it removes a letter it applies; \
             purge again once it has ended)"
        ))),
    }
}

fn write(out: &mut impl std::io::Write, text: &str) -> Result<(), Failure> {
    out.write_all(text.as_bytes())
        .map_err(|error| Failure::Failed(format!("writing to stdout: {error}")))
}

/// A timestamp as RFC 3339 in UTC, to the second.
fn time(at: Option<&prost_types::Timestamp>) -> String {
    let Some(at) = at else {
        return "-".to_owned();
    };
    let Ok(seconds) = u64::try_from(at.seconds) else {
        return "-".to_owned();
    };
    let at = std::time::UNIX_EPOCH + std::time::Duration::from_secs(seconds);
    humantime::format_rfc3339_seconds(at).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `body` as `show` prints it when the server cuts it into parts at `cuts`.
    fn shown(body: &[u8], cuts: &[usize]) -> String {
        let mut readable = Readable::default();
        let mut text = Vec::new();
        let mut from = 0;
        for &to in cuts.iter().chain([&body.len()]) {
            text.extend(readable.text(&body[from..to], to == body.len()));
            from = to;
        }
        String::from_utf8(text).unwrap()
    }

    #[test]
    fn a_body_is_shown_with_what_hides_or_reorders_text_escaped() {
        let body = "{\"name\":\"a\u{202e}b\u{200b}c\u{2066}\"}\n\t\u{1b}[2J\u{9b}é مُحَمَّد";
        let escaped = "{\"name\":\"a\\u{202e}b\\u{200b}c\\u{2066}\"}\n\t\\u{1b}[2J\\u{9b}é مُحَمَّد";
        assert_eq!(shown(body.as_bytes(), &[]), escaped);
        // Cut anywhere, in the middle of a character too: the same text.
        for cut in 0..=body.len() {
            assert_eq!(shown(body.as_bytes(), &[cut]), escaped, "cut at {cut}");
        }
        // A character in three parts, one byte each.
        assert_eq!(shown("\u{202e}".as_bytes(), &[1, 2]), "\\u{202e}");
    }

    #[test]
    fn bytes_that_are_not_utf8_are_shown_as_hex_escapes() {
        assert_eq!(shown(b"a\xffb", &[]), "a\\xffb");
        // A character the body ends before finishing, and one a wrong byte breaks.
        assert_eq!(shown(b"a\xe2\x80", &[2]), "a\\xe2\\x80");
        assert_eq!(shown(b"\xe2\x80A\xe2", &[1]), "\\xe2\\x80A\\xe2");
    }
}
