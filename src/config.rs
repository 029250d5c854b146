//! Configuration in two steps: command-line arguments (clap) and an optional
//! TOML file are merged into one validated [`Settings`]; every stage gets an
//! `Arc<Settings>` and never sees clap types.
//!
//! Precedence: built-in defaults < `--config FILE` < command-line flags.
//! Every option is documented in `docs/configuration.md`.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use serde::Deserialize;

use crate::auth::Tokens;

#[derive(Parser, Debug)]
#[command(
    name = "spoold",
    version,
    about = "An event processor on a file spool: drop an event, a handler runs it, poll or stream its progress."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// More log output (-v debug, -vv trace); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    /// Log as JSON lines instead of text.
    #[arg(long, global = true)]
    pub log_json: bool,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Watch the spool, run handlers and serve the HTTP API.
    Serve(ServeArgs),
    /// Submit an event and print its ID (or, with --wait, follow it and print its result).
    Submit(SubmitArgs),
    /// Print the status of an event as JSON.
    Status(StatusArgs),
    /// For handlers: report progress (replaces $SPOOL_PROGRESS atomically).
    Report(ReportArgs),
}

#[derive(Args, Debug, Default)]
pub struct ServeArgs {
    /// The spool directory [default: ./spool]
    #[arg(long, env = "SPOOLD_SPOOL")]
    pub spool: Option<PathBuf>,
    /// The directory of handler executables [default: ./handlers]
    #[arg(long, env = "SPOOLD_HANDLERS")]
    pub handlers: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:8080]
    #[arg(long, env = "SPOOLD_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// A TOML file with any of the settings in docs/configuration.md
    #[arg(long, env = "SPOOLD_CONFIG")]
    pub config: Option<PathBuf>,
    /// Treat the spool as shared with other hosts (default: detected for NFS and FUSE)
    #[arg(long)]
    pub shared: bool,
    /// This host's name in running/<host>/ and in statuses [default: the short hostname]
    #[arg(long, env = "SPOOLD_HOST_ID")]
    pub host_id: Option<String>,
    /// A file of bearer tokens, one `NAME SCOPES TOKEN` per line (see docs/security.md)
    #[arg(long, env = "SPOOLD_TOKENS_FILE")]
    pub tokens: Option<PathBuf>,
    /// Allow listening on a non-loopback address without tokens
    #[arg(long)]
    pub insecure: bool,
    /// Do not fsync spool writes (faster; a power cut may lose recent events)
    #[arg(long)]
    pub no_fsync: bool,
}

#[derive(Args, Debug)]
pub struct SubmitArgs {
    /// The event type: the name of a handler
    pub kind: String,
    /// The payload: JSON text, @FILE, or - for standard input [default: {}]
    pub payload: Option<String>,
    /// Follow the event, showing progress, and print its result
    #[arg(long)]
    pub wait: bool,
    /// An Idempotency-Key: submitting again with the same key returns the same event
    #[arg(long)]
    pub key: Option<String>,
    #[command(flatten)]
    pub server: ServerArg,
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    /// The event ID printed by submit
    pub id: String,
    #[command(flatten)]
    pub server: ServerArg,
}

