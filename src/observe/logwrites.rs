//! `--log-writes FILE`: every write, write-zeroes, trim, flush and FUA that
//! reaches the server and succeeds, recorded in the dm-log-writes on-disk
//! format (the format of the kernel's `log-writes` target and of QEMU's
//! `blklogwrites` driver), so a replay tool can rebuild the disk at any
//! flush offline.
//!
//! It lives in `observe` because it is an observer: the proxy hands it what
//! it already passes on (a request's header when framed, its payload bytes
//! as they are handed to the server, the server's reply when framed), and
//! on the wire only the block sizes announced change ([`announce_block_size`])
//! and a request the log cannot hold is refused ([`unloggable`]), so that
//! the log has no holes. It holds a write's payload from its request
//! to its reply: a byte budget bounds that, and a connection whose write
//! does not fit waits ([`LogWrites::admit`]) rather than anything being
//! dropped. One thread writes the file; a write error there ends logging
//! (an ERROR line and `nbdfault_log_writes_failed`), never the proxy.
//!
//! The format: sector 0 is the superblock (magic, version, entry count,
//! sector size, little-endian); each entry is one sector (sector, sector
//! count, flags, data length) followed by its data sectors. Sectors are
//! [`SECTOR`] bytes here, and the entry count is rewritten after every
//! flush and FUA entry and at the end, so a log whose proxy was killed is
//! still readable up to its last flush.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};
use tracing::error;

use super::lock;
use crate::protocol::MessageMeta;
use crate::protocol::consts::*;

/// The log's sector size: every request must be aligned to it (the
/// kernel's target has the disk's logical block size; NBD allows bytes).
pub const SECTOR: u64 = 512;

/// Superblock magic and version, as the kernel's target writes them.
pub const MAGIC: u64 = 0x006a_7366_7773_6872;
pub const VERSION: u64 = 1;

/// Entry flags.
pub const FLAG_FLUSH: u64 = 1 << 0;
pub const FLAG_FUA: u64 = 1 << 1;
pub const FLAG_DISCARD: u64 = 1 << 2;
pub const FLAG_MARK: u64 = 1 << 3;

/// The mark a clean shutdown ends the log with (the kernel's name for it,
/// so tools that look for it find it).
pub const END_MARK: &str = "dm-log-writes-end";

/// Write data held at once, from request to log file: past this a write
/// waits for earlier ones to be written to the log.
pub const BUDGET: u64 = 64 << 20;

/// What one entry costs of the budget besides its data: its own sector,
/// so that data-less entries are bounded too.
const ENTRY_COST: u64 = SECTOR;

/// Whether `meta` is a request the log records.
fn logged(command: Option<u16>) -> bool {
    matches!(
        command,
        Some(CMD_WRITE | CMD_WRITE_ZEROES | CMD_TRIM | CMD_FLUSH)
    )
}

/// Why a request cannot be logged: it is not aligned to [`SECTOR`], or it
/// is a write larger than the [`BUDGET`] it would be held in. `None` for
/// requests that can.
pub fn unloggable(meta: &MessageMeta) -> Option<String> {
    if !matches!(meta.command, Some(CMD_WRITE | CMD_WRITE_ZEROES | CMD_TRIM)) {
        return None;
    }
    let (offset, length) = (meta.offset.unwrap_or(0), meta.length.unwrap_or(0));
    if offset % SECTOR != 0 || length % SECTOR != 0 {
        return Some(format!(
            "request at offset {offset} length {length} is not aligned to the \
             {SECTOR}-byte sectors of --log-writes"
        ));
    }
    if meta.command == Some(CMD_WRITE) && length > BUDGET {
        return Some(format!(
            "write of {length} bytes is larger than the {} MiB --log-writes holds at once",
            BUDGET >> 20
        ));
    }
    None
}

