//! TAP network peers: a `/dev/net/tun` file attached to a layer-2 interface.
//!
//! A [`Tap`] is either opened by name (created if it does not exist, attached
//! if it does) or adopted from a file descriptor a management layer passed in.
//! With `IFF_VNET_HDR` every frame on the fd carries a 12-byte virtio-net
//! header (`TUNSETVNETHDRSZ` 12, the virtio 1.0 layout), which is what makes
//! checksum and segmentation offloads possible; without it the TAP moves bare
//! Ethernet frames and supports no offload at all.
//!
//! Offloads the TAP may *deliver to us* (partial checksums, TSO/UFO/USO
//! super-frames) are switched with `TUNSETOFFLOAD`. This kernel's rules
//! (see shared/reference/platform.md): every flag needs `TUN_F_CSUM`,
//! `TUN_F_TSO_ECN` needs TSO4 or TSO6, `TUN_F_USO4` and `TUN_F_USO6` are only
//! accepted together, unknown bits are EINVAL.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

pub use libc::{
    TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN, TUN_F_UFO, TUN_F_USO4, TUN_F_USO6,
};

/// `TUN_F_UDP_TUNNEL_GSO` (Linux >= 6.17, include/uapi/linux/if_tun.h): the
/// TAP may deliver TSO/USO super-frames inside a UDP tunnel (VXLAN, GENEVE),
/// described by the tunnel vnet header. The kernel takes it only with a plain
/// segmentation offload (TSO or USO) beside it; older kernels refuse it
/// (EINVAL, an unknown bit).
pub const TUN_F_UDP_TUNNEL_GSO: u32 = 0x080;
/// `TUN_F_UDP_TUNNEL_GSO_CSUM`: the same, with a partial checksum in the
/// outer UDP header. Only with `TUN_F_UDP_TUNNEL_GSO`.
pub const TUN_F_UDP_TUNNEL_GSO_CSUM: u32 = 0x100;

/// Size of the virtio-net header on the TAP when it has `IFF_VNET_HDR`:
/// the virtio 1.0 header, `num_buffers` included.
pub const VNET_HDR_LEN: usize = 12;

/// All the `TUN_F_*` offload flags godwit knows.
pub const TUN_F_ALL: u32 = TUN_F_CSUM
    | TUN_F_TSO4
    | TUN_F_TSO6
    | TUN_F_TSO_ECN
    | TUN_F_UFO
    | TUN_F_USO4
    | TUN_F_USO6
    | TUN_F_UDP_TUNNEL_GSO
    | TUN_F_UDP_TUNNEL_GSO_CSUM;

const TUN_PATH: &str = "/dev/net/tun";
const IFNAMSIZ: usize = libc::IFNAMSIZ;

/// Whether the TAP should carry virtio-net headers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum VnetHdr {
    /// Required: opening sets `IFF_VNET_HDR`; adopting a TAP without it fails.
    On,
    /// Refused: opening leaves it off; adopting a TAP with it fails.
    Off,
    /// Opening sets it when the kernel supports it; adopting takes the fd as
    /// it is.
    #[default]
    Auto,
}