#[derive(Args, Debug)]
pub struct ServerArg {
    /// The spoold server to talk to
    #[arg(long, env = "SPOOLD_SERVER", default_value = "http://127.0.0.1:8080")]
    pub server: String,
    /// A bearer token for a server that requires one (prefer the environment:
    /// a command line is visible to other users in `ps`)
    #[arg(long, env = "SPOOLD_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

#[derive(Args, Debug)]
pub struct ReportArgs {
    /// Progress in percent, 0 to 100
    #[arg(long)]
    pub progress: Option<f64>,
    /// A human-readable message (each new one shows as a line in the demo page's log)
    #[arg(long)]
    pub message: Option<String>,
    /// Any JSON value to show to clients as the status's "data"
    #[arg(long)]
    pub data: Option<String>,
    /// The content type of the result this handler will write
    #[arg(long)]
    pub content_type: Option<String>,
}

/// Everything `serve` runs on, validated.
#[derive(Debug, Clone)]
pub struct Settings {
    pub spool_dir: PathBuf,
    pub handlers_dir: PathBuf,
    pub listen: SocketAddr,
    /// None: detect from the filesystem.
    pub shared: Option<bool>,
    pub host_id: String,
    pub insecure: bool,
    pub fsync: bool,
    pub concurrency: usize,
    pub timeout: Duration,
    pub max_attempts: u32,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    pub kill_grace: Duration,
    pub lease_ttl: Duration,
    pub rescan_interval: Duration,
    pub shared_rescan_interval: Duration,
    pub progress_interval: Duration,
    pub retention: Duration,
    pub gc_interval: Duration,
    pub gc_batch: usize,
    pub max_body_bytes: usize,
    pub max_result_bytes: u64,
    pub stderr_tail_bytes: usize,
    pub page_refresh: Duration,
    pub page_max_checks: u32,
    pub sse_heartbeat: Duration,
    pub sse_retry: Duration,
    pub long_poll_max: Duration,
    pub shutdown_grace: Duration,
    pub header_timeout: Duration,
    /// How long a client may take to send a request body.
    pub body_timeout: Duration,
    /// At most this many open connections. `main` lowers it at start to fit
    /// the open-file limit (each connection is a file descriptor).
    pub max_connections: usize,
    /// Host names (canonical, see [`canonical_host`]) this server answers to,
    /// besides the loopback names when it listens on loopback.
    pub allowed_hosts: Vec<String>,
    /// Bearer tokens; empty means no authentication (loopback only).
    pub tokens: Tokens,
    /// Origins (`scheme://host[:port]`, canonical) whose pages may call the
    /// API from the browser; `*` is any origin, allowed only with tokens.
    pub cors_origins: Vec<String>,
    pub forward_headers: Vec<String>,
    pub pass_env: Vec<String>,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            spool_dir: PathBuf::from("spool"),
            handlers_dir: PathBuf::from("handlers"),
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            shared: None,
            host_id: String::new(),
            insecure: false,
            fsync: true,
            concurrency: 2 * std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2),
            timeout: Duration::from_secs(300),
            max_attempts: 3,
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(300),
            kill_grace: Duration::from_secs(5),
            lease_ttl: Duration::from_secs(30),
            rescan_interval: Duration::from_secs(2),
            shared_rescan_interval: Duration::from_millis(250),
            progress_interval: Duration::from_millis(100),
            retention: Duration::from_secs(7 * 24 * 3600),
            gc_interval: Duration::from_secs(60),
            gc_batch: 2000,
            max_body_bytes: 1 << 20,
            max_result_bytes: 64 << 20,
            stderr_tail_bytes: 64 << 10,
            page_refresh: Duration::from_secs(2),
            page_max_checks: 150,
            sse_heartbeat: Duration::from_secs(15),
            sse_retry: Duration::from_secs(2),
            long_poll_max: Duration::from_secs(60),
            shutdown_grace: Duration::from_secs(10),
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            max_connections: 10_000,
            allowed_hosts: Vec::new(),
            tokens: Tokens::default(),
            cors_origins: Vec::new(),
            forward_headers: ["user-agent", "x-request-id", "traceparent", "content-type"]
                .map(String::from)
                .to_vec(),
            pass_env: Vec::new(),
        }
    }
}

/// The config file: every field optional, durations as "30s", "5m", "250ms".
#[derive(Deserialize, Default, Debug)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    spool: Option<PathBuf>,
    handlers: Option<PathBuf>,
    listen: Option<SocketAddr>,
    shared: Option<bool>,
    host_id: Option<String>,
    insecure: Option<bool>,
    fsync: Option<bool>,
    concurrency: Option<usize>,
    timeout: Option<String>,
    max_attempts: Option<u32>,
    backoff_base: Option<String>,
    backoff_max: Option<String>,
    kill_grace: Option<String>,
    lease_ttl: Option<String>,
    rescan_interval: Option<String>,
    shared_rescan_interval: Option<String>,
    progress_interval: Option<String>,
    retention: Option<String>,
    gc_interval: Option<String>,
    gc_batch: Option<usize>,
    max_body_bytes: Option<usize>,
    max_result_bytes: Option<u64>,
    stderr_tail_bytes: Option<usize>,
    page_refresh: Option<String>,
    page_max_checks: Option<u32>,
    sse_heartbeat: Option<String>,
    sse_retry: Option<String>,
    long_poll_max: Option<String>,
    shutdown_grace: Option<String>,
    header_timeout: Option<String>,
    body_timeout: Option<String>,
    max_connections: Option<usize>,
    allowed_hosts: Option<Vec<String>>,
    tokens_file: Option<PathBuf>,
    cors_origins: Option<Vec<String>>,
    forward_headers: Option<Vec<String>>,
    pass_env: Option<Vec<String>>,
}

/// The longest duration any setting may have: 10 years (humantime's `"10y"`).
/// Longer values are mistakes, and would overflow deadlines (`Instant + d`).
pub const MAX_DURATION: Duration = Duration::from_secs(315_576_000);

