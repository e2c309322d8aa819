//! Command arguments read straight from the request text into typed
//! `Deserialize` structs, with QEMU-like errors that name the parameter.
//!
//! The arguments are deserialized once, from the bytes the client sent;
//! nothing is copied or re-serialized first, so the memory a request takes
//! is that of the typed value it becomes. `serde_path_to_error` tracks where
//! in the arguments a failure happened (`size`, `drive.file`,
//! `disks[1].path`).

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_path_to_error::Segment;

use super::error::QmpError;
use super::framing::message_without_position;

/// The arguments of a command that takes none: any member is refused.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoArguments {}

/// Why command arguments were refused. The messages read like QEMU's.
#[derive(Debug, thiserror::Error)]
pub enum ArgumentError {
    /// A member the command does not know.
    #[error("Parameter '{param}' is unexpected")]
    Unexpected {
        /// Path of the member, e.g. `drive.x`.
        param: String,
    },
    /// A required member is absent.
    #[error("Parameter '{param}' is missing")]
    Missing {
        /// Path of the member, e.g. `disks[1].file`.
        param: String,
    },
    /// A string that is none of the accepted names.
    #[error("Parameter '{param}' does not accept value '{value}'{expected}")]
    UnknownValue {
        /// Path of the member.
        param: String,
        /// The value given.
        value: String,
        /// ` (expected ...)`, or empty when serde did not say.
        expected: String,
    },
    /// A value of the wrong JSON type.
    #[error("Invalid parameter type for '{param}': expected {expected}, got {got}")]
    WrongType {
        /// Path of the member (`arguments` for the object itself).
        param: String,
        /// What the command takes there.
        expected: String,
        /// What the client sent.
        got: String,
    },
    /// A value of the right type but out of range.
    #[error("Invalid value for parameter '{param}': expected {expected}, got {got}")]
    BadValue {
        /// Path of the member.
        param: String,
        /// What the command takes there.
        expected: String,
        /// What the client sent.
        got: String,
    },
    /// Anything else serde refused, e.g. malformed JSON inside arguments.
    #[error("{context}: {message}")]
    Other {
        /// `Invalid parameter 'x'` or `Invalid arguments`.
        context: String,
        /// serde's message without its position.
        message: String,
        /// The error as serde reported it.
        #[source]
        source: serde_json::Error,
    },
}

impl From<ArgumentError> for QmpError {
    fn from(err: ArgumentError) -> Self {
        QmpError::generic(err.to_string())
    }
}

/// Deserializes the JSON object `text` (the `arguments` member of a
/// request, `{}` when absent) into `T`.
///
/// Use `#[serde(deny_unknown_fields)]` on `T` so that unknown parameters are
/// refused, as QEMU refuses them.
pub fn parse_arguments<T: DeserializeOwned>(text: &str) -> Result<T, ArgumentError> {
    let mut de = serde_json::Deserializer::from_str(text);
    serde_path_to_error::deserialize(&mut de).map_err(|err| {
        let path = path_text(err.path());
        describe(err.into_inner(), &path)
    })
}

/// `a.b[2].c`; empty for the arguments object itself.
fn path_text(path: &serde_path_to_error::Path) -> String {
    let mut out = String::new();
    for segment in path.iter() {
        match segment {
            Segment::Seq { index } => out.push_str(&format!("[{index}]")),
            Segment::Map { key } | Segment::Enum { variant: key } => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(key);
            }
            Segment::Unknown => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push('?');
            }
        }
    }
    out
}

fn join(parent: &str, name: &str) -> String {
    if parent.is_empty() {
        name.to_string()
    } else {
        format!("{parent}.{name}")
    }
}

