//! Nothing lost: the test guest checks its own memory (`godwit.verify=`)
//! and these tests read its verdicts across snapshot and restore. One test
//! corrupts a saved page on purpose, to prove the checker catches a loss.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};

use godwit_migration::memory_file;
use godwit_tests::migrate::{assert_heartbeat_follows, console_end, ConsoleEnd};
use godwit_tests::net_backend::NetBackend;
use godwit_tests::verify::{full_round_without_mismatch, next_verdict};
use godwit_tests::{qmp_connect, udp_echo, EchoClient, NetHost, RunningVm, TempDir, TwoHosts};

const BOOT: Duration = Duration::from_secs(60);
const HEARTBEAT_MS: u64 = 200;

fn cmdline(verify: &str, extra: &str) -> String {
    format!(
        "console=ttyS0 reboot=k godwit.mode=serve godwit.heartbeat_ms={HEARTBEAT_MS} godwit.verify={verify} {extra}"
    )
}

/// Boots a verifying guest; returns it with its buffer's guest address.
fn boot(api: &Path, cmdline: &str, net: Option<&NetHost>) -> (RunningVm, u64) {
    boot_with(api, cmdline, net, &[])
}

/// [`boot`] with more `godwit run` arguments.
fn boot_with(api: &Path, cmdline: &str, net: Option<&NetHost>, more: &[&str]) -> (RunningVm, u64) {
    let mut args = vec![
        "run".to_string(),
        "--api-socket".into(),
        api.display().to_string(),
        "--cmdline".into(),
        cmdline.to_string(),
    ];
    args.extend(more.iter().map(|a| a.to_string()));
    if let Some(h) = net {
        args.push("--net".into());
        args.push(format!("tap,ifname={}", h.tap));
    }
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut vm = match net {
        Some(h) => RunningVm::spawn_in(&h.ns, &argv),
        None => RunningVm::spawn(&argv),
    };
    let line = vm.wait_line("serve: verify buffer=", BOOT);
    let gpa = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("buffer=0x"))
        .and_then(|h| u64::from_str_radix(h, 16).ok())
        .unwrap_or_else(|| panic!("{line:?}"));
    vm.wait_line("serve: ready", BOOT);
    (vm, gpa)
}

/// `godwit run --restore DIR` (memory `mode`: map or copy).
fn restore(snap: &Path, api: &Path, mode: &str) -> RunningVm {
    RunningVm::spawn(&[
        "run",
        "--restore",
        snap.to_str().unwrap(),
        "--restore-memory",
        mode,
        "--api-socket",
        api.to_str().unwrap(),
    ])
}

fn quit(vm: &mut RunningVm, api: &Path) {
    qmp_connect(api).execute("quit", Value::Null).unwrap();
    assert_eq!(vm.wait_exit(Duration::from_secs(20)).0.code(), Some(0));
}

fn save(api: &Path, dir: &Path) {
    qmp_connect(api)
        .execute("snapshot-save", json!({ "dir": dir }))
        .unwrap_or_else(|e| panic!("snapshot-save {}: {e}", dir.display()));
}

/// Waits for `n` more heartbeats.
fn heartbeats(vm: &mut RunningVm, n: u32) {
    for _ in 0..n {
        vm.wait_prefix("heartbeat ", Duration::from_secs(20));
    }
}

#[test]
fn a_verifying_guest_finds_no_mismatch_and_keeps_serving() {
    let host = NetHost::new(true, 161);
    let dir = TempDir::new("verifyboot");
    let api = dir.join("api.sock");
    let (mut vm, _) = boot(&api, &cmdline("2M", &host.guest_ip_param()), Some(&host));
    let line = vm
        .seen
        .iter()
        .find(|l| l.starts_with("serve: verify buffer="))
        .unwrap();
    assert!(
        line.contains(" pages=512 rate=256 check=2000 pages/s"),
        "{line}"
    );
    let v = full_round_without_mismatch(&mut vm, "boot");
    assert_eq!(v.pages, 512);
    // The echo and the heartbeat go on next to the checker.
    let target = format!("{}:7", host.guest_ip());
    let echoed =
        host.run(move || udp_echo(&target, 50, &[64, 512, 1400], 4, Duration::from_secs(30)));
    assert_eq!(echoed, 50, "UDP echo next to the verifier");
    full_round_without_mismatch(&mut vm, "after the echoes");
    quit(&mut vm, &api);
}

