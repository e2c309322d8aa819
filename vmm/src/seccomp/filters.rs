//! The allow-list of each thread kind.
//!
//! Found by running the end-to-end tests with `--seccomp log` and reading
//! the kernel's audit records (`type=1326`), and `strace -f` for ioctl
//! numbers. A thread is born with the filters of the thread that started
//! it and adds its own, so a list here includes the lists of the threads
//! its kind starts ([`Rules::spawner`]).

use std::collections::{BTreeMap, BTreeSet};

use seccompiler::{
    BackendError, BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition,
    SeccompFilter, SeccompRule, TargetArch,
};

use super::ThreadKind;

use libc::*;

/// One thread kind's allowed calls: a call with `None` is allowed whatever
/// its arguments, one with `Some((arg, values))` only when argument `arg`
/// is one of `values` (ioctl request numbers, prctl options).
#[derive(Clone, Default)]
pub(super) struct Rules(BTreeMap<i64, Option<(u8, BTreeSet<u64>)>>);

impl Rules {
    fn allow(mut self, calls: &[i64]) -> Self {
        for &nr in calls {
            self.0.insert(nr, None);
        }
        self
    }

    /// Allows `nr` when argument `arg` is one of `values`.
    fn allow_with(mut self, nr: i64, arg: u8, values: &[u64]) -> Self {
        match self
            .0
            .entry(nr)
            .or_insert_with(|| Some((arg, BTreeSet::new())))
        {
            None => {}
            Some((a, set)) => {
                debug_assert_eq!(*a, arg, "one argument filtered per call");
                set.extend(values);
            }
        }
        self
    }

    fn ioctls(self, requests: &[u64]) -> Self {
        self.allow_with(libc::SYS_ioctl, 1, requests)
    }

    /// Everything `other` allows, too.
    fn with(mut self, other: &Rules) -> Self {
        for (&nr, cond) in &other.0 {
            match (self.0.get_mut(&nr), cond) {
                (Some(None), _) => {}
                (Some(mine), None) => *mine = None,
                (Some(Some((_, mine))), Some((_, theirs))) => mine.extend(theirs),
                (None, c) => {
                    self.0.insert(nr, c.clone());
                }
            }
        }
        self
    }

    /// A thread that starts threads of the `children` kinds: it needs what
    /// starting a thread takes, and what they need (they inherit its filter).
    fn spawner(self, children: &[ThreadKind]) -> Self {
        let mut rules = self.with(&spawn());
        for &child in children {
            rules = rules.with(&rules_of(child));
        }
        rules
    }

    fn into_filter(self, mismatch: SeccompAction) -> Result<SeccompFilter, BackendError> {
        let mut map = BTreeMap::new();
        for (nr, cond) in self.0 {
            let rules = match cond {
                None => Vec::new(),
                Some((arg, values)) => values
                    .into_iter()
                    .map(|v| {
                        SeccompCondition::new(arg, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, v)
                            .and_then(|c| SeccompRule::new(vec![c]))
                    })
                    .collect::<Result<_, _>>()?,
            };
            map.insert(nr, rules);
        }
        SeccompFilter::new(map, mismatch, SeccompAction::Allow, TargetArch::x86_64)
    }
}

/// The BPF program of `kind`, with `mismatch` for calls outside its list.
pub(super) fn program(
    kind: ThreadKind,
    mismatch: SeccompAction,
) -> Result<BpfProgram, BackendError> {
    rules_of(kind).into_filter(mismatch)?.try_into()
}

/// Whether a thread of `kind` may open, read and close a file. glibc's
/// allocator does that once per process, the first time an arena gives
/// memory back; a kind that may needs no primed allocator before its
/// filter. A thread's list includes the lists of the kinds it starts, so
/// its own list answers for the filters it inherits too.
pub(super) fn opens_files(kind: ThreadKind) -> bool {
    let rules = rules_of(kind);
    [SYS_openat, SYS_read, SYS_close]
        .iter()
        .all(|nr| matches!(rules.0.get(nr), Some(None)))
}

