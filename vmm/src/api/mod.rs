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
//! Layers, each knowing only the ones below it:
//! - `framing` splits the byte stream into JSON values;
//! - `protocol` validates requests, runs `qmp_capabilities` and
//!   `query-commands`, and writes replies and events; `error` holds the QMP
//!   error classes and `arguments` the typed argument parsing;
//! - `server` ([`ApiServer`]) owns the socket, the connections and event
//!   broadcasting ([`EventSender`]);
//! - [`commands`] is the only layer that knows the VM: it declares every
//!   command as one variant of a typed [`commands::Command`] and runs it.
//!
//! [`QmpClient`] and [`run_ctl`] are the client side, used by `godwit ctl`.
//!
//! Responses and events are single-line JSON terminated by `\n`. Input
//! objects may span lines or share one; after a JSON syntax error the input
//! up to the next newline is discarded and the connection stays usable.
// Requests come from management clients: no cast may silently truncate a value read from them.
#![cfg_attr(not(test), deny(clippy::cast_possible_truncation))]

/// Declares a [`CommandSet`]: an enum with one variant per command, its
/// wire names, and the parser that turns a request into a variant.
///
/// ```text
/// qmp_commands! {
///     pub enum Command {
///         "stop" => Stop,
///         "snapshot-save" => SnapshotSave(SnapshotSaveArgs),
///     }
/// }
/// ```
///
/// A variant without a type takes no arguments and refuses any; a variant
/// with one deserializes the `arguments` object into it (give it
/// `#[serde(deny_unknown_fields)]` to refuse unknown members).
/// `CommandSet::NAMES`, and so `query-commands`, lists the commands in
/// the order declared.
macro_rules! qmp_commands {
    (
        $(#[$meta:meta])*
        $vis:vis enum $enum:ident {
            $( $(#[$vmeta:meta])* $wire:literal => $variant:ident $( ( $args:ty ) )? ),+ $(,)?
        }
    ) => {
        $(#[$meta])*
        $vis enum $enum {
            $( $(#[$vmeta])* $variant $( ($args) )?, )+
        }

        impl $crate::api::CommandSet for $enum {
            const NAMES: &'static [&'static str] = &[$($wire),+];

            fn parse(
                name: &str,
                arguments: &str,
            ) -> Result<Option<Self>, $crate::api::ArgumentError> {
                Ok(Some(match name {
                    $( $wire => qmp_commands!(@variant $enum $variant arguments $( $args )?), )+
                    _ => return Ok(None),
                }))
            }
        }

        impl $enum {
            /// The command's wire name.
            #[allow(dead_code)]
            $vis fn name(&self) -> &'static str {
                match self {
                    $( $enum::$variant { .. } => $wire, )+
                }
            }
        }
    };
    (@variant $enum:ident $variant:ident $text:ident) => {{
        $crate::api::parse_arguments::<$crate::api::NoArguments>($text)?;
        $enum::$variant
    }};
    (@variant $enum:ident $variant:ident $text:ident $args:ty) => {
        $enum::$variant($crate::api::parse_arguments::<$args>($text)?)
    };
}

mod arguments;
pub mod client;
pub mod commands;
mod error;
mod framing;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
mod protocol;
mod server;
mod session;

#[cfg(test)]
mod tests;

pub use arguments::{parse_arguments, ArgumentError, NoArguments};
pub use client::{run_ctl, ClientError, QmpClient};
pub use error::{ErrorClass, QmpError};
pub use protocol::{version_info, CommandHandler, CommandSet, QMP_CAPABILITIES, QUERY_COMMANDS};
pub use server::{
    ApiError, ApiServer, EventSender, ServerOptions, MAX_CONNECTIONS, MAX_INPUT_SIZE,
    MAX_QUEUED_EVENTS, NEGOTIATION_TIMEOUT, SHUTDOWN_FLUSH_TIMEOUT, SOCKET_MODE, WRITE_TIMEOUT,
};
pub use session::{DescriptorError, Session, MAX_DESCRIPTORS};
