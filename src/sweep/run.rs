//! One run of a sweep: a fresh private directory, `--setup`, a fresh server
//! (`--server`) or backend, a proxy hosted in this process with the run's
//! rules, the client in a process group of its own under the timeout, and
//! `--verify`. Nothing a run could have changed is reused by the next.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::{Child, Command};

use super::outcome::Exit;
use crate::backend::Backend;
use crate::intercept::{Interceptor, PassThrough};
use crate::io::addr::{ListenAddr, Target};
use crate::observe::telemetry::Telemetry;
use crate::observe::trace::TraceTarget;
use crate::rules::RuleSet;
use crate::rules::engine::Engine;
use crate::server::{Limits, Server, ServerConfig};

/// Bytes of a client's output kept (its tail).
pub const TAIL_BYTES: usize = 4096;

/// How long a `--server` may take to listen.
const SERVER_START: Duration = Duration::from_secs(5);

/// What sits behind each run's proxy.
#[derive(Debug, Clone)]
pub enum ServerMode {
    Backend(Backend),
    /// A shell command started fresh for each run, listening on
    /// `$unixsocket`.
    Command(String),
}

/// What every run of a sweep shares.
#[derive(Debug)]
pub struct Setup {
    pub server: ServerMode,
    pub cmd: Vec<String>,
    pub setup: Option<String>,
    pub verify: Option<String>,
    pub timeout: Duration,
    /// Power-loss runs (and the baseline) go through a volatile write
    /// cache, and `--verify` runs whatever the client's exit: it crashed.
    pub power_loss: bool,
    /// The sweep's own private directory; each run gets one below it.
    pub dir: PathBuf,
    /// `--pcap`: every run captures its connections (each message's
    /// payload cut to the snaplen, if one is given).
    pub pcap: Option<Option<u64>>,
}

/// The facts of one finished run.
#[derive(Debug, Clone)]
pub struct Facts {
    pub exit: Exit,
    pub duration: Duration,
    /// The targeted rule fired (always true with no rules).
    pub fired: bool,
    /// `--verify`'s verdict; `None` when it was not run.
    pub verified: Option<bool>,
    /// The tail of the client's stdout and stderr, interleaved as read.
    pub output: String,
    /// The tail of `--verify`'s stdout and stderr (what it found wrong).
    pub verify_output: String,
    /// The run's event trace (JSON lines); for a fault run, once finished,
    /// what the report keeps of it (`report::keep_trace`).
    pub trace: String,
    /// The sweep's own part of the run: its whole time less the client's,
    /// `--setup`'s, the server's start and `--verify`'s.
    pub own: Duration,
    /// The run's pcapng capture (`--pcap`), complete: in the run's
    /// directory until the sweep moves it away or deletes it.
    pub capture: Option<PathBuf>,
}

/// Why a run could not even start.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot create the run's directory {0}: {1}")]
    Dir(PathBuf, std::io::Error),
    #[error("--setup failed ({status}): {output}")]
    SetupFailed { status: String, output: String },
    #[error("--server did not listen on \"$unixsocket\" within {secs} s; its output:\n{output}")]
    ServerSilent { secs: u64, output: String },
    #[error("--server exited ({status}) before listening; its output:\n{output}")]
    ServerExited { status: String, output: String },
    #[error(
        "--server exited ({status}) but its socket answers: it went into the background \
         (nbdkit without -f, qemu-nbd --fork?), which a sweep cannot stop between runs; run it \
         in the foreground"
    )]
    ServerDaemonized { status: String },
    #[error("cannot run {what} {cmd:?}: {source}")]
    Spawn {
        what: &'static str,
        cmd: String,
        source: std::io::Error,
    },
    #[error("cannot start the run's proxy: {0}")]
    Proxy(std::io::Error),
}

/// A child in a process group of its own, killed whole when dropped.
struct Group {
    child: Child,
    pgid: Option<Pid>,
}

impl Group {
    fn spawn(mut cmd: Command, what: &'static str, shown: &str) -> Result<Group, RunError> {
        cmd.process_group(0).kill_on_drop(true).stdin(Stdio::null());
        let child = cmd.spawn().map_err(|source| RunError::Spawn {
            what,
            cmd: shown.to_string(),
            source,
        })?;
        let pgid = child.id().map(|id| Pid::from_raw(id as i32));
        Ok(Group { child, pgid })
    }

    fn kill(&mut self) {
        if let Some(pg) = self.pgid.take() {
            let _ = killpg(pg, Signal::SIGKILL);
        }
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Reads `r` to its end, keeping the last [`TAIL_BYTES`].
async fn tail(mut r: impl AsyncRead + Unpin) -> Vec<u8> {
    let mut kept = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => return kept,
            Ok(n) => {
                kept.extend_from_slice(&buf[..n]);
                if kept.len() > 2 * TAIL_BYTES {
                    kept.drain(..kept.len() - TAIL_BYTES);
                }
            }
        }
    }
}