/// `_IOC` of asm-generic/ioctl.h.
const fn ioc(dir: u64, ty: u64, nr: u64, size: u64) -> u64 {
    (dir << 30) | (size << 16) | (ty << 8) | nr
}
const NONE: u64 = 0;
const W: u64 = 1;
const R: u64 = 2;
const RW: u64 = 3;
const KVMIO: u64 = 0xAE;

// KVM vCPU ioctls (linux/kvm.h) and the sizes of their structs.
const KVM_RUN: u64 = ioc(NONE, KVMIO, 0x80, 0);
const KVM_GET_REGS: u64 = ioc(R, KVMIO, 0x81, 144);
const KVM_GET_SREGS: u64 = ioc(R, KVMIO, 0x83, 312);
const KVM_GET_MSRS: u64 = ioc(RW, KVMIO, 0x88, 8);
const KVM_SET_MSRS: u64 = ioc(W, KVMIO, 0x89, 8);
const KVM_GET_FPU: u64 = ioc(R, KVMIO, 0x8c, 416);
const KVM_GET_LAPIC: u64 = ioc(R, KVMIO, 0x8e, 1024);
const KVM_GET_MP_STATE: u64 = ioc(R, KVMIO, 0x98, 4);
const KVM_GET_VCPU_EVENTS: u64 = ioc(R, KVMIO, 0x9f, 64);
const KVM_GET_XSAVE: u64 = ioc(R, KVMIO, 0xa4, 4096);
const KVM_GET_XCRS: u64 = ioc(R, KVMIO, 0xa6, 392);
const KVM_GET_DEBUGREGS: u64 = ioc(R, KVMIO, 0xa1, 128);
const KVM_TRANSLATE: u64 = ioc(RW, KVMIO, 0x85, 24);
const KVM_IRQFD: u64 = ioc(W, KVMIO, 0x76, 32);
const KVM_IOEVENTFD: u64 = ioc(W, KVMIO, 0x79, 64);
const KVM_SET_USER_MEMORY_REGION: u64 = ioc(W, KVMIO, 0x46, 32);
const KVM_GET_DIRTY_LOG: u64 = ioc(W, KVMIO, 0x42, 16);
const KVM_IRQ_LINE: u64 = ioc(W, KVMIO, 0x61, 8);

// TUN (linux/if_tun.h).
const TUNSETOFFLOAD: u64 = ioc(W, b'T' as u64, 208, 4);
const TUNSETVNETHDRSZ: u64 = ioc(W, b'T' as u64, 216, 4);
const TUNGETVNETHDRSZ: u64 = ioc(R, b'T' as u64, 215, 4);
const TUNSETVNETLE: u64 = ioc(W, b'T' as u64, 220, 4);
/// Attaches or detaches a queue of a multi-queue TAP (VQ_PAIRS_SET).
const TUNSETQUEUE: u64 = ioc(W, b'T' as u64, 217, 4);

// vhost (linux/vhost.h), for vhost-net devices that the guest drives.
const VHOST: u64 = 0xAF;
const VHOST_GET_FEATURES: u64 = ioc(R, VHOST, 0x00, 8);
const VHOST_SET_FEATURES: u64 = ioc(W, VHOST, 0x00, 8);
const VHOST_SET_OWNER: u64 = ioc(NONE, VHOST, 0x01, 0);
const VHOST_RESET_OWNER: u64 = ioc(NONE, VHOST, 0x02, 0);
const VHOST_SET_MEM_TABLE: u64 = ioc(W, VHOST, 0x03, 8);
const VHOST_SET_LOG_BASE: u64 = ioc(W, VHOST, 0x04, 8);
const VHOST_SET_LOG_FD: u64 = ioc(W, VHOST, 0x07, 4);
const VHOST_SET_VRING_NUM: u64 = ioc(W, VHOST, 0x10, 8);
const VHOST_SET_VRING_ADDR: u64 = ioc(W, VHOST, 0x11, 40);
const VHOST_SET_VRING_BASE: u64 = ioc(W, VHOST, 0x12, 8);
const VHOST_GET_VRING_BASE: u64 = ioc(RW, VHOST, 0x12, 8);
const VHOST_SET_VRING_KICK: u64 = ioc(W, VHOST, 0x20, 8);
const VHOST_SET_VRING_CALL: u64 = ioc(W, VHOST, 0x21, 8);
const VHOST_SET_VRING_ERR: u64 = ioc(W, VHOST, 0x22, 8);
const VHOST_NET_SET_BACKEND: u64 = ioc(W, VHOST, 0x30, 8);

