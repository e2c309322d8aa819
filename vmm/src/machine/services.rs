//! What a running VM needs from the services attached to it, without
//! knowing them: somewhere to send management events, and servers to stop
//! when the run ends. The API implements both (`api::commands`), so that
//! `machine` does not depend on the API.

use std::sync::{Arc, OnceLock};

use serde_json::Value;

/// Receives the VM's management events (`STOP`, `RESUME`, `SHUTDOWN`,
/// `MIGRATION`), QMP-style.
pub trait EventSink: Send + Sync {
    fn emit(&self, name: &str, data: Value);
}

/// The VM's event sink, set once a service attaches; events before that go
/// nowhere, as with no management socket at all.
#[derive(Default)]
pub struct Events(OnceLock<Arc<dyn EventSink>>);

impl Events {
    pub fn emit(&self, name: &str, data: Value) {
        if let Some(sink) = self.0.get() {
            sink.emit(name, data);
        }
    }

    /// Attaches `sink`; false if one is attached already.
    pub fn attach(&self, sink: Arc<dyn EventSink>) -> bool {
        self.0.set(sink).is_ok()
    }
}

/// A service that runs alongside the VM and is stopped when its run ends.
pub trait Service: Send {
    fn shutdown(&mut self);
}
