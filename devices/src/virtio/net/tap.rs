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
//! When the driver sets DRIVER_OK the device sets the TAP's offloads from the
//! acked guest features (`TUNSETOFFLOAD`) and starts one datapath thread;
//! `reset` stops it and keeps the TAP for the next activation.

use std::sync::Arc;
use std::thread::JoinHandle;

use virtio_bindings::virtio_net::VIRTIO_NET_F_MTU;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::features::{self, FeatureProblem};
use super::frontend::{FrontendConfig, FrontendError, NetFrontend, PeerInfo};
use super::model::{virtio_frontend_methods, NetModel, PeerStatus, PeerTap};
use super::{format_mac, worker, NetStats, DEFAULT_QUEUE_SIZE, RX_QUEUE, TX_QUEUE};
use crate::dirty_log::{DirtyLogError, DirtyTracking};
use crate::net::{Tap, TapOffloads};
use crate::virtio::pause::PauseError;
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
    tap: Arc<Tap>,
    tap_caps: TapOffloads,
    worker: Option<WorkerHandle>,
}

impl VirtioNet {
    /// Builds a device on `tap` offering `config.features` (plus
    /// VIRTIO_F_VERSION_1). Fails, naming every offending feature and what
    /// to change, when a bit is unknown, not implemented by godwit, not
    /// supported by the TAP (probed here), or lacks a bit it depends on.
    pub fn new(tap: Tap, config: NetConfig) -> Result<Self, NetError> {
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
            },
        )?;
        tracing::info!(
            tap = tap.name(),
            mac = %format_mac(&config.mac),
            features = %features::names(offered),
            "virtio-net device created"
        );
        Ok(VirtioNet {
            front,
            tap: Arc::new(tap),
            tap_caps: caps,
            worker: None,
        })
    }

    /// The TAP peer.
    pub fn tap(&self) -> &Arc<Tap> {
        &self.tap
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
        let Some(w) = self.worker.take() else { return };
        if let Err(e) = w.stop.write(1) {
            tracing::error!(
                tap = self.tap.name(),
                "cannot signal the datapath thread to stop: {e}"
            );
        }
        // A parked datapath must wake to see the stop.
        self.front.gate().release_for_stop();
        if w.thread.join().is_err() {
            tracing::error!(
                tap = self.tap.name(),
                "the virtio-net datapath thread panicked; the device was reset anyway"
            );
        }
    }

    fn start_worker(&mut self, params: ActivateParams) -> Result<(), ActivateError> {
        let thread_err = |source| ActivateError::Thread {
            device: DEVICE_NAME,
            source,
        };
        let stop = EventFd::new(EFD_NONBLOCK).map_err(thread_err)?;
        let worker_stop = stop.try_clone().map_err(thread_err)?;
        let gate = self.front.gate().clone();
        let worker = worker::Worker::new(
            params,
            self.tap.clone(),
            self.front.acked(),
            self.front.shared().clone(),
            worker_stop,
            gate.clone(),
        )
        .map_err(thread_err)?;
        let name: String = format!("gw-net-{}", self.tap.name())
            .chars()
            .take(15)
            .collect();
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
            })?;
        self.worker = Some(WorkerHandle { stop, thread });
        Ok(())
    }
}

impl VirtioDevice for VirtioNet {
    virtio_frontend_methods!(front);

    fn activate(&mut self, params: ActivateParams) -> Result<(), ActivateError> {
        self.front.check_activate(&params)?;
        let acked = self.front.acked();
        let flags = features::tun_offloads_for_guest(acked);
        let backend = |e: crate::net::TapError| ActivateError::Backend {
            device: DEVICE_NAME,
            source: Box::new(e),
        };
        // The header size first: the tunnel flags need the tunnel header.
        self.tap
            .set_vnet_hdr_len(features::hdr::len_for(acked))
            .map_err(backend)?;
        self.tap.set_offload(flags).map_err(backend)?;
        self.front.record_acked_offloads();
        let interrupt = params.interrupt.clone();
        self.start_worker(params)?;
        self.front.set_active(interrupt);
        tracing::info!(
            tap = self.tap.name(),
            acked = %features::names(acked),
            tap_offloads = format_args!("{flags:#x}"),
            "virtio-net activated"
        );
        Ok(())
    }

    fn reset(&mut self) {
        self.stop_worker();
        self.front.reset();
        // Back to the 12-byte header a driver that negotiates no tunnel
        // feature expects (the next activation sets it again anyway).
        if let Err(e) = self.tap.set_vnet_hdr_len(features::hdr::V1_LEN) {
            tracing::warn!(tap = self.tap.name(), "{e}");
        }
    }

    fn queue_positions(&self) -> Option<Vec<QueuePosition>> {
        let shared = self.front.shared();
        self.front.queue_positions(|| {
            self.worker.as_ref()?;
            Some(vec![shared.position(RX_QUEUE), shared.position(TX_QUEUE)])
        })
    }
}

impl NetModel for VirtioNet {
    fn frontend(&self) -> &NetFrontend {
        &self.front
    }

    fn peer_info(&self) -> PeerInfo {
        PeerInfo::of_tap(&self.tap, self.tap_caps)
    }

    fn peer_status(&self) -> PeerStatus {
        PeerStatus::Tap {
            vnet_hdr: self.tap.has_vnet_hdr(),
            offloads: self.tap_caps,
        }
    }

    fn tap(&self) -> PeerTap {
        PeerTap::of(&self.tap)
    }

    /// Parks the datapath (if active) with everything it holds, so guest
    /// memory and rings stay still until [`NetModel::resume_datapath`].
    fn pause_datapath(&self) -> Result<(), PauseError> {
        self.front.gate().pause()
    }

    fn resume_datapath(&self) {
        self.front.gate().resume();
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
