//! vCPU threads: the KVM_RUN loop, I/O exit dispatch, and the pause/resume
//! protocol the VMM uses to stop every vCPU outside KVM_RUN.
//!
//! A vCPU is stopped by setting the wanted state and sending its thread a
//! signal. The signal handler sets `immediate_exit` in the thread's own
//! `kvm_run`, so a signal that lands just before KVM_RUN is entered still
//! makes KVM_RUN return at once.

use std::cell::Cell;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::kvm_run;
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use godwit_devices::bus::Bus;

use crate::vstate::events::{VcpuExitError, VmEvent};

/// The port and MMIO buses every vCPU dispatches to.
#[derive(Default)]
pub struct IoBuses {
    pub pio: Bus,
    pub mmio: Bus,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Target {
    Run,
    Pause,
    Exit,
}

struct ControlState {
    target: Target,
    /// vCPU threads parked in the pause wait.
    parked: usize,
    /// vCPU threads that have not returned.
    alive: usize,
}

/// What the vCPU threads are asked to do, shared with the VMM.
pub struct RunControl {
    state: Mutex<ControlState>,
    changed: Condvar,
    /// Percent of each [`THROTTLE_PERIOD`] of guest run time the vCPUs
    /// spend stopped (auto-converge); 0: not throttled.
    throttle: AtomicU32,
}

/// The run slice of a throttled vCPU, as QEMU's.
pub const THROTTLE_PERIOD: Duration = Duration::from_millis(10);
/// The most a vCPU is throttled.
pub const THROTTLE_MAX: u32 = 99;

enum Step {
    Run,
    /// A pause is asked for while the last exit's I/O instruction is not
    /// yet retired: retire it, then ask again.
    RetireIo,
    Exit,
}

impl RunControl {
    fn new(start_paused: bool) -> Self {
        RunControl {
            state: Mutex::new(ControlState {
                target: if start_paused {
                    Target::Pause
                } else {
                    Target::Run
                },
                parked: 0,
                alive: 0,
            }),
            changed: Condvar::new(),
            throttle: AtomicU32::new(0),
        }
    }

    /// After a throttled vCPU ran for a period: stops it for the throttled
    /// share, or until it is asked to pause or exit.
    fn throttle_wait(&self, ran_since: &mut Instant) {
        let pct = self.throttle.load(Ordering::Relaxed).min(THROTTLE_MAX);
        if pct == 0 || ran_since.elapsed() < THROTTLE_PERIOD {
            return;
        }
        let stop = THROTTLE_PERIOD.mul_f64(f64::from(pct) / f64::from(100 - pct));
        let deadline = Instant::now() + stop;
        let mut s = self.lock();
        while s.target == Target::Run {
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                break;
            };
            s = self
                .changed
                .wait_timeout(s, left)
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
        *ran_since = Instant::now();
    }

