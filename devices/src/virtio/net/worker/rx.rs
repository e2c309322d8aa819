//! The receive side of the datapath: frames from the TAP into the guest's
//! receive buffers, straight into a large enough chain or through the
//! bounce buffer into as many chains as the frame needs (MRG_RXBUF).

use std::io;

use virtio_queue::{QueueOwnedT, QueueT};

use super::*;

impl Worker {
    pub(super) fn rx_kick(&mut self) -> Result<(), Fatal> {
        if self.rx_starved {
            self.rx_starved = false;
            // Buffers arrive while we read the TAP: no kicks needed for now.
            self.rx
                .disable_notification(&self.mem)
                .map_err(ring_err("receive", "disabling notifications"))?;
            self.update_tap_interest();
        }
        self.process_rx()
    }

    /// Arms the receive notification for buffers beyond available index
    /// `seen` and stops polling the TAP. Ok(true) if buffers beyond `seen`
    /// arrived meanwhile (keep going instead).
    fn starve(&mut self, seen: u16) -> Result<bool, Fatal> {
        let next = self.rx.next_avail();
        self.rx.set_next_avail(seen);
        let more = self.rx.enable_notification(&self.mem);
        self.rx.set_next_avail(next);
        if more.map_err(ring_err("receive", "enabling notifications"))? {
            return Ok(true);
        }
        self.rx_starved = true;
        self.update_tap_interest();
        Ok(false)
    }

    pub(super) fn process_rx(&mut self) -> Result<(), Fatal> {
        if self.pair != 0 {
            // The first pair's thread serves the control queue, which may
            // have switched the guest's checksum offload.
            self.guest_csum =
                self.shared.guest_offloads.load() & feature(VIRTIO_NET_F_GUEST_CSUM) != 0;
        }
        let mut frames = 0;
        while frames < RX_BUDGET {
            if self.pending > 0 {
                match self.deliver_pending()? {
                    Delivery::Done | Delivery::Dropped => frames += 1,
                    Delivery::NoRoom(seen) => {
                        if !self.starve(seen)? {
                            break;
                        }
                    }
                }
                continue;
            }
            if self.tap_gone || self.rx_starved || !self.enabled {
                break;
            }
            match self.read_frame()? {
                ReadStep::Delivered => frames += 1,
                ReadStep::Pending => {}
                ReadStep::NoBuffers(seen) => {
                    if !self.starve(seen)? {
                        break;
                    }
                }
                ReadStep::Empty => break,
            }
        }
        self.signal_used(RX_QUEUE)
    }

    /// Pops the next chain and parses it as a receive buffer.
    /// Ok(None): no chain available. Ok(Some(Err)): a bad chain (popped).
    fn pop_rx_chain(&mut self) -> Result<Option<PoppedRx>, Fatal> {
        let Some(chain) = self
            .rx
            .iter(&self.mem)
            .map_err(ring_err("receive", "reading the available ring"))?
            .next()
        else {
            return Ok(None);
        };
        let head = chain.head_index();
        let start = self.segs.len();
        let res = parse_chain(chain, &self.mem, &mut self.segs).and_then(|()| {
            let segs = &self.segs[start..];
            if segs.iter().any(|s| !s.write) {
                Err(Fault::WrongDirection)
            } else if seg_total(segs) < self.hdr_len {
                Err(Fault::TooShort)
            } else {
                Ok(())
            }
        });
        Ok(Some(match res {
            Ok(()) => Ok(RxChain {
                head,
                segs: (start, self.segs.len()),
                cap: seg_total(&self.segs[start..]),
            }),
            Err(f) => {
                self.segs.truncate(start);
                Err((head, f))
            }
        }))
    }

    fn return_bad_rx(&mut self, head: u16, f: Fault) -> Result<(), Fatal> {
        self.shared.counters.rx_fault(f);
        self.log_limited(
            LOG_RX + f as usize,
            format_args!(
                "returning a bad receive chain (head {head}) unused: {}",
                f.name()
            ),
        );
        self.add_used(RX_QUEUE, head, 0)
    }

    /// Gives the held chains back to the available ring (they are the last
    /// ones popped, so moving next_avail back returns them in order).
    pub(super) fn release_held(&mut self) {
        if self.held.is_empty() {
            return;
        }
        let n = u16::try_from(self.held.len()).unwrap_or(u16::MAX);
        self.rx.set_next_avail(self.rx.next_avail().wrapping_sub(n));
        self.held.clear();
        self.held_segs.clear();
        self.held_iov.clear();
        self.held_guards.clear();
        self.held_cap = 0;
    }

