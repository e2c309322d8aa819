//! UDP traffic to the test guest's echo service (port 7).

use std::time::{Duration, Instant};

use crate::netns::in_netns;

/// `count` datagram sizes from 36 to 1472 bytes, evenly spread: IP packets
/// of 64 to 1500 bytes (the MTU).
pub fn sizes_up_to_mtu(count: usize) -> Vec<usize> {
    (0..count).map(|i| 36 + (i * 1436 / (count - 1))).collect()
}

/// Sends `count` UDP datagrams (sizes cycling through `sizes`) to an echo
/// server, at most `window` unanswered at a time, and returns how many came
/// back with the same payload.
pub fn udp_echo(
    target: &str,
    count: usize,
    sizes: &[usize],
    window: usize,
    timeout: Duration,
) -> usize {
    let sock = std::net::UdpSocket::bind("0.0.0.0:0").expect("bind UDP");
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut sent: std::collections::HashMap<u32, Vec<u8>> = std::collections::HashMap::new();
    let (mut next, mut ok) = (0usize, 0usize);
    let deadline = Instant::now() + timeout;
    let mut buf = vec![0u8; 65536];
    while (ok < count) && Instant::now() < deadline {
        while next < count && sent.len() < window {
            let size = sizes[next % sizes.len()].max(4);
            let mut payload: Vec<u8> = (0..size).map(|i| (i as u8) ^ (next as u8)).collect();
            payload[..4].copy_from_slice(&(next as u32).to_le_bytes());
            sock.send_to(&payload, target).expect("send");
            sent.insert(next as u32, payload);
            next += 1;
        }
        match sock.recv_from(&mut buf) {
            Ok((n, _)) if n >= 4 => {
                let seq = u32::from_le_bytes(buf[..4].try_into().unwrap());
                if sent.get(&seq).is_some_and(|p| p.as_slice() == &buf[..n]) {
                    sent.remove(&seq);
                    ok += 1;
                }
            }
            Ok(_) => {}
            Err(_) => {
                // Lost or still in flight: resend what is outstanding.
                for (_, p) in sent.iter() {
                    let _ = sock.send_to(p, target);
                }
            }
        }
    }
    ok
}

/// A client that keeps sending UDP echo requests (one every `every`) until
/// told to stop, counting replies, with the time of each reply.
pub struct EchoClient {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handle: Option<std::thread::JoinHandle<(u64, Vec<Instant>)>>,
}

impl EchoClient {
    pub fn start(ns: &str, target: String, every: Duration) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = stop.clone();
        let handle = in_netns(ns, move || {
            let sock = std::net::UdpSocket::bind("0.0.0.0:0").expect("bind");
            sock.set_read_timeout(Some(every)).unwrap();
            let (mut sent, mut replies) = (0u64, Vec::new());
            let mut buf = [0u8; 2048];
            while !s.load(std::sync::atomic::Ordering::SeqCst) {
                let _ = sock.send_to(&sent.to_le_bytes(), &target);
                sent += 1;
                while let Ok((n, _)) = sock.recv_from(&mut buf) {
                    if n == 8 {
                        replies.push(Instant::now());
                    }
                }
            }
            (sent, replies)
        });
        EchoClient {
            stop,
            handle: Some(handle),
        }
    }

    /// Stops; returns (requests sent, reply times).
    pub fn finish(mut self) -> (u64, Vec<Instant>) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.handle
            .take()
            .expect("running")
            .join()
            .expect("echo client")
    }
}
