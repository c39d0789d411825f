//! Output that nobody reads never stops the proxy (issue 13, finding 5).
//!
//! A harness that starts nbdfault with stderr on a pipe it reads only at the
//! end, or a `--trace` FIFO whose reader stops, must not freeze traffic,
//! `/metrics` or SIGTERM: lines past a bounded queue are dropped and
//! counted. A FIFO with no reader at all is refused at start instead of
//! waiting for one before listening. These tests start the binary by hand
//! because they must own its stderr (the common harness drains it).

use std::fs::OpenOptions;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_nbdfault");

/// Waits for `child` to end, killing it after `limit`: `None` if it had to
/// be killed.
fn wait_or_kill(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let start = Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return Some(s);
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Starts nbdfault with `args` and stderr as given; returns it once it has
/// printed `Listening on` and `Control on`.
fn start(args: &[&str], stderr: Stdio) -> Child {
    let mut child = Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut seen = String::new();
    for _ in 0..2 {
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        seen.push_str(&line);
    }
    assert!(
        seen.starts_with("Listening on ") && seen.contains("Control on "),
        "unexpected start: {seen:?}"
    );
    child
}

/// A 64 MiB null server with a control socket in `dir`, started with
/// `extra` arguments: (the process, its NBD URI, its control socket).
fn start_null(dir: &Path, extra: &[&str], stderr: Stdio) -> (Child, String, PathBuf) {
    let sock = dir.join("nbd.sock");
    let control = dir.join("control.sock");
    let (sock_arg, control_arg) = (sock.display().to_string(), control.display().to_string());
    let mut args = vec![
        "null",
        "--size",
        "64M",
        "--listen",
        &sock_arg,
        "--control",
        &control_arg,
    ];
    args.extend_from_slice(extra);
    let child = start(&args, stderr);
    (child, format!("nbd+unix:///?socket={sock_arg}"), control)
}

/// Everything left in a child's pipe.
fn drain(pipe: Option<impl Read>) -> String {
    let mut text = String::new();
    if let Some(mut p) = pipe {
        p.read_to_string(&mut text).unwrap();
    }
    text
}

fn metrics(control: &Path) -> String {
    let mut s = UnixStream::connect(control).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    text
}

fn counter(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in:\n{text}"))
}

/// 16,384 reads of 4 KiB through `uri`: three trace lines (or one fault
/// line) each, far more than any queue or pipe holds.
fn many_small_reads(uri: &str) {
    let mut copy = Command::new("nbdcopy")
        .args([
            "--request-size=4096",
            "--no-extents",
            "--connections=1",
            uri,
            "null:",
        ])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = wait_or_kill(&mut copy, Duration::from_secs(120));
    let err = drain(copy.stderr.take());
    assert!(
        status.is_some_and(|s| s.success()),
        "nbdcopy through the proxy did not finish ({status:?}): {err}"
    );
}

fn sigterm_ends(child: &mut Child) {
    let pid = child.id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(
        wait_or_kill(child, Duration::from_secs(10)).is_some(),
        "SIGTERM did not end nbdfault within 10 s"
    );
}

fn mkfifo(path: &Path) {
    let ok = Command::new("mkfifo").arg(path).status().unwrap();
    assert!(ok.success());
}

#[test]
fn a_trace_fifo_without_a_reader_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("trace.fifo");
    mkfifo(&fifo);
    let sock = dir.path().join("nbd.sock");
    let mut child = Command::new(BIN)
        .args([
            "null",
            "--listen",
            &sock.display().to_string(),
            "--trace",
            &fifo.display().to_string(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = wait_or_kill(&mut child, Duration::from_secs(10));
    let err = drain(child.stderr.take());
    let out = drain(child.stdout.take());
    assert!(
        status.is_some_and(|s| !s.success()),
        "expected a refusal, got {status:?} (stderr: {err})"
    );
    assert!(
        err.contains("is a FIFO with no reader; start the reader first"),
        "{err}"
    );
    assert!(!out.contains("Listening on"), "{out}");
}

#[test]
fn a_trace_reader_that_stops_reading_loses_lines_not_traffic() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("trace.fifo");
    mkfifo(&fifo);
    // A reader that opens the FIFO and never reads from it.
    let _reader = OpenOptions::new()
        .read(true)
        .custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits())
        .open(&fifo)
        .unwrap();
    let fifo_arg = fifo.display().to_string();
    let (mut child, uri, control) = start_null(dir.path(), &["--trace", &fifo_arg], Stdio::null());
    many_small_reads(&uri);
    let text = metrics(&control);
    assert!(
        counter(&text, "nbdfault_trace_lines_dropped_total") > 0,
        "{text}"
    );
    assert_eq!(counter(&text, "nbdfault_log_lines_dropped_total"), 0);
    sigterm_ends(&mut child);
}

/// The same for `--pcap`: a FIFO without a reader is refused at start,
/// and a capture reader that stops reading loses packets, counted and
/// logged once, never traffic.
#[test]
fn a_capture_reader_that_stops_reading_loses_packets_not_traffic() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("capture.fifo");
    mkfifo(&fifo);
    let fifo_arg = fifo.display().to_string();
    let sock = dir.path().join("refused.sock").display().to_string();
    let mut refused = Command::new(BIN)
        .args(["null", "--listen", &sock, "--pcap", &fifo_arg])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = wait_or_kill(&mut refused, Duration::from_secs(10));
    let err = drain(refused.stderr.take());
    assert!(status.is_some_and(|s| !s.success()), "{status:?}: {err}");
    assert!(
        err.contains(&format!(
            "cannot create capture file {fifo_arg}: it is a FIFO with no reader; start the reader first"
        )),
        "{err}"
    );

    let _reader = OpenOptions::new()
        .read(true)
        .custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits())
        .open(&fifo)
        .unwrap();
    let log = dir.path().join("stderr.log");
    let (mut child, uri, control) = start_null(
        dir.path(),
        &["--pcap", &fifo_arg],
        Stdio::from(std::fs::File::create(&log).unwrap()),
    );
    many_small_reads(&uri);
    let text = metrics(&control);
    assert!(
        counter(&text, "nbdfault_pcap_packets_dropped_total") > 0,
        "{text}"
    );
    let said = std::fs::read_to_string(&log).unwrap();
    assert_eq!(
        said.matches("the packet capture's writer is not keeping up: dropping packets")
            .count(),
        1,
        "{said}"
    );
    sigterm_ends(&mut child);
}

#[test]
fn an_unread_stderr_loses_log_lines_not_traffic() {
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules.yaml");
    // A fault line for every read, and no change to what the client sees.
    std::fs::write(
        &rules,
        "rules:\n  - name: log-every-read\n    event: request\n    command: read\n    \
         action: delay\n    duration: 0s\n",
    )
    .unwrap();
    let rules_arg = rules.display().to_string();
    // stderr is a pipe this test never reads, as `Popen(stderr=PIPE)` read
    // at the end would be.
    let (mut child, uri, control) =
        start_null(dir.path(), &["--rules", &rules_arg], Stdio::piped());
    many_small_reads(&uri);
    let text = metrics(&control);
    assert!(
        counter(&text, "nbdfault_log_lines_dropped_total") > 0,
        "{text}"
    );
    assert!(
        text.contains("nbdfault_faults_total{rule=\"log-every-read\",action=\"delay\"} 16384"),
        "{text}"
    );
    sigterm_ends(&mut child);
    // What did get through holds the fault lines logged before the pipe
    // filled.
    let err = drain(child.stderr.take());
    assert!(err.contains("rule=log-every-read action=delay"), "{err}");
}
