//! Listening sockets, upstream connections and stream halves.
//!
//! The proxy treats TCP, unix-socket and in-memory connections alike. These
//! enums hide which one is in use, so the forwarding code is written once and
//! tests can drive it over an in-memory pipe without touching the network.

use std::io;
use std::net::IpAddr;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream, tcp, unix};

use crate::io::addr::{ListenAddr, Target, nbd_uri_for_tcp, nbd_uri_for_unix};
use crate::io::mempipe::{MemReadHalf, MemStream, MemWriteHalf, WriteZeroes};

/// A bound listening socket.
#[derive(Debug)]
pub enum Listener {
    Tcp(TcpListener),
    Unix {
        listener: UnixListener,
        path: PathBuf,
        /// Identity of the socket file we created, so that dropping the
        /// listener never deletes a file someone else put at `path`.
        socket_id: SocketFileId,
    },
}

/// Device and inode of a socket file, recorded when it is bound. Only
/// [`Listener::bind`] can make one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketFileId {
    dev: u64,
    ino: u64,
}

impl SocketFileId {
    fn of(path: &Path) -> io::Result<SocketFileId> {
        let meta = std::fs::symlink_metadata(path)?;
        Ok(SocketFileId {
            dev: meta.dev(),
            ino: meta.ino(),
        })
    }
}

impl Listener {
    /// Binds `addr`. A host name binds its first resolved address. A unix
    /// socket path must not exist yet, and the socket is made owner-only.
    /// Errors do not repeat `addr`: callers already name it in their context.
    pub async fn bind(addr: &ListenAddr) -> io::Result<Listener> {
        match addr {
            ListenAddr::Tcp { host, port } => {
                let sock_addr = tokio::net::lookup_host((host.as_str(), *port))
                    .await
                    .map_err(|e| with_context(e, &format!("cannot resolve {host:?}")))?
                    .next()
                    .ok_or_else(|| no_addresses(host))?;
                Ok(Listener::Tcp(TcpListener::bind(sock_addr).await?))
            }
            ListenAddr::Unix(path) => bind_unix(path),
        }
    }

    /// NBD URI of the bound socket with the real port:
    /// `nbd://127.0.0.1:PORT`, `nbd://[::1]:PORT` or `nbd+unix:///?socket=PATH`.
    pub fn uri(&self) -> String {
        match self {
            // getsockname on a bound socket does not fail in practice; the
            // fallback keeps this infallible for log lines.
            Listener::Tcp(listener) => match listener.local_addr() {
                Ok(local) => nbd_uri_for_tcp(local),
                Err(e) => format!("nbd://(unknown address: {e})"),
            },
            Listener::Unix { path, .. } => nbd_uri_for_unix(path),
        }
    }

    /// Accepts one connection. Returns the stream and a printable peer
    /// description: `IP:PORT` for TCP, the peer's path or `unix` otherwise.
    pub async fn accept(&self) -> io::Result<(Stream, String)> {
        match self {
            Listener::Tcp(listener) => {
                let (stream, peer) = listener.accept().await?;
                set_nodelay(&stream, &peer.to_string());
                Ok((Stream::Tcp(stream), peer.to_string()))
            }
            Listener::Unix { listener, .. } => {
                let (stream, peer) = listener.accept().await?;
                // Clients normally connect from unnamed sockets.
                let peer = peer
                    .as_pathname()
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|| "unix".to_string());
                Ok((Stream::Unix(stream), peer))
            }
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix {
            path, socket_id, ..
        } = self
        {
            // Best effort: on failure the stale file is reported at the next
            // bind, which refuses existing paths.
            if SocketFileId::of(path).is_ok_and(|id| id == *socket_id) {
                let _ = std::fs::remove_file(path);
            }
        }
    }
}

fn bind_unix(path: &Path) -> io::Result<Listener> {
    // Refuse rather than unlink: the path may be another server's live
    // socket or an unrelated file.
    match std::fs::symlink_metadata(path) {
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!(
                    "{} already exists (remove it if it is a stale socket)",
                    path.display()
                ),
            ));
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    // Created owner-only: with the process umask, the file would be
    // connectable by others (a connection queued in that window would
    // be served later), so the umask is tightened just around the bind.
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let listener = UnixListener::bind(path);
    nix::sys::stat::umask(old);
    let listener = listener?;
    let socket_id = match SocketFileId::of(path) {
        Ok(id) => id,
        Err(e) => {
            // We just created it, so it is ours to clean up.
            let _ = std::fs::remove_file(path);
            return Err(e);
        }
    };
    // Built before chmod so that Drop removes the file if chmod fails.
    let bound = Listener::Unix {
        listener,
        path: path.to_path_buf(),
        socket_id,
    };
    // Connecting needs write permission on the socket file; owner-only keeps
    // other local users from reaching the proxy. Set explicitly too, in
    // case the umask was ignored (fchmod on a socket fd does not affect the
    // path on Linux).
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| with_context(e, "cannot make the socket owner-only"))?;
    Ok(bound)
}

