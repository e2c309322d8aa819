//! Host capability reports (`godwit host-caps`, QMP `query-host-caps`): what
//! a host offers a VM, as a versioned JSON document that a planner on
//! another machine reads (see docs/host-caps-schema.md).
//!
//! [`types`] is the report, [`probe`] takes this host's, [`read`] reads one
//! (refusing reports of a newer schema version, naming the file and the
//! JSON path of every malformed field); [`encoding`] spells feature sets
//! and CPUID entries.

pub mod encoding;
pub mod probe;
pub mod read;
pub mod types;

pub use encoding::{cpuid_entry_text, hex64, name_list, parse_cpuid_entry, parse_hex};
pub use probe::{collect, vhost_user_entry, VhostUserOffer};
pub use read::{
    decode, parse_report, read_report_file, report_from_value, FieldError, FieldProblem,
    ReportError,
};
pub use types::*;

#[cfg(test)]
mod tests;
