//! Shared harness for the integration tests.
//!
//! Every helper here drives real programs (the `nbdfault` binary, qemu-nbd,
//! nbdkit, libnbd tools, qemu-img/qemu-io) with hard timeouts, and panics
//! with everything the program printed when something goes wrong.
#![allow(dead_code)]

use std::fs::{self, File};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// How long a spawned server may take to become ready.
pub const START_TIMEOUT: Duration = Duration::from_secs(20);
/// Hard limit for any single external command run by [`run`].
pub const RUN_TIMEOUT: Duration = Duration::from_secs(120);

/// The python interpreter that has the libnbd bindings (`nbd` module).
/// A pyenv python earlier on PATH usually lacks it, so never rely on PATH.
pub const SYSTEM_PYTHON: &str = "/usr/bin/python3";

pub fn nbdfault_bin() -> &'static str {
    env!("CARGO_BIN_EXE_nbdfault")
}

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

/// Panics with an installation hint unless the system python can `import nbd`.
pub fn require_python_nbd() {
    let ok = Command::new(SYSTEM_PYTHON)
        .args(["-c", "import nbd"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        panic!(
            "{SYSTEM_PYTHON} cannot `import nbd`: install python3-libnbd (scripts/test.sh does it)"
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

fn command_line(cmd: &str, args: &[&str]) -> String {
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

/// Runs `cmd args...` with stdin closed, under [`RUN_TIMEOUT`].
/// Panics (after killing it) if the command does not finish in time.
pub fn run(cmd: &str, args: &[&str]) -> Output {
    run_with_timeout(cmd, args, RUN_TIMEOUT)
}

pub fn run_with_timeout(cmd: &str, args: &[&str], timeout: Duration) -> Output {
    require_tool(cmd);
    let line = command_line(cmd, args);
    let mut child = Command::new(cmd)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot spawn `{line}`: {e}"));
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

fn read_to_string_lossy(path: &Path) -> String {
    fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

/// Kills a child on drop (and reaps it).
fn kill_child(child: &mut Child) {
    if let Ok(None) = child.try_wait() {
        let _ = child.kill();
    }
    let _ = child.wait();
}

// ---------------------------------------------------------------------------
// The binary under test.
// ---------------------------------------------------------------------------

/// A running `nbdfault` process that announced `Listening on URI`.
pub struct Nbdfault {
    child: Child,
    pub uri: String,
    /// Lines printed on stdout after the `Listening on` line.
    stdout_rest: mpsc::Receiver<String>,
    stderr_path: PathBuf,
    pub args: Vec<String>,
    _dir: TempDir,
}

impl Nbdfault {
    /// Spawns `nbdfault ARGS...` and waits (at most 20 s) for its
    /// `Listening on URI` line. Panics with the captured stderr on timeout
    /// or early exit.
    pub fn start(args: &[&str]) -> Nbdfault {
        let dir = TempDir::new().expect("tempdir");
        let stderr_path = dir.path().join("nbdfault.stderr");
        let stderr_file = File::create(&stderr_path).expect("create stderr log");
        let line = command_line(nbdfault_bin(), args);
        let mut child = Command::new(nbdfault_bin())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr_file)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn `{line}`: {e}"));

        let (tx, rx) = mpsc::channel::<String>();
        let stdout = child.stdout.take().unwrap();
        thread::spawn(move || {
            // Keep draining stdout for the whole life of the process so it
            // never blocks or dies of SIGPIPE.
            for l in BufReader::new(stdout).lines() {
                match l {
                    Ok(l) => {
                        if tx.send(l).is_err() {
                            // Receiver gone: keep draining silently.
                        }
                    }
                    Err(_) => break,
                }
            }
        });

        let deadline = Instant::now() + START_TIMEOUT;
        let mut seen = Vec::new();
        let uri = loop {
            match rx.recv_timeout(Duration::from_millis(50)) {
                Ok(l) => {
                    if let Some(uri) = l.strip_prefix("Listening on ") {
                        break uri.trim().to_string();
                    }
                    seen.push(l);
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    // stdout closed: the process exited (or closed stdout).
                    let _ = wait_until(Duration::from_secs(2), || {
                        matches!(child.try_wait(), Ok(Some(_)))
                    });
                    let status = child.try_wait().ok().flatten();
                    kill_child(&mut child);
                    panic!(
                        "`{line}` closed stdout without printing `Listening on URI` (exit status: {status:?})\n--- stdout ---\n{}\n--- stderr ---\n{}",
                        seen.join("\n"),
                        read_to_string_lossy(&stderr_path)
                    );
                }
            }
            if let Ok(Some(status)) = child.try_wait() {
                // Give the reader a moment to deliver a last line.
                if let Ok(l) = rx.recv_timeout(Duration::from_millis(200)) {
                    if let Some(uri) = l.strip_prefix("Listening on ") {
                        panic!(
                            "`{line}` printed `Listening on {uri}` but exited with {status}\n--- stderr ---\n{}",
                            read_to_string_lossy(&stderr_path)
                        );
                    }
                    seen.push(l);
                }
                panic!(
                    "`{line}` exited with {status} before printing `Listening on URI`\n--- stdout ---\n{}\n--- stderr ---\n{}",
                    seen.join("\n"),
                    read_to_string_lossy(&stderr_path)
                );
            }
            if Instant::now() >= deadline {
                kill_child(&mut child);
                panic!(
                    "`{line}` did not print `Listening on URI` within {START_TIMEOUT:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
                    seen.join("\n"),
                    read_to_string_lossy(&stderr_path)
                );
            }
        };
        assert!(
            seen.is_empty(),
            "`{line}` printed something before `Listening on`: {seen:?}"
        );
        Nbdfault {
            child,
            uri,
            stdout_rest: rx,
            stderr_path,
            args: args.iter().map(|s| s.to_string()).collect(),
            _dir: dir,
        }
    }

    /// `nbdfault proxy --listen 127.0.0.1:0 --upstream UPSTREAM`.
    pub fn proxy(upstream: &str) -> Nbdfault {
        Nbdfault::start(&["proxy", "--listen", "127.0.0.1:0", "--upstream", upstream])
    }

    /// `nbdfault proxy --listen LISTEN --upstream UPSTREAM`.
    pub fn proxy_on(listen: &str, upstream: &str) -> Nbdfault {
        Nbdfault::start(&["proxy", "--listen", listen, "--upstream", upstream])
    }

    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// Everything the process wrote on stderr so far.
    pub fn stderr(&self) -> String {
        read_to_string_lossy(&self.stderr_path)
    }

    /// Lines the process printed on stdout after `Listening on` (so far).
    pub fn more_stdout(&self) -> Vec<String> {
        self.stdout_rest.try_iter().collect()
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Polls the stderr log until it contains `needle` (or `timeout` passes).
    pub fn wait_for_stderr(&self, needle: &str, timeout: Duration) -> bool {
        wait_until(timeout, || self.stderr().contains(needle))
    }
}

impl Drop for Nbdfault {
    fn drop(&mut self) {
        kill_child(&mut self.child);
    }
}

// ---------------------------------------------------------------------------
// Real NBD servers.
// ---------------------------------------------------------------------------

/// `nbd+unix:///?socket=PATH`
pub fn unix_uri(sock: &Path) -> String {
    format!("nbd+unix:///?socket={}", sock.display())
}

/// Inserts an export name into an NBD URI
/// (`nbd://h:p` → `nbd://h:p/NAME`, `nbd+unix:///?socket=S` → `nbd+unix:///NAME?socket=S`).
pub fn uri_with_export(uri: &str, name: &str) -> String {
    let (scheme, rest) = uri.split_once("://").expect("URI has a scheme");
    let (authority_path, query) = match rest.split_once('?') {
        Some((a, q)) => (a, Some(q)),
        None => (rest, None),
    };
    let authority = authority_path
        .split_once('/')
        .map(|(a, _)| a)
        .unwrap_or(authority_path);
    let mut out = format!("{scheme}://{authority}/{name}");
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out
}

/// Waits until something accepts connections on the unix socket `sock`,
/// while `child` is still alive. Panics with `log`'s content otherwise.
fn wait_for_unix_socket(child: &mut Child, sock: &Path, what: &str, log: &Path) {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "{what} exited with {status} before listening on {}\n--- its output ---\n{}",
                sock.display(),
                read_to_string_lossy(log)
            );
        }
        if UnixStream::connect(sock).is_ok() {
            return;
        }
        if Instant::now() >= deadline {
            kill_child(child);
            panic!(
                "{what} did not listen on {} within {START_TIMEOUT:?}\n--- its output ---\n{}",
                sock.display(),
                read_to_string_lossy(log)
            );
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// A qemu-nbd serving one image on a unix socket.
pub struct QemuNbd {
    child: Child,
    pub sock: PathBuf,
    log: PathBuf,
    dir: TempDir,
}

impl QemuNbd {
    /// `qemu-nbd -f raw --persistent --shared=16 -k SOCK FILE`
    pub fn raw(file: &Path) -> QemuNbd {
        QemuNbd::start("raw", file, &[])
    }

    /// `qemu-nbd -f FORMAT --persistent --shared=16 -k SOCK EXTRA... FILE`
    /// with the socket in a fresh temporary directory.
    pub fn start(format: &str, file: &Path, extra: &[&str]) -> QemuNbd {
        let dir = TempDir::new().expect("tempdir");
        let sock = dir.path().join("qemu-nbd.sock");
        QemuNbd::start_at_in(dir, &sock, format, file, extra)
    }

    /// Like [`QemuNbd::start`] but listening on the given socket path.
    pub fn start_at(sock: &Path, format: &str, file: &Path, extra: &[&str]) -> QemuNbd {
        let dir = TempDir::new().expect("tempdir");
        QemuNbd::start_at_in(dir, sock, format, file, extra)
    }

    fn start_at_in(
        dir: TempDir,
        sock: &Path,
        format: &str,
        file: &Path,
        extra: &[&str],
    ) -> QemuNbd {
        require_tool("qemu-nbd");
        let log = dir.path().join("qemu-nbd.log");
        let sock_s = sock.to_str().expect("utf-8 path").to_string();
        let file_s = file.to_str().expect("utf-8 path").to_string();
        let mut args: Vec<&str> = vec!["-f", format, "--persistent", "--shared=16", "-k", &sock_s];
        args.extend_from_slice(extra);
        args.push(&file_s);
        let logf = File::create(&log).expect("create log");
        let mut child = Command::new("qemu-nbd")
            .args(&args)
            .stdin(Stdio::null())
            .stdout(logf.try_clone().expect("dup log"))
            .stderr(logf)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn qemu-nbd: {e}"));
        wait_for_unix_socket(&mut child, sock, "qemu-nbd", &log);
        QemuNbd {
            child,
            sock: sock.to_path_buf(),
            log,
            dir,
        }
    }

    pub fn uri(&self) -> String {
        unix_uri(&self.sock)
    }

    pub fn log(&self) -> String {
        read_to_string_lossy(&self.log)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        kill_child(&mut self.child);
    }
}

/// An nbdkit serving on a unix socket (or on TCP, see [`Nbdkit::start_tcp`]).
pub struct Nbdkit {
    child: Child,
    /// Unix socket path, if listening on a unix socket.
    pub sock: Option<PathBuf>,
    /// TCP port on 127.0.0.1, if listening on TCP.
    pub port: Option<u16>,
    log: PathBuf,
    _dir: TempDir,
}

impl Nbdkit {
    /// `nbdkit -f -U SOCK ARGS...`, e.g. `&["memory", "64M"]`,
    /// `&["--no-sr", "memory", "64M"]`, `&["-o", "memory", "64M"]`.
    pub fn start(args: &[&str]) -> Nbdkit {
        require_tool("nbdkit");
        let dir = TempDir::new().expect("tempdir");
        let sock = dir.path().join("nbdkit.sock");
        let log = dir.path().join("nbdkit.log");
        let sock_s = sock.to_str().unwrap().to_string();
        let mut all: Vec<&str> = vec!["-f", "-U", &sock_s];
        all.extend_from_slice(args);
        let mut child = spawn_logged("nbdkit", &all, &log);
        wait_for_unix_socket(&mut child, &sock, "nbdkit", &log);
        Nbdkit {
            child,
            sock: Some(sock),
            port: None,
            log,
            _dir: dir,
        }
    }

    /// `nbdkit -f -i 127.0.0.1 -p 0 ARGS...`: nbdkit picks a free port, which
    /// is found through /proc (no port-guessing races).
    pub fn start_tcp(args: &[&str]) -> Nbdkit {
        require_tool("nbdkit");
        let dir = TempDir::new().expect("tempdir");
        let log = dir.path().join("nbdkit.log");
        let mut all: Vec<&str> = vec!["-f", "-i", "127.0.0.1", "-p", "0"];
        all.extend_from_slice(args);
        let mut child = spawn_logged("nbdkit", &all, &log);
        let deadline = Instant::now() + START_TIMEOUT;
        let port = loop {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "nbdkit exited with {status} before listening\n--- its output ---\n{}",
                    read_to_string_lossy(&log)
                );
            }
            if let Some(port) = listening_tcp_port(child.id())
                && std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
            {
                break port;
            }
            if Instant::now() >= deadline {
                kill_child(&mut child);
                panic!(
                    "nbdkit did not listen on TCP within {START_TIMEOUT:?}\n--- its output ---\n{}",
                    read_to_string_lossy(&log)
                );
            }
            thread::sleep(Duration::from_millis(20));
        };
        Nbdkit {
            child,
            sock: None,
            port: Some(port),
            log,
            _dir: dir,
        }
    }

    pub fn uri(&self) -> String {
        match (&self.sock, self.port) {
            (Some(sock), _) => unix_uri(sock),
            (None, Some(port)) => format!("nbd://127.0.0.1:{port}"),
            _ => unreachable!(),
        }
    }

    pub fn log(&self) -> String {
        read_to_string_lossy(&self.log)
    }
}

impl Drop for Nbdkit {
    fn drop(&mut self) {
        kill_child(&mut self.child);
    }
}

fn spawn_logged(cmd: &str, args: &[&str], log: &Path) -> Child {
    let logf = File::create(log).expect("create log");
    Command::new(cmd)
        .args(args)
        .stdin(Stdio::null())
        .stdout(logf.try_clone().expect("dup log"))
        .stderr(logf)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot spawn `{}`: {e}", command_line(cmd, args)))
}

/// The TCP port `pid` listens on (IPv4), found via /proc/PID/fd and /proc/net/tcp.
fn listening_tcp_port(pid: u32) -> Option<u16> {
    let mut inodes = Vec::new();
    for entry in fs::read_dir(format!("/proc/{pid}/fd")).ok()? {
        let Ok(entry) = entry else { continue };
        if let Ok(target) = fs::read_link(entry.path()) {
            let t = target.to_string_lossy();
            if let Some(inode) = t.strip_prefix("socket:[").and_then(|s| s.strip_suffix(']')) {
                inodes.push(inode.to_string());
            }
        }
    }
    let tcp = fs::read_to_string("/proc/net/tcp").ok()?;
    for line in tcp.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        // sl local rem st tx:rx tr:when retrnsmt uid timeout inode
        if f.len() < 10 || f[3] != "0A" || !inodes.iter().any(|i| i == f[9]) {
            continue;
        }
        let port_hex = f[1].rsplit(':').next()?;
        return u16::from_str_radix(port_hex, 16).ok();
    }
    None
}

// ---------------------------------------------------------------------------
// Clients.
// ---------------------------------------------------------------------------

/// Runs a Python snippet with `h`, an `nbd.NBD()` handle connected to `uri`
/// (and the `nbd` module imported). Returns what the snippet printed.
/// Panics with the full output if the snippet fails.
pub fn nbdsh(uri: &str, script: &str) -> String {
    let prelude = "import nbd, sys\nh = nbd.NBD()\nh.connect_uri(sys.argv[1])\n";
    python(&format!("{prelude}{script}\n"), &[uri])
}

/// Runs a Python snippet with the system python (which has the `nbd` module);
/// `args` are available as `sys.argv[1..]`. Returns stdout; panics on failure.
pub fn python(script: &str, args: &[&str]) -> String {
    let o = python_output(script, args);
    if !o.success() {
        panic!(
            "python snippet failed\n{}\n--- script ---\n{script}",
            o.describe()
        );
    }
    o.stdout
}

/// Like [`python`] but returns the [`Output`] whatever the exit status.
pub fn python_output(script: &str, args: &[&str]) -> Output {
    require_python_nbd();
    let mut all = vec!["-c", script];
    all.extend_from_slice(args);
    run(SYSTEM_PYTHON, &all)
}

/// `nbdinfo ARGS...` (full output, whatever the status).
pub fn nbdinfo(args: &[&str]) -> Output {
    run("nbdinfo", args)
}

/// Parses JSON (panicking with the text on error).
pub fn parse_json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("invalid JSON ({e}):\n{text}"))
}

/// Removes every `uri` key anywhere in a JSON value.
pub fn strip_uri_keys(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(map) => {
            map.remove("uri");
            for (_, x) in map.iter_mut() {
                strip_uri_keys(x);
            }
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(strip_uri_keys),
        _ => {}
    }
}

/// Replaces every occurrence of each `uris` entry (longest first) by `<URI>`.
pub fn mask_uris(text: &str, uris: &[&str]) -> String {
    let mut sorted: Vec<&str> = uris.to_vec();
    sorted.sort_by_key(|u| std::cmp::Reverse(u.len()));
    let mut out = text.to_string();
    for u in sorted {
        out = out.replace(u, "<URI>");
    }
    out
}

/// Masks the timing part of qemu-io statistics lines, e.g.
/// `1 MiB, 1 ops; 00.00 sec (521.618 MiB/sec and 521.6185 ops/sec)`
/// → `1 MiB, 1 ops; <timing>`.
pub fn mask_qemu_io_timing(text: &str) -> String {
    text.lines()
        .map(|l| match l.find(" ops; ") {
            Some(i) => format!("{} ops; <timing>", &l[..i]),
            None => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Asserts two texts are equal line by line, showing the first difference.
pub fn assert_same_lines(what: &str, direct: &str, proxied: &str) {
    if direct == proxied {
        return;
    }
    let d: Vec<&str> = direct.lines().collect();
    let p: Vec<&str> = proxied.lines().collect();
    let n = d.len().max(p.len());
    for i in 0..n {
        let a = d.get(i).copied().unwrap_or("<missing>");
        let b = p.get(i).copied().unwrap_or("<missing>");
        if a != b {
            panic!(
                "{what}: direct and proxied differ at line {}:\n  direct:  {a:?}\n  proxied: {b:?}\n--- direct ---\n{direct}\n--- proxied ---\n{proxied}",
                i + 1
            );
        }
    }
    panic!(
        "{what}: direct and proxied differ (whitespace/line endings):\n--- direct ---\n{direct:?}\n--- proxied ---\n{proxied:?}"
    );
}

// ---------------------------------------------------------------------------
// Data files.
// ---------------------------------------------------------------------------

/// Deterministic pseudo-random bytes (xorshift64*), different for each seed.
pub struct PseudoRandom(u64);

impl PseudoRandom {
    pub fn new(seed: u64) -> Self {
        // Avoid the all-zero state; mix the seed a little.
        PseudoRandom(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// Deterministic pseudo-random bytes.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    PseudoRandom::new(seed).fill(&mut v);
    v
}

/// Writes `size` pseudo-random bytes to `path`.
pub fn write_random_file(path: &Path, size: u64, seed: u64) {
    let mut f = File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    let mut rng = PseudoRandom::new(seed);
    let mut buf = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        rng.fill(&mut buf[..n]);
        f.write_all(&buf[..n]).expect("write");
        left -= n as u64;
    }
    f.sync_all().ok();
}

/// Creates a sparse file of `size` bytes with `data` written at each offset.
pub fn write_sparse_file(path: &Path, size: u64, pieces: &[(u64, &[u8])]) {
    use std::os::unix::fs::FileExt;
    let f = File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    f.set_len(size).expect("set_len");
    for (off, data) in pieces {
        f.write_all_at(data, *off).expect("write_at");
    }
    f.sync_all().ok();
}

/// Creates an empty sparse file of `size` bytes.
pub fn create_sparse(path: &Path, size: u64) {
    write_sparse_file(path, size, &[]);
}

/// Panics unless the two files have identical length and bytes, naming the
/// first differing offset.
pub fn assert_files_equal(a: &Path, b: &Path) {
    let la = fs::metadata(a)
        .unwrap_or_else(|e| panic!("{}: {e}", a.display()))
        .len();
    let lb = fs::metadata(b)
        .unwrap_or_else(|e| panic!("{}: {e}", b.display()))
        .len();
    assert_eq!(
        la,
        lb,
        "{} and {} differ in length",
        a.display(),
        b.display()
    );
    assert_prefix_equal(a, b, la);
}

/// Panics unless the first `len` bytes of the two files are identical.
pub fn assert_prefix_equal(a: &Path, b: &Path, len: u64) {
    let mut fa = BufReader::with_capacity(1 << 20, File::open(a).expect("open a"));
    let mut fb = BufReader::with_capacity(1 << 20, File::open(b).expect("open b"));
    let mut ba = vec![0u8; 1 << 20];
    let mut bb = vec![0u8; 1 << 20];
    let mut off = 0u64;
    while off < len {
        let n = ((len - off) as usize).min(ba.len());
        fa.read_exact(&mut ba[..n])
            .unwrap_or_else(|e| panic!("{}: short read at {off}: {e}", a.display()));
        fb.read_exact(&mut bb[..n])
            .unwrap_or_else(|e| panic!("{}: short read at {off}: {e}", b.display()));
        if ba[..n] != bb[..n] {
            let i = ba[..n]
                .iter()
                .zip(&bb[..n])
                .position(|(x, y)| x != y)
                .unwrap();
            panic!(
                "{} and {} differ at byte offset {} ({:#04x} vs {:#04x})",
                a.display(),
                b.display(),
                off + i as u64,
                ba[i],
                bb[i]
            );
        }
        off += n as u64;
    }
}

/// Panics unless the file is `len` bytes long and all zero.
pub fn assert_file_zero(path: &Path, len: u64) {
    let got = fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .len();
    assert_eq!(got, len, "{} has the wrong length", path.display());
    let mut f = BufReader::with_capacity(1 << 20, File::open(path).expect("open"));
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0u64;
    loop {
        let n = f.read(&mut buf).expect("read");
        if n == 0 {
            break;
        }
        if let Some(i) = buf[..n].iter().position(|&b| b != 0) {
            panic!(
                "{} is not all zero: byte {:#04x} at offset {}",
                path.display(),
                buf[i],
                off + i as u64
            );
        }
        off += n as u64;
    }
}

impl Nbdfault {
    /// Waits (at most `timeout`) for the process to exit; its status.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}
