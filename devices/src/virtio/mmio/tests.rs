use godwit_migration::persist::Persist;

use super::*;
use crate::virtio::testing::guest_memory;

/// A device that records what the transport does to it.
#[derive(Default)]
struct Dummy {
    acked: Features,
    /// Offered beside VERSION_1, EVENT_IDX and 0b101 (bits above 63, say).
    extra: Features,
    active: Option<Vec<(Queue, EventFd)>>,
    resets: usize,
    config: [u8; 8],
    fail_activation: bool,
    bypass: bool,
}

impl VirtioDevice for Dummy {
    fn device_type(&self) -> u32 {
        42
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[16, 8]
    }
    fn device_features(&self) -> crate::virtio::Features {
        feature(VIRTIO_F_VERSION_1) | feature(VIRTIO_RING_F_EVENT_IDX) | 0b101 | self.extra
    }
    fn ack_features(&mut self, features: crate::virtio::Features) {
        self.acked = features;
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = self.config.get(offset as usize + i).copied().unwrap_or(0);
        }
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        for (i, b) in data.iter().enumerate() {
            if let Some(c) = self.config.get_mut(offset as usize + i) {
                *c = *b;
            }
        }
    }
    fn activate(&mut self, params: ActivateParams) -> Result<(), ActivateError> {
        if self.fail_activation {
            return Err(ActivateError::Backend {
                device: "dummy",
                source: "told to fail".into(),
            });
        }
        self.active = Some(params.queues);
        Ok(())
    }
    fn reset(&mut self) {
        self.active = None;
        self.acked = 0;
        self.resets += 1;
    }
    fn is_active(&self) -> bool {
        self.active.is_some()
    }
    fn interrupt_bypasses_transport(&self) -> bool {
        self.bypass
    }
    fn queue_positions(&self) -> Option<Vec<QueuePosition>> {
        self.active.as_ref().map(|qs| {
            qs.iter()
                .map(|(q, _)| QueuePosition {
                    next_avail: q.next_avail() + 3,
                    next_used: q.next_used() + 2,
                })
                .collect()
        })
    }
}

fn rd(t: &mut MmioTransport, off: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(off, &mut b);
    u32::from_le_bytes(b)
}

fn wr(t: &mut MmioTransport, off: u64, v: u32) {
    t.write(off, &v.to_le_bytes());
}

fn setup() -> (MmioTransport, Arc<Mutex<Dummy>>) {
    let mem = guest_memory(1 << 20);
    let dev = Arc::new(Mutex::new(Dummy::default()));
    let t = MmioTransport::new(mem, dev.clone()).unwrap();
    (t, dev)
}

