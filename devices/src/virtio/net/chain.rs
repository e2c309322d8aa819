//! Descriptor-chain helpers shared by the datapath (`worker`) and the
//! control queue (`ctrl`): walking a chain into guest-buffer segments,
//! copying into and out of them, building iovecs over them for the TAP's
//! readv/writev, and deciding whether the driver wants an interrupt.

use std::sync::atomic::Ordering;

use virtio_bindings::virtio_ring::VRING_AVAIL_F_NO_INTERRUPT;
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::Fault;
use crate::GuestMemory;

/// Most descriptors one chain may have, empty ones included (the kernel's
/// UIO_MAXIOV, which vhost-net and godwit's vhost-user backend keep too):
/// an indirect table may hold 65535, and walking a ring of such chains
/// would keep a datapath thread busy for seconds.
pub(crate) const MAX_SEGS: usize = 1024;

/// The ring itself cannot be used any more.
#[derive(Debug)]
pub(crate) struct Fatal(pub(crate) String);

/// One guest buffer: a descriptor's address, length and direction.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Seg {
    pub(crate) addr: GuestAddress,
    pub(crate) len: u32,
    pub(crate) write: bool,
}

/// Walks a chain, appending its non-empty descriptors to `segs`. Fails when
/// the chain is broken (loop, longer than the queue, bad next index, bad
/// indirect table: the iterator stops early while the last descriptor still
/// says NEXT), a buffer lies outside guest memory, or it has too many
/// segments. On failure `segs` may hold part of the chain; callers truncate.
pub(crate) fn parse_chain(
    chain: DescriptorChain<&GuestMemory>,
    mem: &GuestMemory,
    segs: &mut Vec<Seg>,
) -> Result<(), Fault> {
    let mut any = false;
    let mut last_next = false;
    for (walked, d) in chain.enumerate() {
        if walked >= MAX_SEGS {
            return Err(Fault::TooLarge);
        }
        any = true;
        last_next = d.has_next();
        if d.len() == 0 {
            continue;
        }
        if host_range(mem, d.addr(), d.len() as usize).is_none()
            && !GuestMemoryBackend::check_range(mem, d.addr(), d.len() as usize)
        {
            return Err(Fault::OutOfBounds);
        }
        segs.push(Seg {
            addr: d.addr(),
            len: d.len(),
            write: d.is_write_only(),
        });
    }
    if !any || last_next {
        return Err(Fault::BrokenChain);
    }
    Ok(())
}

pub(crate) fn seg_total(segs: &[Seg]) -> usize {
    segs.iter().map(|s| s.len as usize).sum()
}

/// Copies `data` into the buffers `segs`, starting `offset` bytes in.
/// Returns how many bytes were written. Marks the pages dirty when `track`
/// (a migration is logging dirty pages: see [`super::Shared::tracking`]);
/// otherwise the copy bypasses the bitmap, which nothing reads.
pub(crate) fn write_to_segs(
    mem: &GuestMemory,
    segs: &[Seg],
    mut offset: usize,
    mut data: &[u8],
    track: bool,
) -> usize {
    let mut written = 0;
    for s in segs {
        if data.is_empty() {
            break;
        }
        let len = s.len as usize;
        if offset >= len {
            offset -= len;
            continue;
        }
        let n = (len - offset).min(data.len());
        let Some(addr) = s.addr.checked_add(offset as u64) else {
            break;
        };
        // The range was checked when the chain was parsed; a failure here
        // means guest memory changed under us, which we report as short.
        let mut done = 0;
        for slice in GuestMemoryBackend::get_slices(mem, addr, n) {
            let Ok(slice) = slice else { break };
            let part = &data[done..done + slice.len()];
            if track {
                slice.copy_from(part);
            } else {
                let guard = slice.ptr_guard_mut();
                // SAFETY: `guard` points at `slice.len()` bytes of mapped
                // guest memory (a slice vm-memory resolved), alive while the
                // guard is; a VolatileSlice without a bitmap writes there
                // without marking pages dirty.
                let raw = unsafe { vm_memory::VolatileSlice::new(guard.as_ptr(), slice.len()) };
                raw.copy_from(part);
            }
            done += slice.len();
        }
        written += done;
        if done < n {
            break;
        }
        data = &data[n..];
        offset = 0;
    }
    written
}

/// Copies up to `out.len()` bytes out of the buffers `segs`.
pub(crate) fn read_from_segs(mem: &GuestMemory, segs: &[Seg], out: &mut [u8]) -> usize {
    let mut done = 0;
    for s in segs {
        let n = (s.len as usize).min(out.len() - done);
        if n == 0 {
            break;
        }
        if mem.read_slice(&mut out[done..done + n], s.addr).is_err() {
            break;
        }
        done += n;
    }
    done
}