/// The guest's pages as the memory file holds them: (guest address of the
/// page, its first word).
fn saved_first_words(memory: &Path, gpa: u64, pages: u64) -> Vec<(u64, u64, u64)> {
    let info = memory_file::read_info(memory).unwrap();
    let file = std::fs::File::open(memory).unwrap();
    (0..pages)
        .map(|i| {
            let page = gpa + i * 4096;
            let r = info
                .regions
                .iter()
                .find(|r| (r.guest_addr..r.guest_addr + r.size).contains(&page))
                .expect("verify buffer inside guest RAM");
            let at = info.data_offset + r.offset + (page - r.guest_addr);
            let mut w = [0u8; 8];
            file.read_exact_at(&mut w, at).unwrap();
            (page, at, u64::from_le_bytes(w))
        })
        .collect()
}

#[test]
fn a_page_damaged_in_a_snapshot_is_reported_by_the_guest() {
    let dir = TempDir::new("verifydamage");
    let api = dir.join("api.sock");
    let snap = dir.join("snap");
    let clean = dir.join("clean");
    // 64 pages rewritten at 10 pages/s, all checked every 32 ms: a damaged
    // page is read long before the writer comes back to it.
    let (mut vm, gpa) = boot(&api, &cmdline("256K", "godwit.verify_rate=10"), None);
    heartbeats(&mut vm, 10);
    qmp_connect(&api).execute("stop", Value::Null).unwrap();
    save(&api, &snap);
    quit(&mut vm, &api);
    std::fs::create_dir_all(&clean).unwrap();
    for f in ["state.gws", "memory.gwm"] {
        std::fs::copy(snap.join(f), clean.join(f)).unwrap();
    }

    // The page behind the writer's cursor: the last one of the newest
    // generation (the generation is the high half of each word).
    let pages = saved_first_words(&snap.join("memory.gwm"), gpa, 64);
    let newest = pages.iter().map(|p| p.2 >> 32).max().unwrap();
    assert!(newest >= 1, "the guest wrote its buffer: {pages:x?}");
    let &(page, at, word) = pages.iter().rev().find(|p| p.2 >> 32 == newest).unwrap();
    assert_eq!(word, page | newest << 32, "the documented pattern");

    // Unchanged, the snapshot verifies.
    let mut vm = restore(&clean, &api, "map");
    full_round_without_mismatch(&mut vm, "restore of the intact snapshot");
    quit(&mut vm, &api);

    // One flipped bit in one saved page is caught.
    let damaged = word ^ (1 << 20);
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(snap.join("memory.gwm"))
        .unwrap();
    file.write_all_at(&damaged.to_le_bytes(), at).unwrap();
    drop(file);
    let mut vm = restore(&snap, &api, "copy");
    let want = format!("verify: mismatch at {page:#x} want {word:#x} got {damaged:#x}");
    let line = vm.wait_line("verify: mismatch", Duration::from_secs(30));
    assert_eq!(line.trim_end(), want);
    let v = next_verdict(&mut vm);
    assert!(v.mismatches >= 1, "{v:?}");
    quit(&mut vm, &api);
}

/// boot -> snapshot A -> restore A (map) -> the guest writes pages that were
/// zero in A -> snapshot B -> restore B: what the guest wrote after the
/// first restore is in B.
#[test]
fn a_snapshot_of_a_map_restored_vm_holds_what_the_guest_wrote_since() {
    let dir = TempDir::new("verifyresnap");
    let api = dir.join("api.sock");
    let (a, b) = (dir.join("a"), dir.join("b"));
    // 4096 pages at 256 pages/s: the first pass takes 16 s, so snapshot A
    // holds a buffer written only in part, the rest zero (holes in A's file).
    let (mut vm, _) = boot(&api, &cmdline("16M", ""), None);
    heartbeats(&mut vm, 5);
    save(&api, &a);
    quit(&mut vm, &api);

    let mut vm = restore(&a, &api, "map");
    full_round_without_mismatch(&mut vm, "restore of A");
    // Several hundred more pages, written into what were holes of A.
    heartbeats(&mut vm, 10);
    save(&api, &b);
    quit(&mut vm, &api);

    for mode in ["map", "copy"] {
        let mut vm = restore(&b, &api, mode);
        full_round_without_mismatch(&mut vm, &format!("restore of B ({mode})"));
        quit(&mut vm, &api);
    }
}

