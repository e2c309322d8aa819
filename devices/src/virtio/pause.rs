//! Parks a device's datapath thread without tearing it down, so that a
//! paused VM's memory and rings stay still while their state is captured
//! (snapshot, the last phase of a live migration), and the datapath goes on
//! exactly where it was on resume: nothing it holds is lost.

use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

#[derive(Default)]
struct GateState {
    requested: bool,
    parked: bool,
    /// The datapath thread has ended (stopped or failed): nothing to park.
    gone: bool,
    /// A parked thread is being stopped: let it go to see its stop signal.
    kick: bool,
}

pub struct PauseGate {
    state: Mutex<GateState>,
    changed: Condvar,
    /// The datapath polls this and calls [`PauseGate::park`] when it fires.
    wake: EventFd,
}

/// How long `pause` waits for a datapath that neither parks nor ends.
const PARK_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum PauseError {
    #[error("cannot signal the datapath thread to pause: {0}")]
    Signal(std::io::Error),
    #[error("the datapath thread did not pause within {0:?}")]
    Timeout(Duration),
}

impl PauseGate {
    pub fn new() -> std::io::Result<Self> {
        Ok(PauseGate {
            state: Mutex::new(GateState {
                gone: true,
                ..GateState::default()
            }),
            changed: Condvar::new(),
            wake: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    fn lock(&self) -> MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The eventfd the datapath adds to its poll set.
    pub fn wake_fd(&self) -> &EventFd {
        &self.wake
    }

    /// Called by a datapath thread as it starts; a pause already requested
    /// parks it at its first poll.
    pub fn attach(&self) {
        {
            let mut s = self.lock();
            s.gone = false;
            s.kick = false;
        }
        if self.lock().requested {
            let _ = self.wake.write(1);
        }
    }

    /// Called by the datapath thread as it ends, whatever the reason.
    pub fn detach(&self) {
        let mut s = self.lock();
        s.gone = true;
        s.parked = false;
        self.changed.notify_all();
    }

    /// Datapath side: when the wake fd fires, blocks while a pause is requested.
    pub fn park(&self) {
        let _ = self.wake.read();
        let mut s = self.lock();
        if !s.requested {
            return;
        }
        s.parked = true;
        self.changed.notify_all();
        while s.requested && !s.kick {
            s = self.changed.wait(s).unwrap_or_else(PoisonError::into_inner);
        }
        s.parked = false;
    }

    /// VMM side: returns once the datapath is parked (or has ended).
    pub fn pause(&self) -> Result<(), PauseError> {
        let mut s = self.lock();
        s.requested = true;
        if s.gone || s.parked {
            return Ok(());
        }
        self.wake.write(1).map_err(PauseError::Signal)?;
        let (s, timeout) = self
            .changed
            .wait_timeout_while(s, PARK_TIMEOUT, |s| !s.parked && !s.gone)
            .unwrap_or_else(PoisonError::into_inner);
        if timeout.timed_out() && !s.parked && !s.gone {
            return Err(PauseError::Timeout(PARK_TIMEOUT));
        }
        Ok(())
    }

    /// Lets a parked thread leave `park` so that it sees the stop it was just
    /// sent; the pause stays requested for whatever runs next.
    pub fn release_for_stop(&self) {
        let mut s = self.lock();
        // Sticky until the next attach: a thread that parks after this
        // (it had not reached `park` yet) leaves at once too.
        s.kick = true;
        self.changed.notify_all();
    }

    /// VMM side: lets a parked datapath go on.
    pub fn resume(&self) {
        let mut s = self.lock();
        s.requested = false;
        self.changed.notify_all();
    }

    pub fn is_paused(&self) -> bool {
        self.lock().requested
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[test]
    fn parks_and_resumes_a_polling_thread() {
        let gate = Arc::new(PauseGate::new().unwrap());
        let work = Arc::new(AtomicUsize::new(0));
        let (g, w) = (gate.clone(), work.clone());
        gate.attach();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = stop.clone();
        let t = std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                if g.wake_fd().read().is_ok() {
                    let _ = g.wake_fd().write(1);
                    g.park();
                }
                w.fetch_add(1, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(1));
            }
            g.detach();
        });
        std::thread::sleep(Duration::from_millis(20));
        gate.pause().unwrap();
        let at = work.load(Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(work.load(Ordering::SeqCst), at, "no work while paused");
        gate.resume();
        std::thread::sleep(Duration::from_millis(30));
        assert!(work.load(Ordering::SeqCst) > at);
        stop.store(true, Ordering::SeqCst);
        t.join().unwrap();
        // A gone datapath pauses at once.
        gate.pause().unwrap();
        gate.resume();
    }
}
