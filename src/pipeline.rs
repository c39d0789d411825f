//! One connection's pipeline: two flows, each split into events at message
//! boundaries, each event offered to the interception point, then forwarded.
//!
//! Bytes move through one fixed buffer per flow. The flow reads what the
//! socket has, asks the shared [`Session`] where messages start and end,
//! offers each event to the [`Interceptor`], and writes everything framed so
//! far in one call — a 32 MiB read is streamed, never held whole, and with
//! no rules a read of the source becomes exactly one write to the sink.

use std::sync::{Arc, Mutex};

use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::Notify;
use tracing::{debug, info, trace, warn};

use crate::intercept::{ConnId, Event, Interceptor, Verdict};
use crate::protocol::{Direction, MessageMeta, ProtocolError, Segment, Session, Step};

/// Per-flow buffer: big enough that a bulk transfer is a few large writes,
/// small enough that memory stays flat as connections grow.
pub const FLOW_BUFFER: usize = 256 * 1024;

/// Compact the buffer when less than this is free at its tail, so reads
/// stay large. Only a partial header (at most 152 bytes) or bytes held while
/// waiting are ever moved.
const MIN_READ_SPACE: usize = 64 * 1024;

/// Default bound on any length field that announces bytes to stream:
/// NBD's usual 32 MiB maximum payload plus headroom.
pub const DEFAULT_MAX_PAYLOAD: u64 = (32 << 20) + (64 << 10);

/// Why a flow ended other than by a clean end of stream.
#[derive(Debug, Error)]
pub enum FlowError {
    #[error("{dir}: {source}")]
    Protocol {
        dir: Direction,
        #[source]
        source: ProtocolError,
    },
    #[error("{dir}: peer closed in the middle of a message")]
    Truncated { dir: Direction },
    #[error("a flow task failed: {0}")]
    Task(String),
    #[error("{dir}: {source}")]
    Io {
        dir: Direction,
        #[source]
        source: std::io::Error,
    },
}

/// State shared by a connection's two flows.
pub struct Connection {
    pub id: ConnId,
    pub peer: String,
    session: Mutex<Session>,
    /// Wakes the to-server flow when the server's side moved on (greeting,
    /// final option reply) and it may frame the client's next bytes.
    wake_to_server: Notify,
    interceptor: Arc<dyn Interceptor>,
}

impl Connection {
    pub fn new(
        id: ConnId,
        peer: String,
        max_payload: u64,
        interceptor: Arc<dyn Interceptor>,
    ) -> Arc<Self> {
        Arc::new(Self {
            id,
            peer,
            session: Mutex::new(Session::new(max_payload)),
            wake_to_server: Notify::new(),
            interceptor,
        })
    }

    fn offer(&self, dir: Direction, seg: Segment, meta: &MessageMeta) -> Verdict {
        if seg.events.is_empty() {
            return Verdict::Pass;
        }
        self.interceptor.on_event(&Event {
            conn: self.id,
            direction: Some(dir),
            kinds: seg.events,
            meta: *meta,
            size: seg.len,
        })
    }

    fn frame(&self, dir: Direction, buf: &[u8]) -> Result<Step, FlowError> {
        // A poisoned lock means the other flow panicked mid-parse; the
        // session state is still a plain value, so carry on with it.
        let mut s = self.session.lock().unwrap_or_else(|p| p.into_inner());
        s.next(dir, buf)
            .map_err(|source| FlowError::Protocol { dir, source })
    }
}

/// Runs both flows of a connection until both ends are closed, or one flow
/// fails (then both sides are closed at once). Returns the first failure.
pub async fn run<CR, CW, UR, UW>(
    conn: Arc<Connection>,
    client: (CR, CW),
    upstream: (UR, UW),
) -> Result<(), FlowError>
where
    CR: AsyncRead + Unpin + Send + 'static,
    CW: AsyncWrite + Unpin + Send + 'static,
    UR: AsyncRead + Unpin + Send + 'static,
    UW: AsyncWrite + Unpin + Send + 'static,
{
    let (client_r, client_w) = client;
    let (upstream_r, upstream_w) = upstream;
    let mut to_server = tokio::spawn(flow(
        conn.clone(),
        Direction::ToServer,
        client_r,
        upstream_w,
    ));
    let mut to_client = tokio::spawn(flow(
        conn.clone(),
        Direction::ToClient,
        upstream_r,
        client_w,
    ));
    // Whichever flow finishes first decides: a failure tears the other
    // down (dropping its halves closes both sockets); a clean end of stream
    // was already passed on as a half-close, so the other flow runs on.
    let (first, other) = tokio::select! {
        r = &mut to_server => (r, to_client),
        r = &mut to_client => (r, to_server),
    };
    let first = first.unwrap_or_else(|e| Err(FlowError::Task(e.to_string())));
    if first.is_err() {
        other.abort();
        return first;
    }
    other
        .await
        .unwrap_or_else(|e| Err(FlowError::Task(e.to_string())))
}

