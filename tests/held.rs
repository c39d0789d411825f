//! What a client that misbehaves while it is held back costs the proxy:
//! answers the proxy makes itself for a client that never reads them must
//! hold up that client's requests, not pile up in memory; and a connection
//! held by a stall, a delay or a pause must end when its client (or its
//! server) goes away, however much it sent before leaving.
//!
//! The hostile clients are small raw NBD clients written here; real clients
//! (qemu-io) check that everyone else is served meanwhile.

mod common;

use std::fs;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use tempfile::TempDir;

const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
const OPT_GO: u32 = 7;
const OPT_LIST: u32 = 3;
const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;

/// Generous guard for anything that should happen at once.
const GUARD: Duration = Duration::from_secs(20);

fn option(opt: u32, data: &[u8]) -> Vec<u8> {
    let mut b = IHAVEOPT.to_be_bytes().to_vec();
    b.extend(opt.to_be_bytes());
    b.extend((data.len() as u32).to_be_bytes());
    b.extend(data);
    b
}

fn dial(uri: &str) -> TcpStream {
    let s = TcpStream::connect(tcp_addr(uri)).expect("connect to nbdfault");
    s.set_read_timeout(Some(GUARD)).unwrap();
    s
}

/// Reads the greeting and sends the client flags (fixed newstyle, no
/// zeroes): options come next.
fn negotiating(uri: &str) -> TcpStream {
    let mut s = dial(uri);
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).expect("greeting");
    s.write_all(&3u32.to_be_bytes()).unwrap();
    s
}

/// A client in transmission (NBD_OPT_GO on the default export, simple
/// replies).
fn transmitting(uri: &str) -> TcpStream {
    let mut s = negotiating(uri);
    s.write_all(&option(OPT_GO, &[0; 6])).unwrap();
    loop {
        let mut head = [0u8; 20];
        s.read_exact(&mut head).expect("option reply");
        assert_eq!(head[..8], REPLY_MAGIC.to_be_bytes(), "option reply magic");
        let len = u32::from_be_bytes(head[16..20].try_into().unwrap());
        io::copy(&mut (&mut s).take(len.into()), &mut io::sink()).unwrap();
        match u32::from_be_bytes(head[12..16].try_into().unwrap()) {
            1 => return s,
            3 => {}
            t => panic!("NBD_OPT_GO refused: {t:#x}"),
        }
    }
}

/// VmRSS of `pid`, in MiB.
fn rss_mib(pid: u32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    kib >> 10
}

fn rules_file(dir: &TempDir, yaml: &str) -> String {
    let path = dir.path().join("rules.yaml");
    fs::write(&path, yaml).unwrap();
    path.display().to_string()
}

/// Sends `msg(i)` for i = 0, 1, ... on `s` from a thread, never reading,
/// until `count` are sent or 8 s have passed, while this thread samples
/// the proxy's memory and has qemu-io `cmds` served on another
/// connection. Returns the largest VmRSS seen (MiB) and qemu-io's output.
fn flood(
    p: &Nbdfault,
    mut s: TcpStream,
    count: u64,
    msg: impl Fn(u64) -> Vec<u8> + Send + 'static,
    cmds: &[&str],
) -> (u64, String) {
    s.set_write_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let until = Instant::now() + Duration::from_secs(8);
    let sender = thread::spawn(move || {
        // Batched, so the client is fast enough to outrun the proxy. A
        // write that times out may have sent part of the batch: the next
        // one goes on from there (sending the whole batch again would
        // repeat a partial message and break the stream's framing).
        let mut i = 0;
        let mut batch = Vec::new();
        let mut sent = 0;
        while i < count && Instant::now() < until {
            if sent == batch.len() {
                batch.clear();
                sent = 0;
                for k in i..(i + 1024).min(count) {
                    batch.extend(msg(k));
                }
                i += 1024;
            }
            match s.write(&batch[sent..]) {
                Ok(0) => panic!("the flood was cut within its first {i} messages: wrote 0 bytes"),
                Ok(n) => sent += n,
                // The proxy stopped reading: keep trying until the end.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::TimedOut => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => panic!("the flood was cut within its first {i} messages: {e}"),
            }
        }
        s
    });
    let mut peak = 0;
    let mut served = None;
    while !sender.is_finished() {
        peak = peak.max(rss_mib(p.pid()));
        if served.is_none() {
            served = Some(QemuIo::new(p.uri()).cmds(cmds).run_merged(GUARD).1);
        }
        thread::sleep(Duration::from_millis(100));
    }
    let s = sender.join().unwrap();
    peak = peak.max(rss_mib(p.pid()));
    eprintln!("the flood: VmRSS at most {peak} MiB");
    drop(s);
    (peak, served.unwrap_or_default())
}

