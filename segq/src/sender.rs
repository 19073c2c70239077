//! The sender's ring: the application commits records, the link side posts byte ranges of them to
//! the peer and frees whole segments as acknowledgements arrive.
//!
//! Segment lifecycle: free -> filling (producer) -> posted (poster) -> acknowledged -> free.
//! The producer and the poster may live on different threads ([`SendQueue::split`]); each index
//! has exactly one writer.

use crate::geometry::Geometry;
use crate::record::{
    record_crc, record_crc_parts, record_size, Header, CRC_COVERS_FROM, HEADER_LEN,
};
use crate::region::Backing;
use crate::shared::{Commit, Shared};
use crate::sync::{Arc, Ordering};
use std::ops::Range;

/// Why a record could not be queued. Nothing already accepted is affected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PushError {
    #[error("record of {len} bytes exceeds the maximum of {max}")]
    TooLarge { len: usize, max: usize },
    #[error("queue full: no free segment until the peer acknowledges")]
    Full,
    /// A batch ([`Producer::push_batch`]) that would not fit even in an empty ring at the
    /// current position: split it.
    #[error("batch of {bytes} ring bytes exceeds the {room} the ring can ever hold from here")]
    BatchTooLarge { bytes: usize, room: usize },
}

/// An acknowledgement no honest receiver could send.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AckError {
    #[error("peer acknowledged position {consumed}, but only {posted} was posted")]
    BeyondPosted { consumed: u64, posted: u64 },
}

/// A contiguous byte range of committed records not yet posted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PendingRange {
    /// Monotonic byte position of the first byte (the receiver's mirror uses the same positions).
    pub start: u64,
    /// Position one past the last byte.
    pub end: u64,
    /// Physical offset of `start` in the ring: local and remote offset of the write.
    pub offset: usize,
    /// Sequence numbers of the first and last records in the range (None: padding only).
    pub seqs: Option<(u64, u64)>,
    /// Records in the range.
    pub records: usize,
    /// Whether the range ends where the producer had committed when it was taken: nothing else
    /// was pending then (what is committed after is new).
    pub reaches_commit: bool,
}

impl PendingRange {
    pub fn len(&self) -> usize {
        (self.end - self.start) as usize
    }
    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }
    /// The immediate that notifies the receiver: the end position in 8-byte units, its low
    /// [`NOTIFY_BITS`](crate::NOTIFY_BITS) bits. The bits above are zero: the caller may carry
    /// its own there ([`MirrorQueue::notify`](crate::MirrorQueue::notify) ignores them).
    pub fn notify_imm(&self) -> u32 {
        crate::notify_imm_of(self.end)
    }
}

/// Records a failover could not fit into the lane it made active yet, oldest first, with their
/// sequence numbers (see `LaneControl::fail_over`). Filled only at a failover, off the hot path.
pub(crate) type KeptRecords = std::collections::VecDeque<(u64, Box<[u8]>)>;

/// What a failover copy moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CopyReport {
    pub records: usize,
    pub bytes: usize,
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
    /// Whether every unacknowledged record sat in the segment holding the write position.
    pub only_current_segment: bool,
}

/// One item of the ring as seen by the queue's own (trusted) walker.
enum Entry {
    Skip(usize),
    Record { seq: u64, len: usize, size: usize },
}

/// Reads the entry at `pos` of memory this process wrote and the producer has published.
#[inline]
fn entry_at(shared: &Shared, pos: u64) -> Entry {
    let rem = shared.geo.segment_remaining(pos);
    if rem < HEADER_LEN {
        return Entry::Skip(rem);
    }
    let h = shared.read_header(shared.geo.offset(pos));
    if h.is_pad() {
        Entry::Skip(rem)
    } else {
        Entry::Record {
            seq: h.seq,
            len: h.len as usize,
            size: record_size(h.len as usize),
        }
    }
}

/// The application's half: frames and commits records.
pub struct Producer {
    shared: Arc<Shared>,
    write_pos: u64,
    next_seq: u64,
    /// The number of the last record committed (the first's, minus one, before any): a record
    /// numbered otherwise than one after it is a discontinuity.
    last_committed_seq: u64,
    released_cache: u64,
}

/// A reserved, writable record slot. Dropping it without [`Reservation::commit`] abandons it.
pub struct Reservation<'a> {
    producer: &'a mut Producer,
    start: u64,
    len: usize,
}

impl Reservation<'_> {
    /// The payload bytes to fill (exactly the reserved length).
    pub fn payload_mut(&mut self) -> &mut [u8] {
        let shared = &self.producer.shared;
        let off = shared.geo.offset(self.start) + HEADER_LEN;
        shared.track_write(off, self.len);
        // SAFETY: [start, start+size) lies below `released` (checked in reserve), so neither the
        // poster nor the peer's NIC reads it until we publish; &mut self keeps this slice unique.
        unsafe { shared.region.slice_mut(off, self.len) }
    }

    /// Frames the record (sequence number, length, crc) and publishes it. Returns its sequence number.
    pub fn commit(self) -> u64 {
        let seq = self.producer.next_seq;
        self.producer.seal(self.start, self.len, seq);
        seq
    }
}

impl Producer {
    /// Largest payload accepted.
    pub fn max_record(&self) -> usize {
        self.shared.geo.max_record()
    }