/// Raises the minimum block size of an NBD_INFO_BLOCK_SIZE reply (`msg`
/// starts with it, buffered whole) to [`SECTOR`], so that a client that
/// honours it (QEMU, libnbd) aligns its requests itself, as it would on
/// the kernel target's device; the maximum is lowered to [`BUDGET`], so it
/// splits what the log could not hold. Preferred and maximum follow the
/// minimum where they must (at least it, the maximum a multiple of it).
pub fn announce_block_size(meta: &MessageMeta, msg: &mut [u8]) {
    use crate::protocol::bytes::{be16, be32, put32};
    let h = OPTION_REPLY_HEADER_LEN;
    if meta.reply_type != Some(REP_INFO)
        || msg.len() < h + 14
        || be16(msg, h) != INFO_BLOCK_SIZE
        || be32(msg, 16) != 14
    {
        return;
    }
    let sector = SECTOR as u32;
    let min = be32(msg, h + 2).max(sector);
    let preferred = be32(msg, h + 6).max(min);
    // Nor more than the log holds at once.
    let max = be32(msg, h + 10).min(BUDGET as u32);
    let max = (max - max % min).max(min);
    put32(msg, h + 2, min);
    put32(msg, h + 6, preferred);
    put32(msg, h + 10, max);
}

/// What an entry carries after its sector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Data {
    None,
    Bytes(Vec<u8>),
    /// That many zero bytes (write-zeroes), left as a hole in the file.
    Zeroes(u64),
}

/// One log entry, in bytes (the writer turns them into sectors).
#[derive(Debug)]
pub struct Entry {
    pub offset: u64,
    pub length: u64,
    pub flags: u64,
    pub data: Data,
    /// Its share of the budget, given back once it is in the file.
    _permit: Option<OwnedSemaphorePermit>,
    /// Told once this entry (and the superblock after it) is written.
    done: Option<oneshot::Sender<()>>,
}

impl Entry {
    fn new(offset: u64, length: u64, flags: u64, data: Data) -> Self {
        Self {
            offset,
            length,
            flags,
            data,
            _permit: None,
            done: None,
        }
    }
}

/// The order entries go into the log, without I/O. Completion order, with
/// the kernel target's rule for flushes: a flush's entry comes after every
/// write completed before the flush was sent, and before every write
/// completed after that; a write completed while a flush is in flight
/// waits for that flush's entry. A FUA write bypasses the wait (it is on
/// the disk as it completes).
#[derive(Debug)]
pub struct Sequencer<T> {
    /// Writes completed so far (their sequence numbers).
    completed: u64,
    /// Flushes sent and not yet answered: token → writes completed when
    /// it was sent.
    flushes: BTreeMap<u64, u64>,
    next_token: u64,
    /// Completed writes not yet emitted, in completion order.
    waiting: VecDeque<(u64, T)>,
}

impl<T> Default for Sequencer<T> {
    fn default() -> Self {
        Self {
            completed: 0,
            flushes: BTreeMap::new(),
            next_token: 0,
            waiting: VecDeque::new(),
        }
    }
}

impl<T> Sequencer<T> {
    /// A flush was sent to the server: its token.
    pub fn flush_sent(&mut self) -> u64 {
        let token = self.next_token;
        self.next_token += 1;
        self.flushes.insert(token, self.completed);
        token
    }

    /// A write (zero, trim) completed: what may be emitted now, in order.
    pub fn completed(&mut self, item: T, fua: bool, out: &mut Vec<T>) {
        if fua {
            out.push(item);
            return;
        }
        self.waiting.push_back((self.completed, item));
        self.completed += 1;
        self.release(out);
    }

    /// A flush was answered (`flush`: its entry, when it succeeded) or
    /// abandoned (`None`): what may be emitted now, in order.
    pub fn flush_done(&mut self, token: u64, flush: Option<T>, out: &mut Vec<T>) {
        let Some(sent) = self.flushes.remove(&token) else {
            return;
        };
        if let Some(flush) = flush {
            while self.waiting.front().is_some_and(|(c, _)| *c < sent) {
                out.extend(self.waiting.pop_front().map(|(_, t)| t));
            }
            out.push(flush);
        }
        self.release(out);
    }

    /// Every write completed before the oldest flush in flight was sent
    /// goes before whichever flush is answered next: those are emitted.
    fn release(&mut self, out: &mut Vec<T>) {
        let oldest = self.flushes.values().min().copied().unwrap_or(u64::MAX);
        while self.waiting.front().is_some_and(|(c, _)| *c < oldest) {
            out.extend(self.waiting.pop_front().map(|(_, t)| t));
        }
    }

