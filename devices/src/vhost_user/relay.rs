//! The message relay between a frontend and the `vhost-user-backend`
//! crate's request handler in `godwit net-backend`: it forwards every
//! message both ways (file descriptors included) and corrects, in one
//! place, what that handler gets wrong for standard frontends.
//!
//! - **SET_VRING_ENABLE before SET_FEATURES.** QEMU treats
//!   VHOST_USER_F_PROTOCOL_FEATURES as negotiated once the backend offered
//!   it and protocol features were exchanged, and sends SET_VRING_ENABLE
//!   when the guest driver writes its features (and again when it restores
//!   the rings' state on start), all before the SET_FEATURES of the device
//!   start. The spec's ring state machine keeps the enabled state while a
//!   ring is stopped, so such a message is valid; `vhost` 0.18 and
//!   `vhost-user-backend` 0.24 refuse it until SET_FEATURES acked bit 30,
//!   with "inactive feature: 1073741824", and end the session. The relay
//!   keeps these states (acknowledging them itself when asked to), and gives
//!   them to the crate right after the SET_FEATURES that acks bit 30; one
//!   without bit 30 enables every ring anyway (the crate does that).
//! - **GET_QUEUE_NUM counts queue pairs.** For virtio-net QEMU compares
//!   its `queues=` (pairs) with the answer and DPDK answers its pairs; the
//!   crate answers its ring count, two per pair. The relay halves it.
//! - **Which protocol features the frontend set.** The crate does not tell
//!   its backend; the relay records SET_PROTOCOL_FEATURES in
//!   [`Negotiated`] so that godwit's extension answers only a frontend that
//!   negotiated it.
//!
//! A message the relay keeps is never reordered against one the crate
//! answers: a frontend waits for every reply before its next request.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use vhost::vhost_user::message::FrontendReq;
use vhost::vhost_user::VhostUserProtocolFeatures as P;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::conn::F_PROTOCOL_FEATURES;

const HDR_LEN: usize = 12;
const FLAG_VERSION: u32 = 0x1;
const FLAG_REPLY: u32 = 0x4;
const FLAG_NEED_REPLY: u32 = 0x8;
/// The crate refuses larger messages (vhost's MAX_MSG_SIZE); a relay that
/// accepted more would only move the refusal.
const MAX_PAYLOAD: usize = 0x1000;
/// File descriptors one message may carry (vhost's MAX_ATTACHED_FD_ENTRIES).
const MAX_FDS: usize = 32;

/// What the frontend negotiated on this connection, as the relay saw it.
#[derive(Debug, Default)]
pub struct Negotiated {
    protocol: AtomicU64,
}

impl Negotiated {
    /// As if the frontend had set `protocol` already (for driving the
    /// backend without a relay: tests, fuzzing).
    pub fn with_protocol(protocol: u64) -> Self {
        Negotiated {
            protocol: AtomicU64::new(protocol),
        }
    }

    /// The protocol features of the frontend's SET_PROTOCOL_FEATURES (0
    /// before it).
    pub fn protocol(&self) -> u64 {
        self.protocol.load(Ordering::SeqCst)
    }
}

/// One message: header fields, payload and the descriptors that came with
/// it.
struct Message {
    code: u32,
    flags: u32,
    payload: Vec<u8>,
    files: Vec<File>,
}

impl Message {
    fn is(&self, req: FrontendReq) -> bool {
        self.code == u32::from(req)
    }

    fn u64_at(&self, at: usize) -> Option<u64> {
        let b = self.payload.get(at..at + 8)?;
        Some(u64::from_le_bytes(b.try_into().ok()?))
    }

    fn u32_at(&self, at: usize) -> Option<u32> {
        let b = self.payload.get(at..at + 4)?;
        Some(u32::from_le_bytes(b.try_into().ok()?))
    }

    fn encode(&self) -> Vec<u8> {
        let mut buf = Vec::with_capacity(HDR_LEN + self.payload.len());
        buf.extend_from_slice(&self.code.to_le_bytes());
        buf.extend_from_slice(&self.flags.to_le_bytes());
        buf.extend_from_slice(&super::conn::payload_len(self.payload.len()).to_le_bytes());
        buf.extend_from_slice(&self.payload);
        buf
    }
}

fn name(code: u32) -> String {
    match FrontendReq::try_from(code) {
        Ok(r) => format!("{r:?}"),
        Err(()) => format!("request {code}"),
    }
}

