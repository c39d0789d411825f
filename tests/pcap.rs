//! `--pcap`, read back by a real dissector: Debian's tshark (Wireshark
//! 4.0), whose heuristic NBD dissector decodes requests and simple replies
//! (read, write and disc only; no handshakes, no structured replies), so
//! the sessions here use simple replies (nbdkit `--no-sr`) and qemu-io with
//! `-t writeback` (no FUA flags).
//!
//! Each test checks that requests and replies decode on both legs with the
//! right cookies, offsets and lengths, that every fault is a packet
//! comment, and that TCP analysis finds nothing wrong with the made-up
//! packets (no lost, retransmitted or out-of-order segments, no full
//! windows).

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use tempfile::TempDir;

/// One decoded NBD message: (interface, type, handle, from, len, error).
type Nbd = (String, String, String, String, String, String);

fn tshark(file: &Path, args: &[&str]) -> String {
    require_tool("tshark");
    let f = file.to_str().unwrap();
    let mut all = vec!["-r", f];
    all.extend_from_slice(args);
    run_ok("tshark", &all)
}

/// The NBD messages tshark decodes, in frame order.
fn nbd_messages(file: &Path) -> Vec<Nbd> {
    let out = tshark(
        file,
        &[
            "--enable-heuristic",
            "nbd_tcp",
            "-Y",
            "nbd",
            "-T",
            "fields",
            "-e",
            "frame.interface_id",
            "-e",
            "nbd.type",
            "-e",
            "nbd.handle",
            "-e",
            "nbd.from",
            "-e",
            "nbd.len",
            "-e",
            "nbd.error",
        ],
    );
    out.lines()
        .map(|l| {
            let f: Vec<String> = l.split('\t').map(str::to_string).collect();
            let g = |i: usize| f.get(i).cloned().unwrap_or_default();
            (g(0), g(1), g(2), g(3), g(4), g(5))
        })
        .collect()
}

/// Requests on `leg` (interface 0: client, 1: server): (type, handle,
/// from, len).
fn requests(msgs: &[Nbd], leg: &str) -> Vec<(String, String, String, String)> {
    msgs.iter()
        .filter(|m| m.0 == leg && !m.3.is_empty())
        .map(|m| (m.1.clone(), m.2.clone(), m.3.clone(), m.4.clone()))
        .collect()
}

/// Replies on `leg`: (handle, error).
fn replies(msgs: &[Nbd], leg: &str) -> Vec<(String, String)> {
    msgs.iter()
        .filter(|m| m.0 == leg && m.3.is_empty())
        .map(|m| (m.2.clone(), m.5.clone()))
        .collect()
}

fn req(kind: &str, handle: u64, from: u64, len: u64) -> (String, String, String, String) {
    (
        kind.to_string(),
        format!("{handle:#018x}"),
        format!("{from:#018x}"),
        len.to_string(),
    )
}

/// Frame comments, one per line, in frame order.
fn comments(file: &Path) -> Vec<String> {
    tshark(
        file,
        &["-Y", "frame.comment", "-T", "fields", "-e", "frame.comment"],
    )
    .lines()
    .map(str::to_string)
    .collect()
}

/// Packets Wireshark's TCP analysis flags (lost, retransmitted, out of
/// order, window full, ...): there must be none.
fn assert_tcp_clean(file: &Path) {
    let flagged = tshark(
        file,
        &[
            "-Y",
            "tcp.analysis.flags",
            "-T",
            "fields",
            "-e",
            "frame.number",
            "-e",
            "_ws.expert.message",
        ],
    );
    assert_eq!(flagged, "", "TCP analysis flags packets");
    let syn = tshark(file, &["-Y", "tcp.flags.syn == 1"]).lines().count();
    assert_eq!(syn, 4, "a SYN and a SYN-ACK on each leg");
}

/// `nbdfault proxy` in front of `kit`, capturing to `pcap`, with `more`
/// arguments.
fn capturing(kit: &Nbdkit, pcap: &Path, more: &[&str]) -> Nbdfault {
    let upstream = kit.uri();
    let mut args = vec![
        "proxy",
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        &upstream,
        "--pcap",
        pcap.to_str().unwrap(),
    ];
    args.extend_from_slice(more);
    Nbdfault::start(&args)
}

/// Stops nbdfault the way a user does (SIGTERM), so the capture and the
/// trace are written out.
fn stop(mut p: Nbdfault) {
    run_ok("kill", &["-TERM", &p.pid().to_string()]);
    assert!(
        p.wait_exit(Duration::from_secs(20)).is_some(),
        "nbdfault did not stop"
    );
}

