//! Live migration over mutual TLS 1.3 between two namespace hosts: the
//! certificates are made here (rcgen), in QEMU's tls-creds-x509 layout.
//! Each way of being refused leaves the source running; a guest's memory
//! crosses the veth unreadable under TLS and readable over plain tcp:.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};

use godwit_tests::guest::spawn_serving;
use godwit_tests::migrate::wait_migration;
use godwit_tests::tls_creds::{write_creds, Ca, Creds, SERVER_NAME};
use godwit_tests::{
    qmp_connect, run_godwit, serve_cmdline, wait_listening, QmpClient, RunningVm, TempDir,
    TwoHosts, BOOT,
};

const PORT: u16 = 4444;
/// The verifying guest's buffer: 4 MiB, rewritten at 256 pages/s.
const VERIFY: &str = "godwit.verify=4M";

struct Source {
    vm: RunningVm,
    qmp: QmpClient,
    /// Guest address and page count of the verify buffer.
    buffer: (u64, u64),
}

fn start_source(hosts: &TwoHosts, dir: &TempDir) -> Source {
    let api = dir.join("a.sock");
    let cmdline = serve_cmdline(200, &format!("{} {VERIFY}", hosts.guest_ip_param()));
    let mut vm = spawn_serving(
        Some(&hosts.ns_a()),
        &[],
        "tap,ifname=gwtap0",
        &cmdline,
        Some(&api),
    );
    let line = vm
        .seen
        .iter()
        .find(|l| l.starts_with("serve: verify buffer="))
        .cloned()
        .expect("the guest reports its verify buffer");
    let field = |key: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .unwrap_or_else(|| panic!("{key} in {line:?}"))
            .to_string()
    };
    let gpa = u64::from_str_radix(field("buffer=0x").as_str(), 16).unwrap();
    let pages = field("pages=").parse().unwrap();
    vm.wait_prefix("heartbeat ", BOOT);
    let qmp = qmp_connect(&api);
    Source {
        vm,
        qmp,
        buffer: (gpa, pages),
    }
}

fn start_destination(hosts: &TwoHosts, scheme: &str, tls_dir: Option<&Path>) -> RunningVm {
    start_destination_with(hosts, scheme, tls_dir, None)
}

/// [`start_destination`], serving its API on `api` when given.
fn start_destination_with(
    hosts: &TwoHosts,
    scheme: &str,
    tls_dir: Option<&Path>,
    api: Option<&Path>,
) -> RunningVm {
    let uri = format!("{scheme}:{}:{PORT}", hosts.addr_b());
    let mut args = vec!["run", "--incoming", &uri, "--net", "tap,ifname=gwtap0"];
    let (dir, api) = (
        tls_dir.map(|d| d.display().to_string()),
        api.map(|a| a.display().to_string()),
    );
    if let Some(d) = &dir {
        args.extend(["--tls-dir", d.as_str()]);
    }
    if let Some(a) = &api {
        args.extend(["--api-socket", a.as_str()]);
    }
    let vm = RunningVm::spawn_in(&hosts.ns_b(), &args);
    wait_listening(&hosts.ns_b(), PORT);
    vm
}

/// Sets the source's TLS parameters and migrates to host B over `scheme`;
/// returns the final query-migrate.
fn migrate(src: &mut Source, hosts: &TwoHosts, scheme: &str, params: Value) -> Value {
    src.qmp.execute("migrate-set-parameters", params).unwrap();
    src.qmp
        .execute(
            "migrate",
            json!({"uri": format!("{scheme}:{}:{PORT}", hosts.addr_b())}),
        )
        .unwrap();
    wait_migration(&mut src.qmp, Duration::from_secs(120))
}

/// A refused migration: the source says `source_says`, the destination
/// exits with an error that says `destination_says`, and the guest on the
/// source keeps running and beating.
fn assert_refused(
    src: &mut Source,
    mut dst: RunningVm,
    info: &Value,
    source_says: &str,
    destination_says: &str,
) {
    assert_eq!(info["status"], "failed", "{info}");
    let error = info["error"].as_str().unwrap_or_default();
    assert!(error.contains(source_says), "source error: {error}");
    let (status, stderr) = dst.wait_exit(Duration::from_secs(30));
    assert_ne!(status.code(), Some(0), "destination: {stderr}");
    assert!(
        stderr.contains(destination_says),
        "destination error should say {destination_says:?}: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(
        src.qmp.execute("query-status", Value::Null).unwrap()["status"],
        "running"
    );
    let last = src.vm.last_heartbeat();
    src.vm
        .wait_prefix(&format!("heartbeat {}", last + 2), Duration::from_secs(20));
}

