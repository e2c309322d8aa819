//! Multifd: the pages of a migration striped over several extra
//! connections, each with its own thread on both sides (QEMU's `multifd`
//! capability and `multifd-channels` parameter).
//!
//! The handshake, the device state and the handoff stay on the main
//! stream. After the destination accepted `Hello` (which carries the
//! channel count and a random per-migration token), the source opens the
//! channels to the same address, each authenticated like the main stream
//! (mutual TLS for `tls:`) and opened with a `ChannelHello` repeating the
//! token; the destination binds each to its slot, refuses any other
//! connection, and answers `ChannelsReady` on the main stream once all are
//! there, or `Abort` with what is missing after [`CHANNEL_WAIT`].
//!
//! # Rounds and ordering
//!
//! The same page can travel in round k on channel a and in round k+1 on
//! channel b; the destination must never let the older copy land last.
//! - Source: a round's pages are handed out to the channels; every channel
//!   then writes its `RoundEnd` and reports it, and the source takes the
//!   next dirty log (or stops the guest) only once every channel reported.
//! - Destination: a channel's thread writes its pages in the order they
//!   come; at its `RoundEnd` k it waits until every channel has reached
//!   `RoundEnd` k (so every page of round k is written) before it reads
//!   anything of round k+1. The main stream's `RoundEnd` k is acted on
//!   only when every channel has finished round k, and the device state
//!   only once every channel sent `ChannelEnd`.
//!
//! Any channel failing ends the whole migration: the destination stops
//! the other channels and the main stream and answers `Abort`; the source
//! resumes the guest.

use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::Scope;
use std::time::{Duration, Instant};

use godwit_migration::protocol::{
    read_message_limited, read_message_reusing, write_json, write_message, ChannelHello, Kind,
    MultifdHello, ProtocolError, RoundEnd, MAX_CHANNELS, MAX_CHANNEL_HELLO,
};

use super::destination::{main_stream_timeout, write_pages, IncomingError};
use super::source::{Meter, Sender};
use super::status::IncomingTally;
use super::transport::{connect_channel, ChannelListener, Conn, Opening};
use super::{MigrateError, BATCH_PAGES, PEER_TIMEOUT};
use crate::machine::migration_status::MigrationParams;
use crate::machine::VmHandle;
use crate::vstate::memory::GuestRam;

/// How long the destination waits for every channel after it accepted
/// `Hello`.
pub(super) const CHANNEL_WAIT: Duration = Duration::from_secs(10);
/// Pages per job handed to one channel's thread (4 page batches).
const JOB_PAGES: usize = BATCH_PAGES * 4;
/// Jobs queued per channel: bounds what waits while the socket is full.
const QUEUE: usize = 4;
/// Refused connections named in the error (more are only counted).
const STRAYS_NAMED: usize = 8;
/// Connections being set up at once while the destination waits for its
/// channels (more are refused).
const MAX_IN_FLIGHT: usize = 32;
/// Test hook: a source started with this variable set opens no channel, as
/// if something between the hosts dropped them.
const WITHHOLD_HOOK: &str = "GODWIT_TEST_MULTIFD_WITHHOLD";