/// Reads one message; `None` when the peer closed the connection between
/// messages.
fn read_message(sock: &UnixStream) -> io::Result<Option<Message>> {
    let mut hdr = [0u8; HDR_LEN];
    let mut fds = [-1 as RawFd; MAX_FDS];
    let mut iov = [libc::iovec {
        iov_base: hdr.as_mut_ptr().cast(),
        iov_len: HDR_LEN,
    }];
    let (got, nfds) = loop {
        // SAFETY: the iovec points at `hdr`, which lives across the call
        // and may take any bytes.
        match unsafe { sock.recv_with_fds(&mut iov, &mut fds) } {
            Err(e) if e.errno() == libc::EINTR => continue,
            res => break res.map_err(|e| io::Error::from_raw_os_error(e.errno()))?,
        }
    };
    let files = fds[..nfds]
        .iter()
        // SAFETY: recvmsg just installed these descriptors in this
        // process; nothing else owns them.
        .map(|&fd| unsafe { File::from_raw_fd(fd) })
        .collect();
    if got == 0 {
        return Ok(None);
    }
    let mut sock_ref = sock;
    sock_ref.read_exact(&mut hdr[got..])?;
    let word = |at: usize| u32::from_le_bytes([hdr[at], hdr[at + 1], hdr[at + 2], hdr[at + 3]]);
    let (code, flags, size) = (word(0), word(4), word(8) as usize);
    if size > MAX_PAYLOAD {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{} announces {size} bytes of payload, more than the {MAX_PAYLOAD} vhost-user allows",
                name(code)
            ),
        ));
    }
    let mut payload = vec![0u8; size];
    sock_ref.read_exact(&mut payload)?;
    Ok(Some(Message {
        code,
        flags,
        payload,
        files,
    }))
}

fn write_message(sock: &UnixStream, msg: &Message) -> io::Result<()> {
    let buf = msg.encode();
    let mut sock_ref = sock;
    if msg.files.is_empty() {
        return sock_ref.write_all(&buf);
    }
    let fds: Vec<RawFd> = msg.files.iter().map(AsRawFd::as_raw_fd).collect();
    let sent = sock
        .send_with_fds(&[&buf[..]], &fds)
        .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
    sock_ref.write_all(&buf[sent..])
}

/// The relay's view of the session, on the request side.
struct Gate {
    negotiated: Arc<Negotiated>,
    /// The last SET_FEATURES acked VHOST_USER_F_PROTOCOL_FEATURES: the crate
    /// now takes SET_VRING_ENABLE itself.
    protocol_features_acked: bool,
    /// Ring index -> enabled, from SET_VRING_ENABLE the crate would refuse.
    held: BTreeMap<u32, bool>,
}

impl Gate {
    /// Handles one frontend message: forwards it to the crate (`inner`),
    /// or keeps it and answers the frontend (`frontend`) itself.
    fn request(
        &mut self,
        msg: Message,
        inner: &UnixStream,
        frontend: &Mutex<UnixStream>,
    ) -> io::Result<()> {
        tracing::debug!(
            request = %name(msg.code),
            flags = msg.flags,
            size = msg.payload.len(),
            fds = msg.files.len(),
            "frontend request"
        );
        if msg.is(FrontendReq::SET_PROTOCOL_FEATURES) {
            if let Some(bits) = msg.u64_at(0) {
                self.negotiated.protocol.store(bits, Ordering::SeqCst);
                tracing::info!(
                    "the frontend set protocol features {bits:#x} ({})",
                    super::conn::protocol_names(bits)
                );
            }
        }
        if msg.is(FrontendReq::SET_VRING_ENABLE) && !self.protocol_features_acked {
            return self.hold_enable(&msg, frontend);
        }
        let features = msg
            .is(FrontendReq::SET_FEATURES)
            .then(|| msg.u64_at(0))
            .flatten();
        write_message(inner, &msg)?;
        if let Some(features) = features {
            self.protocol_features_acked = features & F_PROTOCOL_FEATURES != 0;
            if self.protocol_features_acked {
                for (index, enabled) in std::mem::take(&mut self.held) {
                    tracing::debug!(index, enabled, "passing on an early SET_VRING_ENABLE");
                    write_message(inner, &enable_message(index, enabled))?;
                }
            } else {
                // Without bit 30 the crate enables every ring.
                self.held.clear();
            }
        }
        Ok(())
    }

