//! What a QMP client is told when a request fails: QEMU's error classes and
//! the `{"error": {"class": ..., "desc": ...}}` body.

use std::fmt;

use serde::{Deserialize, Serialize};

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
///
/// This is the wire form: command layers keep their own typed errors and
/// convert them into a `QmpError` only when the reply is written.
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