/// 32 random bytes, as hex: binds the channels to this migration.
pub(super) fn new_token() -> Result<String, MigrateError> {
    let mut bytes = [0u8; 32];
    let mut filled = 0;
    while filled < bytes.len() {
        let rest = &mut bytes[filled..];
        // SAFETY: getrandom(2) writes at most `rest.len()` bytes into
        // `rest`, a live, writable buffer of that length.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(MigrateError::Io {
                what: "cannot draw the multifd channels' token from the kernel".into(),
                source: e,
            });
        }
        filled += n as usize;
    }
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Equal without telling how long a prefix matched.
fn same_token(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

// ---------------------------------------------------------------- source

/// Opens the channels, each greeted with its index and the token.
pub(super) fn connect_channels(
    uri: &str,
    params: &MigrationParams,
    multifd: &MultifdHello,
    opening: &Opening,
) -> Result<Vec<Conn>, MigrateError> {
    if std::env::var_os(WITHHOLD_HOOK).is_some() {
        tracing::warn!("migration: test hook {WITHHOLD_HOOK}: opening no multifd channel");
        return Ok(Vec::new());
    }
    // Side by side: each waits for its own handshake with the destination.
    std::thread::scope(|s| {
        let opening: Vec<_> = (0..multifd.channels)
            .map(|channel| {
                s.spawn(move || {
                    let on = |e: MigrateError| MigrateError::Channel {
                        channel,
                        source: Box::new(e),
                    };
                    let mut conn = connect_channel(uri, params, opening).map_err(on)?;
                    conn.set_timeout(Some(PEER_TIMEOUT));
                    let hello = ChannelHello {
                        channel,
                        token: multifd.token.clone(),
                    };
                    let sent = write_json(&mut conn, Kind::ChannelHello, &hello);
                    conn.confirm_accepted(&format!("the destination {uri}"))
                        .map_err(|e| on(e.into()))?;
                    sent.map_err(|e| on(e.into()))?;
                    Ok(conn)
                })
            })
            .collect();
        opening
            .into_iter()
            .map(|t| {
                t.join().unwrap_or_else(|_| {
                    Err(MigrateError::ThreadEnded(
                        "a thread opening a multifd channel".into(),
                    ))
                })
            })
            .collect()
    })
}

enum Job {
    Pages { pages: Vec<u64>, skip_zero: bool },
    RoundEnd(u32),
    End,
}

type Ack = (u16, Result<(), MigrateError>);

/// The source's channels: one sender thread each, fed page lists.
pub(super) struct Channels<'scope> {
    jobs: Vec<SyncSender<Job>>,
    acks: Receiver<Ack>,
    /// Clones of the channels' sockets, to break off blocked writes.
    breakers: Vec<Conn>,
    next: usize,
    ended: bool,
    _scope: std::marker::PhantomData<&'scope ()>,
}

impl<'scope> Channels<'scope> {
    /// Starts one sender thread per connection within `scope`.
    pub(super) fn start<'env>(
        scope: &'scope Scope<'scope, 'env>,
        handle: &'env VmHandle,
        meter: &'env Meter,
        conns: Vec<Conn>,
    ) -> Result<Channels<'scope>, MigrateError> {
        let (ack_tx, acks) = mpsc::channel();
        let mut jobs = Vec::new();
        let mut breakers = Vec::new();
        for (index, conn) in conns.into_iter().enumerate() {
            breakers.push(conn.try_clone().map_err(MigrateError::io(
                "cannot duplicate a multifd channel's connection",
            ))?);
            let (tx, rx) = mpsc::sync_channel(QUEUE);
            let ack = ack_tx.clone();
            let channel = u16::try_from(index).unwrap_or(u16::MAX);
            std::thread::Builder::new()
                .name(format!("migration-ch{index}"))
                .spawn_scoped(scope, move || {
                    // Whatever ends this thread, the source hears of it.
                    let mut notice = ExitNotice {
                        ack: &ack,
                        channel,
                        armed: true,
                    };
                    // A panic ends this thread only: re-raised by the scope,
                    // it would skip the migration thread's clean-up (dirty
                    // logging, status), so it becomes this channel's error.
                    let sent = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        run_sender(conn, handle, meter, &rx, &ack, channel)
                    }));
                    match sent {
                        Ok(Ok(())) => notice.armed = false,
                        Ok(Err(e)) => {
                            let _ = ack.send((channel, Err(e)));
                            notice.armed = false;
                        }
                        // The notice, still armed, reports it.
                        Err(_) => {}
                    }
                })
                .map_err(MigrateError::io("cannot start a multifd sender thread"))?;
            jobs.push(tx);
        }
        Ok(Channels {
            jobs,
            acks,
            breakers,
            next: 0,
            ended: false,
            _scope: std::marker::PhantomData,
        })
    }

    /// Hands `pages` out to the channels, in runs of [`JOB_PAGES`].
    pub(super) fn send_pages(
        &mut self,
        pages: &[u64],
        skip_zero: bool,
    ) -> Result<(), MigrateError> {
        for chunk in pages.chunks(JOB_PAGES) {
            let i = self.next % self.jobs.len();
            self.next += 1;
            let job = Job::Pages {
                pages: chunk.to_vec(),
                skip_zero,
            };
            if self.jobs[i].send(job).is_err() {
                return Err(self.failure());
            }
        }
        Ok(())
    }

    /// Every channel closes round `round`; returns once each has written
    /// all of it.
    pub(super) fn end_round(&mut self, round: u32) -> Result<(), MigrateError> {
        self.all(|| Job::RoundEnd(round))
    }

    /// Every channel says it carries nothing more.
    pub(super) fn end(&mut self) -> Result<(), MigrateError> {
        self.all(|| Job::End)?;
        self.ended = true;
        Ok(())
    }

    fn all(&mut self, job: impl Fn() -> Job) -> Result<(), MigrateError> {
        for tx in &self.jobs {
            if tx.send(job()).is_err() {
                return Err(self.failure());
            }
        }
        // No deadline of its own: a sender makes progress or fails within
        // its socket's timeout (PEER_TIMEOUT), and a round may rightly take
        // longer than that under max-bandwidth.
        for _ in 0..self.jobs.len() {
            match self.acks.recv() {
                Ok((_, Ok(()))) => {}
                Ok((channel, Err(e))) => return Err(channel_error(channel, e)),
                Err(_) => {
                    return Err(MigrateError::ThreadEnded(
                        "every multifd sender thread".into(),
                    ))
                }
            }
        }
        Ok(())
    }

    /// Why a sender thread stopped taking jobs.
    fn failure(&self) -> MigrateError {
        match self.acks.recv_timeout(Duration::from_secs(5)) {
            Ok((channel, Err(e))) => channel_error(channel, e),
            _ => MigrateError::ThreadEnded("a multifd sender thread".into()),
        }
    }
}

