//! Which pages to send: KVM's dirty log, godwit's own writes, and the log
//! vhost-user backends write into.

use std::sync::atomic::Ordering;
use std::sync::PoisonError;

use kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use godwit_migration::protocol::PAGE_SIZE;

use super::MigrateError;
use crate::devices::net::NetDevice;
use crate::machine::VmHandle;

/// Pages dirtied since the last call: KVM's log and godwit's own writes.
pub(super) fn take_dirty(
    handle: &VmHandle,
    backend: Option<&BackendLog>,
) -> Result<Vec<u64>, MigrateError> {
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
    pub(super) fn new(memory_end: u64) -> Result<Self, MigrateError> {
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

pub(super) fn vhost_user_devices(handle: &VmHandle) -> Vec<&NetDevice> {
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
pub(super) fn set_backend_logging(
    handle: &VmHandle,
    log: Option<&BackendLog>,
) -> Result<(), MigrateError> {
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

pub(super) fn set_dirty_logging(handle: &VmHandle, on: bool) -> Result<(), MigrateError> {
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
