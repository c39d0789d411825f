//! `--write-cache volatile`: a disk's volatile write cache in front of the
//! server, so a power loss can lose exactly what the NBD spec lets a server
//! lose ("Ordering of messages and writes"): a WRITE, WRITE_ZEROES or TRIM
//! that was answered, until a FLUSH covering it has been answered; never
//! one sent with FUA once answered.
//!
//! One [`ExportCache`] per export, shared by every client connection to it
//! (so a flush on one connection covers writes answered on another, as
//! CAN_MULTI_CONN requires). It holds the ordered log ([`model`]) and its
//! own NBD connection to the upstream (`client`), over which everything
//! cached is written back in order. A client connection's to-server flow
//! hands it the requests it takes ([`ExportCache::claim`]): writes, zeroes
//! and trims are answered once held; FLUSH once everything was written back
//! and flushed upstream; a FUA command once it was, like a flush; a READ
//! that touches cached data from the upstream's data with the cache laid
//! over it. Everything else, and every read elsewhere, keeps the proxy's
//! own path (and its splice fast path). Besides at FLUSH and FUA, the
//! oldest writes go back early when the cache is full, and, with
//! [`WriteBack::Background`], once an eighth of it is held. With the mode
//! off none of this exists: a connection's [`Slot`] stays empty.

mod client;
pub mod model;

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};

use bytes::Bytes;
use tracing::{info, warn};

use crate::intercept::{ConnId, Event, PowerLoss};
use crate::io::net::Stream;
use crate::io::pages::BUDGET;
use crate::protocol::bytes::{be16, put16};
use crate::protocol::consts::*;
use crate::protocol::transmission::{Reply, ReplyMode, build_error_reply};
use crate::protocol::{EventKind, MessageMeta};
use client::{Client, ClientError};
use model::{Entry, Model, Op};

/// `--cache-size` unless given: a large disk's cache.
pub const DEFAULT_CACHE_SIZE: u64 = 256 << 20;

/// The largest write the cache holds, and the largest read it answers from
/// the server's data with its own laid over: a larger one (which a client
/// may send when the proxy has no `--max-payload`) goes the proxy's own
/// way, after the cached data it touches was written back, so no client
/// can make the cache buffer more than this for one request. QEMU and the
/// kernel send at most 32 MiB, the NBD spec's usual maximum block size.
pub const MAX_CACHED_REQUEST: u64 = 32 << 20;

/// What a write-back run takes at most before it lets go of the cache's
/// connection, so a read or a flush waiting for it waits only that long.
const WRITE_BACK_BATCH: u64 = 8 << 20;

/// When the cache writes back, besides at FLUSH and FUA (`--write-back`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum WriteBack {
    /// Once more than an eighth of `--cache-size` is held, the oldest
    /// writes go to the server in the background, down to an eighth, as a
    /// disk's cache does; a writer waits only when the cache is full.
    /// Up to an eighth, what a power loss takes is exactly what was
    /// answered since the last flush; above it, also what the background
    /// had not reached yet, which depends on timing.
    #[default]
    Background,
    /// Only a full cache writes back early (in the writer's time): what a
    /// power loss takes repeats exactly from run to run, at any size, at
    /// the cost of speed (`nbdfault sweep` uses this).
    WhenFull,
}

/// `--write-cache volatile`'s settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheConfig {
    /// `--cache-size`: what is held per export at most (write data, and a
    /// little for each cached command: [`model::ENTRY_COST`]).
    pub limit: u64,
    pub write_back: WriteBack,
}

impl CacheConfig {
    /// The default cache with `write_back`.
    pub fn new(limit: u64, write_back: WriteBack) -> Self {
        Self { limit, write_back }
    }

    /// Where background write-back starts, and down to where it goes.
    fn background_mark(&self) -> Option<u64> {
        (self.write_back == WriteBack::Background).then_some(self.limit / 8)
    }

    /// The largest request of `command` the cache takes: a write must fit
    /// in it too.
    fn max_request(&self, command: u16) -> u64 {
        match command {
            CMD_WRITE => self.limit.min(MAX_CACHED_REQUEST),
            _ => MAX_CACHED_REQUEST,
        }
    }
}

/// Fault log target (as `proxy::FAULT_LOG`, which sits above this module).
const FAULT_LOG: &str = "nbdfault::fault";

/// Opens a fresh connection to the upstream (a socket, or a null server).
pub type Opener =
    Arc<dyn Fn() -> Pin<Box<dyn Future<Output = std::io::Result<Stream>> + Send>> + Send + Sync>;

