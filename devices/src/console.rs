//! The guest console's output path: the UART writes into a bounded buffer
//! on the vCPU thread and a writer thread of its own drains it to stdout or
//! a file. A reader that stops draining (a full pipe, a terminal held with
//! Ctrl-S) therefore never blocks a vCPU, and with it `stop`, snapshots,
//! migration and `quit`; what does not fit is dropped and counted.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Bytes the console holds for a slow reader before it drops output.
pub const DEFAULT_BUFFER: usize = 64 << 10;

/// How much the writer thread takes from the buffer per write.
const CHUNK: usize = 4096;

#[derive(Default)]
struct State {
    pending: VecDeque<u8>,
    /// Bytes the writer thread took and has not finished writing.
    in_flight: bool,
    /// Bytes lost because the buffer was full, the sink failed, or a file
    /// reached its size limit.
    dropped: u64,
    closed: bool,
}

struct Shared {
    state: Mutex<State>,
    /// The writer thread waits here for output (or the end).
    output: Condvar,
    /// `drain` waits here for the buffer to empty.
    drained: Condvar,
    capacity: usize,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The UART's side: never blocks on the sink.
pub struct ConsoleWriter {
    shared: Arc<Shared>,
}

impl Write for ConsoleWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let mut state = self.shared.lock();
        let room = self.shared.capacity.saturating_sub(state.pending.len());
        let kept = room.min(data.len());
        state.pending.extend(&data[..kept]);
        state.dropped += (data.len() - kept) as u64;
        if kept > 0 {
            self.shared.output.notify_one();
        }
        // Reported as written: the guest's UART has no way to retry, and a
        // short write would make vm-superio report an error per byte.
        Ok(data.len())
    }

    /// The writer thread flushes when it runs dry; the vCPU never waits.
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The VMM's side: how much was lost, and waiting (bounded) for the rest to
/// reach the sink at exit.
#[derive(Clone)]
pub struct ConsoleHandle {
    shared: Arc<Shared>,
}

impl ConsoleHandle {
    /// Bytes dropped so far.
    pub fn dropped(&self) -> u64 {
        self.shared.lock().dropped
    }

    /// Waits up to `timeout` for buffered output to be written; returns
    /// whether everything was. Output still pending after that counts as
    /// dropped.
    pub fn drain(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut state = self.shared.lock();
        while !state.pending.is_empty() || state.in_flight {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            state = self
                .shared
                .drained
                .wait_timeout(state, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        true
    }

    /// Ends the writer thread once the buffer is empty.
    pub fn close(&self) {
        self.shared.lock().closed = true;
        self.shared.output.notify_all();
    }
}

/// A sink that stops at `limit` bytes (`--serial file:PATH,max-size=N`).
struct Limited<W> {
    inner: W,
    left: u64,
}

impl<W: Write> Write for Limited<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = usize::try_from(self.left)
            .unwrap_or(usize::MAX)
            .min(data.len());
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::StorageFull,
                "the console file reached its max-size",
            ));
        }
        let written = self.inner.write(&data[..n])?;
        self.left -= written as u64;
        Ok(written)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Starts the writer thread for `sink`. `limit` caps the bytes written to
/// it in total.
pub fn spawn(
    sink: Box<dyn Write + Send>,
    capacity: usize,
    limit: Option<u64>,
) -> io::Result<(ConsoleWriter, ConsoleHandle)> {
    let shared = Arc::new(Shared {
        state: Mutex::new(State::default()),
        output: Condvar::new(),
        drained: Condvar::new(),
        capacity,
    });
    let sink: Box<dyn Write + Send> = match limit {
        Some(left) => Box::new(Limited { inner: sink, left }),
        None => sink,
    };
    let thread_shared = shared.clone();
    std::thread::Builder::new()
        .name("console".into())
        .spawn(move || {
            crate::thread_hook::started(crate::thread_hook::DeviceThread::Console);
            write_out(&thread_shared, sink)
        })?;
    Ok((
        ConsoleWriter {
            shared: shared.clone(),
        },
        ConsoleHandle { shared },
    ))
}

