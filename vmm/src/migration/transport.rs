//! The migration stream: `tcp:`, `tls:` and `unix:` URIs, connecting and
//! accepting.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use godwit_devices::socket_path;
use godwit_migration::protocol::{write_message, Kind};

use super::tls::{self, TlsStream};
use super::{MigrateError, CONNECT_TIMEOUT, PEER_TIMEOUT};
use crate::machine::migration_status::MigrationParams;

/// A migration stream over TCP, TLS or a Unix socket.
pub enum Conn {
    Tcp(TcpStream),
    Unix(UnixStream),
    /// A TLS session cannot be split, so its clones share it; `tcp` is the
    /// socket under it, for shutting down and timeouts without the lock (a
    /// blocked read holds it).
    Tls {
        stream: Arc<Mutex<TlsStream>>,
        tcp: TcpStream,
    },
}

impl Conn {
    pub(super) fn try_clone(&self) -> std::io::Result<Conn> {
        Ok(match self {
            Conn::Tcp(s) => Conn::Tcp(s.try_clone()?),
            Conn::Unix(s) => Conn::Unix(s.try_clone()?),
            Conn::Tls { stream, tcp } => Conn::Tls {
                stream: Arc::clone(stream),
                tcp: tcp.try_clone()?,
            },
        })
    }
    pub(super) fn shutdown(&self) {
        let _ = match self {
            Conn::Tcp(s) | Conn::Tls { tcp: s, .. } => s.shutdown(std::net::Shutdown::Both),
            Conn::Unix(s) => s.shutdown(std::net::Shutdown::Both),
        };
    }
    /// Ends reading only: a read blocked on it returns, and what this side
    /// still has to say (an `Abort`) can be written.
    pub(super) fn shutdown_read(&self) {
        let _ = match self {
            Conn::Tcp(s) | Conn::Tls { tcp: s, .. } => s.shutdown(std::net::Shutdown::Read),
            Conn::Unix(s) => s.shutdown(std::net::Shutdown::Read),
        };
    }
    pub(super) fn set_timeout(&self, t: Option<Duration>) {
        let _ = match self {
            Conn::Tcp(s) | Conn::Tls { tcp: s, .. } => {
                s.set_read_timeout(t).and(s.set_write_timeout(t))
            }
            Conn::Unix(s) => s.set_read_timeout(t).and(s.set_write_timeout(t)),
        };
    }
    /// For a TLS stream this side opened: the destination's verdict on this
    /// side's certificate (see [`tls::confirm_accepted`]); nothing to wait
    /// for on the others.
    pub(super) fn confirm_accepted(&mut self, peer: &str) -> Result<(), tls::TlsError> {
        match self {
            Conn::Tls { stream, .. } => tls::confirm_accepted(
                &mut stream.lock().unwrap_or_else(PoisonError::into_inner),
                peer,
            ),
            Conn::Tcp(_) | Conn::Unix(_) => Ok(()),
        }
    }
    fn tls(stream: TlsStream, tcp: TcpStream) -> Conn {
        Conn::Tls {
            stream: Arc::new(Mutex::new(stream)),
            tcp,
        }
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.read(buf),
            Conn::Unix(s) => s.read(buf),
            Conn::Tls { stream, .. } => stream
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.write(buf),
            Conn::Unix(s) => s.write(buf),
            Conn::Tls { stream, .. } => stream
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .write(buf),
        }
    }
    fn write_vectored(&mut self, bufs: &[std::io::IoSlice<'_>]) -> std::io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.write_vectored(bufs),
            Conn::Unix(s) => s.write_vectored(bufs),
            Conn::Tls { stream, .. } => stream
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .write_vectored(bufs),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Conn::Tcp(s) => s.flush(),
            Conn::Unix(s) => s.flush(),
            Conn::Tls { stream, .. } => stream
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .flush(),
        }
    }
}

pub(super) enum Uri {
    Tcp(String),
    Tls(String),
    Unix(PathBuf),
}

fn is_host_port(addr: &str) -> bool {
    addr.rsplit_once(':')
        .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok())
}

