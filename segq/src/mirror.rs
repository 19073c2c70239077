//! The receiver's mirror of a peer's ring: same geometry, same byte positions. The peer's NIC writes
//! records into it; a write-with-immediate completion says how far data has fully arrived, and only
//! bytes below that are ever parsed (correctness never depends on RDMA placement order).

use crate::geometry::Geometry;
use crate::record::{parse_arrived, ParseError, Parsed};
use crate::region::{Backing, Region};
use crate::sync::Arc;

/// Delivery state of one direction of a connection, shared by all of its rails' mirrors: the next
/// sequence number to deliver, and counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamCursor {
    next_expected: u64,
    pub delivered: u64,
    pub duplicates: u64,
}

impl Default for StreamCursor {
    fn default() -> Self {
        StreamCursor {
            next_expected: 1,
            delivered: 0,
            duplicates: 0,
        }
    }
}

impl StreamCursor {
    /// A stream resumed after `delivered` (a new connection continuing an old one's stream): what
    /// arrives numbered up to it is discarded as a duplicate.
    pub fn resuming_after(delivered: u64) -> StreamCursor {
        StreamCursor {
            next_expected: delivered + 1,
            ..StreamCursor::default()
        }
    }

    /// Highest sequence number delivered (0: none): the cumulative acknowledgement to send back.
    pub fn last_delivered(&self) -> u64 {
        self.next_expected - 1
    }
}

/// Why consumption stopped. The mirror stays at the offending record; nothing after it is delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ConsumeError {
    #[error("bad record at position {pos}: {source}")]
    Record { pos: u64, source: ParseError },
    #[error("sequence gap at position {pos}: expected {expected}, found {found}")]
    Gap { pos: u64, expected: u64, found: u64 },
    #[error("notification to position {claimed} is outside the window ({complete}, {limit}]")]
    BadNotification {
        complete: u64,
        claimed: u64,
        limit: u64,
    },
}

/// The receive-side mirror queue.
pub struct MirrorQueue {
    region: Arc<Region>,
    geo: Geometry,
    read_pos: u64,
    complete_pos: u64,
}

impl MirrorQueue {
    pub fn new(geo: Geometry, backing: Backing) -> std::io::Result<MirrorQueue> {
        Ok(MirrorQueue {
            region: Arc::new(Region::new(geo.capacity(), backing)?),
            geo,
            read_pos: 0,
            complete_pos: 0,
        })
    }

    pub fn geometry(&self) -> Geometry {
        self.geo
    }

    /// The ring's memory, for registration with a NIC (remote write).
    pub fn memory(&self) -> crate::Memory {
        crate::Memory(crate::MemoryKind::Mirror(self.region.clone()))
    }

    /// Position up to which data is known complete.
    #[inline]
    pub fn complete_pos(&self) -> u64 {
        self.complete_pos
    }

    /// Position of the next record to parse.
    #[inline]
    pub fn read_pos(&self) -> u64 {
        self.read_pos
    }

    /// Whether bytes a completion announced wait to be parsed (cheap: two loads).
    #[inline]
    pub fn has_arrived(&self) -> bool {
        self.read_pos < self.complete_pos
    }

    /// Applies a write-with-immediate notification: the low [`NOTIFY_BITS`](crate::NOTIFY_BITS)
    /// bits of `imm` are the position the write ended at, in 8-byte units (see
    /// [`PendingRange::notify_imm`](crate::PendingRange::notify_imm)); the bits above are the
    /// caller's and ignored. A stale or impossible value (one that would move backwards, stay
    /// where the last one ended (every write carries bytes: that is the last completion again), or
    /// go beyond one ring ahead of the reader) is a protocol error, never silently accepted.
    pub fn notify(&mut self, imm: u32) -> Result<(), ConsumeError> {
        let units = imm.wrapping_sub(crate::notify_imm_of(self.complete_pos)) & crate::NOTIFY_MASK;
        let claimed = self.complete_pos + u64::from(units) * 8;
        let limit = self.read_pos + self.geo.capacity() as u64;
        if units == 0 || claimed > limit {
            return Err(ConsumeError::BadNotification {
                complete: self.complete_pos,
                claimed,
                limit,
            });
        }
        self.complete_pos = claimed;
        Ok(())
    }

    /// Delivers every complete record in order to `deliver(seq, payload)` (zero-copy: the payload is
    /// read in place), discarding and counting records already delivered. Returns how many it
    /// delivered. On error, what came before the bad record was delivered and the rest is kept.
    pub fn consume(
        &mut self,
        cursor: &mut StreamCursor,
        deliver: impl FnMut(u64, &[u8]),
    ) -> Result<usize, ConsumeError> {
        self.consume_limit(cursor, usize::MAX, deliver)
    }

    /// Like [`MirrorQueue::consume`], delivering at most `limit` records (duplicates don't count).
    pub fn consume_limit(
        &mut self,
        cursor: &mut StreamCursor,
        limit: usize,
        mut deliver: impl FnMut(u64, &[u8]),
    ) -> Result<usize, ConsumeError> {
        let mut n = 0;
        while self.read_pos < self.complete_pos && n < limit {
            let off = self.geo.offset(self.read_pos);
            let rem = self.geo.segment_remaining(self.read_pos);
            let available = (self.complete_pos - self.read_pos).min(rem as u64) as usize;
            // Only the bytes a completion announced: past them the NIC may still be writing.
            // [off, off+available) is inside the ring (segments never straddle its end); the peer
            // doesn't rewrite it before we acknowledge; parse_arrived treats it as untrusted.
            // SAFETY: in bounds, and no writer while unacknowledged (see above).
            let seg_rest = unsafe { self.region.slice(off, available) };
            match parse_arrived(seg_rest, rem, self.geo.max_record()) {
                Ok(Parsed::EndOfSegment { skip }) => self.read_pos += skip as u64,
                Ok(Parsed::Record {
                    seq,
                    payload_start,
                    payload_len,
                    size,
                }) => {
                    if seq > cursor.next_expected {
                        return Err(ConsumeError::Gap {
                            pos: self.read_pos,
                            expected: cursor.next_expected,
                            found: seq,
                        });
                    }
                    if seq < cursor.next_expected {
                        cursor.duplicates += 1;
                    } else {
                        deliver(seq, &seg_rest[payload_start..payload_start + payload_len]);
                        cursor.next_expected += 1;
                        cursor.delivered += 1;
                        n += 1;
                    }
                    self.read_pos += size as u64;
                }
                Err(source) => {
                    return Err(ConsumeError::Record {
                        pos: self.read_pos,
                        source,
                    })
                }
            }
        }
        Ok(n)
    }

    /// Empties the mirror (a fresh connection on this rail).
    pub fn reset(&mut self) {
        self.read_pos = 0;
        self.complete_pos = 0;
    }

    /// Writes raw bytes into the mirror as a peer's NIC would (for tests, simulators and fuzzing).
    pub fn write_raw(&mut self, offset: usize, bytes: &[u8]) {
        // SAFETY: `&mut self`: no delivery (which borrows the mirror) is reading meanwhile; the
        // only other writers are a NIC and `unsafe` calls that promise exclusivity.
        unsafe { self.region.write(offset, bytes) };
    }
}
