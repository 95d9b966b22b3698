//! The admin listener (`--admin-listen`) as served: `crate::monitoring`'s routes, from the
//! bind on (start-up answers first) until the very end of the ordered stop, so `/readyz` says
//! "shutting down" while the other listeners drain.
//!
//! Its connections get the webhook listener's treatment (`super::connections`), with fixed
//! limits rather than flags: at most [`MAX_CONNECTIONS`] at once, closed when idle for
//! [`IDLE_TIMEOUT`] or slower than [`HEADER_TIMEOUT`] to send a request's headers. Without
//! them, clients that open connections and send half a request (a slowloris) could hold the
//! process's open files, which the webhook listener needs. HTTP/1.1 only: Prometheus and
//! probes speak it, and over HTTP/2 one connection could hold a rendered `/metrics` (about
//! 100 KB) in each of 200 streams it never reads (an adversarial run pinned 1.6 GB with 60
//! connections). They belong to the server task: [`AdminServer::stop`] cuts whatever is left,
//! without waiting for it.
//!
//! The cap refuses newcomers rather than evicting the connections that hold it: 256
//! connections kept busy enough (a request every half minute each) keep a new scraper out.
//! That takes a deliberate client on the admin network; evicting the longest idle at the cap
//! would end it, and is not built.
//!
//! It decides nothing about what the endpoints answer (that is `crate::monitoring`).

use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::{CancellationToken, DropGuard};

use super::connections::{self, CappedListener};
use crate::metrics::ListenerMetrics;
use crate::monitoring::AdminEndpoints;

/// Connections served at once: probes and scrapers need a handful, and clients that hold
/// connections should need many to keep them out. Each holds at most one rendered answer.
pub const MAX_CONNECTIONS: usize = 256;

/// How long a connection may stay open with no request in progress: probes every few seconds
/// reuse theirs; a scraper every minute opens a new one, which costs nothing here.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Longest a client may take to send a request's headers, from its first byte.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// The admin listener's server task: it serves until [`AdminServer::stop`], or until dropped
/// (a start-up that failed after the bind).
pub struct AdminServer {
    task: JoinHandle<std::io::Result<()>>,
    /// Stops accepting.
    _stop: DropGuard,
}

impl AdminServer {
    /// Serves `endpoints` on `listener`, its connections counted under `metrics`.
    pub fn start(
        listener: TcpListener,
        endpoints: &AdminEndpoints,
        metrics: ListenerMetrics,
    ) -> AdminServer {
        let stop = CancellationToken::new();
        let listener = CappedListener::new(listener, MAX_CONNECTIONS, metrics);
        let options = connections::HttpOptions {
            idle: IDLE_TIMEOUT,
            header: HEADER_TIMEOUT,
            http2_streams: None,
        };
        let serving = connections::serve_http(listener, endpoints.router(), options, stop.clone());
        AdminServer {
            task: tokio::spawn(serving),
            _stop: stop.drop_guard(),
        }
    }

    /// Stops accepting and cuts the connections left, at once (nothing here is worth waiting
    /// for: a request for a probe or a scrape is answered in a moment, or never); returns the
    /// server's error if it had failed.
    pub fn stop(self) -> std::io::Result<()> {
        let AdminServer { task, _stop } = self;
        drop(_stop);
        let failed = match task.is_finished() {
            true => futures_util::FutureExt::now_or_never(task),
            false => {
                task.abort();
                None
            }
        };
        match failed {
            Some(Ok(Err(error))) => Err(error),
            _ => Ok(()),
        }
    }
}
