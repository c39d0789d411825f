//! The fast paths are byte-exact, and faults still land on the exact byte
//! when a rule starts matching in the middle of a fast stream.
//!
//! Payloads of 1 MiB between real peers (libnbd's Python binding, qemu-nbd
//! over a unix socket, nbdkit over TCP) are big enough that the proxy
//! splices them socket → pipe → socket into a unix socket, and copies them
//! in one write per read into a TCP socket (splicing loses there, see
//! `Socket::splice_pays`); a rule that fires on the Nth payload makes that
//! one go through the rule engine byte by byte instead. Every test runs
//! with the client on TCP and on a unix socket, so each path is proven on
//! both kinds of sink. Every block is compared with the disk image, so a
//! byte lost, repeated or moved by switching between paths shows up as a
//! difference.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::*;

const BLOCK: usize = 1 << 20;
const BLOCKS: usize = 24;

/// Reads blocks `from..to` of 1 MiB through `uri` and prints, per block
/// that differs from the image, `block:offset:xor` of each differing byte.
/// With `pause`, prints `paused` after block `pause` and waits for a line
/// on stdin before reading on. A read that fails prints `block:error`.
const READER: &str = r#"
import nbd, sys
uri, image, frm, to, pause, sr = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6] == "1"
B = 1 << 20
h = nbd.NBD()
h.set_request_structured_replies(sr)
h.connect_uri(uri)
with open(image, "rb") as f:
    disk = f.read()
for i in range(frm, to):
    if i == pause:
        print("paused", flush=True)
        sys.stdin.readline()
    try:
        got = h.pread(B, i * B)
    except nbd.Error as e:
        print(f"{i}:error", flush=True)
        break
    want = disk[i * B:(i + 1) * B]
    if got != want:
        for j in range(B):
            if got[j] != want[j]:
                print(f"{i}:{j}:{got[j] ^ want[j]}", flush=True)
print("done", flush=True)
"#;

fn image(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("disk.img");
    write_random_file(&path, (BLOCKS * BLOCK) as u64, 0x5eed);
    path
}

/// A fresh random image, served by qemu-nbd on a unix socket.
fn served_image() -> (tempfile::TempDir, std::path::PathBuf, QemuNbd) {
    require_python_nbd();
    require_tool("qemu-nbd");
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path());
    let q = QemuNbd::raw(&img);
    (dir, img, q)
}

fn read_blocks(uri: &str, image: &Path, structured: bool) -> Vec<String> {
    let sr = if structured { "1" } else { "0" };
    let out = python(
        READER,
        &[
            uri,
            &image.display().to_string(),
            "0",
            &BLOCKS.to_string(),
            "-1",
            sr,
        ],
    );
    let lines: Vec<String> = out.lines().map(str::to_string).collect();
    assert_eq!(lines.last().map(String::as_str), Some("done"), "{out}");
    lines[..lines.len() - 1].to_vec()
}

/// Where the proxy listens for the client, which makes the client's socket
/// the sink of every read reply.
#[derive(Debug, Clone, Copy)]
enum Client {
    Tcp,
    Unix,
}

const CLIENTS: [Client; 2] = [Client::Tcp, Client::Unix];

impl Client {
    /// The `--listen` argument, a fresh socket path in `dir` for unix.
    fn listen(self, dir: &Path) -> String {
        match self {
            Client::Tcp => "127.0.0.1:0".to_string(),
            Client::Unix => {
                static NEXT: AtomicUsize = AtomicUsize::new(0);
                let n = NEXT.fetch_add(1, Ordering::Relaxed);
                dir.join(format!("proxy-{n}.sock")).display().to_string()
            }
        }
    }
}

/// A proxy to `upstream` for `client`, with `extra` arguments.
fn proxy(dir: &Path, client: Client, upstream: &str, extra: &[&str]) -> Nbdfault {
    let listen = client.listen(dir);
    let mut args = vec!["proxy", "--listen", &listen, "--upstream", upstream];
    args.extend_from_slice(extra);
    Nbdfault::start(&args)
}

/// A proxy to `upstream` for `client` with the rules in `yaml`.
fn proxy_with_rules(dir: &Path, client: Client, upstream: &str, yaml: &str) -> Nbdfault {
    let rules = dir.join("rules.yaml");
    std::fs::write(&rules, yaml).unwrap();
    proxy(
        dir,
        client,
        upstream,
        &["--rules", &rules.display().to_string()],
    )
}

/// The data event of a structured read starts with the chunk's 8-byte
/// offset; a simple reply's data event is the data alone.
fn data_start(structured: bool) -> usize {
    if structured { 8 } else { 0 }
}

