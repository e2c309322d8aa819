//! Mutual TLS 1.3 for the migration stream (`tls:HOST:PORT`).
//!
//! Credentials follow QEMU's `tls-creds-x509` directory layout. Both ends
//! present a certificate signed by the directory's CA, and the destination
//! confirms the source's certificate with one byte before either side reads
//! anything else: a VM stream is only ever read from an authenticated peer,
//! and the source learns of its refusal before it sends any guest memory.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    AlertDescription, CertificateError, ClientConfig, ClientConnection, RootCertStore,
    ServerConfig, ServerConnection, StreamOwned,
};

pub(super) const CA_CERT: &str = "ca-cert.pem";
pub(super) const SERVER_CERT: &str = "server-cert.pem";
pub(super) const SERVER_KEY: &str = "server-key.pem";
pub(super) const CLIENT_CERT: &str = "client-cert.pem";
pub(super) const CLIENT_KEY: &str = "client-key.pem";

/// Sent by the destination once the source's certificate verified.
const ACCEPTED: u8 = 0x01;

/// First byte of a TLS handshake record (a ClientHello), as a plaintext
/// destination sees it.
pub(super) const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// Why the TLS credentials could not be loaded or the peer was refused.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read the TLS file {}: {source}; the directory needs QEMU's tls-creds-x509 layout ({CA_CERT}, {SERVER_CERT}, {SERVER_KEY}, {CLIENT_CERT}, {CLIENT_KEY})", path.display())]
    Pem {
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("the TLS file {} holds no certificate", path.display())]
    NoCertificate { path: PathBuf },
    #[error("the CA certificate {} is unusable: {source}", path.display())]
    Ca {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("the client-certificate verifier cannot be built from {}: {source}", path.display())]
    Verifier {
        path: PathBuf,
        #[source]
        source: rustls::server::VerifierBuilderError,
    },
    #[error("the TLS credentials in {} are unusable (does the key match the certificate?): {source}", dir.display())]
    Config {
        dir: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("the tls-hostname '{0}' is not a valid DNS name or IP address")]
    HostName(String),
    #[error("TLS with {peer} failed: {refusal}")]
    Handshake {
        peer: String,
        refusal: Refusal,
        #[source]
        source: std::io::Error,
    },
}

/// What went wrong in a handshake, in the words the operator needs.
#[derive(Debug)]
pub enum Refusal {
    /// The peer sent something that is not TLS.
    Plaintext,
    /// The peer's certificate is signed by a CA this side does not trust.
    OtherCa,
    /// The destination's certificate does not name the host asked for.
    WrongHostName,
    /// The peer's certificate is out of its validity period.
    Expired,
    /// The peer refused this side's certificate, with this alert.
    PeerRefused(AlertDescription),
    /// The peer closed the connection in the middle of the handshake.
    Closed,
    /// Anything else rustls or the socket reported.
    Other,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Plaintext => f.write_str(
                "the peer does not speak TLS (a plaintext tcp: migration?): use tls: URIs on both sides",
            ),
            Refusal::OtherCa => f.write_str(
                "the peer's certificate is not signed by this side's CA (ca-cert.pem): give both hosts certificates from the same CA",
            ),
            Refusal::WrongHostName => f.write_str(
                "the destination's certificate does not name the host the source asked for: set tls-hostname to a name in its certificate, or issue it one for this name",
            ),
            Refusal::Expired => f.write_str(
                "the peer's certificate has expired (or is not valid yet): issue a new one",
            ),
            Refusal::PeerRefused(AlertDescription::UnknownCA) => f.write_str(
                "the peer refused this side's certificate: it is not signed by the peer's CA",
            ),
            Refusal::PeerRefused(AlertDescription::CertificateExpired) => f.write_str(
                "the peer refused this side's certificate: it has expired (or is not valid yet)",
            ),
            Refusal::PeerRefused(AlertDescription::BadCertificate) => f.write_str(
                "the peer refused this side's certificate (bad_certificate: most often it does not name the host the source asked for, see tls-hostname)",
            ),
            Refusal::PeerRefused(alert) => {
                write!(f, "the peer refused the handshake with alert {alert:?}")
            }
            Refusal::Closed => f.write_str(
                "the peer closed the connection during the TLS handshake: it may listen without tls: or have refused this side's certificate; see its log",
            ),
            Refusal::Other => f.write_str("the TLS handshake failed"),
        }
    }
}