#[test]
fn a_qemu_io_session_with_faults_decodes_on_both_legs() {
    let dir = TempDir::new().unwrap();
    let rules = dir.path().join("rules.yaml");
    std::fs::write(
        &rules,
        "rules:\n\
         \x20 - name: rot\n\
         \x20   event: data\n\
         \x20   command: read\n\
         \x20   direction: to-client\n\
         \x20   action: corrupt\n\
         \x20   at: 10\n\
         \x20   xor: 0xff\n\
         \x20 - name: eio-2nd-write\n\
         \x20   event: request\n\
         \x20   command: write\n\
         \x20   action: error\n\
         \x20   errno: EIO\n\
         \x20   after: 1\n\
         \x20   times: 1\n\
         \x20 - name: slow-flush\n\
         \x20   event: reply\n\
         \x20   command: flush\n\
         \x20   action: delay\n\
         \x20   duration: 10ms\n",
    )
    .unwrap();
    let pcap = dir.path().join("c.pcapng");
    let kit = Nbdkit::start(&["--no-sr", "memory", "1M"]);
    let p = capturing(&kit, &pcap, &["--rules", rules.to_str().unwrap()]);
    let out = QemuIo::new(&p.uri)
        .cache("writeback")
        .cmds(&[
            "write -P 0xab 0 64k",
            "read -P 0xab 0 64k",
            "write 64k 4k",
            "flush",
        ])
        .run();
    let text = format!("{}{}", out.stdout, out.stderr);
    assert!(text.contains("Pattern verification failed"), "{text}");
    assert!(text.contains("write failed: Input/output error"), "{text}");
    stop(p);

    let msgs = nbd_messages(&pcap);
    // qemu-io keeps one request in flight, under cookie 1; its flushes are
    // not decoded by Wireshark 4.0, its disc is.
    let both = [req("1", 1, 0, 65536), req("0", 1, 0, 65536)];
    let client: Vec<_> = both
        .iter()
        .cloned()
        .chain([req("1", 1, 65536, 4096), req("2", 0, 0, 0)])
        .collect();
    let server: Vec<_> = both.iter().cloned().chain([req("2", 0, 0, 0)]).collect();
    assert_eq!(requests(&msgs, "0"), client, "{msgs:#?}");
    // The refused write never reached the server.
    assert_eq!(requests(&msgs, "1"), server, "{msgs:#?}");
    let errors = |leg| {
        replies(&msgs, leg)
            .into_iter()
            .filter(|r| r.1 != "0")
            .collect::<Vec<_>>()
    };
    // nbdfault's own EIO is on the client leg only.
    assert_eq!(errors("0"), [(format!("{:#018x}", 1), "5".to_string())]);
    assert_eq!(errors("1"), []);

    let notes = comments(&pcap);
    for want in [
        r#"nbdfault: rule "rot" fires corrupt on data (flips byte 10 ^ 0xff)"#,
        r#"nbdfault: rule "eio-2nd-write" fires error on request (swallows the message after 0 bytes, answers simple reply cookie 0x1 error EIO)"#,
        r#"nbdfault's answer for rule "eio-2nd-write" (error): simple reply cookie 0x1 error EIO"#,
        r#"nbdfault: rule "slow-flush" fires delay on reply (holds the flow 10ms after 0 bytes)"#,
    ] {
        assert!(notes.iter().any(|n| n == want), "no {want:?} in {notes:#?}");
    }
    // The corrupted read's first packet on each leg: the server's bytes,
    // and the client's with byte 10 of the data flipped.
    let payloads = tshark(
        &pcap,
        &[
            "-Y",
            r#"frame.comment contains "rot""#,
            "-T",
            "fields",
            "-e",
            "frame.interface_id",
            "-e",
            "tcp.payload",
        ],
    );
    let rows: Vec<(&str, &str)> = payloads
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .collect();
    let hex = |leg| {
        let (_, p) = rows
            .iter()
            .find(|r| r.0 == leg)
            .unwrap_or_else(|| panic!("no rot packet on leg {leg}: {payloads}"));
        p.replace(':', "")
    };
    let (client, server) = (hex("0"), hex("1"));
    // 16 bytes of reply header, then the data: 0xab, but byte 10 is 0x54
    // for the client.
    let at = 2 * (16 + 10);
    assert_eq!(&server[at..at + 2], "ab", "{server}");
    assert_eq!(&client[at..at + 2], "54", "{client}");
    assert_eq!(client[..at], server[..at]);
    assert_eq!(client[at + 2..], server[at + 2..]);
    assert_tcp_clean(&pcap);
}

