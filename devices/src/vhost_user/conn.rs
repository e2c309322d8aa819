//! The frontend side of the vhost-user protocol: one connection to a
//! backend, request by request, with a deadline on every read and an error
//! that names the message and what was wrong with the reply.
//!
//! Message codes and protocol feature bits are the `vhost` crate's
//! ([`FrontendReq`], [`VhostUserProtocolFeatures`]). godwit does not use
//! that crate's `Frontend` for the conversation itself: its receive loop
//! retries a timed-out read forever (a silent or half-replying backend would
//! hang godwit), its `get_protocol_features` drops bits it does not know
//! (godwit's extension bit among them), it expects a 16-byte reply to
//! SET_LOG_BASE (DPDK sends none), and its errors do not say which check a
//! reply failed.
//!
//! Framing (vhost-user spec): a 12-byte header `u32 request, u32 flags,
//! u32 size` (flags: version 1 in bits 0-1, 0x4 reply, 0x8 need reply), then
//! `size` bytes of payload; file descriptors travel as SCM_RIGHTS with the
//! header.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::FrontendReq;
use vhost::vhost_user::VhostUserProtocolFeatures;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// VHOST_USER_F_PROTOCOL_FEATURES (a feature bit, not a virtio-net one).
pub const F_PROTOCOL_FEATURES: u64 = 1 << 30;
/// VHOST_F_LOG_ALL: the backend logs every write to guest memory.
pub const F_LOG_ALL: u64 = 1 << 26;
/// VHOST_VRING_F_LOG in SET_VRING_ADDR's flags.
pub const VRING_F_LOG: u32 = 1;

const HDR_LEN: usize = 12;
const FLAG_VERSION: u32 = 0x1;
const FLAG_VERSION_MASK: u32 = 0x3;
const FLAG_REPLY: u32 = 0x4;
const FLAG_NEED_REPLY: u32 = 0x8;
/// Largest reply payload godwit accepts (a GET_CONFIG window).
const MAX_REPLY: u32 = 4096;
/// SET_MEM_TABLE carries at most this many regions (and fds).
pub const MAX_REGIONS: usize = 8;

/// The protocol features a frontend might negotiate, for messages.
pub fn protocol_names(bits: u64) -> String {
    let known = VhostUserProtocolFeatures::from_bits_truncate(bits);
    let mut names: Vec<String> = known.iter_names().map(|(n, _)| n.to_string()).collect();
    if bits & super::interface::PROTOCOL_F_GODWIT_INTERFACE != 0 {
        names.push("GODWIT_INTERFACE".into());
    }
    let other = bits & !known.bits() & !super::interface::PROTOCOL_F_GODWIT_INTERFACE;
    if other != 0 {
        names.push(format!("{other:#x}"));
    }
    names.join("|")
}

/// A failed exchange with a backend. Every variant names the backend and
/// the message.
#[derive(Debug, thiserror::Error)]
pub enum VhostUserError {
    #[error("cannot connect to the vhost-user backend socket {path}: {source}; start the backend first (it must listen on that path), or give server=on and start the backend as a client (DPDK: client=1; godwit net-backend --client)")]
    Connect { path: String, source: io::Error },
    #[error("cannot listen on {path} for a vhost-user backend (server=on): {source}")]
    Listen { path: String, source: io::Error },
    #[error("no vhost-user backend connected to {path} within {waited:?} (server=on: godwit listens there; start the backend as a client: DPDK client=1, godwit net-backend --client)")]
    NoBackend { path: String, waited: Duration },
    #[error("vhost-user backend {peer}: cannot send {request:?}: {source}")]
    Send {
        peer: String,
        request: FrontendReq,
        source: io::Error,
    },
    #[error("vhost-user backend {peer}: no complete reply to {request:?} within {timeout:?} ({got} of {wanted} bytes received): the backend is stuck, does not implement {request:?}, or sent less than its header announced")]
    Timeout {
        peer: String,
        request: FrontendReq,
        timeout: Duration,
        got: usize,
        wanted: usize,
    },
    #[error("vhost-user backend {peer} closed the connection while godwit waited for the reply to {request:?} ({got} of {wanted} bytes received)")]
    Closed {
        peer: String,
        request: FrontendReq,
        got: usize,
        wanted: usize,
    },
    #[error("vhost-user backend {peer}: bad reply to {request:?}: {detail}")]
    BadReply {
        peer: String,
        request: FrontendReq,
        detail: String,
    },
    #[error("vhost-user backend {peer} refused {request:?} (REPLY_ACK status {status:#x}){hint}")]
    Refused {
        peer: String,
        request: FrontendReq,
        status: u64,
        hint: String,
    },
    #[error("vhost-user backend {peer}: reading the reply to {request:?} failed: {source}")]
    Recv {
        peer: String,
        request: FrontendReq,
        source: io::Error,
    },
    #[error("vhost-user backend {peer}: {detail}")]
    Protocol { peer: String, detail: String },
    #[error("vhost-user backend {peer} does not support interface {name}; it supports {} (latest {latest}): pin one of those (interface=NAME), or run a backend that supports {name}", supported.join(", "))]
    UnknownInterface {
        peer: String,
        name: String,
        supported: Vec<String>,
        latest: String,
    },
}

