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
use crate::dead_letters::{Cursor, DeadLetter, DeadLetterError, DeadLetterId, DeadLetters, Purge};
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

/// AdminService's dead-letter RPCs.
pub struct DeadLetterApi {
    dead_letters: DeadLetters,
    ingest: Ingest,
}

impl DeadLetterApi {
    /// A service over the dead letters `ingest` keeps, replaying through `ingest`.
    pub fn new(ingest: Ingest) -> Self {
        DeadLetterApi {
            dead_letters: ingest.dead_letters().clone(),
            ingest,
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

fn letter(letter: &DeadLetter) -> pb::DeadLetter {
    pb::DeadLetter {
        id: letter.id.to_string(),
        received_at: Some(timestamp(letter.received_at)),
        last_received_at: Some(timestamp(letter.last_received_at)),
        delivery_count: letter.deliveries,
        reason: letter.reason.clone(),
        field: letter.field.clone().unwrap_or_default(),
        body: letter.body.clone(),
    }
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
        Ok(Response::new(pb::ListDeadLettersResponse {
            dead_letters: page.letters.iter().map(|l| letter(l)).collect(),
            next_page_token: page.next.map(|next| next.encode()).unwrap_or_default(),
            total_count: self.dead_letters.len() as u64,
        }))
    }

    /// AdminService.GetDeadLetter.
    pub async fn get_dead_letter(
        &self,
        request: Request<pb::GetDeadLetterRequest>,
    ) -> Result<Response<pb::GetDeadLetterResponse>, Status> {
        let id = id(&request.into_inner().id)?;
        let found = self
            .dead_letters
            .get(&id)
            .await
            .map_err(unavailable)?
            .ok_or_else(|| grpc_status(Error::DeadLetterNotFound { id: id.to_string() }))?;
        Ok(Response::new(pb::GetDeadLetterResponse {
            dead_letter: Some(letter(&found)),
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
        let removed = self.dead_letters.purge(which).await.map_err(unavailable)?;
        tracing::info!(purged = removed.len(), "dead letters purged");
        let removed_ids: HashSet<&str> = removed.iter().map(DeadLetterId::as_str).collect();
        let missing_ids = request
            .ids
            .iter()
            .filter(|text| !removed_ids.contains(text.as_str()))
            .cloned()
            .collect();
        Ok(Response::new(pb::PurgeDeadLettersResponse {
            purged_count: removed.len() as u64,
            missing_ids,
        }))
    }
}
