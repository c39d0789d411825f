//! The null server's handshake: the greeting and option negotiation
//! (EXPORT_NAME, INFO/GO, LIST, STARTTLS, structured replies, extended
//! headers, metadata contexts), or the non-fixed newstyle of the Python
//! injector, which knows only NBD_OPT_EXPORT_NAME.

use tokio::io::{AsyncRead, AsyncWriteExt};
use tracing::{debug, trace};

use super::{
    BASE_ALLOCATION_ID, Conn, MAX_OPTION_DATA, MAX_OPTION_DATA_HARD, MAX_PAYLOAD, MIN_BLOCK,
    NullError, PREFERRED_BLOCK,
};
use crate::io::mempipe::WriteZeroes;
use crate::protocol::consts::*;
use crate::protocol::handshake::{
    BlockSizes, ExportInfo, NewstyleGreeting, OptionData, OptionHeader, build_info_reply,
    build_meta_context_reply, build_option_error, build_option_reply,
};
use crate::protocol::transmission::ReplyMode;

/// Strings (export names, context queries) are limited by the spec.
const MAX_STRING: usize = 4096;
const DESCRIPTION: &str = "nbdfault null server";

impl<S> Conn<S>
where
    S: AsyncRead + WriteZeroes + Unpin,
{
    /// Newstyle negotiation: `Ok(true)` to enter transmission, `Ok(false)`
    /// when the client ended the session cleanly.
    pub(super) async fn negotiate(&mut self) -> Result<bool, NullError> {
        let offered = self.dialect.handshake_flags();
        let g = NewstyleGreeting {
            handshake_flags: offered,
        };
        self.io.write_all(&g.build()).await?;

        let mut cf = [0u8; CLIENT_FLAGS_LEN];
        if !self.read_msg(&mut cf, "the client flags").await? {
            debug!("null server: client closed before sending its flags");
            return Ok(false);
        }
        let client_flags = u32::from_be_bytes(cf);
        // The client may accept NO_ZEROES only where it was offered.
        let no_zeroes = offered & FLAG_NO_ZEROES != 0 && client_flags & FLAG_C_NO_ZEROES != 0;
        if offered & FLAG_FIXED_NEWSTYLE == 0 {
            return self.unfixed(no_zeroes).await;
        }
        let known = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES;
        if client_flags & !known != 0 {
            return Err(NullError::Protocol(format!(
                "unknown client flags {client_flags:#x}"
            )));
        }
        if client_flags & FLAG_C_FIXED_NEWSTYLE == 0 {
            debug!("null server: client did not set C_FIXED_NEWSTYLE; continuing anyway");
        }

        // One buffer for all option data of this connection, grown to the
        // largest option seen (at most MAX_OPTION_DATA): a connection that
        // never sends option data costs nothing here.
        let mut data = Vec::new();
        loop {
            let mut h = [0u8; OPTION_HEADER_LEN];
            if !self.read_msg(&mut h, "an option header").await? {
                debug!("null server: client closed during negotiation");
                return Ok(false);
            }
            let opt = OptionHeader::parse(&h)?;
            let option = opt.option;
            trace!(
                "null server: option {} ({option}), {} bytes of data",
                option_name(option).unwrap_or("unknown"),
                opt.length
            );
            if opt.length > MAX_OPTION_DATA_HARD {
                return Err(NullError::Protocol(format!(
                    "option {option} claims {} bytes of data",
                    opt.length
                )));
            }
            if option == OPT_ABORT {
                // The spec asks servers to ignore any data sent with ABORT.
                self.discard(opt.length.into(), "NBD_OPT_ABORT data")
                    .await?;
                if let Err(e) = self.opt_reply(option, REP_ACK, &[]).await {
                    debug!("null server: could not acknowledge NBD_OPT_ABORT: {e}");
                }
                debug!("null server: client aborted negotiation");
                return Ok(false);
            }
            let len = opt.length as usize;
            if len > MAX_OPTION_DATA {
                if option == OPT_EXPORT_NAME {
                    // EXPORT_NAME has no error reply.
                    return Err(NullError::Protocol(format!(
                        "NBD_OPT_EXPORT_NAME with a {len}-byte name"
                    )));
                }
                self.discard(len as u64, "option data").await?;
                self.opt_error(option, REP_ERR_TOO_BIG, "option data too large")
                    .await?;
                continue;
            }
            if data.len() < len {
                data.resize(len, 0);
            }
            let d = &mut data[..len];
            if !self.read_msg(d, "option data").await? {
                return Err(NullError::Truncated("option data"));
            }
            if self.option(option, no_zeroes, d).await? {
                return Ok(true);
            }
        }
    }

    /// Non-fixed newstyle, as the Python injector speaks it: the client flags
    /// are taken as they come, and the one option a client may send is
    /// NBD_OPT_EXPORT_NAME (without FIXED_NEWSTYLE a server has no way to
    /// refuse an option, so anything else ends the connection). The name is
    /// read past unseen, whatever its length.
    async fn unfixed(&mut self, no_zeroes: bool) -> Result<bool, NullError> {
        let mut h = [0u8; OPTION_HEADER_LEN];
        if !self.read_msg(&mut h, "an option header").await? {
            debug!("null server: client closed during negotiation");
            return Ok(false);
        }
        let opt = OptionHeader::parse(&h)?;
        if opt.option != OPT_EXPORT_NAME {
            return Err(NullError::Protocol(format!(
                "option {} without fixed newstyle",
                opt.option
            )));
        }
        self.discard(opt.length.into(), "the export name").await?;
        self.export_name(no_zeroes).await
    }

    /// Answers NBD_OPT_EXPORT_NAME with the export information; `Ok(true)`:
    /// transmission follows.
    async fn export_name(&mut self, no_zeroes: bool) -> Result<bool, NullError> {
        let info = ExportInfo {
            size: self.size,
            flags: self.dialect.transmission_flags(self.mode),
        };
        let mut out = [0u8; EXPORT_NAME_REPLY_SHORT_LEN + EXPORT_NAME_REPLY_ZEROES];
        let n = info.build_export_name_reply(no_zeroes, &mut out);
        self.io.write_all(&out[..n]).await?;
        debug!("null server: NBD_OPT_EXPORT_NAME, entering transmission");
        Ok(true)
    }

    /// Handles one option (other than ABORT); `Ok(true)` to enter
    /// transmission.
    async fn option(
        &mut self,
        option: u32,
        no_zeroes: bool,
        data: &[u8],
    ) -> Result<bool, NullError> {
        match option {
            OPT_EXPORT_NAME => {
                if self.mode == ReplyMode::Extended {
                    return Err(NullError::Protocol(
                        "NBD_OPT_EXPORT_NAME after extended headers were negotiated".into(),
                    ));
                }
                self.export_name(no_zeroes).await
            }
            OPT_LIST => {
                if !data.is_empty() {
                    self.opt_error(option, REP_ERR_INVALID, "NBD_OPT_LIST takes no data")
                        .await?;
                    return Ok(false);
                }
                // One export, the default one: a zero-length name.
                self.opt_reply(option, REP_SERVER, &[&0u32.to_be_bytes()])
                    .await?;
                self.opt_reply(option, REP_ACK, &[]).await?;
                Ok(false)
            }
            OPT_STARTTLS => {
                if !data.is_empty() {
                    self.opt_error(option, REP_ERR_INVALID, "NBD_OPT_STARTTLS takes no data")
                        .await?;
                } else {
                    self.opt_error(
                        option,
                        REP_ERR_POLICY,
                        "TLS is not supported by nbdfault's null server",
                    )
                    .await?;
                }
                Ok(false)
            }
            OPT_INFO | OPT_GO => {
                let req = match parse_info_request(data) {
                    Ok(r) => r,
                    Err(msg) => {
                        self.opt_error(option, REP_ERR_INVALID, msg).await?;
                        return Ok(false);
                    }
                };
                let info = ExportInfo {
                    size: self.size,
                    flags: self.dialect.transmission_flags(self.mode),
                };
                self.opt_reply(option, REP_INFO, &[&info.build_info()])
                    .await?;
                self.opt_reply(
                    option,
                    REP_INFO,
                    &[&BlockSizes {
                        minimum: MIN_BLOCK,
                        preferred: PREFERRED_BLOCK,
                        maximum: MAX_PAYLOAD as u32,
                    }
                    .build_info()],
                )
                .await?;
                if req.want_name {
                    self.send(&build_info_reply(option, INFO_NAME, req.name))
                        .await?;
                }
                if req.want_description {
                    self.send(&build_info_reply(
                        option,
                        INFO_DESCRIPTION,
                        DESCRIPTION.as_bytes(),
                    ))
                    .await?;
                }
                self.opt_reply(option, REP_ACK, &[]).await?;
                if option == OPT_GO {
                    debug!(
                        "null server: NBD_OPT_GO, entering transmission ({:?} replies)",
                        self.mode
                    );
                    return Ok(true);
                }
                Ok(false)
            }
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    self.opt_error(
                        option,
                        REP_ERR_INVALID,
                        "NBD_OPT_STRUCTURED_REPLY takes no data",
                    )
                    .await?;
                } else if self.mode == ReplyMode::Extended {
                    self.opt_error(
                        option,
                        REP_ERR_EXT_HEADER_REQD,
                        "extended headers are already negotiated",
                    )
                    .await?;
                } else {
                    self.mode = ReplyMode::Structured;
                    self.opt_reply(option, REP_ACK, &[]).await?;
                }
                Ok(false)
            }
            OPT_EXTENDED_HEADERS => {
                if !data.is_empty() {
                    self.opt_error(
                        option,
                        REP_ERR_INVALID,
                        "NBD_OPT_EXTENDED_HEADERS takes no data",
                    )
                    .await?;
                } else {
                    self.mode = ReplyMode::Extended;
                    self.opt_reply(option, REP_ACK, &[]).await?;
                }
                Ok(false)
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                self.meta_context(option, data).await?;
                Ok(false)
            }
            _ => {
                self.opt_error(option, REP_ERR_UNSUP, "option not supported")
                    .await?;
                Ok(false)
            }
        }
    }

    async fn meta_context(&mut self, option: u32, data: &[u8]) -> Result<(), NullError> {
        let set = option == OPT_SET_META_CONTEXT;
        if set {
            // SET replaces the selection even when it fails.
            self.context = false;
        }
        if self.mode == ReplyMode::Simple {
            return self
                .opt_error(
                    option,
                    REP_ERR_INVALID,
                    "metadata contexts need structured replies or extended headers",
                )
                .await;
        }
        let q = match parse_meta_query(data) {
            Ok(q) => q,
            Err(msg) => return self.opt_error(option, REP_ERR_INVALID, msg).await,
        };
        let (matched, id) = if set {
            (q.exact, BASE_ALLOCATION_ID)
        } else {
            // The context id in LIST replies is reserved and should be 0.
            (q.count == 0 || q.exact || q.wildcard, 0)
        };
        if matched {
            self.send(&build_meta_context_reply(
                option,
                id,
                CONTEXT_BASE_ALLOCATION,
            ))
            .await?;
        }
        if set {
            self.context = matched;
        }
        self.opt_reply(option, REP_ACK, &[]).await
    }

    /// Sends an option reply whose data is the concatenation of `parts`.
    async fn opt_reply(
        &mut self,
        option: u32,
        reply_type: u32,
        parts: &[&[u8]],
    ) -> Result<(), NullError> {
        self.send(&build_option_reply(option, reply_type, parts))
            .await
    }

    /// Sends an error reply carrying a human-readable message.
    async fn opt_error(
        &mut self,
        option: u32,
        reply_type: u32,
        msg: &str,
    ) -> Result<(), NullError> {
        debug!(
            "null server: refusing option {} ({option}): {msg}",
            option_name(option).unwrap_or("unknown")
        );
        self.send(&build_option_error(option, reply_type, msg))
            .await
    }

    /// Queues a built option reply.
    async fn send(&mut self, reply: &[u8]) -> Result<(), NullError> {
        self.io.write_all(reply).await?;
        Ok(())
    }
}

