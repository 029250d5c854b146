//! Several "hosts" on one machine, sharing one spool the way NFS clients do.
//!
//! ```text
//!   netns <tag>br:  br0 10.231.0.1/24 ── v1 ── eth0 10.231.0.11  netns <tag>h1: spoold --host-id host1
//!   (the test's            │          ── v2 ── eth0 10.231.0.12  netns <tag>h2: spoold --host-id host2
//!    HTTP clients)         └───────── ── v3 ── eth0 10.231.0.13  netns <tag>h3: spoold --host-id host3
//!
//!   <dir>/backing/spool   the one real directory (the "NFS server's disk")
//!   <dir>/mnt/hostN       a bindfs (FUSE) mount of <dir>/backing per host, with
//!                         attr/entry/negative caching: stale stats and lookups
//!                         for a second, and no inotify for the other mounts' writes
//! ```
//!
//! Every address lives only in namespaces made here (the bridge has no
//! uplink), so the same subnet serves every cluster. The test process reaches
//! the hosts from the bridge's namespace: [`Cluster::connect`] opens each
//! socket on a short-lived thread that entered that namespace with setns(2),
//! and the socket stays there. FUSE daemons and spoolds are started with
//! `nsenter --net=` (not `ip netns exec`, whose private mount namespace would
//! hide the mounts). Names come from IP addresses, so nothing needs
//! `/etc/netns/<ns>/hosts`.
//!
//! Everything is torn down on drop, also after a panic: spoolds and the
//! handler groups they left, the mounts (lazily), the FUSE daemons, the
//! namespaces. A cluster left behind by a test process that was killed is
//! swept by the next one (its names carry the dead process's pid).
#![allow(dead_code)]

use std::fs;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::{self, Resp, Sse};

pub const BIN: &str = env!("CARGO_BIN_EXE_spoold");
const SUBNET: [u8; 3] = [10, 231, 0];
const PORT: u16 = 8080;
const FUSE_SUPER_MAGIC: i64 = 0x6573_5546;
/// NFS-like client caching on every mount: attributes and positive lookups
/// are trusted for this long (NFS `actimeo=1`). Negative lookups are not
/// cached by default (NFS `lookupcache=positive`, which deploy/nfs.md asks
/// for): a cached "no such file" hides another host's first `status.json`
/// of an event for that long, so followers miss its progress, and a host
/// claiming a retry within it would start the attempt count and `seq` anew.
/// [`ClusterBuilder::negative_cache`] turns it on.
pub const CACHE_SECS: u32 = 1;
/// The multihost tests' own settings on top of [`common::FAST_CONFIG`].
pub const MULTIHOST_CONFIG: &str = r#"
shared_rescan_interval = "200ms"
lease_ttl = "3s"
concurrency = 4
pass_env = ["MH_HOST", "MH_RUNS", "MH_GATES"]
"#;

/// The fixture handler `work`. Payload keys (all optional): `steps` (that
/// many 0.1 s steps, each writing progress.json through the host's mount with
/// the wall-clock time in its message), `gate` (wait for the test's
/// `go-<id>` file first), `flaky` (exit 75 on attempt 1). It appends
/// `start|fail|done <id> <host> <attempt> <ns>` to `$MH_RUNS`, a file on the
/// backing disk outside every mount (O_APPEND, one write per line): the
/// test's record of what really ran. The result goes to stdout *before* the
/// `done` line: if its spoold died, the write fails (SIGPIPE) and no `done`
/// is claimed for a run whose spoold could not record it.
pub const WORK: &str = r#"#!/bin/sh
payload=$(cat)
num() { printf '%s' "$payload" | sed -n "s/.*\"$1\": *\([0-9][0-9]*\).*/\1/p"; }
echo "start $SPOOL_ID $MH_HOST $SPOOL_ATTEMPT $(date +%s%N)" >> "$MH_RUNS"
case "$payload" in *'"gate"'*)
  n=0
  while [ ! -e "$MH_GATES/go-$SPOOL_ID" ] && [ "$n" -lt 3000 ]; do sleep 0.01; n=$((n+1)); done ;;
esac
steps=0
case "$payload" in *'"steps"'*) steps=$(num steps) ;; esac
i=0
while [ "$i" -lt "$steps" ]; do
  sleep 0.1
  i=$((i+1))
  printf '{"progress":%d,"message":"step %d t=%s"}' $((i*100/steps)) "$i" "$(date +%s%N)" > "progress.json.$$"
  mv -f "progress.json.$$" progress.json