/// Turns a serde error into a QEMU-like one. `path` is where
/// `serde_path_to_error` saw the failure.
fn describe(source: serde_json::Error, path: &str) -> ArgumentError {
    let msg = message_without_position(&source);
    if let Some(field) = backticked(&msg, "unknown field `") {
        // The path may or may not already end with the unknown member.
        let param = if path == field || path.ends_with(&format!(".{field}")) {
            path.to_string()
        } else {
            join(path, field)
        };
        return ArgumentError::Unexpected { param };
    }
    if let Some(field) = backticked(&msg, "missing field `") {
        // Reported at the object lacking the member.
        return ArgumentError::Missing {
            param: join(path, field),
        };
    }
    let param = if path.is_empty() { "arguments" } else { path }.to_string();
    if let Some(value) = backticked(&msg, "unknown variant `") {
        let expected = msg
            .split_once(", expected ")
            .map(|(_, e)| format!(" (expected {e})"))
            .unwrap_or_default();
        return ArgumentError::UnknownValue {
            param,
            value: value.to_string(),
            expected,
        };
    }
    let split = |rest: &str| {
        rest.split_once(", expected ")
            .map(|(got, expected)| (got.to_string(), expected.to_string()))
    };
    if let Some((got, expected)) = msg.strip_prefix("invalid type: ").and_then(split) {
        return ArgumentError::WrongType {
            param,
            expected,
            got,
        };
    }
    if let Some((got, expected)) = msg.strip_prefix("invalid value: ").and_then(split) {
        return ArgumentError::BadValue {
            param,
            expected,
            got,
        };
    }
    let context = if path.is_empty() {
        "Invalid arguments".to_string()
    } else {
        format!("Invalid parameter '{path}'")
    };
    ArgumentError::Other {
        context,
        message: msg,
        source,
    }
}

/// The text between `prefix` and the next backtick, when `msg` starts so.
fn backticked<'a>(msg: &'a str, prefix: &str) -> Option<&'a str> {
    let rest = msg.strip_prefix(prefix)?;
    rest.split_once('`').map(|(name, _)| name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Drive {
        file: String,
        #[serde(default)]
        readonly: bool,
    }

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(rename_all = "kebab-case")]
    enum Mode {
        Fast,
        Safe,
    }

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Args {
        size: u64,
        #[serde(default)]
        drive: Option<Drive>,
        #[serde(default)]
        disks: Vec<Drive>,
        #[serde(default)]
        mode: Option<Mode>,
    }

    fn parse(v: serde_json::Value) -> Result<Args, String> {
        parse_arguments::<Args>(&v.to_string()).map_err(|e| e.to_string())
    }

    #[test]
    fn parses_valid_arguments() {
        let a = parse(json!({
            "size": 5,
            "drive": {"file": "a\nb", "readonly": true},
            "disks": [{"file": "x"}],
            "mode": "safe",
        }))
        .unwrap();
        assert_eq!(a.size, 5);
        assert_eq!(a.drive.unwrap().file, "a\nb");
        assert_eq!(a.disks.len(), 1);
        assert_eq!(a.mode, Some(Mode::Safe));
    }

    #[test]
    fn names_the_faulty_parameter() {
        let cases = [
            (
                json!({"size": 1, "foo": 2}),
                "Parameter 'foo' is unexpected",
            ),
            (json!({}), "Parameter 'size' is missing"),
            (
                json!({"size": "x"}),
                "Invalid parameter type for 'size': expected u64, got string \"x\"",
            ),
            (
                json!({"size": -1}),
                "Invalid value for parameter 'size': expected u64, got integer `-1`",
            ),
            (
                json!({"size": {"a": 1}}),
                "Invalid parameter type for 'size': expected u64, got map",
            ),
            (
                json!({"size": 1, "drive": {"file": 3}}),
                "Invalid parameter type for 'drive.file': expected a string, got integer `3`",
            ),
            (
                json!({"size": 1, "drive": {}}),
                "Parameter 'drive.file' is missing",
            ),
            (
                json!({"size": 1, "drive": {"file": "f", "x": 1}}),
                "Parameter 'drive.x' is unexpected",
            ),
            (
                json!({"size": 1, "drive": {"file": "f", "drive": 1}}),
                "Parameter 'drive.drive' is unexpected",
            ),
            (
                json!({"size": 1, "disks": [{"file": "a"}, {"file": "b", "bad": 0}]}),
                "Parameter 'disks[1].bad' is unexpected",
            ),
            (
                json!({"size": 1, "disks": [{"file": "a"}, {}]}),
                "Parameter 'disks[1].file' is missing",
            ),
            (
                json!({"size": 1, "mode": "slow"}),
                "Parameter 'mode' does not accept value 'slow' (expected `fast` or `safe`)",
            ),
            (
                json!({"size": 1, "disks": {"file": "a"}}),
                "Invalid parameter type for 'disks': expected a sequence, got map",
            ),
        ];
        for (input, want) in cases {
            assert_eq!(parse(input.clone()).unwrap_err(), want, "input {input}");
        }
    }

    #[test]
    fn no_arguments_refuses_parameters() {
        assert!(parse_arguments::<NoArguments>("{}").is_ok());
        assert_eq!(
            parse_arguments::<NoArguments>(r#"{"x": 1}"#)
                .unwrap_err()
                .to_string(),
            "Parameter 'x' is unexpected"
        );
    }
}