impl VhostUserError {
    /// Whether the connection is unusable afterwards (a reply may still be
    /// in flight, or the socket is gone). A refusal leaves it usable.
    pub fn breaks_connection(&self) -> bool {
        !matches!(self, VhostUserError::Refused { .. })
    }
}

type Result<T> = std::result::Result<T, VhostUserError>;

/// One memory region of SET_MEM_TABLE.
#[derive(Clone, Copy, Debug)]
pub struct MemRegion {
    pub guest_phys_addr: u64,
    pub size: u64,
    /// Where godwit maps it (vring addresses are given in this space).
    pub user_addr: u64,
    pub mmap_offset: u64,
    pub fd: RawFd,
}

/// SET_VRING_ADDR's payload.
#[derive(Clone, Copy, Debug, Default)]
pub struct VringAddr {
    pub flags: u32,
    pub desc_user_addr: u64,
    pub used_user_addr: u64,
    pub avail_user_addr: u64,
    /// Guest physical address of the used ring (for VRING_F_LOG).
    pub log_guest_addr: u64,
}

/// A connection to one backend.
pub struct Connection {
    sock: UnixStream,
    peer: String,
    timeout: Duration,
    reply_ack: bool,
}

fn u64_payload(v: u64) -> [u8; 8] {
    v.to_le_bytes()
}

