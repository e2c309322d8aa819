//! A QMP client for godwit's API socket, and `godwit ctl`.

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{Map, Value};
use tracing::debug;

use super::framing::{Frame, JsonFramer};
use super::protocol::QMP_CAPABILITIES;

/// Time `godwit ctl` allows for connecting and negotiating.
pub const CTL_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Time `godwit ctl` waits for a command's reply.
pub const CTL_COMMAND_TIMEOUT: Duration = Duration::from_secs(120);
/// Largest message accepted from the server.
const MAX_MESSAGE_SIZE: usize = 64 << 20;

/// Errors of [`QmpClient`] and [`run_ctl`].
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket could not be connected to.
    #[error(
        "cannot connect to {}: {source}; is godwit running with --api-socket {}?",
        path.display(),
        path.display()
    )]
    Connect {
        /// Socket path.
        path: PathBuf,
        /// Underlying error.
        source: std::io::Error,
    },
    /// Reading or writing the socket failed.
    #[error("API connection {} failed while {action}: {source}", path.display())]
    Io {
        /// Socket path.
        path: PathBuf,
        /// What the client was doing.
        action: String,
        /// Underlying error.
        source: std::io::Error,
    },
    /// The server closed the connection.
    #[error(
        "godwit closed the API connection {} while the client was {action}; see the godwit log",
        path.display()
    )]
    Closed {
        /// Socket path.
        path: PathBuf,
        /// What the client was doing.
        action: String,
    },
    /// No answer in time.
    #[error(
        "timed out after {timeout:?} on API socket {} while {action}; godwit may be busy or hung",
        path.display()
    )]
    Timeout {
        /// Socket path.
        path: PathBuf,
        /// What the client was doing.
        action: String,
        /// The timeout that expired.
        timeout: Duration,
    },
    /// The server sent something that is not QMP.
    #[error("unexpected message from godwit on {}: {detail}", path.display())]
    Protocol {
        /// Socket path.
        path: PathBuf,
        /// What was wrong.
        detail: String,
    },
    /// The command failed: the server replied with a QMP error.
    #[error("error: {class}: {desc}")]
    Qmp {
        /// QMP error class, e.g. `GenericError`.
        class: String,
        /// Error description.
        desc: String,
    },
    /// A message from the server did not decode as JSON.
    #[error("godwit sent a message on {} that is not JSON: {source}", path.display())]
    Decode {
        /// Socket path.
        path: PathBuf,
        /// Why it did not decode.
        #[source]
        source: serde_json::Error,
    },
    /// The reply could not be printed.
    #[error("cannot print the reply from godwit on {}: {source}", path.display())]
    Print {
        /// Socket path.
        path: PathBuf,
        /// Why it could not be formatted.
        #[source]
        source: serde_json::Error,
    },
    /// The JSON-ARGS argument of `godwit ctl` is not JSON.
    #[error("invalid JSON-ARGS '{text}': {source}")]
    ArgsNotJson {
        /// The argument as given.
        text: String,
        /// Why it does not parse.
        #[source]
        source: serde_json::Error,
    },
    /// The JSON-ARGS argument of `godwit ctl` is not a JSON object.
    #[error("invalid JSON-ARGS '{text}': {reason}")]
    InvalidArgs {
        /// The argument as given.
        text: String,
        /// Why it was refused.
        reason: String,
    },
}

/// A connected, negotiated QMP client.
#[derive(Debug)]
pub struct QmpClient {
    path: PathBuf,
    stream: UnixStream,
    framer: JsonFramer,
    greeting: Value,
    events: VecDeque<Value>,
    next_id: u64,
    timeout: Duration,
}

impl QmpClient {
    /// Connects to `path`, reads the greeting and negotiates capabilities.
    /// `timeout` bounds the handshake and, later, the wait for each reply
    /// (see [`QmpClient::set_timeout`]).
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self, ClientError> {
        let stream = UnixStream::connect(path).map_err(|source| ClientError::Connect {
            path: path.to_path_buf(),
            source,
        })?;
        Self::handshake(path, stream, timeout)
    }