impl Target {
    /// Connects to the upstream server. A host name is resolved and each
    /// address tried in turn; TCP connections get `TCP_NODELAY`. Errors do
    /// not repeat the target: callers already name it in their context.
    pub async fn connect(&self) -> io::Result<Stream> {
        match self {
            Target::Tcp { host, port } => {
                let addrs = tokio::net::lookup_host((host.as_str(), *port))
                    .await
                    .map_err(|e| with_context(e, &format!("cannot resolve {host:?}")))?;
                let mut last_err = None;
                for sock_addr in addrs {
                    match TcpStream::connect(sock_addr).await {
                        Ok(stream) => {
                            set_nodelay(&stream, &sock_addr.to_string());
                            return Ok(Stream::Tcp(stream));
                        }
                        Err(e) => last_err = Some((sock_addr, e)),
                    }
                }
                Err(match last_err {
                    // Name the address tried only when it adds information.
                    Some((_, e)) if host.parse::<IpAddr>().is_ok() => e,
                    Some((sock_addr, e)) => {
                        io::Error::new(e.kind(), format!("{e} (last tried {sock_addr})"))
                    }
                    None => no_addresses(host),
                })
            }
            Target::Unix(path) => Ok(Stream::Unix(UnixStream::connect(path).await?)),
        }
    }
}

/// At most this many bytes the proxy wrote to a TCP socket wait unsent in
/// the kernel (TCP_NOTSENT_LOWAT); past that the socket reads as not
/// writable. Why: bytes queued beyond what the congestion window lets out
/// are sent later by whoever processes the peer's ACKs, and on loopback that
/// is the peer itself, inside its recv(2): with the kernel's default (no
/// limit) the proxy ran megabytes ahead and a client reading from it spent
/// 1.5-1.9x the CPU it spends reading directly (README, Performance). With a
/// short queue the proxy sends its own bytes, from its own write. 128 KiB to
/// 512 KiB measured alike; 256 KiB is one flow buffer.
const NOTSENT_LOWAT: u32 = 256 << 10;

/// NBD replies are small and latency-bound, so Nagle's algorithm would only
/// add delay; and the unsent queue is kept short (see [`NOTSENT_LOWAT`]).
/// Failing either is not worth dropping the connection.
fn set_nodelay(stream: &TcpStream, peer: &str) {
    if let Err(e) = stream.set_nodelay(true) {
        tracing::warn!(peer, "cannot set TCP_NODELAY: {e}");
    }
    if let Err(e) = socket2::SockRef::from(stream).set_tcp_notsent_lowat(NOTSENT_LOWAT) {
        tracing::warn!(peer, "cannot set TCP_NOTSENT_LOWAT: {e}");
    }
}

/// Prefixes an error with the step that failed, keeping its kind so callers
/// can still match on it.
fn with_context(e: io::Error, context: &str) -> io::Error {
    io::Error::new(e.kind(), format!("{context}: {e}"))
}

fn no_addresses(host: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::NotFound,
        format!("{host:?} resolved to no addresses"),
    )
}

/// One connection, whichever transport carries it.
#[derive(Debug)]
pub enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
    /// In-memory pipe, for tests and for embedding the proxy.
    Mem(MemStream),
}

/// Reading half of a [`Stream`].
#[derive(Debug)]
pub enum ReadHalf {
    Tcp(tcp::OwnedReadHalf),
    Unix(unix::OwnedReadHalf),
    Mem(MemReadHalf),
}

/// Writing half of a [`Stream`]. Shutting it down sends EOF to the peer
/// while the reading half stays usable.
#[derive(Debug)]
pub enum WriteHalf {
    Tcp(tcp::OwnedWriteHalf),
    Unix(unix::OwnedWriteHalf),
    Mem(MemWriteHalf),
}

impl Stream {
    /// Splits into halves that can be moved to separate tasks, so each
    /// direction of the proxy is forwarded independently.
    pub fn into_split(self) -> (ReadHalf, WriteHalf) {
        match self {
            Stream::Tcp(s) => {
                let (r, w) = s.into_split();
                (ReadHalf::Tcp(r), WriteHalf::Tcp(w))
            }
            Stream::Unix(s) => {
                let (r, w) = s.into_split();
                (ReadHalf::Unix(r), WriteHalf::Unix(w))
            }
            Stream::Mem(s) => {
                let (r, w) = s.into_split();
                (ReadHalf::Mem(r), WriteHalf::Mem(w))
            }
        }
    }
}

