//! A real Linux guest for the tests that need a real driver: Debian's cloud
//! kernel (downloaded and unpacked by resources/install-deps.sh, never
//! installed on the host), an initramfs built here from
//! Debian's busybox-static, the kernel's own modules and a small /init, and
//! QEMU (Debian's qemu-system-x86, TCG) to boot it, since a stock kernel
//! does not boot under this machine's emulated KVM in useful time.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

use crate::process::signal;

/// Where resources/install-deps.sh unpacks Debian's cloud kernel (never
/// installed on the host): `vmlinux`, `bzImage`, and the package's tree in
/// `root/` (boot/, lib/modules/). `GODWIT_CACHE` moves it, for both.
pub fn kernel_dir() -> PathBuf {
    let cache = std::env::var_os("GODWIT_CACHE").unwrap_or_else(|| "/var/cache/godwit".into());
    let dir = PathBuf::from(cache).join("debian-cloud-kernel");
    assert!(
        dir.join("vmlinux").is_file() && dir.join("root/boot").is_dir(),
        "Debian's cloud kernel is not in {}: run resources/install-deps.sh (as root), which downloads and unpacks it there",
        dir.display()
    );
    dir
}

/// Debian's cloud kernel, as resources/install-deps.sh unpacked it.
pub struct DebianKernel {
    pub release: String,
    pub vmlinuz: PathBuf,
    /// lib/modules/RELEASE.
    pub modules: PathBuf,
}

impl DebianKernel {
    pub fn from_cache() -> DebianKernel {
        let root = kernel_dir().join("root");
        let modules_root = root.join("lib/modules");
        let release = std::fs::read_dir(&modules_root)
            .unwrap_or_else(|e| panic!("{}: {e}", modules_root.display()))
            .filter_map(Result::ok)
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .next()
            .unwrap_or_else(|| panic!("{} is empty", modules_root.display()));
        let vmlinuz = root.join(format!("boot/vmlinuz-{release}"));
        assert!(
            vmlinuz.exists(),
            "{} is missing from the unpacked package",
            vmlinuz.display()
        );
        DebianKernel {
            modules: modules_root.join(&release),
            release,
            vmlinuz,
        }
    }

    /// `wanted` and every module they depend on, in an order `insmod` can
    /// load them: dependencies first. The kernel .deb carries no
    /// modules.dep (depmod makes it at install), so the dependencies come
    /// from each module's own `depends=` modinfo field.
    pub fn modules_in_load_order(&self, wanted: &[&str]) -> Vec<(String, PathBuf)> {
        let mut files = BTreeMap::new();
        index_modules(&self.modules.join("kernel"), &mut files);
        let mut order = Vec::new();
        for name in wanted {
            visit(name, &files, &mut order, &mut Vec::new());
        }
        order
            .into_iter()
            .map(|n| {
                let path = files[&n].clone();
                (n, path)
            })
            .collect()
    }
}

fn module_name(s: &str) -> String {
    s.replace('-', "_")
}

fn index_modules(dir: &Path, out: &mut BTreeMap<String, PathBuf>) {
    for entry in std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
    {
        let path = entry.path();
        if path.is_dir() {
            index_modules(&path, out);
        } else if let Some(n) = path.file_name().and_then(|n| n.to_str()) {
            if let Some(stem) = n.strip_suffix(".ko") {
                out.insert(module_name(stem), path);
            }
        }
    }
}

/// The `depends=` field of a module's .modinfo section.
fn depends(path: &Path) -> Vec<String> {
    let data = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let key = b"depends=";
    data.windows(key.len())
        .enumerate()
        .filter(|(i, w)| *w == key && (*i == 0 || data[i - 1] == 0))
        .map(|(i, _)| {
            let rest = &data[i + key.len()..];
            let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
            String::from_utf8_lossy(&rest[..end]).into_owned()
        })
        .next()
        .map(|list| {
            list.split(',')
                .filter(|s| !s.is_empty())
                .map(module_name)
                .collect()
        })
        .unwrap_or_default()
}

