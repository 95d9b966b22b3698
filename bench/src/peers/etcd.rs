//! etcd as a peer: one member started from the `etcd` binary (`ETCD_BIN`, or `etcd` on
//! `PATH`: Debian's `etcd-server` package, 3.4.23; defaults otherwise, so it syncs its WAL
//! on every commit), on free loopback ports, its data in a temporary directory. A write is
//! `KV.Put`; a watcher is a `Watch` stream of its own with one prefix watch on the keys written
//! (`per_connection` streams share each HTTP/2 connection, as our subscribers do). A change's
//! id is its revision (the Put's header revision, the event's `mod_revision`).
//!
//! The gRPC messages are declared here with prost, only the fields used (prost skips the
//! others): etcd's `api/etcdserverpb/rpc.proto` and `api/mvccpb/kv.proto`, same numbers. A
//! `WatchRequest`'s `create_request` is a member of a oneof; on the wire that is the same as
//! the optional field declared here.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use futures_util::StreamExt;
use http::uri::PathAndQuery;
use tonic::transport::Channel;

use super::{Peer, Writer, received};
use crate::process::die_with_parent;
use crate::scenarios::channel;
use crate::scenarios::fanout::Subscribers;

/// The keys written, and so the prefix every watcher watches.
const PREFIX: &[u8] = b"bench.";
/// The end of that prefix's range: the prefix with its last byte plus one (`.` + 1 = `/`).
const PREFIX_END: &[u8] = b"bench/";

