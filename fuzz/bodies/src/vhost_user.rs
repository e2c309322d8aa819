//! What a vhost-user backend tells godwit's frontend.

use godwit_devices::vhost_user::interface::InterfaceRecord;

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