fn one_flip_in_the_21st_read(structured: bool) {
    let (dir, img, q) = served_image();
    let at = 300_000 + data_start(structured);
    for client in CLIENTS {
        let p = proxy_with_rules(
            dir.path(),
            client,
            &q.uri(),
            &format!(
                "rules:\n  - name: one-flip\n    event: data\n    direction: to-client\n    \
                 command: read\n    after: 20\n    times: 1\n    action: corrupt\n    at: {at}\n    xor: 0x5a\n"
            ),
        );
        // Blocks 0-19 on the fast path, block 20 through the rule engine
        // with one byte flipped, blocks 21-23 on the fast path again.
        assert_eq!(
            read_blocks(p.uri(), &img, structured),
            ["20:300000:90"],
            "{client:?}"
        );
        assert!(
            p.stderr()
                .contains("rule=one-flip action=corrupt event=data"),
            "{}",
            p.stderr()
        );
    }
}

#[test]
fn a_flip_in_the_middle_of_spliced_structured_reads_lands_on_its_byte() {
    one_flip_in_the_21st_read(true);
}

#[test]
fn a_flip_in_the_middle_of_spliced_simple_reads_lands_on_its_byte() {
    one_flip_in_the_21st_read(false);
}

#[test]
fn no_rules_tcp_upstream_and_either_client_is_byte_exact() {
    require_python_nbd();
    require_tool("nbdkit");
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path());
    let kit = Nbdkit::start_tcp(&["file", &img.display().to_string()]);
    for client in CLIENTS {
        let p = proxy(dir.path(), client, &kit.uri(), &[]);
        assert_eq!(read_blocks(p.uri(), &img, true), Vec::<String>::new());
        assert_eq!(read_blocks(p.uri(), &img, false), Vec::<String>::new());
    }
}

/// Toward a unix client, blocks 0-9 were spliced; toward a TCP client,
/// copied (splicing into TCP loses to copying, see `Socket::splice_pays`).
#[test]
fn a_rule_added_live_applies_from_the_next_payload_on_a_unix_client() {
    let spliced = a_rule_added_live_applies_from_the_next_payload_on(Client::Unix);
    // At least 9 MiB of read data was spliced (the first bytes of each
    // payload arrive with its header).
    assert!(spliced >= 9 * BLOCK as u64, "{spliced} bytes spliced");
}

#[test]
fn a_rule_added_live_applies_from_the_next_payload_on_a_tcp_client() {
    let spliced = a_rule_added_live_applies_from_the_next_payload_on(Client::Tcp);
    assert_eq!(spliced, 0, "nothing is spliced into a TCP socket");
}

