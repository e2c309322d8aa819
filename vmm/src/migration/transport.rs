//! The migration stream: `tcp:` and `unix:` URIs, connecting and accepting.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use godwit_devices::socket_path;

use super::{MigrateError, CONNECT_TIMEOUT};

/// A migration stream over TCP or a Unix socket.
pub enum Conn {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Conn {
    pub(super) fn try_clone(&self) -> std::io::Result<Conn> {
        Ok(match self {
            Conn::Tcp(s) => Conn::Tcp(s.try_clone()?),
            Conn::Unix(s) => Conn::Unix(s.try_clone()?),
        })
    }
    pub(super) fn shutdown(&self) {
        let _ = match self {
            Conn::Tcp(s) => s.shutdown(std::net::Shutdown::Both),
            Conn::Unix(s) => s.shutdown(std::net::Shutdown::Both),
        };
    }
    pub(super) fn set_timeout(&self, t: Option<Duration>) {
        let _ = match self {
            Conn::Tcp(s) => s.set_read_timeout(t).and(s.set_write_timeout(t)),
            Conn::Unix(s) => s.set_read_timeout(t).and(s.set_write_timeout(t)),
        };
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.read(buf),
            Conn::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.write(buf),
            Conn::Unix(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Conn::Tcp(s) => s.flush(),
            Conn::Unix(s) => s.flush(),
        }
    }
}

pub(super) enum Uri {
    Tcp(String),
    Unix(PathBuf),
}

pub(super) fn parse_uri(uri: &str) -> Result<Uri, MigrateError> {
    if let Some(addr) = uri.strip_prefix("tcp:") {
        if addr
            .rsplit_once(':')
            .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok())
        {
            return Ok(Uri::Tcp(addr.to_string()));
        }
    } else if let Some(path) = uri.strip_prefix("unix:") {
        if !path.is_empty() {
            return Ok(Uri::Unix(PathBuf::from(path)));
        }
    }
    Err(MigrateError::Uri(uri.to_string()))
}

pub(super) fn connect(uri: &str) -> Result<Conn, MigrateError> {
    let err = |source| MigrateError::Connect {
        uri: uri.to_string(),
        source,
    };
    match parse_uri(uri)? {
        Uri::Tcp(addr) => {
            use std::net::ToSocketAddrs;
            let sa = addr
                .to_socket_addrs()
                .map_err(err)?
                .next()
                .ok_or_else(|| err(std::io::Error::other("the address resolves to nothing")))?;
            let s = TcpStream::connect_timeout(&sa, CONNECT_TIMEOUT).map_err(err)?;
            let _ = s.set_nodelay(true);
            Ok(Conn::Tcp(s))
        }
        Uri::Unix(path) => Ok(Conn::Unix(UnixStream::connect(path).map_err(err)?)),
    }
}

pub(super) fn accept(uri: &str) -> Result<Conn, MigrateError> {
    let err = |source| MigrateError::Listen {
        uri: uri.to_string(),
        source,
    };
    let conn = match parse_uri(uri)? {
        Uri::Tcp(addr) => {
            let l = TcpListener::bind(&addr).map_err(err)?;
            tracing::info!("waiting for an incoming migration on tcp:{addr}");
            let (s, from) = l.accept().map_err(err)?;
            tracing::info!("incoming migration from {from}");
            let _ = s.set_nodelay(true);
            Conn::Tcp(s)
        }
        Uri::Unix(path) => {
            let l = socket_path::bind_listener(&path).map_err(MigrateError::ListenPath)?;
            let _temp = crate::signals::TempPath::register(&path);
            tracing::info!(
                "waiting for an incoming migration on unix:{}",
                path.display()
            );
            let (s, _) = l.accept().map_err(err)?;
            let _ = std::fs::remove_file(&path);
            Conn::Unix(s)
        }
    };
    Ok(conn)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_are_checked() {
        assert!(matches!(parse_uri("tcp:10.0.0.1:4444"), Ok(Uri::Tcp(_))));
        assert!(matches!(parse_uri("tcp:[::1]:4444"), Ok(Uri::Tcp(_))));
        assert!(matches!(parse_uri("unix:/tmp/m.sock"), Ok(Uri::Unix(_))));
        for bad in [
            "tcp:host",
            "tcp::4444",
            "tcp:host:99999",
            "unix:",
            "exec:cat",
            "10.0.0.1:4444",
        ] {
            assert!(parse_uri(bad).is_err(), "{bad}");
        }
    }
}