/// What the guest's device programming reaches from a vCPU: the vCPU's
/// own state, interrupt and notification wiring, and the peer's offloads.
const VCPU_IOCTLS: &[u64] = &[
    KVM_RUN,
    KVM_GET_REGS,
    KVM_GET_SREGS,
    KVM_GET_MSRS,
    KVM_SET_MSRS,
    KVM_GET_FPU,
    KVM_GET_LAPIC,
    KVM_GET_MP_STATE,
    KVM_GET_VCPU_EVENTS,
    KVM_GET_XSAVE,
    KVM_GET_XCRS,
    KVM_GET_DEBUGREGS,
    KVM_TRANSLATE,
    KVM_IRQFD,
    KVM_IOEVENTFD,
    KVM_IRQ_LINE,
    KVM_SET_USER_MEMORY_REGION,
    KVM_GET_DIRTY_LOG,
    TUNSETOFFLOAD,
    TUNSETVNETHDRSZ,
    TUNGETVNETHDRSZ,
    TUNSETVNETLE,
    TUNSETQUEUE,
    VHOST_GET_FEATURES,
    VHOST_SET_FEATURES,
    VHOST_SET_OWNER,
    VHOST_RESET_OWNER,
    VHOST_SET_MEM_TABLE,
    VHOST_SET_LOG_BASE,
    VHOST_SET_LOG_FD,
    VHOST_SET_VRING_NUM,
    VHOST_SET_VRING_ADDR,
    VHOST_SET_VRING_BASE,
    VHOST_GET_VRING_BASE,
    VHOST_SET_VRING_KICK,
    VHOST_SET_VRING_CALL,
    VHOST_SET_VRING_ERR,
    VHOST_NET_SET_BACKEND,
    FIONBIO,
];

/// Every thread: memory, locks, time, its own end, and the SIGSYS
/// handler's write and exit.
fn base() -> Rules {
    Rules::default()
        .allow(&[
            SYS_read,
            SYS_write,
            SYS_writev,
            SYS_close,
            SYS_futex,
            SYS_mmap,
            SYS_munmap,
            SYS_mremap,
            SYS_mprotect,
            SYS_madvise,
            SYS_brk,
            SYS_sched_yield,
            SYS_clock_gettime,
            SYS_clock_nanosleep,
            SYS_nanosleep,
            SYS_getrandom,
            SYS_gettid,
            SYS_getpid,
            SYS_tgkill,
            SYS_rt_sigprocmask,
            SYS_rt_sigreturn,
            SYS_sigaltstack,
            SYS_restart_syscall,
            SYS_exit,
            SYS_exit_group,
            // A thread that stacks its own filter onto its parent's.
            SYS_seccomp,
        ])
        .allow_with(
            SYS_prctl,
            0,
            &[
                PR_SET_NO_NEW_PRIVS as u64,
                PR_SET_NAME as u64,
                PR_GET_NAME as u64,
            ],
        )
        // Rust's standard library checks that a descriptor is open before
        // it closes it (debug builds).
        .allow_with(SYS_fcntl, 1, &[F_GETFD as u64])
}

/// Starting a thread; the new thread runs glibc's and Rust's start-up
/// (robust list, rseq, its name) under its parent's filter.
fn spawn() -> Rules {
    Rules::default().allow(&[
        SYS_clone,
        SYS_clone3,
        SYS_set_robust_list,
        SYS_rseq,
        SYS_sched_getaffinity,
    ])
}

/// Reading and setting a descriptor's flags (non-blocking I/O).
fn fd_flags() -> Rules {
    Rules::default().allow_with(SYS_fcntl, 1, &[F_GETFL as u64, F_SETFL as u64])
}

fn poll() -> Rules {
    Rules::default().allow(&[
        SYS_epoll_create1,
        SYS_epoll_ctl,
        SYS_epoll_wait,
        SYS_epoll_pwait,
        SYS_poll,
        SYS_ppoll,
        SYS_eventfd2,
    ])
}

