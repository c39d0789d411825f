//! The volatile write cache of one export, without I/O: the ordered log of
//! writes, write-zeroes and trims answered but not yet written back, the
//! overlay a read sees, and the seeded choice of what a power loss lets
//! through. Kept apart from sockets so it can be property-tested against a
//! plain byte array.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use bytes::Bytes;

use crate::intercept::{Lose, PowerLoss};
use crate::rules::rng;

/// What a cached command does to its extent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Write(Bytes),
    /// Write-zeroes, with the client's command flags (NO_HOLE, FAST_ZERO).
    Zero(u16),
    /// Reads as zeroes here; the server may keep the old data (a trim is
    /// advisory), and either is what the spec allows.
    Trim,
}

/// One cached command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Order of arrival: write-back and overlays go by it.
    pub seq: u64,
    pub offset: u64,
    pub len: u64,
    pub op: Op,
}

/// What one cached command costs against `--cache-size` beyond its data:
/// its place in the log, so that a client trimming or zeroing without end
/// cannot grow the log past the bound either.
pub const ENTRY_COST: u64 = 64;

/// Entries longer than this (write-zeroes and trims: the cache takes no
/// longer write) stay out of the log's index, which finds what a read
/// overlaps by where entries start; a read scans them instead.
pub const INDEXED_MAX: u64 = 32 << 20;

/// What an entry longer than [`INDEXED_MAX`] costs against `--cache-size`
/// beyond its data: few enough fit that a read's scan of them stays short.
pub const LONG_ENTRY_COST: u64 = 32 << 10;

impl Entry {
    /// Bytes of write data it holds.
    fn data(&self) -> u64 {
        match self.op {
            Op::Write(_) => self.len,
            _ => 0,
        }
    }

    /// What it costs against `--cache-size` in a log that indexes entries
    /// of up to `indexed_max` bytes.
    fn cost_in(&self, indexed_max: u64) -> u64 {
        self.data()
            + if self.len > indexed_max {
                LONG_ENTRY_COST
            } else {
                ENTRY_COST
            }
    }

    pub fn overlaps(&self, offset: u64, len: u64) -> bool {
        self.offset < offset.saturating_add(len) && offset < self.offset.saturating_add(self.len)
    }

    /// The part of this entry within `[from, to)` (both inside it).
    fn slice(&self, from: u64, to: u64) -> Entry {
        let op = match &self.op {
            Op::Write(d) => {
                Op::Write(d.slice((from - self.offset) as usize..(to - self.offset) as usize))
            }
            other => other.clone(),
        };
        Entry {
            seq: self.seq,
            offset: from,
            len: to - from,
            op,
        }
    }
}

/// The log. See the module docs.
#[derive(Debug)]
pub struct Model {
    entries: VecDeque<Entry>,
    /// Write data held.
    bytes: u64,
    /// What the entries cost against `--cache-size` ([`Model::cost`]).
    held: u64,
    next_seq: u64,
    /// The entries of up to [`INDEXED_MAX`] bytes by where they start,
    /// `(offset, seq)` to where they end: a read finds what it overlaps
    /// without a scan of the log.
    index: BTreeMap<(u64, u64), u64>,
    /// How many indexed entries have each length: no entry that overlaps
    /// an offset starts further before it than the longest.
    lengths: BTreeMap<u64, usize>,
    /// The longer entries' sequence numbers.
    long: BTreeSet<u64>,
    /// [`INDEXED_MAX`], but in tests.
    indexed_max: u64,
}

impl Default for Model {
    fn default() -> Self {
        Self {
            entries: VecDeque::new(),
            bytes: 0,
            held: 0,
            next_seq: 0,
            index: BTreeMap::new(),
            lengths: BTreeMap::new(),
            long: BTreeSet::new(),
            indexed_max: INDEXED_MAX,
        }
    }
}

