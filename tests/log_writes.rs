//! `--log-writes FILE`, end to end: qemu-io, nbdsh and nbdcopy write
//! through `nbdfault proxy` to qemu-nbd, and the log is read back by this
//! file's own parser of the dm-log-writes format (superblock in sector 0,
//! each entry a sector followed by its data sectors, all little-endian).
//! Its entries must be the requests that were sent, in order, and replaying
//! the log onto the original image up to each flush must give exactly
//! what the disk held at that flush; the whole log, the server's file.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::*;
use tempfile::TempDir;

const DISK: usize = 1 << 20;
/// What the image holds before each test.
const OLD: u8 = 0x11;

const FLUSH: u64 = 1;
const FUA: u64 = 2;
const DISCARD: u64 = 4;
const MARK: u64 = 8;

/// One entry as read back.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    sector: u64,
    sectors: u64,
    flags: u64,
    /// The data sectors after it (none for a flush, a discard or a mark).
    data: Vec<u8>,
    /// A mark's text.
    mark: Option<String>,
}

impl Entry {
    /// (sector, sectors, flags): what a check compares first.
    fn head(&self) -> (u64, u64, u64) {
        (self.sector, self.sectors, self.flags)
    }
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// Reads a log: its sector size and the entries its superblock counts.
fn parse(log: &[u8]) -> (u64, Vec<Entry>) {
    assert!(log.len() >= 512, "a log is at least its superblock");
    assert_eq!(le64(log, 0), 0x6a736677736872, "magic");
    assert_eq!(le64(log, 8), 1, "version");
    let count = le64(log, 16);
    let size = u32::from_le_bytes(log[24..28].try_into().unwrap()) as u64;
    assert_eq!(size, 512, "sector size");
    let mut at = size as usize;
    let mut entries = Vec::new();
    for i in 0..count {
        assert!(at + 32 <= log.len(), "entry {i} is past the end of the log");
        let (sector, sectors, flags, data_len) = (
            le64(log, at),
            le64(log, at + 8),
            le64(log, at + 16),
            le64(log, at + 24) as usize,
        );
        let mark = (flags & MARK != 0)
            .then(|| String::from_utf8_lossy(&log[at + 32..at + 32 + data_len]).into_owned());
        at += size as usize;
        let mut data = Vec::new();
        if flags & (DISCARD | MARK) == 0 {
            let len = (sectors * size) as usize;
            assert!(at + len <= log.len(), "entry {i}'s data is past the end");
            data = log[at..at + len].to_vec();
            at += len;
        }
        entries.push(Entry {
            sector,
            sectors,
            flags,
            data,
            mark,
        });
    }
    (size, entries)
}

/// `disk` with `entries` applied, as a replay tool would: data written at
/// its sector, a discard zeroes (qemu-nbd --discard=unmap reads it back as
/// zeroes), flushes and marks change nothing.
fn replay(disk: &[u8], entries: &[Entry]) -> Vec<u8> {
    let mut disk = disk.to_vec();
    for e in entries {
        let from = (e.sector * 512) as usize;
        let to = from + (e.sectors * 512) as usize;
        if e.flags & DISCARD != 0 {
            disk[from..to].fill(0);
        } else if e.flags & MARK == 0 {
            disk[from..to].copy_from_slice(&e.data);
        }
    }
    disk
}

/// Each entry's (sector, sectors, flags).
fn heads(entries: &[Entry]) -> Vec<(u64, u64, u64)> {
    entries.iter().map(Entry::head).collect()
}

/// Where each flush entry ends a prefix of the log.
fn flush_points(entries: &[Entry]) -> Vec<usize> {
    (entries.iter().enumerate())
        .filter(|(_, e)| e.flags & FLUSH != 0)
        .map(|(i, _)| i + 1)
        .collect()
}

/// A raw image of [`OLD`] behind qemu-nbd, behind `nbdfault proxy
/// --log-writes`.
struct Setup {
    dir: TempDir,
    image: PathBuf,
    log: PathBuf,
    _qemu: QemuNbd,
    nbdfault: Nbdfault,
}

impl Setup {
    fn new() -> Setup {
        Setup::with_args(&[])
    }

