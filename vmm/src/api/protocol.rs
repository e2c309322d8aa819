//! The QMP wire protocol: error classes, the command handler interface,
//! request validation and dispatch, and the JSON lines the server writes.

use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tracing::{debug, error};

use super::args::parse_args;

/// Name of the capabilities negotiation command.
pub const QMP_CAPABILITIES: &str = "qmp_capabilities";
/// Name of the command listing the available commands.
pub const QUERY_COMMANDS: &str = "query-commands";

/// QMP error classes, as QEMU names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ErrorClass {
    /// Any error that has no more specific class.
    GenericError,
    /// The command does not exist (or is not available yet).
    CommandNotFound,
    /// A device named by the command does not exist.
    DeviceNotFound,
}

impl ErrorClass {
    /// The class name as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::GenericError => "GenericError",
            ErrorClass::CommandNotFound => "CommandNotFound",
            ErrorClass::DeviceNotFound => "DeviceNotFound",
        }
    }
}

impl fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error returned to a QMP client: `{"error": {"class": ..., "desc": ...}}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QmpError {
    /// Error class.
    pub class: ErrorClass,
    /// Human-readable description.
    pub desc: String,
}

impl QmpError {
    /// An error of the given class.
    pub fn new(class: ErrorClass, desc: impl Into<String>) -> Self {
        QmpError {
            class,
            desc: desc.into(),
        }
    }

    /// A `GenericError`.
    pub fn generic(desc: impl Into<String>) -> Self {
        Self::new(ErrorClass::GenericError, desc)
    }

    /// A `CommandNotFound` error.
    pub fn command_not_found(desc: impl Into<String>) -> Self {
        Self::new(ErrorClass::CommandNotFound, desc)
    }

    /// A `DeviceNotFound` error.
    pub fn device_not_found(desc: impl Into<String>) -> Self {
        Self::new(ErrorClass::DeviceNotFound, desc)
    }
}

impl fmt::Display for QmpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.class, self.desc)
    }
}

impl std::error::Error for QmpError {}

/// Runs the commands of a VM. Supplied by the VM core; the protocol layer
/// handles framing, negotiation, `qmp_capabilities` and `query-commands`.
///
/// `execute` is called on the thread of the connection that sent the command,
/// so commands from different clients can run concurrently.
pub trait CommandHandler: Send + Sync + 'static {
    /// Runs one command. `args` is always a JSON object (empty when absent).
    fn execute(&self, command: &str, args: Map<String, Value>) -> Result<Value, QmpError>;
    /// Names of the commands this handler serves, for query-commands.
    fn commands(&self) -> Vec<&'static str>;
}

// ---------------------------------------------------------------------------
// Messages written by the server. Structs (rather than `json!`) keep the
// member order stable and QEMU-like.

#[derive(Serialize)]
struct Greeting<'a> {
    #[serde(rename = "QMP")]
    qmp: GreetingBody<'a>,
}

#[derive(Serialize)]
struct GreetingBody<'a> {
    version: GreetingVersion<'a>,
    capabilities: [&'a str; 0],
}

#[derive(Serialize)]
struct GreetingVersion<'a> {
    godwit: VersionTriple,
    package: &'a str,
}

#[derive(Serialize)]
struct VersionTriple {
    major: u64,
    minor: u64,
    micro: u64,
}

#[derive(Serialize)]
struct ReturnMsg<'a> {
    #[serde(rename = "return")]
    ret: &'a Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a Value>,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    class: &'a str,
    desc: &'a str,
}

#[derive(Serialize)]
struct ErrorMsg<'a> {
    error: ErrorBody<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a Value>,
}

#[derive(Serialize)]
struct EventMsg<'a> {
    event: &'a str,
    data: &'a Value,
    timestamp: Timestamp,
}

#[derive(Serialize)]
struct Timestamp {
    seconds: u64,
    microseconds: u32,
}

/// Serializes `msg` as one line terminated by `\n`.
fn to_line<T: Serialize>(msg: &T) -> String {
    match serde_json::to_string(msg) {
        Ok(mut line) => {
            line.push('\n');
            line
        }
        Err(err) => {
            // Serializing a `Value` cannot fail (keys are strings); stay
            // well-formed anyway.
            error!("cannot serialize a QMP message: {err}");
            "{\"error\": {\"class\": \"GenericError\", \"desc\": \"internal error: cannot serialize the reply\"}}\n".to_string()
        }
    }
}

fn version_number(text: &str) -> u64 {
    text.parse().unwrap_or(0)
}

/// The greeting sent on connect.
pub(crate) fn greeting_line() -> String {
    let package = format!("godwit {}", env!("CARGO_PKG_VERSION"));
    to_line(&Greeting {
        qmp: GreetingBody {
            version: GreetingVersion {
                godwit: VersionTriple {
                    major: version_number(env!("CARGO_PKG_VERSION_MAJOR")),
                    minor: version_number(env!("CARGO_PKG_VERSION_MINOR")),
                    micro: version_number(env!("CARGO_PKG_VERSION_PATCH")),
                },
                package: &package,
            },
            capabilities: [],
        },
    })
}

/// A `return` or `error` reply line.
pub(crate) fn reply_line(result: &Result<Value, QmpError>, id: Option<&Value>) -> String {
    match result {
        Ok(ret) => to_line(&ReturnMsg { ret, id }),
        Err(err) => error_line(err, id),
    }
}

/// An `error` reply line.
pub(crate) fn error_line(err: &QmpError, id: Option<&Value>) -> String {
    to_line(&ErrorMsg {
        error: ErrorBody {
            class: err.class.as_str(),
            desc: &err.desc,
        },
        id,
    })
}

/// An event line stamped with the current wall-clock time.
pub(crate) fn event_line(name: &str, data: &Value) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let empty = Value::Object(Map::new());
    let data = if data.is_null() { &empty } else { data };
    to_line(&EventMsg {
        event: name,
        data,
        timestamp: Timestamp {
            seconds: now.as_secs(),
            microseconds: now.subsec_micros(),
        },
    })
}

// ---------------------------------------------------------------------------
// Request processing.

/// The result of processing one input value.
pub(crate) struct Processed {
    /// The reply line to send.
    pub(crate) line: String,
    /// The connection completed capabilities negotiation with this request.
    pub(crate) negotiated: bool,
    /// Command name, for logging.
    pub(crate) command: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CapabilitiesArgs {
    #[serde(default)]
    enable: Vec<String>,
}

/// A validated request.
struct Request {
    name: String,
    args: Map<String, Value>,
}

/// Checks the shape of a request object (QEMU's messages).
fn validate(mut obj: Map<String, Value>) -> Result<Request, QmpError> {
    if let Some(key) = obj
        .keys()
        .find(|k| !matches!(k.as_str(), "execute" | "arguments"))
    {
        return Err(QmpError::generic(format!(
            "QMP input member '{key}' is unexpected"
        )));
    }
    let name = match obj.remove("execute") {
        Some(Value::String(name)) => name,
        Some(_) => {
            return Err(QmpError::generic(
                "QMP input member 'execute' must be a string",
            ))
        }
        None => return Err(QmpError::generic("QMP input member 'execute' is missing")),
    };
    let args = match obj.remove("arguments") {
        None => Map::new(),
        Some(Value::Object(args)) => args,
        Some(_) => {
            return Err(QmpError::generic(
                "QMP input member 'arguments' must be an object",
            ))
        }
    };
    Ok(Request { name, args })
}

/// Processes one JSON value received on a connection that has (or has not)
/// completed capabilities negotiation.
pub(crate) fn process(handler: &dyn CommandHandler, negotiated: bool, input: Value) -> Processed {
    let mut obj = match input {
        Value::Object(obj) => obj,
        _ => {
            return Processed {
                line: error_line(&QmpError::generic("QMP input must be a JSON object"), None),
                negotiated: false,
                command: None,
            }
        }
    };
    let id = obj.remove("id");
    let request = match validate(obj) {
        Ok(request) => request,
        Err(err) => {
            return Processed {
                line: error_line(&err, id.as_ref()),
                negotiated: false,
                command: None,
            }
        }
    };
    let mut now_negotiated = false;
    let result = if !negotiated {
        if request.name == QMP_CAPABILITIES {
            let result = capabilities(request.args);
            now_negotiated = result.is_ok();
            result
        } else {
            Err(QmpError::command_not_found(
                "Expecting capabilities negotiation with 'qmp_capabilities'",
            ))
        }
    } else {
        dispatch(handler, &request.name, request.args)
    };
    Processed {
        line: reply_line(&result, id.as_ref()),
        negotiated: now_negotiated,
        command: Some(request.name),
    }
}

fn capabilities(args: Map<String, Value>) -> Result<Value, QmpError> {
    let args: CapabilitiesArgs = parse_args(args)?;
    // No optional capabilities are offered (the greeting lists none).
    if let Some(cap) = args.enable.first() {
        return Err(QmpError::generic(format!(
            "Capability '{cap}' not available"
        )));
    }
    Ok(Value::Object(Map::new()))
}

fn dispatch(
    handler: &dyn CommandHandler,
    name: &str,
    args: Map<String, Value>,
) -> Result<Value, QmpError> {
    match name {
        QMP_CAPABILITIES => Err(QmpError::command_not_found(
            "Capabilities negotiation is already complete, command ignored",
        )),
        QUERY_COMMANDS => {
            super::args::no_args(args)?;
            let mut names = vec![QMP_CAPABILITIES, QUERY_COMMANDS];
            for name in handler.commands() {
                if !names.contains(&name) {
                    names.push(name);
                }
            }
            Ok(Value::Array(
                names
                    .into_iter()
                    .map(|name| {
                        let mut entry = Map::new();
                        entry.insert("name".to_string(), Value::String(name.to_string()));
                        Value::Object(entry)
                    })
                    .collect(),
            ))
        }
        _ if handler.commands().contains(&name) => {
            debug!(command = name, "running API command");
            match catch_unwind(AssertUnwindSafe(|| handler.execute(name, args))) {
                Ok(result) => result,
                Err(payload) => {
                    let what = payload
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| payload.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "unknown panic".to_string());
                    error!(command = name, "API command panicked: {what}");
                    Err(QmpError::generic(format!(
                        "command '{name}' failed with an internal error ({what}); see the godwit log"
                    )))
                }
            }
        }
        _ => Err(QmpError::command_not_found(format!(
            "The command {name} has not been found"
        ))),
    }
}
