//! The TAP datapath without its thread, for the fuzz targets in `fuzz/`:
//! a guest's rings served once per call on the caller's thread, over any
//! [`Tap`] (a socketpair, from [`Tap::from_socket_for_fuzzing`]).

use std::io;
use std::sync::Arc;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use virtio_bindings::virtio_net::VIRTIO_NET_F_MQ;

use super::worker::Worker;
use super::Shared;
use crate::net::Tap;
use crate::virtio::pause::PauseGate;
use crate::virtio::{feature, ActivateParams};

/// An activated virtio-net datapath over `tap`.
pub struct Datapath {
    worker: Worker,
}

impl Datapath {
    /// What activation with `params` and the driver's `acked` features
    /// would start, with the device's MAC `mac`: the first pair's thread
    /// (of two pairs when MQ was acked, so that VQ_PAIRS_SET has a choice).
    pub fn new(
        params: ActivateParams,
        tap: Tap,
        acked: crate::virtio::Features,
        mac: [u8; 6],
    ) -> io::Result<Self> {
        let mq = acked & feature(VIRTIO_NET_F_MQ) != 0;
        let worker = Worker::new(
            params,
            Arc::new(tap),
            acked,
            Arc::new(Shared::new(mac, if mq { 2 } else { 1 })),
            EventFd::new(EFD_NONBLOCK)?,
            Arc::new(PauseGate::new()?),
        )?;
        Ok(Datapath { worker })
    }

    /// Serves the transmit, receive and control queues once. `false` when
    /// the datapath failed (the device would set DEVICE_NEEDS_RESET).
    pub fn serve_once(&mut self) -> bool {
        self.worker.serve_once().is_ok()
    }
}
