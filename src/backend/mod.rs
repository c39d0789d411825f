//! What sits behind the proxy: a socket to a real NBD server, or the
//! built-in null server on an in-memory stream. Both hand the pipeline a
//! [`Stream`], so every fault behaves the same in front of either. (The
//! null server is also the fake disk behind `nbdfault legacy`.)

pub mod null;
pub mod upstream;

use std::time::Duration;

use tracing::debug;

use crate::intercept::ConnId;
use crate::io::addr::Target;
use crate::io::mempipe;
use crate::io::net::Stream;
use crate::proxy::FLOW_BUFFER;
use null::NullConfig;

/// What sits behind the proxy.
#[derive(Debug, Clone)]
pub enum Backend {
    /// A real NBD server.
    Upstream(Target),
    /// The built-in zero disk.
    Null(NullConfig),
}

impl Backend {
    /// The server side of connection `conn`: a fresh socket to the real
    /// server (within `connect_timeout`), or a fresh null server.
    pub async fn open(&self, conn: ConnId, connect_timeout: Duration) -> std::io::Result<Stream> {
        match self {
            Backend::Upstream(target) => upstream::connect(target, connect_timeout).await,
            Backend::Null(cfg) => {
                // Read data crosses this pipe as zero runs, not bytes.
                let (near, far) = mempipe::pair(FLOW_BUFFER);
                let cfg = cfg.clone();
                tokio::spawn(async move {
                    if let Err(e) = null::serve(far, &cfg).await {
                        debug!(conn, "null server: {e}");
                    }
                });
                Ok(Stream::Mem(near))
            }
        }
    }
}
