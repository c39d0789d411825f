//! The process around a server: SIGHUP reloads rules, SIGTERM stops
//! cleanly, `--run` is a captive mode. Real clients (qemu-io, nbdinfo)
//! against the real binary.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

fn signal(pid: u32, sig: &str) {
    let st = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .expect("kill");
    assert!(st.success());
}

fn write_rule(path: &std::path::Path, errno: &str) {
    std::fs::write(
        path,
        format!("rules:\n  - name: writes-{errno}\n    event: request\n    command: write\n    action: error\n    errno: {errno}\n"),
    )
    .unwrap();
}

fn qemu_io_write(uri: &str) -> String {
    let out = qemu_io(uri, &["write 0 4k"]);
    format!("{}{}", out.stdout, out.stderr).trim().to_string()
}

#[test]
fn sighup_reloads_good_rules_and_keeps_the_old_ones_on_a_bad_file() {
    require_tool("qemu-io");
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("r.yaml");
    write_rule(&rules, "ENOSPC");
    let p = Nbdfault::start(&[
        "null",
        "--listen",
        "127.0.0.1:0",
        "--rules",
        rules.to_str().unwrap(),
    ]);
    assert_eq!(
        qemu_io_write(p.uri()),
        "write failed: No space left on device"
    );

    write_rule(&rules, "EPERM");
    signal(p.pid(), "HUP");
    assert!(p.wait_for_stderr(
        "SIGHUP: rules reloaded, 1 rule(s) in force",
        Duration::from_secs(5)
    ));
    assert_eq!(
        qemu_io_write(p.uri()),
        "write failed: Operation not permitted"
    );

    std::fs::write(&rules, "rules:\n  - event: requset\n").unwrap();
    signal(p.pid(), "HUP");
    assert!(p.wait_for_stderr("SIGHUP: keeping the rules in force", Duration::from_secs(5)));
    let log = p.stderr();
    assert!(log.contains("did you mean \"request\""), "{log}");
    assert_eq!(
        qemu_io_write(p.uri()),
        "write failed: Operation not permitted"
    );
}

#[test]
fn sigterm_stops_within_a_second_and_removes_the_socket() {
    require_tool("qemu-io");
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("n.sock");
    let mut p = Nbdfault::start(&["null", "--listen", sock.to_str().unwrap()]);
    assert!(sock.exists());
    // A connected client does not hold the server up.
    let mut client = QemuIo::new(p.uri()).spawn_idle();
    std::thread::sleep(Duration::from_millis(300));
    let t = Instant::now();
    signal(p.pid(), "TERM");
    let status = p.wait_exit(Duration::from_secs(5)).expect("exited");
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "took {:?}",
        t.elapsed()
    );
    assert_eq!(status.code(), Some(0));
    assert!(!sock.exists(), "socket file left behind");
    let _ = client.kill();
    let _ = client.wait();
}

/// SIGTERM ends every connection in order, on whichever thread it lives,
/// and each logs its end. (Before, none logged it, and connections on
/// other threads were closed only by the process exiting.)
#[test]
fn sigterm_ends_the_connections_of_every_thread() {
    require_tool("qemu-io");
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("n.sock");
    let mut p = Nbdfault::start(&[
        "null",
        "-vv",
        "--threads",
        "3",
        "--listen",
        sock.to_str().unwrap(),
    ]);
    let mut clients: Vec<_> = (0..3).map(|_| QemuIo::new(p.uri()).spawn_idle()).collect();
    assert!(
        wait_until(Duration::from_secs(10), || p
            .stderr()
            .matches("accepted")
            .count()
            >= 3),
        "{}",
        p.stderr()
    );
    std::thread::sleep(Duration::from_millis(300));
    signal(p.pid(), "TERM");
    let status = p.wait_exit(Duration::from_secs(5)).expect("exited");
    assert_eq!(status.code(), Some(0));
    let log = p.stderr();
    assert_eq!(
        log.matches("closing connection: the server is stopping")
            .count(),
        3,
        "{log}"
    );
    for c in &mut clients {
        let _ = c.kill();
        let _ = c.wait();
    }
}