fn descriptors() -> Rules {
    Rules::default().allow(&[SYS_fcntl, SYS_dup, SYS_dup3, SYS_fstat, SYS_readv])
}

/// Unix sockets with descriptors passed (vhost-user, the API, migration).
fn sockets() -> Rules {
    Rules::default().allow(&[
        SYS_socket,
        SYS_connect,
        SYS_sendmsg,
        SYS_recvmsg,
        SYS_sendto,
        SYS_recvfrom,
        SYS_shutdown,
        SYS_getsockopt,
        SYS_setsockopt,
        SYS_getsockname,
        SYS_getpeername,
    ])
}

/// Listening sockets (an API socket, a migration destination).
fn listening() -> Rules {
    Rules::default().allow(&[SYS_bind, SYS_listen, SYS_accept4, SYS_socketpair])
}

/// Files and directories: snapshots, host probes, socket paths.
fn files() -> Rules {
    Rules::default().allow(&[
        SYS_openat,
        SYS_open,
        SYS_newfstatat,
        SYS_statx,
        SYS_lseek,
        SYS_pread64,
        SYS_pwrite64,
        SYS_preadv,
        SYS_pwritev,
        SYS_fsync,
        SYS_fdatasync,
        SYS_ftruncate,
        SYS_fallocate,
        SYS_getdents64,
        SYS_mkdir,
        SYS_mkdirat,
        SYS_rename,
        SYS_renameat,
        SYS_renameat2,
        SYS_unlink,
        SYS_unlinkat,
        SYS_rmdir,
        SYS_readlink,
        SYS_readlinkat,
        SYS_access,
        SYS_faccessat2,
        SYS_fchmod,
        SYS_chmod,
        SYS_fchmodat,
        SYS_getcwd,
        SYS_memfd_create,
        SYS_pipe2,
        SYS_uname,
        SYS_getuid,
        SYS_geteuid,
        SYS_sendfile,
        SYS_copy_file_range,
    ])
}

