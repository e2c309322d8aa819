//! SIGTERM and SIGINT end `godwit run` in order: the VM's run loop gets a
//! quit (console drained, `SHUTDOWN` sent, API socket removed), and files
//! godwit made for itself — snapshot staging directories, an incoming
//! migration's socket — are removed. Before a VM exists the same files are
//! removed and godwit exits at once.
//!
//! The two signals are blocked in every thread (the mask is set before the
//! first thread starts and inherited) and taken by one thread of their
//! own with `sigwaitinfo`, so no handler runs in the middle of a write.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Mutex, PoisonError};

use crate::seccomp::{self, ThreadKind};
use crate::vstate::events::VmEvent;

/// The exit status after `signal` ended godwit: 128 + the signal number,
/// what a shell reports for a process the signal killed.
pub fn exit_status(signal: i32) -> u8 {
    u8::try_from(128 + signal).unwrap_or(u8::MAX)
}

static RECEIVED: AtomicI32 = AtomicI32::new(0);
static TARGET: Mutex<Option<Sender<VmEvent>>> = Mutex::new(None);
static TEMP_PATHS: Mutex<Vec<(u64, PathBuf)>> = Mutex::new(Vec::new());
static NEXT_ID: AtomicU64 = AtomicU64::new(0);

fn termination_set() -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset fill a sigset_t we own.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        set
    }
}

/// Blocks SIGTERM and SIGINT in the calling thread; threads it starts
/// afterwards inherit the mask.
pub fn block_termination() -> std::io::Result<()> {
    let set = termination_set();
    // SAFETY: pthread_sigmask with a valid set changes only this thread's mask.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(std::io::Error::from_raw_os_error(rc));
    }
    Ok(())
}

/// Blocks SIGTERM and SIGINT in the calling thread and starts the thread
/// that takes them. Call before any other thread but the VM-creating one
/// starts (which must block them first: [`block_termination`]), so that
/// all of them inherit the mask.
pub fn start() -> std::io::Result<()> {
    block_termination()?;
    let set = termination_set();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            seccomp::install_or_exit(ThreadKind::Signals);
            watch(&set);
        })?;
    Ok(())
}

fn watch(set: &libc::sigset_t) {
    loop {
        // SAFETY: `set` is a valid signal set; no siginfo is asked for.
        let signal = unsafe { libc::sigwaitinfo(set, std::ptr::null_mut()) };
        if signal < 0 {
            continue;
        }
        let first = RECEIVED
            .compare_exchange(0, signal, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok();
        tracing::info!(signal, "termination signal received");
        let delivered = first
            && TARGET
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .as_ref()
                .is_some_and(|tx| tx.send(VmEvent::Quit).is_ok());
        if !delivered {
            // No VM to stop yet, or a second signal: end now.
            remove_temp_paths();
            std::process::exit(i32::from(exit_status(signal)));
        }
    }
}

/// Where a termination signal is turned into a quit: the run loop of the VM.
pub fn set_target(tx: Sender<VmEvent>) {
    *TARGET.lock().unwrap_or_else(PoisonError::into_inner) = Some(tx);
}

/// The termination signal godwit received, if any.
pub fn received() -> Option<i32> {
    match RECEIVED.load(Ordering::SeqCst) {
        0 => None,
        s => Some(s),
    }
}

/// A file or directory godwit made for itself and removes when it is done;
/// registered so that a termination signal removes it too. Dropping the
/// guard only forgets the path: its owner removes or keeps it.
#[derive(Debug)]
pub struct TempPath {
    id: u64,
}

impl TempPath {
    pub fn register(path: &Path) -> Self {
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        TEMP_PATHS
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((id, path.to_path_buf()));
        TempPath { id }
    }
}

impl Drop for TempPath {
    fn drop(&mut self) {
        TEMP_PATHS
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|(id, _)| *id != self.id);
    }
}

/// Removes every registered path still there.
pub fn remove_temp_paths() {
    let paths = std::mem::take(&mut *TEMP_PATHS.lock().unwrap_or_else(PoisonError::into_inner));
    for (_, path) in paths {
        let removed = match std::fs::symlink_metadata(&path) {
            Ok(m) if m.is_dir() => std::fs::remove_dir_all(&path),
            Ok(_) => std::fs::remove_file(&path),
            Err(_) => Ok(()),
        };
        if let Err(e) = removed {
            tracing::warn!("cannot remove {}: {e}", path.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registered_paths_are_removed_and_forgotten_ones_kept() {
        let dir = std::env::temp_dir().join(format!("godwit-signals-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        std::fs::write(dir.join("sub/f"), b"x").unwrap();
        let kept = dir.with_extension("kept");
        std::fs::write(&kept, b"x").unwrap();
        let _guard = TempPath::register(&dir);
        drop(TempPath::register(&kept));
        remove_temp_paths();
        assert!(!dir.exists());
        assert!(kept.exists());
        std::fs::remove_file(&kept).unwrap();
    }

    #[test]
    fn exit_status_is_128_plus_the_signal() {
        assert_eq!(exit_status(libc::SIGTERM), 143);
        assert_eq!(exit_status(libc::SIGINT), 130);
    }
}
