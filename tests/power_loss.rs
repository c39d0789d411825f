//! `--write-cache volatile` and power loss, end to end: qemu-io and libnbd
//! write through nbdfault to qemu-nbd, a power loss (a `power-loss` rule on
//! the flush qemu-io sends as it closes, or `POST /power-loss`) takes the
//! cache, and the image file then holds exactly what the spec lets survive:
//! flushed and FUA writes, never unflushed ones (or, with `lose: some`, a
//! seeded subset of them, torn at sector granularity with `torn`). And
//! `nbdfault sweep --faults power-loss` over raw and qcow2 images, the
//! latter written by QEMU's qcow2 driver over NBD and judged by
//! `qemu-img check`: the demonstration the feature exists for.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use tempfile::TempDir;

const DISK: usize = 1 << 20;
/// What the image holds before each test.
const OLD: u8 = 0x11;

/// A raw image behind qemu-nbd, behind `nbdfault proxy --write-cache
/// volatile` with `rules` and a control socket.
struct Setup {
    dir: TempDir,
    image: PathBuf,
    qemu: QemuNbd,
    nbdfault: Nbdfault,
}

impl Setup {
    fn new(rules: &str) -> Setup {
        Setup::with(rules, &[])
    }

    /// [`Setup::new`] with `more` arguments for nbdfault.
    fn with(rules: &str, more: &[&str]) -> Setup {
        let dir = TempDir::new().expect("tempdir");
        let image = dir.path().join("disk.img");
        write_sparse_file(&image, DISK as u64, &[(0, &vec![OLD; DISK])]);
        let qemu = QemuNbd::start("raw", &image, &["--discard=unmap"]);
        let nbdfault = start_with(dir.path(), &qemu.uri(), rules, more);
        Setup {
            dir,
            image,
            qemu,
            nbdfault,
        }
    }

    fn control(&self) -> String {
        self.dir.path().join("control.sock").display().to_string()
    }

    /// The image as the server left it.
    fn disk(&self) -> Vec<u8> {
        std::fs::read(&self.image).expect("read the image")
    }

    /// Puts the image back and restarts nbdfault (so its rules count
    /// from zero again).
    fn restart(&mut self, rules: &str) {
        let fresh = start_with(self.dir.path(), &self.qemu.uri(), rules, &[]);
        self.nbdfault = fresh;
        std::fs::write(&self.image, vec![OLD; DISK]).expect("rewrite the image");
    }

    /// qemu-io with a write-back cache: without it qemu-io writes
    /// through (every write FUA), and nothing would be left to lose.
    /// Waits for the power loss's fault log line; its stderr so far.
    fn wait_for_loss(&self) -> String {
        let n = &self.nbdfault;
        let seen = n.wait_for_stderr("power loss on export", std::time::Duration::from_secs(10));
        assert!(seen, "no power loss\n{}", n.stderr());
        n.stderr()
    }

    fn qemu_io(&self, cmds: &[&str]) -> Output {
        QemuIo::new(self.nbdfault.uri())
            .cache("writeback")
            .cmds(cmds)
            .run()
    }
}

/// nbdkit with `args` (filters, plugin, its parameters) behind its log
/// filter, which writes every connection and request to the file returned.
fn nbdkit_logged(dir: &Path, args: &[&str]) -> (Nbdkit, PathBuf) {
    let log = dir.join("nbdkit-requests.log");
    let log_arg = format!("logfile={}", log.display());
    let mut all = vec!["--filter=log"];
    all.extend_from_slice(args);
    all.push(&log_arg);
    (Nbdkit::start(&all), log)
}

/// `nbdfault proxy --write-cache volatile` in front of `upstream`, with
/// `rules` and a control socket in `dir`.
fn start_with(dir: &Path, upstream: &str, rules: &str, more: &[&str]) -> Nbdfault {
    let file = dir.join("rules.yaml");
    std::fs::write(&file, rules).expect("write rules");
    let control = dir.join("control.sock");
    let _ = std::fs::remove_file(&control);
    let (file, control) = (file.display().to_string(), control.display().to_string());
    let mut args = vec![
        "proxy",
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        upstream,
        "--write-cache",
        "volatile",
        "--rules",
        &file,
        "--control",
        &control,
    ];
    args.extend_from_slice(more);
    Nbdfault::start(&args)
}

/// The power goes at the `n`th flush (qemu-io flushes as it closes).
fn crash_at_flush(n: u64, mode: &str) -> String {
    format!(
        "seed: 5\nrules:\n  - name: crash\n    event: request\n    command: flush\n    after: {}\n    times: 1\n    action: power-loss\n{mode}",
        n - 1
    )
}

/// Asserts `disk[from..from+len]` is all `byte`.
#[track_caller]
fn assert_run(disk: &[u8], from: usize, len: usize, byte: u8) {
    if let Some(i) = disk[from..from + len].iter().position(|&b| b != byte) {
        panic!(
            "byte {} of the image is {:#04x}, expected {byte:#04x}",
            from + i,
            disk[from + i]
        );
    }
}

