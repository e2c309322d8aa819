//! The API's input path without a socket or a VM, for the fuzz targets in
//! `fuzz/` and their corpus replay test: bytes go through the framer, each
//! value through request validation and `qmp_capabilities`, and every
//! command's arguments through its typed parser, as a connection's would.
//! Commands are parsed, never run; the only ones whose arguments carry more
//! to parse (`query-host-caps` specs, `plan` reports) have that parsed too.

use serde_json::Value;

use super::commands::{host_caps_spec, Command};
use super::framing::{Frame, JsonFramer};
use super::protocol::{self, CommandHandler};
use super::{QmpError, Session, MAX_INPUT_SIZE};
use crate::planning::host_caps::read::report_from_value;

/// Parses commands instead of running them.
struct ParseOnly;

impl CommandHandler for ParseOnly {
    type Command = Command;

    fn execute(&self, command: Command, session: &mut Session) -> Result<Value, QmpError> {
        match &command {
            Command::QueryHostCaps(args) => {
                for (index, text) in args.net.iter().enumerate() {
                    // The session holds no descriptor, so a named one is
                    // refused rather than taken.
                    let _ = host_caps_spec(index, text, session);
                }
            }
            Command::Plan(args) => {
                for host in &args.hosts {
                    let _ = report_from_value(host, "fuzz");
                }
            }
            _ => {}
        }
        Ok(Value::String(command.name().to_string()))
    }
}

/// Feeds `data` to one connection's input path. The first byte picks the
/// size of the reads the input arrives in (odd, 1 to 255 bytes) and whether the
/// connection starts negotiated, so that splits and the pre-negotiation
/// refusal are both exercised.
pub fn api_input(data: &[u8]) {
    let Some((&control, input)) = data.split_first() else {
        return;
    };
    let read_size = usize::from(control >> 1) * 2 + 1;
    let mut negotiated = control & 1 == 1;
    let mut framer = JsonFramer::new(MAX_INPUT_SIZE);
    let mut session = Session::default();
    for chunk in input.chunks(read_size) {
        framer.push(chunk);
        while let Some(frame) = framer.next_frame() {
            if let Frame::Value(text) = frame {
                let done = protocol::process(&ParseOnly, &mut session, negotiated, text);
                negotiated |= done.negotiated;
            }
        }
    }
}
