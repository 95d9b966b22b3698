//! The stream's message: a batch of normalized updates, protobuf like the journal's records,
//! and the `Nats-Msg-Id` that lets the server drop a repeated publish.
//!
//! A batch reuses the journal's [`UpdateRecord`] with `revision` left 0: in replicated mode
//! revisions are assigned by every replica as it applies the stream, never by the publisher.
//! Field 1 has the same number and type as the journal's `BatchRecord.updates`, so the two
//! stay wire-compatible. No I/O here.

use prost::Message;
use sha2::{Digest, Sha256};

use crate::journal::codec::UpdateRecord;
use crate::profile::ProfileUpdate;

/// The payload of one stream message: updates validated by one replica's ingress, applied in
/// this order by every replica.
#[derive(Clone, PartialEq, Message)]
pub struct UpdateBatch {
    /// The updates, each with `revision` 0.
    #[prost(message, repeated, tag = "1")]
    pub updates: Vec<UpdateRecord>,
}

impl UpdateBatch {
    /// The batch of these updates, in this order.
    pub fn new<'a>(updates: impl IntoIterator<Item = &'a ProfileUpdate>) -> UpdateBatch {
        UpdateBatch {
            updates: updates
                .into_iter()
                .map(|update| UpdateRecord::new(0, update))
                .collect(),
        }
    }

    /// Decodes a message payload; a record carrying a revision was not written by a publisher
    /// of this format and is refused.
    pub fn decode_payload(payload: &[u8]) -> Result<UpdateBatch, String> {
        let batch = UpdateBatch::decode(payload).map_err(|err| err.to_string())?;
        if let Some(index) = batch.updates.iter().position(|record| record.revision != 0) {
            return Err(format!("update {index} carries a revision"));
        }
        Ok(batch)
    }

    /// The updates, validated again as the journal validates its records.
    pub fn into_updates(self) -> Result<Vec<ProfileUpdate>, String> {
        self.updates
            .into_iter()
            .enumerate()
            .map(|(index, record)| {
                record
                    .into_update()
                    .map_err(|err| format!("update {index}: {err}"))
            })
            .collect()
    }

    /// The `Nats-Msg-Id`: a function of the content only, so publishing the same batch again
    /// (after a lost acknowledgement, from any replica) is dropped by the server inside the
    /// duplicate window and answered with the original sequence. A batch of one update has that
    /// delivery's id, so a Gameball retry that is published on its own is dropped too.
    pub fn message_id(&self) -> String {
        match self.updates.as_slice() {
            [one] => delivery_id(one),
            many => {
                let mut hash = Sha256::new();
                hash.update(b"batch");
                for record in many {
                    hash.update(delivery_id(record).as_bytes());
                }
                hex::encode(hash.finalize())
            }
        }
    }
}

/// A delivery's identity: the SHA-256 of its normalized record (key, `created_at`, fields and
/// extras in the order the payload rules produce them), hex. Two deliveries of the same webhook
/// have the same id; any difference in what they write gives another.
pub fn delivery_id(record: &UpdateRecord) -> String {
    hex::encode(Sha256::digest(record.encode_to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::codec::BatchRecord;
    use crate::profile::{EventTime, Field, ProfileKey, Scalar};

    fn update(customer: &str, points: i64) -> ProfileUpdate {
        ProfileUpdate {
            key: ProfileKey::new("2155", customer),
            at: EventTime::from_timestamp(1_732_037_682, 297_000_000).unwrap(),
            fields: vec![(Field::TotalPoints, Some(Scalar::Int(points)))],
            extras: vec![("birthday".into(), Some(serde_json::json!("1990-01-01")))],
            origin: crate::profile::Origin::Webhook,
        }
    }

    #[test]
    fn batches_round_trip_and_read_as_journal_batches() {
        let updates = [update("c1", 10), update("c2", 20)];
        let bytes = UpdateBatch::new(&updates).encode_to_vec();
        let batch = UpdateBatch::decode_payload(&bytes).unwrap();
        assert_eq!(batch.clone().into_updates().unwrap(), updates);
        let journal = BatchRecord::decode(bytes.as_slice()).unwrap();
        assert_eq!(journal.updates, batch.updates);
    }

    #[test]
    fn message_ids_follow_the_content_only() {
        let one = UpdateBatch::new([&update("c1", 10)]);
        assert_eq!(one.message_id(), delivery_id(&one.updates[0]));
        assert_eq!(
            one.message_id(),
            UpdateBatch::new([&update("c1", 10)]).message_id()
        );
        assert_ne!(
            one.message_id(),
            UpdateBatch::new([&update("c1", 11)]).message_id()
        );
        let pair = UpdateBatch::new(&[update("c1", 10), update("c2", 20)]);
        let swapped = UpdateBatch::new(&[update("c2", 20), update("c1", 10)]);
        assert_ne!(pair.message_id(), swapped.message_id(), "order is content");
        assert_ne!(pair.message_id(), one.message_id());
        assert_eq!(pair.message_id().len(), 64);
    }

    #[test]
    fn foreign_or_broken_payloads_are_refused_with_a_reason() {
        let mut numbered = UpdateBatch::new([&update("c1", 10)]);
        numbered.updates[0].revision = 7;
        let error = UpdateBatch::decode_payload(&numbered.encode_to_vec()).unwrap_err();
        assert_eq!(error, "update 0 carries a revision");
        assert!(UpdateBatch::decode_payload(b"\xff\xff\xff").is_err());
        let mut no_time = UpdateBatch::new([&update("c1", 10)]);
        no_time.updates[0].at = None;
        let error = no_time.into_updates().unwrap_err();
        assert!(error.starts_with("update 0: malformed record"), "{error}");
    }
}
