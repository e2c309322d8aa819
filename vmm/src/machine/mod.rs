//! Builds a VM from its configuration and runs it to the end: KVM, memory,
//! kernel, devices, vCPUs, console. The operations management commands
//! perform live on [`VmHandle`]; the API that calls them (`api::commands`)
//! is attached with [`Machine::attach_service`] and stopped when the run
//! ends.

use std::fs::OpenOptions;
use std::io::Read;
use std::path::PathBuf;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use godwit_migration::cpu_compat::CpuidEntry;
use serde_json::json;
use vmm_sys_util::eventfd::EventFd;

use godwit_devices::bus::BusError;
use godwit_devices::console::{self, ConsoleHandle};
use godwit_devices::debug_exit::{DebugExit, DEBUG_EXIT_BASE, DEBUG_EXIT_LEN};
use godwit_devices::i8042::{I8042, I8042_BASE, I8042_LEN};
use godwit_devices::pvpanic::{PvPanic, PVPANIC_LEN, PVPANIC_PORT};
use godwit_devices::serial::{SerialDevice, SerialOutput, COM1_BASE, COM1_IRQ, COM1_LEN};

/// How long godwit waits at exit for a slow console reader.
const CONSOLE_DRAIN_AT_EXIT: Duration = Duration::from_secs(2);
/// How long a termination signal waits for a snapshot under way to end.
const OPERATION_END_AT_SIGNAL: Duration = Duration::from_secs(10);

pub mod early;
pub mod migration_status;
pub mod services;

use crate::abi::machine_types::{self, MachineType, MachineTypeError};
use crate::boot::{self, BootConfig, BootError};
use crate::config::{SerialSpec, VmConfig};
use crate::devices::net::{NetDevice, NetSetupError};
use crate::migration::announce::AnnounceRounds;
use crate::vstate::events::VcpuExitError;
use crate::vstate::events::VmEvent;
use crate::vstate::memory::{GuestRam, MemoryError};
use crate::vstate::state::vcpu::vcpu_cpuid;
use crate::vstate::vcpu::{register_kick_signal, IoBuses, VcpuThreads};
use crate::vstate::vm::{Vm, VmError};
use services::{Events, Service};

