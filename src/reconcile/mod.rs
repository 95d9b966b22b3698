//! Reconciliation from Gameball's REST API (issue 15): reading the truth about customers from
//! the source, to heal profiles whose webhooks Gameball gave up on.
//!
//! Gameball drops a webhook after three failed retries, so an outage, a secret rotated on one
//! side only or a dead letter that cannot be replayed leaves a profile wrong until the customer
//! changes again. This module reads customers back from the API and turns each into a
//! [`ProfileUpdate`](crate::profile::ProfileUpdate) clocked at the fetch time, to go through the
//! same sequencer and merge rules as a webhook.
//!
//! - [`account`]: one account's API settings (keys from the secrets file, base URL, version,
//!   the share of the rate limits to use).
//! - [`limiter`]: a sliding-window limiter keeping every window of a rate bucket at once.
//! - [`client`]: the HTTP client: keys, limits, bounded concurrency, timeouts, retries with
//!   backoff and `Retry-After`, failures classified ([`error`]).
//! - [`answers`]: the documented answers, read into the values a profile holds.
//! - [`mapping`]: those values as a `ProfileUpdate`, and the drift from a stored profile.
//! - [`fetch`]: whole customers, one by one or with the balance inquiry batch, cancellable.
//! - [`jobs`]: reconcile jobs: select profiles, fetch them, apply them through the sequencer
//!   as updates of origin `Reconcile`, report progress; bounded, cancelled at shutdown.
//! - [`schedule`]: `--reconcile-every`, a periodic job per account.
//! - `waiting`: the line of scheduled jobs waiting for room, longest without a job first.
//!
//! This module knows nothing of axum or tonic: the admin RPCs are `crate::grpc::reconcile`, an
//! adapter over [`ReconcileJobs`]. Only `jobs` knows the store and the sequencer.

pub mod account;
pub mod answers;
pub mod client;
pub mod error;
pub mod fetch;
pub mod jobs;
pub mod limiter;
pub mod mapping;
pub mod schedule;
mod waiting;

pub use account::{Account, AccountEntry, ApiVersion, Limits};
pub use client::{ClientOptions, GameballClient};
pub use error::{ApiError, Endpoint, FailureReason};
pub use fetch::{FetchOptions, FetchSummary, Fetcher, Outcome, Stopped};
pub use jobs::{JobReport, JobState, ReconcileJobs, ReconcileOptions, Selection};
pub use limiter::{RateLimiter, Window};
pub use mapping::{Fetched, drift};