#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error(
        "cannot open {TUN_PATH}: {0}; the host needs the tun driver (modprobe tun) and \
         godwit needs read-write access to {TUN_PATH}"
    )]
    OpenTun(#[source] io::Error),
    #[error(
        "TAP name {name:?} is invalid: {reason}; use 1 to {max} characters without '/', ':' \
         or whitespace",
        max = IFNAMSIZ - 1
    )]
    InvalidName { name: String, reason: &'static str },
    #[error(
        "cannot create or attach TAP {name:?}: permission denied; godwit needs CAP_NET_ADMIN, \
         or create the TAP beforehand for this user (ip tuntap add {name} mode tap user <uid> \
         [vnet_hdr])"
    )]
    PermissionDenied { name: String },
    #[error(
        "TAP {name:?} is busy: another process has it open (a single-queue TAP takes one \
         reader); stop that process or choose another TAP"
    )]
    Busy { name: String },
    #[error("an interface named {name:?} already exists and is not a TAP; choose another name")]
    NameTaken { name: String },
    #[error("cannot create or attach TAP {name:?}: {source}")]
    Attach {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("fd {fd} is not a TAP device ({detail})")]
    NotATap { fd: RawFd, detail: String },
    #[error(
        "TAP {name} (fd {fd}) was opened without IFF_VNET_HDR but vnet_hdr=on was requested; \
         open it with IFF_VNET_HDR (ip tuntap add {name} mode tap vnet_hdr) or use vnet_hdr=off"
    )]
    MissingVnetHdr { name: String, fd: RawFd },
    #[error(
        "TAP {name} (fd {fd}) was opened with IFF_VNET_HDR but vnet_hdr=off was requested; \
         open it without IFF_VNET_HDR or use vnet_hdr=on"
    )]
    UnexpectedVnetHdr { name: String, fd: RawFd },
    #[error(
        "TAP {name} (fd {fd}) adds packet information headers (opened without IFF_NO_PI); \
         open it with IFF_NO_PI"
    )]
    HasPacketInfo { name: String, fd: RawFd },
    #[error("this kernel's TUN driver cannot add virtio-net headers (no IFF_VNET_HDR); use vnet_hdr=off")]
    VnetHdrUnsupported,
    #[error(
        "cannot set the virtio-net header size of TAP {name} to {len} bytes: {source}{}",
        if *.len > VNET_HDR_LEN { " (the UDP tunnel header needs Linux >= 6.17; turn the tunnel features off)" } else { "" }
    )]
    VnetHdrSize {
        name: String,
        len: usize,
        #[source]
        source: io::Error,
    },
    #[error(
        "TAP {name} has no virtio-net header, so it cannot take offload flags {flags:#x}; \
         open it with vnet_hdr=on to use offloads"
    )]
    OffloadWithoutVnetHdr { name: String, flags: u32 },
    #[error(
        "TAP {name} refused offload flags {flags:#x}: {source}; the host kernel lacks one of \
         these offloads: turn the matching virtio-net features off"
    )]
    SetOffload {
        name: String,
        flags: u32,
        #[source]
        source: io::Error,
    },
    #[error(
        "TAP {name} is a single-queue TAP (created without multi_queue), so it cannot carry \
         {wanted} queue pairs (one queue each); give it queues=1, or recreate it as a \
         multi-queue TAP (ip tuntap add {name} mode tap multi_queue vnet_hdr)"
    )]
    SingleQueue { name: String, wanted: u16 },
    #[error(
        "the TAP descriptors given are not queues of one multi-queue TAP: {detail}; pass one \
         descriptor per queue pair, each opened with IFF_MULTI_QUEUE on the same interface"
    )]
    NotOneMultiQueueTap { detail: String },
    #[error("cannot {op} of TAP {name}: {source}")]
    Ioctl {
        name: String,
        op: &'static str,
        #[source]
        source: io::Error,
    },
}

/// Which offload groups the kernel accepts on a TAP (see [`Tap::probe_offloads`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TapOffloads {
    /// The TAP carries virtio-net headers; without them nothing else applies.
    pub vnet_hdr: bool,
    /// `TUN_F_CSUM`: partial checksums.
    pub csum: bool,
    /// `TUN_F_CSUM|TUN_F_TSO4`.
    pub tso4: bool,
    /// `TUN_F_CSUM|TUN_F_TSO6`.
    pub tso6: bool,
    /// `TUN_F_CSUM|TUN_F_TSO4|TUN_F_TSO_ECN`.
    pub tso_ecn: bool,
    /// `TUN_F_CSUM|TUN_F_UFO`.
    pub ufo: bool,
    /// `TUN_F_CSUM|TUN_F_USO4|TUN_F_USO6` (only accepted together).
    pub uso: bool,
    /// `TUN_F_CSUM|TUN_F_TSO4|TUN_F_UDP_TUNNEL_GSO` (Linux >= 6.17). Absent
    /// from reports of godwits that did not probe it: read as not accepted.
    #[serde(default)]
    pub udp_tunnel: bool,
    /// `TUN_F_CSUM|TUN_F_TSO4|TUN_F_UDP_TUNNEL_GSO|TUN_F_UDP_TUNNEL_GSO_CSUM`.
    #[serde(default)]
    pub udp_tunnel_csum: bool,
}

impl TapOffloads {
    /// A TAP with virtio-net headers whose kernel accepts every offload
    /// group godwit knows (what a current kernel probes as).
    pub const fn all() -> TapOffloads {
        TapOffloads {
            vnet_hdr: true,
            csum: true,
            tso4: true,
            tso6: true,
            tso_ecn: true,
            ufo: true,
            uso: true,
            udp_tunnel: true,
            udp_tunnel_csum: true,
        }
    }

    /// Whether every `TUN_F_*` flag in `flags` belongs to a group the TAP
    /// accepts (and the TAP has a vnet header). `0` needs only nothing.
    pub fn supports(&self, flags: u32) -> bool {
        if flags == 0 {
            return true;
        }
        let groups = [
            (TUN_F_CSUM, self.csum),
            (TUN_F_TSO4, self.tso4),
            (TUN_F_TSO6, self.tso6),
            (TUN_F_TSO_ECN, self.tso_ecn),
            (TUN_F_UFO, self.ufo),
            (TUN_F_USO4 | TUN_F_USO6, self.uso),
            (TUN_F_UDP_TUNNEL_GSO, self.udp_tunnel),
            (TUN_F_UDP_TUNNEL_GSO_CSUM, self.udp_tunnel_csum),
        ];
        self.vnet_hdr
            && flags & !TUN_F_ALL == 0
            && groups.iter().all(|(bits, ok)| flags & bits == 0 || *ok)
    }

