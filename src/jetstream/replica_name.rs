//! Whether another process runs under this replica's name. Each replica keeps a mark,
//! `replica.<name>` in `<stream>_META`, holding an id of its own process, and rewrites it every
//! few seconds by compare-and-set; a mark found rewritten by someone else is another process
//! with the same `--replica-name` (its default, the host name, is shared by replicas started
//! on one host). Names must be unique: the snapshot upload claim is held in a replica's name,
//! so two processes of one name take each other's claim for their own, and their uploads
//! abandon each other (found by an adversarial run).
//!
//! A replica started again after a crash writes its mark over its predecessor's: a mark nobody
//! rewrites is nobody's. Each of two live processes of one name finds the other's mark at its
//! next rewrite, writes its own again, and the other finds it: both hear of each other.
//! This module finds that out and says who wrote the other mark; the caller warns.

use async_nats::jetstream::kv;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use super::key_value::wrong_revision;
use super::stream::unavailable;
use super::{JetStreamError, SnapshotBucket};

/// This process's mark under its replica name, and where it was last written.
pub struct ReplicaNameMark {
    meta: kv::Store,
    key: String,
    /// Which process this is, as the mark says it.
    process: String,
    /// The mark's revision as this process last wrote it; `None`: to be written over whatever
    /// is there.
    revision: Option<u64>,
}

impl ReplicaNameMark {
    /// The mark of replica `name`, for this process (its pid, host and a random id: a pid and
    /// a host alone repeat across containers).
    pub fn new(bucket: &SnapshotBucket, name: &str) -> ReplicaNameMark {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname");
        let host = host.map_or_else(|_| "?".into(), |host| host.trim().to_owned());
        let id = uuid::Uuid::new_v4().simple();
        let process = format!("pid {} on {host} ({id})", std::process::id());
        ReplicaNameMark {
            meta: bucket.meta().clone(),
            // Keys take letters, digits and `-/_=.`: a name may hold anything else.
            key: format!("replica.{}", URL_SAFE_NO_PAD.encode(name)),
            process,
            revision: None,
        }
    }

    /// Writes the mark, or rewrites it if nobody else wrote it since; `Ok(Some(process))`
    /// when another process did (the mark is written over at the next call).
    pub async fn check(&mut self) -> Result<Option<String>, JetStreamError> {
        let value = self.process.clone().into_bytes().into();
        let Some(revision) = self.revision else {
            let written = self.meta.put(&self.key, value).await;
            self.revision = Some(written.map_err(unavailable("replica name mark"))?);
            return Ok(None);
        };
        match self.meta.update(&self.key, value, revision).await {
            Ok(revision) => {
                self.revision = Some(revision);
                Ok(None)
            }
            Err(err) if wrong_revision(&err) => self.written_over().await,
            Err(err) => Err(unavailable("replica name mark")(err)),
        }
    }

    /// Who wrote the mark over this process's: `None` if this process did (a write whose
    /// answer was lost), which is then taken as its own.
    async fn written_over(&mut self) -> Result<Option<String>, JetStreamError> {
        let entry = self.meta.entry(&self.key).await;
        let entry = entry.map_err(unavailable("replica name mark"))?;
        let Some(entry) = entry.filter(|entry| entry.operation == kv::Operation::Put) else {
            self.revision = None;
            return Ok(None);
        };
        let writer = String::from_utf8_lossy(&entry.value).into_owned();
        if writer == self.process {
            self.revision = Some(entry.revision);
            return Ok(None);
        }
        self.revision = None;
        Ok(Some(writer))
    }
}