pub(super) fn parse_uri(uri: &str) -> Result<Uri, MigrateError> {
    if let Some(addr) = uri.strip_prefix("tcp:") {
        if is_host_port(addr) {
            return Ok(Uri::Tcp(addr.to_string()));
        }
    } else if let Some(addr) = uri.strip_prefix("tls:") {
        if is_host_port(addr) {
            return Ok(Uri::Tls(addr.to_string()));
        }
    } else if let Some(path) = uri.strip_prefix("unix:") {
        if !path.is_empty() {
            return Ok(Uri::Unix(PathBuf::from(path)));
        }
    }
    Err(MigrateError::Uri(uri.to_string()))
}

const PLAINTEXT_WARNING: &str =
    "the migration stream is neither authenticated nor encrypted: anyone on the path can read the guest's memory, and anyone reaching the port can inject a VM; use tls: with --tls-dir and tls-creds";

fn tcp_connect(addr: &str, uri: &str) -> Result<TcpStream, MigrateError> {
    use std::net::ToSocketAddrs;
    let err = |source| MigrateError::Connect {
        uri: uri.to_string(),
        source,
    };
    let sa = addr
        .to_socket_addrs()
        .map_err(err)?
        .next()
        .ok_or_else(|| err(std::io::Error::other("the address resolves to nothing")))?;
    let s = TcpStream::connect_timeout(&sa, CONNECT_TIMEOUT).map_err(err)?;
    let _ = s.set_nodelay(true);
    Ok(s)
}

/// The host part of `HOST:PORT`, which a certificate must name when no
/// tls-hostname is set (as QEMU does).
fn host_of(addr: &str) -> &str {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    host.strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host)
}

/// Opens the main stream. Over `tls:` the destination's verdict on this
/// side's certificate is still to come: write the first message, then take
/// it with [`Conn::confirm_accepted`] before reading.
pub(super) fn connect(uri: &str, params: &MigrationParams) -> Result<Conn, MigrateError> {
    connect_as(uri, params, None)
}

/// The TCP sockets of connections being opened, so that `migrate_cancel`
/// can break off a connection still in its TLS handshake.
pub(super) type Opening = Arc<Mutex<Vec<TcpStream>>>;

/// [`connect`] for a multifd channel: the same checks, logged once (by the
/// main stream); its socket joins `opening` as soon as it is connected.
pub(super) fn connect_channel(
    uri: &str,
    params: &MigrationParams,
    opening: &Opening,
) -> Result<Conn, MigrateError> {
    connect_as(uri, params, Some(opening))
}

/// Shuts every socket in `opening`.
pub(super) fn break_opening(opening: &Opening) {
    for s in opening
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .iter()
    {
        let _ = s.shutdown(std::net::Shutdown::Both);
    }
}

fn connect_as(
    uri: &str,
    params: &MigrationParams,
    channel: Option<&Opening>,
) -> Result<Conn, MigrateError> {
    let main = channel.is_none();
    let register = |tcp: &TcpStream| {
        if let (Some(opening), Ok(clone)) = (channel, tcp.try_clone()) {
            opening
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(clone);
        }
    };
    match parse_uri(uri)? {
        Uri::Tcp(addr) => {
            if main {
                tracing::warn!("migration to tcp:{addr}: {PLAINTEXT_WARNING}");
            }
            let tcp = tcp_connect(&addr, uri)?;
            register(&tcp);
            Ok(Conn::Tcp(tcp))
        }
        Uri::Tls(addr) => {
            if params.tls_creds.is_empty() {
                return Err(MigrateError::TlsCredsMissing(uri.to_string()));
            }
            let dir = Path::new(&params.tls_creds);
            let config = match &params.tls_client {
                Some(creds) if creds.dir() == dir => creds.current()?,
                _ => tls::client_config(dir)?,
            };
            let hostname = if params.tls_hostname.is_empty() {
                host_of(&addr)
            } else {
                &params.tls_hostname
            };
            let tcp = tcp_connect(&addr, uri)?;
            register(&tcp);
            let under = tcp.try_clone().map_err(|source| MigrateError::Connect {
                uri: uri.to_string(),
                source,
            })?;
            under.set_read_timeout(Some(PEER_TIMEOUT)).ok();
            under.set_write_timeout(Some(PEER_TIMEOUT)).ok();
            let stream = tls::connect(config, hostname, tcp, &format!("the destination {addr}"))?;
            Ok(Conn::tls(stream, under))
        }
        Uri::Unix(path) => Ok(Conn::Unix(UnixStream::connect(path).map_err(|source| {
            MigrateError::Connect {
                uri: uri.to_string(),
                source,
            }
        })?)),
    }
}

