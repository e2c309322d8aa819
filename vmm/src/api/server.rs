//! The API socket server: accept thread, per-connection threads and event
//! broadcasting.
//!
//! Every connection has a reader thread, which parses input and runs
//! commands, and a writer thread, which is the only code writing to the
//! socket. Replies and events reach the writer through the connection's
//! outbox, so lines never interleave, a client that does not read only ever
//! blocks its own writer thread (and is disconnected after
//! [`WRITE_TIMEOUT`]), and [`EventSender::emit`] never waits for a client: it
//! only appends to outboxes, dropping events for clients that have too many
//! pending.

use std::collections::VecDeque;
use std::fs;
use std::io::{self, ErrorKind, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use serde_json::Value;
use tracing::{debug, info, warn};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::poll::PollContext;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::error::QmpError;
use super::framing::{Frame, JsonFramer};
use super::protocol::{self, CommandHandler, Dispatch};
use super::session::{Session, MAX_DESCRIPTORS};

/// A write to a client that does not complete within this time disconnects
/// the client.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Events queued for one client beyond this are dropped until it catches up.
pub const MAX_QUEUED_EVENTS: usize = 4096;
/// Replies queued for one client beyond this stop its reader thread (and so
/// the client's further commands) until the client reads.
const MAX_QUEUED_REPLIES: usize = 256;
/// How long [`ApiServer::shutdown`] waits for queued replies and events to
/// be written before closing the connections.
pub const SHUTDOWN_FLUSH_TIMEOUT: Duration = Duration::from_secs(1);
/// Connections beyond this are refused with an error line.
pub const MAX_CONNECTIONS: usize = 64;
/// Largest incomplete JSON value accepted from a client.
pub const MAX_INPUT_SIZE: usize = 1 << 20;
/// A connection that has not completed `qmp_capabilities` within this time
/// is closed, so that clients which connect and never speak cannot hold the
/// connection slots.
pub const NEGOTIATION_TIMEOUT: Duration = Duration::from_secs(10);
/// File mode of the API socket: only godwit's user may connect.
pub const SOCKET_MODE: u32 = 0o600;
/// Unix socket paths must be shorter than `sizeof(sun_path)`.
const SUN_PATH_MAX: usize = 108;

/// Errors starting the API server.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Another process accepts connections on the socket.
    #[error(
        "API socket {} is already served by another process (a test connection to it \
         succeeded); stop that process or choose another --api-socket path",
        path.display()
    )]
    SocketInUse {
        /// Socket path.
        path: PathBuf,
    },
    /// The path exists and is not a socket.
    #[error(
        "API socket path {} exists and is not a socket; refusing to replace it: remove it \
         or choose another --api-socket path",
        path.display()
    )]
    NotASocket {
        /// Socket path.
        path: PathBuf,
    },
    /// The existing path could not be inspected or probed.
    #[error(
        "cannot check whether the existing API socket {} is in use: {source}; check the \
         permissions of the path or choose another --api-socket path",
        path.display()
    )]
    Probe {
        /// Socket path.
        path: PathBuf,
        /// Underlying error.
        source: io::Error,
    },
    /// A stale socket file could not be removed.
    #[error(
        "cannot remove the stale API socket {} (nothing listens on it): {source}; remove it \
         by hand or choose another --api-socket path",
        path.display()
    )]
    RemoveStale {
        /// Socket path.
        path: PathBuf,
        /// Underlying error.
        source: io::Error,
    },
    /// The path does not fit in a `sockaddr_un`.
    #[error(
        "API socket path {} is {len} bytes long, but Unix socket paths must be shorter \
         than {SUN_PATH_MAX} bytes; choose a shorter --api-socket path",
        path.display()
    )]
    PathTooLong {
        /// Socket path.
        path: PathBuf,
        /// Its length in bytes.
        len: usize,
    },
    /// `bind(2)`/`listen(2)` failed.
    #[error(
        "cannot create the API socket {}: {source}; check that its directory exists and is \
         writable",
        path.display()
    )]
    Bind {
        /// Socket path.
        path: PathBuf,
        /// Underlying error.
        source: io::Error,
    },
    /// The socket's mode could not be set.
    #[error(
        "cannot restrict the API socket {} to mode {mode:o}: {source}; check the filesystem \
         it is on or choose another --api-socket path",
        path.display()
    )]
    Permissions {
        /// Socket path.
        path: PathBuf,
        /// The mode that was to be set.
        mode: u32,
        /// Underlying error.
        source: io::Error,
    },
    /// Creating the server's internal resources failed.
    #[error("cannot start the API server ({what}): {source}; the system may be out of resources")]
    Setup {
        /// What was being created.
        what: &'static str,
        /// Underlying error.
        source: io::Error,
    },
}