#[test]
fn unflushed_writes_are_lost_and_read_back_until_then() {
    let traces = TempDir::new().expect("tempdir");
    let trace = traces.path().join("trace.jsonl");
    let s = Setup::with(
        &crash_at_flush(1, ""),
        &["--trace", trace.to_str().unwrap()],
    );
    let o = s.qemu_io(&[
        "write -P 0x22 4096 8192",
        "write -P 0x33 6144 1024",
        // The client reads its own writes, partial overlaps included.
        "read -P 0x22 4096 2048",
        "read -P 0x33 6144 1024",
        "read -P 0x22 7168 5120",
        "read -P 0x11 0 4096",
        "read -P 0x11 12288 4096",
    ]);
    assert!(
        !o.stdout.contains("Pattern verification failed"),
        "{}",
        o.describe()
    );
    assert_eq!(o.stdout.matches("read ").count(), 5, "{}", o.describe());
    let stderr = s.wait_for_loss();
    assert!(
        stderr
            .contains("power loss on export \"\": 2 cached writes (9216 bytes) lost, 0 pieces of them reached the server; resetting 1 connections"),
        "{stderr}"
    );
    assert_run(&s.disk(), 0, DISK, OLD);
    // The connection's end names the power loss, not the control API.
    let closed = r#""record":"close","reason":"power-loss","message":"reset by a power loss of the write cache""#;
    let said = wait_until(std::time::Duration::from_secs(10), || {
        std::fs::read_to_string(&trace).is_ok_and(|t| t.contains(closed))
    });
    assert!(said, "{:?}", std::fs::read_to_string(&trace));
    // The trace says what the cache took and answered, and the chart
    // draws it so: the writes stop at nbdfault, their replies come from it.
    let t = std::fs::read_to_string(&trace).expect("trace");
    let takes = t
        .matches(r#""record":"cache","direction":"to-server""#)
        .count();
    assert!(
        t.contains(r#""cookie":1,"command":"write","result":"take"}"#)
            && t.contains(
                r#""record":"cache","direction":"to-server","cookie":1,"result":"answer","reply":"#
            ),
        "{t}"
    );
    // Two writes and three reads of cached data, each taken and answered
    // (two reads do not touch it; the flush the rule crashes on is not
    // the cache's).
    assert_eq!(takes, 2 * 5, "{t}");
    let chart = run(nbdfault_bin(), &["chart", trace.to_str().unwrap()]);
    assert!(chart.success(), "{}", chart.describe());
    assert_eq!(
        chart.stdout.matches("taken by the write cache").count(),
        5,
        "{}",
        chart.stdout
    );
    assert_eq!(
        chart.stdout.matches("sent by the write cache").count(),
        5,
        "{}",
        chart.stdout
    );
    // The crash is the one fault.
    assert!(chart.stdout.contains(" 1 faults"), "{}", chart.stdout);
    // After the loss the proxy serves on: a new client sees the old data.
    let o = s.qemu_io(&["read -P 0x11 4096 8192"]);
    assert!(
        o.success() && !o.stdout.contains("failed"),
        "{}",
        o.describe()
    );
}

/// `--cache-size` bounds what is held: past it the oldest cached writes
/// go to the server early, so they survive the power loss, and at most
/// the size is lost; the newest write is always among the lost (with
/// `--write-back when-full`: no background write-back takes it first).
#[test]
fn a_full_cache_writes_back_its_oldest_writes_early() {
    let s = Setup::with(
        &crash_at_flush(1, ""),
        &["--cache-size", "64K", "--write-back", "when-full"],
    );
    let writes: Vec<String> = (0..16)
        .map(|i| format!("write -P 0x22 {} 16k", i * 16384))
        .collect();
    let mut cmds: Vec<&str> = writes.iter().map(String::as_str).collect();
    cmds.push("read -P 0x22 0 256k");
    let o = s.qemu_io(&cmds);
    assert!(
        !o.stdout.contains("Pattern verification failed")
            && o.stdout.contains("read 262144/262144"),
        "{}",
        o.describe()
    );
    let stderr = s.wait_for_loss();
    let lost: u64 = stderr
        .split("cached writes (")
        .nth(1)
        .and_then(|r| r.split(" bytes) lost").next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no loss line\n{stderr}"));
    assert!(
        (16384..=65536).contains(&lost),
        "{lost} bytes lost\n{stderr}"
    );
    let disk = s.disk();
    let kept = 262144 - lost as usize;
    assert_run(&disk, 0, kept, 0x22);
    assert_run(&disk, kept, lost as usize, OLD);
    assert_run(&disk, 262144, DISK - 262144, OLD);
}

/// A full cache whose early write-back fails (nbdkit's error filter
/// answers every write EIO while a trigger file exists) answers the write
/// that wanted room with that error and does not take it: the cache never
/// holds more than `--cache-size`, however long the server fails. A flush
/// meanwhile fails too; once the server works again a flush lands what
/// the cache took, byte-exact, and nothing it refused. A read of cached
/// data meanwhile fails with the server's read. The error answers never
/// cost the cache its connection to the server.
#[test]
fn a_failing_server_never_makes_the_cache_hold_more_than_its_size() {
    require_python_nbd();
    let dir = TempDir::new().expect("tempdir");
    let trigger = dir.path().join("fail-writes");
    let trigger_arg = format!("error-pwrite-file={}", trigger.display());
    let read_trigger = dir.path().join("fail-reads");
    let read_trigger_arg = format!("error-pread-file={}", read_trigger.display());
    let (server, log) = nbdkit_logged(
        dir.path(),
        &[
            "--filter=error",
            "memory",
            "1M",
            "error-pwrite=EIO",
            "error-pwrite-rate=100%",
            &trigger_arg,
            "error-pread=EIO",
            "error-pread-rate=100%",
            &read_trigger_arg,
        ],
    );
    let upstream = server.uri();
    let n = start_with(
        dir.path(),
        &upstream,
        "rules: []\n",
        &["--cache-size", "64K", "--write-back", "when-full"],
    );
    let control = dir.path().join("control.sock").display().to_string();
    let script = r#"
import nbd, sys, os, errno, subprocess
uri, control, trigger, direct, read_trigger = sys.argv[1:6]
def held():
    m = subprocess.run(["curl", "-s", "--unix-socket", control, "http://localhost/metrics"],
                       capture_output=True, text=True, check=True).stdout
    return int(next(l.split()[1] for l in m.splitlines() if l.startswith("nbdfault_cache_bytes ")))
h = nbd.NBD(); h.connect_uri(uri)
open(trigger, "w").close()
answers = []
for i in range(32):
    try:
        h.pwrite(bytes([0x22]) * 16384, i * 16384)
        answers.append("ok")
    except nbd.Error as e:
        answers.append(errno.errorcode.get(e.errno, e.errno))
print(" ".join(answers))
print("held", held())
open(read_trigger, "w").close()
try:
    h.pread(4096, 0); print("read ok")
except nbd.Error as e:
    print("read", errno.errorcode.get(e.errno, e.errno))
os.unlink(read_trigger)
try:
    h.flush(); print("flush ok")
except nbd.Error as e:
    print("flush", errno.errorcode.get(e.errno, e.errno))
os.unlink(trigger)
h.flush(); print("flush ok")
print("held", held())
d = nbd.NBD(); d.connect_uri(direct)
data = d.pread(32 * 16384, 0)
print("server", [bytes(data[i * 16384:(i + 1) * 16384]) == bytes([0x22]) * 16384 for i in range(32)].count(True))
print("zero after", data[3 * 16384:] == bytes(29 * 16384))
"#;
    let out = python(
        script,
        &[
            n.uri(),
            &control,
            &trigger.display().to_string(),
            &upstream,
            &read_trigger.display().to_string(),
        ],
    );
    // 3 writes of 16 KiB fit in 64 KiB with their bookkeeping; the 4th
    // wants room, the write-back fails, and so for every one after it.
    let eio = vec!["EIO"; 29].join(" ");
    assert_eq!(
        out.trim(),
        format!(
            "ok ok ok {eio}\nheld 49152\nread EIO\nflush EIO\nflush ok\nheld 0\nserver 3\nzero after True"
        ),
        "{}",
        n.stderr()
    );
    // The server's EIO answers (to write-backs and to the read of cached
    // data, which the cache reads from the server too) left the cache's
    // connection in use: the client's, the cache's and the script's own,
    // not one per failure.
    let requests = std::fs::read_to_string(&log).expect("nbdkit's log");
    let connections = requests
        .lines()
        .filter(|l| l.contains(" Connect export="))
        .count();
    assert_eq!(connections, 3, "{requests}");
}

/// A write larger than the cache is not held: what it overlaps is written
/// back first, then it goes to the server on the client's own connection,
/// so it lands over the older data and a loss cannot take it.
#[test]
fn a_write_larger_than_the_cache_goes_straight_through() {
    let s = Setup::with(
        &crash_at_flush(1, ""),
        &["--cache-size", "64K", "--write-back", "when-full"],
    );
    let o = s.qemu_io(&[
        "write -P 0x22 4096 16k",
        "write -P 0x33 0 128k",
        "write -P 0x44 131072 4k",
        "read -P 0x33 0 128k",
    ]);
    assert!(
        o.stdout.contains("read 131072/131072") && !o.stdout.contains("failed"),
        "{}",
        o.describe()
    );
    let stderr = s.wait_for_loss();
    assert!(
        stderr.contains("1 cached writes (4096 bytes) lost"),
        "{stderr}"
    );
    let disk = s.disk();
    assert_run(&disk, 0, 131072, 0x33);
    assert_run(&disk, 131072, DISK - 131072, OLD);
}

/// A write a rule acts on (here a `delay`) goes to the server on the
/// client's own connection, not through the cache: the connection's next
/// FLUSH writes the cache back and then goes on to the server too, so it
/// covers that write even on a server whose flush covers one connection
/// only. The trace shows it: the cache takes the plain write, not the
/// delayed one, and not the flush.
#[test]
fn a_flush_after_a_write_that_bypassed_the_cache_reaches_the_server() {
    let traces = TempDir::new().expect("tempdir");
    let trace = traces.path().join("trace.jsonl");
    let rules = "rules:\n  - name: slow\n    event: request\n    command: write\n    offset: ..4K\n    action: delay\n    duration: 1ms\n";
    let s = Setup::with(rules, &["--trace", trace.to_str().unwrap()]);
    let o = s.qemu_io(&["write -P 0x22 0 4k", "write -P 0x33 8192 4k", "flush"]);
    assert!(o.success(), "{}", o.describe());
    let loss = curl(&[
        "--unix-socket",
        &s.control(),
        "-X",
        "POST",
        "http://localhost/power-loss",
    ]);
    assert!(loss.contains("\"lost_writes\": 0"), "{loss}");
    let disk = s.disk();
    assert_run(&disk, 0, 4096, 0x22);
    assert_run(&disk, 8192, 4096, 0x33);
    // The trace reaches its file within 100 ms: wait for the close.
    let closed = wait_until(std::time::Duration::from_secs(10), || {
        std::fs::read_to_string(&trace).is_ok_and(|t| t.contains(r#""record":"close""#))
    });
    assert!(closed, "{:?}", std::fs::read_to_string(&trace));
    let t = std::fs::read_to_string(&trace).expect("trace");
    let took: Vec<&str> = t
        .lines()
        .filter(|l| l.contains(r#""record":"cache""#) && l.contains(r#""result":"take""#))
        .collect();
    // The second write, then qemu-io's closing flush (nothing bypassed
    // since the first one).
    assert_eq!(took.len(), 2, "{t}");
    assert!(took[0].contains(r#""command":"write""#), "{t}");
    assert!(took[1].contains(r#""command":"flush""#), "{t}");
    let chart = run(nbdfault_bin(), &["chart", trace.to_str().unwrap()]);
    assert!(chart.success(), "{}", chart.describe());
    let flushes: Vec<&str> = chart
        .stdout
        .lines()
        .filter(|l| l.contains("FLUSH"))
        .collect();
    assert_eq!(flushes.len(), 2, "{}", chart.stdout);
    assert!(
        flushes[0].ends_with("------>|"),
        "the first flush reaches the server\n{}",
        chart.stdout
    );
    assert!(
        flushes[1].contains("taken by the write cache"),
        "{}",
        chart.stdout
    );
}

/// 48 writes of 16 KiB, no flush, then `POST /power-loss` once the cache
/// holds `settled` bytes: the loss line's numbers, as JSON.
const FORTY_EIGHT_WRITES: &str = r#"
import nbd, sys, socket, http.client, time
class Unix(http.client.HTTPConnection):
    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(sys.argv[2])
def call(method, path):
    c = Unix("localhost")
    c.request(method, path)
    r = c.getresponse()
    return r.read().decode()
h = nbd.NBD(); h.connect_uri(sys.argv[1])
for i in range(48):
    h.pwrite(b"\x22" * 16384, i * 16384)
settled = int(sys.argv[3])
held = None
for _ in range(1000):
    m = call("GET", "/metrics")
    held = [l for l in m.splitlines() if l.startswith("nbdfault_cache_bytes ")][0].split()[1]
    if int(held) == settled:
        break
    time.sleep(0.01)
print(held, call("POST", "/power-loss").replace("\n", "").replace(" ", ""))
"#;

/// `--write-back background` (the default): past an eighth of
/// `--cache-size` the oldest writes go to the server without waiting for
/// a flush, down to an eighth, so a loss takes at most that much (here
/// 1M / 8: seven writes of 16 KiB and their entries' 64 bytes each fit,
/// not eight). With `--write-back when-full` the same writes all stay
/// cached, and all are lost.
#[test]
fn the_background_keeps_an_eighth_of_the_cache_losable() {
    let s = Setup::with("rules: []\n", &["--cache-size", "1M"]);
    let out = python(
        FORTY_EIGHT_WRITES,
        &[s.nbdfault.uri(), &s.control(), "114688"],
    );
    assert_eq!(
        out.trim(),
        r#"114688 {"connections_reset":1,"kept":0,"lost_bytes":114688,"lost_writes":7}"#
    );
    let disk = s.disk();
    assert_run(&disk, 0, 41 * 16384, 0x22);
    assert_run(&disk, 41 * 16384, 7 * 16384, OLD);
    let metrics = curl(&["--unix-socket", &s.control(), "http://localhost/metrics"]);
    assert!(
        metrics.contains("\nnbdfault_cache_writebacks_total 41\n"),
        "{metrics}"
    );

    let s = Setup::with(
        "rules: []\n",
        &["--cache-size", "1M", "--write-back", "when-full"],
    );
    let out = python(
        FORTY_EIGHT_WRITES,
        &[s.nbdfault.uri(), &s.control(), "786432"],
    );
    assert_eq!(
        out.trim(),
        r#"786432 {"connections_reset":1,"kept":0,"lost_bytes":786432,"lost_writes":48}"#
    );
    assert_run(&s.disk(), 0, DISK, OLD);
}

/// A write-back in flight when the power goes still lands (as a disk's
/// destaging does), and the loss says so: `kept` counts exactly the
/// cached writes that reached the server. nbdkit's delay filter holds each
/// write 2 s, so the background writer's first batch is in flight when
/// the script, having seen it arrive in nbdkit's log, cuts the power.
#[test]
fn writes_in_flight_at_a_power_loss_land_and_are_counted_kept() {
    require_python_nbd();
    let dir = TempDir::new().expect("tempdir");
    let (server, log) = nbdkit_logged(dir.path(), &["--filter=delay", "memory", "1M", "wdelay=2"]);
    let upstream = server.uri();
    let n = start_with(
        dir.path(),
        &upstream,
        "rules: []\n",
        &["--cache-size", "1M"],
    );
    let control = dir.path().join("control.sock").display().to_string();
    let script = r#"
import nbd, sys, subprocess, time, json
uri, control, log, direct = sys.argv[1:5]
h = nbd.NBD(); h.connect_uri(uri)
for i in range(16):
    h.pwrite(bytes([0x22]) * 16384, i * 16384)
for _ in range(1000):
    if " Write id=" in open(log).read():
        break
    time.sleep(0.01)
loss = json.loads(subprocess.run(["curl", "-s", "-X", "POST", "--unix-socket", control,
                                  "http://localhost/power-loss"],
                                 capture_output=True, text=True, check=True).stdout)
d = nbd.NBD(); d.connect_uri(direct)
data = d.pread(16 * 16384, 0)
landed = [bytes(data[i * 16384:(i + 1) * 16384]) == bytes([0x22]) * 16384 for i in range(16)]
print(loss["lost_writes"], loss["kept"] == landed.count(True), loss["kept"] > 0)
print("a prefix", landed == sorted(landed, reverse=True))
"#;
    let out = python(
        script,
        &[n.uri(), &control, &log.display().to_string(), &upstream],
    );
    assert_eq!(out.trim(), "16 True True\na prefix True", "{}", n.stderr());
}

/// Over a unix socket the cache writes large writes back without copying
/// them (vmsplice): overlapping 1 MiB writes land byte for byte and in
/// order, every byte of them went that way, and nothing was left pinned.
#[test]
fn large_writes_go_back_without_a_copy_and_land_byte_exact() {
    let dir = TempDir::new().expect("tempdir");
    let image = dir.path().join("disk.img");
    const SIZE: usize = 8 << 20;
    write_sparse_file(&image, SIZE as u64, &[(0, &vec![OLD; SIZE])]);
    let qemu = QemuNbd::start("raw", &image, &[]);
    let n = start_with(dir.path(), &qemu.uri(), "rules: []\n", &[]);
    let control = dir.path().join("control.sock").display().to_string();
    let o = QemuIo::new(n.uri())
        .cache("writeback")
        .cmds(&[
            "write -P 0x21 0 1M",
            "write -P 0x32 512k 1M",
            "write -P 0x43 3M 2M",
            "write -P 0x54 4M 64k",
            "read -P 0x32 512k 1M",
            "flush",
        ])
        .run();
    assert!(
        o.stdout.contains("read 1048576/1048576") && !o.stdout.contains("failed"),
        "{}",
        o.describe()
    );
    let disk = std::fs::read(&image).expect("read the image");
    assert_run(&disk, 0, 512 << 10, 0x21);
    assert_run(&disk, 512 << 10, 1 << 20, 0x32);
    assert_run(&disk, 3 << 20, 1 << 20, 0x43);
    assert_run(&disk, 4 << 20, 64 << 10, 0x54);
    assert_run(&disk, (4 << 20) + (64 << 10), (1 << 20) - (64 << 10), 0x43);
    assert_run(&disk, 5 << 20, SIZE - (5 << 20), OLD);
    let metrics = curl(&["--unix-socket", &control, "http://localhost/metrics"]);
    for line in [
        "nbdfault_cache_zero_copy_bytes_total 4259840",
        "nbdfault_cache_zero_copy_quarantined_bytes 0",
        "nbdfault_cache_bytes 0",
    ] {
        assert!(
            metrics.contains(&format!("\n{line}\n")),
            "{line}\n{metrics}"
        );
    }
}

#[test]
fn flushed_and_fua_writes_survive() {
    let s = Setup::new(&crash_at_flush(2, ""));
    let o = s.qemu_io(&[
        "write -P 0x22 4096 8192",
        "flush",
        "write -P 0x33 0 4096",
        "write -f -P 0x44 65536 4096",
        "write -P 0x55 131072 4096",
    ]);
    assert!(
        o.stdout.contains("wrote 4096/4096 bytes at offset 131072"),
        "{}",
        o.describe()
    );
    s.wait_for_loss();
    let disk = s.disk();
    assert_run(&disk, 4096, 8192, 0x22);
    // The FUA write went to the server with everything cached before it.
    assert_run(&disk, 0, 4096, 0x33);
    assert_run(&disk, 65536, 4096, 0x44);
    assert_run(&disk, 131072, 4096, OLD);
}

#[test]
fn write_zeroes_and_trims_are_lost_or_kept_like_writes() {
    let mut s = Setup::new(&crash_at_flush(1, ""));
    s.qemu_io(&["write -z 0 4096", "discard 8192 4096"]);
    s.wait_for_loss();
    assert_run(&s.disk(), 0, DISK, OLD);

    s.restart(&crash_at_flush(2, ""));
    s.qemu_io(&[
        "write -z 0 4096",
        "discard 8192 4096",
        "flush",
        "write -z 16384 4096",
    ]);
    s.wait_for_loss();
    let disk = s.disk();
    assert_run(&disk, 0, 4096, 0);
    // qemu-nbd --discard=unmap punches the hole: zeroes.
    assert_run(&disk, 8192, 4096, 0);
    assert_run(&disk, 16384, 4096, OLD);
}

/// Sixteen 4 KiB writes of their own pattern each, at 8 KiB steps.
fn sixteen_writes() -> Vec<String> {
    (0..16)
        .map(|i| format!("write -P {:#x} {} 4096", 0x40 + i, i * 8192))
        .collect()
}

/// For each of the sixteen writes, what of its 512-byte sectors reached
/// the server: `'#'` the new pattern, `'.'` the old data.
fn survivors(disk: &[u8]) -> Vec<String> {
    (0..16)
        .map(|i| {
            (0..8)
                .map(|s| {
                    let at = i * 8192 + s * 512;
                    let sector = &disk[at..at + 512];
                    if sector.iter().all(|&b| b == OLD) {
                        '.'
                    } else if sector.iter().all(|&b| b == 0x40 + i as u8) {
                        '#'
                    } else {
                        panic!("sector at {at} is neither old nor new: {:?}", &sector[..8])
                    }
                })
                .collect()
        })
        .collect()
}

#[test]
fn lose_some_keeps_the_same_seeded_subset_and_torn_tears_at_sectors() {
    let cmds = sixteen_writes();
    let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
    let mut s = Setup::new(&crash_at_flush(1, "    lose: some\n"));
    s.qemu_io(&cmds);
    s.wait_for_loss();
    let first = survivors(&s.disk());
    let whole = first.iter().filter(|w| *w == "########").count();
    let none = first.iter().filter(|w| *w == "........").count();
    assert!(whole > 0 && none > 0 && whole + none == 16, "{first:?}");

    s.restart(&crash_at_flush(1, "    lose: some\n"));
    s.qemu_io(&cmds);
    s.wait_for_loss();
    assert_eq!(
        survivors(&s.disk()),
        first,
        "the same seed keeps the same writes"
    );

    s.restart(&crash_at_flush(1, "    lose: some\n    torn: 512\n"));
    s.qemu_io(&cmds);
    s.wait_for_loss();
    let torn = survivors(&s.disk());
    assert!(
        torn.iter().any(|w| w.contains('#') && w.contains('.')),
        "some write reached the server in part: {torn:?}"
    );
}

/// Two libnbd handles on one export share its cache: a write answered on
/// one and a flush on the other survive the loss; a write after the flush
/// does not. The other handle reads the first one's unflushed write.
#[test]
fn a_flush_on_one_connection_covers_writes_answered_on_another() {
    let s = Setup::new("rules: []\n");
    let script = r#"
import nbd, sys, socket, http.client
a = nbd.NBD(); a.connect_uri(sys.argv[1])
b = nbd.NBD(); b.connect_uri(sys.argv[1])
assert a.can_flush() and a.can_fua()
a.pwrite(b"\x66" * 4096, 0)
b.flush()
a.pwrite(b"\x77" * 4096, 8192)
# b reads a's unflushed write (8192 bytes from offset 4096: straddling it).
got = b.pread(8192, 4096)
assert got == b"\x11" * 4096 + b"\x77" * 4096, got[4090:4100]
class Unix(http.client.HTTPConnection):
    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(sys.argv[2])
c = Unix("localhost")
c.request("POST", "/power-loss", body='{"lose": "all"}', headers={"Content-Type": "application/json"})
r = c.getresponse()
print(r.status, r.read().decode().replace("\n", "").replace(" ", ""))
"#;
    let control = s.control();
    let out = python(script, &[s.nbdfault.uri(), &control]);
    assert_eq!(
        out.trim(),
        r#"200 {"connections_reset":2,"kept":0,"lost_bytes":4096,"lost_writes":1}"#
    );
    let disk = s.disk();
    assert_run(&disk, 0, 4096, 0x66);
    assert_run(&disk, 8192, 4096, OLD);
    let metrics = curl(&["--unix-socket", &control, "http://localhost/metrics"]);
    assert!(
        metrics.contains("\nnbdfault_power_losses_total 1\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("\nnbdfault_power_loss_lost_bytes_total 4096\n"),
        "{metrics}"
    );
    assert!(metrics.contains("\nnbdfault_cache_bytes 0\n"), "{metrics}");
}

#[test]
fn cache_flags_are_checked() {
    let o = run(nbdfault_bin(), &["null", "--cache-size", "1M"]);
    assert!(!o.success());
    assert!(
        o.stderr
            .contains("--cache-size needs --write-cache volatile"),
        "{}",
        o.describe()
    );
    let o = run(
        nbdfault_bin(),
        &["null", "--write-cache", "volatile", "--cache-size", "lots"],
    );
    assert!(!o.success());
    assert!(o.stderr.contains("--cache-size lots"), "{}", o.describe());
    let o = run(
        nbdfault_bin(),
        &["null", "--write-cache", "volatile", "--cache-size", "4K"],
    );
    assert!(
        o.stderr
            .contains("--cache-size 4K: must be at least 64K (65536 bytes)"),
        "{}",
        o.describe()
    );
    let o = run(nbdfault_bin(), &["null", "--write-back", "when-full"]);
    assert!(
        o.stderr
            .contains("--write-back needs --write-cache volatile"),
        "{}",
        o.describe()
    );
    let o = run(nbdfault_bin(), &["null", "--write-cache", "sometimes"]);
    assert!(
        o.stderr
            .contains("invalid value 'sometimes' for '--write-cache <MODE>'"),
        "{}",
        o.describe()
    );
}

/// `nbdfault sweep --faults power-loss`: a crash before each flush and
/// each write of the baseline, qemu-nbd fresh per run, `--verify` on the
/// image after the crash. The client writes A, flushes, writes B: a crash
/// before the flush is answered loses A (the verify that expects it finds
/// corruption); every crash after it keeps A.
#[test]
fn sweep_crashes_before_each_flush_and_write() {
    let dir = TempDir::new().expect("tempdir");
    let (out, runs) = power_loss_sweep(
        &dir.path().join("report"),
        "qemu-img create -f raw \"$dir/disk.img\" 1M",
        "test \"$(head -c 4096 \"$dir/disk.img\" | tr -d A | wc -c)\" -eq 0",
        &[],
        &[
            "sh",
            "-c",
            "qemu-io -t writeback -f raw -c 'write -P 0x41 0 4096' -c flush \
             -c 'write -P 0x42 4096 4096' \"$uri\"",
        ],
    );
    // Corruption is a finding: exit status 1.
    assert_eq!(out.status.code(), Some(1), "{}", out.describe());
    let got: Vec<String> = runs
        .iter()
        .map(|r| format!("{} {} {}", r["fault"], r["point"]["what"], r["outcome"]).replace('"', ""))
        .collect();
    assert_eq!(
        got,
        [
            "power-loss write corrupt",
            "power-loss flush corrupt",
            "power-loss write ok",
            "power-loss flush ok",
        ],
        "{}",
        out.describe()
    );
}

/// `nbdfault sweep --faults power-loss` with `setup` and `verify`, qemu-nbd
/// fresh per run on `$dir/disk.img`, `extra` options, the `client`:
/// its output and the runs of its report, written to `report`.
fn power_loss_sweep(
    report: &Path,
    setup: &str,
    verify: &str,
    extra: &[&str],
    client: &[&str],
) -> (Output, Vec<serde_json::Value>) {
    let args = [
        &[
            "sweep",
            "--setup",
            setup,
            "--server",
            "exec qemu-nbd -f raw -t --shared=8 -k \"$unixsocket\" \"$dir/disk.img\"",
            "--faults",
            "power-loss",
            "--verify",
            verify,
            "--timeout",
            "10s",
            "--report",
            report.to_str().expect("utf-8"),
        ][..],
        extra,
        &["--"],
        client,
    ]
    .concat();
    let out = run_with_timeout(nbdfault_bin(), &args, std::time::Duration::from_secs(120));
    let text = std::fs::read_to_string(report.join("runs.json"))
        .unwrap_or_else(|e| panic!("no report: {e}\n{}", out.describe()));
    let runs: serde_json::Value = serde_json::from_str(&text).expect("runs.json");
    (out, runs.as_array().expect("a list").clone())
}

/// QEMU's qcow2 driver writing over NBD (qemu-io `--image-opts
/// driver=qcow2,file.driver=nbd`, `-t writeback`: only the flushes the
/// qcow2 driver orders its metadata with, and the one as it closes):
/// cluster allocations in two L2 tables, their refcounts, a discard that
/// frees one. The image is exported raw, so all qcow2 metadata crosses
/// nbdfault.
const QCOW2_WRITER: &str = r#"qemu-io -t writeback --image-opts "driver=qcow2,file.driver=nbd,file.server.type=unix,file.server.path=$unixsocket" \
  -c 'write -P 0x41 0 128k' -c 'write -P 0x42 1M 64k' -c 'write -P 0x43 600M 128k' \
  -c 'discard 0 64k' -c 'write -P 0x44 2M 64k'
"#;

/// The same writer with every flush and FUA dropped on its way: nbdkit's
/// fua filter (`fuamode=discard`) between QEMU and nbdfault. (QEMU's own
/// `cache.no-flush=on` does not do it over NBD: its nbd driver sends
/// NBD_CMD_FLUSH from the flush-to-OS step, which that option keeps.)
const NO_FLUSH: &str =
    r#"exec nbdkit -U - --filter=fua nbd socket="$unixsocket" fuamode=discard --run "sh '$1'""#;

/// [`power_loss_sweep`] over a qcow2 image (a fresh one per run, padded:
/// an NBD export cannot grow), `qemu-img check` after each crash (0:
/// clean; 3: only leaked clusters, which a crash may leave), 12 points.
fn qcow2_sweep(
    dir: &Path,
    name: &str,
    extra: &[&str],
    client: &[&str],
) -> (Output, Vec<serde_json::Value>) {
    let extra = [&["--max-points", "12", "--seed", "3"][..], extra].concat();
    power_loss_sweep(
        &dir.join(name),
        "qemu-img create -q -f qcow2 \"$dir/disk.img\" 1G && truncate -s 16M \"$dir/disk.img\"",
        "qemu-img check -U -f qcow2 \"$dir/disk.img\" || test $? -eq 3",
        &extra,
        client,
    )
}

fn outcomes(runs: &[serde_json::Value]) -> Vec<String> {
    runs.iter()
        .map(|r| r["outcome"].as_str().unwrap_or("?").to_string())
        .collect()
}

/// The demonstration: QEMU's qcow2 driver flushing as it should survives a
/// power loss at every sampled point, writes reordered too (`--lose some`):
/// `qemu-img check` finds at most leaks. The same writer with its flushes
/// dropped leaves refcounts behind the L2 tables that use them: corrupt.
/// With `--lose all` it is not caught, as every crash then leaves a state
/// the writer flushed, and QEMU orders its dependent writes itself.
#[test]
fn qcow2_over_nbd_survives_power_loss_only_when_it_flushes() {
    require_tool("qemu-io");
    require_tool("nbdkit");
    let dir = TempDir::new().expect("tempdir");
    let writer = dir.path().join("writer.sh");
    std::fs::write(&writer, QCOW2_WRITER).expect("write writer.sh");
    let writer = writer.to_str().expect("utf-8");

    let (out, runs) = qcow2_sweep(dir.path(), "flushing", &["--lose", "some"], &["sh", writer]);
    assert_eq!(out.status.code(), Some(0), "{}", out.describe());
    assert_eq!(outcomes(&runs), vec!["ok"; 12], "{}", out.describe());
    assert!(
        runs.iter().any(|r| r["point"]["what"] == "flush"),
        "QEMU flushed: {runs:?}"
    );

    let no_flush = ["sh", "-c", NO_FLUSH, "no-flush", writer];
    let (out, runs) = qcow2_sweep(dir.path(), "no-flush", &["--lose", "some"], &no_flush);
    assert_eq!(out.status.code(), Some(1), "{}", out.describe());
    assert!(
        runs.iter().all(|r| r["point"]["what"] != "flush"),
        "no flush reached nbdfault: {runs:?}"
    );
    let corrupt: Vec<&serde_json::Value> =
        runs.iter().filter(|r| r["outcome"] == "corrupt").collect();
    assert!(!corrupt.is_empty(), "{}", out.describe());
    // The report says what qemu-img check found.
    for r in &corrupt {
        let said = r["verify_tail"].as_str().unwrap_or_default();
        assert!(said.contains("errors were found on the image"), "{r}");
        assert!(said.contains("ERROR "), "{r}");
    }
    assert!(
        out.stdout.contains("    verify | ERROR "),
        "{}",
        out.describe()
    );
    assert!(
        out.stdout.contains("--write-cache volatile --rules"),
        "the reproducer goes through the cache: {}",
        out.describe()
    );

    let (out, runs) = qcow2_sweep(dir.path(), "no-flush-lose-all", &[], &no_flush);
    assert_eq!(out.status.code(), Some(0), "{}", out.describe());
    assert_eq!(
        outcomes(&runs),
        vec!["ok"; runs.len()],
        "{}",
        out.describe()
    );
}

/// In a sweep the crashed machine stays off: a client that goes on after
/// the crash (here a second qemu-io; QEMU's NBD driver also reconnects on
/// its own and resends) has its writes answered EIO, and none reaches the
/// disk, at every crash point.
#[test]
fn after_a_swept_power_loss_nothing_more_reaches_the_disk() {
    let dir = TempDir::new().expect("tempdir");
    let (out, runs) = power_loss_sweep(
        &dir.path().join("report"),
        "qemu-img create -f raw \"$dir/disk.img\" 1M",
        // Says what the disk holds; passes either way (the baseline's
        // disk has B).
        "if grep -q B \"$dir/disk.img\"; then echo B landed; else echo no B; fi",
        &[],
        &[
            "sh",
            "-c",
            "qemu-io -t writeback -f raw -c 'write -P 0x41 0 4096' -c flush \"$uri\"; \
             qemu-io -f raw -c 'write -P 0x42 8192 4096' \"$uri\"",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", out.describe());
    // Crashes on the first connection, then the second qemu-io's own.
    let conns: Vec<u64> = runs
        .iter()
        .filter_map(|r| r["point"]["connection"].as_u64())
        .collect();
    assert!(conns.contains(&1) && conns.contains(&2), "{runs:?}");
    for r in runs.iter().filter(|r| r["point"]["connection"] == 1) {
        assert_eq!(r["verify_tail"], "no B\n", "{r}");
        assert!(
            r["output_tail"]
                .as_str()
                .unwrap_or_default()
                .contains("write failed: Input/output error"),
            "the write after the crash was refused: {r}"
        );
    }
}
