//! The event trace of real sessions (the binary with `--trace`, libnbd's
//! nbdsh as the client, the null server behind it): each record kind as
//! README "Event trace" documents it, and `nbdfault trace --summary` on it.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use serde_json::{Value, json};
use tempfile::TempDir;

fn lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// Stops nbdfault with SIGTERM, so the trace is written out.
fn stop(mut p: Nbdfault) {
    run_ok("kill", &["-TERM", &p.pid().to_string()]);
    assert!(p.wait_exit(Duration::from_secs(20)).is_some());
}

/// `nbdfault null --trace T --rules R` for `rules`; the trace's path.
fn null_with(dir: &TempDir, rules: &str) -> (Nbdfault, std::path::PathBuf) {
    let r = dir.path().join("rules.yaml");
    std::fs::write(&r, rules).unwrap();
    let t = dir.path().join("trace.jsonl");
    let p = Nbdfault::start(&[
        "null",
        "--size",
        "1M",
        "--listen",
        "127.0.0.1:0",
        "--rules",
        r.to_str().unwrap(),
        "--trace",
        t.to_str().unwrap(),
    ]);
    (p, t)
}

/// The record without its timestamp (which differs run to run).
fn untimed(v: &Value) -> Value {
    let mut v = v.clone();
    v.as_object_mut().unwrap().remove("ts");
    v
}

fn faults<'a>(v: &'a [Value], result: &str) -> Vec<&'a Value> {
    v.iter()
        .filter(|l| l["record"] == "fault" && l["result"] == result)
        .collect()
}

const RULES: &str = "rules:\n\
    \x20 - name: rot\n\
    \x20   event: data\n\
    \x20   command: read\n\
    \x20   direction: to-client\n\
    \x20   action: corrupt\n\
    \x20   at: 9\n\
    \x20   xor: 0x81\n\
    \x20 - name: eio\n\
    \x20   event: request\n\
    \x20   command: write\n\
    \x20   action: error\n\
    \x20   errno: EIO\n\
    \x20 - name: slow\n\
    \x20   event: reply\n\
    \x20   command: flush\n\
    \x20   action: delay\n\
    \x20   duration: 30ms\n";

const SESSION: &str = "buf = h.pread(4096, 8192)\n\
    try:\n\
    \x20   h.pwrite(b'x' * 512, 0)\n\
    except nbd.Error as e:\n\
    \x20   print('refused', e.errno)\n\
    h.flush()\n\
    h.shutdown()\n";

