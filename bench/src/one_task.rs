//! The fan-out transport floor: an HTTP/2 connection and all of its streams polled by one task.
//!
//! hyper runs each HTTP/2 stream as a task of its own, spawned through its executor: with 100
//! watch streams on a connection, a change wakes 100 tasks, each of which locks the
//! connection's shared h2 state to queue its frame, and then the connection's task to write
//! them. Here the executor given to hyper keeps each connection's stream futures for the
//! connection's own task, which polls them beside the connection: a change wakes one task per
//! connection. The no-op gRPC server served this way is the cheapest way we know to run
//! tonic's services over hyper's HTTP/2, so its fan-out latency is the floor for any server
//! on this transport (`scenarios::fanout`).
//!
//! What it does not do: anything the service's gRPC listener does besides serving (TLS,
//! keepalive, connection caps, graceful shutdown). It exists for the load tool only: measured
//! in the service (session 31, BENCHMARKS.md) it gained too little to replace tonic's serving.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tower::Service;

type Boxed = Pin<Box<dyn Future<Output = ()> + Send>>;

/// hyper's executor for one connection: keeps what it is given for the connection's task.
#[derive(Clone, Default)]
struct ConnectionExecutor(Arc<Mutex<Vec<Boxed>>>);

impl ConnectionExecutor {
    fn take(&self) -> Vec<Boxed> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

impl<F: Future<Output = ()> + Send + 'static> hyper::rt::Executor<F> for ConnectionExecutor {
    fn execute(&self, future: F) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Box::pin(future));
    }
}

/// A connection and its streams, polled together; done when the connection and every
/// stream are.
struct OneTask<C> {
    connection: Pin<Box<C>>,
    connection_done: bool,
    executor: ConnectionExecutor,
    streams: FuturesUnordered<Boxed>,
}

impl<C: Future> Future for OneTask<C> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = &mut *self;
        loop {
            // Streams first, so the frames they queue are written by the connection's poll
            // right after, in the same wake-up.
            while let Poll::Ready(Some(())) = this.streams.poll_next_unpin(cx) {}
            if !this.connection_done && this.connection.as_mut().poll(cx).is_ready() {
                this.connection_done = true;
            }
            let new = this.executor.take();
            if new.is_empty() {
                break;
            }
            this.streams.extend(new);
        }
        if this.connection_done && this.streams.is_empty() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

/// Serves `service` (tonic routes) over HTTP/2 on `listener`, each connection and its streams
/// on one task; runs until the listener fails.
pub async fn serve<S>(listener: TcpListener, service: S) -> anyhow::Result<()>
where
    S: Service<
            http::Request<tonic::body::Body>,
            Response = http::Response<tonic::body::Body>,
            Error = std::convert::Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    loop {
        let (tcp, _) = listener.accept().await?;
        // The same setting as the other baselines and the service.
        let _ = tcp.set_nodelay(true);
        let service = service.clone();
        let hyper_service =
            hyper::service::service_fn(move |request: http::Request<hyper::body::Incoming>| {
                service.clone().call(request.map(tonic::body::Body::new))
            });
        let executor = ConnectionExecutor::default();
        let connection = hyper::server::conn::http2::Builder::new(executor.clone())
            .serve_connection(TokioIo::new(tcp), hyper_service);
        tokio::spawn(OneTask {
            connection: Box::pin(connection),
            connection_done: false,
            executor,
            streams: FuturesUnordered::new(),
        });
    }
}