    fn lock(&self) -> MutexGuard<'_, ControlState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Parks while paused; `io_pending` (the last exit's I/O instruction not
    /// yet retired) has the vCPU retire it first, so that a parked vCPU's
    /// state is always whole.
    fn next_step(&self, io_pending: bool) -> Step {
        let mut s = self.lock();
        if s.target == Target::Pause {
            if io_pending {
                return Step::RetireIo;
            }
            s.parked += 1;
            self.changed.notify_all();
            while s.target == Target::Pause {
                s = self
                    .changed
                    .wait(s)
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
            }
            s.parked -= 1;
        }
        match s.target {
            Target::Exit => Step::Exit,
            _ => Step::Run,
        }
    }
}

thread_local! {
    static THREAD_KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let run = THREAD_KVM_RUN.with(Cell::get);
    if !run.is_null() {
        // SAFETY: the pointer is this thread's own kvm_run mapping, set while
        // the thread owns its VcpuFd and cleared before the fd is dropped; a
        // single byte store is async-signal-safe.
        unsafe { std::ptr::write_volatile(&mut (*run).immediate_exit, 1) };
    }
}

/// Installs the kick signal handler once per process.
pub fn register_kick_signal() -> Result<(), vmm_sys_util::errno::Error> {
    static REGISTERED: std::sync::OnceLock<Result<(), vmm_sys_util::errno::Error>> =
        std::sync::OnceLock::new();
    *REGISTERED.get_or_init(|| register_signal_handler(SIGRTMIN(), kick_handler))
}

pub struct Vcpu {
    pub id: u8,
    pub fd: VcpuFd,
}

/// The running vCPU threads of a VM.
pub struct VcpuThreads {
    control: Arc<RunControl>,
    handles: Mutex<Vec<JoinHandle<()>>>,
    /// Each vCPU's fd; its thread holds the lock only inside KVM_RUN, so a
    /// paused vCPU's state can be read and written from here.
    fds: Vec<Arc<Mutex<VcpuFd>>>,
}

impl VcpuThreads {
    /// Starts one thread per vCPU, running or parked.
    pub fn start(
        vcpus: Vec<Vcpu>,
        buses: Arc<IoBuses>,
        events: Sender<VmEvent>,
        start_paused: bool,
    ) -> std::io::Result<Self> {
        let control = Arc::new(RunControl::new(start_paused));
        control.lock().alive = vcpus.len();
        let mut handles = Vec::with_capacity(vcpus.len());
        let fds: Vec<(u8, Arc<Mutex<VcpuFd>>)> = vcpus
            .into_iter()
            .map(|v| (v.id, Arc::new(Mutex::new(v.fd))))
            .collect();
        for (id, fd) in fds.iter().cloned() {
            let (thread_control, buses, events) = (control.clone(), buses.clone(), events.clone());
            let spawned = std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || {
                    crate::seccomp::install_or_exit(crate::seccomp::ThreadKind::Vcpu);
                    run_vcpu(id, &fd, &thread_control, &buses, &events)
                });
            match spawned {
                Ok(h) => handles.push(h),
                Err(e) => {
                    control.lock().alive = handles.len();
                    let threads = VcpuThreads {
                        control,
                        handles: Mutex::new(handles),
                        fds: Vec::new(),
                    };
                    threads.exit();
                    return Err(e);
                }
            }
        }
        Ok(VcpuThreads {
            control,
            handles: Mutex::new(handles),
            fds: fds.into_iter().map(|(_, fd)| fd).collect(),
        })
    }

    fn handles(&self) -> MutexGuard<'_, Vec<JoinHandle<()>>> {
        self.handles
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn kick_all(&self) {
        for h in self.handles().iter() {
            if !h.is_finished() {
                // A thread that exited between the check and the kill is
                // harmless: ESRCH.
                let _ = h.kill(SIGRTMIN());
            }
        }
    }

    /// Stops every vCPU outside KVM_RUN and returns once all are parked.
    pub fn pause(&self) {
        let mut s = self.control.lock();
        if s.target == Target::Exit {
            return;
        }
        s.target = Target::Pause;
        // A vCPU in its throttle wait parks at once.
        self.control.changed.notify_all();
        while s.parked < s.alive {
            drop(s);
            self.kick_all();
            s = self.control.lock();
            if s.parked >= s.alive {
                break;
            }
            s = self
                .control
                .changed
                .wait_timeout(s, Duration::from_millis(2))
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
    }

    pub fn resume(&self) {
        let mut s = self.control.lock();
        if s.target == Target::Pause {
            s.target = Target::Run;
            self.control.changed.notify_all();
        }
    }

    /// Throttles every vCPU to run only `(100 - pct)`% of the time
    /// (at most [`THROTTLE_MAX`]); 0 lifts it. Only a vCPU that leaves
    /// KVM_RUN is stopped: [`VcpuThreads::kick_throttled`] makes them.
    pub fn set_throttle(&self, pct: u32) {
        self.control
            .throttle
            .store(pct.min(THROTTLE_MAX), Ordering::Relaxed);
        self.control.changed.notify_all();
    }

    pub fn throttle(&self) -> u32 {
        self.control.throttle.load(Ordering::Relaxed)
    }

    /// Makes running vCPUs leave KVM_RUN, so that a throttle takes effect
    /// even for a guest that never exits by itself; call once per
    /// [`THROTTLE_PERIOD`] while throttled.
    pub fn kick_throttled(&self) {
        if self.throttle() > 0 && self.control.lock().target == Target::Run {
            self.kick_all();
        }
    }

    /// How many vCPUs the VM has.
    pub fn count(&self) -> usize {
        self.fds.len()
    }

    pub fn is_paused(&self) -> bool {
        self.control.lock().target == Target::Pause
    }

    /// The vCPU fds, locked, in vCPU order: only while every vCPU is parked
    /// (after [`VcpuThreads::pause`]); None otherwise.
    pub fn paused_fds(&self) -> Option<Vec<MutexGuard<'_, VcpuFd>>> {
        {
            let s = self.control.lock();
            if s.target != Target::Pause || s.parked < s.alive {
                return None;
            }
        }
        Some(
            self.fds
                .iter()
                .map(|fd| fd.lock().unwrap_or_else(std::sync::PoisonError::into_inner))
                .collect(),
        )
    }

