//! Faults over time, end to end with QEMU's own reconnect logic: outages
//! (rules' `refuse` and `blackhole`, `POST /outage`), `--listen-delay`, rule
//! states and per-request breakpoints, with qemu-io's `reconnect-delay` and
//! `open-timeout` and libnbd in front of nbdfault in front of qemu-nbd.
//! Nothing is killed by hand: the proxy and the server stay up throughout,
//! as QEMU's iotests 277 and nbd-reconnect-on-open have them restarted.
//!
//! Timing is asserted loosely, if at all: what is checked is what the client
//! reports and what reached the disk.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use tempfile::TempDir;

const MIB: u64 = 1 << 20;

/// A zeroed 16 MiB raw disk behind qemu-nbd, and a directory for sockets.
struct Lab {
    dir: TempDir,
    disk: PathBuf,
    qemu: QemuNbd,
}

impl Lab {
    fn new() -> Lab {
        let dir = TempDir::new().unwrap();
        let disk = dir.path().join("disk.raw");
        create_sparse(&disk, 16 * MIB);
        let qemu = QemuNbd::raw(&disk);
        Lab { dir, disk, qemu }
    }

    /// Where the proxy listens.
    fn sock(&self) -> PathBuf {
        self.dir.path().join("nbdfault.sock")
    }

    /// `nbdfault proxy --upstream QEMU --listen SOCK EXTRA...`
    fn proxy(&self, extra: &[&str]) -> Nbdfault {
        self.proxy_at(&self.sock(), extra)
    }

    /// The same, listening on `sock`.
    fn proxy_at(&self, sock: &Path, extra: &[&str]) -> Nbdfault {
        let upstream = self.qemu.uri();
        let mut args = vec![
            "proxy",
            "--upstream",
            &upstream,
            "--listen",
            sock.to_str().unwrap(),
            "-v",
        ];
        args.extend_from_slice(extra);
        Nbdfault::start(&args)
    }

    /// A proxy with the control API on and these rules; its API's URL.
    fn proxy_with_rules(&self, rules: &str) -> (Nbdfault, String) {
        let file = self.dir.path().join("rules.yaml");
        std::fs::write(&file, rules).unwrap();
        let p = self.proxy(&[
            "--control",
            "127.0.0.1:0",
            "--rules",
            file.to_str().unwrap(),
        ]);
        let url = control_url(&p);
        (p, url)
    }

    /// What qemu-io reads back from the disk itself, not through the proxy.
    fn read_direct(&self, cmd: &str) -> String {
        run_ok(
            "qemu-io",
            &["-f", "raw", "-c", cmd, self.disk.to_str().unwrap()],
        )
    }
}

/// A rules file shipped in rules/.
fn shipped(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("rules")
        .join(name)
        .display()
        .to_string()
}

/// `qemu-io -c CMD... --image-opts driver=nbd,server.type=unix,...,OPTS`
/// with stdout and stderr merged; its status, output, and how long it took.
fn qemu_io_opts(sock: &Path, opts: &str, cmds: &[&str]) -> (bool, String, Duration) {
    require_tool("qemu-io");
    let image = format!(
        "driver=nbd,server.type=unix,server.path={}{opts}",
        sock.display()
    );
    let mut args = Vec::new();
    for c in cmds {
        args.extend(["-c", c]);
    }
    args.extend(["--image-opts", &image]);
    let start = Instant::now();
    let (status, out) = run_merged("qemu-io", &args, Duration::from_secs(60));
    (status.success(), mask_qemu_io_timing(&out), start.elapsed())
}

/// `read 0 4k` through the proxy `p` with image options `opts`, which
/// must succeed; how long it took.
fn read_4k(sock: &Path, opts: &str, p: &Nbdfault) -> Duration {
    let (ok, out, took) = qemu_io_opts(sock, opts, &["read 0 4k"]);
    assert!(ok, "{out}\n{}", p.stderr());
    assert_eq!(
        out,
        "read 4096/4096 bytes at offset 0\n4 KiB, 1 ops; <timing>"
    );
    took
}

