//! Per-thread system-call filters (seccomp-BPF, built with `seccompiler`).
//!
//! Every thread of a running godwit installs the filter of its kind on
//! itself before it reads anything a guest, a management client, a
//! migration peer or a vhost-user peer controls. A call outside the list
//! raises SIGSYS (`SECCOMP_RET_TRAP`); the handler here names the thread and
//! the call on stderr and ends godwit with [`EXIT_SECCOMP`]. `--seccomp log`
//! lets the call through and has the kernel log it (audit `type=1326`),
//! which is how the lists in `filters.rs` are kept complete; `build.rs`
//! compiles them into the binary.
//!
//! Filters stack: a thread is born with its parent's, so the list of a
//! thread that starts others includes theirs (see `filters.rs`).
//!
//! Two short threads run without a filter and have ended before godwit
//! reads any input (their starters join them first): `godwit run`'s
//! VM-creating thread (`machine::early`), which works only from the command
//! line, and the allocator's priming ([`prime_allocator_here`]), which that
//! thread does too when there is one.
//!
//! Test hook: `GODWIT_SECCOMP_SELFTEST=KIND` (a [`ThreadKind::name`]) makes
//! the first thread of that kind make a forbidden call right after its
//! filter is installed, so the tests can see the handler at work.

#[cfg(test)]
mod filters;
mod kind;

pub use kind::ThreadKind;

/// Each thread kind's program, compiled by `build.rs` from `filters.rs`.
mod precompiled {
    use super::ThreadKind;
    use seccompiler::sock_filter;

    include!(concat!(env!("OUT_DIR"), "/seccomp_programs.rs"));
}

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, OnceLock, PoisonError};

use seccompiler::sock_filter;

use godwit_devices::thread_hook::{self, DeviceThread};

/// Exit status after a thread made a forbidden system call (128 + SIGSYS,
/// what a shell shows for a process the signal killed).
pub const EXIT_SECCOMP: u8 = 159;

/// Exit status when a thread's filter cannot be installed: README's
/// "could not start" (this module sits below `cli`, which defines it too).
const EXIT_FILTER_FAILED: u8 = 1;

/// The environment variable of the test hook.
pub const SELFTEST_ENV: &str = "GODWIT_SECCOMP_SELFTEST";

/// What a filter does with a call outside its list.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum SeccompMode {
    /// Stop godwit with a message naming the thread and the call.
    #[default]
    On,
    /// No filters.
    Off,
    /// Allow the call and have the kernel log it (for finding missing calls).
    Log,
}

impl ThreadKind {
    fn from_device(kind: DeviceThread) -> Self {
        match kind {
            DeviceThread::NetDatapath => ThreadKind::NetDatapath,
            DeviceThread::NetCtrl => ThreadKind::NetCtrl,
            DeviceThread::VhostUserMonitor => ThreadKind::VhostUserMonitor,
            DeviceThread::Console => ThreadKind::Console,
            DeviceThread::TapNamespace => ThreadKind::TapNamespace,
        }
    }
}

/// Why the filters could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("cannot install the SIGSYS handler: {0}")]
    Handler(#[source] std::io::Error),
    #[error("cannot install the {kind} system-call filter (run with --seccomp off on a kernel without seccomp): {source}")]
    Apply {
        kind: &'static str,
        #[source]
        source: seccompiler::Error,
    },
}

/// The filters of this run. Their programs were compiled from
/// `filters.rs` when godwit was built (`build.rs`): building them here cost
/// 0.1-0.3 ms per thread kind, some of it before the first guest
/// instruction.
struct Filters {
    /// `--seccomp log`: calls outside a list are logged, not stopped.
    log: bool,
    selftest: Option<String>,
}

impl Filters {
    fn program(&self, kind: ThreadKind) -> &'static [sock_filter] {
        precompiled::program(kind, self.log)
    }
}

/// Set once the allocator is primed (see [`prime_allocator_here`]): no
/// filter that forbids reading files is applied before.
static PRIMED: (Mutex<bool>, Condvar) = (Mutex::new(false), Condvar::new());

fn set_primed() {
    *PRIMED.0.lock().unwrap_or_else(PoisonError::into_inner) = true;
    PRIMED.1.notify_all();
}

/// The longest a filter waits for the priming (which takes well under a
/// millisecond): a start that never arranged it must not hang its threads.
const PRIMING_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

fn wait_primed() {
    let primed = PRIMED.0.lock().unwrap_or_else(PoisonError::into_inner);
    let (primed, _) = PRIMED
        .1
        .wait_timeout_while(primed, PRIMING_WAIT, |primed| !*primed)
        .unwrap_or_else(PoisonError::into_inner);
    if !*primed {
        tracing::warn!(
            "the allocator was not primed before the system-call filters (a bug in godwit: please report it): a thread that frees much may be stopped by its filter"
        );
    }
}

/// Marks the allocator primed when dropped, so that a priming thread that
/// panicked does not leave every thread waiting for its filter.
struct MarkPrimedOnDrop;