fn vring_state(index: u32, num: u32) -> [u8; 8] {
    let mut b = [0u8; 8];
    b[..4].copy_from_slice(&index.to_le_bytes());
    b[4..].copy_from_slice(&num.to_le_bytes());
    b
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

fn request_name(code: u32) -> String {
    match FrontendReq::try_from(code) {
        Ok(r) => format!("{r:?}"),
        Err(()) => "an unknown request".to_string(),
    }
}

impl Connection {
    /// Wraps a connected socket. `peer` names the backend in errors.
    pub fn new(sock: UnixStream, peer: String, timeout: Duration) -> Self {
        Connection {
            sock,
            peer,
            timeout,
            reply_ack: false,
        }
    }

    /// Connects to a listening backend.
    pub fn connect(path: &str, timeout: Duration) -> Result<Self> {
        let sock = UnixStream::connect(path).map_err(|source| VhostUserError::Connect {
            path: path.to_string(),
            source,
        })?;
        Ok(Self::new(sock, path.to_string(), timeout))
    }

    pub fn peer(&self) -> &str {
        &self.peer
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The socket, to watch for hang-ups.
    pub fn raw_fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }

    /// From now on every request without a reply of its own asks for an
    /// acknowledgement (protocol feature REPLY_ACK was negotiated).
    pub fn set_reply_ack(&mut self, on: bool) {
        self.reply_ack = on;
    }

    pub fn reply_ack(&self) -> bool {
        self.reply_ack
    }

    fn send(
        &mut self,
        request: FrontendReq,
        payload: &[u8],
        fds: &[RawFd],
        need_reply: bool,
    ) -> Result<()> {
        let mut buf = Vec::with_capacity(HDR_LEN + payload.len());
        buf.extend_from_slice(&u32::from(request).to_le_bytes());
        let flags = FLAG_VERSION | if need_reply { FLAG_NEED_REPLY } else { 0 };
        buf.extend_from_slice(&flags.to_le_bytes());
        buf.extend_from_slice(&payload_len(payload.len()).to_le_bytes());
        buf.extend_from_slice(payload);
        let err = |source| VhostUserError::Send {
            peer: self.peer.clone(),
            request,
            source,
        };
        self.sock
            .set_write_timeout(Some(self.timeout))
            .map_err(err)?;
        if fds.is_empty() {
            return self.sock.write_all(&buf).map_err(err);
        }
        let sent = self
            .sock
            .send_with_fds(&[&buf[..]], fds)
            .map_err(|e| err(io::Error::from_raw_os_error(e.errno())))?;
        if sent < buf.len() {
            self.sock.write_all(&buf[sent..]).map_err(err)?;
        }
        Ok(())
    }

    /// Reads exactly `buf.len()` bytes before `deadline`. `done` counts
    /// bytes of the reply already read (for messages).
    fn read_exact_by(
        &mut self,
        request: FrontendReq,
        buf: &mut [u8],
        deadline: Instant,
        done: usize,
        wanted: usize,
    ) -> Result<()> {
        let mut got = 0;
        while got < buf.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(VhostUserError::Timeout {
                    peer: self.peer.clone(),
                    request,
                    timeout: self.timeout,
                    got: done + got,
                    wanted,
                });
            }
            self.sock
                .set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .map_err(|source| VhostUserError::Recv {
                    peer: self.peer.clone(),
                    request,
                    source,
                })?;
            match self.sock.read(&mut buf[got..]) {
                Ok(0) => {
                    return Err(VhostUserError::Closed {
                        peer: self.peer.clone(),
                        request,
                        got: done + got,
                        wanted,
                    })
                }
                Ok(n) => got += n,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock
                            | io::ErrorKind::TimedOut
                            | io::ErrorKind::Interrupted
                    ) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
                    ) =>
                {
                    return Err(VhostUserError::Closed {
                        peer: self.peer.clone(),
                        request,
                        got: done + got,
                        wanted,
                    })
                }
                Err(source) => {
                    return Err(VhostUserError::Recv {
                        peer: self.peer.clone(),
                        request,
                        source,
                    })
                }
            }
        }
        Ok(())
    }

    /// Reads the reply to `request` and checks its header. `expected`: the
    /// payload sizes `request`'s reply may have.
    fn recv(&mut self, request: FrontendReq, expected: &[usize]) -> Result<Vec<u8>> {
        let deadline = Instant::now() + self.timeout;
        let min = expected.iter().copied().min().unwrap_or(0);
        let mut hdr = [0u8; HDR_LEN];
        self.read_exact_by(request, &mut hdr, deadline, 0, HDR_LEN + min)?;
        let (code, flags, size) = (le_u32(&hdr, 0), le_u32(&hdr, 4), le_u32(&hdr, 8));
        let bad = |detail: String| VhostUserError::BadReply {
            peer: self.peer.clone(),
            request,
            detail,
        };
        if code != u32::from(request) {
            return Err(bad(format!(
                "the reply is for request {code} ({}), not {} ({request:?}): the backend answered another message",
                request_name(code),
                u32::from(request)
            )));
        }
        if flags & FLAG_REPLY == 0 {
            return Err(bad(format!(
                "its flags {flags:#x} lack the reply bit (0x4)"
            )));
        }
        if flags & FLAG_VERSION_MASK != FLAG_VERSION {
            return Err(bad(format!(
                "its flags {flags:#x} say protocol version {}, not 1",
                flags & FLAG_VERSION_MASK
            )));
        }
        if size > MAX_REPLY {
            return Err(bad(format!(
                "its header announces {size} bytes of payload, more than the {MAX_REPLY} any reply has"
            )));
        }
        let size = size as usize;
        if !expected.contains(&size) {
            return Err(bad(format!(
                "its payload is {size} bytes; {request:?} is answered with {}",
                expected
                    .iter()
                    .map(|n| format!("{n} bytes"))
                    .collect::<Vec<_>>()
                    .join(" or ")
            )));
        }
        let mut payload = vec![0u8; size];
        self.read_exact_by(request, &mut payload, deadline, HDR_LEN, HDR_LEN + size)?;
        Ok(payload)
    }

    /// Sends a request that has no reply of its own; with REPLY_ACK, waits
    /// for the acknowledgement.
    fn request_ack(&mut self, request: FrontendReq, payload: &[u8], fds: &[RawFd]) -> Result<()> {
        let ack = self.reply_ack;
        self.send(request, payload, fds, ack)?;
        if !ack {
            return Ok(());
        }
        let reply = self.recv(request, &[8])?;
        let status = le_u64(&reply, 0);
        if status != 0 {
            return Err(VhostUserError::Refused {
                peer: self.peer.clone(),
                request,
                status,
                hint: String::new(),
            });
        }
        Ok(())
    }

    fn get_u64(&mut self, request: FrontendReq) -> Result<u64> {
        self.send(request, &[], &[], false)?;
        let reply = self.recv(request, &[8])?;
        Ok(le_u64(&reply, 0))
    }

    pub fn set_owner(&mut self) -> Result<()> {
        self.request_ack(FrontendReq::SET_OWNER, &[], &[])
    }

    pub fn get_features(&mut self) -> Result<u64> {
        self.get_u64(FrontendReq::GET_FEATURES)
    }

    pub fn set_features(&mut self, features: u64) -> Result<()> {
        self.request_ack(FrontendReq::SET_FEATURES, &u64_payload(features), &[])
    }

    pub fn get_protocol_features(&mut self) -> Result<u64> {
        self.get_u64(FrontendReq::GET_PROTOCOL_FEATURES)
    }

    /// SET_PROTOCOL_FEATURES is not acknowledged (REPLY_ACK may be among
    /// the bits it is negotiating).
    pub fn set_protocol_features(&mut self, features: u64) -> Result<()> {
        self.send(
            FrontendReq::SET_PROTOCOL_FEATURES,
            &u64_payload(features),
            &[],
            false,
        )
    }

    pub fn get_queue_num(&mut self) -> Result<u64> {
        self.get_u64(FrontendReq::GET_QUEUE_NUM)
    }

    pub fn set_mem_table(&mut self, regions: &[MemRegion]) -> Result<()> {
        if regions.is_empty() || regions.len() > MAX_REGIONS {
            return Err(VhostUserError::Protocol {
                peer: self.peer.clone(),
                detail: format!(
                    "guest memory has {} regions; SET_MEM_TABLE carries 1 to {MAX_REGIONS}",
                    regions.len()
                ),
            });
        }
        let mut p = Vec::with_capacity(8 + 32 * regions.len());
        p.extend_from_slice(&payload_len(regions.len()).to_le_bytes());
        p.extend_from_slice(&0u32.to_le_bytes());
        for r in regions {
            p.extend_from_slice(&r.guest_phys_addr.to_le_bytes());
            p.extend_from_slice(&r.size.to_le_bytes());
            p.extend_from_slice(&r.user_addr.to_le_bytes());
            p.extend_from_slice(&r.mmap_offset.to_le_bytes());
        }
        let fds: Vec<RawFd> = regions.iter().map(|r| r.fd).collect();
        self.request_ack(FrontendReq::SET_MEM_TABLE, &p, &fds)
    }

    pub fn set_vring_num(&mut self, index: u32, num: u16) -> Result<()> {
        self.request_ack(
            FrontendReq::SET_VRING_NUM,
            &vring_state(index, u32::from(num)),
            &[],
        )
    }

    pub fn set_vring_base(&mut self, index: u32, base: u16) -> Result<()> {
        self.request_ack(
            FrontendReq::SET_VRING_BASE,
            &vring_state(index, u32::from(base)),
            &[],
        )
    }

    pub fn set_vring_addr(&mut self, index: u32, a: &VringAddr) -> Result<()> {
        let mut p = Vec::with_capacity(40);
        p.extend_from_slice(&index.to_le_bytes());
        p.extend_from_slice(&a.flags.to_le_bytes());
        p.extend_from_slice(&a.desc_user_addr.to_le_bytes());
        p.extend_from_slice(&a.used_user_addr.to_le_bytes());
        p.extend_from_slice(&a.avail_user_addr.to_le_bytes());
        p.extend_from_slice(&a.log_guest_addr.to_le_bytes());
        self.request_ack(FrontendReq::SET_VRING_ADDR, &p, &[])
    }

    /// Stops ring `index` and returns where the backend stopped (its next
    /// available index).
    pub fn get_vring_base(&mut self, index: u32) -> Result<u16> {
        let request = FrontendReq::GET_VRING_BASE;
        self.send(request, &vring_state(index, 0), &[], false)?;
        let reply = self.recv(request, &[8])?;
        let (got_index, num) = (le_u32(&reply, 0), le_u32(&reply, 4));
        match u16::try_from(num) {
            Ok(num) if got_index == index => Ok(num),
            _ => Err(VhostUserError::BadReply {
                peer: self.peer.clone(),
                request,
                detail: format!(
                    "asked for ring {index}, got ring {got_index} at index {num} (a split ring index is 16 bits)"
                ),
            }),
        }
    }

    pub fn set_vring_kick(&mut self, index: u32, fd: RawFd) -> Result<()> {
        self.request_ack(
            FrontendReq::SET_VRING_KICK,
            &u64_payload(u64::from(index)),
            &[fd],
        )
    }

    pub fn set_vring_call(&mut self, index: u32, fd: RawFd) -> Result<()> {
        self.request_ack(
            FrontendReq::SET_VRING_CALL,
            &u64_payload(u64::from(index)),
            &[fd],
        )
    }

    pub fn set_vring_enable(&mut self, index: u32, enable: bool) -> Result<()> {
        self.request_ack(
            FrontendReq::SET_VRING_ENABLE,
            &vring_state(index, u32::from(enable)),
            &[],
        )
    }

    /// Asks the backend to broadcast a RARP for `mac` (protocol RARP).
    /// Without asking for an acknowledgement, as QEMU sends it: the guest
    /// announcement it serves is best effort and repeated, and waiting would
    /// let a backend that stalls hold the caller for the socket timeout.
    pub fn send_rarp(&mut self, mac: [u8; 6]) -> Result<()> {
        let mut p = [0u8; 8];
        p[..6].copy_from_slice(&mac);
        self.send(FrontendReq::SEND_RARP, &p, &[], false)
    }

    /// Tells the backend the guest's MTU (protocol MTU).
    pub fn net_set_mtu(&mut self, mtu: u16) -> Result<()> {
        self.request_ack(FrontendReq::NET_SET_MTU, &u64_payload(u64::from(mtu)), &[])
    }

    /// SET_LOG_BASE with the dirty log's memfd (protocol LOG_SHMFD). The
    /// backend replies (DPDK with no payload, rust-vmm backends echo the
    /// 16-byte request).
    pub fn set_log_base(&mut self, size: u64, offset: u64, fd: RawFd) -> Result<()> {
        let request = FrontendReq::SET_LOG_BASE;
        let mut p = [0u8; 16];
        p[..8].copy_from_slice(&size.to_le_bytes());
        p[8..].copy_from_slice(&offset.to_le_bytes());
        self.send(request, &p, &[fd], false)?;
        self.recv(request, &[0, 8, 16])?;
        Ok(())
    }

    /// GET_CONFIG of `size` bytes at `offset` (protocol CONFIG).
    pub fn get_config(&mut self, offset: u32, size: u32) -> Result<Vec<u8>> {
        let request = FrontendReq::GET_CONFIG;
        let mut p = Vec::with_capacity(12 + size as usize);
        p.extend_from_slice(&offset.to_le_bytes());
        p.extend_from_slice(&size.to_le_bytes());
        p.extend_from_slice(&0u32.to_le_bytes());
        p.resize(12 + size as usize, 0);
        self.send(request, &p, &[], false)?;
        let reply = self.recv(request, &[12, 12 + size as usize])?;
        let (r_off, r_size) = (le_u32(&reply, 0), le_u32(&reply, 4));
        if r_size == 0 && reply.len() == 12 {
            return Err(VhostUserError::Refused {
                peer: self.peer.clone(),
                request,
                status: 1,
                hint: format!(" (an empty reply for {size} bytes at offset {offset:#x})"),
            });
        }
        if r_off != offset || r_size != size || reply.len() != 12 + size as usize {
            return Err(VhostUserError::BadReply {
                peer: self.peer.clone(),
                request,
                detail: format!(
                    "asked for {size} bytes at {offset:#x}, the reply says {r_size} bytes at {r_off:#x} and carries {} bytes",
                    reply.len().saturating_sub(12)
                ),
            });
        }
        Ok(reply[12..].to_vec())
    }

    /// SET_CONFIG of `data` at `offset` (protocol CONFIG).
    pub fn set_config(&mut self, offset: u32, data: &[u8]) -> Result<()> {
        let mut p = Vec::with_capacity(12 + data.len());
        p.extend_from_slice(&offset.to_le_bytes());
        p.extend_from_slice(&payload_len(data.len()).to_le_bytes());
        p.extend_from_slice(&0u32.to_le_bytes());
        p.extend_from_slice(data);
        self.request_ack(FrontendReq::SET_CONFIG, &p, &[])
    }

    /// A duplicate of the socket, to watch it for a hang-up from another
    /// thread.
    pub fn try_clone_socket(&self) -> io::Result<UnixStream> {
        self.sock.try_clone()
    }

    /// The backend hung up (or the socket failed), without blocking.
    pub fn hung_up(&self) -> bool {
        let mut pfd = libc::pollfd {
            fd: self.sock.as_raw_fd(),
            events: libc::POLLRDHUP,
            revents: 0,
        };
        // SAFETY: poll on one valid pollfd owned by this frame, zero timeout.
        let n = unsafe { libc::poll(&mut pfd, 1, 0) };
        n > 0
            && pfd.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0
    }

    /// Closes both directions (the backend sees the disconnect).
    pub fn shutdown(&self) {
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
    }
}

