//! Faults that shape traffic over time rather than break it: `throttle`
//! (a rate), `slice` (short writes), `after-bytes` (a cut after so many
//! bytes across messages) and `slow-close` (a connection that lingers
//! before it closes), with real clients in front of the null server and
//! qemu-nbd, and the shipped scenarios that use them.
//!
//! Times are asserted only from below, where the rule itself is the reason
//! for the wait (a throttled copy cannot finish before its bytes' time),
//! and loosely from above, as hang guards.

mod common;

use std::io::Read;
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use tempfile::TempDir;

fn rules_file(dir: &TempDir, yaml: &str) -> String {
    let path = dir.path().join("rules.yaml");
    std::fs::write(&path, yaml).unwrap();
    path.display().to_string()
}

fn scenario(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("rules")
        .join(format!("{name}.yaml"))
        .display()
        .to_string()
}

fn null_with(dir: &TempDir, yaml: &str, size: &str) -> Nbdfault {
    let rules = rules_file(dir, yaml);
    Nbdfault::start(&[
        "null",
        "--size",
        size,
        "--listen",
        "127.0.0.1:0",
        "--rules",
        &rules,
    ])
}

/// nbdcopy of the whole export to nowhere, reading every byte (no
/// extents); how long it took.
fn copy_out(uri: &str) -> Duration {
    require_tool("nbdcopy");
    let started = Instant::now();
    run_ok("nbdcopy", &["--no-extents", uri, "null:"]);
    started.elapsed()
}

const THROTTLE_512K: &str = "rules:\n  - name: slow-link\n    event: data\n    direction: to-client\n    \
                             action: throttle\n    rate: 512KiB/s\n";

/// nbdcopy reading 1 MiB at 512 KiB/s takes 2 s (it cannot take less);
/// every firing is logged, one per data event.
#[test]
fn a_throttle_paces_read_data_at_its_rate() {
    let dir = TempDir::new().unwrap();
    let p = null_with(&dir, THROTTLE_512K, "1M");
    let took = copy_out(p.uri());
    assert!(
        took >= Duration::from_millis(1950),
        "1 MiB at 512 KiB/s took {took:?}"
    );
    assert!(took < Duration::from_secs(10), "took {took:?}");
    assert!(
        p.stderr()
            .contains("rule=slow-link action=throttle event=data"),
        "{}",
        p.stderr()
    );
}

/// Two qemu-io clients reading 256 KiB each at once; how long until both
/// are done. Each checks its own output.
fn two_readers(uri: &str) -> Duration {
    require_tool("qemu-io");
    let started = Instant::now();
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let uri = uri.to_string();
            std::thread::spawn(move || QemuIo::new(&uri).cmd("read 0 256k").run_ok())
        })
        .collect();
    for r in readers {
        let out = r.join().unwrap();
        assert!(
            out.contains("read 262144/262144 bytes at offset 0"),
            "{out}"
        );
    }
    started.elapsed()
}

/// One bucket per rule: two clients at once share 256 KiB/s (512 KiB in
/// 2 s); with `per-connection: true` each has the whole rate (about 1 s).
#[test]
fn a_throttle_is_shared_unless_per_connection() {
    let dir = TempDir::new().unwrap();
    let rule = "rules:\n  - event: data\n    direction: to-client\n    action: throttle\n    \
                rate: 256KiB/s\n";
    let shared = two_readers(null_with(&dir, rule, "1M").uri());
    let own =
        two_readers(null_with(&dir, &format!("{rule}    per-connection: true\n"), "1M").uri());
    assert!(shared >= Duration::from_millis(1950), "shared: {shared:?}");
    assert!(own >= Duration::from_millis(975), "per connection: {own:?}");
    // Not a speed target: the shared bucket is what makes it twice as long.
    assert!(
        own * 4 < shared * 3,
        "per connection {own:?}, shared {shared:?}"
    );
}

