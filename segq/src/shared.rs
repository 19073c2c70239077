//! State shared by a queue's producer and poster halves: the ring memory and the two indices that
//! hand ownership of bytes back and forth.

use crossbeam_utils::CachePadded;

use crate::geometry::Geometry;
use crate::region::{Backing, Region};
use crate::sync::{AtomicU64, Ordering};

/// The producer's side of the hand-off: what it committed, read by the poster in one load.
pub(crate) struct CommitWords {
    /// Producer -> poster: a [`Commit`]. Every byte below its position is a complete record
    /// (or padding). Stored with Release after the record bytes; loaded with Acquire before
    /// reading them.
    pub(crate) word: AtomicU64,
    /// Producer -> poster: the end of the last record whose number does not follow the one
    /// committed before it (a failover copy's, the first after a retirement), or of a
    /// retirement's padding (0: none). Below it the records can't be counted by their
    /// numbers, so a poster that has not posted past it reads their headers. Stored (Relaxed)
    /// before the commit's Release store.
    pub(crate) discontinuity: AtomicU64,
    /// Producer -> anyone: the number of the last committed record, all 64 bits (0: none).
    /// Stored (Relaxed) before the commit's Release store, so whoever has seen a record
    /// committed sees at least its number here. (The commit's own 32 bits can be unpacked only
    /// against a number less than 2^32 below: a lane reset to 1 that takes a failover copy of
    /// a long stream has none.)
    pub(crate) last_seq: AtomicU64,
}

/// Where the committed records end and the last one's sequence number, packed in one word so
/// that the poster reads both at once, without a lock: the position in 8-byte units and the
/// number, each modulo 2^32. A reader unpacks them against a position and a number it knows
/// are not above them and not far behind (a ring holds at most
/// [`MAX_CAPACITY`](crate::geometry::MAX_CAPACITY) bytes, far below 2^35, and fewer records
/// than 2^32).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Commit(pub(crate) u64);

impl Commit {
    /// `pos` (8-aligned) and `seq` packed.
    #[inline]
    pub(crate) fn pack(pos: u64, seq: u64) -> Commit {
        debug_assert_eq!(pos % 8, 0, "positions are 8-aligned");
        Commit(((pos >> 3) << 32) | (seq & u64::from(u32::MAX)))
    }

    /// The position, given one at or below it (8-aligned) by less than 2^35 bytes.
    #[inline]
    pub(crate) fn pos(self, floor: u64) -> u64 {
        let units = ((self.0 >> 32) as u32).wrapping_sub((floor >> 3) as u32);
        floor + (u64::from(units) << 3)
    }

    /// Whether the position is `pos` (given one below it by less than 2^35 bytes, or equal).
    #[inline]
    pub(crate) fn is_at(self, pos: u64) -> bool {
        (self.0 >> 32) as u32 == (pos >> 3) as u32
    }

    /// The sequence number, given one at or below it by less than 2^32.
    #[inline]
    pub(crate) fn seq(self, floor: u64) -> u64 {
        floor + u64::from((self.0 as u32).wrapping_sub(floor as u32))
    }
}

pub(crate) struct Shared {
    pub(crate) region: Region,
    pub(crate) geo: Geometry,
    /// Producer -> poster: the commit, its discontinuity and the last number in full, on one
    /// cache line (one miss for the poster that reads them).
    pub(crate) commit: CachePadded<CommitWords>,
    /// Poster -> producer. The producer may write positions below this one: everything that would
    /// alias is acknowledged. Stored with Release after the poster's last read of the freed
    /// segments; loaded with Acquire before the producer overwrites them.
    pub(crate) released: CachePadded<AtomicU64>,
    /// Loom only: one cell per 8-byte word of the ring so the model checker flags any read and write
    /// of the same bytes that the indices fail to order.
    #[cfg(loom)]
    words: Box<[loom::cell::UnsafeCell<()>]>,
}

impl Shared {
    /// A fresh queue's shared state; its first record will be numbered `first_seq` (>= 1).
    pub(crate) fn new(geo: Geometry, backing: Backing, first_seq: u64) -> std::io::Result<Shared> {
        let region = Region::new(geo.capacity(), backing)?;
        Ok(Shared {
            region,
            geo,
            commit: CachePadded::new(CommitWords {
                word: AtomicU64::new(Commit::pack(0, first_seq - 1).0),
                discontinuity: AtomicU64::new(0),
                last_seq: AtomicU64::new(0),
            }),
            released: CachePadded::new(AtomicU64::new(geo.capacity() as u64)),
            #[cfg(loom)]
            words: (0..geo.capacity() / 8)
                .map(|_| loom::cell::UnsafeCell::new(()))
                .collect(),
        })
    }