impl Model {
    /// Appends a command; returns its sequence number.
    pub fn push(&mut self, offset: u64, len: u64, op: Op) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        let e = Entry {
            seq,
            offset,
            len,
            op,
        };
        if len > self.indexed_max {
            self.long.insert(seq);
        } else {
            self.index.insert((offset, seq), offset.saturating_add(len));
            *self.lengths.entry(len).or_default() += 1;
        }
        self.bytes += e.data();
        self.held += self.cost(&e);
        self.entries.push_back(e);
        seq
    }

    /// [`Model::push`], if what is held stays within `limit` with it (or
    /// the log is empty: a command larger than `limit` alone is taken);
    /// else the command back, with what it would cost.
    pub fn push_within(
        &mut self,
        limit: u64,
        offset: u64,
        len: u64,
        op: Op,
    ) -> Result<u64, (Op, u64)> {
        let probe = Entry {
            seq: 0,
            offset,
            len,
            op,
        };
        let cost = self.cost(&probe);
        if !self.is_empty() && self.held.saturating_add(cost) > limit {
            return Err((probe.op, cost));
        }
        Ok(self.push(offset, len, probe.op))
    }

    /// Bytes of write data held.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// What the log costs against `--cache-size`: its data and its entries.
    pub fn held(&self) -> u64 {
        self.held
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The last sequence number handed out so far, if any.
    pub fn last_seq(&self) -> Option<u64> {
        self.entries.back().map(|e| e.seq)
    }

    /// What `e` costs against `--cache-size` here.
    pub fn cost(&self, e: &Entry) -> u64 {
        e.cost_in(self.indexed_max)
    }

    /// The entry `seq`, if it is still in the log.
    fn get(&self, seq: u64) -> Option<&Entry> {
        let first = self.entries.front()?.seq;
        self.entries
            .get(usize::try_from(seq.checked_sub(first)?).ok()?)
    }

    /// The sequence numbers of the entries that touch `[offset, offset +
    /// len)`, in no particular order.
    fn overlapping(&self, offset: u64, len: u64) -> impl Iterator<Item = u64> + '_ {
        let end = offset.saturating_add(len);
        let longest = self.lengths.last_key_value().map_or(0, |(&l, _)| l);
        let from = offset.saturating_sub(longest);
        let indexed = self
            .index
            .range((from, 0)..(end, 0))
            .filter(move |&(&(start, _), &stop)| stop > offset && start < end)
            .map(|(&(_, seq), _)| seq);
        let long = self
            .long
            .iter()
            .copied()
            .filter(move |&seq| self.get(seq).is_some_and(|e| e.overlaps(offset, len)));
        indexed.chain(long)
    }

    /// Whether any cached command touches `[offset, offset + len)`.
    pub fn overlaps(&self, offset: u64, len: u64) -> bool {
        self.overlapping(offset, len).next().is_some()
    }

    /// Lays the cached commands, oldest first, over `buf`, which holds the
    /// server's data from `offset`: what a client reads.
    pub fn overlay(&self, offset: u64, buf: &mut [u8]) {
        let len = buf.len() as u64;
        let mut seqs: Vec<u64> = self.overlapping(offset, len).collect();
        seqs.sort_unstable();
        for e in seqs.into_iter().filter_map(|seq| self.get(seq)) {
            let from = e.offset.max(offset);
            let to = (e.offset + e.len).min(offset + len);
            let dst = &mut buf[(from - offset) as usize..(to - offset) as usize];
            match &e.op {
                Op::Write(d) => {
                    let at = (from - e.offset) as usize;
                    dst.copy_from_slice(&d[at..at + dst.len()]);
                }
                Op::Zero(_) | Op::Trim => dst.fill(0),
            }
        }
    }

    /// The oldest entries, in order, up to and including `seq`.
    pub fn through(&self, seq: u64) -> Vec<Entry> {
        self.entries
            .iter()
            .take_while(|e| e.seq <= seq)
            .cloned()
            .collect()
    }

    /// The oldest entries whose write-back brings what is held to `limit`
    /// or below ([`Model::held`]), but no more of them than cost `batch`
    /// together (always one, if any is over).
    pub fn over(&self, limit: u64, batch: u64) -> Vec<Entry> {
        let mut left = self.held;
        let mut taken = 0u64;
        let mut out = Vec::new();
        for e in &self.entries {
            if left <= limit || (taken >= batch && !out.is_empty()) {
                break;
            }
            left -= self.cost(e);
            taken = taken.saturating_add(self.cost(e));
            out.push(e.clone());
        }
        out
    }

    /// Forgets the entry `seq` once written back (and any older one: the
    /// log is written back in order). Nothing if a power loss took it:
    /// then false.
    pub fn written(&mut self, seq: u64) -> bool {
        let mut found = false;
        while self.entries.front().is_some_and(|e| e.seq <= seq) {
            if let Some(e) = self.entries.pop_front() {
                found |= e.seq == seq;
                self.bytes -= e.data();
                self.held -= self.cost(&e);
                if self.index.remove(&(e.offset, e.seq)).is_some() {
                    if let Some(n) = self.lengths.get_mut(&e.len) {
                        *n -= 1;
                        if *n == 0 {
                            self.lengths.remove(&e.len);
                        }
                    }
                } else {
                    self.long.remove(&e.seq);
                }
            }
        }
        found
    }

    /// Empties the log: the power is gone.
    pub fn take_all(&mut self) -> Vec<Entry> {
        self.bytes = 0;
        self.held = 0;
        self.index.clear();
        self.lengths.clear();
        self.long.clear();
        self.entries.drain(..).collect()
    }
}

