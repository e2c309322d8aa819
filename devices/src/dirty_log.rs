//! Dirty tracking of the guest pages a device writes, for live migration.
//!
//! Modelled on Cloud Hypervisor's `Migratable` (`start_dirty_log`,
//! `dirty_log`, `stop_dirty_log`): the migration source asks every device
//! the same three questions and never which kind a device is. What a device
//! answers depends on who writes guest memory for it:
//!
//! - godwit itself (the TAP model's datapath): every write goes through
//!   [`crate::GuestMemory`], whose bitmap the migration reads for all of
//!   guest memory, so the device has nothing of its own to report;
//! - a vhost-user backend: it marks its writes in a [`SharedDirtyLog`] it
//!   maps through LOG_SHMFD;
//! - kernel vhost-net: the kernel marks its writes in a [`SharedDirtyLog`]
//!   godwit maps (VHOST_SET_LOG_BASE, LOG_ALL).
//!
//! A device that cannot log (a backend without LOG_ALL) refuses
//! `start_dirty_log` with a reason that names it, and reports the same
//! reason as a migration blocker: never a migration that misses pages.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};

/// The page size of every dirty log (vhost's VHOST_LOG_PAGE).
pub const LOG_PAGE_SIZE: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum DirtyLogError {
    #[error("cannot set up the dirty log of {device}: {what} failed: {source}")]
    Create {
        device: String,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{device} cannot track the guest pages it writes: {reason}; the VM cannot be \
         migrated while it has this device"
    )]
    Unsupported { device: String, reason: String },
    #[error("{device}: {what} failed: {source}")]
    Backend {
        device: String,
        what: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// How a device reports the guest pages it writes, so that a live
/// migration sends them again.
pub trait DirtyTracking {
    /// From now on, log every guest page the device writes. `memory_end`
    /// is the end of guest physical memory (the log covers `0..memory_end`).
    fn start_dirty_log(&self, memory_end: u64) -> Result<(), DirtyLogError>;

    /// Appends the guest physical address of every page the device wrote
    /// since `start_dirty_log` or the previous call, and forgets them.
    fn dirty_log(&self, pages: &mut Vec<u64>);

    /// Stops logging (the migration finished or failed).
    fn stop_dirty_log(&self) -> Result<(), DirtyLogError>;
}

/// A dirty bitmap in a memfd: one bit per 4 KiB page of guest physical
/// address space, which a vhost backend sets with atomic ORs (vhost's log
/// layout, the same for vhost-user's LOG_SHMFD and the kernel's
/// VHOST_SET_LOG_BASE).
pub struct SharedDirtyLog {
    file: File,
    map: *mut AtomicU64,
    words: usize,
}

// SAFETY: the mapping is owned by this struct and only accessed through
// atomic operations on whole words; the pointer is never handed out as a
// Rust reference beyond one atomic access.
unsafe impl Send for SharedDirtyLog {}
// SAFETY: as above; concurrent accesses are atomic.
unsafe impl Sync for SharedDirtyLog {}

impl SharedDirtyLog {
    /// A zeroed log covering guest physical addresses `0..memory_end`.
    pub fn new(device: &str, memory_end: u64) -> Result<Self, DirtyLogError> {
        let err = |what| {
            move |source| DirtyLogError::Create {
                device: device.to_string(),
                what,
                source,
            }
        };
        let words = memory_end.div_ceil(LOG_PAGE_SIZE).div_ceil(64);
        let words = usize::try_from(words)
            .map_err(|_| std::io::Error::other("the log is larger than the address space"))
            .map_err(err("sizing the log"))?;
        let bytes = words.max(1) * 8;
        let file = godwit_migration::memory_file::create_memfd(bytes as u64)
            .map_err(err("creating the log memfd"))?;
        // SAFETY: maps `bytes` of a memfd of exactly that size, shared; the
        // result is checked before use.
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
            return Err(err("mapping the log")(std::io::Error::last_os_error()));
        }
        Ok(SharedDirtyLog {
            file,
            map: map.cast(),
            words: words.max(1),
        })
    }

    /// The memfd, for a backend that maps it itself (vhost-user).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Its size in bytes.
    pub fn size(&self) -> u64 {
        self.words as u64 * 8
    }

    /// Where godwit mapped it, for a backend in the kernel
    /// (VHOST_SET_LOG_BASE takes a user address of the calling process).
    pub fn user_addr(&self) -> u64 {
        self.map as u64
    }

    /// Appends the pages marked since the last call and clears them.
    pub fn take(&self, pages: &mut Vec<u64>) {
        for i in 0..self.words {
            // SAFETY: `i` is within the mapping of `words` words; backends
            // set bits with atomic ORs, so the word is swapped atomically.
            let word = unsafe { &*self.map.add(i) };
            let mut bits = word.swap(0, Ordering::SeqCst);
            while bits != 0 {
                let bit = u64::from(bits.trailing_zeros());
                bits &= bits - 1;
                pages.push((i as u64 * 64 + bit) * LOG_PAGE_SIZE);
            }
        }
    }
}

/// Appends the pages marked in `log` (a device that is logging) and
/// clears them; nothing without a log.
pub fn take_pages(log: Option<&SharedDirtyLog>, pages: &mut Vec<u64>) {
    if let Some(log) = log {
        log.take(pages);
    }
}

impl Drop for SharedDirtyLog {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`.
        unsafe { libc::munmap(self.map.cast(), self.words * 8) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shared_log_reports_each_marked_page_once() {
        let log = SharedDirtyLog::new("test", 64 << 20).unwrap();
        assert_eq!(log.size(), (64 << 20) / LOG_PAGE_SIZE / 8);
        // What a backend does: OR a bit per page it writes.
        // SAFETY: word 1 is inside the mapping.
        unsafe { &*log.map.add(1) }.fetch_or(1 << 3, Ordering::SeqCst);
        let mut pages = Vec::new();
        log.take(&mut pages);
        assert_eq!(pages, vec![(64 + 3) * LOG_PAGE_SIZE]);
        pages.clear();
        log.take(&mut pages);
        assert!(pages.is_empty(), "taken pages are cleared");
    }
}
