//! Listening on a Unix socket path without destroying what is there: a
//! stale socket (nothing listens on it) is replaced; a live socket, a
//! regular file or anything else is refused, so that a mistyped path never
//! deletes another program's socket or a user's file.

use std::io::ErrorKind;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum SocketPathError {
    #[error("{} exists and is not a socket: choose another path, or remove it yourself if it is not needed", path.display())]
    NotASocket { path: PathBuf },
    #[error("another program listens on {}: choose another path, or stop that program", path.display())]
    InUse { path: PathBuf },
    #[error("cannot check {}: {source}", path.display())]
    Probe {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot remove the stale socket {} (nothing listens on it): {source}; remove it by hand", path.display())]
    RemoveStale {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot listen on {}: {source}", path.display())]
    Bind {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Removes a socket at `path` that nothing listens on; leaves everything
/// else and says why.
pub fn remove_stale_socket(path: &Path) -> Result<(), SocketPathError> {
    let probe = |source| SocketPathError::Probe {
        path: path.to_path_buf(),
        source,
    };
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(probe(e)),
    };
    if !meta.file_type().is_socket() {
        return Err(SocketPathError::NotASocket {
            path: path.to_path_buf(),
        });
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(SocketPathError::InUse {
            path: path.to_path_buf(),
        }),
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
            std::fs::remove_file(path).map_err(|source| SocketPathError::RemoveStale {
                path: path.to_path_buf(),
                source,
            })?;
            tracing::info!(path = %path.display(), "removed a stale socket");
            Ok(())
        }
        Err(e) => Err(probe(e)),
    }
}

/// Binds a listener at `path`, replacing only a stale socket.
pub fn bind_listener(path: &Path) -> Result<UnixListener, SocketPathError> {
    remove_stale_socket(path)?;
    UnixListener::bind(path).map_err(|source| SocketPathError::Bind {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_path(tag: &str) -> PathBuf {
        std::env::temp_dir().join(format!("godwit-sock-{tag}-{}", std::process::id()))
    }

    #[test]
    fn a_regular_file_is_never_removed() {
        let path = temp_path("file");
        std::fs::write(&path, b"keep me").unwrap();
        let err = bind_listener(&path).unwrap_err();
        assert!(matches!(err, SocketPathError::NotASocket { .. }), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), b"keep me");
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn a_live_socket_is_refused_and_a_stale_one_replaced() {
        let path = temp_path("live");
        let _ = std::fs::remove_file(&path);
        let live = UnixListener::bind(&path).unwrap();
        let err = bind_listener(&path).unwrap_err();
        assert!(matches!(err, SocketPathError::InUse { .. }), "{err}");
        drop(live);
        // The file stays after its listener closed: now it is stale.
        let again = bind_listener(&path).expect("stale socket replaced");
        drop(again);
        std::fs::remove_file(&path).unwrap();
    }
}
