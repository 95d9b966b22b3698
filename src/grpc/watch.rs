//! WatchProfiles, served by hand: each change is encoded once per response shape and the bytes
//! are shared by every subscriber that wants that shape. GetProfile is routed here too, so its
//! answer is written straight from the stored profile (`profile_reply`).
//!
//! tonic fixes the codec per method, and the generated one encodes a `pb::WatchProfilesResponse`
//! per subscriber: with 1,000 subscribers of a change that is 1,000 conversions and encodings
//! of the same message. Here the method is routed before the generated router sees it
//! ([`ProfileServiceRoutes`]) and served with [`WatchCodec`], which decodes the request with
//! prost and writes pre-encoded responses ([`Encoded`]) as they are. Every other RPC goes to the
//! generated `ProfileServiceServer` unchanged; the path, the request and the response types are
//! those of the proto, so reflection, grpcurl and generated clients see no difference.
//!
//! A change's bytes depend only on `include_previous` (the field, account and customer filters
//! choose *which* changes a subscriber gets, never how one is written), and only when the change
//! has a previous profile: [`SharedEncodings`] keeps at most two encodings per change. The
//! other events (initial state, `Synced`, `Progress`, `Reset`) are encoded per subscriber: they
//! are per-subscriber by nature or rare.
//!
//! What this module does not do: decide what a subscriber is sent (`crate::watch`), check
//! tokens (the interceptor around [`ProfileServiceRoutes`]), count calls (`transport`'s
//! metrics layer).

use std::collections::HashSet;
use std::convert::Infallible;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use prost::Message;
use tokio_stream::{Stream, StreamExt};
use tonic::codec::{BufferSettings, Codec, EnabledCompressionEncodings, EncodeBuf, Encoder};
use tonic::codegen::Body as HttpBody;
use tonic::codegen::{BoxFuture, Bytes, StdError, http};
use tonic::server::{Grpc, NamedService, ServerStreamingService, UnaryService};
use tonic::{Request, Response, Status};

use super::answer_bytes::TakesTurns;
use super::codec::{MessageCodec, MessageDecoder};
use super::profile_reply::ProfileReply;
use super::{
    ACCEPTED_ENCODINGS, DEFAULT_PROGRESS_INTERVAL, MAX_WATCH_FIELDS, MAX_WATCH_ID_BYTES,
    MAX_WATCH_IDS, MAX_WATCH_TEXT_BYTES, OpenWatch, ProfileApi, convert, fits_alone, transport,
};
use crate::error::Error;
use crate::pb;
use crate::pb::profile_service_server::ProfileServiceServer;
use crate::profile::Change;
use crate::status::{Rejection, grpc_status};
use crate::watch::{FieldSelector, OUTBOX_BYTES, OUTBOX_EVENTS, WatchEvent, WatchSpec};

/// The methods this module serves.
pub const WATCH_PROFILES_PATH: &str = "/gameball.profiles.v1.ProfileService/WatchProfiles";
const GET_PROFILE_PATH: &str = "/gameball.profiles.v1.ProfileService/GetProfile";
/// Changes whose encodings are kept: subscribers that keep up ask for the same few recent
/// revisions, so a small ring covers them; one reading far behind encodes again (correct, only
/// slower).
const SHARED_SLOTS: usize = 1024;

/// The first encode buffer of a stream: a change of a typical profile with its previous fits.
const STREAM_BUFFER_BYTES: usize = 1024;
/// Bytes tonic gathers from a stream before it hands them to HTTP/2: what a stream waiting for
/// room in its answer budgets holds uncounted (`answer_bytes`), so less than tonic's 32 KiB.
/// A change is a frame alone; only an initial state or a replay fills frames.
const STREAM_YIELD_BYTES: usize = super::answer_bytes::STREAM_FRAME_BYTES;

/// One whole `pb::WatchProfilesResponse`, already encoded; cloning shares the bytes.
#[derive(Clone, Debug)]
pub struct Encoded(Bytes);

/// ProfileService as served: WatchProfiles by [`WatchProfilesMethod`], everything else by the
/// generated server. Cloning it clones two `Arc`s.
#[derive(Clone)]
pub struct ProfileServiceRoutes {
    generated: ProfileServiceServer<ProfileApi>,
    api: Arc<ProfileApi>,
    /// Largest message decoded or encoded, as for the generated server.
    max_message_bytes: usize,
}