#[test]
fn an_nbdsh_session_decodes_with_its_cookies_and_snaplen_cuts_payloads() {
    require_python_nbd();
    let dir = TempDir::new().unwrap();
    let pcap = dir.path().join("c.pcapng");
    let kit = Nbdkit::start(&["--no-sr", "memory", "1M"]);
    let p = capturing(&kit, &pcap, &["--pcap-snaplen", "100"]);
    let out = nbdsh(
        &p.uri,
        "h.pwrite(b'z' * 8192, 4096)\n\
         print(h.pread(8192, 4096) == b'z' * 8192)\n\
         print(len(h.pread(512, 65536)))\n\
         h.shutdown()\n",
    );
    assert_eq!(out, "True\n512\n");
    stop(p);

    let msgs = nbd_messages(&pcap);
    // libnbd numbers its cookies from 1.
    let want = vec![
        req("1", 1, 4096, 8192),
        req("0", 2, 4096, 8192),
        req("0", 3, 65536, 512),
        req("2", 4, 0, 0),
    ];
    assert_eq!(requests(&msgs, "0"), want, "{msgs:#?}");
    assert_eq!(requests(&msgs, "1"), want, "{msgs:#?}");
    for leg in ["0", "1"] {
        let r: Vec<(String, String)> = (1..=3)
            .map(|c| (format!("{c:#018x}"), "0".to_string()))
            .collect();
        assert_eq!(replies(&msgs, leg), r, "{msgs:#?}");
    }
    // The 8 KiB write is one message: 100 bytes of it are kept.
    let sizes = tshark(
        &pcap,
        &[
            "-Y",
            "frame.len > frame.cap_len",
            "-T",
            "fields",
            "-e",
            "frame.cap_len",
            "-e",
            "frame.len",
        ],
    );
    assert!(
        sizes
            .lines()
            .any(|l| l == format!("140\t{}", 40 + 28 + 8192)),
        "{sizes}"
    );
    assert_eq!(comments(&pcap), Vec::<String>::new());
    assert_tcp_clean(&pcap);
}

/// `sweep --pcap DIR` keeps the baseline's capture and each finding's,
/// named by its run, and no other: the finding's shows the fault on both
/// legs (the server's reply swallowed on the server leg, nbdfault's own
/// answer on the client leg), the baseline's shows none.
#[test]
fn sweep_keeps_the_capture_of_the_baseline_and_of_each_finding() {
    require_tool("qemu-io");
    let dir = TempDir::new().unwrap();
    let (pcaps, report) = (dir.path().join("pcap"), dir.path().join("report"));
    let out = run_with_timeout(
        nbdfault_bin(),
        &[
            "sweep",
            "--null",
            "--size",
            "1M",
            "--faults",
            "error",
            "--events",
            "reply",
            "--fail-on",
            "error",
            "--pcap",
            pcaps.to_str().unwrap(),
            "--report",
            report.to_str().unwrap(),
            "--",
            "sh",
            "-c",
            r#"qemu-io -f raw -c "read -P 0 0 4k" "$uri""#,
        ],
        Duration::from_secs(120),
    );
    assert_eq!(out.status.code(), Some(1), "{}{}", out.stdout, out.stderr);
    let kept = pcaps.join("001.pcapng");
    assert!(
        out.stdout
            .contains(&format!("    capture: {}\n", kept.display())),
        "{}",
        out.stdout
    );
    let mut files: Vec<String> = std::fs::read_dir(&pcaps)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    // Run 1 (the read's reply) is the finding; run 2 (the flush's) is ok.
    assert_eq!(files, ["001.pcapng", "baseline.pcapng"]);
    let runs: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(report.join("runs.json")).unwrap()).unwrap();
    let runs = runs.as_array().unwrap();
    assert_eq!(runs[0]["pcap"], kept.to_str().unwrap());
    assert!(runs[1].get("pcap").is_none(), "{runs:#?}");

    let legs = tshark(
        &kept,
        &[
            "-Y",
            "frame.comment",
            "-T",
            "fields",
            "-e",
            "frame.interface_id",
            "-e",
            "frame.comment",
        ],
    );
    let on = |leg: &str| -> Vec<String> {
        legs.lines()
            .filter_map(|l| l.strip_prefix(&format!("{leg}\t")))
            .map(str::to_string)
            .collect()
    };
    let mode = if on("1").concat().contains("extended reply") {
        "extended"
    } else {
        "simple"
    };
    assert_eq!(
        on("1"),
        [format!(
            r#"nbdfault: rule "sweep-1" fires error on reply (swallows the reply, answers {mode} reply cookie 0x1 error EIO)"#
        )]
    );
    assert_eq!(
        on("0"),
        [format!(
            r#"nbdfault's answer for rule "sweep-1" (error): {mode} reply cookie 0x1 error EIO"#
        )]
    );
    let baseline = pcaps.join("baseline.pcapng");
    assert_eq!(comments(&baseline), Vec::<String>::new());
    assert_tcp_clean(&baseline);
}