    /// Sequence number the next committed record gets.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Reserves room for a record of `len` payload bytes.
    pub fn reserve(&mut self, len: usize) -> Result<Reservation<'_>, PushError> {
        let start = self.place(len)?;
        Ok(Reservation {
            producer: self,
            start,
            len,
        })
    }

    /// Copies `payload` in as one record. Returns its sequence number.
    pub fn push(&mut self, payload: &[u8]) -> Result<u64, PushError> {
        let start = self.place(payload.len())?;
        let seq = self.next_seq;
        self.seal_copy(start, payload, seq);
        Ok(seq)
    }

    /// Copies `payloads` in as consecutive records, all or none, and publishes them together:
    /// one commit (one Release store, one look at the freed space) for the batch, and the
    /// poster sees all of it or none, so it goes out in one write when the rail allows. Returns
    /// the records' sequence numbers (empty for an empty batch). Nothing is queued on an error:
    /// a record too large, [`PushError::Full`] (retry once the peer acknowledges), or
    /// [`PushError::BatchTooLarge`] (never fits: split it).
    pub fn push_batch(&mut self, payloads: &[&[u8]]) -> Result<Range<u64>, PushError> {
        let geo = &self.shared.geo;
        // Where each record would go, as `place` puts it; nothing is written before all fit.
        let mut end = self.write_pos;
        for p in payloads {
            if p.len() > geo.max_record() {
                return Err(PushError::TooLarge {
                    len: p.len(),
                    max: geo.max_record(),
                });
            }
            end = Self::placed_at(geo, end, p.len()) + record_size(p.len()) as u64;
        }
        let first = self.next_seq;
        if payloads.is_empty() {
            return Ok(first..first);
        }
        if end > self.released_cache {
            self.released_cache = self.shared.load_released();
            if end > self.released_cache {
                // Everything acknowledged frees up to the write position's segment plus a ring.
                let room = geo.segment_floor(self.write_pos) + geo.capacity() as u64;
                return Err(if end > room {
                    PushError::BatchTooLarge {
                        bytes: (end - self.write_pos) as usize,
                        room: (room - self.write_pos) as usize,
                    }
                } else {
                    PushError::Full
                });
            }
        }
        let mut first_end = 0;
        for (seq, p) in (first..).zip(payloads) {
            let start = Self::placed_at(&self.shared.geo, self.write_pos, p.len());
            self.frame_copy(start, p, seq);
            if seq == first {
                first_end = self.write_pos;
            }
        }
        let last = first + payloads.len() as u64 - 1;
        debug_assert_eq!(self.write_pos, end);
        self.publish_range(end, first, last, first_end);
        Ok(first..last + 1)
    }

    /// Where a record of `len` payload bytes written at `pos` starts: at `pos`, or at the next
    /// segment when it doesn't fit in this one's rest.
    #[inline]
    fn placed_at(geo: &Geometry, pos: u64, len: usize) -> u64 {
        let size = record_size(len) as u64;
        let rem = geo.segment_remaining(pos) as u64;
        if size <= rem {
            pos
        } else {
            pos + rem
        }
    }

    /// Where a record of `len` bytes starts, padding the current segment if it doesn't fit there.
    fn place(&mut self, len: usize) -> Result<u64, PushError> {
        let geo = &self.shared.geo;
        if len > geo.max_record() {
            return Err(PushError::TooLarge {
                len,
                max: geo.max_record(),
            });
        }
        let size = record_size(len) as u64;
        let start = Self::placed_at(geo, self.write_pos, len);
        if start + size > self.released_cache {
            self.released_cache = self.shared.load_released();
            if start + size > self.released_cache {
                return Err(PushError::Full);
            }
        }
        Ok(start)
    }

    /// Closes the current segment with a pad marker when the record at `start` doesn't begin
    /// at the write position.
    #[inline]
    fn pad_before(&self, start: u64) {
        let shared = &*self.shared;
        let geo = &shared.geo;
        if start != self.write_pos && geo.segment_remaining(self.write_pos) >= HEADER_LEN {
            shared.write(geo.offset(self.write_pos), &Header::pad().encode());
        }
    }

    /// Frames `payload` as record `seq` at `start` and publishes it. The crc comes from the
    /// caller's bytes and the ring is only stored to (see [`record_crc_parts`] for why nothing is
    /// read back).
    #[inline]
    fn seal_copy(&mut self, start: u64, payload: &[u8], seq: u64) {
        let end = self.frame_copy(start, payload, seq);
        self.publish(end, seq);
    }

    /// Frames `payload` as record `seq` at `start` (padding the segment before it if needed) and
    /// moves the write position past it, without publishing. Returns where it ends. (Always
    /// inline: as a call from `seal_copy` it cost a 64 B round trip 6 instructions.)
    #[inline(always)]
    fn frame_copy(&mut self, start: u64, payload: &[u8], seq: u64) -> u64 {
        self.pad_before(start);
        let shared = &*self.shared;
        let off = shared.geo.offset(start);
        let len = payload.len() as u32;
        shared.write(off + HEADER_LEN, payload);
        let crc = record_crc_parts(len, seq, payload);
        shared.write(off, &Header { seq, len, crc }.encode());
        self.write_pos = start + record_size(payload.len()) as u64;
        self.write_pos
    }

    /// Writes the padding (if any), the header of the payload written in place, and publishes.
    fn seal(&mut self, start: u64, len: usize, seq: u64) {
        self.pad_before(start);
        let shared = &*self.shared;
        let off = shared.geo.offset(start);
        // The length and sequence number first, then one crc pass over them and the payload.
        let mut header = Header {
            seq,
            len: len as u32,
            crc: 0,
        };
        shared.write(off, &header.encode());
        let covered = HEADER_LEN - CRC_COVERS_FROM + len;
        shared.track_read(off + CRC_COVERS_FROM, covered);
        // SAFETY: the header and payload were just written by this (unique) producer and aren't
        // published yet.
        header.crc = record_crc(unsafe { shared.region.slice(off + CRC_COVERS_FROM, covered) });
        shared.write(off, &header.crc.to_le_bytes());
        self.publish(start + record_size(len) as u64, seq);
    }

    /// Makes every byte below `end` (record `seq` the last) the poster's.
    #[inline]
    fn publish(&mut self, end: u64, seq: u64) {
        self.publish_range(end, seq, seq, end);
    }

    /// Makes every byte below `end` the poster's: records `first..=last`, numbered on, the
    /// first ending at `first_end` (where a break in the numbering, if it has one, ends).
    #[inline]
    fn publish_range(&mut self, end: u64, first: u64, last: u64, first_end: u64) {
        self.write_pos = end;
        self.next_seq = last + 1;
        let breaks = first != self.last_committed_seq.wrapping_add(1);
        self.last_committed_seq = last;
        self.shared
            .store_commit(Commit::pack(end, last), last, breaks.then_some(first_end));
    }

    /// Numbers the next new record `next` at least (records kept aside by a failover came
    /// before it).
    pub(crate) fn number_on_from(&mut self, next: u64) {
        self.next_seq = self.next_seq.max(next);
    }

    /// Appends a record keeping a sequence number assigned elsewhere (failover copies).
    pub(crate) fn push_with_seq(&mut self, seq: u64, payload: &[u8]) -> Result<(), PushError> {
        let start = self.place(payload.len())?;
        self.seal_copy(start, payload, seq);
        Ok(())
    }
}

