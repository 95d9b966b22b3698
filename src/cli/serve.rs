//! `profile-state [FLAGS]`: serve. Sets up logging, checks the configuration, binds, serves
//! until SIGTERM or Ctrl-C.
//!
//! Exit statuses: 0 after a clean shutdown; 64 for a configuration that cannot work (a bad
//! `RUST_LOG` included), found before the data directory is touched; 1 for anything else (a
//! port another process holds, a data directory that does not recover).

use std::process::ExitCode;

use tracing_subscriber::filter::LevelFilter;

use super::{EXIT_USAGE, Sources, print_error};
use crate::config::Config;
use crate::logging::{self, Output};
use crate::server::{BadConfiguration, Server};

/// Serves with `config` until a shutdown signal; returns the exit status.
pub fn run(config: Config, sources: &Sources) -> ExitCode {
    let rust_log = std::env::var_os("RUST_LOG");
    let rust_log = match rust_log.as_deref().map(|value| value.to_str()) {
        Some(None) => {
            print_error(sources, "RUST_LOG is not valid UTF-8");
            return ExitCode::from(EXIT_USAGE);
        }
        Some(Some(value)) => Some(value),
        None => None,
    };
    let filter = match logging::filter(rust_log, LevelFilter::INFO) {
        Ok(filter) => filter,
        Err(error) => {
            print_error(sources, &error.to_string());
            return ExitCode::from(EXIT_USAGE);
        }
    };
    logging::init(config.log_format, filter, Output::Stdout);
    // Not a clap conflict: that would also refuse `PROFILE_STATE_EPHEMERAL=false` beside a
    // data directory.
    if config.ephemeral && sources.is_set("data-dir") {
        let message = "--ephemeral keeps nothing on disk, so it cannot be used with --data-dir";
        print_error(sources, message);
        return ExitCode::from(EXIT_USAGE);
    }
    if let Err(error) = config.check() {
        print_error(sources, &error.to_string());
        return ExitCode::from(EXIT_USAGE);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            print_error(sources, &format!("cannot start the async runtime: {error}"));
            return ExitCode::FAILURE;
        }
    };
    let exit = runtime.block_on(serve(config, sources));
    // What still runs is not waited for: a recovery a signal stopped (reading a large journal,
    // or a read that hangs on a failing disk, kept the process up for as long), or work the
    // stop already gave up on at --shutdown-grace. Whatever it was writing is safe to leave at
    // any point, as after a crash.
    runtime.shutdown_background();
    exit
}

async fn serve(config: Config, sources: &Sources) -> ExitCode {
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    // A signal during start-up (a recovery, a replica waiting for JetStream or loading a
    // snapshot) stops it there: it used to wait for start-up to end, however long.
    let bound = tokio::select! {
        bound = Server::bind(config) => bound,
        () = &mut shutdown => {
            tracing::info!("stopped during start-up, before serving");
            return ExitCode::SUCCESS;
        }
    };
    let server = match bound {
        Ok(server) => server,
        Err(error) => {
            print_error(sources, &format!("{error:#}"));
            if error.is::<BadConfiguration>() {
                return ExitCode::from(EXIT_USAGE);
            }
            return ExitCode::FAILURE;
        }
    };
    match server.run(shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            print_error(sources, &format!("{error:#}"));
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