fn rules_of(kind: ThreadKind) -> Rules {
    match kind {
        // Reads stdin, writes the console: nothing else.
        ThreadKind::SerialStdin | ThreadKind::Console => base().with(&fd_flags()),
        ThreadKind::Signals => base().allow(&[SYS_rt_sigtimedwait]).with(&cleanup()),
        ThreadKind::ApiWriter => base().with(&sockets()).with(&poll()).with(&fd_flags()),
        // Moves frames between the TAP and the guest's rings.
        ThreadKind::NetDatapath => base()
            .with(&poll())
            .with(&fd_flags())
            .allow(&[
                SYS_readv,
                SYS_recvmsg,
                SYS_sendmsg,
                SYS_recvfrom,
                SYS_sendto,
            ])
            .ioctls(&[TUNSETOFFLOAD, TUNSETQUEUE]),
        // Control queue: receive filters and offloads reach the TAP;
        // VQ_PAIRS_SET reaches a vhost-user backend (SET_VRING_ENABLE on
        // its connection, whose reply waits with a socket timeout), or
        // the TAP queues of kernel vhost-net's pairs (TUNSETQUEUE).
        ThreadKind::NetCtrl => base()
            .with(&poll())
            .with(&sockets())
            .allow(&[SYS_fcntl])
            .ioctls(&[TUNSETOFFLOAD, TUNSETQUEUE, SIOCSIFFLAGS, SIOCGIFFLAGS]),
        ThreadKind::TapNamespace => base()
            .allow(&[SYS_setns, SYS_socket, SYS_fcntl])
            .with(&files()),
        // Reconnects to its backend and replays the device's setup.
        ThreadKind::VhostUserMonitor => base()
            .with(&poll())
            .with(&sockets())
            .with(&descriptors())
            .with(&files()),
        ThreadKind::Vcpu => base()
            .with(&poll())
            .with(&descriptors())
            .with(&sockets())
            .ioctls(VCPU_IOCTLS)
            .spawner(&[
                ThreadKind::NetDatapath,
                ThreadKind::NetCtrl,
                ThreadKind::TapNamespace,
            ]),
        // Under auto-converge it starts the kicker thread (which runs under
        // this filter: tgkill and sleeps are in base()). With multifd it
        // starts one thread per channel to open it and one sender thread
        // per channel, also under this filter: they connect (sockets), read guest memory and write their socket;
        // the per-migration token comes from getrandom (base()).
        ThreadKind::MigrationSource => base()
            .with(&poll())
            .with(&descriptors())
            .with(&sockets())
            .with(&files())
            .with(&spawn())
            .allow(&[SYS_ioctl]),
        // Management commands reach everything a VM does at run time:
        // vCPU state, snapshots, host probes, migration.
        ThreadKind::ApiReader => base()
            .with(&poll())
            .with(&descriptors())
            .with(&sockets())
            .with(&listening())
            .with(&files())
            .allow(&[SYS_ioctl, SYS_setns])
            // Whether the process that left a staging directory still runs.
            .allow_with(SYS_kill, 1, &[0])
            .spawner(&[
                ThreadKind::MigrationSource,
                ThreadKind::NetDatapath,
                ThreadKind::NetCtrl,
                ThreadKind::TapNamespace,
                ThreadKind::VhostUserMonitor,
            ]),
        ThreadKind::ApiAccept => base()
            .with(&poll())
            .with(&sockets())
            .with(&descriptors())
            .allow(&[SYS_accept4])
            .spawner(&[ThreadKind::ApiReader, ThreadKind::ApiWriter]),
        // Waits for the end; then stops the threads, drains the console
        // and removes its files.
        ThreadKind::MainLoop => base()
            .with(&poll())
            .with(&sockets())
            .with(&descriptors())
            .with(&cleanup())
            // Tearing devices down: a TAP back to blocking, a vhost-net
            // device released.
            .ioctls(&[FIONBIO, VHOST_RESET_OWNER, TUNSETOFFLOAD]),
        // Serves one frontend after the other: its memory table (mapped
        // from the descriptors it sends), rings and kicks, the TAP's offloads.
        ThreadKind::NetBackend => base()
            .with(&poll())
            .with(&descriptors())
            .with(&sockets())
            .with(&listening())
            // Its socket and the private directory it is made in.
            .with(&files())
            // The vhost-user daemon sets up its own signal handling.
            .allow(&[SYS_rt_sigaction])
            .ioctls(&[
                TUNSETOFFLOAD,
                TUNSETVNETHDRSZ,
                TUNGETVNETHDRSZ,
                TUNSETVNETLE,
                FIONBIO,
                // A multi-queue TAP's queues follow the pairs in use.
                TUNSETQUEUE,
            ])
            .spawner(&[]),
        // An incoming migration runs here: with multifd its channel set-up
        // and receiver threads (one per channel) run under this filter too; accepting
        // the channels needs accept4 (listening()), a non-blocking
        // listener (FIONBIO: ioctl) and poll(2) to wait on it (poll()), the
        // receivers read their sockets and
        // punch holes for zero runs (fallocate, files()).
        ThreadKind::Main => base()
            .with(&poll())
            .with(&descriptors())
            .with(&sockets())
            .with(&listening())
            .with(&files())
            .allow(&[
                SYS_ioctl,
                SYS_setns,
                SYS_rt_sigaction,
                SYS_sched_getaffinity,
                SYS_prlimit64,
                SYS_getrlimit,
                SYS_sysinfo,
            ])
            .spawner(&[
                ThreadKind::MainLoop,
                ThreadKind::Vcpu,
                ThreadKind::NetDatapath,
                ThreadKind::NetCtrl,
                ThreadKind::VhostUserMonitor,
                ThreadKind::Console,
                ThreadKind::TapNamespace,
                ThreadKind::SerialStdin,
                ThreadKind::ApiAccept,
                ThreadKind::Signals,
            ]),
    }
}

/// Removing godwit's own sockets and staging directories at exit.
fn cleanup() -> Rules {
    Rules::default().allow(&[
        SYS_openat,
        SYS_newfstatat,
        SYS_statx,
        SYS_fstat,
        SYS_getdents64,
        SYS_unlink,
        SYS_unlinkat,
        SYS_rmdir,
        SYS_fcntl,
    ])
}
