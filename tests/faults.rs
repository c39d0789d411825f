//! Faults, end to end: the real binary with rules files, in front of real
//! servers (qemu-nbd on a raw file, the built-in null server, a recording
//! stand-in server), driven by real clients (qemu-io, libnbd from Python,
//! nbdinfo, and a byte-counting raw client).
//!
//! Each test asserts what the user sees — qemu-io's exact lines, libnbd's
//! exact error text, byte-exact data, what reached the server — and then
//! that the proxy is still running and serves the next client correctly.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use tempfile::TempDir;

const MIB: u64 = 1 << 20;
/// Size of the backend disk.
const DISK: u64 = 64 * MIB;

/// What qemu-io prints for a good 64 KiB read at offset 0.
const READ_64K_AT_0: &str = "read 65536/65536 bytes at offset 0\n64 KiB, 1 ops; <timing>";
/// What qemu-io prints for a good 4 KiB read at offset 0.
const READ_4K_AT_0: &str = "read 4096/4096 bytes at offset 0\n4 KiB, 1 ops; <timing>";

// ---------------------------------------------------------------------------
// The lab: a disk with known content behind qemu-nbd, rules files, proxies.
// ---------------------------------------------------------------------------

/// A 64 MiB raw disk served by qemu-nbd. Unless made with [`Lab::random`],
/// `[0, 1 MiB)` holds 0xa5, `[1 MiB, 2 MiB)` holds 0x11 and the rest reads
/// zero (a hole); tests write at 4 MiB and above.
struct Lab {
    dir: TempDir,
    disk: PathBuf,
    qemu: QemuNbd,
}

impl Lab {
    fn new() -> Lab {
        let dir = TempDir::new().unwrap();
        let disk = dir.path().join("disk.raw");
        let a5 = vec![0xa5u8; MIB as usize];
        let x11 = vec![0x11u8; MIB as usize];
        write_sparse_file(&disk, DISK, &[(0, &a5), (MIB, &x11)]);
        let qemu = QemuNbd::raw(&disk);
        Lab { dir, disk, qemu }
    }

    /// A disk of `size` pseudo-random bytes.
    fn random(size: u64, seed: u64) -> Lab {
        let dir = TempDir::new().unwrap();
        let disk = dir.path().join("disk.raw");
        write_random_file(&disk, size, seed);
        let qemu = QemuNbd::raw(&disk);
        Lab { dir, disk, qemu }
    }

    /// qemu-nbd's own URI, bypassing the proxy.
    fn direct(&self) -> String {
        self.qemu.uri()
    }

    /// Writes a rules file into the lab's directory.
    fn rules(&self, name: &str, text: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    fn proxy(&self, rules: &Path) -> Nbdfault {
        start_proxy(&self.direct(), &[rules], &[])
    }

    fn proxy_with(&self, rules: &Path, extra: &[&str]) -> Nbdfault {
        start_proxy(&self.direct(), &[rules], extra)
    }

    /// Asserts qemu-nbd is alive and serves a direct client correctly.
    fn assert_server_ok(&self) {
        let out = qio(&self.direct(), &["read -P 0xa5 0 64k"]);
        assert_eq!(
            out,
            READ_64K_AT_0,
            "qemu-nbd no longer serves\n--- qemu-nbd log ---\n{}",
            self.qemu.log()
        );
    }
}

/// `nbdfault proxy --listen 127.0.0.1:0 --upstream U --rules R... EXTRA...`
fn start_proxy(upstream: &str, rules: &[&Path], extra: &[&str]) -> Nbdfault {
    let mut args = vec!["proxy", "--listen", "127.0.0.1:0", "--upstream", upstream];
    for r in rules {
        args.push("--rules");
        args.push(r.to_str().expect("utf-8 path"));
    }
    args.extend_from_slice(extra);
    Nbdfault::start(&args)
}

/// The path of a shipped scenario.
fn scenario(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("rules")
        .join(format!("{name}.yaml"))
}

/// Asserts the proxy is still running and that a fresh client reads the
/// 0xa5 region through it correctly.
fn assert_serves(proxy: &mut Nbdfault) {
    assert!(
        proxy.is_running(),
        "the proxy exited\n--- stderr ---\n{}",
        proxy.stderr()
    );
    let o = qemu_io(proxy.uri(), &["read -P 0xa5 0 64k"]);
    assert_eq!(
        mask_qemu_io_timing(&o.stdout),
        READ_64K_AT_0,
        "the proxy no longer serves a fresh client\n{}\n--- proxy stderr ---\n{}",
        o.describe(),
        proxy.stderr()
    );
    assert!(proxy.is_running());
}

// ---------------------------------------------------------------------------
// Clients.
// ---------------------------------------------------------------------------

/// qemu-io's stdout with timings masked.
fn qio(uri: &str, cmds: &[&str]) -> String {
    mask_qemu_io_timing(&qemu_io(uri, cmds).stdout)
}

/// Python prelude: `nbd`, `sys`, `time` imported; `safe(f, *a)` returns
/// "ok" or "ERR <errno> <message>" as libnbd reports it.
const PY_PRELUDE: &str = r#"
import nbd, sys, time
def safe(f, *a):
    try:
        f(*a)
        return "ok"
    except nbd.Error as e:
        return "ERR %s %s" % (e.errno, e.string)
"#;

/// Runs `script` with `h` connected to `uri`; extra arguments follow as
/// sys.argv[2..]. Returns stdout; panics if the script fails.
fn py(uri: &str, script: &str, extra: &[&str]) -> String {
    let mut args = vec![uri];
    args.extend_from_slice(extra);
    python(
        &format!("{PY_PRELUDE}\nh = nbd.NBD()\nh.connect_uri(sys.argv[1])\n{script}\n"),
        &args,
    )
}

/// Like [`py`], but `h` is not connected yet.
fn py_unconnected(uri: &str, script: &str) -> String {
    python(&format!("{PY_PRELUDE}\nh = nbd.NBD()\n{script}\n"), &[uri])
}

/// A client that speaks just enough NBD to count bytes: fixed newstyle,
/// NBD_OPT_EXPORT_NAME, no zeroes, simple replies. It sends one request
/// and reports how many bytes came back and how the connection ended:
/// `eof` (FIN), `reset` (RST) or `open` (still open after WAIT seconds).
const RAW_CLIENT: &str = r#"
import socket, struct, sys, time
host, port, cmd = sys.argv[1], int(sys.argv[2]), sys.argv[3]
off, length, wait = int(sys.argv[4]), int(sys.argv[5]), float(sys.argv[6])
s = socket.create_connection((host, port), timeout=10)
def exact(n):
    b = b""
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c:
            sys.exit("handshake cut after %d of %d bytes" % (len(b), n))
        b += c
    return b
assert exact(18)[:16] == b"NBDMAGICIHAVEOPT"
s.sendall(struct.pack(">I", 3) + b"IHAVEOPT" + struct.pack(">II", 1, 0))
exact(10)
kind = {"read": 0, "write": 1}[cmd]
req = struct.pack(">IHHQQI", 0x25609513, 0, kind, 0x1122334455667788, off, length)
if kind == 1:
    req += b"\x3c" * length
try:
    s.sendall(req)
except OSError as e:
    pass
s.settimeout(wait)
got = b""
end = "open"
try:
    while True:
        c = s.recv(1 << 16)
        if not c:
            end = "eof"
            break
        got += c
except ConnectionResetError:
    end = "reset"
except socket.timeout:
    pass
print("got %d end %s head %s" % (len(got), end, got[:16].hex()))
if len(sys.argv) > 7:
    # Probe the dead connection: a send after a reset fails at once.
    time.sleep(0.3)
    try:
        s.sendall(b"\0" * 28)
        print("send ok")
    except OSError as e:
        print("send", e.__class__.__name__)
"#;

/// The simple reply the raw client gets for its request (cookie
/// 0x1122334455667788, no error), as hex.
const RAW_REPLY_HEX: &str = "67446698000000001122334455667788";

#[derive(Debug, PartialEq, Eq)]
struct RawResult {
    got: u64,
    end: String,
    head: String,
}

/// Runs [`RAW_CLIENT`] against `nbd://HOST:PORT`.
fn raw_client(uri: &str, cmd: &str, offset: u64, length: u32, wait_secs: f64) -> RawResult {
    raw_client_run(uri, cmd, offset, length, wait_secs, false).0
}

/// Like [`raw_client`], then sends on the dead connection and says how
/// that went: `ok`, or the exception (`BrokenPipeError` once a reset came).
fn raw_client_probe(uri: &str, cmd: &str, offset: u64, length: u32) -> (RawResult, String) {
    raw_client_run(uri, cmd, offset, length, 5.0, true)
}

fn raw_client_run(
    uri: &str,
    cmd: &str,
    offset: u64,
    length: u32,
    wait_secs: f64,
    probe: bool,
) -> (RawResult, String) {
    let hostport = uri
        .strip_prefix("nbd://")
        .and_then(|s| s.split('/').next())
        .unwrap_or_else(|| panic!("not a TCP NBD URI: {uri}"));
    let (host, port) = hostport.rsplit_once(':').expect("HOST:PORT");
    let mut args = vec![
        host.to_string(),
        port.to_string(),
        cmd.to_string(),
        offset.to_string(),
        length.to_string(),
        wait_secs.to_string(),
    ];
    if probe {
        args.push("probe".to_string());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = python(RAW_CLIENT, &args);
    let mut lines = out.lines();
    let first = lines.next().unwrap_or("");
    let f: Vec<&str> = first.split_whitespace().collect();
    assert!(f.len() >= 4 && f[0] == "got" && f[2] == "end", "{out}");
    let result = RawResult {
        got: f[1].parse().unwrap(),
        end: f[3].to_string(),
        head: f.get(5).unwrap_or(&"").to_string(),
    };
    let after = lines
        .next()
        .and_then(|l| l.strip_prefix("send "))
        .unwrap_or("")
        .to_string();
    (result, after)
}

/// A stand-in NBD server on a unix socket that records, per connection,
/// every byte it received after the handshake and how the connection
/// ended. Options other than NBD_OPT_EXPORT_NAME get NBD_REP_ERR_UNSUP; it
/// never answers a request.
const RECORDER: &str = r#"
import socket, struct, sys
path, log = sys.argv[1], sys.argv[2]
srv = socket.socket(socket.AF_UNIX)
srv.bind(path)
srv.listen(8)
print("ready", flush=True)
def exact(c, n):
    b = b""
    while len(b) < n:
        x = c.recv(n - len(b))
        if not x:
            raise EOFError
        b += x
    return b
while True:
    c, _ = srv.accept()
    got = b""
    try:
        c.sendall(b"NBDMAGICIHAVEOPT" + struct.pack(">H", 3))
        exact(c, 4)
        while True:
            _, opt, ln = struct.unpack(">QII", exact(c, 16))
            exact(c, ln)
            if opt == 1:
                c.sendall(struct.pack(">QH", 64 << 20, 1))
                break
            if opt == 2:
                raise EOFError
            c.sendall(struct.pack(">QIII", 0x3e889045565a9, opt, 0x80000001, 0))
        end = "eof"
        while True:
            x = c.recv(1 << 16)
            if not x:
                break
            got += x
    except EOFError:
        end = "handshake"
    except ConnectionResetError:
        end = "reset"
    c.close()
    with open(log, "a") as f:
        f.write("%s %d %s\n" % (end, len(got), got.hex()))
"#;

struct Recorder {
    child: Child,
    sock: PathBuf,
    log: PathBuf,
    _dir: TempDir,
}

impl Recorder {
    fn start() -> Recorder {
        require_python_nbd();
        let dir = TempDir::new().unwrap();
        let sock = dir.path().join("recorder.sock");
        let log = dir.path().join("recorder.log");
        let mut child = Command::new(SYSTEM_PYTHON)
            .args([
                "-c",
                RECORDER,
                sock.to_str().unwrap(),
                log.to_str().unwrap(),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn the recorder");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .expect("recorder stdout");
        assert_eq!(line.trim(), "ready", "the recorder did not start");
        Recorder {
            child,
            sock,
            log,
            _dir: dir,
        }
    }

    fn target(&self) -> String {
        self.sock.to_str().unwrap().to_string()
    }

    /// Waits for the first connection to end; returns its record.
    fn first(&self) -> String {
        let mut text = String::new();
        let ok = wait_until(Duration::from_secs(10), || {
            text = std::fs::read_to_string(&self.log).unwrap_or_default();
            text.ends_with('\n')
        });
        assert!(ok, "the recorder saw no connection end");
        text.lines().next().unwrap().to_string()
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------
// The fault log and the proxy's sockets.
// ---------------------------------------------------------------------------

/// The proxy's fault log lines, from `fault ` on (timestamp, level and
/// target dropped).
fn fault_lines(p: &Nbdfault) -> Vec<String> {
    const AT: &str = "nbdfault::fault: fault ";
    p.stderr()
        .lines()
        .filter_map(|l| {
            l.find(AT)
                .map(|i| l[i + AT.len() - "fault ".len()..].to_string())
        })
        .collect()
}

/// Whether a fault line says this rule fired this action on this event
/// (an empty `rule` or `event`: any).
fn is_fault(line: &str, rule: &str, action: &str, event: &str) -> bool {
    (rule.is_empty() || field(line, "rule") == rule)
        && field(line, "action") == action
        && (event.is_empty() || field(line, "event") == event)
}

/// Waits (at most 10 s) for at least `n` fault lines and returns them all.
fn wait_faults(p: &Nbdfault, n: usize) -> Vec<String> {
    let mut lines = Vec::new();
    let ok = wait_until(Duration::from_secs(10), || {
        lines = fault_lines(p);
        lines.len() >= n
    });
    assert!(
        ok,
        "expected {n} fault line(s)\n--- stderr ---\n{}",
        p.stderr()
    );
    lines
}

/// The value of `key=` in a fault line, quotes removed.
fn field<'a>(line: &'a str, key: &str) -> &'a str {
    let prefix = format!("{key}=");
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(prefix.as_str()))
        .map(|v| v.trim_matches('"'))
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"))
}

/// Number of sockets the process holds (listener, connections, runtime).
fn socket_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(Result::ok)
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .filter(|t| t.to_string_lossy().starts_with("socket:"))
                .count()
        })
        .unwrap_or(0)
}

