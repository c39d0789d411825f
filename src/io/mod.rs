//! Sockets and threads: everything below the pipeline that moves bytes or
//! runs tasks, with no NBD knowledge.

pub mod addr;
pub mod busypoll;
pub mod mempipe;
pub mod net;
pub mod percent;
pub mod shards;
