//! One handler process: started without a shell in a process group of its
//! own, fed the payload on stdin, its stdout captured (capped) and the tail of
//! its stderr kept; stopped by signalling the whole group.
//!
//! Spawning uses `std::process::Command` (through tokio) with `process_group(0)`
//! and no `pre_exec` closure, so the standard library can use posix_spawn
//! (vfork-like) instead of fork(): fork from a large parent is ~50× slower.

use std::collections::VecDeque;
use std::io;
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// What to start.
pub struct Launch<'a> {
    pub program: &'a Path,
    pub cwd: &'a Path,
    pub env: Vec<(String, String)>,
    pub stdin: Vec<u8>,
    pub stdout_cap: u64,
    pub stderr_tail: usize,
}

/// A running handler.
pub struct Running {
    pub child: Child,
    pub pid: i32,
    pub stdout: JoinHandle<Captured>,
    pub stderr: JoinHandle<Vec<u8>>,
    /// Cancelled when stdout went past its cap.
    pub overflow: CancellationToken,
    /// Cancel to make the output readers return what they have (a process
    /// that left the group may keep the pipes open forever).
    pub stop_reading: CancellationToken,
}

/// Standard output, or the news that it was too large.
pub struct Captured {
    pub bytes: Vec<u8>,
    pub overflowed: bool,
}

pub fn spawn(launch: Launch<'_>) -> io::Result<Running> {
    let mut cmd = Command::new(launch.program);
    cmd.current_dir(launch.cwd)
        .env_clear()
        .envs(launch.env)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(false);
    let mut child = cmd.spawn()?;
    let pid = child.id().map(|p| p as i32).unwrap_or(0);
    let mut stdin = child.stdin.take().expect("stdin is piped");
    let payload = launch.stdin;
    tokio::spawn(async move {
        // A handler that does not read its input closes the pipe: not an error.
        let _ = stdin.write_all(&payload).await;
    });
    let overflow = CancellationToken::new();
    let stop_reading = CancellationToken::new();
    let stdout = child.stdout.take().expect("stdout is piped");
    let stdout = tokio::spawn(read_capped(
        stdout,
        launch.stdout_cap,
        overflow.clone(),
        stop_reading.clone(),
    ));
    let stderr = child.stderr.take().expect("stderr is piped");
    let stderr = tokio::spawn(read_tail(stderr, launch.stderr_tail, stop_reading.clone()));
    Ok(Running {
        child,
        pid,
        stdout,
        stderr,
        overflow,
        stop_reading,
    })
}

async fn read_capped(
    mut r: impl AsyncRead + Unpin,
    cap: u64,
    overflow: CancellationToken,
    stop: CancellationToken,
) -> Captured {
    let mut bytes = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = tokio::select! {
            n = r.read(&mut buf) => n,
            _ = stop.cancelled() => return Captured { bytes, overflowed: false },
        };
        match n {
            Ok(0) | Err(_) => {
                return Captured {
                    bytes,
                    overflowed: false,
                }
            }
            Ok(n) if (bytes.len() + n) as u64 > cap => {
                overflow.cancel();
                return Captured {
                    bytes: Vec::new(),
                    overflowed: true,
                };
            }
            Ok(n) => bytes.extend_from_slice(&buf[..n]),
        }
    }
}

async fn read_tail(mut r: impl AsyncRead + Unpin, keep: usize, stop: CancellationToken) -> Vec<u8> {
    let mut tail = VecDeque::with_capacity(keep.min(64 * 1024));
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = tokio::select! {
            n = r.read(&mut buf) => n,
            _ = stop.cancelled() => break,
        };
        match n {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                tail.extend(&buf[..n]);
                let excess = tail.len().saturating_sub(keep);
                tail.drain(..excess);
            }
        }
    }
    tail.into()
}

/// Sends `signal` to the whole process group led by `pid`.
pub fn signal_group(pid: i32, signal: i32) {
    if pid > 1 {
        // SAFETY: kill(2) with a negative pid addresses a process group.
        unsafe { libc::kill(-pid, signal) };
    }
}

/// SIGTERM to the group, up to `grace` for the leader to exit, then SIGKILL
/// to the group. Returns the leader's exit status.
pub async fn terminate(child: &mut Child, pid: i32, grace: Duration) -> io::Result<ExitStatus> {
    signal_group(pid, libc::SIGTERM);
    if let Ok(status) = tokio::time::timeout(grace, child.wait()).await {
        signal_group(pid, libc::SIGKILL);
        return status;
    }
    signal_group(pid, libc::SIGKILL);
    child.wait().await
}

/// Describes how a process ended, for humans.
pub fn describe_exit(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with code {code}"),
        (None, Some(sig)) => format!("was killed by signal {sig} ({})", signal_name(sig)),
        _ => "ended in an unknown way".into(),
    }
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGKILL => "SIGKILL",
        libc::SIGTERM => "SIGTERM",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGABRT => "SIGABRT",
        libc::SIGINT => "SIGINT",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGHUP => "SIGHUP",
        _ => "signal",
    }
}