    /// Like [`QmpClient::connect`], but retries while the socket does not
    /// exist yet or refuses connections (godwit still starting), until
    /// `timeout` has passed.
    pub fn connect_retry(path: &Path, timeout: Duration) -> Result<Self, ClientError> {
        let deadline = Instant::now() + timeout;
        loop {
            match UnixStream::connect(path) {
                Ok(stream) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    return Self::handshake(path, stream, left.max(Duration::from_secs(1)));
                }
                Err(err)
                    if matches!(
                        err.kind(),
                        ErrorKind::NotFound | ErrorKind::ConnectionRefused
                    ) && Instant::now() < deadline =>
                {
                    thread::sleep(Duration::from_millis(20));
                }
                Err(source) => {
                    return Err(ClientError::Connect {
                        path: path.to_path_buf(),
                        source,
                    })
                }
            }
        }
    }

    fn handshake(path: &Path, stream: UnixStream, timeout: Duration) -> Result<Self, ClientError> {
        let mut client = QmpClient {
            path: path.to_path_buf(),
            stream,
            framer: JsonFramer::new(MAX_MESSAGE_SIZE),
            greeting: Value::Null,
            events: VecDeque::new(),
            next_id: 1,
            timeout,
        };
        let deadline = Instant::now() + timeout;
        let greeting = client.read_message(deadline, timeout, "waiting for the QMP greeting")?;
        if let Some(err) = greeting.get("error") {
            return Err(qmp_error(err));
        }
        if greeting.get("QMP").is_none() {
            return Err(ClientError::Protocol {
                path: client.path.clone(),
                detail: format!("expected the QMP greeting, got {greeting}"),
            });
        }
        client.greeting = greeting;
        client.execute(QMP_CAPABILITIES, Value::Null)?;
        Ok(client)
    }

    /// The greeting the server sent.
    pub fn greeting(&self) -> &Value {
        &self.greeting
    }

    /// Sets how long [`QmpClient::execute`] waits for a reply.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// Runs `command` and returns its `return` value. `args` is a JSON
    /// object, or `Value::Null` for no arguments. Events received meanwhile
    /// are kept for [`QmpClient::take_events`] and
    /// [`QmpClient::wait_event`].
    pub fn execute(&mut self, command: &str, args: Value) -> Result<Value, ClientError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut request = Map::new();
        request.insert("execute".to_string(), Value::String(command.to_string()));
        match args {
            Value::Null => {}
            Value::Object(args) => {
                request.insert("arguments".to_string(), Value::Object(args));
            }
            other => {
                return Err(ClientError::InvalidArgs {
                    text: other.to_string(),
                    reason: format!(
                        "command arguments must be a JSON object, got {}",
                        kind(&other)
                    ),
                })
            }
        }
        request.insert("id".to_string(), Value::from(id));
        let mut line = Value::Object(request).to_string();
        line.push('\n');
        let action = format!("running '{command}'");
        self.stream
            .set_write_timeout(Some(self.timeout.max(Duration::from_millis(1))))
            .and_then(|()| self.stream.write_all(line.as_bytes()))
            .map_err(|source| self.io_error(&action, source))?;

        let deadline = Instant::now() + self.timeout;
        loop {
            let msg = self.read_message(deadline, self.timeout, &action)?;
            if msg.get("event").is_some() {
                self.events.push_back(msg);
                continue;
            }
            match msg.get("id") {
                Some(got) if got.as_u64() == Some(id) => {}
                // A reply to no request: the server could not parse something.
                None if msg.get("error").is_some() => {}
                _ => {
                    debug!("ignoring unrelated API message {msg}");
                    continue;
                }
            }
            if let Some(ret) = msg.get("return") {
                return Ok(ret.clone());
            }
            if let Some(err) = msg.get("error") {
                return Err(qmp_error(err));
            }
            return Err(ClientError::Protocol {
                path: self.path.clone(),
                detail: format!("reply has neither 'return' nor 'error': {msg}"),
            });
        }
    }

    /// Returns and forgets the events received so far.
    pub fn take_events(&mut self) -> Vec<Value> {
        self.events.drain(..).collect()
    }

    /// Waits for an event named `name`, returning the whole event object
    /// (`event`, `data`, `timestamp`). Earlier events of other names stay
    /// queued for [`QmpClient::take_events`].
    pub fn wait_event(&mut self, name: &str, timeout: Duration) -> Result<Value, ClientError> {
        if let Some(pos) = self.events.iter().position(|e| is_event(e, name)) {
            if let Some(event) = self.events.remove(pos) {
                return Ok(event);
            }
        }
        let deadline = Instant::now() + timeout;
        let action = format!("waiting for event {name}");
        loop {
            let msg = self.read_message(deadline, timeout, &action)?;
            if is_event(&msg, name) {
                return Ok(msg);
            }
            if msg.get("event").is_some() {
                self.events.push_back(msg);
            } else {
                debug!("ignoring unrelated API message {msg}");
            }
        }
    }

    fn io_error(&self, action: &str, source: std::io::Error) -> ClientError {
        ClientError::Io {
            path: self.path.clone(),
            action: action.to_string(),
            source,
        }
    }

    /// Reads the next message, waiting until `deadline` (`timeout` from the
    /// start of the wait, for the error message).
    fn read_message(
        &mut self,
        deadline: Instant,
        timeout: Duration,
        action: &str,
    ) -> Result<Value, ClientError> {
        let mut chunk = [0u8; 8192];
        loop {
            match self.framer.next_frame() {
                Some(Frame::Value(text)) => {
                    return serde_json::from_slice(text).map_err(|source| ClientError::Decode {
                        path: self.path.clone(),
                        source,
                    })
                }
                Some(Frame::Syntax(msg)) => {
                    return Err(ClientError::Protocol {
                        path: self.path.clone(),
                        detail: format!("invalid JSON: {msg}"),
                    })
                }
                Some(Frame::TooLarge(len)) => {
                    return Err(ClientError::Protocol {
                        path: self.path.clone(),
                        detail: format!("message larger than {len} bytes"),
                    })
                }
                None => {}
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let timed_out = || ClientError::Timeout {
                path: self.path.clone(),
                action: action.to_string(),
                timeout,
            };
            if left.is_zero() {
                return Err(timed_out());
            }
            if let Err(source) = self.stream.set_read_timeout(Some(left)) {
                return Err(self.io_error(action, source));
            }
            match self.stream.read(&mut chunk) {
                Ok(0) => {
                    return Err(ClientError::Closed {
                        path: self.path.clone(),
                        action: action.to_string(),
                    })
                }
                Ok(n) => self.framer.push(chunk.get(..n).unwrap_or_default()),
                Err(err) if err.kind() == ErrorKind::Interrupted => {}
                Err(err) if matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    return Err(timed_out())
                }
                Err(source) => return Err(self.io_error(action, source)),
            }
        }
    }
}