/// Waits until the proxy holds `n` sockets again.
fn assert_sockets_back_to(p: &Nbdfault, n: usize) {
    let mut now = 0;
    let ok = wait_until(Duration::from_secs(10), || {
        now = socket_count(p.pid());
        now == n
    });
    assert!(
        ok,
        "the proxy holds {now} sockets, {n} before the client came\n--- stderr ---\n{}",
        p.stderr()
    );
}

// ---------------------------------------------------------------------------
// The shipped scenarios, rules/*.yaml, each exercised as its header says.
// ---------------------------------------------------------------------------

/// One command of a scenario's comment and what the comment says it
/// prints (the `>` lines after it).
struct Said {
    cmd: String,
    expect: Vec<String>,
}

/// The `#   CMD` and `#   > OUTPUT` lines of a rules file's comment.
fn comment_commands(text: &str) -> Vec<Said> {
    let mut said: Vec<Said> = Vec::new();
    for line in text.lines().take_while(|l| l.starts_with('#')) {
        let Some(rest) = line.strip_prefix("#   ") else {
            continue;
        };
        match (rest.strip_prefix("> "), said.last_mut()) {
            (Some(out), Some(last)) => last.expect.push(out.to_string()),
            (Some(_), None) => panic!("output before any command: {line:?}"),
            (None, _) => said.push(Said {
                cmd: rest.to_string(),
                expect: Vec::new(),
            }),
        }
    }
    said
}

/// Whether an output line is what the comment says, where `<N>` stands for
/// a number and qemu-io's timings (`00.00 sec (...)`) for any.
fn line_matches(expect: &str, got: &str) -> bool {
    let (expect, got) = (mask_qemu_io_timing(expect), mask_qemu_io_timing(got));
    let mut parts = expect.split("<N>");
    let Some(first) = parts.next() else {
        return false;
    };
    let Some(mut rest) = got.strip_prefix(first) else {
        return false;
    };
    for part in parts {
        let digits = rest.len() - rest.trim_start_matches(|c: char| c.is_ascii_digit()).len();
        if digits == 0 {
            return false;
        }
        match rest[digits..].strip_prefix(part) {
            Some(r) => rest = r,
            None => return false,
        }
    }
    rest.is_empty()
}

/// Runs one scenario's comment as the README's reader would: `qemu-img
/// create` a sparse 1G raw disk, qemu-nbd on it, the comment's proxy
/// command (on a free port instead of 10809, so tests run side by side;
/// `server.port=10809` in `--image-opts` is changed to match),
/// then each command with the proxy's URI and a private /tmp, checking
/// its merged output line by line against the `>` lines (`...`: the rest
/// is not checked), its exit status against `(exit status N)` and its
/// duration against `(at least N s)`.
fn check_comment(file: &Path) {
    let name = file.file_name().unwrap().to_string_lossy().into_owned();
    let said = comment_commands(&std::fs::read_to_string(file).unwrap());
    assert!(said.len() >= 2, "{name}: no commands in its comment");
    let dir = TempDir::new().unwrap();
    let tmp = format!("{}/", dir.path().display());
    let disk = dir.path().join("disk.img");
    run_ok(
        "qemu-img",
        &["create", "-f", "raw", disk.to_str().unwrap(), "1G"],
    );
    let sock = dir.path().join("qemu-nbd.sock");
    let _qemu = QemuNbd::start_at(&sock, "raw", &disk, &[]);
    let rules = format!("{}/rules/", env!("CARGO_MANIFEST_DIR"));
    let proxy_cmd = said[0]
        .cmd
        .strip_suffix(" &")
        .unwrap_or_else(|| panic!("{name}: the proxy goes into the background"))
        .replace("/tmp/qemu-nbd.sock", sock.to_str().unwrap())
        .replace("rules/", &rules);
    let args: Vec<&str> = proxy_cmd
        .strip_prefix("nbdfault ")
        .unwrap_or_else(|| panic!("{name}: the first command is not nbdfault"))
        .split_whitespace()
        .chain(["--listen", "127.0.0.1:0"])
        .collect();
    let proxy = Nbdfault::start(&args);
    for s in &said[1..] {
        let port = proxy.uri().rsplit(':').next().unwrap_or_default();
        let cmd = s
            .cmd
            .replace("nbd://127.0.0.1:10809", proxy.uri())
            .replace("server.port=10809", &format!("server.port={port}"))
            .replace("/tmp/", &tmp);
        let start = Instant::now();
        let (status, out) = run_merged("sh", &["-c", &cmd], Duration::from_secs(60));
        let took = start.elapsed();
        let what = format!(
            "{name}: `{}`\n--- output ---\n{out}--- proxy stderr ---\n{}",
            s.cmd,
            proxy.stderr()
        );
        let mut lines = out.lines();
        let mut rest_free = false;
        for e in &s.expect {
            if let Some(n) = e
                .strip_prefix("(exit status ")
                .and_then(|r| r.strip_suffix(')'))
            {
                assert_eq!(status.code(), n.parse().ok(), "{what}");
            } else if let Some(n) = e
                .strip_prefix("(at least ")
                .and_then(|r| r.strip_suffix(" s)"))
            {
                let n: u64 = n.parse().unwrap();
                assert!(took >= Duration::from_secs(n), "took {took:?}\n{what}");
            } else if e == "..." {
                rest_free = true;
            } else {
                let got = lines.next().unwrap_or("(nothing)");
                assert!(line_matches(e, got), "expected {e:?}, got {got:?}\n{what}");
            }
        }
        if !rest_free {
            assert_eq!(
                lines.next(),
                None,
                "more output than the comment says\n{what}"
            );
        }
    }
}

/// Every rules/*.yaml comment holds: its commands, run as written on the
/// README's disk, print what it says.
#[test]
fn scenario_comments_hold_on_the_readme_disk() {
    require_tool("qemu-img");
    require_tool("qemu-io");
    require_tool("nbdcopy");
    require_tool("nbdinfo");
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("rules");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    // Side by side: the slow ones (a held flush, a lost reply) set the pace.
    std::thread::scope(|scope| {
        for f in &files {
            scope.spawn(move || check_comment(f));
        }
    });
}

/// Every scenario in rules/ has a test here.
#[test]
fn every_shipped_scenario_is_exercised() {
    let tested = [
        "bit-rot-reads",
        "cut-mid-read",
        "flaky-reads",
        "full-disk",
        "lost-reply",
        "no-structured-replies",
        // In tests/shaping.rs, with the other rate and segment faults.
        "short-segments",
        "slow-flush",
        "throttle-64k",
        "torn-write",
        "truncated-request",
    ];
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("rules");
    let mut shipped: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .map(|p| p.file_stem().unwrap().to_string_lossy().into_owned())
        .collect();
    // Scenarios over time (outages, reconnects, states) are run by
    // tests/reconnect.rs, with QEMU's reconnect options.
    let elsewhere = ["outage-1s", "reconnect-after-write", "second-flush-fails"];
    shipped.retain(|s| !elsewhere.contains(&s.as_str()));
    shipped.sort();
    assert_eq!(shipped, tested, "a scenario in rules/ has no test here");
}