fn negotiate(t: &mut MmioTransport, features: Features) {
    wr(t, reg::STATUS, 0);
    wr(t, reg::STATUS, status::ACKNOWLEDGE);
    wr(t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
    for sel in 0..4 {
        wr(t, reg::DRIVER_FEATURES_SEL, sel);
        wr(t, reg::DRIVER_FEATURES, feature_word(features, sel));
    }
    wr(
        t,
        reg::STATUS,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
    );
}

fn setup_queue(t: &mut MmioTransport, sel: u32, size: u32, base: u64) {
    wr(t, reg::QUEUE_SEL, sel);
    wr(t, reg::QUEUE_NUM, size);
    wr(t, reg::QUEUE_DESC_LOW, base as u32);
    wr(t, reg::QUEUE_DESC_HIGH, (base >> 32) as u32);
    wr(t, reg::QUEUE_DRIVER_LOW, (base + 0x1000) as u32);
    wr(t, reg::QUEUE_DEVICE_LOW, (base + 0x2000) as u32);
    wr(t, reg::QUEUE_READY, 1);
}

#[test]
fn identification_registers() {
    let (mut t, _) = setup();
    assert_eq!(rd(&mut t, reg::MAGIC), 0x7472_6976);
    assert_eq!(rd(&mut t, reg::VERSION), 2);
    assert_eq!(rd(&mut t, reg::DEVICE_ID), 42);
    assert_eq!(rd(&mut t, reg::VENDOR_ID), VENDOR_ID);
    wr(&mut t, reg::DEVICE_FEATURES_SEL, 1);
    assert_eq!(rd(&mut t, reg::DEVICE_FEATURES), 1);
    wr(&mut t, reg::DEVICE_FEATURES_SEL, 0);
    assert_eq!(rd(&mut t, reg::DEVICE_FEATURES), (1 << 29) | 0b101);
    wr(&mut t, reg::QUEUE_SEL, 1);
    assert_eq!(rd(&mut t, reg::QUEUE_NUM_MAX), 8);
    wr(&mut t, reg::QUEUE_SEL, 2);
    assert_eq!(rd(&mut t, reg::QUEUE_NUM_MAX), 0);
    // Bad access sizes read zero and are ignored.
    let mut b = [0xffu8; 2];
    t.read(reg::MAGIC, &mut b);
    assert_eq!(b, [0, 0]);
    t.write(reg::STATUS, &[1, 0]);
    assert_eq!(t.device_status(), 0);
    // Config space at 0x100 any width.
    t.write(0x102, &[0xaa, 0xbb]);
    let mut c = [0u8; 4];
    t.read(0x100, &mut c);
    assert_eq!(c, [0, 0, 0xaa, 0xbb]);
}

/// Bits 64-127 travel in DeviceFeaturesSel / DriverFeaturesSel words 2 and
/// 3 (virtio-net's UDP tunnel bits are 65-68); words past 3 read 0 and a
/// driver writing bits there is refused.
#[test]
fn features_above_bit_63_through_select_words_2_and_3() {
    let mem = guest_memory(1 << 20);
    let high = feature(65) | feature(67) | feature(127);
    let dev = Arc::new(Mutex::new(Dummy {
        extra: high,
        ..Dummy::default()
    }));
    let mut t = MmioTransport::new(mem, dev.clone()).unwrap();
    let word = |t: &mut MmioTransport, sel: u32| {
        wr(t, reg::DEVICE_FEATURES_SEL, sel);
        rd(t, reg::DEVICE_FEATURES)
    };
    assert_eq!(word(&mut t, 2), 0b1010, "bits 65 and 67");
    assert_eq!(word(&mut t, 3), 1 << 31, "bit 127");
    assert_eq!(word(&mut t, 4), 0);
    assert_eq!(word(&mut t, u32::MAX), 0);
    // Acking bits in words 2 and 3 reaches the device, and survives a
    // snapshot of the transport.
    let want = feature(VIRTIO_F_VERSION_1) | feature(67) | feature(127);
    negotiate(&mut t, want);
    assert_eq!(t.device_status() & status::FEATURES_OK, status::FEATURES_OK);
    assert_eq!(dev.lock().unwrap().acked, want);
    assert_eq!(t.acked_features(), want);
    let state = t.save();
    assert_eq!(state.driver_features, want);
    assert_eq!(state.device_features & high, high);
    let json = serde_json::to_string(&state).unwrap();
    let back: MmioTransportState = serde_json::from_str(&json).unwrap();
    assert_eq!(back, state);
    // A bit the device did not offer, in word 2: FEATURES_OK refused.
    negotiate(&mut t, feature(VIRTIO_F_VERSION_1) | feature(66));
    assert_eq!(t.device_status() & status::FEATURES_OK, 0);
    // A word beyond 3 is refused when non-zero (and not stored).
    negotiate(&mut t, feature(VIRTIO_F_VERSION_1));
    wr(&mut t, reg::STATUS, 0);
    wr(&mut t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
    wr(&mut t, reg::DRIVER_FEATURES_SEL, 0);
    wr(&mut t, reg::DRIVER_FEATURES, 1 << 0);
    wr(&mut t, reg::DRIVER_FEATURES_SEL, 1);
    wr(&mut t, reg::DRIVER_FEATURES, 1);
    wr(&mut t, reg::DRIVER_FEATURES_SEL, 4);
    wr(&mut t, reg::DRIVER_FEATURES, 0xffff_ffff);
    wr(
        &mut t,
        reg::STATUS,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
    );
    assert_eq!(t.acked_features(), feature(VIRTIO_F_VERSION_1) | 1);
}

/// Transport state written before feature words grew (64-bit numbers)
/// still loads.
#[test]
fn old_64_bit_transport_state_loads() {
    let (t, _) = setup();
    let mut v = serde_json::to_value(t.save()).unwrap();
    v["device_features"] = serde_json::json!(0x1_2000_0005u64);
    v["driver_features"] = serde_json::json!(0x1_0000_0004u64);
    let state: MmioTransportState = serde_json::from_value(v).unwrap();
    assert_eq!(state.device_features, 0x1_2000_0005);
    assert_eq!(state.driver_features, 0x1_0000_0004);
}

#[test]
fn status_state_machine() {
    let (mut t, dev) = setup();
    // DRIVER before ACKNOWLEDGE is ignored.
    wr(&mut t, reg::STATUS, status::DRIVER);
    assert_eq!(t.device_status(), 0);
    // Features without VERSION_1: FEATURES_OK stays clear.
    negotiate(&mut t, 0b1);
    assert_eq!(t.device_status(), status::ACKNOWLEDGE | status::DRIVER);
    // Features not offered: FEATURES_OK stays clear.
    negotiate(&mut t, feature(VIRTIO_F_VERSION_1) | 0b10);
    assert_eq!(t.device_status() & status::FEATURES_OK, 0);
    // A proper subset with VERSION_1 is accepted and acked.
    let want = feature(VIRTIO_F_VERSION_1) | 0b100;
    negotiate(&mut t, want);
    assert_eq!(t.device_status() & status::FEATURES_OK, status::FEATURES_OK);
    assert_eq!(dev.lock().unwrap().acked, want);
    // Features cannot change after FEATURES_OK.
    wr(&mut t, reg::DRIVER_FEATURES_SEL, 0);
    wr(&mut t, reg::DRIVER_FEATURES, 0);
    assert_eq!(t.acked_features(), want);
    // Clearing a bit without reset is ignored.
    wr(&mut t, reg::STATUS, status::ACKNOWLEDGE);
    assert_ne!(t.device_status() & status::FEATURES_OK, 0);
    setup_queue(&mut t, 0, 16, 0x10000);
    setup_queue(&mut t, 1, 8, 0x20000);
    wr(
        &mut t,
        reg::STATUS,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
    );
    assert!(dev.lock().unwrap().is_active());
    {
        let d = dev.lock().unwrap();
        let qs = d.active.as_ref().unwrap();
        assert_eq!(qs[0].0.size(), 16);
        assert!(qs[0].0.ready());
        assert_eq!(qs[1].0.desc_table(), 0x20000);
        assert!(!qs[0].0.event_idx_enabled());
    }
    // Writing 0 resets everything.
    wr(&mut t, reg::STATUS, 0);
    assert_eq!(t.device_status(), 0);
    assert!(!dev.lock().unwrap().is_active());
    assert_eq!(t.acked_features(), 0);
    wr(&mut t, reg::QUEUE_SEL, 0);
    assert_eq!(rd(&mut t, reg::QUEUE_READY), 0);
}

#[test]
fn bad_queue_setup_is_ignored() {
    let (mut t, _) = setup();
    negotiate(&mut t, feature(VIRTIO_F_VERSION_1));
    wr(&mut t, reg::QUEUE_SEL, 0);
    wr(&mut t, reg::QUEUE_NUM, 12); // not a power of two
    assert_eq!(t.queues[0].size(), 16);
    wr(&mut t, reg::QUEUE_NUM, 32); // above max
    assert_eq!(t.queues[0].size(), 16);
    wr(&mut t, reg::QUEUE_DESC_LOW, 0x1001); // misaligned
    assert_ne!(t.queues[0].desc_table(), 0x1001);
    // Rings outside guest memory cannot be enabled.
    wr(&mut t, reg::QUEUE_DESC_LOW, 0x1000);
    wr(&mut t, reg::QUEUE_DESC_HIGH, 0x10);
    wr(&mut t, reg::QUEUE_DRIVER_LOW, 0x2000);
    wr(&mut t, reg::QUEUE_DEVICE_LOW, 0x3000);
    wr(&mut t, reg::QUEUE_READY, 1);
    assert_eq!(rd(&mut t, reg::QUEUE_READY), 0);
    // Valid setup; addresses are then frozen.
    setup_queue(&mut t, 0, 4, 0x10000);
    assert_eq!(rd(&mut t, reg::QUEUE_READY), 1);
    wr(&mut t, reg::QUEUE_DESC_LOW, 0x40000);
    wr(&mut t, reg::QUEUE_NUM, 2);
    assert_eq!(t.queues[0].desc_table(), 0x10000);
    assert_eq!(t.queues[0].size(), 4);
    // Before DRIVER_OK the driver may disable it again.
    wr(&mut t, reg::QUEUE_READY, 0);
    assert_eq!(rd(&mut t, reg::QUEUE_READY), 0);
    // Out-of-range queue selection.
    wr(&mut t, reg::QUEUE_SEL, 7);
    wr(&mut t, reg::QUEUE_NUM, 4);
    assert_eq!(rd(&mut t, reg::QUEUE_READY), 0);
}

#[test]
fn notify_interrupts_and_needs_reset() {
    let (mut t, dev) = setup();
    let irq = t.interrupt_eventfd().try_clone().unwrap();
    wr(&mut t, reg::QUEUE_NOTIFY, 1);
    assert_eq!(t.queue_notify_eventfds()[1].read().unwrap(), 1);
    wr(&mut t, reg::QUEUE_NOTIFY, 9); // ignored
    t.interrupt.trigger(InterruptKind::Queue(0)).unwrap();
    assert_eq!(rd(&mut t, reg::INTERRUPT_STATUS), INT_VRING);
    assert_eq!(irq.read().unwrap(), 1);
    let gen = rd(&mut t, reg::CONFIG_GENERATION);
    t.interrupt.trigger(InterruptKind::Config).unwrap();
    assert_eq!(rd(&mut t, reg::INTERRUPT_STATUS), INT_VRING | INT_CONFIG);
    assert_eq!(rd(&mut t, reg::CONFIG_GENERATION), gen + 1);
    wr(&mut t, reg::INTERRUPT_ACK, INT_VRING);
    assert_eq!(rd(&mut t, reg::INTERRUPT_STATUS), INT_CONFIG);
    wr(&mut t, reg::INTERRUPT_ACK, INT_CONFIG);

    // A failing activation sets DEVICE_NEEDS_RESET with a config interrupt.
    dev.lock().unwrap().fail_activation = true;
    negotiate(&mut t, feature(VIRTIO_F_VERSION_1));
    let _ = irq.read();
    wr(
        &mut t,
        reg::STATUS,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
    );
    let s = rd(&mut t, reg::STATUS);
    assert_ne!(s & status::DEVICE_NEEDS_RESET, 0);
    assert_ne!(rd(&mut t, reg::INTERRUPT_STATUS) & INT_CONFIG, 0);
    assert_eq!(irq.read().unwrap(), 1);
    // Only a reset clears it.
    wr(&mut t, reg::STATUS, s);
    assert_ne!(t.device_status() & status::DEVICE_NEEDS_RESET, 0);
    wr(&mut t, reg::STATUS, 0);
    assert_eq!(t.device_status(), 0);
}

/// A vhost device's backend writes the irqfd itself: while live, the
/// used-buffer bit reads as set (with any pending config bit), so the
/// driver's handler looks at its rings; before DRIVER_OK it does not.
#[test]
fn interrupt_bypass_reports_the_vring_bit_while_live() {
    let mem = guest_memory(1 << 20);
    let dev = Arc::new(Mutex::new(Dummy {
        bypass: true,
        ..Dummy::default()
    }));
    let mut t = MmioTransport::new(mem, dev).unwrap();
    assert!(t.interrupt.irqfd().is_some());
    assert_eq!(rd(&mut t, reg::INTERRUPT_STATUS), 0);
    negotiate(&mut t, feature(VIRTIO_F_VERSION_1));
    setup_queue(&mut t, 0, 16, 0x10000);
    setup_queue(&mut t, 1, 8, 0x20000);
    assert_eq!(rd(&mut t, reg::INTERRUPT_STATUS), 0);
    wr(
        &mut t,
        reg::STATUS,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
    );
    assert_eq!(rd(&mut t, reg::INTERRUPT_STATUS), INT_VRING);
    wr(&mut t, reg::INTERRUPT_ACK, INT_VRING);
    assert_eq!(rd(&mut t, reg::INTERRUPT_STATUS), INT_VRING);
    t.interrupt.trigger(InterruptKind::Config).unwrap();
    assert_eq!(rd(&mut t, reg::INTERRUPT_STATUS), INT_VRING | INT_CONFIG);
    wr(&mut t, reg::INTERRUPT_ACK, INT_VRING | INT_CONFIG);
    assert_eq!(rd(&mut t, reg::INTERRUPT_STATUS), INT_VRING);
    wr(&mut t, reg::STATUS, 0);
    assert_eq!(rd(&mut t, reg::INTERRUPT_STATUS), 0);
    // A device without the capability reports only what was raised.
    let (mut plain, _) = setup();
    negotiate(&mut plain, feature(VIRTIO_F_VERSION_1));
    setup_queue(&mut plain, 0, 16, 0x10000);
    setup_queue(&mut plain, 1, 8, 0x20000);
    wr(
        &mut plain,
        reg::STATUS,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
    );
    assert_eq!(rd(&mut plain, reg::INTERRUPT_STATUS), 0);
}

#[test]
fn state_round_trips() {
    let (mut t, dev) = setup();
    let want = feature(VIRTIO_F_VERSION_1) | feature(VIRTIO_RING_F_EVENT_IDX);
    negotiate(&mut t, want);
    setup_queue(&mut t, 0, 16, 0x10000);
    setup_queue(&mut t, 1, 4, 0x30000);
    wr(
        &mut t,
        reg::STATUS,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
    );
    t.interrupt.trigger(InterruptKind::Config).unwrap();
    wr(&mut t, reg::QUEUE_SEL, 1);
    let state = t.save();
    assert_eq!(state.device_type, 42);
    assert_eq!(state.driver_features, want);
    assert_eq!(state.queues.len(), 2);
    assert_eq!(state.queues[0].next_avail, 3);
    assert_eq!(state.queues[0].next_used, 2);
    assert!(state.queues[1].ready);
    assert_eq!(state.queues[1].size, 4);
    assert_eq!(state.interrupt_status, INT_CONFIG);
    assert_eq!(state.config_generation, 1);
    assert_ne!(state.device_status & status::DRIVER_OK, 0);

    // serde round trip.
    let json = serde_json::to_string(&state).unwrap();
    let back: MmioTransportState = serde_json::from_str(&json).unwrap();
    assert_eq!(back, state);

    // Restore onto a fresh device: it is acked, activated at the saved
    // positions, and the pending interrupt is raised again.
    drop(t);
    drop(dev);
    let dev2 = Arc::new(Mutex::new(Dummy::default()));
    let t2 = MmioTransport::restore((guest_memory(1 << 20), dev2.clone()), &back).unwrap();
    assert_eq!(t2.interrupt_eventfd().read().unwrap(), 1);
    {
        let d = dev2.lock().unwrap();
        assert_eq!(d.acked, want);
        let qs = d.active.as_ref().unwrap();
        assert_eq!(qs[0].0.next_avail(), 3);
        assert!(qs[0].0.event_idx_enabled());
    }
    // The dummy reports positions +3/+2 of what it got; compare the rest.
    let mut again = t2.save();
    for q in &mut again.queues {
        q.next_avail -= 3;
        q.next_used -= 2;
    }
    assert_eq!(again, state);

    // Mismatches are refused with a clear error.
    let mut wrong = state.clone();
    wrong.device_type = 1;
    let err = MmioTransport::restore(
        (
            guest_memory(1 << 20),
            Arc::new(Mutex::new(Dummy::default())),
        ),
        &wrong,
    )
    .err()
    .unwrap();
    assert!(err.to_string().contains("device type 1"), "{err}");
    let mut wrong = state.clone();
    wrong.driver_features |= 1 << 40;
    let err = MmioTransport::restore(
        (
            guest_memory(1 << 20),
            Arc::new(Mutex::new(Dummy::default())),
        ),
        &wrong,
    )
    .err()
    .unwrap();
    assert!(
        matches!(err, MmioRestoreError::FeaturesNotOffered { .. }),
        "{err}"
    );
}