impl From<TcpStream> for Stream {
    fn from(s: TcpStream) -> Self {
        Stream::Tcp(s)
    }
}

impl From<UnixStream> for Stream {
    fn from(s: UnixStream) -> Self {
        Stream::Unix(s)
    }
}

impl From<MemStream> for Stream {
    fn from(s: MemStream) -> Self {
        Stream::Mem(s)
    }
}

/// The same expression for every variant of a stream enum: `s` is bound to
/// the wrapped value.
macro_rules! each {
    ($enum:ident, $value:expr, $s:ident => $body:expr) => {
        match $value {
            $enum::Tcp($s) => $body,
            $enum::Unix($s) => $body,
            $enum::Mem($s) => $body,
        }
    };
}

// Every wrapped type is Unpin, so each method just re-pins the inner value.

/// AsyncRead for a stream enum, by delegation.
macro_rules! delegate_read {
    ($enum:ident) => {
        impl AsyncRead for $enum {
            fn poll_read(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &mut ReadBuf<'_>,
            ) -> Poll<io::Result<()>> {
                each!($enum, self.get_mut(), s => Pin::new(s).poll_read(cx, buf))
            }
        }
    };
}

/// AsyncWrite and WriteZeroes for a stream enum, by delegation. Zeroes go
/// down an in-memory pipe as a length; sockets get real bytes.
macro_rules! delegate_write {
    ($enum:ident) => {
        impl AsyncWrite for $enum {
            fn poll_write(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &[u8],
            ) -> Poll<io::Result<usize>> {
                each!($enum, self.get_mut(), s => Pin::new(s).poll_write(cx, buf))
            }

            fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                each!($enum, self.get_mut(), s => Pin::new(s).poll_flush(cx))
            }

            fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                each!($enum, self.get_mut(), s => Pin::new(s).poll_shutdown(cx))
            }

            fn poll_write_vectored(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                bufs: &[io::IoSlice<'_>],
            ) -> Poll<io::Result<usize>> {
                each!($enum, self.get_mut(), s => Pin::new(s).poll_write_vectored(cx, bufs))
            }

            fn is_write_vectored(&self) -> bool {
                each!($enum, self, s => s.is_write_vectored())
            }
        }

        impl WriteZeroes for $enum {
            fn poll_write_zeroes(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                n: u64,
            ) -> Poll<io::Result<u64>> {
                each!($enum, self.get_mut(), s => Pin::new(s).poll_write_zeroes(cx, n))
            }
        }
    };
}