    /// The end: everything still waiting, in order.
    pub fn finish(&mut self, out: &mut Vec<T>) {
        self.flushes.clear();
        out.extend(self.waiting.drain(..).map(|(_, t)| t));
    }
}

/// What the writer thread is asked.
enum Job {
    Entry(Entry),
    /// Write what came before, the end mark and the superblock, then say so.
    Finish(std::sync::mpsc::SyncSender<()>),
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
struct Stats {
    entries: AtomicU64,
    bytes: AtomicU64,
    failed: AtomicBool,
}

/// The log of one server. See the module docs.
pub struct LogWrites {
    budget: Arc<Semaphore>,
    stats: Arc<Stats>,
    /// The order, and the queue to the writer (sent under the same lock,
    /// so the file has the order the sequencer decided).
    seq: Mutex<(Sequencer<Entry>, Option<mpsc::Sender<Job>>)>,
}

impl std::fmt::Debug for LogWrites {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogWrites").finish_non_exhaustive()
    }
}

impl LogWrites {
    /// Creates (or truncates) `path`, writes an empty log's superblock and
    /// starts the writer thread: errors here are startup errors.
    pub fn open(path: &Path) -> std::io::Result<Self> {
        let file = File::create(path)?;
        file.write_all_at(&superblock(0), 0)?;
        let stats = Arc::new(Stats::default());
        let (tx, rx) = mpsc::channel();
        let writer = Writer {
            file,
            pos: SECTOR,
            entries: 0,
            stats: stats.clone(),
            path: path.display().to_string(),
        };
        std::thread::Builder::new()
            .name("log-writes".into())
            .spawn(move || writer.run(rx))?;
        Ok(Self {
            budget: Arc::new(Semaphore::new(BUDGET as usize)),
            stats,
            seq: Mutex::new((Sequencer::default(), Some(tx))),
        })
    }

    /// Whether entries are still being written (a write error ends it).
    pub fn active(&self) -> bool {
        !self.stats.failed.load(Ordering::Relaxed)
    }

    /// What a request framed toward the server costs of the budget, if it
    /// is logged at all.
    pub fn cost(&self, meta: &MessageMeta) -> Option<u32> {
        if !self.active() || !logged(meta.command) || unloggable(meta).is_some() {
            return None;
        }
        let data = match meta.command {
            Some(CMD_WRITE) => meta.length.unwrap_or(0),
            _ => 0,
        };
        // Larger writes are refused (`unloggable`); capped all the same.
        Some(ENTRY_COST.saturating_add(data).min(BUDGET) as u32)
    }

    /// `cost` of the budget if it is free now.
    pub fn try_admit(self: &Arc<Self>, cost: u32) -> Option<OwnedSemaphorePermit> {
        self.budget.clone().try_acquire_many_owned(cost).ok()
    }

    /// Waits until `cost` fits in the budget: the connection whose write
    /// this is holds back meanwhile, nothing else does.
    pub async fn admit(self: &Arc<Self>, cost: u32) -> Option<OwnedSemaphorePermit> {
        self.budget.clone().acquire_many_owned(cost).await.ok()
    }

    /// Runs `f` on the sequencer and sends what it emits to the writer,
    /// under one lock (the order is the file's).
    fn sequence(&self, f: impl FnOnce(&mut Sequencer<Entry>, &mut Vec<Entry>)) {
        let mut out = Vec::new();
        let (seq, tx) = &mut *lock(&self.seq);
        f(seq, &mut out);
        send(tx, out);
    }

    /// Writes out everything, the end mark and the final superblock
    /// (clean shutdown), waiting at most a few seconds for the file.
    pub fn finish(&self) {
        let (done, wait) = mpsc::sync_channel(1);
        {
            let (seq, tx) = &mut *lock(&self.seq);
            let mut out = Vec::new();
            seq.finish(&mut out);
            send(tx, out);
            match tx.take() {
                Some(t) => {
                    let _ = t.send(Job::Finish(done));
                }
                None => return,
            }
        }
        let _ = wait.recv_timeout(std::time::Duration::from_secs(10));
    }

