//! Any request the server accepts passes the proxy, byte for byte: reads
//! and writes at each real server's own limit (Debian's nbd-server, which
//! takes 40 MiB; qemu-nbd at 32 MiB; nbdkit at 64 MiB), pipelined. A request
//! over `--max-payload` is answered with EINVAL when it arrives, the server
//! never sees it, and the connection goes on. Requests sharing a cookie are
//! all answered.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use tempfile::TempDir;

const MIB: usize = 1 << 20;

/// A fresh directory with `disk.img`, `size` pseudo-random bytes; and them.
fn random_disk(size: u64, seed: u64) -> (TempDir, PathBuf, Vec<u8>) {
    let dir = TempDir::new().unwrap();
    let disk = dir.path().join("disk.img");
    write_random_file(&disk, size, seed);
    let bytes = std::fs::read(&disk).unwrap();
    (dir, disk, bytes)
}

/// Panics naming the first differing offset unless `got == want`.
fn assert_bytes_eq(what: &str, got: &[u8], want: &[u8]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(at) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!(
            "{what}: first difference at byte {at}: {:#04x} instead of {:#04x}",
            got[at], want[at]
        );
    }
}

/// Through libnbd, with both in flight at once: a read of the export's
/// first `len(data)` bytes and a write of `data` at `at`; then the written
/// range read back. Returns (first read, read back). `structured`: ask for
/// structured replies (else every read is a simple reply).
fn pipelined_transfer(
    uri: &str,
    dir: &Path,
    data: &[u8],
    at: u64,
    structured: bool,
) -> (Vec<u8>, Vec<u8>) {
    const SCRIPT: &str = r#"
import nbd, sys
uri, src, at, structured, out_read, out_back = sys.argv[1:]
at = int(at)
h = nbd.NBD()
h.set_request_structured_replies(structured == "1")
h.connect_uri(uri)
data = open(src, "rb").read()
n = len(data)
rbuf = nbd.Buffer(n)
wbuf = nbd.Buffer.from_bytearray(bytearray(data))
cookies = [h.aio_pread(rbuf, 0), h.aio_pwrite(wbuf, at)]
for c in cookies:
    while not h.aio_command_completed(c):
        h.poll(-1)
open(out_read, "wb").write(rbuf.to_bytearray())
open(out_back, "wb").write(h.pread(n, at))
h.shutdown()
"#;
    let src = dir.join("data");
    let (out_read, out_back) = (dir.join("read"), dir.join("back"));
    std::fs::write(&src, data).unwrap();
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let at = at.to_string();
    let structured = if structured { "1" } else { "0" };
    python(
        SCRIPT,
        &[uri, &s(&src), &at, structured, &s(&out_read), &s(&out_back)],
    );
    (
        std::fs::read(out_read).unwrap(),
        std::fs::read(out_back).unwrap(),
    )
}

