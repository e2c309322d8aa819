//! A snapshot directory replaced as a whole: the new snapshot is written into
//! a staging directory on the same filesystem, synced, and only then put in
//! place, so the directory's name only ever holds a complete snapshot, the
//! older one or the newer one. A save that fails at any point (a full disk,
//! an error) removes its staging directory and leaves the older snapshot as
//! it was; one that is killed leaves a staging directory that the next save
//! next to it removes.
//!
//! Putting in place: `renameat2(RENAME_EXCHANGE)` swaps the staging
//! directory and the older snapshot in one step, then the older one (now
//! under the staging name) is removed. Its files are unlinked, not changed:
//! a VM restored in map mode from them keeps its mapping. Where the
//! directory is a mount point (a staging directory beside it would be on
//! another filesystem) or the filesystem cannot exchange, the files are
//! staged inside the directory and renamed one by one, the state file
//! removed first and put back last, so an interrupted commit leaves no
//! state that names the wrong memory.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::{MEMORY_FILE, STATE_FILE};

const TMP_MARK: &str = ".godwit-tmp-";

#[derive(Debug, thiserror::Error)]
pub enum StagingError {
    #[error("cannot save a snapshot in {}: {step} failed: {source}; an older snapshot there is unchanged. Check that the directory is writable and has free space", dir.display())]
    Io {
        dir: PathBuf,
        step: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("cannot save a snapshot in {}: it holds files that are not part of a snapshot ({}), and a new snapshot replaces the whole directory; choose an empty directory or one that holds only a snapshot", dir.display(), names.join(", "))]
    Foreign { dir: PathBuf, names: Vec<String> },
}

/// Where the new snapshot is written, and how it will be put in place.
pub struct Staging {
    dir: PathBuf,
    path: PathBuf,
    /// Staged inside `dir` (files renamed one by one) rather than beside it.
    inside: bool,
    committed: bool,
    /// Removed by a termination signal that comes before the commit.
    _temp: crate::signals::TempPath,
}

fn io_err(dir: &Path, step: &'static str) -> impl FnOnce(io::Error) -> StagingError {
    let dir = dir.to_path_buf();
    move |source| StagingError::Io { dir, step, source }
}

/// Names a snapshot directory may hold: its two files, their temporary
/// files (`.state.gws.tmp-*`) and staging directories of killed saves.
fn is_snapshot_entry(name: &str) -> bool {
    name == STATE_FILE
        || name == MEMORY_FILE
        || name.starts_with(&format!(".{STATE_FILE}.tmp-"))
        || name.starts_with(&format!(".{MEMORY_FILE}.tmp-"))
        || name.starts_with(TMP_MARK)
}

/// The pid in a staging name `<prefix><pid>-<n>`.
fn staging_pid(name: &str, prefix: &str) -> Option<i32> {
    name.strip_prefix(prefix)?.split('-').next()?.parse().ok()
}

fn process_alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the process exists; nothing is sent.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

/// Removes the staging directories of saves that were killed.
fn remove_stale(place: &Path, prefix: &str) {
    let Ok(entries) = std::fs::read_dir(place) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        match staging_pid(&name, prefix) {
            // This process saves one snapshot at a time: its own are
            // leftovers too.
            Some(pid) if pid as u32 == std::process::id() || !process_alive(pid) => {
                tracing::info!(
                    "snapshot: removing {} left by an interrupted save",
                    e.path().display()
                );
                if let Err(err) = std::fs::remove_dir_all(e.path()) {
                    tracing::warn!("snapshot: cannot remove {}: {err}", e.path().display());
                }
            }
            _ => {}
        }
    }
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

