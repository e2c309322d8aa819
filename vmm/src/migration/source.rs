//! The source side: pre-copy rounds, stop-and-copy, and the handoff.
//!
//! # The handoff: at most one running copy
//!
//! Messages at the end, in order: `State` and `Complete` (source), `Ready`
//! (destination: it holds the whole VM, built and checked, and will run it
//! when told), `Go` (source: commit), `Resumed` (destination: it runs).
//!
//! Rules. The destination resumes the guest only after a whole, checked
//! `Go`. The source decides to commit before it writes the first byte of
//! `Go` and from then on never resumes on its own, unless the destination
//! sends `Abort` (it gave up, or failed before running, and exits). Before
//! that decision the source may always resume: without `Go` the destination
//! never runs.
//!
//! Every message lost, cut or late:
//! - `State`, `Complete` or `Ready` lost, cut, or later than the peer's
//!   timeout: the source has not committed; it resumes and reports
//!   `failed`. The destination never got `Go`: it exits without running.
//! - `Go` lost or cut: the destination waits for it up to its timeout, then
//!   sends `Abort` (if it still can) and exits without running. The source
//!   committed: on that `Abort` it resumes (the destination said it will not
//!   run); without it (the connection is gone) it stays paused in
//!   `postmigrate`: nobody runs the guest until the operator checks the
//!   destination and sends `cont` with `force`.
//! - `Go` late but within the destination's wait: the destination runs and
//!   confirms; the source waits for `Resumed` longer than the destination
//!   waits for `Go` ([`super::HANDOFF_WAIT`]), so it hears either answer.
//! - `Resumed` lost, cut or late: the destination runs; the source stays
//!   paused in `postmigrate`, which is right (one copy runs); the operator
//!   checks the destination and quits the source.
//! - `migrate_cancel` or `quit` after the commit breaks the connection: the
//!   same as a lost `Resumed`, never a resume.
//!
//! So at no point can both sides run: the source runs only if it never
//! committed (then the destination never got `Go`) or if the destination
//! said it will not run; the destination runs only after `Go`, when the
//! source has committed to stay paused.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, PoisonError};
use std::time::{Duration, Instant};

use serde_json::json;
use vm_memory::{GuestAddress, GuestMemoryBackend};

use godwit_migration::protocol::{
    self, encode_run_table, expect, write_json, write_message, write_message_parts, HelloReply,
    Kind, PageRun, ProtocolError, Resumed, RoundEnd, PAGE_SIZE,
};

use super::transport::{break_opening, Conn, Opening};
use super::{MigrateError, BATCH_PAGES, HANDOFF_WAIT, PEER_TIMEOUT};
use crate::machine::migration_status::{
    DowntimeDetail, MigrationInfo, MigrationParams, MigrationState,
};
use crate::machine::{Operation, OperationGuard, RunState, VmHandle};
use crate::persist::snapshot::{capture_state, Quiesced};
use crate::vstate::events::VmEvent;

use crate::migration::dirty::pages_with_data;
use crate::migration::dirty::set_dirty_logging;
use crate::migration::dirty::take_dirty;
use crate::migration::dirty::{start_device_logs, stop_device_logs};
use crate::migration::handshake::check_destination;
use crate::migration::handshake::hello_of;
use crate::migration::multifd::{self, Channels};
use crate::migration::throttle::{self, Throttle};
use crate::migration::transport::connect;
use crate::migration::transport::{parse_uri, Uri};

/// Milliseconds between successive points of the stop-and-copy.
struct PhaseClock {
    started: Instant,
    last: Instant,
}

impl PhaseClock {
    fn start() -> PhaseClock {
        let now = Instant::now();
        PhaseClock {
            started: now,
            last: now,
        }
    }

    /// Milliseconds since the previous lap (or the start).
    fn lap(&mut self) -> f64 {
        let now = Instant::now();
        let ms = (now - self.last).as_secs_f64() * 1e3;
        self.last = now;
        ms
    }

    fn total(&self) -> f64 {
        self.started.elapsed().as_secs_f64() * 1e3
    }
}