/// Debian's nbd-server, from a config file, in the foreground (`-d`: it
/// serves one connection, then exits) on a loopback port; killed on drop.
struct NbdServer {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl NbdServer {
    fn start(dir: &Path, disk: &Path) -> NbdServer {
        if Command::new("nbd-server")
            .arg("-V")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_err()
        {
            panic!(
                "nbd-server not found: install the Debian package nbd-server (scripts/test.sh does it)"
            );
        }
        // A free port: the kernel's pick, released for nbd-server to take.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let config = dir.join("nbd-server.conf");
        std::fs::write(
            &config,
            format!(
                "[generic]\n\tport = {port}\n\tlistenaddr = 127.0.0.1\n\
                 [disk]\n\texportname = {}\n",
                disk.display()
            ),
        )
        .unwrap();
        let log = dir.join("nbd-server.log");
        let config = config.to_str().unwrap().to_string();
        let mut child = spawn_logged("nbd-server", &["-C", &config, "-d"], &log);
        // Connecting to see whether it listens would use up its one
        // connection: watch the kernel's table of listening sockets instead.
        let listening = format!("0100007F:{port:04X} 00000000:0000 0A");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "nbd-server exited with {status}\n{}",
                    read_to_string_lossy(&log)
                );
            }
            let tcp = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
            if tcp.contains(&listening) {
                break;
            }
            if Instant::now() > deadline {
                kill_child(&mut child);
                panic!(
                    "nbd-server did not listen on port {port}\n{}",
                    read_to_string_lossy(&log)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        NbdServer { child, port, log }
    }

    fn target(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        kill_child(&mut self.child);
    }
}

#[test]
fn nbd_server_gets_40_mib_reads_and_writes_through_the_proxy_byte_exact() {
    let (dir, disk, before) = random_disk(160 << 20, 1);
    let server = NbdServer::start(dir.path(), &disk);
    // The client's export name goes through: nbd-server serves "disk".
    let p = Nbdfault::proxy(&server.target());
    let data = random_bytes(40 * MIB, 2);
    let at = 80 << 20;
    // nbd-server only speaks simple replies: a 40 MiB read is one simple
    // reply whose length only the request says.
    let (read, back) = pipelined_transfer(
        &uri_with_export(p.uri(), "disk"),
        dir.path(),
        &data,
        at,
        false,
    );
    assert_bytes_eq("40 MiB read", &read, &before[..40 * MIB]);
    assert_bytes_eq("40 MiB read back", &back, &data);
    let log = server.log.clone();
    drop(server);
    // What the server wrote to its disk, seen from its side.
    let after = std::fs::read(&disk).unwrap();
    assert_bytes_eq(
        "nbd-server's disk",
        &after[at as usize..at as usize + data.len()],
        &data,
    );
    assert!(
        !p.stderr().contains("closing connection"),
        "{}\n{}",
        p.stderr(),
        read_to_string_lossy(&log)
    );
}

#[test]
fn qemu_nbd_gets_32_mib_requests_its_own_limit_both_reply_forms() {
    let (dir, disk, before) = random_disk(96 << 20, 3);
    let q = QemuNbd::raw(&disk);
    let p = Nbdfault::proxy(&q.uri());
    for (structured, seed, at) in [(false, 4, 32 << 20), (true, 5, 64 << 20)] {
        let data = random_bytes(32 * MIB, seed);
        let (read, back) = pipelined_transfer(p.uri(), dir.path(), &data, at, structured);
        assert_bytes_eq("32 MiB read", &read, &before[..32 * MIB]);
        assert_bytes_eq("32 MiB read back", &back, &data);
    }
    assert!(!p.stderr().contains("closing connection"), "{}", p.stderr());
}

#[test]
fn nbdkit_gets_64_mib_requests_its_own_limit() {
    let k = Nbdkit::start(&["memory", "256M"]);
    let p = Nbdfault::proxy(&k.uri());
    let dir = TempDir::new().unwrap();
    let data = random_bytes(64 * MIB, 6);
    for structured in [false, true] {
        let (read, back) = pipelined_transfer(p.uri(), dir.path(), &data, 128 << 20, structured);
        // The first read may run before the write lands; the memory disk
        // starts zeroed and the two ranges do not overlap.
        assert_bytes_eq("64 MiB read", &read, &vec![0u8; 64 * MIB]);
        assert_bytes_eq("64 MiB read back", &back, &data);
    }
    assert!(!p.stderr().contains("closing connection"), "{}", p.stderr());
}

#[test]
fn a_request_over_max_payload_is_refused_when_it_arrives() {
    let dir = TempDir::new().unwrap();
    let log = dir.path().join("nbdkit-requests.log");
    let logfile = format!("logfile={}", log.display());
    let k = Nbdkit::start(&["--filter=log", "memory", "64M", &logfile]);
    let p = Nbdfault::start(&[
        "proxy",
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        &k.uri(),
        "--max-payload",
        "1M",
    ]);
    // Over the limit, pipelined between requests within it: a 4 MiB read
    // and a 4 MiB write (its payload swallowed), in either reply form.
    const SCRIPT: &str = r#"
import errno, nbd, sys
h = nbd.NBD()
h.set_request_structured_replies(sys.argv[2] == "1")
h.connect_uri(sys.argv[1])
good = b"\x5a" * (1 << 20)
h.pwrite(good, 0)
bufs = [nbd.Buffer(4 << 20), nbd.Buffer.from_bytearray(bytearray(b"\xa5" * (4 << 20))), nbd.Buffer(1 << 20)]
cookies = [h.aio_pread(bufs[0], 0), h.aio_pwrite(bufs[1], 0), h.aio_pread(bufs[2], 0)]
for c in cookies:
    try:
        while not h.aio_command_completed(c):
            h.poll(-1)
        print("ok")
    except nbd.Error as e:
        print(errno.errorcode.get(e.errno, e.errno))
print(bytes(bufs[2].to_bytearray()) == good)
print(h.pread(1 << 20, 0) == good)
h.shutdown()
"#;
    for structured in ["0", "1"] {
        let out = python(SCRIPT, &[p.uri(), structured]);
        assert_eq!(
            out.lines().collect::<Vec<_>>(),
            ["EINVAL", "EINVAL", "ok", "True", "True"],
            "structured replies {structured}\n{}",
            p.stderr()
        );
    }
    let stderr = p.stderr();
    assert!(
        stderr.contains(
            "refusing a request: request length 4194304 exceeds the proxy's --max-payload 1048576"
        ) && stderr.contains("refusing a request: write payload 4194304 exceeds"),
        "{stderr}"
    );
    assert!(!stderr.contains("closing connection"), "{stderr}");
    // The server saw the requests within the limit, never the others.
    let seen = read_to_string_lossy(&log);
    assert!(seen.contains("count=0x100000"), "{seen}");
    assert!(!seen.contains("count=0x400000"), "{seen}");
}

#[test]
fn qemu_io_is_told_einval_over_max_payload_and_goes_on() {
    let p = Nbdfault::start(&["null", "--listen", "127.0.0.1:0", "--max-payload", "1M"]);
    let out = QemuIo::new(p.uri())
        .cmd("write -P 3 0 4M")
        .cmd("write -P 3 0 1M")
        .cmd("read -P 0 1M 1M")
        .run();
    assert!(
        out.stdout.contains("write failed: Invalid argument"),
        "{}",
        out.describe()
    );
    assert!(
        out.stdout.contains("wrote 1048576/1048576 bytes")
            && out.stdout.contains("read 1048576/1048576 bytes"),
        "{}",
        out.describe()
    );
    assert!(!p.stderr().contains("closing connection"), "{}", p.stderr());
}

#[test]
fn absurd_max_payloads_are_refused_at_startup() {
    for (size, says) in [
        ("18446744073709551615", "must be from 512 bytes to 4G"),
        ("5G", "must be from 512 bytes to 4G"),
        ("100", "must be from 512 bytes to 4G"),
        ("16E", "too large"),
    ] {
        let out = run_fail(
            nbdfault_bin(),
            &["null", "--max-payload", size, "--run", "true"],
        );
        assert_eq!(out.status.code(), Some(1), "{}", out.describe());
        assert!(
            out.stderr.starts_with("nbdfault: --max-payload") && out.stderr.contains(says),
            "{size}: {}",
            out.describe()
        );
    }
}

// ---------------------------------------------------------------------------
// Requests sharing a cookie, from a client of our own (libnbd picks its
// cookies itself).

const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

/// Fixed newstyle, NBD_OPT_GO for the default export, simple replies.
fn handshake(s: &mut TcpStream) {
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).unwrap();
    assert_eq!(&greeting[..16], b"NBDMAGICIHAVEOPT");
    // Client flags: FIXED_NEWSTYLE | NO_ZEROES; NBD_OPT_GO, empty name, no
    // information requests.
    let mut c = 3u32.to_be_bytes().to_vec();
    c.extend(b"IHAVEOPT");
    c.extend(7u32.to_be_bytes());
    c.extend(6u32.to_be_bytes());
    c.extend([0u8; 6]);
    s.write_all(&c).unwrap();
    loop {
        let mut h = [0u8; 20];
        s.read_exact(&mut h).unwrap();
        let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data).unwrap();
        assert_eq!(kind & 0x8000_0000, 0, "NBD_OPT_GO refused: {kind:#x}");
        if kind == 1 {
            return;
        }
    }
}

