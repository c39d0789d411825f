//! Noticing that a peer went away without reading what it sent.
//!
//! A held flow (stalled, delayed, paused, or waiting for room to queue an
//! answer) reads its source only while its buffer has room: bytes past the
//! hold must stay unread. A client that sent more than that and left would
//! then never be noticed, and its connection, descriptors and
//! `--max-connections` slot would stay taken. The kernel knows, though: a
//! socket whose peer sent FIN or RST polls as read-hung-up (EPOLLRDHUP,
//! EPOLLHUP) even with data still queued. This watches for exactly that on
//! a duplicate of the socket's descriptor, registered on its own, so the
//! readiness it clears is never the readiness the flow's own reads rely on.
//!
//! In-memory streams have no watcher: their far end is the built-in null
//! server, which never leaves on its own before the client's side has
//! ended or failed. A hold on one watches the client's socket, its sink,
//! instead (see `flow.rs`).

use std::io;

use tokio::io::Interest;
use tokio::net::{TcpStream, UnixStream};

use super::splice::Socket;

/// A socket's read side, watched for its peer's FIN or RST: a duplicate of
/// its descriptor with a registration of its own.
pub enum HangupWatch {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl HangupWatch {
    pub fn new(socket: Socket<'_>) -> io::Result<Self> {
        let fd = socket.fd().try_clone_to_owned()?;
        // The duplicate shares the original's non-blocking mode.
        Ok(match socket {
            Socket::Tcp(_) => Self::Tcp(TcpStream::from_std(fd.into())?),
            Socket::Unix(_) => Self::Unix(UnixStream::from_std(fd.into())?),
        })
    }

    fn socket(&self) -> Socket<'_> {
        match self {
            Self::Tcp(s) => Socket::Tcp(s),
            Self::Unix(s) => Socket::Unix(s),
        }
    }

    /// Resolves once the peer has closed its sending side or the connection
    /// failed. Data arriving meanwhile wakes it too; that readiness is
    /// cleared (on this duplicate only) and the wait goes on.
    pub async fn hung_up(&self) -> io::Result<()> {
        let socket = self.socket();
        loop {
            let r = socket.ready(Interest::READABLE).await?;
            if r.is_read_closed() || r.is_error() {
                return Ok(());
            }
            let _ = socket.try_io(Interest::READABLE, || {
                Err::<(), _>(io::ErrorKind::WouldBlock.into())
            });
        }
    }
}

/// Waits on `watch` if there is one; forever otherwise.
pub async fn hung_up(watch: Option<&HangupWatch>) -> io::Result<()> {
    match watch {
        Some(w) => w.hung_up().await,
        None => std::future::pending().await,
    }
}