/// Parses "30s", "1m 30s", "250ms"; a bare number means seconds. Refuses
/// negative and non-finite numbers and anything over [`MAX_DURATION`].
pub fn parse_duration(s: &str) -> anyhow::Result<Duration> {
    let s = s.trim();
    if let Ok(secs) = s.parse::<f64>() {
        return duration_from_secs(secs).with_context(|| format!("{s:?} is not a valid duration"));
    }
    let d = humantime::parse_duration(s).with_context(|| {
        format!("{s:?} is not a duration; write e.g. \"30s\", \"5m\" or \"250ms\"")
    })?;
    if d > MAX_DURATION {
        bail!("{s:?} is too long: durations are at most 10 years (\"10y\")");
    }
    Ok(d)
}

/// A number of seconds as a duration, with the checks of [`parse_duration`].
pub fn duration_from_secs(secs: f64) -> anyhow::Result<Duration> {
    if !secs.is_finite() {
        bail!("{secs} seconds is not a finite number");
    }
    if secs < 0.0 {
        bail!("{secs} seconds is negative");
    }
    if secs > MAX_DURATION.as_secs_f64() {
        bail!("{secs} seconds is too long: durations are at most 10 years (315576000 seconds)");
    }
    Duration::try_from_secs_f64(secs).with_context(|| format!("{secs} seconds is not a duration"))
}

/// An origin as the CORS check compares it: `scheme://host[:port]` with the
/// host canonical and the scheme's default port left out; `*` stays `*`.
/// None when it is not an http(s) origin (a path, a wildcard in a name).
pub fn canonical_origin(origin: &str) -> Option<String> {
    let origin = origin.trim();
    if origin == "*" {
        return Some("*".into());
    }
    let (scheme, rest) = origin.split_once("://")?;
    let scheme = scheme.to_ascii_lowercase();
    let default_port = match scheme.as_str() {
        "http" => 80,
        "https" => 443,
        _ => return None,
    };
    if rest.contains(['/', '@', '?', '#']) {
        return None;
    }
    let a = rest.parse::<hyper::http::uri::Authority>().ok()?;
    let host = canonical_host(a.host())?;
    Some(match a.port_u16() {
        Some(p) if p != default_port => format!("{scheme}://{host}:{p}"),
        _ => format!("{scheme}://{host}"),
    })
}

/// A host name as the Host check compares it: lowercase, without a trailing
/// dot, IPv6 addresses bracketed in canonical form (`[::1]`). None when it is
/// not a host name or IP address (a port, a path, a user or a wildcard).
pub fn canonical_host(name: &str) -> Option<String> {
    let name = name.trim().to_ascii_lowercase();
    let name = name.strip_suffix('.').unwrap_or(&name);
    let inner = name
        .strip_prefix('[')
        .and_then(|n| n.strip_suffix(']'))
        .unwrap_or(name);
    if let Ok(ip) = inner.parse::<Ipv6Addr>() {
        return Some(format!("[{ip}]"));
    }
    if let Ok(ip) = name.parse::<IpAddr>() {
        return Some(ip.to_string());
    }
    let ok = !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
    ok.then(|| name.to_owned())
}

impl Settings {
    pub fn from_args(args: &ServeArgs) -> anyhow::Result<Settings> {
        let mut s = Settings::default();
        if let Some(path) = &args.config {
            s.apply_file(path)?;
        }
        set(&mut s.spool_dir, args.spool.clone());
        set(&mut s.handlers_dir, args.handlers.clone());
        set(&mut s.listen, args.listen);
        set(&mut s.host_id, args.host_id.clone());
        if args.shared {
            s.shared = Some(true);
        }
        s.insecure |= args.insecure;
        if let Some(path) = &args.tokens {
            s.tokens.add_file(path)?;
        }
        if let Ok(text) = std::env::var("SPOOLD_TOKENS") {
            s.tokens
                .add_lines(&text.replace(';', "\n"), "SPOOLD_TOKENS")?;
        }
        s.fsync &= !args.no_fsync;
        if s.host_id.is_empty() {
            s.host_id = hostname();
        }
        // Handlers run with their event directory as cwd: paths must be absolute.
        s.spool_dir = std::path::absolute(&s.spool_dir)
            .with_context(|| format!("bad spool path {}", s.spool_dir.display()))?;
        s.handlers_dir = std::path::absolute(&s.handlers_dir)
            .with_context(|| format!("bad handlers path {}", s.handlers_dir.display()))?;
        s.validate()?;
        Ok(s)
    }