impl Refusal {
    fn of(e: &std::io::Error) -> Refusal {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            return Refusal::Closed;
        }
        let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) else {
            return Refusal::Other;
        };
        match tls {
            rustls::Error::InvalidMessage(_) => Refusal::Plaintext,
            rustls::Error::InvalidCertificate(c) => match c {
                CertificateError::UnknownIssuer => Refusal::OtherCa,
                CertificateError::NotValidForName
                | CertificateError::NotValidForNameContext { .. } => Refusal::WrongHostName,
                CertificateError::Expired
                | CertificateError::ExpiredContext { .. }
                | CertificateError::NotValidYet
                | CertificateError::NotValidYetContext { .. } => Refusal::Expired,
                _ => Refusal::Other,
            },
            rustls::Error::AlertReceived(alert) => Refusal::PeerRefused(*alert),
            _ => Refusal::Other,
        }
    }
}

/// An established, mutually authenticated TLS stream.
pub enum TlsStream {
    Client(StreamOwned<ClientConnection, BufferedSocket>),
    Server(StreamOwned<ServerConnection, BufferedSocket>),
}

/// How much of the stream one read from the socket may bring in.
const READ_BUFFER: usize = 256 * 1024;

/// The socket under a TLS session, read through a buffer: rustls asks for
/// at most one record (16 KiB) per read, so a stream read straight from the
/// socket costs a system call per record (21,000 for a 330 MiB migration,
/// against 600 for the same stream over plain TCP); one read here brings in
/// as much as the socket holds, up to READ_BUFFER. Writes go straight to
/// the socket (rustls already writes many records per call).
pub struct BufferedSocket {
    tcp: TcpStream,
    buf: Box<[u8]>,
    start: usize,
    end: usize,
}

impl BufferedSocket {
    fn new(tcp: TcpStream) -> BufferedSocket {
        BufferedSocket {
            tcp,
            buf: vec![0; READ_BUFFER].into_boxed_slice(),
            start: 0,
            end: 0,
        }
    }
}

impl Read for BufferedSocket {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        if self.start == self.end {
            // Large reads need no staging.
            if out.len() >= self.buf.len() {
                return self.tcp.read(out);
            }
            self.end = self.tcp.read(&mut self.buf)?;
            self.start = 0;
        }
        let n = out.len().min(self.end - self.start);
        out[..n].copy_from_slice(&self.buf[self.start..self.start + n]);
        self.start += n;
        Ok(n)
    }
}

impl Write for BufferedSocket {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.tcp.write(buf)
    }
    fn write_vectored(&mut self, bufs: &[std::io::IoSlice<'_>]) -> std::io::Result<usize> {
        self.tcp.write_vectored(bufs)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.tcp.flush()
    }
}

impl Read for TlsStream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            TlsStream::Client(s) => s.read(buf),
            TlsStream::Server(s) => s.read(buf),
        }
    }
}

impl Write for TlsStream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            TlsStream::Client(s) => s.write(buf),
            TlsStream::Server(s) => s.write(buf),
        }
    }
    /// Encrypts from every slice into records without joining them first
    /// (`StreamOwned` itself writes only the first slice).
    fn write_vectored(&mut self, bufs: &[std::io::IoSlice<'_>]) -> std::io::Result<usize> {
        match self {
            TlsStream::Client(s) => {
                rustls::Stream::new(&mut s.conn, &mut s.sock).write_vectored(bufs)
            }
            TlsStream::Server(s) => {
                rustls::Stream::new(&mut s.conn, &mut s.sock).write_vectored(bufs)
            }
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            TlsStream::Client(s) => s.flush(),
            TlsStream::Server(s) => s.flush(),
        }
    }
}

/// ring's provider with AES-128-GCM preferred: every byte of guest memory
/// goes through the cipher on both hosts, and AES-128 does ten rounds per
/// block where AES-256 does fourteen. Both sides put it first (the server
/// follows the client's order); AES-256-GCM and ChaCha20-Poly1305 stay
/// acceptable for a peer that prefers them.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    let mut provider = rustls::crypto::ring::default_provider();
    provider
        .cipher_suites
        .sort_by_key(|suite| suite.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    Arc::new(provider)
}