impl Drop for Channels<'_> {
    fn drop(&mut self) {
        // Ending early: break off whatever a sender is blocked on, so that
        // its thread ends with the scope.
        if !self.ended {
            for b in &self.breakers {
                b.shutdown();
            }
        }
    }
}

/// Tells the source a sender thread ended without saying why (a panic).
struct ExitNotice<'a> {
    ack: &'a mpsc::Sender<Ack>,
    channel: u16,
    armed: bool,
}

impl Drop for ExitNotice<'_> {
    fn drop(&mut self) {
        if self.armed {
            let _ = self.ack.send((
                self.channel,
                Err(MigrateError::ThreadEnded(format!(
                    "the sender thread of multifd channel {}",
                    self.channel
                ))),
            ));
        }
    }
}

fn channel_error(channel: u16, e: MigrateError) -> MigrateError {
    match e {
        MigrateError::Cancelled => MigrateError::Cancelled,
        e => MigrateError::Channel {
            channel,
            source: Box::new(e),
        },
    }
}

fn run_sender(
    mut conn: Conn,
    handle: &VmHandle,
    meter: &Meter,
    jobs: &Receiver<Job>,
    acks: &mpsc::Sender<Ack>,
    channel: u16,
) -> Result<(), MigrateError> {
    let mut sender = Sender::new(&mut conn, &handle.migration, meter);
    let mut pages = 0u64;
    // Ends when the source drops its side (the migration ended early).
    while let Ok(job) = jobs.recv() {
        match job {
            Job::Pages {
                pages: list,
                skip_zero,
            } => {
                pages += list.len() as u64;
                sender.send_pages(handle, &list, skip_zero)?;
            }
            Job::RoundEnd(round) => {
                sender.send_json(Kind::RoundEnd, &RoundEnd { round, pages })?;
                pages = 0;
                let _ = acks.send((channel, Ok(())));
            }
            Job::End => {
                sender.send(Kind::ChannelEnd, &[])?;
                let _ = acks.send((channel, Ok(())));
                return Ok(());
            }
        }
    }
    if handle.migration.cancel.load(Ordering::SeqCst) {
        return Err(MigrateError::Cancelled);
    }
    Ok(())
}

// ----------------------------------------------------------- destination

/// Why `Hello`'s multifd request cannot be served here, if it cannot.
pub(super) fn refusal(
    multifd: &MultifdHello,
    listener: Option<&ChannelListener>,
) -> Option<String> {
    if !(1..=MAX_CHANNELS).contains(&multifd.channels) {
        return Some(format!(
            "the source asks for {} multifd channels; this godwit takes 1 to {MAX_CHANNELS}: set multifd-channels within that range",
            multifd.channels
        ));
    }
    if listener.is_none() {
        return Some(
            "multifd needs a tcp: or tls: address and this destination listens on unix:".into(),
        );
    }
    None
}