done
case "$payload" in *'"flaky"'*)
  if [ "$SPOOL_ATTEMPT" = 1 ]; then
    echo "fail $SPOOL_ID $MH_HOST $SPOOL_ATTEMPT $(date +%s%N)" >> "$MH_RUNS"
    exit 75
  fi ;;
esac
echo "$SPOOL_ID $MH_HOST $SPOOL_ATTEMPT" || exit 1
echo "done $SPOOL_ID $MH_HOST $SPOOL_ATTEMPT $(date +%s%N)" >> "$MH_RUNS"
"#;

/// Why the multihost tests cannot run here, if they cannot. Under CI
/// (`CI=true`) a missing tool fails the test instead of skipping it.
pub fn preflight(needs_faketime: bool) -> Option<String> {
    let mut missing = Vec::new();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        missing.push("root (network namespaces and FUSE mounts)".to_owned());
    }
    for tool in ["ip", "nsenter", "bindfs", "fusermount"] {
        if which(tool).is_none() {
            missing.push(format!("`{tool}`"));
        }
    }
    if !Path::new("/dev/fuse").exists() {
        missing.push("/dev/fuse".to_owned());
    }
    if needs_faketime && faketime_lib().is_none() {
        missing.push("libfaketime".to_owned());
    }
    let netns = Command::new("unshare")
        .args(["--net", "true"])
        .stderr(Stdio::null())
        .status();
    if !netns.is_ok_and(|s| s.success()) {
        missing.push("the right to make network namespaces (`unshare --net`)".to_owned());
    }
    if missing.is_empty() {
        return None;
    }
    let why = format!(
        "needs {} (Debian: apt-get install -y bindfs faketime iproute2 util-linux)",
        missing.join(", ")
    );
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("multihost test cannot run under CI: {why}");
    }
    Some(why)
}

fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    let found = path
        .split(':')
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"])
        .map(|d| Path::new(d).join(tool))
        .find(|p| p.is_file());
    found
}