/// flaky-reads: about 1 read in 100 fails with EIO; the failing reads are
/// the same for the same seed and differ for another; every read that
/// succeeds returns the right data.
#[test]
fn scenario_flaky_reads() {
    let lab = Lab::random(16 * MIB, 99);
    let script = r#"
data = open(sys.argv[2], "rb").read()
B = 16384
fails, msgs, bad = [], set(), 0
for i in range(len(data) // B):
    try:
        if h.pread(B, i * B) != data[i * B:(i + 1) * B]:
            bad += 1
    except nbd.Error as e:
        fails.append(str(i))
        msgs.add("%s %s" % (e.errno, e.string))
print("bad", bad)
print("msgs", "|".join(sorted(msgs)))
print("fails", ",".join(fails))
"#;
    let disk = lab.disk.to_str().unwrap().to_string();
    let run_with = |extra: &[&str]| -> (String, usize) {
        let mut proxy = lab.proxy_with(&scenario("flaky-reads"), extra);
        let out = py(proxy.uri(), script, &[&disk]);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], "bad 0", "a read that succeeded was wrong\n{out}");
        let fails = lines[2].strip_prefix("fails ").unwrap_or("").to_string();
        let n = fails.split(',').filter(|s| !s.is_empty()).count();
        assert!(
            (2..=40).contains(&n),
            "{n} of 1024 reads failed at p=0.01\n{out}"
        );
        assert_eq!(
            lines[1], "msgs EIO nbd_pread: read: command failed: Input/output error",
            "{out}"
        );
        let faults = wait_faults(&proxy, n);
        assert_eq!(faults.len(), n, "{faults:#?}");
        for f in &faults {
            assert!(is_fault(f, "flaky-reads", "error", "request"), "{f}");
        }
        assert!(proxy.is_running());
        // A handshake still works (reads themselves may be unlucky).
        let size = run_ok("nbdinfo", &["--size", proxy.uri()]);
        assert_eq!(size.trim(), (16 * MIB).to_string());
        (fails, n)
    };
    let (a, _) = run_with(&["--seed", "42"]);
    let (b, _) = run_with(&["--seed", "42"]);
    let (c, _) = run_with(&["--seed", "43"]);
    assert_eq!(a, b, "same seed, different failing reads");
    assert_ne!(a, c, "another seed, same failing reads");
    // The file's own seed (1) is what --seed 1 gives.
    let (d, _) = run_with(&[]);
    let (e, _) = run_with(&["--seed", "1"]);
    assert_eq!(
        d, e,
        "the file's seed and --seed with the same value differ"
    );
    assert_ne!(a, d);
}

/// full-disk: every write and write-zeroes fails with ENOSPC and never
/// reaches the server; reads and trims still work.
#[test]
fn scenario_full_disk() {
    let lab = Lab::new();
    let mut proxy = lab.proxy(&scenario("full-disk"));
    let out = qio(
        proxy.uri(),
        &[
            "write -P 0xcc 4M 64k",
            "write -z 0 64k",
            "read -P 0xa5 0 64k",
            "discard 8M 64k",
        ],
    );
    assert_same_lines(
        "qemu-io on a full disk",
        "write failed: No space left on device
write failed: No space left on device
read 65536/65536 bytes at offset 0
64 KiB, 1 ops; <timing>
discard 65536/65536 bytes at offset 8388608
64 KiB, 1 ops; <timing>",
        &out,
    );
    // The server never saw either write.
    let direct = qio(&lab.direct(), &["read -P 0 4M 64k", "read -P 0xa5 0 64k"]);
    assert_same_lines(
        "the disk after refused writes",
        "read 65536/65536 bytes at offset 4194304
64 KiB, 1 ops; <timing>
read 65536/65536 bytes at offset 0
64 KiB, 1 ops; <timing>",
        &direct,
    );
    let out = py(
        proxy.uri(),
        r#"
print(safe(h.pwrite, b"x" * 4096, 4 << 20))
print(safe(h.zero, 4096, 4 << 20))
print(safe(h.trim, 4096, 8 << 20))
print(safe(h.pread, 4096, 0))
"#,
        &[],
    );
    assert_same_lines(
        "libnbd on a full disk",
        "ERR ENOSPC nbd_pwrite: write: command failed: No space left on device
ERR ENOSPC nbd_zero: write-zeroes: command failed: No space left on device
ok
ok
",
        &out,
    );
    let faults = wait_faults(&proxy, 4);
    assert_eq!(faults.len(), 4, "{faults:#?}");
    for f in &faults {
        assert_eq!(field(f, "rule"), "full-disk");
        assert_eq!(field(f, "action"), "error");
        assert_eq!(field(f, "event"), "request");
        assert_eq!(field(f, "direction"), "to-server");
    }
    assert_serves(&mut proxy);
}

/// slow-flush: a flush is acknowledged two seconds late; reads and writes
/// are not held.
#[test]
fn scenario_slow_flush() {
    let lab = Lab::new();
    let mut proxy = lab.proxy(&scenario("slow-flush"));
    let out = py(
        proxy.uri(),
        r#"
def timed(what, f, *a):
    t = time.monotonic()
    f(*a)
    print(what, "%.3f" % (time.monotonic() - t))
timed("read", h.pread, 65536, 0)
timed("write", h.pwrite, b"y" * 65536, 4 << 20)
timed("flush", h.flush)
timed("read", h.pread, 4096, 4 << 20)
"#,
        &[],
    );
    let times: Vec<(String, f64)> = out
        .lines()
        .map(|l| {
            let (w, t) = l.split_once(' ').unwrap();
            (w.to_string(), t.parse().unwrap())
        })
        .collect();
    assert_eq!(times.len(), 4, "{out}");
    for (what, t) in &times {
        if what == "flush" {
            assert!((2.0..15.0).contains(t), "flush took {t} s\n{out}");
        } else {
            assert!(*t < 1.5, "{what} took {t} s: only flush is slow\n{out}");
        }
    }
    let faults = wait_faults(&proxy, 1);
    assert_eq!(faults.len(), 1, "{faults:#?}");
    assert!(
        is_fault(&faults[0], "slow-flush", "delay", "reply"),
        "{faults:#?}"
    );
    // The data went through (the flush itself was only late).
    let direct = qio(&lab.direct(), &["read -P 0x79 4M 64k"]);
    assert!(direct.starts_with("read 65536/65536"), "{direct}");
    assert_serves(&mut proxy);
}

/// torn-write: the first write lands on the disk but the client is told it
/// failed.
#[test]
fn scenario_torn_write() {
    let lab = Lab::new();
    let mut proxy = lab.proxy(&scenario("torn-write"));
    let out = qio(proxy.uri(), &["write -P 0xab 4M 64k"]);
    assert_eq!(out, "write failed: Input/output error");
    // ...yet the data is there.
    let direct = qio(&lab.direct(), &["read -P 0xab 4M 64k"]);
    assert_eq!(
        direct,
        "read 65536/65536 bytes at offset 4194304\n64 KiB, 1 ops; <timing>"
    );
    // Only the first write: the next one succeeds.
    let out = qio(proxy.uri(), &["write -P 0xcd 4M 4k", "read -P 0xcd 4M 4k"]);
    assert_same_lines(
        "after the torn write",
        "wrote 4096/4096 bytes at offset 4194304
4 KiB, 1 ops; <timing>
read 4096/4096 bytes at offset 4194304
4 KiB, 1 ops; <timing>",
        &out,
    );
    assert_serves(&mut proxy);

    // libnbd (structured replies rather than QEMU's extended headers).
    let proxy = lab.proxy(&scenario("torn-write"));
    let out = py(
        proxy.uri(),
        r#"
print(safe(h.pwrite, b"\xee" * 4096, 8 << 20))
print(safe(h.pwrite, b"\xef" * 4096, 12 << 20))
"#,
        &[],
    );
    assert_eq!(
        out,
        "ERR EIO nbd_pwrite: write: command failed: Input/output error\nok\n"
    );
    let direct = qio(
        &lab.direct(),
        &["read -P 0xee 8M 4k", "read -P 0xef 12M 4k"],
    );
    assert!(!direct.contains("Pattern verification failed"), "{direct}");
    let faults = wait_faults(&proxy, 1);
    assert_eq!(field(&faults[0], "event"), "reply");
    assert_eq!(field(&faults[0], "direction"), "to-client");
}

/// lost-reply: the answer to the fifth read never comes; the client waits
/// until its own timeout; the proxy goes on serving.
#[test]
fn scenario_lost_reply() {
    let lab = Lab::new();
    let mut proxy = lab.proxy(&scenario("lost-reply"));
    let before = socket_count(proxy.pid());
    let out = py(
        proxy.uri(),
        r#"
for i in range(4):
    h.pread(4096, 0)
print("four reads")
def wait(secs):
    deadline = time.monotonic() + secs
    while time.monotonic() < deadline:
        h.poll(100)
fifth = h.aio_pread(nbd.Buffer(4096), 0)
wait(2)
print("fifth done:", h.aio_command_completed(fifth))
# The connection still works: the next read is answered.
sixth = h.aio_pread(nbd.Buffer(4096), 65536)
wait(0.5)
print("sixth done:", h.aio_command_completed(sixth))
print("in flight:", h.aio_in_flight())
"#,
        &[],
    );
    assert_eq!(
        out,
        "four reads\nfifth done: False\nsixth done: True\nin flight: 1\n"
    );
    let faults = wait_faults(&proxy, 1);
    assert_eq!(faults.len(), 1, "{faults:#?}");
    assert!(
        is_fault(&faults[0], "lost-reply", "drop", "reply"),
        "{faults:#?}"
    );
    // The client gave up and left: its connection is gone.
    assert_sockets_back_to(&proxy, before);
    assert_serves(&mut proxy);

    // qemu-io has no request timeout: it waits until killed.
    let mut proxy = lab.proxy(&scenario("lost-reply"));
    qemu_io_hangs(proxy.uri(), &["read 0 4k"; 5], 3);
    assert_serves(&mut proxy);
}

/// cut-mid-read: 1000 bytes of the first read's data reach the client, then
/// the connection closes.
#[test]
fn scenario_cut_mid_read() {
    let lab = Lab::new();
    let mut proxy = lab.proxy(&scenario("cut-mid-read"));
    let out = qio(proxy.uri(), &["read -P 0xa5 0 64k"]);
    assert_eq!(out, "read failed: Input/output error");
    let faults = wait_faults(&proxy, 1);
    assert!(
        is_fault(&faults[0], "cut-mid-read", "disconnect", "data"),
        "{faults:#?}"
    );
    assert_eq!(field(&faults[0], "direction"), "to-client");
    assert_serves(&mut proxy);

    // Byte-exact: the simple reply's 16 bytes, then exactly 1000 of data.
    let proxy = lab.proxy(&scenario("cut-mid-read"));
    let r = raw_client(proxy.uri(), "read", 0, 65536, 5.0);
    assert_eq!(
        r,
        RawResult {
            got: 16 + 1000,
            end: "eof".into(),
            head: RAW_REPLY_HEX.into()
        }
    );
    lab.assert_server_ok();
}

/// no-structured-replies: the client must fall back to simple replies.
#[test]
fn scenario_no_structured_replies() {
    let lab = Lab::new();
    let mut proxy = lab.proxy(&scenario("no-structured-replies"));
    let direct = run_ok("nbdinfo", &[&lab.direct()]);
    assert!(
        direct.starts_with("protocol: newstyle-fixed without TLS, using structured packets"),
        "{direct}"
    );
    let proxied = run_ok("nbdinfo", &[proxy.uri()]);
    assert!(
        proxied.starts_with("protocol: newstyle-fixed without TLS, using simple packets"),
        "{proxied}"
    );
    let json = parse_json(&run_ok("nbdinfo", &["--json", proxy.uri()]));
    assert_eq!(json["structured"], false, "{json}");
    assert_eq!(json["exports"][0]["export-size"], DISK, "{json}");

    // qemu-io still works, on simple replies.
    let out = qio(
        proxy.uri(),
        &[
            "write -P 0x3c 4M 64k",
            "read -P 0x3c 4M 64k",
            "read -P 0 2M 64k",
        ],
    );
    assert_same_lines(
        "qemu-io on simple replies",
        "wrote 65536/65536 bytes at offset 4194304
64 KiB, 1 ops; <timing>
read 65536/65536 bytes at offset 4194304
64 KiB, 1 ops; <timing>
read 65536/65536 bytes at offset 2097152
64 KiB, 1 ops; <timing>",
        &out,
    );
    let out = py(
        proxy.uri(),
        "print(h.get_structured_replies_negotiated())",
        &[],
    );
    assert_eq!(out, "False\n");
    for f in wait_faults(&proxy, 3) {
        assert_eq!(field(&f, "event"), "export", "{f}");
        assert_eq!(field(&f, "action"), "error", "{f}");
    }
    assert_serves(&mut proxy);
}