/// Waits for the first byte of a TCP peer, and answers one that speaks the
/// other language (TLS or not) with a plaintext `Abort` it can show.
fn first_byte_is_tls(s: &TcpStream, wait: Duration) -> std::io::Result<Option<bool>> {
    s.set_read_timeout(Some(wait))?;
    let mut first = [0u8; 1];
    match s.peek(&mut first)? {
        0 => Ok(None),
        _ => Ok(Some(first[0] == tls::TLS_HANDSHAKE_RECORD)),
    }
}

/// Tells a peer that speaks the other language why it is refused, in a
/// plaintext `Abort`.
fn refuse(mut s: TcpStream, why: &str) {
    let _ = write_message(&mut s, Kind::Abort, why.as_bytes());
    drain_then_close(s);
}

/// The longest a refused peer is read from before its connection closes:
/// a peer that keeps sending gets no longer than this.
const DRAIN_WAIT: Duration = Duration::from_secs(2);

/// Ends writing, then reads and drops what the peer still sends until it
/// closes or DRAIN_WAIT passes: closing with unread input would reset the
/// connection and could lose what this side wrote last (an `Abort`, a TLS
/// alert) before the peer reads it.
pub(super) fn drain_then_close(mut s: TcpStream) {
    let _ = s.shutdown(std::net::Shutdown::Write);
    let until = Instant::now() + DRAIN_WAIT;
    let mut sink = [0u8; 4096];
    loop {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() || s.set_read_timeout(Some(left)).is_err() {
            break;
        }
        if !matches!(s.read(&mut sink), Ok(n) if n > 0) {
            break;
        }
    }
}

/// The longest a multifd channel's connection may take to authenticate and
/// greet (a real one takes milliseconds).
const HANDSHAKE_WAIT: Duration = Duration::from_secs(3);

/// What stays open of the destination's listening socket after the main
/// stream was accepted: multifd channels connect to the same address.
pub(super) struct ChannelListener {
    listener: TcpListener,
    server_config: Option<Arc<rustls::ServerConfig>>,
    uri: String,
}

impl ChannelListener {
    /// The next TCP connection, waiting at most `wait`. `Ok(None)`: none
    /// came in time.
    pub(super) fn accept_tcp(
        &self,
        wait: Duration,
    ) -> Result<Option<(TcpStream, SocketAddr)>, String> {
        let _ = self.listener.set_nonblocking(true);
        let deadline = Instant::now() + wait;
        loop {
            match self.listener.accept() {
                Ok((s, from)) => {
                    let _ = s.set_nonblocking(false);
                    let _ = s.set_nodelay(true);
                    return Ok(Some((s, from)));
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Ok(None);
                    }
                    // Woken by the next connection, not by a timer.
                    let mut pfd = libc::pollfd {
                        fd: self.listener.as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    };
                    let ms = i32::try_from(left.as_millis().max(1)).unwrap_or(i32::MAX);
                    // SAFETY: `pfd` is one valid pollfd naming the listening
                    // socket, which `self` keeps open for the whole call.
                    unsafe { libc::poll(&mut pfd, 1, ms) };
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(MigrateError::Listen {
                        uri: self.uri.clone(),
                        source: e,
                    }
                    .to_string())
                }
            }
        }
    }

    /// Makes an accepted connection a stream like the main one
    /// (TLS-authenticated when the URI is `tls:`), within HANDSHAKE_WAIT
    /// and `deadline`.
    pub(super) fn establish(
        &self,
        s: TcpStream,
        from: SocketAddr,
        deadline: Instant,
    ) -> Result<Conn, String> {
        let left = deadline
            .saturating_duration_since(Instant::now())
            .clamp(Duration::from_millis(100), HANDSHAKE_WAIT);
        let _ = s.set_read_timeout(Some(left));
        let _ = s.set_write_timeout(Some(left));
        establish(s, from, self.server_config.clone(), &self.uri, left).map_err(|e| e.to_string())
    }
}