/// What every stream of one migration has sent, for `query-migrate` and
/// `max-bandwidth` (shared by the main stream and the multifd channels).
pub(super) struct Meter {
    bytes: AtomicU64,
    started: Instant,
    max_bandwidth: u64,
}

impl Meter {
    pub(super) fn new(max_bandwidth: u64) -> Meter {
        Meter {
            bytes: AtomicU64::new(0),
            started: Instant::now(),
            max_bandwidth,
        }
    }

    /// Counts `n` more bytes; returns the total.
    fn add(&self, n: u64) -> u64 {
        self.bytes.fetch_add(n, Ordering::Relaxed) + n
    }

    pub(super) fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Bytes per second since the start.
    fn rate(&self) -> f64 {
        self.bytes() as f64 / self.started.elapsed().as_secs_f64().max(1e-6)
    }
}

pub(super) struct Sender<'a> {
    conn: &'a mut Conn,
    state: &'a MigrationState,
    meter: &'a Meter,
}

impl<'a> Sender<'a> {
    pub(super) fn new(conn: &'a mut Conn, state: &'a MigrationState, meter: &'a Meter) -> Self {
        Sender { conn, state, meter }
    }

    pub(super) fn send_json<T: serde::Serialize>(
        &mut self,
        kind: Kind,
        value: &T,
    ) -> Result<(), MigrateError> {
        let bytes = serde_json::to_vec(value)
            .map_err(|source| MigrateError::Protocol(ProtocolError::Encode { kind, source }))?;
        self.send(kind, &bytes)
    }

    fn check_cancel(&self) -> Result<(), MigrateError> {
        if self.state.cancel.load(Ordering::SeqCst) {
            return Err(MigrateError::Cancelled);
        }
        Ok(())
    }

    pub(super) fn send(&mut self, kind: Kind, payload: &[u8]) -> Result<(), MigrateError> {
        self.send_parts(kind, &[payload])
    }

    /// [`Sender::send`] of a payload in `parts` (a page batch's run table
    /// and data), which are not joined first.
    fn send_parts(&mut self, kind: Kind, parts: &[&[u8]]) -> Result<(), MigrateError> {
        self.check_cancel()?;
        write_message_parts(self.conn, kind, parts).map_err(|e| {
            if self.state.cancel.load(Ordering::SeqCst) {
                MigrateError::Cancelled
            } else {
                e.into()
            }
        })?;
        let payload_len: usize = parts.iter().map(|p| p.len()).sum();
        let bytes = self.meter.add((payload_len + protocol::HEADER_LEN) as u64);
        let rate = self.meter.rate();
        self.state.update(|i| {
            i.transferred_bytes = i.transferred_bytes.max(bytes);
            i.throughput_mbps = rate * 8.0 / 1e6;
        });
        if self.meter.max_bandwidth > 0 {
            let due = Duration::from_secs_f64(bytes as f64 / self.meter.max_bandwidth as f64);
            if let Some(wait) = due.checked_sub(self.meter.started.elapsed()) {
                std::thread::sleep(wait);
            }
        }
        Ok(())
    }

