//! What the null server's unit tests share: a server on an in-memory pipe,
//! and a client that negotiates, sends requests and checks replies.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinHandle;

use super::{BASE_ALLOCATION_ID, NullConfig, NullError, serve};
use crate::io::mempipe::{self, MemStream};
use crate::protocol::bytes::{be16, be32, be64};
use crate::protocol::consts::*;
use crate::protocol::handshake::{
    ExportInfo, GreetingKind, NewstyleGreeting, OptionHeader, OptionReplyHeader, greeting_kind,
};
use crate::protocol::transmission::{Reply, ReplyMode, Request};

pub(super) const SIZE: u64 = 64 << 20;
pub(super) const LIMIT: Duration = Duration::from_secs(10);

pub(super) type Handle = JoinHandle<Result<(), NullError>>;

pub(super) fn start(size: u64, oldstyle: bool) -> (MemStream, Handle) {
    // The pipe the proxy serves it on.
    let (client, server) = mempipe::pair(1 << 20);
    let cfg = NullConfig { size, oldstyle };
    let h = tokio::spawn(async move { serve(server, &cfg).await });
    (client, h)
}

pub(super) async fn finish(h: Handle) -> Result<(), NullError> {
    tokio::time::timeout(LIMIT, h)
        .await
        .expect("serve did not return")
        .expect("serve panicked")
}

pub(super) async fn newstyle(c: &mut MemStream, client_flags: u32) {
    let mut g = [0u8; NEWSTYLE_GREETING_LEN];
    c.read_exact(&mut g).await.unwrap();
    assert_eq!(greeting_kind(&g), Ok(GreetingKind::Newstyle));
    assert_eq!(
        NewstyleGreeting::parse(&g).handshake_flags,
        FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES
    );
    c.write_all(&client_flags.to_be_bytes()).await.unwrap();
}

pub(super) async fn send_opt(c: &mut MemStream, option: u32, data: &[u8]) {
    let h = OptionHeader {
        option,
        length: data.len() as u32,
    };
    c.write_all(&h.build()).await.unwrap();
    c.write_all(data).await.unwrap();
}

pub(super) async fn read_opt_reply(c: &mut MemStream) -> (OptionReplyHeader, Vec<u8>) {
    let mut b = [0u8; OPTION_REPLY_HEADER_LEN];
    c.read_exact(&mut b).await.unwrap();
    let h = OptionReplyHeader::parse(&b).unwrap();
    let mut data = vec![0u8; h.length as usize];
    c.read_exact(&mut data).await.unwrap();
    (h, data)
}

/// Sends an option and collects its replies up to the final one.
pub(super) async fn opt(c: &mut MemStream, option: u32, data: &[u8]) -> Vec<(u32, Vec<u8>)> {
    send_opt(c, option, data).await;
    let mut out = Vec::new();
    loop {
        let (h, d) = read_opt_reply(c).await;
        assert_eq!(h.option, option);
        out.push((h.reply_type, d));
        if h.is_final() {
            return out;
        }
    }
}

pub(super) fn info_data(name: &[u8], infos: &[u16]) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name);
    d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        d.extend_from_slice(&i.to_be_bytes());
    }
    d
}

pub(super) fn meta_data(name: &[u8], queries: &[&str]) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name);
    d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        d.extend_from_slice(&(q.len() as u32).to_be_bytes());
        d.extend_from_slice(q.as_bytes());
    }
    d
}

pub(super) fn export_of(replies: &[(u32, Vec<u8>)]) -> ExportInfo {
    let (t, d) = replies
        .iter()
        .find(|(t, d)| *t == REP_INFO && be16(d, 0) == INFO_EXPORT)
        .expect("no NBD_INFO_EXPORT");
    assert_eq!(*t, REP_INFO);
    ExportInfo::parse_info(d).expect("bad NBD_INFO_EXPORT")
}

/// Negotiates `mode` (and `base:allocation` if `context`), then GO.
pub(super) async fn connect(size: u64, mode: ReplyMode, context: bool) -> (MemStream, Handle, u16) {
    let (mut c, h) = start(size, false);
    newstyle(&mut c, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).await;
    match mode {
        ReplyMode::Simple => {}
        ReplyMode::Structured => {
            let r = opt(&mut c, OPT_STRUCTURED_REPLY, &[]).await;
            assert_eq!(r, vec![(REP_ACK, vec![])]);
        }
        ReplyMode::Extended => {
            let r = opt(&mut c, OPT_EXTENDED_HEADERS, &[]).await;
            assert_eq!(r, vec![(REP_ACK, vec![])]);
        }
    }
    if context {
        let r = opt(
            &mut c,
            OPT_SET_META_CONTEXT,
            &meta_data(b"", &["base:allocation"]),
        )
        .await;
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].0, REP_META_CONTEXT);
        assert_eq!(be32(&r[0].1, 0), BASE_ALLOCATION_ID);
        assert_eq!(&r[0].1[4..], b"base:allocation");
        assert_eq!(r[1].0, REP_ACK);
    }
    let r = opt(&mut c, OPT_GO, &info_data(b"", &[])).await;
    assert_eq!(r.last().unwrap().0, REP_ACK);
    let e = export_of(&r);
    assert_eq!(e.size, size);
    (c, h, e.flags)
}