    /// Prometheus text for the log's metrics, appended to `/metrics`.
    pub fn render_metrics(&self) -> String {
        let s = &self.stats;
        #[rustfmt::skip]
        let metrics: [(&str, &str, &str, u64); 3] = [
            ("nbdfault_log_writes_entries_total", "counter", "Entries written to the --log-writes file.", s.entries.load(Ordering::Relaxed)),
            ("nbdfault_log_writes_bytes_total", "counter", "Write data written to the --log-writes file (zeroes included).", s.bytes.load(Ordering::Relaxed)),
            ("nbdfault_log_writes_failed", "gauge", "1 once writing the --log-writes file failed and logging stopped.", u64::from(s.failed.load(Ordering::Relaxed))),
        ];
        let mut out = String::new();
        for (name, kind, help, v) in metrics {
            out.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}\n\n"
            ));
        }
        out
    }
}

fn send(tx: &Option<mpsc::Sender<Job>>, entries: Vec<Entry>) {
    let Some(tx) = tx else {
        return;
    };
    for e in entries {
        // The writer is gone only after a finish: then nothing is logged.
        let _ = tx.send(Job::Entry(e));
    }
}

/// A request of one connection on its way: from its header to its reply.
#[derive(Debug)]
struct Pending {
    command: u16,
    offset: u64,
    length: u64,
    fua: bool,
    data: Vec<u8>,
    flush: Option<u64>,
    /// An error chunk came for it: it is not logged.
    failed: bool,
    permit: Option<OwnedSemaphorePermit>,
}

/// A write's payload being collected as it is handed to the server.
#[derive(Debug)]
struct Feed {
    cookie: u64,
    /// Header bytes still to pass.
    skip: u64,
    /// Payload bytes still to come.
    need: u64,
    pending: Pending,
}

/// One connection's part of the log: what it sent and awaits a reply for.
#[derive(Debug)]
pub struct ConnLog {
    log: Arc<LogWrites>,
    pending: Mutex<HashMap<u64, Pending>>,
}

impl ConnLog {
    pub fn new(log: Arc<LogWrites>) -> Self {
        Self {
            log,
            pending: Mutex::new(HashMap::new()),
        }
    }

    pub fn log(&self) -> &Arc<LogWrites> {
        &self.log
    }

    /// A request under `cookie` is handed to the server: its reply will
    /// say whether it is logged.
    fn insert(&self, cookie: u64, p: Pending) {
        lock(&self.pending).insert(cookie, p);
    }

    /// The request under `cookie` never reaches the server (a rule took
    /// it): no reply will come.
    pub fn forget(&self, cookie: u64) {
        let p = lock(&self.pending).remove(&cookie);
        if let Some(Pending { flush: Some(t), .. }) = p {
            self.log.sequence(|s, out| s.flush_done(t, None, out));
        }
    }

    /// A reply message from the server was framed: once it is the last of
    /// its request's and no error came, the request is logged. For a
    /// flush, the receiver says when its entry is in the file.
    pub fn reply(&self, meta: &MessageMeta) -> Option<oneshot::Receiver<()>> {
        let cookie = meta.cookie?;
        let error = meta.error.is_some_and(|e| e != 0)
            || meta
                .chunk_type
                .is_some_and(|t| t & REPLY_TYPE_FLAG_ERROR != 0);
        let p = {
            let mut pending = lock(&self.pending);
            if !meta.done {
                if error && let Some(p) = pending.get_mut(&cookie) {
                    p.failed = true;
                }
                return None;
            }
            pending.remove(&cookie)?
        };
        let ok = !error && !p.failed && self.log.active();
        let Pending {
            command,
            offset,
            length,
            fua,
            data,
            flush,
            permit,
            ..
        } = p;
        let fua_flag = if fua { FLAG_FUA } else { 0 };
        let (flags, data) = match command {
            CMD_WRITE => (fua_flag, Data::Bytes(data)),
            CMD_WRITE_ZEROES => (fua_flag, Data::Zeroes(length)),
            CMD_TRIM => (FLAG_DISCARD | fua_flag, Data::None),
            _ => (FLAG_FLUSH | fua_flag, Data::None),
        };
        let mut e = Entry {
            _permit: permit,
            ..Entry::new(offset, length, flags, data)
        };
        // A flush or FUA answered is in the log, with the entry count.
        let (tx, rx) = oneshot::channel();
        let durable = flush.is_some() || fua;
        if durable {
            e.done = Some(tx);
        }
        match flush {
            Some(t) if !ok => self.log.sequence(|s, out| s.flush_done(t, None, out)),
            Some(t) => {
                e.length = 0;
                self.log.sequence(|s, out| s.flush_done(t, Some(e), out));
            }
            None if ok => self.log.sequence(|s, out| s.completed(e, fua, out)),
            None => {}
        }
        (ok && durable).then_some(rx)
    }
}

