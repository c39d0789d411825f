//! Running programs: finding them, running one to completion under a hard
//! timeout, waiting on and killing the long-lived ones, and reading what
//! they logged. Everything else in the harness starts its programs
//! through these, so a hung or missing program fails a test the same way
//! wherever it happens.

use std::fs::{self, File};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// How long a spawned server may take to become ready.
pub const START_TIMEOUT: Duration = Duration::from_secs(20);
/// Hard limit for any single external command run by [`run`].
pub const RUN_TIMEOUT: Duration = Duration::from_secs(120);

// ---------------------------------------------------------------------------
// Tool availability: a missing tool fails the test, it never skips it.
// ---------------------------------------------------------------------------

/// Debian package that provides `tool`.
fn package_of(tool: &str) -> &'static str {
    match tool {
        "qemu-nbd" | "qemu-img" | "qemu-io" => "qemu-utils",
        "nbdkit" => "nbdkit",
        "nbdinfo" | "nbdcopy" | "nbdsh" => "libnbd-bin",
        "fio" => "fio",
        "curl" => "curl",
        "python3-libnbd" => "python3-libnbd",
        _ => "it",
    }
}

fn find_in_path(tool: &str) -> Option<PathBuf> {
    if tool.contains('/') {
        let p = PathBuf::from(tool);
        return p.is_file().then_some(p);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

/// Panics with an installation hint if `tool` is not on PATH.
pub fn require_tool(tool: &str) {
    if find_in_path(tool).is_none() {
        panic!(
            "required tool `{tool}` not found on PATH: install {} (scripts/test.sh does it)",
            package_of(tool)
        );
    }
}

// ---------------------------------------------------------------------------
// Running commands with a hard timeout.
// ---------------------------------------------------------------------------

/// Result of a finished command, with its output decoded as (lossy) UTF-8.
#[derive(Debug, Clone)]
pub struct Output {
    pub command: String,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    pub fn success(&self) -> bool {
        self.status.success()
    }

    /// Everything needed to understand a failure.
    pub fn describe(&self) -> String {
        format!(
            "command: {}\nstatus: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.command, self.status, self.stdout, self.stderr
        )
    }
}

fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:=,+@%".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

pub fn command_line(cmd: &str, args: &[&str]) -> String {
    std::iter::once(cmd)
        .chain(args.iter().copied())
        .map(shell_quote)
        .collect::<Vec<_>>()
        .join(" ")
}

fn spawn_reader<R: Read + Send + 'static>(mut r: R) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        buf
    })
}

/// Spawns `cmd args...` with stdout and stderr piped, for the caller to
/// read, and `stdin` as given.
pub fn spawn_piped(cmd: &str, args: &[&str], stdin: Stdio) -> Child {
    Command::new(cmd)
        .args(args)
        .stdin(stdin)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot spawn `{}`: {e}", command_line(cmd, args)))
}

/// Borrows owned arguments as the `&[&str]` the runners take.
pub fn as_strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

/// Runs `cmd args...` with stdin closed, under [`RUN_TIMEOUT`].
/// Panics (after killing it) if the command does not finish in time.
pub fn run(cmd: &str, args: &[&str]) -> Output {
    run_with_timeout(cmd, args, RUN_TIMEOUT)
}

pub fn run_with_timeout(cmd: &str, args: &[&str], timeout: Duration) -> Output {
    require_tool(cmd);
    let line = command_line(cmd, args);
    let mut child = spawn_piped(cmd, args, Stdio::null());
    let out = spawn_reader(child.stdout.take().unwrap());
    let err = spawn_reader(child.stderr.take().unwrap());
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) => {}
            Err(e) => panic!("waiting for `{line}`: {e}"),
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            let stdout = String::from_utf8_lossy(&out.join().unwrap()).into_owned();
            let stderr = String::from_utf8_lossy(&err.join().unwrap()).into_owned();
            panic!(
                "`{line}` did not finish within {timeout:?}; killed it\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}"
            );
        }
        thread::sleep(Duration::from_millis(10));
    };
    Output {
        command: line,
        status,
        stdout: String::from_utf8_lossy(&out.join().unwrap()).into_owned(),
        stderr: String::from_utf8_lossy(&err.join().unwrap()).into_owned(),
    }
}

/// Like [`run`], but panics with the full output unless the command succeeds.
/// Returns stdout.
pub fn run_ok(cmd: &str, args: &[&str]) -> String {
    let o = run(cmd, args);
    if !o.success() {
        panic!("command failed\n{}", o.describe());
    }
    o.stdout
}

/// Runs a command with stdout and stderr into the same file (a shell's
/// `2>&1`, so the two keep their order), under a hard timeout. Returns its
/// status and everything it printed; panics (after killing it) on timeout.
pub fn run_merged(cmd: &str, args: &[&str], timeout: Duration) -> (ExitStatus, String) {
    require_tool(cmd);
    let dir = TempDir::new().expect("tempdir");
    let path = dir.path().join("output");
    let f = File::create(&path).expect("create output file");
    let line = command_line(cmd, args);
    let mut child = Command::new(cmd)
        .args(args)
        .stdin(Stdio::null())
        .stdout(f.try_clone().expect("dup"))
        .stderr(f)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot spawn `{line}`: {e}"));
    let Some(status) = wait_child_exit(&mut child, timeout) else {
        kill_child(&mut child);
        panic!(
            "`{line}` did not finish within {timeout:?}; killed it\n{}",
            read_to_string_lossy(&path)
        );
    };
    (status, read_to_string_lossy(&path))
}

/// Like [`run`], but panics with the full output if the command succeeds.
pub fn run_fail(cmd: &str, args: &[&str]) -> Output {
    let o = run(cmd, args);
    if o.success() {
        panic!("command unexpectedly succeeded\n{}", o.describe());
    }
    o
}

/// Polls `cond` every 20 ms until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

pub fn read_to_string_lossy(path: &Path) -> String {
    fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

/// Kills a child on drop (and reaps it).
pub fn kill_child(child: &mut Child) {
    if let Ok(None) = child.try_wait() {
        let _ = child.kill();
    }
    let _ = child.wait();
}

/// Waits (at most `timeout`) for `child` to exit; its status, or None if
/// it is still running.
pub fn wait_child_exit(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let mut status = None;
    wait_until(timeout, || {
        status = child.try_wait().ok().flatten();
        status.is_some()
    });
    status
}

pub fn spawn_logged(cmd: &str, args: &[&str], log: &Path) -> Child {
    let logf = File::create(log).expect("create log");
    Command::new(cmd)
        .args(args)
        .stdin(Stdio::null())
        .stdout(logf.try_clone().expect("dup log"))
        .stderr(logf)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot spawn `{}`: {e}", command_line(cmd, args)))
}