impl Drop for MarkPrimedOnDrop {
    fn drop(&mut self) {
        set_primed();
    }
}

static FILTERS: OnceLock<Filters> = OnceLock::new();
static SELFTEST_DONE: AtomicBool = AtomicBool::new(false);

thread_local! {
    // Read by the SIGSYS handler: a const-initialised thread-local without
    // a destructor is a plain TLS slot, safe to read in a signal handler.
    static THREAD_NAME: Cell<[u8; 16]> = const { Cell::new([0; 16]) };
    static THREAD_KIND: Cell<&'static str> = const { Cell::new("") };
}

/// Chooses the filters for `mode` (`Off`: none) and sets the hook the
/// device threads call. Call once, before any thread starts. The caller
/// then has the allocator primed before the first filter that forbids
/// reading files is applied: on the first thread it starts
/// ([`PrimeWhenDropped`], `godwit run`'s VM-creating thread) or with
/// [`prime_allocator_on_a_thread`].
pub fn init(mode: SeccompMode) -> Result<(), SeccompError> {
    if mode == SeccompMode::Off {
        return Ok(());
    }
    install_sigsys_handler()?;
    let selftest = std::env::var(SELFTEST_ENV).ok();
    let _ = FILTERS.set(Filters {
        log: mode == SeccompMode::Log,
        selftest,
    });
    thread_hook::set_hook(device_thread_started);
    Ok(())
}

/// Has glibc's allocator read `/proc/sys/vm/overcommit_memory` now, while
/// the calling thread may still read files. glibc reads it once, the first
/// time a thread's arena gives memory back (`shrink_heap`), which may
/// happen on any thread that frees much: a datapath thread ending after a
/// reset or at quit frees its buffers, and its filter forbids opening
/// files. The calling thread (any but the main one, whose arena never
/// shrinks this way) fills its own arena with blocks below the mmap
/// threshold and frees them, so that the top of its heap crosses the trim
/// threshold and the file is read (and the answer kept) here.
fn prime_allocator_here() {
    let _primed = MarkPrimedOnDrop;
    // Below the mmap threshold (128 KiB) each block comes from the arena;
    // left unwritten, only their chunk headers' pages are touched (each
    // page first touched costs a fault, which was most of the priming).
    let blocks: Vec<Vec<u8>> = (0..PRIME_BLOCKS)
        .map(|_| Vec::with_capacity(PRIME_BLOCK))
        .collect();
    drop(std::hint::black_box(blocks));
}

/// Primes the allocator ([`prime_allocator_here`]) when dropped, also while
/// its thread unwinds: no failure leaves the filters waiting.
pub struct PrimeWhenDropped;

impl Drop for PrimeWhenDropped {
    fn drop(&mut self) {
        prime_allocator_here();
    }
}

/// Together far more than glibc's trim threshold (128 KiB by default,
/// twice the largest mmapped block freed so far once one is) plus its top
/// pad, so that freeing them makes the arena shrink; unwritten, they cost
/// a page fault each at most.
const PRIME_BLOCKS: usize = 16;
const PRIME_BLOCK: usize = 96 << 10;

/// Primes the allocator on a thread of its own and waits for it: nothing
/// runs unconfined once the caller goes on to read its input.
pub fn prime_allocator_on_a_thread() {
    if FILTERS.get().is_none() {
        return;
    }
    let primed = std::thread::Builder::new()
        .name("alloc-prime".into())
        .spawn(prime_allocator_here)
        .map(|t| t.join().is_ok());
    if !matches!(primed, Ok(true)) {
        tracing::warn!(
            "could not prime the allocator before the system-call filters; a thread that frees much may be stopped by its filter"
        );
        set_primed();
    }
}

/// Installs the filter of `kind` on the calling thread (nothing when the
/// filters are off).
pub fn install(kind: ThreadKind) -> Result<(), SeccompError> {
    let Some(filters) = FILTERS.get() else {
        return Ok(());
    };
    let program = filters.program(kind);
    // A thread allowed to read files reads glibc's answer itself when it
    // needs it: the main thread does not wait for the priming.
    if !precompiled::opens_files(kind) {
        wait_primed();
    }
    remember_thread(kind);
    seccompiler::apply_filter(program).map_err(|source| SeccompError::Apply {
        kind: kind.name(),
        source,
    })?;
    if filters.selftest.as_deref() == Some(kind.name())
        && !SELFTEST_DONE.swap(true, Ordering::SeqCst)
    {
        forbidden_call();
    }
    Ok(())
}

/// [`install`] for threads that have no caller to return an error to: a
/// thread that cannot be confined must not go on unconfined.
pub fn install_or_exit(kind: ThreadKind) {
    if let Err(e) = install(kind) {
        use std::io::Write;
        let _ = writeln!(std::io::stderr(), "godwit: error: {e}");
        std::process::exit(i32::from(EXIT_FILTER_FAILED));
    }
}