/// A client connection as a power loss sees it: something to reset.
pub trait Member: Send + Sync {
    /// Closes both sides with a TCP reset, now.
    fn power_cut(&self);
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
struct Stats {
    writebacks: AtomicU64,
    writeback_bytes: AtomicU64,
    zero_copy_bytes: AtomicU64,
    losses: AtomicU64,
    lost_writes: AtomicU64,
    lost_bytes: AtomicU64,
}

/// What every export's cache shares.
struct Shared {
    config: CacheConfig,
    opener: Opener,
    stats: Stats,
    /// After a power loss the export stays without power: see
    /// [`WriteCache::power_stays_off`].
    stays_off: AtomicBool,
}

/// The server's volatile write cache: one [`ExportCache`] per export name.
pub struct WriteCache {
    shared: Arc<Shared>,
    exports: Mutex<HashMap<String, Arc<ExportCache>>>,
}

impl WriteCache {
    /// A cache as `config` says, writing back over connections from
    /// `opener`.
    pub fn new(config: CacheConfig, opener: Opener) -> Self {
        Self {
            shared: Arc::new(Shared {
                config,
                opener,
                stats: Stats::default(),
                stays_off: AtomicBool::new(false),
            }),
            exports: Mutex::new(HashMap::new()),
        }
    }

    /// From now on a power loss leaves its export off, as a crashed
    /// machine leaves its disk: every later write, write-zeroes, trim and
    /// flush is answered EIO and never reaches the server. (`nbdfault
    /// sweep` needs it: a client that reconnects after the crash, as
    /// QEMU's NBD driver does, resending what was in flight, would
    /// otherwise write on a disk its crashed machine can no longer reach.)
    pub fn power_stays_off(&self) {
        self.shared.stays_off.store(true, Ordering::SeqCst);
    }

    /// The cache of export `name`, made on first use.
    pub fn export(&self, name: &str) -> Arc<ExportCache> {
        lock(&self.exports)
            .entry(name.to_string())
            .or_insert_with(|| {
                Arc::new(ExportCache {
                    name: name.to_string(),
                    shared: self.shared.clone(),
                    model: Mutex::new(Model::default()),
                    off: AtomicBool::new(false),
                    upstream: tokio::sync::Mutex::new(None),
                    members: Mutex::new(Vec::new()),
                    epoch: AtomicU64::new(0),
                    landed_after_loss: Mutex::new(Vec::new()),
                    writer: AtomicBool::new(false),
                    wake: tokio::sync::Notify::new(),
                })
            })
            .clone()
    }

    /// A power loss on every export (the control API's `POST /power-loss`).
    pub async fn power_loss(&self, mode: PowerLoss) -> Loss {
        let all: Vec<Arc<ExportCache>> = lock(&self.exports).values().cloned().collect();
        let mut total = Loss::default();
        for e in all {
            let l = e.power_loss(mode).await;
            total.writes += l.writes;
            total.bytes += l.bytes;
            total.kept += l.kept;
            total.connections += l.connections;
        }
        total
    }

    /// Prometheus text for the cache's metrics, appended to `/metrics`.
    pub fn render_metrics(&self) -> String {
        let held: u64 = lock(&self.exports)
            .values()
            .map(|e| lock(&e.model).bytes())
            .sum();
        let s = &self.shared.stats;
        let mut out = String::new();
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        // Name, type, help, value: one line each.
        #[rustfmt::skip]
        let metrics: [(&str, &str, &str, u64); 8] = [
            ("nbdfault_cache_bytes", "gauge", "Write data held in the volatile write cache, not yet written back.", held),
            ("nbdfault_cache_writebacks_total", "counter", "Cached commands written back to the server.", get(&s.writebacks)),
            ("nbdfault_cache_writeback_bytes_total", "counter", "Bytes of write data written back to the server.", get(&s.writeback_bytes)),
            ("nbdfault_cache_zero_copy_bytes_total", "counter", "Bytes of write data sent to the server without a copy (vmsplice, over a unix socket).", get(&s.zero_copy_bytes)),
            ("nbdfault_cache_zero_copy_quarantined_bytes", "gauge", "Write data sent without a copy on a connection that failed before the server answered it, held for good since the server may still read it (this process).", BUDGET.quarantined()),
            ("nbdfault_power_losses_total", "counter", "Power losses carried out.", get(&s.losses)),
            ("nbdfault_power_loss_lost_writes_total", "counter", "Cached commands a power loss took (before any reached the server partly or whole).", get(&s.lost_writes)),
            ("nbdfault_power_loss_lost_bytes_total", "counter", "Bytes of write data a power loss took.", get(&s.lost_bytes)),
        ];
        for (name, kind, help, v) in metrics {
            out.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}\n\n"
            ));
        }
        out
    }
}

