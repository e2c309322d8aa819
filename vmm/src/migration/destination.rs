//! The destination side: `godwit run --incoming`.

use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use godwit_migration::cpu_compat::{check_cpuid as cpuid_incompatibilities, CpuidEntry};
use godwit_migration::format::{Container, FORMAT_VERSION};
use godwit_migration::protocol::{
    decode_runs, expect, read_message_reusing, write_json, write_message, DevicePeer, Hello,
    HelloReply, Kind, Message, ProtocolError, Resumed, RoundEnd, PAGE_SIZE,
};

use super::status::IncomingTally;
use super::transport::Conn;
use super::{MigrateError, KVM_CAPS_CHECKED, PEER_TIMEOUT};
use crate::abi::machine_types;
use crate::config::VmConfig;
use std::os::fd::AsRawFd;

use crate::machine::early;
use crate::machine::{BuildError, Machine, VmHandle};
use crate::persist::snapshot::RestoreError;
use crate::persist::snapshot::{self, read_saved, KNOWN_SECTIONS};
use crate::vstate::memory::{self, ram_ranges, GuestRam};
use crate::vstate::state::vcpu::{host_cpuid, vcpu_cpuid};
use crate::vstate::vm::{self, Vm};

use crate::migration::multifd::{self, MainView};
use crate::migration::transport::{accept, ChannelListener};