fn certs(path: PathBuf) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = |source| TlsError::Pem {
        path: path.clone(),
        source,
    };
    let certs = CertificateDer::pem_file_iter(&path)
        .map_err(pem)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem)?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate { path });
    }
    Ok(certs)
}

fn key(path: PathBuf) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(&path).map_err(|source| TlsError::Pem { path, source })
}

fn roots(dir: &Path) -> Result<RootCertStore, TlsError> {
    let path = dir.join(CA_CERT);
    let mut roots = RootCertStore::empty();
    for cert in certs(path.clone())? {
        roots.add(cert).map_err(|source| TlsError::Ca {
            path: path.clone(),
            source,
        })?;
    }
    Ok(roots)
}

/// The destination's side: its certificate, and the CA that must have
/// signed the source's.
pub(super) fn server_config(dir: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = provider();
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots(dir)?), provider.clone())
            .build()
            .map_err(|source| TlsError::Verifier {
                path: dir.join(CA_CERT),
                source,
            })?;
    let config_err = |source| TlsError::Config {
        dir: dir.to_path_buf(),
        source,
    };
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(config_err)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs(dir.join(SERVER_CERT))?, key(dir.join(SERVER_KEY))?)
        .map_err(config_err)?;
    // One connection per migration: a ticket for resuming it is never used.
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// The source's side: its certificate, and the CA that must have signed
/// the destination's.
pub(super) fn client_config(dir: &Path) -> Result<Arc<ClientConfig>, TlsError> {
    let config_err = |source| TlsError::Config {
        dir: dir.to_path_buf(),
        source,
    };
    let config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(config_err)?
        .with_root_certificates(roots(dir)?)
        .with_client_auth_cert(certs(dir.join(CLIENT_CERT))?, key(dir.join(CLIENT_KEY))?)
        .map_err(config_err)?;
    Ok(Arc::new(config))
}

/// What a credential file was when it was read: a rewritten file (a renewed
/// certificate) differs in one of these.
#[derive(Clone, Debug, PartialEq, Eq)]
struct FileStamp {
    modified: Option<std::time::SystemTime>,
    len: u64,
    inode: u64,
}

fn stamps(dir: &Path) -> Vec<Option<FileStamp>> {
    use std::os::unix::fs::MetadataExt;
    [CA_CERT, CLIENT_CERT, CLIENT_KEY]
        .iter()
        .map(|name| {
            std::fs::metadata(dir.join(name)).ok().map(|m| FileStamp {
                modified: m.modified().ok(),
                len: m.len(),
                inode: m.ino(),
            })
        })
        .collect()
}

/// The source's credentials, loaded when `migrate-set-parameters` names
/// their directory (as QEMU loads a `tls-creds-x509` object when it is
/// created): a directory that cannot serve is refused there, and a
/// migration does not read and parse the files again (about 0.2 ms, once
/// per connection) unless one of them changed since.
#[derive(Clone, Debug)]
pub struct ClientCreds {
    dir: PathBuf,
    stamps: Vec<Option<FileStamp>>,
    config: Arc<ClientConfig>,
}