#[test]
fn run_exits_with_the_commands_status_and_passes_the_address() {
    require_tool("nbdinfo");
    let out = run(
        nbdfault_bin(),
        &[
            "null",
            "--size",
            "1M",
            "--run",
            "nbdinfo --size \"$uri\" && test \"$nbd\" = \"$uri\" && test -S \"$unixsocket\" && test -z \"$port\" && exit 3",
        ],
    );
    assert_eq!(out.status.code(), Some(3), "{}", out.describe());
    // As with nbdkit's --run, stdout is the command's alone.
    assert_eq!(out.stdout, "1048576\n", "{}", out.describe());

    // --print-uri: the URI alone first, then the command's output.
    let out = run(
        nbdfault_bin(),
        &[
            "null",
            "--size",
            "1M",
            "--print-uri",
            "--run",
            "nbdinfo --size \"$uri\" && test -S \"$unixsocket\"",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", out.describe());
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{}", out.describe());
    assert!(lines[0].starts_with("nbd+unix:///?socket="), "{lines:?}");
    assert_eq!(lines[1], "1048576");
    // The private socket directory is gone.
    let sock = lines[0].trim_start_matches("nbd+unix:///?socket=");
    let dir = std::path::Path::new(sock).parent().unwrap();
    assert!(!dir.exists(), "{} left behind", dir.display());

    let out = run(
        nbdfault_bin(),
        &[
            "null",
            "--listen",
            "127.0.0.1:0",
            "--control",
            "127.0.0.1:0",
            "--run",
            "test -n \"$port\" && test -z \"$unixsocket\" && nbdinfo --size \"$uri\"",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", out.describe());
    assert_eq!(out.stdout, "8589934592\n", "{}", out.describe());
}

/// `$control` names the control API a `--control` on port 0 got (empty
/// without one), so CMD can steer the server it runs under.
#[test]
fn run_passes_the_control_api_url() {
    require_tool("curl");
    let out = run(
        nbdfault_bin(),
        &[
            "null",
            "--control",
            "127.0.0.1:0",
            "--run",
            "echo \"$control\"; curl -sf \"$control/metrics\" | grep -c '^nbdfault_connections_total '",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", out.describe());
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{}", out.describe());
    let port = lines[0].strip_prefix("http://127.0.0.1:").unwrap_or("");
    assert!(port.parse::<u16>().is_ok_and(|p| p > 0), "{lines:?}");
    assert_eq!(lines[1], "1");

    let out = run(
        nbdfault_bin(),
        &["null", "--run", "test -z \"${control-unset}\""],
    );
    assert_eq!(out.status.code(), Some(0), "{}", out.describe());
}

#[test]
fn trace_records_every_event_of_a_qemu_io_session() {
    require_tool("qemu-io");
    let dir = tempfile::tempdir().unwrap();
    let trace = dir.path().join("trace.jsonl");
    let rules = dir.path().join("r.yaml");
    std::fs::write(
        &rules,
        "rules:\n  - name: eio\n    event: request\n    command: read\n    offset: 1MiB..\n    action: error\n    errno: EIO\n",
    )
    .unwrap();
    let out = run(
        nbdfault_bin(),
        &[
            "null",
            "--trace",
            trace.to_str().unwrap(),
            "--rules",
            rules.to_str().unwrap(),
            "--run",
            "qemu-io -f raw -c 'write -P 1 0 4k' -c 'read 1M 512' \"$uri\"",
        ],
    );
    assert_eq!(out.status.code(), Some(1), "{}", out.describe());
    assert!(
        out.stdout.contains("read failed: Input/output error"),
        "{}",
        out.describe()
    );
    let text = std::fs::read_to_string(&trace).unwrap();
    let events: Vec<serde_json::Value> = text.lines().map(parse_json).collect();
    for e in &events {
        let ts = e["ts"].as_str().unwrap();
        assert_eq!(ts.len(), "2026-11-25T12:00:00.123456Z".len(), "{ts}");
        assert!(ts.ends_with('Z'));
        assert!(e["conn"].as_u64().is_some());
    }
    // The messages; a message with two names lists them (issue 15).
    let events: Vec<serde_json::Value> = events
        .into_iter()
        .filter(|e| e["record"] == "message")
        .collect();
    let names: Vec<&str> = events
        .iter()
        .map(|e| e["event"].as_str().unwrap_or("(several)"))
        .collect();
    assert_eq!(&names[..3], ["connect", "neg1", "export"], "{names:?}");
    let write = events
        .iter()
        .find(|e| e["event"] == "request" && e["command"] == "write")
        .expect("write request traced");
    assert_eq!(write["direction"], "to-server");
    assert_eq!(write["offset"], 0);
    assert_eq!(write["length"], 4096);
    assert_eq!(write["bytes"], 32, "QEMU 10 negotiates extended headers");
    assert!(
        events
            .iter()
            .any(|e| e["event"] == "data" && e["command"] == "write" && e["bytes"] == 4096)
    );
    let at = events
        .iter()
        .position(|e| e["event"] == "request" && e["command"] == "read" && e["offset"] == 1048576)
        .expect("read request traced");
    let read = &events[at];
    assert_eq!(read["rule"], "eio");
    assert_eq!(read["action"], "error");
    // The proxy answered it: the server never replied to it. QEMU reuses
    // cookies, so the next event with this cookie must be a new request.
    let cookie = &read["cookie"];
    if let Some(next) = events[at + 1..].iter().find(|e| &e["cookie"] == cookie) {
        assert_eq!(next["event"], "request", "{next}");
    }
}

#[test]
fn control_flag_serves_metrics_after_real_traffic_and_checks_the_token() {
    require_tool("qemu-io");
    let p = Nbdfault::start(&[
        "null",
        "--listen",
        "127.0.0.1:0",
        "--control",
        "127.0.0.1:0",
        "--control-token",
        "s3cret",
    ]);
    let url = p.control_url();
    assert!(url.starts_with("http://127.0.0.1:"), "{url}");
    QemuIo::new(p.uri()).cmd("write -P 7 0 64k").run_ok();

    let denied = curl(&[&format!("{url}/metrics")]);
    assert!(denied.ends_with("\n401"), "{denied}");
    let denied = curl(&[
        "-H",
        "Authorization: Bearer wrong",
        &format!("{url}/metrics"),
    ]);
    assert!(denied.ends_with("\n401"), "{denied}");

    // The connection closes on the proxy's side just after qemu-io exits.
    let mut metrics = String::new();
    wait_until(Duration::from_secs(5), || {
        metrics = curl(&[
            "-H",
            "Authorization: Bearer s3cret",
            &format!("{url}/metrics"),
        ]);
        metrics.contains("nbdfault_connections_active 0")
    });
    assert!(metrics.ends_with("\n200"), "{metrics}");
    for line in [
        "nbdfault_connections_total 1",
        "nbdfault_connections_active 0",
        "nbdfault_events_total{event=\"connect\",direction=\"none\"} 1",
        "nbdfault_events_total{event=\"data\",direction=\"to-server\"} 1",
        "nbdfault_request_duration_seconds_count{command=\"write\"} 1",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "no `{line}` in\n{metrics}"
        );
    }
    // 64 KiB of write payload plus headers went to the server.
    let to_server: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("nbdfault_bytes_total{direction=\"to-server\"} "))
        .expect("bytes metric")
        .parse()
        .unwrap();
    assert!(to_server > 65536, "{to_server}");
}

#[test]
fn control_on_a_public_address_needs_a_token() {
    let out = run(
        nbdfault_bin(),
        &["null", "--listen", "127.0.0.1:0", "--control", "0.0.0.0:0"],
    );
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(out.stdout, "", "no server may start");
    let err = out.stderr.trim();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("--control-token is required"), "{err}");
}

/// Kills a process that is not our child (by pid) when dropped, so that a
/// failing test leaves nothing running.
struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-KILL", &self.0.to_string()])
            .status();
    }
}

/// Whether `pid` is still a live process (not gone, not a zombie waiting
/// for a reaper that may not reap).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit(')')
            .next()
            .is_some_and(|r| !r.trim_start().starts_with('Z'))
    })
}

