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

/// The VXLAN port (IANA).
pub const VXLAN_PORT: u16 = 4789;
/// Offsets in frames built by [`vxlan_tcp_frame`]: the outer UDP header,
/// the inner IPv4 header, the inner TCP header, the payload.
pub const VXLAN_OUTER_UDP: usize = ETH_HLEN + IPV4_HLEN;
pub const VXLAN_INNER_IP: usize = VXLAN_OUTER_UDP + UDP_HLEN + 8 + ETH_HLEN;
pub const VXLAN_INNER_TCP: usize = VXLAN_INNER_IP + IPV4_HLEN;
pub const VXLAN_PAYLOAD: usize = VXLAN_INNER_TCP + 20;

/// Addresses of the two layers of a VXLAN frame.
#[derive(Clone, Copy, Debug)]
pub struct VxlanAddrs {
    pub outer_src_mac: [u8; 6],
    pub outer_dst_mac: [u8; 6],
    pub outer_src: Ipv4Addr,
    pub outer_dst: Ipv4Addr,
    pub vni: u32,
    pub inner_src_mac: [u8; 6],
    pub inner_dst_mac: [u8; 6],
    pub inner_src: Ipv4Addr,
    pub inner_dst: Ipv4Addr,
    pub sport: u16,
    pub dport: u16,
}

fn ipv4_header(out: &mut [u8], total: usize, proto: u8, src: Ipv4Addr, dst: Ipv4Addr) {
    out[0] = 0x45;
    out[2..4].copy_from_slice(&u16::try_from(total).unwrap_or(u16::MAX).to_be_bytes());
    out[6] = 0x40; // DF
    out[8] = 64;
    out[9] = proto;
    out[12..16].copy_from_slice(&src.octets());
    out[16..20].copy_from_slice(&dst.octets());
    let sum = !csum_fold(csum_add(0, &out[..IPV4_HLEN]));
    out[10..12].copy_from_slice(&sum.to_be_bytes());
}

/// An Ethernet + IPv4 + UDP (VXLAN, no outer checksum) frame carrying an
/// Ethernet + IPv4 + TCP segment of `payload` at sequence `seq` (ACK|PSH),
/// as a guest hands a tunnel GSO super-frame to its NIC: lengths cover the
/// whole frame, header checksums are complete, and the inner TCP checksum
/// holds only the pseudo-header sum (the device completes it per segment:
/// VIRTIO_NET_HDR_F_NEEDS_CSUM at [`VXLAN_INNER_TCP`], offset 16).
pub fn vxlan_tcp_frame(a: &VxlanAddrs, seq: u32, payload: &[u8]) -> Vec<u8> {
    let len = VXLAN_PAYLOAD + payload.len();
    let mut f = vec![0u8; len];
    f[0..6].copy_from_slice(&a.outer_dst_mac);
    f[6..12].copy_from_slice(&a.outer_src_mac);
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    ipv4_header(
        &mut f[ETH_HLEN..],
        len - ETH_HLEN,
        17,
        a.outer_src,
        a.outer_dst,
    );
    let u = VXLAN_OUTER_UDP;
    f[u..u + 2].copy_from_slice(&49152u16.to_be_bytes());
    f[u + 2..u + 4].copy_from_slice(&VXLAN_PORT.to_be_bytes());
    f[u + 4..u + 6].copy_from_slice(&u16::try_from(len - u).unwrap_or(u16::MAX).to_be_bytes());
    let v = u + UDP_HLEN;
    f[v] = 0x08; // VNI present
    f[v + 4..v + 7].copy_from_slice(&a.vni.to_be_bytes()[1..]);
    let e = v + 8;
    f[e..e + 6].copy_from_slice(&a.inner_dst_mac);
    f[e + 6..e + 12].copy_from_slice(&a.inner_src_mac);
    f[e + 12..e + 14].copy_from_slice(&0x0800u16.to_be_bytes());
    ipv4_header(
        &mut f[VXLAN_INNER_IP..],
        len - VXLAN_INNER_IP,
        6,
        a.inner_src,
        a.inner_dst,
    );
    let t = VXLAN_INNER_TCP;
    f[t..t + 2].copy_from_slice(&a.sport.to_be_bytes());
    f[t + 2..t + 4].copy_from_slice(&a.dport.to_be_bytes());
    f[t + 4..t + 8].copy_from_slice(&seq.to_be_bytes());
    f[t + 8..t + 12].copy_from_slice(&1u32.to_be_bytes());
    f[t + 12] = 5 << 4;
    f[t + 13] = 0x18; // ACK|PSH
    f[t + 14..t + 16].copy_from_slice(&65535u16.to_be_bytes());
    let partial = csum_fold(pseudo_sum(a.inner_src, a.inner_dst, 6, len - t));
    f[t + 16..t + 18].copy_from_slice(&partial.to_be_bytes());
    f[VXLAN_PAYLOAD..].copy_from_slice(payload);
    f
}

/// What a VXLAN + TCP frame holds, and whether its checksums are right.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VxlanTcpView {
    pub outer_dst: Ipv4Addr,
    pub outer_dport: u16,
    pub vni: u32,
    pub inner_dst: Ipv4Addr,
    pub dport: u16,
    pub seq: u32,
    pub payload: Vec<u8>,
    /// Outer and inner IPv4 header checksums, and the inner TCP checksum,
    /// all complete and right; the lengths match the frame.
    pub checksums_ok: bool,
    pub lengths_ok: bool,
}

/// Parses a frame built like [`vxlan_tcp_frame`] (no options).
pub fn parse_vxlan_tcp(f: &[u8]) -> Option<VxlanTcpView> {
    if f.len() < VXLAN_PAYLOAD || f[12..14] != [8, 0] || f[ETH_HLEN + 9] != 17 {
        return None;
    }
    let u = VXLAN_OUTER_UDP;
    let be16 = |at: usize| usize::from(u16::from_be_bytes([f[at], f[at + 1]]));
    if be16(u + 2) != usize::from(VXLAN_PORT) || f[VXLAN_INNER_IP + 9] != 6 {
        return None;
    }
    let ip = |at: usize| Ipv4Addr::new(f[at], f[at + 1], f[at + 2], f[at + 3]);
    let len = f.len();
    let lengths_ok = be16(ETH_HLEN + 2) == len - ETH_HLEN
        && be16(u + 4) == len - u
        && be16(VXLAN_INNER_IP + 2) == len - VXLAN_INNER_IP;
    let t = VXLAN_INNER_TCP;
    let ip_ok = |at: usize| csum_fold(csum_add(0, &f[at..at + IPV4_HLEN])) == 0xffff;
    let tcp_sum = csum_add(
        pseudo_sum(ip(VXLAN_INNER_IP + 12), ip(VXLAN_INNER_IP + 16), 6, len - t),
        &f[t..],
    );
    let checksums_ok = ip_ok(ETH_HLEN) && ip_ok(VXLAN_INNER_IP) && csum_fold(tcp_sum) == 0xffff;
    let v = u + UDP_HLEN;
    Some(VxlanTcpView {
        outer_dst: ip(ETH_HLEN + 16),
        outer_dport: VXLAN_PORT,
        vni: u32::from_be_bytes([0, f[v + 4], f[v + 5], f[v + 6]]),
        inner_dst: ip(VXLAN_INNER_IP + 16),
        dport: u16::from_be_bytes([f[t + 2], f[t + 3]]),
        seq: u32::from_be_bytes([f[t + 4], f[t + 5], f[t + 6], f[t + 7]]),
        payload: f[VXLAN_PAYLOAD..].to_vec(),
        checksums_ok,
        lengths_ok,
    })
}
