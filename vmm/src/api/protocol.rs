//! The QMP wire protocol: the command interfaces a VM core implements,
//! request validation and dispatch, and the JSON lines the server writes.
//!
//! Nothing here knows what a VM is: the commands come from a
//! [`CommandHandler`], whose [`CommandSet`] turns a request into a typed
//! command before anything runs.

use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::de::{IgnoredAny, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use tracing::{debug, error};

use super::arguments::{parse_arguments, ArgumentError};
use super::error::QmpError;
use super::session::{FdNameArgs, Session};

/// Name of the capabilities negotiation command.
pub const QMP_CAPABILITIES: &str = "qmp_capabilities";
/// Name of the command listing the available commands.
pub const QUERY_COMMANDS: &str = "query-commands";
/// Name of the command naming a descriptor passed with `SCM_RIGHTS`.
pub const GETFD: &str = "getfd";
/// Name of the command closing a named descriptor.
pub const CLOSEFD: &str = "closefd";

/// The commands the protocol layer itself serves, in `query-commands` order.
const PROTOCOL_COMMANDS: [&str; 4] = [QMP_CAPABILITIES, QUERY_COMMANDS, GETFD, CLOSEFD];

/// A set of commands, each parsed with its arguments into one typed value.
/// Declare one with `qmp_commands!`, which derives [`CommandSet::NAMES`] and
/// [`CommandSet::parse`] from the same list.
pub trait CommandSet: Sized {
    /// Every command name, in the order `query-commands` lists them.
    const NAMES: &'static [&'static str];

    /// Parses command `name` with `arguments` (a JSON object's text).
    /// `Ok(None)` when the set has no such command.
    fn parse(name: &str, arguments: &str) -> Result<Option<Self>, ArgumentError>;
}

/// Runs the commands of a VM. Supplied by the VM core; the protocol layer
/// handles framing, negotiation, `qmp_capabilities` and `query-commands`.
///
/// `execute` is called on the thread of the connection that sent the command,
/// so commands from different clients can run concurrently.
pub trait CommandHandler: Send + Sync + 'static {
    /// The commands this handler serves.
    type Command: CommandSet;

    /// Runs one parsed command. `session` holds the descriptors the
    /// client passed on this connection (see `getfd`).
    fn execute(&self, command: Self::Command, session: &mut Session) -> Result<Value, QmpError>;
}

/// A [`CommandHandler`] with its command type erased, so that the server
/// can hold any handler.
pub(crate) trait Dispatch: Send + Sync {
    /// The handler's command names.
    fn names(&self) -> &'static [&'static str];

    /// Parses and runs a command; `None` when the handler has no such command.
    fn dispatch(
        &self,
        name: &str,
        arguments: &str,
        session: &mut Session,
    ) -> Option<Result<Value, QmpError>>;
}

impl<H: CommandHandler> Dispatch for H {
    fn names(&self) -> &'static [&'static str] {
        H::Command::NAMES
    }

    fn dispatch(
        &self,
        name: &str,
        arguments: &str,
        session: &mut Session,
    ) -> Option<Result<Value, QmpError>> {
        match H::Command::parse(name, arguments) {
            Ok(Some(command)) => Some(self.execute(command, session)),
            Ok(None) => None,
            Err(err) => Some(Err(err.into())),
        }
    }
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
    id: Option<&'a RawValue>,
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
    id: Option<&'a RawValue>,
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

fn version<'a>(package: &'a str) -> GreetingVersion<'a> {
    GreetingVersion {
        godwit: VersionTriple {
            major: version_number(env!("CARGO_PKG_VERSION_MAJOR")),
            minor: version_number(env!("CARGO_PKG_VERSION_MINOR")),
            micro: version_number(env!("CARGO_PKG_VERSION_PATCH")),
        },
        package,
    }
}

fn package() -> String {
    format!("godwit {}", env!("CARGO_PKG_VERSION"))
}