    /// With more arguments for nbdfault.
    fn with_args(extra: &[&str]) -> Setup {
        let dir = TempDir::new().expect("tempdir");
        let image = dir.path().join("disk.img");
        write_sparse_file(&image, DISK as u64, &[(0, &vec![OLD; DISK])]);
        let qemu = QemuNbd::start("raw", &image, &["--discard=unmap"]);
        let log = dir.path().join("writes.log");
        let mut args = vec!["--log-writes", log.to_str().unwrap()];
        args.extend_from_slice(extra);
        let nbdfault = Nbdfault::proxy_with(&qemu.uri(), &args);
        Setup {
            dir,
            image,
            log,
            _qemu: qemu,
            nbdfault,
        }
    }

    /// Stops the proxy as SIGTERM does (a clean shutdown).
    fn stop(&mut self) {
        let pid = self.nbdfault.pid().to_string();
        run_ok("kill", &["-TERM", &pid]);
        let status = self.nbdfault.wait_exit(Duration::from_secs(10));
        assert!(
            status.is_some_and(|s| s.success()),
            "{status:?}\n{}",
            self.nbdfault.stderr()
        );
    }

    fn entries(&self) -> Vec<Entry> {
        let (_, entries) = parse(&std::fs::read(&self.log).expect("read the log"));
        entries
    }

    /// [`Setup::stop`], then the log's entries.
    fn stopped_log(&mut self) -> Vec<Entry> {
        self.stop();
        self.entries()
    }

    /// qemu-io with a write-back cache (plain writes, FUA only for `-f`),
    /// which must succeed and print `expect`.
    fn qemu_io(&self, cmds: &[&str], expect: &str) {
        let o = QemuIo::new(self.nbdfault.uri())
            .cache("writeback")
            .cmds(cmds)
            .run();
        assert!(o.success() && o.stdout.contains(expect), "{}", o.describe());
    }