#[test]
fn answers_to_a_client_that_never_reads_them_hold_up_its_requests_not_memory() {
    require_tool("qemu-io");
    let p = Nbdfault::start(&[
        "null",
        "--listen",
        "127.0.0.1:0",
        "--rules",
        "rules/full-disk.yaml",
    ]);
    let s = transmitting(p.uri());
    // 4 million zero-length writes (112 MiB): each one an error the proxy
    // answers itself.
    let (peak, out) = flood(
        &p,
        s,
        4 << 20,
        |i| request(CMD_WRITE, i, 0, 0),
        &["read 0 64k", "write 0 4k"],
    );
    assert!(peak < 64, "VmRSS reached {peak} MiB");
    assert!(out.contains("read 65536/65536 bytes at offset 0"), "{out}");
    assert!(
        out.contains("write failed: No space left on device"),
        "{out}"
    );
}

#[test]
fn option_refusals_to_a_client_that_never_reads_them_stay_bounded() {
    let dir = TempDir::new().unwrap();
    let p = null_with(
        &dir,
        "rules:\n  - event: export\n    option: list\n    action: error\n    errno: unsup\n",
        &[],
    );
    let s = negotiating(p.uri());
    let (peak, out) = flood(&p, s, 8 << 20, |_| option(OPT_LIST, b""), &["read 0 4k"]);
    assert!(peak < 64, "VmRSS reached {peak} MiB");
    assert!(out.contains("read 4096/4096 bytes at offset 0"), "{out}");
}

/// Sends a write of `len` bytes (as much as the proxy lets through in a
/// second) and goes away.
/// More than the proxy's 256 KiB flow buffer, so a hold must stop reading
/// before the client's end of stream; little enough that all of it, and so
/// the end of stream, still reaches the proxy's socket (its receive window
/// does not grow while the proxy is not reading: 64 KiB on loopback here).
/// A client that leaves with more than that unsent has not gone, as far as
/// TCP can tell: its FIN waits behind data the proxy has no room for.
const PAST_THE_BUFFER: u32 = 288 << 10;

fn write_and_leave(mut s: TcpStream, len: u32) {
    s.set_write_timeout(Some(Duration::from_secs(1))).unwrap();
    let mut msg = request(CMD_WRITE, 1, 0, len);
    msg.resize(msg.len() + len as usize, 0xa5);
    let _ = s.write_all(&msg);
}

/// A 4 KiB read through qemu-io within the guard: it must be served.
fn assert_served(uri: &str) {
    let (status, out) = QemuIo::new(uri).cmd("read 0 4k").run_merged(GUARD);
    assert!(
        status.success() && out.contains("read 4096/4096 bytes at offset 0"),
        "qemu-io was not served: {out}"
    );
}

/// A null server with `rules` (YAML) and `extra` flags.
fn null_with(dir: &TempDir, rules: &str, extra: &[&str]) -> Nbdfault {
    require_tool("qemu-io");
    let rules = rules_file(dir, rules);
    let mut args = vec!["null", "--listen", "127.0.0.1:0", "--rules", &rules];
    args.extend_from_slice(extra);
    Nbdfault::start(&args)
}

/// One client per write in `writes` (its length), each held by `rules`
/// after sending it, leaves; with a slot for each of them, one more client
/// must then be served.
fn held_clients_that_left_free_their_slots(rules: &str, writes: &[u32]) {
    let dir = TempDir::new().unwrap();
    let slots = writes.len().to_string();
    let p = null_with(&dir, rules, &["--max-connections", &slots]);
    for &len in writes {
        write_and_leave(transmitting(p.uri()), len);
    }
    assert_served(p.uri());
}

#[test]
fn stalled_clients_that_left_free_their_slots() {
    // Neither fits the proxy's buffer and the socket's window, so each end
    // of stream queues behind bytes nobody reads, unless the proxy reads
    // (and drops) them, as a stall for good does.
    held_clients_that_left_free_their_slots(
        "rules:\n  - event: request\n    command: write\n    action: stall\n",
        &[1 << 20, 32 << 20],
    );
}

#[test]
fn delayed_clients_that_left_free_their_slots() {
    // A larger write's end of stream would be behind data that the delay
    // holds back: it is noticed only when its hour is up.
    held_clients_that_left_free_their_slots(
        "rules:\n  - event: request\n    command: write\n    action: delay\n    duration: 1h\n",
        &[PAST_THE_BUFFER],
    );
}

/// Replies held back (by `action`) back up the null server, and through it
/// the client's requests: the flow carrying them is stuck writing, not
/// reading the client. The client leaving must still be noticed.
fn a_client_that_left_while_its_replies_were_held_frees_its_slot(action: &str) {
    let dir = TempDir::new().unwrap();
    // Only its reads, at 1 GiB: qemu-io's later read at 0 is not held.
    let rules = format!("rules:\n  - event: reply\n    offset: 1GiB..\n    {action}\n");
    let p = null_with(&dir, &rules, &["--max-connections", "1"]);
    let mut s = transmitting(p.uri());
    // 20,000 64 KiB reads: far more replies than the pipeline holds, and
    // requests that fit in it and the sockets' buffers.
    let reads: Vec<u8> = (0..20_000)
        .flat_map(|i| request(CMD_READ, i, 1 << 30, 64 << 10))
        .collect();
    s.set_write_timeout(Some(GUARD)).unwrap();
    s.write_all(&reads).unwrap();
    drop(s);
    assert_served(p.uri());
}