    /// The largest flag set the TAP accepts.
    pub fn flags(&self) -> u32 {
        if !self.vnet_hdr || !self.csum {
            return 0;
        }
        let mut f = TUN_F_CSUM;
        for (ok, bits) in [
            (self.tso4, TUN_F_TSO4),
            (self.tso6, TUN_F_TSO6),
            (self.tso_ecn, TUN_F_TSO_ECN),
            (self.ufo, TUN_F_UFO),
            (self.uso, TUN_F_USO4 | TUN_F_USO6),
        ] {
            if ok {
                f |= bits;
            }
        }
        // The tunnel flags only come with a plain segmentation offload.
        if f & (TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_USO4) != 0 {
            if self.udp_tunnel {
                f |= TUN_F_UDP_TUNNEL_GSO;
            }
            if self.udp_tunnel && self.udp_tunnel_csum {
                f |= TUN_F_UDP_TUNNEL_GSO_CSUM;
            }
        }
        f
    }
}

/// An open TAP. Every operation takes `&self`: the datapath thread and the
/// device share it through an `Arc`.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
    vnet_hdr: bool,
    /// The last `TUNSETOFFLOAD` value set through this handle. The kernel has
    /// no getter; a freshly opened TAP starts at 0.
    offload: AtomicU32,
    /// One queue of a multi-queue TAP (`IFF_MULTI_QUEUE`).
    multi_queue: bool,
    /// Whether this queue is attached (`TUNSETQUEUE`); a fresh queue is.
    attached: AtomicBool,
}

fn ifreq_with_name(name: &str) -> libc::ifreq {
    // SAFETY: ifreq is plain old data (a name array and a union of integers
    // and pointers); all zeroes is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    ifr
}