    /// Pops chains until the held ones can take any frame the TAP can
    /// deliver. False when they cannot (too few buffers, or a bad chain
    /// right after held ones): then nothing is held any more.
    fn fill_held(&mut self) -> Result<bool, Fatal> {
        while self.held_cap < RX_BUF_LEN {
            self.segs.clear();
            match self.pop_rx_chain()? {
                None => break,
                Some(Err((head, f))) => {
                    if self.held.is_empty() {
                        self.return_bad_rx(head, f)?;
                        continue;
                    }
                    // Held chains must stay consecutive in the ring: leave
                    // this one for the bounce path, which returns it.
                    self.rx.go_to_previous_position();
                    break;
                }
                Some(Ok(c)) => {
                    let segs = &self.segs[c.segs.0..c.segs.1];
                    if !build_iovecs(&self.mem, segs, 0, &mut self.iov, &mut self.guards)
                        || self.held_iov.len() + self.iov.len() > MAX_SEGS
                    {
                        self.iov.clear();
                        self.guards.clear();
                        self.rx.go_to_previous_position();
                        break;
                    }
                    self.held.push(HeldChain {
                        head: c.head,
                        cap: c.cap,
                        segs: segs.len(),
                        iovs: self.iov.len(),
                        guards: self.guards.len(),
                    });
                    self.held_segs.extend_from_slice(segs);
                    self.held_iov.append(&mut self.iov);
                    self.held_guards.append(&mut self.guards);
                    self.held_cap += c.cap;
                }
            }
        }
        self.segs.clear();
        if self.held_cap < RX_BUF_LEN {
            self.release_held();
            return Ok(false);
        }
        Ok(true)
    }

    /// MRG_RXBUF with the TAP's own virtio-net header: reads the next frame
    /// with one `readv` straight into the held chains (no bounce copy) and
    /// uses as many of them as it filled. None: not enough buffers held;
    /// the bounce path takes over.
    fn read_held(&mut self) -> Result<Option<ReadStep>, Fatal> {
        if !self.fill_held()? {
            return Ok(None);
        }
        // SAFETY: the iovecs point into guest memory mapped by `self.mem`
        // (ranges checked by parse_chain, resolved by get_slices; guest RAM
        // stays mapped while the device runs); the chains are
        // device-writable and popped by this device, so the guest expects
        // the device to write there.
        let res = unsafe { self.tap.readv(&self.held_iov) };
        let n = match res {
            Ok(n) => n,
            Err(e) => return self.tap_read_error(e).map(Some),
        };
        if n > self.held_cap || n <= self.hdr_len {
            // Truncated (the TAP reports the full length) or empty; the held
            // chains stay held for the next frame.
            let held_cap = self.held_cap;
            self.rx_frame_lost(
                Fault::Peer,
                format_args!(
                    "the TAP delivered a frame of {n} bytes that does not fit {held_cap} bytes of receive buffers"
                ),
            );
            return Ok(Some(ReadStep::Delivered));
        }
        // The chains the frame filled, first to last.
        let mut batch = std::mem::take(&mut self.batch);
        batch.clear();
        let (mut left, mut segs, mut iovs, mut guards, mut cap) = (n, 0, 0, 0, 0);
        for c in &self.held {
            if left == 0 {
                break;
            }
            let w = left.min(c.cap);
            batch.push((c.head, w as u32));
            left -= w;
            segs += c.segs;
            iovs += c.iovs;
            guards += c.guards;
            cap += c.cap;
        }
        let used = batch.len();
        let first_segs = self.held.first().map_or(0, |c| c.segs);
        let first = &self.held_segs[..first_segs];
        // The TAP wrote the header with num_buffers 0.
        if !self.guest_csum {
            write_to_segs(&self.mem, first, 0, &[0], false);
        }
        let count = u16::try_from(used).unwrap_or(u16::MAX);
        write_to_segs(&self.mem, first, 10, &count.to_le_bytes(), false);
        // Marked after the writes (see Shared::tracking).
        if self.shared.tracking() {
            mark_dirty(&self.mem, &self.held_segs[..segs], 0, n);
        }
        let res = self.add_used_rx_batch(&batch);
        self.batch = batch;
        res?;
        self.held.drain(..used);
        self.held_segs.drain(..segs);
        self.held_iov.drain(..iovs);
        self.held_guards.drain(..guards);
        self.held_cap -= cap;
        self.count_rx(n - self.hdr_len);
        Ok(Some(ReadStep::Delivered))
    }