/// bit-rot-reads: one bit of every read flips on its way to the client; the
/// disk is intact.
#[test]
fn scenario_bit_rot_reads() {
    let lab = Lab::new();
    let mut proxy = lab.proxy(&scenario("bit-rot-reads"));
    let out = qio(proxy.uri(), &["read -P 0xa5 0 64k"]);
    assert_same_lines(
        "qemu-io through bit rot",
        "Pattern verification failed at offset 0, 65536 bytes
read 65536/65536 bytes at offset 0
64 KiB, 1 ops; <timing>",
        &out,
    );
    let direct = qio(&lab.direct(), &["read -P 0xa5 0 64k"]);
    assert_eq!(direct, READ_64K_AT_0);
    let script = r#"
b = h.pread(65536, 0)
print(sum(bin(x ^ 0xa5).count("1") for x in b))
"#;
    assert_eq!(py(proxy.uri(), script, &[]), "1\n", "exactly one bit flips");
    assert_eq!(py(&lab.direct(), script, &[]), "0\n");
    // Still serving: writes are untouched and land intact.
    assert!(proxy.is_running());
    let out = qio(proxy.uri(), &["write -P 0x77 4M 4k"]);
    assert!(out.starts_with("wrote 4096/4096"), "{out}");
    let direct = qio(&lab.direct(), &["read -P 0x77 4M 4k"]);
    assert!(direct.starts_with("read 4096/4096"), "{direct}");
}

/// truncated-request: the server gets the first 12 bytes of the first
/// write request, then the connection is cut; the server survives.
#[test]
fn scenario_truncated_request() {
    let lab = Lab::new();
    let mut proxy = lab.proxy(&scenario("truncated-request"));
    let out = qio(proxy.uri(), &["write -P 0x3c 4M 4k"]);
    assert_eq!(out, "write failed: Input/output error");
    // qemu-nbd dropped that client and serves others.
    lab.assert_server_ok();
    assert_eq!(qio(&lab.direct(), &["read -P 0 4M 4k"]).lines().count(), 2);
    assert_serves(&mut proxy);

    // What the server received, byte for byte: magic, flags, type (write),
    // and the first 4 bytes of the cookie.
    let rec = Recorder::start();
    let proxy = start_proxy(&rec.target(), &[&scenario("truncated-request")], &[]);
    let r = raw_client(proxy.uri(), "write", 0, 4096, 5.0);
    assert_eq!(r.got, 0, "{r:?}");
    assert_ne!(r.end, "open", "{r:?}");
    assert_eq!(rec.first(), "eof 12 256095130000000111223344");
}

// ---------------------------------------------------------------------------
// disconnect
// ---------------------------------------------------------------------------

/// `when` is exact: the raw client counts the bytes it gets before the
/// connection closes, for cuts on the request, the reply and the read data.
/// A cut toward the server that leaves bytes of the client unread resets
/// the client's connection, as the kernel of a server dying then would.
#[test]
fn disconnect_when_before_after_n_is_byte_exact() {
    let lab = Lab::new();
    // (event, when, bytes the client gets, how its connection ends)
    let cases: &[(&str, &str, u64, &str)] = &[
        ("request", "when: before", 0, "reset"),
        ("request", "when: 10", 0, "reset"),
        ("reply", "when: before", 0, "eof"),
        ("reply", "when: 4", 4, "eof"),
        ("reply", "when: 12", 12, "eof"),
        ("reply", "when: after", 16, "eof"),
        ("data", "when: before", 16, "eof"),
        ("data", "when: 1000", 16 + 1000, "eof"),
        ("data", "when: after", 16 + 65536, "eof"),
    ];
    for (i, (event, when, expect, end)) in cases.iter().enumerate() {
        let rules = lab.rules(
            &format!("cut-{i}.yaml"),
            &format!(
                "rules:\n  - name: cut\n    event: {event}\n    command: read\n    {when}\n    times: 1\n"
            ),
        );
        let mut proxy = lab.proxy(&rules);
        let r = raw_client(proxy.uri(), "read", 0, 65536, 5.0);
        let what = format!("disconnect on {event} {when}: {r:?}");
        assert_eq!(r.got, *expect, "{what}");
        assert_eq!(r.end, *end, "{what}");
        let shown = (*expect).min(16) as usize * 2;
        assert_eq!(r.head, RAW_REPLY_HEX[..shown], "{what}");
        let faults = wait_faults(&proxy, 1);
        assert_eq!(field(&faults[0], "event"), *event, "{what}");
        assert_eq!(field(&faults[0], "action"), "disconnect", "{what}");
        let dir = if *event == "request" {
            "to-server"
        } else {
            "to-client"
        };
        assert_eq!(field(&faults[0], "direction"), dir, "{what}");
        assert_serves(&mut proxy);
    }
    lab.assert_server_ok();
}

/// What qemu-io and libnbd report when the connection is cut before a
/// request, in the middle of a reply, or in the middle of read data.
#[test]
fn disconnect_seen_by_qemu_io_and_libnbd() {
    let lab = Lab::new();
    let cases: &[(&str, &str, &str)] = &[
        (
            "event: request\n    when: before",
            "ERR ECONNRESET nbd_pread: recv: Connection reset by peer",
            "ERR EINVAL nbd_pread: invalid state: DEAD: the handle must be connected with the server: Invalid argument",
        ),
        (
            "event: reply\n    when: 4",
            "ERR None nbd_pread: recv: server disconnected unexpectedly",
            "ERR EINVAL nbd_pread: invalid state: DEAD: the handle must be connected with the server: Invalid argument",
        ),
        (
            "event: data\n    when: 1000",
            "ERR None nbd_pread: recv: server disconnected unexpectedly",
            "ERR EINVAL nbd_pread: invalid state: DEAD: the handle must be connected with the server: Invalid argument",
        ),
    ];
    for (i, (rule, first, second)) in cases.iter().enumerate() {
        let rules = lab.rules(
            &format!("d{i}.yaml"),
            &format!(
                "rules:\n  - {rule}\n    command: read\n    per-connection: true\n    times: 1\n"
            ),
        );
        let mut proxy = lab.proxy(&rules);
        // The connection is gone: every later command fails too.
        let out = qio(proxy.uri(), &["read -P 0xa5 0 64k", "read -P 0xa5 0 64k"]);
        assert_eq!(
            out, "read failed: Input/output error\nread failed: Input/output error",
            "{rule}"
        );
        let out = py(
            proxy.uri(),
            "print(safe(h.pread, 65536, 0))\nprint(safe(h.pread, 65536, 0))",
            &[],
        );
        assert_eq!(out, format!("{first}\n{second}\n"), "{rule}");
        assert_eq!(wait_faults(&proxy, 2).len(), 2);
        // per-connection and times: 1: a new connection is cut again.
        let o = qemu_io(proxy.uri(), &["read 0 4k"]);
        assert_eq!(o.stdout, "read failed: Input/output error\n", "{rule}");
        assert!(proxy.is_running());
    }
    lab.assert_server_ok();
}

/// Cuts toward the server: before the write request, after its header
/// (the server waits for the payload that never comes), part-way into the
/// payload, and after the payload (the write lands). qemu-nbd survives all.
#[test]
fn disconnect_toward_the_server_on_writes() {
    let lab = Lab::new();
    let missing_payload = "Failed to read CMD_WRITE data";
    // (rule, offset written, whether the data lands, whether qemu-nbd
    // complains of a missing payload)
    let cases: &[(&str, &str, bool, bool)] = &[
        ("event: request\n    when: before", "4M", false, false),
        ("event: request\n    when: after", "5M", false, true),
        (
            "event: data\n    direction: to-server\n    when: 4096",
            "6M",
            false,
            true,
        ),
        (
            "event: data\n    direction: to-server\n    when: after",
            "7M",
            true,
            false,
        ),
    ];
    for (i, (rule, at, lands, complains)) in cases.iter().enumerate() {
        let rules = lab.rules(
            &format!("w{i}.yaml"),
            &format!("rules:\n  - {rule}\n    command: write\n    times: 1\n"),
        );
        let mut proxy = lab.proxy(&rules);
        let before = lab.qemu.log().matches(missing_payload).count();
        let out = qio(proxy.uri(), &[&format!("write -P 0x5e {at} 64k")]);
        assert_eq!(out, "write failed: Input/output error", "{rule}");
        let pattern = if *lands { "0x5e" } else { "0" };
        let check = || qio(&lab.direct(), &[&format!("read -P {pattern} {at} 64k")]);
        let mut direct = check();
        if *lands {
            // The whole write reached qemu-nbd before the cut, but it
            // may still be writing it when the proxy's client has its
            // answer: wait for it.
            wait_until(Duration::from_secs(10), || {
                direct = check();
                !direct.contains("Pattern verification failed")
            });
        }
        assert!(
            !direct.contains("Pattern verification failed"),
            "{rule}: data {} on the disk\n{direct}",
            if *lands { "missing" } else { "found" }
        );
        if *complains {
            let ok = wait_until(Duration::from_secs(10), || {
                lab.qemu.log().matches(missing_payload).count() > before
            });
            assert!(ok, "{rule}\n--- qemu-nbd log ---\n{}", lab.qemu.log());
        }
        lab.assert_server_ok();
        assert_serves(&mut proxy);
    }
}

/// `reset: true` closes the client's connection with a bare TCP reset (no
/// FIN first), where the default is an orderly end of stream.
#[test]
fn disconnect_with_reset() {
    let lab = Lab::new();
    for (reset, end, after) in [(true, "reset", "BrokenPipeError"), (false, "eof", "ok")] {
        let rules = lab.rules(
            &format!("reset-{reset}.yaml"),
            &format!("rules:\n  - event: reply\n    action: disconnect\n    reset: {reset}\n    times: 1\n"),
        );
        let mut proxy = lab.proxy(&rules);
        let (r, sent) = raw_client_probe(proxy.uri(), "read", 0, 4096);
        assert_eq!((r.got, r.end.as_str()), (0, end), "reset: {reset}: {r:?}");
        // A reset connection refuses a send at once; after a FIN only the
        // proxy's side is closed.
        assert_eq!(sent, after, "reset: {reset}: {r:?}");
        assert_serves(&mut proxy);
    }
    let rules = lab.rules(
        "reset.yaml",
        "rules:\n  - event: reply\n    action: disconnect\n    reset: true\n    times: 1\n",
    );
    let mut proxy = lab.proxy(&rules);
    let out = py(proxy.uri(), "print(safe(h.pread, 4096, 0))", &[]);
    assert_eq!(
        out,
        "ERR ECONNRESET nbd_pread: recv: Connection reset by peer\n"
    );
    lab.assert_server_ok();
    assert_serves(&mut proxy);
}