    /// Ends every vCPU thread and waits for them.
    pub fn exit(&self) {
        {
            let mut s = self.control.lock();
            s.target = Target::Exit;
            self.control.changed.notify_all();
        }
        while self.handles().iter().any(|h| !h.is_finished()) {
            self.kick_all();
            std::thread::sleep(Duration::from_millis(1));
        }
        let handles: Vec<_> = self.handles().drain(..).collect();
        for h in handles {
            let _ = h.join();
        }
    }
}

impl Drop for VcpuThreads {
    fn drop(&mut self) {
        self.exit();
    }
}

fn rip_of(fd: &VcpuFd) -> u64 {
    fd.get_regs().map(|r| r.rip).unwrap_or(u64::MAX)
}

/// KVM_INTERNAL_ERROR_EMULATION
const INTERNAL_ERROR_EMULATION: u32 = 1;
/// KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES
const EMULATION_FLAG_INSTRUCTION_BYTES: u64 = 1;

/// The instruction bytes KVM reports with an emulation failure. The exit is
/// `struct kvm_run.emulation_failure` laid over `internal.data`: data[0] is
/// the flags word, then a one-byte `insn_size` and 15 `insn_bytes`, so the
/// bytes begin one byte into data[1].
fn emulation_insn_bytes(data: &[u64]) -> Option<Vec<u8>> {
    let flags = *data.first()?;
    if data.len() < 3 || flags & EMULATION_FLAG_INSTRUCTION_BYTES == 0 {
        return None;
    }
    let raw: Vec<u8> = data[1..3].iter().flat_map(|w| w.to_le_bytes()).collect();
    let len = usize::from(raw[0]).min(15);
    Some(raw[1..=len].to_vec())
}

fn internal_error(id: u8, fd: &mut VcpuFd) -> VcpuExitError {
    let run = fd.get_kvm_run();
    // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so KVM filled the
    // `internal` member of the exit union.
    let internal = unsafe { run.__bindgen_anon_1.internal };
    let suberror = internal.suberror;
    let rip = rip_of(fd);
    if suberror == INTERNAL_ERROR_EMULATION {
        let ndata = (internal.ndata as usize).min(internal.data.len());
        let bytes = match emulation_insn_bytes(&internal.data[..ndata]) {
            Some(insn) => insn
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(" "),
            None => "not reported".to_string(),
        };
        return VcpuExitError::EmulationFailure {
            vcpu: id,
            rip,
            bytes,
        };
    }
    VcpuExitError::InternalError {
        vcpu: id,
        suberror,
        rip,
    }
}

fn lock_fd(fd: &Mutex<VcpuFd>) -> MutexGuard<'_, VcpuFd> {
    fd.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn run_vcpu(
    id: u8,
    fd: &Mutex<VcpuFd>,
    control: &RunControl,
    buses: &IoBuses,
    events: &Sender<VmEvent>,
) {
    // The kvm_run mapping lives as long as the fd, which outlives this thread.
    THREAD_KVM_RUN.with(|c| c.set(lock_fd(fd).get_kvm_run() as *mut kvm_run));
    // A vCPU thread that dies silently would leave the VMM waiting forever
    // for a VM event; whatever happens here, the VMM hears of it.
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        vcpu_loop(id, fd, control, buses)
    }))
    .unwrap_or_else(|panic| {
        let message = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".to_string());
        Some(VmEvent::VcpuFailed(VcpuExitError::ThreadPanicked {
            vcpu: id,
            message,
        }))
    });
    THREAD_KVM_RUN.with(|c| c.set(std::ptr::null_mut()));
    {
        let mut s = control.lock();
        s.alive -= 1;
        control.changed.notify_all();
    }
    if let Some(event) = outcome {
        let _ = events.send(event);
    }
}

/// Runs until told to exit (None) or until the guest ends the VM.
fn vcpu_loop(id: u8, fd: &Mutex<VcpuFd>, control: &RunControl, buses: &IoBuses) -> Option<VmEvent> {
    let mut ran_since = Instant::now();
    let mut io_pending = false;
    loop {
        control.throttle_wait(&mut ran_since);
        match control.next_step(io_pending) {
            Step::Exit => return None,
            Step::RetireIo => {
                io_pending = false;
                if let Some(event) = retire_pending_io(id, &mut lock_fd(fd), buses) {
                    return Some(event);
                }
                continue;
            }
            Step::Run => {}
        }
        let mut guard = lock_fd(fd);
        let fd = &mut *guard;
        // A kick that lands after this still stops KVM_RUN (the handler sets
        // immediate_exit again); one that landed just before is repeated by
        // `pause`, which kicks until every vCPU is parked.
        fd.set_kvm_immediate_exit(0);
        if control.lock().target != Target::Run {
            continue;
        }
        match run_once(id, fd, buses) {
            RunOutcome::Interrupted => io_pending = false,
            RunOutcome::Served { io } => io_pending = io,
            RunOutcome::Ended(event) => return Some(event),
        }
    }
}