/// What of `lost` reaches the server after all, in the order it does:
/// nothing with `lose: all`; with `lose: some`, a seeded random subset in
/// random order, each kept command whole or, with `torn`, possibly only
/// some of its `torn`-byte sectors (counted from the start of the disk).
pub fn survivors(lost: Vec<Entry>, mode: &PowerLoss, seed: &mut u64) -> Vec<Entry> {
    if mode.lose == Lose::All {
        return Vec::new();
    }
    let mut out = Vec::new();
    for e in lost {
        if rng::below(seed, 2) == 0 {
            continue;
        }
        match mode.torn {
            Some(sector) if rng::below(seed, 2) == 0 => {
                let sector = u64::from(sector.max(1));
                let end = e.offset + e.len;
                let mut at = e.offset;
                while at < end {
                    let next = ((at / sector) + 1).saturating_mul(sector).min(end);
                    if rng::below(seed, 2) == 1 {
                        out.push(e.slice(at, next));
                    }
                    at = next;
                }
            }
            _ => out.push(e),
        }
    }
    // Fisher-Yates: the disk may have written its cache in any order.
    for i in (1..out.len()).rev() {
        let j = rng::below(seed, i as u64 + 1) as usize;
        out.swap(i, j);
    }
    out
}

/// Applies `e` to a plain byte array: the reference the tests compare with.
#[cfg(test)]
fn apply(disk: &mut [u8], e: &Entry) {
    let r = e.offset as usize..(e.offset + e.len) as usize;
    match &e.op {
        Op::Write(d) => disk[r].copy_from_slice(d),
        Op::Zero(_) | Op::Trim => disk[r].fill(0),
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const DISK: usize = 8192;

    #[derive(Debug, Clone)]
    enum Cmd {
        Write(u64, Vec<u8>),
        Zero(u64, u64),
        Trim(u64, u64),
        Flush,
        Evict(u64, u64),
    }

    fn cmd() -> impl Strategy<Value = Cmd> {
        let extent =
            (0..DISK as u64 - 1).prop_flat_map(|o| (Just(o), 1..=(DISK as u64 - o).min(2000)));
        prop_oneof![
            4 => (extent.clone(), any::<u8>()).prop_map(|((o, l), b)| Cmd::Write(o, vec![b; l as usize])),
            1 => extent.clone().prop_map(|(o, l)| Cmd::Zero(o, l)),
            1 => extent.prop_map(|(o, l)| Cmd::Trim(o, l)),
            1 => Just(Cmd::Flush),
            1 => (0..4000u64, 1..6000u64).prop_map(|(l, b)| Cmd::Evict(l, b)),
        ]
    }

    /// Runs `cmds` against the model over `server` (write-back applied to
    /// it) and against `reference` (every command applied at once).
    /// A log that indexes only entries of up to 700 bytes, so that the
    /// tests' extents (up to 2000) try the scan of longer ones too.
    fn small_index() -> Model {
        Model {
            indexed_max: 700,
            ..Model::default()
        }
    }

    fn run(cmds: &[Cmd], model: &mut Model, server: &mut [u8], reference: &mut [u8]) {
        for c in cmds {
            let write_back = |model: &mut Model, server: &mut [u8], batch: Vec<Entry>| {
                for e in batch {
                    apply(server, &e);
                    model.written(e.seq);
                }
            };
            match c {
                Cmd::Write(o, d) => {
                    let e = Entry {
                        seq: 0,
                        offset: *o,
                        len: d.len() as u64,
                        op: Op::Write(Bytes::from(d.clone())),
                    };
                    apply(reference, &e);
                    model.push(e.offset, e.len, e.op);
                }
                Cmd::Zero(o, l) | Cmd::Trim(o, l) => {
                    let op = if matches!(c, Cmd::Zero(..)) {
                        Op::Zero(0)
                    } else {
                        Op::Trim
                    };
                    apply(
                        reference,
                        &Entry {
                            seq: 0,
                            offset: *o,
                            len: *l,
                            op: op.clone(),
                        },
                    );
                    model.push(*o, *l, op);
                }
                Cmd::Flush => {
                    let batch = model
                        .last_seq()
                        .map(|s| model.through(s))
                        .unwrap_or_default();
                    write_back(model, server, batch);
                    assert!(model.is_empty());
                    assert_eq!((model.bytes(), model.held()), (0, 0));
                    assert_eq!(server, reference);
                }
                Cmd::Evict(limit, most) => {
                    let before = model.held();
                    let batch = model.over(*limit, *most);
                    let cost: u64 = batch.iter().map(|e| model.cost(e)).sum();
                    let last = batch.last().map(|e| model.cost(e)).unwrap_or(0);
                    assert_eq!(batch.is_empty(), before <= *limit);
                    write_back(model, server, batch);
                    assert_eq!(model.held(), before - cost);
                    // Down to the limit or up to the batch's size, and not
                    // one entry more than that took.
                    assert!(model.held() <= *limit || cost >= *most);
                    assert!(cost == 0 || (before - (cost - last) > *limit && cost - last < *most));
                }
            }
        }
    }

    proptest! {
        /// A client reads its own writes: the server's data with the
        /// cache laid over it is the reference, at any moment, for any
        /// extent (partial overlaps included).
        #[test]
        fn reads_see_every_cached_write(cmds in prop::collection::vec(cmd(), 0..40), o in 0..DISK as u64, l in 1..DISK as u64) {
            let (mut model, mut server, mut reference) = (small_index(), vec![7u8; DISK], vec![7u8; DISK]);
            run(&cmds, &mut model, &mut server, &mut reference);
            let l = l.min(DISK as u64 - o);
            let mut buf = server[o as usize..(o + l) as usize].to_vec();
            model.overlay(o, &mut buf);
            prop_assert_eq!(&buf[..], &reference[o as usize..(o + l) as usize]);
            // Every entry is indexed or long, and counted once by length.
            prop_assert_eq!(model.index.len() + model.long.len(), model.entries.len());
            prop_assert_eq!(model.lengths.values().sum::<usize>(), model.index.len());
            // The index finds exactly what a scan of the log does.
            for (o, l) in [(o, l), (o, 0), (0, DISK as u64), (o + l, 1)] {
                let scan = model.entries.iter().any(|e| e.overlaps(o, l));
                prop_assert_eq!(model.overlaps(o, l), scan, "{}+{}", o, l);
            }
        }

        /// After a power loss every byte holds what was last written back,
        /// or what some cached command wrote there: never anything else.
        /// `lose: all` keeps exactly the written-back disk, and the same
        /// seed chooses the same survivors.
        #[test]
        fn a_loss_leaves_only_legal_bytes(cmds in prop::collection::vec(cmd(), 0..40), some in any::<bool>(), torn in prop::option::of(prop_oneof![Just(512u32), Just(4096u32)]), seed in any::<u64>()) {
            let (mut model, mut server, mut reference) = (small_index(), vec![7u8; DISK], vec![7u8; DISK]);
            run(&cmds, &mut model, &mut server, &mut reference);
            let durable = server.clone();
            let lost = model.take_all();
            prop_assert_eq!(model.bytes(), 0);
            let mode = PowerLoss { lose: if some { Lose::Some } else { Lose::All }, torn: if some { torn } else { None }, seed };
            let kept = survivors(lost.clone(), &mode, &mut seed.clone());
            prop_assert_eq!(&kept, &survivors(lost.clone(), &mode, &mut seed.clone()));
            if !some {
                prop_assert!(kept.is_empty());
            }
            for e in &kept {
                if let Some(s) = mode.torn {
                    prop_assert!(e.len == lost.iter().find(|x| x.seq == e.seq).unwrap().len || (e.offset % u64::from(s) == 0 || (e.offset + e.len) % u64::from(s) == 0));
                }
                apply(&mut server, e);
            }
            for (i, b) in server.iter().enumerate() {
                let i = i as u64;
                let legal = *b == durable[i as usize] || lost.iter().any(|e| e.overlaps(i, 1) && match &e.op {
                    Op::Write(d) => d[(i - e.offset) as usize] == *b,
                    _ => *b == 0,
                });
                prop_assert!(legal, "byte {} is {}", i, b);
            }
        }
    }

    #[test]
    fn torn_writes_split_at_sector_boundaries() {
        let e = Entry {
            seq: 0,
            offset: 100,
            len: 1500,
            op: Op::Write(Bytes::from(vec![1u8; 1500])),
        };
        let pieces: Vec<(u64, u64)> = [
            e.slice(100, 512),
            e.slice(512, 1024),
            e.slice(1024, 1536),
            e.slice(1536, 1600),
        ]
        .iter()
        .map(|p| (p.offset, p.len))
        .collect();
        assert_eq!(pieces, [(100, 412), (512, 512), (1024, 512), (1536, 64)]);
        // Some seed tears it: every piece then starts or ends on a sector.
        let mode = PowerLoss {
            lose: Lose::Some,
            torn: Some(512),
            seed: 0,
        };
        let torn = (0..64u64)
            .map(|s| survivors(vec![e.clone()], &mode, &mut s.clone()))
            .find(|k| k.len() > 1 || k.first().is_some_and(|p| p.len < 1500))
            .expect("some seed tears the write");
        assert!(
            torn.iter()
                .all(|p| p.offset % 512 == 0 || (p.offset + p.len) % 512 == 0)
        );
    }

    /// A command goes in only while what is held stays within the limit,
    /// but one larger than the limit goes into an empty log.
    #[test]
    fn push_within_keeps_the_log_within_its_limit() {
        let mut m = Model::default();
        let w = |n: usize| Op::Write(Bytes::from(vec![0u8; n]));
        let limit = 2 * (4096 + ENTRY_COST);
        assert!(m.push_within(limit, 0, 4096, w(4096)).is_ok());
        assert!(m.push_within(limit, 4096, 4096, w(4096)).is_ok());
        assert_eq!(m.held(), limit);
        match m.push_within(limit, 8192, 1, w(1)) {
            Err((Op::Write(d), cost)) => assert_eq!((d.len(), cost), (1, 1 + ENTRY_COST)),
            other => panic!("{other:?}"),
        }
        assert_eq!((m.len(), m.held()), (2, limit));
        m.written(1);
        assert!(
            m.push_within(10, 0, 4096, w(4096)).is_ok(),
            "an empty log takes any"
        );
        assert!(m.push_within(10, 0, 0, Op::Trim).is_err());
    }
}