/// The link's half: finds what to post, marks it posted, applies acknowledgements.
pub struct Poster {
    shared: Arc<Shared>,
    posted_pos: u64,
    acked_pos: u64,
    acked_seq: u64,
    last_posted_seq: u64,
    /// The number the next record posted has, when the numbering runs on.
    next_post_seq: u64,
    /// Records posted and records acknowledged so far (for the O(1) full-acknowledgement path).
    posted_records: u64,
    acked_records: u64,
    /// Where the latest posted writes ended, oldest first: a receiver consumes whole writes, so
    /// an acknowledgement usually names one of these record boundaries and frees without a
    /// walk over the records behind it (see [`Poster::ack`]).
    ends: PostedEnds,
}

/// How many posted writes' ends a [`Poster`] remembers (beyond them, an acknowledgement walks).
const POSTED_ENDS: usize = 64;

/// A record boundary a posted write ended at.
#[derive(Debug, Clone, Copy)]
struct PostedEnd {
    pos: u64,
    /// The last record's sequence number at or before `pos` (0: none).
    last_seq: u64,
    /// Records posted up to `pos`.
    records: u64,
}

/// A fixed ring of [`PostedEnd`]s (no allocation): the oldest is dropped when it is full.
#[derive(Debug, Clone, Copy)]
struct PostedEnds {
    ends: [PostedEnd; POSTED_ENDS],
    oldest: usize,
    len: usize,
}

impl PostedEnds {
    const fn new() -> PostedEnds {
        PostedEnds {
            ends: [PostedEnd {
                pos: 0,
                last_seq: 0,
                records: 0,
            }; POSTED_ENDS],
            oldest: 0,
            len: 0,
        }
    }

    #[inline]
    fn push(&mut self, end: PostedEnd) {
        if self.len == POSTED_ENDS {
            self.oldest = (self.oldest + 1) % POSTED_ENDS;
            self.len -= 1;
        }
        self.ends[(self.oldest + self.len) % POSTED_ENDS] = end;
        self.len += 1;
    }

    /// Forgets every end at or below `pos`; returns the last of them.
    #[inline]
    fn take_through(&mut self, pos: u64) -> Option<PostedEnd> {
        let mut last = None;
        while self.len > 0 && self.ends[self.oldest].pos <= pos {
            last = Some(self.ends[self.oldest]);
            self.oldest = (self.oldest + 1) % POSTED_ENDS;
            self.len -= 1;
        }
        last
    }

    fn clear(&mut self) {
        self.len = 0;
    }
}

impl Poster {
    /// The next range of committed, unposted records: contiguous in memory (split where the ring
    /// wraps), at most `max_bytes` long unless a single record is larger, ending on a record
    /// boundary. Several small records coalesce into one range (one RDMA write).
    #[inline(always)]
    pub fn pending(&self, max_bytes: usize) -> Option<PendingRange> {
        let commit = self.shared.load_commit();
        if commit.is_at(self.posted_pos) {
            return None;
        }
        let committed = commit.pos(self.posted_pos);
        // Where the ring wraps after `posted_pos` (the capacity is a power of two).
        let wrap = (self.posted_pos | (self.shared.geo.capacity() as u64 - 1)) + 1;
        // Everything committed fits one range, and its records are numbered one after the
        // other from the next expected: the commit's number says how many there are, without
        // reading a header (which another thread's producer has just written: a cache miss
        // each, one after the other).
        if committed <= wrap
            && committed - self.posted_pos <= max_bytes as u64
            && self.shared.load_discontinuity() <= self.posted_pos
        {
            let before = self.next_post_seq - 1;
            let last = commit.seq(before);
            if last > before {
                return Some(PendingRange {
                    start: self.posted_pos,
                    end: committed,
                    offset: self.shared.geo.offset(self.posted_pos),
                    seqs: Some((self.next_post_seq, last)),
                    records: (last - before) as usize,
                    reaches_commit: true,
                });
            }
        }
        self.pending_walk_to(committed, wrap, max_bytes)
    }

