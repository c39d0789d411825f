//! Sockets and threads: everything below the pipeline that moves bytes or
//! runs tasks, with no NBD knowledge. `pages` holds the crate's one
//! `unsafe` call (vmsplice), with the rules that keep it sound.

pub mod addr;
pub mod busypoll;
pub mod mempipe;
pub mod net;
pub mod pages;
pub mod percent;
pub mod shards;
pub mod splice;