/// What one connection knows of the cache: nothing with the mode off.
#[derive(Default)]
pub struct Slot {
    cache: OnceLock<Arc<WriteCache>>,
    export: OnceLock<Arc<ExportCache>>,
    /// A write went to the server on this connection, not through the
    /// cache, since this connection's last flush ([`Slot::bypassed`]).
    bypass: AtomicBool,
}

impl Slot {
    pub fn set(&self, cache: Arc<WriteCache>) {
        let _ = self.cache.set(cache);
    }

    /// Whether the mode is on.
    pub fn is_on(&self) -> bool {
        self.cache.get().is_some()
    }

    /// A write, write-zeroes or trim of this connection goes to the server
    /// its own way (a rule acted on it, or it is too large to cache): its
    /// next FLUSH must reach the server on this connection too, since a
    /// flush on the cache's connection covers it only where the server's
    /// flushes cover every connection.
    pub fn bypassed(&self) {
        self.bypass.store(true, Ordering::Relaxed);
    }

    /// The export's cache, joined on first use (the first request): from
    /// then on a power loss resets this connection too.
    pub fn export(
        &self,
        id: ConnId,
        member: impl FnOnce() -> Weak<dyn Member>,
        name: impl FnOnce() -> String,
    ) -> Option<&Arc<ExportCache>> {
        let cache = self.cache.get()?;
        Some(self.export.get_or_init(|| {
            let e = cache.export(&name());
            let mut members = lock(&e.members);
            members.retain(|(_, m)| m.strong_count() > 0);
            members.push((id, member()));
            drop(members);
            e
        }))
    }
}

/// Sets SEND_FLUSH and SEND_FUA in the transmission flags of a message
/// that announces the export (`msg` starts with it; the session framed it
/// only once they were buffered): a client must know it may flush, or it
/// would take every answered write as durable. CAN_MULTI_CONN stays the
/// server's: the cache keeps its promise for cached writes, and the server
/// must for the rest.
pub fn announce_flags(meta: &MessageMeta, msg: &mut [u8]) {
    if meta.export_size.is_none() {
        return;
    }
    let at = match (meta.option, meta.reply_type) {
        // NBD_OPT_EXPORT_NAME's reply: size, flags.
        (Some(OPT_EXPORT_NAME), None) => 8,
        // NBD_REP_INFO header, NBD_INFO_EXPORT, size, flags.
        (_, Some(REP_INFO)) => OPTION_REPLY_HEADER_LEN + 10,
        // The oldstyle greeting: magics, size, 32-bit flags.
        (None, None) => 26,
        _ => return,
    };
    if msg.len() >= at + 2 {
        let flags = be16(msg, at) | FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_FUA;
        put16(msg, at, flags);
    }
}

/// The verdict for a request the cache took: swallow it whole; the
/// cache's answer is sent once it is in.
pub fn taken() -> crate::intercept::Fault {
    crate::intercept::Fault {
        rule: "--write-cache".into(),
        action: "cache",
        plan: crate::intercept::Plan::Discard {
            keep: 0,
            answer: None,
        },
    }
}

/// What a power loss did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Loss {
    /// Cached commands lost (wholly or, torn, partly).
    pub writes: u64,
    /// Bytes of write data among them.
    pub bytes: u64,
    /// Pieces of them that reached the server after all: those in flight
    /// to it at the loss, and what `lose: some` lets through.
    pub kept: u64,
    /// Client connections reset.
    pub connections: u64,
}

/// The volatile write cache of one export. See the module docs.
pub struct ExportCache {
    name: String,
    shared: Arc<Shared>,
    model: Mutex<Model>,
    /// Without power since a loss (with [`WriteCache::power_stays_off`]).
    off: AtomicBool,
    /// The cache's connection to the upstream, made on first need; `None`
    /// also while a request is on it, so one cut short (its task aborted
    /// by a power loss) leaves no half-used connection behind.
    upstream: tokio::sync::Mutex<Option<Client>>,
    members: Mutex<Vec<(ConnId, Weak<dyn Member>)>>,
    /// Bumped by every power loss: a write-back in progress stops.
    epoch: AtomicU64,
    /// Entries a power loss took that reached the server all the same
    /// (in flight at the loss), by sequence number: at most a write-back
    /// window's worth, until that loss counts them.
    landed_after_loss: Mutex<Vec<u64>>,
    /// Whether the background writer ([`ExportCache::background`]) was
    /// started, and what wakes it.
    writer: AtomicBool,
    wake: tokio::sync::Notify,
}