/// rules/throttle-64k.yaml, with the command its comment gives: the write
/// is not held, the read of 128 KiB takes about 2 s, and the data is
/// right.
#[test]
fn scenario_throttle_64k() {
    require_tool("qemu-io");
    let dir = TempDir::new().unwrap();
    let disk = dir.path().join("disk.img");
    create_sparse(&disk, 1 << 30);
    let server = QemuNbd::raw(&disk);
    let p = Nbdfault::start(&[
        "proxy",
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        &server.uri(),
        "--rules",
        &scenario("throttle-64k"),
    ]);
    let started = Instant::now();
    let out = QemuIo::new(p.uri())
        .cmds(&["write -P 0x5a 0 128k", "read -P 0x5a 0 128k"])
        .run_ok();
    let took = started.elapsed();
    assert!(
        out.contains("read 131072/131072 bytes at offset 0"),
        "{out}"
    );
    assert!(took >= Duration::from_millis(1950), "took {took:?}");
    assert!(took < Duration::from_secs(20), "took {took:?}");
}

/// rules/short-segments.yaml, with the command its comment gives, in front
/// of qemu-nbd: qemu-io's data is byte-exact, and nbdinfo through the
/// proxy says exactly what it says directly.
#[test]
fn scenario_short_segments() {
    require_tool("qemu-io");
    require_tool("nbdinfo");
    let dir = TempDir::new().unwrap();
    let disk = dir.path().join("disk.img");
    write_random_file(&disk, 4 << 20, 7);
    let server = QemuNbd::raw(&disk);
    let sock = dir.path().join("proxy.sock");
    let p = Nbdfault::start(&[
        "proxy",
        "--listen",
        sock.to_str().unwrap(),
        "--upstream",
        &server.uri(),
        "--rules",
        &scenario("short-segments"),
    ]);
    let out = QemuIo::new(p.uri())
        .cmds(&["write -P 0xab 0 64k", "read -P 0xab 0 64k"])
        .run_ok();
    assert!(out.contains("read 65536/65536 bytes at offset 0"), "{out}");
    // Random data read back through the proxy, compared with the file.
    let copy = dir.path().join("copy.img");
    run_ok("nbdcopy", &[p.uri(), copy.to_str().unwrap()]);
    let mut want = std::fs::read(&disk).unwrap();
    want[..65536].fill(0xab);
    assert!(std::fs::read(&copy).unwrap() == want, "the copy differs");
    let direct = nbdinfo(&[&server.uri()]);
    let proxied = nbdinfo(&[p.uri()]);
    assert!(
        direct.success() && proxied.success(),
        "{}",
        proxied.describe()
    );
    assert_same_lines(
        "nbdinfo",
        &mask_uris(&direct.stdout, &[&server.uri()]),
        &mask_uris(&proxied.stdout, &[p.uri()]),
    );
    let faults = p.stderr();
    assert!(
        faults.contains("rule=short-handshake action=slice event=neg1")
            && faults.contains("rule=short-data action=slice event=data"),
        "{faults}"
    );
}

/// The pieces really are separate writes: a client reading the 18-byte
/// newstyle greeting, sliced into bytes 20 ms apart, needs many reads.
#[test]
fn a_sliced_greeting_arrives_in_many_reads() {
    let dir = TempDir::new().unwrap();
    let yaml = "rules:\n  - event: neg1\n    action: slice\n    size: 1\n    delay: 20ms\n";
    let rules = rules_file(&dir, yaml);
    let trace = dir.path().join("trace.jsonl");
    let p = Nbdfault::start(&[
        "null",
        "--listen",
        "127.0.0.1:0",
        "--rules",
        &rules,
        "--trace",
        trace.to_str().unwrap(),
    ]);
    let mut s = TcpStream::connect(tcp_addr(p.uri())).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let (mut got, mut reads) = (Vec::new(), 0);
    let mut buf = [0u8; 64];
    while got.len() < 18 {
        let n = s.read(&mut buf).expect("greeting");
        assert!(n > 0, "closed after {got:?}");
        got.extend_from_slice(&buf[..n]);
        reads += 1;
    }
    assert_eq!(&got[..8], b"NBDMAGIC", "{got:?}");
    // Unsliced, the greeting is one read. 18 reads are expected; a loaded
    // machine may merge a few.
    assert!(reads >= 6, "the greeting came in {reads} reads");
    // The trace says what the slice did, once, not once a piece.
    let want = "\"rule\":\"rule-1\",\"action\":\"slice\",\"result\":\"pace\",\"at\":0,\"piece\":1,\
                \"wait_us\":0,\"gap_us\":20000}";
    let mut paces = 0;
    wait_until(Duration::from_secs(10), || {
        paces = read_to_string_lossy(&trace).matches(want).count();
        paces > 0
    });
    assert_eq!(paces, 1, "{}", read_to_string_lossy(&trace));
    drop(p);
}

