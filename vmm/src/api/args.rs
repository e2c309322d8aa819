//! Typed command arguments with QEMU-like error messages.
//!
//! serde reports errors without saying which parameter is at fault. To name
//! it, the arguments are re-serialized with every object member and array
//! element on its own line while recording the parameter path of each line;
//! the line of a deserialization error then names the parameter
//! (`size`, `drive.file`, `disks[1].path`).

use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use super::framing::message_without_position;
use super::protocol::QmpError;

/// Deserializes command arguments into `T`.
///
/// Use `#[serde(deny_unknown_fields)]` on `T` so that unknown parameters are
/// refused. Errors read like QEMU's: "Parameter 'foo' is unexpected",
/// "Parameter 'id' is missing", "Invalid parameter type for 'size': expected
/// u64, got string \"x\"", "Parameter 'mode' does not accept value 'fast'".
pub fn parse_args<T: DeserializeOwned>(args: Map<String, Value>) -> Result<T, QmpError> {
    let mut text = Annotated::default();
    text.object(&args, "");
    serde_json::from_str(&text.out).map_err(|err| {
        let path = match err.line() {
            0 => "",
            line => text.paths.get(line - 1).map(String::as_str).unwrap_or(""),
        };
        QmpError::generic(describe(&message_without_position(&err), path))
    })
}

/// Checks that a command taking no arguments got none.
pub fn no_args(args: Map<String, Value>) -> Result<(), QmpError> {
    match args.keys().next() {
        Some(key) => Err(QmpError::generic(format!(
            "Parameter '{key}' is unexpected"
        ))),
        None => Ok(()),
    }
}

fn join(parent: &str, name: &str) -> String {
    if parent.is_empty() {
        name.to_string()
    } else {
        format!("{parent}.{name}")
    }
}

/// Turns a serde message into a QEMU-like one. `path` is the parameter on
/// whose line the error was found.
fn describe(msg: &str, path: &str) -> String {
    if let Some(field) = backticked(msg, "unknown field `") {
        // Reported on the line of the unknown member itself.
        let name = if path == field || path.ends_with(&format!(".{field}")) {
            path.to_string()
        } else {
            join(path, field)
        };
        return format!("Parameter '{name}' is unexpected");
    }
    if let Some(field) = backticked(msg, "missing field `") {
        // Reported after the closing brace of the object lacking it.
        return format!("Parameter '{}' is missing", join(path, field));
    }
    if let Some(variant) = backticked(msg, "unknown variant `") {
        let expected = msg
            .split_once(", expected ")
            .map(|(_, e)| format!(" (expected {e})"))
            .unwrap_or_default();
        let what = if path.is_empty() { "arguments" } else { path };
        return format!("Parameter '{what}' does not accept value '{variant}'{expected}");
    }
    if let Some(rest) = msg.strip_prefix("invalid type: ") {
        let what = if path.is_empty() { "arguments" } else { path };
        return match rest.split_once(", expected ") {
            Some((got, expected)) => {
                format!("Invalid parameter type for '{what}': expected {expected}, got {got}")
            }
            None => format!("Invalid parameter type for '{what}': {rest}"),
        };
    }
    if let Some(rest) = msg.strip_prefix("invalid value: ") {
        let what = if path.is_empty() { "arguments" } else { path };
        return match rest.split_once(", expected ") {
            Some((got, expected)) => {
                format!("Invalid value for parameter '{what}': expected {expected}, got {got}")
            }
            None => format!("Invalid value for parameter '{what}': {rest}"),
        };
    }
    if path.is_empty() {
        format!("Invalid arguments: {msg}")
    } else {
        format!("Invalid parameter '{path}': {msg}")
    }
}

/// The text between `prefix` and the next backtick, when `msg` starts so.
fn backticked<'a>(msg: &'a str, prefix: &str) -> Option<&'a str> {
    let rest = msg.strip_prefix(prefix)?;
    rest.split_once('`').map(|(name, _)| name)
}

/// JSON text with one member or element per line, and the parameter path of
/// every line (`paths[n]` is line `n + 1`).
#[derive(Default)]
struct Annotated {
    out: String,
    paths: Vec<String>,
}

impl Annotated {
    fn new_line(&mut self, path: String) {
        if !self.paths.is_empty() {
            self.out.push('\n');
        }
        self.paths.push(path);
    }

    /// Writes an object that starts on a new line with path `path`.
    fn object(&mut self, obj: &Map<String, Value>, path: &str) {
        self.new_line(path.to_string());
        self.object_body(obj, path);
    }

    /// Writes `{`, the members on their own lines and `}` on its own line.
    fn object_body(&mut self, obj: &Map<String, Value>, path: &str) {
        self.out.push('{');
        for (i, (key, value)) in obj.iter().enumerate() {
            if i > 0 {
                self.out.push(',');
            }
            let child = join(path, key);
            self.new_line(child.clone());
            self.out.push_str(&Value::String(key.clone()).to_string());
            self.out.push_str(": ");
            self.value(value, &child);
        }
        self.new_line(path.to_string());
        self.out.push('}');
    }

    /// Writes a value at the current position; containers continue on
    /// further lines.
    fn value(&mut self, value: &Value, path: &str) {
        match value {
            Value::Object(obj) if !obj.is_empty() => self.object_body(obj, path),
            Value::Array(items) if !items.is_empty() => {
                self.out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        self.out.push(',');
                    }
                    let child = format!("{path}[{i}]");
                    self.new_line(child.clone());
                    self.value(item, &child);
                }
                self.new_line(path.to_string());
                self.out.push(']');
            }
            // Scalars and empty containers: compact JSON never contains a
            // raw newline (strings escape it).
            other => self.out.push_str(&other.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;
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

    fn parse(v: Value) -> Result<Args, String> {
        let Value::Object(map) = v else {
            return Err("not an object".into());
        };
        parse_args::<Args>(map).map_err(|e| e.desc)
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
        ];
        for (input, want) in cases {
            assert_eq!(parse(input.clone()).unwrap_err(), want, "input {input}");
        }
    }

    #[test]
    fn no_args_refuses_parameters() {
        assert!(no_args(Map::new()).is_ok());
        let Value::Object(map) = json!({"x": 1}) else {
            unreachable!()
        };
        assert_eq!(
            no_args(map).unwrap_err().desc,
            "Parameter 'x' is unexpected"
        );
    }
}