/// A map-restored VM that wrote new pages migrates with all of them: round 0
/// reads its private pages, not only what the snapshot file holds.
#[test]
fn a_map_restored_vm_migrates_with_what_the_guest_wrote_since() {
    let dir = TempDir::new("verifymig");
    let api = dir.join("api.sock");
    let snap = dir.join("a");
    // Two vCPUs: the APs' state moves too (they idle; the BSP verifies).
    let (mut vm, _) = boot_with(&api, &cmdline("16M", ""), None, &["--vcpus", "2"]);
    heartbeats(&mut vm, 5);
    save(&api, &snap);
    quit(&mut vm, &api);

    let mut src = restore(&snap, &api, "map");
    heartbeats(&mut src, 10);
    let sock = dir.join("mig.sock");
    let uri = format!("unix:{}", sock.display());
    let dst_api = dir.join("dst.sock");
    let mut dst = RunningVm::spawn(&[
        "run",
        "--incoming",
        &uri,
        "--api-socket",
        dst_api.to_str().unwrap(),
    ]);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !sock.exists() {
        assert!(std::time::Instant::now() < deadline, "{uri} never listened");
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut qmp = qmp_connect(&api);
    qmp.execute("migrate", json!({ "uri": uri })).unwrap();
    let (status, stderr) = src.wait_exit(Duration::from_secs(120));
    assert_eq!(status.code(), Some(0), "source: {stderr}");
    full_round_without_mismatch(&mut dst, "the migrated VM");
    quit(&mut dst, &dst_api);
}

/// A small tmpfs mounted for one test, unmounted on drop.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(at: std::path::PathBuf, size: &str) -> Self {
        std::fs::create_dir_all(&at).unwrap();
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&at)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "mount a tmpfs at {}: {}",
            at.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(at)
    }

    fn free(&self) -> u64 {
        let path = std::ffi::CString::new(self.0.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: statvfs is a plain C struct for which all zero bytes are a
        // valid value.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: statvfs fills the struct it is given from a valid,
        // NUL-terminated path.
        let rc = unsafe { libc::statvfs(path.as_ptr(), &mut st) };
        assert_eq!(rc, 0, "statvfs {}", self.0.display());
        st.f_bavail * st.f_frsize
    }

    /// Every path below the mount, relative to it, sorted.
    fn listing(&self) -> Vec<String> {
        fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
            for e in std::fs::read_dir(dir).unwrap() {
                let p = e.unwrap().path();
                out.push(p.strip_prefix(root).unwrap().display().to_string());
                if p.is_dir() {
                    walk(root, &p, out);
                }
            }
        }
        let mut out = Vec::new();
        walk(&self.0, &self.0, &mut out);
        out.sort();
        out
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

fn file_digest(path: &Path) -> (u64, u32) {
    let bytes = std::fs::read(path).unwrap();
    (bytes.len() as u64, crc32c::crc32c(&bytes))
}

/// A new snapshot over an older one, on a disk that fills up at every
/// point of the save: each failed save leaves the older snapshot exactly as
/// it was and no temporary file; the save that fits replaces it whole.
#[test]
fn a_snapshot_that_does_not_fit_leaves_the_older_one_restorable() {
    let dir = TempDir::new("verifyfull");
    let disk = Tmpfs::mount(dir.join("disk"), "48m");
    let api = dir.join("api.sock");
    let snap = disk.0.join("snap");
    // The whole buffer is written within a second; after that the guest
    // only rewrites the same pages, so every snapshot holds the same pages.
    let (mut vm, _) = boot(&api, &cmdline("2M", "godwit.verify_rate=2000"), None);
    heartbeats(&mut vm, 10);
    save(&api, &snap);
    let (state, memory) = (snap.join("state.gws"), snap.join("memory.gwm"));
    let before = (file_digest(&state), file_digest(&memory));
    // Kept open, the older memory file keeps its space even once replaced:
    // a save then needs room for a whole second snapshot.
    let held = std::fs::File::open(&memory).unwrap();
    use std::os::unix::fs::MetadataExt;
    let mem_bytes = held.metadata().unwrap().blocks() * 512;
    let state_bytes = std::fs::metadata(&state).unwrap().len().div_ceil(4096) * 4096;
    let filler = disk.0.join("filler");
    let empty = disk.free();
    let page = 4096;
    let mut levels = vec![0, page, mem_bytes / 2];
    levels.extend((0..=2).map(|k| mem_bytes - page + k * page));
    levels.extend([mem_bytes + state_bytes / 2, mem_bytes + state_bytes - page]);
    levels.push(mem_bytes + state_bytes + 64 * page);
    let mut replaced = false;
    for free in levels {
        let _ = std::fs::remove_file(&filler);
        let f = std::fs::File::create(&filler).unwrap();
        let size = empty.saturating_sub(free);
        if size > 0 {
            // SAFETY: fallocate on a file this test just created.
            let rc =
                unsafe { libc::fallocate(std::os::fd::AsRawFd::as_raw_fd(&f), 0, 0, size as i64) };
            assert_eq!(rc, 0, "fill the tmpfs: {}", std::io::Error::last_os_error());
        }
        drop(f);
        let result = qmp_connect(&api).execute("snapshot-save", json!({ "dir": snap }));
        let listing = disk.listing();
        let files = ["filler", "snap", "snap/memory.gwm", "snap/state.gws"];
        assert_eq!(listing, files, "{free} bytes free: {result:?}");
        match result {
            Err(e) => {
                assert!(
                    e.to_string().contains("No space left on device"),
                    "{free} bytes free: {e}"
                );
                assert_eq!(
                    (file_digest(&state), file_digest(&memory)),
                    before,
                    "{free} bytes free: a failed save left the older snapshot as it was"
                );
            }
            Ok(_) => {
                assert!(free >= mem_bytes, "a snapshot in {free} bytes?");
                replaced = true;
                break;
            }
        }
        assert_eq!(
            qmp_connect(&api)
                .execute("query-status", Value::Null)
                .unwrap()["status"],
            "running"
        );
    }
    assert!(replaced, "the save that fits replaces the older snapshot");
    assert_ne!(file_digest(&state), before.0);
    drop(held);
    quit(&mut vm, &api);
    let mut vm = restore(&snap, &api, "map");
    full_round_without_mismatch(&mut vm, "the snapshot that fitted");
    quit(&mut vm, &api);
}

/// A VM restored in map mode runs from its snapshot's memory file: a new
/// snapshot saved over that directory, and deleting it, change nothing for it.
#[test]
fn a_map_restored_vm_outlives_its_snapshot_directory() {
    let dir = TempDir::new("verifyoutlive");
    let api = dir.join("api.sock");
    let other_api = dir.join("other.sock");
    let snap = dir.join("snap");
    let (mut vm, _) = boot(&api, &cmdline("4M", ""), None);
    heartbeats(&mut vm, 5);
    save(&api, &snap);
    quit(&mut vm, &api);

    let mut vm = restore(&snap, &api, "map");
    full_round_without_mismatch(&mut vm, "restore");
    heartbeats(&mut vm, 5);
    // Saved over the directory it maps its memory from.
    save(&api, &snap);
    full_round_without_mismatch(&mut vm, "after a snapshot over its own");
    let mut copy = restore(&snap, &other_api, "copy");
    full_round_without_mismatch(&mut copy, "the snapshot saved over the older one");
    quit(&mut copy, &other_api);
    std::fs::remove_dir_all(&snap).unwrap();
    full_round_without_mismatch(&mut vm, "after its snapshot was deleted");
    heartbeats(&mut vm, 5);
    full_round_without_mismatch(&mut vm, "later");
    quit(&mut vm, &api);
}

/// A save killed while it writes leaves a snapshot that restores (the older
/// one) and a staging directory that the next save there removes.
#[test]
fn a_save_killed_midway_leaves_a_restorable_snapshot_and_nothing_after_the_next() {
    let dir = TempDir::new("verifykill");
    let api = dir.join("api.sock");
    let place = dir.join("snaps");
    let snap = place.join("snap");
    // 192 MiB of non-zero pages make a save long enough to be cut.
    let (mut vm, _) = boot_with(
        &api,
        &cmdline("2M", "godwit.dirty=192M:40000"),
        None,
        &["--memory", "256M"],
    );
    loop {
        let l = vm.wait_prefix("dirty: ", Duration::from_secs(60));
        if l["dirty: ".len()..].trim().parse::<u64>().unwrap() >= 49152 {
            break;
        }
    }
    let took = qmp_connect(&api)
        .execute("snapshot-save", json!({ "dir": snap }))
        .unwrap()["total_ms"]
        .as_f64()
        .unwrap();
    eprintln!("a save of this VM takes {took:.0} ms");
    let before = (
        file_digest(&snap.join("state.gws")),
        file_digest(&snap.join("memory.gwm")),
    );
    let saver = {
        let api = api.clone();
        let snap = snap.clone();
        std::thread::spawn(move || {
            let _ = qmp_connect(&api).execute("snapshot-save", json!({ "dir": snap }));
        })
    };
    let staging = |place: &Path| {
        std::fs::read_dir(place)
            .unwrap()
            .filter_map(|e| e.ok())
            .any(|e| e.file_name().to_string_lossy().contains("godwit-tmp"))
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !staging(&place) {
        assert!(std::time::Instant::now() < deadline, "no save started");
        std::thread::sleep(Duration::from_micros(200));
    }
    // SAFETY: kill only sends SIGKILL to the godwit this test started.
    assert_eq!(unsafe { libc::kill(vm.pid() as i32, libc::SIGKILL) }, 0);
    vm.wait_exit(Duration::from_secs(20));
    saver.join().unwrap();
    let cut = staging(&place);
    if cut {
        assert_eq!(
            (
                file_digest(&snap.join("state.gws")),
                file_digest(&snap.join("memory.gwm"))
            ),
            before,
            "a killed save left the older snapshot as it was"
        );
    }

    let mut vm = restore(&snap, &api, "map");
    full_round_without_mismatch(&mut vm, "the snapshot a killed save left");
    save(&api, &snap);
    let names: Vec<String> = std::fs::read_dir(&place)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        ["snap"],
        "the next save removed what the killed one left"
    );
    quit(&mut vm, &api);
    let mut vm = restore(&snap, &api, "copy");
    full_round_without_mismatch(&mut vm, "the next snapshot");
    quit(&mut vm, &api);
    assert!(cut, "the save was killed before it completed");
}

/// The next VM goes on where the previous one stopped.
fn continues(vm: &mut RunningVm, from: &ConsoleEnd, what: &str) {
    assert_heartbeat_follows(from, vm);
    full_round_without_mismatch(vm, what);
}

/// Stops the VM, snapshots it into `snap`, quits; returns where its
/// console stopped.
fn stop_save_quit(vm: &mut RunningVm, api: &Path, snap: &Path) -> ConsoleEnd {
    qmp_connect(api).execute("stop", Value::Null).unwrap();
    save(api, snap);
    quit(vm, api);
    console_end(vm)
}

/// Where a chain runs: on this host, or on two hosts with a TAP each and a
/// client that keeps echoing through the guest.
struct Place<'a> {
    hosts: Option<&'a TwoHosts>,
    /// The vhost-user sockets of godwit's backends on A and B, else TAPs.
    vhost_user: Option<(std::path::PathBuf, std::path::PathBuf)>,
}