/// Who may use the API, and for how long a connection may stay silent.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// File mode of the socket ([`SOCKET_MODE`] by default).
    pub mode: u32,
    /// Accept only peers of godwit's own user or root, as `SO_PEERCRED`
    /// reports them (on by default).
    pub same_user_only: bool,
    /// Time a new connection has to complete `qmp_capabilities`
    /// ([`NEGOTIATION_TIMEOUT`] by default).
    pub negotiation_timeout: Duration,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            mode: SOCKET_MODE,
            same_user_only: true,
            negotiation_timeout: NEGOTIATION_TIMEOUT,
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves consistent data (every
    // critical section is a few field updates), so poisoning is ignored.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

// ---------------------------------------------------------------------------
// Connections and their outboxes.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Normal operation.
    Open,
    /// The client stopped sending: write what is queued, then close.
    Draining,
    /// Close now; drop whatever is queued.
    Closed,
}

enum Outgoing {
    Line(String),
    Event(Arc<str>),
}

impl Outgoing {
    fn bytes(&self) -> &[u8] {
        match self {
            Outgoing::Line(line) => line.as_bytes(),
            Outgoing::Event(line) => line.as_bytes(),
        }
    }
}

struct Outbox {
    items: VecDeque<Outgoing>,
    queued_replies: usize,
    queued_events: usize,
    dropped_events: u64,
    negotiated: bool,
    state: State,
}

struct Connection {
    id: u64,
    server: u64,
    /// A handle on the socket, used only to shut it down.
    socket: UnixStream,
    outbox: Mutex<Outbox>,
    /// Signalled when there is something to write or the state changed.
    wake: Condvar,
    /// Signalled when a queued reply was written or the state changed.
    space: Condvar,
}

