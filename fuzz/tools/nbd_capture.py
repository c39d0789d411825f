#!/usr/bin/env python3
"""Record real NBD sessions and turn them into fuzz seeds.

  nbd_capture.py capture --listen 127.0.0.1:PORT --upstream 127.0.0.1:PORT \
      --out DIR/NAME [--connections N] [--max-bytes N]

    A plain relay between one client and one server: it accepts N client
    connections (one at a time), connects each to the upstream, and copies
    bytes both ways unchanged. For connection i it writes
      NAME-i.to_server   every byte the client sent
      NAME-i.to_client   every byte the server sent
      NAME-i.records     both, in the order the relay read them (the
                         session_both record encoding, see below)
    Recording stops (relaying goes on) once --max-bytes have been recorded,
    so a large copy leaves a small capture whose last message is cut short.

  nbd_capture.py seeds --captures DIR --corpus fuzz/corpus

    Writes seeds for every target from the captures in DIR. Each seed file
    is named after its capture, so rerunning replaces rather than adds.

Seed formats (see fuzz/src/session.rs and fuzz/src/wire.rs):
  session_to_server  [state][cfg][0][client bytes]   state 0: fresh session,
                     the harness's simulated server greets and ACKs options
  session_to_client  [state][cfg][0][server bytes]   state 0/1: fresh
                     session, the harness's client negotiates structured /
                     extended replies then sends requests
  session_both       [cfg][0][records]   record: byte h (h >> 6: 0 client
                     bytes, 1 server bytes), byte l, then
                     ((h & 63) << 8 | l) bytes
  wire_headers       [sel][8 op bytes][one header and what follows it]
"""

import argparse
import os
import selectors
import socket
import struct
import sys

TO_SERVER, TO_CLIENT = 0, 1
NAMES = {TO_SERVER: "to_server", TO_CLIENT: "to_client"}


def parse_addr(s):
    host, _, port = s.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)


def relay(client, upstream, max_bytes):
    """Copies both ways until both sides are done; returns the records
    [(direction, bytes)] in arrival order, cut at max_bytes."""
    sel = selectors.DefaultSelector()
    peers = {client: (upstream, TO_SERVER), upstream: (client, TO_CLIENT)}
    for s in peers:
        sel.register(s, selectors.EVENT_READ)
    open_reads = 2
    records = []
    recorded = 0
    while open_reads:
        for key, _ in sel.select():
            src = key.fileobj
            dst, direction = peers[src]
            try:
                data = src.recv(65536)
            except ConnectionError:
                data = b""
            if not data:
                sel.unregister(src)
                open_reads -= 1
                try:
                    dst.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                continue
            try:
                dst.sendall(data)
            except OSError:
                pass
            if recorded < max_bytes:
                keep = data[: max_bytes - recorded]
                records.append((direction, keep))
                recorded += len(keep)
    sel.close()
    return records


def encode_records(records):
    out = bytearray()
    for direction, data in records:
        for i in range(0, len(data), 16383):
            piece = data[i : i + 16383]
            tag = 0x00 if direction == TO_SERVER else 0x40
            out.append(tag | (len(piece) >> 8))
            out.append(len(piece) & 0xFF)
            out += piece
    return bytes(out)


def capture(args):
    lhost, lport = parse_addr(args.listen)
    uhost, uport = parse_addr(args.upstream)
    ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind((lhost, lport))
    ls.listen(1)
    ls.settimeout(args.timeout)
    print(f"capture: listening on {lhost}:{lport}", flush=True)
    for i in range(args.connections):
        client, _ = ls.accept()
        upstream = socket.create_connection((uhost, uport))
        records = relay(client, upstream, args.max_bytes)
        client.close()
        upstream.close()
        base = f"{args.out}-{i}"
        os.makedirs(os.path.dirname(base) or ".", exist_ok=True)
        for d in (TO_SERVER, TO_CLIENT):
            with open(f"{base}.{NAMES[d]}", "wb") as f:
                f.write(b"".join(b for (dd, b) in records if dd == d))
        with open(f"{base}.records", "wb") as f:
            f.write(encode_records(records))
        total = sum(len(b) for _, b in records)
        print(f"capture: {base}: {len(records)} reads, {total} bytes", flush=True)
    ls.close()