    /// Sends `pages` (guest addresses): non-zero pages with their data;
    /// zero pages as runs without data unless `skip_zero`. Pages are checked
    /// for zero in place and copied once, into the message.
    pub(super) fn send_pages(
        &mut self,
        handle: &VmHandle,
        pages: &[u64],
        skip_zero: bool,
    ) -> Result<(), MigrateError> {
        let mut runs: Vec<PageRun> = Vec::new();
        let mut data: Vec<u8> = Vec::with_capacity(BATCH_PAGES * PAGE_SIZE as usize);
        let mut zero_runs: Vec<PageRun> = Vec::new();
        let mut normal = 0u64;
        for &gpa in pages {
            let slice = handle
                .ram
                .memory
                .get_slice(GuestAddress(gpa), PAGE_SIZE as usize)
                .map_err(|source| MigrateError::GuestPage { gpa, source })?;
            // Checked in place; the guest may write it meanwhile (it is
            // then dirty and sent again).
            let zero = godwit_migration::guest_ram::is_zero(&slice);
            if zero && skip_zero {
                continue;
            }
            let list = if zero { &mut zero_runs } else { &mut runs };
            match list.last_mut() {
                Some(r) if r.gpa + u64::from(r.pages) * PAGE_SIZE == gpa => r.pages += 1,
                _ => list.push(PageRun { gpa, pages: 1 }),
            }
            if !zero {
                normal += 1;
                let at = data.len();
                data.resize(at + PAGE_SIZE as usize, 0);
                slice.copy_to(&mut data[at..]);
                if data.len() >= BATCH_PAGES * PAGE_SIZE as usize {
                    self.send_parts(Kind::Pages, &[&encode_run_table(&runs), &data])?;
                    runs.clear();
                    data.clear();
                }
            }
        }
        if !runs.is_empty() {
            self.send_parts(Kind::Pages, &[&encode_run_table(&runs), &data])?;
        }
        for chunk in zero_runs.chunks(4096) {
            self.send(Kind::ZeroPages, &encode_run_table(chunk))?;
        }
        let zero: u64 = zero_runs.iter().map(|r| u64::from(r.pages)).sum();
        self.state.update(|i| {
            i.duplicate_pages += zero;
            i.normal_pages += normal;
        });
        Ok(())
    }
}

pub(super) fn emit_status(handle: &VmHandle, status: &'static str) {
    handle.migration.update(|i| i.status = status);
    // The source ends right after completing: the event carries the final
    // numbers for a client that cannot query them any more.
    let data = if status == "completed" {
        json!({ "status": status, "info": handle.migration.info() })
    } else {
        json!({ "status": status })
    };
    handle.api_events.emit("MIGRATION", data);
    tracing::info!("migration: {status}");
}

/// Starts a migration on its own thread; refuses at once when blocked.
pub fn start(
    handle: &Arc<VmHandle>,
    uri: &str,
    vm_events: mpsc::Sender<VmEvent>,
) -> Result<(), MigrateError> {
    let blockers = handle.blockers();
    if !blockers.is_empty() {
        return Err(MigrateError::Blocked(blockers));
    }
    let parsed = parse_uri(uri)?;
    let multifd = handle
        .migration
        .params
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .multifd;
    if multifd && matches!(parsed, Uri::Unix(_)) {
        return Err(MigrateError::MultifdUnix(uri.to_string()));
    }
    if handle.run_state() == RunState::PostMigrate {
        return Err(MigrateError::PostMigrate);
    }
    // Taken here, so that a snapshot or quit in progress refuses the
    // command itself; the migration thread holds it to the end.
    let op = handle.begin(Operation::Migration)?;
    handle.migration.running.store(true, Ordering::SeqCst);
    handle.migration.cancel.store(false, Ordering::SeqCst);
    handle.migration.update(|i| {
        *i = MigrationInfo {
            status: "setup",
            total_bytes: handle.ram.size,
            started: Some(Instant::now()),
            ..Default::default()
        }
    });
    let (h, uri) = (handle.clone(), uri.to_string());
    let spawned = std::thread::Builder::new()
        .name("migration".into())
        .spawn(move || {
            crate::seccomp::install_or_exit(crate::seccomp::ThreadKind::MigrationSource);
            let started = Instant::now();
            // Probed now rather than while the guest is stopped (state
            // capture asks for them); a failure shows there.
            let _ = h.vm.kvm_caps();
            emit_status(&h, "setup");
            let result = run_source(&h, &op, &uri, started);
            h.migration.set_breaker(None);
            h.migration
                .update(|i| i.total_time_ms = started.elapsed().as_secs_f64() * 1e3);
            match result {
                Ok(()) => {
                    emit_status(&h, "completed");
                    let _ = vm_events.send(VmEvent::Migrated);
                }
                Err(e @ MigrateError::OutcomeUnknown(_)) => {
                    tracing::error!("migration to {uri}: {e}");
                    let _ = set_dirty_logging(&h, false);
                    h.migration.update(|i| i.error = Some(e.to_string()));
                    emit_status(&h, "postmigrate");
                }
                Err(e) => {
                    // Whatever broke once migrate_cancel shut the stream
                    // (a write outside the page sender, a read of the
                    // destination's answer) was the cancel.
                    let cancelled = matches!(e, MigrateError::Cancelled)
                        || h.migration.cancel.load(Ordering::SeqCst);
                    let e = if cancelled {
                        MigrateError::Cancelled
                    } else {
                        e
                    };
                    tracing::warn!("migration to {uri} failed: {e}; the guest keeps running here");
                    let _ = set_dirty_logging(&h, false);
                    h.migration.update(|i| i.error = Some(e.to_string()));
                    emit_status(&h, if cancelled { "cancelled" } else { "failed" });
                }
            }
            h.migration.running.store(false, Ordering::SeqCst);
            drop(op);
        });
    if let Err(e) = spawned {
        handle.migration.running.store(false, Ordering::SeqCst);
        return Err(MigrateError::Io {
            what: "cannot start the migration thread".into(),
            source: e,
        });
    }
    Ok(())
}

