//! Configuration in two steps: command-line arguments (clap) and an optional
//! TOML file are merged into one validated [`Settings`]; every stage gets an
//! `Arc<Settings>` and never sees clap types.
//!
//! Precedence: built-in defaults < `--config FILE` < command-line flags.
//! Every option is documented in `docs/configuration.md`. `file` reads the
//! config file; `names` parses durations, host names and origins.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};

use crate::auth::Tokens;

mod file;
mod names;

pub use names::{
    canonical_host, canonical_origin, duration_from_secs, parse_duration, MAX_DURATION,
};

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
    /// At most this many open connections from one client address, except
    /// from `exempt_clients` (reverse proxies carry many clients).
    pub max_connections_per_client: usize,
    pub exempt_clients: Vec<IpAddr>,
    /// At most this many open SSE streams; more get `503`, so that streams
    /// never take the last connections from polls and submits. Lowered at
    /// start to 90% of `max_connections`.
    pub max_streams: usize,
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
            max_connections_per_client: 256,
            exempt_clients: vec![
                IpAddr::from([127, 0, 0, 1]),
                IpAddr::from(Ipv6Addr::LOCALHOST),
            ],
            max_streams: 9_000,
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

    fn validate(&self) -> anyhow::Result<()> {
        if self.concurrency == 0 {
            bail!("concurrency must be at least 1");
        }
        for (name, n) in [
            ("max_connections", self.max_connections),
            (
                "max_connections_per_client",
                self.max_connections_per_client,
            ),
            ("max_streams", self.max_streams),
        ] {
            if n == 0 {
                bail!("{name} must be at least 1");
            }
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
