//! `nbdfault null`: the built-in zero disk, driven by real NBD clients.

mod common;

use std::thread;

use common::*;
use tempfile::TempDir;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

fn null(args: &[&str]) -> Nbdfault {
    let mut all = vec!["null", "--listen", "127.0.0.1:0"];
    all.extend_from_slice(args);
    let n = Nbdfault::start(&all);
    assert!(
        n.uri().starts_with("nbd://127.0.0.1:"),
        "unexpected URI {:?}",
        n.uri()
    );
    n
}

/// What `nbdinfo --json` must show for a null disk of `size` bytes
/// (without the `uri` key).
fn expected_info(size: u64, size_str: &str) -> serde_json::Value {
    serde_json::json!({
        "protocol": "newstyle-fixed",
        "TLS": false,
        "structured": true,
        "exports": [{
            "export-name": "",
            "content": "data",
            "contexts": ["base:allocation"],
            "is_rotational": false,
            "is_read_only": false,
            "can_cache": true,
            "can_df": true,
            "can_fast_zero": true,
            "can_flush": true,
            "can_fua": true,
            "can_multi_conn": true,
            "can_trim": true,
            "can_zero": true,
            "block_size_minimum": 1,
            "block_size_preferred": 4096,
            "block_size_maximum": 33554432,
            "export-size": size,
            "export-size-str": size_str,
        }]
    })
}

/// `nbdinfo --json URI` without the keys that legitimately vary:
/// `uri`, an optional `description` (must be a string if present) and
/// `content` (nbdinfo only reports it when file(1) is installed; it must say
/// "data" for an all-zero disk when present).
fn nbdinfo_json(uri: &str) -> (serde_json::Value, String) {
    let text = run_ok("nbdinfo", &["--json", uri]);
    let mut v = parse_json(&text);
    strip_uri_keys(&mut v);
    if let Some(exports) = v["exports"].as_array_mut() {
        for e in exports {
            let e = e.as_object_mut().expect("export object");
            if let Some(d) = e.remove("description") {
                assert!(d.is_string(), "description is not a string:\n{text}");
            }
            match e.get("content") {
                None => {
                    e.insert("content".into(), "data".into());
                }
                Some(c) => assert_eq!(c, "data", "{text}"),
            }
        }
    }
    (v, text)
}

#[test]
fn default_size_is_8_gib() {
    let n = null(&[]);
    let (v, text) = nbdinfo_json(n.uri());
    assert_eq!(v, expected_info(8 * GIB, "8G"), "{text}");
    assert_eq!(run_ok("nbdinfo", &["--size", n.uri()]).trim(), "8589934592");
}

#[test]
fn size_512m() {
    let n = null(&["--size", "512M"]);
    let (v, text) = nbdinfo_json(n.uri());
    assert_eq!(v, expected_info(512 * MIB, "512M"), "{text}");
    assert_eq!(run_ok("nbdinfo", &["--size", n.uri()]).trim(), "536870912");
}

#[test]
fn size_units() {
    for (arg, bytes) in [
        ("1048576", 1_048_576u64),
        ("4096", 4096),
        ("64M", 64 * MIB),
        ("2G", 2 * GIB),
        ("1T", 1u64 << 40),
        // qemu-img's syntax: a decimal fraction with a unit, hex bytes.
        ("1.5M", 3 * MIB / 2),
        ("0x100000", MIB),
    ] {
        let n = null(&["--size", arg]);
        assert_eq!(
            run_ok("nbdinfo", &["--size", n.uri()]).trim(),
            bytes.to_string(),
            "--size {arg}"
        );
    }
}

#[test]
fn oldstyle() {
    let n = null(&["--oldstyle", "--size", "512M"]);
    let text = run_ok("nbdinfo", &["--json", n.uri()]);
    let v = parse_json(&text);
    assert_eq!(v["protocol"], "oldstyle", "{text}");
    assert_eq!(v["structured"], false, "{text}");
    assert_eq!(v["exports"][0]["export-size"], 512 * MIB, "{text}");
    assert_eq!(v["exports"][0]["can_multi_conn"], true, "{text}");
    assert_eq!(v["exports"][0]["can_df"], false, "{text}");

    // Data path works without options or structured replies.
    let out = nbdsh(
        n.uri(),
        r#"
print("protocol", h.get_protocol())
print("zeroes", h.pread(65536, 4096) == bytes(65536))
h.pwrite(b"\x55" * 4096, 0)
print("still zeroes", h.pread(4096, 0) == bytes(4096))
h.flush()
print("done")
"#,
    );
    assert_eq!(
        out,
        "protocol oldstyle\nzeroes True\nstill zeroes True\ndone\n"
    );
}