pub(super) fn run_source(
    handle: &VmHandle,
    op: &OperationGuard,
    uri: &str,
    started: Instant,
) -> Result<(), MigrateError> {
    let params = handle
        .migration
        .params
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    let mut conn = connect(uri, &params)?;
    conn.set_timeout(Some(PEER_TIMEOUT));
    let breaker = conn.try_clone().map_err(MigrateError::io(
        "cannot duplicate the migration connection",
    ))?;
    handle
        .migration
        .set_breaker(Some(Box::new(move || breaker.shutdown())));
    let mut hello = hello_of(handle);
    if params.multifd {
        hello.multifd = Some(protocol::MultifdHello {
            channels: params.multifd_channels,
            token: multifd::new_token()?,
        });
    }
    // Over TLS the Hello follows the handshake's last flight without waiting
    // for the destination's verdict on this side's certificate (a round
    // trip); the destination reads it only once it accepted the certificate.
    let sent = write_json(&mut conn, Kind::Hello, &hello);
    if sent.is_ok() {
        // Logging starts while the destination checks the Hello and builds
        // its VM (a memory-slot update takes about a millisecond); a refusal
        // turns it off again, as every failure does.
        set_dirty_logging(handle, true)?;
    }
    // A refused certificate explains a failed write better than the write.
    conn.confirm_accepted(&format!("the destination {uri}"))?;
    sent?;
    if matches!(conn, Conn::Tls { .. }) {
        tracing::info!("migration to {uri}: TLS 1.3, both certificates verified");
    }
    let reply: HelloReply = expect(&mut conn, Kind::HelloReply, "HelloReply")?.json()?;
    if !reply.accept {
        return Err(MigrateError::Refused(reply.reasons));
    }
    let problems = check_destination(&hello, &reply);
    if !problems.is_empty() {
        let _ = write_message(&mut conn, Kind::Abort, problems.join("; ").as_bytes());
        return Err(MigrateError::DestinationLacks(problems));
    }
    let channel_conns = match &hello.multifd {
        Some(m) => {
            // migrate_cancel breaks off channels still being opened too.
            let opening = Opening::default();
            let (main, opened) = (
                conn.try_clone().map_err(MigrateError::io(
                    "cannot duplicate the migration connection",
                ))?,
                Arc::clone(&opening),
            );
            handle.migration.set_breaker(Some(Box::new(move || {
                main.shutdown();
                break_opening(&opened);
            })));
            let conns = multifd::connect_channels(uri, &params, m, &opening);
            if handle.migration.cancel.load(Ordering::SeqCst) {
                return Err(MigrateError::Cancelled);
            }
            let conns = conns?;
            let duplicate = "cannot duplicate a migration connection";
            let mut breakers = vec![conn.try_clone().map_err(MigrateError::io(duplicate))?];
            for c in &conns {
                breakers.push(c.try_clone().map_err(MigrateError::io(duplicate))?);
            }
            handle.migration.set_breaker(Some(Box::new(move || {
                for b in &breakers {
                    b.shutdown();
                }
            })));
            // The destination holds every channel (or says why not).
            expect(&mut conn, Kind::ChannelsReady, "ChannelsReady")?;
            tracing::info!("migration: {} multifd channel(s) connected", conns.len());
            Some(conns)
        }
        None => None,
    };
    handle
        .migration
        .update(|i| i.setup_ms = Some(started.elapsed().as_secs_f64() * 1e3));
    emit_status(handle, "active");
    start_device_logs(handle)?;
    let meter = Meter::new(params.max_bandwidth);
    let result = std::thread::scope(|scope| {
        let mut channels = channel_conns
            .map(|conns| Channels::start(scope, handle, &meter, conns))
            .transpose()?;
        throttle::with_kicker(handle, &params, || {
            precopy(
                handle,
                op,
                &mut conn,
                channels.as_mut(),
                &meter,
                &params,
                started,
            )
        })
    });
    stop_device_logs(handle);
    result
}

