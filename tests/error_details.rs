//! The `google.rpc` error details the service sends (`BadRequest`, `PreconditionFailure`)
//! decode with nothing but what the service's own reflection serves, in v1 and v1alpha: the
//! way grpcurl and other reflection clients decode them. Real statuses over real gRPC.

use crate::common;

use common::reflection::{v1, v1alpha};
use common::{TestService, at, profile_updated};
use profile_state::pb;
use profile_state::pb::admin_service_client::AdminServiceClient;
use prost::Message;
use prost_reflect::{DescriptorPool, DynamicMessage, Value};
use serde_json::json;
use tonic::Code;
use tonic_types::StatusExt;

/// Every detail of `status`, as (type name, message decoded with descriptors asked from the
/// service's reflection), once per reflection version.
async fn details_through_reflection(
    service: &TestService,
    status: &tonic::Status,
) -> Vec<(String, DynamicMessage)> {
    let details = tonic_types::pb::Status::decode(status.details())
        .expect("grpc-status-details-bin holds a google.rpc.Status")
        .details;
    assert!(!details.is_empty(), "no details in {status:?}");
    let mut decoded = Vec::new();
    for detail in details {
        let name = detail
            .type_url
            .strip_prefix("type.googleapis.com/")
            .unwrap_or_else(|| panic!("unexpected type URL {}", detail.type_url));
        for files in [
            v1::resolve(service.channel().await, name).await,
            v1alpha::resolve(service.channel().await, name).await,
        ] {
            let pool = DescriptorPool::from_file_descriptor_set(files)
                .unwrap_or_else(|error| panic!("reflection's files for {name} link: {error}"));
            let descriptor = pool
                .get_message_by_name(name)
                .unwrap_or_else(|| panic!("reflection's files define {name}"));
            assert!(
                descriptor.parent_file().name().starts_with("google/rpc/"),
                "{name} is served under googleapis' path, not {}",
                descriptor.parent_file().name()
            );
            let message = DynamicMessage::decode(descriptor, detail.value.as_slice())
                .unwrap_or_else(|error| panic!("{name} decodes: {error}"));
            decoded.push((name.to_owned(), message));
        }
    }
    decoded
}

/// The messages in the repeated message field `field` of `message`.
fn messages(message: &DynamicMessage, field: &str) -> Vec<DynamicMessage> {
    match message.get_field_by_name(field).as_deref() {
        Some(Value::List(items)) => items
            .iter()
            .map(|item| item.as_message().expect("a message").clone())
            .collect(),
        other => panic!("{field} is not a list: {other:?}"),
    }
}

/// The string field `field` of `message`.
fn text(message: &DynamicMessage, field: &str) -> String {
    message
        .get_field_by_name(field)
        .and_then(|value| value.as_str().map(str::to_owned))
        .unwrap_or_else(|| panic!("{field} is not a string in {message:?}"))
}

/// (field, description) of every violation of a decoded BadRequest.
fn field_violations(message: &DynamicMessage) -> Vec<(String, String)> {
    messages(message, "field_violations")
        .iter()
        .map(|violation| (text(violation, "field"), text(violation, "description")))
        .collect()
}

#[tokio::test]
async fn bad_request_details_of_a_rejected_request_decode_through_reflection() {
    let service = TestService::start().await;
    let status = service
        .client()
        .await
        .get_profile(pb::GetProfileRequest {
            client_id: "2155".into(),
            customer_id: String::new(),
            ..Default::default()
        })
        .await
        .expect_err("an empty customer_id is rejected");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");

    let decoded = details_through_reflection(&service, &status).await;
    assert_eq!(
        decoded.len(),
        2,
        "one BadRequest, decoded per reflection version"
    );
    for (name, message) in &decoded {
        assert_eq!(name, "google.rpc.BadRequest");
        assert_eq!(
            field_violations(message),
            [("customer_id".to_owned(), "is required".to_owned())]
        );
    }
    service.stop().await;
}

#[tokio::test]
async fn precondition_failure_and_bad_request_of_a_failed_replay_decode_through_reflection() {
    let service = TestService::start().await;
    let body = profile_updated("still-bad", &at(1), json!({"tier_order": "two"}));
    let (code, answer) = service.post(&body).await;
    assert_eq!(code, 422, "{answer}");
    let id = answer["dead_letter_id"].as_str().expect("a dead letter id");
    let status = AdminServiceClient::new(service.channel().await)
        .replay_dead_letter(pb::ReplayDeadLetterRequest { id: id.into() })
        .await
        .expect_err("a letter that is still invalid does not replay");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    let sent = status.get_error_details();
    let sent_precondition = &sent.precondition_failure().expect("sent").violations[0];
    let sent_field = &sent.bad_request().expect("sent").field_violations[0];

    let decoded = details_through_reflection(&service, &status).await;
    let names: Vec<&str> = decoded.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(
        names,
        [
            "google.rpc.PreconditionFailure",
            "google.rpc.PreconditionFailure",
            "google.rpc.BadRequest",
            "google.rpc.BadRequest",
        ]
    );
    for (name, message) in &decoded {
        if name == "google.rpc.PreconditionFailure" {
            let violations = messages(message, "violations");
            assert_eq!(violations.len(), 1, "{message:?}");
            assert_eq!(text(&violations[0], "type"), sent_precondition.r#type);
            assert_eq!(
                text(&violations[0], "subject"),
                format!("dead_letters/{id}")
            );
            assert_eq!(
                text(&violations[0], "description"),
                sent_precondition.description
            );
        } else {
            assert_eq!(
                field_violations(message),
                [(sent_field.field.clone(), sent_field.description.clone())]
            );
            assert_eq!(sent_field.field, "data.tier_order");
        }
    }
    service.stop().await;
}

/// Sends bytes as they are and reads the answer's bytes: a client that can send what no
/// generated client would.
#[derive(Clone, Copy, Default)]
struct RawCodec;

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }

    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

