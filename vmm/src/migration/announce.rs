//! Making the guest's new location known after a migration.

use std::sync::PoisonError;

use crate::devices::net::NetDevice;

/// Tells switches where the guest's MAC now lives: through the guest when
/// it acked GUEST_ANNOUNCE (it sends gratuitous ARPs), else a RARP frame.
pub fn announce(net: &NetDevice) {
    let mut dev = net.device.lock().unwrap_or_else(PoisonError::into_inner);
    if dev.announce() {
        tracing::info!("{}: asked the guest to announce itself", net.id);
        return;
    }
    let tap = dev.tap();
    if tap.get().is_none() {
        // A vhost-user backend sends its frames itself; announce() above
        // already asked it to (SEND_RARP) where it could.
        tracing::info!("{}: the backend announces the guest", net.id);
        return;
    }
    let mac = dev.mac();
    let mut frame = vec![0u8; 60];
    frame[0..6].copy_from_slice(&[0xff; 6]);
    frame[6..12].copy_from_slice(&mac);
    frame[12..14].copy_from_slice(&0x8035u16.to_be_bytes()); // RARP
    frame[14..16].copy_from_slice(&1u16.to_be_bytes()); // Ethernet
    frame[16..18].copy_from_slice(&0x0800u16.to_be_bytes()); // IPv4
    frame[18] = 6;
    frame[19] = 4;
    frame[20..22].copy_from_slice(&3u16.to_be_bytes()); // reverse request
    frame[22..28].copy_from_slice(&mac);
    frame[32..38].copy_from_slice(&mac);
    let mut buf = Vec::with_capacity(72);
    if tap.has_vnet_hdr() {
        buf.extend_from_slice(&[0u8; godwit_devices::net::tap::VNET_HDR_LEN]);
    }
    buf.extend_from_slice(&frame);
    match tap.write(&buf) {
        Ok(_) => tracing::info!(
            "{}: sent a RARP announcement for {}",
            net.id,
            crate::config::net_spec::format_mac(&mac)
        ),
        Err(e) => tracing::warn!("{}: cannot send the RARP announcement: {e}", net.id),
    }
}
