//! Live migration between two hosts.
//!
//! The source first sends a `Hello` describing the VM (machine type, memory,
//! vCPUs and their CPUID, KVM needs, every device's peer kind and features
//! offered and acked); the destination probes its own peers and answers with
//! every reason to refuse, and the source checks what the destination
//! reports too. Any mismatch ends the migration before a single page is sent:
//! the guest on the source never paused.
//!
//! Then pre-copy: all non-zero pages, then rounds of the pages dirtied since
//! (KVM's dirty log and godwit's own writes to guest memory) until what
//! remains fits the downtime limit. The source then pauses vCPUs and device
//! datapaths, sends the last pages and the device and vCPU state (the
//! snapshot container), and waits for the destination to say the guest runs
//! there. Only then does the source end; any failure before that resumes the
//! guest on the source with nothing lost.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES;
use serde::Serialize;
use serde_json::json;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use godwit_migration::cpu_compat::{check_cpuid as cpuid_incompatibilities, CpuidEntry};
use godwit_migration::format::{Container, FORMAT_VERSION};
use godwit_migration::protocol::{
    self, decode_runs, encode_runs, expect, read_message, write_json, write_message, DeviceOffer,
    DevicePeer, Hello, HelloReply, Kind, PageRun, ProtocolError, Resumed, RoundEnd, PAGE_SIZE,
};

use crate::abi::machine_types;
use crate::config::VmConfig;
use crate::devices::net::NetDevice;
use crate::machine::{Machine, StartError, VmHandle};
use crate::persist::snapshot::{self, capture_state, read_saved, Quiesced, KNOWN_SECTIONS};
use crate::vstate::events::VmEvent;
use crate::vstate::memory::{self, ram_ranges, GuestRam};
use crate::vstate::state::vcpu::host_cpuid;
use crate::vstate::state::KvmCap;
use crate::vstate::vm::{self, Vm};

/// Pages per `Pages` message (1 MiB of data).
const BATCH_PAGES: usize = 256;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long either side waits for the other's next message.
const PEER_TIMEOUT: Duration = Duration::from_secs(60);
const KVM_CAPS_CHECKED: [KvmCap; 10] = [
    KvmCap::Irqchip,
    KvmCap::Pit2,
    KvmCap::PitState2,
    KvmCap::AdjustClock,
    KvmCap::ExtCpuid,
    KvmCap::MpState,
    KvmCap::VcpuEvents,
    KvmCap::Debugregs,
    KvmCap::Xsave,
    KvmCap::Xcrs,
];

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("invalid migration URI '{0}': use tcp:HOST:PORT or unix:PATH")]
    Uri(String),
    #[error("cannot connect to {uri}: {source}; is `godwit run --incoming {uri}` running there?")]
    Connect { uri: String, source: std::io::Error },
    #[error("cannot listen on {uri}: {source}")]
    Listen { uri: String, source: std::io::Error },
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error("the destination refused the VM:\n  - {}", .0.join("\n  - "))]
    Refused(Vec<String>),
    #[error("the destination cannot run this VM:\n  - {}", .0.join("\n  - "))]
    DestinationLacks(Vec<String>),
    #[error("the VM cannot migrate: {}", .0.join("; "))]
    Blocked(Vec<String>),
    #[error("a migration is already running")]
    Busy,
    #[error("the migration was cancelled")]
    Cancelled,
    #[error("the guest dirties memory faster than the link carries it: after {rounds} rounds {remaining_mib} MiB still remained ({dirty_mib_s:.1} MiB/s dirtied, {throughput_mib_s:.1} MiB/s sent), which would stop the guest for about {expected_ms} ms against a limit of {limit_ms} ms; raise downtime-limit or max-bandwidth with migrate-set-parameters, or lower the guest's load")]
    NotConverging {
        rounds: u32,
        remaining_mib: u64,
        dirty_mib_s: f64,
        throughput_mib_s: f64,
        expected_ms: u64,
        limit_ms: u64,
    },
    #[error("{0}")]
    Local(String),
}

/// `migrate-set-parameters`.
#[derive(Clone, Debug, Serialize)]
pub struct MigrationParams {
    /// The longest the guest may stay stopped, in ms.
    #[serde(rename = "downtime-limit")]
    pub downtime_limit_ms: u64,
    /// Bytes per second; 0 means no limit.
    #[serde(rename = "max-bandwidth")]
    pub max_bandwidth: u64,
    /// Pre-copy rounds before giving up on convergence.
    #[serde(rename = "max-rounds")]
    pub max_rounds: u32,
}

impl Default for MigrationParams {
    fn default() -> Self {
        MigrationParams {
            downtime_limit_ms: 300,
            max_bandwidth: 0,
            max_rounds: 30,
        }
    }
}