/// The preloadable libfaketime (Debian's `libfaketime` package).
pub fn faketime_lib() -> Option<PathBuf> {
    [
        "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1",
        "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
        "/usr/lib/aarch64-linux-gnu/faketime/libfaketimeMT.so.1",
        "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
        "/usr/lib/faketime/libfaketimeMT.so.1",
        "/usr/lib/faketime/libfaketime.so.1",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
}

/// Runs `cmd`, panicking with its stderr when it fails.
fn run(cmd: &mut Command) {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn ip(args: &[&str]) {
    run(Command::new("ip").args(args));
}

/// One host: a network namespace, a mount of the shared spool, a spoold.
pub struct Host {
    pub name: String,
    pub ns: String,
    pub ip: Ipv4Addr,
    pub mount: PathBuf,
    pub log: PathBuf,
    config: PathBuf,
    env: Vec<(String, String)>,
    child: Option<Child>,
}

impl Host {
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((self.ip, PORT))
    }

    /// The spool as this host sees it (through its own mount).
    pub fn spool(&self) -> PathBuf {
        self.mount.join("spool")
    }

    pub fn pid(&self) -> Option<i32> {
        self.child.as_ref().map(|c| c.id() as i32)
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    pub fn log_text(&self) -> String {
        strip_ansi(&fs::read_to_string(&self.log).unwrap_or_default())
    }
}

pub struct ClusterBuilder {
    hosts: usize,
    attr_cache: u32,
    negative_cache: u32,
    config: String,
    host_config: Vec<(usize, String)>,
    host_env: Vec<(usize, String, String)>,
    handlers: Vec<(String, String)>,
}

/// A cluster of `hosts` hosts running [`WORK`] as handler `work`.
pub fn cluster(hosts: usize) -> ClusterBuilder {
    crate::common::remember_panics();
    ClusterBuilder {
        hosts,
        attr_cache: CACHE_SECS,
        negative_cache: 0,
        config: String::new(),
        host_config: Vec::new(),
        host_env: Vec::new(),
        handlers: vec![("work".into(), WORK.into())],
    }
}

impl ClusterBuilder {
    /// Config lines for every host (they override the defaults).
    pub fn config(mut self, toml: &str) -> Self {
        self.config.push_str(toml);
        self.config.push('\n');
        self
    }

    /// Config lines for host `n` (1-based) only.
    pub fn host_config(mut self, n: usize, toml: &str) -> Self {
        self.host_config.push((n, toml.into()));
        self
    }

    /// An environment variable for host `n`'s spoold only.
    pub fn host_env(mut self, n: usize, key: &str, value: &str) -> Self {
        self.host_env.push((n, key.into(), value.into()));
        self
    }

    /// Runs host `n`'s spoold with its wall clock `offset` off ("+3h",
    /// "-3h"): libfaketime on the realtime clock only, the way a host with a
    /// wrong clock on NFS behaves. The monotonic clock (timers) stays true;
    /// stat shows the file times the server set (`NO_FAKE_STAT`); and a
    /// "touch to now" (utimensat with no times, the lease heartbeat) is
    /// stamped by the filesystem's clock, as NFS does with SET_TO_SERVER_TIME:
    /// `FAKE_UTIME=1` keeps UTIME_NOW as it is, where by default libfaketime
    /// would turn it into the host's faked time.
    pub fn skewed_clock(self, n: usize, offset: &str) -> Self {
        let lib = faketime_lib().expect("libfaketime (checked by preflight)");
        self.host_env(n, "LD_PRELOAD", &lib.display().to_string())
            .host_env(n, "FAKETIME", offset)
            .host_env(n, "FAKETIME_DONT_FAKE_MONOTONIC", "1")
            .host_env(n, "NO_FAKE_STAT", "1")
            .host_env(n, "FAKE_UTIME", "1")
    }

    /// Caches attributes and positive lookups for `secs` on every mount
    /// (NFS `actimeo`); [`CACHE_SECS`] unless set.
    pub fn attr_cache(mut self, secs: u32) -> Self {
        self.attr_cache = secs;
        self
    }

    /// Caches negative lookups for `secs` on every mount (NFS's default
    /// `lookupcache=all`); see [`CACHE_SECS`].
    pub fn negative_cache(mut self, secs: u32) -> Self {
        self.negative_cache = secs;
        self
    }

    pub fn handler(mut self, name: &str, script: &str) -> Self {
        self.handlers.push((name.into(), script.into()));
        self
    }

    /// Builds the namespaces and mounts and starts every host's spoold.
    pub fn start(self) -> Cluster {
        sweep_leftovers();
        static SEQ: AtomicUsize = AtomicUsize::new(0);
        let tag = format!(
            "mh{}x{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let dir = tempfile::Builder::new()
            .prefix(&format!("spoold-{tag}-"))
            .tempdir()
            .expect("tempdir");
        let root = dir.path().canonicalize().unwrap();
        let backing = root.join("backing");
        let handlers = root.join("handlers");
        fs::create_dir_all(backing.join("spool")).unwrap();
        fs::create_dir_all(&handlers).unwrap();
        for (name, script) in &self.handlers {
            common::write_executable(&handlers.join(name), script);
        }
        let mut cl = Cluster {
            dir: Some(dir),
            root: root.clone(),
            spool: backing.join("spool"),
            backing,
            handlers,
            runs: root.join("runs.log"),
            hosts: Vec::new(),
            bridge_ns: format!("{tag}br"),
            tag,
            attr_cache: self.attr_cache,
            negative_cache: self.negative_cache,
            namespaces: Vec::new(),
            mounts: Vec::new(),
            fuse: Vec::new(),
        };
        fs::write(&cl.runs, b"").unwrap();
        cl.make_bridge();
        for n in 1..=self.hosts {
            let extra: String = self
                .host_config
                .iter()
                .filter(|(h, _)| *h == n)
                .map(|(_, t)| format!("{t}\n"))
                .collect();
            let config = merge_toml(&[common::FAST_CONFIG, MULTIHOST_CONFIG, &self.config, &extra]);
            let env = self
                .host_env
                .iter()
                .filter(|(h, _, _)| *h == n)
                .map(|(_, k, v)| (k.clone(), v.clone()))
                .collect();
            cl.add_host(n, &config, env);
        }
        for i in 0..cl.hosts.len() {
            cl.launch(i);
        }
        cl
    }
}

/// Later layers' keys replace earlier ones (TOML forbids repeating a key).
fn merge_toml(layers: &[&str]) -> String {
    let key = |l: &str| l.split('=').next().unwrap_or("").trim().to_owned();
    let lines: Vec<&str> = layers
        .iter()
        .flat_map(|l| l.lines())
        .filter(|l| l.contains('='))
        .collect();
    let mut out = String::new();
    for (i, line) in lines.iter().enumerate() {
        if !lines[i + 1..].iter().any(|l| key(l) == key(line)) {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

pub struct Cluster {
    /// Kept (not deleted) when `MH_KEEP` is set, to look at after a run.
    dir: Option<tempfile::TempDir>,
    pub root: PathBuf,
    /// The directory every mount shows.
    pub backing: PathBuf,
    /// `backing/spool`: the truth, as the NFS server would see it.
    pub spool: PathBuf,
    pub handlers: PathBuf,
    /// The handlers' record of every start and completed run.
    pub runs: PathBuf,
    pub hosts: Vec<Host>,
    bridge_ns: String,
    tag: String,
    attr_cache: u32,
    negative_cache: u32,
    namespaces: Vec<String>,
    mounts: Vec<PathBuf>,
    fuse: Vec<Child>,
}

impl Cluster {
    fn make_bridge(&mut self) {
        let br = self.bridge_ns.clone();
        self.add_netns(&br);
        ip(&["-n", &br, "link", "set", "lo", "up"]);
        ip(&["-n", &br, "link", "add", "br0", "type", "bridge"]);
        let addr = format!("{}.{}.{}.1/24", SUBNET[0], SUBNET[1], SUBNET[2]);
        ip(&["-n", &br, "addr", "add", &addr, "dev", "br0"]);
        ip(&["-n", &br, "link", "set", "br0", "up"]);
    }

    fn add_netns(&mut self, name: &str) {
        ip(&["netns", "add", name]);
        self.namespaces.push(name.to_owned());
    }

    fn add_host(&mut self, n: usize, config: &str, env: Vec<(String, String)>) {
        let name = format!("host{n}");
        let ns = format!("{}h{n}", self.tag);
        let ipaddr = Ipv4Addr::new(SUBNET[0], SUBNET[1], SUBNET[2], 10 + n as u8);
        self.add_netns(&ns);
        let (br, veth) = (self.bridge_ns.clone(), format!("v{n}"));
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        ip(&[
            "-n", &br, "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns,
        ]);
        ip(&["-n", &br, "link", "set", &veth, "master", "br0", "up"]);
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{ipaddr}/24"),
            "dev",
            "eth0",
        ]);
        ip(&["-n", &ns, "link", "set", "eth0", "up"]);

        let mount = self.root.join("mnt").join(&name);
        fs::create_dir_all(&mount).unwrap();
        self.mount_fuse(&ns, &mount);

        let config_path = self.root.join(format!("{name}.toml"));
        fs::write(&config_path, config).unwrap();
        let mut env = env;
        env.extend([
            ("MH_HOST".to_owned(), name.clone()),
            ("MH_RUNS".to_owned(), self.runs.display().to_string()),
            ("MH_GATES".to_owned(), self.root.display().to_string()),
        ]);
        self.hosts.push(Host {
            log: self.root.join(format!("{name}.log")),
            name,
            ns,
            ip: ipaddr,
            mount,
            config: config_path,
            env,
            child: None,
        });
    }

    /// A bindfs mount of the backing directory, its daemon in namespace `ns`.
    fn mount_fuse(&mut self, ns: &str, mount: &Path) {
        let opts = format!(
            "attr_timeout={0},entry_timeout={0},negative_timeout={1},direct_io",
            self.attr_cache, self.negative_cache
        );
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{ns}"))
            .args(["bindfs", "-f", "-o", &opts])
            .arg(&self.backing)
            .arg(mount)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start bindfs");
        self.fuse.push(child);
        self.mounts.push(mount.to_owned());
        let deadline = Instant::now() + Duration::from_secs(10);
        while fs_type(mount) != Some(FUSE_SUPER_MAGIC) {
            assert!(
                Instant::now() < deadline,
                "bindfs did not mount {}",
                mount.display()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Starts host `i`'s spoold (0-based) and waits until it listens.
    fn launch(&mut self, i: usize) {
        let h = &mut self.hosts[i];
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&h.log)
            .unwrap();
        let mut child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", h.ns))
            .arg(BIN)
            .arg("serve")
            .arg("--spool")
            .arg(h.spool())
            .arg("--handlers")
            .arg(&self.handlers)
            .arg("--listen")
            .arg(h.addr().to_string())
            .arg("--config")
            .arg(&h.config)
            .args(["--host-id", &h.name, "--shared", "--insecure"])
            .env("RUST_LOG", "spoold=debug")
            .env("NO_COLOR", "1")
            .envs(h.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("start spoold");
        if common::listening_addr(&mut child, Duration::from_secs(20)).is_none() {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{}'s spoold did not start; its log:\n{}",
                h.name,
                h.log_text()
            );
        }
        h.child = Some(child);
    }

    pub fn host(&self, n: usize) -> &Host {
        &self.hosts[n - 1]
    }

    /// Starts host `n`'s spoold again (it must have been stopped or killed).
    pub fn restart(&mut self, n: usize) {
        assert!(!self.hosts[n - 1].is_running(), "host{n} is still running");
        self.launch(n - 1);
    }

    /// kill -9 of host `n`'s spoold; its handlers are left running, as after
    /// a crash. Returns when the process is gone.
    pub fn kill9(&mut self, n: usize) {
        if let Some(mut c) = self.hosts[n - 1].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM to host `n`'s spoold; waits for it to exit (at most 20 s).
    pub fn stop(&mut self, n: usize) {
        let Some(mut c) = self.hosts[n - 1].child.take() else {
            return;
        };
        // SAFETY: kill(2) on the pid of a child we own and have not reaped.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        while c.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                panic!("host{n}'s spoold did not stop within 20 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stops every running spoold gracefully.
    pub fn stop_all(&mut self) {
        for n in 1..=self.hosts.len() {
            self.stop(n);
        }
    }

    /// Sends `sig` to host `n`'s spoold and to every handler group it runs
    /// (as a frozen VM would: SIGSTOP, then SIGCONT).
    pub fn signal_host(&self, n: usize, sig: i32) {
        let h = &self.hosts[n - 1];
        for pgid in self.handler_groups(&h.name) {
            // SAFETY: kill(2) on a process group a spoold of this test started.
            unsafe { libc::kill(-pgid, sig) };
        }
        if let Some(pid) = h.pid() {
            // SAFETY: kill(2) on a child we own.
            unsafe { libc::kill(pid, sig) };
        }
    }

    /// The process groups of the handlers host `name` runs (or left), from
    /// its process marks in `hosts/<host>/`.
    pub fn handler_groups(&self, name: &str) -> Vec<i32> {
        common::names(&self.spool.join("hosts").join(name))
            .iter()
            .filter_map(|f| fs::read(self.spool.join("hosts").join(name).join(f)).ok())
            .filter_map(|b| serde_json::from_slice::<Value>(&b).ok())
            .filter_map(|v| v["pid"].as_i64())
            .map(|p| p as i32)
            .filter(|&p| p > 1)
            .collect()
    }

    /// Takes host `n`'s network link down (its HTTP stops; its mount lives) or up.
    pub fn set_link(&self, n: usize, up: bool) {
        let h = &self.hosts[n - 1];
        ip(&[
            "-n",
            &h.ns,
            "link",
            "set",
            "eth0",
            if up { "up" } else { "down" },
        ]);
    }

    /// A TCP connection to host `n` from the bridge's namespace.
    pub fn connect(&self, n: usize, timeout: Duration) -> std::io::Result<TcpStream> {
        let ns = PathBuf::from(format!("/run/netns/{}", self.bridge_ns));
        let addr = self.hosts[n - 1].addr();
        std::thread::spawn(move || {
            let f = fs::File::open(&ns)?;
            // SAFETY: setns on this (short-lived) thread only, with an open
            // namespace file; the socket made next stays in that namespace.
            if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            TcpStream::connect_timeout(&addr, timeout)
        })
        .join()
        .expect("connect thread")
    }

    /// One HTTP/1.1 request to host `n` (Connection: close); Err when the
    /// host cannot be reached.
    pub fn try_request(
        &self,
        n: usize,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> std::io::Result<Resp> {
        let mut sock = self.connect(n, Duration::from_secs(2))?;
        sock.set_read_timeout(Some(Duration::from_secs(60)))?;
        let mut raw = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n",
            self.hosts[n - 1].addr()
        );
        for (k, v) in headers {
            raw.push_str(&format!("{k}: {v}\r\n"));
        }
        if !body.is_empty() || method == "POST" {
            raw.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        raw.push_str("\r\n");
        let mut bytes = raw.into_bytes();
        bytes.extend_from_slice(body);
        sock.write_all(&bytes)?;
        let mut got = Vec::new();
        sock.read_to_end(&mut got)?;
        common::parse_response(&got).ok_or_else(|| {
            std::io::Error::other(format!(
                "unparsable response: {:?}",
                String::from_utf8_lossy(&got)
            ))
        })
    }

    pub fn request(&self, n: usize, method: &str, path: &str, body: &[u8]) -> Resp {
        let headers: &[(&str, &str)] = if method == "POST" {
            &[("content-type", "application/json")]
        } else {
            &[]
        };
        self.try_request(n, method, path, headers, body)
            .unwrap_or_else(|e| panic!("{method} {path} on host{n}: {e}"))
    }

    /// Submits a `work` event through host `n`; returns its ID (asserting 202).
    pub fn submit(&self, n: usize, payload: &str) -> String {
        let r = self.request(n, "POST", "/events/work", payload.as_bytes());
        assert_eq!(r.status, 202, "submit on host{n}: {}", r.text());
        r.json()["id"].as_str().unwrap().to_owned()
    }

    /// Submits `n` events from 6 client threads at once, event `i` to host
    /// `i % hosts + 1`; returns their IDs in that order.
    pub fn submit_spread(&self, n: usize, hosts: usize, payload: &str) -> Vec<String> {
        std::thread::scope(|s| {
            let clients: Vec<_> = (0..6)
                .map(|t| {
                    s.spawn(move || {
                        (t..n)
                            .step_by(6)
                            .map(|i| (i, self.submit(i % hosts + 1, payload)))
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            let mut ids: Vec<(usize, String)> = clients
                .into_iter()
                .flat_map(|c| c.join().unwrap())
                .collect();
            ids.sort();
            ids.into_iter().map(|(_, id)| id).collect()
        })
    }

    /// The status of `id` as host `n` serves it.
    pub fn status(&self, n: usize, id: &str) -> Value {
        let r = self.request(n, "GET", &format!("/events/{id}"), b"");
        assert_eq!(r.status, 200, "status of {id} on host{n}: {}", r.text());
        r.json()
    }

    /// An SSE stream of `id` on host `n`, opened the way a browser does.
    pub fn sse(&self, n: usize, id: &str) -> Sse {
        let sock = self
            .connect(n, Duration::from_secs(2))
            .unwrap_or_else(|e| panic!("connect to host{n}: {e}"));
        Sse::over(
            sock,
            &format!("/events/{id}/stream"),
            &[
                ("Cache-Control", "no-cache"),
                ("User-Agent", "Mozilla/5.0 (multihost test) EventSource"),
                ("Accept-Language", "en"),
            ],
        )
    }

    /// Opens the gate of a `{"gate":1}` event.
    pub fn open_gate(&self, id: &str) {
        fs::write(self.root.join(format!("go-{id}")), b"").unwrap();
    }

    /// The status of `id` on the backing disk (None before the first write).
    pub fn disk_status(&self, id: &str) -> Option<Value> {
        let bytes = fs::read(self.spool.join("events").join(id).join("status.json")).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Claims held by `host` right now (names in `running/<host>/`, on the backing disk).
    pub fn claims(&self, host: &str) -> Vec<String> {
        common::names(&self.spool.join("running").join(host))
    }

    /// Waits until every event in `ids` has a final status on the backing
    /// disk; panics after `within` with the ones still open.
    pub fn wait_final(&self, ids: &[String], within: Duration) {
        let deadline = Instant::now() + within;
        let mut open: Vec<&String> = ids.iter().collect();
        loop {
            open.retain(|id| {
                !self
                    .disk_status(id)
                    .is_some_and(|s| is_terminal(common::state(&s)))
            });
            if open.is_empty() {
                return;
            }
            if Instant::now() > deadline {
                let sample: Vec<_> = open
                    .iter()
                    .take(5)
                    .map(|id| (id, self.disk_status(id)))
                    .collect();
                panic!(
                    "{} of {} events not final within {within:?}; e.g. {sample:#?}",
                    open.len(),
                    ids.len()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Polls `cond` every 10 ms until it returns Some; panics after `within`.
    pub fn wait_for<T>(
        &self,
        within: Duration,
        what: &str,
        mut cond: impl FnMut() -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + within;
        loop {
            if let Some(v) = cond() {
                return v;
            }
            if Instant::now() > deadline {
                panic!("timed out after {within:?} waiting for: {what}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Log lines of every host containing `needle`.
    pub fn log_lines(&self, needle: &str) -> Vec<(String, String)> {
        self.hosts
            .iter()
            .flat_map(|h| {
                h.log_text()
                    .lines()
                    .filter(|l| l.contains(needle))
                    .map(|l| (h.name.clone(), l.to_owned()))
                    .collect::<Vec<_>>()
            })
            .collect()
    }
}

pub fn is_terminal(state: &str) -> bool {
    matches!(state, "succeeded" | "failed" | "timed_out" | "cancelled")
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn fs_type(path: &Path) -> Option<i64> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: statfs writes into a zeroed struct we own; c is NUL-terminated.
    let mut buf: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut buf) } != 0 {
        return None;
    }
    #[allow(clippy::unnecessary_cast)]
    Some(buf.f_type as i64)
}

fn unmount(path: &Path) {
    // Lazy: a handler left with its cwd in the mount must not keep it alive.
    let _ = Command::new("fusermount")
        .arg("-u")
        .arg("-z")
        .arg(path)
        .stderr(Stdio::null())
        .status();
    if fs_type(path) == Some(FUSE_SUPER_MAGIC) {
        let _ = Command::new("umount").arg("-l").arg(path).status();
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for h in &self.hosts {
                let text = h.log_text();
                let tail = &text[text.len().saturating_sub(6000)..];
                let tail = tail.get(tail.find('\n').unwrap_or(0)..).unwrap_or(tail);
                eprintln!("---- {} log ({}) ----{tail}", h.name, h.log.display());
            }
            crate::common::say_failure_again();
        }
        for h in &mut self.hosts {
            if let Some(mut c) = h.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        let names: Vec<String> = self.hosts.iter().map(|h| h.name.clone()).collect();
        for name in names {
            for pgid in self.handler_groups(&name) {
                // SAFETY: kill(2) on a group a spoold of this test started.
                unsafe { libc::kill(-pgid, libc::SIGKILL) };
            }
        }
        for m in &self.mounts {
            unmount(m);
        }
        for c in &mut self.fuse {
            let _ = c.kill();
            let _ = c.wait();
        }
        for ns in &self.namespaces {
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
        }
        if std::env::var_os("MH_KEEP").is_some() {
            if let Some(dir) = self.dir.take() {
                eprintln!("kept {}", dir.keep().display());
            }
        }
    }
}

/// Removes namespaces and mounts left by multihost test processes that died
/// without tearing down (their names carry their pid).
fn sweep_leftovers() {
    let dead = |name: &str| -> bool {
        let Some(rest) = name.strip_prefix("mh") else {
            return false;
        };
        let pid: String = rest.chars().take_while(char::is_ascii_digit).collect();
        !pid.is_empty()
            && rest[pid.len()..].starts_with('x')
            && !Path::new(&format!("/proc/{pid}")).exists()
    };
    if let Ok(mounts) = fs::read_to_string("/proc/self/mounts") {
        for mp in mounts.lines().filter_map(|l| l.split(' ').nth(1)) {
            let leftover = mp
                .split('/')
                .filter_map(|part| part.strip_prefix("spoold-"))
                .any(|rest| dead(rest.split('-').next().unwrap_or("")));
            if leftover {
                unmount(Path::new(mp));
            }
        }
    }
    for entry in fs::read_dir("/run/netns").into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if dead(&name) {
            let _ = Command::new("ip").args(["netns", "del", &name]).status();
        }
    }
    for entry in fs::read_dir(std::env::temp_dir())
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = entry.file_name().to_string_lossy().into_owned();
        let tag = name
            .strip_prefix("spoold-")
            .and_then(|r| r.split('-').next());
        let mounted = common::names(&entry.path().join("mnt"))
            .iter()
            .any(|m| fs_type(&entry.path().join("mnt").join(m)) == Some(FUSE_SUPER_MAGIC));
        if tag.is_some_and(dead) && !mounted {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}