/// The export name that INFO, GO and the META_CONTEXT options begin with.
fn export_name_field<'a>(d: &mut OptionData<'a>) -> Result<&'a [u8], &'static str> {
    let name = d
        .string()
        .ok_or("export name length exceeds the option data")?;
    if name.len() > MAX_STRING {
        return Err("export name longer than 4096 bytes");
    }
    Ok(name)
}

/// An NBD_OPT_INFO / NBD_OPT_GO request.
#[derive(Debug, PartialEq, Eq)]
struct InfoRequest<'a> {
    name: &'a [u8],
    want_name: bool,
    want_description: bool,
}

fn parse_info_request(data: &[u8]) -> Result<InfoRequest<'_>, &'static str> {
    let mut d = OptionData::new(data);
    let name = export_name_field(&mut d)?;
    let count = d.u16().ok_or("missing information request count")?;
    let mut req = InfoRequest {
        name,
        want_name: false,
        want_description: false,
    };
    for _ in 0..count {
        match d.u16().ok_or("fewer information requests than announced")? {
            INFO_NAME => req.want_name = true,
            INFO_DESCRIPTION => req.want_description = true,
            _ => {}
        }
    }
    if !d.is_empty() {
        return Err("trailing bytes after the information requests");
    }
    Ok(req)
}