/// A request taken by the cache: its header, then its payload as the flow
/// swallows it, then [`Intake::answer`].
pub struct Intake {
    cache: Arc<ExportCache>,
    command: u16,
    flags: u16,
    cookie: u64,
    offset: u64,
    length: u64,
    mode: ReplyMode,
    /// Header bytes still to be swallowed.
    skip: u64,
    /// Payload bytes still to come.
    need: u64,
    data: Vec<u8>,
}

impl Intake {
    /// Takes swallowed bytes of the request; true once it is complete.
    pub fn feed(&mut self, mut b: &[u8]) -> bool {
        let skip = (self.skip as usize).min(b.len());
        self.skip -= skip as u64;
        b = &b[skip..];
        let take = (self.need as usize).min(b.len());
        self.data.extend_from_slice(&b[..take]);
        self.need -= take as u64;
        self.complete()
    }

    /// Payload bytes still to come once the header is all in: what the
    /// flow may read straight into it ([`Intake::read_from`]).
    pub fn wants(&self) -> u64 {
        if self.skip == 0 { self.need } else { 0 }
    }

    /// Reads up to [`Intake::wants`] bytes of payload from `src` straight
    /// into the cache's buffer (a copy fewer than through the flow's): the
    /// bytes read, none at end of stream.
    pub async fn read_from<R: tokio::io::AsyncRead + Unpin>(
        &mut self,
        src: &mut R,
    ) -> std::io::Result<&[u8]> {
        use bytes::BufMut;
        use tokio::io::AsyncReadExt;
        let start = self.data.len();
        let want = self.wants() as usize;
        let n = src.read_buf(&mut (&mut self.data).limit(want)).await?;
        self.need -= n as u64;
        Ok(&self.data[start..])
    }

    /// Whether the whole request is in.
    pub fn complete(&self) -> bool {
        self.skip == 0 && self.need == 0
    }

    /// Carries the request out and makes the client's answer.
    pub async fn answer(mut self) -> Vec<u8> {
        let data = std::mem::take(&mut self.data);
        let c = &self.cache;
        let fua = self.flags & CMD_FLAG_FUA != 0;
        let op = match self.command {
            CMD_WRITE => Some(Op::Write(Bytes::from(data))),
            CMD_WRITE_ZEROES => Some(Op::Zero(self.flags)),
            CMD_TRIM => Some(Op::Trim),
            _ => None,
        };
        let off = c.off.load(Ordering::SeqCst);
        let done = match (self.command, op) {
            (CMD_FLUSH, _) | (_, Some(_)) if off => Err(ClientError::PowerOff),
            (_, Some(op)) => match c.admit(self.offset, self.length, op).await {
                // FUA: written back with everything before it, so no older
                // cached write can land over it later.
                Ok(()) if fua => c.flush().await,
                Ok(()) => {
                    c.pushed();
                    Ok(())
                }
                Err(e) => Err(e),
            },
            (CMD_FLUSH, None) => c.flush().await,
            (CMD_READ, None) => match c.read(self.offset, self.length).await {
                Ok(data) => return read_reply(self.mode, self.cookie, self.offset, &data),
                Err(e) => Err(e),
            },
            _ => Err(ClientError::Protocol("not a cached command".into())),
        };
        match done {
            Ok(()) => ok_reply(self.mode, self.cookie),
            Err(e) => {
                warn!(export = %c.name, "write cache: {e}; answering the request with an error");
                let msg = e.to_string();
                let mut buf = vec![0u8; 32 + 6 + msg.len().min(4096)];
                let n = build_error_reply(
                    self.mode,
                    self.cookie,
                    self.offset,
                    e.errno(),
                    &msg,
                    &mut buf,
                );
                buf.truncate(n);
                buf
            }
        }
    }
}

fn ok_reply(mode: ReplyMode, cookie: u64) -> Vec<u8> {
    let mut b = [0u8; EXTENDED_REPLY_LEN];
    let n = match mode {
        ReplyMode::Simple => Reply::Simple { error: 0, cookie }.build(&mut b),
        _ => mode
            .chunk(REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, 0, 0)
            .build(&mut b),
    };
    b[..n].to_vec()
}

fn read_reply(mode: ReplyMode, cookie: u64, offset: u64, data: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; EXTENDED_REPLY_LEN + 8 + data.len()];
    let n = match mode {
        ReplyMode::Simple => Reply::Simple { error: 0, cookie }.build(&mut out),
        _ => {
            let len = 8 + data.len() as u64;
            let h = mode
                .chunk(REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, cookie, offset, len)
                .build(&mut out);
            out[h..h + 8].copy_from_slice(&offset.to_be_bytes());
            h + 8
        }
    };
    out[n..n + data.len()].copy_from_slice(data);
    out.truncate(n + data.len());
    out
}