/// The harness dies (SIGKILL, no chance to clean up): nbdfault, its
/// grandchild-turned-orphan, stops cleanly on its own: the port is free
/// again, its pidfile is gone, and it says why.
#[test]
fn exit_with_parent_stops_when_the_parent_shell_is_killed() {
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("nbdfault.pid");
    let out = dir.path().join("nbdfault.out");
    let log = dir.path().join("nbdfault.log");
    let mut sh = Command::new("sh")
        .args([
            "-c",
            "\"$0\" null --listen 127.0.0.1:0 --exit-with-parent --pidfile \"$1\" >\"$2\" 2>\"$3\" & wait",
            nbdfault_bin(),
            pidfile.to_str().unwrap(),
            out.to_str().unwrap(),
            log.to_str().unwrap(),
        ])
        .spawn()
        .unwrap();
    // The pidfile appears once nbdfault listens.
    assert!(
        wait_until(START_TIMEOUT, || pidfile.exists()),
        "{}",
        read_to_string_lossy(&log)
    );
    let pid: u32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .strip_suffix('\n')
        .unwrap()
        .parse()
        .unwrap();
    let _guard = KillOnDrop(pid);
    assert!(alive(pid));

    let sh_pid = sh.id();
    sh.kill().unwrap();
    sh.wait().unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || !alive(pid)),
        "nbdfault still runs 10 s after its parent died"
    );
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(
        log.contains(&format!(
            "parent process {sh_pid} exited: stopping (--exit-with-parent)"
        )),
        "{log}"
    );
    assert!(!pidfile.exists(), "pidfile left behind");
    let out = std::fs::read_to_string(&out).unwrap();
    let uri = out.trim().strip_prefix("Listening on ").expect(&out);
    std::net::TcpListener::bind(tcp_addr(uri)).expect("the port is free again");
}