/// An NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT request, reduced
/// to what matters for the one context we offer.
#[derive(Debug, PartialEq, Eq)]
struct MetaQuery {
    count: u32,
    /// Some query is exactly `base:allocation`.
    exact: bool,
    /// Some query is the `base:` wildcard.
    wildcard: bool,
}

fn parse_meta_query(data: &[u8]) -> Result<MetaQuery, &'static str> {
    let mut d = OptionData::new(data);
    // Checked, then ignored: there is one export.
    export_name_field(&mut d)?;
    let count = d.u32().ok_or("missing query count")?;
    let mut q = MetaQuery {
        count,
        exact: false,
        wildcard: false,
    };
    // Each query takes at least 4 bytes, so this ends quickly on a lie.
    for _ in 0..count {
        let s = d.string().ok_or("query length exceeds the option data")?;
        if s.len() > MAX_STRING {
            return Err("query longer than 4096 bytes");
        }
        if s == CONTEXT_BASE_ALLOCATION.as_bytes() {
            q.exact = true;
        } else if s == b"base:" {
            q.wildcard = true;
        }
    }
    if !d.is_empty() {
        return Err("trailing bytes after the queries");
    }
    Ok(q)
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::super::test_support::*;
    use super::super::{BASE_FLAGS, NullError};
    use super::*;
    use crate::protocol::bytes::{be16, be32, be64};
    use crate::protocol::handshake::{GreetingKind, OldstyleGreeting, greeting_kind};
    use crate::protocol::transmission::Reply;

    #[tokio::test]
    async fn oldstyle_greeting() {
        let (mut c, h) = start(SIZE, true);
        let mut g = [0xffu8; OLDSTYLE_GREETING_LEN];
        c.read_exact(&mut g).await.unwrap();
        assert_eq!(&g[..8], b"NBDMAGIC");
        assert_eq!(be64(&g, 8), CLISERV_MAGIC);
        assert_eq!(greeting_kind(&g), Ok(GreetingKind::Oldstyle));
        let og = OldstyleGreeting::parse(&g);
        assert_eq!(og.size, SIZE);
        assert_eq!(og.flags, u32::from(BASE_FLAGS));
        assert_eq!(og.flags & u32::from(FLAG_SEND_DF), 0);
        assert!(g[28..].iter().all(|&b| b == 0));
        send_req(&mut c, ReplyMode::Simple, 0, CMD_READ, 7, 512, 512, &[]).await;
        expect_read_zeroes(&mut c, ReplyMode::Simple, 7, 512, 512).await;
        disconnect(c, ReplyMode::Simple, h).await;
    }

    #[tokio::test]
    async fn go_with_info_requests() {
        let (mut c, h) = start(SIZE, false);
        newstyle(&mut c, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).await;

        // INFO with a description request does not end negotiation.
        let r = opt(&mut c, OPT_INFO, &info_data(b"", &[INFO_DESCRIPTION])).await;
        assert_eq!(r.last().unwrap().0, REP_ACK);
        let desc = r
            .iter()
            .find(|(t, d)| *t == REP_INFO && be16(d, 0) == INFO_DESCRIPTION)
            .expect("description");
        assert_eq!(&desc.1[2..], DESCRIPTION.as_bytes());

        let r = opt(
            &mut c,
            OPT_GO,
            &info_data(b"disk", &[INFO_NAME, INFO_BLOCK_SIZE, 0x7777]),
        )
        .await;
        assert_eq!(r.last().unwrap(), &(REP_ACK, vec![]));
        assert!(r[..r.len() - 1].iter().all(|(t, _)| *t == REP_INFO));
        let e = export_of(&r);
        assert_eq!(e.size, SIZE);
        assert_eq!(e.flags, BASE_FLAGS);
        assert_ne!(e.flags & FLAG_CAN_MULTI_CONN, 0);
        assert_ne!(e.flags & FLAG_HAS_FLAGS, 0);
        assert_eq!(e.flags & FLAG_SEND_DF, 0, "no DF before structured replies");
        assert_eq!(e.flags & FLAG_READ_ONLY, 0);
        let bs = r
            .iter()
            .find(|(t, d)| *t == REP_INFO && be16(d, 0) == INFO_BLOCK_SIZE)
            .expect("block size");
        assert_eq!(bs.1.len(), 14);
        assert_eq!(be32(&bs.1, 2), 1);
        assert_eq!(be32(&bs.1, 6), 4096);
        assert_eq!(be32(&bs.1, 10), 32 << 20);
        let name = r
            .iter()
            .find(|(t, d)| *t == REP_INFO && be16(d, 0) == INFO_NAME)
            .expect("name");
        assert_eq!(&name.1[2..], b"disk");
        assert!(
            !r.iter()
                .any(|(t, d)| *t == REP_INFO && be16(d, 0) == INFO_DESCRIPTION)
        );

        send_req(&mut c, ReplyMode::Simple, 0, CMD_FLUSH, 1, 0, 0, &[]).await;
        expect_ok(&mut c, ReplyMode::Simple, 1, 0).await;
        disconnect(c, ReplyMode::Simple, h).await;
    }

    #[tokio::test]
    async fn go_without_block_size_request_still_gets_it() {
        let (mut c, h) = start(SIZE, false);
        newstyle(&mut c, FLAG_C_FIXED_NEWSTYLE).await;
        let r = opt(&mut c, OPT_GO, &info_data(b"", &[])).await;
        assert!(
            r.iter()
                .any(|(_, d)| d.len() == 14 && be16(d, 0) == INFO_BLOCK_SIZE)
        );
        assert!(
            !r.iter()
                .any(|(_, d)| d.len() >= 2 && be16(d, 0) == INFO_NAME)
        );
        disconnect(c, ReplyMode::Simple, h).await;
    }

    #[tokio::test]
    async fn list_and_abort() {
        let (mut c, h) = start(SIZE, false);
        newstyle(&mut c, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).await;
        let r = opt(&mut c, OPT_LIST, &[]).await;
        assert_eq!(r, vec![(REP_SERVER, vec![0, 0, 0, 0]), (REP_ACK, vec![])]);
        let r = opt(&mut c, OPT_LIST, b"junk").await;
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].0, REP_ERR_INVALID);
        let r = opt(&mut c, OPT_ABORT, &[]).await;
        assert_eq!(r, vec![(REP_ACK, vec![])]);
        finish(h).await.expect("abort is a clean close");
        let mut rest = Vec::new();
        c.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
    }

    #[tokio::test]
    async fn export_name_with_and_without_no_zeroes() {
        for (cflags, len) in [
            (FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES, 10usize),
            (FLAG_C_FIXED_NEWSTYLE, 134),
            (0, 134),
        ] {
            let (mut c, h) = start(SIZE, false);
            newstyle(&mut c, cflags).await;
            send_opt(&mut c, OPT_EXPORT_NAME, b"whatever").await;
            // A request right behind it: its reply must follow the export
            // information immediately, so the length is exact.
            send_req(&mut c, ReplyMode::Simple, 0, CMD_READ, 3, 0, 4, &[]).await;
            let mut b = vec![0xffu8; len + SIMPLE_REPLY_LEN + 4];
            c.read_exact(&mut b).await.unwrap();
            let e = ExportInfo::parse_export_name_reply(&b);
            assert_eq!(e.size, SIZE);
            assert_eq!(e.flags, BASE_FLAGS);
            assert!(b[10..len].iter().all(|&x| x == 0));
            assert_eq!(
                Reply::parse(&b[len..len + SIMPLE_REPLY_LEN]),
                Ok(Some(Reply::Simple {
                    error: 0,
                    cookie: 3
                }))
            );
            assert!(b[len + SIMPLE_REPLY_LEN..].iter().all(|&x| x == 0));
            disconnect(c, ReplyMode::Simple, h).await;
        }
    }

    #[tokio::test]
    async fn unknown_client_flags_close() {
        let (mut c, h) = start(SIZE, false);
        newstyle(&mut c, FLAG_C_FIXED_NEWSTYLE | 4).await;
        assert!(matches!(finish(h).await, Err(NullError::Protocol(_))));
    }

    #[tokio::test]
    async fn starttls_unknown_and_too_big_options() {
        let (mut c, h) = start(SIZE, false);
        newstyle(&mut c, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).await;
        let r = opt(&mut c, OPT_STARTTLS, &[]).await;
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].0, REP_ERR_POLICY);
        assert!(String::from_utf8_lossy(&r[0].1).contains("TLS"));

        let r = opt(&mut c, 99, &[0xaa; 100]).await;
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].0, REP_ERR_UNSUP);
        let r = opt(&mut c, OPT_PEEK_EXPORT, &[]).await;
        assert_eq!(r[0].0, REP_ERR_UNSUP);

        let r = opt(&mut c, OPT_GO, &vec![0u8; MAX_OPTION_DATA + 1]).await;
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].0, REP_ERR_TOO_BIG);

        // The data of all of these was consumed: negotiation goes on.
        let r = opt(&mut c, OPT_LIST, &[]).await;
        assert_eq!(r.last().unwrap().0, REP_ACK);
        let r = opt(&mut c, OPT_GO, &info_data(b"", &[])).await;
        assert_eq!(r.last().unwrap().0, REP_ACK);
        disconnect(c, ReplyMode::Simple, h).await;
    }

    #[tokio::test]
    async fn huge_option_closes() {
        let (mut c, h) = start(SIZE, false);
        newstyle(&mut c, FLAG_C_FIXED_NEWSTYLE).await;
        let hdr = OptionHeader {
            option: OPT_GO,
            length: MAX_OPTION_DATA_HARD + 1,
        };
        c.write_all(&hdr.build()).await.unwrap();
        assert!(matches!(finish(h).await, Err(NullError::Protocol(_))));
    }

    #[tokio::test]
    async fn malformed_go_data() {
        let (mut c, h) = start(SIZE, false);
        newstyle(&mut c, FLAG_C_FIXED_NEWSTYLE).await;
        let mut lying_name = 100u32.to_be_bytes().to_vec();
        lying_name.extend_from_slice(b"abc");
        let mut trailing = info_data(b"x", &[INFO_NAME]);
        trailing.push(0);
        let mut short_list = info_data(b"x", &[INFO_NAME]);
        short_list[5..7].copy_from_slice(&2u16.to_be_bytes());
        let long_name = info_data(&[b'a'; MAX_STRING + 1], &[]);
        for bad in [
            vec![],
            vec![0, 0],
            lying_name,
            trailing,
            short_list,
            vec![0, 0, 0, 0],
            long_name,
        ] {
            for option in [OPT_INFO, OPT_GO] {
                let r = opt(&mut c, option, &bad).await;
                assert_eq!(r.len(), 1, "{bad:?}");
                assert_eq!(r[0].0, REP_ERR_INVALID, "{bad:?}");
                assert!(!r[0].1.is_empty(), "error replies carry a message");
            }
        }
        let r = opt(&mut c, OPT_GO, &info_data(b"x", &[])).await;
        assert_eq!(r.last().unwrap().0, REP_ACK);
        disconnect(c, ReplyMode::Simple, h).await;
    }

    #[tokio::test]
    async fn reply_modes_and_df() {
        let (c, h, flags) = connect(SIZE, ReplyMode::Structured, false).await;
        assert_ne!(flags & FLAG_SEND_DF, 0);
        disconnect(c, ReplyMode::Structured, h).await;
        let (c, h, flags) = connect(SIZE, ReplyMode::Extended, false).await;
        assert_ne!(flags & FLAG_SEND_DF, 0);
        disconnect(c, ReplyMode::Extended, h).await;

        let (mut c, h) = start(SIZE, false);
        newstyle(&mut c, FLAG_C_FIXED_NEWSTYLE).await;
        let r = opt(&mut c, OPT_STRUCTURED_REPLY, b"x").await;
        assert_eq!(r[0].0, REP_ERR_INVALID);
        let r = opt(&mut c, OPT_EXTENDED_HEADERS, b"x").await;
        assert_eq!(r[0].0, REP_ERR_INVALID);
        let r = opt(&mut c, OPT_STRUCTURED_REPLY, &[]).await;
        assert_eq!(r, vec![(REP_ACK, vec![])]);
        let r = opt(&mut c, OPT_EXTENDED_HEADERS, &[]).await;
        assert_eq!(r, vec![(REP_ACK, vec![])]);
        let r = opt(&mut c, OPT_STRUCTURED_REPLY, &[]).await;
        assert_eq!(r[0].0, REP_ERR_EXT_HEADER_REQD);
        // A client that negotiated extended headers must not use EXPORT_NAME.
        send_opt(&mut c, OPT_EXPORT_NAME, b"").await;
        assert!(matches!(finish(h).await, Err(NullError::Protocol(_))));
    }

    #[tokio::test]
    async fn meta_context_negotiation() {
        let (mut c, h) = start(SIZE, false);
        newstyle(&mut c, FLAG_C_FIXED_NEWSTYLE).await;
        opt(&mut c, OPT_STRUCTURED_REPLY, &[]).await;
        let ctx = |id: u32| {
            let mut d = id.to_be_bytes().to_vec();
            d.extend_from_slice(b"base:allocation");
            (REP_META_CONTEXT, d)
        };
        let ack = (REP_ACK, vec![]);
        for (queries, want) in [
            (vec![], vec![ctx(0), ack.clone()]),
            (vec!["base:"], vec![ctx(0), ack.clone()]),
            (vec!["base:allocation", "base:"], vec![ctx(0), ack.clone()]),
            (vec!["qemu:dirty-bitmap:x"], vec![ack.clone()]),
            (vec!["base:other"], vec![ack.clone()]),
        ] {
            let r = opt(&mut c, OPT_LIST_META_CONTEXT, &meta_data(b"", &queries)).await;
            assert_eq!(r, want, "{queries:?}");
        }
        let r = opt(&mut c, OPT_SET_META_CONTEXT, &meta_data(b"", &["base:"])).await;
        assert_eq!(r, vec![ack.clone()]);
        let r = opt(
            &mut c,
            OPT_SET_META_CONTEXT,
            &meta_data(b"", &["base:allocation"]),
        )
        .await;
        assert_eq!(r, vec![ctx(1), ack.clone()]);
        let mut bad = meta_data(b"", &["base:allocation"]);
        bad.push(0);
        let r = opt(&mut c, OPT_LIST_META_CONTEXT, &bad).await;
        assert_eq!(r[0].0, REP_ERR_INVALID);
        let mut lying = meta_data(b"", &[]);
        lying[4..8].copy_from_slice(&u32::MAX.to_be_bytes());
        let r = opt(&mut c, OPT_LIST_META_CONTEXT, &lying).await;
        assert_eq!(r[0].0, REP_ERR_INVALID);
        // A later SET with no queries replaces the selection with nothing.
        let r = opt(&mut c, OPT_SET_META_CONTEXT, &meta_data(b"", &[])).await;
        assert_eq!(r, vec![ack.clone()]);
        let r = opt(&mut c, OPT_GO, &info_data(b"", &[])).await;
        assert_eq!(r.last().unwrap().0, REP_ACK);
        send_req(
            &mut c,
            ReplyMode::Structured,
            0,
            CMD_BLOCK_STATUS,
            1,
            0,
            512,
            &[],
        )
        .await;
        expect_err(&mut c, ReplyMode::Structured, 1, EINVAL).await;
        disconnect(c, ReplyMode::Structured, h).await;
    }
}