#[test]
fn records_say_what_nbdfault_did() {
    require_python_nbd();
    let dir = TempDir::new().unwrap();
    let (p, trace) = null_with(&dir, RULES);
    assert_eq!(nbdsh(&p.uri, SESSION), "refused EIO\n");
    stop(p);
    let v = lines(&trace);
    assert!(
        v.iter()
            .all(|l| ["message", "fault", "close"].contains(&l["record"].as_str().unwrap())),
        "{v:#?}"
    );
    // Names are the documented ones; a message with two has a list.
    let neg2 = v
        .iter()
        .find(|l| l["event"].is_array())
        .unwrap_or_else(|| panic!("no listed names in {v:#?}"));
    assert_eq!(neg2["event"], json!(["option-reply", "neg2"]));
    assert_eq!(neg2["reply_type"], "info");
    assert!(
        v.iter()
            .all(|l| !l["event"].as_str().is_some_and(|e| e.contains('+')))
    );

    // Each direction's messages tile its stream: every one starts where
    // the one before it ended (nothing was swallowed without an event but
    // the refused write's payload).
    for dir in ["to-server", "to-client"] {
        let mut at = 0;
        for l in v
            .iter()
            .filter(|l| l["record"] == "message" && l["direction"] == dir)
        {
            assert_eq!(l["stream_offset"], at, "{dir}: {l}");
            at = l["stream_offset"].as_u64().unwrap() + l["bytes"].as_u64().unwrap();
            if l["command"] == "write" && l["event"] == "request" {
                at += 512;
            }
        }
    }

    // A structured read reply: chunk type and flags.
    let reply = v
        .iter()
        .find(|l| l["event"] == "reply" && l["command"] == "read")
        .unwrap();
    assert_eq!(reply["chunk_type"], "offset-data", "{reply}");
    assert_eq!(reply["flags"], 1, "{reply}");
    let read_off = reply["stream_offset"].as_u64().unwrap() + 20;

    // corrupt: the bits it flipped (0x81 at byte 9: bits 72 and 79).
    let flip = faults(&v, "flip");
    assert_eq!(flip.len(), 1, "{v:#?}");
    assert_eq!(
        untimed(flip[0]),
        json!({"conn": 1, "record": "fault", "direction": "to-client",
               "stream_offset": read_off, "cookie": reply["cookie"], "rule": "rot",
               "action": "corrupt", "result": "flip", "bits": [72, 79]})
    );

    // error: the write swallowed whole, then nbdfault's own reply.
    let write = v
        .iter()
        .find(|l| l["event"] == "request" && l["command"] == "write")
        .unwrap();
    assert_eq!(
        (&write["rule"], &write["action"]),
        (&json!("eio"), &json!("error"))
    );
    let base = json!({"conn": 1, "record": "fault", "direction": "to-server",
        "stream_offset": write["stream_offset"], "cookie": write["cookie"],
        "rule": "eio", "action": "error"});
    let with = |extra: Value| {
        let mut b = base.clone();
        b.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        b
    };
    assert_eq!(
        faults(&v, "swallow")
            .iter()
            .map(|l| untimed(l))
            .collect::<Vec<_>>(),
        [with(
            json!({"result": "swallow", "kept": 0, "bytes": 28 + 512})
        )]
    );
    let answer = faults(&v, "answer");
    assert_eq!(answer.len(), 1, "{v:#?}");
    let a = untimed(answer[0]);
    assert_eq!(
        a,
        with(
            json!({"result": "answer", "reply": "structured", "error": "EIO",
                    "chunk_type": "error", "bytes": a["bytes"]})
        )
    );
    assert!(a["bytes"].as_u64().unwrap() > 20 + 6, "{a}");

    // delay: when the hold started and when the reply went on.
    let flush = v
        .iter()
        .find(|l| l["event"] == "reply" && l["command"] == "flush")
        .unwrap();
    let hold = faults(&v, "hold");
    let resume = faults(&v, "resume");
    assert_eq!((hold.len(), resume.len()), (1, 1), "{v:#?}");
    assert_eq!(hold[0]["stream_offset"], flush["stream_offset"]);
    assert_eq!(
        (&hold[0]["at"], &hold[0]["duration_ms"]),
        (&json!(0), &json!(30))
    );
    assert!(
        resume[0]["held_us"].as_u64().unwrap() >= 30_000,
        "{}",
        resume[0]
    );
    assert!(hold[0]["ts"].as_str() < resume[0]["ts"].as_str());

    // The end: the client closed, with the bytes each way.
    let close = v.last().unwrap();
    assert_eq!(close["record"], "close", "{v:#?}");
    assert_eq!(close["reason"], "client-eof");
    assert!(close.get("message").is_none(), "{close}");
    let to_server: u64 = v
        .iter()
        .filter(|l| l["record"] == "message" && l["direction"] == "to-server")
        .map(|l| l["bytes"].as_u64().unwrap())
        .sum();
    assert_eq!(close["to_server_bytes"], to_server + 512);

    // And the summary of that trace.
    let out = run_ok(
        nbdfault_bin(),
        &["trace", "--summary", trace.to_str().unwrap()],
    );
    assert_eq!(
        out,
        format!(
            "connection 1: 16 messages, {} bytes to the server, {} bytes to the client, \
             5 fault results; ended: client-eof\n\
             \x20 to-server  export:structured-reply 1, export-name:structured-reply 1, \
             export:go 1, export-name:go 1, request:read 1, request:write 1, \
             request:flush 1, request:disc 1\n\
             \x20 to-client  neg1 1, option-reply:structured-reply 1, option-reply/neg2:go 1, \
             option-reply:go 2, reply:read 1, data:read 1, reply:flush 1\n\
             \x20 faults     rot (corrupt flip) 1, eio (error swallow) 1, \
             eio (error answer) 1, slow (delay hold) 1, slow (delay resume) 1\n",
            close["to_server_bytes"], close["to_client_bytes"]
        )
    );
}

