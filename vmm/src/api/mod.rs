//! The management API: QMP-style JSON over a Unix stream socket.
//!
//! Anyone who knows QEMU's QMP knows this protocol:
//!
//! ```text
//! S: {"QMP": {"version": {"godwit": {"major": 0, "minor": 1, "micro": 0}, "package": "godwit 0.1.0"}, "capabilities": []}}
//! C: {"execute": "qmp_capabilities"}
//! S: {"return": {}}
//! C: {"execute": "stop", "id": 7}
//! S: {"return": {}, "id": 7}
//! S: {"event": "STOP", "data": {}, "timestamp": {"seconds": 1700000000, "microseconds": 12}}
//! ```
//!
//! The protocol layer ([`ApiServer`]) handles framing, capabilities
//! negotiation, `qmp_capabilities` and `query-commands`; the VM core supplies
//! the commands through a [`CommandHandler`] and sends events through an
//! [`EventSender`]. [`QmpClient`] and [`run_ctl`] are the client side, used by
//! `godwit ctl`.
//!
//! Responses and events are single-line JSON terminated by `\n`. Input
//! objects may span lines or share one; after a JSON syntax error the input
//! up to the next newline is discarded and the connection stays usable.

mod args;
pub mod client;
mod framing;
pub mod plan;
mod protocol;
mod server;

#[cfg(test)]
mod tests;

pub use args::{no_args, parse_args};
pub use client::{run_ctl, ClientError, QmpClient};
pub use protocol::{CommandHandler, ErrorClass, QmpError, QMP_CAPABILITIES, QUERY_COMMANDS};
pub use server::{
    ApiError, ApiServer, EventSender, MAX_CONNECTIONS, MAX_INPUT_SIZE, MAX_QUEUED_EVENTS,
    SHUTDOWN_FLUSH_TIMEOUT, WRITE_TIMEOUT,
};
