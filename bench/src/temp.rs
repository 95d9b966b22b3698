//! Temporary directories of a run, and those that killed runs left behind.
//!
//! Every directory the tool makes (a durable service's data, a replica's, etcd's, an empty
//! one to start from) is named with the tool's process id, and so are the NATS nodes'
//! (`nats_harness::NODE_DIR_PREFIX`). A run that ends removes its own; one that is killed
//! (SIGKILL, the machine's OOM killer) cannot, and each left 60 MB or more for etcd and NATS
//! alone. [`sweep`] removes, at the start of a run, the directories whose process is gone.
//!
//! What it does not do: remove a directory whose process id is alive (another run, or an
//! unrelated process that took the id since: kept, the safe side), or anything not named as
//! this tool names them.

use std::path::Path;

/// The prefix of every directory this tool makes, before its process id.
const PREFIX: &str = "profile-state-bench-";

/// A fresh temporary directory for `what` (`data`, `replica`, `etcd`, ...), removed when the
/// guard drops, named so that [`sweep`] knows it once the process is gone.
pub fn dir(what: &str) -> std::io::Result<tempfile::TempDir> {
    tempfile::Builder::new()
        .prefix(&format!("{PREFIX}{}-{what}-", std::process::id()))
        .tempdir()
}

/// Removes the directories of runs whose process is gone, in the system's temporary
/// directory; says what it removed. Errors are reported and skipped: a sweep never stops a
/// run.
pub fn sweep() {
    let temp = std::env::temp_dir();
    let Ok(entries) = std::fs::read_dir(&temp) else {
        return;
    };
    let mut removed = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        if let Some(pid) = left_by(&path)
            && !Path::new(&format!("/proc/{pid}")).exists()
        {
            match std::fs::remove_dir_all(&path) {
                Ok(()) => removed.push(path),
                Err(error) => eprintln!(
                    "profile-state-bench: cannot remove {} left by a killed run: {error}",
                    path.display()
                ),
            }
        }
    }
    if !removed.is_empty() {
        let names: Vec<String> = removed.iter().map(|p| p.display().to_string()).collect();
        eprintln!(
            "profile-state-bench: removed {} directories left by killed runs: {}",
            removed.len(),
            names.join(", ")
        );
    }
}

/// The process id a directory named by this tool or by the NATS harness carries.
fn left_by(path: &Path) -> Option<u32> {
    if !path.is_dir() {
        return None;
    }
    let name = path.file_name()?.to_str()?;
    let rest = name
        .strip_prefix(PREFIX)
        .or_else(|| name.strip_prefix(nats_harness::NODE_DIR_PREFIX))?;
    let (pid, _) = rest.split_once('-')?;
    pid.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A directory of a process that is gone is removed; one of a live process (this one),
    /// and one named otherwise, are kept.
    #[test]
    fn directories_of_processes_that_are_gone_are_removed_and_others_kept() {
        let ours = dir("data").unwrap();
        let nats = tempfile::Builder::new()
            .prefix(&format!(
                "{}{}-n1-",
                nats_harness::NODE_DIR_PREFIX,
                std::process::id()
            ))
            .tempdir()
            .unwrap();
        // A process id that is surely gone: a child that has exited and been waited for.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let gone = child.id();
        child.wait().unwrap();
        let temp = std::env::temp_dir();
        let left = [
            temp.join(format!("{PREFIX}{gone}-etcd-sweep-test")),
            temp.join(format!(
                "{}{gone}-n2-sweep-test",
                nats_harness::NODE_DIR_PREFIX
            )),
        ];
        for path in &left {
            std::fs::create_dir_all(path.join("member")).unwrap();
            std::fs::write(path.join("member/wal"), b"x").unwrap();
        }
        let unrelated = tempfile::Builder::new()
            .prefix("profile-state-bench-notapid-")
            .tempdir()
            .unwrap();

        sweep();
        for path in &left {
            assert!(!path.exists(), "{} was left", path.display());
        }
        for kept in [ours.path(), nats.path(), unrelated.path()] {
            assert!(kept.exists(), "{} was removed", kept.display());
        }
    }
}