impl Connection {
    /// Queues a reply. Waits while too many replies are pending: a client
    /// that sends commands without reading the replies is slowed down to the
    /// pace at which it reads.
    fn push_line(&self, line: String, negotiated_now: bool) {
        let mut out = lock(&self.outbox);
        while out.state == State::Open && out.queued_replies >= MAX_QUEUED_REPLIES {
            out = self
                .space
                .wait(out)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
        if out.state != State::Open {
            return;
        }
        out.items.push_back(Outgoing::Line(line));
        out.queued_replies += 1;
        // Set under the lock after queueing the reply, so no event can be
        // queued before the `qmp_capabilities` reply.
        if negotiated_now {
            out.negotiated = true;
        }
        self.wake.notify_one();
    }

    fn is_negotiated(&self) -> bool {
        lock(&self.outbox).negotiated
    }

    fn is_closed(&self) -> bool {
        lock(&self.outbox).state == State::Closed
    }

    /// Queues an event if the client negotiated; never blocks on I/O.
    fn push_event(&self, line: &Arc<str>) -> bool {
        let mut out = lock(&self.outbox);
        if out.state != State::Open || !out.negotiated {
            return false;
        }
        if out.queued_events >= MAX_QUEUED_EVENTS {
            out.dropped_events += 1;
            if out.dropped_events == 1 {
                warn!(
                    conn = self.id,
                    "API client is not reading; dropping its events until it catches up"
                );
            }
            return false;
        }
        out.items.push_back(Outgoing::Event(Arc::clone(line)));
        out.queued_events += 1;
        self.wake.notify_one();
        true
    }

    /// Waits for the next item to write; `None` when the writer should stop.
    fn next_item(&self) -> Option<Outgoing> {
        let mut out = lock(&self.outbox);
        loop {
            if out.state == State::Closed {
                return None;
            }
            if let Some(item) = out.items.pop_front() {
                if matches!(item, Outgoing::Line(_)) {
                    out.queued_replies = out.queued_replies.saturating_sub(1);
                    self.space.notify_one();
                } else {
                    out.queued_events = out.queued_events.saturating_sub(1);
                    if out.queued_events == 0 && out.dropped_events > 0 {
                        info!(
                            conn = self.id,
                            dropped = out.dropped_events,
                            "API client caught up; events were dropped while it was not reading"
                        );
                        out.dropped_events = 0;
                    }
                }
                return Some(item);
            }
            if out.state == State::Draining {
                return None;
            }
            out = self
                .wake
                .wait(out)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
    }

    fn set_state(&self, state: State) {
        let mut out = lock(&self.outbox);
        if out.state == State::Open || state == State::Closed {
            out.state = state;
        }
        self.wake.notify_all();
        self.space.notify_all();
    }

    /// Closes the connection now; wakes both of its threads.
    fn close(&self) {
        self.set_state(State::Closed);
        // Errors only mean that the socket is already shut down.
        let _ = self.socket.shutdown(std::net::Shutdown::Both);
    }
}

/// The connections of all servers sharing an [`EventSender`].
#[derive(Default)]
struct Hub {
    conns: Mutex<Vec<Arc<Connection>>>,
}

impl Hub {
    fn add(&self, conn: Arc<Connection>) -> Result<(), Arc<Connection>> {
        let mut conns = lock(&self.conns);
        if conns.iter().filter(|c| c.server == conn.server).count() >= MAX_CONNECTIONS {
            return Err(conn);
        }
        conns.push(conn);
        Ok(())
    }

    fn remove(&self, id: u64) {
        lock(&self.conns).retain(|c| c.id != id);
    }

    fn of_server(&self, server: u64) -> Vec<Arc<Connection>> {
        lock(&self.conns)
            .iter()
            .filter(|c| c.server == server)
            .cloned()
            .collect()
    }
}

/// Broadcasts events to every negotiated API client. Cheap to clone; `emit`
/// never blocks on a client.
#[derive(Clone, Default)]
pub struct EventSender {
    hub: Arc<Hub>,
}

impl std::fmt::Debug for EventSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventSender")
            .field("connections", &lock(&self.hub.conns).len())
            .finish()
    }
}

impl EventSender {
    /// A sender not yet attached to a server (events go nowhere until it is
    /// passed to [`ApiServer::start_with_events`]). Useful to build a command
    /// handler that emits events before the server exists, or to run without
    /// an API socket.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sends `{"event": name, "data": data, "timestamp": ...}` to every client
    /// that completed capabilities negotiation. `data` is normally an object;
    /// `Value::Null` is sent as `{}`.
    pub fn emit(&self, name: &str, data: Value) {
        let line: Arc<str> = protocol::event_line(name, &data).into();
        let conns = lock(&self.hub.conns);
        let mut sent = 0;
        for conn in conns.iter() {
            if conn.push_event(&line) {
                sent += 1;
            }
        }
        debug!(event = name, clients = sent, "API event");
    }

    /// Number of connected clients that receive events.
    pub fn listeners(&self) -> usize {
        lock(&self.hub.conns)
            .iter()
            .filter(|c| c.is_negotiated())
            .count()
    }
}

// ---------------------------------------------------------------------------
// The server.

static NEXT_SERVER_ID: AtomicU64 = AtomicU64::new(1);
static NEXT_CONN_ID: AtomicU64 = AtomicU64::new(1);

/// A running API server. Dropping it (or calling [`ApiServer::shutdown`])
/// stops accepting, closes the connections and removes the socket file.
pub struct ApiServer {
    id: u64,
    path: PathBuf,
    /// Device and inode of the socket file we created.
    inode: Option<(u64, u64)>,
    hub: Arc<Hub>,
    stop: EventFd,
    accept_thread: Option<JoinHandle<()>>,
    stopped: bool,
}

impl std::fmt::Debug for ApiServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiServer")
            .field("path", &self.path)
            .field("running", &!self.stopped)
            .finish()
    }
}

