//! # railover-segq
//!
//! A lock-free segmented queue of framed records in registrable memory.
//!
//! * [`SendQueue`]: the sender's ring. The application [`Producer`] frames records
//!   (`crc32c | len | seq | payload`); the link's [`Poster`] hands out contiguous byte ranges to post
//!   as one RDMA write each, and frees whole segments as cumulative acknowledgements arrive. On a
//!   rail failure, [`SendQueue::copy_unacked_into`] moves every unacknowledged record, with its
//!   sequence number, into the standby card's queue.
//! * [`lanes`]: one send queue per rail; the application's [`LaneWriter`] writes into the active
//!   one while the link's [`LaneControl`] fails over between them (lock-free, see the module).
//! * [`MirrorQueue`]: the receiver's copy of a peer's ring. Parsing is zero-copy and treats the bytes
//!   as hostile: bad lengths, bad crcs, gaps and impossible notifications are typed errors.
//!
//! The queue knows nothing of verbs: it exposes its memory ([`Memory`]) for a fabric to register.
#![deny(unsafe_op_in_unsafe_fn)]

#[doc(hidden)]
pub mod alloc_counter;
mod geometry;
mod lanes;
mod mirror;
pub mod record;
mod region;
mod sender;
mod shared;
mod sync;

pub use geometry::{Geometry, GeometryError, MAX_CAPACITY, MIN_SEGMENT_SIZE};

/// Bits of a write's immediate that carry its end position (in 8-byte units, modulo 2^24: a
/// 128 MiB window, four times the largest ring). The 8 bits above are free for the link's own
/// use (railover's: 7 heartbeat bits and a receive-credit bit).
pub const NOTIFY_BITS: u32 = 24;
/// Mask of the position bits of an immediate.
pub const NOTIFY_MASK: u32 = (1 << NOTIFY_BITS) - 1;

/// The position bits of the immediate that announces data up to `end` (an 8-aligned position).
#[inline]
pub fn notify_imm_of(end: u64) -> u32 {
    debug_assert_eq!(end % 8, 0, "ring positions are 8-aligned");
    ((end / 8) as u32) & NOTIFY_MASK
}
pub use lanes::{lanes, LaneControl, LaneError, LaneReservation, LaneWriter};
pub use mirror::{ConsumeError, MirrorQueue, StreamCursor};
#[cfg(all(target_arch = "x86_64", target_feature = "sse4.2"))]
pub use record::crc32c_one_chain;
pub use record::{crc32c, ParseError, CRC_INTERLEAVED_FROM, HEADER_LEN};
pub use region::{copy_message, Backing, Region, PAGE_SIZE};
pub use sender::{
    AckError, CopyReport, PendingRange, Poster, Producer, PushError, Reservation, SendQueue,
    ShadowReport,
};

/// A handle on a queue's memory that keeps it alive (hold it as long as the memory is registered).
#[derive(Clone)]
pub struct Memory(MemoryKind);

#[derive(Clone)]
enum MemoryKind {
    Send(sync::Arc<shared::Shared>),
    Mirror(sync::Arc<Region>),
}

impl Memory {
    fn region(&self) -> &Region {
        match &self.0 {
            MemoryKind::Send(s) => &s.region,
            MemoryKind::Mirror(r) => r,
        }
    }
    /// First byte.
    pub fn addr(&self) -> *mut u8 {
        self.region().addr()
    }
    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.region().len()
    }
    /// Never true.
    pub fn is_empty(&self) -> bool {
        self.region().is_empty()
    }
    /// Copies bytes out (bounds-checked; panics on a caller's out-of-range request), as a NIC
    /// reading a posted range would.
    ///
    /// # Safety
    /// No one may write those bytes meanwhile (for a send queue: they are posted, i.e.
    /// committed and not yet released).
    pub unsafe fn read(&self, offset: usize, dst: &mut [u8]) {
        // SAFETY: forwarded contract.
        unsafe { self.region().read(offset, dst) }
    }
    /// Copies bytes in (bounds-checked), as a NIC placing a peer's write would.
    ///
    /// # Safety
    /// No one may read or write those bytes meanwhile.
    pub unsafe fn write(&self, offset: usize, src: &[u8]) {
        // SAFETY: forwarded contract.
        unsafe { self.region().write(offset, src) }
    }
}