#[test]
fn default_oldstyle_size() {
    let n = null(&["--oldstyle"]);
    let text = run_ok("nbdinfo", &["--json", n.uri()]);
    let v = parse_json(&text);
    assert_eq!(v["protocol"], "oldstyle", "{text}");
    assert_eq!(v["exports"][0]["export-size"], 8 * GIB, "{text}");
}

#[test]
fn unix_socket_listen() {
    let dir = TempDir::new().unwrap();
    let sock = dir.path().join("null.sock");
    let n = Nbdfault::start(&["null", "--listen", sock.to_str().unwrap(), "--size", "64M"]);
    assert_eq!(n.uri(), unix_uri(&sock));
    let (v, text) = nbdinfo_json(n.uri());
    assert_eq!(v, expected_info(64 * MIB, "64M"), "{text}");
}

#[test]
fn unix_prefixed_socket_listen() {
    let dir = TempDir::new().unwrap();
    let sock = dir.path().join("null2.sock");
    let listen = format!("unix:{}", sock.display());
    let n = Nbdfault::start(&["null", "--listen", &listen]);
    assert_eq!(n.uri(), unix_uri(&sock));
    assert_eq!(run_ok("nbdinfo", &["--size", n.uri()]).trim(), "8589934592");
}

#[test]
fn ipv6_listen() {
    let n = Nbdfault::start(&["null", "--listen", "[::1]:0", "--size", "1M"]);
    assert!(n.uri().starts_with("nbd://[::1]:"), "{}", n.uri());
    assert_eq!(run_ok("nbdinfo", &["--size", n.uri()]).trim(), "1048576");
}

#[test]
fn qemu_io_reads_zeroes_and_discards_writes() {
    let n = null(&["--size", "512M"]);
    let o = qemu_io(
        n.uri(),
        &[
            "read -P 0 0 1M",
            "write -P 0x55 0 1M",
            "read -P 0 0 1M",
            "write -z 4M 1M",
            "discard 8M 1M",
            "flush",
            "read -P 0 511M 1M",
        ],
    );
    assert!(o.success(), "{}", o.describe());
    assert_same_lines(
        "qemu-io on null",
        "\
read 1048576/1048576 bytes at offset 0
1 MiB, 1 ops; <timing>
wrote 1048576/1048576 bytes at offset 0
1 MiB, 1 ops; <timing>
read 1048576/1048576 bytes at offset 0
1 MiB, 1 ops; <timing>
wrote 1048576/1048576 bytes at offset 4194304
1 MiB, 1 ops; <timing>
discard 1048576/1048576 bytes at offset 8388608
1 MiB, 1 ops; <timing>
read 1048576/1048576 bytes at offset 535822336
1 MiB, 1 ops; <timing>",
        &mask_qemu_io_timing(&o.stdout),
    );
    assert_eq!(o.stderr, "", "{}", o.describe());
}

#[test]
fn qemu_io_out_of_range() {
    let n = null(&["--size", "512M"]);
    // QEMU checks the bounds itself and reports EIO for both directions.
    let r = qemu_io(n.uri(), &["read 512M 4k"]);
    assert_eq!(
        r.stdout.trim(),
        "read failed: Input/output error",
        "{}",
        r.describe()
    );
    assert_eq!(r.status.code(), Some(1), "{}", r.describe());
    let w = qemu_io(n.uri(), &["write 512M 4k"]);
    assert_eq!(
        w.stdout.trim(),
        "write failed: Input/output error",
        "{}",
        w.describe()
    );
    assert_eq!(w.status.code(), Some(1), "{}", w.describe());
    let s = qemu_io(n.uri(), &["read 511M 2M"]);
    assert_eq!(
        s.stdout.trim(),
        "read failed: Input/output error",
        "{}",
        s.describe()
    );
}

