//! One operation at a time: four API clients send `stop`, `cont`,
//! `query-status`, `snapshot-save` (into a few shared directories),
//! `migrate` (to a destination that accepts and never answers),
//! `migrate_cancel` and `query-migrate` at random, for 30 s, to a guest that
//! checks its own memory, on a TAP and on godwit's vhost-user backend. No crash, no hang,
//! no error but a clear `busy:`, the guest never finds a mismatch, every
//! snapshot directory restores and verifies, `quit` during a save waits for
//! it, and no temporary file is ever left behind.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use godwit_tests::net_backend::NetBackend;
use godwit_tests::verify::full_round_without_mismatch;
use godwit_tests::{qmp_connect, udp_echo, NetHost, RunningVm, TempDir, BOOT};

const CLIENTS: u64 = 4;
const STORM: Duration = Duration::from_secs(30);
const DIRS: usize = 3;

/// A small xorshift: each client's sequence differs, and a failure names
/// its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self, below: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % below
    }
}

/// Whatever is in a snapshot's parent directory that is not a snapshot.
fn leftovers(parent: &Path) -> Vec<String> {
    std::fs::read_dir(parent)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| !n.starts_with("snap"))
                .collect()
        })
        .unwrap_or_default()
}

/// One client's storm; returns (commands sent, busy refusals, saves done).
fn storm(api: PathBuf, snaps: PathBuf, stalled: String, seed: u64) -> (u64, u64, u64) {
    let mut qmp = qmp_connect(&api);
    qmp.set_timeout(Duration::from_secs(60));
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let (mut sent, mut busy, mut saves) = (0, 0, 0);
    let end = Instant::now() + STORM;
    while Instant::now() < end {
        let (name, args) = match rng.next(12) {
            0 | 1 => ("query-status", Value::Null),
            2 => ("query-migrate", Value::Null),
            3 | 4 => ("stop", Value::Null),
            5 | 6 => ("cont", Value::Null),
            7 => ("migrate", json!({ "uri": format!("tcp:{stalled}") })),
            8 => ("migrate_cancel", Value::Null),
            _ => {
                let dir = snaps.join(format!("snap{}", rng.next(DIRS as u64)));
                ("snapshot-save", json!({ "dir": dir }))
            }
        };
        sent += 1;
        match qmp.execute(name, args) {
            Ok(v) => {
                if name == "snapshot-save" {
                    saves += 1;
                }
                if name == "query-status" {
                    let s = v["status"].as_str().unwrap_or("");
                    assert!(matches!(s, "running" | "paused"), "seed {seed}: {v}");
                }
            }
            Err(e) => {
                let msg = e.to_string();
                assert!(
                    msg.contains("busy: "),
                    "seed {seed}: {name} failed with something else than busy: {msg}"
                );
                busy += 1;
            }
        }
        std::thread::sleep(Duration::from_millis(rng.next(40)));
    }
    (sent, busy, saves)
}