/// Sends one round's pages: on the main stream, or striped over the
/// multifd channels, each of which then closes the round; returns once
/// every channel has written all of it.
fn send_round(
    handle: &VmHandle,
    sender: &mut Sender<'_>,
    channels: &mut Option<&mut Channels<'_>>,
    pages: &[u64],
    skip_zero: bool,
    round: u32,
) -> Result<(), MigrateError> {
    match channels {
        None => sender.send_pages(handle, pages, skip_zero),
        Some(c) => {
            c.send_pages(pages, skip_zero)?;
            c.end_round(round)
        }
    }
}

pub(super) fn precopy(
    handle: &VmHandle,
    op: &OperationGuard,
    conn: &mut Conn,
    mut channels: Option<&mut Channels<'_>>,
    meter: &Meter,
    params: &MigrationParams,
    started: Instant,
) -> Result<(), MigrateError> {
    let mut sender = Sender::new(conn, &handle.migration, meter);
    // Round 0: everything that is not zero (the destination starts zeroed).
    let mut round_started = Instant::now();
    let pages = pages_with_data(handle);
    send_round(handle, &mut sender, &mut channels, &pages, true, 0)?;
    let mut round = 0u32;
    let mut last_dirty_rate;
    let mut throttle = Throttle::new(handle, params);
    loop {
        let elapsed = round_started.elapsed().as_secs_f64().max(1e-6);
        let dirty = take_dirty(handle)?;
        round_started = Instant::now();
        let throughput = meter.rate();
        let remaining = dirty.len() as u64 * PAGE_SIZE;
        let expected_ms = (remaining as f64 / throughput.max(1.0) * 1e3) as u64;
        last_dirty_rate = dirty.len() as f64 / elapsed;
        write_json(
            sender.conn,
            Kind::RoundEnd,
            &RoundEnd {
                round,
                pages: dirty.len() as u64,
            },
        )?;
        handle.migration.update(|i| {
            i.rounds = round + 1;
            i.transferred_bytes = meter.bytes();
            i.remaining_bytes = remaining;
            i.throughput_mbps = throughput * 8.0 / 1e6;
            i.dirty_pages_rate = last_dirty_rate as u64;
            i.expected_downtime_ms = expected_ms;
            i.total_time_ms = started.elapsed().as_secs_f64() * 1e3;
        });
        tracing::info!(
            "migration: round {round}: {} MiB sent, {} dirty pages remain, {:.0} Mbit/s, expected downtime {expected_ms} ms",
            meter.bytes() >> 20,
            dirty.len(),
            throughput * 8.0 / 1e6
        );
        if expected_ms <= params.downtime_limit_ms {
            // Stop-and-copy: what is dirty now plus what the guest dirties
            // before it stops.
            return finish(handle, op, &mut sender, channels, round + 1, dirty, started);
        }
        if let Some(t) = throttle.as_mut() {
            if last_dirty_rate * PAGE_SIZE as f64 > throughput / 2.0 {
                t.step_up();
            }
        }
        round += 1;
        if round >= params.max_rounds {
            return Err(MigrateError::NotConverging {
                rounds: round,
                remaining_mib: remaining >> 20,
                dirty_mib_s: last_dirty_rate * PAGE_SIZE as f64 / (1 << 20) as f64,
                throughput_mib_s: throughput / (1 << 20) as f64,
                expected_ms,
                limit_ms: params.downtime_limit_ms,
            });
        }
        send_round(handle, &mut sender, &mut channels, &dirty, false, round)?;
    }
}