    /// [`Poster::pending`] by walking the records' headers (what it does when the commit
    /// can't say; the reference its shortcuts are tested against).
    #[cfg(test)]
    pub(crate) fn pending_walk(&self, max_bytes: usize) -> Option<PendingRange> {
        let committed = self.shared.load_commit().pos(self.posted_pos);
        if committed == self.posted_pos {
            return None;
        }
        let wrap = (self.posted_pos | (self.shared.geo.capacity() as u64 - 1)) + 1;
        self.pending_walk_to(committed, wrap, max_bytes)
    }

    /// The walk of [`Poster::pending`] over `[posted_pos, committed)`, stopping at `wrap`.
    #[inline]
    fn pending_walk_to(&self, committed: u64, wrap: u64, max_bytes: usize) -> Option<PendingRange> {
        let limit = committed.min(wrap);
        let mut pos = self.posted_pos;
        let mut seqs: Option<(u64, u64)> = None;
        let mut records = 0;
        while pos < limit {
            let (step, seq) = match entry_at(&self.shared, pos) {
                Entry::Skip(n) => (n as u64, None),
                Entry::Record { seq, size, .. } => (size as u64, Some(seq)),
            };
            if records > 0 && pos + step - self.posted_pos > max_bytes as u64 {
                break;
            }
            if let Some(seq) = seq {
                seqs = Some((seqs.map_or(seq, |s| s.0), seq));
                records += 1;
            }
            pos += step;
        }
        Some(PendingRange {
            start: self.posted_pos,
            end: pos,
            offset: self.shared.geo.offset(self.posted_pos),
            seqs,
            records,
            reaches_commit: pos == committed,
        })
    }

    /// Records that `range` (from [`Poster::pending`]) has been handed to the NIC.
    #[inline(always)] // on every post, with `pending` (a call each cost a round trip 30)
    pub fn mark_posted(&mut self, range: &PendingRange) {
        debug_assert_eq!(range.start, self.posted_pos, "ranges are posted in order");
        self.posted_pos = range.end;
        self.posted_records += range.records as u64;
        if let Some((_, last)) = range.seqs {
            self.last_posted_seq = last;
            self.next_post_seq = last + 1;
        }
        self.ends.push(PostedEnd {
            pos: range.end,
            last_seq: self.last_posted_seq,
            records: self.posted_records,
        });
    }

    /// Applies an acknowledgement from the receiver of this rail: it has consumed its mirror up to
    /// byte position `consumed_pos` (which frees the segments behind it), and has delivered the
    /// stream up to sequence number `delivered_seq` (on any rail; such records need no resend).
    /// Returns how many records the position acknowledged.
    pub fn ack(&mut self, consumed_pos: u64, delivered_seq: u64) -> Result<usize, AckError> {
        if consumed_pos > self.posted_pos {
            return Err(AckError::BeyondPosted {
                consumed: consumed_pos,
                posted: self.posted_pos,
            });
        }
        self.acked_seq = self.acked_seq.max(delivered_seq);
        if consumed_pos == self.posted_pos {
            // Everything posted was consumed (the common case): no need to walk the records.
            let n = (self.posted_records - self.acked_records) as usize;
            self.acked_records = self.posted_records;
            self.acked_pos = consumed_pos;
            self.acked_seq = self.acked_seq.max(self.last_posted_seq);
            self.ends.clear();
            self.release();
            return Ok(n);
        }
        // Where a posted write ended (the usual acknowledgement while more is in flight): a
        // record boundary known without reading the records.
        if let Some(end) = self.ends.take_through(consumed_pos) {
            if end.pos == consumed_pos && end.pos >= self.acked_pos {
                let n = (end.records - self.acked_records) as usize;
                self.acked_records = end.records;
                self.acked_pos = consumed_pos;
                self.acked_seq = self.acked_seq.max(end.last_seq);
                self.release();
                return Ok(n);
            }
        }
        let mut n = 0;
        while self.acked_pos < consumed_pos {
            let (size, seq) = match entry_at(&self.shared, self.acked_pos) {
                Entry::Skip(k) => (k as u64, None),
                Entry::Record { seq, size, .. } => (size as u64, Some(seq)),
            };
            if self.acked_pos + size > consumed_pos {
                break; // a position inside a record: only whole records count
            }
            self.acked_pos += size;
            if let Some(seq) = seq {
                self.acked_seq = self.acked_seq.max(seq);
                self.acked_records += 1;
                n += 1;
            }
        }
        self.release();
        Ok(n)
    }

    fn release(&self) {
        let geo = &self.shared.geo;
        let limit = geo.segment_floor(self.acked_pos) + geo.capacity() as u64;
        // Pairs with the Acquire in `Shared::load_released`: our reads of the freed segments are
        // done before the producer may overwrite them.
        self.shared.released.store(limit, Ordering::Release);
    }

    /// Highest sequence number known delivered (0: none).
    pub fn acked_seq(&self) -> u64 {
        self.acked_seq
    }

    /// Sequence number of the last record committed (0: none). Never below that of any record
    /// this poster has seen (pending, posted, acknowledged).
    #[inline]
    pub fn committed_seq(&self) -> u64 {
        self.shared.load_last_seq()
    }