const TAP: &str = "tap,ifname=gwtap0";
const MIG_PORT: u16 = 4444;

impl Place<'_> {
    fn spawn(&self, on_a: bool, args: &[&str]) -> RunningVm {
        let ns = self.hosts.map(|h| if on_a { h.ns_a() } else { h.ns_b() });
        let net = match &self.vhost_user {
            Some((a, b)) => format!(
                "vhost-user,socket={},queues=1",
                (if on_a { a } else { b }).display()
            ),
            None => TAP.to_string(),
        };
        let mut args: Vec<&str> = args.to_vec();
        if self.hosts.is_some() {
            args.extend(["--net", &net]);
        }
        match ns {
            Some(ns) => RunningVm::spawn_in(&ns, &args),
            None => RunningVm::spawn(&args),
        }
    }

    fn boot(&self, api: &Path, vcpus: &str) -> RunningVm {
        let ip = self.hosts.map(|h| h.guest_ip_param()).unwrap_or_default();
        let cmdline = cmdline("8M", &ip);
        // vhost-user carries no feature bit above 63: the newest machine
        // type it can run is godwit-1.1 (godwit-1.2 adds UDP tunnel GSO).
        let machine = if self.vhost_user.is_some() {
            "godwit-1.1"
        } else {
            "godwit"
        };
        let mut vm = self.spawn(
            true,
            &[
                "run",
                "--machine",
                machine,
                "--vcpus",
                vcpus,
                "--api-socket",
                api.to_str().unwrap(),
                "--cmdline",
                &cmdline,
            ],
        );
        vm.wait_line("serve: ready", BOOT);
        vm
    }

    /// Restores on host A.
    fn restore(&self, snap: &Path, api: &Path, mode: &str) -> RunningVm {
        self.spawn(
            true,
            &[
                "run",
                "--restore",
                snap.to_str().unwrap(),
                "--restore-memory",
                mode,
                "--api-socket",
                api.to_str().unwrap(),
            ],
        )
    }

    /// Migrates the VM behind `api` to a new process, on host B (`to_b`)
    /// or A, or over a unix socket on this host; returns the destination
    /// and its API socket.
    fn migrate(
        &self,
        src: &mut RunningVm,
        api: &Path,
        dir: &Path,
        tag: &str,
        to_b: bool,
    ) -> (RunningVm, std::path::PathBuf) {
        let dst_api = dir.join(format!("{tag}.api"));
        let (ns, uri) = match self.hosts {
            Some(h) => {
                let (ns, addr) = if to_b {
                    (h.ns_b(), h.addr_b())
                } else {
                    (h.ns_a(), format!("10.{}.0.11", h.subnet))
                };
                (Some(ns), format!("tcp:{addr}:{MIG_PORT}"))
            }
            None => (
                None,
                format!("unix:{}", dir.join(format!("{tag}.mig")).display()),
            ),
        };
        let mut dst = self.spawn(
            !to_b,
            &[
                "run",
                "--incoming",
                &uri,
                "--api-socket",
                dst_api.to_str().unwrap(),
            ],
        );
        if !wait_listening(ns.as_deref(), &uri) {
            let (status, stderr) = dst.wait_exit(Duration::from_secs(10));
            panic!("{tag}: the destination never listened on {uri}: {status:?}: {stderr}");
        }
        qmp_connect(api)
            .execute("migrate", json!({ "uri": uri }))
            .unwrap();
        let (status, stderr) = src.wait_exit(Duration::from_secs(120));
        assert_eq!(status.code(), Some(0), "{tag}: source: {stderr}");
        continues(&mut dst, &console_end(src), tag);
        (dst, dst_api)
    }
}

