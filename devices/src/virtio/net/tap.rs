//! virtio-net over a TAP peer: the shared frontend plus godwit's own
//! datapath (`worker.rs`).
//!
//! The VMM builds a device with [`VirtioNet::new`] from a [`Tap`] and a
//! [`NetConfig`] (MAC, offered features, MTU, queue size), wraps it in an
//! `Arc<Mutex<_>>`, and hands a clone to
//! [`crate::virtio::mmio::MmioTransport::new`]. It keeps its own clone for
//! [`NetModel::set_link`], [`NetModel::announce`] and [`NetModel::info`].
//!
//! The offered features are validated against [`features::FEATURES`] at
//! construction: godwit never silently offers less than it was asked for
//! (use [`features::mask_for_peer`] first to get QEMU's lenient behaviour,
//! with the list of what was dropped).
//!
//! A device of N queue pairs ([`VirtioNet::with_queues`]) has one TAP queue
//! per pair (a multi-queue TAP, `IFF_MULTI_QUEUE`). When the driver sets
//! DRIVER_OK the device sets the TAP's offloads from the acked guest
//! features (`TUNSETOFFLOAD`), attaches the TAP queues of the pairs in use
//! (one after a reset, until VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET) and starts one
//! datapath thread per pair the driver set up; `reset` stops them and keeps
//! the TAP for the next activation.

use std::sync::Arc;
use std::thread::JoinHandle;

use virtio_bindings::virtio_net::{VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_MTU};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::features::{self, FeatureProblem};
use super::frontend::{FrontendConfig, FrontendError, NetFrontend, PeerInfo};
use super::model::{virtio_frontend_methods, NetModel, PeerStatus, PeerTap};
use super::worker::{switch_tap_queues, PairSwitch, Worker, WorkerJob};
use super::{format_mac, NetStats, DEFAULT_QUEUE_SIZE};
use crate::dirty_log::{DirtyLogError, DirtyTracking};
use crate::net::{Tap, TapOffloads};
use crate::virtio::pause::{PauseError, PauseGate};
use crate::virtio::{
    feature, ActivateError, ActivateParams, Features, QueuePosition, VirtioDevice,
};

const DEVICE_NAME: &str = "virtio-net";

/// How the VMM configures a virtio-net device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetConfig {
    /// The guest's MAC address (configuration space `mac`).
    pub mac: [u8; 6],
    /// The feature bits to offer (VIRTIO_F_VERSION_1 is always added). Every
    /// bit must be implemented by godwit and supported by the TAP: see
    /// [`features::validate`] and [`features::mask_for_peer`].
    pub features: Features,
    /// The MTU advertised to the guest; required when the MTU feature is on.
    pub mtu: Option<u16>,
    /// Maximum size of the rx and tx queues (a power of two).
    pub queue_size: u16,
}

