//! Making the guest's new location known after a migration.

use std::sync::PoisonError;
use std::time::{Duration, Instant};

use crate::devices::net::NetDevice;

/// How many times the guest is announced after a migration, and when: QEMU's
/// defaults (announce-rounds 5, -initial 50 ms, -step 100 ms, -max 550 ms:
/// rounds at 0, 50, 200, 450 and 800 ms),
/// so that one lost frame or interrupt does not leave switches sending the
/// guest's traffic to the host it left.
pub const ROUNDS: u32 = 5;
const FIRST_GAP: Duration = Duration::from_millis(50);
const GAP_STEP: Duration = Duration::from_millis(100);
const MAX_GAP: Duration = Duration::from_millis(550);

/// The announcements of every network device after a migration: the first
/// when the guest runs, the rest on the VMM's main loop as they fall due.
pub struct AnnounceRounds {
    done: u32,
    next_due: Instant,
}

impl AnnounceRounds {
    /// Announces every device once, now.
    pub fn start(nets: &[NetDevice]) -> Self {
        let mut rounds = AnnounceRounds {
            done: 0,
            next_due: Instant::now(),
        };
        rounds.run_round(nets);
        rounds
    }

    /// When the next round is due; None once every round is done.
    pub fn next_due(&self) -> Option<Instant> {
        (self.done < ROUNDS).then_some(self.next_due)
    }

    /// Runs the next round if it is due and the guest runs. A stopped
    /// guest (`stop`, a snapshot or migration under way) would see several
    /// rounds as one, and one leaving for another host must not pull its
    /// traffic back here: as QEMU's rounds follow the guest's clock, a due
    /// round waits until the guest runs again (looked at every
    /// [`FIRST_GAP`]).
    pub fn poll(&mut self, nets: &[NetDevice], guest_runs: bool) {
        if self.done >= ROUNDS || Instant::now() < self.next_due {
            return;
        }
        if guest_runs {
            self.run_round(nets);
        } else {
            self.next_due = Instant::now() + FIRST_GAP;
        }
    }

    fn run_round(&mut self, nets: &[NetDevice]) {
        self.done += 1;
        for net in nets {
            announce(net, self.done);
        }
        self.next_due = Instant::now() + gap_after(self.done);
    }
}

/// The wait after round `done` (1-based) before the next one.
fn gap_after(done: u32) -> Duration {
    (FIRST_GAP + GAP_STEP * done.saturating_sub(1)).min(MAX_GAP)
}

/// Tells switches where the guest's MAC now lives: through the guest when
/// it acked GUEST_ANNOUNCE (it sends gratuitous ARPs), else a RARP frame.
/// Only the first of the [`ROUNDS`] is logged at info level.
fn announce(net: &NetDevice, round: u32) {
    let level_info = round == 1;
    let log = |what: std::fmt::Arguments<'_>| {
        if level_info {
            tracing::info!("{}: {what} (announcement {round} of {ROUNDS})", net.id);
        } else {
            tracing::debug!("{}: {what} (announcement {round} of {ROUNDS})", net.id);
        }
    };
    let mut dev = net.device.lock().unwrap_or_else(PoisonError::into_inner);
    if dev.announce() {
        log(format_args!("asked the guest to announce itself"));
        return;
    }
    let tap = dev.tap();
    if tap.get().is_none() {
        // A vhost-user backend sends its frames itself; announce() above
        // already asked it to (SEND_RARP) where it could.
        log(format_args!("the backend announces the guest"));
        return;
    }
    let mac = dev.mac();
    let mut frame = vec![0u8; 60];
    frame[0..6].copy_from_slice(&[0xff; 6]);
    frame[6..12].copy_from_slice(&mac);
    frame[12..14].copy_from_slice(&0x8035u16.to_be_bytes()); // RARP
    frame[14..16].copy_from_slice(&1u16.to_be_bytes()); // Ethernet
    frame[16..18].copy_from_slice(&0x0800u16.to_be_bytes()); // IPv4
    frame[18] = 6;
    frame[19] = 4;
    frame[20..22].copy_from_slice(&3u16.to_be_bytes()); // reverse request
    frame[22..28].copy_from_slice(&mac);
    frame[32..38].copy_from_slice(&mac);
    let mut buf = Vec::with_capacity(72);
    if tap.has_vnet_hdr() {
        buf.extend_from_slice(&[0u8; godwit_devices::net::tap::VNET_HDR_LEN]);
    }
    buf.extend_from_slice(&frame);
    match tap.write(&buf) {
        Ok(_) => log(format_args!(
            "sent a RARP for {}",
            crate::config::net_spec::format_mac(&mac)
        )),
        Err(e) => tracing::warn!("{}: cannot send the RARP announcement: {e}", net.id),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_follow_qemus_schedule() {
        let gaps: Vec<u128> = (1..ROUNDS)
            .map(|done| gap_after(done).as_millis())
            .collect();
        assert_eq!(gaps, [50, 150, 250, 350]);
        assert_eq!(gap_after(20), MAX_GAP);
    }

    #[test]
    fn a_due_round_waits_while_the_guest_is_stopped_and_none_follow_the_fifth() {
        let mut rounds = AnnounceRounds::start(&[]);
        rounds.next_due = Instant::now();
        rounds.poll(&[], false);
        assert_eq!(rounds.done, 1, "no round while the guest is stopped");
        assert!(rounds.next_due > Instant::now(), "looked at again later");
        while rounds.next_due().is_some() {
            rounds.next_due = Instant::now();
            rounds.poll(&[], true);
        }
        assert_eq!(rounds.done, ROUNDS);
    }
}
