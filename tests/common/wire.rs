//! Raw NBD bytes for the small hostile peers some tests write themselves
//! (a client that floods, one that leaves mid-write), where no real client
//! would do what the test needs.

/// NBD_REQUEST_MAGIC.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;

/// A compact (non-extended) request header with no flags.
pub fn request(command: u16, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
    let mut b = REQUEST_MAGIC.to_be_bytes().to_vec();
    b.extend(0u16.to_be_bytes());
    b.extend(command.to_be_bytes());
    b.extend(cookie.to_be_bytes());
    b.extend(offset.to_be_bytes());
    b.extend(len.to_be_bytes());
    b
}