impl tonic::codec::Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(
        &mut self,
        item: Vec<u8>,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        prost::bytes::BufMut::put_slice(dst, &item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Vec<u8>>, tonic::Status> {
        use prost::bytes::Buf;
        let bytes = src.copy_to_bytes(src.remaining());
        Ok(Some(bytes.to_vec()))
    }
}

/// The field of a status's `google.rpc.BadRequest`.
fn bad_request_field(status: &tonic::Status) -> String {
    use tonic_types::StatusExt;
    let details = status
        .get_details_bad_request()
        .expect("bad request details");
    details.field_violations[0].field.clone()
}

/// A request that is not the method's message (a string that is not UTF-8, a truncated field,
/// a bad varint) is the client's mistake: INVALID_ARGUMENT on `request` naming the message, on
/// generated and hand-routed methods alike (prost's codec answered INTERNAL).
#[tokio::test]
async fn a_request_that_does_not_decode_is_invalid_argument() {
    use tonic::codegen::http::uri::PathAndQuery;
    let service = TestService::start().await;
    let mut grpc = tonic::client::Grpc::new(service.channel().await);
    let not_utf8 = vec![0x0a, 0x02, 0xff, 0xfe];
    let truncated = vec![0x0a, 0x05, b'a'];
    let bad_varint = vec![0xff, 0xff, 0xff];
    let unary = [
        (
            "ProfileService/GetProfile",
            not_utf8.clone(),
            "GetProfileRequest",
        ),
        (
            "ProfileService/GetProfile",
            truncated.clone(),
            "GetProfileRequest",
        ),
        (
            "ProfileService/BatchGetProfiles",
            not_utf8.clone(),
            "BatchGetProfilesRequest",
        ),
        (
            "ProfileService/ListProfiles",
            truncated,
            "ListProfilesRequest",
        ),
        (
            "ProfileService/GetServerInfo",
            bad_varint,
            "GetServerInfoRequest",
        ),
        (
            "AdminService/GetDeadLetter",
            not_utf8.clone(),
            "GetDeadLetterRequest",
        ),
    ];
    let mut fields = Vec::new();
    for (method, body, message) in unary {
        grpc.ready().await.unwrap();
        let path = PathAndQuery::try_from(format!("/gameball.profiles.v1.{method}")).unwrap();
        let status = grpc
            .unary(tonic::Request::new(body), path, RawCodec)
            .await
            .expect_err(method);
        assert_eq!(status.code(), Code::InvalidArgument, "{method}: {status:?}");
        assert!(status.message().contains(message), "{method}: {status:?}");
        fields.push(bad_request_field(&status));
    }
    // The field prost names, when it names one (found by an adversarial run: every one was
    // `request`); a key that is not a varint belongs to no field.
    assert_eq!(
        fields,
        [
            "client_id",
            "client_id",
            "client_id",
            "client_id",
            "request",
            "id"
        ]
    );
    grpc.ready().await.unwrap();
    let path = PathAndQuery::from_static("/gameball.profiles.v1.ProfileService/WatchProfiles");
    let status = grpc
        .server_streaming(tonic::Request::new(not_utf8), path, RawCodec)
        .await
        .expect_err("WatchProfiles");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains("WatchProfilesRequest"),
        "{status:?}"
    );
    service.stop().await;
}

/// A long id is repeated in an error message only in part: the message travels in
/// `grpc-message`, which gRPC's C core refuses over 16 KiB (such a client was told
/// RESOURCE_EXHAUSTED instead of NOT_FOUND). Found by an adversarial helper.
#[tokio::test]
async fn an_error_repeats_at_most_the_start_of_a_long_id() {
    let service = TestService::start().await;
    let mut client = service.client().await;
    let long = "x".repeat(100_000);
    let status = client
        .get_profile(pb::GetProfileRequest {
            client_id: "2155".into(),
            customer_id: long.clone(),
            ..Default::default()
        })
        .await
        .expect_err("no such profile");
    assert_eq!(status.code(), Code::NotFound);
    assert!(
        status.message().len() < 1024,
        "{} bytes",
        status.message().len()
    );
    assert!(
        status.message().contains(&format!("{}…", &long[..128])),
        "{}",
        status.message()
    );
    service.stop().await;
}