impl ProfileServiceRoutes {
    /// `api` served with `max_message_bytes` as the limit both ways, on every method.
    pub fn new(api: ProfileApi, max_message_bytes: usize) -> Self {
        let api = Arc::new(api);
        let mut generated = ProfileServiceServer::from_arc(Arc::clone(&api))
            .max_decoding_message_size(max_message_bytes)
            .max_encoding_message_size(max_message_bytes);
        for encoding in ACCEPTED_ENCODINGS {
            generated = generated.accept_compressed(encoding);
        }
        ProfileServiceRoutes {
            generated,
            api,
            max_message_bytes,
        }
    }
}

impl NamedService for ProfileServiceRoutes {
    const NAME: &'static str = <ProfileServiceServer<ProfileApi> as NamedService>::NAME;
}

impl<B> tower::Service<http::Request<B>> for ProfileServiceRoutes
where
    B: HttpBody + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let limit = Some(self.max_message_bytes);
        match request.uri().path() {
            WATCH_PROFILES_PATH => {
                let method = WatchProfilesMethod(Arc::clone(&self.api));
                Box::pin(async move {
                    let mut grpc = Grpc::new(WatchCodec)
                        .apply_max_message_size_config(limit, limit)
                        .apply_compression_config(accepted(), Default::default());
                    Ok(grpc.server_streaming(method, request).await)
                })
            }
            GET_PROFILE_PATH => {
                let method = GetProfileMethod(Arc::clone(&self.api));
                Box::pin(async move {
                    let codec = MessageCodec::<ProfileReply, pb::GetProfileRequest>::default();
                    let mut grpc = Grpc::new(codec)
                        .apply_max_message_size_config(limit, limit)
                        .apply_compression_config(accepted(), Default::default());
                    Ok(grpc.unary(method, request).await)
                })
            }
            _ => self.generated.call(request),
        }
    }
}

/// [`ACCEPTED_ENCODINGS`] as tonic's hand-written services take them.
fn accepted() -> EnabledCompressionEncodings {
    let mut accepted = EnabledCompressionEncodings::default();
    ACCEPTED_ENCODINGS
        .into_iter()
        .for_each(|encoding| accepted.enable(encoding));
    accepted
}

/// Decodes the request with prost; writes [`Encoded`] responses as they are.
#[derive(Clone, Copy, Debug, Default)]
pub struct WatchCodec;

impl Codec for WatchCodec {
    type Encode = Encoded;
    type Decode = pb::WatchProfilesRequest;
    type Encoder = PassThrough;
    type Decoder = MessageDecoder<pb::WatchProfilesRequest>;

    fn encoder(&mut self) -> PassThrough {
        PassThrough
    }

    fn decoder(&mut self) -> Self::Decoder {
        MessageDecoder::new(BufferSettings::default())
    }
}

/// Writes an [`Encoded`] message's bytes into the frame: the only copy of a shared encoding.
#[derive(Clone, Copy, Debug)]
pub struct PassThrough;

impl Encoder for PassThrough {
    type Item = Encoded;
    type Error = Status;

    fn encode(&mut self, item: Encoded, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        prost::bytes::BufMut::put_slice(dst, &item.0);
        Ok(())
    }

    /// A small first buffer: tonic allocates it per stream and keeps it while the stream is
    /// open, so with its 8 KiB default it was most of what an idle stream costs. It grows by
    /// as much again when several messages wait at once (up to tonic's 32 KiB before it
    /// yields), so a busy stream is no slower.
    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::new(STREAM_BUFFER_BYTES, STREAM_YIELD_BYTES)
    }
}

/// Encodings of recent changes, shared by every stream of one service.
///
/// A ring of slots indexed by revision, each behind its own mutex: a slot is held to look up
/// or make one change's encoding, so subscribers of different changes never wait for each
/// other, and subscribers of the same change wait for the one encoding they would otherwise
/// each have made. A slot names its change by pointer (a `Weak`, which keeps the address from
/// being reused), so a slot reused by a later revision, or a revision number that means another
/// change, is never mistaken for it.
pub struct SharedEncodings {
    slots: Box<[Mutex<Slot>]>,
}