#[test]
fn qemu_io_matches_nbdkit_null() {
    // The same session against nbdkit's null plugin gives the same output.
    let n = null(&["--size", "512M"]);
    let kit = Nbdkit::start(&["null", "512M"]);
    let cmds = [
        "read -P 0 0 1M",
        "write -P 0x55 0 1M",
        "read -P 0 0 1M",
        "read -P 0x55 0 4k",
        "read 512M 4k",
        "write 512M 4k",
    ];
    let a = qemu_io(&kit.uri(), &cmds);
    let b = qemu_io(n.uri(), &cmds);
    assert!(
        a.stdout
            .contains("Pattern verification failed at offset 0, 4096 bytes"),
        "{}",
        a.describe()
    );
    assert_same_qemu_io("qemu-io: nbdkit null vs nbdfault null", &a, &b);
}

#[test]
fn qemu_img_map_is_one_zero_extent() {
    let n = null(&["--size", "512M"]);
    let out = run_ok("qemu-img", &["map", "-f", "raw", "--output=json", n.uri()]);
    assert_eq!(
        out.trim(),
        r#"[{ "start": 0, "length": 536870912, "depth": 0, "present": true, "zero": true, "data": false, "compressed": false, "offset": 0}]"#
    );
}

#[test]
fn libnbd_flags_and_commands() {
    let n = null(&["--size", "512M"]);
    let out = python(
        r#"
import nbd, sys
def safe(f, *a):
    try:
        return repr(f(*a))
    except nbd.Error as e:
        return "ERR %s %s" % (e.errno, e.string)
h = nbd.NBD()
h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
h.connect_uri(sys.argv[1])
for name in ["get_protocol", "get_structured_replies_negotiated", "get_size",
             "is_read_only", "can_flush", "can_fua", "can_trim", "can_zero",
             "can_fast_zero", "can_cache", "can_df", "can_multi_conn"]:
    print(name, safe(getattr(h, name)))
for n, c in [("minimum", nbd.SIZE_MINIMUM), ("preferred", nbd.SIZE_PREFERRED),
             ("maximum", nbd.SIZE_MAXIMUM)]:
    print("block_size", n, safe(h.get_block_size, c))
print("base:allocation", h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION))
size = h.get_size()
def show(meta, off, entries, err):
    print("extents", meta, off, entries, err.value)
    return 0
print("block_status", safe(h.block_status, size, 0, show))
print("block_status req_one", safe(h.block_status, 65536, 4096, show, nbd.CMD_FLAG_REQ_ONE))
print("pread zero", h.pread(1048576, 12345) == bytes(1048576))
chunks = []
def chunk(buf, off, status, err):
    chunks.append((off, len(buf), status, buf == bytes(len(buf))))
    return 0
print("pread df", h.pread_structured(65536, 0, chunk, nbd.CMD_FLAG_DF) == bytes(65536), chunks)
print("pwrite", safe(h.pwrite, b"\xaa" * 65536, 0))
print("pwrite fua", safe(h.pwrite, b"\xaa" * 65536, 65536, nbd.CMD_FLAG_FUA))
print("reads zero after write", h.pread(131072, 0) == bytes(131072))
print("zero", safe(h.zero, 1048576, 0))
print("zero fast", safe(h.zero, 1048576, 0, nbd.CMD_FLAG_FAST_ZERO))
print("zero no-hole", safe(h.zero, 1048576, 0, nbd.CMD_FLAG_NO_HOLE))
print("trim", safe(h.trim, 1048576, 0))
print("cache", safe(h.cache, 1048576, 0))
print("flush", safe(h.flush))
print("read 32M", h.pread(33554432, 0) == bytes(33554432))
print("last byte", h.pread(1, size - 1) == b"\0")
# The server's own bounds checks, with libnbd's client-side checks off.
h.set_strict_mode(0)
print("pread past end", safe(h.pread, 4096, size))
print("pread across end", safe(h.pread, 8192, size - 4096))
print("pwrite past end", safe(h.pwrite, b"x" * 4096, size))
print("zero past end", safe(h.zero, 4096, size))
print("trim past end", safe(h.trim, 4096, size))
print("cache past end", safe(h.cache, 4096, size))
print("block_status past end", safe(h.block_status, 4096, size, show))
print("usable", h.pread(4, 0) == bytes(4))
h.shutdown()
print("done")
"#,
        &[n.uri()],
    );
    let expected = "\
get_protocol 'newstyle-fixed'
get_structured_replies_negotiated True
get_size 536870912
is_read_only False
can_flush True
can_fua True
can_trim True
can_zero True
can_fast_zero True
can_cache True
can_df True
can_multi_conn True
block_size minimum 1
block_size preferred 4096
block_size maximum 33554432
base:allocation True
extents base:allocation 0 [536870912, 3] 0
block_status None
BLOCK_STATUS_REQ_ONE
pread zero True
pread df True [(0, 65536, 1, True)]
pwrite None
pwrite fua None
reads zero after write True
zero None
zero fast None
zero no-hole None
trim None
cache None
flush None
read 32M True
last byte True
pread past end ERR EINVAL nbd_pread: read: command failed: Invalid argument
pread across end ERR EINVAL nbd_pread: read: command failed: Invalid argument
pwrite past end ERR ENOSPC nbd_pwrite: write: command failed: No space left on device
zero past end ERR ENOSPC nbd_zero: write-zeroes: command failed: No space left on device
trim past end ERR EINVAL nbd_trim: trim: command failed: Invalid argument
cache past end ERR EINVAL nbd_cache: cache: command failed: Invalid argument
block_status past end ERR EINVAL nbd_block_status: block-status: command failed: Invalid argument
usable True
done";
    // The REQ_ONE answer is a single extent starting at 4096, flags 3 (hole,
    // zero), covering at least the request and not going past the end.
    let mut lines: Vec<&str> = out.lines().collect();
    let i = lines
        .iter()
        .position(|l| l.starts_with("extents base:allocation 4096 "))
        .unwrap_or_else(|| panic!("no REQ_ONE extent:\n{out}"));
    let req_one = lines.remove(i);
    let nums: Vec<u64> = req_one
        .trim_start_matches("extents base:allocation 4096 [")
        .split(']')
        .next()
        .unwrap()
        .split(", ")
        .map(|x| x.parse().unwrap())
        .collect();
    assert_eq!(nums.len(), 2, "REQ_ONE must return one extent: {req_one}");
    assert_eq!(nums[1], 3, "extent must be hole+zero: {req_one}");
    assert!(
        nums[0] >= 65536 && nums[0] <= 512 * MIB - 4096,
        "bad extent length: {req_one}"
    );
    assert!(req_one.ends_with(" 0"), "{req_one}");
    let j = lines
        .iter()
        .position(|l| l.starts_with("block_status req_one "))
        .unwrap_or_else(|| panic!("no REQ_ONE result:\n{out}"));
    assert_eq!(lines[j], "block_status req_one None");
    lines[j] = "BLOCK_STATUS_REQ_ONE";
    assert_same_lines(
        "libnbd on null (expected vs actual)",
        expected,
        &lines.join("\n"),
    );
}

