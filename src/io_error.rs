//! "I/O error on this path while doing X": the one error for a failed filesystem operation.
//!
//! Its message is `<path>: <action>: <the OS error>`, and it reports no `source`: the OS error
//! is in the message once. (A message that also named its source printed the OS error twice
//! wherever the error chain is shown, as `main` does with `{:#}`.) The layers that touch the
//! disk (`data_dir`, `dead_letters`, `journal`) wrap it in their own error with a prefix that
//! says whose file it is.

use std::path::{Path, PathBuf};

/// A filesystem operation that failed: which file, doing what, and the OS error.
#[derive(Debug, thiserror::Error)]
#[error("{}: {action}: {error}", path.display())]
pub struct IoError {
    path: PathBuf,
    action: &'static str,
    // Not a `source`: the message already shows it (see the module doc).
    error: std::io::Error,
}

impl IoError {
    /// `action` (a few words: "create", "write store id") on `path` failed with `error`.
    pub fn new(path: &Path, action: &'static str, error: std::io::Error) -> IoError {
        IoError {
            path: path.to_owned(),
            action,
            error,
        }
    }

    /// The same, for `map_err`: `.map_err(IoError::on(path, "read"))?`.
    pub fn on(path: &Path, action: &'static str) -> impl FnOnce(std::io::Error) -> IoError {
        let path = path.to_owned();
        move |error| IoError {
            path,
            action,
            error,
        }
    }

    /// The file or directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The OS error's kind.
    pub fn kind(&self) -> std::io::ErrorKind {
        self.error.kind()
    }

    /// The OS error itself, for a caller that speaks `std::io`.
    pub fn into_io(self) -> std::io::Error {
        self.error
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_os_error_is_in_the_message_once_however_the_chain_is_printed() {
        let os = std::io::Error::from_raw_os_error(28);
        let os_text = os.to_string();
        let error = IoError::new(Path::new("/data/journal-1.log"), "append", os);
        let chained = anyhow::Error::new(error).context("recovering the data directory");
        for printed in [format!("{chained:#}"), format!("{chained:?}")] {
            assert_eq!(printed.matches(&os_text).count(), 1, "{printed}");
            assert!(
                printed.contains("/data/journal-1.log: append: "),
                "{printed}"
            );
        }
    }
}