/// The destination's verify verdicts: a full pass over the buffer with no
/// mismatch.
fn assert_nothing_lost(dst: &mut RunningVm) {
    let pages = |line: &str, key: &str| -> u64 {
        line.split_whitespace()
            .zip(line.split_whitespace().skip(1))
            .find_map(|(n, k)| {
                (k.trim_end_matches(',') == key)
                    .then(|| n.parse().ok())
                    .flatten()
            })
            .unwrap_or_else(|| panic!("{key} in {line:?}"))
    };
    let next = |dst: &mut RunningVm| {
        let line = dst.wait_prefix("verify: ", Duration::from_secs(30));
        assert!(
            !line.starts_with("verify: mismatch"),
            "the migrated guest found memory that is not what it wrote: {line}"
        );
        (
            pages(&line, "pages"),
            pages(&line, "checked"),
            pages(&line, "mismatches"),
        )
    };
    let (total, first_checked, _) = next(dst);
    loop {
        let (_, checked, mismatches) = next(dst);
        assert_eq!(mismatches, 0, "mismatches on the destination");
        if checked >= first_checked + total {
            break;
        }
    }
}

#[test]
fn mutual_tls_refuses_each_bad_peer_and_then_migrates_with_nothing_lost() {
    let hosts = TwoHosts::new(131, true, true);
    let dir = TempDir::new("migtls");
    let ca = Ca::new("godwit test CA");
    let other = Ca::new("another CA");
    let good = write_creds(
        &dir.join("good"),
        &hosts,
        Creds {
            trust: &ca,
            signer: &ca,
            expired: false,
        },
    );
    let foreign = write_creds(
        &dir.join("foreign"),
        &hosts,
        Creds {
            trust: &ca,
            signer: &other,
            expired: false,
        },
    );
    let untrusting = write_creds(
        &dir.join("untrusting"),
        &hosts,
        Creds {
            trust: &other,
            signer: &ca,
            expired: false,
        },
    );
    let expired = write_creds(
        &dir.join("expired"),
        &hosts,
        Creds {
            trust: &ca,
            signer: &ca,
            expired: true,
        },
    );
    let creds =
        |d: &Path, name: &str| json!({"tls-creds": d.display().to_string(), "tls-hostname": name});
    let mut src = start_source(&hosts, &dir);

    // Credentials are loaded when they are set, as QEMU loads a
    // tls-creds-x509 object: a directory that cannot serve is refused there,
    // naming the file, and the parameters stay as they were.
    let missing = dir.join("no-such-creds");
    let refused = src
        .qmp
        .execute("migrate-set-parameters", creds(&missing, ""))
        .unwrap_err()
        .to_string();
    assert!(
        refused.contains("Parameter 'tls-creds' is unusable") && refused.contains("ca-cert.pem"),
        "{refused}"
    );
    let params = src
        .qmp
        .execute("query-migrate-parameters", json!({}))
        .unwrap();
    assert_eq!(params["tls-creds"], "", "{params}");

    // A plaintext source at a TLS destination.
    let dst = start_destination(&hosts, "tls", Some(&good));
    let info = migrate(&mut src, &hosts, "tcp", json!({}));
    assert_refused(
        &mut src,
        dst,
        &info,
        "accepts only TLS",
        "does not speak TLS",
    );

    // A TLS source at a plaintext destination.
    let dst = start_destination(&hosts, "tcp", None);
    let info = migrate(&mut src, &hosts, "tls", creds(&good, ""));
    assert_refused(
        &mut src,
        dst,
        &info,
        "does not speak TLS",
        "speaks TLS but this destination listens on plaintext",
    );

    // The source's certificate is from another CA.
    let dst = start_destination(&hosts, "tls", Some(&good));
    let info = migrate(&mut src, &hosts, "tls", creds(&foreign, ""));
    assert_refused(
        &mut src,
        dst,
        &info,
        "refused this side's certificate: it is not signed by the peer's CA",
        "not signed by this side's CA",
    );

    // The destination's certificate is from a CA the source does not trust.
    let dst = start_destination(&hosts, "tls", Some(&good));
    let info = migrate(&mut src, &hosts, "tls", creds(&untrusting, ""));
    assert_refused(
        &mut src,
        dst,
        &info,
        "not signed by this side's CA",
        "refused this side's certificate: it is not signed by the peer's CA",
    );

    // The destination's certificate does not name the host asked for.
    let dst = start_destination(&hosts, "tls", Some(&good));
    let info = migrate(&mut src, &hosts, "tls", creds(&good, "wrong.godwit.test"));
    assert_refused(
        &mut src,
        dst,
        &info,
        "does not name the host",
        "does not name the host the source asked for",
    );

    // The destination's certificate expired.
    let dst = start_destination(&hosts, "tls", Some(&expired));
    let info = migrate(&mut src, &hosts, "tls", creds(&good, ""));
    assert_refused(
        &mut src,
        dst,
        &info,
        "certificate has expired",
        "refused this side's certificate: it has expired",
    );

    // The source's certificate expired.
    let dst = start_destination(&hosts, "tls", Some(&good));
    let info = migrate(&mut src, &hosts, "tls", creds(&expired, ""));
    assert_refused(
        &mut src,
        dst,
        &info,
        "refused this side's certificate: it has expired",
        "certificate has expired",
    );

    // migrate_cancel breaks off a TLS stream in the middle of pre-copy.
    let mut dst = start_destination(&hosts, "tls", Some(&good));
    let mut slow = creds(&good, SERVER_NAME);
    slow["max-bandwidth"] = json!(500_000);
    src.qmp.execute("migrate-set-parameters", slow).unwrap();
    src.qmp
        .execute(
            "migrate",
            json!({"uri": format!("tls:{}:{PORT}", hosts.addr_b())}),
        )
        .unwrap();
    std::thread::sleep(Duration::from_secs(1));
    src.qmp.execute("migrate_cancel", Value::Null).unwrap();
    let info = wait_migration(&mut src.qmp, Duration::from_secs(30));
    assert_eq!(info["status"], "cancelled", "{info}");
    let (status, _) = dst.wait_exit(Duration::from_secs(30));
    assert_ne!(
        status.code(),
        Some(0),
        "the destination discards what it received"
    );
    assert_eq!(
        src.qmp.execute("query-status", Value::Null).unwrap()["status"],
        "running"
    );

    // Then, with good credentials on both sides and the name in the
    // certificate, the guest moves with every page it wrote.
    let mut dst = start_destination(&hosts, "tls", Some(&good));
    let mut fast = creds(&good, SERVER_NAME);
    fast["max-bandwidth"] = json!(0);
    let info = migrate(&mut src, &hosts, "tls", fast);
    assert_eq!(info["status"], "completed", "{info}");
    let (status, stderr) = src.vm.wait_exit(Duration::from_secs(20));
    assert_eq!(status.code(), Some(0), "source: {stderr}");
    assert_nothing_lost(&mut dst);
}