impl ExportCache {
    /// Offered a request the rules let through: takes it (then the flow
    /// swallows it and sends [`Intake::answer`]) or leaves it to the
    /// proxy's path. A BLOCK_STATUS over cached data goes on only after
    /// that data was written back, so the server never reports as a hole
    /// what the client wrote.
    pub async fn claim(self: &Arc<Self>, ev: &Event, slot: &Slot) -> Option<Intake> {
        if !ev.kinds.contains(EventKind::Request) {
            return None;
        }
        let m = &ev.meta;
        let (command, offset, length) = (m.command?, m.offset?, m.length?);
        let big = length > self.shared.config.max_request(command);
        let take = match command {
            CMD_WRITE | CMD_READ if big => {
                if command == CMD_WRITE {
                    slot.bypassed();
                }
                self.write_back_under(offset, length, "a request too large to cache")
                    .await;
                false
            }
            // After a write that went its own way: everything cached is
            // written back and flushed, then the FLUSH goes on to the
            // server on this connection (unless the write-back failed:
            // then the cache answers it, with the error).
            CMD_FLUSH if slot.bypass.swap(false, Ordering::Relaxed) => {
                let off = self.off.load(Ordering::SeqCst);
                off || self.flush().await.is_err()
            }
            CMD_WRITE | CMD_WRITE_ZEROES | CMD_TRIM | CMD_FLUSH => true,
            CMD_READ => lock(&self.model).overlaps(offset, length),
            CMD_BLOCK_STATUS => {
                self.write_back_under(offset, length, "a block status")
                    .await;
                false
            }
            _ => false,
        };
        take.then(|| Intake {
            cache: self.clone(),
            command,
            flags: m.flags.unwrap_or(0),
            cookie: m.cookie.unwrap_or(0),
            offset,
            length,
            mode: ev.mode,
            skip: ev.size,
            need: if command == CMD_WRITE { length } else { 0 },
            // At most `max_request`: a larger write is not taken.
            data: Vec::with_capacity(if command == CMD_WRITE {
                length as usize
            } else {
                0
            }),
        })
    }

    /// Before a request that goes the proxy's own way: the cached data it
    /// touches, written back (with everything older), so the server never
    /// answers it from older data.
    async fn write_back_under(&self, offset: u64, length: u64, what: &str) {
        if lock(&self.model).overlaps(offset, length)
            && let Err(e) = self.write_back_all(false).await
        {
            warn!(export = %self.name, "write cache: {e} (before {what})");
        }
    }

    async fn connect(&self) -> Result<Client, ClientError> {
        let stream = (self.shared.opener)().await?;
        Client::handshake(stream, &self.name).await
    }

    /// Writes back `batch` (oldest first) on the cache's connection, each
    /// forgotten once the server answered it and everything before it.
    /// Up to [`WRITE_BACK_WINDOW`] requests are in flight at once, none
    /// overlapping another (the server may carry out requests in flight in
    /// any order; overlapping ones must land in the order they came).
    /// Stops early, without error, when a power loss took the log
    /// meanwhile (what is in flight then still lands, as on a disk).
    async fn write_back(
        &self,
        up: &mut Option<Client>,
        batch: Vec<Entry>,
        then_flush: bool,
    ) -> Result<(), ClientError> {
        if batch.is_empty() && !then_flush {
            return Ok(());
        }
        let epoch = self.epoch.load(Ordering::SeqCst);
        let mut c = match up.take() {
            Some(c) => c,
            None => self.connect().await?,
        };
        let mut flight = InFlight::default();
        let sent = self
            .send_batch(&mut c, &mut flight, batch, then_flush, epoch)
            .await;
        // The server's error answer is not a broken connection: once the
        // rest in flight is answered too, it serves the next write-back
        // (reconnecting per failed write floods a failing server).
        if sent.as_ref().err().is_none_or(ClientError::is_answer) {
            while flight.pending() {
                if let Err(e) = self.land(&mut c, &mut flight).await
                    && !e.is_answer()
                {
                    return sent;
                }
            }
            self.put_back(up, c);
        }
        sent
    }

