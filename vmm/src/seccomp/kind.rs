//! The kinds of thread, one filter each. A file of its own because the
//! build script compiles the filters too (see `build.rs`).

/// The kinds of thread godwit runs, one filter each.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ThreadKind {
    /// The main thread of `godwit run` while it builds, restores or receives
    /// the VM (an incoming migration is read here).
    Main,
    /// The main thread once the VM runs: it waits for the end and tears down.
    MainLoop,
    Vcpu,
    NetDatapath,
    NetCtrl,
    VhostUserMonitor,
    Console,
    TapNamespace,
    SerialStdin,
    ApiAccept,
    ApiReader,
    ApiWriter,
    MigrationSource,
    /// The thread that turns SIGTERM / SIGINT into an orderly shutdown.
    Signals,
    /// `godwit net-backend` (the vhost-user daemon's threads inherit it).
    NetBackend,
}

impl ThreadKind {
    pub const ALL: [ThreadKind; 15] = [
        ThreadKind::Main,
        ThreadKind::MainLoop,
        ThreadKind::Vcpu,
        ThreadKind::NetDatapath,
        ThreadKind::NetCtrl,
        ThreadKind::VhostUserMonitor,
        ThreadKind::Console,
        ThreadKind::TapNamespace,
        ThreadKind::SerialStdin,
        ThreadKind::ApiAccept,
        ThreadKind::ApiReader,
        ThreadKind::ApiWriter,
        ThreadKind::MigrationSource,
        ThreadKind::Signals,
        ThreadKind::NetBackend,
    ];

    /// The name the SIGSYS message and the test hook use.
    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Main => "main",
            ThreadKind::MainLoop => "main-loop",
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::NetDatapath => "net-datapath",
            ThreadKind::NetCtrl => "net-ctrl",
            ThreadKind::VhostUserMonitor => "vhost-user-monitor",
            ThreadKind::Console => "console",
            ThreadKind::TapNamespace => "tap-namespace",
            ThreadKind::SerialStdin => "serial-stdin",
            ThreadKind::ApiAccept => "api-accept",
            ThreadKind::ApiReader => "api-reader",
            ThreadKind::ApiWriter => "api-writer",
            ThreadKind::MigrationSource => "migration-source",
            ThreadKind::Signals => "signals",
            ThreadKind::NetBackend => "net-backend",
        }
    }
}
