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
            } else if total < self.hdr_len {
                Some(Fault::TooShort)
            } else if total > TX_MAX_LEN {
                Some(Fault::TooLarge)
            } else if self.hdr_len == hdr::TUNNEL_LEN && !self.tunnel_header_ok(total) {
                Some(Fault::BadHeader)
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
        let skip = if self.vnet_hdr { 0 } else { self.hdr_len };
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
                self.count_tx(total - self.hdr_len);
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
                        total - self.hdr_len
                    ),
                )?;
                Ok(true)
            }
        }
    }

    /// With the tunnel header negotiated, checks what the guest's header
    /// says about a UDP tunnel against what was negotiated and against the
    /// frame (`total` bytes, header included) before the kernel sees it: a
    /// tunnel gso_type only with HOST_UDP_TUNNEL_GSO, one outer family, an
    /// inner TCP or UDP segmentation, the outer transport header and the
    /// inner network header inside the frame and in that order, the outer
    /// checksum flag only with HOST_UDP_TUNNEL_GSO_CSUM.
    fn tunnel_header_ok(&self, total: usize) -> bool {
        let mut h = [0u8; hdr::TUNNEL_LEN];
        if read_from_segs(&self.mem, &self.segs, &mut h) < hdr::TUNNEL_LEN {
            return false;
        }
        check_tunnel_header(
            &h,
            total - hdr::TUNNEL_LEN,
            self.host_tunnel,
            self.host_tunnel_csum,
        )
    }

    fn tx_drop(&mut self, head: u16, f: Fault, msg: std::fmt::Arguments<'_>) -> Result<(), Fatal> {
        self.shared.counters.tx_fault(f);
        self.log_limited(LOG_TX + f as usize, msg);
        self.add_used(TX_QUEUE, head, 0)
    }
}

/// [`Worker::tunnel_header_ok`] on a header `h` in front of a frame of
/// `frame` bytes (header excluded).
pub(crate) fn check_tunnel_header(
    h: &[u8; hdr::TUNNEL_LEN],
    frame: usize,
    host_tunnel: bool,
    host_tunnel_csum: bool,
) -> bool {
    let (flags, gso_type) = (h[0], h[1]);
    let tunnel = gso_type & hdr::GSO_UDP_TUNNEL;
    if tunnel == 0 {
        // No tunnel: the outer checksum flag means nothing and is refused.
        return flags & hdr::F_UDP_TUNNEL_CSUM == 0;
    }
    if !host_tunnel || tunnel == hdr::GSO_UDP_TUNNEL {
        return false;
    }
    if flags & hdr::F_UDP_TUNNEL_CSUM != 0 && !host_tunnel_csum {
        return false;
    }
    let inner = u32::from(gso_type & !(hdr::GSO_UDP_TUNNEL | VIRTIO_NET_HDR_GSO_ECN as u8));
    if !matches!(
        inner,
        VIRTIO_NET_HDR_GSO_TCPV4 | VIRTIO_NET_HDR_GSO_TCPV6 | VIRTIO_NET_HDR_GSO_UDP_L4
    ) {
        return false;
    }
    let at = |o: usize| usize::from(u16::from_le_bytes([h[o], h[o + 1]]));
    let (outer_th, inner_nh) = (at(hdr::OUTER_TH_OFFSET), at(hdr::INNER_NH_OFFSET));
    // An outer UDP header (8 bytes) at outer_th, the inner network header
    // after it, and inner headers inside the frame.
    const UDP_HDR: usize = 8;
    outer_th >= ETH_AND_MIN_IP && outer_th + UDP_HDR <= inner_nh && inner_nh < frame
}

/// An Ethernet header and the smallest IPv4 header: no outer transport
/// header starts before.
const ETH_AND_MIN_IP: usize = 14 + 20;