# Magic numbers, to pick headers out of a capture for wire_headers.
REQUEST_MAGICS = (0x25609513, 0x21E41C71)
REPLY_MAGICS = (0x67446698, 0x668E33EF, 0x6E8A278C)
IHAVEOPT = b"IHAVEOPT"
OPTION_REPLY_MAGIC = struct.pack(">Q", 0x0003E889045565A9)


def header_offsets(data, magics, limit=6):
    """Offsets of the first few distinct 4-byte magics in data (a rough
    scan: payload bytes may look like a magic, which only makes a seed
    less typical)."""
    found = []
    seen = set()
    for i in range(0, max(0, len(data) - 3)):
        m = struct.unpack_from(">I", data, i)[0]
        if m in magics:
            key = (m, data[i + 4 : i + 8])
            if key not in seen:
                seen.add(key)
                found.append(i)
                if len(found) >= limit:
                    break
    return found


def write_seed(corpus, target, name, data):
    d = os.path.join(corpus, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def seeds(args):
    caps = sorted(f[: -len(".records")] for f in os.listdir(args.captures) if f.endswith(".records"))
    if not caps:
        sys.exit(f"no captures in {args.captures}")
    cfg = 0x60  # big payload limit; simulated server greets FIXED|NO_ZEROES
    # Every starting state, with no stream and with the small payload limit.
    for state in range(6):
        write_seed(args.corpus, "session_to_server", f"state-{state}", bytes([state, 0x80 | cfg, 0]))
    for state in range(8):
        write_seed(args.corpus, "session_to_client", f"state-{state}", bytes([state, 0x80 | cfg, 0]))
    for cap in caps:
        path = os.path.join(args.captures, cap)
        to_server = open(path + ".to_server", "rb").read()
        to_client = open(path + ".to_client", "rb").read()
        records = open(path + ".records", "rb").read()
        cut = args.max_seed
        write_seed(args.corpus, "session_both", cap, bytes([0x00, 0x00]) + records[:cut])
        # Oldstyle: the client's bytes are requests from the start (state 1
        # of to_server), and the harness's client must send only requests
        # (state 3 of to_client). Else a fresh newstyle session (state 0),
        # and a client asking for the reply headers the server used.
        oldstyle = to_client[8:16] == struct.pack(">Q", 0x00420281861253)
        ext = struct.pack(">I", 0x6E8A278C) in to_client
        server_state = 1 if oldstyle else 0
        client_state = 3 if oldstyle else 1 if ext else 0
        write_seed(args.corpus, "session_to_server", cap, bytes([server_state, cfg, 0]) + to_server[:cut])
        write_seed(args.corpus, "session_to_client", cap, bytes([client_state, cfg, 0]) + to_client[:cut])
        picks = [(to_server, o) for o in header_offsets(to_server, REQUEST_MAGICS)]
        picks += [(to_client, o) for o in header_offsets(to_client, REPLY_MAGICS)]
        for name, (data, off) in enumerate(picks):
            sel = name % 3
            write_seed(args.corpus, "wire_headers", f"{cap}-{name}", bytes([sel]) + bytes(8) + data[off : off + 64])
        for data, magic in ((to_server, IHAVEOPT), (to_client, OPTION_REPLY_MAGIC)):
            off = data.find(magic)
            if off >= 0:
                write_seed(args.corpus, "wire_headers", f"{cap}-opt{data is to_client:d}", bytes([0]) + bytes(range(8)) + data[off : off + 64])
        print(f"seeds: {cap}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("capture")
    c.add_argument("--listen", required=True)
    c.add_argument("--upstream", required=True)
    c.add_argument("--out", required=True)
    c.add_argument("--connections", type=int, default=1)
    c.add_argument("--max-bytes", type=int, default=48 << 10)
    c.add_argument("--timeout", type=float, default=60)
    s = sub.add_parser("seeds")
    s.add_argument("--captures", required=True)
    s.add_argument("--corpus", required=True)
    s.add_argument("--max-seed", type=int, default=48 << 10)
    args = p.parse_args()
    capture(args) if args.cmd == "capture" else seeds(args)


if __name__ == "__main__":
    main()