fn write_out(shared: &Shared, mut sink: Box<dyn Write + Send>) {
    let mut chunk = Vec::with_capacity(CHUNK);
    let mut failed = false;
    loop {
        {
            let mut state = shared.lock();
            while state.pending.is_empty() && !state.closed {
                state = shared
                    .output
                    .wait(state)
                    .unwrap_or_else(PoisonError::into_inner);
            }
            if state.pending.is_empty() {
                return;
            }
            let n = state.pending.len().min(CHUNK);
            chunk.clear();
            chunk.extend(state.pending.drain(..n));
            state.in_flight = true;
        }
        let (written, result) = write_counted(&mut *sink, &chunk);
        let result = result.and_then(|()| {
            let idle = shared.lock().pending.is_empty();
            if idle {
                sink.flush()
            } else {
                Ok(())
            }
        });
        let mut state = shared.lock();
        if let Err(e) = result {
            state.dropped += (chunk.len() - written) as u64;
            if !failed {
                failed = true;
                tracing::warn!("console output failed ({e}); further output is counted as dropped");
            }
        }
        state.in_flight = false;
        if state.pending.is_empty() {
            shared.drained.notify_all();
        }
    }
}

/// `write_all` that says how much it wrote before an error.
fn write_counted(sink: &mut dyn Write, data: &[u8]) -> (usize, io::Result<()>) {
    let mut written = 0;
    while written < data.len() {
        match sink.write(&data[written..]) {
            Ok(0) => return (written, Err(io::ErrorKind::WriteZero.into())),
            Ok(n) => written += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return (written, Err(e)),
        }
    }
    (written, Ok(()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    /// A sink that blocks until the test lets it go, as a full pipe does.
    struct Gate {
        open: mpsc::Receiver<()>,
        out: Arc<Mutex<Vec<u8>>>,
    }

    impl Write for Gate {
        fn write(&mut self, data: &[u8]) -> io::Result<usize> {
            let _ = self.open.recv();
            self.out.lock().unwrap().extend_from_slice(data);
            Ok(data.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_stalled_sink_never_blocks_the_writer_and_losses_are_counted() {
        let (open, gate) = mpsc::channel();
        let out = Arc::new(Mutex::new(Vec::new()));
        let sink = Gate {
            open: gate,
            out: out.clone(),
        };
        let (mut writer, handle) = spawn(Box::new(sink), 16, None).unwrap();
        let started = Instant::now();
        for _ in 0..1000 {
            writer.write_all(b"0123456789").unwrap();
            writer.flush().unwrap();
        }
        assert!(started.elapsed() < Duration::from_secs(2));
        assert!(handle.dropped() > 9000, "dropped {}", handle.dropped());
        assert!(!handle.drain(Duration::from_millis(50)));
        for _ in 0..100 {
            let _ = open.send(());
        }
        assert!(handle.drain(Duration::from_secs(5)));
        let kept = out.lock().unwrap().len() as u64;
        assert_eq!(kept + handle.dropped(), 10_000);
        handle.close();
    }

    #[test]
    fn a_file_limit_keeps_the_first_bytes_and_counts_the_rest() {
        let out = Arc::new(Mutex::new(Vec::new()));
        struct Shared(Arc<Mutex<Vec<u8>>>);
        impl Write for Shared {
            fn write(&mut self, data: &[u8]) -> io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(data);
                Ok(data.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let (mut writer, handle) =
            spawn(Box::new(Shared(out.clone())), DEFAULT_BUFFER, Some(100)).unwrap();
        writer.write_all(&[b'x'; 300]).unwrap();
        assert!(handle.drain(Duration::from_secs(5)));
        assert_eq!(out.lock().unwrap().len(), 100);
        assert_eq!(handle.dropped(), 200);
        handle.close();
    }
}
