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
    let out = run("qemu-io", &["-f", "raw", "-c", "write 0 4k", uri]);
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
    let mut client = Command::new("qemu-io")
        .args(["-f", "raw", p.uri()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("qemu-io");
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
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert!(
        lines[0].starts_with("Listening on nbd+unix:///?socket="),
        "{lines:?}"
    );
    assert_eq!(lines[1], "1048576");
    // The private socket directory is gone.
    let sock = lines[0].trim_start_matches("Listening on nbd+unix:///?socket=");
    let dir = std::path::Path::new(sock).parent().unwrap();
    assert!(!dir.exists(), "{} left behind", dir.display());

    let out = run(
        nbdfault_bin(),
        &[
            "null",
            "--listen",
            "127.0.0.1:0",
            "--run",
            "test -n \"$port\" && test -z \"$unixsocket\" && nbdinfo --size \"$uri\"",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", out.describe());
    assert_eq!(out.stdout.lines().nth(1), Some("8589934592"));
}