/// Moves one direction's bytes, message by message. See the module docs.
async fn flow<R, W>(
    conn: Arc<Connection>,
    dir: Direction,
    mut src: R,
    mut dst: W,
) -> Result<(), FlowError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let io = |source| FlowError::Io { dir, source };
    let mut buf = vec![0u8; FLOW_BUFFER];
    // [start, cursor): framed, not yet written. [cursor, end): not framed.
    let (mut start, mut cursor, mut end) = (0usize, 0usize, 0usize);
    // Bytes of the current segment still to pass, and the segment after it.
    let mut seg_left = 0u64;
    let mut next_seg: Option<Segment> = None;
    let mut meta = MessageMeta::default();
    let mut opaque = false;
    loop {
        let mut waiting = false;
        loop {
            if seg_left > 0 {
                let avail = (end - cursor) as u64;
                if avail == 0 {
                    break;
                }
                let take = seg_left.min(avail);
                cursor += take as usize;
                seg_left -= take;
                continue;
            }
            if let Some(seg) = next_seg.take() {
                match conn.offer(dir, seg, &meta) {
                    Verdict::Pass => {}
                }
                seg_left = seg.len;
                continue;
            }
            if cursor == end {
                break;
            }
            match conn.frame(dir, &buf[cursor..end])? {
                Step::Frame(f) => {
                    if f.wake_peer {
                        conn.wake_to_server.notify_one();
                    }
                    if f.opaque && !opaque {
                        opaque = true;
                        info!(
                            conn = conn.id,
                            "{dir}: STARTTLS accepted; relaying the rest unparsed (no faults inside TLS yet)"
                        );
                    }
                    meta = f.meta;
                    let segs = f.segments();
                    trace!(conn = conn.id, "{dir}: {segs:?} {meta:?}");
                    next_seg = segs.get(1).copied();
                    match conn.offer(dir, segs[0], &meta) {
                        Verdict::Pass => {}
                    }
                    seg_left = segs[0].len;
                }
                Step::NeedMore => break,
                Step::Wait => {
                    waiting = true;
                    break;
                }
            }
        }

        if cursor > start {
            dst.write_all(&buf[start..cursor]).await.map_err(io)?;
            start = cursor;
        }
        if start == end {
            (start, cursor, end) = (0, 0, 0);
        } else if start > 0 && buf.len() - end < MIN_READ_SPACE {
            buf.copy_within(start..end, 0);
            end -= start;
            cursor -= start;
            start = 0;
        }

        let n = if end == buf.len() {
            // Only bytes held back while waiting can fill the buffer.
            conn.wake_to_server.notified().await;
            continue;
        } else if waiting {
            tokio::select! {
                _ = conn.wake_to_server.notified() => continue,
                r = src.read(&mut buf[end..]) => r.map_err(io)?,
            }
        } else {
            src.read(&mut buf[end..]).await.map_err(io)?
        };
        if n == 0 {
            if !opaque && (seg_left > 0 || next_seg.is_some() || end > start) {
                return Err(FlowError::Truncated { dir });
            }
            debug!(conn = conn.id, "{dir}: end of stream");
            // Pass the end of stream on as a half-close; the other flow may
            // still be carrying replies.
            if let Err(e) = dst.shutdown().await {
                debug!(conn = conn.id, "{dir}: shutdown: {e}");
            }
            return Ok(());
        }
        end += n;
    }
}

/// Logs how a connection ended: protocol violations are warnings (they are
/// what a fault-injection user needs to see); a peer vanishing is not.
pub fn log_outcome(conn: &Connection, result: &Result<(), FlowError>) {
    match result {
        Ok(()) => debug!(conn = conn.id, peer = %conn.peer, "connection closed"),
        Err(e @ FlowError::Protocol { .. }) => {
            warn!(conn = conn.id, peer = %conn.peer, "closing connection: {e}")
        }
        Err(e) => info!(conn = conn.id, peer = %conn.peer, "closing connection: {e}"),
    }
}
