//! State shared by a queue's producer and poster halves: the ring memory and the two indices that
//! hand ownership of bytes back and forth.

use crossbeam_utils::CachePadded;

use crate::geometry::Geometry;
use crate::record::record_crc_parts;
use crate::region::{Backing, Region};
use crate::sync::{AtomicU64, Ordering};

pub(crate) struct Shared {
    pub(crate) region: Region,
    pub(crate) geo: Geometry,
    /// Producer -> poster. Every byte below this position is a complete record (or padding).
    /// Stored with Release after the record bytes; loaded with Acquire before reading them.
    pub(crate) committed: CachePadded<AtomicU64>,
    /// Producer -> anyone: the sequence number of the last committed record (0: none). Stored
    /// (Relaxed) before `committed`'s Release store, so whoever has seen a record posted sees at
    /// least its sequence number here.
    pub(crate) committed_seq: CachePadded<AtomicU64>,
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
    pub(crate) fn new(geo: Geometry, backing: Backing) -> std::io::Result<Shared> {
        let region = Region::new(geo.capacity(), backing)?;
        Ok(Shared {
            region,
            geo,
            committed: CachePadded::new(AtomicU64::new(0)),
            committed_seq: CachePadded::new(AtomicU64::new(0)),
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

    /// The producer's copy of record `seq`'s payload (`len` bytes) to `offset` (in space as
    /// [`Shared::write`]'s); returns the record's crc, computed from `payload`.
    #[inline]
    pub(crate) fn write_payload(&self, offset: usize, len: u32, seq: u64, payload: &[u8]) -> u32 {
        self.write(offset, payload);
        record_crc_parts(len, seq, payload)
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
    pub(crate) fn load_committed(&self) -> u64 {
        // Pairs with the Release store in `Producer::publish`: the record bytes are visible.
        self.committed.load(Ordering::Acquire)
    }

    pub(crate) fn load_released(&self) -> u64 {
        // Pairs with the Release store in `Poster::release`: the poster no longer reads those bytes.
        self.released.load(Ordering::Acquire)
    }
}
