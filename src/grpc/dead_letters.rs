//! AdminService's dead-letter RPCs, for operators (`super::admin` routes them here). (The
//! admin HTTP listener, metrics and health, is `crate::monitoring`.)
//!
//! Each RPC checks its request, calls [`DeadLetters`] (or, to replay, the ingest path), and
//! converts the result; errors go through `crate::status`. Replay is [`Ingest::replay`]: the
//! webhook's own path, minus the signature, which was verified when the body arrived; this
//! adapter keeps no rules of its own. Authentication is wired up in `crate::server`, like the
//! rest of the gRPC API.

use std::collections::HashSet;

use tonic::{Request, Response, Status};

use super::convert::timestamp;
use crate::dead_letters::{
    Cursor, DeadLetter, DeadLetterError, DeadLetterId, DeadLetters, Page, Purge,
};
use crate::error::Error;
use crate::ingest::{Ingest, Outcome};
use crate::pb;
use crate::sequencer::Applied;
use crate::status::grpc_status;

/// ListDeadLetters page size when the request says 0.
pub const DEFAULT_PAGE_SIZE: usize = 50;
/// Largest ListDeadLetters page; larger requests are capped.
pub const MAX_PAGE_SIZE: usize = 500;
/// Bodies per ListDeadLetters page, past its first letter: well under the 4 MiB that gRPC
/// clients accept by default.
const PAGE_BODY_BYTES: usize = 1 << 20;
/// The largest message gRPC clients accept by default (tonic, grpc-go, grpcurl): a response
/// stays under it whatever `--grpc-max-message-bytes` allows, so every client can read it.
const CLIENT_DEFAULT_MESSAGE_BYTES: usize = 4 << 20;
/// Room kept in a response for what is not a letter (the page token, the count, framing).
const RESPONSE_RESERVE_BYTES: usize = 256;

/// AdminService's dead-letter RPCs.
pub struct DeadLetterApi {
    dead_letters: DeadLetters,
    ingest: Ingest,
    /// The encoded letters one response may carry.
    response_bytes: usize,
}

impl DeadLetterApi {
    /// A service over the dead letters `ingest` keeps, replaying through `ingest`; its responses
    /// stay under `max_message_bytes` (`--grpc-max-message-bytes`), cutting a body if need be.
    pub fn new(ingest: Ingest, max_message_bytes: usize) -> Self {
        let response_bytes = max_message_bytes
            .min(CLIENT_DEFAULT_MESSAGE_BYTES)
            .saturating_sub(RESPONSE_RESERVE_BYTES);
        DeadLetterApi {
            dead_letters: ingest.dead_letters().clone(),
            ingest,
            response_bytes,
        }
    }
}

fn id(text: &str) -> Result<DeadLetterId, Status> {
    DeadLetterId::parse(text).map_err(|error| grpc_status(&error))
}

/// Storage trouble: logged in full, answered UNAVAILABLE with a generic message.
fn unavailable(error: DeadLetterError) -> Status {
    grpc_status(error.unavailable())
}

/// `letter` with the part of its body from `offset` on that fits in `room` bytes of response
/// (its encoding, framing included); the whole body if it fits.
fn letter(letter: &DeadLetter, offset: usize, room: usize) -> pb::DeadLetter {
    let mut reply = pb::DeadLetter {
        id: letter.id.to_string(),
        received_at: Some(timestamp(letter.received_at)),
        last_received_at: Some(timestamp(letter.last_received_at)),
        delivery_count: letter.deliveries,
        reason: letter.reason.clone(),
        field: letter.field.clone().unwrap_or_default(),
        body: Vec::new(),
        body_size: letter.body.len() as u64,
        body_truncated: true,
    };
    // The body's tag and length take at most 6 bytes, the truncation flag 2.
    let body_room = room.saturating_sub(framed(&reply) + 6);
    let rest = &letter.body[offset.min(letter.body.len())..];
    let part = &rest[..rest.len().min(body_room)];
    reply.body_truncated = part.len() < rest.len();
    reply.body = part.to_vec();
    reply
}

/// A letter's bytes inside a response, with its tag and length (field 1 in both responses).
fn framed(reply: &pb::DeadLetter) -> usize {
    prost::encoding::message::encoded_len(1, reply)
}

