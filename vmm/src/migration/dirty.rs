//! Which pages to send: KVM's dirty log, godwit's own writes, and what
//! every device logs through `DirtyTracking` (vhost backends' writes).

use std::sync::PoisonError;

use kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use godwit_migration::protocol::PAGE_SIZE;

use godwit_devices::virtio::net::NetModel;

use super::MigrateError;
use crate::devices::net::NetDevice;
use crate::machine::VmHandle;

/// Pages dirtied since the last call: what the devices logged, KVM's log
/// and godwit's own writes.
pub(super) fn take_dirty(handle: &VmHandle) -> Result<Vec<u64>, MigrateError> {
    let mut pages = Vec::new();
    for net in &handle.nets {
        model(net).dirty_log(&mut pages);
    }
    pages.retain(|gpa| handle.ram.memory.address_in_range(GuestAddress(*gpa)));
    for (slot, region) in handle.ram.memory.iter().enumerate() {
        let kvm = handle
            .vm
            .fd
            .get_dirty_log(slot as u32, region.len() as usize)
            .map_err(|source| MigrateError::KvmDirtyLog {
                slot: slot as u32,
                source,
            })?;
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

/// Asks every device to log the guest pages it writes from now on (each
/// answers for itself: godwit's own writes need nothing, a vhost backend
/// gets a log). Devices started before one that fails are stopped again.
pub(super) fn start_device_logs(handle: &VmHandle) -> Result<(), MigrateError> {
    let end = handle.ram.memory.last_addr().0 + 1;
    for (i, net) in handle.nets.iter().enumerate() {
        if let Err(source) = model(net).start_dirty_log(end) {
            for started in &handle.nets[..i] {
                let _ = model(started).stop_dirty_log();
            }
            return Err(MigrateError::DeviceLog {
                device: net.id.clone(),
                source,
            });
        }
    }
    Ok(())
}

/// Stops every device's log (the migration finished or failed).
pub(super) fn stop_device_logs(handle: &VmHandle) {
    for net in &handle.nets {
        if let Err(e) = model(net).stop_dirty_log() {
            tracing::warn!("migration: {}: cannot stop the dirty log: {e}", net.id);
        }
    }
}

fn model(net: &NetDevice) -> std::sync::MutexGuard<'_, dyn NetModel + 'static> {
    net.device.lock().unwrap_or_else(PoisonError::into_inner)
}

pub(super) fn set_dirty_logging(handle: &VmHandle, on: bool) -> Result<(), MigrateError> {
    let flags = if on { KVM_MEM_LOG_DIRTY_PAGES } else { 0 };
    handle
        .vm
        .map_memory(&handle.ram.memory, flags)
        .map_err(|source| MigrateError::DirtyLogging { on, source })?;
    if on {
        for region in handle.ram.memory.iter() {
            std::ops::Deref::deref(region).bitmap().reset();
        }
    }
    Ok(())
}

/// The pages that may hold data, however guest RAM is backed (see
/// [`godwit_migration::guest_ram`]): the rest is zero, and the destination
/// starts zeroed. A region whose backing cannot be inspected yields all of
/// its pages.
pub(super) fn pages_with_data(handle: &VmHandle) -> Vec<u64> {
    let mut pages = Vec::new();
    for region in handle.ram.memory.iter() {
        let base = region.start_addr().0;
        let ranges = godwit_migration::guest_ram::data_ranges(region).unwrap_or_else(|e| {
            tracing::warn!(
                "migration: cannot tell which guest pages at {base:#x} hold data ({e}): sending all of them"
            );
            vec![(0, region.len())]
        });
        for (from, to) in ranges {
            pages.extend((from / PAGE_SIZE..to / PAGE_SIZE).map(|p| base + p * PAGE_SIZE));
        }
    }
    pages
}
