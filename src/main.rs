//! The `profile-state` binary: flags, logging, signals. Everything else is in the library.

use std::process::ExitCode;

use clap::Parser;
use profile_state::server::BadConfiguration;
use profile_state::{Config, Server};
use tracing_subscriber::EnvFilter;

// mimalloc instead of glibc's malloc: the service makes many small, short-lived allocations per
// webhook and keeps millions of small ones per profile. Measured with profile-state-bench
// (BENCHMARKS.md, "Allocator"): less CPU per webhook, less memory per profile, faster recovery.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Exit status for unusable configuration (EX_USAGE), before anything binds.
const EXIT_CONFIG: u8 = 64;

#[tokio::main]
async fn main() -> ExitCode {
    let config = Config::parse();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt().with_env_filter(filter);
    if config.log_format == "json" {
        logs.json().init();
    } else {
        logs.init();
    }
    if let Err(error) = config.check() {
        eprintln!("profile-state: {error}");
        return ExitCode::from(EXIT_CONFIG);
    }
    let shutdown = shutdown_signal();
    let server = match Server::bind(config).await {
        Ok(server) => server,
        Err(error) => {
            eprintln!("profile-state: {error:#}");
            if error.is::<BadConfiguration>() {
                return ExitCode::from(EXIT_CONFIG);
            }
            return ExitCode::FAILURE;
        }
    };
    match server.run(shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("profile-state: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// A future that completes on Ctrl-C (SIGINT) or SIGTERM. The handlers are installed now,
/// before anything binds: a signal that arrives early must still shut down cleanly, not kill
/// the process with the default disposition.
#[cfg(unix)]
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let terminate = signal(SignalKind::terminate());
    let interrupt = signal(SignalKind::interrupt());
    async move {
        match (terminate, interrupt) {
            (Ok(mut terminate), Ok(mut interrupt)) => {
                tokio::select! {
                    _ = terminate.recv() => {}
                    _ = interrupt.recv() => {}
                }
            }
            (Err(error), _) | (_, Err(error)) => {
                tracing::error!(%error, "cannot listen for SIGTERM or SIGINT");
                std::future::pending::<()>().await;
            }
        }
    }
}

/// A future that completes on Ctrl-C.
#[cfg(not(unix))]
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            tracing::error!(%error, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    }
}
