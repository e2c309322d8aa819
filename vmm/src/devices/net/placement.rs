//! Where a device sits in the VM: its virtio-mmio slot and IRQ, the
//! ioeventfds that carry the guest's queue notifications, the irqfd that
//! carries the device's interrupts, and the transport on the MMIO bus. The
//! same at boot and restore (a restored device keeps its saved slot).

use std::sync::{Arc, Mutex};

use kvm_ioctls::{IoEventAddress, VmFd};

use godwit_devices::bus::Bus;
use godwit_devices::virtio::mmio::{MmioTransport, MMIO_SLOT_SIZE, NOTIFY_OFFSET};

use super::NetSetupError;
use crate::vstate::layout::{FIRST_VIRTIO_IRQ, IOAPIC_PINS, VIRTIO_MMIO_BASE};

/// How many network devices have an IRQ.
pub fn max_devices() -> usize {
    usize::from(IOAPIC_PINS) - FIRST_VIRTIO_IRQ as usize
}

/// The slot and IRQ of device `index` at boot.
pub fn slot(index: usize) -> (u64, u32) {
    (
        VIRTIO_MMIO_BASE + index as u64 * MMIO_SLOT_SIZE,
        FIRST_VIRTIO_IRQ + index as u32,
    )
}

/// Wires `transport` into the VM at `mmio_base` / `irq`: registers its
/// queue notification ioeventfds and its irqfd with KVM and inserts it on
/// the MMIO bus.
pub fn place(
    id: &str,
    transport: MmioTransport,
    mmio_base: u64,
    irq: u32,
    vm: &VmFd,
    mmio: &mut Bus,
) -> Result<Arc<Mutex<MmioTransport>>, NetSetupError> {
    let kvm_err = |what| {
        move |source| NetSetupError::Kvm {
            device: id.to_string(),
            what,
            source,
        }
    };
    for (queue, evt) in transport.queue_notify_eventfds().iter().enumerate() {
        vm.register_ioevent(
            evt,
            &IoEventAddress::Mmio(mmio_base + NOTIFY_OFFSET),
            queue as u32,
        )
        .map_err(kvm_err("a queue notification ioeventfd"))?;
    }
    vm.register_irqfd(transport.interrupt_eventfd(), irq)
        .map_err(kvm_err("the device interrupt irqfd"))?;
    let transport = Arc::new(Mutex::new(transport));
    mmio.insert(mmio_base, MMIO_SLOT_SIZE, transport.clone())
        .map_err(|source| NetSetupError::Bus {
            device: id.to_string(),
            source,
        })?;
    Ok(transport)
}