/// `query-migrate`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct MigrationInfo {
    pub status: &'static str,
    pub rounds: u32,
    #[serde(rename = "total-bytes")]
    pub total_bytes: u64,
    #[serde(rename = "transferred-bytes")]
    pub transferred_bytes: u64,
    #[serde(rename = "remaining-bytes")]
    pub remaining_bytes: u64,
    #[serde(rename = "dirty-pages-rate")]
    pub dirty_pages_rate: u64,
    #[serde(rename = "throughput-mbps")]
    pub throughput_mbps: f64,
    #[serde(rename = "expected-downtime-ms")]
    pub expected_downtime_ms: u64,
    #[serde(rename = "downtime-ms", skip_serializing_if = "Option::is_none")]
    pub downtime_ms: Option<f64>,
    #[serde(rename = "total-time-ms")]
    pub total_time_ms: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The migration side of a VM.
pub struct MigrationState {
    pub params: Mutex<MigrationParams>,
    info: Mutex<MigrationInfo>,
    cancel: AtomicBool,
    running: AtomicBool,
    conn: Mutex<Option<Conn>>,
}

impl Default for MigrationState {
    fn default() -> Self {
        MigrationState {
            params: Mutex::new(MigrationParams::default()),
            info: Mutex::new(MigrationInfo {
                status: "none",
                ..Default::default()
            }),
            cancel: AtomicBool::new(false),
            running: AtomicBool::new(false),
            conn: Mutex::new(None),
        }
    }
}