pub(super) fn finish(
    handle: &VmHandle,
    op: &OperationGuard,
    sender: &mut Sender<'_>,
    mut channels: Option<&mut Channels<'_>>,
    last_round: u32,
    mut dirty: Vec<u64>,
    started: Instant,
) -> Result<(), MigrateError> {
    // From here only the migration decides whether the guest runs here.
    op.enter(Operation::StopAndCopy);
    let was_running = handle.run_state() == RunState::Running;
    let mut phases = PhaseClock::start();
    let quiet = Quiesced::new(handle).map_err(MigrateError::Capture)?;
    let stop_ms = phases.lap();
    // Pausing stopped the backends' rings (GET_VRING_BASE): their log is final.
    dirty.extend(take_dirty(handle)?);
    dirty.sort_unstable();
    dirty.dedup();
    let dirty_sync_ms = phases.lap();
    send_round(handle, sender, &mut channels, &dirty, false, last_round)?;
    if let Some(c) = channels {
        // Every channel wrote all its pages: only then the state.
        c.end()?;
    }
    let last_pages_ms = phases.lap();
    let state = capture_state(handle).map_err(MigrateError::Capture)?;
    let state_capture_ms = phases.lap();
    sender.send(Kind::State, &state.to_bytes())?;
    sender.send(Kind::Complete, &[])?;
    let state_send_ms = phases.lap();
    // Until the commit below, any error drops `quiet` and resumes the guest
    // here: the destination runs nothing without `Go`.
    expect(sender.conn, Kind::Ready, "Ready")?;
    sender.check_cancel()?;

    // The commit: decided before the first byte of `Go` leaves.
    handle.set_state(RunState::PostMigrate);
    quiet.keep_paused();
    tracing::info!("migration: the destination holds the whole VM; telling it to run the guest");
    sender.conn.set_timeout(Some(HANDOFF_WAIT));
    let answer = write_message(sender.conn, Kind::Go, &[])
        .and_then(|()| expect(sender.conn, Kind::Resumed, "Resumed"))
        .and_then(|m| m.json::<Resumed>());
    let resumed = match answer {
        Ok(r) => r,
        Err(e @ ProtocolError::Aborted(_)) => {
            // The destination said it will not run the guest: it is ours,
            // as it was before the stop-and-copy.
            handle.set_state(RunState::Paused);
            if was_running {
                handle.resume();
            }
            return Err(MigrateError::Declined(e));
        }
        Err(e) => return Err(MigrateError::OutcomeUnknown(e)),
    };
    let handoff_ms = phases.lap();
    let downtime = phases.total();
    let detail = DowntimeDetail {
        stop_ms,
        dirty_sync_ms,
        last_pages_ms,
        state_capture_ms,
        state_send_ms,
        source_ms: stop_ms + dirty_sync_ms + last_pages_ms + state_capture_ms + state_send_ms,
        destination_restore_ms: resumed.restore_ms,
        handoff_ms,
    };
    tracing::debug!("migration: downtime phases {detail:?}");
    handle.migration.update(|i| {
        i.downtime_ms = Some(downtime);
        i.downtime_detail = Some(detail);
        i.transferred_bytes = sender.meter.bytes();
        i.remaining_bytes = 0;
        i.total_time_ms = started.elapsed().as_secs_f64() * 1e3;
    });
    tracing::info!(
        "migration: the guest runs on the destination (downtime {downtime:.1} ms: {:.1} ms until the state was sent, destination restore {:.1} ms)",
        stop_ms + dirty_sync_ms + last_pages_ms + state_capture_ms + state_send_ms,
        resumed.restore_ms
    );
    // The guest now lives elsewhere: this side stays stopped until it exits.
    Ok(())
}