/// What one KVM_RUN came back with.
enum RunOutcome {
    /// No exit to serve: a kick or immediate_exit (any I/O instruction a
    /// previous exit left is retired by now).
    Interrupted,
    /// An exit was served; `io` when it was a port or MMIO access, which
    /// KVM retires only in the next KVM_RUN.
    Served { io: bool },
    /// The VM ends, or this vCPU failed.
    Ended(VmEvent),
}

/// Enters KVM_RUN once and serves the exit.
fn run_once(id: u8, fd: &mut VcpuFd, buses: &IoBuses) -> RunOutcome {
    let exit = match fd.run() {
        Ok(exit) => exit,
        Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
            return RunOutcome::Interrupted
        }
        Err(source) => {
            return RunOutcome::Ended(VmEvent::VcpuFailed(VcpuExitError::Run { vcpu: id, source }))
        }
    };
    let failed = |error| RunOutcome::Ended(VmEvent::VcpuFailed(error));
    match exit {
        VcpuExit::IoIn(port, data) => {
            if !buses.pio.read(u64::from(port), data) {
                data.fill(0xff);
            }
        }
        VcpuExit::IoOut(port, data) => {
            buses.pio.write(u64::from(port), data);
        }
        VcpuExit::MmioRead(addr, data) => {
            if !buses.mmio.read(addr, data) {
                data.fill(0xff);
            }
        }
        VcpuExit::MmioWrite(addr, data) => {
            buses.mmio.write(addr, data);
        }
        // The in-kernel LAPIC handles HLT; should a host report it anyway,
        // entering KVM_RUN again waits for the next interrupt.
        VcpuExit::Hlt => return RunOutcome::Served { io: false },
        VcpuExit::Intr => return RunOutcome::Interrupted,
        VcpuExit::Shutdown => {
            let rip = rip_of(fd);
            return failed(VcpuExitError::TripleFault { vcpu: id, rip });
        }
        VcpuExit::SystemEvent(kind, _) => {
            return match kind {
                kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN | kvm_bindings::KVM_SYSTEM_EVENT_RESET => {
                    RunOutcome::Ended(VmEvent::GuestReset)
                }
                other => failed(VcpuExitError::Unexpected {
                    vcpu: id,
                    exit: format!("system event {other}"),
                    rip: rip_of(fd),
                }),
            };
        }
        VcpuExit::InternalError => return failed(internal_error(id, fd)),
        VcpuExit::FailEntry(reason, _cpu) => {
            let rip = rip_of(fd);
            return failed(VcpuExitError::FailEntry {
                vcpu: id,
                reason,
                rip,
            });
        }
        other => {
            let exit = format!("{other:?}");
            let rip = rip_of(fd);
            return failed(VcpuExitError::Unexpected {
                vcpu: id,
                exit,
                rip,
            });
        }
    }
    RunOutcome::Served { io: true }
}

/// How many exits retiring one instruction may take: an MMIO access KVM
/// splits in two (it crosses a page) exits once more for its second half.
const RETIRE_ROUNDS: usize = 4;

