//! Limits against slow, greedy or hostile clients: each closes or holds
//! only what it must, is logged, and leaves everyone else served.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

#[test]
fn a_client_that_never_finishes_the_handshake_is_closed() {
    require_tool("nbdinfo");
    let p = Nbdfault::start(&[
        "null",
        "--listen",
        "127.0.0.1:0",
        "--handshake-timeout",
        "1s",
    ]);
    // Half a handshake: read the greeting, send nothing.
    let mut idle = TcpStream::connect(tcp_addr(p.uri())).unwrap();
    idle.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut greeting = [0u8; 18];
    idle.read_exact(&mut greeting).unwrap();
    assert_eq!(&greeting[..8], b"NBDMAGIC");
    // Meanwhile a real client is served.
    assert_eq!(run_ok("nbdinfo", &["--size", p.uri()]).trim(), "8589934592");
    let t = Instant::now();
    let mut rest = Vec::new();
    let n = idle.read_to_end(&mut rest).unwrap_or(0);
    assert_eq!(n, 0, "nothing more is sent");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert!(
        p.wait_for_stderr("handshake not finished within 1s", Duration::from_secs(5)),
        "{}",
        p.stderr()
    );
}

#[test]
fn clients_beyond_max_connections_wait_their_turn() {
    require_tool("qemu-io");
    require_tool("nbdinfo");
    let p = Nbdfault::start(&["null", "--listen", "127.0.0.1:0", "--max-connections", "1"]);
    // The first client stays connected while its stdin is open.
    let mut first = QemuIo::new(p.uri()).spawn_idle();
    std::thread::sleep(Duration::from_millis(500));
    let second = run("timeout", &["2", "nbdinfo", "--size", p.uri()]);
    assert_eq!(
        second.status.code(),
        Some(124),
        "the second client was not held: {}",
        second.describe()
    );
    assert!(
        p.stderr()
            .contains("1 connections open (--max-connections)"),
        "{}",
        p.stderr()
    );
    // When the first leaves, the next one is served.
    first.stdin.take().unwrap().write_all(b"quit\n").unwrap();
    first.wait().unwrap();
    assert_eq!(run_ok("nbdinfo", &["--size", p.uri()]).trim(), "8589934592");
}

/// An upstream whose listen queue is full drops SYNs, so connecting to it
/// hangs (the kernel retries for minutes): `--connect-timeout` gives up,
/// the client is closed with the target named in the log, and the proxy
/// serves on.
#[test]
fn an_upstream_that_never_answers_a_connect_is_given_up_on() {
    require_tool("nbdinfo");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // Backlog 0: one connection waits in the queue, further SYNs drop.
    let listener = rt.block_on(async {
        let s = tokio::net::TcpSocket::new_v4().unwrap();
        s.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        s.listen(0).unwrap()
    });
    let addr = listener.local_addr().unwrap();
    let mut fillers = Vec::new();
    let full =
        (0..8).any(
            |_| match TcpStream::connect_timeout(&addr, Duration::from_millis(300)) {
                Ok(s) => {
                    fillers.push(s);
                    false
                }
                Err(_) => true,
            },
        );
    assert!(
        full,
        "the listen queue never filled ({} connections)",
        fillers.len()
    );

    let target = addr.to_string();
    let p = Nbdfault::start(&[
        "proxy",
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        &target,
        "--connect-timeout",
        "300ms",
    ]);
    let out = run_with_timeout("nbdinfo", &["--size", p.uri()], Duration::from_secs(20));
    assert!(!out.success(), "{}", out.describe());
    assert!(
        p.wait_for_stderr(
            &format!("cannot reach upstream {target}: "),
            Duration::from_secs(5)
        ),
        "{}",
        p.stderr()
    );
    assert!(
        p.stderr()
            .contains("no connection within 300ms (--connect-timeout)"),
        "{}",
        p.stderr()
    );
    // The proxy is still there for the next client.
    let again = run_with_timeout("nbdinfo", &["--size", p.uri()], Duration::from_secs(20));
    assert!(!again.success(), "{}", again.describe());
    assert_eq!(
        p.stderr().matches("(--connect-timeout)").count(),
        2,
        "{}",
        p.stderr()
    );
    drop(listener);
}

/// The open file limit is raised to the hard limit at start (a connection
/// can hold six descriptors; a soft limit of 256 would allow ~40).
#[test]
fn the_open_file_limit_is_raised_to_the_hard_limit() {
    require_tool("prlimit");
    let mut child = Command::new("prlimit")
        .args([
            "--nofile=256:4096",
            nbdfault_bin(),
            "null",
            "--listen",
            "127.0.0.1:0",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("prlimit");
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut line).unwrap();
    assert!(line.starts_with("Listening on "), "{line}");
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", child.id())).unwrap();
    let _ = child.kill();
    let _ = child.wait();
    let open = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("Max open files line");
    let fields: Vec<&str> = open.split_whitespace().collect();
    assert_eq!(fields[3..5], ["4096", "4096"], "{open}");
}
