//! The webhook ingress: `POST /webhooks/gameball`, the HTTP adapter in front of the sequencer.
//!
//! In order: Content-Type (415), body size (413), signature (401), JSON and field validation
//! (400), then the sequencer. The answer is 200 only after the sequencer has made the update
//! visible, so a 2xx means recorded. Nothing here merges or stores; statuses come from
//! `crate::status`, the one place that maps errors for both HTTP and gRPC.

pub mod payload;
pub mod signature;

use std::sync::Arc;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::post;
use serde_json::json;

use crate::error::Error;
use crate::sequencer::{Applied, Sequencer};
use crate::status;
use payload::Delivery;
use signature::SignatureCheck;

/// The path Gameball posts to.
pub const PATH: &str = "/webhooks/gameball";

/// What the handler needs: cheap to clone, shared by every request.
#[derive(Clone)]
pub struct Ingress {
    sequencer: Sequencer,
    /// `None` only under `--insecure-skip-signature`.
    signature: Option<Arc<SignatureCheck>>,
    max_body_bytes: usize,
}

impl Ingress {
    /// An ingress that hands updates to `sequencer`. With `secret` `None`, signatures are not
    /// checked.
    pub fn new(sequencer: Sequencer, secret: Option<&str>, max_body_bytes: usize) -> Self {
        Ingress {
            sequencer,
            signature: secret.map(|secret| Arc::new(SignatureCheck::new(secret))),
            max_body_bytes,
        }
    }

    /// The axum router serving the webhook path.
    pub fn router(self) -> Router {
        Router::new().route(PATH, post(receive)).with_state(self)
    }
}

async fn receive(State(ingress): State<Ingress>, headers: HeaderMap, body: Body) -> Response {
    match ingress.handle(&headers, body).await {
        Ok(answer) => (StatusCode::OK, Json(answer)).into_response(),
        Err(error) => error_response(&error),
    }
}

impl Ingress {
    async fn handle(&self, headers: &HeaderMap, body: Body) -> Result<serde_json::Value, Error> {
        check_content_type(headers)?;
        let raw = read_body(body, self.max_body_bytes).await?;
        let parsed = serde_json::from_slice::<serde_json::Value>(&raw);
        if let Some(check) = &self.signature {
            let claimed = headers
                .get(signature::HEADER)
                .map(|value| value.to_str().unwrap_or_default());
            check.verify(claimed, &raw, parsed.as_ref().ok())?;
        }
        let parsed = parsed.map_err(|err| Error::invalid("body", format!("not JSON: {err}")))?;
        match payload::parse(&parsed)? {
            Delivery::Other { event } => {
                tracing::debug!(%event, "ignored a webhook of another topic");
                Ok(json!({"outcome": "ignored", "event": event}))
            }
            Delivery::ProfileUpdated(update) => {
                let client_id = update.key.client_id.clone();
                let applied = self.sequencer.apply(update).await?;
                tracing::debug!(%client_id, ?applied, "webhook applied");
                Ok(match applied {
                    Applied::Changed { revision } => {
                        json!({"outcome": "applied", "revision": revision})
                    }
                    Applied::Unchanged { revision } => {
                        json!({"outcome": "unchanged", "revision": revision})
                    }
                })
            }
        }
    }
}

/// A missing Content-Type is accepted (some senders omit it); anything but JSON is not.
fn check_content_type(headers: &HeaderMap) -> Result<(), Error> {
    let Some(value) = headers.get(header::CONTENT_TYPE) else {
        return Ok(());
    };
    let text = value.to_str().unwrap_or_default();
    let essence = text.split(';').next().unwrap_or_default().trim();
    let essence = essence.to_ascii_lowercase();
    if essence == "application/json" || essence.ends_with("+json") {
        return Ok(());
    }
    Err(Error::UnsupportedMediaType {
        content_type: text.to_owned(),
    })
}

async fn read_body(body: Body, limit: usize) -> Result<Bytes, Error> {
    axum::body::to_bytes(body, limit).await.map_err(|err| {
        let too_large = std::error::Error::source(&err)
            .is_some_and(|source| source.is::<http_body_util::LengthLimitError>());
        if too_large {
            Error::PayloadTooLarge { limit }
        } else {
            Error::invalid("body", format!("could not be read: {err}"))
        }
    })
}

/// `{"error": "...", "field": "..."}` with the status `crate::status` assigns.
fn error_response(error: &Error) -> Response {
    let mut body = json!({"error": error.to_string()});
    if let Some(field) = error.field() {
        body["field"] = json!(field);
    }
    (status::http_status(error), Json(body)).into_response()
}