#[test]
fn any_export_name_is_accepted() {
    let n = null(&["--size", "64M"]);
    for name in ["", "foo", "some/long name"] {
        let uri = uri_with_export(n.uri(), &name.replace(' ', "%20"));
        let out = nbdsh(&uri, "print(repr(h.get_export_name()), h.get_size())");
        assert_eq!(out, format!("'{name}' {}\n", 64 * MIB), "export {name:?}");
    }
}

#[test]
fn simple_replies_client() {
    let n = null(&["--size", "64M"]);
    let out = python(
        r#"
import nbd, sys
h = nbd.NBD()
h.set_request_structured_replies(False)
h.connect_uri(sys.argv[1])
print(h.get_structured_replies_negotiated(), h.can_df(), h.can_fua(), h.can_multi_conn())
print(h.pread(1048576, 0) == bytes(1048576))
h.pwrite(b"z" * 4096, 0)
print(h.pread(4096, 0) == bytes(4096))
h.set_strict_mode(0)
try:
    h.pread(4096, h.get_size())
except nbd.Error as e:
    print(e.errno)
"#,
        &[n.uri()],
    );
    assert_eq!(out, "False False True True\nTrue\nTrue\nEINVAL\n");
}

#[test]
fn nbdinfo_list_shows_one_export() {
    let n = null(&["--size", "512M"]);
    let o = run("nbdinfo", &["--list", n.uri()]);
    assert!(o.success(), "{}", o.describe());
    // Everything but the URI line and an optional description.
    let lines: Vec<&str> = o
        .stdout
        .lines()
        .filter(|l| {
            !l.trim_start().starts_with("uri:") && !l.trim_start().starts_with("description:")
        })
        .collect();
    let expected = "\
protocol: newstyle-fixed without TLS, using structured packets
export=\"\":
\texport-size: 536870912 (512M)
\tcontexts:
\t\tbase:allocation
\tis_rotational: false
\tis_read_only: false
\tcan_cache: true
\tcan_df: true
\tcan_fast_zero: true
\tcan_flush: true
\tcan_fua: true
\tcan_multi_conn: true
\tcan_trim: true
\tcan_zero: true
\tblock_size_minimum: 1
\tblock_size_preferred: 4096
\tblock_size_maximum: 33554432";
    assert_same_lines("nbdinfo --list on null", expected, &lines.join("\n"));

    let j = run_ok("nbdinfo", &["--list", "--json", n.uri()]);
    let v = parse_json(&j);
    let exports = v["exports"].as_array().unwrap_or_else(|| panic!("{j}"));
    assert_eq!(exports.len(), 1, "{j}");
    assert_eq!(exports[0]["export-name"], "", "{j}");
    assert_eq!(exports[0]["export-size"], 512 * MIB, "{j}");
}

