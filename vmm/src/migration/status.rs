//! What the destination counts of an incoming migration, so that its
//! `query-migrate` reports it as QEMU's does (status `completed` with its
//! `ram` block).

use std::time::Instant;

use godwit_migration::protocol::{Message, HEADER_LEN};

use crate::machine::migration_status::MigrationInfo;

pub(super) struct IncomingTally {
    started: Instant,
    wire_bytes: u64,
    normal: u64,
    duplicate: u64,
    rounds: u32,
}

impl IncomingTally {
    pub(super) fn new() -> Self {
        IncomingTally {
            started: Instant::now(),
            wire_bytes: 0,
            normal: 0,
            duplicate: 0,
            rounds: 0,
        }
    }

    pub(super) fn message(&mut self, m: &Message) {
        self.wire_bytes += (m.payload.len() + HEADER_LEN) as u64;
    }

    /// Bytes of guest pages received (data and zero runs).
    pub(super) fn received_bytes(&self) -> u64 {
        (self.normal + self.duplicate) * godwit_migration::protocol::PAGE_SIZE
    }

    pub(super) fn pages(&mut self, with_data: bool, pages: u32) {
        if with_data {
            self.normal += u64::from(pages);
        } else {
            self.duplicate += u64::from(pages);
        }
    }

    /// Adds what a multifd channel counted.
    pub(super) fn absorb(&mut self, other: &IncomingTally) {
        self.wire_bytes += other.wire_bytes;
        self.normal += other.normal;
        self.duplicate += other.duplicate;
    }

    pub(super) fn round(&mut self) {
        self.rounds += 1;
    }

    /// The finished incoming migration of a VM of `memory_size` bytes.
    pub(super) fn completed(&self, memory_size: u64) -> MigrationInfo {
        let secs = self.started.elapsed().as_secs_f64();
        MigrationInfo {
            status: "completed",
            rounds: self.rounds,
            total_bytes: memory_size,
            transferred_bytes: self.wire_bytes,
            throughput_mbps: self.wire_bytes as f64 * 8.0 / 1e6 / secs.max(1e-6),
            total_time_ms: secs * 1e3,
            normal_pages: self.normal,
            duplicate_pages: self.duplicate,
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use godwit_migration::protocol::{Kind, PAGE_SIZE};

    #[test]
    fn the_destination_counts_what_it_received() {
        let mut t = IncomingTally::new();
        t.message(&Message {
            kind: Kind::Pages,
            payload: vec![0; 2 * PAGE_SIZE as usize],
        });
        t.pages(true, 2);
        t.pages(false, 5);
        t.round();
        let info = t.completed(1 << 20);
        assert_eq!(info.status, "completed");
        assert_eq!(info.transferred_bytes, 2 * PAGE_SIZE + HEADER_LEN as u64);
        assert_eq!(
            (info.normal_pages, info.duplicate_pages, info.rounds),
            (2, 5, 1)
        );
    }
}