impl ClientCreds {
    pub fn load(dir: &Path) -> Result<ClientCreds, TlsError> {
        let stamps = stamps(dir);
        Ok(ClientCreds {
            dir: dir.to_path_buf(),
            stamps,
            config: client_config(dir)?,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The configuration, read again from the directory if one of its
    /// files changed since it was loaded.
    pub(super) fn current(&self) -> Result<Arc<ClientConfig>, TlsError> {
        if stamps(&self.dir) == self.stamps {
            Ok(Arc::clone(&self.config))
        } else {
            client_config(&self.dir)
        }
    }
}

/// Runs the handshake as the source. The destination's verdict on this
/// side's certificate is still to come: the caller may write its first
/// message (the destination reads nothing before its verdict) and must then
/// take the verdict with [`confirm_accepted`] before it reads anything.
pub(super) fn connect(
    config: Arc<ClientConfig>,
    hostname: &str,
    tcp: TcpStream,
    peer: &str,
) -> Result<TlsStream, TlsError> {
    let name = ServerName::try_from(hostname.to_string())
        .map_err(|_| TlsError::HostName(hostname.to_string()))?;
    let conn = ClientConnection::new(config, name)
        .map_err(|e| handshake_failed(peer, std::io::Error::other(e)))?;
    let mut stream = StreamOwned::new(conn, BufferedSocket::new(tcp));
    while stream.conn.is_handshaking() {
        stream
            .conn
            .complete_io(&mut stream.sock)
            .map_err(|e| handshake_failed(peer, e))?;
    }
    Ok(TlsStream::Client(stream))
}

/// Reads the destination's verdict on this side's certificate: in TLS 1.3
/// the client's handshake ends before the server has checked the client's
/// certificate, so its acceptance (or its alert) comes as the first byte.
pub(super) fn confirm_accepted(stream: &mut TlsStream, peer: &str) -> Result<(), TlsError> {
    let mut accepted = [0u8; 1];
    stream
        .read_exact(&mut accepted)
        .map_err(|e| handshake_failed(peer, e))?;
    if accepted[0] != ACCEPTED {
        return Err(handshake_failed(
            peer,
            std::io::Error::other("the destination's first byte is not the TLS acceptance"),
        ));
    }
    Ok(())
}

fn handshake_failed(peer: &str, source: std::io::Error) -> TlsError {
    TlsError::Handshake {
        peer: peer.to_string(),
        refusal: Refusal::of(&source),
        source,
    }
}

/// Runs the handshake as the destination; on success tells the source its
/// certificate was accepted.
pub(super) fn accept(
    config: Arc<ServerConfig>,
    tcp: TcpStream,
    peer: &str,
) -> Result<TlsStream, TlsError> {
    let conn = ServerConnection::new(config)
        .map_err(|e| handshake_failed(peer, std::io::Error::other(e)))?;
    let mut stream = StreamOwned::new(conn, BufferedSocket::new(tcp));
    while stream.conn.is_handshaking() {
        if let Err(e) = stream.conn.complete_io(&mut stream.sock) {
            // rustls has written its alert. The source may already have sent
            // its first message after its own handshake: closing with that
            // unread would reset the connection and could lose the alert, so
            // what it sent is read and dropped until it closes.
            super::transport::drain_then_close(stream.sock.tcp);
            return Err(handshake_failed(peer, e));
        }
    }
    stream
        .write_all(&[ACCEPTED])
        .and_then(|()| stream.flush())
        .map_err(|e| handshake_failed(peer, e))?;
    Ok(TlsStream::Server(stream))
}

/// The plaintext-peer refusal, for a side that detected it itself.
pub(super) fn plaintext_peer(peer: &str, what: &'static str) -> TlsError {
    TlsError::Handshake {
        peer: peer.to_string(),
        refusal: Refusal::Plaintext,
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, what),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aes_128_gcm_is_preferred_and_the_others_stay() {
        let suites: Vec<_> = provider().cipher_suites.iter().map(|s| s.suite()).collect();
        assert_eq!(suites[0], rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
        for other in [
            rustls::CipherSuite::TLS13_AES_256_GCM_SHA384,
            rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256,
        ] {
            assert!(suites.contains(&other), "{other:?} missing from {suites:?}");
        }
    }

    #[test]
    fn client_creds_are_read_again_when_a_file_changes() {
        let dir = std::env::temp_dir().join(format!("godwit-tls-creds-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let ca = rcgen::CertificateParams::new(Vec::<String>::new())
            .unwrap()
            .self_signed(&key)
            .unwrap();
        std::fs::write(dir.join(CA_CERT), ca.pem()).unwrap();
        std::fs::write(dir.join(CLIENT_CERT), ca.pem()).unwrap();
        std::fs::write(dir.join(CLIENT_KEY), key.serialize_pem()).unwrap();
        let creds = ClientCreds::load(&dir).unwrap();
        let same = creds.current().unwrap();
        assert!(
            Arc::ptr_eq(&same, &creds.config),
            "unchanged files are not read again"
        );
        // A renewed key that is no longer usable shows at once.
        std::fs::write(dir.join(CLIENT_KEY), "not a key").unwrap();
        let err = creds.current().unwrap_err();
        assert!(err.to_string().contains(CLIENT_KEY), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
