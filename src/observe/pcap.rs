//! `--pcap FILE`: both legs of every connection (client ↔ nbdfault,
//! nbdfault ↔ server) as a pcapng file Wireshark and tshark decode.
//!
//! The proxy sees byte streams, not packets, so the packets are made up:
//! IPv4/TCP with a SYN handshake at connect, a FIN or RST as the side
//! really ended, sequence and acknowledgement numbers that follow the bytes
//! (so TCP reassembly works), the server side of each leg on port 10809
//! (so the NBD dissector finds it) and windows large enough that nothing is
//! ever "full". Each leg is an interface of its own.
//!
//! pcapng needs three block types here (section header, interface
//! description, enhanced packet with a comment), a few dozen lines, so they
//! are written here rather than through a crate. Packets are built on the
//! data path, under a per-connection lock so that their sequence numbers are
//! in file order, and queued for a writer thread ([`super::queue`]): a full
//! queue drops packets (counted, logged once), it never waits.

use std::io::{self, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::lock;
use super::queue::{LineQueue, Writer, create_output};
use crate::intercept::ConnId;

/// Packets queued for the writer at most (each at most one 64 KiB
/// segment, so the queue stays under about 128 MiB however fast traffic
/// comes).
pub const PCAP_QUEUE_PACKETS: usize = 2048;
/// The port the server side of both legs shows.
pub const NBD_PORT: u16 = 10809;
/// Largest TCP payload in one made-up IPv4 packet (total length is 16 bits).
pub(super) const MAX_SEGMENT: u64 = 65535 - 40;
/// Advertised window (65535 << 14, about 1 GiB): a capture never shows a
/// full window, since nothing here acknowledges bytes on its own.
const WINDOW: u16 = 65535;
const WINDOW_SCALE: u8 = 14;

const LINKTYPE_RAW: u16 = 101;
const BLOCK_SHB: u32 = 0x0A0D_0D0A;
const BLOCK_IDB: u32 = 1;
const BLOCK_EPB: u32 = 6;
const OPT_COMMENT: u16 = 1;
const OPT_IF_NAME: u16 = 2;
const OPT_IF_DESCRIPTION: u16 = 3;

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_PSH: u8 = 0x08;
const TCP_ACK: u8 = 0x10;

/// The two legs of a connection: the interface ids of the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Leg {
    /// Client ↔ nbdfault.
    Client = 0,
    /// nbdfault ↔ server.
    Server = 1,
}

/// Which way on a leg: toward the side in the server's role (port 10809),
/// or away from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Way {
    ToServer = 0,
    ToClient = 1,
}

impl Way {
    fn other(self) -> Way {
        match self {
            Way::ToServer => Way::ToClient,
            Way::ToClient => Way::ToServer,
        }
    }
}

/// The capture file: its queue and how much of each message it keeps.
pub(super) struct Pcap {
    queue: LineQueue,
    snaplen: u64,
}

impl Pcap {
    /// Creates (or truncates) `path`, writes the section header and the
    /// two interfaces, and starts the writer. `snaplen`: payload bytes kept
    /// per message, `None` for all.
    pub(super) fn open(path: &Path, snaplen: Option<u64>) -> io::Result<Self> {
        let mut file = create_output(path, "capture")?;
        let mut head = section_header();
        head.extend(interface(
            "client",
            "client <-> nbdfault (the server side is nbdfault)",
        ));
        head.extend(interface(
            "server",
            "nbdfault <-> server (the client side is nbdfault)",
        ));
        file.write_all(&head)?;
        let writer = Writer {
            name: "nbdfault-pcap",
            capacity: PCAP_QUEUE_PACKETS,
            buffer: 256 << 10,
            flush_every: Duration::from_millis(100),
            notice: None,
            what: "packet capture",
        };
        Ok(Self {
            queue: LineQueue::start(writer, Box::new(file))?,
            snaplen: snaplen.unwrap_or(u64::MAX),
        })
    }

    /// Payload bytes kept per message.
    pub(super) fn snaplen(&self) -> u64 {
        self.snaplen
    }

    /// Packets lost so far because the writer fell behind.
    pub(super) fn dropped(&self) -> u64 {
        self.queue.dropped()
    }

    pub(super) fn flush(&self) {
        self.queue.flush(Duration::from_secs(1));
    }

    fn push(&self, block: Vec<u8>) {
        if !self.queue.push(block) && self.queue.dropped() == 1 {
            tracing::warn!(
                "the packet capture's writer is not keeping up: dropping packets \
                 (counted in nbdfault_pcap_packets_dropped_total)"
            );
        }
    }
}

/// One direction of a leg: its end point and the next sequence number.
#[derive(Debug, Clone, Copy)]
struct End {
    addr: Ipv4Addr,
    port: u16,
    seq: u32,
    ip_id: u16,
    /// A FIN or RST went this way: nothing more does.
    closed: bool,
}

/// One connection's made-up TCP state, both legs.
pub(super) struct PcapConn {
    /// `[leg][way]`: the end sending that way.
    ends: Mutex<[[End; 2]; 2]>,
}

