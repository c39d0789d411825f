//! What goes in and what comes out: deterministic disk images and byte
//! patterns, byte-exact file comparisons, and the text comparisons
//! (JSON, masked URIs, line by line) the tests apply to clients' output.

use std::fs::{self, File};
use std::io::{BufReader, Read, Write};
use std::path::Path;

// ---------------------------------------------------------------------------
// Images and byte patterns.
// ---------------------------------------------------------------------------

/// Deterministic pseudo-random bytes (xorshift64*), different for each seed.
pub struct PseudoRandom(u64);

impl PseudoRandom {
    pub fn new(seed: u64) -> Self {
        // Avoid the all-zero state; mix the seed a little.
        PseudoRandom(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// Deterministic pseudo-random bytes.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    PseudoRandom::new(seed).fill(&mut v);
    v
}

/// Writes `size` pseudo-random bytes to `path`.
pub fn write_random_file(path: &Path, size: u64, seed: u64) {
    let mut f = File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    let mut rng = PseudoRandom::new(seed);
    let mut buf = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        rng.fill(&mut buf[..n]);
        f.write_all(&buf[..n]).expect("write");
        left -= n as u64;
    }
    f.sync_all().ok();
}

/// Creates a sparse file of `size` bytes with `data` written at each offset.
pub fn write_sparse_file(path: &Path, size: u64, pieces: &[(u64, &[u8])]) {
    use std::os::unix::fs::FileExt;
    let f = File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    f.set_len(size).expect("set_len");
    for (off, data) in pieces {
        f.write_all_at(data, *off).expect("write_at");
    }
    f.sync_all().ok();
}

/// Creates an empty sparse file of `size` bytes.
pub fn create_sparse(path: &Path, size: u64) {
    write_sparse_file(path, size, &[]);
}

/// Panics unless the two files have identical length and bytes, naming the
/// first differing offset.
pub fn assert_files_equal(a: &Path, b: &Path) {
    let la = fs::metadata(a)
        .unwrap_or_else(|e| panic!("{}: {e}", a.display()))
        .len();
    let lb = fs::metadata(b)
        .unwrap_or_else(|e| panic!("{}: {e}", b.display()))
        .len();
    assert_eq!(
        la,
        lb,
        "{} and {} differ in length",
        a.display(),
        b.display()
    );
    assert_prefix_equal(a, b, la);
}

/// Panics unless the first `len` bytes of the two files are identical.
pub fn assert_prefix_equal(a: &Path, b: &Path, len: u64) {
    let mut fa = BufReader::with_capacity(1 << 20, File::open(a).expect("open a"));
    let mut fb = BufReader::with_capacity(1 << 20, File::open(b).expect("open b"));
    let mut ba = vec![0u8; 1 << 20];
    let mut bb = vec![0u8; 1 << 20];
    let mut off = 0u64;
    while off < len {
        let n = ((len - off) as usize).min(ba.len());
        fa.read_exact(&mut ba[..n])
            .unwrap_or_else(|e| panic!("{}: short read at {off}: {e}", a.display()));
        fb.read_exact(&mut bb[..n])
            .unwrap_or_else(|e| panic!("{}: short read at {off}: {e}", b.display()));
        if ba[..n] != bb[..n] {
            let i = ba[..n]
                .iter()
                .zip(&bb[..n])
                .position(|(x, y)| x != y)
                .unwrap();
            panic!(
                "{} and {} differ at byte offset {} ({:#04x} vs {:#04x})",
                a.display(),
                b.display(),
                off + i as u64,
                ba[i],
                bb[i]
            );
        }
        off += n as u64;
    }
}

/// Panics unless the file is `len` bytes long and all zero.
pub fn assert_file_zero(path: &Path, len: u64) {
    let got = fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .len();
    assert_eq!(got, len, "{} has the wrong length", path.display());
    let mut f = BufReader::with_capacity(1 << 20, File::open(path).expect("open"));
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0u64;
    loop {
        let n = f.read(&mut buf).expect("read");
        if n == 0 {
            break;
        }
        if let Some(i) = buf[..n].iter().position(|&b| b != 0) {
            panic!(
                "{} is not all zero: byte {:#04x} at offset {}",
                path.display(),
                buf[i],
                off + i as u64
            );
        }
        off += n as u64;
    }
}

// ---------------------------------------------------------------------------
// Comparing what clients print.
// ---------------------------------------------------------------------------

/// Parses JSON (panicking with the text on error).
pub fn parse_json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("invalid JSON ({e}):\n{text}"))
}

/// Removes every `uri` key anywhere in a JSON value.
pub fn strip_uri_keys(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(map) => {
            map.remove("uri");
            for (_, x) in map.iter_mut() {
                strip_uri_keys(x);
            }
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(strip_uri_keys),
        _ => {}
    }
}

/// Replaces every occurrence of each `uris` entry (longest first) by `<URI>`.
pub fn mask_uris(text: &str, uris: &[&str]) -> String {
    let mut sorted: Vec<&str> = uris.to_vec();
    sorted.sort_by_key(|u| std::cmp::Reverse(u.len()));
    let mut out = text.to_string();
    for u in sorted {
        out = out.replace(u, "<URI>");
    }
    out
}

/// Asserts two texts are equal line by line, showing the first difference.
pub fn assert_same_lines(what: &str, direct: &str, proxied: &str) {
    if direct == proxied {
        return;
    }
    let d: Vec<&str> = direct.lines().collect();
    let p: Vec<&str> = proxied.lines().collect();
    let n = d.len().max(p.len());
    for i in 0..n {
        let a = d.get(i).copied().unwrap_or("<missing>");
        let b = p.get(i).copied().unwrap_or("<missing>");
        if a != b {
            panic!(
                "{what}: direct and proxied differ at line {}:\n  direct:  {a:?}\n  proxied: {b:?}\n--- direct ---\n{direct}\n--- proxied ---\n{proxied}",
                i + 1
            );
        }
    }
    panic!(
        "{what}: direct and proxied differ (whitespace/line endings):\n--- direct ---\n{direct:?}\n--- proxied ---\n{proxied:?}"
    );
}