impl Drop for ConnLog {
    /// The connection ended: its flushes in flight will never be answered.
    fn drop(&mut self) {
        let flushes: Vec<u64> = lock(&self.pending)
            .values()
            .filter_map(|p| p.flush)
            .collect();
        for t in flushes {
            self.log.sequence(|s, out| s.flush_done(t, None, out));
        }
    }
}

/// One flow's part (the to-server flow's): the write whose payload is
/// being handed to the server.
#[derive(Debug, Default)]
pub struct FlowLog {
    feed: Option<Feed>,
}

impl FlowLog {
    /// A request of `len` bytes was framed toward the server, `permit` its
    /// share of the budget (from [`LogWrites::admit`]).
    pub fn request(
        &mut self,
        conn: &ConnLog,
        meta: &MessageMeta,
        len: u64,
        permit: Option<OwnedSemaphorePermit>,
    ) {
        self.feed = None;
        let (Some(command), Some(cookie)) = (meta.command, meta.cookie) else {
            return;
        };
        if !logged(Some(command)) || !conn.log.active() || unloggable(meta).is_some() {
            return;
        }
        let length = meta.length.unwrap_or(0);
        let flush = (command == CMD_FLUSH).then(|| {
            let mut token = 0;
            conn.log.sequence(|s, _| token = s.flush_sent());
            token
        });
        let pending = Pending {
            command,
            offset: meta.offset.unwrap_or(0),
            length,
            fua: meta.flags.is_some_and(|f| f & CMD_FLAG_FUA != 0),
            data: Vec::new(),
            flush,
            failed: false,
            permit,
        };
        if command != CMD_WRITE || length == 0 {
            conn.insert(cookie, pending);
            return;
        }
        let Some(skip) = len.checked_sub(length) else {
            return;
        };
        let mut pending = pending;
        pending.data.reserve_exact(length.min(BUDGET) as usize);
        self.feed = Some(Feed {
            cookie,
            skip,
            need: length,
            pending,
        });
    }

    /// The request under `cookie` never reaches the server: its payload
    /// is not collected.
    pub fn forget(&mut self, cookie: u64) {
        if self.feed.as_ref().is_some_and(|f| f.cookie == cookie) {
            self.feed = None;
        }
    }

    /// `bytes` of the current message go to the server (or are set aside
    /// to go later): a write's payload is collected, and once whole the
    /// write awaits its reply.
    pub fn bytes(&mut self, conn: &ConnLog, mut b: &[u8]) {
        let Some(f) = &mut self.feed else {
            return;
        };
        let skip = (f.skip.min(b.len() as u64)) as usize;
        f.skip -= skip as u64;
        b = &b[skip..];
        let take = (f.need.min(b.len() as u64)) as usize;
        f.pending.data.extend_from_slice(&b[..take]);
        f.need -= take as u64;
        if f.need == 0
            && let Some(f) = self.feed.take()
        {
            conn.insert(f.cookie, f.pending);
        }
    }
}

/// The superblock of a log of `entries` entries, a whole sector.
fn superblock(entries: u64) -> Vec<u8> {
    let mut s = vec![0u8; SECTOR as usize];
    s[0..8].copy_from_slice(&MAGIC.to_le_bytes());
    s[8..16].copy_from_slice(&VERSION.to_le_bytes());
    s[16..24].copy_from_slice(&entries.to_le_bytes());
    s[24..28].copy_from_slice(&(SECTOR as u32).to_le_bytes());
    s
}