/// The page's letters that fit in `room` bytes, and where the next page starts. A first letter
/// too large on its own comes with its body cut; a later one that does not fit whole starts the
/// next page, where it is first.
fn fit(page: Page, room: usize) -> (Vec<pb::DeadLetter>, Option<Cursor>) {
    let mut replies: Vec<pb::DeadLetter> = Vec::with_capacity(page.letters.len());
    let mut used = 0;
    for (index, kept) in page.letters.iter().enumerate() {
        let left = room - used;
        let reply = letter(kept, 0, left);
        let size = framed(&reply);
        if index > 0 && (reply.body_truncated || size > left) {
            return (replies, Some(page.letters[index - 1].cursor()));
        }
        used += size.min(left);
        let cut = reply.body_truncated;
        replies.push(reply);
        if cut && page.letters.len() > 1 {
            return (replies, Some(kept.cursor()));
        }
    }
    (replies, page.next)
}

impl DeadLetterApi {
    /// AdminService.ListDeadLetters.
    pub async fn list_dead_letters(
        &self,
        request: Request<pb::ListDeadLettersRequest>,
    ) -> Result<Response<pb::ListDeadLettersResponse>, Status> {
        let request = request.into_inner();
        let page_size = super::page_size(request.page_size, DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)?;
        let after = match request.page_token.as_str() {
            "" => None,
            token => Some(Cursor::decode(token).map_err(|e| grpc_status(&e))?),
        };
        let page = self
            .dead_letters
            .list(after.as_ref(), page_size, PAGE_BODY_BYTES)
            .await
            .map_err(unavailable)?;
        let (dead_letters, next) = fit(page, self.response_bytes);
        Ok(Response::new(pb::ListDeadLettersResponse {
            dead_letters,
            next_page_token: next.map(|next| next.encode()).unwrap_or_default(),
            total_count: self.dead_letters.len() as u64,
        }))
    }

    /// AdminService.GetDeadLetter.
    pub async fn get_dead_letter(
        &self,
        request: Request<pb::GetDeadLetterRequest>,
    ) -> Result<Response<pb::GetDeadLetterResponse>, Status> {
        let request = request.into_inner();
        let id = id(&request.id)?;
        let found = self
            .dead_letters
            .get(&id)
            .await
            .map_err(unavailable)?
            .ok_or_else(|| grpc_status(Error::DeadLetterNotFound { id: id.to_string() }))?;
        let offset = usize::try_from(request.body_offset)
            .ok()
            .filter(|&offset| offset <= found.body.len())
            .ok_or_else(|| {
                let reason = format!("is past the body's end ({} bytes)", found.body.len());
                grpc_status(Error::invalid("body_offset", reason))
            })?;
        Ok(Response::new(pb::GetDeadLetterResponse {
            dead_letter: Some(letter(&found, offset, self.response_bytes)),
        }))
    }

    /// AdminService.ReplayDeadLetter.
    pub async fn replay_dead_letter(
        &self,
        request: Request<pb::ReplayDeadLetterRequest>,
    ) -> Result<Response<pb::ReplayDeadLetterResponse>, Status> {
        let id = id(&request.into_inner().id)?;
        let outcome = self.ingest.replay(&id).await.map_err(grpc_status)?;
        let (outcome, revision, event) = match outcome {
            Outcome::Applied(Applied::Changed { revision }) => {
                (pb::ReplayOutcome::Applied, revision, String::new())
            }
            Outcome::Applied(Applied::Unchanged { revision }) => {
                (pb::ReplayOutcome::Unchanged, revision, String::new())
            }
            Outcome::Ignored(event) => (pb::ReplayOutcome::Ignored, 0, event),
        };
        Ok(Response::new(pb::ReplayDeadLetterResponse {
            outcome: outcome.into(),
            revision,
            event,
        }))
    }