    fn hold_enable(&mut self, msg: &Message, frontend: &Mutex<UnixStream>) -> io::Result<()> {
        let (index, num) = (msg.u32_at(0), msg.u32_at(4));
        let accepted = match (index, num) {
            (Some(index), Some(num @ (0 | 1))) => {
                tracing::debug!(
                    index,
                    enabled = num == 1,
                    "SET_VRING_ENABLE before SET_FEATURES: kept until it"
                );
                self.held.insert(index, num == 1);
                true
            }
            _ => {
                tracing::warn!(
                    "the frontend sent a malformed SET_VRING_ENABLE ({} bytes): refused",
                    msg.payload.len()
                );
                false
            }
        };
        let reply_ack = self.negotiated.protocol() & P::REPLY_ACK.bits() != 0;
        if msg.flags & FLAG_NEED_REPLY != 0 && reply_ack {
            let ack = Message {
                code: msg.code,
                flags: FLAG_VERSION | FLAG_REPLY,
                payload: u64::from(!accepted).to_le_bytes().to_vec(),
                files: Vec::new(),
            };
            let sock = frontend.lock().unwrap_or_else(|p| p.into_inner());
            write_message(&sock, &ack)?;
        }
        Ok(())
    }
}

fn enable_message(index: u32, enabled: bool) -> Message {
    let mut payload = index.to_le_bytes().to_vec();
    payload.extend_from_slice(&u32::from(enabled).to_le_bytes());
    Message {
        code: u32::from(FrontendReq::SET_VRING_ENABLE),
        flags: FLAG_VERSION,
        payload,
        files: Vec::new(),
    }
}

/// A running relay: two threads, one per direction.
pub struct Relay {
    frontend: UnixStream,
    inner: UnixStream,
    threads: Vec<JoinHandle<()>>,
}

impl Relay {
    /// Relays between `frontend` (the connection a frontend made or
    /// accepted) and `inner` (the crate's request handler's connection).
    pub fn spawn(
        frontend: UnixStream,
        inner: UnixStream,
        negotiated: Arc<Negotiated>,
    ) -> io::Result<Relay> {
        let front_w = Arc::new(Mutex::new(frontend.try_clone()?));
        let front_r = frontend.try_clone()?;
        let inner_w = inner.try_clone()?;
        let inner_r = inner.try_clone()?;
        let (end_a, end_b) = (
            (frontend.try_clone()?, inner.try_clone()?),
            (frontend.try_clone()?, inner.try_clone()?),
        );
        let replies_to = front_w.clone();
        let requests = std::thread::Builder::new()
            .name("gw-vu-relay-req".into())
            .spawn(move || {
                let mut gate = Gate {
                    negotiated,
                    protocol_features_acked: false,
                    held: BTreeMap::new(),
                };
                let res = (|| -> io::Result<()> {
                    while let Some(msg) = read_message(&front_r)? {
                        gate.request(msg, &inner_w, &front_w)?;
                    }
                    Ok(())
                })();
                if let Err(e) = res {
                    tracing::warn!("relaying the frontend's requests stopped: {e}");
                }
                end(&end_a.0, &end_a.1);
            })?;
        let replies = std::thread::Builder::new()
            .name("gw-vu-relay-rep".into())
            .spawn(move || {
                let res = (|| -> io::Result<()> {
                    while let Some(mut msg) = read_message(&inner_r)? {
                        tracing::debug!(request = %name(msg.code), size = msg.payload.len(), "backend reply");
                        if msg.is(FrontendReq::GET_QUEUE_NUM) {
                            if let Some(rings) = msg.u64_at(0) {
                                msg.payload = (rings / 2).max(1).to_le_bytes().to_vec();
                            }
                        }
                        let sock = replies_to.lock().unwrap_or_else(|p| p.into_inner());
                        write_message(&sock, &msg)?;
                    }
                    Ok(())
                })();
                if let Err(e) = res {
                    tracing::debug!("relaying the backend's replies stopped: {e}");
                }
                end(&end_b.0, &end_b.1);
            })?;
        Ok(Relay {
            frontend,
            inner,
            threads: vec![requests, replies],
        })
    }

