//! The proxy must be invisible: every client sees, through
//! `nbdfault proxy`, exactly what it sees when talking to the server directly.
//!
//! Each scenario runs against real servers (qemu-nbd, nbdkit in several
//! protocol flavours), once direct and once through the proxy, and compares
//! what the user sees (tool output, byte-exact data, errors).

mod common;

use std::path::{Path, PathBuf};

use common::*;
use tempfile::TempDir;

const MIB: u64 = 1 << 20;
/// Size of every backend disk.
const DISK: u64 = 64 * MIB;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// qemu-nbd on a sparse raw file (fixed newstyle, structured replies,
    /// extended headers with QEMU 10 clients).
    QemuRaw,
    /// `nbdkit memory 64M`.
    Memory,
    /// `nbdkit --no-sr memory 64M`: simple replies only.
    NoSr,
    /// `nbdkit --mask-handshake=0 memory 64M`: non-fixed newstyle.
    NonFixed,
    /// `nbdkit -o memory 64M`: oldstyle.
    Oldstyle,
}

impl Kind {
    fn structured(self) -> bool {
        matches!(self, Kind::QemuRaw | Kind::Memory)
    }
    fn fixed_newstyle(self) -> bool {
        matches!(self, Kind::QemuRaw | Kind::Memory | Kind::NoSr)
    }
}

/// Data placed on every disk so that maps have both data and holes.
fn pieces() -> Vec<(u64, Vec<u8>)> {
    vec![
        (MIB, vec![0x11; 4096]),
        (10 * MIB + 512, random_bytes(70_000, 7)),
        (40 * MIB, random_bytes(MIB as usize, 8)),
        (DISK - 4096, vec![0xff; 4096]),
    ]
}

struct Backend {
    qemu: Option<QemuNbd>,
    kit: Option<Nbdkit>,
    dir: TempDir,
}

impl Backend {
    fn start(kind: Kind) -> Backend {
        let dir = TempDir::new().unwrap();
        let (qemu, kit) = match kind {
            Kind::QemuRaw => {
                let file = dir.path().join("disk.raw");
                let p = pieces();
                let refs: Vec<(u64, &[u8])> = p.iter().map(|(o, d)| (*o, d.as_slice())).collect();
                write_sparse_file(&file, DISK, &refs);
                (Some(QemuNbd::raw(&file)), None)
            }
            Kind::Memory => (None, Some(Nbdkit::start(&["memory", "64M"]))),
            Kind::NoSr => (None, Some(Nbdkit::start(&["--no-sr", "memory", "64M"]))),
            Kind::NonFixed => (
                None,
                Some(Nbdkit::start(&["--mask-handshake=0", "memory", "64M"])),
            ),
            Kind::Oldstyle => (None, Some(Nbdkit::start(&["-o", "memory", "64M"]))),
        };
        Backend { qemu, kit, dir }
    }

    /// Starts the backend and puts [`pieces`] on it.
    fn start_seeded(kind: Kind) -> Backend {
        let b = Backend::start(kind);
        if kind != Kind::QemuRaw {
            // The data goes through a file: it is too big for a command line.
            let blob = b.path("pieces.bin");
            let mut all = Vec::new();
            let mut script = String::from("blob = open(sys.argv[2], 'rb').read()\n");
            for (off, data) in pieces() {
                script.push_str(&format!(
                    "h.pwrite(blob[{}:{}], {off})\n",
                    all.len(),
                    all.len() + data.len()
                ));
                all.extend_from_slice(&data);
            }
            std::fs::write(&blob, &all).unwrap();
            script.push_str("print('seeded')\n");
            let prelude = "import nbd, sys\nh = nbd.NBD()\nh.connect_uri(sys.argv[1])\n";
            let out = python(
                &format!("{prelude}{script}"),
                &[&b.uri(), blob.to_str().unwrap()],
            );
            assert_eq!(out.trim(), "seeded");
        }
        b
    }

