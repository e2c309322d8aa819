//! Separation of live objects from their state.
//!
//! Every part of a VM that must survive a snapshot or a migration implements
//! [`Persist`]: `save` captures a plain, serializable state struct that holds
//! no host resources, and `restore` builds a live object again from that state
//! and from the host resources of the machine it is restored on (a different
//! TAP, a different socket), validating that they fit.

/// A live object whose guest-visible state can be captured and rebuilt.
pub trait Persist: Sized {
    /// Plain data: what the guest can observe, no file descriptors or pointers.
    type State;
    /// Host resources the restored object is attached to on this host.
    type ConstructorArgs;
    /// Why a state could not be restored on this host.
    type Error: std::error::Error;

    fn save(&self) -> Self::State;
    fn restore(args: Self::ConstructorArgs, state: &Self::State) -> Result<Self, Self::Error>;
}
