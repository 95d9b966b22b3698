//! profile-state keeps the current state of Gameball customer profiles, fed by signed
//! `customer.profile.updated` webhooks, and serves it over gRPC: point reads, paged lists and
//! watch streams of changes.
//!
//! Components, in the order a webhook meets them:
//! - [`webhook`]: the HTTP ingress (axum). Checks Content-Type, size and `X-GB-Signature`,
//!   then hands the body to the ingest path.
//! - [`ingest`]: the one ingest path, shared with the AdminService's replay: validates the
//!   payload into a [`profile::ProfileUpdate`], records it through the sequencer (or, on a
//!   replica, the stream), or keeps it as a dead letter.
//! - [`dead_letters`]: signed deliveries that cannot be applied, kept (durably) with their
//!   reason and raw body for operators to list, replay or purge.
//! - [`sequencer`]: the only writer. Merges updates in batches, numbers the changes, journals
//!   and syncs each batch once, commits it to the store, then answers.
//! - [`profile`]: the profile and its merge rules, a pure function of (state, update).
//! - [`store`]: current profiles, the ordered key index, the recent change history and the
//!   published revision; read by everyone, written by the sequencer (and by recovery, before
//!   anything is served).
//! - [`journal`]: the durable log of group commits, snapshots, compaction and recovery;
//!   [`data_dir`]: its directory, lock and store id; [`startup`]: recovery at start-up,
//!   including the operator's explicit giving-up of a damaged journal.
//! - [`watch`]: the watch layer beside the store: routes each committed batch (the
//!   sequencer's commit hook) and runs one feed per subscriber: initial state, history replay,
//!   live changes, progress.
//! - [`grpc`]: the gRPC adapter (tonic) for `gameball.profiles.v1.ProfileService`, and for
//!   `AdminService` (dead letters).
//! - [`error`] and [`status`]: the domain's error type, the adapters' transport-level
//!   refusals, and their one mapping to HTTP and gRPC.
//! - [`config`] and [`server`]: flags, and the wiring that binds, serves and shuts down;
//!   [`listen_addr`]: listener addresses (IPs or host names); [`logging`]: log output;
//!   [`cli`]: the command line (serving, and the operators' subcommands).
//! - [`replication`]: replicated mode (`--nats-url`): a replica's start-up from a local or
//!   published snapshot, its publisher (the ingest path's recorder instead of the sequencer),
//!   its applier (the one writer, applying the stream through the sequencer's merge), its
//!   snapshots, lag and readiness.
//! - [`jetstream`]: the NATS JetStream adapter for replicated mode: the update stream, its
//!   ordered reader, snapshot and dead-letter buckets.
//! - [`reconcile`]: reads customers back from Gameball's REST API as updates, to heal profiles
//!   whose webhooks were lost (the client side; not yet wired into the server).
//!
//! The domain (`profile`, `store`, `sequencer`, `journal`, `watch`, `ingest`, `dead_letters`)
//! knows nothing of axum, tonic or NATS.
#![warn(missing_docs)]

pub mod activity;
pub mod cli;
pub mod config;
pub mod data_dir;
pub mod dead_letters;
pub mod error;
pub mod grpc;
pub mod ingest;
pub mod io_error;
pub mod jetstream;
pub mod journal;
pub mod listen_addr;
pub mod logging;
pub mod metrics;
pub mod monitoring;
pub mod poison;
pub mod profile;
pub mod reconcile;
pub mod replication;
pub mod sequencer;
pub mod server;
pub mod startup;
pub mod status;
pub mod store;
pub mod watch;
pub mod webhook;

/// Generated protobuf types and gRPC stubs for `gameball.profiles.v1`.
#[allow(missing_docs, clippy::large_enum_variant)]
pub mod pb {
    tonic::include_proto!("gameball.profiles.v1");

    /// Encoded descriptors of our protos (imports included), served by reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("profiles_descriptor");
}

pub use config::Config;

/// Gameball's signed sample deliveries, for the unit tests (the same file `tests/` and the fuzz
/// model include).
#[cfg(test)]
#[path = "../tests/fixtures/mod.rs"]
mod fixtures;
#[cfg(test)]
mod yield_probe;
pub use server::Server;
