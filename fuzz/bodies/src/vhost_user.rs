//! What a vhost-user backend tells godwit's frontend.

use std::io::Write;
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use godwit_devices::vhost_user::conn::Connection;
use godwit_devices::vhost_user::interface::{self, InterfaceRecord};
use godwit_devices::vhost_user::session::handshake;

/// The interface record a backend reports in its config window.
pub fn vhost_user_record(data: &[u8]) {
    if let Ok(record) = InterfaceRecord::decode(data) {
        // What decodes must encode and decode to the same record.
        // Room for the values in their canonical (possibly longer) form.
        let size = data.len() * 2 + 4096;
        let again = InterfaceRecord::decode(&record.encode(size));
        assert_eq!(again.as_ref(), Ok(&record), "a decoded record re-encodes");
    }
}

/// A backend's replies to godwit's frontend handshake. The first byte
/// picks what the frontend pins (nothing, the latest interface, an unknown
/// name); the rest is everything the backend sends, after which it stops
/// sending (reads then end at once instead of waiting out the deadline).
pub fn vhost_user_replies(data: &[u8]) {
    let Some((&control, replies)) = data.split_first() else {
        return;
    };
    let latest = interface::latest().name;
    let pin = match control % 3 {
        0 => None,
        1 => Some(latest),
        _ => Some("godwit-net-0"),
    };
    let Ok((ours, mut backend)) = UnixStream::pair() else {
        return;
    };
    if backend.write_all(replies).is_err() || backend.shutdown(Shutdown::Write).is_err() {
        return;
    }
    let conn = Connection::new(ours, "fuzz".to_string(), Duration::from_millis(200));
    let _ = handshake(conn, pin);
}
