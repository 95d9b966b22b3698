//! The `profile-state` binary: flags, logging, signals. Everything else is in the library.

use std::process::ExitCode;

use clap::Parser;
use profile_state::server::BadConfiguration;
use profile_state::{Config, Server};
use tracing_subscriber::EnvFilter;

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
    match server.run(shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("profile-state: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Completes on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            tracing::error!(%error, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::error!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
}