impl NetConfig {
    /// A configuration with the given MAC and features, default queue size, no MTU.
    pub fn new(mac: [u8; 6], features: Features) -> Self {
        NetConfig {
            mac,
            features,
            mtu: None,
            queue_size: DEFAULT_QUEUE_SIZE,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("virtio-net on TAP {tap} cannot offer the requested features: {}", join_problems(.problems))]
    Features {
        tap: String,
        problems: Vec<FeatureProblem>,
    },
    #[error("the mtu feature is on but no MTU value was given: set an MTU from 68 to 65535")]
    MtuMissing,
    #[error("MTU {0} is out of range: use a value from 68 to 65535")]
    MtuRange(u16),
    #[error(transparent)]
    Frontend(#[from] FrontendError),
    #[error("a virtio-net device needs at least one TAP queue")]
    NoTap,
    #[error("cannot create the pause eventfd of queue pair {pair}: {source}")]
    Gate {
        pair: usize,
        #[source]
        source: std::io::Error,
    },
}

fn join_problems(p: &[FeatureProblem]) -> String {
    p.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

struct WorkerHandle {
    stop: EventFd,
    thread: JoinHandle<()>,
}

/// A virtio-net device on a TAP.
pub struct VirtioNet {
    front: NetFrontend,
    /// One TAP queue per queue pair (the first is the TAP's handle for
    /// offloads and queries).
    taps: Vec<Arc<Tap>>,
    tap_caps: TapOffloads,
    /// The datapath threads of an active device, one per pair in use.
    workers: Vec<WorkerHandle>,
    /// One pause gate per pair's thread; the first is the frontend's.
    gates: Vec<Arc<PauseGate>>,
}

impl VirtioNet {
    /// Builds a device on `tap` offering `config.features` (plus
    /// VIRTIO_F_VERSION_1). Fails, naming every offending feature and what
    /// to change, when a bit is unknown, not implemented by godwit, not
    /// supported by the TAP (probed here), or lacks a bit it depends on.
    pub fn new(tap: Tap, config: NetConfig) -> Result<Self, NetError> {
        Self::with_queues(vec![tap], config)
    }

    /// Builds a device of one queue pair per TAP queue in `taps` (the
    /// queues of one multi-queue TAP when more than one), as
    /// [`VirtioNet::new`] does for one.
    pub fn with_queues(taps: Vec<Tap>, config: NetConfig) -> Result<Self, NetError> {
        let Some(tap) = taps.first() else {
            return Err(NetError::NoTap);
        };
        let pairs = u16::try_from(taps.len()).unwrap_or(u16::MAX);
        let caps = tap.probe_offloads();
        let offered = config.features | features::always_offered();
        let problems = features::validate(offered, &caps, tap.name());
        if !problems.is_empty() {
            return Err(NetError::Features {
                tap: tap.name().to_string(),
                problems,
            });
        }
        let mtu = match (offered & feature(VIRTIO_NET_F_MTU) != 0, config.mtu) {
            (true, None) => return Err(NetError::MtuMissing),
            (_, Some(m)) if m < 68 => return Err(NetError::MtuRange(m)),
            (_, m) => m.unwrap_or(1500),
        };
        let front = NetFrontend::new(
            tap.name().to_string(),
            DEVICE_NAME,
            &FrontendConfig {
                mac: config.mac,
                features: config.features,
                mtu,
                queue_size: config.queue_size,
                queue_pairs: pairs,
            },
        )?;
        tracing::info!(
            tap = tap.name(),
            mac = %format_mac(&config.mac),
            features = %features::names(offered),
            queue_pairs = pairs,
            "virtio-net device created"
        );
        let mut gates = vec![front.gate().clone()];
        for pair in 1..taps.len() {
            let gate = PauseGate::new().map_err(|source| NetError::Gate { pair, source })?;
            gates.push(Arc::new(gate));
        }
        Ok(VirtioNet {
            front,
            taps: taps.into_iter().map(Arc::new).collect(),
            tap_caps: caps,
            workers: Vec::new(),
            gates,
        })
    }

    /// The TAP peer (its first queue).
    pub fn tap(&self) -> &Arc<Tap> {
        &self.taps[0]
    }

    /// The TAP queue of each queue pair.
    pub fn tap_queues(&self) -> &[Arc<Tap>] {
        &self.taps
    }

    /// What the TAP was probed to support.
    pub fn tap_capabilities(&self) -> TapOffloads {
        self.tap_caps
    }

    pub fn link_up(&self) -> bool {
        self.front.link_up()
    }

    /// Counters since the device was created.
    pub fn stats(&self) -> NetStats {
        self.front.shared().stats()
    }

    fn stop_worker(&mut self) {
        let name = self.tap().name().to_string();
        for (w, gate) in std::mem::take(&mut self.workers)
            .into_iter()
            .zip(&self.gates)
        {
            if let Err(e) = w.stop.write(1) {
                tracing::error!(tap = %name, "cannot signal a datapath thread to stop: {e}");
            }
            // A parked datapath must wake to see the stop.
            gate.release_for_stop();
            if w.thread.join().is_err() {
                tracing::error!(
                    tap = %name,
                    "a virtio-net datapath thread panicked; the device was reset anyway"
                );
            }
        }
    }

    /// Starts one datapath thread per queue pair the driver set up; the
    /// first also serves the control queue.
    fn start_workers(&mut self, params: ActivateParams) -> Result<(), ActivateError> {
        let thread_err = |source| ActivateError::Thread {
            device: DEVICE_NAME,
            source,
        };
        let pairs = usize::from(self.front.shared().ready_pairs())
            .min(self.front.pairs_in_use())
            .min(self.taps.len());
        let ctrl_index = self.front.ctrl_index();
        let ctrl_acked = self.front.acked() & feature(VIRTIO_NET_F_CTRL_VQ) != 0;
        let ActivateParams {
            mem,
            interrupt,
            queues,
        } = params;
        let mut queues: Vec<Option<_>> = queues.into_iter().map(Some).collect();
        let mut take = |i: usize| {
            queues.get_mut(i).and_then(Option::take).ok_or_else(|| {
                thread_err(std::io::Error::other(format!(
                    "virtio-net has no queue {i} to serve"
                )))
            })
        };
        let ctrl = if ctrl_acked {
            Some(take(ctrl_index)?)
        } else {
            None
        };
        let mut wakes = Vec::with_capacity(pairs);
        for _ in 0..pairs {
            wakes.push(EventFd::new(EFD_NONBLOCK).map_err(thread_err)?);
        }
        let switch = PairSwitch {
            taps: self.taps.clone(),
            wake: wakes
                .iter()
                .map(EventFd::try_clone)
                .collect::<Result<_, _>>()
                .map_err(thread_err)?,
        };
        let (mut ctrl, mut switch) = (ctrl, Some(switch));
        let mut jobs = Vec::with_capacity(pairs);
        for (pair, pairs_changed) in wakes.into_iter().enumerate() {
            let stop = EventFd::new(EFD_NONBLOCK).map_err(thread_err)?;
            let job = WorkerJob {
                mem: mem.clone(),
                interrupt: interrupt.clone(),
                pair,
                rx: take(2 * pair)?,
                tx: take(2 * pair + 1)?,
                ctrl: ctrl.take(),
                ctrl_index,
                tap: self.taps[pair].clone(),
                acked: self.front.acked(),
                shared: self.front.shared().clone(),
                stop: stop.try_clone().map_err(thread_err)?,
                gate: self.gates[pair].clone(),
                pairs_changed,
                switch: switch.take(),
            };
            jobs.push((Worker::start(job).map_err(thread_err)?, stop));
        }
        for (pair, (worker, stop)) in jobs.into_iter().enumerate() {
            let name: String = if pair == 0 {
                format!("gw-net-{}", self.tap().name())
            } else {
                format!("gw-net{pair}-{}", self.tap().name())
            }
            .chars()
            .take(15)
            .collect();
            let gate = self.gates[pair].clone();
            gate.attach();
            let thread = std::thread::Builder::new()
                .name(name)
                .spawn(move || {
                    crate::thread_hook::started(crate::thread_hook::DeviceThread::NetDatapath);
                    worker.run()
                })
                .map_err(|source| {
                    gate.detach();
                    thread_err(source)
                });
            match thread {
                Ok(thread) => self.workers.push(WorkerHandle { stop, thread }),
                Err(e) => {
                    self.stop_worker();
                    return Err(e);
                }
            }
        }
        Ok(())
    }
}

impl VirtioDevice for VirtioNet {
    virtio_frontend_methods!(front);

    fn activate(&mut self, params: ActivateParams) -> Result<(), ActivateError> {
        self.front.check_activate(&params)?;
        let acked = self.front.acked();
        let flags = features::tun_offloads_for_guest(acked);
        let backend_err = |e| ActivateError::Backend {
            device: DEVICE_NAME,
            source: Box::new(e),
        };
        // The header size first: the tunnel flags need the tunnel header.
        for tap in &self.taps {
            tap.set_vnet_hdr_len(features::hdr::len_for(acked))
                .map_err(backend_err)?;
        }
        self.tap().set_offload(flags).map_err(backend_err)?;
        // One pair after a reset; a restored device the pairs it had.
        let active = self.front.shared().active_pairs();
        switch_tap_queues(&self.taps, active).map_err(backend_err)?;
        self.front.record_acked_offloads();
        let interrupt = params.interrupt.clone();
        self.start_workers(params)?;
        self.front.set_active(interrupt);
        tracing::info!(
            tap = self.tap().name(),
            acked = %features::names(acked),
            tap_offloads = format_args!("{flags:#x}"),
            queue_pairs = self.taps.len(),
            active_queue_pairs = active,
            "virtio-net activated"
        );
        Ok(())
    }

    fn reset(&mut self) {
        self.stop_worker();
        self.front.reset();
        // Back to the 12-byte header a driver that negotiates no tunnel
        // feature expects (the next activation sets it again anyway).
        if let Err(e) = self.tap().set_vnet_hdr_len(features::hdr::V1_LEN) {
            tracing::warn!(tap = self.tap().name(), "{e}");
        }
    }

    fn queue_positions(&self) -> Option<Vec<QueuePosition>> {
        let shared = self.front.shared();
        self.front.queue_positions(|| {
            if self.workers.is_empty() {
                return None;
            }
            let rings = 2 * self.front.pairs_in_use();
            Some((0..rings).map(|i| shared.position(i)).collect())
        })
    }
}

impl NetModel for VirtioNet {
    fn frontend(&self) -> &NetFrontend {
        &self.front
    }

    fn peer_info(&self) -> PeerInfo {
        PeerInfo::of_tap(self.tap(), self.tap_caps)
    }

    fn peer_status(&self) -> PeerStatus {
        PeerStatus::Tap {
            vnet_hdr: self.tap().has_vnet_hdr(),
            offloads: self.tap_caps,
        }
    }

    fn tap(&self) -> PeerTap {
        PeerTap::of(self.tap())
    }

    /// Parks every pair's datapath (if active) with everything it holds, so
    /// guest memory and rings stay still until [`NetModel::resume_datapath`].
    fn pause_datapath(&self) -> Result<(), PauseError> {
        for gate in &self.gates {
            if let Err(e) = gate.pause() {
                self.resume_datapath();
                return Err(e);
            }
        }
        Ok(())
    }

    fn resume_datapath(&self) {
        for gate in &self.gates {
            gate.resume();
        }
    }
}

/// godwit's datapath writes guest memory through [`crate::GuestMemory`],
/// whose bitmap the migration reads for all of memory: the device has no
/// log of its own, so there is nothing to report; starting and stopping the
/// log turns the datapath's marking on and off.
impl DirtyTracking for VirtioNet {
    /// Only while the log is on does the datapath mark the pages it writes
    /// (marking every write cost 5% of a 64-byte transmit and 17% of a
    /// 64 KiB receive when nothing read the bitmap).
    fn start_dirty_log(&self, _memory_end: u64) -> Result<(), DirtyLogError> {
        self.front.shared().set_dirty_log(true);
        Ok(())
    }

    fn dirty_log(&self, _pages: &mut Vec<u64>) {}

    fn stop_dirty_log(&self) -> Result<(), DirtyLogError> {
        self.front.shared().set_dirty_log(false);
        Ok(())
    }
}

impl Drop for VirtioNet {
    fn drop(&mut self) {
        self.stop_worker();
    }
}