    /// The ring's memory, for registration with a NIC.
    pub fn memory(&self) -> crate::Memory {
        crate::Memory(crate::MemoryKind::Send(self.shared.clone()))
    }

    /// The peer delivered every record up to `seq` (learnt from any rail, or from an earlier
    /// queue of the stream after a failover copy): they are no longer unacknowledged here, and
    /// a failover copies none of them (their space is freed by position acknowledgements).
    pub fn note_delivered(&mut self, seq: u64) {
        self.acked_seq = self.acked_seq.max(seq);
    }

    /// Whether committed records wait to be posted.
    #[inline]
    pub fn has_pending(&self) -> bool {
        !self.shared.load_commit().is_at(self.posted_pos)
    }

    /// Highest sequence number posted (0: none).
    pub fn last_posted_seq(&self) -> u64 {
        self.last_posted_seq
    }

    /// Whether every committed record has been consumed by the peer.
    pub fn all_acked(&self) -> bool {
        self.shared.load_commit().is_at(self.acked_pos)
    }

    /// Visits every committed record not yet known delivered, in order: `(seq, payload)`.
    pub fn for_each_unacked(&self, mut f: impl FnMut(u64, &[u8])) {
        let committed = self.shared.load_commit().pos(self.acked_pos);
        let mut pos = self.acked_pos;
        while pos < committed {
            match entry_at(&self.shared, pos) {
                Entry::Skip(k) => pos += k as u64,
                Entry::Record { seq, size, .. } if seq <= self.acked_seq => pos += size as u64,
                Entry::Record { seq, len, size } => {
                    let off = self.shared.geo.offset(pos) + HEADER_LEN;
                    self.shared.track_read(off, len);
                    // SAFETY: below `committed` (Acquire above) and not acknowledged, so the
                    // producer won't overwrite it while we read.
                    f(seq, unsafe { self.shared.region.slice(off, len) });
                    pos += size as u64;
                }
            }
        }
    }

    /// Copies every unacknowledged record, in order and with its sequence number, into `dst` (the
    /// standby card's queue), which then continues numbering after them. Records `dst` already
    /// holds (numbered below its next sequence number: a hot standby's copies) are not copied
    /// again, so `dst` stays in sequence order. With `kept`, the records `dst` has no room for
    /// (the first that doesn't fit and every one after it) go there, in order, instead of
    /// failing the copy; the report counts them, and `dst` numbers on after them only once
    /// they are in (see `LaneControl::fail_over`).
    pub(crate) fn copy_unacked_into(
        &self,
        own: &Producer,
        dst: &mut Producer,
        mut kept: Option<&mut KeptRecords>,
    ) -> Result<CopyReport, PushError> {
        let mut report = CopyReport::default();
        let mut result = Ok(());
        let held_below = dst.next_seq;
        self.for_each_unacked(|seq, payload| {
            if result.is_err() || seq < held_below {
                return;
            }
            match kept.as_deref_mut() {
                Some(kept) if !kept.is_empty() => kept.push_back((seq, payload.into())),
                Some(kept) => {
                    if dst.push_with_seq(seq, payload).is_err() {
                        kept.push_back((seq, payload.into()));
                    }
                }
                None => result = dst.push_with_seq(seq, payload),
            }
            if result.is_ok() {
                report.records += 1;
                report.bytes += payload.len();
                report.first_seq.get_or_insert(seq);
                report.last_seq = Some(seq);
            }
        });
        result?;
        if kept.is_none_or(|k| k.is_empty()) {
            dst.next_seq = dst.next_seq.max(own.next_seq);
        }
        let geo = &self.shared.geo;
        report.only_current_segment = geo.segment_floor(self.acked_pos)
            == geo.segment_floor(own.write_pos)
            || self.acked_pos == own.write_pos;
        Ok(report)
    }
}

/// How far a hot standby's copy of the active queue went (see `Poster::copy_new_into`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ShadowReport {
    /// Records copied by this call.
    pub records: usize,
    /// Their payload bytes.
    pub bytes: usize,
    /// The copy stopped at a record the standby had no room for (it is retried once the
    /// standby's peer has acknowledged more).
    pub stalled: bool,
}

impl Poster {
    /// Copies the records committed here from byte position `*from` on into `dst` (a hot
    /// standby's queue), with their sequence numbers, skipping those `dst` already holds and
    /// those known delivered, and advances `*from` past what it copied. A record already
    /// acknowledged here (consumed by the peer) is never read: `*from` moves up to the
    /// acknowledged position first, so a standby that fell behind skips to the records the peer
    /// may still lack (every one it skips was delivered, so `dst` never shows the receiver a
    /// gap). On a full `dst` the copy stops at that record.
    pub(crate) fn copy_new_into(&self, from: &mut u64, dst: &mut Producer) -> ShadowReport {
        let mut report = ShadowReport::default();
        let committed = self.shared.load_commit().pos(self.acked_pos);
        let mut pos = (*from).max(self.acked_pos);
        while pos < committed {
            match entry_at(&self.shared, pos) {
                Entry::Skip(k) => pos += k as u64,
                Entry::Record { seq, size, .. } if seq < dst.next_seq || seq <= self.acked_seq => {
                    pos += size as u64
                }
                Entry::Record { seq, len, size } => {
                    let off = self.shared.geo.offset(pos) + HEADER_LEN;
                    self.shared.track_read(off, len);
                    // SAFETY: below `committed` (Acquire above) and not acknowledged, so the
                    // producer won't overwrite it while we read.
                    let payload = unsafe { self.shared.region.slice(off, len) };
                    if dst.push_with_seq(seq, payload).is_err() {
                        report.stalled = true;
                        break;
                    }
                    report.records += 1;
                    report.bytes += len;
                    pos += size as u64;
                }
            }
        }
        *from = pos;
        report
    }