/// An entry's own sector.
fn entry_sector(sector: u64, sectors: u64, flags: u64, data_len: u64, mark: &[u8]) -> Vec<u8> {
    let mut s = vec![0u8; SECTOR as usize];
    s[0..8].copy_from_slice(&sector.to_le_bytes());
    s[8..16].copy_from_slice(&sectors.to_le_bytes());
    s[16..24].copy_from_slice(&flags.to_le_bytes());
    s[24..32].copy_from_slice(&data_len.to_le_bytes());
    let n = mark.len().min(SECTOR as usize - 32);
    s[32..32 + n].copy_from_slice(&mark[..n]);
    s
}

/// The thread writing the file, entry after entry at the end.
struct Writer {
    file: File,
    /// Where the next entry goes.
    pos: u64,
    entries: u64,
    stats: Arc<Stats>,
    path: String,
}

impl Writer {
    fn run(mut self, rx: mpsc::Receiver<Job>) {
        while let Ok(job) = rx.recv() {
            match job {
                Job::Entry(mut e) => {
                    if self.stats.failed.load(Ordering::Relaxed) {
                        continue;
                    }
                    let durable = e.flags & (FLAG_FLUSH | FLAG_FUA) != 0;
                    let r = self
                        .write(&e)
                        .and_then(|()| if durable { self.superblock() } else { Ok(()) });
                    self.check(r);
                    if let Some(done) = e.done.take() {
                        let _ = done.send(());
                    }
                }
                Job::Finish(done) => {
                    if !self.stats.failed.load(Ordering::Relaxed) {
                        let mark = Entry::new(0, 0, FLAG_MARK, Data::None);
                        let r = self
                            .write_mark(&mark, END_MARK.as_bytes())
                            .and_then(|()| self.superblock())
                            .and_then(|()| self.file.sync_all());
                        self.check(r);
                    }
                    let _ = done.send(());
                    return;
                }
            }
        }
    }

    fn check(&mut self, r: std::io::Result<()>) {
        if let Err(e) = r {
            self.stats.failed.store(true, Ordering::Relaxed);
            error!(
                "--log-writes {}: {e}; logging stopped after {} entries (the log is valid up to \
                 its last flush), the proxy goes on",
                self.path, self.entries
            );
        }
    }

    fn write(&mut self, e: &Entry) -> std::io::Result<()> {
        let sectors = e.length / SECTOR;
        let head = entry_sector(e.offset / SECTOR, sectors, e.flags, 0, &[]);
        let start = self.pos;
        self.file.write_all_at(&head, start)?;
        let data_at = start + SECTOR;
        let end = match &e.data {
            Data::None => data_at,
            Data::Bytes(b) => {
                self.file.write_all_at(b, data_at)?;
                data_at + b.len() as u64
            }
            Data::Zeroes(n) => {
                // A hole reads as zeroes: the file is only made long enough.
                let end = data_at + n;
                if self.file.metadata()?.len() < end {
                    self.file.set_len(end)?;
                }
                end
            }
        };
        self.pos = end;
        self.entries += 1;
        let s = &self.stats;
        s.entries.fetch_add(1, Ordering::Relaxed);
        s.bytes.fetch_add(end - data_at, Ordering::Relaxed);
        Ok(())
    }