// ---------------------------------------------------------------------------
// error
// ---------------------------------------------------------------------------

/// One read-request rule per errno, told apart by offset.
const ERRNO_RULES: &str = "rules:
  - {name: e1, event: request, command: read, offset: 1MiB..2MiB, action: error, errno: EPERM}
  - {name: e2, event: request, command: read, offset: 2MiB..3MiB, action: error, errno: EIO}
  - {name: e3, event: request, command: read, offset: 3MiB..4MiB, action: error, errno: ENOMEM}
  - {name: e4, event: request, command: read, offset: 4MiB..5MiB, action: error, errno: EINVAL}
  - {name: e5, event: request, command: read, offset: 5MiB..6MiB, action: error, errno: ENOSPC}
  - {name: e6, event: request, command: read, offset: 6MiB..7MiB, action: error, errno: EOVERFLOW}
  - {name: e7, event: request, command: read, offset: 7MiB..8MiB, action: error, errno: ENOTSUP}
  - {name: e8, event: request, command: read, offset: 8MiB..9MiB, action: error, errno: ESHUTDOWN}
";

const ERRNO_TEXTS: [(&str, &str); 8] = [
    ("EPERM", "Operation not permitted"),
    ("EIO", "Input/output error"),
    ("ENOMEM", "Cannot allocate memory"),
    ("EINVAL", "Invalid argument"),
    ("ENOSPC", "No space left on device"),
    ("EOVERFLOW", "Value too large for defined data type"),
    ("ENOTSUP", "Operation not supported"),
    ("ESHUTDOWN", "Cannot send after transport endpoint shutdown"),
];

/// An error on a request is answered by the proxy, in the reply form the
/// connection negotiated (extended headers with QEMU, structured replies
/// with libnbd, simple replies with the raw client), with every errno.
#[test]
fn error_on_request_every_errno_every_reply_form() {
    let lab = Lab::new();
    let rules = lab.rules("errnos.yaml", ERRNO_RULES);
    let mut proxy = lab.proxy(&rules);

    let cmds: Vec<String> = (1..=8).map(|i| format!("read {i}M 4k")).collect();
    let mut cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
    cmds.push("read -P 0xa5 0 4k");
    let expected: String = ERRNO_TEXTS
        .iter()
        .map(|(_, t)| format!("read failed: {t}\n"))
        .collect::<String>()
        + READ_4K_AT_0;
    assert_same_lines("qemu-io errnos", &expected, &qio(proxy.uri(), &cmds));

    let out = py(
        proxy.uri(),
        "for i in range(1, 10):\n    print(safe(h.pread, 4096, i << 20))",
        &[],
    );
    let expected: String = ERRNO_TEXTS
        .iter()
        .map(|(e, t)| format!("ERR {e} nbd_pread: read: command failed: {t}\n"))
        .collect::<String>()
        + "ok\n";
    assert_same_lines("libnbd errnos", &expected, &out);

    // Simple replies: 16 bytes, the NBD errno (EIO is 5), the cookie, no
    // data; the connection stays open.
    let r = raw_client(proxy.uri(), "read", 2 * MIB, 65536, 1.0);
    assert_eq!(
        r,
        RawResult {
            got: 16,
            end: "open".into(),
            head: "67446698000000051122334455667788".into()
        }
    );
    for f in wait_faults(&proxy, 8 + 8 + 1) {
        assert_eq!(field(&f, "event"), "request", "{f}");
        assert_eq!(field(&f, "action"), "error", "{f}");
    }
    assert_serves(&mut proxy);
}

/// The server never sees a request failed by the proxy, nor its payload.
#[test]
fn error_on_request_never_reaches_the_server() {
    let rec = Recorder::start();
    let dir = TempDir::new().unwrap();
    let rules = dir.path().join("r.yaml");
    std::fs::write(
        &rules,
        "rules:\n  - event: request\n    command: write\n    action: error\n    errno: EPERM\n",
    )
    .unwrap();
    let mut proxy = start_proxy(&rec.target(), &[&rules], &[]);
    let r = raw_client(proxy.uri(), "write", 0, 4096, 1.0);
    // NBD_EPERM is 1.
    assert_eq!(
        r,
        RawResult {
            got: 16,
            end: "open".into(),
            head: "67446698000000011122334455667788".into()
        }
    );
    // The client left: the server got nothing after the handshake.
    assert_eq!(rec.first(), "eof 0 ");
    assert!(proxy.is_running());
}

/// An error on a reply: the server did the read, the client is told it
/// failed — the whole reply (data chunk and hole chunk) is replaced.
#[test]
fn error_on_reply() {
    let lab = Lab::new();
    let rules = lab.rules(
        "reply.yaml",
        "rules:\n  - event: reply\n    command: read\n    action: error\n    errno: EPERM\n    times: 1\n    per-connection: true\n",
    );
    let mut proxy = lab.proxy(&rules);
    // 1.5 MiB..2.5 MiB: 0x11 data, then a hole (two chunks from qemu-nbd).
    let out = qio(
        proxy.uri(),
        &[
            "read 1536k 1M",
            "read -P 0x11 1536k 512k",
            "read -P 0 2M 512k",
        ],
    );
    assert_same_lines(
        "qemu-io with an error reply",
        "read failed: Operation not permitted
read 524288/524288 bytes at offset 1572864
512 KiB, 1 ops; <timing>
read 524288/524288 bytes at offset 2097152
512 KiB, 1 ops; <timing>",
        &out,
    );
    let out = py(
        proxy.uri(),
        r#"
print(safe(h.pread, 1 << 20, 1536 << 10))
b = h.pread(1 << 20, 1536 << 10)
print(b == b"\x11" * (512 << 10) + bytes(512 << 10))
"#,
        &[],
    );
    assert_eq!(
        out,
        "ERR EPERM nbd_pread: read: command failed: Operation not permitted\nTrue\n"
    );
    // Simple replies: the reply and its data are replaced by 16 bytes.
    let r = raw_client(proxy.uri(), "read", 0, 65536, 1.0);
    assert_eq!(
        r,
        RawResult {
            got: 16,
            end: "open".into(),
            head: "67446698000000011122334455667788".into()
        }
    );
    assert_eq!(wait_faults(&proxy, 3).len(), 3);
    // Per connection: a fresh client's first read fails, the next is fine.
    assert!(proxy.is_running());
    let out = qio(proxy.uri(), &["read -P 0xa5 0 64k", "read -P 0xa5 0 64k"]);
    assert_eq!(
        out,
        format!("read failed: Operation not permitted\n{READ_64K_AT_0}")
    );
}

/// NBD_OPT_GO answered NBD_REP_ERR_UNSUP by the proxy: libnbd falls back to
/// NBD_OPT_EXPORT_NAME and works; QEMU falls back too, but qemu-nbd refuses
/// NBD_OPT_EXPORT_NAME once extended headers are negotiated, so qemu-io
/// fails — unless extended headers are refused as well.
#[test]
fn error_on_option_go_unsup() {
    let lab = Lab::new();
    let rules = lab.rules(
        "go.yaml",
        "rules:\n  - name: no-go\n    event: option\n    option: go\n    action: error\n    errno: unsup\n",
    );
    let mut proxy = lab.proxy(&rules);
    let info = run_ok("nbdinfo", &[proxy.uri()]);
    assert!(
        info.starts_with("protocol: newstyle-fixed without TLS, using structured packets"),
        "{info}"
    );
    assert!(info.contains("export-size: 67108864 (64M)"), "{info}");
    let out = py(proxy.uri(), "print(safe(h.pread, 4096, 0))", &[]);
    assert_eq!(out, "ok\n");

    let o = qemu_io(proxy.uri(), &["read 0 4k"]);
    assert_eq!(o.status.code(), Some(1), "{}", o.describe());
    assert_eq!(o.stdout, "", "{}", o.describe());
    assert!(
        o.stderr.contains(&format!(
            "can't open device {}: Failed to read export length",
            proxy.uri()
        )),
        "{}",
        o.describe()
    );
    assert!(
        lab.qemu
            .log()
            .contains("option negotiation failed: Extended headers already negotiated"),
        "{}",
        lab.qemu.log()
    );
    for f in wait_faults(&proxy, 3) {
        assert!(is_fault(&f, "no-go", "error", "export"), "{f}");
    }
    assert!(proxy.is_running());

    // Refusing extended headers and structured replies too: QEMU falls back
    // to NBD_OPT_EXPORT_NAME on simple replies, which qemu-nbd accepts.
    let old = lab.rules(
        "old.yaml",
        "rules:\n  - event: option\n    option: [go, structured-reply, extended-headers]\n    action: error\n    errno: unsup\n",
    );
    let mut proxy = lab.proxy(&old);
    let out = qio(proxy.uri(), &["write -P 0x42 4M 4k", "read -P 0x42 4M 4k"]);
    assert_same_lines(
        "qemu-io over NBD_OPT_EXPORT_NAME",
        "wrote 4096/4096 bytes at offset 4194304
4 KiB, 1 ops; <timing>
read 4096/4096 bytes at offset 4194304
4 KiB, 1 ops; <timing>",
        &out,
    );
    assert_serves(&mut proxy);
}

/// NBD_OPT_GO refused by policy: both clients fail, with the server's
/// message shown by QEMU.
#[test]
fn error_on_option_go_policy() {
    let lab = Lab::new();
    let rules = lab.rules(
        "deny.yaml",
        "rules:\n  - name: deny-go\n    event: option\n    option: go\n    action: error\n    errno: policy\n    times: 3\n",
    );
    let mut proxy = lab.proxy(&rules);
    let o = qemu_io(proxy.uri(), &["read 0 4k"]);
    assert_eq!(o.status.code(), Some(1), "{}", o.describe());
    assert_eq!(
        o.stderr,
        format!(
            "qemu-io: can't open device {}: Denied by server for option 7 (go)\nserver reported: nbdfault: error injected by rule deny-go\n",
            proxy.uri()
        ),
        "{}",
        o.describe()
    );
    let o = nbdinfo(&[proxy.uri()]);
    assert_eq!(o.status.code(), Some(1), "{}", o.describe());
    assert_eq!(
        o.stderr,
        "nbdinfo: nbd_opt_go: server replied with error to opt_go request: Operation not supported\n"
    );
    let out = py_unconnected(
        proxy.uri(),
        r#"
try:
    h.connect_uri(sys.argv[1])
    print("connected")
except nbd.Error as e:
    print("ERR", e.errno, e.string)
"#,
    );
    assert_eq!(
        out,
        "ERR None nbd_connect_uri: handshake: server policy prevents NBD_OPT_GO\n"
    );
    assert_eq!(wait_faults(&proxy, 3).len(), 3);
    // times: 3 is used up.
    assert_serves(&mut proxy);
}