/// tcpdump on host B's veth, writing the migration port's packets to a file.
struct Capture {
    child: Child,
    file: PathBuf,
}

impl Capture {
    fn start(ns: &str, file: PathBuf) -> Capture {
        let child = Command::new("ip")
            .args([
                "netns", "exec", ns, "tcpdump", "-i", "eth0", "-s", "0", "-U", "-w",
            ])
            .arg(&file)
            .args(["tcp", "port", &PORT.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run tcpdump (resources/install-deps.sh installs it)");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        // tcpdump creates the file once it listens.
        while !file.exists() {
            assert!(
                std::time::Instant::now() < deadline,
                "tcpdump never started"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_millis(300));
        Capture { child, file }
    }

    fn finish(mut self) -> Vec<u8> {
        std::thread::sleep(Duration::from_millis(500));
        // SAFETY: kill(2) on the tcpdump this test started; SIGINT makes it
        // flush and close its file.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let _ = self.child.wait();
        std::fs::read(&self.file).unwrap()
    }
}

/// The checksum words the verifying guest writes into its buffer pages for
/// generations 1 and 2 (resources/guest/verify.c): eight bytes that occur
/// nowhere else.
fn pattern_words((gpa, pages): (u64, u64)) -> Vec<[u8; 8]> {
    const SALT: u64 = 0x676f_6477_6974_7631;
    const WORDS: u64 = 4096 / 8;
    let mut out = Vec::new();
    for i in 0..pages {
        let page = gpa + i * 4096;
        for gen in 1..=2u64 {
            let word = |w: u64| (page + w * 8) | gen << 32;
            out.push((word(0) ^ word(WORDS / 2) ^ word(WORDS - 1) ^ SALT).to_le_bytes());
        }
    }
    out
}

fn occurrences(capture: &[u8], words: &[[u8; 8]]) -> usize {
    let set: std::collections::HashSet<[u8; 8]> = words.iter().copied().collect();
    capture
        .windows(8)
        .filter(|w| set.contains(<&[u8; 8]>::try_from(*w).unwrap()))
        .count()
}

/// Migrates over `scheme` with tcpdump on B's veth; returns how many of the
/// guest's pattern words the capture holds.
fn captured_pattern(subnet: u8, scheme: &str) -> usize {
    let hosts = TwoHosts::new(subnet, true, true);
    let dir = TempDir::new("migtlscap");
    let ca = Ca::new("godwit test CA");
    let creds = write_creds(
        &dir.join("creds"),
        &hosts,
        Creds {
            trust: &ca,
            signer: &ca,
            expired: false,
        },
    );
    let mut src = start_source(&hosts, &dir);
    // Let the guest write a good part of its buffer.
    std::thread::sleep(Duration::from_secs(3));
    let tls_dir = (scheme == "tls").then_some(creds.as_path());
    let dst_api = dir.join("b.sock");
    let mut dst = start_destination_with(&hosts, scheme, tls_dir, Some(&dst_api));
    let capture = Capture::start(&hosts.ns_b(), dir.join("mig.pcap"));
    src.qmp
        .execute(
            "migrate-set-parameters",
            json!({"tls-creds": creds.display().to_string()}),
        )
        .unwrap();
    // `godwit ctl migrate` ends with its one summary line.
    let uri = format!("{scheme}:{}:{PORT}", hosts.addr_b());
    let api = dir.join("a.sock");
    let ctl = run_godwit(
        &[
            "ctl",
            "--api-socket",
            api.to_str().unwrap(),
            "migrate",
            &uri,
        ],
        Duration::from_secs(120),
    );
    assert_eq!(ctl.code(), Some(0), "{ctl:?}");
    let summary = ctl.stdout.lines().last().unwrap_or_default().to_string();
    for part in [
        "migration completed: total time ",
        " ms, downtime ",
        " MiB sent in ",
        " rounds, ",
        " Mbit/s",
    ] {
        assert!(
            summary.contains(part),
            "{part:?} in the summary line {summary:?}; {ctl:?}"
        );
    }
    let bytes = capture.finish();
    assert!(
        bytes.len() > 1 << 20,
        "the capture holds the stream: {} bytes",
        bytes.len()
    );
    let _ = src.vm.wait_exit(Duration::from_secs(20));
    assert_nothing_lost(&mut dst);
    // The destination reports the incoming migration as QEMU does.
    let info = qmp_connect(&dst_api)
        .execute("query-migrate", Value::Null)
        .unwrap();
    assert_eq!(info["status"], "completed", "{info}");
    assert!(
        info["ram"]["transferred"].as_u64().unwrap() > 1 << 20,
        "{info}"
    );
    assert!(info["ram"]["normal"].as_u64().unwrap() > 0, "{info}");
    assert!(info["ram"]["total"].as_u64().unwrap() >= 64 << 20, "{info}");
    assert!(info["total-time"].as_u64().is_some(), "{info}");
    occurrences(&bytes, &pattern_words(src.buffer))
}

#[test]
fn guest_memory_is_unreadable_on_the_wire_under_tls_and_readable_in_plain_tcp() {
    let plain = captured_pattern(132, "tcp");
    assert!(
        plain >= 100,
        "the plaintext capture holds the guest's pattern: {plain} words"
    );
    let tls = captured_pattern(133, "tls");
    assert_eq!(
        tls, 0,
        "the TLS capture holds {tls} of the guest's pattern words"
    );
}