    fn disk(&self) -> Vec<u8> {
        std::fs::read(&self.image).expect("read the image")
    }
}

/// The disk of [`OLD`] with `runs` of (offset, length, byte) laid over it.
fn model(runs: &[(usize, usize, u8)]) -> Vec<u8> {
    let mut disk = vec![OLD; DISK];
    for &(at, len, byte) in runs {
        disk[at..at + len].fill(byte);
    }
    disk
}

#[track_caller]
fn assert_same(what: &str, got: &[u8], want: &[u8]) {
    if let Some(i) = (0..got.len().max(want.len())).find(|&i| got.get(i) != want.get(i)) {
        panic!(
            "{what}: byte {i} is {:?}, expected {:?}",
            got.get(i),
            want.get(i)
        );
    }
}

#[test]
fn every_kind_of_write_is_logged_and_each_flush_replays_exactly() {
    let mut s = Setup::new();
    s.qemu_io(
        &[
            "write -P 0xa1 0 65536",
            "flush",
            "write -P 0xa2 32768 65536",
            "write -z 131072 16384",
            "flush",
            "discard 262144 65536",
            "flush",
            "write -f -P 0xa3 524288 4096",
            "write -P 0xa4 614400 8192",
        ],
        "wrote 8192/8192 bytes at offset 614400",
    );
    let entries = s.stopped_log();
    assert_eq!(
        heads(&entries),
        [
            (0, 128, 0),
            (0, 0, FLUSH),
            (64, 128, 0),
            (256, 32, 0),
            (0, 0, FLUSH),
            (512, 128, DISCARD),
            (0, 0, FLUSH),
            (1024, 8, FUA),
            (1200, 16, 0),
            // qemu-io flushes as it closes.
            (0, 0, FLUSH),
            (0, 0, MARK),
        ],
        "{entries:#?}"
    );
    assert_eq!(entries[10].mark.as_deref(), Some("dm-log-writes-end"));
    assert!(entries[0].data.iter().all(|&b| b == 0xa1));
    assert!(entries[3].data.iter().all(|&b| b == 0), "zeroes");
    assert!(entries[7].data.iter().all(|&b| b == 0xa3));

    // The disk at each flush, from the patterns alone.
    let at_flush = [
        model(&[(0, 65536, 0xa1)]),
        model(&[(0, 65536, 0xa1), (32768, 65536, 0xa2), (131072, 16384, 0)]),
        model(&[
            (0, 65536, 0xa1),
            (32768, 65536, 0xa2),
            (131072, 16384, 0),
            (262144, 65536, 0),
        ]),
        model(&[
            (0, 65536, 0xa1),
            (32768, 65536, 0xa2),
            (131072, 16384, 0),
            (262144, 65536, 0),
            (524288, 4096, 0xa3),
            (614400, 8192, 0xa4),
        ]),
    ];
    let old = vec![OLD; DISK];
    let points = flush_points(&entries);
    assert_eq!(points.len(), at_flush.len());
    for (n, (end, want)) in points.iter().zip(&at_flush).enumerate() {
        assert_same(
            &format!("replay to flush {}", n + 1),
            &replay(&old, &entries[..*end]),
            want,
        );
    }
    assert_same("the whole log", &replay(&old, &entries), &s.disk());
    assert_same("the server's file", &s.disk(), &at_flush[3]);
}

#[test]
fn a_killed_proxy_leaves_a_log_readable_up_to_its_last_flush_or_fua() {
    let s = Setup::new();
    let pid = s.nbdfault.pid();
    // A write, a flush, a FUA write, then a plain write and the kill: the
    // last is on the server but after the log's last durable point.
    nbdsh(
        s.nbdfault.uri(),
        &format!(
            "import os, signal\n\
             h.pwrite(b'\\x21' * 4096, 0)\n\
             h.flush()\n\
             h.pwrite(b'\\x22' * 4096, 8192, nbd.CMD_FLAG_FUA)\n\
             h.pwrite(b'\\x23' * 4096, 16384)\n\
             os.kill({pid}, signal.SIGKILL)\n"
        ),
    );
    let mut s = s;
    assert!(s.nbdfault.wait_exit(Duration::from_secs(10)).is_some());
    let entries = s.entries();
    assert_eq!(
        heads(&entries),
        [(0, 8, 0), (0, 0, FLUSH), (16, 8, FUA)],
        "{entries:#?}"
    );
    assert_same(
        "replay of what the log counts",
        &replay(&vec![OLD; DISK], &entries),
        &model(&[(0, 4096, 0x21), (8192, 4096, 0x22)]),
    );
    assert_same(
        "the server's file",
        &s.disk(),
        &model(&[(0, 4096, 0x21), (8192, 4096, 0x22), (16384, 4096, 0x23)]),
    );
}

#[test]
fn a_failed_write_and_an_unaligned_one_are_not_logged() {
    let mut s = Setup::new();
    let out = nbdsh(
        s.nbdfault.uri(),
        "h.set_strict_mode(0)\n\
         try:\n    h.pwrite(b'\\x31' * 100, 1)\n    print('unaligned written')\n\
         except nbd.Error as e:\n    print('unaligned:', e.errno)\n\
         try:\n    h.pwrite(b'\\x32' * 4096, 1 << 20)\n    print('past the end written')\n\
         except nbd.Error as e:\n    print('past the end:', e.errno)\n\
         h.pwrite(b'\\x33' * 512, 512)\n\
         h.flush()\n",
    );
    assert_eq!(out, "unaligned: EINVAL\npast the end: EINVAL\n", "{out}");
    let stderr = s.nbdfault.stderr();
    assert!(
        stderr.contains(
            "refusing a request: request at offset 1 length 100 is not aligned to the 512-byte \
             sectors of --log-writes; answered without forwarding it"
        ),
        "{stderr}"
    );
    let entries = s.stopped_log();
    assert_eq!(
        heads(&entries),
        [(1, 1, 0), (0, 0, FLUSH), (0, 0, MARK)],
        "{entries:#?}"
    );
    let want = model(&[(512, 512, 0x33)]);
    assert_same("the server's file", &s.disk(), &want);
    assert_same("the replay", &replay(&vec![OLD; DISK], &entries), &want);
}

#[test]
fn nbdcopy_over_several_connections_replays_to_the_servers_file() {
    let mut s = Setup::new();
    let src = s.dir.path().join("random.img");
    write_random_file(&src, DISK as u64, 17);
    run_ok(
        "nbdcopy",
        &[
            "--connections=4",
            "--requests=8",
            "--request-size=65536",
            "--flush",
        ]
        .iter()
        .copied()
        .chain([src.to_str().unwrap(), s.nbdfault.uri()])
        .collect::<Vec<_>>(),
    );
    let entries = s.stopped_log();
    assert!(
        entries.iter().any(|e| e.flags & FLUSH != 0),
        "nbdcopy --flush flushes at the end: {:?}",
        heads(&entries)
    );
    let disk = s.disk();
    assert_files_equal(&src, &s.image);
    assert_same("the whole log", &replay(&vec![OLD; DISK], &entries), &disk);
}

#[test]
fn a_log_that_cannot_be_written_stops_logging_not_the_proxy() {
    let dir = TempDir::new().expect("tempdir");
    let image = dir.path().join("disk.img");
    write_sparse_file(&image, DISK as u64, &[(0, &vec![OLD; DISK])]);
    let qemu = QemuNbd::start("raw", &image, &[]);
    let log = dir.path().join("writes.log");
    // Files of this process may grow to 64 KiB: the second write does not
    // fit in the log (SIGXFSZ ignored, so the write fails with EFBIG).
    let control = dir.path().join("control.sock");
    let script = format!(
        "trap '' XFSZ; ulimit -f 128; exec {} proxy --upstream {} --log-writes {} --control {} \
         --run 'qemu-io -f raw -t writeback -c \"write -P 0x41 0 32768\" -c flush -c \"write -P \
         0x42 65536 65536\" -c flush -c \"read -P 0x42 65536 65536\" \"$uri\" && curl -s \
         --unix-socket {} http://nbdfault/metrics'",
        nbdfault_bin(),
        qemu.uri(),
        log.display(),
        control.display(),
        control.display()
    );
    let (status, out) = run_merged("sh", &["-c", &script], Duration::from_secs(30));
    assert!(status.success(), "{out}");
    assert!(
        out.contains("read 65536/65536 bytes at offset 65536"),
        "{out}"
    );
    assert!(
        out.contains(&format!("ERROR nbdfault::observe::logwrites: --log-writes {}: ", log.display()))
            && out.contains("logging stopped after 2 entries (the log is valid up to its last flush), the proxy goes on"),
        "{out}"
    );
    assert!(out.contains("\nnbdfault_log_writes_failed 1\n"), "{out}");
    assert!(
        out.contains("\nnbdfault_log_writes_entries_total 2\n"),
        "{out}"
    );
    let (_, entries) = parse(&std::fs::read(&log).expect("read the log"));
    assert_eq!(heads(&entries), [(0, 64, 0), (0, 0, FLUSH)]);
    drop(qemu);
}

#[test]
fn clients_that_honour_block_sizes_align_their_own_writes() {
    let mut s = Setup::new();
    // qemu-nbd allows bytes; through the proxy a sector is the least.
    let info = nbdinfo(&[s.nbdfault.uri()]);
    assert!(
        info.stdout.contains("block_size_minimum: 512"),
        "{}",
        info.describe()
    );
    // So QEMU reads the sector around these 100 bytes and writes it whole.
    s.qemu_io(
        &["write -P 0xcc 1 100", "read -P 0xcc 1 100"],
        "read 100/100 bytes at offset 1",
    );
    let entries = s.stopped_log();
    assert_eq!(
        heads(&entries),
        [(0, 1, 0), (0, 0, FLUSH), (0, 0, MARK)],
        "{entries:#?}"
    );
    let want = model(&[(1, 100, 0xcc)]);
    assert_same("the logged sector", &entries[0].data, &want[..512]);
    assert_same("the server's file", &s.disk(), &want);
    assert_same("the replay", &replay(&vec![OLD; DISK], &entries), &want);
}

#[test]
fn the_write_cache_and_the_log_are_refused_together() {
    let dir = TempDir::new().expect("tempdir");
    let log = dir.path().join("writes.log");
    let o = run_fail(
        nbdfault_bin(),
        &[
            "null",
            "--log-writes",
            log.to_str().unwrap(),
            "--write-cache",
            "volatile",
        ],
    );
    assert_eq!(
        o.stderr,
        "nbdfault: --log-writes records what reaches the server, and --write-cache volatile \
         answers writes in its place: use one or the other\n"
    );
    assert!(
        !log.exists(),
        "no log is made for a server that never starts"
    );
}

#[test]
fn a_write_answered_while_a_flush_is_in_flight_is_logged_after_it() {
    // The first flush is held 1 s on its way to the server; meanwhile a
    // write on another connection is answered. The flush does not cover
    // it (it completed after the flush was sent), so the log puts it after
    // the flush's entry, as the kernel's target does.
    let dir = TempDir::new().expect("tempdir");
    let rules = dir.path().join("rules.yaml");
    std::fs::write(
        &rules,
        "rules:\n  - name: slow\n    event: request\n    command: flush\n    times: 1\n    \
         action: delay\n    duration: 1s\n",
    )
    .expect("write rules");
    let mut s = Setup::with_args(&["--rules", rules.to_str().unwrap()]);
    nbdsh(
        s.nbdfault.uri(),
        "import time\n\
         h2 = nbd.NBD()\n\
         h2.connect_uri(sys.argv[1])\n\
         h.pwrite(b'\\x41' * 4096, 0)\n\
         c = h2.aio_flush()\n\
         time.sleep(0.3)\n\
         h.pwrite(b'\\x42' * 4096, 4096)\n\
         while not h2.aio_command_completed(c):\n    h2.poll(-1)\n\
         h.pwrite(b'\\x43' * 4096, 8192)\n\
         h.flush()\n",
    );
    let entries = s.stopped_log();
    assert_eq!(
        heads(&entries),
        [
            (0, 8, 0),
            (0, 0, FLUSH),
            (8, 8, 0),
            (16, 8, 0),
            (0, 0, FLUSH),
            (0, 0, MARK)
        ],
        "{entries:#?}"
    );
    let old = vec![OLD; DISK];
    assert_same(
        "replay to the first flush",
        &replay(&old, &entries[..2]),
        &model(&[(0, 4096, 0x41)]),
    );
    assert_same("the whole log", &replay(&old, &entries), &s.disk());
}

#[test]
fn a_qcow2_image_written_over_nbd_checks_clean_at_every_flush_of_its_log() {
    // What the log is for: QEMU's qcow2 driver writes an image through the
    // proxy (qemu-nbd exports the file's bytes raw), and the image rebuilt
    // from the log at each flush passes `qemu-img check`.
    let dir = TempDir::new().expect("tempdir");
    let image = dir.path().join("disk.qcow2");
    // The export cannot grow: every cluster is allocated up front.
    run_ok(
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "preallocation=metadata",
            image.to_str().unwrap(),
            "4M",
        ],
    );
    let original = std::fs::read(&image).expect("read the image");
    let qemu = QemuNbd::start("raw", &image, &[]);
    let log = dir.path().join("writes.log");
    let mut nbdfault = Nbdfault::proxy_with(&qemu.uri(), &["--log-writes", log.to_str().unwrap()]);
    run_ok(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-t",
            "writeback",
            "-c",
            "write -P 0x55 0 1M",
            "-c",
            "flush",
            "-c",
            "write -P 0x66 2M 1M",
            "-c",
            "flush",
            "-c",
            "write -P 0x77 512k 4k",
            nbdfault.uri(),
        ],
    );
    run_ok("kill", &["-TERM", &nbdfault.pid().to_string()]);
    assert!(nbdfault.wait_exit(Duration::from_secs(10)).is_some());
    let (_, entries) = parse(&std::fs::read(&log).expect("read the log"));
    let served = std::fs::read(&image).expect("read the image");
    let base = original;
    let points = flush_points(&entries);
    assert!(points.len() >= 3, "{:?}", heads(&entries));
    for end in points {
        let rebuilt = dir.path().join(format!("at-{end}.qcow2"));
        std::fs::write(&rebuilt, replay(&base, &entries[..end])).expect("write the replay");
        let o = run(
            "qemu-img",
            &["check", "-f", "qcow2", rebuilt.to_str().unwrap()],
        );
        assert!(
            o.success() && o.stdout.contains("No errors were found on the image."),
            "replay to entry {end}:\n{}",
            o.describe()
        );
    }
    assert_same("the whole log", &replay(&base, &entries), &served);
}