    /// Reads the next frame from the TAP: into held chains (MRG_RXBUF with
    /// the TAP's header), straight into the first chain when it can hold any
    /// frame, else into the bounce buffer.
    fn read_frame(&mut self) -> Result<ReadStep, Fatal> {
        if self.mrg_rxbuf && self.vnet_hdr {
            if let Some(step) = self.read_held()? {
                return Ok(step);
            }
        }
        self.segs.clear();
        let first = loop {
            match self.pop_rx_chain()? {
                None => return Ok(ReadStep::NoBuffers(self.rx.next_avail())),
                Some(Err((head, f))) => self.return_bad_rx(head, f)?,
                Some(Ok(c)) => break c,
            }
        };
        let skip = if self.vnet_hdr { 0 } else { self.hdr_len };
        if first.cap >= RX_BUF_LEN {
            return self.read_direct(first, skip);
        }
        // Put the chain back: the bounce path collects chains itself.
        self.rx.go_to_previous_position();
        let res = if self.vnet_hdr {
            self.tap.read(&mut self.bounce)
        } else {
            let hdr_len = self.hdr_len;
            self.bounce[..hdr_len].fill(0);
            self.tap.read(&mut self.bounce[hdr_len..])
        };
        match res {
            Ok(n) if n + skip > self.bounce.len() => {
                self.rx_frame_lost(Fault::Peer, format_args!("the TAP delivered a frame of {n} bytes, larger than godwit's {RX_BUF_LEN}-byte buffer; it was truncated and dropped"));
                Ok(ReadStep::Delivered)
            }
            Ok(n) if n + skip <= self.hdr_len => {
                self.rx_frame_lost(
                    Fault::Peer,
                    format_args!("the TAP delivered an empty frame"),
                );
                Ok(ReadStep::Delivered)
            }
            Ok(n) => {
                self.pending = n + skip;
                Ok(ReadStep::Pending)
            }
            Err(e) => self.tap_read_error(e),
        }
    }