/// The storm, then: the guest still answers UDP echo, and so does each
/// VM restored from a snapshot the storm took.
fn storm_and_restore(net: &dyn Fn() -> String, host: &NetHost) {
    let dir = TempDir::new("apistorm");
    let api = dir.join("api.sock");
    let snaps = dir.join("snaps");
    std::fs::create_dir_all(&snaps).unwrap();
    let cmdline = format!(
        "console=ttyS0 reboot=k godwit.mode=serve godwit.heartbeat_ms=200 godwit.verify=1M {}",
        host.guest_ip_param()
    );
    let spawn = |args: &[&str]| {
        let net = net();
        let mut args = args.to_vec();
        args.extend(["--net", &net]);
        RunningVm::spawn_in(&host.ns, &args)
    };
    // godwit-1.1: the newest machine type both peers of these tests carry
    // (vhost-user has no feature bits above 63 for godwit-1.2's tunnel GSO).
    let mut vm = spawn(&[
        "run",
        "--machine",
        "godwit-1.1",
        "--memory",
        "64M",
        "--api-socket",
        api.to_str().unwrap(),
        "--cmdline",
        &cmdline,
    ]);
    vm.wait_line("serve: ready", BOOT);
    full_round_without_mismatch(&mut vm, "boot");

    // A migration destination that accepts and never says a word: each
    // `migrate` holds the VM in its handshake until a `migrate_cancel`
    // (or the source's own deadline) ends it, and never commits.
    let stalled = host.run(|| std::net::TcpListener::bind("127.0.0.1:0").expect("bind"));
    let stalled_addr = stalled.local_addr().unwrap().to_string();
    let accepting = std::thread::spawn(move || {
        let held: Vec<_> = stalled.incoming().map_while(Result::ok).collect();
        drop(held);
    });
    drop(accepting);

    let clients: Vec<_> = (0..CLIENTS)
        .map(|seed| {
            let (api, snaps, stalled) = (api.clone(), snaps.clone(), stalled_addr.clone());
            std::thread::spawn(move || storm(api, snaps, stalled, seed + 1))
        })
        .collect();
    // The console is read meanwhile, so that the guest never blocks on it.
    let until = Instant::now() + STORM + Duration::from_secs(5);
    while Instant::now() < until && !clients.iter().all(|c| c.is_finished()) {
        vm.try_line(Duration::from_millis(100));
    }
    let mut totals = (0, 0, 0);
    for c in clients {
        let (s, b, n) = c.join().expect("a client failed");
        totals = (totals.0 + s, totals.1 + b, totals.2 + n);
    }
    eprintln!(
        "{} commands, {} refused as busy, {} snapshots saved",
        totals.0, totals.1, totals.2
    );
    assert!(totals.2 > 0, "no snapshot was saved");
    assert_eq!(leftovers(&snaps), Vec::<String>::new(), "temporary files");

    // Still whole: no migration left, resumed, it verifies and answers.
    let mut qmp = qmp_connect(&api);
    let _ = qmp.execute("migrate_cancel", Value::Null);
    let settled = Instant::now() + Duration::from_secs(30);
    loop {
        let status = qmp.execute("query-migrate", Value::Null).unwrap()["status"].clone();
        if !matches!(status.as_str(), Some("setup" | "active" | "cancelling")) {
            break;
        }
        assert!(
            Instant::now() < settled,
            "the migration never ended: {status}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    qmp.execute("cont", Value::Null).unwrap();
    assert_eq!(
        qmp.execute("query-status", Value::Null).unwrap()["status"],
        "running"
    );
    full_round_without_mismatch(&mut vm, "after the storm");
    let target = host.guest_echo();
    let echoed = host.run(move || udp_echo(&target, 10, &[64], 1, Duration::from_secs(20)));
    if echoed != 10 {
        let net = qmp.execute("query-net", Value::Null);
        let _ = qmp.execute("quit", Value::Null);
        let (_, stderr) = vm.wait_exit(Duration::from_secs(30));
        panic!("the guest answers {echoed} of 10 echoes after the storm; query-net: {net:?}; godwit: {stderr}");
    }

    // quit sent while a save runs waits for it: the save completes (or
    // was refused before it began) and leaves nothing behind.
    let last = snaps.join("snap-last");
    let saver = {
        let (api, last) = (api.clone(), last.clone());
        std::thread::spawn(move || {
            qmp_connect(&api).execute("snapshot-save", json!({ "dir": last }))
        })
    };
    std::thread::sleep(Duration::from_millis(5));
    qmp.execute("quit", Value::Null).unwrap();
    let saved = saver.join().unwrap();
    let (status, stderr) = vm.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "{stderr}");
    assert_eq!(
        leftovers(&snaps),
        Vec::<String>::new(),
        "temporary files after quit"
    );
    if let Err(e) = &saved {
        assert!(e.to_string().contains("busy: the VM is quitting"), "{e}");
    }

    let mut dirs: Vec<PathBuf> = (0..DIRS).map(|k| snaps.join(format!("snap{k}"))).collect();
    if saved.is_ok() {
        dirs.push(last);
    }
    for (i, snap) in dirs.iter().filter(|d| d.exists()).enumerate() {
        let mode = if i % 2 == 0 { "map" } else { "copy" };
        let mut vm = spawn(&[
            "run",
            "--restore",
            snap.to_str().unwrap(),
            "--restore-memory",
            mode,
            "--api-socket",
            api.to_str().unwrap(),
        ]);
        full_round_without_mismatch(&mut vm, &format!("restore of {} ({mode})", snap.display()));
        let target = host.guest_echo();
        let echoed = host.run(move || udp_echo(&target, 5, &[64], 1, Duration::from_secs(20)));
        assert_eq!(echoed, 5, "{}: the restored guest answers", snap.display());
        qmp_connect(&api).execute("quit", Value::Null).unwrap();
        assert!(vm.wait_exit(Duration::from_secs(20)).0.success());
    }
}

#[test]
fn four_clients_at_random_on_a_tap_guest() {
    let host = NetHost::new(true, 171);
    let net = host.tap_net("");
    storm_and_restore(&|| net.clone(), &host);
}

#[test]
fn four_clients_at_random_on_a_vhost_user_guest() {
    let host = NetHost::new(true, 172);
    let dir = TempDir::new("apistormvu");
    let socket = dir.join("backend.sock");
    let _backend = NetBackend::start(&host, &socket, &[]);
    let net = format!("vhost-user,socket={},queues=1", socket.display());
    // This storm found notifications lost across the backend's ring
    // restarts (tests/vhost_user.rs, many_pauses_of_an_idle_guest_...).
    storm_and_restore(&|| net.clone(), &host);
}