    fn write_mark(&mut self, e: &Entry, mark: &[u8]) -> std::io::Result<()> {
        let head = entry_sector(0, 0, e.flags, mark.len() as u64, mark);
        self.file.write_all_at(&head, self.pos)?;
        self.pos += SECTOR;
        self.entries += 1;
        self.stats.entries.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn superblock(&mut self) -> std::io::Result<()> {
        self.file.write_all_at(&superblock(self.entries), 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Events of one run: W(n) completes write n, F(n) sends flush n,
    /// D(n) answers flush n, A(n) abandons it.
    #[derive(Debug, Clone, Copy)]
    enum Ev {
        W(u32),
        Fua(u32),
        F(u32),
        D(u32),
        A(u32),
    }

    fn run(events: &[Ev]) -> Vec<String> {
        let mut s = Sequencer::default();
        let mut tokens = HashMap::new();
        let mut out = Vec::new();
        for e in events {
            match *e {
                Ev::W(n) => s.completed(format!("w{n}"), false, &mut out),
                Ev::Fua(n) => s.completed(format!("fua{n}"), true, &mut out),
                Ev::F(n) => {
                    tokens.insert(n, s.flush_sent());
                }
                Ev::D(n) => s.flush_done(tokens[&n], Some(format!("f{n}")), &mut out),
                Ev::A(n) => s.flush_done(tokens[&n], None, &mut out),
            }
        }
        s.finish(&mut out);
        out
    }

    #[test]
    fn writes_are_logged_in_completion_order() {
        use Ev::*;
        assert_eq!(run(&[W(3), W(1), W(2)]), ["w3", "w1", "w2"]);
    }

    #[test]
    fn a_write_completed_during_a_flush_goes_after_it() {
        use Ev::*;
        // The kernel's example: W1,W2,W3,C3,C2,Wflush,C1,Cflush → 3,2,flush,1.
        assert_eq!(
            run(&[W(3), W(2), F(1), W(1), D(1)]),
            ["w3", "w2", "f1", "w1"]
        );
        // A FUA write is on the disk as it completes.
        assert_eq!(
            run(&[W(1), F(1), W(2), Fua(3), D(1)]),
            ["w1", "fua3", "f1", "w2"]
        );
    }

    #[test]
    fn a_failed_or_abandoned_flush_releases_what_waited() {
        use Ev::*;
        assert_eq!(run(&[F(1), W(1), A(1), W(2)]), ["w1", "w2"]);
    }

    #[test]
    fn overlapping_flushes_cover_what_completed_before_each() {
        use Ev::*;
        // Flush 2 answered first covers w1 (completed before flush 2 was
        // sent) too: a flush covers every write completed before it.
        assert_eq!(
            run(&[F(1), W(1), F(2), W(2), D(2), D(1)]),
            ["w1", "f2", "f1", "w2"]
        );
    }

    #[test]
    fn the_minimum_block_size_is_raised_to_a_sector() {
        let info = |min: u32, pref: u32, max: u32| {
            let mut m = crate::protocol::handshake::build_option_reply(
                OPT_GO,
                REP_INFO,
                &[
                    &INFO_BLOCK_SIZE.to_be_bytes(),
                    &min.to_be_bytes(),
                    &pref.to_be_bytes(),
                    &max.to_be_bytes(),
                ],
            );
            let meta = MessageMeta {
                reply_type: Some(REP_INFO),
                ..MessageMeta::default()
            };
            announce_block_size(&meta, &mut m);
            let h = OPTION_REPLY_HEADER_LEN;
            let be = |at| u32::from_be_bytes(m[h + at..h + at + 4].try_into().unwrap());
            (be(2), be(6), be(10))
        };
        // qemu-nbd on a raw file: bytes.
        assert_eq!(info(1, 4096, 32 << 20), (512, 4096, 32 << 20));
        assert_eq!(info(1, 1, 1000), (512, 512, 512));
        assert_eq!(info(4096, 4096, u32::MAX), (4096, 4096, 64 << 20));
    }

    #[test]
    fn unloggable_requests_are_named() {
        let meta = |command, offset, length| MessageMeta {
            command: Some(command),
            offset: Some(offset),
            length: Some(length),
            ..MessageMeta::default()
        };
        assert!(unloggable(&meta(CMD_WRITE, 512, 4096)).is_none());
        assert!(unloggable(&meta(CMD_FLUSH, 0, 0)).is_none());
        assert!(unloggable(&meta(CMD_READ, 1, 1)).is_none());
        let why = unloggable(&meta(CMD_TRIM, 100, 512)).unwrap();
        assert_eq!(
            why,
            "request at offset 100 length 512 is not aligned to the 512-byte sectors of \
             --log-writes"
        );
        assert!(unloggable(&meta(CMD_WRITE_ZEROES, 0, 100)).is_some());
        assert!(unloggable(&meta(CMD_WRITE_ZEROES, 0, 1 << 30)).is_none());
        assert_eq!(
            unloggable(&meta(CMD_WRITE, 0, 128 << 20)).unwrap(),
            "write of 134217728 bytes is larger than the 64 MiB --log-writes holds at once"
        );
    }
}