#[test]
fn a_disconnect_is_a_cut_and_the_close_says_so() {
    require_python_nbd();
    let dir = TempDir::new().unwrap();
    let (p, trace) = null_with(
        &dir,
        "rules:\n\
         \x20 - name: cut\n\
         \x20   event: reply\n\
         \x20   command: read\n\
         \x20   action: disconnect\n\
         \x20   when: 4\n\
         \x20   reset: true\n",
    );
    let out = nbdsh(
        &p.uri,
        "try:\n\
         \x20   h.pread(512, 0)\n\
         except nbd.Error as e:\n\
         \x20   print('failed')\n",
    );
    assert_eq!(out, "failed\n");
    stop(p);
    let v = lines(&trace);
    let reply = v.iter().find(|l| l["event"] == "reply").unwrap();
    let cut = faults(&v, "cut");
    assert_eq!(cut.len(), 1, "{v:#?}");
    assert_eq!(
        untimed(cut[0]),
        json!({"conn": 1, "record": "fault", "direction": "to-client",
               "stream_offset": reply["stream_offset"], "cookie": reply["cookie"],
               "rule": "cut", "action": "disconnect", "result": "cut", "at": 4,
               "reset": true})
    );
    let close = v.last().unwrap();
    assert_eq!(
        (
            &close["record"],
            &close["reason"],
            &close["rule"],
            &close["direction"]
        ),
        (
            &json!("close"),
            &json!("fault"),
            &json!("cut"),
            &json!("to-client")
        ),
        "{close}"
    );
    assert_eq!(close["message"], "to-client: disconnected by rule cut");
}

#[test]
fn a_protocol_violation_closes_with_its_message() {
    let dir = TempDir::new().unwrap();
    let (p, trace) = null_with(&dir, "rules: []\n");
    // A client that answers the greeting with nonsense.
    let mut s = std::net::TcpStream::connect(tcp_addr(&p.uri)).unwrap();
    use std::io::{Read, Write};
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).unwrap();
    s.write_all(&[0, 0, 0, 1]).unwrap();
    s.write_all(&[0xde; 16]).unwrap();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    stop(p);
    let v = lines(&trace);
    let close = v.last().unwrap();
    assert_eq!(close["record"], "close", "{v:#?}");
    assert_eq!(close["reason"], "protocol", "{close}");
    assert_eq!(close["direction"], "to-server", "{close}");
    assert!(
        close["message"]
            .as_str()
            .unwrap()
            .starts_with("to-server: "),
        "{close}"
    );
}

/// A client accepted while the server is unreachable gets its `close`
/// record too, saying why, after its `connect`.
#[test]
fn an_unreachable_server_closes_the_client_with_its_reason() {
    let dir = TempDir::new().unwrap();
    let missing = dir.path().join("no-server.sock");
    let t = dir.path().join("trace.jsonl");
    let p = Nbdfault::start(&[
        "proxy",
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        missing.to_str().unwrap(),
        "--trace",
        t.to_str().unwrap(),
    ]);
    let out = nbdinfo(&[p.uri()]);
    assert!(!out.status.success());
    stop(p);
    let v: Vec<Value> = lines(&t).iter().map(untimed).collect();
    assert_eq!(
        v,
        [
            json!({"conn": 1, "record": "message", "event": "connect", "direction": null, "bytes": 0}),
            json!({
                "conn": 1,
                "record": "close",
                "reason": "upstream-unreachable",
                "message": format!(
                    "cannot reach upstream unix:{}: No such file or directory (os error 2)",
                    missing.display()
                ),
                "to_server_bytes": 0,
                "to_client_bytes": 0,
            }),
        ]
    );
}
