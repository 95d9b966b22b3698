//! A file that blocks whoever creates it, like a disk that stopped answering: a FIFO planted at
//! its name (creating a file opens it for writing, which waits for a reader).

use std::path::PathBuf;
use std::thread::JoinHandle;

/// A FIFO at a file's name. [`StuckFile::release`] reads it to the end, so the writer goes on
/// (and fails to sync it); dropped unreleased (a test that failed), it is read all the same: a
/// blocking thread stuck in it would keep the test's runtime from ever shutting down, and the
/// failing test would hang instead of failing.
pub struct StuckFile {
    path: Option<PathBuf>,
}

impl StuckFile {
    pub fn plant(path: PathBuf) -> StuckFile {
        let made = std::process::Command::new("mkfifo").arg(&path).status();
        assert!(made.unwrap().success(), "mkfifo {}", path.display());
        StuckFile { path: Some(path) }
    }

    /// Reads what its writer writes, to the end, on a thread of its own.
    pub fn release(mut self) -> JoinHandle<std::io::Result<usize>> {
        read_to_end(self.path.take().expect("not released yet"))
    }
}

impl Drop for StuckFile {
    fn drop(&mut self) {
        if let Some(path) = self.path.take() {
            drop(read_to_end(path));
        }
    }
}

fn read_to_end(path: PathBuf) -> JoinHandle<std::io::Result<usize>> {
    std::thread::spawn(move || {
        let mut fifo = std::fs::File::open(&path)?;
        std::io::Read::read_to_end(&mut fifo, &mut Vec::new())
    })
}
