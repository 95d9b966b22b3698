//! The codec of every method of our services: prost's, except that a request that does not
//! decode (bytes that are not the message, a string field that is not UTF-8, a truncated
//! frame) is `INVALID_ARGUMENT` naming the message and the field prost stopped in (else
//! `request`), through the error table, where prost's
//! codec answers `INTERNAL`: a client's garbage is the client's mistake, and must not page
//! whoever watches the server's INTERNAL rate.
//!
//! Generated code uses it through `build.rs` (`codec_path`); the hand-routed methods
//! (`watch.rs`) take [`MessageDecoder`]. The generated clients share it: a response that does
//! not decode is then reported as INVALID_ARGUMENT too (only a broken server sends one).
//! Encoding is prost's, unchanged.

use std::marker::PhantomData;

use prost::Message;
use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic_prost::{ProstCodec, ProstDecoder};

use crate::error::Error;
use crate::status::grpc_status;

/// prost's codec with [`MessageDecoder`].
#[derive(Debug, Clone)]
pub struct MessageCodec<T, U> {
    prost: ProstCodec<T, U>,
}

impl<T, U> Default for MessageCodec<T, U> {
    fn default() -> Self {
        MessageCodec {
            prost: ProstCodec::new(),
        }
    }
}

impl<T, U> Codec for MessageCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = <ProstCodec<T, U> as Codec>::Encoder;
    type Decoder = MessageDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        self.prost.encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        MessageDecoder::new(BufferSettings::default())
    }
}

/// The field prost's decode error names (`failed to decode Protobuf message:
/// GetProfileRequest.customer_id: invalid string value: ...` names `customer_id`; nested
/// messages `outer.inner`), so that a client's `BadRequest` names the field, as every other
/// invalid argument does (found by an adversarial run). prost gives its error's path only as
/// text; repeated fields have no index in it.
fn field_of(error: &str) -> Option<String> {
    let path = error.strip_prefix("failed to decode Protobuf message: ")?;
    let fields: Vec<&str> = path
        .split(": ")
        .map_while(|segment| {
            let (message, field) = segment.split_once('.')?;
            let ident = |text: &str| {
                !text.is_empty() && text.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            };
            (ident(message) && ident(field)).then_some(field)
        })
        .collect();
    // prost writes the innermost field first.
    (!fields.is_empty()).then(|| fields.into_iter().rev().collect::<Vec<_>>().join("."))
}

/// prost's decoder, a failure of which is `INVALID_ARGUMENT` on the field it names, else on
/// `request`.
#[derive(Debug)]
pub struct MessageDecoder<U> {
    prost: ProstDecoder<U>,
    _message: PhantomData<U>,
}

impl<U> MessageDecoder<U> {
    /// A decoder with these buffer settings.
    pub fn new(buffer_settings: BufferSettings) -> Self {
        MessageDecoder {
            prost: ProstDecoder::new(buffer_settings),
            _message: PhantomData,
        }
    }
}

impl<U: Message + Default> Decoder for MessageDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        self.prost.decode(buf).map_err(|status| {
            let message = std::any::type_name::<U>().rsplit("::").next().unwrap_or("");
            let field = field_of(status.message()).unwrap_or_else(|| "request".to_owned());
            grpc_status(Error::invalid(
                field,
                format!("is not a valid {message} message: {}", status.message()),
            ))
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.prost.buffer_settings()
    }
}

#[cfg(test)]
mod tests {
    use super::field_of;

    /// prost writes its path innermost first; the description after it is not a field.
    #[test]
    fn the_field_is_read_from_prosts_error_outermost_first() {
        let flat = "failed to decode Protobuf message: GetProfileRequest.customer_id: invalid \
                    string value: data is not UTF-8 encoded";
        assert_eq!(field_of(flat).as_deref(), Some("customer_id"));
        let nested = "failed to decode Protobuf message: Timestamp.seconds: \
                      ListRequest.since: invalid wire type: LengthDelimited (expected Varint)";
        assert_eq!(field_of(nested).as_deref(), Some("since.seconds"));
        let none = "failed to decode Protobuf message: invalid varint";
        assert_eq!(field_of(none), None);
        assert_eq!(field_of("something else"), None);
    }
}