#[derive(Clone, PartialEq, prost::Message)]
struct ResponseHeader {
    #[prost(int64, tag = "3")]
    revision: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
struct PutRequest {
    #[prost(bytes = "vec", tag = "1")]
    key: Vec<u8>,
    #[prost(bytes = "bytes", tag = "2")]
    value: Bytes,
}

#[derive(Clone, PartialEq, prost::Message)]
struct PutResponse {
    #[prost(message, optional, tag = "1")]
    header: Option<ResponseHeader>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct WatchRequest {
    #[prost(message, optional, tag = "1")]
    create_request: Option<WatchCreateRequest>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct WatchCreateRequest {
    #[prost(bytes = "vec", tag = "1")]
    key: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    range_end: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct WatchResponse {
    #[prost(bool, tag = "3")]
    created: bool,
    #[prost(bool, tag = "4")]
    canceled: bool,
    #[prost(message, repeated, tag = "11")]
    events: Vec<Event>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Event {
    #[prost(message, optional, tag = "2")]
    kv: Option<KeyValue>,
}

/// A key's value as a watcher receives it: decoded whole, as our subscribers decode theirs.
#[derive(Clone, PartialEq, prost::Message)]
struct KeyValue {
    #[prost(bytes = "vec", tag = "1")]
    key: Vec<u8>,
    #[prost(int64, tag = "2")]
    create_revision: i64,
    #[prost(int64, tag = "3")]
    mod_revision: i64,
    #[prost(int64, tag = "4")]
    version: i64,
    #[prost(bytes = "bytes", tag = "5")]
    value: Bytes,
}

/// The started member; killed when dropped.
pub struct Etcd {
    child: Child,
    client: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `ETCD_BIN`, or `etcd` on `PATH`.
fn etcd_bin() -> anyhow::Result<PathBuf> {
    if let Some(bin) = std::env::var_os("ETCD_BIN") {
        let bin = PathBuf::from(bin);
        anyhow::ensure!(
            bin.is_file(),
            "fanout --peers etcd: ETCD_BIN={} is not a file",
            bin.display()
        );
        return Ok(bin);
    }
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .map(|dir| dir.join("etcd"))
        .find(|bin| bin.is_file())
        .context(
            "fanout --peers etcd: no etcd found: install Debian's etcd-server \
             (apt-get install etcd-server) or set ETCD_BIN",
        )
}

impl Etcd {
    pub async fn start() -> anyhow::Result<Etcd> {
        let bin = etcd_bin()?;
        let dir = crate::temp::dir("etcd")?;
        let [client, peer] = nats_harness::free_ports::<2>()
            .map_err(|error| anyhow::anyhow!("free ports for etcd: {error}"))?;
        let client_url = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let log = std::fs::File::create(dir.path().join("etcd.log"))?;
        let mut command = Command::new(&bin);
        let child = die_with_parent(&mut command)
            .arg("--name=bench")
            .arg(format!("--data-dir={}", dir.path().join("data").display()))
            .arg(format!("--listen-client-urls={client_url}"))
            .arg(format!("--advertise-client-urls={client_url}"))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster=bench={peer_url}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut etcd = Etcd {
            child,
            client: SocketAddr::from(([127, 0, 0, 1], client)),
            _dir: dir,
        };
        etcd.ready().await?;
        Ok(etcd)
    }

    /// Waits (at most 20 s) until a Put succeeds.
    async fn ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let attempt = async {
                let mut writer = self.writer().await?;
                writer.put("bench.ready".into(), Bytes::new()).await
            };
            match tokio::time::timeout(Duration::from_secs(2), attempt).await {
                Ok(Ok(_)) => return Ok(()),
                _ if Instant::now() > deadline => {
                    let log = std::fs::read_to_string(self._dir.path().join("etcd.log"))
                        .unwrap_or_default();
                    bail!("etcd did not answer within 20 s; its log:\n{log}");
                }
                _ => {}
            }
            if let Some(status) = self.child.try_wait()? {
                let log =
                    std::fs::read_to_string(self._dir.path().join("etcd.log")).unwrap_or_default();
                bail!("etcd exited ({status}); its log:\n{log}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// A unary or streaming etcd call's client on `channel`.
async fn grpc(channel: &Channel) -> anyhow::Result<tonic::client::Grpc<Channel>> {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await?;
    Ok(grpc)
}

impl Peer for Etcd {
    type Writer = EtcdWriter;

    fn pid(&self) -> Option<u32> {
        Some(self.child.id())
    }

    async fn writer(&self) -> anyhow::Result<EtcdWriter> {
        Ok(EtcdWriter(channel(self.client).await?))
    }

    async fn open_watchers(
        &self,
        count: usize,
        per_connection: usize,
        subscribers: &mut Subscribers,
    ) -> anyhow::Result<()> {
        let mut shared = None;
        for index in 0..count {
            if index % per_connection.max(1) == 0 {
                shared = Some(channel(self.client).await?);
            }
            let channel = shared.clone().context("a connection")?;
            let create = WatchRequest {
                create_request: Some(WatchCreateRequest {
                    key: PREFIX.to_vec(),
                    range_end: PREFIX_END.to_vec(),
                }),
            };
            // The request stream stays open until the window ends: etcd ends a watch stream
            // whose requests ended, and only then (with the response stream dropped alone,
            // hyper kept sending the request, the watch lived on, and each window's watchers
            // added to the next one's fan-out).
            let until_stopped =
                futures_util::stream::unfold(subscribers.stopped(), |mut stopped| async move {
                    let _ = stopped.changed().await;
                    None::<(WatchRequest, _)>
                });
            let requests = futures_util::stream::iter([create]).chain(until_stopped);
            let mut stream = grpc(&channel)
                .await?
                .streaming::<_, WatchRequest, WatchResponse, _>(
                    tonic::Request::new(requests),
                    PathAndQuery::from_static("/etcdserverpb.Watch/Watch"),
                    tonic_prost::ProstCodec::default(),
                )
                .await
                .with_context(|| format!("opening etcd watcher {index}"))?
                .into_inner();
            match stream.message().await? {
                Some(response) if response.created => {}
                other => bail!("etcd watcher {index} began with {other:?}, not created"),
            }
            let (mut stopped, delivered) = (subscribers.stopped(), subscribers.counter());
            subscribers.add(tokio::spawn(async move {
                let _channel = channel;
                let mut log: Vec<(u64, Instant)> = Vec::new();
                loop {
                    tokio::select! {
                        message = stream.message() => match message {
                            Ok(Some(response)) if !response.canceled => {
                                for event in response.events {
                                    let revision = event.kv.map_or(0, |kv| kv.mod_revision);
                                    received(&mut log, &delivered, revision as u64);
                                }
                            }
                            Ok(_) | Err(_) => break,
                        },
                        _ = stopped.changed() => break,
                    }
                }
                log
            }));
        }
        Ok(())
    }
}

/// A writer on a connection of its own.
pub struct EtcdWriter(Channel);

impl Writer for EtcdWriter {
    async fn put(&mut self, key: String, value: Bytes) -> anyhow::Result<u64> {
        let request = PutRequest {
            key: key.into_bytes(),
            value,
        };
        let response: tonic::Response<PutResponse> = grpc(&self.0)
            .await?
            .unary(
                tonic::Request::new(request),
                PathAndQuery::from_static("/etcdserverpb.KV/Put"),
                tonic_prost::ProstCodec::default(),
            )
            .await?;
        let revision = response
            .into_inner()
            .header
            .context("etcd's Put answered without a header")?
            .revision;
        Ok(revision as u64)
    }
}