/// The control API's URL of a proxy started with `--control 127.0.0.1:0`.
fn control_url(p: &Nbdfault) -> String {
    let mut url = None;
    let found = wait_until(Duration::from_secs(10), || {
        url = p
            .more_stdout()
            .into_iter()
            .find_map(|l| l.strip_prefix("Control on ").map(str::to_string));
        url.is_some()
    });
    assert!(found, "no Control on line\n{}", p.stderr());
    url.unwrap_or_default()
}

/// `curl` with a method and an optional JSON body: (body, HTTP status).
fn api(method: &str, url: &str, body: Option<&str>) -> (String, u16) {
    let mut args = vec!["-X", method, url];
    if let Some(b) = body {
        args.extend(["-H", "Content-Type: application/json", "--data-binary", b]);
    }
    let out = curl(&args);
    let (body, code) = out.rsplit_once('\n').unwrap_or(("", &out));
    (body.to_string(), code.trim().parse().unwrap_or(0))
}

/// The value of metric `name` in `GET /metrics`.
fn metric(url: &str, name: &str) -> u64 {
    let (text, _) = api("GET", &format!("{url}/metrics"), None);
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no metric {name} in\n{text}"))
}

/// iotest 277: the first write's payload reaches the server and the
/// connection is cut before its reply; the retried write's reply is cut
/// too; with reconnect-delay the write still succeeds, and lands.
#[test]
fn a_write_survives_a_cut_after_its_payload_then_a_cut_reply() {
    let lab = Lab::new();
    let rules = shipped("reconnect-after-write.yaml");
    let p = lab.proxy(&["--rules", &rules]);
    let (ok, out, _) = qemu_io_opts(&lab.sock(), ",reconnect-delay=7", &["write -P 0x5a 0 64k"]);
    assert!(ok, "{out}\n{}", p.stderr());
    assert_eq!(
        out,
        "wrote 65536/65536 bytes at offset 0\n64 KiB, 1 ops; <timing>"
    );
    let log = p.stderr();
    for needle in [
        "fault conn=1 rule=cut-after-write-payload action=disconnect event=data direction=to-server bytes=65536",
        "rule=cut-the-write-reply action=disconnect event=reply",
    ] {
        assert!(log.contains(needle), "{needle} missing from\n{log}");
    }
    assert!(
        lab.read_direct("read -P 0x5a 0 64k")
            .starts_with("read 65536/65536 bytes at offset 0")
    );
}

/// nbd-reconnect-on-open against a server that appears late: open-timeout=0
/// gives up at once, a longer one waits for the listener and gets through.
#[test]
fn open_timeout_against_a_listen_delay() {
    let lab = Lab::new();
    let p = lab.proxy(&["--listen-delay", "3s"]);
    let (ok, out, _) = qemu_io_opts(&lab.sock(), ",open-timeout=0", &["read 0 4k"]);
    assert!(!ok, "{out}");
    assert!(
        out.contains("Failed to connect to") && out.contains("No such file or directory"),
        "{out}"
    );
    let took = read_4k(&lab.sock(), ",open-timeout=30", &p);
    assert!(took >= Duration::from_secs(1), "{took:?}");
    assert!(p.stderr().contains("--listen-delay: listening on"));
}

/// The shipped 1 s outage: the first connection starts it and is refused,
/// and a client with an open-timeout above it gets through afterwards.
#[test]
fn open_timeout_outlasts_a_refusing_outage_from_the_rules() {
    let lab = Lab::new();
    let rules = shipped("outage-1s.yaml");
    let p = lab.proxy(&["--rules", &rules]);
    let took = read_4k(&lab.sock(), ",open-timeout=30", &p);
    assert!(took >= Duration::from_millis(500), "{took:?}");
    let log = p.stderr();
    assert!(
        log.contains("rule=outage-1s action=refuse")
            && log.contains("outage (rule outage-1s): refusing the connection"),
        "{log}"
    );
}