    fn tap_read_error(&mut self, e: io::Error) -> Result<ReadStep, Fatal> {
        if e.kind() == io::ErrorKind::WouldBlock {
            return Ok(ReadStep::Empty);
        }
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok(ReadStep::Pending);
        }
        self.log_limited(LOG_TAP_READ, format_args!("reading the TAP failed: {e}"));
        if e.raw_os_error() == Some(libc::EBADFD) {
            self.tap_gone = true;
            self.update_tap_interest();
        }
        Ok(ReadStep::Empty)
    }

    fn rx_frame_lost(&mut self, f: Fault, msg: std::fmt::Arguments<'_>) {
        self.shared.counters.rx_fault(f);
        self.log_limited(LOG_RX + f as usize, msg);
    }

    fn read_direct(&mut self, chain: RxChain, skip: usize) -> Result<ReadStep, Fatal> {
        let segs = &self.segs[chain.segs.0..chain.segs.1];
        if !build_iovecs(&self.mem, segs, skip, &mut self.iov, &mut self.guards) {
            self.segs.truncate(chain.segs.0);
            self.return_bad_rx(chain.head, Fault::TooLarge)?;
            return Ok(ReadStep::Delivered);
        }
        // SAFETY: the iovecs point into guest memory mapped by `self.mem`
        // (ranges checked by parse_chain, resolved by get_slices) that stays
        // mapped for the call; the chain is device-writable, so the guest
        // expects the device to write there.
        let res = unsafe { self.tap.readv(&self.iov) };
        self.iov.clear();
        self.guards.clear();
        let n = match res {
            Ok(n) => n,
            Err(e) => {
                self.rx.go_to_previous_position();
                return self.tap_read_error(e);
            }
        };
        let segs = &self.segs[chain.segs.0..chain.segs.1];
        let written = n.min(chain.cap - skip);
        if n + skip > chain.cap || n + skip <= self.hdr_len {
            if self.shared.tracking() {
                mark_dirty(&self.mem, segs, skip, written);
            }
            // Truncated (the TAP reports the full length) or empty.
            self.rx_frame_lost(
                Fault::Peer,
                format_args!(
                    "the TAP delivered a frame of {n} bytes that does not fit a {}-byte buffer",
                    chain.cap
                ),
            );
            self.add_used(RX_QUEUE, chain.head, 0)?;
            return Ok(ReadStep::Delivered);
        }
        if self.vnet_hdr {
            // The TAP wrote the header and zeroed num_buffers.
            if !self.guest_csum {
                write_to_segs(&self.mem, segs, 0, &[0], false);
            }
            write_to_segs(&self.mem, segs, 10, &1u16.to_le_bytes(), false);
        } else {
            let mut hdr = [0u8; hdr::TUNNEL_LEN];
            hdr[10..12].copy_from_slice(&1u16.to_le_bytes());
            write_to_segs(&self.mem, segs, 0, &hdr[..self.hdr_len], false);
        }
        let len = n + skip;
        // Marked after the writes (see Shared::tracking), header included.
        if self.shared.tracking() {
            mark_dirty(&self.mem, segs, 0, len);
        }
        self.count_rx(len - self.hdr_len);
        self.add_used(RX_QUEUE, chain.head, len as u32)?;
        Ok(ReadStep::Delivered)
    }

    /// Places the frame in the bounce buffer into guest buffers.
    fn deliver_pending(&mut self) -> Result<Delivery, Fatal> {
        let len = self.pending;
        self.segs.clear();
        self.chains.clear();
        self.bad.clear();
        let mut cap = 0;
        // Bad chains before the first good one can be returned right away;
        // later ones wait so the frame's buffers stay consecutive in the used
        // ring (MRG_RXBUF's num_buffers counts consecutive entries).
        let mut prefix_end = self.rx.next_avail();
        while cap < len && (self.mrg_rxbuf || self.chains.is_empty()) {
            match self.pop_rx_chain()? {
                None => {
                    let seen = self.rx.next_avail();
                    let examined = seen.wrapping_sub(prefix_end);
                    return self.no_room(prefix_end, seen, examined);
                }
                Some(Err((head, f))) => {
                    if self.chains.is_empty() {
                        self.return_bad_rx(head, f)?;
                        prefix_end = self.rx.next_avail();
                    } else {
                        self.bad.push((head, f));
                    }
                }
                Some(Ok(c)) => {
                    cap += c.cap;
                    self.chains.push(c);
                }
            }
        }
        if cap < len {
            // Without MRG_RXBUF one chain must hold the frame, and this one
            // cannot: an MTU or offload mismatch, or a bad guest. Drop the
            // frame and return the chain unused; putting it back instead
            // would let it block every later frame that does not fit it.
            let small = self.chains[0];
            self.pending = 0;
            self.rx_frame_lost(
                Fault::TooLarge,
                format_args!(
                    "dropping a received frame of {} bytes: the guest's receive buffer holds {cap} \
                     (MTU or offload mismatch?)",
                    len - self.hdr_len
                ),
            );
            self.add_used(RX_QUEUE, small.head, 0)?;
            for (head, f) in std::mem::take(&mut self.bad) {
                self.return_bad_rx(head, f)?;
            }
            return Ok(Delivery::Dropped);
        }
        let count = u16::try_from(self.chains.len()).unwrap_or(u16::MAX);
        self.bounce[10..12].copy_from_slice(&count.to_le_bytes());
        if !self.guest_csum {
            self.bounce[0] = 0;
        }
        let mut offset = 0;
        let mut batch = std::mem::take(&mut self.batch);
        batch.clear();
        for c in &self.chains {
            let n = (len - offset).min(c.cap);
            let segs = &self.segs[c.segs.0..c.segs.1];
            let w = write_to_segs(&self.mem, segs, 0, &self.bounce[offset..offset + n], false);
            offset += n;
            batch.push((c.head, w as u32));
        }
        // Marked after the writes (see Shared::tracking).
        if self.shared.tracking() {
            for (c, &(_, w)) in self.chains.iter().zip(&batch) {
                mark_dirty(&self.mem, &self.segs[c.segs.0..c.segs.1], 0, w as usize);
            }
        }
        let res = self.add_used_rx_batch(&batch);
        self.batch = batch;
        res?;
        for (head, f) in std::mem::take(&mut self.bad) {
            self.return_bad_rx(head, f)?;
        }
        self.pending = 0;
        self.count_rx(len - self.hdr_len);
        Ok(Delivery::Done)
    }

    /// Not enough buffers for the pending frame: put back the chains taken
    /// since `rewind_to`, unless they are the whole ring, in which case the
    /// frame can never fit and is dropped.
    fn no_room(&mut self, rewind_to: u16, seen: u16, examined: u16) -> Result<Delivery, Fatal> {
        self.bad.clear();
        self.rx.set_next_avail(rewind_to);
        if examined >= self.rx.size() {
            let len = self.pending - self.hdr_len;
            self.pending = 0;
            self.rx_frame_lost(Fault::TooLarge, format_args!("dropping a received frame of {len} bytes: it does not fit even the whole receive ring"));
            return Ok(Delivery::Dropped);
        }
        Ok(Delivery::NoRoom(seen))
    }
}
