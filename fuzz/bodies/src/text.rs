//! Text inputs: API lines, `--net` specs, host-caps reports.

use godwit_vmm::config::net_spec::NetSpec;
use godwit_vmm::planning::host_caps::read::parse_report;

/// Bytes from an API client: framing, request validation, negotiation and
/// every command's arguments (see `godwit_vmm::api::fuzzing`).
pub fn api_line(data: &[u8]) {
    godwit_vmm::api::fuzzing::api_input(data);
}

/// A `--net` spec, as given on the command line or in `query-host-caps`.
pub fn net_spec(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = text.parse::<NetSpec>();
    }
}

/// A host-caps report, as `plan` and `godwit plan` read them.
pub fn host_caps(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = parse_report(text, "fuzz");
    }
}