#[derive(Default)]
struct Slot {
    change: Weak<Change>,
    /// Without and with `previous`.
    shapes: [Option<Bytes>; 2],
}

impl Default for SharedEncodings {
    fn default() -> Self {
        SharedEncodings {
            slots: (0..SHARED_SLOTS).map(|_| Mutex::default()).collect(),
        }
    }
}

impl SharedEncodings {
    /// `change` as a whole stream message, encoded at most once per shape while it stays in
    /// its slot.
    pub fn change(&self, change: &Arc<Change>, include_previous: bool) -> Encoded {
        // Without a previous profile both shapes are the same bytes.
        let shape = usize::from(include_previous && change.previous.is_some());
        let index = usize::try_from(change.revision % SHARED_SLOTS as u64).unwrap_or(0);
        // A panic while encoding cannot leave a slot half-written: it is only assigned whole.
        let mut slot = self.slots[index]
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !std::ptr::eq(slot.change.as_ptr(), Arc::as_ptr(change)) {
            *slot = Slot {
                change: Arc::downgrade(change),
                shapes: [None, None],
            };
        }
        let bytes = slot.shapes[shape].get_or_insert_with(|| {
            let message = convert::watch_change(change, include_previous);
            Bytes::from(message.encode_to_vec())
        });
        Encoded(bytes.clone())
    }
}

/// A watch event as a stream item: changes from `shared`, the rest encoded here; `End` becomes
/// the stream's final status, and so does a profile too large for a message (`limit`), named.
fn encode_event(
    event: WatchEvent,
    include_previous: bool,
    store_id: &str,
    (shared, limit): (&SharedEncodings, usize),
) -> Result<Encoded, Status> {
    let encode = |message: pb::WatchProfilesResponse| Encoded(Bytes::from(message.encode_to_vec()));
    match event {
        WatchEvent::Change(change) => {
            let encoded = shared.change(&change, include_previous);
            fits_alone(&change.profile, change.revision, encoded.0.len(), limit)?;
            Ok(encoded)
        }
        WatchEvent::Existing(profile) => {
            let existing = WatchEvent::Existing(Arc::clone(&profile));
            let encoded = encode(convert::watch_event(existing, include_previous, store_id)?);
            fits_alone(&profile, profile.revision, encoded.0.len(), limit)?;
            Ok(encoded)
        }
        other => convert::watch_event(other, include_previous, store_id).map(encode),
    }
}

/// The GetProfile method over a [`ProfileApi`]: the answer written straight from the stored
/// profile ([`ProfileReply`]).
struct GetProfileMethod(Arc<ProfileApi>);

impl UnaryService<pb::GetProfileRequest> for GetProfileMethod {
    type Response = ProfileReply;
    type Future = BoxFuture<Response<ProfileReply>, Status>;

    fn call(&mut self, request: Request<pb::GetProfileRequest>) -> Self::Future {
        let api = Arc::clone(&self.0);
        Box::pin(async move {
            let (profile, store_revision) = api.find_profile(request).await?;
            let store_id = api.store.shared_store_id();
            let reply = ProfileReply::new(profile, store_revision, store_id);
            let (profile, bytes) = (reply.profile(), Message::encoded_len(&reply));
            fits_alone(profile, profile.revision, bytes, api.max_message_bytes)?;
            Ok(Response::new(reply))
        })
    }
}

/// The WatchProfiles method over a [`ProfileApi`].
pub struct WatchProfilesMethod(Arc<ProfileApi>);

type EncodedStream = std::pin::Pin<Box<dyn Stream<Item = Result<Encoded, Status>> + Send>>;

impl ServerStreamingService<pb::WatchProfilesRequest> for WatchProfilesMethod {
    type Response = Encoded;
    type ResponseStream = EncodedStream;
    type Future = BoxFuture<Response<EncodedStream>, Status>;

    fn call(&mut self, request: Request<pb::WatchProfilesRequest>) -> Self::Future {
        let api = Arc::clone(&self.0);
        Box::pin(async move { api.watch_profiles_encoded(request).await })
    }
}