#[test]
fn nbdinfo_map_is_one_hole() {
    let n = null(&["--size", "512M"]);
    let out = run_ok("nbdinfo", &["--map", n.uri()]);
    assert_eq!(
        out.split_whitespace().collect::<Vec<_>>(),
        ["0", "536870912", "3", "hole,zero"],
        "{out}"
    );
}

#[test]
fn nbdcopy_256m_is_all_zero() {
    let n = null(&["--size", "256M"]);
    let dir = TempDir::new().unwrap();
    let out = dir.path().join("out.raw");
    // Pre-fill the destination so that zeroes must really be written.
    write_random_file(&out, 256 * MIB, 99);
    run_ok("nbdcopy", &[n.uri(), out.to_str().unwrap()]);
    assert_file_zero(&out, 256 * MIB);
}

#[test]
fn nbdcopy_into_null_succeeds() {
    let n = null(&["--size", "64M"]);
    let dir = TempDir::new().unwrap();
    let src = dir.path().join("src.raw");
    write_random_file(&src, 64 * MIB, 5);
    run_ok(
        "nbdcopy",
        &[
            "--connections=4",
            "--requests=16",
            src.to_str().unwrap(),
            n.uri(),
        ],
    );
    let back = dir.path().join("back.raw");
    run_ok("nbdcopy", &[n.uri(), back.to_str().unwrap()]);
    assert_file_zero(&back, 64 * MIB);
}

#[test]
fn several_clients_at_once() {
    let mut n = null(&["--size", "64M"]);
    let uri = n.uri().to_string();
    let script = r#"
import random
rnd = random.Random(int(sys.argv[2]))
size = h.get_size()
cookies = []
for i in range(64):
    off = rnd.randrange(0, size - 65536)
    buf = nbd.Buffer(65536)
    cookies.append((h.aio_pread(buf, off), buf))
    h.aio_pwrite(b"\xff" * 4096, rnd.randrange(0, size - 4096))
while h.aio_in_flight() > 0:
    h.poll(-1)
print(all(bytes(b.to_bytearray()) == bytes(65536) for _, b in cookies))
"#;
    let handles: Vec<_> = (0..6)
        .map(|i| {
            let uri = uri.clone();
            thread::spawn(move || {
                python(
                    &format!(
                        "import nbd, sys\nh = nbd.NBD()\nh.connect_uri(sys.argv[1])\n{script}"
                    ),
                    &[&uri, &i.to_string()],
                )
            })
        })
        .collect();
    // Meanwhile, a multi-connection copy.
    let dir = TempDir::new().unwrap();
    let out = dir.path().join("out.raw");
    run_ok(
        "nbdcopy",
        &[
            "--connections=4",
            "--requests=16",
            &uri,
            out.to_str().unwrap(),
        ],
    );
    for h in handles {
        assert_eq!(h.join().expect("client thread").trim(), "True");
    }
    assert_file_zero(&out, 64 * MIB);
    assert!(n.is_running(), "null server died\n{}", n.stderr());
}