    #[inline]
    pub(crate) fn track_write(&self, _offset: usize, _len: usize) {
        #[cfg(loom)]
        for w in _offset / 8..(_offset + _len).div_ceil(8) {
            self.words[w].with_mut(|_| ());
        }
    }

    #[inline]
    pub(crate) fn track_read(&self, _offset: usize, _len: usize) {
        #[cfg(loom)]
        for w in _offset / 8..(_offset + _len).div_ceil(8) {
            self.words[w].with(|_| ());
        }
    }

    /// The producer's writes: only into space the poster released and not yet committed, or
    /// (retiring a lane's records, `Poster::retire_unposted`) committed space never posted,
    /// of a lane the writer is not in, by the control thread that holds both halves.
    pub(crate) fn write(&self, offset: usize, bytes: &[u8]) {
        self.track_write(offset, bytes.len());
        // The Acquire load of `released` ordered the poster's and the NIC's last reads of this
        // space before this write; the producer is `&mut`-owned, so it is the only caller.
        // Unposted records were never handed to a NIC, and only their poster reads them.
        // SAFETY: nobody else reads or writes this space now (see above).
        unsafe { self.region.write(offset, bytes) };
    }

    /// The header at `offset` (8-aligned), as two aligned loads. The poster reads only
    /// committed bytes (the Acquire load of `committed` made them visible), which the producer
    /// does not write again until they are released.
    #[inline]
    pub(crate) fn read_header(&self, offset: usize) -> crate::record::Header {
        self.track_read(offset, crate::record::HEADER_LEN);
        let [first, seq] = self.region.read_words::<2>(offset);
        crate::record::Header::from_words(first, seq)
    }

    #[inline]
    pub(crate) fn load_commit(&self) -> Commit {
        // Pairs with the Release stores in `Producer::publish` and `Poster::retire_unposted`:
        // the record bytes (and the discontinuity) are visible.
        Commit(self.commit.word.load(Ordering::Acquire))
    }

    /// The commit's discontinuity (see [`CommitWords::discontinuity`]), read after
    /// [`Shared::load_commit`]: at least that of the last break below the commit read.
    #[inline]
    pub(crate) fn load_discontinuity(&self) -> u64 {
        // Relaxed: stored before the commit's Release store, read after its Acquire load.
        self.commit.discontinuity.load(Ordering::Relaxed)
    }

    /// The number of the last committed record (0: none; see [`CommitWords::last_seq`]).
    #[inline]
    pub(crate) fn load_last_seq(&self) -> u64 {
        // Relaxed: a number, not a hand-off of bytes (stored before the commit's Release).
        self.commit.last_seq.load(Ordering::Relaxed)
    }

    /// Publishes the commit `commit` (record bytes before it; `last_seq` the last record's
    /// number), with `discontinuity` if the records it adds break the numbering.
    #[inline]
    pub(crate) fn store_commit(&self, commit: Commit, last_seq: u64, discontinuity: Option<u64>) {
        // Ordered before the Release below: a reader that saw the record sees its number here.
        self.commit.last_seq.store(last_seq, Ordering::Relaxed);
        if let Some(at) = discontinuity {
            // Ordered before the Release below: a poster that sees the commit sees this.
            self.commit.discontinuity.store(at, Ordering::Relaxed);
        }
        // Pairs with the Acquire in `Shared::load_commit`: record bytes before the index.
        self.commit.word.store(commit.0, Ordering::Release);
    }

    /// Empties the indices (both halves held: nobody else uses them); the next record will be
    /// numbered `next_seq`.
    pub(crate) fn reset_indices(&self, next_seq: u64) {
        self.store_commit(Commit::pack(0, next_seq - 1), 0, Some(0));
        // Exclusive access: plain stores suffice, Release for form.
        self.released
            .store(self.geo.capacity() as u64, Ordering::Release);
    }

    pub(crate) fn load_released(&self) -> u64 {
        // Pairs with the Release store in `Poster::release`: the poster no longer reads those bytes.
        self.released.load(Ordering::Acquire)
    }
}