fn is_event(msg: &Value, name: &str) -> bool {
    msg.get("event").and_then(Value::as_str) == Some(name)
}

fn qmp_error(err: &Value) -> ClientError {
    let text = |key: &str| {
        err.get(key)
            .and_then(Value::as_str)
            .unwrap_or("(missing)")
            .to_string()
    };
    ClientError::Qmp {
        class: text("class"),
        desc: text("desc"),
    }
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// `godwit ctl --api-socket PATH COMMAND [JSON-ARGS]`: runs one command and
/// returns its pretty-printed `return` value.
pub fn run_ctl(
    socket: &Path,
    command: &str,
    json_args: Option<&str>,
) -> Result<String, ClientError> {
    let args = match json_args {
        None => Value::Null,
        Some(text) => match serde_json::from_str::<Value>(text) {
            Ok(Value::Object(args)) => Value::Object(args),
            Ok(other) => {
                return Err(ClientError::InvalidArgs {
                    text: text.to_string(),
                    reason: format!(
                        "expected a JSON object such as '{{\"id\": \"disk0\"}}', got {}",
                        kind(&other)
                    ),
                })
            }
            Err(source) => {
                return Err(ClientError::ArgsNotJson {
                    text: text.to_string(),
                    source,
                })
            }
        },
    };
    let mut client = QmpClient::connect(socket, CTL_CONNECT_TIMEOUT)?;
    client.set_timeout(CTL_COMMAND_TIMEOUT);
    let ret = client.execute(command, args)?;
    serde_json::to_string_pretty(&ret).map_err(|source| ClientError::Print {
        path: socket.to_path_buf(),
        source,
    })
}