impl ProfileApi {
    /// Checks the request and the stream caps, opens the feed and returns its events encoded.
    async fn watch_profiles_encoded(
        &self,
        request: Request<pb::WatchProfilesRequest>,
    ) -> Result<Response<EncodedStream>, Status> {
        let connection = transport::Connection::of(&request);
        let queued = connection.map(|c| c.answer_bytes.queued_events());
        let connection_slot = match connection.map(|c| &c.watches) {
            Some(connection) => Some(connection.try_open().map_err(|limit| {
                self.metrics.watch_stream_refused("connection");
                grpc_status(Rejection::TooManyConnectionWatchStreams { limit })
            })?),
            None => None,
        };
        let request = request.into_inner();
        let include_previous = request.include_previous;
        let spec = watch_spec(request).map_err(|e| grpc_status(&e))?;
        let slot = Arc::clone(&self.watch_streams)
            .try_acquire_owned()
            .map_err(|_| {
                self.metrics.watch_stream_refused("server");
                grpc_status(Rejection::TooManyWatchStreams {
                    limit: self.max_watch_streams,
                })
            })?;
        let watch = self
            .watchers
            .open_caught_up(spec)
            .await
            .map_err(|e| grpc_status(&e))?;
        // Small on purpose: a subscriber that does not read holds at most this, the rest
        // stays in the history.
        // What it holds past a few changes counts toward its connection's cut (`answer_bytes`).
        let (events, received) = crate::watch::outbox_telling(OUTBOX_EVENTS, OUTBOX_BYTES, queued);
        self.tracker.spawn(watch.run(events, self.shutdown.clone()));
        let store = self.store.clone();
        let metrics = self.metrics.clone();
        let shared = Arc::clone(&self.encodings);
        let limit = self.max_message_bytes;
        // The stream owns its slot and its gauge count: both go when tonic drops it.
        let open = OpenWatch {
            _slot: slot,
            _connection_slot: connection_slot,
            _gauge: metrics.watch_stream(),
        };
        let stream = received.map(move |event| {
            let _open = &open;
            if let WatchEvent::Reset { kind, .. } = &event {
                metrics.watch_reset(kind.label());
            }
            let message = encode_event(event, include_previous, store.store_id(), (&shared, limit));
            // The final status (`End`) is not an event sent.
            if message.is_ok() {
                metrics.watch_event();
            }
            message
        });
        let mut response = Response::new(Box::pin(stream) as EncodedStream);
        // Past the bound of what streams' messages hold, a connection's watches take turns.
        response.extensions_mut().insert(TakesTurns);
        Ok(response)
    }
}