/// What a failed incoming migration reports.
#[derive(Debug, thiserror::Error)]
pub enum IncomingError {
    #[error("incoming migration: {0}")]
    Migrate(#[from] MigrateError),
    #[error("incoming migration refused:\n  - {}", .0.join("\n  - "))]
    Refused(Vec<String>),
    #[error("incoming migration: cannot write the received pages into guest memory: {0}")]
    GuestMemory(#[source] vm_memory::GuestMemoryError),
    #[error("incoming migration: cannot zero guest memory at {gpa:#x}+{len:#x}: {source}")]
    ZeroPages {
        gpa: u64,
        len: u64,
        source: std::io::Error,
    },
    #[error("incoming migration: the VM state from the source is unreadable: {0}")]
    State(#[source] godwit_migration::format::FormatError),
    #[error("incoming migration: the VM state does not match the VM the source announced (machine type, vCPUs, memory or devices differ); the source does not follow the protocol")]
    StateMismatch,
    #[error(
        "incoming migration: cannot keep a handle on the stream to confirm to the source: {0}"
    )]
    ConfirmStream(#[source] std::io::Error),
    #[error("incoming migration: the source did not tell this host to run the guest ({0}); the guest was not started here, the source keeps it (paused in postmigrate if it had committed: resume it there with cont and force)")]
    NoGo(#[source] ProtocolError),
    #[error("incoming migration: multifd channel(s) {missing} of {of} did not connect within {waited_s} s{refused}; the guest was not started here and stays on the source: check that nothing between the hosts drops or delays connections to this address, or migrate without the multifd capability")]
    ChannelsMissing {
        missing: String,
        of: u16,
        waited_s: u64,
        refused: String,
    },
    #[error("{source} (on multifd channel {channel})")]
    Channel {
        channel: u16,
        #[source]
        source: Box<IncomingError>,
    },
    #[error("incoming migration: a multifd channel ended before round {round} was complete on it: the source does not follow the protocol; the guest stays on the source")]
    ChannelEndedEarly { round: u32 },
    #[error("incoming migration: another multifd stream failed")]
    ChannelFailed,
    #[error("incoming migration: a multifd receiver thread panicked")]
    ReceiverPanicked,
    #[error("incoming migration: {0}")]
    Restore(#[source] Box<RestoreError>),
    #[error("incoming migration: {0}")]
    Build(#[source] Box<BuildError>),
}

impl From<RestoreError> for IncomingError {
    fn from(e: RestoreError) -> Self {
        IncomingError::Restore(Box::new(e))
    }
}

impl<E: Into<BuildError>> From<E> for IncomingError {
    fn from(e: E) -> Self {
        IncomingError::Build(Box::new(e.into()))
    }
}

impl IncomingError {
    /// This host cannot carry the VM's ABI (strict's exit status).
    pub fn is_refusal(&self) -> bool {
        match self {
            IncomingError::Refused(_) => true,
            IncomingError::Restore(e) => e.is_peer_refusal(),
            IncomingError::Build(e) => e.is_strict_refusal(),
            _ => false,
        }
    }
}

/// Test hook: the main stream's read timeout in milliseconds, so that a
/// test can make a pre-copy round outlast it without waiting a minute.
const MAIN_TIMEOUT_HOOK: &str = "GODWIT_TEST_MAIN_STREAM_TIMEOUT_MS";

/// How long the destination waits for the next message on the main stream
/// (PEER_TIMEOUT, unless the test hook says otherwise).
pub(super) fn main_stream_timeout() -> Duration {
    std::env::var(MAIN_TIMEOUT_HOOK)
        .ok()
        .and_then(|ms| ms.parse().ok())
        .map_or(PEER_TIMEOUT, Duration::from_millis)
}

/// `godwit run --incoming URI`: validates the source's VM against this
/// host, receives it, tells the source it holds it (`Ready`), and once the
/// source commits (`Go`) returns it ready to run; `Machine::run` then
/// resumes it and confirms (`Resumed`). With `tls_dir`, only a source whose
/// certificate that directory's CA signed gets as far as sending a byte of
/// the VM.
pub fn incoming(
    config: &VmConfig,
    uri: &str,
    tls_dir: Option<&std::path::Path>,
    early: early::Early<Vm>,
) -> Result<Machine, IncomingError> {
    // `early` ([`early::bare_vm`] with the CPUID) has created the VM while
    // the main thread set up: KVM_CREATE_VM and KVM's supported CPUID
    // (about a millisecond here) then take no part in the migration's
    // set-up. Its thread has no filter, so it is joined before a source
    // can connect.
    let created = early.join();
    let (mut conn, listener) = accept(uri, tls_dir)?;
    conn.set_timeout(Some(main_stream_timeout()));
    match created
        .map_err(IncomingError::from)
        .and_then(|vm| receive(config, &mut conn, listener.as_ref(), vm))
    {
        Ok(machine) => Ok(machine),
        Err(e) => {
            let _ = write_message(&mut conn, Kind::Abort, e.to_string().as_bytes());
            Err(e)
        }
    }
}

pub(super) fn receive(
    config: &VmConfig,
    conn: &mut Conn,
    listener: Option<&ChannelListener>,
    vm: Vm,
) -> Result<Machine, IncomingError> {
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
    let size_ok = memory::check_size(hello.memory_size)
        .map_err(|e| reasons.push(e.to_string()))
        .is_ok();
    let kvm = &vm.kvm;
    let vcpus_ok = vm::check_vcpus(kvm, u32::from(hello.vcpus))
        .map_err(|e| reasons.push(e.to_string()))
        .is_ok();
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
    // The VM is built now, before the reply, rather than after it: the
    // CPUID its first vCPU gets is the table the reply carries, and
    // reading it there spares a scratch VM whose teardown waits for an
    // SRCU grace period (about 1.5 ms, all of it in the migration's setup).
    let built = if machine.is_some() && size_ok && vcpus_ok {
        let ram = GuestRam::new(hello.memory_size)?;
        vm.finish(&ram.memory)?;
        // About half a millisecond per vCPU. The state's vCPU count is
        // checked against it.
        let vcpus = vm.create_vcpus(hello.vcpus)?;
        Some((ram, vcpus))
    } else {
        None
    };
    let host_cpuid: Vec<CpuidEntry> = match &built {
        Some((_, vcpus)) => vcpus.first().and_then(|v| vcpu_cpuid(&v.fd).ok()),
        None => host_cpuid(&vm.kvm, hello.vcpus.max(1)).ok(),
    }
    .unwrap_or_default();
    for inc in cpuid_incompatibilities(&hello.cpuid, &host_cpuid) {
        reasons.push(format!("CPUID: {inc}"));
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
            let pairs = dev.queue_pairs;
            match crate::devices::net::open_peer(&dev.id, spec, dev.interface.as_deref(), pairs) {
                Ok((opened, support)) => {
                    if let Err(e) =
                        snapshot::check_peer(&dev.id, dev.offered, pairs, &support, "on the source")
                    {
                        reasons.push(e.to_string());
                    }
                    device_peers.push(DevicePeer {
                        id: dev.id.clone(),
                        peer_kind: support.kind.to_string(),
                        peer: support.name.clone(),
                        supported: support.supported,
                        max_queue_pairs: support.max_queue_pairs,
                    });
                    peers.push((opened, support));
                }
                Err(e) => reasons.push(e.to_string()),
            }
        }
    }
    if let Some(why) = hello
        .multifd
        .as_ref()
        .and_then(|m| multifd::refusal(m, listener))
    {
        reasons.push(why);
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
    let proto = |e: ProtocolError| IncomingError::from(MigrateError::from(e));
    write_json(conn, Kind::HelloReply, &reply).map_err(proto)?;
    let (Some(machine), Some((ram, vcpus))) = (machine.filter(|_| reasons.is_empty()), built)
    else {
        return Err(IncomingError::Refused(reasons));
    };

    let channels = match (&hello.multifd, listener) {
        (Some(m), Some(l)) => {
            let chans = multifd::accept_channels(l, m)?;
            write_message(conn, Kind::ChannelsReady, &[]).map_err(proto)?;
            Some(chans)
        }
        _ => None,
    };

    let started = Instant::now();
    let mut tally = IncomingTally::new();
    let state_bytes = match channels {
        None => receive_main(conn, &ram, &mut tally, None)?,
        Some(chans) => {
            let breaker = conn.try_clone().map_err(IncomingError::ConfirmStream)?;
            let mut channel_tally = IncomingTally::new();
            let state = multifd::receive(breaker, chans, &ram, &mut channel_tally, |view| {
                receive_main(conn, &ram, &mut tally, Some(view))
            })?;
            tally.absorb(&channel_tally);
            state
        }
    };
    let received = tally.received_bytes();
    expect(conn, Kind::Complete, "Complete").map_err(proto)?;
    let restore_started = Instant::now();
    let container =
        Container::from_bytes(state_bytes, KNOWN_SECTIONS).map_err(IncomingError::State)?;
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
        return Err(IncomingError::StateMismatch);
    }
    let mut m = snapshot::machine_from_saved(config, &saved, vm, vcpus, ram, peers)?;
    let incoming_info = tally.completed(hello.memory_size);
    m.handle().migration.update(|i| *i = incoming_info);
    let restore_ms = restore_started.elapsed().as_secs_f64() * 1e3;
    tracing::info!(
        "incoming migration: {} MiB received in {:.0} ms, state restored in {restore_ms:.1} ms",
        received >> 20,
        started.elapsed().as_secs_f64() * 1e3
    );
    let mut confirm = conn.try_clone().map_err(IncomingError::ConfirmStream)?;
    // Everything is here and checked; the guest runs only once the source
    // committed to stay paused (see `source` for why this leaves at most
    // one copy running). Any error from here on makes `incoming` send
    // `Abort`, the promise that the guest will not run here.
    write_message(conn, Kind::Ready, &[]).map_err(IncomingError::NoGo)?;
    expect(conn, Kind::Go, "Go").map_err(IncomingError::NoGo)?;
    tracing::info!("incoming migration: the source committed; running the guest here");
    m.on_running(Box::new(move |_: &VmHandle| {
        // The guest runs here now: tell the source (the machine then
        // tells the network).
        if let Err(e) = write_json(&mut confirm, Kind::Resumed, &Resumed { restore_ms }) {
            tracing::warn!("could not confirm the migration to the source: {e}");
        }
    }));
    m.announce_when_running();
    Ok(m)
}

/// The main stream until `State` (whose payload it returns): pages and
/// round ends, or with multifd (`channels`) only round ends, each acted on
/// once every channel finished that round.
fn receive_main(
    conn: &mut Conn,
    ram: &GuestRam,
    tally: &mut IncomingTally,
    channels: Option<&MainView<'_>>,
) -> Result<Vec<u8>, IncomingError> {
    let proto = |e: ProtocolError| IncomingError::from(MigrateError::from(e));
    let mut recycled = Vec::new();
    loop {
        let m = read_message_reusing(conn, std::mem::take(&mut recycled)).map_err(proto)?;
        tally.message(&m);
        match m.kind {
            Kind::Pages | Kind::ZeroPages if channels.is_none() => {
                write_pages(ram, &m, tally)?;
                recycled = m.payload;
            }
            Kind::RoundEnd => {
                let r: RoundEnd = m.json().map_err(proto)?;
                tally.round();
                if let Some(view) = channels {
                    view.round_done(r.round)?;
                    tracing::info!(
                        "incoming migration: round {} done on every multifd channel",
                        r.round
                    );
                } else {
                    tracing::info!(
                        "incoming migration: round {} done, {} MiB received",
                        r.round,
                        tally.received_bytes() >> 20
                    );
                }
            }
            Kind::State => return Ok(m.payload),
            other => {
                return Err(proto(ProtocolError::Unexpected {
                    expected: if channels.is_some() {
                        "RoundEnd or State (pages travel on the multifd channels)"
                    } else {
                        "Pages, ZeroPages, RoundEnd or State"
                    },
                    got: other,
                }))
            }
        }
    }
}

/// Writes a `Pages` or `ZeroPages` message into guest RAM, every run
/// checked to lie inside it.
pub(super) fn write_pages(
    ram: &GuestRam,
    m: &Message,
    tally: &mut IncomingTally,
) -> Result<(), IncomingError> {
    let proto = |e: ProtocolError| IncomingError::from(MigrateError::from(e));
    let with_data = m.kind == Kind::Pages;
    let (runs, data) = decode_runs(m.kind, &m.payload, with_data).map_err(proto)?;
    let mut offset = 0usize;
    for run in runs {
        let len = run.pages as usize * PAGE_SIZE as usize;
        if !ram.memory.check_range(GuestAddress(run.gpa), len) {
            return Err(proto(ProtocolError::Malformed {
                kind: m.kind,
                detail: format!("pages at {:#x}+{len:#x} lie outside guest memory", run.gpa),
            }));
        }
        if with_data {
            ram.memory
                .write_slice(&data[offset..offset + len], GuestAddress(run.gpa))
                .map_err(IncomingError::GuestMemory)?;
            offset += len;
        } else {
            write_zeros(ram, run.gpa, len as u64)?;
        }
        tally.pages(with_data, run.pages);
    }
    Ok(())
}

/// Zeroes `len` bytes of guest RAM at `gpa` by punching the range out of
/// the memfd behind it: no buffer of the run's claimed length, and pages
/// that were never written stay unallocated.
fn write_zeros(ram: &GuestRam, gpa: u64, len: u64) -> Result<(), IncomingError> {
    for range in ram_ranges(ram.size) {
        let start = gpa.max(range.guest_addr);
        let end = (gpa + len).min(range.guest_addr + range.size);
        if start >= end {
            continue;
        }
        let offset = range.file_offset + (start - range.guest_addr);
        let (Ok(offset), Ok(length)) = (i64::try_from(offset), i64::try_from(end - start)) else {
            return Err(IncomingError::ZeroPages {
                gpa: start,
                len: end - start,
                source: std::io::ErrorKind::InvalidInput.into(),
            });
        };
        // SAFETY: fallocate on a descriptor this process owns; it changes
        // only the file's contents, never memory the process can see other
        // than through the mapping of that file.
        let rc = unsafe {
            libc::fallocate(
                ram.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                length,
            )
        };
        if rc != 0 {
            return Err(IncomingError::ZeroPages {
                gpa: start,
                len: end - start,
                source: std::io::Error::last_os_error(),
            });
        }
    }
    Ok(())
}
