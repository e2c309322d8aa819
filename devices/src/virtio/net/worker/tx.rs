//! The transmit side of the datapath: the guest's chains to the TAP, one
//! `writev` straight from guest memory per frame.

use std::io;

use virtio_queue::{QueueOwnedT, QueueT};

use super::*;

impl Worker {
    pub(super) fn process_tx(&mut self) -> Result<(), Fatal> {
        if self.tx_blocked {
            return Ok(());
        }
        let mut budget = TX_BUDGET;
        loop {
            self.tx
                .disable_notification(&self.mem)
                .map_err(ring_err("transmit", "disabling notifications"))?;
            while budget > 0 {
                let Some(chain) = self
                    .tx
                    .iter(&self.mem)
                    .map_err(ring_err("transmit", "reading the available ring"))?
                    .next()
                else {
                    break;
                };
                budget -= 1;
                let head = chain.head_index();
                self.segs.clear();
                let parsed = parse_chain(chain, &self.mem, &mut self.segs);
                if !self.transmit(head, parsed)? {
                    // The TAP is full: the chain was put back.
                    self.signal_used(TX_QUEUE)?;
                    return Ok(());
                }
            }
            self.signal_used(TX_QUEUE)?;
            if budget == 0 {
                // Let the other events run; come back through our own eventfd.
                if let Err(e) = self.tx_evt.write(1) {
                    tracing::error!(tap = self.tap.name(), "cannot reschedule transmission: {e}");
                }
                return Ok(());
            }
            if !self
                .tx
                .enable_notification(&self.mem)
                .map_err(ring_err("transmit", "enabling notifications"))?
            {
                return Ok(());
            }
        }
    }

    /// Sends the chain parsed into `self.segs`. Ok(false) when the TAP would block (chain put back).
    fn transmit(&mut self, head: u16, parsed: Result<(), Fault>) -> Result<bool, Fatal> {
        let mut fault = parsed.err();
        let total = seg_total(&self.segs);
        if fault.is_none() {
            fault = if self.segs.iter().any(|s| s.write) {
                Some(Fault::WrongDirection)
            } else if total < NET_HDR_LEN {
                Some(Fault::TooShort)
            } else if total > TX_MAX_LEN {
                Some(Fault::TooLarge)
            } else {
                None
            };
        }
        if let Some(f) = fault {
            self.tx_drop(
                head,
                f,
                format_args!("dropping a transmit chain (head {head}): {}", f.name()),
            )?;
            return Ok(true);
        }
        let skip = if self.vnet_hdr { 0 } else { NET_HDR_LEN };
        if !build_iovecs(&self.mem, &self.segs, skip, &mut self.iov, &mut self.guards) {
            self.tx_drop(
                head,
                Fault::TooLarge,
                format_args!("transmit chain (head {head}) has too many pieces"),
            )?;
            return Ok(true);
        }
        // SAFETY: the iovecs point into guest memory mapped by `self.mem`
        // (ranges checked by parse_chain and resolved by get_slices), which
        // stays mapped for the whole call; the kernel only reads them.
        let res = unsafe { self.tap.writev(&self.iov) };
        self.iov.clear();
        self.guards.clear();
        match res {
            Ok(_) => {
                self.count_tx(total - NET_HDR_LEN);
                self.add_used(TX_QUEUE, head, 0)?;
                Ok(true)
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                self.tx.go_to_previous_position();
                self.tx_blocked = true;
                self.update_tap_interest();
                Ok(false)
            }
            Err(e) => {
                self.tx_drop(
                    head,
                    Fault::Peer,
                    format_args!(
                        "the TAP refused a frame of {} bytes: {e}",
                        total - NET_HDR_LEN
                    ),
                )?;
                Ok(true)
            }
        }
    }

    fn tx_drop(&mut self, head: u16, f: Fault, msg: std::fmt::Arguments<'_>) -> Result<(), Fatal> {
        self.shared.counters.tx_fault(f);
        self.log_limited(LOG_TX + f as usize, msg);
        self.add_used(TX_QUEUE, head, 0)
    }
}