fn watch_spec(request: pb::WatchProfilesRequest) -> Result<WatchSpec, Error> {
    if request.customer_ids.len() > MAX_WATCH_IDS {
        let reason = format!(
            "at most {MAX_WATCH_IDS} ids per watch, got {}",
            request.customer_ids.len()
        );
        return Err(Error::invalid("customer_ids", reason));
    }
    let id_bytes: usize = request.customer_ids.iter().map(String::len).sum();
    if id_bytes > MAX_WATCH_ID_BYTES {
        let reason = format!("at most {MAX_WATCH_ID_BYTES} bytes of ids per watch, got {id_bytes}");
        return Err(Error::invalid("customer_ids", reason));
    }
    if request.fields.len() > MAX_WATCH_FIELDS {
        let reason = format!(
            "at most {MAX_WATCH_FIELDS} fields per watch, got {}",
            request.fields.len()
        );
        return Err(Error::invalid("fields", reason));
    }
    let texts = [
        ("fields", request.fields.iter().map(String::len).sum()),
        ("client_id", request.client_id.len()),
        ("store_id", request.store_id.len()),
    ];
    for (field, bytes) in texts {
        if bytes > MAX_WATCH_TEXT_BYTES {
            let reason = format!("at most {MAX_WATCH_TEXT_BYTES} bytes per watch, got {bytes}");
            return Err(Error::invalid(field, reason));
        }
    }
    let mut customer_ids = HashSet::with_capacity(request.customer_ids.len());
    for (index, id) in request.customer_ids.into_iter().enumerate() {
        if id.is_empty() {
            // Worded as every other RPC words an empty id.
            return Err(Error::invalid(
                format!("customer_ids[{index}]"),
                "is required",
            ));
        }
        customer_ids.insert(Arc::from(id));
    }
    let fields = request
        .fields
        .iter()
        .enumerate()
        .map(|(index, name)| {
            FieldSelector::parse(name)
                .map_err(|reason| Error::invalid(format!("fields[{index}]"), reason))
        })
        .collect::<Result<_, _>>()?;
    Ok(WatchSpec {
        client_id: Some(request.client_id)
            .filter(|id| !id.is_empty())
            .map(Arc::from),
        customer_ids,
        fields,
        start_revision: request.start_revision,
        send_initial_state: request.send_initial_state,
        progress_interval: match request.progress_interval_seconds {
            0 => DEFAULT_PROGRESS_INTERVAL,
            seconds => Duration::from_secs(u64::from(seconds)),
        },
        fail_if_compacted: request.fail_if_compacted,
        store_id: Some(request.store_id)
            .filter(|id| !id.is_empty())
            .map(Arc::from),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::{Field, FieldPath, Origin, Profile, ProfileKey, Register, Scalar};

    fn profile(points: i64, revision: u64) -> Arc<Profile> {
        let at = chrono::DateTime::from_timestamp(1_700_000_000, 0).expect("a time");
        let register = Register {
            value: Some(Scalar::Int(points)),
            at,
        };
        Arc::new(Profile::from_registers(
            ProfileKey::new("2155", "c-1"),
            [(Field::TotalPoints, register)],
            [],
            revision,
            1,
            revision,
        ))
    }

    fn change(revision: u64, previous: bool) -> Arc<Change> {
        Arc::new(Change::new(
            revision,
            profile(20, revision),
            previous.then(|| profile(10, revision - 1)),
            vec![FieldPath::Field(Field::TotalPoints)].into(),
            Origin::Webhook,
        ))
    }

    fn decoded(encoded: &Encoded) -> pb::WatchProfilesResponse {
        pb::WatchProfilesResponse::decode(encoded.0.clone()).expect("a whole response")
    }

    #[test]
    fn each_shape_is_encoded_once_and_decodes_to_the_generated_message() {
        let shared = SharedEncodings::default();
        let updated = change(7, true);
        for include_previous in [false, true] {
            let first = shared.change(&updated, include_previous);
            let again = shared.change(&updated, include_previous);
            // The same allocation: encoded once, shared.
            assert_eq!(first.0.as_ptr(), again.0.as_ptr());
            let expected = convert::watch_event(
                WatchEvent::Change(Arc::clone(&updated)),
                include_previous,
                "s",
            )
            .expect("a message");
            assert_eq!(decoded(&first), expected);
        }
        let plain = decoded(&shared.change(&updated, false));
        let with_previous = decoded(&shared.change(&updated, true));
        assert_ne!(plain, with_previous);
        let previous = |message: pb::WatchProfilesResponse| match message.event {
            Some(pb::watch_profiles_response::Event::Change(change)) => change.previous,
            other => panic!("not a change: {other:?}"),
        };
        assert_eq!(previous(plain), None);
        assert_eq!(
            previous(with_previous).and_then(|p| p.total_points),
            Some(10)
        );
    }

    #[test]
    fn a_created_change_has_one_encoding_for_both_shapes() {
        let shared = SharedEncodings::default();
        let created = change(3, false);
        let plain = shared.change(&created, false);
        let asked_previous = shared.change(&created, true);
        assert_eq!(plain.0.as_ptr(), asked_previous.0.as_ptr());
    }

    #[test]
    fn a_slot_taken_by_another_change_is_never_served_for_it() {
        let shared = SharedEncodings::default();
        let old = change(5, true);
        let newer = change(5 + SHARED_SLOTS as u64, true);
        let old_bytes = shared.change(&old, false);
        assert_eq!(decoded(&shared.change(&newer, false)), {
            convert::watch_event(WatchEvent::Change(Arc::clone(&newer)), false, "s").unwrap()
        });
        // The same revision number, another change (as after a restore): encoded anew.
        let same_number = change(5 + SHARED_SLOTS as u64, false);
        let encoded = shared.change(&same_number, true);
        assert_eq!(
            decoded(&encoded),
            convert::watch_event(WatchEvent::Change(same_number), true, "s").unwrap()
        );
        assert_ne!(decoded(&old_bytes), decoded(&encoded));
    }
}
