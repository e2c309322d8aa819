//! Ethernet/IPv4/UDP frame builders and parsers.

use std::net::Ipv4Addr;

pub const ETH_HLEN: usize = 14;
pub const IPV4_HLEN: usize = 20;
pub const UDP_HLEN: usize = 8;
/// Offset of the UDP header in frames built by [`udp_frame`].
pub const UDP_OFFSET: usize = ETH_HLEN + IPV4_HLEN;

/// How [`udp_frame`] fills the UDP checksum.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UdpCsum {
    /// 0: no checksum (allowed for IPv4).
    None,
    /// The complete checksum.
    Full,
    /// Only the pseudo-header sum, as a guest does for checksum offload
    /// (VIRTIO_NET_HDR_F_NEEDS_CSUM with csum_start = UDP_OFFSET, offset 6).
    Partial,
}

/// Ones'-complement sum of `data` (big-endian 16-bit words) added to `sum`.
pub fn csum_add(mut sum: u32, data: &[u8]) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u32::from(*last) << 8;
    }
    sum
}

/// Folds a 32-bit sum to 16 bits.
pub fn csum_fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

fn pseudo_sum(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, len: usize) -> u32 {
    let mut s = csum_add(0, &src.octets());
    s = csum_add(s, &dst.octets());
    s += u32::from(proto);
    s + len as u32
}

/// An Ethernet + IPv4 + UDP frame.
#[allow(clippy::too_many_arguments)]
pub fn udp_frame(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    sport: u16,
    dport: u16,
    payload: &[u8],
    csum: UdpCsum,
) -> Vec<u8> {
    let udp_len = UDP_HLEN + payload.len();
    let ip_len = IPV4_HLEN + udp_len;
    let mut f = Vec::with_capacity(ETH_HLEN + ip_len);
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    let mut ip = [0u8; IPV4_HLEN];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&(ip_len as u16).to_be_bytes());
    ip[6] = 0x40; // DF
    ip[8] = 64;
    ip[9] = 17;
    ip[12..16].copy_from_slice(&src.octets());
    ip[16..20].copy_from_slice(&dst.octets());
    let c = !csum_fold(csum_add(0, &ip));
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&ip);
    let mut udp = Vec::with_capacity(udp_len);
    udp.extend_from_slice(&sport.to_be_bytes());
    udp.extend_from_slice(&dport.to_be_bytes());
    udp.extend_from_slice(&(udp_len as u16).to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(payload);
    let pseudo = pseudo_sum(src, dst, 17, udp_len);
    let value = match csum {
        UdpCsum::None => 0,
        UdpCsum::Full => match !csum_fold(csum_add(pseudo, &udp)) {
            0 => 0xffff,
            v => v,
        },
        UdpCsum::Partial => csum_fold(pseudo),
    };
    udp[6..8].copy_from_slice(&value.to_be_bytes());
    f.extend_from_slice(&udp);
    f
}

/// A parsed IPv4/UDP frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UdpView {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub sport: u16,
    pub dport: u16,
    /// The UDP checksum field.
    pub csum: u16,
    pub payload: Vec<u8>,
    /// The IPv4 header checksum verifies.
    pub ip_csum_ok: bool,
    /// The UDP checksum verifies (or is 0, "none").
    pub udp_csum_ok: bool,
}

/// Parses an Ethernet + IPv4 (no options needed) + UDP frame.
pub fn parse_udp(frame: &[u8]) -> Option<UdpView> {
    if frame.len() < ETH_HLEN + IPV4_HLEN + UDP_HLEN || frame[12..14] != [0x08, 0x00] {
        return None;
    }
    let ip = &frame[ETH_HLEN..];
    let ihl = usize::from(ip[0] & 0xf) * 4;
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    if ip[0] >> 4 != 4
        || ihl < IPV4_HLEN
        || ip[9] != 17
        || total > ip.len()
        || total < ihl + UDP_HLEN
    {
        return None;
    }
    let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
    let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
    let udp = &ip[ihl..total];
    let udp_len = usize::from(u16::from_be_bytes([udp[4], udp[5]]));
    if udp_len < UDP_HLEN || udp_len > udp.len() {
        return None;
    }
    let udp = &udp[..udp_len];
    let csum = u16::from_be_bytes([udp[6], udp[7]]);
    let udp_csum_ok =
        csum == 0 || csum_fold(csum_add(pseudo_sum(src, dst, 17, udp_len), udp)) == 0xffff;
    let mac = |o: usize| {
        let mut m = [0u8; 6];
        m.copy_from_slice(&frame[o..o + 6]);
        m
    };
    Some(UdpView {
        dst_mac: mac(0),
        src_mac: mac(6),
        src,
        dst,
        sport: u16::from_be_bytes([udp[0], udp[1]]),
        dport: u16::from_be_bytes([udp[2], udp[3]]),
        csum,
        payload: udp[UDP_HLEN..].to_vec(),
        ip_csum_ok: csum_fold(csum_add(0, &ip[..ihl])) == 0xffff,
        udp_csum_ok,
    })
}