/// NBD_OPT_LIST refused: `nbdinfo --list` fails; connecting still works.
#[test]
fn error_on_option_list() {
    let lab = Lab::new();
    for errno in ["unsup", "policy"] {
        let rules = lab.rules(
            &format!("list-{errno}.yaml"),
            &format!("rules:\n  - event: option\n    option: list\n    action: error\n    errno: {errno}\n"),
        );
        let mut proxy = lab.proxy(&rules);
        let o = nbdinfo(&["--list", proxy.uri()]);
        assert_eq!(o.status.code(), Some(1), "{}", o.describe());
        assert_eq!(
            o.stderr,
            "nbdinfo: nbd_opt_list: server replied with error to list request: Operation not supported\n",
            "{errno}"
        );
        let direct = nbdinfo(&["--list", &lab.direct()]);
        assert!(direct.success(), "{}", direct.describe());
        let size = run_ok("nbdinfo", &["--size", proxy.uri()]);
        assert_eq!(size, "67108864\n");
        assert_serves(&mut proxy);
    }
}

// ---------------------------------------------------------------------------
// delay, stall, drop
// ---------------------------------------------------------------------------

/// Python: times each of `n` reads of 4 KiB at 0, then a write.
const TIMED_IO: &str = r#"
for i in range(int(sys.argv[2])):
    t = time.monotonic()
    h.pread(4096, 0)
    print("read %.3f" % (time.monotonic() - t))
t = time.monotonic()
h.pwrite(b"w" * 4096, 4 << 20)
print("write %.3f" % (time.monotonic() - t))
"#;

fn timings(out: &str) -> Vec<(String, f64)> {
    out.lines()
        .map(|l| {
            let (w, t) = l.split_once(' ').unwrap();
            (w.to_string(), t.parse().unwrap())
        })
        .collect()
}

/// `delay` on read replies: every read is late by the duration; writes are
/// not.
#[test]
fn delay_on_reply() {
    let lab = Lab::new();
    let rules = lab.rules(
        "delay.yaml",
        "rules:\n  - event: reply\n    command: read\n    action: delay\n    duration: 700ms\n",
    );
    let mut proxy = lab.proxy(&rules);
    let out = py(proxy.uri(), TIMED_IO, &["3"]);
    let t = timings(&out);
    assert_eq!(t.len(), 4, "{out}");
    for (what, secs) in &t {
        if what == "read" {
            assert!((0.7..10.0).contains(secs), "{out}");
        } else {
            assert!(*secs < 0.7, "the write was held too\n{out}");
        }
    }
    // The delayed data is right.
    let out = qio(proxy.uri(), &["read -P 0xa5 0 64k"]);
    assert_eq!(out, READ_64K_AT_0);
    assert_eq!(wait_faults(&proxy, 4).len(), 4);
    assert!(proxy.is_running());
}

/// `stall` with a duration: the stalled request is served when it ends.
#[test]
fn stall_with_duration() {
    let lab = Lab::new();
    let rules = lab.rules(
        "stall.yaml",
        "rules:\n  - event: request\n    command: read\n    action: stall\n    duration: 1s\n    times: 1\n    per-connection: true\n",
    );
    let mut proxy = lab.proxy(&rules);
    let out = py(proxy.uri(), TIMED_IO, &["3"]);
    let t = timings(&out);
    assert_eq!(t.len(), 4, "{out}");
    assert!((1.0..10.0).contains(&t[0].1), "{out}");
    for (_, secs) in &t[1..] {
        assert!(*secs < 0.9, "only the first read stalls\n{out}");
    }
    // qemu-io: the stalled read completes, correct, a second later.
    let t = Instant::now();
    let out = qio(proxy.uri(), &["read -P 0xa5 0 64k", "read -P 0xa5 0 64k"]);
    let took = t.elapsed();
    assert_eq!(out, format!("{READ_64K_AT_0}\n{READ_64K_AT_0}"));
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(15),
        "{took:?}"
    );
    let faults = wait_faults(&proxy, 2);
    assert!(is_fault(&faults[0], "", "stall", "request"), "{faults:#?}");
    assert!(proxy.is_running());
}

/// `stall` without a duration: the client waits until its own timeout; when
/// it leaves, the proxy lets go of both sockets and serves others.
#[test]
fn stall_until_the_client_gives_up() {
    let lab = Lab::new();
    let rules = lab.rules(
        "stall.yaml",
        "rules:\n  - event: request\n    command: read\n    offset: 2MiB..\n    action: stall\n",
    );
    let mut proxy = lab.proxy(&rules);
    let idle = socket_count(proxy.pid());
    let out = py(
        proxy.uri(),
        r#"
c = h.aio_pread(nbd.Buffer(4096), 2 << 20)
deadline = time.monotonic() + 2
while time.monotonic() < deadline:
    h.poll(100)
print("done:", h.aio_command_completed(c))
print("sockets:", len([f for f in __import__("os").listdir("/proc/%s/fd" % sys.argv[2])
                       if __import__("os").readlink("/proc/%s/fd/%s" % (sys.argv[2], f)).startswith("socket:")]))
"#,
        &[&proxy.pid().to_string()],
    );
    // While stalled, the proxy holds the client's and the upstream socket.
    assert_eq!(
        out,
        format!("done: False\nsockets: {}\n", idle + 2),
        "{}",
        proxy.stderr()
    );
    // The client left: both sockets are closed.
    assert_sockets_back_to(&proxy, idle);
    assert_serves(&mut proxy);
    // qemu-io waits forever.
    qemu_io_hangs(proxy.uri(), &["read 2M 4k"], 3);
    assert_sockets_back_to(&proxy, idle);
    assert_serves(&mut proxy);
    assert_eq!(wait_faults(&proxy, 2).len(), 2);
}

/// `drop` on a request: the server never sees it, nothing answers, the
/// client waits; later requests on the same connection are served.
#[test]
fn drop_request() {
    let lab = Lab::new();
    let rules = lab.rules(
        "drop.yaml",
        "rules:\n  - event: request\n    command: read\n    action: drop\n    per-connection: true\n    times: 1\n",
    );
    let mut proxy = lab.proxy(&rules);
    let out = py(
        proxy.uri(),
        r#"
first = h.aio_pread(nbd.Buffer(4096), 0)
second = h.aio_pread(nbd.Buffer(4096), 0)
deadline = time.monotonic() + 2
while time.monotonic() < deadline:
    h.poll(100)
print(h.aio_command_completed(first), h.aio_command_completed(second), h.aio_in_flight())
"#,
        &[],
    );
    assert_eq!(out, "False True 1\n");
    qemu_io_hangs(proxy.uri(), &["read 0 4k"], 3);
    let faults = wait_faults(&proxy, 2);
    assert!(is_fault(&faults[0], "", "drop", "request"), "{faults:#?}");
    // The proxy is fine; a client that does not read is not affected.
    assert!(proxy.is_running());
    let size = run_ok("nbdinfo", &["--size", proxy.uri()]);
    assert_eq!(size, "67108864\n");
    lab.assert_server_ok();
}

// ---------------------------------------------------------------------------
// corrupt
// ---------------------------------------------------------------------------

/// XOR the first byte of a reply (its magic): the client sees a protocol
/// error and drops the connection.
#[test]
fn corrupt_reply_magic() {
    let lab = Lab::new();
    let rules = lab.rules(
        "magic.yaml",
        "rules:\n  - event: reply\n    action: corrupt\n    at: 0\n    xor: 0xff\n    times: 1\n    per-connection: true\n",
    );
    let mut proxy = lab.proxy(&rules);
    let out = qio(proxy.uri(), &["read 0 4k", "read 0 4k"]);
    assert_eq!(
        out,
        "read failed: Input/output error\nread failed: Input/output error"
    );
    let out = py(
        proxy.uri(),
        "print(safe(h.pread, 4096, 0))\nprint(safe(h.pread, 4096, 0))",
        &[],
    );
    assert_eq!(
        out,
        "ERR None nbd_pread: invalid reply magic\nERR EINVAL nbd_pread: invalid state: DEAD: the handle must be connected with the server: Invalid argument\n"
    );
    let faults = wait_faults(&proxy, 2);
    assert!(is_fault(&faults[0], "", "corrupt", "reply"), "{faults:#?}");
    assert!(proxy.is_running());
    lab.assert_server_ok();
}

/// Random bits of a write's payload flip on the way to the server: the
/// disk holds the damaged data.
#[test]
fn corrupt_write_payload() {
    let lab = Lab::new();
    let rules = lab.rules(
        "wr.yaml",
        "rules:\n  - event: data\n    direction: to-server\n    command: write\n    action: corrupt\n    bits: 3\n    times: 1\n",
    );
    let mut proxy = lab.proxy(&rules);
    let out = qio(proxy.uri(), &["write -P 0x55 4M 64k"]);
    assert!(out.starts_with("wrote 65536/65536"), "{out}");
    let count = r#"
b = h.pread(65536, 4 << 20)
print(sum(bin(x ^ 0x55).count("1") for x in b))
"#;
    let flipped: u32 = py(&lab.direct(), count, &[]).trim().parse().unwrap();
    // Three flips; two landing on the same bit would undo each other.
    assert!(flipped == 3 || flipped == 1, "{flipped} bits differ");
    let faults = wait_faults(&proxy, 1);
    assert_eq!(field(&faults[0], "direction"), "to-server");
    assert_eq!(field(&faults[0], "event"), "data");
    // Only the first write.
    let out = qio(proxy.uri(), &["write -P 0x56 5M 64k"]);
    assert!(out.starts_with("wrote 65536/65536"), "{out}");
    assert_eq!(
        qio(&lab.direct(), &["read -P 0x56 5M 64k"]).lines().count(),
        2
    );
    assert_serves(&mut proxy);
}

/// XOR the magic of a request on its way to the server: qemu-nbd answers
/// EINVAL and drops that client, and keeps serving others.
#[test]
fn corrupt_request_magic_toward_the_server() {
    let lab = Lab::new();
    let rules = lab.rules(
        "req-magic.yaml",
        "rules:\n  - event: request\n    action: corrupt\n    at: 0\n    xor: 1\n    times: 1\n",
    );
    let mut proxy = lab.proxy(&rules);
    let out = qio(proxy.uri(), &["read 0 4k", "read 0 4k"]);
    assert_eq!(
        out,
        "read failed: Invalid argument\nread failed: Input/output error"
    );
    let faults = wait_faults(&proxy, 1);
    assert_eq!(field(&faults[0], "direction"), "to-server");
    lab.assert_server_ok();
    assert_serves(&mut proxy);
}

// ---------------------------------------------------------------------------
// connect
// ---------------------------------------------------------------------------

#[test]
fn connect_disconnect_refuses_clients() {
    let lab = Lab::new();
    let rules = lab.rules(
        "refuse.yaml",
        "rules:\n  - event: connect\n    action: disconnect\n    times: 2\n",
    );
    let mut proxy = lab.proxy(&rules);
    let o = nbdinfo(&[proxy.uri()]);
    assert_eq!(o.status.code(), Some(1), "{}", o.describe());
    assert_eq!(
        o.stderr,
        "nbdinfo: nbd_connect_uri: recv: server disconnected unexpectedly\n"
    );
    let o = qemu_io(proxy.uri(), &["read 0 4k"]);
    assert_eq!(o.status.code(), Some(1), "{}", o.describe());
    assert_eq!(
        o.stderr,
        format!(
            "qemu-io: can't open device {}: Failed to read initial magic: Unexpected end-of-file before all data were read\n",
            proxy.uri()
        )
    );
    let faults = wait_faults(&proxy, 2);
    assert!(
        is_fault(&faults[0], "rule-1", "disconnect", "connect"),
        "{faults:#?}"
    );
    // times: 2 is used up.
    assert_serves(&mut proxy);
}