fn last(bytes: &[u8]) -> String {
    let from = bytes.len().saturating_sub(TAIL_BYTES);
    String::from_utf8_lossy(&bytes[from..]).into_owned()
}

/// A shell command with the run's environment, output piped.
fn shell(line: &str, env: &[(&str, String)], dir: &Path) -> Command {
    let mut c = Command::new("sh");
    c.arg("-c").arg(line).current_dir(dir);
    for (k, v) in env {
        c.env(k, v);
    }
    c.stdout(Stdio::piped()).stderr(Stdio::piped());
    c
}

/// Runs a command to its end under `timeout`: its exit and output tail.
async fn finish(mut g: Group, timeout: Duration) -> (Exit, String) {
    let out = g.child.stdout.take();
    let err = g.child.stderr.take();
    let reading = tokio::spawn(async move {
        let (o, e) = tokio::join!(
            async {
                match out {
                    Some(o) => tail(o).await,
                    None => Vec::new(),
                }
            },
            async {
                match err {
                    Some(e) => tail(e).await,
                    None => Vec::new(),
                }
            }
        );
        let mut both = o;
        both.extend_from_slice(&e);
        both
    });
    let exit = match tokio::time::timeout(timeout, g.child.wait()).await {
        Ok(Ok(s)) => {
            use std::os::unix::process::ExitStatusExt;
            match (s.code(), s.signal()) {
                (Some(c), _) => Exit::Code(c),
                (None, Some(sig)) => Exit::Signal(sig),
                (None, None) => Exit::Code(-1),
            }
        }
        Ok(Err(_)) => Exit::Code(-1),
        Err(_) => Exit::TimedOut,
    };
    // The whole group: a client's children must not outlive the run (nor
    // hold the output pipes open).
    g.kill();
    let _ = g.child.wait().await;
    let output = match tokio::time::timeout(Duration::from_secs(2), reading).await {
        Ok(Ok(b)) => last(&b),
        _ => String::new(),
    };
    (exit, output)
}

fn describe(exit: Exit) -> String {
    match exit {
        Exit::Code(c) => format!("exit status {c}"),
        Exit::Signal(s) => format!("killed by signal {s}"),
        Exit::TimedOut => "still running at the timeout".into(),
    }
}