/// Accepts the `multifd.channels` channels on the main stream's address
/// within [`CHANNEL_WAIT`]: each authenticated like the main stream and
/// bound by its `ChannelHello`; any other connection is refused (told why)
/// and named in the error if channels are missing. Connections are set up
/// side by side, a thread each (at most [`MAX_IN_FLIGHT`] at a time), so a
/// slow or silent one holds up no other.
pub(super) fn accept_channels(
    listener: &ChannelListener,
    multifd: &MultifdHello,
) -> Result<Vec<Conn>, IncomingError> {
    let n = usize::from(multifd.channels);
    let slots: Mutex<Vec<Option<Conn>>> = Mutex::new((0..n).map(|_| None).collect());
    let strays: Mutex<(usize, Vec<String>)> = Mutex::new((0, Vec::new()));
    let refuse = |refused: String| {
        tracing::warn!("incoming migration: refused a connection that is not one of this migration's channels: {refused}");
        let mut st = strays.lock().unwrap_or_else(PoisonError::into_inner);
        st.0 += 1;
        if st.1.len() < STRAYS_NAMED {
            st.1.push(refused);
        }
    };
    let full = || {
        slots
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .all(Option::is_some)
    };
    let deadline = Instant::now() + CHANNEL_WAIT;
    tracing::info!("incoming migration: waiting for {n} multifd channel(s)");
    let (done_tx, done_rx) = mpsc::channel::<()>();
    // Connections still being set up, by number: shut when the wait ends,
    // so that a peer trickling its handshake cannot hold the scope open.
    let in_setup: Mutex<Vec<(u64, std::net::TcpStream)>> = Mutex::new(Vec::new());
    let mut next_id = 0u64;
    std::thread::scope(|s| {
        let mut in_flight = 0usize;
        loop {
            while done_rx.try_recv().is_ok() {
                in_flight -= 1;
            }
            if full() {
                break;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            // While handshakes run, look at their outcome every millisecond.
            let wait = if in_flight > 0 {
                left.min(Duration::from_millis(1))
            } else {
                left
            };
            let (tcp, from) = match listener.accept_tcp(wait) {
                Ok(Some(pair)) => pair,
                Ok(None) => continue,
                Err(e) => {
                    refuse(e);
                    continue;
                }
            };
            if in_flight >= MAX_IN_FLIGHT {
                refuse(format!(
                    "{from}: {MAX_IN_FLIGHT} other connections were being set up"
                ));
                continue;
            }
            in_flight += 1;
            let id = next_id;
            next_id += 1;
            if let Ok(clone) = tcp.try_clone() {
                in_setup
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push((id, clone));
            }
            let (slots, refuse, done, in_setup) = (&slots, &refuse, done_tx.clone(), &in_setup);
            let spawned = std::thread::Builder::new()
                .name("incoming-channel-setup".into())
                .spawn_scoped(s, move || {
                    let result = listener
                        .establish(tcp, from, deadline)
                        .and_then(|mut conn| {
                            let claimed = read_greeting(&mut conn, multifd);
                            let mut slots = slots.lock().unwrap_or_else(PoisonError::into_inner);
                            // Under the slots' lock: a connection that takes a
                            // slot is never shut as one still in set-up.
                            in_setup
                                .lock()
                                .unwrap_or_else(PoisonError::into_inner)
                                .retain(|(i, _)| *i != id);
                            match claimed.and_then(|i| free_slot(&slots, i)) {
                                Ok(i) => {
                                    conn.set_timeout(Some(PEER_TIMEOUT));
                                    tracing::info!(
                                        "incoming migration: multifd channel {i} from {from}"
                                    );
                                    slots[i] = Some(conn);
                                    Ok(())
                                }
                                Err(why) => {
                                    drop(slots);
                                    let _ = write_message(
                                        &mut conn,
                                        Kind::Abort,
                                        format!("refused by the destination: {why}").as_bytes(),
                                    );
                                    Err(why)
                                }
                            }
                        });
                    if let Err(why) = result {
                        refuse(format!("{from}: {why}"));
                    }
                    let _ = done.send(());
                });
            if let Err(e) = spawned {
                in_flight -= 1;
                refuse(format!("{from}: cannot start a thread to set it up: {e}"));
            }
        }
        for (_, unfinished) in in_setup
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .drain(..)
        {
            let _ = unfinished.shutdown(std::net::Shutdown::Both);
        }
    });
    let slots = slots.into_inner().unwrap_or_else(PoisonError::into_inner);
    let missing: Vec<String> = slots
        .iter()
        .enumerate()
        .filter(|(_, s)| s.is_none())
        .map(|(i, _)| i.to_string())
        .collect();
    if !missing.is_empty() {
        let (count, named) = strays.into_inner().unwrap_or_else(PoisonError::into_inner);
        let mut refused = String::new();
        if count > 0 {
            refused = format!(
                "; refused {count} other connection(s): {}",
                named.join("; ")
            );
        }
        return Err(IncomingError::ChannelsMissing {
            missing: missing.join(", "),
            of: multifd.channels,
            waited_s: CHANNEL_WAIT.as_secs(),
            refused,
        });
    }
    Ok(slots.into_iter().flatten().collect())
}

/// Reads a connection's `ChannelHello`: the channel it claims, or why it
/// is not one of this migration's channels.
fn read_greeting(conn: &mut Conn, multifd: &MultifdHello) -> Result<usize, String> {
    let m = read_message_limited(conn, MAX_CHANNEL_HELLO)
        .map_err(|e| format!("no multifd channel greeting ({e})"))?;
    if m.kind != Kind::ChannelHello {
        return Err(format!(
            "it sent {:?} where a multifd channel greets",
            m.kind
        ));
    }
    let hello: ChannelHello = m.json().map_err(|e| e.to_string())?;
    if !same_token(&hello.token, &multifd.token) {
        return Err("its token is not this migration's: it is no channel of this migration".into());
    }
    Ok(usize::from(hello.channel))
}

/// Channel `i` if it exists and is not taken yet.
fn free_slot(slots: &[Option<Conn>], i: usize) -> Result<usize, String> {
    match slots.get(i) {
        None => Err(format!(
            "it claims channel {i}, but this migration has {} channel(s)",
            slots.len()
        )),
        Some(Some(_)) => Err(format!("channel {i} is already connected")),
        Some(None) => Ok(i),
    }
}

struct RoundsState {
    /// The last round each channel has written all of.
    done: Vec<Option<u32>>,
    ended: Vec<bool>,
    /// When the last channel ended: from then on the main stream must bring
    /// the device state within PEER_TIMEOUT.
    all_ended_at: Option<Instant>,
    /// The main stream's loop returned.
    main_done: bool,
    /// Set on the first failure: who failed (None: the main stream).
    failed: Option<Option<u16>>,
}

/// Where the destination's channels meet at each round's end.
struct Rounds {
    state: Mutex<RoundsState>,
    cv: Condvar,
    /// To break off the main stream's read when a channel fails.
    main: Conn,
    /// To break off the channels' reads when anything fails.
    channels: Vec<Conn>,
}

/// Why a wait at a round's end ended without the round.
enum Waited {
    /// Something failed; its own error says what.
    Failed,
    /// A channel ended (`ChannelEnd`) before this round.
    EndedBefore(u32),
}

enum Progress {
    Done,
    Wait,
    Never,
}

impl Rounds {
    fn lock(&self) -> MutexGuard<'_, RoundsState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits without a deadline of its own: every channel still receiving
    /// reads its socket under PEER_TIMEOUT, and a stalled one fails and
    /// wakes everyone; a round may rightly take longer under max-bandwidth.
    fn wait_until(
        &self,
        round: u32,
        pred: impl Fn(&RoundsState) -> Progress,
    ) -> Result<(), Waited> {
        let mut st = self.lock();
        loop {
            if st.failed.is_some() {
                return Err(Waited::Failed);
            }
            match pred(&st) {
                Progress::Done => return Ok(()),
                Progress::Never => return Err(Waited::EndedBefore(round)),
                Progress::Wait => {}
            }
            st = self.cv.wait(st).unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// Channel `ch` has written every page of `round`: waits until every
    /// channel has.
    fn arrive(&self, ch: usize, round: u32) -> Result<(), Waited> {
        if let Some(d) = self.lock().done.get_mut(ch) {
            *d = Some(round);
        }
        self.cv.notify_all();
        self.wait_round(round)
    }

    fn wait_round(&self, round: u32) -> Result<(), Waited> {
        self.wait_until(round, |st| {
            let reached = |d: &Option<u32>| d.is_some_and(|d| d >= round);
            if st.done.iter().all(reached) {
                Progress::Done
            } else if st
                .done
                .iter()
                .zip(&st.ended)
                .any(|(d, e)| *e && !reached(d))
            {
                Progress::Never
            } else {
                Progress::Wait
            }
        })
    }

    fn end(&self, ch: usize) {
        {
            let mut st = self.lock();
            if let Some(e) = st.ended.get_mut(ch) {
                *e = true;
            }
            if st.ended.iter().all(|e| *e) && st.all_ended_at.is_none() {
                st.all_ended_at = Some(Instant::now());
            }
        }
        self.cv.notify_all();
    }

    /// The main stream's loop returned: the watchdog can stop.
    fn main_done(&self) {
        self.lock().main_done = true;
        self.cv.notify_all();
    }

    /// The main stream carries one `RoundEnd` a round while the pages go on
    /// the channels, so it is read without a timeout of its own (a round may
    /// take minutes under max-bandwidth). A silent source is still noticed:
    /// during the rounds by the channels' own read timeouts (a failure
    /// breaks off the main read), and once every channel ended, here: the
    /// device state must then come within PEER_TIMEOUT.
    fn watch_main(&self) {
        let mut st = self.lock();
        loop {
            if st.failed.is_some() || st.main_done {
                return;
            }
            let wait = match st.all_ended_at {
                Some(at) => match main_stream_timeout().checked_sub(at.elapsed()) {
                    Some(left) if !left.is_zero() => left,
                    _ => {
                        drop(st);
                        tracing::warn!(
                            "incoming migration: every multifd channel ended but the source sent no device state within {:?}",
                            main_stream_timeout()
                        );
                        self.main.shutdown_read();
                        return;
                    }
                },
                None => PEER_TIMEOUT,
            };
            st = self
                .cv
                .wait_timeout(st, wait)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    fn wait_ended(&self) -> Result<(), Waited> {
        self.wait_until(u32::MAX, |st| {
            if st.ended.iter().all(|e| *e) {
                Progress::Done
            } else {
                Progress::Wait
            }
        })
    }

    /// The first failure stops everything else.
    fn fail(&self, who: Option<u16>) {
        {
            let mut st = self.lock();
            if st.failed.is_some() {
                return;
            }
            st.failed = Some(who);
        }
        self.cv.notify_all();
        for c in &self.channels {
            c.shutdown();
        }
        if who.is_some() {
            self.main.shutdown_read();
        }
    }

    fn first_failure(&self) -> Option<Option<u16>> {
        self.lock().failed
    }
}

fn stalled(w: Waited) -> IncomingError {
    match w {
        Waited::Failed => IncomingError::ChannelFailed,
        Waited::EndedBefore(round) => IncomingError::ChannelEndedEarly { round },
    }
}

/// What the main stream's loop asks of the channels.
pub(super) struct MainView<'a> {
    rounds: &'a Rounds,
}

impl MainView<'_> {
    /// The main stream's `RoundEnd` `round`: once every channel wrote it.
    pub(super) fn round_done(&self, round: u32) -> Result<(), IncomingError> {
        self.rounds.wait_round(round).map_err(stalled)
    }
}

/// Receives the pages of `channels` on a thread each while `main` runs the
/// main stream's loop (given a [`MainView`]; `main_conn` is a clone of the
/// main stream, to break off its reads); returns `main`'s result once every
/// channel ended, or the first failure, on either side. `tally` counts what
/// the channels received.
pub(super) fn receive<T>(
    main_conn: Conn,
    channels: Vec<Conn>,
    ram: &GuestRam,
    tally: &mut IncomingTally,
    main: impl FnOnce(&MainView<'_>) -> Result<T, IncomingError>,
) -> Result<T, IncomingError> {
    let clone = |c: &Conn| c.try_clone().map_err(IncomingError::ConfirmStream);
    let rounds = Rounds {
        state: Mutex::new(RoundsState {
            done: vec![None; channels.len()],
            ended: vec![false; channels.len()],
            all_ended_at: None,
            main_done: false,
            failed: None,
        }),
        cv: Condvar::new(),
        main: main_conn,
        channels: channels.iter().map(clone).collect::<Result<_, _>>()?,
    };
    std::thread::scope(|s| {
        let mut workers = Vec::new();
        for (i, conn) in channels.into_iter().enumerate() {
            let rounds = &rounds;
            let ch = u16::try_from(i).unwrap_or(u16::MAX);
            let spawned = std::thread::Builder::new()
                .name(format!("incoming-ch{i}"))
                .spawn_scoped(s, move || {
                    let r = receive_channel(i, conn, ram, rounds);
                    if r.is_err() {
                        rounds.fail(Some(ch));
                    }
                    r
                });
            match spawned {
                Ok(w) => workers.push(w),
                Err(e) => {
                    rounds.fail(None);
                    return Err(IncomingError::Migrate(MigrateError::Io {
                        what: "cannot start a multifd receiver thread".into(),
                        source: e,
                    }));
                }
            }
        }
        rounds.main.set_timeout(None);
        let watchdog = std::thread::Builder::new()
            .name("incoming-main-watch".into())
            .spawn_scoped(s, || rounds.watch_main());
        if let Err(e) = watchdog {
            rounds.fail(None);
            return Err(IncomingError::Migrate(MigrateError::Io {
                what: "cannot start the main stream's watchdog thread".into(),
                source: e,
            }));
        }
        let view = MainView { rounds: &rounds };
        let result = main(&view).and_then(|v| {
            rounds.wait_ended().map_err(stalled)?;
            Ok(v)
        });
        rounds.main_done();
        rounds.main.set_timeout(Some(main_stream_timeout()));
        if result.is_err() {
            rounds.fail(None);
        }
        let mut errors = Vec::new();
        for (i, w) in workers.into_iter().enumerate() {
            match w.join() {
                Ok(Ok(t)) => tally.absorb(&t),
                Ok(Err(e)) => errors.push((i, e)),
                Err(_) => errors.push((i, IncomingError::ReceiverPanicked)),
            }
        }
        match rounds.first_failure() {
            Some(Some(ch)) => {
                let e = errors
                    .into_iter()
                    .find(|(i, _)| *i == usize::from(ch))
                    .map_or(IncomingError::ChannelFailed, |(_, e)| e);
                Err(IncomingError::Channel {
                    channel: ch,
                    source: Box::new(e),
                })
            }
            _ => result,
        }
    })
}

/// One channel: pages in order, each round's end met with every other
/// channel's, until `ChannelEnd`.
fn receive_channel(
    ch: usize,
    mut conn: Conn,
    ram: &GuestRam,
    rounds: &Rounds,
) -> Result<IncomingTally, IncomingError> {
    let proto = |e: ProtocolError| IncomingError::from(MigrateError::from(e));
    let mut tally = IncomingTally::new();
    let mut round = 0u32;
    let mut recycled = Vec::new();
    loop {
        let m = read_message_reusing(&mut conn, std::mem::take(&mut recycled)).map_err(proto)?;
        tally.message(&m);
        match m.kind {
            Kind::Pages | Kind::ZeroPages => {
                write_pages(ram, &m, &mut tally)?;
                recycled = m.payload;
            }
            Kind::RoundEnd => {
                let r: RoundEnd = m.json().map_err(proto)?;
                if r.round != round {
                    return Err(proto(ProtocolError::Malformed {
                        kind: Kind::RoundEnd,
                        detail: format!("round {} ends where round {round} should", r.round),
                    }));
                }
                rounds.arrive(ch, round).map_err(stalled)?;
                round = round.saturating_add(1);
            }
            Kind::ChannelEnd => {
                rounds.end(ch);
                return Ok(tally);
            }
            other => {
                return Err(proto(ProtocolError::Unexpected {
                    expected: "Pages, ZeroPages, RoundEnd or ChannelEnd on a multifd channel",
                    got: other,
                }))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_random_hex_and_compared_whole() {
        let (a, b) = (new_token().unwrap(), new_token().unwrap());
        assert_eq!(a.len(), 64);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
        assert!(same_token(&a, &a.clone()));
        assert!(!same_token(&a, &b));
        assert!(!same_token(&a, &a[..63]));
    }

    #[test]
    fn channel_counts_outside_the_range_are_refused() {
        let m = |channels| MultifdHello {
            channels,
            token: String::new(),
        };
        assert!(refusal(&m(0), None).unwrap().contains("1 to 16"));
        assert!(refusal(&m(17), None).unwrap().contains("1 to 16"));
        assert!(refusal(&m(2), None).unwrap().contains("unix:"));
    }
}