#[test]
fn connect_delay_delays_the_handshake() {
    let lab = Lab::new();
    let rules = lab.rules(
        "slow.yaml",
        "rules:\n  - event: connect\n    action: delay\n    duration: 1500ms\n",
    );
    let mut proxy = lab.proxy(&rules);
    let t = Instant::now();
    let size = run_ok("nbdinfo", &["--size", proxy.uri()]);
    let took = t.elapsed();
    assert_eq!(size, "67108864\n");
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_secs(15),
        "{took:?}"
    );
    assert_serves(&mut proxy);
}

// ---------------------------------------------------------------------------
// Filters and counters
// ---------------------------------------------------------------------------

/// `command`: only the named commands are hit.
#[test]
fn filter_command() {
    let lab = Lab::new();
    let rules = lab.rules(
        "cmd.yaml",
        "rules:\n  - event: request\n    command: [flush, trim]\n    action: error\n    errno: EIO\n",
    );
    let mut proxy = lab.proxy(&rules);
    let out = qio(
        proxy.uri(),
        &[
            "discard 4M 64k",
            "write -P 0x31 4M 4k",
            "read -P 0x31 4M 4k",
        ],
    );
    assert_same_lines(
        "qemu-io with flush and trim failing",
        "discard failed: Input/output error
wrote 4096/4096 bytes at offset 4194304
4 KiB, 1 ops; <timing>
read 4096/4096 bytes at offset 4194304
4 KiB, 1 ops; <timing>",
        &out,
    );
    let out = py(
        proxy.uri(),
        r#"
print(safe(h.flush))
print(safe(h.trim, 4096, 4 << 20))
print(safe(h.pwrite, b"p" * 4096, 4 << 20))
print(safe(h.pread, 4096, 4 << 20))
print(safe(h.zero, 4096, 8 << 20))
"#,
        &[],
    );
    assert_eq!(
        out,
        "ERR EIO nbd_flush: flush: command failed: Input/output error
ERR EIO nbd_trim: trim: command failed: Input/output error
ok
ok
ok
"
    );
    assert_serves(&mut proxy);
}

/// `offset`: a rule on reads touching 1MiB..2MiB fires for reads that
/// overlap the range by even one byte, and for no other.
#[test]
fn filter_offset_range() {
    let lab = Lab::new();
    let rules = lab.rules(
        "off.yaml",
        "rules:\n  - event: request\n    command: read\n    offset: 1MiB..2MiB\n    action: error\n    errno: EIO\n",
    );
    let mut proxy = lab.proxy(&rules);
    let out = qio(
        proxy.uri(),
        &[
            "read 1536k 4k",
            "read -P 0xa5 0 4k",
            "read -P 0 2M 4k",
            "read 1020k 8k",
            "read 2097151 1",
            "read -P 0xa5 1044480 4k",
            "write -P 0x11 1536k 4k",
        ],
    );
    assert_same_lines(
        "qemu-io with reads of 1MiB..2MiB failing",
        "read failed: Input/output error
read 4096/4096 bytes at offset 0
4 KiB, 1 ops; <timing>
read 4096/4096 bytes at offset 2097152
4 KiB, 1 ops; <timing>
read failed: Input/output error
read failed: Input/output error
read 4096/4096 bytes at offset 1044480
4 KiB, 1 ops; <timing>
wrote 4096/4096 bytes at offset 1572864
4 KiB, 1 ops; <timing>",
        &out,
    );
    assert_eq!(wait_faults(&proxy, 3).len(), 3);
    assert_serves(&mut proxy);
}

/// `direction` on `data`: to-client corrupts what is read, to-server what
/// is written.
#[test]
fn filter_direction() {
    let lab = Lab::new();
    let count = r#"
b = h.pread(65536, int(sys.argv[2]))
print(sum(bin(x ^ int(sys.argv[3], 0)).count("1") for x in b))
"#;
    let flipped = |uri: &str, offset: u64, pattern: &str| -> String {
        py(uri, count, &[&offset.to_string(), pattern])
            .trim()
            .to_string()
    };
    let to_client = lab.rules(
        "client.yaml",
        "rules:\n  - event: data\n    direction: to-client\n    action: corrupt\n    bits: 1\n",
    );
    let proxy = lab.proxy(&to_client);
    assert_eq!(flipped(proxy.uri(), 0, "0xa5"), "1", "reads are hit");
    let out = qio(proxy.uri(), &["write -P 0x66 4M 64k"]);
    assert!(out.starts_with("wrote"), "{out}");
    assert_eq!(
        flipped(&lab.direct(), 4 * MIB, "0x66"),
        "0",
        "writes are not"
    );

    let to_server = lab.rules(
        "server.yaml",
        "rules:\n  - event: data\n    direction: to-server\n    action: corrupt\n    bits: 1\n",
    );
    let mut proxy = lab.proxy(&to_server);
    assert_eq!(flipped(proxy.uri(), 0, "0xa5"), "0", "reads are not hit");
    let out = qio(proxy.uri(), &["write -P 0x67 5M 64k"]);
    assert!(out.starts_with("wrote"), "{out}");
    assert_eq!(flipped(&lab.direct(), 5 * MIB, "0x67"), "1", "writes are");
    for f in wait_faults(&proxy, 1) {
        assert_eq!(field(&f, "direction"), "to-server", "{f}");
    }
    assert_serves(&mut proxy);
}

/// `after`, `every` and `times`, counted over the reads of one qemu-io
/// session.
#[test]
fn filter_counters_in_one_session() {
    let lab = Lab::new();
    // (counters, which of six reads fail)
    let cases: &[(&str, &[usize])] = &[
        ("after: 2\n    times: 1", &[3]),
        ("every: 2", &[1, 3, 5]),
        ("after: 1\n    every: 2\n    times: 2", &[2, 4]),
        ("after: 4", &[5, 6]),
        ("every: 3\n    times: 5", &[1, 4]),
    ];
    for (i, (counters, failing)) in cases.iter().enumerate() {
        let rules = lab.rules(
            &format!("c{i}.yaml"),
            &format!(
                "rules:\n  - event: request\n    command: read\n    action: error\n    errno: EIO\n    {counters}\n"
            ),
        );
        let mut proxy = lab.proxy(&rules);
        let out = qio(proxy.uri(), &["read -P 0xa5 0 4k"; 6]);
        let expected: Vec<String> = (1..=6)
            .map(|n| {
                if failing.contains(&n) {
                    "read failed: Input/output error".to_string()
                } else {
                    READ_4K_AT_0.to_string()
                }
            })
            .collect();
        assert_same_lines(counters, &expected.join("\n"), &out);
        assert_eq!(
            wait_faults(&proxy, failing.len()).len(),
            failing.len(),
            "{counters}"
        );
        assert!(proxy.is_running());
    }
}

/// Counters are per process unless `per-connection: true`.
#[test]
fn filter_per_connection_and_global_counters() {
    let lab = Lab::new();
    let fail = "read failed: Input/output error";
    let ok = READ_4K_AT_0;
    // (counters, reads per connection, expected outputs of three connections)
    let cases: &[(&str, usize, [&[&str]; 3])] = &[
        ("times: 1", 2, [&[fail, ok], &[ok, ok], &[ok, ok]]),
        (
            "times: 1\n    per-connection: true",
            2,
            [&[fail, ok], &[fail, ok], &[fail, ok]],
        ),
        ("after: 1\n    times: 1", 1, [&[ok], &[fail], &[ok]]),
        (
            "after: 1\n    times: 1\n    per-connection: true",
            2,
            [&[ok, fail], &[ok, fail], &[ok, fail]],
        ),
    ];
    for (i, (counters, reads, conns)) in cases.iter().enumerate() {
        let rules = lab.rules(
            &format!("pc{i}.yaml"),
            &format!(
                "rules:\n  - event: request\n    command: read\n    action: error\n    errno: EIO\n    {counters}\n"
            ),
        );
        let proxy = lab.proxy(&rules);
        for (c, expected) in conns.iter().enumerate() {
            let out = qio(proxy.uri(), &vec!["read -P 0xa5 0 4k"; *reads]);
            assert_same_lines(
                &format!("{counters}: connection {}", c + 1),
                &expected.join("\n"),
                &out,
            );
        }
        // The fault log names the connection each fault hit. (Log lines
        // are written off the data path: the last may come after qemu-io
        // has exited.)
        let expected_conns: Vec<String> = conns
            .iter()
            .enumerate()
            .flat_map(|(c, outs)| {
                outs.iter()
                    .filter(|o| **o == fail)
                    .map(move |_| (c + 1).to_string())
            })
            .collect();
        let conns_hit: Vec<String> = wait_faults(&proxy, expected_conns.len())
            .iter()
            .map(|f| field(f, "conn").to_string())
            .collect();
        assert_eq!(conns_hit, expected_conns, "{counters}");
    }
}

// ---------------------------------------------------------------------------
// The null server, the injector's INI, seeds
// ---------------------------------------------------------------------------

/// The same rules in front of the null server and in front of qemu-nbd:
/// same qemu-io output, same libnbd results, same fault log.
#[test]
fn null_server_faults_behave_the_same() {
    let lab = Lab::new();
    let rules = lab.rules(
        "null.yaml",
        "rules:
  - {name: eio-low, event: request, command: read, offset: ..64KiB, action: error, errno: EIO}
  - {name: eperm-reply, event: reply, command: read, offset: 2MiB..3MiB, action: error, errno: EPERM}
  - {name: cut-write, event: data, direction: to-server, command: write, offset: 8MiB.., when: 100}
",
    );
    let rules_s = rules.to_str().unwrap();
    let null = Nbdfault::start(&[
        "null",
        "--listen",
        "127.0.0.1:0",
        "--size",
        "64M",
        "--rules",
        rules_s,
    ]);
    let proxy = lab.proxy(&rules);
    let cmds = [
        "read 0 4k",
        "read -P 0 4M 4k",
        "read 2M 4k",
        "write -P 0x12 4M 4k",
        "write -P 0x12 8M 4k",
        "read -P 0 4M 4k",
    ];
    let n = qemu_io(null.uri(), &cmds);
    let p = qemu_io(proxy.uri(), &cmds);
    assert_same_lines(
        "qemu-io, null server",
        "read failed: Input/output error
read 4096/4096 bytes at offset 4194304
4 KiB, 1 ops; <timing>
read failed: Operation not permitted
wrote 4096/4096 bytes at offset 4194304
4 KiB, 1 ops; <timing>
write failed: Input/output error
read failed: Input/output error",
        &mask_qemu_io_timing(&n.stdout),
    );
    assert_same_qemu_io("qemu-io, null server vs qemu-nbd", &n, &p);

    let script = r#"
print(safe(h.pread, 4096, 0))
print(safe(h.pread, 4096, 4 << 20))
print(safe(h.pread, 4096, 2 << 20))
print(safe(h.pwrite, b"z" * 4096, 8 << 20))
print(safe(h.pread, 4096, 0))
"#;
    let n_py = py(null.uri(), script, &[]);
    let p_py = py(proxy.uri(), script, &[]);
    assert!(
        n_py.starts_with(
            "ERR EIO nbd_pread: read: command failed: Input/output error\nok\nERR EPERM "
        ),
        "{n_py}"
    );
    assert_same_lines("libnbd, null server vs qemu-nbd", &n_py, &p_py);

    // Connection ids count every connection a server accepted, including
    // any that saw no fault (seen in a clean-clone CI run: the libnbd
    // client was conn=3 on the proxy, conn=2 on the null server, with no
    // fault line for conn=2; where the extra connection came from is not
    // known). So ids are compared as "the first, second, ... connection
    // that saw a fault", not as numbers.
    let nf = conn_ordinals(&wait_faults(&null, 6));
    let pf = conn_ordinals(&wait_faults(&proxy, 6));
    assert_eq!(nf.len(), 6, "{nf:#?}");
    let key = |f: &String| {
        ["conn", "rule", "action", "event", "direction"]
            .map(|k| field(f, k).to_string())
            .join(" ")
    };
    let nk: Vec<String> = nf.iter().map(key).collect();
    let pk: Vec<String> = pf.iter().map(key).collect();
    assert_eq!(nk, pk, "fault logs differ\n{nf:#?}\n{pf:#?}");
    // The client sent the same bytes to both: same positions toward the
    // server.
    for (a, b) in nf.iter().zip(&pf) {
        if field(a, "direction") == "to-server" {
            assert_eq!(a, b);
        }
    }
}