impl MigrationState {
    pub fn info(&self) -> MigrationInfo {
        self.info
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn update(&self, f: impl FnOnce(&mut MigrationInfo)) {
        f(&mut self.info.lock().unwrap_or_else(PoisonError::into_inner));
    }

    /// `migrate_cancel`: stops a running migration at its next step, and
    /// breaks off a transfer in progress.
    pub fn cancel(&self) -> bool {
        if !self.running.load(Ordering::SeqCst) {
            return false;
        }
        self.cancel.store(true, Ordering::SeqCst);
        if let Some(c) = self
            .conn
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
        {
            c.shutdown();
        }
        true
    }
}

/// A migration stream over TCP or a Unix socket.
pub enum Conn {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Conn {
    fn try_clone(&self) -> std::io::Result<Conn> {
        Ok(match self {
            Conn::Tcp(s) => Conn::Tcp(s.try_clone()?),
            Conn::Unix(s) => Conn::Unix(s.try_clone()?),
        })
    }
    fn shutdown(&self) {
        let _ = match self {
            Conn::Tcp(s) => s.shutdown(std::net::Shutdown::Both),
            Conn::Unix(s) => s.shutdown(std::net::Shutdown::Both),
        };
    }
    fn set_timeout(&self, t: Option<Duration>) {
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

enum Uri {
    Tcp(String),
    Unix(PathBuf),
}

fn parse_uri(uri: &str) -> Result<Uri, MigrateError> {
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

fn connect(uri: &str) -> Result<Conn, MigrateError> {
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

fn present_caps(vm: &Vm) -> Vec<String> {
    KVM_CAPS_CHECKED
        .iter()
        .filter(|c| vm.fd.check_extension(c.cap()))
        .map(|c| c.name().to_string())
        .collect()
}

fn device_offer(net: &NetDevice) -> DeviceOffer {
    let dev = net.device.lock().unwrap_or_else(PoisonError::into_inner);
    DeviceOffer {
        id: net.id.clone(),
        kind: "virtio-net".into(),
        peer_kind: net.peer.kind.to_string(),
        offered: dev.offered_features(),
        acked: dev.acked_features(),
        queue_sizes: godwit_devices::virtio::VirtioDevice::queue_max_sizes(&*dev).to_vec(),
        interface: dev.interface(),
    }
}

fn hello_of(handle: &VmHandle) -> Result<Hello, MigrateError> {
    let vcpus = handle.vcpus.count() as u8;
    let cpuid =
        host_cpuid(&handle.vm.kvm, vcpus).map_err(|e| MigrateError::Local(e.to_string()))?;
    Ok(Hello {
        godwit_version: env!("CARGO_PKG_VERSION").to_string(),
        format_version: FORMAT_VERSION,
        machine_type: handle.machine.name.to_string(),
        memory_size: handle.ram.size,
        vcpus,
        memory_layout: ram_ranges(handle.ram.size)
            .iter()
            .map(|r| (r.guest_addr, r.size))
            .collect(),
        devices: handle.nets.iter().map(device_offer).collect(),
        cpuid,
        kvm_caps: present_caps(&handle.vm),
    })
}

/// What the source checks of the destination's reply.
fn check_destination(hello: &Hello, reply: &HelloReply) -> Vec<String> {
    let mut problems = Vec::new();
    if !reply.machine_types.contains(&hello.machine_type) {
        problems.push(format!(
            "the destination's godwit {} does not know machine type {} (it knows {})",
            reply.godwit_version,
            hello.machine_type,
            reply.machine_types.join(", ")
        ));
    }
    for dev in &hello.devices {
        match reply.devices.iter().find(|d| d.id == dev.id) {
            None => problems.push(format!("{}: the destination has no peer for it", dev.id)),
            Some(peer) => {
                let missing = dev.offered & !peer.supported;
                if missing != 0 {
                    problems.push(format!(
                        "{}: the destination's peer ({}) lacks {} that the guest was offered",
                        dev.id,
                        peer.peer,
                        godwit_devices::virtio::net::features::names(missing)
                    ));
                }
            }
        }
    }
    for inc in cpuid_incompatibilities(&hello.cpuid, &reply.host_cpuid) {
        problems.push(format!("CPUID: {inc}"));
    }
    problems
}

/// Pages dirtied since the last call: KVM's log and godwit's own writes.
fn take_dirty(handle: &VmHandle, backend: Option<&BackendLog>) -> Result<Vec<u64>, MigrateError> {
    let mut pages = Vec::new();
    if let Some(log) = backend {
        log.take(&mut pages);
        pages.retain(|gpa| handle.ram.memory.address_in_range(GuestAddress(*gpa)));
    }
    for (slot, region) in handle.ram.memory.iter().enumerate() {
        let kvm = handle
            .vm
            .fd
            .get_dirty_log(slot as u32, region.len() as usize)
            .map_err(|e| MigrateError::Local(format!("reading KVM's dirty log: {e}")))?;
        let own = std::ops::Deref::deref(region).bitmap().get_and_reset();
        let base = region.start_addr().0;
        for (word_index, word) in kvm.iter().enumerate() {
            let mut bits = word | own.get(word_index).copied().unwrap_or(0);
            while bits != 0 {
                let bit = bits.trailing_zeros() as u64;
                bits &= bits - 1;
                let page = word_index as u64 * 64 + bit;
                if page * PAGE_SIZE < region.len() {
                    pages.push(base + page * PAGE_SIZE);
                }
            }
        }
    }
    Ok(pages)
}

/// The dirty log vhost-user backends write into: one bit per 4 KiB page of
/// guest physical address space, in a memfd shared with each backend.
pub(crate) struct BackendLog {
    file: std::fs::File,
    map: *mut u64,
    words: usize,
}

// SAFETY: the mapping is owned by this struct and only accessed through
// atomic operations on whole words.
unsafe impl Send for BackendLog {}
// SAFETY: as above; concurrent access is atomic.
unsafe impl Sync for BackendLog {}

impl BackendLog {
    fn new(memory_end: u64) -> Result<Self, MigrateError> {
        let pages = memory_end.div_ceil(PAGE_SIZE);
        let words = pages.div_ceil(64) as usize;
        let bytes = words * 8;
        let err = |what: &str, e: std::io::Error| {
            MigrateError::Local(format!("the vhost-user dirty log: {what}: {e}"))
        };
        let file = godwit_migration::memory_file::create_memfd(bytes as u64)
            .map_err(|e| err("memfd", e))?;
        use std::os::fd::AsRawFd;
        // SAFETY: maps `bytes` of a memfd of that size, shared; checked below.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if map == libc::MAP_FAILED {
            return Err(err("mmap", std::io::Error::last_os_error()));
        }
        Ok(BackendLog {
            file,
            map: map.cast(),
            words,
        })
    }

    /// Takes and clears the pages the backends marked.
    fn take(&self, pages: &mut Vec<u64>) {
        for i in 0..self.words {
            // SAFETY: `i` is within the mapping; backends set bits with
            // atomic ORs, so the word is swapped atomically.
            let word = unsafe { &*(self.map.add(i) as *const std::sync::atomic::AtomicU64) };
            let mut bits = word.swap(0, Ordering::SeqCst);
            while bits != 0 {
                let bit = bits.trailing_zeros() as u64;
                bits &= bits - 1;
                pages.push((i as u64 * 64 + bit) * PAGE_SIZE);
            }
        }
    }
}

impl Drop for BackendLog {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`.
        unsafe { libc::munmap(self.map.cast(), self.words * 8) };
    }
}

fn vhost_user_devices(handle: &VmHandle) -> Vec<&NetDevice> {
    handle
        .nets
        .iter()
        .filter(|n| {
            n.device
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .as_vhost_user()
                .is_some()
        })
        .collect()
}

/// Hands the log to every vhost-user backend (or takes it back).
fn set_backend_logging(handle: &VmHandle, log: Option<&BackendLog>) -> Result<(), MigrateError> {
    for net in vhost_user_devices(handle) {
        let dev = net.device.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(vu) = dev.as_vhost_user() else {
            continue;
        };
        let res = match log {
            Some(l) => vu.set_dirty_log(&l.file, (l.words * 8) as u64),
            None => vu.clear_dirty_log(),
        };
        res.map_err(|e| MigrateError::Local(format!("{}: {e}", net.id)))?;
    }
    Ok(())
}

fn set_dirty_logging(handle: &VmHandle, on: bool) -> Result<(), MigrateError> {
    let flags = if on { KVM_MEM_LOG_DIRTY_PAGES } else { 0 };
    handle
        .vm
        .map_memory(&handle.ram.memory, flags)
        .map_err(|e| {
            MigrateError::Local(format!(
                "turning dirty logging {}: {e}",
                if on { "on" } else { "off" }
            ))
        })?;
    if on {
        for region in handle.ram.memory.iter() {
            std::ops::Deref::deref(region).bitmap().reset();
        }
    }
    Ok(())
}

struct Sender<'a> {
    conn: &'a mut Conn,
    state: &'a MigrationState,
    bytes: u64,
    started: Instant,
    max_bandwidth: u64,
}

impl Sender<'_> {
    fn check_cancel(&self) -> Result<(), MigrateError> {
        if self.state.cancel.load(Ordering::SeqCst) {
            return Err(MigrateError::Cancelled);
        }
        Ok(())
    }

    fn send(&mut self, kind: Kind, payload: &[u8]) -> Result<(), MigrateError> {
        self.check_cancel()?;
        write_message(self.conn, kind, payload).map_err(|e| {
            if self.state.cancel.load(Ordering::SeqCst) {
                MigrateError::Cancelled
            } else {
                e.into()
            }
        })?;
        self.bytes += (payload.len() + protocol::HEADER_LEN) as u64;
        let (bytes, rate) = (
            self.bytes,
            self.bytes as f64 / self.started.elapsed().as_secs_f64().max(1e-6),
        );
        self.state.update(|i| {
            i.transferred_bytes = bytes;
            i.throughput_mbps = rate * 8.0 / 1e6;
        });
        if self.max_bandwidth > 0 {
            let due = Duration::from_secs_f64(self.bytes as f64 / self.max_bandwidth as f64);
            if let Some(wait) = due.checked_sub(self.started.elapsed()) {
                std::thread::sleep(wait);
            }
        }
        Ok(())
    }

    /// Sends `pages` (guest addresses): non-zero pages with their data;
    /// zero pages as runs without data unless `skip_zero`. Pages are checked
    /// for zero in place and copied once, into the message.
    fn send_pages(
        &mut self,
        handle: &VmHandle,
        pages: &[u64],
        skip_zero: bool,
    ) -> Result<(), MigrateError> {
        let mut runs: Vec<PageRun> = Vec::new();
        let mut data: Vec<u8> = Vec::with_capacity(BATCH_PAGES * PAGE_SIZE as usize);
        let mut zero_runs: Vec<PageRun> = Vec::new();
        for &gpa in pages {
            let slice = handle
                .ram
                .memory
                .get_slice(GuestAddress(gpa), PAGE_SIZE as usize)
                .map_err(|e| MigrateError::Local(format!("reading guest page {gpa:#x}: {e}")))?;
            let zero = {
                let guard = slice.ptr_guard();
                let words = guard.as_ptr() as *const u64;
                // SAFETY: the slice covers PAGE_SIZE bytes of mapped guest
                // memory (page aligned); volatile reads, since the guest may
                // write concurrently (it is then dirty and sent again).
                (0..PAGE_SIZE as usize / 8)
                    .all(|i| unsafe { std::ptr::read_volatile(words.add(i)) } == 0)
            };
            if zero && skip_zero {
                continue;
            }
            let list = if zero { &mut zero_runs } else { &mut runs };
            match list.last_mut() {
                Some(r) if r.gpa + u64::from(r.pages) * PAGE_SIZE == gpa => r.pages += 1,
                _ => list.push(PageRun { gpa, pages: 1 }),
            }
            if !zero {
                let at = data.len();
                data.resize(at + PAGE_SIZE as usize, 0);
                slice.copy_to(&mut data[at..]);
                if data.len() >= BATCH_PAGES * PAGE_SIZE as usize {
                    self.send(Kind::Pages, &encode_runs(&runs, &data))?;
                    runs.clear();
                    data.clear();
                }
            }
        }
        if !runs.is_empty() {
            self.send(Kind::Pages, &encode_runs(&runs, &data))?;
        }
        for chunk in zero_runs.chunks(4096) {
            self.send(Kind::ZeroPages, &encode_runs(chunk, &[]))?;
        }
        Ok(())
    }
}

/// The pages that may hold data. Guest RAM is a shared memfd whose pages
/// the guest never touched are holes: SEEK_DATA skips them without faulting
/// them in. A privately mapped restore keeps its changes outside the file,
/// so there every page is a candidate.
fn pages_with_data(handle: &VmHandle) -> Vec<u64> {
    let mut pages = Vec::new();
    for region in handle.ram.memory.iter() {
        let base = region.start_addr().0;
        let len = region.len();
        let mapping = std::ops::Deref::deref(region);
        let extents = match mapping.file_offset() {
            Some(fo) if mapping.flags() & libc::MAP_SHARED != 0 => {
                godwit_migration::memory_file::data_extents(fo.file(), fo.start(), fo.start() + len)
                    .ok()
                    .map(|ex| (fo.start(), ex))
            }
            _ => None,
        };
        match extents {
            Some((start, ex)) => {
                for (from, to) in ex {
                    let first = (from - start) / PAGE_SIZE;
                    let last = (to - start).div_ceil(PAGE_SIZE).min(len / PAGE_SIZE);
                    pages.extend((first..last).map(|p| base + p * PAGE_SIZE));
                }
            }
            None => pages.extend((0..len / PAGE_SIZE).map(|p| base + p * PAGE_SIZE)),
        }
    }
    pages
}

fn emit_status(handle: &VmHandle, status: &'static str) {
    handle.migration.update(|i| i.status = status);
    handle
        .api_events
        .emit("MIGRATION", json!({ "status": status }));
    tracing::info!("migration: {status}");
}

/// Starts a migration on its own thread; refuses at once when blocked.
pub fn start(
    handle: &Arc<VmHandle>,
    uri: &str,
    vm_events: mpsc::Sender<VmEvent>,
) -> Result<(), MigrateError> {
    let blockers = handle.blockers();
    if !blockers.is_empty() {
        return Err(MigrateError::Blocked(blockers));
    }
    parse_uri(uri)?;
    if handle.migration.running.swap(true, Ordering::SeqCst) {
        return Err(MigrateError::Busy);
    }
    handle.migration.cancel.store(false, Ordering::SeqCst);
    handle.migration.update(|i| {
        *i = MigrationInfo {
            status: "setup",
            total_bytes: handle.ram.size,
            ..Default::default()
        }
    });
    let (h, uri) = (handle.clone(), uri.to_string());
    let spawned = std::thread::Builder::new()
        .name("migration".into())
        .spawn(move || {
            let started = Instant::now();
            emit_status(&h, "setup");
            let result = run_source(&h, &uri, started);
            *h.migration
                .conn
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = None;
            h.migration
                .update(|i| i.total_time_ms = started.elapsed().as_secs_f64() * 1e3);
            match result {
                Ok(()) => {
                    emit_status(&h, "completed");
                    let _ = vm_events.send(VmEvent::Migrated);
                }
                Err(e) => {
                    let cancelled = matches!(e, MigrateError::Cancelled);
                    tracing::warn!("migration to {uri} failed: {e}; the guest keeps running here");
                    let _ = set_dirty_logging(&h, false);
                    h.migration.update(|i| i.error = Some(e.to_string()));
                    emit_status(&h, if cancelled { "cancelled" } else { "failed" });
                }
            }
            h.migration.running.store(false, Ordering::SeqCst);
        });
    if let Err(e) = spawned {
        handle.migration.running.store(false, Ordering::SeqCst);
        return Err(MigrateError::Local(format!(
            "cannot start the migration thread: {e}"
        )));
    }
    Ok(())
}

fn run_source(handle: &VmHandle, uri: &str, started: Instant) -> Result<(), MigrateError> {
    let _op = handle
        .operation
        .try_lock()
        .map_err(|_| MigrateError::Busy)?;
    let mut conn = connect(uri)?;
    conn.set_timeout(Some(PEER_TIMEOUT));
    *handle
        .migration
        .conn
        .lock()
        .unwrap_or_else(PoisonError::into_inner) = Some(
        conn.try_clone()
            .map_err(|e| MigrateError::Local(e.to_string()))?,
    );
    let hello = hello_of(handle)?;
    write_json(&mut conn, Kind::Hello, &hello)?;
    let reply: HelloReply = expect(&mut conn, Kind::HelloReply, "HelloReply")?.json()?;
    if !reply.accept {
        return Err(MigrateError::Refused(reply.reasons));
    }
    let problems = check_destination(&hello, &reply);
    if !problems.is_empty() {
        let _ = write_message(&mut conn, Kind::Abort, problems.join("; ").as_bytes());
        return Err(MigrateError::DestinationLacks(problems));
    }
    emit_status(handle, "active");
    let params = handle
        .migration
        .params
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    set_dirty_logging(handle, true)?;
    let backend_log = if vhost_user_devices(handle).is_empty() {
        None
    } else {
        let end = handle.ram.memory.last_addr().0 + 1;
        let log = BackendLog::new(end)?;
        set_backend_logging(handle, Some(&log))?;
        Some(log)
    };
    let result = precopy(handle, &mut conn, &params, backend_log.as_ref(), started);
    if backend_log.is_some() {
        if let Err(e) = set_backend_logging(handle, None) {
            tracing::warn!("migration: cannot stop a backend's dirty log: {e}");
        }
    }
    result
}

fn precopy(
    handle: &VmHandle,
    conn: &mut Conn,
    params: &MigrationParams,
    backend_log: Option<&BackendLog>,
    started: Instant,
) -> Result<(), MigrateError> {
    let mut sender = Sender {
        conn,
        state: &handle.migration,
        bytes: 0,
        started: Instant::now(),
        max_bandwidth: params.max_bandwidth,
    };
    // Round 0: everything that is not zero (the destination starts zeroed).
    let mut round_started = Instant::now();
    let pages = pages_with_data(handle);
    sender.send_pages(handle, &pages, true)?;
    let mut round = 0u32;
    let mut last_dirty_rate;
    loop {
        let elapsed = round_started.elapsed().as_secs_f64().max(1e-6);
        let dirty = take_dirty(handle, backend_log)?;
        round_started = Instant::now();
        let throughput = sender.bytes as f64 / sender.started.elapsed().as_secs_f64().max(1e-6);
        let remaining = dirty.len() as u64 * PAGE_SIZE;
        let expected_ms = (remaining as f64 / throughput.max(1.0) * 1e3) as u64;
        last_dirty_rate = dirty.len() as f64 / elapsed;
        write_json(
            sender.conn,
            Kind::RoundEnd,
            &RoundEnd {
                round,
                pages: dirty.len() as u64,
            },
        )?;
        handle.migration.update(|i| {
            i.rounds = round + 1;
            i.transferred_bytes = sender.bytes;
            i.remaining_bytes = remaining;
            i.throughput_mbps = throughput * 8.0 / 1e6;
            i.dirty_pages_rate = last_dirty_rate as u64;
            i.expected_downtime_ms = expected_ms;
            i.total_time_ms = started.elapsed().as_secs_f64() * 1e3;
        });
        tracing::info!(
            "migration: round {round}: {} MiB sent, {} dirty pages remain, {:.0} Mbit/s, expected downtime {expected_ms} ms",
            sender.bytes >> 20,
            dirty.len(),
            throughput * 8.0 / 1e6
        );
        if expected_ms <= params.downtime_limit_ms {
            // Stop-and-copy: what is dirty now plus what the guest dirties
            // before it stops.
            return finish(handle, &mut sender, dirty, backend_log, started);
        }
        round += 1;
        if round >= params.max_rounds {
            return Err(MigrateError::NotConverging {
                rounds: round,
                remaining_mib: remaining >> 20,
                dirty_mib_s: last_dirty_rate * PAGE_SIZE as f64 / (1 << 20) as f64,
                throughput_mib_s: throughput / (1 << 20) as f64,
                expected_ms,
                limit_ms: params.downtime_limit_ms,
            });
        }
        sender.send_pages(handle, &dirty, false)?;
    }
}

fn finish(
    handle: &VmHandle,
    sender: &mut Sender<'_>,
    mut dirty: Vec<u64>,
    backend_log: Option<&BackendLog>,
    started: Instant,
) -> Result<(), MigrateError> {
    let quiet = Quiesced::new(handle).map_err(|e| MigrateError::Local(e.to_string()))?;
    let downtime_start = Instant::now();
    // Pausing stopped the backends' rings (GET_VRING_BASE): their log is final.
    dirty.extend(take_dirty(handle, backend_log)?);
    dirty.sort_unstable();
    dirty.dedup();
    sender.send_pages(handle, &dirty, false)?;
    let state = capture_state(handle).map_err(|e| MigrateError::Local(e.to_string()))?;
    sender.send(Kind::State, &state.to_bytes())?;
    sender.send(Kind::Complete, &[])?;
    let resumed: Resumed = expect(sender.conn, Kind::Resumed, "Resumed")?.json()?;
    let downtime = downtime_start.elapsed().as_secs_f64() * 1e3;
    handle.migration.update(|i| {
        i.downtime_ms = Some(downtime);
        i.transferred_bytes = sender.bytes;
        i.remaining_bytes = 0;
        i.total_time_ms = started.elapsed().as_secs_f64() * 1e3;
    });
    tracing::info!(
        "migration: the guest runs on the destination (downtime {downtime:.1} ms, of which destination restore {:.1} ms)",
        resumed.restore_ms
    );
    // The guest now lives elsewhere: this side stays stopped until it exits.
    quiet.keep_paused();
    Ok(())
}

/// What a failed incoming migration reports.
#[derive(Debug, thiserror::Error)]
pub enum IncomingError {
    #[error("incoming migration: {0}")]
    Migrate(#[from] MigrateError),
    #[error("incoming migration refused:\n  - {}", .0.join("\n  - "))]
    Refused(Vec<String>),
    #[error("incoming migration: {0}")]
    Start(String),
}

fn accept(uri: &str) -> Result<Conn, MigrateError> {
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
            let _ = std::fs::remove_file(&path);
            let l = UnixListener::bind(&path).map_err(err)?;
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

/// `godwit run --incoming URI`: validates the source's VM against this
/// host, receives it, and returns it ready to run; `Machine::run` then
/// resumes it and confirms to the source.
pub fn incoming(config: &VmConfig, uri: &str) -> Result<Machine, StartError> {
    let mut conn = accept(uri).map_err(IncomingError::from)?;
    conn.set_timeout(Some(PEER_TIMEOUT));
    match receive(config, &mut conn) {
        Ok(machine) => Ok(machine),
        Err(e) => {
            let _ = write_message(&mut conn, Kind::Abort, e.to_string().as_bytes());
            Err(e)
        }
    }
}

fn receive(config: &VmConfig, conn: &mut Conn) -> Result<Machine, StartError> {
    let hello: Hello = expect(conn, Kind::Hello, "Hello")
        .and_then(|m| m.json())
        .map_err(|e| IncomingError::from(MigrateError::from(e)))?;
    let mut reasons = Vec::new();
    let machine = machine_types::resolve(&hello.machine_type)
        .map_err(|e| reasons.push(e.to_string()))
        .ok();
    if hello.format_version > FORMAT_VERSION {
        reasons.push(format!("the source writes state format {}; this godwit reads up to {FORMAT_VERSION}: upgrade godwit here", hello.format_version));
    }
    if let Err(e) = memory::check_size(hello.memory_size) {
        reasons.push(e.to_string());
    }
    let kvm = vm::open_kvm()?;
    if let Err(e) = vm::check_vcpus(&kvm, u32::from(hello.vcpus)) {
        reasons.push(e.to_string());
    }
    let host_cpuid: Vec<CpuidEntry> = host_cpuid(&kvm, hello.vcpus.max(1)).unwrap_or_default();
    for inc in cpuid_incompatibilities(&hello.cpuid, &host_cpuid) {
        reasons.push(format!("CPUID: {inc}"));
    }
    for cap in &hello.kvm_caps {
        if let Some(c) = KVM_CAPS_CHECKED.iter().find(|c| c.name() == cap) {
            if !kvm.check_extension(c.cap()) {
                reasons.push(format!(
                    "this host's KVM lacks {cap}, needed for {}",
                    c.needed_for()
                ));
            }
        }
    }
    // This host's peers, checked against what the guest was offered.
    let mut peers = Vec::new();
    let mut device_peers = Vec::new();
    if hello.devices.len() != config.nets.len() {
        reasons.push(format!(
            "the VM has {} network device(s) ({}) but this godwit was given {} --net: give one per device, in order",
            hello.devices.len(),
            hello.devices.iter().map(|d| d.id.as_str()).collect::<Vec<_>>().join(", "),
            config.nets.len()
        ));
    } else {
        for (dev, spec) in hello.devices.iter().zip(&config.nets) {
            if spec.peer.kind() != dev.peer_kind {
                reasons.push(format!(
                    "{}: the VM's device is on a {} peer but --net gives a {} peer",
                    dev.id,
                    dev.peer_kind,
                    spec.peer.kind()
                ));
                continue;
            }
            match snapshot::open_peer(&dev.id, spec, dev.interface.as_deref()) {
                Ok((opened, support)) => {
                    if let Err(e) =
                        snapshot::check_peer(&dev.id, dev.offered, &support, "on the source")
                    {
                        reasons.push(e.to_string());
                    }
                    device_peers.push(DevicePeer {
                        id: dev.id.clone(),
                        peer_kind: support.kind.to_string(),
                        peer: support.name.clone(),
                        supported: support.supported,
                    });
                    peers.push((opened, support));
                }
                Err(e) => reasons.push(e.to_string()),
            }
        }
    }
    let reply = HelloReply {
        accept: reasons.is_empty(),
        reasons: reasons.clone(),
        godwit_version: env!("CARGO_PKG_VERSION").to_string(),
        machine_types: machine_types::MACHINE_TYPES
            .iter()
            .map(|m| m.name.to_string())
            .collect(),
        devices: device_peers,
        host_cpuid,
    };
    let proto = |e: ProtocolError| StartError::from(IncomingError::from(MigrateError::from(e)));
    write_json(conn, Kind::HelloReply, &reply).map_err(proto)?;
    let Some(machine) = machine.filter(|_| reasons.is_empty()) else {
        return Err(IncomingError::Refused(reasons).into());
    };

    let ram = GuestRam::new(hello.memory_size)?;
    let vm = Vm::new(kvm, &ram.memory)?;
    let started = Instant::now();
    let mut received = 0u64;
    let state_bytes = loop {
        let m = read_message(conn).map_err(proto)?;
        match m.kind {
            Kind::Pages | Kind::ZeroPages => {
                let with_data = m.kind == Kind::Pages;
                let (runs, data) = decode_runs(m.kind, &m.payload, with_data).map_err(proto)?;
                let mut offset = 0usize;
                for run in runs {
                    let len = run.pages as usize * PAGE_SIZE as usize;
                    if !ram.memory.check_range(GuestAddress(run.gpa), len) {
                        return Err(proto(ProtocolError::Malformed {
                            kind: m.kind,
                            detail: format!(
                                "pages at {:#x}+{len:#x} lie outside guest memory",
                                run.gpa
                            ),
                        }));
                    }
                    let result = if with_data {
                        let r = ram
                            .memory
                            .write_slice(&data[offset..offset + len], GuestAddress(run.gpa));
                        offset += len;
                        r
                    } else {
                        ram.memory
                            .write_slice(&vec![0u8; len], GuestAddress(run.gpa))
                    };
                    result
                        .map_err(|e| IncomingError::Start(format!("writing guest memory: {e}")))?;
                    received += len as u64;
                }
            }
            Kind::RoundEnd => {
                let r: RoundEnd = m.json().map_err(proto)?;
                tracing::info!(
                    "incoming migration: round {} done, {} MiB received",
                    r.round,
                    received >> 20
                );
            }
            Kind::State => break m.payload,
            other => {
                return Err(proto(ProtocolError::Unexpected {
                    expected: "Pages, ZeroPages, RoundEnd or State",
                    got: other,
                }))
            }
        }
    };
    expect(conn, Kind::Complete, "Complete").map_err(proto)?;
    let restore_started = Instant::now();
    let container = Container::from_bytes(state_bytes, KNOWN_SECTIONS)
        .map_err(|e| IncomingError::Start(format!("the VM state from the source: {e}")))?;
    let saved = read_saved(&container, std::path::Path::new("<migration stream>"))?;
    // The state must be the VM the handshake described.
    if saved.machine.name != machine.name
        || saved.config.vcpus != hello.vcpus
        || saved.config.memory_size != hello.memory_size
        || saved.nets.len() != hello.devices.len()
        || saved
            .nets
            .iter()
            .zip(&hello.devices)
            .any(|(n, d)| n.offered != d.offered)
    {
        return Err(IncomingError::Start(
            "the VM state does not match the VM the source announced".into(),
        )
        .into());
    }
    let mut m = snapshot::machine_from_saved(config, &saved, vm, ram, peers)?;
    let restore_ms = restore_started.elapsed().as_secs_f64() * 1e3;
    tracing::info!(
        "incoming migration: {} MiB received in {:.0} ms, state restored in {restore_ms:.1} ms",
        received >> 20,
        started.elapsed().as_secs_f64() * 1e3
    );
    let mut confirm = conn
        .try_clone()
        .map_err(|e| IncomingError::Start(e.to_string()))?;
    m.on_running(Box::new(move |handle: &VmHandle| {
        // The guest runs here now: tell the source, then the network.
        if let Err(e) = write_json(&mut confirm, Kind::Resumed, &Resumed { restore_ms }) {
            tracing::warn!("could not confirm the migration to the source: {e}");
        }
        for net in &handle.nets {
            announce(net);
        }
    }));
    Ok(m)
}

/// Tells switches where the guest's MAC now lives: through the guest when
/// it acked GUEST_ANNOUNCE (it sends gratuitous ARPs), else a RARP frame.
pub fn announce(net: &NetDevice) {
    let mut dev = net.device.lock().unwrap_or_else(PoisonError::into_inner);
    if dev.announce() {
        tracing::info!("{}: asked the guest to announce itself", net.id);
        return;
    }
    let tap = dev.tap();
    if tap.get().is_none() {
        // A vhost-user backend sends its frames itself; announce() above
        // already asked it to (SEND_RARP) where it could.
        tracing::info!("{}: the backend announces the guest", net.id);
        return;
    }
    let mac = dev.mac();
    let mut frame = vec![0u8; 60];
    frame[0..6].copy_from_slice(&[0xff; 6]);
    frame[6..12].copy_from_slice(&mac);
    frame[12..14].copy_from_slice(&0x8035u16.to_be_bytes()); // RARP
    frame[14..16].copy_from_slice(&1u16.to_be_bytes()); // Ethernet
    frame[16..18].copy_from_slice(&0x0800u16.to_be_bytes()); // IPv4
    frame[18] = 6;
    frame[19] = 4;
    frame[20..22].copy_from_slice(&3u16.to_be_bytes()); // reverse request
    frame[22..28].copy_from_slice(&mac);
    frame[32..38].copy_from_slice(&mac);
    let mut buf = Vec::with_capacity(72);
    if tap.has_vnet_hdr() {
        buf.extend_from_slice(&[0u8; godwit_devices::net::tap::VNET_HDR_LEN]);
    }
    buf.extend_from_slice(&frame);
    match tap.write(&buf) {
        Ok(_) => tracing::info!(
            "{}: sent a RARP announcement for {}",
            net.id,
            crate::config::net_spec::format_mac(&mac)
        ),
        Err(e) => tracing::warn!("{}: cannot send the RARP announcement: {e}", net.id),
    }
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