/// A simple reply's header: (error, cookie).
fn reply(s: &mut TcpStream) -> (u32, u64) {
    let mut h = [0u8; 16];
    s.read_exact(&mut h).unwrap();
    assert_eq!(
        u32::from_be_bytes(h[..4].try_into().unwrap()),
        SIMPLE_REPLY_MAGIC
    );
    (
        u32::from_be_bytes(h[4..8].try_into().unwrap()),
        u64::from_be_bytes(h[8..16].try_into().unwrap()),
    )
}

#[test]
fn pipelined_requests_under_one_cookie_are_all_answered() {
    let (_dir, disk, image) = random_disk(8 << 20, 7);
    let q = QemuNbd::raw(&disk);
    let p = Nbdfault::proxy(&q.uri());
    let mut s = TcpStream::connect(tcp_addr(p.uri())).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    handshake(&mut s);
    let (read, write) = (0u16, 1u16);
    let payload = random_bytes(512, 8);
    // Cookie 7: a 4 KiB read, a 64 KiB read and a write: a reply to each
    // is framed differently, so which one a reply answers matters.
    // Cookie 9: two 1 MiB reads of different places.
    let mut out = request(read, 7, 0, 4096);
    out.extend(request(read, 7, 1 << 20, 65536));
    out.extend(request(write, 7, 2 << 20, 512));
    out.extend(&payload);
    out.extend(request(read, 9, 3 << 20, MIB as u32));
    out.extend(request(read, 9, 5 << 20, MIB as u32));
    s.write_all(&out).unwrap();
    // Replies to one cookie come in request order.
    let mut want7: Vec<Option<&[u8]>> = vec![
        Some(&image[..4096]),
        Some(&image[1 << 20..(1 << 20) + 65536]),
        None,
    ];
    want7.reverse();
    let mut got9 = Vec::new();
    for _ in 0..5 {
        let (error, cookie) = reply(&mut s);
        assert_eq!(error, 0, "cookie {cookie}");
        match cookie {
            7 => {
                if let Some(want) = want7.pop().expect("one reply per request") {
                    let mut data = vec![0u8; want.len()];
                    s.read_exact(&mut data).unwrap();
                    assert_bytes_eq("cookie 7's read", &data, want);
                }
            }
            9 => {
                let mut data = vec![0u8; MIB];
                s.read_exact(&mut data).unwrap();
                got9.push(data);
            }
            other => panic!("reply for cookie {other}"),
        }
    }
    // The two replies under cookie 9 carry the two places, in some order:
    // the client cannot tell them apart either, only their data can.
    let places = [&image[3 << 20..4 << 20], &image[5 << 20..6 << 20]];
    assert!(
        got9 == places || got9 == [places[1], places[0]],
        "cookie 9's reads are not the two places asked for"
    );
    // The write under the reused cookie landed.
    s.write_all(&request(read, 10, 2 << 20, 512)).unwrap();
    assert_eq!(reply(&mut s), (0, 10));
    let mut back = vec![0u8; 512];
    s.read_exact(&mut back).unwrap();
    assert_bytes_eq("the write under cookie 7", &back, &payload);
    assert!(!p.stderr().contains("closing connection"), "{}", p.stderr());
}
