//! Reading fuzzer bytes as a few choices followed by a stream.

/// A cursor that never fails: past the end, every choice reads as zero.
pub struct Input<'a> {
    b: &'a [u8],
}

impl<'a> Input<'a> {
    pub fn new(b: &'a [u8]) -> Self {
        Self { b }
    }

    pub fn byte(&mut self) -> u8 {
        match self.b.split_first() {
            Some((&x, rest)) => {
                self.b = rest;
                x
            }
            None => 0,
        }
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_be_bytes([self.byte(), self.byte()])
    }

    pub fn u64(&mut self) -> u64 {
        let mut v = 0u64;
        for _ in 0..8 {
            v = v << 8 | u64::from(self.byte());
        }
        v
    }

    /// Up to `n` bytes (fewer at the end of the input).
    pub fn take(&mut self, n: usize) -> &'a [u8] {
        let (head, rest) = self.b.split_at(n.min(self.b.len()));
        self.b = rest;
        head
    }

    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.b)
    }

    pub fn is_empty(&self) -> bool {
        self.b.is_empty()
    }
}

/// Read boundaries: how many bytes each read returns, cycled.
#[derive(Debug, Clone)]
pub struct Cuts {
    sizes: Vec<usize>,
}

impl Cuts {
    /// One byte of count (0..=16), then that many sizes of 1..=256 bytes.
    /// A count of 0 means a fixed mix of tiny and large reads.
    pub fn read(inp: &mut Input<'_>) -> Self {
        let n = inp.byte() % 17;
        let sizes = if n == 0 {
            vec![1, 7, 3, 64, 2, 4096]
        } else {
            (0..n).map(|_| usize::from(inp.byte()) + 1).collect()
        };
        Self { sizes }
    }

    /// An iterator over the read sizes, forever.
    pub fn cycle(&self) -> impl Iterator<Item = usize> + '_ {
        self.sizes.iter().copied().cycle()
    }
}

/// Splits `data` into pieces of the sizes `sizes` yields.
pub fn split<'a>(data: &'a [u8], sizes: &mut impl Iterator<Item = usize>) -> Vec<&'a [u8]> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < data.len() {
        let n = sizes
            .next()
            .unwrap_or(data.len())
            .max(1)
            .min(data.len() - at);
        out.push(&data[at..at + n]);
        at += n;
    }
    out
}