/// The parent is the process, not the thread that spawned nbdfault
/// (`PR_SET_PDEATHSIG` would fire when that thread ends): a harness that
/// starts it from a worker thread keeps it.
#[test]
fn exit_with_parent_outlives_the_thread_that_started_it() {
    require_tool("qemu-io");
    let mut p = std::thread::spawn(|| {
        Nbdfault::start(&["null", "--listen", "127.0.0.1:0", "--exit-with-parent"])
    })
    .join()
    .unwrap();
    QemuIo::new(p.uri()).cmd("read -P 0 0 64k").run_ok();
    assert!(p.is_running(), "{}", p.stderr());
    signal(p.pid(), "TERM");
    assert_eq!(
        p.wait_exit(Duration::from_secs(5)).and_then(|s| s.code()),
        Some(0)
    );
    assert!(!p.stderr().contains("parent process"), "{}", p.stderr());
}

#[test]
fn pidfile_holds_the_pid_while_serving_and_goes_at_exit() {
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("n.pid");
    let pf = pidfile.to_str().unwrap();
    let mut p = Nbdfault::start(&["null", "--listen", "127.0.0.1:0", "--pidfile", pf]);
    assert_eq!(
        std::fs::read_to_string(&pidfile).unwrap(),
        format!("{}\n", p.pid())
    );
    // Written through a temporary file, which is gone.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    signal(p.pid(), "TERM");
    assert_eq!(
        p.wait_exit(Duration::from_secs(5)).and_then(|s| s.code()),
        Some(0)
    );
    assert!(!pidfile.exists(), "pidfile left behind");

    let bad = dir.path().join("no-such-dir").join("n.pid");
    let out = run(
        nbdfault_bin(),
        &[
            "null",
            "--listen",
            "127.0.0.1:0",
            "--pidfile",
            bad.to_str().unwrap(),
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(out.stdout, "", "no server may start");
    assert_eq!(
        out.stderr,
        format!(
            "nbdfault: cannot write the pidfile {}: No such file or directory (os error 2)\n",
            bad.display()
        )
    );
}