    /// AdminService.PurgeDeadLetters.
    pub async fn purge_dead_letters(
        &self,
        request: Request<pb::PurgeDeadLettersRequest>,
    ) -> Result<Response<pb::PurgeDeadLettersResponse>, Status> {
        let request = request.into_inner();
        let which = match (request.all, request.ids.is_empty()) {
            (true, true) => Purge::All,
            (false, false) => {
                let ids = request.ids.iter().enumerate().map(|(index, text)| {
                    DeadLetterId::parse(text).map_err(|_| {
                        let reason = "must be 40 lowercase hex digits (the SHA-1 of the body)";
                        grpc_status(Error::invalid(format!("ids[{index}]"), reason))
                    })
                });
                Purge::Ids(ids.collect::<Result<_, _>>()?)
            }
            (true, false) => {
                let error = Error::invalid("ids", "must be empty when all is set");
                return Err(grpc_status(&error));
            }
            (false, true) => {
                let error = Error::invalid("ids", "name the letters to purge, or set all");
                return Err(grpc_status(&error));
            }
        };
        let purged = self.dead_letters.purge(which).await.map_err(unavailable)?;
        tracing::info!(
            purged = purged.removed.len(),
            left_to_replays = purged.replaying.len(),
            "dead letters purged"
        );
        let found: HashSet<&str> = (purged.removed.iter())
            .chain(&purged.replaying)
            .map(DeadLetterId::as_str)
            .collect();
        let missing_ids = request
            .ids
            .iter()
            .filter(|text| !found.contains(text.as_str()))
            .cloned()
            .collect();
        Ok(Response::new(pb::PurgeDeadLettersResponse {
            purged_count: purged.removed.len() as u64,
            missing_ids,
            replaying_ids: purged.replaying.iter().map(ToString::to_string).collect(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use chrono::{TimeZone as _, Utc};

    use super::*;

    fn kept(body: &[u8], second: u32) -> Arc<DeadLetter> {
        let at = Utc.with_ymd_and_hms(2026, 12, 3, 0, 0, second).unwrap();
        Arc::new(DeadLetter {
            id: DeadLetterId::of(body),
            received_at: at,
            last_received_at: at,
            deliveries: 1,
            reason: "invalid data.tier_order: must be a 32-bit signed integer".into(),
            field: Some("data.tier_order".into()),
            body: body.to_vec(),
        })
    }

    fn page(bodies: &[&[u8]]) -> Page {
        let letters: Vec<_> = (0..).zip(bodies).map(|(n, b)| kept(b, n)).collect();
        Page {
            letters,
            next: None,
        }
    }

    fn encoded(replies: &[pb::DeadLetter]) -> usize {
        replies.iter().map(framed).sum()
    }

    /// Whatever the room, a page's letters fit in it, at least one comes, and a cut letter
    /// comes alone (unless it is the page's only one).
    #[test]
    fn a_page_fits_its_room_and_a_cut_letter_comes_alone() {
        let bodies: [&[u8]; 5] = [&[b'a'; 100], &[], &[b'c'; 700], &[b'd'; 3], &[b'e'; 2000]];
        for room in (200..4000).step_by(13) {
            let mut rest = &bodies[..];
            while !rest.is_empty() {
                let (replies, next) = fit(page(rest), room);
                assert!(!replies.is_empty(), "room {room}");
                assert!(
                    encoded(&replies) <= room,
                    "room {room}: {}",
                    encoded(&replies)
                );
                let cut = replies.iter().filter(|r| r.body_truncated).count();
                assert!(cut == 0 || replies.len() == 1, "room {room}");
                assert_eq!(next.is_some(), replies.len() < rest.len(), "room {room}");
                rest = &rest[replies.len()..];
            }
        }
    }

    /// An empty body is never "truncated", so a letter that is all metadata must be measured
    /// whole before it joins a page.
    #[test]
    fn a_letter_of_metadata_alone_that_does_not_fit_starts_the_next_page() {
        let first = page(&[b"{}"]);
        let whole = framed(&letter(&first.letters[0], 0, usize::MAX));
        let empty = framed(&letter(&kept(b"", 1), 0, usize::MAX));
        let (replies, next) = fit(page(&[b"{}", b""]), whole + empty - 1);
        assert_eq!(replies.len(), 1);
        assert_eq!(next, Some(first.letters[0].cursor()));
    }

    #[test]
    fn a_part_starts_at_its_offset_and_says_whether_more_follows() {
        let body: Vec<u8> = (0..=255).collect();
        let letter_of = |offset, room| letter(&kept(&body, 0), offset, room);
        let metadata = framed(&letter_of(0, 0)) + 6;
        let part = letter_of(10, metadata + 100);
        assert_eq!(
            (part.body.as_slice(), part.body_truncated),
            (&body[10..110], true)
        );
        let last = letter_of(200, metadata + 100);
        assert_eq!(
            (last.body.as_slice(), last.body_truncated),
            (&body[200..], false)
        );
        assert_eq!(last.body_size, 256);
    }
}