/// Starts `--server` for a run and waits until its socket answers.
async fn start_server(
    line: &str,
    env: &[(&str, String)],
    dir: &Path,
    socket: &Path,
) -> Result<Group, RunError> {
    let mut g = Group::spawn(shell(line, env, dir), "--server", line)?;
    let started = Instant::now();
    loop {
        if tokio::net::UnixStream::connect(socket).await.is_ok() {
            return Ok(g);
        }
        if let Ok(Some(status)) = g.child.try_wait() {
            let status = status.to_string();
            // Give a forking server's child a moment to bind.
            tokio::time::sleep(Duration::from_millis(200)).await;
            if tokio::net::UnixStream::connect(socket).await.is_ok() {
                return Err(RunError::ServerDaemonized { status });
            }
            let (_, output) = finish(g, Duration::from_secs(1)).await;
            return Err(RunError::ServerExited { status, output });
        }
        if started.elapsed() > SERVER_START {
            let (_, output) = finish(g, Duration::from_millis(100)).await;
            return Err(RunError::ServerSilent {
                secs: SERVER_START.as_secs(),
                output,
            });
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Runs the client once with `rules` (none: the baseline) in `dir`.
pub async fn run(setup: &Setup, rules: Option<RuleSet>, dir: &Path) -> Result<Facts, RunError> {
    let whole = Instant::now();
    // Time spent in the user's commands, not the sweep's.
    let mut theirs = Duration::ZERO;
    std::fs::create_dir_all(dir).map_err(|e| RunError::Dir(dir.to_path_buf(), e))?;
    let proxy_sock = dir.join("nbd.sock");
    let server_sock = dir.join("server.sock");
    // `--setup` and `--server` see the server's socket as $unixsocket.
    let server_env: Vec<(&str, String)> = vec![
        ("dir", dir.display().to_string()),
        ("unixsocket", server_sock.display().to_string()),
    ];
    if let Some(line) = &setup.setup {
        let t = Instant::now();
        let g = Group::spawn(shell(line, &server_env, dir), "--setup", line)?;
        let (exit, output) = finish(g, setup.timeout).await;
        theirs += t.elapsed();
        if exit != Exit::Code(0) {
            return Err(RunError::SetupFailed {
                status: describe(exit),
                output,
            });
        }
    }
    let (backend, mut server_group) = match &setup.server {
        ServerMode::Backend(b) => (b.clone(), None),
        ServerMode::Command(line) => {
            let t = Instant::now();
            let g = start_server(line, &server_env, dir, &server_sock).await?;
            theirs += t.elapsed();
            (
                Backend::Upstream(Target::Unix(server_sock.clone())),
                Some(g),
            )
        }
    };
    let trace_path = dir.join("trace.jsonl");
    let mut telemetry = Telemetry::new(false, Some(TraceTarget::File(trace_path.clone())))
        .map_err(RunError::Proxy)?;
    let capture = dir.join("capture.pcapng");
    if let Some(snaplen) = setup.pcap {
        telemetry = telemetry
            .with_pcap(&capture, snaplen)
            .map_err(RunError::Proxy)?;
    }
    let telemetry = Arc::new(telemetry);
    let engine = rules.map(|set| Arc::new(Engine::new(set)));
    let interceptor: Arc<dyn Interceptor> = match &engine {
        Some(e) => e.clone(),
        None => Arc::new(PassThrough),
    };
    let server = Server::bind(ServerConfig {
        listen: ListenAddr::Unix(proxy_sock.clone()),
        backend,
        limits: Limits::default(),
        interceptor,
        telemetry: telemetry.clone(),
    })
    .await
    .map_err(RunError::Proxy)?;
    let server = if setup.power_loss {
        // What a crash takes must not depend on timing: a sweep's runs
        // repeat.
        server.with_write_cache(crate::cache::CacheConfig::new(
            crate::cache::DEFAULT_CACHE_SIZE,
            crate::cache::WriteBack::WhenFull,
        ))
    } else {
        server
    };
    // The client crashed with its machine: nothing it writes after the
    // crash (reconnecting, as QEMU does) may reach the disk.
    if let Some(cache) = server.registry().write_cache() {
        cache.power_stays_off();
    }
    let uri = server.uri();
    let registry = server.registry();
    let serving = tokio::spawn(server.run());

    // The client (and `--verify`) see the proxy, as `--run` gives it: run
    // directly, in a process group of its own.
    let env: Vec<(&str, String)> = vec![
        ("dir", dir.display().to_string()),
        ("unixsocket", proxy_sock.display().to_string()),
        ("uri", uri.clone()),
        ("nbd", uri),
        ("port", String::new()),
    ];
    let mut cmd = Command::new(&setup.cmd[0]);
    cmd.args(&setup.cmd[1..]).current_dir(dir);
    for (k, v) in &env {
        cmd.env(k, v);
    }
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let started = Instant::now();
    let client = Group::spawn(cmd, "the client", &setup.cmd.join(" "))?;
    let (exit, output) = finish(client, setup.timeout).await;
    let duration = started.elapsed();
    theirs += duration;

    // Let the proxy see the client's connections end, so the trace is whole.
    let until = Instant::now() + Duration::from_secs(2);
    while !registry.list().is_empty() && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    serving.abort();
    let _ = serving.await;
    for c in registry.list() {
        c.kill();
    }
    // A server that forked and exited left its socket to a process this
    // run cannot stop; the next run would find it still there.
    if let Some(g) = server_group.as_mut()
        && let Ok(Some(status)) = g.child.try_wait()
        && tokio::net::UnixStream::connect(&server_sock).await.is_ok()
    {
        return Err(RunError::ServerDaemonized {
            status: status.to_string(),
        });
    }
    let fired = engine
        .as_ref()
        .is_none_or(|e| e.stats().iter().any(|s| s.fired > 0));
    let mut verify_output = String::new();
    let verified = match (&setup.verify, exit) {
        (Some(line), e)
            if fired && (e == Exit::Code(0) || (setup.power_loss && e != Exit::TimedOut)) =>
        {
            let t = Instant::now();
            let g = Group::spawn(shell(line, &env, dir), "--verify", line)?;
            let (v, out) = finish(g, setup.timeout).await;
            theirs += t.elapsed();
            verify_output = out;
            Some(v == Exit::Code(0))
        }
        _ => None,
    };
    telemetry.flush_trace();
    drop(telemetry);
    let trace = std::fs::read_to_string(&trace_path).unwrap_or_default();
    // The server's stop (a kill and a wait) is the sweep's own cost.
    drop(server_group);
    Ok(Facts {
        own: whole.elapsed().saturating_sub(theirs),
        exit,
        duration,
        fired,
        verified,
        output,
        verify_output,
        trace,
        capture: setup.pcap.map(|_| capture),
    })
}