    fn uri(&self) -> String {
        match (&self.qemu, &self.kit) {
            (Some(q), _) => q.uri(),
            (_, Some(k)) => k.uri(),
            _ => unreachable!(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

fn proxy_for(b: &Backend) -> Nbdfault {
    Nbdfault::proxy(&b.uri())
}

/// Masks every `uri: ...` line (nbdinfo text output) and every occurrence of
/// the given URIs.
fn mask_uri_lines(text: &str, uris: &[&str]) -> String {
    let masked = mask_uris(text, uris);
    masked
        .lines()
        .map(|l| {
            let t = l.trim_start();
            if t.starts_with("uri:") {
                format!("{}uri: <URI>", &l[..l.len() - t.len()])
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Runs the same command direct and through the proxy; compares status,
/// stdout and stderr after masking URIs. Returns the direct output.
fn same_output(
    what: &str,
    direct_uri: &str,
    proxied_uri: &str,
    cmd: &str,
    args: &[&str],
) -> Output {
    let with = |uri: &str| -> Vec<String> {
        args.iter()
            .map(|a| {
                if *a == "URI" {
                    uri.to_string()
                } else {
                    a.to_string()
                }
            })
            .collect()
    };
    let d_args = with(direct_uri);
    let p_args = with(proxied_uri);
    let d = run(cmd, &d_args.iter().map(String::as_str).collect::<Vec<_>>());
    let p = run(cmd, &p_args.iter().map(String::as_str).collect::<Vec<_>>());
    let uris = [direct_uri, proxied_uri];
    assert_same_lines(
        &format!("{what}: stdout of `{}`", p.command),
        &mask_uri_lines(&d.stdout, &uris),
        &mask_uri_lines(&p.stdout, &uris),
    );
    assert_same_lines(
        &format!("{what}: stderr of `{}`", p.command),
        &mask_uri_lines(&d.stderr, &uris),
        &mask_uri_lines(&p.stderr, &uris),
    );
    assert_eq!(
        d.status.code(),
        p.status.code(),
        "{what}: exit status differs\n--- direct ---\n{}\n--- proxied ---\n{}",
        d.describe(),
        p.describe()
    );
    d
}

// ---------------------------------------------------------------------------
// nbdinfo
// ---------------------------------------------------------------------------

fn nbdinfo_json(kind: Kind) {
    let b = Backend::start(kind);
    let proxy = proxy_for(&b);
    let direct = run_ok("nbdinfo", &["--json", &b.uri()]);
    let proxied = run_ok("nbdinfo", &["--json", proxy.uri()]);
    let mut d = parse_json(&direct);
    let mut p = parse_json(&proxied);
    // Sanity of the direct half: it describes the backend we started.
    assert_eq!(d["exports"][0]["export-size"], DISK, "{direct}");
    let protocol = match kind {
        Kind::NonFixed => "newstyle",
        Kind::Oldstyle => "oldstyle",
        _ => "newstyle-fixed",
    };
    assert_eq!(d["protocol"], protocol, "{direct}");
    assert_eq!(d["structured"], kind.structured(), "{direct}");
    strip_uri_keys(&mut d);
    strip_uri_keys(&mut p);
    assert_eq!(
        d,
        p,
        "nbdinfo --json differs (uri keys removed)\n--- direct ---\n{direct}\n--- proxied ---\n{proxied}\n--- proxy stderr ---\n{}",
        proxy.stderr()
    );
}

fn nbdinfo_list(kind: Kind) {
    let b = Backend::start(kind);
    let proxy = proxy_for(&b);
    let d = same_output(
        "nbdinfo --list",
        &b.uri(),
        proxy.uri(),
        "nbdinfo",
        &["--list", "URI"],
    );
    if kind.fixed_newstyle() {
        assert!(d.success(), "{}", d.describe());
        assert!(d.stdout.contains("export=\"\":"), "{}", d.describe());
    } else {
        // Listing needs fixed newstyle; the failure must look the same.
        assert!(!d.success(), "{}", d.describe());
        let expected = if kind == Kind::Oldstyle {
            "nbdinfo: nbd_opt_list: invalid state: READY: the handle must be negotiating: Invalid argument"
        } else {
            "nbdinfo: nbd_opt_list: server is not using fixed newstyle protocol: Operation not supported"
        };
        assert!(d.stderr.contains(expected), "{}", d.describe());
    }

    let dj = run("nbdinfo", &["--list", "--json", &b.uri()]);
    let pj = run("nbdinfo", &["--list", "--json", proxy.uri()]);
    assert_eq!(
        dj.status.code(),
        pj.status.code(),
        "{}\n{}",
        dj.describe(),
        pj.describe()
    );
    if dj.success() {
        let mut dv = parse_json(&dj.stdout);
        let mut pv = parse_json(&pj.stdout);
        strip_uri_keys(&mut dv);
        strip_uri_keys(&mut pv);
        assert_eq!(
            dv,
            pv,
            "nbdinfo --list --json differs\n{}\n{}",
            dj.describe(),
            pj.describe()
        );
    } else {
        let uris = [b.uri(), proxy.uri().to_string()];
        let uris: Vec<&str> = uris.iter().map(String::as_str).collect();
        assert_same_lines(
            "nbdinfo --list --json stderr",
            &mask_uris(&dj.stderr, &uris),
            &mask_uris(&pj.stderr, &uris),
        );
    }
}

fn nbdinfo_map(kind: Kind) {
    let b = Backend::start_seeded(kind);
    let proxy = proxy_for(&b);
    let d = same_output(
        "nbdinfo --map",
        &b.uri(),
        proxy.uri(),
        "nbdinfo",
        &["--map", "URI"],
    );
    if kind.structured() {
        assert!(d.success(), "{}", d.describe());
        assert!(
            d.stdout.contains("hole,zero"),
            "no hole in map:\n{}",
            d.stdout
        );
        assert!(d.stdout.contains(" data"), "no data in map:\n{}", d.stdout);
    } else {
        // Without structured replies there is no block status.
        assert!(!d.success(), "{}", d.describe());
        assert_eq!(
            d.stderr.trim(),
            "nbdinfo: --map: server does not support metadata context \"base:allocation\""
        );
    }
    same_output(
        "nbdinfo --map --totals",
        &b.uri(),
        proxy.uri(),
        "nbdinfo",
        &["--map", "--totals", "URI"],
    );
}

// ---------------------------------------------------------------------------
// Data copies
// ---------------------------------------------------------------------------

fn nbdcopy_roundtrip(kind: Kind) {
    let b = Backend::start(kind);
    let mut proxy = proxy_for(&b);
    let src = b.path("src.raw");
    write_random_file(&src, DISK, 0xC0FFEE ^ kind as u64);

    // Local file -> proxy -> backend; read back direct.
    run_ok("nbdcopy", &[src.to_str().unwrap(), proxy.uri()]);
    let back = b.path("back-direct.raw");
    run_ok("nbdcopy", &[&b.uri(), back.to_str().unwrap()]);
    assert_files_equal(&src, &back);

    // Backend -> proxy -> local file.
    let out = b.path("out-proxied.raw");
    run_ok("nbdcopy", &[proxy.uri(), out.to_str().unwrap()]);
    assert_files_equal(&src, &out);

    // Explicit parallelism, both ways, with different data.
    let src2 = b.path("src2.raw");
    write_random_file(&src2, DISK, 0xBADC0DE ^ kind as u64);
    run_ok(
        "nbdcopy",
        &[
            "--connections=4",
            "--requests=16",
            src2.to_str().unwrap(),
            proxy.uri(),
        ],
    );
    let out2 = b.path("out2.raw");
    run_ok(
        "nbdcopy",
        &[
            "--connections=4",
            "--requests=16",
            proxy.uri(),
            out2.to_str().unwrap(),
        ],
    );
    assert_files_equal(&src2, &out2);
    let back2 = b.path("back2.raw");
    run_ok("nbdcopy", &[&b.uri(), back2.to_str().unwrap()]);
    assert_files_equal(&src2, &back2);
    assert!(proxy.is_running(), "proxy died\n{}", proxy.stderr());
}

fn qemu_img_convert(kind: Kind) {
    let b = Backend::start(kind);
    let proxy = proxy_for(&b);
    let src = b.path("src.raw");
    write_random_file(&src, DISK, 0x5EED ^ kind as u64);

    // Local file -> proxy -> backend (the NBD target exists: -n).
    run_ok(
        "qemu-img",
        &[
            "convert",
            "-n",
            "-f",
            "raw",
            "-O",
            "raw",
            src.to_str().unwrap(),
            proxy.uri(),
        ],
    );
    let back = b.path("back-direct.raw");
    run_ok(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &b.uri(),
            back.to_str().unwrap(),
        ],
    );
    assert_files_equal(&src, &back);

    // Backend -> proxy -> local file.
    let out = b.path("out-proxied.raw");
    run_ok(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            proxy.uri(),
            out.to_str().unwrap(),
        ],
    );
    assert_files_equal(&src, &out);

    let cmp = run_ok(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            src.to_str().unwrap(),
            proxy.uri(),
        ],
    );
    assert_eq!(cmp.trim(), "Images are identical.");
}

fn qemu_img_map(kind: Kind) {
    let b = Backend::start_seeded(kind);
    let proxy = proxy_for(&b);
    let d = same_output(
        "qemu-img map",
        &b.uri(),
        proxy.uri(),
        "qemu-img",
        &["map", "-f", "raw", "--output=json", "URI"],
    );
    assert!(d.success(), "{}", d.describe());
    let v = parse_json(&d.stdout);
    let n = v.as_array().map(|a| a.len()).unwrap_or(0);
    if kind.structured() {
        assert!(n > 1, "expected several extents:\n{}", d.stdout);
    } else {
        assert!(n >= 1, "expected extents:\n{}", d.stdout);
    }
}

// ---------------------------------------------------------------------------
// qemu-io
// ---------------------------------------------------------------------------

fn qemu_io_session(kind: Kind) {
    // Fresh, identical backends for the direct and the proxied run.
    let b = Backend::start(kind);
    let bp = Backend::start(kind);
    let proxy = proxy_for(&bp);
    let cmds = [
        "write -P 0xab 0 1M",
        "read -P 0xab 0 1M",
        "flush",
        "discard 0 64k",
        "write -z 1M 1M",
        "read -P 0 1M 1M",
        "read -P 0xcd 0 4k",
    ];
    let uris = [b.uri(), proxy.uri().to_string()];
    let uris: Vec<&str> = uris.iter().map(String::as_str).collect();
    let norm = |o: &Output| mask_uris(&mask_qemu_io_timing(&o.stdout), &uris);

    let d = qemu_io(&b.uri(), &cmds);
    let p = qemu_io(proxy.uri(), &cmds);
    // The direct half, pinned: every command succeeded except the last read,
    // whose pattern check fails.
    let expected = "\
wrote 1048576/1048576 bytes at offset 0
1 MiB, 1 ops; <timing>
read 1048576/1048576 bytes at offset 0
1 MiB, 1 ops; <timing>
discard 65536/65536 bytes at offset 0
64 KiB, 1 ops; <timing>
wrote 1048576/1048576 bytes at offset 1048576
1 MiB, 1 ops; <timing>
read 1048576/1048576 bytes at offset 1048576
1 MiB, 1 ops; <timing>
Pattern verification failed at offset 0, 4096 bytes
read 4096/4096 bytes at offset 0
4 KiB, 1 ops; <timing>";
    if kind == Kind::Oldstyle {
        // nbdkit 1.32 in oldstyle mode advertises FUA/TRIM/FLUSH but rejects
        // them with EINVAL; qemu-io must see exactly that through the proxy too.
        assert!(
            norm(&d).starts_with("write failed: Invalid argument\n"),
            "{}",
            d.describe()
        );
    } else {
        assert_same_lines("qemu-io direct (pinned)", expected, &norm(&d));
    }
    assert_same_lines("qemu-io stdout", &norm(&d), &norm(&p));
    assert_same_lines(
        "qemu-io stderr",
        &mask_uris(&d.stderr, &uris),
        &mask_uris(&p.stderr, &uris),
    );
    assert_eq!(
        d.status.code(),
        p.status.code(),
        "{}\n{}",
        d.describe(),
        p.describe()
    );

    // The pattern mismatch alone, reported exactly as direct.
    let d = qemu_io(&b.uri(), &["read -P 0xcd 0 4k"]);
    let p = qemu_io(proxy.uri(), &["read -P 0xcd 0 4k"]);
    assert!(
        d.stdout
            .contains("Pattern verification failed at offset 0, 4096 bytes"),
        "{}",
        d.describe()
    );
    assert_same_lines("qemu-io mismatch", &norm(&d), &norm(&p));
    assert_eq!(
        d.status.code(),
        p.status.code(),
        "{}\n{}",
        d.describe(),
        p.describe()
    );
}

// ---------------------------------------------------------------------------
// libnbd (python)
// ---------------------------------------------------------------------------

/// Python helper printing either the value or the libnbd error.
const SAFE: &str = r#"
def safe(f, *a):
    try:
        return repr(f(*a))
    except nbd.Error as e:
        return "ERR %s %s" % (e.errno, e.string)
"#;

/// Runs `script` with `h` connected to `uri`, after running `pre` on the
/// unconnected handle.
fn nbdsh_pre(uri: &str, pre: &str, script: &str) -> String {
    python(
        &format!(
            "import nbd, sys\n{SAFE}\nh = nbd.NBD()\n{pre}\nh.connect_uri(sys.argv[1])\n{script}\n"
        ),
        &[uri],
    )
}

fn both(b: &Backend, proxy: &Nbdfault, what: &str, pre: &str, script: &str) -> String {
    let d = nbdsh_pre(&b.uri(), pre, script);
    let p = nbdsh_pre(proxy.uri(), pre, script);
    assert_same_lines(what, &d, &p);
    d
}

/// For scripts that change the disk: runs `script` direct against one fresh
/// backend and through the proxy against another fresh backend of the same
/// kind, so both runs start from the same state.
fn both_fresh(kind: Kind, what: &str, pre: &str, script: &str) -> String {
    let bd = Backend::start(kind);
    let bp = Backend::start(kind);
    let proxy = proxy_for(&bp);
    let d = nbdsh_pre(&bd.uri(), pre, script);
    let p = nbdsh_pre(proxy.uri(), pre, script);
    assert_same_lines(what, &d, &p);
    d
}

fn nbdsh_flags(kind: Kind) {
    let b = Backend::start(kind);
    let proxy = proxy_for(&b);
    let script = r#"
for name in ["get_protocol", "get_structured_replies_negotiated", "get_size",
             "is_read_only", "is_rotational", "can_flush", "can_fua", "can_trim",
             "can_zero", "can_fast_zero", "can_cache", "can_df", "can_multi_conn",
             "get_export_name", "get_canonical_export_name",
             "get_export_description"]:
    print(name, safe(getattr(h, name)))
for n, c in [("minimum", nbd.SIZE_MINIMUM), ("preferred", nbd.SIZE_PREFERRED),
             ("maximum", nbd.SIZE_MAXIMUM)]:
    print("block_size", n, safe(h.get_block_size, c))
print("base:allocation", safe(h.can_meta_context, nbd.CONTEXT_BASE_ALLOCATION))
"#;
    let d = both(
        &b,
        &proxy,
        "libnbd flags",
        "h.set_full_info(True)\nh.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)",
        script,
    );
    assert!(d.contains(&format!("get_size {DISK}")), "{d}");
    assert!(d.contains("can_fua True"), "{d}");
    assert!(
        d.contains(&format!(
            "get_structured_replies_negotiated {}",
            if kind.structured() { "True" } else { "False" }
        )),
        "{d}"
    );
}

fn nbdsh_block_status(kind: Kind) {
    let b = Backend::start_seeded(kind);
    let proxy = proxy_for(&b);
    let script = r#"
size = h.get_size()
print("base:allocation", safe(h.can_meta_context, nbd.CONTEXT_BASE_ALLOCATION))
def cb(meta, off, entries, err):
    print("extent", meta, off, entries, err.value)
    return 0
for flags in [0, nbd.CMD_FLAG_REQ_ONE]:
    off = 0
    n = 0
    while off < size and n < 64:
        got = []
        def collect(meta, o, entries, err):
            print("extent", flags, meta, o, entries, err.value)
            if meta == nbd.CONTEXT_BASE_ALLOCATION:
                got.extend(entries)
            return 0
        r = safe(h.block_status, size - off, off, collect, flags)
        print("block_status", flags, off, r)
        if r.startswith("ERR") or not got:
            break
        off += sum(got[0::2])
        n += 1
# A small window in the middle of the data.
print("window", safe(h.block_status, 8192, 10 * 1048576, cb))
"#;
    let d = both(
        &b,
        &proxy,
        "libnbd block status",
        "h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)",
        script,
    );
    if kind.structured() {
        assert!(d.contains("base:allocation True"), "{d}");
        assert!(d.contains("extent 0 base:allocation 0 ["), "{d}");
    } else {
        assert!(d.contains("base:allocation False"), "{d}");
        assert!(d.contains("block_status 0 0 ERR"), "{d}");
    }
}

fn nbdsh_io(kind: Kind) {
    let script = r#"
size = h.get_size()
data = bytes((i * 7 + 3) % 251 for i in range(65536))
off = 3 * 1048576 + 512
print("pwrite fua", safe(h.pwrite, data, off, nbd.CMD_FLAG_FUA))
got = h.pread(65536, off)
print("pread equal", got == data)
if got != data:
    print("pwrite without fua", safe(h.pwrite, data, off))
    print("pread equal now", h.pread(65536, off) == data)
print("pread unaligned", h.pread(1000, off + 1) == data[1:1001])
print("flush", safe(h.flush))
if h.can_cache():
    print("cache", safe(h.cache, 65536, off))
if h.can_trim():
    print("trim", safe(h.trim, 65536, 8 * 1048576))
print("zero", safe(h.zero, 4096, off))
print("zeroed", h.pread(4096, off) == bytes(4096), h.pread(4096, off + 4096) == data[4096:8192])
if h.can_fast_zero():
    print("fast zero", safe(h.zero, 4096, off + 8192, nbd.CMD_FLAG_FAST_ZERO))
print("zero no-hole", safe(h.zero, 4096, off + 16384, nbd.CMD_FLAG_NO_HOLE))
print("pread after zeroes", h.pread(4096, off + 8192) == bytes(4096), h.pread(4096, off + 16384) == bytes(4096))
# Server-side errors, with libnbd's client-side checks off.
h.set_strict_mode(0)
print("pread past end", safe(h.pread, 4096, size))
print("pwrite past end", safe(h.pwrite, b"x" * 4096, size))
print("zero past end", safe(h.zero, 4096, size))
print("trim past end", safe(h.trim, 4096, size))
print("cache past end", safe(h.cache, 4096, size))
print("still usable", h.pread(4, 0) == h.pread(4, 0))
h.shutdown()
print("shutdown ok")
"#;
    let d = both_fresh(kind, "libnbd io", "", script);
    if kind == Kind::Oldstyle {
        // nbdkit 1.32 in oldstyle mode advertises FUA, FLUSH, TRIM,
        // WRITE_ZEROES and CACHE but rejects them all with EINVAL.
        assert!(d.contains("pwrite fua ERR EINVAL"), "{d}");
        assert!(d.contains("pread equal now True"), "{d}");
        assert!(d.contains("flush ERR EINVAL"), "{d}");
    } else {
        assert!(d.contains("pwrite fua None"), "{d}");
        assert!(d.contains("pread equal True"), "{d}");
        assert!(d.contains("flush None"), "{d}");
        assert!(d.contains("zeroed True True"), "{d}");
        assert!(d.contains("pread after zeroes True True"), "{d}");
    }
    assert!(d.contains("pread unaligned True"), "{d}");
    assert!(d.contains("pread past end ERR EINVAL"), "{d}");
    assert!(d.contains("pwrite past end ERR"), "{d}");
    assert!(d.contains("pread past end ERR EINVAL"), "{d}");
}

fn nbdsh_aio(kind: Kind) {
    let script = r#"
import random
rnd = random.Random(1234)
base = 4 * 1048576
blob = rnd.randbytes(1048576)
# Pipelined writes: 16 x 64 KiB at once, some with FUA.
cookies = []
for i in range(16):
    flags = nbd.CMD_FLAG_FUA if (i % 3 == 0 and USE_FUA) else 0
    cookies.append(h.aio_pwrite(blob[i * 65536:(i + 1) * 65536], base + i * 65536, None, flags))
while h.aio_in_flight() > 0:
    h.poll(-1)
print("writes completed", all(h.aio_command_completed(c) for c in cookies))
# Pipelined reads of random ranges.
reqs = []
for i in range(48):
    o = rnd.randrange(0, len(blob) - 1)
    n = rnd.randrange(1, min(200000, len(blob) - o) + 1)
    buf = nbd.Buffer(n)
    reqs.append((h.aio_pread(buf, base + o), buf, o, n))
print("in flight before poll", h.aio_in_flight() > 0)
while h.aio_in_flight() > 0:
    h.poll(-1)
bad = [(o, n) for (c, buf, o, n) in reqs
       if not h.aio_command_completed(c) or bytes(buf.to_bytearray()) != blob[o:o + n]]
print("reads", len(reqs), "bad", bad)
"#;
    // nbdkit 1.32 oldstyle rejects FUA although it advertises it.
    let pre = format!(
        "USE_FUA = {}",
        if kind == Kind::Oldstyle {
            "False"
        } else {
            "True"
        }
    );
    let d = both_fresh(kind, "libnbd aio", &pre, script);
    assert!(d.contains("writes completed True"), "{d}");
    assert!(d.contains("reads 48 bad []"), "{d}");
}

fn nbdsh_options(kind: Kind) {
    let b = Backend::start(kind);
    let proxy = proxy_for(&b);
    let script = r#"
print("protocol", h.get_protocol())
print("negotiating", h.aio_is_negotiating())
exports = []
def on_export(name, desc):
    exports.append((name, desc))
    return 0
print("list", safe(h.opt_list, on_export), exports)
ctxs = []
def on_ctx(name):
    ctxs.append(name)
    return 0
print("list_meta_context", safe(h.opt_list_meta_context, on_ctx), ctxs)
print("set name", safe(h.set_export_name, "nonexistent"))
print("info other name", safe(h.opt_info))
print("set name", safe(h.set_export_name, ""))
print("info", safe(h.opt_info), safe(h.get_size), safe(h.can_fua))
print("go", safe(h.opt_go))
print("size", safe(h.get_size), "ready", h.aio_is_ready())
print("read", safe(h.pread, 8, 0))
h.shutdown()

# A second connection that gives up during negotiation.
h2 = nbd.NBD()
h2.set_opt_mode(True)
h2.connect_uri(sys.argv[1])
if h2.aio_is_negotiating():
    print("abort", safe(h2.opt_abort), "closed", h2.aio_is_closed())
else:
    print("no negotiation phase")
"#;
    let d = both(
        &b,
        &proxy,
        "libnbd option negotiation",
        "h.set_opt_mode(True)",
        script,
    );
    if kind.fixed_newstyle() {
        assert!(d.contains("negotiating True"), "{d}");
        assert!(d.contains("list 1 [('', '')]"), "{d}");
        assert!(d.contains("go None"), "{d}");
        assert!(d.contains("abort None closed True"), "{d}");
    }
    assert!(d.contains(&format!("size {DISK} ready True")), "{d}");
}

// ---------------------------------------------------------------------------
// fio
// ---------------------------------------------------------------------------

fn fio(uri: &str, extra: &[&str]) -> Output {
    let uri_arg = format!("--uri={uri}");
    let mut args = vec![
        "--name=verify",
        "--ioengine=nbd",
        &uri_arg,
        "--rw=randwrite",
        "--bs=16k",
        "--size=32M",
        "--iodepth=16",
        "--verify=crc32c",
        "--verify_fatal=1",
        // No verify state file in the working directory.
        "--verify_state_save=0",
    ];
    args.extend_from_slice(extra);
    run("fio", &args)
}

fn fio_verify(kind: Kind) {
    let b = Backend::start(kind);
    let mut proxy = proxy_for(&b);
    // Random writes at queue depth 16 through the proxy, verified through it.
    let w = fio(proxy.uri(), &["--do_verify=1"]);
    assert!(
        w.success(),
        "fio through the proxy failed\n{}\n--- proxy stderr ---\n{}",
        w.describe(),
        proxy.stderr()
    );
    assert!(!w.stdout.contains("verify failed"), "{}", w.describe());
    // The data really is on the backend, and reads back through the proxy.
    for uri in [b.uri(), proxy.uri().to_string()] {
        let v = fio(&uri, &["--verify_only"]);
        assert!(
            v.success(),
            "fio --verify_only on {uri} failed\n{}",
            v.describe()
        );
        assert!(!v.stdout.contains("verify failed"), "{}", v.describe());
    }
    assert!(proxy.is_running(), "proxy died\n{}", proxy.stderr());
}

// ---------------------------------------------------------------------------
// One module per backend.
// ---------------------------------------------------------------------------

macro_rules! backend_tests {
    ($m:ident, $kind:expr) => {
        mod $m {
            use super::*;

            #[test]
            fn nbdinfo_json_identical() {
                nbdinfo_json($kind);
            }
            #[test]
            fn nbdinfo_list_identical() {
                nbdinfo_list($kind);
            }
            #[test]
            fn nbdinfo_map_identical() {
                nbdinfo_map($kind);
            }
            #[test]
            fn nbdcopy_both_ways_byte_exact() {
                nbdcopy_roundtrip($kind);
            }
            #[test]
            fn qemu_img_convert_both_ways_byte_exact() {
                qemu_img_convert($kind);
            }
            #[test]
            fn qemu_img_map_identical() {
                qemu_img_map($kind);
            }
            #[test]
            fn qemu_io_session_identical() {
                qemu_io_session($kind);
            }
            #[test]
            fn libnbd_flags_identical() {
                nbdsh_flags($kind);
            }
            #[test]
            fn libnbd_block_status_identical() {
                nbdsh_block_status($kind);
            }
            #[test]
            fn libnbd_io_and_errors_identical() {
                nbdsh_io($kind);
            }
            #[test]
            fn libnbd_pipelined_aio() {
                nbdsh_aio($kind);
            }
            #[test]
            fn libnbd_option_negotiation_identical() {
                nbdsh_options($kind);
            }
            #[test]
            fn fio_random_writes_verified() {
                fio_verify($kind);
            }
        }
    };
}

backend_tests!(qemu_nbd_raw, Kind::QemuRaw);
backend_tests!(nbdkit_memory, Kind::Memory);
backend_tests!(nbdkit_no_structured_replies, Kind::NoSr);
backend_tests!(nbdkit_non_fixed_newstyle, Kind::NonFixed);
backend_tests!(nbdkit_oldstyle, Kind::Oldstyle);

// ---------------------------------------------------------------------------
// Address forms, export names, read-only exports.
// ---------------------------------------------------------------------------

/// Compares `nbdinfo --json` direct vs proxied (uri keys removed).
fn assert_same_nbdinfo_json(direct_uri: &str, proxied_uri: &str) {
    let direct = run_ok("nbdinfo", &["--json", direct_uri]);
    let proxied = run_ok("nbdinfo", &["--json", proxied_uri]);
    let mut d = parse_json(&direct);
    let mut p = parse_json(&proxied);
    strip_uri_keys(&mut d);
    strip_uri_keys(&mut p);
    assert_eq!(d, p, "--- direct ---\n{direct}\n--- proxied ---\n{proxied}");
}

/// 16 MiB written through the proxy, read back direct and through the proxy.
fn small_roundtrip(dir: &Path, direct_uri: &str, proxied_uri: &str, seed: u64) {
    let src = dir.join("small.raw");
    write_random_file(&src, 16 * MIB, seed);
    run_ok("nbdcopy", &[src.to_str().unwrap(), proxied_uri]);
    let back = dir.join("small-back.raw");
    run_ok("nbdcopy", &[direct_uri, back.to_str().unwrap()]);
    assert_prefix_equal(&src, &back, 16 * MIB);
    let out = dir.join("small-out.raw");
    run_ok("nbdcopy", &[proxied_uri, out.to_str().unwrap()]);
    assert_prefix_equal(&src, &out, 16 * MIB);
}

#[test]
fn unix_socket_listen_with_tcp_upstream() {
    let kit = Nbdkit::start_tcp(&["memory", "64M"]);
    let port = kit.port.unwrap();
    let dir = TempDir::new().unwrap();
    let sock = dir.path().join("proxy.sock");
    let proxy = Nbdfault::proxy_on(sock.to_str().unwrap(), &format!("127.0.0.1:{port}"));
    assert_eq!(proxy.uri(), unix_uri(&sock));
    assert_same_nbdinfo_json(&kit.uri(), proxy.uri());
    small_roundtrip(dir.path(), &kit.uri(), proxy.uri(), 11);
}

#[test]
fn unix_prefixed_listen_with_nbd_uri_upstream() {
    let kit = Nbdkit::start_tcp(&["memory", "64M"]);
    let port = kit.port.unwrap();
    let dir = TempDir::new().unwrap();
    let sock = dir.path().join("p.sock");
    let listen = format!("unix:{}", sock.display());
    let proxy = Nbdfault::proxy_on(&listen, &format!("nbd://127.0.0.1:{port}/"));
    assert_eq!(proxy.uri(), unix_uri(&sock));
    assert_same_nbdinfo_json(&kit.uri(), proxy.uri());
    small_roundtrip(dir.path(), &kit.uri(), proxy.uri(), 12);
}

#[test]
fn tcp_listen_with_plain_unix_path_upstream() {
    let kit = Nbdkit::start(&["memory", "64M"]);
    let sock = kit.sock.clone().unwrap();
    let proxy = Nbdfault::proxy(sock.to_str().unwrap());
    assert!(
        proxy.uri().starts_with("nbd://127.0.0.1:"),
        "{}",
        proxy.uri()
    );
    assert_same_nbdinfo_json(&kit.uri(), proxy.uri());
    let dir = TempDir::new().unwrap();
    small_roundtrip(dir.path(), &kit.uri(), proxy.uri(), 13);
}

#[test]
fn export_name_and_description_forwarded() {
    let dir = TempDir::new().unwrap();
    let file = dir.path().join("named.raw");
    write_sparse_file(&file, 8 * MIB, &[(0, b"named export")]);
    let q = QemuNbd::start("raw", &file, &["-x", "disk1", "-D", "the first disk"]);
    let mut proxy = Nbdfault::proxy(&q.uri());

    // Right name: same info, including the description.
    let d_uri = uri_with_export(&q.uri(), "disk1");
    let p_uri = uri_with_export(proxy.uri(), "disk1");
    let direct = run_ok("nbdinfo", &["--json", &d_uri]);
    assert!(direct.contains("\"export-name\": \"disk1\""), "{direct}");
    assert!(direct.contains("the first disk"), "{direct}");
    assert_same_nbdinfo_json(&d_uri, &p_uri);

    // The export list names it.
    let d = same_output(
        "nbdinfo --list",
        &q.uri(),
        proxy.uri(),
        "nbdinfo",
        &["--list", "URI"],
    );
    assert!(d.stdout.contains("export=\"disk1\":"), "{}", d.describe());
    assert!(
        d.stdout.contains("description: the first disk"),
        "{}",
        d.describe()
    );

    // Wrong name: the same refusal.
    let d_bad = uri_with_export(&q.uri(), "nosuchdisk");
    let p_bad = uri_with_export(proxy.uri(), "nosuchdisk");
    let d = run("nbdinfo", &[&d_bad]);
    let p = run("nbdinfo", &[&p_bad]);
    assert!(!d.success(), "{}", d.describe());
    assert!(
        !p.success(),
        "wrong export name accepted through the proxy\n{}",
        p.describe()
    );
    let uris = [d_bad.as_str(), p_bad.as_str(), &q.uri(), proxy.uri()];
    assert_same_lines(
        "nbdinfo with unknown export name (stderr)",
        &mask_uris(&d.stderr, &uris),
        &mask_uris(&p.stderr, &uris),
    );
    assert!(proxy.is_running(), "proxy died\n{}", proxy.stderr());
}

#[test]
fn read_only_export_stays_read_only() {
    let dir = TempDir::new().unwrap();
    let file = dir.path().join("ro.raw");
    write_sparse_file(&file, 8 * MIB, &[(4096, b"read only data")]);
    let q = QemuNbd::start("raw", &file, &["-r"]);
    let proxy = Nbdfault::proxy(&q.uri());
    assert_same_nbdinfo_json(&q.uri(), proxy.uri());
    let script = r#"
print("ro", h.is_read_only())
print("data", h.pread(14, 4096))
h.set_strict_mode(0)
print("write", safe(h.pwrite, b"x" * 512, 0))
print("zero", safe(h.zero, 512, 0))
print("trim", safe(h.trim, 512, 0))
print("data after", h.pread(14, 4096))
"#;
    let d = nbdsh_pre(&q.uri(), "", script);
    let p = nbdsh_pre(proxy.uri(), "", script);
    assert!(d.contains("ro True"), "{d}");
    // What qemu-nbd 10 answers for a write to a read-only export.
    assert!(d.contains("write ERR EINVAL"), "{d}");
    assert_same_lines("read-only export via libnbd", &d, &p);
    // Nothing was written to the file.
    let bytes = std::fs::read(&file).unwrap();
    assert_eq!(&bytes[4096..4110], b"read only data");
    assert!(bytes[..512].iter().all(|&b| b == 0));
}

#[test]
fn qemu_nbd_qcow2_image() {
    let dir = TempDir::new().unwrap();
    let img = dir.path().join("disk.qcow2");
    run_ok(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "32M"],
    );
    let q = QemuNbd::start("qcow2", &img, &[]);
    let proxy = Nbdfault::proxy(&q.uri());
    let w = qemu_io(proxy.uri(), &["write -P 0x5a 2M 256k"]);
    assert!(w.success(), "{}", w.describe());
    let d = same_output(
        "nbdinfo --map (qcow2)",
        &q.uri(),
        proxy.uri(),
        "nbdinfo",
        &["--map", "URI"],
    );
    assert!(d.stdout.contains(" data"), "{}", d.describe());
    let io = qemu_io(&q.uri(), &["read -P 0x5a 2M 256k"]);
    assert!(
        io.success() && !io.stdout.contains("Pattern verification failed"),
        "{}",
        io.describe()
    );
}

#[test]
fn qemu_negotiates_extended_headers_through_proxy() {
    // qemu-nbd traces the options it acks; QEMU 10 clients ask for extended
    // headers, and must get them through the proxy just as direct.
    let dir = TempDir::new().unwrap();
    let file = dir.path().join("eh.raw");
    write_sparse_file(&file, 8 * MIB, &[]);
    let q = QemuNbd::start(
        "raw",
        &file,
        &[
            "--trace",
            "nbd_negotiate_options_check_option",
            "--trace",
            "nbd_negotiate_send_rep_len",
        ],
    );
    let acked = "Reply opt=11 (extended headers), type=1 (ack)";
    let count = |log: &str| log.matches(acked).count();

    // Direct: the trace shows the ack (validates the trace itself).
    let io = qemu_io(&q.uri(), &["write -P 0x3c 0 64k", "read -P 0x3c 0 64k"]);
    assert!(io.success(), "{}", io.describe());
    assert!(
        wait_until(std::time::Duration::from_secs(10), || count(&q.log()) >= 1),
        "direct qemu-io did not negotiate extended headers:\n{}",
        q.log()
    );
    let before = count(&q.log());

    let proxy = Nbdfault::proxy(&q.uri());
    let io = qemu_io(proxy.uri(), &["write -P 0x3d 0 64k", "read -P 0x3d 0 64k"]);
    assert!(io.success(), "{}", io.describe());
    assert!(
        !io.stdout.contains("Pattern verification failed"),
        "{}",
        io.describe()
    );
    assert!(
        wait_until(std::time::Duration::from_secs(10), || count(&q.log())
            > before),
        "qemu-io through the proxy did not negotiate extended headers with qemu-nbd\n--- qemu-nbd trace ---\n{}\n--- proxy stderr ---\n{}",
        q.log(),
        proxy.stderr()
    );
}

/// nbdkit's error filter makes every read, write and trim fail with a chosen
/// errno; clients must see the same errors through the proxy.
fn server_errors(sr: bool) {
    let mut args = vec![];
    if !sr {
        args.push("--no-sr");
    }
    args.extend_from_slice(&[
        "--filter=error",
        "memory",
        "64M",
        "error-pread=EINVAL",
        "error-pread-rate=100%",
        "error-pwrite=ENOSPC",
        "error-pwrite-rate=100%",
        "error-trim=EPERM",
        "error-trim-rate=100%",
    ]);
    let kit = Nbdkit::start(&args);
    let proxy = Nbdfault::proxy(&kit.uri());
    let cmds = ["read 0 4k", "write 0 4k", "discard 0 4k", "write -z 0 4k"];
    let d = qemu_io(&kit.uri(), &cmds);
    let p = qemu_io(proxy.uri(), &cmds);
    let expected = "\
read failed: Invalid argument
write failed: No space left on device
discard failed: Operation not permitted
wrote 4096/4096 bytes at offset 0
4 KiB, 1 ops; <timing>";
    assert_same_lines(
        "qemu-io direct (pinned)",
        expected,
        &mask_qemu_io_timing(&d.stdout),
    );
    assert_same_qemu_io("qemu-io with server errors", &d, &p);

    let script = r#"
print("pread", safe(h.pread, 4096, 0))
print("pread big", safe(h.pread, 1048576, 65536))
print("pwrite", safe(h.pwrite, b"x" * 512, 0))
print("trim", safe(h.trim, 512, 0))
print("zero", safe(h.zero, 512, 0))
print("flush", safe(h.flush))
cookies = [h.aio_pread(nbd.Buffer(4096), i * 4096) for i in range(8)]
while h.aio_in_flight() > 0:
    h.poll(-1)
res = []
for c in cookies:
    try:
        res.append(h.aio_command_completed(c))
    except nbd.Error as e:
        res.append(e.errno)
print("aio", res)
"#;
    let dd = nbdsh_pre(&kit.uri(), "", script);
    let pp = nbdsh_pre(proxy.uri(), "", script);
    assert!(dd.contains("pread ERR EINVAL"), "{dd}");
    assert!(dd.contains("pwrite ERR ENOSPC"), "{dd}");
    assert!(dd.contains("trim ERR EPERM"), "{dd}");
    assert!(dd.contains("aio ['EINVAL', "), "{dd}");
    assert_same_lines("libnbd with server errors", &dd, &pp);
}

#[test]
fn server_errors_identical_structured() {
    server_errors(true);
}

#[test]
fn server_errors_identical_simple_replies() {
    server_errors(false);
}
