//! profile-state keeps the current state of Gameball customer profiles, fed by signed
//! `customer.profile.updated` webhooks, and serves it over gRPC: point reads, paged lists and
//! watch streams of changes.
//!
//! Components, in the order a webhook meets them:
//! - [`webhook`]: the HTTP ingress (axum). Checks Content-Type, size, `X-GB-Signature`, and
//!   validates the payload into a [`profile::ProfileUpdate`].
//! - [`dead_letters`]: signed deliveries that cannot be applied, kept (durably) with their
//!   reason and raw body for operators to list, replay or purge.
//! - [`sequencer`]: the only writer. Merges updates in batches, numbers the changes, journals
//!   and syncs each batch once, commits it to the store, then answers.
//! - [`profile`]: the profile and its merge rules, a pure function of (state, update).
//! - [`store`]: current profiles, the ordered key index, the recent change history and the
//!   published revision; read by everyone, written by the sequencer.
//! - [`journal`]: the durable log of group commits, snapshots, compaction and recovery; and
//!   [`data_dir`]: its directory, lock and store id.
//! - [`watch`]: one subscriber's feed: initial state, history replay, live changes, progress.
//! - [`grpc`]: the gRPC adapter (tonic) for `gameball.profiles.v1.ProfileService`, and for
//!   `AdminService` (dead letters).
//! - [`error`] and [`status`]: the one error type, and its one mapping to HTTP and gRPC.
//! - [`config`] and [`server`]: flags, and the wiring that binds, serves and shuts down.
//! - [`reconcile`]: reads customers back from Gameball's REST API as updates, to heal profiles
//!   whose webhooks were lost (the client side; not yet wired into the server).
//!
//! The domain (`profile`, `store`, `sequencer`, `journal`, `watch`, `dead_letters`) knows
//! nothing of axum or tonic.
#![warn(missing_docs)]

pub mod admin;
pub mod config;
pub mod data_dir;
pub mod dead_letters;
pub mod error;
pub mod grpc;
pub mod journal;
pub mod metrics;
pub mod profile;
pub mod reconcile;
pub mod sequencer;
pub mod server;
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
pub use server::Server;
