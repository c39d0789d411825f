//! The socket to a real NBD server, one per client connection.

use std::time::Duration;

use crate::io::addr::Target;
use crate::io::net::Stream;

/// Connects to `target`, giving up after `timeout` with a message naming
/// the flag that sets it.
pub async fn connect(target: &Target, timeout: Duration) -> std::io::Result<Stream> {
    match tokio::time::timeout(timeout, target.connect()).await {
        Ok(r) => r,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no connection within {timeout:?} (--connect-timeout)"),
        )),
    }
}

/// Tries the upstream once, as at start: connects, waits a moment for the
/// greeting (so the close is a clean end of stream, not a reset of unread
/// bytes) and closes before the handshake. The upstream sees a client come
/// and go; only the connection can fail here.
pub async fn probe(target: &Target, timeout: Duration) -> std::io::Result<()> {
    use tokio::io::AsyncReadExt;
    let (mut r, _w) = connect(target, timeout).await?.into_split();
    let mut greeting = [0u8; 256];
    let wait = timeout.min(Duration::from_secs(1));
    let _ = tokio::time::timeout(wait, r.read(&mut greeting)).await;
    Ok(())
}

/// What can be told of the upstream without connecting to it, since a
/// connection would be spent (a server that serves one client, such as
/// qemu-nbd without `--persistent`, would serve only the look): a unix
/// socket path must be a socket, a host name must resolve.
pub async fn look(target: &Target) -> std::io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    match target {
        Target::Unix(path) => {
            if std::fs::metadata(path)?.file_type().is_socket() {
                Ok(())
            } else {
                Err(std::io::Error::other("not a socket"))
            }
        }
        // An address literal (with a zone, too) needs no lookup.
        Target::Tcp { host, .. }
            if host.contains('%') || host.parse::<std::net::IpAddr>().is_ok() =>
        {
            Ok(())
        }
        Target::Tcp { host, port } => tokio::net::lookup_host((host.as_str(), *port))
            .await
            .map(drop),
    }
}