/// Fault lines with each `conn=ID` replaced by the order in which that
/// connection first appears (`conn=1` for the first, and so on).
fn conn_ordinals(lines: &[String]) -> Vec<String> {
    let mut seen: Vec<String> = Vec::new();
    lines
        .iter()
        .map(|l| {
            let id = field(l, "conn").to_string();
            let n = match seen.iter().position(|s| *s == id) {
                Some(i) => i + 1,
                None => {
                    seen.push(id.clone());
                    seen.len()
                }
            };
            l.replace(&format!(" conn={id} "), &format!(" conn={n} "))
        })
        .collect()
}

/// The same disconnect rule as QEMU injector INI and as YAML: same qemu-io
/// output, same fault log (event, offset and all).
#[test]
fn ini_and_yaml_rules_are_equivalent() {
    let lab = Lab::new();
    let shipped_reply_4 = Path::new(env!("CARGO_MANIFEST_DIR")).join("rules/qemu-083/reply-4.ini");
    let pairs: Vec<(PathBuf, PathBuf)> = vec![
        (
            shipped_reply_4,
            lab.rules(
                "reply-4.yaml",
                "rules:\n  - name: inject-error\n    event: reply\n    when: 4\n",
            ),
        ),
        (
            lab.rules("req.ini", "[inject-error]\nevent=request\nwhen=before\n"),
            lab.rules(
                "req.yaml",
                "rules:\n  - name: inject-error\n    event: request\n    when: before\n    action: disconnect\n",
            ),
        ),
        (
            lab.rules("data.ini", "[inject-error]\nevent=data\nio=read\nwhen=100\n"),
            lab.rules(
                "data.yaml",
                "rules:\n  - name: inject-error\n    event: data\n    direction: to-server\n    when: 100\n",
            ),
        ),
    ];
    let cmds = ["write -P 0x21 4M 64k", "read -P 0xa5 0 4k"];
    for (ini, yaml) in &pairs {
        let mut pi = lab.proxy(ini);
        let mut py_ = lab.proxy(yaml);
        let oi = qemu_io(pi.uri(), &cmds);
        let oy = qemu_io(py_.uri(), &cmds);
        let what = format!("{} vs {}", ini.display(), yaml.display());
        assert_same_qemu_io(&what, &oi, &oy);
        assert!(
            oi.stdout.contains("failed: Input/output error"),
            "{what}\n{}",
            oi.describe()
        );
        let fi = wait_faults(&pi, 1);
        let fy = wait_faults(&py_, 1);
        assert_eq!(fi, fy, "{what}");
        assert_eq!(fi.len(), 1, "{what}");
        assert!(
            is_fault(&fi[0], "inject-error", "disconnect", ""),
            "{fi:#?}"
        );
        // The process goes on (only `nbdfault legacy` exits after a cut).
        assert_serves_once_more(&mut pi);
        assert_serves_once_more(&mut py_);
    }
}

/// The proxy runs and a fresh client can at least connect (the rule may
/// still cut its first command).
fn assert_serves_once_more(p: &mut Nbdfault) {
    assert!(p.is_running(), "{}", p.stderr());
    let size = run_ok("nbdinfo", &["--size", p.uri()]);
    assert_eq!(size, "67108864\n");
}

/// Random corruption is reproducible: the same seed flips the same bits,
/// another seed other bits.
#[test]
fn same_seed_same_corruption() {
    let lab = Lab::new();
    let rules = lab.rules(
        "rot.yaml",
        "seed: 5\nrules:\n  - event: data\n    direction: to-client\n    command: read\n    action: corrupt\n    bits: 6\n",
    );
    let script = r#"
for n in range(3):
    b = h.pread(65536, 0)
    print(" ".join("%d:%02x" % (i, x ^ 0xa5) for i, x in enumerate(b) if x != 0xa5))
"#;
    let flips = |extra: &[&str]| -> (String, Vec<String>) {
        let proxy = lab.proxy_with(&rules, extra);
        let out = py(proxy.uri(), script, &[]);
        let offsets = wait_faults(&proxy, 3)
            .iter()
            .map(|f| field(f, "stream_offset").to_string())
            .collect();
        (out, offsets)
    };
    let (a, oa) = flips(&["--seed", "11"]);
    let (b, ob) = flips(&["--seed", "11"]);
    let (c, _) = flips(&["--seed", "12"]);
    let (d, _) = flips(&[]);
    let (e, _) = flips(&["--seed", "5"]);
    let lines: Vec<&str> = a.lines().collect();
    assert_eq!(lines.len(), 3, "{a}");
    for l in &lines {
        let n = l.split_whitespace().count();
        assert!((1..=6).contains(&n), "6 random bits flipped in {l:?}");
    }
    assert_ne!(lines[0], lines[1], "each read draws new bits");
    assert_eq!(a, b, "same seed, different bits");
    assert_eq!(oa, ob);
    assert_ne!(a, c, "different seed, same bits");
    assert_eq!(d, e, "the file's seed and --seed 5 differ");
    assert_ne!(a, d);
}

/// Each of QEMU's 083 cases, loaded with `--rules` in front of qemu-nbd:
/// what qemu-io sees. The neg-classic cases never fire (qemu-nbd speaks
/// newstyle); cutting after the read data lets the read succeed.
#[test]
fn qemu_083_cases_as_rules_in_front_of_qemu_nbd() {
    let lab = Lab::new();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("rules/qemu-083");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "ini"))
        .collect();
    files.sort();
    assert_eq!(files.len(), 27);
    let read_ok = "read 512/512 bytes at offset 0\n512 bytes, 1 ops; <timing>";
    let read_failed = "read failed: Input/output error";
    for f in &files {
        let case = f.file_stem().unwrap().to_str().unwrap();
        let mut proxy = lab.proxy(f);
        let o = qemu_io(proxy.uri(), &["read -P 0xa5 0 512"]);
        let out = mask_qemu_io_timing(&o.stdout);
        let cant_open = format!("qemu-io: can't open device {}: ", proxy.uri());
        let event = case.rsplit_once('-').unwrap().0;
        if case.starts_with("neg-classic") || case == "data-after" {
            assert_eq!(out, read_ok, "{case}\n{}", o.describe());
        } else if ["data", "reply", "request"].contains(&event) {
            assert_eq!(out, read_failed, "{case}\n{}", o.describe());
        } else {
            assert_eq!(out, "", "{case}\n{}", o.describe());
            let why = o
                .stderr
                .strip_prefix(&cant_open)
                .unwrap_or_else(|| panic!("{case}\n{}", o.describe()))
                .trim_end();
            let expected: &[&str] = match case {
                "neg1-before" => &[
                    "Failed to read initial magic: Unexpected end-of-file before all data were read",
                ],
                "neg1-8" => &[
                    "Failed to read server magic: Unexpected end-of-file before all data were read",
                ],
                "neg1-16" => &[
                    "Failed to read server flags: Unexpected end-of-file before all data were read",
                ],
                // Cut toward the server with bytes of the client's option
                // unread: the client's connection is reset.
                "export-before" | "export-12" | "export-16" => &[
                    "Failed to read option reply: Unable to read from socket: Connection reset by peer",
                ],
                // QEMU writes the 4 flag bytes and the option header
                // separately: a cut right after the flags may come before
                // the header is there to be left unread (an orderly close,
                // then the kernel's reset for the late bytes).
                "export-4" => &[
                    "Failed to read option reply: Unable to read from socket: Connection reset by peer",
                    "Failed to read option reply: Unexpected end-of-file before all data were read",
                ],
                // The client's first option may or may not be sent before
                // it notices the close.
                "neg1-after" => &[
                    "Failed to send option request header: Unable to write to socket: Broken pipe",
                    "Failed to read option reply: Unexpected end-of-file before all data were read",
                ],
                _ => &[
                    "Failed to read option reply: Unexpected end-of-file before all data were read",
                ],
            };
            assert!(expected.contains(&why), "{case}: {why:?}");
        }
        let fired = fault_lines(&proxy);
        if case.starts_with("neg-classic") {
            assert!(fired.is_empty(), "{case}: {fired:#?}");
        } else {
            let fired = wait_faults(&proxy, 1);
            assert_eq!(fired.len(), 1, "{case}: {fired:#?}");
            assert!(
                is_fault(&fired[0], "inject-error", "disconnect", ""),
                "{case}: {fired:#?}"
            );
            // NBD_REP_INFO carrying the export is both option-reply and neg2.
            assert!(
                field(&fired[0], "event").split('+').any(|e| e == event),
                "{case}: {fired:#?}"
            );
        }
        // Rules files do not end the process after a cut (only `nbdfault
        // legacy` does, like the injector).
        assert!(proxy.is_running(), "{case}\n{}", proxy.stderr());
    }
    lab.assert_server_ok();
}

/// A stall without a duration is "until the connection ends": when the
/// client gives up and closes, the write it held must not reach the server
/// (a write the client saw time out must not land on the disk).
#[test]
fn stall_until_the_end_forwards_nothing_after_the_client_left() {
    let lab = Lab::new();
    let rules = lab.rules(
        "stall-w.yaml",
        "rules:\n  - event: request\n    command: write\n    action: stall\n",
    );
    let proxy = lab.proxy(&rules);
    let idle = socket_count(proxy.pid());
    let out = py(
        proxy.uri(),
        r#"
c = h.aio_pwrite(b"\x77" * 65536, 4 << 20)
deadline = time.monotonic() + 1
while time.monotonic() < deadline:
    h.poll(100)
print("done:", h.aio_command_completed(c))
"#,
        &[],
    );
    assert_eq!(out, "done: False\n");
    // The client process has exited; the proxy closes both sides.
    assert_sockets_back_to(&proxy, idle);
    let direct = qio(&lab.direct(), &["read -P 0 4M 64k"]);
    assert_eq!(
        direct, "read 65536/65536 bytes at offset 4194304\n64 KiB, 1 ops; <timing>",
        "the abandoned write landed on the disk"
    );
}