/// `after-bytes` counts the bytes of matching events across messages and
/// cuts inside the event that crosses the limit: a 64 KiB read passes (its
/// reply is below 70,000 bytes), the next one is cut. Per connection, so a
/// second client gets the same budget.
#[test]
fn after_bytes_cuts_where_the_count_crosses_the_limit() {
    require_tool("qemu-io");
    let dir = TempDir::new().unwrap();
    let yaml = "rules:\n  - name: limit-data\n    event: [reply, data]\n    direction: to-client\n    \
                action: disconnect\n    after-bytes: 70000\n    per-connection: true\n";
    let p = null_with(&dir, yaml, "1M");
    for _ in 0..2 {
        let (status, out) = QemuIo::new(p.uri())
            .cmds(&["read 0 64k", "read 64k 64k"])
            .run_merged(Duration::from_secs(60));
        assert!(
            out.contains("read 65536/65536 bytes at offset 0"),
            "{status:?} {out}"
        );
        assert!(
            !out.contains("at offset 65536"),
            "the second read passed: {out}"
        );
        assert!(out.contains("read failed"), "{out}");
    }
    let log = p.stderr();
    let fired: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("rule=limit-data action=disconnect event=data"))
        .collect();
    assert_eq!(fired.len(), 2, "{log}");
}

/// `slow-close`: the flush is never answered and the connection stays
/// open for the second before it closes.
#[test]
fn a_slow_close_lingers_before_closing() {
    require_tool("qemu-io");
    let dir = TempDir::new().unwrap();
    let yaml = "rules:\n  - event: request\n    command: flush\n    action: disconnect\n    \
                slow-close: 1500ms\n";
    let p = null_with(&dir, yaml, "1M");
    let started = Instant::now();
    let (status, out) = QemuIo::new(p.uri())
        .cmds(&["write 0 4k", "flush"])
        .run_merged(Duration::from_secs(60));
    let took = started.elapsed();
    assert!(out.contains("wrote 4096/4096 bytes at offset 0"), "{out}");
    // qemu-io says nothing of the lost connection; its status does.
    assert!(!status.success(), "{status:?} {out}");
    assert!(took >= Duration::from_millis(1500), "took {took:?}: {out}");
}

/// The new spellings are checked with located errors.
#[test]
fn shaping_rules_are_checked() {
    let dir = TempDir::new().unwrap();
    for (yaml, says) in [
        (
            "rules:\n  - event: data\n    action: throttle\n    rate: 64K\n",
            "rules.yaml:4:11: invalid rate \"64K\": no /s at its end",
        ),
        (
            "rules:\n  - event: data\n    action: slice\n",
            "rules.yaml:3:13: action slice needs a size",
        ),
        (
            "rules:\n  - event: data\n    action: disconnect\n    after-bytes: 1M\n    when: after\n",
            "rules.yaml:5:5: when cannot be combined with after-bytes",
        ),
        (
            "rules:\n  - event: data\n    action: disconnect\n    after-bytes: lots\n",
            "rules.yaml:4:18: after-bytes: invalid size \"lots\"",
        ),
        (
            "rules:\n  - event: data\n    action: delay\n    duration: 1s\n    slow-close: 1s\n",
            "rules.yaml:5:5: slow-close applies only to action disconnect",
        ),
    ] {
        let path = rules_file(&dir, yaml);
        let out = run(nbdfault_bin(), &["check", &path]);
        assert!(!out.success(), "{yaml}");
        let shown = out
            .stderr
            .replace(&format!("{}/", dir.path().display()), "");
        assert!(shown.contains(says), "{yaml}\n{shown}");
    }
}