#[test]
fn a_client_that_left_while_its_replies_were_delayed_frees_its_slot() {
    a_client_that_left_while_its_replies_were_held_frees_its_slot(
        "action: delay\n    duration: 1h",
    );
}

#[test]
fn a_client_that_left_while_its_replies_were_stalled_frees_its_slot() {
    a_client_that_left_while_its_replies_were_held_frees_its_slot("action: stall");
}

#[test]
fn a_paused_connection_whose_client_left_ends() {
    require_tool("curl");
    let dir = TempDir::new().unwrap();
    let ctl_s = dir.path().join("control.sock").display().to_string();
    let extra = ["--max-connections", "1", "--control", &ctl_s];
    let p = null_with(&dir, "rules: []\n", &extra);
    let s = transmitting(p.uri());
    let r = curl(&[
        "--unix-socket",
        &ctl_s,
        "-s",
        "-X",
        "POST",
        "http://localhost/connections/1/pause",
    ]);
    assert!(r.contains("\"paused\": true"), "{r}");
    write_and_leave(s, PAST_THE_BUFFER);
    let gone = wait_until(GUARD, || {
        let list = curl(&[
            "--unix-socket",
            &ctl_s,
            "-s",
            "http://localhost/connections",
        ]);
        list.contains("\"connections\": []")
    });
    assert!(gone, "the paused connection outlived its client");
    assert_served(p.uri());
}

/// A one-connection NBD server on TCP that answers the first request
/// (a read of `len` bytes) with as much of its reply as the proxy takes in
/// a second, and goes away.
fn server_that_answers_and_leaves(len: u32) -> (String, thread::JoinHandle<()>) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let uri = format!("nbd://{}", l.local_addr().unwrap());
    let h = thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        s.set_read_timeout(Some(GUARD)).unwrap();
        s.write_all(b"NBDMAGIC").unwrap();
        s.write_all(&IHAVEOPT.to_be_bytes()).unwrap();
        s.write_all(&3u16.to_be_bytes()).unwrap();
        // Client flags, then NBD_OPT_GO (whatever its data).
        let mut head = [0u8; 20];
        s.read_exact(&mut head).unwrap();
        let data = u32::from_be_bytes(head[16..20].try_into().unwrap());
        io::copy(&mut (&mut s).take(data.into()), &mut io::sink()).unwrap();
        let reply = |t: u32, data: &[u8]| {
            let mut b = REPLY_MAGIC.to_be_bytes().to_vec();
            b.extend(OPT_GO.to_be_bytes());
            b.extend(t.to_be_bytes());
            b.extend((data.len() as u32).to_be_bytes());
            b.extend(data);
            b
        };
        let mut info = vec![0, 0];
        info.extend((64u64 << 20).to_be_bytes());
        info.extend(1u16.to_be_bytes());
        s.write_all(&reply(3, &info)).unwrap();
        s.write_all(&reply(1, b"")).unwrap();
        let mut req = [0u8; 28];
        s.read_exact(&mut req).unwrap();
        let mut answer = 0x6744_6698u32.to_be_bytes().to_vec();
        answer.extend(0u32.to_be_bytes());
        answer.extend(&req[8..16]);
        answer.resize(answer.len() + len as usize, 0);
        s.set_write_timeout(Some(Duration::from_secs(1))).unwrap();
        let _ = s.write_all(&answer);
    });
    (uri, h)
}

/// A server that goes away while its reply to a 32 MiB read is stalled:
/// the client's connection ends, it is not left waiting.
#[test]
fn a_server_that_leaves_during_a_stalled_reply_ends_the_connection() {
    let dir = TempDir::new().unwrap();
    let rules = rules_file(
        &dir,
        "rules:\n  - event: reply\n    command: read\n    action: stall\n",
    );
    let (upstream, server) = server_that_answers_and_leaves(32 << 20);
    let p = Nbdfault::start(&[
        "proxy",
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        &upstream,
        "--rules",
        &rules,
    ]);
    let mut s = transmitting(p.uri());
    s.write_all(&request(CMD_READ, 1, 0, 32 << 20)).unwrap();
    server.join().unwrap();
    let mut got = Vec::new();
    match s.read_to_end(&mut got) {
        Ok(_) => assert!(got.is_empty(), "{} bytes of a stalled reply", got.len()),
        Err(e) => assert_eq!(e.kind(), io::ErrorKind::ConnectionReset, "{e}"),
    }
}