    fn apply_file(&mut self, path: &Path) -> anyhow::Result<()> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the config file {}", path.display()))?;
        let f: FileConfig = toml::from_str(&text).with_context(|| {
            format!(
                "{} is not a valid spoold config (see docs/configuration.md)",
                path.display()
            )
        })?;
        let dur = |name: &str, v: Option<String>, slot: &mut Duration| -> anyhow::Result<()> {
            if let Some(v) = v {
                *slot =
                    parse_duration(&v).with_context(|| format!("{}: {name}", path.display()))?;
            }
            Ok(())
        };
        dur("timeout", f.timeout, &mut self.timeout)?;
        dur("backoff_base", f.backoff_base, &mut self.backoff_base)?;
        dur("backoff_max", f.backoff_max, &mut self.backoff_max)?;
        dur("kill_grace", f.kill_grace, &mut self.kill_grace)?;
        dur("lease_ttl", f.lease_ttl, &mut self.lease_ttl)?;
        dur(
            "rescan_interval",
            f.rescan_interval,
            &mut self.rescan_interval,
        )?;
        dur(
            "shared_rescan_interval",
            f.shared_rescan_interval,
            &mut self.shared_rescan_interval,
        )?;
        dur(
            "progress_interval",
            f.progress_interval,
            &mut self.progress_interval,
        )?;
        dur("retention", f.retention, &mut self.retention)?;
        dur("gc_interval", f.gc_interval, &mut self.gc_interval)?;
        dur("page_refresh", f.page_refresh, &mut self.page_refresh)?;
        dur("sse_heartbeat", f.sse_heartbeat, &mut self.sse_heartbeat)?;
        dur("sse_retry", f.sse_retry, &mut self.sse_retry)?;
        dur("long_poll_max", f.long_poll_max, &mut self.long_poll_max)?;
        dur("shutdown_grace", f.shutdown_grace, &mut self.shutdown_grace)?;
        dur("header_timeout", f.header_timeout, &mut self.header_timeout)?;
        dur("body_timeout", f.body_timeout, &mut self.body_timeout)?;
        let base = path.parent().unwrap_or(Path::new("."));
        set(&mut self.spool_dir, f.spool.map(|p| base.join(p)));
        set(&mut self.handlers_dir, f.handlers.map(|p| base.join(p)));
        set(&mut self.listen, f.listen);
        self.shared = f.shared.or(self.shared);
        set(&mut self.host_id, f.host_id);
        set(&mut self.insecure, f.insecure);
        set(&mut self.fsync, f.fsync);
        set(&mut self.concurrency, f.concurrency);
        set(&mut self.max_attempts, f.max_attempts);
        set(&mut self.gc_batch, f.gc_batch);
        set(&mut self.max_body_bytes, f.max_body_bytes);
        set(&mut self.max_result_bytes, f.max_result_bytes);
        set(&mut self.stderr_tail_bytes, f.stderr_tail_bytes);
        set(&mut self.page_max_checks, f.page_max_checks);
        set(&mut self.max_connections, f.max_connections);
        set(
            &mut self.forward_headers,
            f.forward_headers
                .map(|v| v.into_iter().map(|h| h.to_ascii_lowercase()).collect()),
        );
        set(&mut self.pass_env, f.pass_env);
        if let Some(file) = f.tokens_file {
            self.tokens.add_file(&base.join(file))?;
        }
        if let Some(origins) = f.cors_origins {
            self.cors_origins = origins
                .iter()
                .map(|o| {
                    canonical_origin(o).with_context(|| {
                        format!(
                            "{}: cors_origins: {o:?} is not an origin; write scheme, host and port only, e.g. \"https://app.example.com\" or \"http://localhost:3000\"",
                            path.display()
                        )
                    })
                })
                .collect::<anyhow::Result<_>>()?;
        }
        if let Some(hosts) = f.allowed_hosts {
            self.allowed_hosts = hosts
                .iter()
                .map(|h| {
                    canonical_host(h).with_context(|| {
                        format!(
                            "{}: allowed_hosts: {h:?} is not a host name; write a name or IP address without port, e.g. \"jobs.example.com\"",
                            path.display()
                        )
                    })
                })
                .collect::<anyhow::Result<_>>()?;
        }
        Ok(())
    }

    fn validate(&self) -> anyhow::Result<()> {
        if self.concurrency == 0 {
            bail!("concurrency must be at least 1");
        }
        if self.max_attempts == 0 {
            bail!("max_attempts must be at least 1");
        }
        // No '.': staging files are named <host>.<pid>.<n>, and recovery must
        // tell its own host's files from those of a host named "<host>.1".
        if self.host_id.is_empty()
            || self.host_id.len() > 64
            || !self
                .host_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'))
        {
            bail!(
                "host id {:?} must be 1 to 64 characters of letters, digits, '-' or '_'; set it with --host-id",
                self.host_id
            );
        }
        if !self.listen.ip().is_loopback() && self.tokens.is_empty() && !self.insecure {
            bail!(
                "refusing to listen on {} without authentication: spoold runs handlers for anyone who can reach it. \
                 Configure tokens (--tokens FILE, see docs/security.md), listen on 127.0.0.1 behind a reverse proxy that authenticates, \
                 or pass --insecure if this network is trusted",
                self.listen
            );
        }
        if self.cors_origins.iter().any(|o| o == "*") && self.tokens.is_empty() {
            bail!(
                "cors_origins = [\"*\"] lets every web page on the internet drive this spoold from its visitors' browsers; \
                 it is only allowed together with tokens. Name the origins instead, e.g. [\"https://app.example.com\"]"
            );
        }
        for (name, d) in [
            ("lease_ttl", self.lease_ttl),
            ("rescan_interval", self.rescan_interval),
            ("progress_interval", self.progress_interval),
            ("sse_heartbeat", self.sse_heartbeat),
            ("shared_rescan_interval", self.shared_rescan_interval),
            ("gc_interval", self.gc_interval),
            ("header_timeout", self.header_timeout),
            ("body_timeout", self.body_timeout),
        ] {
            if d.is_zero() {
                bail!("{name} must be greater than zero");
            }
        }
        Ok(())
    }
}

