//! Limits against slow, greedy or hostile clients: each closes or holds
//! only what it must, is logged, and leaves everyone else served.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn addr_of(uri: &str) -> &str {
    uri.trim_start_matches("nbd://").trim_end_matches('/')
}

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
    let mut idle = TcpStream::connect(addr_of(p.uri())).unwrap();
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
fn a_payload_over_the_limit_closes_that_connection_only() {
    require_tool("qemu-io");
    let p = Nbdfault::start(&["null", "--listen", "127.0.0.1:0", "--max-payload", "1M"]);
    let out = run("qemu-io", &["-f", "raw", "-c", "write 0 4M", p.uri()]);
    assert!(!out.success(), "{}", out.describe());
    assert!(
        p.wait_for_stderr("write payload length", Duration::from_secs(5)),
        "{}",
        p.stderr()
    );
    assert!(
        p.stderr().contains("exceeds the limit of"),
        "{}",
        p.stderr()
    );
    // Within the limit, and the next client, all is well.
    run_ok("qemu-io", &["-f", "raw", "-c", "write -P 3 0 1M", p.uri()]);
}

#[test]
fn clients_beyond_max_connections_wait_their_turn() {
    require_tool("qemu-io");
    require_tool("nbdinfo");
    let p = Nbdfault::start(&["null", "--listen", "127.0.0.1:0", "--max-connections", "1"]);
    // The first client stays connected while its stdin is open.
    let mut first = Command::new("qemu-io")
        .args(["-f", "raw", p.uri()])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
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