    /// [`ExportCache::write_back`]'s requests on `c`: returns at the first
    /// error, with `flight` holding what is still unanswered.
    async fn send_batch(
        &self,
        c: &mut Client,
        flight: &mut InFlight,
        batch: Vec<Entry>,
        then_flush: bool,
        epoch: u64,
    ) -> Result<(), ClientError> {
        for e in batch {
            if self.epoch.load(Ordering::SeqCst) != epoch {
                break;
            }
            while flight.full() || flight.overlaps(&e) {
                self.land(c, flight).await?;
            }
            let none = Bytes::new();
            let (command, flags, data) = match &e.op {
                Op::Write(d) => (CMD_WRITE, 0, d),
                Op::Zero(f) => (CMD_WRITE_ZEROES, *f, &none),
                Op::Trim => (CMD_TRIM, 0, &none),
            };
            match c.start(command, flags, e.offset, e.len, data).await? {
                Some(cookie) => flight.push(cookie, e),
                None => {
                    // Not one request here (zeroes written as data, a
                    // trim the server cannot do): alone, in order.
                    while !flight.is_empty() {
                        self.land(c, flight).await?;
                    }
                    write_entry(c, &e).await?;
                    self.forget(&e);
                }
            }
        }
        while !flight.is_empty() {
            self.land(c, flight).await?;
        }
        if then_flush && self.epoch.load(Ordering::SeqCst) == epoch {
            c.flush().await?;
        }
        Ok(())
    }

    /// The cache's connection, back for the next user, its zero-copy bytes
    /// counted.
    fn put_back(&self, up: &mut Option<Client>, mut c: Client) {
        let n = c.take_zero_copied();
        self.shared
            .stats
            .zero_copy_bytes
            .fetch_add(n, Ordering::Relaxed);
        *up = Some(c);
    }

    /// Reads one write-back reply; forgets the entries answered so far
    /// with everything before them.
    async fn land(&self, c: &mut Client, flight: &mut InFlight) -> Result<(), ClientError> {
        let (cookie, error) = c.answer().await?;
        for e in flight.answered(cookie, error == 0)? {
            self.forget(&e);
        }
        match error {
            0 => Ok(()),
            e => Err(ClientError::Server(e)),
        }
    }

    /// `e` reached the server.
    fn forget(&self, e: &Entry) {
        if !lock(&self.model).written(e.seq) {
            lock(&self.landed_after_loss).push(e.seq);
        }
        let s = &self.shared.stats;
        s.writebacks.fetch_add(1, Ordering::Relaxed);
        if matches!(e.op, Op::Write(_)) {
            s.writeback_bytes.fetch_add(e.len, Ordering::Relaxed);
        }
    }

    /// Everything cached now, written back (and, with `then_flush`,
    /// flushed upstream).
    async fn write_back_all(&self, then_flush: bool) -> Result<(), ClientError> {
        let mut up = self.upstream.lock().await;
        let batch = {
            let m = lock(&self.model);
            m.last_seq().map(|s| m.through(s)).unwrap_or_default()
        };
        self.write_back(&mut up, batch, then_flush).await
    }

    /// What a FLUSH (or a FUA command) waits for.
    async fn flush(&self) -> Result<(), ClientError> {
        self.write_back_all(true).await
    }

    /// Caches a command once it fits in `--cache-size`: until then the
    /// oldest cached writes go to the server early, as a full disk cache's
    /// do (they are then no longer losable), in the writer's time. If that
    /// write-back fails, the command is not cached and is answered with the
    /// error, so a failing server never makes the cache hold more.
    async fn admit(&self, offset: u64, length: u64, mut op: Op) -> Result<(), ClientError> {
        let limit = self.shared.config.limit;
        loop {
            let cost = match lock(&self.model).push_within(limit, offset, length, op) {
                Ok(_) => return Ok(()),
                Err((back, cost)) => {
                    op = back;
                    cost
                }
            };
            // Toward 7/8 of the limit, not just under it: a batch big
            // enough to keep the write-back window full, rather than one
            // write per write that arrives. Each round writes back at
            // least one entry (held is over the mark) or fails.
            self.write_back_toward(limit.saturating_sub(cost).min(limit - limit / 8))
                .await?;
        }
    }

    /// After a command was cached: over the background mark, the
    /// background writer is woken.
    fn pushed(self: &Arc<Self>) {
        let held = lock(&self.model).held();
        if let Some(mark) = self.shared.config.background_mark()
            && held > mark
        {
            if !self.writer.swap(true, Ordering::SeqCst) {
                tokio::spawn(self.clone().background(mark));
            }
            self.wake.notify_one();
        }
    }

    /// One batch (at most [`WRITE_BACK_BATCH`]) of the oldest cached
    /// writes, written back toward `mark` held; the cache's connection is
    /// let go after it.
    async fn write_back_toward(&self, mark: u64) -> Result<(), ClientError> {
        let mut up = self.upstream.lock().await;
        let batch = lock(&self.model).over(mark, WRITE_BACK_BATCH);
        self.write_back(&mut up, batch, false).await
    }