fn set<T>(slot: &mut T, value: Option<T>) {
    if let Some(v) = value {
        *slot = v;
    }
}

fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: buf is writable for its length; gethostname NUL-terminates on success.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    let name = if rc == 0 {
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        String::from_utf8_lossy(&buf[..end]).into_owned()
    } else {
        String::new()
    };
    // The short name: "web1.example.com" is host "web1".
    let short = name.split('.').next().unwrap_or("");
    let clean: String = short
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'))
        .collect();
    if clean.is_empty() {
        "localhost".into()
    } else {
        clean
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_and_are_capped_at_ten_years() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(
            parse_duration(" 1.5 ").unwrap(),
            Duration::from_millis(1500)
        );
        assert_eq!(parse_duration("10y").unwrap(), MAX_DURATION);
        assert_eq!(parse_duration("315576000").unwrap(), MAX_DURATION);
        for bad in ["11y", "3653d", "315576001", "1e300", "1000000000000y"] {
            let e = format!("{:#}", parse_duration(bad).unwrap_err());
            assert!(
                e.contains("10 years") || e.contains("not a duration"),
                "{bad}: {e}"
            );
        }
        for bad in ["inf", "-inf", "NaN", "-1", "-0.5"] {
            let e = format!("{:#}", parse_duration(bad).unwrap_err());
            assert!(e.contains(bad), "{bad}: {e}");
        }
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn duration_from_secs_checks_like_parse_duration() {
        assert_eq!(
            duration_from_secs(0.25).unwrap(),
            Duration::from_millis(250)
        );
        assert_eq!(duration_from_secs(0.0).unwrap(), Duration::ZERO);
        for bad in [f64::NAN, f64::INFINITY, -1.0, 1e300, 315_576_000.5] {
            assert!(duration_from_secs(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn origins_are_canonical() {
        for (given, want) in [
            ("https://App.Example.com", "https://app.example.com"),
            ("https://app.example.com:443", "https://app.example.com"),
            ("http://localhost:3000", "http://localhost:3000"),
            ("HTTP://127.0.0.1:80", "http://127.0.0.1"),
            ("http://[::1]:8080", "http://[::1]:8080"),
            ("*", "*"),
        ] {
            assert_eq!(canonical_origin(given).as_deref(), Some(want), "{given}");
        }
        for bad in [
            "app.example.com",
            "https://app.example.com/",
            "https://*.example.com",
            "ftp://a.com",
            "https://u@a.com",
            "null",
        ] {
            assert_eq!(canonical_origin(bad), None, "{bad}");
        }
    }

    #[test]
    fn host_names_are_canonical() {
        assert_eq!(
            canonical_host("Jobs.Example.COM.").as_deref(),
            Some("jobs.example.com")
        );
        assert_eq!(canonical_host("::1").as_deref(), Some("[::1]"));
        assert_eq!(canonical_host("[0:0::1]").as_deref(), Some("[::1]"));
        assert_eq!(canonical_host("10.0.0.5").as_deref(), Some("10.0.0.5"));
        for bad in [
            "",
            ".",
            "*",
            "*.example.com",
            "a.com:8080",
            "user@a.com",
            "a/b",
            "[1.2.3.4]",
        ] {
            assert_eq!(canonical_host(bad), None, "{bad}");
        }
    }
}