/// Reads blocks 0-9, adds a rule through the control API, reads 10-19;
/// returns how many bytes of read data were spliced.
fn a_rule_added_live_applies_from_the_next_payload_on(client: Client) -> u64 {
    require_tool("curl");
    let (dir, img, q) = served_image();
    let ctl = dir.path().join("control.sock");
    let p = proxy(
        dir.path(),
        client,
        &q.uri(),
        &["--control", &ctl.display().to_string()],
    );
    let mut child = Command::new("/usr/bin/python3")
        .args([
            "-c",
            READER,
            p.uri(),
            &img.display().to_string(),
            "0",
            "20",
            "10",
            "1",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line, "paused\n", "blocks 0-9 came through exact");

    let body = r#"{"rules": [{"name": "flip-every-read", "event": "data", "direction": "to-client", "command": "read", "action": "corrupt", "at": 1008, "xor": 1}]}"#;
    let r = curl(&[
        "--unix-socket",
        &ctl.display().to_string(),
        "-X",
        "POST",
        "-H",
        "Content-Type: application/json",
        "-d",
        body,
        "http://localhost/rules",
    ]);
    assert!(r.ends_with("\n201"), "{r}");
    child.stdin.take().unwrap().write_all(b"go\n").unwrap();

    let mut rest = String::new();
    loop {
        let mut l = String::new();
        if out.read_line(&mut l).unwrap() == 0 {
            break;
        }
        rest.push_str(&l);
    }
    assert!(child.wait().unwrap().success());
    let want: String = (10..20).map(|b| format!("{b}:1000:1\n")).collect();
    assert_eq!(rest, format!("{want}done\n"));

    let metrics = run_ok(
        "curl",
        &[
            "-s",
            "--unix-socket",
            &ctl.display().to_string(),
            "http://localhost/metrics",
        ],
    );
    // A counter that never moved may be left out.
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(r#"nbdfault_spliced_bytes_total{direction="to-client"} "#))
        .map_or(0, |v| {
            v.trim()
                .parse()
                .unwrap_or_else(|_| panic!("bad spliced bytes metric in\n{metrics}"))
        })
}

/// Writes 1 MiB blocks of fresh data through the proxy with a rule that
/// corrupts one byte of the 6th write payload; the image must hold every
/// block as written but that one byte. The server's socket is the sink:
/// qemu-nbd on a unix socket (spliced), nbdkit on TCP (copied).
#[test]
fn spliced_writes_land_exact_and_a_midstream_corruption_lands_once() {
    require_tool("qemu-nbd");
    writes_land_exact(|img| {
        let q = QemuNbd::raw(img);
        (q.uri(), Box::new(q))
    });
}

#[test]
fn writes_to_a_tcp_server_land_exact_and_a_midstream_corruption_lands_once() {
    require_tool("nbdkit");
    writes_land_exact(|img| {
        let kit = Nbdkit::start_tcp(&["file", &img.display().to_string()]);
        (kit.uri(), Box::new(kit))
    });
}

/// `serve` starts a server on the image and returns its URI and a guard
/// that stops it when dropped.
fn writes_land_exact(serve: impl FnOnce(&Path) -> (String, Box<dyn std::any::Any>)) {
    require_python_nbd();
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len((BLOCKS * BLOCK) as u64)
        .unwrap();
    let (upstream, q) = serve(&img);
    let p = proxy_with_rules(
        dir.path(),
        Client::Tcp,
        &upstream,
        "rules:\n  - name: bad-write\n    event: data\n    direction: to-server\n    \
         command: write\n    after: 5\n    times: 1\n    action: corrupt\n    at: 777777\n    xor: 0x80\n",
    );
    let data = random_bytes(BLOCKS * BLOCK, 77);
    let src = dir.path().join("data.bin");
    std::fs::write(&src, &data).unwrap();
    python(
        r#"
import nbd, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
data = open(sys.argv[2], "rb").read()
B = 1 << 20
for i in range(len(data) // B):
    h.pwrite(data[i * B:(i + 1) * B], i * B)
h.flush()
h.shutdown()
"#,
        &[p.uri(), &src.display().to_string()],
    );
    drop(p);
    drop(q);
    let got = std::fs::read(&img).unwrap();
    let diffs: Vec<(usize, u8)> = got
        .iter()
        .zip(&data)
        .enumerate()
        .filter(|(_, (a, b))| a != b)
        .map(|(i, (a, b))| (i, a ^ b))
        .collect();
    assert_eq!(diffs, [(5 * BLOCK + 777_777, 0x80)]);
}

#[test]
fn a_cut_inside_a_payload_after_spliced_ones_keeps_what_came_before() {
    let (dir, img, q) = served_image();
    for client in CLIENTS {
        let p = proxy_with_rules(
            dir.path(),
            client,
            &q.uri(),
            "rules:\n  - name: cut\n    event: data\n    direction: to-client\n    \
             command: read\n    after: 3\n    action: disconnect\n    when: 500000\n",
        );
        assert_eq!(read_blocks(p.uri(), &img, true), ["3:error"], "{client:?}");
        assert!(
            p.wait_for_stderr(
                "rule=cut action=disconnect event=data",
                Duration::from_secs(5)
            ),
            "{}",
            p.stderr()
        );
    }
}

/// `--threads 0` (tokio's work-stealing runtime), one thread, more
/// threads than cores, and busy-polling threads all carry several clients
/// byte-exact at once.
#[test]
fn every_runtime_flavour_serves_concurrent_clients_exactly() {
    let (dir, img, q) = served_image();
    let upstream = q.uri();
    for (flavour, client) in [
        (&["--threads", "0"][..], Client::Tcp),
        (&["--threads", "0"], Client::Unix),
        (&["--threads", "1"], Client::Tcp),
        (&["--threads", "3"], Client::Unix),
        (&["--threads", "2", "--busy-poll", "100us"], Client::Tcp),
        (&["--threads", "2", "--busy-poll", "100us"], Client::Unix),
    ] {
        let p = proxy(dir.path(), client, &upstream, flavour);
        let clients: Vec<_> = (0..4)
            .map(|i| {
                let (uri, img) = (p.uri().to_string(), img.clone());
                std::thread::spawn(move || read_blocks(&uri, &img, i % 2 == 0))
            })
            .collect();
        for c in clients {
            assert_eq!(
                c.join().unwrap(),
                Vec::<String>::new(),
                "{flavour:?} {client:?}"
            );
        }
    }
}

/// A proxy that cannot make a pipe (out of file descriptors) copies
/// payloads instead, byte-exact. (Toward a unix client: toward a TCP one
/// it copies anyway and makes no pipe.)
#[test]
fn out_of_descriptors_for_pipes_it_copies_exactly() {
    require_tool("prlimit");
    let (dir, img, q) = served_image();
    let p = proxy(
        dir.path(),
        Client::Unix,
        &q.uri(),
        &["-vv", "--threads", "1"],
    );
    // Room for the client's socket and the upstream socket, not for a pipe.
    let open = std::fs::read_dir(format!("/proc/{}/fd", p.pid()))
        .unwrap()
        .count();
    let limit = format!("--nofile={}:{}", open + 2, open + 2);
    run_ok("prlimit", &["--pid", &p.pid().to_string(), &limit]);
    assert_eq!(read_blocks(p.uri(), &img, true), Vec::<String>::new());
    let log = p.stderr();
    assert!(log.contains("to-client: no pipe, copying"), "{log}");
    assert!(log.contains("Too many open files"), "{log}");
}