#[allow(clippy::too_many_arguments)]
pub(super) async fn send_req(
    c: &mut MemStream,
    mode: ReplyMode,
    flags: u16,
    command: u16,
    cookie: u64,
    offset: u64,
    length: u64,
    payload: &[u8],
) {
    let r = Request {
        extended: mode == ReplyMode::Extended,
        flags,
        command,
        cookie,
        offset,
        length,
    };
    let mut b = [0u8; EXTENDED_REQUEST_LEN];
    let n = r.build(&mut b);
    c.write_all(&b[..n]).await.unwrap();
    c.write_all(payload).await.unwrap();
}

/// Reads one reply header and, for chunks, its payload.
pub(super) async fn read_reply(c: &mut MemStream) -> (Reply, Vec<u8>) {
    let mut b = [0u8; EXTENDED_REPLY_LEN];
    c.read_exact(&mut b[..4]).await.unwrap();
    let need = match be32(&b, 0) {
        SIMPLE_REPLY_MAGIC => SIMPLE_REPLY_LEN,
        STRUCTURED_REPLY_MAGIC => STRUCTURED_REPLY_LEN,
        EXTENDED_REPLY_MAGIC => EXTENDED_REPLY_LEN,
        m => panic!("bad reply magic {m:#x}"),
    };
    c.read_exact(&mut b[4..need]).await.unwrap();
    let r = Reply::parse(&b[..need]).unwrap().unwrap();
    let mut payload = vec![0u8; r.chunk_len() as usize];
    c.read_exact(&mut payload).await.unwrap();
    (r, payload)
}

/// Asserts a successful reply without data.
pub(super) async fn expect_ok(c: &mut MemStream, mode: ReplyMode, cookie: u64, offset: u64) {
    let (r, p) = read_reply(c).await;
    assert_eq!(r.cookie(), cookie);
    match mode {
        ReplyMode::Simple => assert_eq!(r, Reply::Simple { error: 0, cookie }),
        _ => {
            assert!(r.is_done());
            assert_eq!(r.chunk_type(), Some(REPLY_TYPE_NONE));
            assert!(p.is_empty());
            if let Reply::Extended { offset: o, .. } = r {
                assert_eq!(o, offset);
            }
        }
    }
}

/// Asserts an error reply with `error`.
pub(super) async fn expect_err(c: &mut MemStream, mode: ReplyMode, cookie: u64, error: u32) {
    let (r, p) = read_reply(c).await;
    assert_eq!(r.cookie(), cookie);
    match mode {
        ReplyMode::Simple => assert_eq!(r, Reply::Simple { error, cookie }),
        _ => {
            assert!(r.is_done());
            assert_eq!(r.chunk_type(), Some(REPLY_TYPE_ERROR));
            assert_eq!(be32(&p, 0), error);
            let mlen = be16(&p, 4) as usize;
            assert_eq!(p.len(), 6 + mlen);
            assert!(mlen > 0, "error chunks carry a message");
        }
    }
}

/// Reads `length` at `offset` and checks the reply is all zeroes.
pub(super) async fn expect_read_zeroes(
    c: &mut MemStream,
    mode: ReplyMode,
    cookie: u64,
    offset: u64,
    length: u64,
) {
    let (r, p) = read_reply(c).await;
    assert_eq!(r.cookie(), cookie);
    match mode {
        ReplyMode::Simple => {
            assert_eq!(r, Reply::Simple { error: 0, cookie });
            let mut data = vec![0xffu8; length as usize];
            c.read_exact(&mut data).await.unwrap();
            assert!(data.iter().all(|&b| b == 0));
        }
        _ => {
            assert!(r.is_done());
            if length == 0 {
                assert_eq!(r.chunk_type(), Some(REPLY_TYPE_NONE));
                return;
            }
            assert_eq!(r.chunk_type(), Some(REPLY_TYPE_OFFSET_DATA));
            assert_eq!(p.len() as u64, 8 + length);
            assert_eq!(be64(&p, 0), offset);
            assert!(p[8..].iter().all(|&b| b == 0));
            match (mode, r) {
                (ReplyMode::Extended, Reply::Extended { offset: o, .. }) => {
                    assert_eq!(o, offset)
                }
                (ReplyMode::Structured, Reply::Structured { .. }) => {}
                _ => panic!("reply form {r:?} does not match {mode:?}"),
            }
        }
    }
}

pub(super) async fn disconnect(mut c: MemStream, mode: ReplyMode, h: Handle) {
    send_req(&mut c, mode, 0, CMD_DISC, 0, 0, 0, &[]).await;
    finish(h).await.expect("clean close after NBD_CMD_DISC");
    let mut rest = Vec::new();
    c.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty(), "no reply to NBD_CMD_DISC");
}

pub(super) const MODES: [ReplyMode; 3] = [
    ReplyMode::Simple,
    ReplyMode::Structured,
    ReplyMode::Extended,
];
