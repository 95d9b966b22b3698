//! The `profile-state` binary: parses the command line and runs what it asks for. Everything
//! else is in the library (`profile_state::cli` and what it calls).

use std::process::ExitCode;

use profile_state::cli;

// mimalloc instead of glibc's malloc: the service makes many small, short-lived allocations per
// webhook and keeps millions of small ones per profile. Measured with profile-state-bench
// (BENCHMARKS.md, "Allocator"): less CPU per webhook, less memory per profile, faster recovery.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    match cli::parse(std::env::args_os().collect()) {
        Ok((cli, sources)) => cli::run(cli, &sources),
        Err(exit) => exit,
    }
}
