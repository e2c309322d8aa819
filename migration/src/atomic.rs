//! Writing a file so that its final name only ever names a complete file.
//!
//! The content goes to a temporary file in the same directory, is flushed to
//! the disk (`fsync`), and only then renamed over the final name; the
//! directory is synced afterwards so the rename itself survives a crash. A
//! save that fails at any step removes its temporary file and leaves whatever
//! was under the final name before untouched.
//!
//! Replacing by rename also keeps a running VM safe that maps the previous
//! file (see [`crate::memory_file::map_private`]): the old inode stays alive,
//! unchanged, for as long as it is mapped.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Why an atomic write failed. Nothing was written under the final name.
#[derive(Debug, thiserror::Error)]
#[error("cannot write {}: {step} failed: {source}; the file under that name (if any) is unchanged. Check that the directory exists, is writable and has free space", path.display())]
pub struct AtomicWriteError {
    /// The final name that was to be written.
    pub path: PathBuf,
    /// Which step failed, e.g. "writing the content".
    pub step: &'static str,
    pub source: io::Error,
}

/// Files a save creates are private to the user: they hold guest memory and
/// register state.
const FILE_MODE: u32 = 0o600;

fn temp_path(path: &Path) -> Option<PathBuf> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let name = path.file_name()?.to_string_lossy().into_owned();
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    Some(path.with_file_name(format!(".{name}.tmp-{}-{n}", std::process::id())))
}

fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Writes `path` atomically: `write` fills a fresh temporary file in the same
/// directory, which is then synced and renamed to `path`.
///
/// If `write` returns an error, or syncing or renaming fails, the temporary
/// file is removed and `path` is left as it was.
pub fn write_atomically<T>(
    path: &Path,
    write: impl FnOnce(&mut File) -> io::Result<T>,
) -> Result<T, AtomicWriteError> {
    let fail = |step: &'static str| {
        move |source: io::Error| AtomicWriteError {
            path: path.to_path_buf(),
            step,
            source,
        }
    };
    let tmp = temp_path(path).ok_or_else(|| {
        fail("naming the file")(io::Error::new(
            io::ErrorKind::InvalidInput,
            "the path has no file name",
        ))
    })?;
    let mut file = OpenOptions::new()
        .write(true)
        .read(true)
        .create_new(true)
        .mode(FILE_MODE)
        .custom_flags(libc::O_CLOEXEC)
        .open(&tmp)
        .map_err(fail("creating a temporary file beside it"))?;
    let result = (|| {
        let value = write(&mut file).map_err(fail("writing the content"))?;
        file.sync_all()
            .map_err(fail("flushing the content to disk (fsync)"))?;
        std::fs::rename(&tmp, path).map_err(fail("renaming the temporary file"))?;
        Ok(value)
    })();
    match result {
        Ok(value) => {
            // The rename is durable once the directory is synced. A directory
            // that cannot be opened or synced (some network filesystems) still
            // holds the complete new file.
            if let Ok(dir) = File::open(parent_dir(path)) {
                if let Err(e) = dir.sync_all() {
                    tracing::warn!(path = %path.display(), "cannot sync the directory after a save: {e}");
                }
            }
            Ok(value)
        }
        Err(e) => {
            drop(file);
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use vmm_sys_util::tempdir::TempDir;

    fn leftovers(dir: &Path) -> Vec<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(".tmp-"))
            .collect()
    }

    #[test]
    fn writes_and_replaces() {
        let dir = TempDir::new().unwrap();
        let path = dir.as_path().join("state");
        write_atomically(&path, |f| f.write_all(b"one")).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"one");
        write_atomically(&path, |f| f.write_all(b"two")).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, FILE_MODE);
        assert!(leftovers(dir.as_path()).is_empty());
    }

    #[test]
    fn a_failed_write_leaves_the_previous_file() {
        let dir = TempDir::new().unwrap();
        let path = dir.as_path().join("state");
        std::fs::write(&path, b"previous complete file").unwrap();
        let err = write_atomically(&path, |f| {
            f.write_all(b"half of the new")?;
            Err::<(), _>(io::Error::other("disk full (simulated)"))
        })
        .unwrap_err();
        assert_eq!(err.step, "writing the content");
        assert!(err.to_string().contains("is unchanged"), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), b"previous complete file");
        assert!(leftovers(dir.as_path()).is_empty());
    }

    #[test]
    fn a_failed_first_write_leaves_no_file() {
        let dir = TempDir::new().unwrap();
        let path = dir.as_path().join("state");
        let _ = write_atomically(&path, |_| Err::<(), _>(io::Error::other("boom")));
        assert!(!path.exists());
        assert!(leftovers(dir.as_path()).is_empty());
    }

    #[test]
    fn a_missing_directory_is_reported() {
        let err =
            write_atomically(Path::new("/nonexistent-godwit-dir/state"), |_| Ok(())).unwrap_err();
        assert_eq!(err.step, "creating a temporary file beside it");
    }
}