impl PcapConn {
    /// Addresses for connection `id`: a TCP/IPv4 client keeps its own;
    /// anything else (unix sockets, IPv6, the null server) gets made-up
    /// loopback addresses, one per connection.
    pub(super) fn new(id: ConnId, peer: &str) -> Self {
        let lo = |a: u8| Ipv4Addr::new(127, a, (id >> 8) as u8, id as u8);
        let port = 32768 + (id % 28000) as u16;
        let (client, client_port) = match peer.parse::<SocketAddr>() {
            Ok(SocketAddr::V4(a)) => (*a.ip(), a.port()),
            _ => (lo(1), port),
        };
        // Distinct sequence number spaces per direction make a mix-up show.
        let end = |addr, port, seq| End {
            addr,
            port,
            seq,
            ip_id: 0,
            closed: false,
        };
        let isn = (id as u32).wrapping_mul(0x9E37_79B9);
        Self {
            ends: Mutex::new([
                [
                    end(client, client_port, isn),
                    end(Ipv4Addr::new(127, 0, 0, 1), NBD_PORT, !isn),
                ],
                [
                    end(lo(2), port, isn ^ 0x5555_5555),
                    end(Ipv4Addr::new(127, 0, 0, 2), NBD_PORT, !isn ^ 0x5555_5555),
                ],
            ]),
        }
    }

    /// The three-way handshake on both legs.
    pub(super) fn connected(&self, pcap: &Pcap) {
        let mut ends = lock(&self.ends);
        for leg in [Leg::Client, Leg::Server] {
            let now = SystemTime::now();
            for (way, flags) in [(Way::ToServer, TCP_SYN), (Way::ToClient, TCP_SYN | TCP_ACK)] {
                let block = packet(&mut ends, leg, way, flags, &[], 0, None, now);
                ends[leg as usize][way as usize].seq += 1;
                pcap.push(block);
            }
            pcap.push(packet(
                &mut ends,
                leg,
                Way::ToServer,
                TCP_ACK,
                &[],
                0,
                None,
                now,
            ));
        }
    }

    /// `len` bytes went `way` on `leg`, of which `kept` (a prefix, at most
    /// `len`) are captured; `comment` goes on the first packet.
    pub(super) fn data(
        &self,
        pcap: &Pcap,
        leg: Leg,
        way: Way,
        kept: &[u8],
        len: u64,
        comment: Option<&str>,
    ) {
        let mut ends = lock(&self.ends);
        if ends[leg as usize][way as usize].closed || len == 0 {
            return;
        }
        let now = SystemTime::now();
        let mut comment = comment;
        for (kept, n) in segments(kept, len) {
            let block = packet(
                &mut ends,
                leg,
                way,
                TCP_ACK | TCP_PSH,
                kept,
                n,
                comment.take(),
                now,
            );
            let e = &mut ends[leg as usize][way as usize];
            e.seq = e.seq.wrapping_add(u32::from(n));
            pcap.push(block);
        }
    }

    /// The side sending `way` on `leg` closed: a FIN, or a RST if `reset`.
    /// Once per way; nothing goes that way after.
    pub(super) fn close(
        &self,
        pcap: &Pcap,
        leg: Leg,
        way: Way,
        reset: bool,
        comment: Option<&str>,
    ) {
        let mut ends = lock(&self.ends);
        if ends[leg as usize][way as usize].closed {
            return;
        }
        let flags = if reset {
            TCP_RST | TCP_ACK
        } else {
            TCP_FIN | TCP_ACK
        };
        let block = packet(
            &mut ends,
            leg,
            way,
            flags,
            &[],
            0,
            comment,
            SystemTime::now(),
        );
        let e = &mut ends[leg as usize][way as usize];
        e.closed = true;
        if !reset {
            e.seq = e.seq.wrapping_add(1);
        }
        if reset {
            // A reset ends the whole leg.
            ends[leg as usize][way.other() as usize].closed = true;
        }
        pcap.push(block);
    }
}

/// The packets of `len` bytes of which `kept` (a prefix) are captured:
/// (captured bytes, payload length) each.
pub(super) fn segments(kept: &[u8], len: u64) -> impl Iterator<Item = (&[u8], u16)> {
    (0..len).step_by(MAX_SEGMENT as usize).map(move |at| {
        let n = (len - at).min(MAX_SEGMENT);
        let from = (at as usize).min(kept.len());
        let to = ((at + n) as usize).min(kept.len());
        (&kept[from..to], n as u16)
    })
}

fn pad4(n: usize) -> usize {
    (4 - n % 4) % 4
}

/// A pcapng option: code, length, value padded to 4 bytes.
fn option(out: &mut Vec<u8>, code: u16, value: &[u8]) {
    // Longer values are cut (an option's length is 16 bits).
    let value = &value[..value.len().min(0xFFF0)];
    out.extend(code.to_le_bytes());
    out.extend((value.len() as u16).to_le_bytes());
    out.extend(value);
    out.extend(std::iter::repeat_n(0, pad4(value.len())));
}

