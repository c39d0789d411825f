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