fn device_thread_started(kind: DeviceThread) {
    install_or_exit(ThreadKind::from_device(kind));
}

fn remember_thread(kind: ThreadKind) {
    let mut name = [0u8; 16];
    if let Some(n) = std::thread::current().name() {
        let n = n.as_bytes();
        let len = n.len().min(name.len());
        name[..len].copy_from_slice(&n[..len]);
    }
    THREAD_NAME.with(|c| c.set(name));
    THREAD_KIND.with(|c| c.set(kind.name()));
}

/// A call no filter allows (the test hook).
fn forbidden_call() {
    // SAFETY: getppid takes no arguments and changes nothing.
    unsafe {
        libc::syscall(libc::SYS_getppid);
    }
}

fn install_sigsys_handler() -> Result<(), SeccompError> {
    // SAFETY: a zeroed sigaction is a valid starting point; the handler
    // only makes async-signal-safe calls (write, _exit).
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = sigsys_handler as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut action.sa_mask);
        if libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) != 0 {
            return Err(SeccompError::Handler(std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

/// A stack buffer for the message: no allocation in a signal handler.
struct Message {
    buf: [u8; 512],
    len: usize,
}

impl Message {
    fn push(&mut self, bytes: &[u8]) {
        let n = bytes.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&bytes[..n]);
        self.len += n;
    }

    fn push_number(&mut self, mut value: u64) {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (value % 10) as u8;
            value /= 10;
            if value == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }
}

/// The system-call number of a SIGSYS from seccomp: `si_syscall` of the
/// kernel's `_sigsys` member, after `_call_addr` at the union's start.
///
/// # Safety
/// `info` points to the siginfo the kernel passed to the handler.
unsafe fn sigsys_syscall(info: *const libc::siginfo_t) -> i32 {
    const UNION_OFFSET: usize = 16;
    // SAFETY: the caller passes the kernel's siginfo; `_sigsys` lies within
    // it (si_syscall after the pointer-sized _call_addr), read unaligned.
    unsafe {
        let union = info.cast::<u8>().add(UNION_OFFSET);
        union
            .add(std::mem::size_of::<*const libc::c_void>())
            .cast::<i32>()
            .read_unaligned()
    }
}

extern "C" fn sigsys_handler(
    _signal: libc::c_int,
    info: *mut libc::siginfo_t,
    _context: *mut libc::c_void,
) {
    // SAFETY: the kernel passes a valid siginfo to an SA_SIGINFO handler.
    let nr = unsafe { sigsys_syscall(info) };
    let name = THREAD_NAME.with(Cell::get);
    let kind = THREAD_KIND.with(Cell::get);
    let name_len = name.iter().position(|&b| b == 0).unwrap_or(name.len());
    let mut msg = Message {
        buf: [0; 512],
        len: 0,
    };
    msg.push(b"godwit: seccomp: thread '");
    msg.push(&name[..name_len]);
    msg.push(b"' (");
    msg.push(kind.as_bytes());
    msg.push(b") made the forbidden system call ");
    msg.push_number(u64::from(nr.unsigned_abs()));
    msg.push(b" (`ausyscall ");
    msg.push_number(u64::from(nr.unsigned_abs()));
    msg.push(b"` names it); stopping. Run with --seccomp log to find what is missing\n");
    // SAFETY: write and _exit are async-signal-safe, every filter allows
    // them, and the buffer lives on this stack.
    unsafe {
        libc::write(2, msg.buf.as_ptr().cast(), msg.len);
        libc::_exit(i32::from(EXIT_SECCOMP));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use seccompiler::SeccompAction;

    /// The programs built into godwit are those `filters.rs` builds now.
    #[test]
    fn the_built_in_programs_are_the_lists_compiled() {
        for kind in ThreadKind::ALL {
            for (action, log) in [(SeccompAction::Trap, false), (SeccompAction::Log, true)] {
                let program = filters::program(kind, action)
                    .unwrap_or_else(|e| panic!("{}: {e}", kind.name()));
                // The kernel refuses programs over BPF_MAXINSNS.
                assert!(program.len() <= 4096, "{}: {}", kind.name(), program.len());
                assert!(
                    program[..] == *precompiled::program(kind, log),
                    "{} (log: {log}): build.rs compiled another program",
                    kind.name()
                );
            }
            assert_eq!(
                precompiled::opens_files(kind),
                filters::opens_files(kind),
                "{}",
                kind.name()
            );
        }
    }

    #[test]
    fn the_message_buffer_formats_numbers_and_stops_at_its_end() {
        let mut m = Message {
            buf: [0; 512],
            len: 0,
        };
        m.push(b"nr ");
        m.push_number(0);
        m.push(b" ");
        m.push_number(435);
        assert_eq!(&m.buf[..m.len], b"nr 0 435");
        m.push(&[b'x'; 600]);
        assert_eq!(m.len, 512);
    }
}