fn visit(
    name: &str,
    files: &BTreeMap<String, PathBuf>,
    order: &mut Vec<String>,
    path: &mut Vec<String>,
) {
    let name = module_name(name);
    if order.contains(&name) {
        return;
    }
    assert!(
        !path.contains(&name),
        "module dependency cycle: {path:?} -> {name}"
    );
    let file = files.get(&name).unwrap_or_else(|| {
        panic!("module {name} is not in the kernel .deb (built in, or renamed?)")
    });
    path.push(name.clone());
    for dep in depends(file) {
        visit(&dep, files, order, path);
    }
    path.pop();
    order.push(name);
}

/// A newc cpio archive (the initramfs format) built in memory.
#[derive(Default)]
pub struct Cpio {
    data: Vec<u8>,
    ino: u32,
}

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, body: &[u8]) {
        self.ino += 1;
        let nlink = if mode & 0o040000 != 0 { 2 } else { 1 };
        let fields = [
            self.ino,
            mode,
            0,
            0,
            nlink,
            0,
            body.len() as u32,
            0,
            0,
            0,
            0,
            name.len() as u32 + 1,
            0,
        ];
        self.data.extend_from_slice(b"070701");
        for f in fields {
            self.data.extend_from_slice(format!("{f:08X}").as_bytes());
        }
        self.data.extend_from_slice(name.as_bytes());
        self.data.push(0);
        self.pad();
        self.data.extend_from_slice(body);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.data.len().is_multiple_of(4) {
            self.data.push(0);
        }
    }

    pub fn dir(&mut self, name: &str) {
        self.entry(name, 0o040755, &[]);
    }

    pub fn file(&mut self, name: &str, mode: u32, body: &[u8]) {
        self.entry(name, 0o100000 | mode, body);
    }

    pub fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, &[]);
        self.data
    }
}

/// Debian's busybox-static, the initramfs's only program.
pub const BUSYBOX: &str = "/bin/busybox";

/// An initramfs with busybox, `modules` (loaded by /init in this order,
/// before `script`) and an /init that then runs `script` (busybox sh).
pub fn initramfs(modules: &[(String, PathBuf)], script: &str) -> Vec<u8> {
    let busybox = std::fs::read(BUSYBOX).unwrap_or_else(|e| {
        panic!("{BUSYBOX}: {e}: install Debian's busybox-static (resources/install-deps.sh)")
    });
    let mut cpio = Cpio::default();
    for d in ["bin", "sbin", "dev", "proc", "sys", "tmp", "modules"] {
        cpio.dir(d);
    }
    cpio.file("bin/busybox", 0o755, &busybox);
    let mut init = String::from(
        "#!/bin/busybox sh\n\
         /bin/busybox --install -s /bin\n\
         mount -t proc proc /proc\n\
         mount -t sysfs sysfs /sys\n\
         mount -t devtmpfs devtmpfs /dev\n",
    );
    for (name, path) in modules {
        let body = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        cpio.file(&format!("modules/{name}.ko"), 0o644, &body);
        init.push_str(&format!(
            "insmod /modules/{name}.ko || echo \"GW-INSMOD-FAILED {name}\"\n"
        ));
    }
    init.push_str(script);
    init.push_str("\npoweroff -f\n");
    cpio.file("init", 0o755, init.as_bytes());
    cpio.finish()
}

/// A QEMU process whose serial console (its stdout) is read line by line;
/// killed on drop.
pub struct Qemu {
    child: Child,
    lines: Receiver<String>,
    pub seen: Vec<String>,
}

impl Qemu {
    /// Runs `qemu-system-x86_64 ARGS`, stdout and stderr both read as
    /// console lines.
    pub fn spawn(args: &[String]) -> Qemu {
        let mut child = Command::new("qemu-system-x86_64")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect(
                "spawn qemu-system-x86_64 (Debian's qemu-system-x86: resources/install-deps.sh)",
            );
        let (tx, lines) = mpsc::channel();
        let out = child.stdout.take().expect("stdout");
        let err = child.stderr.take().expect("stderr");
        let tx2 = tx.clone();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(l);
            }
        });
        std::thread::spawn(move || {
            for l in BufReader::new(err).lines().map_while(Result::ok) {
                let _ = tx2.send(format!("qemu stderr: {l}"));
            }
        });
        Qemu {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// The first new line that contains `needle`; fails the test with the
    /// console so far when none comes within `timeout`.
    pub fn wait_line(&mut self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(_) => panic!(
                    "no console line containing {needle:?} within {timeout:?}; console so far:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        signal(&self.child, libc::SIGKILL);
        let _ = self.child.wait();
    }
}