    /// The background writer of [`WriteBack::Background`]: whenever more
    /// than `mark` is held, writes the oldest back, a batch at a time (a
    /// read or a flush waits for one batch at most), down to `mark`. A
    /// failed write-back leaves the data cached, for the next flush to
    /// try again and answer with the error.
    async fn background(self: Arc<Self>, mark: u64) {
        loop {
            while lock(&self.model).held() > mark {
                if let Err(e) = self.write_back_toward(mark).await {
                    warn!(export = %self.name, "write cache: {e} (writing back in the background; the data stays cached)");
                    // Not a retry per write that arrives meanwhile.
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                    break;
                }
            }
            self.wake.notified().await;
        }
    }

    /// The server's data with the cache laid over it (`length` is at most
    /// [`MAX_CACHED_REQUEST`]: [`ExportCache::claim`]).
    async fn read(&self, offset: u64, length: u64) -> Result<Vec<u8>, ClientError> {
        let mut up = self.upstream.lock().await;
        let mut c = match up.take() {
            Some(c) => c,
            None => self.connect().await?,
        };
        let mut buf = vec![0u8; length as usize];
        let read = c.read(offset, &mut buf).await;
        if read.as_ref().err().is_none_or(ClientError::is_answer) {
            self.put_back(&mut up, c);
        }
        read?;
        // Under the connection's lock: no write-back can forget an entry
        // between the read and the overlay.
        lock(&self.model).overlay(offset, &mut buf);
        Ok(buf)
    }

    /// The power goes: the log is taken now; what was in flight to the
    /// server still lands, what `mode` lets through reaches it, the
    /// cache's connection is dropped, and every connection that used this
    /// export is reset, only then (so a client that reconnects sees the
    /// disk as the loss left it).
    pub async fn power_loss(self: &Arc<Self>, mode: PowerLoss) -> Loss {
        let lost = {
            let mut m = lock(&self.model);
            self.epoch.fetch_add(1, Ordering::SeqCst);
            if self.shared.stays_off.load(Ordering::SeqCst) {
                self.off.store(true, Ordering::SeqCst);
            }
            m.take_all()
        };
        let me = self.clone();
        // A task of its own: resetting the connections may abort the
        // caller's.
        let task = tokio::spawn(async move {
            let writes = lost.len() as u64;
            let bytes: u64 = lost
                .iter()
                .filter(|e| matches!(e.op, Op::Write(_)))
                .map(|e| e.len)
                .sum();
            // Once the write-back in progress has stopped (it holds the
            // connection): what of the log it had in flight landed anyway.
            let mut up = me.upstream.lock().await;
            let landed = std::mem::take(&mut *lock(&me.landed_after_loss));
            let mut lost = lost;
            lost.retain(|e| !landed.contains(&e.seq));
            let kept = model::survivors(lost, &mode, &mut mode.seed.clone());
            let mut loss = Loss {
                writes,
                bytes,
                kept: (landed.len() + kept.len()) as u64,
                connections: 0,
            };
            if !kept.is_empty() {
                match up.take() {
                    Some(c) => Ok(c),
                    None => me.connect().await,
                }
                .map(|c| *up = Some(c))
                .unwrap_or_else(|e| warn!(export = %me.name, "power loss: {e}"));
                if let Some(c) = up.as_mut() {
                    for e in &kept {
                        if let Err(err) = write_entry(c, e).await {
                            warn!(export = %me.name, "power loss: {err}");
                            break;
                        }
                    }
                }
            }
            if let Some(c) = up.take() {
                me.put_back(&mut up, c);
            }
            *up = None;
            drop(up);
            let s = &me.shared.stats;
            s.losses.fetch_add(1, Ordering::Relaxed);
            s.lost_writes.fetch_add(writes, Ordering::Relaxed);
            s.lost_bytes.fetch_add(bytes, Ordering::Relaxed);
            let members: Vec<_> = std::mem::take(&mut *lock(&me.members));
            let members: Vec<Arc<dyn Member>> =
                members.iter().filter_map(|(_, m)| m.upgrade()).collect();
            loss.connections = members.len() as u64;
            info!(
                target: FAULT_LOG,
                export = %me.name,
                lost_writes = loss.writes,
                lost_bytes = loss.bytes,
                kept = loss.kept,
                "power loss on export {:?}: {} cached writes ({} bytes) lost, {} pieces of them \
                 reached the server; resetting {} connections",
                me.name,
                loss.writes,
                loss.bytes,
                loss.kept,
                loss.connections
            );
            for m in members {
                m.power_cut();
            }
            loss
        });
        task.await.unwrap_or_default()
    }
}

/// Write-back requests in flight at once on the cache's connection: enough
/// to keep a server busy without waiting a round trip for each (16 kept
/// qemu-nbd waiting over unix sockets: nbdcopy --flush took a quarter
/// longer).
const WRITE_BACK_WINDOW: usize = 64;