delegate_read!(Stream);
delegate_read!(ReadHalf);
delegate_write!(Stream);
delegate_write!(WriteHalf);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::mempipe;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Sends bytes both ways through split halves, then checks that shutting
    /// down each write half shows up as EOF on the other side.
    async fn exchange(client: Stream, server: Stream) {
        let (mut cr, mut cw) = client.into_split();
        let (mut sr, mut sw) = server.into_split();

        cw.write_all(b"request").await.unwrap();
        let mut buf = [0u8; 7];
        sr.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"request");

        // Vectored writes must arrive intact too.
        let parts = [io::IoSlice::new(b"rep"), io::IoSlice::new(b"ly")];
        let n = sw.write_vectored(&parts).await.unwrap();
        assert!(n > 0);
        // A vectored write may be partial; send the remainder plainly.
        sw.write_all(&b"reply"[n..]).await.unwrap();
        sw.flush().await.unwrap();
        let mut buf = [0u8; 5];
        cr.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"reply");

        // Client half-closes; server sees EOF but can still answer.
        cw.write_all(b"last").await.unwrap();
        cw.shutdown().await.unwrap();
        let mut rest = Vec::new();
        sr.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"last");

        sw.write_all(b"bye").await.unwrap();
        sw.shutdown().await.unwrap();
        let mut rest = Vec::new();
        cr.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"bye");
    }

    async fn connect_and_accept(listener: &Listener, target: &Target) -> (Stream, Stream, String) {
        let (client, accepted) = tokio::join!(target.connect(), listener.accept());
        let (server, peer) = accepted.unwrap();
        (client.unwrap(), server, peer)
    }

    fn assert_nodelay(s: &Stream) {
        match s {
            Stream::Tcp(t) => {
                assert!(t.nodelay().unwrap());
                let lowat = socket2::SockRef::from(t).tcp_notsent_lowat().unwrap();
                assert_eq!(lowat, NOTSENT_LOWAT);
            }
            other => panic!("expected TCP, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn tcp_ipv4_roundtrip() {
        let listener = Listener::bind(&"127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let Listener::Tcp(inner) = &listener else {
            panic!("expected a TCP listener");
        };
        let port = inner.local_addr().unwrap().port();
        assert_ne!(port, 0);
        let uri = listener.uri();
        assert_eq!(uri, format!("nbd://127.0.0.1:{port}"));

        let target: Target = uri.parse().unwrap();
        let (client, server, peer) = connect_and_accept(&listener, &target).await;
        let peer: std::net::SocketAddr = peer.parse().unwrap();
        assert_eq!(peer.ip().to_string(), "127.0.0.1");
        assert_nodelay(&client);
        assert_nodelay(&server);
        exchange(client, server).await;
    }

    #[tokio::test]
    async fn tcp_ipv6_roundtrip() {
        // Some CI containers have no IPv6 at all; only then is skipping fine.
        if std::net::TcpListener::bind("[::1]:0").is_err() {
            eprintln!("skipping: cannot bind [::1] (no IPv6 on this host)");
            return;
        }
        let listener = Listener::bind(&"[::1]:0".parse().unwrap()).await.unwrap();
        let Listener::Tcp(inner) = &listener else {
            panic!("expected a TCP listener");
        };
        let local = inner.local_addr().unwrap();
        assert!(local.is_ipv6());
        assert_ne!(local.port(), 0);
        assert_eq!(listener.uri(), format!("nbd://[::1]:{}", local.port()));

        let target: Target = listener.uri().parse().unwrap();
        let (client, server, peer) = connect_and_accept(&listener, &target).await;
        assert!(peer.starts_with("[::1]:"), "{peer}");
        exchange(client, server).await;
    }

    #[tokio::test]
    async fn tcp_bind_host_name() {
        let listener = Listener::bind(&"localhost:0".parse().unwrap())
            .await
            .unwrap();
        assert!(listener.uri().starts_with("nbd://"));
        assert!(!listener.uri().ends_with(":0"));
    }

    #[tokio::test]
    async fn tcp_bind_in_use_fails() {
        let first = Listener::bind(&"127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let taken = first.uri().trim_start_matches("nbd://").to_string();
        let err = Listener::bind(&taken.parse().unwrap()).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
    }

    #[tokio::test]
    async fn unix_socket_lifecycle() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.sock");
        let listener = Listener::bind(&ListenAddr::Unix(path.clone()))
            .await
            .unwrap();

        let meta = std::fs::symlink_metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(
            listener.uri(),
            format!("nbd+unix:///?socket={}", path.display())
        );
        let target: Target = listener.uri().parse().unwrap();
        assert_eq!(target, Target::Unix(path.clone()));

        let (client, server, peer) = connect_and_accept(&listener, &target).await;
        assert_eq!(peer, "unix");
        exchange(client, server).await;

        drop(listener);
        assert!(!path.exists(), "socket file left behind");
    }

    #[tokio::test]
    async fn unix_bind_refuses_existing_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("taken");
        std::fs::write(&path, b"not a socket").unwrap();

        let err = Listener::bind(&ListenAddr::Unix(path.clone()))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        let msg = err.to_string();
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        assert!(msg.contains("already exists"), "{msg}");
        assert_eq!(std::fs::read(&path).unwrap(), b"not a socket");

        // A live socket from another listener is refused the same way.
        let sock = dir.path().join("live.sock");
        let _first = Listener::bind(&ListenAddr::Unix(sock.clone()))
            .await
            .unwrap();
        let err = Listener::bind(&ListenAddr::Unix(sock.clone()))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert!(sock.exists());
    }

    #[tokio::test]
    async fn unix_drop_spares_replaced_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.sock");
        let listener = Listener::bind(&ListenAddr::Unix(path.clone()))
            .await
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, b"someone else's").unwrap();
        drop(listener);
        assert_eq!(std::fs::read(&path).unwrap(), b"someone else's");
    }

    #[tokio::test]
    async fn connect_failure_keeps_kind() {
        let dir = tempfile::tempdir().unwrap();
        let target = Target::Unix(dir.path().join("nobody.sock"));
        let err = target.connect().await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }

    #[tokio::test]
    async fn mem_roundtrip() {
        let (a, b) = mempipe::pair(64);
        exchange(Stream::from(a), Stream::Mem(b)).await;
    }

    #[tokio::test]
    async fn whole_stream_is_async_read_write() {
        let (a, b) = mempipe::pair(64);
        let (mut a, mut b) = (Stream::Mem(a), Stream::Mem(b));
        a.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        b.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");
    }
}
