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