/// KVM retires a port or MMIO access (a read's value into its register,
/// RIP past the instruction) only in the next KVM_RUN, as the KVM API
/// requires before state is saved. This enters KVM_RUN with immediate_exit
/// set: KVM retires the instruction and returns before the guest runs on.
/// Without it, a snapshot or migration would hold RIP at the access, and
/// the guest would execute it again wherever it resumes.
fn retire_pending_io(id: u8, fd: &mut VcpuFd, buses: &IoBuses) -> Option<VmEvent> {
    fd.set_kvm_immediate_exit(1);
    for _ in 0..RETIRE_ROUNDS {
        match run_once(id, fd, buses) {
            RunOutcome::Interrupted => return None,
            RunOutcome::Served { .. } => {}
            RunOutcome::Ended(event) => return Some(event),
        }
    }
    tracing::warn!(vcpu = id, "an I/O instruction was not retired after {RETIRE_ROUNDS} exits; its state is saved as it stands");
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::sync::mpsc;

    use godwit_devices::bus::BusDevice;
    use kvm_ioctls::Kvm;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

    /// A port whose read blocks until the test lets it answer, so that a
    /// pause can be requested while a vCPU is inside the port read's exit.
    struct HeldPort {
        entered: mpsc::Sender<()>,
        release: mpsc::Receiver<()>,
    }

    impl BusDevice for HeldPort {
        fn read(&mut self, _offset: u64, data: &mut [u8]) {
            let _ = self.entered.send(());
            let _ = self.release.recv_timeout(Duration::from_secs(10));
            data.fill(0x5a);
        }
        fn write(&mut self, _offset: u64, _data: &[u8]) {}
    }

    /// KVM retires a port read (the value into AL, RIP past the `in`) only
    /// on the next KVM_RUN. A vCPU paused between the exit and that KVM_RUN
    /// would leave state that, once saved, makes the restored guest execute
    /// the read again (a UART's byte consumed twice) and lose this answer.
    #[test]
    fn a_vcpu_paused_inside_a_port_read_retires_it_before_parking() {
        const CODE_GPA: u64 = 0x1000;
        const PORT: u8 = 0x42;
        register_kick_signal().unwrap();
        let kvm = Kvm::new().unwrap();
        let vm = kvm.create_vm().unwrap();
        let memory: GuestMemoryMmap =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(CODE_GPA), 0x1000)]).unwrap();
        // in al, PORT; hlt
        memory
            .write_slice(&[0xe4, PORT, 0xf4], GuestAddress(CODE_GPA))
            .unwrap();
        let region = memory.iter().next().unwrap();
        let host = memory.get_host_address(GuestAddress(CODE_GPA)).unwrap();
        let slot = kvm_bindings::kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: CODE_GPA,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the region maps `memory`, which lives until the end of
        // the test, after the vCPU threads (the only users of the slot) have
        // ended in `threads.exit()`.
        unsafe { vm.set_user_memory_region(slot).unwrap() };
        let fd = vm.create_vcpu(0).unwrap();
        let mut sregs = fd.get_sregs().unwrap();
        sregs.cs.base = 0;
        sregs.cs.selector = 0;
        fd.set_sregs(&sregs).unwrap();
        let regs = kvm_bindings::kvm_regs {
            rip: CODE_GPA,
            rflags: 2,
            ..Default::default()
        };
        fd.set_regs(&regs).unwrap();

        let (entered_tx, entered) = mpsc::channel();
        let (release, release_rx) = mpsc::channel();
        let mut buses = IoBuses::default();
        let port = HeldPort {
            entered: entered_tx,
            release: release_rx,
        };
        buses
            .pio
            .insert(u64::from(PORT), 1, Arc::new(Mutex::new(port)))
            .unwrap();
        let (events, _events_rx) = mpsc::channel();
        let threads = Arc::new(
            VcpuThreads::start(vec![Vcpu { id: 0, fd }], Arc::new(buses), events, false).unwrap(),
        );
        entered
            .recv_timeout(Duration::from_secs(10))
            .expect("the vCPU reads the port");
        let pausing = {
            let threads = threads.clone();
            std::thread::spawn(move || threads.pause())
        };
        // The pause is asked for (and the vCPU kicked) while the read is held.
        while !threads.is_paused() {
            std::thread::sleep(Duration::from_millis(1));
        }
        std::thread::sleep(Duration::from_millis(50));
        release.send(()).unwrap();
        pausing.join().unwrap();

        let fds = threads.paused_fds().expect("paused");
        let regs = fds[0].get_regs().unwrap();
        drop(fds);
        threads.exit();
        assert_eq!(
            (regs.rip, regs.rax & 0xff),
            (CODE_GPA + 2, 0x5a),
            "the port read retired before the vCPU parked (RIP past `in`, AL = the answer)"
        );
    }

    #[test]
    fn instruction_bytes_start_after_the_length_byte() {
        // flags, then insn_size = 4 and `66 0f 6e c0`, padded as KVM does.
        let data = [
            EMULATION_FLAG_INSTRUCTION_BYTES,
            u64::from_le_bytes([4, 0x66, 0x0f, 0x6e, 0xc0, 0x90, 0x90, 0x90]),
            u64::from_le_bytes([0x90; 8]),
        ];
        assert_eq!(
            emulation_insn_bytes(&data),
            Some(vec![0x66, 0x0f, 0x6e, 0xc0])
        );
        assert_eq!(emulation_insn_bytes(&data[..2]), None);
        assert_eq!(emulation_insn_bytes(&[0, data[1], data[2]]), None);
    }
}
