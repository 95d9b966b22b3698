//! A gRPC reflection client, the same for both protocol versions (`v1`, `v1alpha`): what
//! grpcurl asks a server before it can describe a service or decode a message.

/// Reflection helpers for one protocol version.
macro_rules! reflection_client {
    ($version:ident) => {
        pub mod $version {
            use std::collections::BTreeSet;

            use prost::Message;
            use tonic::transport::Channel;
            use tonic_reflection::pb::$version::ServerReflectionRequest;
            use tonic_reflection::pb::$version::server_reflection_client::ServerReflectionClient;
            use tonic_reflection::pb::$version::server_reflection_request::MessageRequest;
            use tonic_reflection::pb::$version::server_reflection_response::MessageResponse;

            async fn ask(channel: Channel, request: MessageRequest) -> MessageResponse {
                let request = ServerReflectionRequest {
                    host: String::new(),
                    message_request: Some(request),
                };
                let mut responses = ServerReflectionClient::new(channel)
                    .server_reflection_info(tokio_stream::once(request))
                    .await
                    .expect("reflection answers")
                    .into_inner();
                responses
                    .message()
                    .await
                    .expect("a reflection response")
                    .expect("one response per request")
                    .message_response
                    .expect("the response carries an answer")
            }

            async fn files(channel: Channel, request: MessageRequest) -> Vec<Vec<u8>> {
                let asked = format!("{request:?}");
                match ask(channel, request).await {
                    MessageResponse::FileDescriptorResponse(files) => files.file_descriptor_proto,
                    other => panic!("expected file descriptors for {asked}, got {other:?}"),
                }
            }

            /// The names of every service the server lists.
            pub async fn list_services(channel: Channel) -> Vec<String> {
                match ask(channel, MessageRequest::ListServices(String::new())).await {
                    MessageResponse::ListServicesResponse(list) => list
                        .service
                        .into_iter()
                        .map(|service| service.name)
                        .collect(),
                    other => panic!("expected a service list, got {other:?}"),
                }
            }

            /// The encoded file descriptors of the file that defines `symbol`.
            pub async fn file_containing_symbol(channel: Channel, symbol: &str) -> Vec<Vec<u8>> {
                files(channel, MessageRequest::FileContainingSymbol(symbol.into())).await
            }

            /// The file that defines `symbol` and every file it imports, transitively, asked
            /// for by name as a reflection client resolves them: what it needs to decode
            /// `symbol`.
            pub async fn resolve(channel: Channel, symbol: &str) -> prost_types::FileDescriptorSet {
                let mut set = prost_types::FileDescriptorSet::default();
                let mut known = BTreeSet::new();
                let mut pending = file_containing_symbol(channel.clone(), symbol).await;
                while let Some(encoded) = pending.pop() {
                    let file = prost_types::FileDescriptorProto::decode(encoded.as_slice())
                        .expect("a decodable FileDescriptorProto");
                    if !known.insert(file.name().to_owned()) {
                        continue;
                    }
                    for import in &file.dependency {
                        if !known.contains(import) {
                            let request = MessageRequest::FileByFilename(import.clone());
                            pending.extend(files(channel.clone(), request).await);
                        }
                    }
                    set.file.push(file);
                }
                set
            }
        }
    };
}

reflection_client!(v1);
reflection_client!(v1alpha);