/// A length or count in a message godwit builds. Messages are built from
/// godwit's own small tables (a few memory regions, a config window of at
/// most 256 bytes), far below 4 GiB; saturating keeps a broken caller from
/// wrapping the field into a short, valid-looking length.
pub(crate) fn payload_len(len: usize) -> u32 {
    u32::try_from(len).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    fn pair() -> (Connection, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        (Connection::new(a, "test".into(), Duration::from_secs(1)), b)
    }

    fn read_request(b: &mut UnixStream) -> (u32, u32, Vec<u8>) {
        let mut hdr = [0u8; 12];
        b.read_exact(&mut hdr).unwrap();
        let size = le_u32(&hdr, 8) as usize;
        let mut p = vec![0u8; size];
        b.read_exact(&mut p).unwrap();
        (le_u32(&hdr, 0), le_u32(&hdr, 4), p)
    }

    fn reply(b: &mut UnixStream, code: u32, flags: u32, payload: &[u8]) {
        let mut m = Vec::new();
        m.extend_from_slice(&code.to_le_bytes());
        m.extend_from_slice(&flags.to_le_bytes());
        m.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        m.extend_from_slice(payload);
        b.write_all(&m).unwrap();
    }

    /// SEND_RARP asks for no reply even with REPLY_ACK negotiated, as QEMU
    /// sends it: a backend that never answers it cannot hold the caller
    /// (the main loop's announcement rounds, and a `quit` behind them) for
    /// the socket timeout.
    #[test]
    fn send_rarp_does_not_wait_for_an_acknowledgement() {
        let (mut c, mut b) = pair();
        c.set_reply_ack(true);
        let mac = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
        let started = Instant::now();
        c.send_rarp(mac).expect("SEND_RARP to a silent backend");
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "waited {:?} for a backend that never answers",
            started.elapsed()
        );
        let (code, flags, p) = read_request(&mut b);
        assert_eq!(code, u32::from(FrontendReq::SEND_RARP));
        assert_eq!(flags & FLAG_NEED_REPLY, 0, "flags {flags:#x}");
        assert_eq!(&p[..6], &mac);
    }

    #[test]
    fn good_reply() {
        let (mut c, mut b) = pair();
        let t = std::thread::spawn(move || {
            let (code, flags, p) = read_request(&mut b);
            assert_eq!(code, 1);
            assert_eq!(flags, 1);
            assert!(p.is_empty());
            reply(&mut b, 1, 5, &0x1234u64.to_le_bytes());
            b
        });
        assert_eq!(c.get_features().unwrap(), 0x1234);
        t.join().unwrap();
    }

    fn bad_reply(code: u32, flags: u32, payload: &[u8], needle: &str) {
        let (mut c, mut b) = pair();
        let payload = payload.to_vec();
        let t = std::thread::spawn(move || {
            read_request(&mut b);
            reply(&mut b, code, flags, &payload);
            std::thread::sleep(Duration::from_millis(100));
        });
        let started = Instant::now();
        let err = c.get_features().unwrap_err().to_string();
        assert!(
            started.elapsed() < Duration::from_millis(900),
            "no waiting for the deadline"
        );
        assert!(
            err.contains("GET_FEATURES") && err.contains(needle),
            "{err}"
        );
        t.join().unwrap();
    }

    #[test]
    fn bad_replies_name_the_message_and_the_problem() {
        bad_reply(15, 5, &7u64.to_le_bytes(), "GET_PROTOCOL_FEATURES");
        bad_reply(1, 1, &7u64.to_le_bytes(), "lack the reply bit");
        bad_reply(1, 6, &7u64.to_le_bytes(), "protocol version 2");
        bad_reply(1, 5, &[1, 2, 3, 4], "payload is 4 bytes");
        bad_reply(1, 5, &vec![0u8; 5000], "more than the 4096");
    }

    #[test]
    fn short_payload_silence_and_hang_up_do_not_hang() {
        // The header announces 8 bytes, 4 come, then silence.
        let (mut c, mut b) = pair();
        let t = std::thread::spawn(move || {
            read_request(&mut b);
            let mut m = Vec::new();
            m.extend_from_slice(&1u32.to_le_bytes());
            m.extend_from_slice(&5u32.to_le_bytes());
            m.extend_from_slice(&8u32.to_le_bytes());
            m.extend_from_slice(&[1, 2, 3, 4]);
            b.write_all(&m).unwrap();
            std::thread::sleep(Duration::from_secs(2));
        });
        let err = c.get_features().unwrap_err();
        assert!(
            matches!(
                err,
                VhostUserError::Timeout {
                    got: 16,
                    wanted: 20,
                    ..
                }
            ),
            "{err}"
        );
        t.join().unwrap();
        // Closed mid-reply.
        let (mut c, mut b) = pair();
        let t = std::thread::spawn(move || {
            read_request(&mut b);
            b.write_all(&[1, 0, 0]).unwrap();
        });
        let err = c.get_features().unwrap_err();
        assert!(
            matches!(err, VhostUserError::Closed { got: 3, .. }),
            "{err}"
        );
        t.join().unwrap();
        // A refused acknowledgement.
        let (mut c, mut b) = pair();
        c.set_reply_ack(true);
        let t = std::thread::spawn(move || {
            let (code, flags, _) = read_request(&mut b);
            assert_eq!(flags & FLAG_NEED_REPLY, FLAG_NEED_REPLY);
            reply(&mut b, code, 5, &1u64.to_le_bytes());
        });
        let err = c.set_features(1).unwrap_err();
        assert!(matches!(err, VhostUserError::Refused { .. }), "{err}");
        assert!(!err.breaks_connection());
        t.join().unwrap();
    }
}