/// The write-backs sent and not yet all answered, oldest first, each with
/// its cookie and what its reply said.
#[derive(Default)]
struct InFlight {
    entries: VecDeque<(u64, Answer, Entry)>,
}

/// What the reply to a write-back in flight said.
#[derive(Clone, Copy, PartialEq)]
enum Answer {
    Pending,
    Landed,
    /// Answered with an error: it stays cached, and so does everything
    /// after it (the log is forgotten in order).
    Failed,
}

impl InFlight {
    fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn full(&self) -> bool {
        self.entries.len() >= WRITE_BACK_WINDOW
    }

    /// Whether a reply is still due.
    fn pending(&self) -> bool {
        self.entries.iter().any(|(_, r, _)| *r == Answer::Pending)
    }

    fn overlaps(&self, e: &Entry) -> bool {
        self.entries
            .iter()
            .any(|(_, _, f)| f.overlaps(e.offset, e.len))
    }

    fn push(&mut self, cookie: u64, e: Entry) {
        self.entries.push_back((cookie, Answer::Pending, e));
    }

    /// Marks `cookie` answered (`landed` or not): the entries now landed
    /// with all before them, oldest first.
    fn answered(&mut self, cookie: u64, landed: bool) -> Result<Vec<Entry>, ClientError> {
        match self
            .entries
            .iter_mut()
            .find(|(c, r, _)| *c == cookie && *r == Answer::Pending)
        {
            Some(slot) => {
                slot.1 = if landed {
                    Answer::Landed
                } else {
                    Answer::Failed
                }
            }
            None => {
                return Err(ClientError::Protocol(
                    "unexpected reply from the server".into(),
                ));
            }
        }
        let mut out = Vec::new();
        while self
            .entries
            .front()
            .is_some_and(|(_, r, _)| *r == Answer::Landed)
        {
            if let Some((_, _, e)) = self.entries.pop_front() {
                out.push(e);
            }
        }
        Ok(out)
    }
}

async fn write_entry(c: &mut Client, e: &Entry) -> Result<(), ClientError> {
    match &e.op {
        Op::Write(d) => c.write(e.offset, d, false).await,
        Op::Zero(flags) => c.zeroes(e.offset, e.len, *flags).await,
        Op::Trim => c.trim(e.offset, e.len).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(seq: u64, offset: u64, len: u64) -> Entry {
        Entry {
            seq,
            offset,
            len,
            op: Op::Trim,
        }
    }

    /// Replies in any order; entries are let go only oldest first, and an
    /// answered entry still blocks a write over it until then.
    #[test]
    fn in_flight_write_backs_are_forgotten_oldest_first() {
        let mut f = InFlight::default();
        for (cookie, seq) in [(7, 0), (8, 1), (9, 2)] {
            f.push(cookie, entry(seq, seq * 4096, 4096));
        }
        assert!(f.overlaps(&entry(3, 4096 + 512, 512)));
        assert!(!f.overlaps(&entry(3, 3 * 4096, 4096)));
        assert!(f.answered(8, true).unwrap().is_empty());
        assert!(f.overlaps(&entry(3, 4096, 1)), "answered, not yet let go");
        let seqs = |v: Vec<Entry>| v.iter().map(|e| e.seq).collect::<Vec<_>>();
        assert_eq!(seqs(f.answered(7, true).unwrap()), [0, 1]);
        assert!(
            f.answered(8, true).is_err(),
            "no second reply to one cookie"
        );
        assert!(f.answered(42, true).is_err());
        assert_eq!(seqs(f.answered(9, true).unwrap()), [2]);
        assert!(f.is_empty());
        for i in 0..WRITE_BACK_WINDOW as u64 {
            f.push(i + 1, entry(i, i * 4096, 4096));
        }
        assert!(f.full());
    }

    /// An entry answered with an error is never let go, nor is anything
    /// after it, however its successors are answered; with every reply
    /// read, none is pending.
    #[test]
    fn a_failed_write_back_keeps_itself_and_its_successors() {
        let mut f = InFlight::default();
        for (cookie, seq) in [(1, 0), (2, 1), (3, 2)] {
            f.push(cookie, entry(seq, seq * 4096, 4096));
        }
        let seqs = |v: Vec<Entry>| v.iter().map(|e| e.seq).collect::<Vec<_>>();
        assert!(f.answered(2, false).unwrap().is_empty());
        assert!(f.pending());
        assert_eq!(seqs(f.answered(1, true).unwrap()), [0]);
        assert!(f.answered(3, true).unwrap().is_empty());
        assert!(!f.pending());
        assert!(
            f.answered(2, true).is_err(),
            "no second reply to one cookie"
        );
    }
}