    /// Retires the committed records not yet posted (they went to another queue): each segment
    /// they touch is padded from their first byte to its end, and the producer moves on to the
    /// next segment. Posting the padding keeps the peer's mirror in step (it skips it) and lets
    /// acknowledgements free the space; none of the records is ever sent from here. Returns how
    /// many records were retired.
    pub(crate) fn retire_unposted(&mut self, own: &mut Producer) -> usize {
        let commit = self.shared.load_commit();
        let committed = commit.pos(self.posted_pos);
        let geo = self.shared.geo;
        let mut retired = 0;
        // Count first: the padding hides the records from the walker.
        let mut pos = self.posted_pos;
        while pos < committed {
            match entry_at(&self.shared, pos) {
                Entry::Skip(k) => pos += k as u64,
                Entry::Record { seq, size, .. } => {
                    if retired == 0 {
                        // This queue no longer holds them: a later copy into it brings them.
                        own.next_seq = seq;
                    }
                    retired += 1;
                    pos += size as u64;
                }
            }
        }
        let mut pos = self.posted_pos;
        while pos < committed {
            if geo.segment_remaining(pos) >= HEADER_LEN {
                self.shared.write(geo.offset(pos), &Header::pad().encode());
            }
            pos = geo.segment_floor(pos) + geo.segment_size() as u64;
        }
        if self.posted_pos < committed {
            // The padding hides records the commit's number counts: the poster walks up to
            // its end (and the producer's next record breaks the numbering too: it numbers
            // from the first retired again).
            let end = pos.max(committed);
            own.write_pos = end;
            // The numbering runs on from the last record left in the queue: the last posted.
            own.last_committed_seq = self.next_post_seq - 1;
            // The commit's number stays the last retired record's (what `committed_seq` says).
            let last = self.shared.load_last_seq();
            self.shared
                .store_commit(Commit::pack(end, last), last, Some(end));
        }
        retired
    }
}

/// A sender queue owned by one thread (both halves together). Use [`SendQueue::split`] to hand the
/// producer to another thread.
pub struct SendQueue {
    producer: Producer,
    poster: Poster,
}

impl SendQueue {
    /// A fresh queue; its first record gets sequence number `first_seq` (>= 1).
    pub fn new(geo: Geometry, backing: Backing, first_seq: u64) -> std::io::Result<SendQueue> {
        assert!(first_seq >= 1, "sequence numbers start at 1");
        let shared = Arc::new(Shared::new(geo, backing, first_seq)?);
        Ok(SendQueue {
            producer: Producer {
                shared: shared.clone(),
                write_pos: 0,
                next_seq: first_seq,
                last_committed_seq: first_seq - 1,
                released_cache: 0,
            },
            poster: Poster {
                shared,
                posted_pos: 0,
                acked_pos: 0,
                acked_seq: first_seq - 1,
                last_posted_seq: 0,
                next_post_seq: first_seq,
                posted_records: 0,
                acked_records: 0,
                ends: PostedEnds::new(),
            },
        })
    }

    /// Splits into the application's and the link's halves (lock-free SPSC).
    pub fn split(self) -> (Producer, Poster) {
        (self.producer, self.poster)
    }

    pub fn geometry(&self) -> Geometry {
        self.producer.shared.geo
    }

    /// The ring's memory, for registration with a NIC.
    pub fn memory(&self) -> crate::Memory {
        crate::Memory(crate::MemoryKind::Send(self.producer.shared.clone()))
    }

    /// Sequence number the next committed record gets.
    pub fn next_seq(&self) -> u64 {
        self.producer.next_seq
    }

    /// Highest sequence number known delivered by the peer (0: none).
    pub fn acked_seq(&self) -> u64 {
        self.poster.acked_seq
    }

    /// Visits every record not known delivered, in order (see [`Poster::for_each_unacked`]).
    pub fn for_each_unacked(&self, f: impl FnMut(u64, &[u8])) {
        self.poster.for_each_unacked(f)
    }

    pub fn producer(&mut self) -> &mut Producer {
        &mut self.producer
    }

    pub fn poster(&mut self) -> &mut Poster {
        &mut self.poster
    }

    pub fn push(&mut self, payload: &[u8]) -> Result<u64, PushError> {
        self.producer.push(payload)
    }

    /// [`Producer::push_batch`].
    pub fn push_batch(&mut self, payloads: &[&[u8]]) -> Result<Range<u64>, PushError> {
        self.producer.push_batch(payloads)
    }

    pub fn reserve(&mut self, len: usize) -> Result<Reservation<'_>, PushError> {
        self.producer.reserve(len)
    }

    /// Copies every record not known delivered, in order and with its sequence number, into `dst`
    /// (the standby card's queue, normally fresh), which then numbers on after them and inherits
    /// what is known delivered.
    pub fn copy_unacked_into(&self, dst: &mut SendQueue) -> Result<CopyReport, PushError> {
        let report = self
            .poster
            .copy_unacked_into(&self.producer, &mut dst.producer, None)?;
        dst.poster.acked_seq = dst.poster.acked_seq.max(self.poster.acked_seq);
        Ok(report)
    }

    /// Empties the queue (a fresh connection on this rail), numbering on from `next_seq`.
    pub fn reset(&mut self, next_seq: u64) {
        reset_halves(&mut self.producer, &mut self.poster, next_seq)
    }
}