    /// Ends both connections and waits for the threads.
    pub fn finish(mut self) {
        end(&self.frontend, &self.inner);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Either side's end ends the session on both: the crate's handler sees its
/// connection close, the frontend its backend go.
fn end(frontend: &UnixStream, inner: &UnixStream) {
    let _ = frontend.shutdown(std::net::Shutdown::Both);
    let _ = inner.shutdown(std::net::Shutdown::Both);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::IntoRawFd;
    use std::time::Duration;

    fn msg(req: FrontendReq, flags: u32, payload: Vec<u8>, files: Vec<File>) -> Message {
        Message {
            code: u32::from(req),
            flags: FLAG_VERSION | flags,
            payload,
            files,
        }
    }

    fn ring_state(index: u32, num: u32) -> Vec<u8> {
        let mut p = index.to_le_bytes().to_vec();
        p.extend_from_slice(&num.to_le_bytes());
        p
    }

    #[test]
    fn early_enables_wait_for_set_features_and_descriptors_pass_through() {
        let (frontend, relay_front) = UnixStream::pair().unwrap();
        let (relay_inner, inner) = UnixStream::pair().unwrap();
        for s in [&frontend, &inner] {
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        }
        let negotiated = Arc::new(Negotiated::default());
        let relay = Relay::spawn(relay_front, relay_inner, negotiated.clone()).unwrap();

        let protocol = P::REPLY_ACK.bits() | P::MQ.bits();
        let set_protocol = msg(
            FrontendReq::SET_PROTOCOL_FEATURES,
            0,
            protocol.to_le_bytes().to_vec(),
            Vec::new(),
        );
        write_message(&frontend, &set_protocol).unwrap();
        let got = read_message(&inner).unwrap().unwrap();
        assert!(got.is(FrontendReq::SET_PROTOCOL_FEATURES));
        assert_eq!(negotiated.protocol(), protocol);

        // Kept, and acknowledged by the relay itself.
        let enable = msg(
            FrontendReq::SET_VRING_ENABLE,
            FLAG_NEED_REPLY,
            ring_state(1, 1),
            Vec::new(),
        );
        write_message(&frontend, &enable).unwrap();
        let ack = read_message(&frontend).unwrap().unwrap();
        assert!(ack.is(FrontendReq::SET_VRING_ENABLE));
        assert_eq!(ack.flags, FLAG_VERSION | FLAG_REPLY);
        assert_eq!(ack.u64_at(0), Some(0));

        // A descriptor travels with its message.
        let event = vmm_sys_util::eventfd::EventFd::new(0).unwrap();
        event.write(7).unwrap();
        let kick = msg(
            FrontendReq::SET_VRING_KICK,
            0,
            1u64.to_le_bytes().to_vec(),
            // SAFETY: into_raw_fd hands over the clone's descriptor, which
            // nothing else owns.
            vec![unsafe { File::from_raw_fd(event.try_clone().unwrap().into_raw_fd()) }],
        );
        write_message(&frontend, &kick).unwrap();
        let got = read_message(&inner).unwrap().unwrap();
        assert!(got.is(FrontendReq::SET_VRING_KICK));
        assert_eq!(got.files.len(), 1);
        let mut count = [0u8; 8];
        (&got.files[0]).read_exact(&mut count).unwrap();
        assert_eq!(u64::from_ne_bytes(count), 7, "the same eventfd");

        // SET_FEATURES with bit 30, then the kept state.
        let features = msg(
            FrontendReq::SET_FEATURES,
            0,
            (F_PROTOCOL_FEATURES | 1 << 32).to_le_bytes().to_vec(),
            Vec::new(),
        );
        write_message(&frontend, &features).unwrap();
        assert!(read_message(&inner)
            .unwrap()
            .unwrap()
            .is(FrontendReq::SET_FEATURES));
        let passed = read_message(&inner).unwrap().unwrap();
        assert!(passed.is(FrontendReq::SET_VRING_ENABLE));
        assert_eq!(passed.payload, ring_state(1, 1));
        assert_eq!(
            passed.flags & FLAG_NEED_REPLY,
            0,
            "nobody waits for its ack"
        );

        // From now on the crate takes them, and its replies come back.
        write_message(&frontend, &enable).unwrap();
        let got = read_message(&inner).unwrap().unwrap();
        assert!(got.is(FrontendReq::SET_VRING_ENABLE));
        let reply = msg(
            FrontendReq::SET_VRING_ENABLE,
            FLAG_REPLY,
            0u64.to_le_bytes().to_vec(),
            Vec::new(),
        );
        write_message(&inner, &reply).unwrap();
        let back = read_message(&frontend).unwrap().unwrap();
        assert_eq!(back.encode(), reply.encode());

        // The frontend's hang-up reaches the crate's side.
        drop(frontend);
        assert!(read_message(&inner).unwrap().is_none());
        relay.finish();
    }
}