/// godwit's version as `query-version` reports it (and the greeting).
pub fn version_info() -> Value {
    serde_json::to_value(version(&package())).unwrap_or(Value::Null)
}

/// The greeting sent on connect.
pub(crate) fn greeting_line() -> String {
    to_line(&Greeting {
        qmp: GreetingBody {
            version: version(&package()),
            capabilities: [],
        },
    })
}

/// A `return` or `error` reply line.
fn reply_line(result: &Result<Value, QmpError>, id: Option<&RawValue>) -> String {
    match result {
        Ok(ret) => to_line(&ReturnMsg { ret, id }),
        Err(err) => error_line(err, id),
    }
}

/// An `error` reply line.
pub(crate) fn error_line(err: &QmpError, id: Option<&RawValue>) -> String {
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

/// The members of a request object, borrowed from the input text: the
/// arguments are deserialized later, straight into the command's type.
#[derive(Default)]
struct Envelope<'a> {
    execute: Option<&'a RawValue>,
    arguments: Option<&'a RawValue>,
    id: Option<&'a RawValue>,
    /// The first member that is none of the above.
    unexpected: Option<String>,
}

impl<'de> Deserialize<'de> for Envelope<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct EnvelopeVisitor;

        impl<'de> Visitor<'de> for EnvelopeVisitor {
            type Value = Envelope<'de>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a QMP request object")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Envelope<'de>, A::Error> {
                let mut envelope = Envelope::default();
                while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                    // A member given twice counts once, the last one, as
                    // serde_json's own objects do.
                    match &*key {
                        "execute" => envelope.execute = Some(map.next_value()?),
                        "arguments" => envelope.arguments = Some(map.next_value()?),
                        "id" => envelope.id = Some(map.next_value()?),
                        other => {
                            if envelope.unexpected.is_none() {
                                envelope.unexpected = Some(other.to_string());
                            }
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(envelope)
            }
        }

        deserializer.deserialize_map(EnvelopeVisitor)
    }
}

/// A validated request.
struct Request<'a> {
    name: String,
    /// The text of the `arguments` object (`{}` when absent).
    arguments: &'a str,
}

/// `raw` without the whitespace between tokens, so that an echoed `id`
/// keeps the reply on one line. `raw` is valid JSON, so whitespace outside
/// strings separates tokens only.
fn compact(raw: &RawValue) -> Box<RawValue> {
    let text = raw.get();
    let mut out = String::with_capacity(text.len());
    let (mut in_string, mut escaped) = (false, false);
    for c in text.chars() {
        if in_string {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
        } else if c == '"' {
            in_string = true;
        } else if c.is_ascii_whitespace() {
            continue;
        }
        out.push(c);
    }
    // Removing inter-token whitespace from valid JSON leaves valid JSON.
    RawValue::from_string(out).unwrap_or_else(|_| raw.to_owned())
}

fn starts_with(raw: &RawValue, c: char) -> bool {
    raw.get().trim_start().starts_with(c)
}

/// Checks the shape of a request object (QEMU's messages).
fn validate<'a>(envelope: &Envelope<'a>) -> Result<Request<'a>, QmpError> {
    if let Some(key) = &envelope.unexpected {
        return Err(QmpError::generic(format!(
            "QMP input member '{key}' is unexpected"
        )));
    }
    let name = match envelope.execute {
        Some(raw) if starts_with(raw, '"') => serde_json::from_str::<String>(raw.get())
            .map_err(|_| QmpError::generic("QMP input member 'execute' must be a string"))?,
        Some(_) => {
            return Err(QmpError::generic(
                "QMP input member 'execute' must be a string",
            ))
        }
        None => return Err(QmpError::generic("QMP input member 'execute' is missing")),
    };
    let arguments = match envelope.arguments {
        None => "{}",
        Some(raw) if starts_with(raw, '{') => raw.get(),
        Some(_) => {
            return Err(QmpError::generic(
                "QMP input member 'arguments' must be an object",
            ))
        }
    };
    Ok(Request { name, arguments })
}