/// Empties a queue given both of its halves (exclusive access: nobody else uses either).
pub(crate) fn reset_halves(producer: &mut Producer, poster: &mut Poster, next_seq: u64) {
    debug_assert!(Arc::ptr_eq(&producer.shared, &poster.shared));
    debug_assert!(next_seq >= 1, "sequence numbers start at 1");
    producer.shared.reset_indices(next_seq);
    producer.write_pos = 0;
    producer.released_cache = 0;
    producer.next_seq = next_seq;
    producer.last_committed_seq = next_seq - 1;
    poster.posted_pos = 0;
    poster.acked_pos = 0;
    poster.acked_seq = next_seq - 1;
    poster.last_posted_seq = 0;
    poster.next_post_seq = next_seq;
    poster.posted_records = 0;
    poster.acked_records = 0;
    poster.ends.clear();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One step of the differential test below.
    #[derive(Debug, Clone)]
    enum Step {
        Push(usize),
        /// Records of these lengths pushed as one batch (one commit).
        Batch(Vec<usize>),
        /// A failover copy's record: numbered this far past the next number (0: the next).
        PushNumbered(usize, u64),
        /// Retire what is committed and not posted (a failover moved it elsewhere).
        Retire,
        /// Post what is pending, at most this many bytes a write.
        Post(usize),
        /// Acknowledge: at a posted write's end, at any record boundary posted, inside a
        /// record, or behind what was acknowledged (picked by the first number).
        Ack(u8, usize),
    }

    fn step() -> impl proptest::strategy::Strategy<Value = Step> {
        use proptest::prelude::*;
        prop_oneof![
            4 => (0usize..200).prop_map(Step::Push),
            2 => proptest::collection::vec(0usize..200, 0..6).prop_map(Step::Batch),
            1 => (0usize..200, 0u64..3).prop_map(|(len, skip)| Step::PushNumbered(len, skip)),
            1 => Just(Step::Retire),
            2 => (1usize..600).prop_map(Step::Post),
            2 => (0u8..4, any::<usize>()).prop_map(|(k, i)| Step::Ack(k, i)),
        ]
    }

    fn boundaries(q: &SendQueue) -> Vec<u64> {
        // Every record boundary below what was posted, walked as the queue's own walker would.
        let p = &q.poster;
        let mut out = vec![p.acked_pos];
        let mut pos = p.acked_pos;
        while pos < p.posted_pos {
            pos += match entry_at(&p.shared, pos) {
                Entry::Skip(n) => n as u64,
                Entry::Record { size, .. } => size as u64,
            };
            out.push(pos);
        }
        out
    }

    /// A lane reset to 1 that takes a failover copy of a long stream (numbers past 2^32, more
    /// than the commit word's 32 bits can carry from that floor) says the copy's last number in
    /// full before posting anything, and its ranges count right.
    #[test]
    fn numbers_past_2_pow_32_after_a_reset_to_1() {
        let geo = Geometry::new(256, 8, 200).unwrap();
        let mut q = SendQueue::new(geo, Backing::Heap, 1).unwrap();
        q.push(b"first").unwrap();
        q.reset(1);
        assert_eq!(
            q.poster.committed_seq(),
            0,
            "nothing committed since the reset"
        );
        let far = (5u64 << 32) + 7;
        q.producer.push_with_seq(far, b"copied").unwrap();
        q.producer.push_with_seq(far + 1, b"copied").unwrap();
        assert_eq!(q.poster.committed_seq(), far + 1);
        let r = q.poster.pending(usize::MAX).unwrap();
        assert_eq!((r.seqs, r.records), (Some((far, far + 1)), 2));
        q.poster.mark_posted(&r);
        assert_eq!(q.push(b"next").unwrap(), far + 2);
        let r = q.poster.pending(usize::MAX).unwrap();
        assert_eq!((r.seqs, r.records), (Some((far + 2, far + 2)), 1));
        assert_eq!(q.poster.committed_seq(), far + 2);
    }

    /// The ring's bytes below the write position and the producer's indices.
    fn producer_state(q: &SendQueue) -> (Vec<u8>, u64, u64, u64) {
        let p = &q.producer;
        let geo = p.shared.geo;
        let bytes = (0..p.write_pos)
            // SAFETY: nothing else uses the queue (both halves are `q`'s, borrowed here).
            .map(|pos| unsafe { p.shared.region.slice(geo.offset(pos), 1) }[0])
            .collect();
        (bytes, p.write_pos, p.next_seq, p.last_committed_seq)
    }

    /// A batch that fits is committed once and leaves the ring as its records pushed one by one
    /// would; one that doesn't leaves the queue as it was and says why.
    #[test]
    fn a_batch_is_its_records_pushed_alone_or_nothing() {
        let geo = Geometry::new(256, 4, 200).unwrap();
        let lens = [30usize, 0, 100, 61, 8];
        let payloads: Vec<Vec<u8>> = lens.iter().map(|&l| vec![l as u8 + 1; l]).collect();
        let refs: Vec<&[u8]> = payloads.iter().map(|p| &p[..]).collect();
        let mut batched = SendQueue::new(geo, Backing::Heap, 7).unwrap();
        let mut alone = SendQueue::new(geo, Backing::Heap, 7).unwrap();
        for _ in 0..2 {
            // The second round crosses segment boundaries (padding inside the batch).
            let first = alone.producer.next_seq();
            for p in &refs {
                alone.push(p).unwrap();
            }
            assert_eq!(batched.push_batch(&refs), Ok(first..first + 5));
            assert_eq!(producer_state(&batched), producer_state(&alone));
        }
        let r = batched.poster.pending(usize::MAX).unwrap();
        assert_eq!((r.seqs, r.records), (Some((7, 16)), 10));
        let mut seen = Vec::new();
        batched.poster.mark_posted(&r);
        batched
            .poster
            .for_each_unacked(|seq, p| seen.push((seq, p.to_vec())));
        let want: Vec<(u64, Vec<u8>)> = (7..17).zip(payloads.iter().cycle().cloned()).collect();
        assert_eq!(seen, want);

        // Refused: nothing written, nothing numbered.
        let before = producer_state(&batched);
        let too_long = [&[0u8; 201][..], b"x"];
        assert_eq!(
            batched.push_batch(&too_long),
            Err(PushError::TooLarge { len: 201, max: 200 })
        );
        let full = [&[1u8; 200][..]; 3];
        assert_eq!(batched.push_batch(&full), Err(PushError::Full));
        let never = [&[1u8; 200][..]; 5]; // 5 x 216 B in a 1,024 B ring
        assert!(
            matches!(
                batched.push_batch(&never),
                Err(PushError::BatchTooLarge {
                    bytes: 1080..,
                    room: 769..=1024
                })
            ),
            "{:?}",
            batched.push_batch(&never)
        );
        assert_eq!(batched.push_batch(&[]), Ok(17..17));
        assert_eq!(producer_state(&batched), before);
        assert!(batched.poster.pending(usize::MAX).is_none());

        // Once acknowledged, the full batch fits.
        batched.poster.ack(r.end, 16).unwrap();
        assert_eq!(batched.push_batch(&full), Ok(17..20));
    }

    proptest::proptest! {
        /// The shortcuts that don't read records back (a range counted by the commit's number,
        /// an acknowledgement at a remembered write end) leave the poster exactly as the walk
        /// over the records would, whatever the pattern of pushes, failover copies' numbers,
        /// posts, retirements and acknowledgements (more writes in flight than it remembers,
        /// boundaries inside writes, positions inside records, stale ones), from any first
        /// number.
        #[test]
        fn shortcuts_match_the_walk(first_seq in 1u64..(1 << 34), steps in proptest::collection::vec(step(), 1..400)) {
            let geo = Geometry::new(256, 8, 200).unwrap();
            let mut fast = SendQueue::new(geo, Backing::Heap, first_seq).unwrap();
            let mut walk = SendQueue::new(geo, Backing::Heap, first_seq).unwrap();
            let mut write_ends: Vec<u64> = Vec::new();
            for s in steps {
                match s {
                    Step::Push(len) => {
                        let payload = vec![len as u8; len];
                        let seq = fast.push(&payload).ok();
                        proptest::prop_assert_eq!(seq, walk.push(&payload).ok());
                    }
                    Step::Batch(lens) => {
                        let payloads: Vec<Vec<u8>> = lens.iter().map(|&l| vec![l as u8; l]).collect();
                        let refs: Vec<&[u8]> = payloads.iter().map(|p| &p[..]).collect();
                        let seqs = fast.push_batch(&refs);
                        proptest::prop_assert_eq!(seqs, walk.push_batch(&refs));
                    }
                    Step::PushNumbered(len, skip) => {
                        let payload = vec![len as u8; len];
                        let seq = fast.producer.next_seq() + skip;
                        let pushed = fast.producer.push_with_seq(seq, &payload).ok();
                        proptest::prop_assert_eq!(pushed, walk.producer.push_with_seq(seq, &payload).ok());
                    }
                    Step::Retire => {
                        let retired = fast.poster.retire_unposted(&mut fast.producer);
                        proptest::prop_assert_eq!(retired, walk.poster.retire_unposted(&mut walk.producer));
                    }
                    Step::Post(max) => {
                        while let Some(r) = fast.poster.pending(max) {
                            proptest::prop_assert_eq!(Some(r), walk.poster.pending_walk(max));
                            let committed = fast.poster.shared.load_commit().pos(r.start);
                            proptest::prop_assert_eq!(r.reaches_commit, r.end == committed);
                            fast.poster.mark_posted(&r);
                            walk.poster.mark_posted(&r);
                            write_ends.push(r.end);
                        }
                    }
                    Step::Ack(kind, i) => {
                        let posted = fast.poster.posted_pos;
                        let acked = fast.poster.acked_pos;
                        let pos = match kind {
                            0 => {
                                let ends: Vec<u64> =
                                    write_ends.iter().copied().filter(|&e| e >= acked).collect();
                                if ends.is_empty() { posted } else { ends[i % ends.len()] }
                            }
                            1 => {
                                let b = boundaries(&fast);
                                b[i % b.len()]
                            }
                            2 => acked + (i as u64 % (posted - acked + 1)),
                            _ => i as u64 % (acked + 1),
                        };
                        walk.poster.ends.clear(); // the reference always walks
                        let (a, b) = (fast.poster.ack(pos, 0), walk.poster.ack(pos, 0));
                        proptest::prop_assert_eq!(a, b);
                        let (f, w) = (&fast.poster, &walk.poster);
                        proptest::prop_assert_eq!(
                            (f.acked_pos, f.acked_seq, f.acked_records),
                            (w.acked_pos, w.acked_seq, w.acked_records)
                        );
                    }
                }
            }
        }
    }
}