/// Waits until the destination of `uri` listens; false if it does not
/// within 20 s.
fn wait_listening(ns: Option<&str>, uri: &str) -> bool {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let port = format!(":{MIG_PORT}");
    loop {
        let ready = match uri.strip_prefix("unix:") {
            Some(path) => Path::new(path).exists(),
            None => {
                let out = std::process::Command::new("ip")
                    .args(["netns", "exec", ns.unwrap(), "ss", "-ltnH"])
                    .output()
                    .unwrap();
                String::from_utf8_lossy(&out.stdout).contains(&port)
            }
        };
        if ready {
            return true;
        }
        if std::time::Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// boot -> snapshot -> restore (map) -> snapshot -> restore (copy) ->
/// migrate A->B -> migrate B->A -> snapshot -> restore, verifying at every
/// step; with hosts, the client's echoes are answered by every VM of the
/// chain.
fn chain(vcpus: &str, hosts: Option<&TwoHosts>, vhost_user: bool) {
    let dir = TempDir::new("verifychain");
    let (sock_a, sock_b) = (dir.join("a.vu"), dir.join("b.vu"));
    let _backends = match (hosts, vhost_user) {
        (Some(h), true) => Some((
            NetBackend::start_in(&h.ns_a(), "gwtap0", &sock_a, &[]),
            NetBackend::start_in(&h.ns_b(), "gwtap0", &sock_b, &[]),
        )),
        _ => None,
    };
    let place = Place {
        hosts,
        vhost_user: vhost_user.then(|| (sock_a.clone(), sock_b.clone())),
    };
    let api = dir.join("api.sock");
    let client = hosts.map(|h| {
        EchoClient::start(
            &h.ns_c(),
            format!("{}:7", h.guest_ip()),
            Duration::from_millis(50),
        )
    });
    // (step, from, to): each VM answered while it was verified running.
    let mut windows = Vec::new();
    let live = |vm: &mut RunningVm, what: &'static str, windows: &mut Vec<_>| {
        let from = std::time::Instant::now();
        heartbeats(vm, 5);
        windows.push((what, from, std::time::Instant::now()));
    };

    let mut vm = place.boot(&api, vcpus);
    full_round_without_mismatch(&mut vm, "boot");
    live(&mut vm, "boot", &mut windows);
    let end = stop_save_quit(&mut vm, &api, &dir.join("s1"));

    let mut vm = place.restore(&dir.join("s1"), &api, "map");
    continues(&mut vm, &end, "restore (map)");
    live(&mut vm, "restore (map)", &mut windows);
    let end = stop_save_quit(&mut vm, &api, &dir.join("s2"));

    let mut vm = place.restore(&dir.join("s2"), &api, "copy");
    continues(&mut vm, &end, "restore (copy)");
    live(&mut vm, "restore (copy)", &mut windows);
    let (mut b, b_api) = place.migrate(&mut vm, &api, dir.path(), "a-to-b", true);
    live(&mut b, "migrated to B", &mut windows);
    let (mut a, a_api) = place.migrate(&mut b, &b_api, dir.path(), "b-to-a", false);
    live(&mut a, "migrated back to A", &mut windows);
    let end = stop_save_quit(&mut a, &a_api, &dir.join("s3"));

    let mut vm = place.restore(&dir.join("s3"), &api, "map");
    continues(&mut vm, &end, "the last restore");
    live(&mut vm, "the last restore", &mut windows);
    quit(&mut vm, &api);

    if let Some(client) = client {
        let (sent, replies) = client.finish();
        for (what, from, to) in windows {
            let n = replies.iter().filter(|t| **t >= from && **t <= to).count();
            assert!(
                n >= 5,
                "{what}: {n} echo replies while it ran ({} of {sent} in all)",
                replies.len()
            );
        }
    }
}

#[test]
fn a_chain_of_snapshots_restores_and_migrations_loses_nothing_one_vcpu() {
    chain("1", None, false);
}

#[test]
fn a_chain_of_snapshots_restores_and_migrations_loses_nothing_two_vcpus() {
    chain("2", None, false);
}

#[test]
fn a_chain_over_taps_between_two_hosts_loses_nothing_and_keeps_echoing_one_vcpu() {
    let hosts = TwoHosts::new(164, true, true);
    chain("1", Some(&hosts), false);
}

#[test]
fn a_chain_over_taps_between_two_hosts_loses_nothing_and_keeps_echoing_two_vcpus() {
    let hosts = TwoHosts::new(165, true, true);
    chain("2", Some(&hosts), false);
}

#[test]
fn a_chain_over_godwits_vhost_user_backend_loses_nothing_and_keeps_echoing_one_vcpu() {
    let hosts = TwoHosts::new(166, true, true);
    chain("1", Some(&hosts), true);
}

#[test]
fn a_chain_over_godwits_vhost_user_backend_loses_nothing_and_keeps_echoing_two_vcpus() {
    let hosts = TwoHosts::new(167, true, true);
    chain("2", Some(&hosts), true);
}