/// A block: type, total length, body, total length again.
fn block(kind: u32, body: &[u8]) -> Vec<u8> {
    let total = (12 + body.len()) as u32;
    let mut b = Vec::with_capacity(total as usize);
    b.extend(kind.to_le_bytes());
    b.extend(total.to_le_bytes());
    b.extend(body);
    b.extend(total.to_le_bytes());
    b
}

fn section_header() -> Vec<u8> {
    let mut body = Vec::new();
    body.extend(0x1A2B_3C4Du32.to_le_bytes());
    body.extend(1u16.to_le_bytes());
    body.extend(0u16.to_le_bytes());
    // Section length: not known.
    body.extend((-1i64).to_le_bytes());
    option(&mut body, 4, b"nbdfault"); // shb_userappl
    option(&mut body, 0, b"");
    block(BLOCK_SHB, &body)
}

fn interface(name: &str, description: &str) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend(LINKTYPE_RAW.to_le_bytes());
    body.extend(0u16.to_le_bytes());
    body.extend(0u32.to_le_bytes()); // no snap length
    option(&mut body, OPT_IF_NAME, name.as_bytes());
    option(&mut body, OPT_IF_DESCRIPTION, description.as_bytes());
    option(&mut body, 0, b"");
    block(BLOCK_IDB, &body)
}

/// One made-up IPv4/TCP packet as an enhanced packet block: `len` payload
/// bytes, of which `kept` are captured.
#[allow(clippy::too_many_arguments)]
fn packet(
    ends: &mut [[End; 2]; 2],
    leg: Leg,
    way: Way,
    flags: u8,
    kept: &[u8],
    len: u16,
    comment: Option<&str>,
    now: SystemTime,
) -> Vec<u8> {
    let ack = ends[leg as usize][way.other() as usize].seq;
    let dst = ends[leg as usize][way.other() as usize];
    let src = &mut ends[leg as usize][way as usize];
    src.ip_id = src.ip_id.wrapping_add(1);
    // SYNs carry the MSS and the window scale; both sides' SYNs must for
    // Wireshark to scale windows.
    let tcp_options: &[u8] = if flags & TCP_SYN != 0 {
        &[2, 4, 0xFF, 0xD7, 1, 3, 3, WINDOW_SCALE]
    } else {
        &[]
    };
    let tcp_len = 20 + tcp_options.len();
    let total = 20 + tcp_len + usize::from(len);
    let mut p = Vec::with_capacity(20 + tcp_len + kept.len());
    // IPv4: no options, don't fragment, TTL 64, TCP.
    p.extend([0x45, 0]);
    p.extend((total as u16).to_be_bytes());
    p.extend(src.ip_id.to_be_bytes());
    p.extend([0x40, 0, 64, 6, 0, 0]);
    p.extend(src.addr.octets());
    p.extend(dst.addr.octets());
    let sum = checksum(&p);
    p[10..12].copy_from_slice(&sum.to_be_bytes());
    // TCP; its checksum is left 0 (Wireshark does not check it by default,
    // and with a snap length the payload is not all there to sum).
    p.extend(src.port.to_be_bytes());
    p.extend(dst.port.to_be_bytes());
    p.extend(src.seq.to_be_bytes());
    p.extend((if flags & TCP_ACK != 0 { ack } else { 0 }).to_be_bytes());
    p.push(((tcp_len / 4) as u8) << 4);
    p.push(flags);
    p.extend(WINDOW.to_be_bytes());
    p.extend([0, 0, 0, 0]);
    p.extend(tcp_options);
    p.extend(kept);

    let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let micros = since.as_micros() as u64;
    let mut body = Vec::with_capacity(20 + p.len() + 4 + comment.map_or(0, |c| c.len() + 8));
    body.extend((leg as u32).to_le_bytes());
    body.extend(((micros >> 32) as u32).to_le_bytes());
    body.extend((micros as u32).to_le_bytes());
    body.extend((p.len() as u32).to_le_bytes());
    body.extend((total as u32).to_le_bytes());
    body.extend(&p);
    body.extend(std::iter::repeat_n(0, pad4(p.len())));
    if let Some(c) = comment {
        option(&mut body, OPT_COMMENT, c.as_bytes());
        option(&mut body, 0, b"");
    }
    block(BLOCK_EPB, &body)
}

/// The Internet checksum of an IPv4 header.
fn checksum(header: &[u8]) -> u16 {
    let mut sum: u32 = header
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xFFFF {
        sum = (sum & 0xFFFF) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_checksum_verifies() {
        let mut ends = PcapConn::new(3, "10.0.0.1:4000").ends.into_inner().unwrap();
        let b = packet(
            &mut ends,
            Leg::Client,
            Way::ToServer,
            TCP_ACK,
            b"abc",
            3,
            Some("hi"),
            SystemTime::now(),
        );
        // Block header (8) + EPB fields (20), then the IPv4 header.
        let ip = &b[28..48];
        assert_eq!(checksum(ip), 0);
        assert_eq!(&ip[12..16], &[10, 0, 0, 1]);
        assert_eq!(
            u32::from_le_bytes(b[4..8].try_into().unwrap()) as usize,
            b.len()
        );
        assert_eq!(b.len() % 4, 0);
    }
}
