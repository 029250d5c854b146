//! The config file (`--config FILE`): TOML, every field optional, unknown
//! fields refused, durations as "30s". Merged over the defaults by
//! [`Settings::apply_file`]; relative paths resolve next to the file.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use serde::Deserialize;

use super::names::{canonical_host, canonical_origin, parse_duration};
use super::{set, Settings};

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
    max_connections_per_client: Option<usize>,
    exempt_clients: Option<Vec<IpAddr>>,
    max_streams: Option<usize>,
    allowed_hosts: Option<Vec<String>>,
    tokens_file: Option<PathBuf>,
    cors_origins: Option<Vec<String>>,
    forward_headers: Option<Vec<String>>,
    pass_env: Option<Vec<String>>,
}

impl Settings {
    pub(super) fn apply_file(&mut self, path: &Path) -> anyhow::Result<()> {
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
            &mut self.max_connections_per_client,
            f.max_connections_per_client,
        );
        set(&mut self.exempt_clients, f.exempt_clients);
        set(&mut self.max_streams, f.max_streams);
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
}