impl ApiServer {
    /// Serves the QMP API on a Unix socket at `path`, dispatching commands to
    /// `handler`. Returns the server and the sender for events.
    ///
    /// An existing socket file at `path` is replaced only when nothing
    /// accepts connections on it.
    pub fn start<H: CommandHandler>(
        path: &Path,
        handler: Arc<H>,
    ) -> Result<(ApiServer, EventSender), ApiError> {
        let events = EventSender::new();
        let server = Self::start_with_events(path, handler, events.clone())?;
        Ok((server, events))
    }

    /// Like [`ApiServer::start`], with an [`EventSender`] created beforehand
    /// (for instance one the handler already holds).
    pub fn start_with_events<H: CommandHandler>(
        path: &Path,
        handler: Arc<H>,
        events: EventSender,
    ) -> Result<ApiServer, ApiError> {
        Self::start_with_options(path, handler, events, ServerOptions::default())
    }

    /// Like [`ApiServer::start_with_events`], with access and timeout
    /// settings other than the defaults.
    pub fn start_with_options<H: CommandHandler>(
        path: &Path,
        handler: Arc<H>,
        events: EventSender,
        options: ServerOptions,
    ) -> Result<ApiServer, ApiError> {
        let handler: Arc<dyn Dispatch> = handler;
        let len = path.as_os_str().len();
        if len >= SUN_PATH_MAX {
            return Err(ApiError::PathTooLong {
                path: path.to_path_buf(),
                len,
            });
        }
        // Everything that can fail for lack of resources comes before the
        // socket file exists, so that a failed start leaves no file behind.
        let stop = EventFd::new(EFD_NONBLOCK).map_err(|source| ApiError::Setup {
            what: "eventfd",
            source,
        })?;
        let poll = PollContext::<u32>::new().map_err(|e| ApiError::Setup {
            what: "epoll",
            source: e.into(),
        })?;
        poll.add(&stop, TOKEN_STOP).map_err(|e| ApiError::Setup {
            what: "epoll registration",
            source: e.into(),
        })?;

        remove_stale_socket(path)?;
        let listener = UnixListener::bind(path).map_err(|source| ApiError::Bind {
            path: path.to_path_buf(),
            source,
        })?;
        let inode = fs::metadata(path).ok().map(|m| (m.dev(), m.ino()));
        // From here on, dropping `server` removes the socket file.
        let mut server = ApiServer {
            id: NEXT_SERVER_ID.fetch_add(1, Ordering::Relaxed),
            path: path.to_path_buf(),
            inode,
            hub: Arc::clone(&events.hub),
            stop,
            accept_thread: None,
            stopped: false,
        };
        // Until this is done the mode is what the umask gave; peers are
        // checked on accept as well, so a connection in that window gains
        // nothing.
        fs::set_permissions(path, fs::Permissions::from_mode(options.mode)).map_err(|source| {
            ApiError::Permissions {
                path: path.to_path_buf(),
                mode: options.mode,
                source,
            }
        })?;
        listener
            .set_nonblocking(true)
            .map_err(|source| ApiError::Setup {
                what: "non-blocking listener",
                source,
            })?;
        poll.add(&listener, TOKEN_LISTENER)
            .map_err(|e| ApiError::Setup {
                what: "epoll registration",
                source: e.into(),
            })?;
        let accept = Acceptor {
            server: server.id,
            listener,
            hub: Arc::clone(&server.hub),
            handler,
            options,
        };
        let thread = thread::Builder::new()
            .name("api-accept".to_string())
            .spawn(move || {
                crate::seccomp::install_or_exit(crate::seccomp::ThreadKind::ApiAccept);
                accept.run(poll)
            })
            .map_err(|source| ApiError::Setup {
                what: "accept thread",
                source,
            })?;
        server.accept_thread = Some(thread);
        info!(path = %path.display(), "API server listening");
        Ok(server)
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stops accepting connections, removes the socket file and closes the
    /// open connections. Input not yet read is ignored; replies and events
    /// already queued, and the replies of commands that finish meanwhile, are
    /// still written, for at most [`SHUTDOWN_FLUSH_TIMEOUT`] in all (so the
    /// reply to a `quit` command reaches its client). Idempotent.
    pub fn shutdown(&mut self) {
        if self.stopped {
            return;
        }
        self.stopped = true;
        if let Some(thread) = self.accept_thread.take() {
            if let Err(err) = self.stop.write(1) {
                warn!("cannot signal the API accept thread to stop: {err}");
            } else if thread.join().is_err() {
                warn!("the API accept thread panicked");
            }
        }
        // Remove the socket file only if it is still the one we created.
        match fs::symlink_metadata(&self.path) {
            Ok(meta) if Some((meta.dev(), meta.ino())) == self.inode => {
                if let Err(err) = fs::remove_file(&self.path) {
                    warn!(path = %self.path.display(), "cannot remove the API socket: {err}");
                }
            }
            Ok(_) => info!(
                path = %self.path.display(),
                "API socket path was replaced by someone else; leaving it"
            ),
            Err(_) => {}
        }
        // Stop reading; each reader thread then flushes its connection's
        // outbox and closes it.
        let conns = self.hub.of_server(self.id);
        for conn in &conns {
            // An error only means that the socket is already shut down.
            let _ = conn.socket.shutdown(std::net::Shutdown::Read);
        }
        let deadline = Instant::now() + SHUTDOWN_FLUSH_TIMEOUT;
        while Instant::now() < deadline && conns.iter().any(|c| !c.is_closed()) {
            thread::sleep(Duration::from_millis(2));
        }
        for conn in &conns {
            if !conn.is_closed() {
                debug!(conn = conn.id, "API client not flushed in time; closing it");
            }
            conn.close();
            self.hub.remove(conn.id);
        }
        info!(path = %self.path.display(), "API server stopped");
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Removes a socket file at `path` that nothing listens on.
fn remove_stale_socket(path: &Path) -> Result<(), ApiError> {
    let meta = match fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(err) if err.kind() == ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(ApiError::Probe {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    if !meta.file_type().is_socket() {
        return Err(ApiError::NotASocket {
            path: path.to_path_buf(),
        });
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(ApiError::SocketInUse {
            path: path.to_path_buf(),
        }),
        Err(err) if err.kind() == ErrorKind::ConnectionRefused => {
            fs::remove_file(path).map_err(|source| ApiError::RemoveStale {
                path: path.to_path_buf(),
                source,
            })?;
            info!(path = %path.display(), "removed stale API socket");
            Ok(())
        }
        Err(source) => Err(ApiError::Probe {
            path: path.to_path_buf(),
            source,
        }),
    }
}

const TOKEN_LISTENER: u32 = 0;
const TOKEN_STOP: u32 = 1;

struct Acceptor {
    server: u64,
    listener: UnixListener,
    hub: Arc<Hub>,
    handler: Arc<dyn Dispatch>,
    options: ServerOptions,
}

impl Acceptor {
    fn run(self, poll: PollContext<u32>) {
        loop {
            let ready: Vec<u32> = match poll.wait() {
                Ok(events) => events.iter_readable().map(|e| e.token()).collect(),
                Err(err) if err.errno() == libc::EINTR => continue,
                Err(err) => {
                    warn!("API accept loop: waiting for connections failed: {err}; stopping");
                    return;
                }
            };
            if ready.contains(&TOKEN_STOP) {
                debug!("API accept thread stopping");
                return;
            }
            if ready.contains(&TOKEN_LISTENER) {
                self.accept_pending();
            }
        }
    }

    fn accept_pending(&self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => self.serve(stream),
                Err(err) if err.kind() == ErrorKind::WouldBlock => return,
                Err(err) if err.kind() == ErrorKind::Interrupted => continue,
                Err(err) => {
                    // E.g. out of file descriptors: back off instead of spinning.
                    warn!("cannot accept an API connection: {err}");
                    thread::sleep(Duration::from_millis(100));
                    return;
                }
            }
        }
    }

    fn serve(&self, stream: UnixStream) {
        let id = NEXT_CONN_ID.fetch_add(1, Ordering::Relaxed);
        if self.options.same_user_only {
            if let Err(refusal) = check_peer(&stream) {
                warn!(conn = id, "refusing an API connection: {refusal}");
                let err = QmpError::generic(refusal.to_string());
                // Best effort: the peer may not read it.
                let _ = stream.set_nonblocking(true);
                let _ = (&stream).write_all(protocol::error_line(&err, None).as_bytes());
                return;
            }
        }
        if let Err(err) = self.spawn_connection(id, stream) {
            warn!(conn = id, "cannot set up an API connection: {err}");
        }
    }

    fn spawn_connection(&self, id: u64, stream: UnixStream) -> io::Result<()> {
        stream.set_nonblocking(false)?;
        stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
        let conn = Arc::new(Connection {
            id,
            server: self.server,
            socket: stream.try_clone()?,
            outbox: Mutex::new(Outbox {
                items: VecDeque::from([Outgoing::Line(protocol::greeting_line())]),
                queued_replies: 1,
                queued_events: 0,
                dropped_events: 0,
                negotiated: false,
                state: State::Open,
            }),
            wake: Condvar::new(),
            space: Condvar::new(),
        });
        let writer_stream = stream.try_clone()?;
        if let Err(conn) = self.hub.add(Arc::clone(&conn)) {
            warn!(conn = id, "too many API connections; refusing one");
            let err = QmpError::generic(format!(
                "too many API connections (limit {MAX_CONNECTIONS}); close one and retry"
            ));
            let mut stream = stream;
            stream.write_all(protocol::error_line(&err, None).as_bytes())?;
            conn.close();
            return Ok(());
        }
        info!(conn = id, "API client connected");

        let writer = {
            let conn = Arc::clone(&conn);
            thread::Builder::new()
                .name(format!("api-conn{id}-wr"))
                .spawn(move || {
                    crate::seccomp::install_or_exit(crate::seccomp::ThreadKind::ApiWriter);
                    write_loop(&conn, writer_stream)
                })
        };
        let writer = match writer {
            Ok(writer) => writer,
            Err(err) => {
                self.hub.remove(id);
                conn.close();
                return Err(err);
            }
        };
        let reader = {
            let conn = Arc::clone(&conn);
            let hub = Arc::clone(&self.hub);
            let handler = Arc::clone(&self.handler);
            let negotiation_timeout = self.options.negotiation_timeout;
            thread::Builder::new()
                .name(format!("api-conn{id}-rd"))
                .spawn(move || {
                    crate::seccomp::install_or_exit(crate::seccomp::ThreadKind::ApiReader);
                    read_loop(&conn, stream, handler.as_ref(), negotiation_timeout);
                    // No more events for this client; flush the replies.
                    hub.remove(conn.id);
                    conn.set_state(State::Draining);
                    if writer.join().is_err() {
                        warn!(conn = conn.id, "API writer thread panicked");
                    }
                    conn.close();
                    info!(conn = conn.id, "API client disconnected");
                })
        };
        if let Err(err) = reader {
            self.hub.remove(id);
            conn.close();
            return Err(err);
        }
        Ok(())
    }
}

fn write_loop(conn: &Connection, mut stream: UnixStream) {
    while let Some(item) = conn.next_item() {
        if let Err(err) = stream.write_all(item.bytes()) {
            match err.kind() {
                ErrorKind::WouldBlock | ErrorKind::TimedOut => warn!(
                    conn = conn.id,
                    "API client did not read for {WRITE_TIMEOUT:?}; disconnecting it"
                ),
                _ => debug!(conn = conn.id, "cannot write to API client: {err}"),
            }
            conn.close();
            return;
        }
    }
}

fn read_loop(
    conn: &Connection,
    stream: UnixStream,
    handler: &dyn Dispatch,
    negotiation_timeout: Duration,
) {
    let mut framer = JsonFramer::new(MAX_INPUT_SIZE);
    let mut chunk = [0u8; 8192];
    let mut session = Session::default();
    let mut negotiated = false;
    let negotiate_by = Instant::now() + negotiation_timeout;
    loop {
        if !negotiated {
            let left = negotiate_by.saturating_duration_since(Instant::now());
            if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
                refuse_silent(conn, negotiation_timeout);
                return;
            }
        }
        let n = match receive(conn, &stream, &mut chunk, &mut session) {
            Ok(0) => return,
            Ok(n) => n,
            Err(err) if err.kind() == ErrorKind::Interrupted => continue,
            Err(err) if matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                refuse_silent(conn, negotiation_timeout);
                return;
            }
            Err(err) => {
                debug!(conn = conn.id, "cannot read from API client: {err}");
                return;
            }
        };
        framer.push(chunk.get(..n).unwrap_or_default());
        while let Some(frame) = framer.next_frame() {
            if conn.is_closed() {
                return;
            }
            let (line, negotiated_now) = match frame {
                Frame::Value(text) => {
                    let done = protocol::process(handler, &mut session, negotiated, text);
                    if let Some(command) = &done.command {
                        debug!(conn = conn.id, command, "API command done");
                    }
                    (done.line, done.negotiated)
                }
                Frame::Syntax(msg) => {
                    debug!(conn = conn.id, "API input is not JSON: {msg}");
                    let err = QmpError::generic(format!(
                        "JSON parse error: {msg}; input up to the next newline was discarded"
                    ));
                    (protocol::error_line(&err, None), false)
                }
                Frame::TooLarge(len) => {
                    let err = QmpError::generic(format!(
                        "QMP input exceeds {MAX_INPUT_SIZE} bytes ({len} bytes without a \
                         complete JSON value); input up to the next newline was discarded"
                    ));
                    (protocol::error_line(&err, None), false)
                }
            };
            conn.push_line(line, negotiated_now);
            if negotiated_now && !negotiated {
                negotiated = true;
                // A negotiated client may wait for events as long as it likes.
                if let Err(err) = stream.set_read_timeout(None) {
                    debug!(conn = conn.id, "cannot clear the API read timeout: {err}");
                    return;
                }
            }
        }
    }
}

/// Descriptors accepted with one read; more in one message are closed.
const FDS_PER_READ: usize = 8;

/// Reads client data into `buf`, keeping the descriptors that came with it
/// (`SCM_RIGHTS`) in `session`.
fn receive(
    conn: &Connection,
    stream: &UnixStream,
    buf: &mut [u8],
    session: &mut Session,
) -> io::Result<usize> {
    let mut iov = [libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    }];
    let mut fds: [RawFd; FDS_PER_READ] = [-1; FDS_PER_READ];
    // SAFETY: the iovec points at `buf`, which is valid for writes of its
    // length and not otherwise used during the call.
    let (n, count) = unsafe { stream.recv_with_fds(&mut iov, &mut fds) }
        .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
    for &raw in fds.iter().take(count) {
        // SAFETY: recvmsg just created `raw` for this process and nothing
        // else refers to it, so the OwnedFd is its only owner.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        if !session.receive(fd) {
            warn!(
                conn = conn.id,
                "API client passed more than {MAX_DESCRIPTORS} descriptors; closing the extra one"
            );
        }
    }
    Ok(n)
}