/// Why a VM could not be built (boot, and the parts restore and incoming
/// migration share). Each message says what to change.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error(transparent)]
    Regs(#[from] boot::regs::RegsError),
    #[error(transparent)]
    MpTable(#[from] boot::mptable::MpTableError),
    #[error(transparent)]
    Acpi(#[from] boot::acpi::AcpiError),
    #[error("cannot open serial output file {}: {source}", path.display())]
    SerialFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot set up {what}: {source}")]
    Host {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("cannot read back the CPUID of vCPU 0: {0}")]
    Cpuid(#[source] crate::vstate::state::StateError),
    #[error("device layout: {0}")]
    Bus(#[from] BusError),
    #[error(transparent)]
    MachineType(#[from] MachineTypeError),
    #[error(transparent)]
    Net(#[from] NetSetupError),
}

impl BuildError {
    /// The strict check refused a network peer (its own exit status).
    pub fn is_strict_refusal(&self) -> bool {
        match self {
            BuildError::Net(e) => e.is_strict_refusal(),
            _ => false,
        }
    }
}

/// How a VM ended.
#[derive(Debug)]
pub enum VmOutcome {
    /// The guest reset or powered off the machine.
    GuestPoweroff,
    /// A management client sent `quit`.
    Quit,
    /// The guest crashed in a way KVM reports (triple fault, emulation failure).
    GuestFailed(VcpuExitError),
    /// The guest was migrated away and runs on the destination.
    Migrated,
    /// The guest wrote this value to the debug-exit port.
    DebugExit(u32),
    /// The guest kernel panicked (pvpanic).
    GuestPanicked,
    /// `--timeout` ran out.
    TimedOut(Duration),
    /// godwit received this termination signal (SIGTERM, SIGINT).
    Signal(i32),
}

/// Run state as QMP `query-status` reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunState {
    Running,
    Paused,
    /// Paused after a migration handed the guest over (or may have): the
    /// destination runs it, or the outcome is unknown. Nothing resumes it
    /// but an operator's `cont` with `force`.
    PostMigrate,
    Shutdown,
}

impl RunState {
    /// The name QMP `query-status` reports.
    pub fn as_str(self) -> &'static str {
        match self {
            RunState::Running => "running",
            RunState::Paused => "paused",
            RunState::PostMigrate => "postmigrate",
            RunState::Shutdown => "shutdown",
        }
    }
}

/// A whole-VM operation that holds the VM while it runs: the others are
/// refused meanwhile, and `stop`/`cont` only run when it allows them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operation {
    /// `snapshot-save`: vCPUs are paused and memory is being written.
    Snapshot,
    /// A migration's pre-copy rounds: the guest may run or not, as the
    /// operator says.
    Migration,
    /// A migration's stop-and-copy and handoff: the guest is paused and its
    /// last state is on its way; only the migration decides where it runs.
    StopAndCopy,
    /// `quit`: the VM is ending.
    Quit,
}

impl Operation {
    fn doing(self) -> &'static str {
        match self {
            Operation::Snapshot => "a snapshot is being written",
            Operation::Migration => "a migration is in progress (migrate_cancel stops it)",
            Operation::StopAndCopy => {
                "a migration is copying the paused VM's last state to the destination"
            }
            Operation::Quit => "the VM is quitting",
        }
    }

    /// Whether `stop` and `cont` may run during it.
    fn allows_run_state_changes(self) -> bool {
        self == Operation::Migration
    }
}

/// An operation was refused because another one holds the VM.
#[derive(Debug, thiserror::Error)]
#[error("busy: {}; try again when it has finished", .0.doing())]
pub struct Busy(pub Operation);

/// Why `cont` did not resume the VM.
#[derive(Debug, thiserror::Error)]
pub enum ContError {
    #[error(transparent)]
    Busy(#[from] Busy),
    #[error("the VM has shut down and cannot be resumed")]
    ShutDown,
    #[error("the VM is in postmigrate: its last migration handed the guest over or may have (query-migrate says which), so the destination may be running it; resuming it here too would run two copies with one MAC address and diverging disks. Check on the destination host that the guest does not run there (kill that godwit if it does), then send cont with {{\"force\": true}} to take responsibility for resuming it here")]
    PostMigrate,
}

/// The operation that holds the VM, if any (see [`Operation`]).
#[derive(Default)]
pub(crate) struct Operations {
    current: Mutex<Option<Operation>>,
    ended: Condvar,
}

impl Operations {
    fn lock(&self) -> MutexGuard<'_, Option<Operation>> {
        self.current.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Holds the VM for one operation; the next may start once it is dropped.
pub(crate) struct OperationGuard {
    ops: Arc<Operations>,
}

impl OperationGuard {
    /// Moves on to `next` (the migration's stop-and-copy): `stop`/`cont` in
    /// flight finish first, none starts afterwards unless `next` allows it.
    pub(crate) fn enter(&self, next: Operation) {
        *self.ops.lock() = Some(next);
    }
}

impl Drop for OperationGuard {
    fn drop(&mut self) {
        let mut current = self.ops.lock();
        if *current != Some(Operation::Quit) {
            *current = None;
        }
        self.ops.ended.notify_all();
    }
}

/// What management commands act on while the VM runs.
pub struct VmHandle {
    // Dropped in this order: vCPU threads and device datapaths stop before
    // the VM and the guest memory they use go away.
    pub(crate) vcpus: VcpuThreads,
    pub nets: Vec<NetDevice>,
    pub(crate) serial: Arc<Mutex<SerialDevice>>,
    pub machine: &'static MachineType,
    /// Why this VM cannot be snapshotted or migrated.
    blockers: Mutex<Vec<String>>,
    state: Mutex<RunState>,
    vm_events: Mutex<Sender<VmEvent>>,
    pub(crate) api_events: Events,
    pub(crate) vm: Vm,
    pub(crate) ram: GuestRam,
    /// Serializes whole-VM operations (snapshot, migration, quit) with each
    /// other and with stop/cont.
    pub(crate) operations: Arc<Operations>,
    pub(crate) migration: migration_status::MigrationState,
    /// The CPUID the guest's vCPUs have (the table a boot gives them, or
    /// the saved one after a restore or an incoming migration): what a
    /// migration destination must carry.
    pub(crate) guest_cpuid: Vec<CpuidEntry>,
}

impl VmHandle {
    pub fn run_state(&self) -> RunState {
        *self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(crate) fn set_state(&self, new: RunState) -> RunState {
        let mut s = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        std::mem::replace(&mut *s, new)
    }

    /// Pauses every vCPU. Returns false when the VM was not running.
    pub fn pause(&self) -> bool {
        if self.run_state() != RunState::Running {
            return false;
        }
        self.vcpus.pause();
        for net in &self.nets {
            let dev = net
                .device
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Err(e) = dev.pause_datapath() {
                tracing::warn!("{}: the datapath did not pause: {e}", net.id);
            }
        }
        if self.set_state(RunState::Paused) == RunState::Running {
            self.api_events.emit("STOP", json!({}));
        }
        true
    }

    /// Resumes the vCPUs. Returns false when the VM was not paused.
    pub fn resume(&self) -> bool {
        if self.run_state() != RunState::Paused {
            return false;
        }
        self.set_state(RunState::Running);
        for net in &self.nets {
            net.device
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .resume_datapath();
        }
        self.vcpus.resume();
        self.api_events.emit("RESUME", json!({}));
        true
    }

    /// Takes the VM for `op`; refused while another operation holds it.
    pub(crate) fn begin(&self, op: Operation) -> Result<OperationGuard, Busy> {
        let mut current = self.operations.lock();
        if let Some(held) = *current {
            return Err(Busy(held));
        }
        *current = Some(op);
        Ok(OperationGuard {
            ops: Arc::clone(&self.operations),
        })
    }

    /// `stop`: pauses the VM unless an operation that owns the run state
    /// (a snapshot, a stop-and-copy, quit) holds it. Returns whether it was
    /// running.
    pub fn stop(&self) -> Result<bool, Busy> {
        let current = self.operations.lock();
        if let Some(held) = current.filter(|op| !op.allows_run_state_changes()) {
            return Err(Busy(held));
        }
        // Paused under the lock: no operation starts half-way through.
        Ok(self.pause())
    }

    /// `cont`: resumes a paused VM unless an operation holds it. A VM in
    /// postmigrate resumes only with `force`: the operator's word that the
    /// destination does not run the guest. Returns whether it resumed.
    pub fn cont(&self, force: bool) -> Result<bool, ContError> {
        let current = self.operations.lock();
        if let Some(held) = current.filter(|op| !op.allows_run_state_changes()) {
            return Err(Busy(held).into());
        }
        match self.run_state() {
            RunState::Shutdown => Err(ContError::ShutDown),
            RunState::PostMigrate if !force => Err(ContError::PostMigrate),
            RunState::PostMigrate => {
                tracing::warn!(
                    "cont with force on a VM in postmigrate: the operator takes responsibility that the destination does not run this guest; resuming it here"
                );
                self.set_state(RunState::Paused);
                Ok(self.resume())
            }
            _ => Ok(self.resume()),
        }
    }

    /// Waits up to `timeout` for the operation under way (if any) to end;
    /// says whether none runs now.
    pub fn wait_idle(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut current = self.operations.lock();
        while current.is_some() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            current = self
                .operations
                .ended
                .wait_timeout(current, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        true
    }

    /// `quit`: waits for a snapshot to be written, cancels a migration and
    /// waits for it to end, then ends the VM; nothing starts afterwards.
    pub fn quit(&self) {
        let mut current = self.operations.lock();
        let mut told = false;
        loop {
            match *current {
                None => break,
                Some(Operation::Quit) => return,
                Some(Operation::Migration | Operation::StopAndCopy) => {
                    self.migration.cancel();
                }
                Some(Operation::Snapshot) => {}
            }
            if let Some(op) = current.filter(|_| !told) {
                tracing::info!("quit: waiting until it ends: {}", op.doing());
                told = true;
            }
            current = self
                .operations
                .ended
                .wait_timeout(current, Duration::from_millis(200))
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        *current = Some(Operation::Quit);
        drop(current);
        self.request_quit();
    }

    /// Every reason the VM cannot be snapshotted or migrated now: those
    /// found at start-up and those its devices found since (a backend that
    /// came back with fewer features, one that cannot log dirty pages).
    pub fn blockers(&self) -> Vec<String> {
        let mut all = self
            .blockers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        for b in self.nets.iter().flat_map(NetDevice::blockers) {
            if !all.contains(&b) {
                all.push(b);
            }
        }
        all
    }

    /// A sender for the events the main loop of the VM waits for.
    pub(crate) fn event_sender(&self) -> Sender<VmEvent> {
        self.vm_events
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    pub fn request_quit(&self) {
        let tx = self
            .vm_events
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let _ = tx.send(VmEvent::Quit);
    }
}

/// The console sink for `spec`, behind its own writer thread (so that a
/// reader that stops draining never blocks a vCPU).
fn serial_output(spec: &SerialSpec) -> Result<(SerialOutput, Option<ConsoleHandle>), BuildError> {
    let (sink, limit): (Box<dyn std::io::Write + Send>, Option<u64>) = match spec {
        SerialSpec::Null => return Ok((Box::new(std::io::sink()), None)),
        SerialSpec::Stdio => (Box::new(std::io::stdout()), None),
        SerialSpec::File { path, max_size } => {
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|source| BuildError::SerialFile {
                    path: path.clone(),
                    source,
                })?;
            (Box::new(file), *max_size)
        }
    };
    let (writer, handle) =
        console::spawn(sink, console::DEFAULT_BUFFER, limit).map_err(|source| {
            BuildError::Host {
                what: "the console writer thread",
                source,
            }
        })?;
    Ok((Box::new(writer), Some(handle)))
}

/// Feeds stdin to the serial receive FIFO until EOF.
fn spawn_stdin_reader(serial: Arc<Mutex<SerialDevice>>) {
    let spawned = std::thread::Builder::new()
        .name("serial-stdin".into())
        .spawn(move || {
            crate::seccomp::install_or_exit(crate::seccomp::ThreadKind::SerialStdin);
            let mut stdin = std::io::stdin().lock();
            let mut buf = [0u8; 64];
            loop {
                let n = match stdin.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                let mut pending = &buf[..n];
                while !pending.is_empty() {
                    let taken = serial
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .enqueue_input(pending);
                    pending = &pending[taken..];
                    if !pending.is_empty() {
                        // The guest has not drained its FIFO yet.
                        std::thread::sleep(std::time::Duration::from_millis(5));
                    }
                }
            }
        });
    if let Err(e) = spawned {
        tracing::warn!("serial input disabled: cannot start the stdin thread: {e}");
    }
}

/// A VM that is built and ready to run.
/// Runs once the guest runs (an incoming migration confirms to its source).
pub type OnRunning = Box<dyn FnOnce(&VmHandle) + Send>;

pub struct Machine {
    handle: Arc<VmHandle>,
    vm_events: Receiver<VmEvent>,
    services: Vec<Box<dyn Service>>,
    on_running: Option<OnRunning>,
    /// Announce the guest's network devices once it runs (it arrived by
    /// migration or from a snapshot).
    announce: bool,
    timeout: Option<Duration>,
}

/// Everything of a VM that exists before its vCPU threads start.
pub(crate) struct BuiltVm {
    pub machine: &'static MachineType,
    pub vm: Vm,
    pub ram: GuestRam,
    pub buses: IoBuses,
    pub nets: Vec<NetDevice>,
    pub serial: Arc<Mutex<SerialDevice>>,
    pub vcpus: Vec<crate::vstate::vcpu::Vcpu>,
    pub event_tx: Sender<VmEvent>,
    pub event_rx: Receiver<VmEvent>,
}

/// A callback for a port device that ends the VM with `event`.
fn send_event(event_tx: &Sender<VmEvent>, event: fn() -> VmEvent) -> Box<dyn Fn() + Send> {
    let tx = Mutex::new(event_tx.clone());
    Box::new(move || {
        let _ = tx
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .send(event());
    })
}

/// COM1, the i8042 reset line, pvpanic and (with `debug_exit`) QEMU's
/// isa-debug-exit on the port bus. `state` restores the UART.
pub(crate) fn platform_devices(
    vm: &Vm,
    buses: &mut IoBuses,
    serial_spec: &SerialSpec,
    state: Option<&godwit_devices::serial::SerialDeviceState>,
    event_tx: &Sender<VmEvent>,
    debug_exit: bool,
) -> Result<Arc<Mutex<SerialDevice>>, BuildError> {
    let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(|source| BuildError::Host {
        what: "the serial interrupt eventfd",
        source,
    })?;
    vm.fd
        .register_irqfd(&serial_irq, COM1_IRQ)
        .map_err(|e| VmError::Kvm {
            what: "wiring the serial interrupt (irqfd)",
            source: e,
        })?;
    let (output, console) = serial_output(serial_spec)?;
    let device = match state {
        None => SerialDevice::new(serial_irq, output),
        Some(state) => {
            use godwit_migration::persist::Persist;
            SerialDevice::restore((serial_irq, output), state).map_err(|e| BuildError::Host {
                what: "the serial port from its saved state",
                source: std::io::Error::other(e.to_string()),
            })?
        }
    };
    let serial = Arc::new(Mutex::new(device.with_console(console)));
    buses
        .pio
        .insert(u64::from(COM1_BASE), u64::from(COM1_LEN), serial.clone())?;
    let i8042 = I8042::new(send_event(event_tx, || VmEvent::GuestReset));
    buses.pio.insert(
        u64::from(I8042_BASE),
        u64::from(I8042_LEN),
        Arc::new(Mutex::new(i8042)),
    )?;
    let pvpanic = PvPanic::new(send_event(event_tx, || VmEvent::GuestPanicked));
    buses.pio.insert(
        u64::from(PVPANIC_PORT),
        u64::from(PVPANIC_LEN),
        Arc::new(Mutex::new(pvpanic)),
    )?;
    if debug_exit {
        let tx = Mutex::new(event_tx.clone());
        let device = DebugExit::new(Box::new(move |value| {
            let _ = tx
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .send(VmEvent::DebugExit(value));
        }));
        buses.pio.insert(
            u64::from(DEBUG_EXIT_BASE),
            u64::from(DEBUG_EXIT_LEN),
            Arc::new(Mutex::new(device)),
        )?;
    }
    Ok(serial)
}

impl Machine {
    /// Builds the VM: every check that can fail happens here, before any
    /// vCPU runs.
    ///
    /// `early` ([`early::boot_vm`] of `config.memory` and `config.vcpus`)
    /// has created the VM with its memory, irqchip and PIT meanwhile.
    pub fn build(
        config: &VmConfig,
        early: early::Early<(Vm, GuestRam, u8)>,
    ) -> Result<Self, BuildError> {
        let started = Instant::now();
        let machine = machine_types::resolve(&config.machine)?;
        // Spec and feature-name errors need no VM: report them first.
        for (index, spec) in config.nets.iter().enumerate() {
            let id = spec.id.clone().unwrap_or_else(|| format!("net{index}"));
            crate::abi::strict::required_features(&id, machine, &spec.features)
                .map_err(|e| NetSetupError::from(crate::abi::strict::NetAbiError::from(e)))?;
        }
        let (vm, ram, num_vcpus) = early.join()?;
        let (buses, nets, blockers, serial, vcpus, event_tx, event_rx) = {
            let vm = &vm;
            let mut buses = IoBuses::default();
            // Every peer is probed and checked before the guest exists.
            let nets = crate::devices::net::build_all(
                &config.nets,
                machine,
                &ram.memory,
                &vm.fd,
                &mut buses.mmio,
            )?;
            let mut cmdline = config.cmdline.clone();
            for net in &nets {
                cmdline.push(' ');
                cmdline.push_str(&net.cmdline_fragment());
            }
            let blockers: Vec<String> = nets
                .iter()
                .filter_map(|n| n.decision.blocker.clone())
                .collect();

            let boot_entry = boot::load(
                &ram.memory,
                &BootConfig {
                    kernel: &config.kernel,
                    initrd: config.initrd.as_deref(),
                    cmdline: &cmdline,
                    memory_size: config.memory,
                    acpi_rsdp: Some(boot::acpi::ACPI_START),
                },
            )?;
            boot::mptable::setup(&ram.memory, num_vcpus)?;
            let virtio: Vec<boot::acpi::VirtioMmioDevice> = nets
                .iter()
                .map(|n| boot::acpi::VirtioMmioDevice {
                    base: n.mmio_base,
                    irq: n.irq,
                })
                .collect();
            boot::acpi::setup(&ram.memory, num_vcpus, &virtio)?;

            let (event_tx, event_rx) = mpsc::channel();
            let serial = platform_devices(
                vm,
                &mut buses,
                &config.serial,
                None,
                &event_tx,
                config.debug_exit,
            )?;

            let vcpus = vm.create_vcpus(num_vcpus)?;
            boot::regs::setup_boot_cpu(&vcpus[0].fd, &ram.memory, &boot_entry)?;
            (buses, nets, blockers, serial, vcpus, event_tx, event_rx)
        };
        let built = BuiltVm {
            machine,
            vm,
            ram,
            buses,
            nets,
            serial,
            vcpus,
            event_tx,
            event_rx,
        };
        let m = Self::assemble(config, built, blockers)?;
        tracing::debug!(
            elapsed_us = started.elapsed().as_micros() as u64,
            "VM built"
        );
        Ok(m)
    }

    /// Starts the (parked) vCPU threads, the API and the console input.
    pub(crate) fn assemble(
        config: &VmConfig,
        built: BuiltVm,
        blockers: Vec<String>,
    ) -> Result<Self, BuildError> {
        register_kick_signal().map_err(|e| BuildError::Host {
            what: "the vCPU kick signal handler",
            source: std::io::Error::from_raw_os_error(e.errno()),
        })?;
        // Read before the vCPU threads own the vCPUs; KVM keeps it as set.
        let guest_cpuid = match built.vcpus.first() {
            Some(first) => vcpu_cpuid(&first.fd).map_err(BuildError::Cpuid)?,
            None => Vec::new(),
        };
        // vCPU threads start parked so that the API can come up first.
        let threads = VcpuThreads::start(
            built.vcpus,
            Arc::new(built.buses),
            built.event_tx.clone(),
            true,
        )
        .map_err(|source| BuildError::Host {
            what: "vCPU threads",
            source,
        })?;
        let api_events = Events::default();
        let handle = Arc::new(VmHandle {
            vcpus: threads,
            nets: built.nets,
            serial: built.serial.clone(),
            machine: built.machine,
            blockers: Mutex::new(blockers),
            state: Mutex::new(RunState::Paused),
            vm_events: Mutex::new(built.event_tx),
            api_events,
            vm: built.vm,
            ram: built.ram,
            operations: Arc::default(),
            migration: migration_status::MigrationState::default(),
            guest_cpuid,
        });
        if matches!(config.serial, SerialSpec::Stdio) {
            spawn_stdin_reader(built.serial);
        }
        crate::signals::set_target(handle.event_sender());
        Ok(Machine {
            handle,
            vm_events: built.event_rx,
            services: Vec::new(),
            on_running: None,
            announce: false,
            timeout: config.timeout,
        })
    }

    /// What management commands act on.
    pub fn handle(&self) -> Arc<VmHandle> {
        Arc::clone(&self.handle)
    }

    /// Keeps `service` (the API server) running with this VM; it is shut
    /// down when [`Machine::run`] ends, after the `SHUTDOWN` event.
    pub fn attach_service(&mut self, service: Box<dyn Service>) {
        self.services.push(service);
    }

    /// Sets what runs right after the guest is resumed by [`Machine::run`].
    pub fn on_running(&mut self, f: OnRunning) {
        self.on_running = Some(f);
    }

    /// Has [`Machine::run`] announce the guest on every network, right after
    /// [`Machine::on_running`] and then in rounds (see [`AnnounceRounds`]).
    pub fn announce_when_running(&mut self) {
        self.announce = true;
    }

    /// Waits for the event that ends the VM, running announcement rounds as
    /// they fall due; Err(Some(limit)) when `--timeout` passed first,
    /// Err(None) when every event sender is gone.
    fn wait_for_end(
        &self,
        mut announcing: Option<AnnounceRounds>,
    ) -> Result<VmEvent, Option<Duration>> {
        let deadline = self.timeout.map(|limit| (Instant::now() + limit, limit));
        loop {
            let wake = [
                announcing.as_ref().and_then(AnnounceRounds::next_due),
                deadline.map(|(at, _)| at),
            ]
            .into_iter()
            .flatten()
            .min();
            let received = match wake {
                None => self
                    .vm_events
                    .recv()
                    .map_err(|_| mpsc::RecvTimeoutError::Disconnected),
                Some(at) => self
                    .vm_events
                    .recv_timeout(at.saturating_duration_since(Instant::now())),
            };
            match received {
                Ok(event) => return Ok(event),
                Err(mpsc::RecvTimeoutError::Disconnected) => return Err(None),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
            }
            match self.handle.run_state() {
                // Handed over to another host, or ending: no more rounds.
                RunState::PostMigrate | RunState::Shutdown => announcing = None,
                state => {
                    if let Some(rounds) = announcing.as_mut() {
                        let runs = state == RunState::Running && !self.handle.vcpus.is_paused();
                        rounds.poll(&self.handle.nets, runs);
                    }
                }
            }
            if let Some((at, limit)) = deadline {
                if Instant::now() >= at {
                    return Err(Some(limit));
                }
            }
        }
    }

    /// Lets a snapshot or migration under way end (a migration is
    /// cancelled) so that it removes its files, waiting at most
    /// [`OPERATION_END_AT_SIGNAL`].
    fn finish_operation(&self) {
        self.handle.migration.cancel();
        if !self.handle.wait_idle(OPERATION_END_AT_SIGNAL) {
            tracing::warn!("an operation still runs at exit; its files are removed under it");
        }
    }

    /// Runs the guest until it powers off, fails, or is told to quit.
    pub fn run(mut self) -> VmOutcome {
        self.handle.set_state(RunState::Running);
        self.handle.vcpus.resume();
        tracing::info!("vCPUs released");
        for net in &self.handle.nets {
            net.device
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .resume_datapath();
        }
        if let Some(f) = self.on_running.take() {
            f(&self.handle);
        }
        let announcing = self
            .announce
            .then(|| AnnounceRounds::start(&self.handle.nets));
        crate::seccomp::install_or_exit(crate::seccomp::ThreadKind::MainLoop);
        let event = self.wait_for_end(announcing);
        let outcome = match event {
            Ok(VmEvent::GuestReset) => VmOutcome::GuestPoweroff,
            Ok(VmEvent::Quit) | Err(None) => match crate::signals::received() {
                Some(signal) => VmOutcome::Signal(signal),
                None => VmOutcome::Quit,
            },
            Ok(VmEvent::VcpuFailed(e)) => VmOutcome::GuestFailed(e),
            Ok(VmEvent::Migrated) => VmOutcome::Migrated,
            Ok(VmEvent::DebugExit(value)) => VmOutcome::DebugExit(value),
            Ok(VmEvent::GuestPanicked) => VmOutcome::GuestPanicked,
            Err(Some(limit)) => VmOutcome::TimedOut(limit),
        };
        if matches!(outcome, VmOutcome::Signal(_)) {
            self.finish_operation();
        }
        self.handle.set_state(RunState::Shutdown);
        self.handle.vcpus.exit();
        self.handle
            .serial
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .drain_output(CONSOLE_DRAIN_AT_EXIT);
        let (guest, reason) = match &outcome {
            VmOutcome::GuestPoweroff => (true, "guest-reset"),
            VmOutcome::Quit => (false, "host-qmp-quit"),
            VmOutcome::GuestFailed(_) => (true, "guest-panic"),
            VmOutcome::Migrated => (false, "migrated"),
            VmOutcome::DebugExit(_) => (true, "guest-shutdown"),
            VmOutcome::GuestPanicked => (true, "guest-panic"),
            VmOutcome::TimedOut(_) => (false, "host-timeout"),
            VmOutcome::Signal(_) => (false, "host-signal"),
        };
        if matches!(outcome, VmOutcome::GuestPanicked) {
            // QEMU's event for a pvpanic report; the VM is then shut down.
            self.handle
                .api_events
                .emit("GUEST_PANICKED", json!({"action": "poweroff"}));
        }
        self.handle
            .api_events
            .emit("SHUTDOWN", json!({"guest": guest, "reason": reason}));
        if !self.services.is_empty() {
            // Let clients read the SHUTDOWN event before the socket closes.
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        for service in &mut self.services {
            service.shutdown();
        }
        outcome
    }
}