/// `POST /outage` refusing until `DELETE /outage`: open-timeout=0 fails at
/// once, then the same client gets through once it is over; a blackhole
/// holds a client until it ends; `kill` and `DELETE /connections` cut live
/// connections while the listener stays.
#[test]
fn outages_and_cuts_through_the_control_api() {
    let lab = Lab::new();
    let p = lab.proxy(&["--control", "127.0.0.1:0"]);
    let url = control_url(&p);
    let (body, code) = api(
        "POST",
        &format!("{url}/outage"),
        Some(r#"{"mode": "refuse"}"#),
    );
    assert_eq!(code, 200, "{body}");
    let v = parse_json(&body);
    assert_eq!(v["mode"], "refuse");
    assert_eq!(v["remaining"], serde_json::Value::Null);
    let (ok, out, _) = qemu_io_opts(&lab.sock(), ",open-timeout=0", &["read 0 4k"]);
    assert!(!ok, "{out}");
    assert!(
        out.contains("can't open: Failed to read initial magic"),
        "{out}"
    );
    assert_eq!(api("DELETE", &format!("{url}/outage"), None).1, 204);
    assert_eq!(api("DELETE", &format!("{url}/outage"), None).1, 404);
    read_4k(&lab.sock(), ",open-timeout=0", &p);

    // A blackhole until ended: the client waits in its handshake.
    let (_, code) = api(
        "POST",
        &format!("{url}/outage"),
        Some(r#"{"mode": "blackhole"}"#),
    );
    assert_eq!(code, 200);
    let sock = lab.sock();
    let waiting =
        std::thread::spawn(move || qemu_io_opts(&sock, ",open-timeout=30", &["read 0 4k"]));
    assert!(p.wait_for_stderr("holding the connection unanswered", Duration::from_secs(20)));
    assert_eq!(metric(&url, "nbdfault_outage_blackholed_total"), 1);
    assert_eq!(api("DELETE", &format!("{url}/outage"), None).1, 204);
    let (ok, out, _) = waiting.join().unwrap();
    assert!(ok, "{out}\n{}", p.stderr());

    // Live connections cut; the listener stays.
    let mut idle = QemuIo::new(&unix_uri(&lab.sock())).spawn_idle();
    assert!(wait_until(Duration::from_secs(20), || {
        parse_json(&api("GET", &format!("{url}/connections"), None).0)["connections"]
            .as_array()
            .is_some_and(|a| a.len() == 1)
    }));
    let (body, code) = api("DELETE", &format!("{url}/connections"), None);
    assert_eq!((code, parse_json(&body)["closed"].as_u64()), (200, Some(1)));
    let (body, code) = api(
        "POST",
        &format!("{url}/outage"),
        Some(r#"{"duration": "10ms", "kill": true, "reset": true}"#),
    );
    assert_eq!((code, parse_json(&body)["closed"].as_u64()), (200, Some(0)));
    kill_child(&mut idle);
    read_4k(&lab.sock(), ",open-timeout=30", &p);
}

/// A bad `POST /outage` is refused with what is wrong, and starts nothing.
#[test]
fn outage_bodies_are_checked() {
    let lab = Lab::new();
    let p = lab.proxy(&["--control", "127.0.0.1:0"]);
    let url = control_url(&p);
    for (body, says) in [
        (
            r#"{"mode": "blackhole", "reset": true}"#,
            "request body: reset applies only to mode refuse (a blackhole closes nothing)",
        ),
        (
            r#"{"mode": "down"}"#,
            "request body: mode must be refuse or blackhole, found \"down\"",
        ),
        (
            r#"{"duration": "2 days"}"#,
            "request body: duration must be at most 24h (1 day), found \"2 days\"",
        ),
        (
            r#"{"duration": 5}"#,
            "request body: duration must be a string such as \"1s\" (or null: until DELETE \
             /outage), found 5",
        ),
        (
            r#"{"kil": true}"#,
            "request body: unknown key \"kil\" (keys: duration, mode, reset, kill)",
        ),
    ] {
        let (text, code) = api("POST", &format!("{url}/outage"), Some(body));
        assert_eq!(code, 400, "{body}: {text}");
        assert_eq!(parse_json(&text)["error"], says, "{body}");
    }
    let (text, _) = api("GET", &format!("{url}/outage"), None);
    assert_eq!(parse_json(&text)["outage"], serde_json::Value::Null);
}

/// blkdebug's state machine from the shipped file: the first flush passes,
/// the second fails with EIO, the third passes.
#[test]
fn the_second_flush_fails_and_only_it() {
    let lab = Lab::new();
    let rules = shipped("second-flush-fails.yaml");
    let p = lab.proxy(&["--rules", &rules]);
    let w = "write -P 0x11 0 4k";
    let o = qemu_io(
        &unix_uri(&lab.sock()),
        &[w, "flush", w, "flush", w, "flush"],
    );
    let wrote = "wrote 4096/4096 bytes at offset 0\n4 KiB, 1 ops; <timing>";
    assert_eq!(
        mask_qemu_io_timing(&o.stdout),
        format!("{wrote}\n{wrote}\n{wrote}"),
        "{}",
        o.describe()
    );
    // qemu-io reports a failed flush by its exit status alone.
    assert_eq!(
        (o.status.code(), o.stderr.as_str()),
        (Some(1), ""),
        "{}",
        o.describe()
    );
    let log = p.stderr();
    assert_eq!(
        log.matches("action=error event=request").count(),
        1,
        "{log}"
    );
    assert!(
        log.contains("rule=second-flush-fails action=error"),
        "{log}"
    );
    drop(p);

    // Each flush's own outcome, from libnbd on a fresh proxy.
    let sock = lab.dir.path().join("second.sock");
    let p = lab.proxy_at(&sock, &["--rules", &rules]);
    let out = nbdsh(
        &unix_uri(&sock),
        "for i in range(4):\n    try:\n        h.flush()\n        print('ok')\n    \
         except nbd.Error as e:\n        print(e.string)\n",
    );
    assert_eq!(
        out,
        "ok\nnbd_flush: flush: command failed: Input/output error\nok\nok\n",
        "{}",
        p.stderr()
    );
}

/// The script that holds a write on a break and reads on the same
/// connection meanwhile: `sys.argv[2]` is the control API's URL.
const BREAK_SCRIPT: &str = r#"
import json, urllib.request
ctl = sys.argv[2]
def wait(c):
    while not h.aio_command_completed(c):
        h.poll(-1)
writes = [h.aio_pwrite(bytearray([0x40 + i]) * 4096, i * 4096) for i in range(3)]
wait(writes[0]); wait(writes[1])
held = json.load(urllib.request.urlopen(ctl + "/breaks/third/wait?timeout=20s"))["breaks"]
print("held", [(b["command"], b["offset"], b["length"], b["bytes"]) for b in held])
buf = bytearray(4096)
r = h.aio_pread(buf, 4096)
wait(r)
print("read while held", buf[0] == 0x41, "write in flight", h.aio_in_flight())
req = urllib.request.Request(ctl + "/breaks/third/resume", method="POST")
print(json.load(urllib.request.urlopen(req)))
wait(writes[2])
print("after resume", h.pread(4096, 8192)[0] == 0x42, "in flight", h.aio_in_flight())
h.shutdown()
"#;

/// A break on the third write holds it while a read on the same
/// connection completes; resumed through the API, it lands.
#[test]
fn a_break_holds_one_write_while_the_connection_goes_on() {
    let lab = Lab::new();
    let (p, url) = lab.proxy_with_rules(
        "rules:\n  - name: third-write\n    event: request\n    command: write\n    after: 2\n    \
         times: 1\n    action: break\n    tag: third\n",
    );
    let uri = unix_uri(&lab.sock());
    let out = python(
        &format!("import nbd, sys\nh = nbd.NBD()\nh.connect_uri(sys.argv[1])\n{BREAK_SCRIPT}"),
        &[&uri, &url],
    );
    assert_eq!(
        out,
        "held [('write', 8192, 4096, 4124)]\nread while held True write in flight 1\n\
         {'resumed': 1}\nafter resume True in flight 0\n",
        "{}",
        p.stderr()
    );
    assert_eq!(metric(&url, "nbdfault_breaks_resumed_total"), 1);
    assert!(
        lab.read_direct("read -P 0x42 8k 4k")
            .starts_with("read 4096/4096 bytes at offset 8192")
    );
    let (text, code) = api("POST", &format!("{url}/breaks/third/resume"), None);
    assert_eq!(code, 404, "{text}");
}

/// A client that leaves while its request is held: the request is let go
/// and counted, and nothing of it is left in `GET /breaks`.
#[test]
fn a_break_whose_client_leaves_is_released() {
    let lab = Lab::new();
    let (_p, url) = lab.proxy_with_rules(
        "rules:\n  - event: request\n    command: write\n    action: break\n    tag: any\n",
    );
    let out = python(
        "import nbd, sys, urllib.request\nh = nbd.NBD()\nh.connect_uri(sys.argv[1])\n\
         h.aio_pwrite(bytearray(512), 0)\n\
         urllib.request.urlopen(sys.argv[2] + '/breaks/any/wait?timeout=20s')\nprint('held')\n",
        &[&unix_uri(&lab.sock()), &url],
    );
    assert_eq!(out, "held\n");
    assert!(wait_until(Duration::from_secs(20), || {
        metric(&url, "nbdfault_breaks_abandoned_total") == 1
    }));
    let (text, _) = api("GET", &format!("{url}/breaks"), None);
    assert_eq!(parse_json(&text)["breaks"], serde_json::json!([]));
    assert_eq!(metric(&url, "nbdfault_breaks_held"), 0);
}

/// iotests 264 and 281's shape: a copy throttled to 512 KiB/s, the server
/// "restarted" half a second in (`POST /outage` with `kill`: every
/// connection cut, new ones refused for a second), and QEMU's client with
/// `reconnect-delay` retries its read once service is back: the data comes
/// whole, after the outage, with no process killed or restarted.
#[test]
fn a_throttled_read_survives_an_outage_that_cuts_it() {
    let lab = Lab::new();
    run_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x3c 0 1M",
            lab.disk.to_str().unwrap(),
        ],
    );
    let (p, url) = lab.proxy_with_rules(
        "rules:\n  - name: slow-link\n    event: data\n    direction: to-client\n    \
         action: throttle\n    rate: 512KiB/s\n",
    );
    let sock = lab.sock();
    let reader = std::thread::spawn(move || {
        qemu_io_opts(&sock, ",reconnect-delay=20", &["read -P 0x3c 0 1M"])
    });
    // Half-way through the 2 s the read's data takes at that rate.
    std::thread::sleep(Duration::from_millis(500));
    let (body, code) = api(
        "POST",
        &format!("{url}/outage"),
        Some(r#"{"duration": "1s", "mode": "refuse", "kill": true}"#),
    );
    assert_eq!(code, 200, "{body}");
    let (ok, out, took) = reader.join().unwrap();
    assert!(ok, "{out}\n{}", p.stderr());
    assert_eq!(
        out,
        "read 1048576/1048576 bytes at offset 0\n1 MiB, 1 ops; <timing>"
    );
    // Cut half-way, refused for 1 s, then read again whole at the rate.
    assert!(took >= Duration::from_millis(2900), "took {took:?}");
    let log = p.stderr();
    assert!(log.contains("refusing the connection"), "{log}");
    assert_eq!(
        log.matches("rule=slow-link action=throttle event=data")
            .count(),
        2,
        "{log}"
    );
}
