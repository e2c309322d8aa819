//! How godwit reaches a vhost-user backend: it connects to the backend's
//! socket (client), or listens on one for the backend to connect
//! (server=on, DPDK's client=1).

use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::conn::{Connection, VhostUserError};

/// How godwit reaches the backend.
pub enum Endpoint {
    /// The backend listens on the socket; godwit connects.
    Client { path: PathBuf },
    /// godwit listens (server=on); the backend connects (DPDK client=1).
    Server {
        path: PathBuf,
        listener: UnixListener,
    },
}

impl Endpoint {
    pub fn client(path: &Path) -> Self {
        Endpoint::Client {
            path: path.to_path_buf(),
        }
    }

    /// Listens on `path`, replacing a stale socket left there.
    pub fn listen(path: &Path) -> Result<Self, VhostUserError> {
        let err = |source| VhostUserError::Listen {
            path: path.display().to_string(),
            source,
        };
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            use std::os::unix::fs::FileTypeExt;
            if meta.file_type().is_socket() {
                let _ = std::fs::remove_file(path);
            }
        }
        let listener = UnixListener::bind(path).map_err(err)?;
        listener.set_nonblocking(true).map_err(err)?;
        Ok(Endpoint::Server {
            path: path.to_path_buf(),
            listener,
        })
    }

    pub fn path(&self) -> &Path {
        match self {
            Endpoint::Client { path } | Endpoint::Server { path, .. } => path,
        }
    }

    pub fn is_server(&self) -> bool {
        matches!(self, Endpoint::Server { .. })
    }

    /// One attempt without waiting: `None` when no backend is there yet.
    pub fn try_connect(&self, timeout: Duration) -> Option<Result<Connection, VhostUserError>> {
        let name = self.path().display().to_string();
        match self {
            Endpoint::Client { path } => match UnixStream::connect(path) {
                Ok(s) => Some(Ok(Connection::new(s, name, timeout))),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound
                    ) =>
                {
                    None
                }
                Err(source) => Some(Err(VhostUserError::Connect { path: name, source })),
            },
            Endpoint::Server { listener, .. } => match listener.accept() {
                Ok((s, _)) => Some(
                    s.set_nonblocking(false)
                        .map(|()| Connection::new(s, name.clone(), timeout))
                        .map_err(|source| VhostUserError::Listen { path: name, source }),
                ),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => None,
                Err(source) => Some(Err(VhostUserError::Listen { path: name, source })),
            },
        }
    }

    /// Connects (client) or waits for the backend to connect (server=on),
    /// for up to `wait`.
    pub fn establish(
        &self,
        wait: Duration,
        timeout: Duration,
    ) -> Result<Connection, VhostUserError> {
        let deadline = Instant::now() + wait;
        loop {
            if let Some(res) = self.try_connect(timeout) {
                return res;
            }
            if Instant::now() >= deadline {
                let path = self.path().display().to_string();
                return Err(match self {
                    Endpoint::Server { .. } => VhostUserError::NoBackend { path, waited: wait },
                    Endpoint::Client { path: p } => VhostUserError::Connect {
                        path,
                        source: UnixStream::connect(p).err().unwrap_or_else(|| {
                            std::io::Error::from(std::io::ErrorKind::ConnectionRefused)
                        }),
                    },
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        if let Endpoint::Server { path, .. } = self {
            let _ = std::fs::remove_file(path);
        }
    }
}
