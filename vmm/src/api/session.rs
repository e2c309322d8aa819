//! What a connection holds besides its byte stream: file descriptors the
//! client passed with `SCM_RIGHTS`, named with `getfd` as in QEMU.
//!
//! Descriptors only ever come from the client, so a command that uses one
//! can never reach a descriptor of godwit's own (KVM, guest memory, a
//! running TAP), which a descriptor *number* in the arguments could.

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;

use serde::Deserialize;

/// Descriptors one connection may hold, received and named together.
/// Beyond this, received descriptors are closed at once.
pub const MAX_DESCRIPTORS: usize = 16;

/// Why `getfd` or `closefd` failed. The messages are QEMU's.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DescriptorError {
    /// `getfd` with no descriptor received.
    #[error("No file descriptor supplied via SCM_RIGHTS")]
    NoneReceived,
    /// A name that could be mistaken for a descriptor number.
    #[error("Parameter 'fdname' expects a name not starting with a digit")]
    NumericName,
    /// `closefd` (or a command) naming a descriptor that is not there.
    #[error("File descriptor named '{name}' not found")]
    NotFound {
        /// The name given.
        name: String,
    },
}

/// `getfd` / `closefd` arguments.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FdNameArgs {
    pub(crate) fdname: String,
}

/// The descriptors of one connection; all are closed when it ends.
#[derive(Debug, Default)]
pub struct Session {
    /// Received and not yet named, oldest first.
    received: Vec<OwnedFd>,
    named: BTreeMap<String, OwnedFd>,
}

impl Session {
    /// Keeps a descriptor that arrived with the client's data; `false` (and
    /// the descriptor closed) when the connection holds too many.
    pub(crate) fn receive(&mut self, fd: OwnedFd) -> bool {
        if self.received.len() + self.named.len() >= MAX_DESCRIPTORS {
            return false;
        }
        self.received.push(fd);
        true
    }

    /// `getfd`: names the descriptor received last. A descriptor already of
    /// that name is closed.
    pub(crate) fn getfd(&mut self, name: String) -> Result<(), DescriptorError> {
        if name.starts_with(|c: char| c.is_ascii_digit()) {
            return Err(DescriptorError::NumericName);
        }
        let fd = self.received.pop().ok_or(DescriptorError::NoneReceived)?;
        self.named.insert(name, fd);
        Ok(())
    }

    /// `closefd`: closes the descriptor named `name`.
    pub(crate) fn closefd(&mut self, name: &str) -> Result<(), DescriptorError> {
        self.take_fd(name).map(drop)
    }

    /// Takes the descriptor named `name` out of the session: the caller owns
    /// (and eventually closes) it.
    pub fn take_fd(&mut self, name: &str) -> Result<OwnedFd, DescriptorError> {
        self.named
            .remove(name)
            .ok_or_else(|| DescriptorError::NotFound {
                name: name.to_string(),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    fn fd() -> OwnedFd {
        std::fs::File::open("/dev/null").expect("open").into()
    }

    #[test]
    fn getfd_names_the_last_descriptor_received() {
        let mut s = Session::default();
        assert_eq!(s.getfd("a".into()), Err(DescriptorError::NoneReceived));
        let (first, second) = (fd(), fd());
        let second_raw = second.as_raw_fd();
        assert!(s.receive(first));
        assert!(s.receive(second));
        s.getfd("net0".into()).expect("getfd");
        assert_eq!(s.take_fd("net0").expect("named").as_raw_fd(), second_raw);
        assert_eq!(
            s.take_fd("net0").unwrap_err(),
            DescriptorError::NotFound {
                name: "net0".into()
            }
        );
        assert_eq!(s.getfd("3".into()), Err(DescriptorError::NumericName));
        s.getfd("x".into()).expect("the first one");
        s.closefd("x").expect("closefd");
        assert!(s.closefd("x").is_err());
    }

    #[test]
    fn descriptors_per_connection_are_bounded() {
        let mut s = Session::default();
        for _ in 0..MAX_DESCRIPTORS {
            assert!(s.receive(fd()));
        }
        assert!(!s.receive(fd()));
        s.getfd("a".into()).expect("getfd");
        assert!(!s.receive(fd()), "named ones count too");
    }
}