/// Tells a client that did not negotiate in time why it is disconnected.
fn refuse_silent(conn: &Connection, timeout: Duration) {
    info!(
        conn = conn.id,
        "API client did not complete qmp_capabilities within {timeout:?}; disconnecting it"
    );
    let err = QmpError::generic(format!(
        "no qmp_capabilities within {timeout:?} of connecting; closing the connection"
    ));
    conn.push_line(protocol::error_line(&err, None), false);
}

/// Why a peer may not use the API.
#[derive(Debug, thiserror::Error)]
enum PeerRefusal {
    /// `SO_PEERCRED` failed.
    #[error("cannot read the peer's credentials (SO_PEERCRED): {0}")]
    Credentials(#[source] io::Error),
    /// Another user's process.
    #[error(
        "API connection refused: the peer runs as uid {peer}, not as godwit's user (uid {own}) \
         or root; connect as uid {own}"
    )]
    OtherUser {
        /// The peer's uid.
        peer: u32,
        /// godwit's effective uid.
        own: u32,
    },
}

/// Accepts only processes of godwit's own user, or root.
fn check_peer(stream: &UnixStream) -> Result<(), PeerRefusal> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = libc::socklen_t::try_from(std::mem::size_of::<libc::ucred>()).unwrap_or(0);
    // SAFETY: `cred` and `len` are valid for writes and `len` holds the size
    // of `cred`, as SO_PEERCRED requires; the fd is a connected Unix socket
    // owned by `stream` for the duration of the call.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            std::ptr::addr_of_mut!(cred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(PeerRefusal::Credentials(io::Error::last_os_error()));
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let own = unsafe { libc::geteuid() };
    if cred.uid == own || cred.uid == 0 {
        Ok(())
    } else {
        Err(PeerRefusal::OtherUser {
            peer: cred.uid,
            own,
        })
    }
}