/// Processes one JSON value (its text, as the framer found it) received on
/// a connection that has (or has not) completed capabilities negotiation.
pub(crate) fn process(
    handler: &dyn Dispatch,
    session: &mut Session,
    negotiated: bool,
    input: &[u8],
) -> Processed {
    let refused = |err: QmpError, id: Option<&RawValue>| Processed {
        line: error_line(&err, id),
        negotiated: false,
        command: None,
    };
    let Ok(text) = std::str::from_utf8(input) else {
        return refused(QmpError::generic("QMP input is not valid UTF-8"), None);
    };
    if !text.trim_start().starts_with('{') {
        return refused(QmpError::generic("QMP input must be a JSON object"), None);
    }
    let envelope: Envelope<'_> = match serde_json::from_str(text) {
        Ok(envelope) => envelope,
        Err(err) => {
            return refused(
                QmpError::generic(format!("QMP input is not a valid request: {err}")),
                None,
            )
        }
    };
    let id = envelope.id.map(compact);
    let id = id.as_deref();
    let request = match validate(&envelope) {
        Ok(request) => request,
        Err(err) => return refused(err, id),
    };
    let mut now_negotiated = false;
    let result = if !negotiated {
        if request.name == QMP_CAPABILITIES {
            let result = capabilities(request.arguments);
            now_negotiated = result.is_ok();
            result
        } else {
            Err(QmpError::command_not_found(
                "Expecting capabilities negotiation with 'qmp_capabilities'",
            ))
        }
    } else {
        dispatch(handler, session, &request.name, request.arguments)
    };
    Processed {
        line: reply_line(&result, id),
        negotiated: now_negotiated,
        command: Some(request.name),
    }
}

fn capabilities(arguments: &str) -> Result<Value, QmpError> {
    let args: CapabilitiesArgs = parse_arguments(arguments)?;
    // No optional capabilities are offered (the greeting lists none).
    if let Some(cap) = args.enable.first() {
        return Err(QmpError::generic(format!(
            "Capability '{cap}' not available"
        )));
    }
    Ok(Value::Object(Map::new()))
}

fn query_commands(handler: &dyn Dispatch, arguments: &str) -> Result<Value, QmpError> {
    parse_arguments::<super::arguments::NoArguments>(arguments)?;
    let mut names = PROTOCOL_COMMANDS.to_vec();
    for name in handler.names() {
        if !names.contains(name) {
            names.push(name);
        }
    }
    Ok(Value::Array(
        names
            .into_iter()
            .map(|name| serde_json::json!({ "name": name }))
            .collect(),
    ))
}

fn fd_command(
    session: &mut Session,
    arguments: &str,
    run: impl FnOnce(&mut Session, String) -> Result<(), super::session::DescriptorError>,
) -> Result<Value, QmpError> {
    let args: FdNameArgs = parse_arguments(arguments)?;
    run(session, args.fdname).map_err(|err| QmpError::generic(err.to_string()))?;
    Ok(Value::Object(Map::new()))
}

fn dispatch(
    handler: &dyn Dispatch,
    session: &mut Session,
    name: &str,
    arguments: &str,
) -> Result<Value, QmpError> {
    let not_found =
        || QmpError::command_not_found(format!("The command {name} has not been found"));
    match name {
        QMP_CAPABILITIES => Err(QmpError::command_not_found(
            "Capabilities negotiation is already complete, command ignored",
        )),
        QUERY_COMMANDS => query_commands(handler, arguments),
        GETFD => fd_command(session, arguments, Session::getfd),
        CLOSEFD => fd_command(session, arguments, |s, name| s.closefd(&name)),
        _ if !handler.names().contains(&name) => Err(not_found()),
        _ => {
            debug!(command = name, "running API command");
            match catch_unwind(AssertUnwindSafe(|| {
                handler.dispatch(name, arguments, session)
            })) {
                Ok(Some(result)) => result,
                Ok(None) => Err(not_found()),
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
    }
}