/// Marks `len` bytes starting `skip` bytes into `segs` dirty (for writes
/// done through raw pointers, which bypass the bitmap).
pub(crate) fn mark_dirty(mem: &GuestMemory, segs: &[Seg], mut skip: usize, mut len: usize) {
    for s in segs {
        if len == 0 {
            break;
        }
        let slen = s.len as usize;
        if skip >= slen {
            skip -= slen;
            continue;
        }
        let n = (slen - skip).min(len);
        let Some(addr) = s.addr.checked_add(skip as u64) else {
            break;
        };
        for slice in GuestMemoryBackend::get_slices(mem, addr, n).flatten() {
            vm_memory::bitmap::Bitmap::mark_dirty(slice.bitmap(), 0, slice.len());
        }
        len -= n;
        skip = 0;
    }
}

/// The host address of `len` bytes of guest memory at `addr` when they lie
/// in one region: one region lookup, no slice iterator, no bitmap (the
/// datapath marks dirty pages itself, and only while a migration logs them).
/// None when the range is outside guest memory or crosses regions (callers
/// fall back to vm-memory's slices).
pub(crate) fn host_range(mem: &GuestMemory, addr: GuestAddress, len: usize) -> Option<*mut u8> {
    let region = mem.find_region(addr)?;
    let offset = addr.checked_offset_from(region.start_addr())?;
    let end = offset.checked_add(len as u64)?;
    if end > region.len() {
        return None;
    }
    region
        .get_host_address(vm_memory::MemoryRegionAddress(offset))
        .ok()
}

/// Builds iovecs over `segs` (skipping the first `skip` bytes) into `iov`,
/// keeping the pointer guards alive in `guards`. False if a buffer is no
/// longer in guest memory or there are too many pieces.
pub(crate) fn build_iovecs(
    mem: &GuestMemory,
    segs: &[Seg],
    mut skip: usize,
    iov: &mut Vec<libc::iovec>,
    guards: &mut Vec<vm_memory::volatile_memory::PtrGuardMut>,
) -> bool {
    iov.clear();
    guards.clear();
    for s in segs {
        let len = s.len as usize;
        if skip >= len {
            skip -= len;
            continue;
        }
        let Some(addr) = s.addr.checked_add(skip as u64) else {
            return false;
        };
        if let Some(ptr) = host_range(mem, addr, len - skip) {
            if iov.len() >= MAX_SEGS {
                return false;
            }
            iov.push(libc::iovec {
                iov_base: ptr.cast(),
                iov_len: len - skip,
            });
            skip = 0;
            continue;
        }
        for slice in GuestMemoryBackend::get_slices(mem, addr, len - skip) {
            let Ok(slice) = slice else { return false };
            if iov.len() >= MAX_SEGS {
                return false;
            }
            let guard = slice.ptr_guard_mut();
            iov.push(libc::iovec {
                iov_base: guard.as_ptr().cast(),
                iov_len: slice.len(),
            });
            guards.push(guard);
        }
        skip = 0;
    }
    true
}

/// Whether the driver wants an interrupt for the used entries just added to
/// `q` (EVENT_IDX's used_event, else VRING_AVAIL_F_NO_INTERRUPT, which
/// virtio-queue does not look at).
pub(crate) fn wants_interrupt(q: &mut Queue, mem: &GuestMemory, name: &str) -> Result<bool, Fatal> {
    if q.event_idx_enabled() {
        q.needs_notification(mem)
            .map_err(|e| Fatal(format!("{name} queue: reading used_event: {e}")))
    } else {
        let flags: u16 = mem
            .load(GuestAddress(q.avail_ring()), Ordering::Acquire)
            .map_err(|e| {
                Fatal(format!(
                    "{name} queue: reading the available ring flags: {e}"
                ))
            })?;
        Ok(u16::from_le(flags) & VRING_AVAIL_F_NO_INTERRUPT as u16 == 0)
    }
}

#[cfg(test)]
mod tests {
    use virtio_queue::desc::split::Descriptor as SplitDescriptor;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;

    use super::*;

    fn empty_descriptors(n: usize) -> Vec<RawDescriptor> {
        (0..n)
            .map(|_| RawDescriptor::from(SplitDescriptor::new(0x20_0000, 0, 0, 0)))
            .collect()
    }

    /// Empty descriptors count: skipping them uncounted let a chain of
    /// thousands keep the datapath walking.
    #[test]
    fn a_chain_of_more_descriptors_than_the_bound_is_too_large_even_when_empty() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
        let ring = MockSplitQueue::new(&mem, 2048);
        let mut data = empty_descriptors(MAX_SEGS);
        data.push(RawDescriptor::from(SplitDescriptor::new(
            0x20_0000, 64, 0, 0,
        )));
        let chain = ring.build_desc_chain(&data).unwrap();
        let mut segs = Vec::new();
        assert!(matches!(
            parse_chain(chain, &mem, &mut segs),
            Err(Fault::TooLarge)
        ));
        let mut data = empty_descriptors(MAX_SEGS - 1);
        data.push(RawDescriptor::from(SplitDescriptor::new(
            0x20_0000, 64, 0, 0,
        )));
        let chain = ring.build_desc_chain(&data).unwrap();
        let mut segs = Vec::new();
        parse_chain(chain, &mem, &mut segs).unwrap();
        assert_eq!(seg_total(&segs), 64);
    }
}