fn ifreq_name(ifr: &libc::ifreq) -> String {
    let bytes: Vec<u8> = ifr
        .ifr_name
        .iter()
        .take_while(|c| **c != 0)
        .map(|c| *c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

fn check_name(name: &str) -> Result<(), TapError> {
    let reason = if name.len() >= IFNAMSIZ {
        Some("it is too long")
    } else if name
        .bytes()
        .any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace() || b == 0)
    {
        Some("it contains '/', ':', a NUL byte or whitespace")
    } else if name == "." || name == ".." {
        Some("'.' and '..' are not interface names")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(TapError::InvalidName {
            name: name.to_string(),
            reason,
        }),
        None => Ok(()),
    }
}

/// Runs `ioctl(fd, req, arg)` and maps -1 to the errno.
///
/// # Safety
/// `arg` must be what the kernel expects for `req`: a pointer to a live object
/// of the right type and size, or an integer value.
unsafe fn ioctl_raw(fd: RawFd, req: libc::Ioctl, arg: libc::c_ulong) -> io::Result<libc::c_int> {
    // SAFETY: the caller guarantees `arg` matches `req`.
    let ret = unsafe { libc::ioctl(fd, req, arg) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn tun_features(fd: RawFd) -> io::Result<u32> {
    let mut features: libc::c_uint = 0;
    // SAFETY: TUNGETFEATURES writes one unsigned int to the pointer, which
    // points to a live local.
    unsafe {
        ioctl_raw(
            fd,
            libc::TUNGETFEATURES,
            &mut features as *mut libc::c_uint as libc::c_ulong,
        )?
    };
    Ok(features)
}

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: F_GETFL takes no argument and only reads the fd's flags.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: F_SETFL with an integer flag set only changes the fd's status flags.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl Tap {
    /// Creates the TAP `name` (or attaches to it if it exists) in the calling
    /// thread's network namespace. An empty name lets the kernel pick one
    /// (`tap%d`). The fd is non-blocking.
    /// One queue of an existing multi-queue TAP is opened as such.
    pub fn open(name: &str, vnet_hdr: VnetHdr) -> Result<Tap, TapError> {
        let mut queues = Self::open_queues(name, vnet_hdr, 1)?;
        queues.pop().ok_or_else(|| TapError::NameTaken {
            name: name.to_string(),
        })
    }

    /// Opens `queues` queues of the TAP `name` (created if it does not
    /// exist; several make it a multi-queue TAP, `IFF_MULTI_QUEUE`). One
    /// queue of an existing multi-queue TAP is opened as such. An existing
    /// single-queue TAP cannot take more queues: [`TapError::SingleQueue`].
    pub fn open_queues(name: &str, vnet_hdr: VnetHdr, queues: u16) -> Result<Vec<Tap>, TapError> {
        let multi = queues > 1;
        let first = match Self::open_queue(name, vnet_hdr, multi) {
            // The kernel refuses a queue mode other than the TAP's own:
            // find out which the TAP has.
            Err(TapError::NameTaken { name }) => match Self::open_queue(&name, vnet_hdr, !multi) {
                Ok(_) | Err(TapError::Busy { .. }) if multi => {
                    return Err(TapError::SingleQueue {
                        name,
                        wanted: queues,
                    })
                }
                Ok(tap) => tap,
                Err(_) => return Err(TapError::NameTaken { name }),
            },
            other => other?,
        };
        let vnet = if first.vnet_hdr {
            VnetHdr::On
        } else {
            VnetHdr::Off
        };
        let name = first.name.clone();
        let mut taps = vec![first];
        for _ in 1..queues {
            taps.push(Self::open_queue(&name, vnet, true)?);
        }
        Ok(taps)
    }

    fn open_queue(name: &str, vnet_hdr: VnetHdr, multi_queue: bool) -> Result<Tap, TapError> {
        if !name.is_empty() {
            check_name(name)?;
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK)
            .open(TUN_PATH)
            .map_err(TapError::OpenTun)?;
        let fd = file.as_raw_fd();
        let want_vnet = match vnet_hdr {
            VnetHdr::Off => false,
            VnetHdr::On | VnetHdr::Auto => {
                let has = tun_features(fd)
                    .map(|f| f & libc::IFF_VNET_HDR as u32 != 0)
                    .unwrap_or(false);
                if !has && vnet_hdr == VnetHdr::On {
                    return Err(TapError::VnetHdrUnsupported);
                }
                has
            }
        };
        let mut ifr = ifreq_with_name(if name.is_empty() { "tap%d" } else { name });
        let mut flags = libc::IFF_TAP | libc::IFF_NO_PI;
        if want_vnet {
            flags |= libc::IFF_VNET_HDR;
        }
        if multi_queue {
            flags |= libc::IFF_MULTI_QUEUE;
        }
        ifr.ifr_ifru.ifru_flags = flags as libc::c_short;
        // SAFETY: TUNSETIFF reads and writes one ifreq, which points to a live local.
        let res = unsafe {
            ioctl_raw(
                fd,
                libc::TUNSETIFF,
                &mut ifr as *mut libc::ifreq as libc::c_ulong,
            )
        };
        if let Err(e) = res {
            let name = name.to_string();
            return Err(match e.raw_os_error() {
                Some(libc::EPERM) | Some(libc::EACCES) => TapError::PermissionDenied { name },
                Some(libc::EBUSY) => TapError::Busy { name },
                Some(libc::EINVAL) if !name.is_empty() => TapError::NameTaken { name },
                _ => TapError::Attach { name, source: e },
            });
        }
        let tap = Tap {
            name: ifreq_name(&ifr),
            file,
            vnet_hdr: want_vnet,
            offload: AtomicU32::new(0),
            multi_queue,
            attached: AtomicBool::new(true),
        };
        tap.init_vnet_hdr()?;
        tracing::debug!(tap = %tap.name, vnet_hdr = want_vnet, multi_queue, "opened TAP");
        Ok(tap)
    }

    /// Adopts an fd that is already attached to a TAP (passed by a management
    /// layer). Checks with `TUNGETIFF` that it is a TAP without packet
    /// information headers and that its vnet header matches `vnet_hdr`.
    /// Makes the fd non-blocking.
    pub fn from_fd(fd: OwnedFd, vnet_hdr: VnetHdr) -> Result<Tap, TapError> {
        let raw = fd.as_raw_fd();
        let mut ifr = ifreq_with_name("");
        // SAFETY: TUNGETIFF writes one ifreq to the pointer, a live local. On
        // an fd that is not a tun file the ioctl fails without writing.
        let res = unsafe {
            ioctl_raw(
                raw,
                libc::TUNGETIFF,
                &mut ifr as *mut libc::ifreq as libc::c_ulong,
            )
        };
        if let Err(e) = res {
            let detail = match e.raw_os_error() {
                Some(libc::EBADFD) => {
                    "it is a /dev/net/tun file that is not attached to an interface".to_string()
                }
                Some(libc::ENOTTY) | Some(libc::EINVAL) => {
                    "TUNGETIFF is not supported on it: it is not a /dev/net/tun file".to_string()
                }
                _ => format!("TUNGETIFF failed: {e}"),
            };
            return Err(TapError::NotATap { fd: raw, detail });
        }
        let name = ifreq_name(&ifr);
        // SAFETY: the kernel filled the flags member of the union.
        let flags = i32::from(unsafe { ifr.ifr_ifru.ifru_flags }) & 0xffff;
        if flags & libc::IFF_TAP == 0 {
            return Err(TapError::NotATap {
                fd: raw,
                detail: format!("{name} is a layer-3 TUN device"),
            });
        }
        if flags & libc::IFF_NO_PI == 0 {
            return Err(TapError::HasPacketInfo { name, fd: raw });
        }
        let has_vnet = flags & libc::IFF_VNET_HDR != 0;
        match (vnet_hdr, has_vnet) {
            (VnetHdr::On, false) => return Err(TapError::MissingVnetHdr { name, fd: raw }),
            (VnetHdr::Off, true) => return Err(TapError::UnexpectedVnetHdr { name, fd: raw }),
            _ => {}
        }
        set_nonblocking(raw).map_err(|source| TapError::Ioctl {
            name: name.clone(),
            op: "make the fd non-blocking",
            source,
        })?;
        let tap = Tap {
            file: File::from(fd),
            name,
            vnet_hdr: has_vnet,
            offload: AtomicU32::new(0),
            multi_queue: flags & libc::IFF_MULTI_QUEUE != 0,
            attached: AtomicBool::new(true),
        };
        tap.init_vnet_hdr()?;
        tracing::debug!(tap = %tap.name, fd = raw, vnet_hdr = has_vnet, "adopted TAP fd");
        Ok(tap)
    }

    /// Wraps any packet socket (one end of a socketpair) as a TAP without
    /// any checks, for the fuzz targets, whose peer is the other end. The
    /// TAP ioctls fail on it, as they would on a TAP without offloads.
    #[cfg(feature = "fuzzing")]
    pub fn from_socket_for_fuzzing(fd: OwnedFd, vnet_hdr: bool) -> io::Result<Tap> {
        set_nonblocking(fd.as_raw_fd())?;
        Ok(Tap {
            file: File::from(fd),
            name: "fuzz".to_string(),
            vnet_hdr,
            offload: AtomicU32::new(0),
            multi_queue: false,
            attached: AtomicBool::new(true),
        })
    }

    fn init_vnet_hdr(&self) -> Result<(), TapError> {
        self.set_vnet_hdr_len(VNET_HDR_LEN)
    }

    /// Sets the size of the virtio-net header in front of every frame
    /// (`TUNSETVNETHDRSZ`): 12 (virtio 1.0), or 24 for the UDP tunnel
    /// header. Nothing to do on a TAP without a vnet header.
    pub fn set_vnet_hdr_len(&self, len: usize) -> Result<(), TapError> {
        if !self.vnet_hdr {
            return Ok(());
        }
        let size = libc::c_int::try_from(len).unwrap_or(libc::c_int::MAX);
        // SAFETY: TUNSETVNETHDRSZ reads one int from the pointer, a live local.
        unsafe {
            ioctl_raw(
                self.raw_fd(),
                libc::TUNSETVNETHDRSZ,
                &size as *const libc::c_int as libc::c_ulong,
            )
        }
        .map_err(|source| TapError::VnetHdrSize {
            name: self.name.clone(),
            len,
            source,
        })?;
        Ok(())
    }

    /// Adopts descriptors handed in for the queues of one TAP (`fds=`):
    /// one descriptor is any TAP fd ([`Tap::from_fd`]); several must be
    /// queues of the same multi-queue TAP, with the same vnet header.
    pub fn from_fds(fds: Vec<OwnedFd>, vnet_hdr: VnetHdr) -> Result<Vec<Tap>, TapError> {
        let many = fds.len() > 1;
        let mut taps: Vec<Tap> = Vec::with_capacity(fds.len());
        for fd in fds {
            let tap = Self::from_fd(fd, vnet_hdr)?;
            if many && !tap.multi_queue {
                return Err(TapError::NotOneMultiQueueTap {
                    detail: format!("fd {} is a single-queue TAP ({})", tap.raw_fd(), tap.name),
                });
            }
            if let Some(first) = taps.first() {
                if first.name != tap.name || first.vnet_hdr != tap.vnet_hdr {
                    return Err(TapError::NotOneMultiQueueTap {
                        detail: format!(
                            "fd {} is TAP {} (vnet_hdr {}), fd {} is TAP {} (vnet_hdr {})",
                            first.raw_fd(),
                            first.name,
                            first.vnet_hdr,
                            tap.raw_fd(),
                            tap.name,
                            tap.vnet_hdr
                        ),
                    });
                }
            }
            taps.push(tap);
        }
        Ok(taps)
    }

    /// Whether this is one queue of a multi-queue TAP.
    pub fn is_multi_queue(&self) -> bool {
        self.multi_queue
    }

    /// Attaches or detaches this queue of a multi-queue TAP (`TUNSETQUEUE`):
    /// the kernel steers no frame to a detached queue. A single-queue TAP
    /// has nothing to switch; a queue already in that state is left alone.
    pub fn set_queue_enabled(&self, on: bool) -> Result<(), TapError> {
        if !self.multi_queue || self.attached.load(Ordering::SeqCst) == on {
            return Ok(());
        }
        let mut ifr = ifreq_with_name("");
        let flags = if on {
            libc::IFF_ATTACH_QUEUE
        } else {
            libc::IFF_DETACH_QUEUE
        };
        ifr.ifr_ifru.ifru_flags = flags as libc::c_short;
        // SAFETY: TUNSETQUEUE reads one ifreq (its flags) from the pointer,
        // a live local.
        unsafe {
            ioctl_raw(
                self.raw_fd(),
                libc::TUNSETQUEUE,
                &mut ifr as *mut libc::ifreq as libc::c_ulong,
            )
        }
        .map_err(|source| {
            self.ioctl_err(
                if on {
                    "attach a queue (TUNSETQUEUE)"
                } else {
                    "detach a queue (TUNSETQUEUE)"
                },
                source,
            )
        })?;
        self.attached.store(on, Ordering::SeqCst);
        Ok(())
    }

    /// Whether this queue is attached (see [`Tap::set_queue_enabled`]).
    pub fn queue_enabled(&self) -> bool {
        self.attached.load(Ordering::SeqCst)
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether frames on the fd carry a 12-byte virtio-net header.
    pub fn has_vnet_hdr(&self) -> bool {
        self.vnet_hdr
    }

    pub(crate) fn raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// The offload flags last set through this handle.
    pub fn offload(&self) -> u32 {
        self.offload.load(Ordering::Relaxed)
    }

    /// Sets the offloads the TAP may use for frames it delivers to godwit
    /// (`TUNSETOFFLOAD`). `flags` must follow the kernel's rules (see the
    /// module documentation); a TAP without a vnet header only takes 0.
    pub fn set_offload(&self, flags: u32) -> Result<(), TapError> {
        if !self.vnet_hdr {
            if flags != 0 {
                return Err(TapError::OffloadWithoutVnetHdr {
                    name: self.name.clone(),
                    flags,
                });
            }
            return Ok(());
        }
        self.try_offload(flags)
            .map_err(|source| TapError::SetOffload {
                name: self.name.clone(),
                flags,
                source,
            })?;
        self.offload.store(flags, Ordering::Relaxed);
        Ok(())
    }

    fn try_offload(&self, flags: u32) -> io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value.
        unsafe {
            ioctl_raw(
                self.raw_fd(),
                libc::TUNSETOFFLOAD,
                libc::c_ulong::from(flags),
            )
        }
        .map(drop)
    }

    /// Finds out which offload groups the kernel accepts on this TAP by
    /// trying each with `TUNSETOFFLOAD`, then restores the flags last set
    /// through this handle. A TAP without a vnet header supports none and is
    /// not touched.
    pub fn probe_offloads(&self) -> TapOffloads {
        if !self.vnet_hdr {
            return TapOffloads::default();
        }
        let probe = |flags: u32| self.try_offload(flags).is_ok();
        let result = TapOffloads {
            vnet_hdr: true,
            csum: probe(TUN_F_CSUM),
            tso4: probe(TUN_F_CSUM | TUN_F_TSO4),
            tso6: probe(TUN_F_CSUM | TUN_F_TSO6),
            tso_ecn: probe(TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO_ECN),
            ufo: probe(TUN_F_CSUM | TUN_F_UFO),
            uso: probe(TUN_F_CSUM | TUN_F_USO4 | TUN_F_USO6),
            udp_tunnel: probe(TUN_F_CSUM | TUN_F_TSO4 | TUN_F_UDP_TUNNEL_GSO),
            udp_tunnel_csum: probe(
                TUN_F_CSUM | TUN_F_TSO4 | TUN_F_UDP_TUNNEL_GSO | TUN_F_UDP_TUNNEL_GSO_CSUM,
            ),
        };
        let previous = self.offload();
        if let Err(e) = self.try_offload(previous) {
            tracing::warn!(tap = %self.name, "cannot restore offload flags {previous:#x} after probing: {e}");
        }
        result
    }

    /// The TAP's own (host-side) MAC address.
    pub fn host_mac(&self) -> Result<[u8; 6], TapError> {
        let mut ifr = ifreq_with_name(&self.name);
        // SAFETY: the tun driver answers SIOCGIFHWADDR on its fd by writing
        // one ifreq to the pointer, a live local.
        unsafe {
            ioctl_raw(
                self.raw_fd(),
                libc::SIOCGIFHWADDR,
                &mut ifr as *mut libc::ifreq as libc::c_ulong,
            )
        }
        .map_err(|source| self.ioctl_err("read the MAC address", source))?;
        // SAFETY: the kernel filled the hwaddr member of the union.
        let data = unsafe { ifr.ifr_ifru.ifru_hwaddr.sa_data };
        let mut mac = [0u8; 6];
        for (m, d) in mac.iter_mut().zip(data.iter()) {
            *m = *d as u8;
        }
        Ok(mac)
    }

    fn ioctl_err(&self, op: &'static str, source: io::Error) -> TapError {
        TapError::Ioctl {
            name: self.name.clone(),
            op,
            source,
        }
    }

    /// A datagram socket in the TAP's network namespace, for the interface
    /// ioctls (MTU, flags) that only work through a socket.
    fn control_socket(&self) -> Result<OwnedFd, TapError> {
        // SAFETY: TUNGETDEVNETNS takes no argument and returns a new fd.
        let ns = unsafe { ioctl_raw(self.raw_fd(), libc::TUNGETDEVNETNS, 0) }
            .map_err(|e| self.ioctl_err("find the network namespace", e))?;
        // SAFETY: the ioctl returned a fresh fd that nothing else owns.
        let ns = unsafe { OwnedFd::from_raw_fd(ns) };
        let ours = std::fs::metadata("/proc/thread-self/ns/net").map(|m| m.ino());
        let theirs = File::from(
            ns.try_clone()
                .map_err(|e| self.ioctl_err("duplicate the namespace fd", e))?,
        )
        .metadata()
        .map(|m| m.ino());
        let same = matches!((ours, theirs), (Ok(a), Ok(b)) if a == b);
        if same {
            return inet_socket().map_err(|e| self.ioctl_err("open a control socket", e));
        }
        // Enter the TAP's namespace on a short-lived thread: setns only
        // changes the calling thread, and this one must stay where it is.
        let handle = std::thread::Builder::new()
            .name("godwit-tap-ns".into())
            .spawn(move || -> io::Result<OwnedFd> {
                crate::thread_hook::started(crate::thread_hook::DeviceThread::TapNamespace);
                // SAFETY: setns with a namespace fd and CLONE_NEWNET only
                // changes this thread's network namespace.
                if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } < 0 {
                    return Err(io::Error::last_os_error());
                }
                inet_socket()
            })
            .map_err(|e| self.ioctl_err("start a thread to enter its namespace", e))?;
        match handle.join() {
            Ok(res) => res.map_err(|e| self.ioctl_err("open a socket in its namespace", e)),
            Err(_) => Err(self.ioctl_err(
                "open a socket in its namespace",
                io::Error::other("the helper thread panicked"),
            )),
        }
    }

    fn ifreq_ioctl(
        &self,
        req: libc::Ioctl,
        ifr: &mut libc::ifreq,
        op: &'static str,
    ) -> Result<(), TapError> {
        let sock = self.control_socket()?;
        // SAFETY: the SIOC[GS]IF* requests read and write one ifreq, which
        // points to the caller's live ifreq.
        unsafe {
            ioctl_raw(
                sock.as_raw_fd(),
                req,
                ifr as *mut libc::ifreq as libc::c_ulong,
            )
        }
        .map(drop)
        .map_err(|e| self.ioctl_err(op, e))
    }

    /// The interface MTU.
    pub fn mtu(&self) -> Result<u32, TapError> {
        let mut ifr = ifreq_with_name(&self.name);
        self.ifreq_ioctl(libc::SIOCGIFMTU, &mut ifr, "read the MTU")?;
        // SAFETY: the kernel filled the mtu member of the union.
        Ok(u32::try_from(unsafe { ifr.ifr_ifru.ifru_mtu }).unwrap_or(0))
    }

    /// Sets the interface MTU.
    pub fn set_mtu(&self, mtu: u32) -> Result<(), TapError> {
        let mut ifr = ifreq_with_name(&self.name);
        ifr.ifr_ifru.ifru_mtu = i32::try_from(mtu).unwrap_or(i32::MAX);
        self.ifreq_ioctl(libc::SIOCSIFMTU, &mut ifr, "set the MTU")
    }

    /// Whether the interface is administratively up.
    pub fn is_up(&self) -> Result<bool, TapError> {
        let mut ifr = ifreq_with_name(&self.name);
        self.ifreq_ioctl(libc::SIOCGIFFLAGS, &mut ifr, "read the interface flags")?;
        // SAFETY: the kernel filled the flags member of the union.
        Ok(i32::from(unsafe { ifr.ifr_ifru.ifru_flags }) & libc::IFF_UP != 0)
    }

    /// Brings the interface up or down.
    pub fn set_up(&self, up: bool) -> Result<(), TapError> {
        let mut ifr = ifreq_with_name(&self.name);
        self.ifreq_ioctl(libc::SIOCGIFFLAGS, &mut ifr, "read the interface flags")?;
        // SAFETY: the kernel filled the flags member of the union.
        let mut flags = i32::from(unsafe { ifr.ifr_ifru.ifru_flags });
        if up {
            flags |= libc::IFF_UP;
        } else {
            flags &= !libc::IFF_UP;
        }
        ifr.ifr_ifru.ifru_flags = flags as libc::c_short;
        self.ifreq_ioctl(libc::SIOCSIFFLAGS, &mut ifr, "set the interface flags")
    }

    /// Reads one frame into `iov` (`readv`). `WouldBlock` when none is queued.
    ///
    /// # Safety
    /// Every iovec must describe memory that is valid for writes of its length
    /// for the duration of the call.
    pub(crate) unsafe fn readv(&self, iov: &[libc::iovec]) -> io::Result<usize> {
        let cnt = libc::c_int::try_from(iov.len()).unwrap_or(libc::c_int::MAX);
        // SAFETY: the caller guarantees the iovecs point to writable memory.
        // The system call itself: glibc's wrapper adds cancellation-point
        // bookkeeping (~2% of the datapath thread's time) that no godwit
        // thread uses.
        let n = unsafe { libc::syscall(libc::SYS_readv, self.raw_fd(), iov.as_ptr(), cnt) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    /// Writes one frame gathered from `iov` (`writev`).
    ///
    /// # Safety
    /// Every iovec must describe memory that is valid for reads of its length
    /// for the duration of the call.
    pub(crate) unsafe fn writev(&self, iov: &[libc::iovec]) -> io::Result<usize> {
        let cnt = libc::c_int::try_from(iov.len()).unwrap_or(libc::c_int::MAX);
        // SAFETY: the caller guarantees the iovecs point to readable memory;
        // the system call itself, as in `readv`.
        let n = unsafe { libc::syscall(libc::SYS_writev, self.raw_fd(), iov.as_ptr(), cnt) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    /// Reads one frame into `buf`. `WouldBlock` when none is queued.
    pub(crate) fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: buf is a live, writable slice of buf.len() bytes.
        let n = unsafe { libc::read(self.raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    /// Writes one frame from `buf`.
    pub fn write(&self, buf: &[u8]) -> io::Result<usize> {
        // SAFETY: buf is a live slice of buf.len() bytes.
        let n = unsafe { libc::write(self.raw_fd(), buf.as_ptr().cast(), buf.len()) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.raw_fd()
    }
}

fn inet_socket() -> io::Result<OwnedFd> {
    // SAFETY: socket() with constant arguments returns a new fd or -1.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh socket that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_before_the_kernel_sees_them() {
        assert!(matches!(
            check_name("a-name-that-is-too-long"),
            Err(TapError::InvalidName { .. })
        ));
        assert!(matches!(
            check_name("a/b"),
            Err(TapError::InvalidName { .. })
        ));
        assert!(matches!(
            check_name("a b"),
            Err(TapError::InvalidName { .. })
        ));
        assert!(check_name("tap0").is_ok());
        let msg = check_name("x:y").unwrap_err().to_string();
        assert!(
            msg.contains("x:y") && msg.contains("15 characters"),
            "{msg}"
        );
    }

    #[test]
    fn offload_groups() {
        let none = TapOffloads::default();
        assert!(none.supports(0));
        assert!(!none.supports(TUN_F_CSUM));
        assert_eq!(none.flags(), 0);
        let all = TapOffloads::all();
        assert_eq!(all.flags(), TUN_F_ALL);
        assert!(all.supports(TUN_F_CSUM | TUN_F_USO4));
        let no_uso = TapOffloads { uso: false, ..all };
        assert!(!no_uso.supports(TUN_F_CSUM | TUN_F_USO6));
        assert!(no_uso.supports(TUN_F_CSUM | TUN_F_TSO4 | TUN_F_UFO));
        assert!(!all.supports(0x200));
        let old_kernel = TapOffloads {
            udp_tunnel: false,
            udp_tunnel_csum: false,
            ..all
        };
        assert!(!old_kernel.supports(TUN_F_CSUM | TUN_F_TSO4 | TUN_F_UDP_TUNNEL_GSO));
        assert_eq!(
            old_kernel.flags(),
            TUN_F_ALL & !(TUN_F_UDP_TUNNEL_GSO | TUN_F_UDP_TUNNEL_GSO_CSUM)
        );
        // A report written before the tunnel flags were probed reads as a
        // kernel without them.
        let old: TapOffloads = serde_json::from_str(
            r#"{"vnet_hdr":true,"csum":true,"tso4":true,"tso6":true,"tso_ecn":true,"ufo":true,"uso":true}"#,
        )
        .unwrap();
        assert_eq!(old, old_kernel);
    }
}