/// Makes an accepted TCP connection a migration stream: TLS with a
/// verified client certificate when `server_config` is given, plaintext
/// otherwise; a peer that speaks the other language is told why and
/// refused.
fn establish(
    s: TcpStream,
    from: SocketAddr,
    server_config: Option<Arc<rustls::ServerConfig>>,
    uri: &str,
    wait: Duration,
) -> Result<Conn, MigrateError> {
    let err = |source| MigrateError::Listen {
        uri: uri.to_string(),
        source,
    };
    let peer = format!("the source {from}");
    let tls_peer = first_byte_is_tls(&s, wait).map_err(err)?;
    Ok(match (server_config, tls_peer) {
        (Some(config), Some(true)) => {
            let under = s.try_clone().map_err(err)?;
            let stream = tls::accept(config, s, &peer)?;
            tracing::info!("incoming migration from {from}: TLS 1.3, both certificates verified");
            Conn::tls(stream, under)
        }
        (Some(_), _) => {
            refuse(
                s,
                "this destination accepts only TLS migrations: migrate to a tls: URI with tls-creds set",
            );
            return Err(tls::plaintext_peer(&peer, "the source sent no TLS ClientHello").into());
        }
        (None, Some(true)) => {
            refuse(
                s,
                "this destination listens on plaintext tcp:; start it with --incoming tls:ADDR:PORT --tls-dir DIR",
            );
            return Err(MigrateError::TlsOnPlain(from.to_string()));
        }
        (None, _) => Conn::Tcp(s),
    })
}

/// Accepts the main stream on `uri`; for `tcp:` and `tls:` also returns
/// the listener, for multifd channels.
pub(super) fn accept(
    uri: &str,
    tls_dir: Option<&Path>,
) -> Result<(Conn, Option<ChannelListener>), MigrateError> {
    let err = |source| MigrateError::Listen {
        uri: uri.to_string(),
        source,
    };
    let parsed = parse_uri(uri)?;
    let server_config = match (&parsed, tls_dir) {
        (Uri::Tls(_), Some(dir)) => Some(tls::server_config(dir)?),
        (Uri::Tls(_), None) => return Err(MigrateError::TlsDirMissing(uri.to_string())),
        (_, Some(_)) => return Err(MigrateError::TlsDirUnused(uri.to_string())),
        (_, None) => None,
    };
    match parsed {
        Uri::Tcp(addr) | Uri::Tls(addr) => {
            let l = TcpListener::bind(&addr).map_err(err)?;
            let scheme = if server_config.is_some() {
                "tls"
            } else {
                tracing::warn!("incoming migration on tcp:{addr}: {PLAINTEXT_WARNING}");
                "tcp"
            };
            tracing::info!("waiting for an incoming migration on {scheme}:{addr}");
            let (s, from) = l.accept().map_err(err)?;
            tracing::info!("incoming migration from {from}");
            let _ = s.set_nodelay(true);
            let conn = establish(s, from, server_config.clone(), uri, PEER_TIMEOUT)?;
            Ok((
                conn,
                Some(ChannelListener {
                    listener: l,
                    server_config,
                    uri: uri.to_string(),
                }),
            ))
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
            Ok((Conn::Unix(s), None))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificate_names_the_uri_host() {
        assert_eq!(host_of("dst.example:4444"), "dst.example");
        assert_eq!(host_of("10.0.0.2:4444"), "10.0.0.2");
        assert_eq!(host_of("[::1]:4444"), "::1");
    }

    #[test]
    fn uris_are_checked() {
        assert!(matches!(parse_uri("tcp:10.0.0.1:4444"), Ok(Uri::Tcp(_))));
        assert!(matches!(parse_uri("tcp:[::1]:4444"), Ok(Uri::Tcp(_))));
        assert!(matches!(parse_uri("unix:/tmp/m.sock"), Ok(Uri::Unix(_))));
        assert!(matches!(parse_uri("tls:10.0.0.1:4444"), Ok(Uri::Tls(_))));
        for bad in [
            "tcp:host",
            "tcp::4444",
            "tcp:host:99999",
            "unix:",
            "tls:host",
            "exec:cat",
            "10.0.0.1:4444",
        ] {
            assert!(parse_uri(bad).is_err(), "{bad}");
        }
    }
}