impl Staging {
    /// Checks `dir` and creates the staging directory for it.
    pub fn new(dir: &Path) -> Result<Self, StagingError> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let existing = dir.is_dir();
        // A symlink names the directory to replace, not itself.
        let dir = if existing {
            std::fs::canonicalize(dir).map_err(io_err(dir, "resolving the directory"))?
        } else {
            dir.to_path_buf()
        };
        let name = dir
            .file_name()
            .ok_or_else(|| StagingError::Io {
                dir: dir.clone(),
                step: "naming the directory",
                source: io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "the path has no last component",
                ),
            })?
            .to_string_lossy()
            .into_owned();
        let parent = match dir.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        std::fs::create_dir_all(&parent).map_err(io_err(&dir, "creating its parent directory"))?;
        let mut inside = false;
        if existing {
            let mut foreign: Vec<String> = std::fs::read_dir(&dir)
                .map_err(io_err(&dir, "listing the directory"))?
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| !is_snapshot_entry(n))
                .collect();
            if !foreign.is_empty() {
                foreign.sort();
                return Err(StagingError::Foreign {
                    dir,
                    names: foreign,
                });
            }
            let dev = |p: &Path| std::fs::metadata(p).map(|m| m.dev());
            inside = dev(&dir).map_err(io_err(&dir, "reading the directory"))?
                != dev(&parent).map_err(io_err(&dir, "reading its parent directory"))?;
            remove_stale(&dir, TMP_MARK);
        }
        let beside_prefix = format!(".{name}{TMP_MARK}");
        remove_stale(&parent, &beside_prefix);
        let path = if inside {
            dir.join(format!("{TMP_MARK}{pid}-{n}"))
        } else {
            parent.join(format!("{beside_prefix}{pid}-{n}"))
        };
        std::fs::create_dir(&path).map_err(io_err(&dir, "creating a staging directory"))?;
        Ok(Staging {
            _temp: crate::signals::TempPath::register(&path),
            dir,
            path,
            inside,
            committed: false,
        })
    }

    /// Where the snapshot's files are to be written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The directory the snapshot ends up in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Puts the staged snapshot in place of the directory's contents.
    pub fn commit(mut self) -> Result<(), StagingError> {
        let dir = self.dir.clone();
        sync_dir(&self.path).map_err(io_err(&dir, "syncing the staging directory"))?;
        if self.inside {
            self.rename_files()?;
        } else if dir.exists() {
            match exchange(&self.path, &dir) {
                Ok(()) => {
                    // The older snapshot now sits at the staging name.
                    self.committed = true;
                    if let Err(e) = std::fs::remove_dir_all(&self.path) {
                        tracing::warn!(
                            "snapshot: cannot remove the replaced snapshot {}: {e}",
                            self.path.display()
                        );
                    }
                }
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOSYS)) => {
                    tracing::warn!("snapshot: {} cannot swap directories ({e}): the files are replaced one by one", dir.display());
                    self.rename_files()?;
                }
                Err(e) => return Err(io_err(&dir, "putting the new snapshot in place")(e)),
            }
        } else {
            std::fs::rename(&self.path, &dir)
                .map_err(io_err(&dir, "putting the new snapshot in place"))?;
            self.committed = true;
        }
        let parent = dir.parent().unwrap_or(Path::new("."));
        sync_dir(&dir)
            .and_then(|()| sync_dir(parent))
            .map_err(io_err(&dir, "syncing the directory"))
    }

    /// Memory first, state last: the state names the memory it goes with,
    /// and is away while the memory file is replaced.
    fn rename_files(&mut self) -> Result<(), StagingError> {
        let dir = self.dir.clone();
        match std::fs::remove_file(dir.join(STATE_FILE)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(io_err(&dir, "removing the older state file")(e))
            }
            _ => {}
        }
        sync_dir(&dir).map_err(io_err(&dir, "syncing the directory"))?;
        for f in [MEMORY_FILE, STATE_FILE] {
            std::fs::rename(self.path.join(f), dir.join(f))
                .map_err(io_err(&dir, "putting the new snapshot in place"))?;
        }
        self.committed = true;
        std::fs::remove_dir(&self.path).map_err(io_err(&dir, "removing the staging directory"))
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.committed {
            if let Err(e) = std::fs::remove_dir_all(&self.path) {
                tracing::warn!(
                    "snapshot: cannot remove the staging directory {}: {e}",
                    self.path.display()
                );
            }
        }
    }
}

fn exchange(a: &Path, b: &Path) -> io::Result<()> {
    let c = |p: &Path| {
        CString::new(p.as_os_str().as_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a path holds a NUL byte"))
    };
    let (a, b) = (c(a)?, c(b)?);
    // SAFETY: both paths are NUL-terminated strings that outlive the call;
    // renameat2 only reads them.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::tempdir::TempDir;

    fn write_snapshot(dir: &Path, tag: &str) {
        std::fs::write(dir.join(STATE_FILE), format!("state {tag}")).unwrap();
        std::fs::write(dir.join(MEMORY_FILE), format!("memory {tag}")).unwrap();
    }

    fn read_snapshot(dir: &Path) -> (String, String) {
        (
            std::fs::read_to_string(dir.join(STATE_FILE)).unwrap(),
            std::fs::read_to_string(dir.join(MEMORY_FILE)).unwrap(),
        )
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn a_new_snapshot_replaces_the_older_one_whole_and_leaves_nothing_behind() {
        let top = TempDir::new().unwrap();
        let dir = top.as_path().join("snap");
        let s = Staging::new(&dir).unwrap();
        write_snapshot(s.path(), "1");
        s.commit().unwrap();
        assert_eq!(read_snapshot(&dir), ("state 1".into(), "memory 1".into()));

        let s = Staging::new(&dir).unwrap();
        write_snapshot(s.path(), "2");
        // Until the commit, the older snapshot is all there is.
        assert_eq!(read_snapshot(&dir), ("state 1".into(), "memory 1".into()));
        s.commit().unwrap();
        assert_eq!(read_snapshot(&dir), ("state 2".into(), "memory 2".into()));
        assert_eq!(names(top.as_path()), ["snap"]);
        assert_eq!(names(&dir), [MEMORY_FILE, STATE_FILE]);
    }

    #[test]
    fn an_abandoned_save_leaves_the_older_snapshot() {
        let top = TempDir::new().unwrap();
        let dir = top.as_path().join("snap");
        std::fs::create_dir(&dir).unwrap();
        write_snapshot(&dir, "1");
        let s = Staging::new(&dir).unwrap();
        write_snapshot(s.path(), "2");
        drop(s);
        assert_eq!(read_snapshot(&dir), ("state 1".into(), "memory 1".into()));
        assert_eq!(names(top.as_path()), ["snap"]);
    }

    #[test]
    fn staging_left_by_a_dead_process_is_removed_and_foreign_files_refused() {
        let top = TempDir::new().unwrap();
        let dir = top.as_path().join("snap");
        std::fs::create_dir(&dir).unwrap();
        write_snapshot(&dir, "1");
        // No process has pid 0x7ffffffe (above pid_max).
        let stale = top.as_path().join(format!(".snap{TMP_MARK}2147483646-0"));
        std::fs::create_dir(&stale).unwrap();
        write_snapshot(&stale, "dead");
        let s = Staging::new(&dir).unwrap();
        assert!(!stale.exists());
        drop(s);

        std::fs::write(dir.join("notes.txt"), "mine").unwrap();
        let err = Staging::new(&dir).err().unwrap();
        assert!(matches!(err, StagingError::Foreign { .. }), "{err}");
        assert!(err.to_string().contains("notes.txt"), "{err}");
        assert_eq!(read_snapshot(&dir), ("state 1".into(), "memory 1".into()));
    }
}
