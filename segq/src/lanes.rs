//! One send queue per rail (a *lane*), of which one — the active lane — takes the application's
//! records. The link's thread holds the [`LaneControl`] with every lane's [`Poster`], and at a
//! failover it copies the unacknowledged records of the active lane into a standby lane and makes
//! that one active. The application writes either on the control's own thread
//! ([`LaneControl::push_local`]: `&mut` access, no protocol at all) or from another thread
//! through the [`LaneWriter`] ([`LaneControl::writer`]), which takes the protocol below. The
//! types make the choice: the local path needs `&mut LaneControl`, so it can't race; once a
//! writer exists, the local path is refused ([`LaneError::WriterElsewhere`]).
//!
//! A failover must see every record the writer committed to the old lane, and the writer must never
//! commit into a lane the control is working on. The two threads exclude each other without a lock
//! in steady state, Dekker-style: the writer raises `writer_inside`, issues a SeqCst fence and
//! reads `active`; the control stores SWITCHING into `active`, issues a SeqCst fence and reads
//! `writer_inside`. The fences guarantee that at least one of them sees the other's store: either
//! the writer sees SWITCHING and backs off (its send fails with [`LaneError::Switching`], to be
//! retried), or the control sees the writer inside and spins until it leaves (a few hundred
//! nanoseconds: one record's copy, or the caller's time between `reserve` and `commit`).
//! Writer: one Relaxed store, one fence, one Acquire load and one Release store per record; no
//! read-modify-write, nothing contended unless a failover is under way.
//!
//! The writer only touches the active lane's producer; the control touches a producer only while
//! the writer is excluded (a switch) or when that lane is not the active one (a reset).

use crossbeam_utils::CachePadded;

use crate::sender::{
    reset_halves, CopyReport, KeptRecords, Poster, Producer, PushError, Reservation, ShadowReport,
};
use crate::sync::{
    fence, spin_wait, Arc, AtomicBool, AtomicU8, AtomicUsize, MutPtr, Ordering, UnsafeCell,
};
use crate::SendQueue;
use std::ops::Range;

/// `active` while the control has the producers to itself.
const SWITCHING: usize = usize::MAX;
/// `active` once every lane is dead: the writer fails for good.
const CLOSED: usize = usize::MAX - 1;
/// `active` while a failover's kept records wait for room in the active lane: for the writer
/// the ring is full (backpressure, for as long as the peer takes to free it), not a switch of
/// a few microseconds to spin through.
const HELD: usize = usize::MAX - 2;

/// A record the writer could not take.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LaneError {
    #[error(transparent)]
    Push(#[from] PushError),
    /// A failover is moving the lanes right now; retry in a moment.
    #[error("a failover is switching lanes; retry")]
    Switching,
    /// A [`LaneWriter`] was handed out: records go through it, not [`LaneControl::push_local`].
    #[error("a lane writer was handed out: write through it")]
    WriterElsewhere,
    /// Every lane is closed, with the owner's code ([`LaneControl::close_with`]; 0 for
    /// [`LaneControl::close`]).
    #[error("every lane is closed (code {0})")]
    Closed(u8),
}

struct LaneShared {
    producers: Box<[UnsafeCell<Producer>]>,
    /// Control -> writer: the active lane, SWITCHING, HELD or CLOSED. The writer loads it with
    /// Acquire (pairs with the control's Release store ending a switch: its work on the
    /// producers is visible to the writer).
    active: CachePadded<AtomicUsize>,
    /// Writer -> control: true while the writer uses the active producer. Cleared with Release
    /// (pairs with the control's Acquire load: the writer's records are visible to the copy).
    writer_inside: CachePadded<AtomicBool>,
    /// Why the lanes were closed (the owner's code, opaque here). Stored before the Release store
    /// of CLOSED into `active`, so a writer that loaded CLOSED with Acquire reads it.
    close_code: AtomicU8,
}

// SAFETY: each producer is used by one thread at a time, by the protocol in the module doc; the
// rest is atomics. Producers themselves are Send (they own an Arc of their ring).
unsafe impl Sync for LaneShared {}
// SAFETY: as above: nothing in it is tied to a thread.
unsafe impl Send for LaneShared {}

/// The application's side: writes records into the active lane.
pub struct LaneWriter {
    shared: Arc<LaneShared>,
    max_record: usize,
}

/// The link's side: the lanes' posters, switching and resetting lanes.
pub struct LaneControl {
    shared: Arc<LaneShared>,
    posters: Vec<Poster>,
    active: usize,
    /// The last sequence number committed into lanes left behind by failovers (which may since
    /// have been reset): the stream's high-water mark survives them.
    left_behind_seq: u64,
    /// Closed for good: a failover moves the records but keeps the writer out.
    closed: bool,
    /// A [`LaneWriter`] was handed out (the local path is closed).
    writer_out: bool,
    max_record: usize,
    /// Per lane: the active lane's byte position up to which its records were copied into that
    /// lane ([`LaneControl::shadow`]); back to 0 whenever the active lane changes.
    shadow_from: Vec<u64>,
    /// Records a failover could not fit into the lane it made active (a hot standby whose
    /// ring the peer had not freed yet), oldest first: they go in as the peer frees it
    /// ([`LaneControl::move_kept`]). Until then the writer stays out, so none overtakes them.
    kept: KeptRecords,
    /// The number the writer's next record takes once the kept records are in.
    kept_next_seq: u64,
}

/// Makes lanes of `queues` (one per rail, all of one geometry); `active` takes records first.
pub fn lanes(queues: Vec<SendQueue>, active: usize) -> LaneControl {
    assert!(active < queues.len(), "active lane {active} out of range");
    let max_record = queues[0].geometry().max_record();
    let shared_lanes = queues.len();
    let (producers, posters): (Vec<_>, Vec<_>) = queues.into_iter().map(SendQueue::split).unzip();
    let shared = Arc::new(LaneShared {
        producers: producers.into_iter().map(UnsafeCell::new).collect(),
        active: CachePadded::new(AtomicUsize::new(active)),
        writer_inside: CachePadded::new(AtomicBool::new(false)),
        close_code: AtomicU8::new(0),
    });
    LaneControl {
        shared,
        posters,
        active,
        left_behind_seq: 0,
        closed: false,
        writer_out: false,
        max_record,
        shadow_from: vec![0; shared_lanes],
        kept: KeptRecords::new(),
        kept_next_seq: 0,
    }
}

/// A reserved slot in the active lane; the writer stays "inside" until it is committed or dropped.
pub struct LaneReservation<'a> {
    inner: Option<Reservation<'a>>,
    /// The access to the producer (tracked under loom), ended before the writer leaves.
    producer: Option<MutPtr<Producer>>,
    writer: &'a LaneWriter,
}

impl LaneReservation<'_> {
    /// The payload bytes to fill (exactly the reserved length).
    pub fn payload_mut(&mut self) -> &mut [u8] {
        self.inner
            .as_mut()
            .expect("present until commit")
            .payload_mut()
    }

    /// Frames and publishes the record. Returns its sequence number.
    pub fn commit(mut self) -> u64 {
        self.inner.take().expect("present until commit").commit()
        // Drop leaves.
    }
}

impl Drop for LaneReservation<'_> {
    fn drop(&mut self) {
        self.inner = None; // abandon an uncommitted slot before leaving
        self.producer = None;
        self.writer.leave();
    }
}

/// `TooLarge` for a payload longer than every lane's largest record.
fn too_large(len: usize, max: usize) -> Option<LaneError> {
    (len > max).then_some(LaneError::Push(PushError::TooLarge { len, max }))
}

impl LaneWriter {
    /// Largest payload accepted.
    pub fn max_record(&self) -> usize {
        self.max_record
    }

    /// Enters the active lane to write a `len`-byte payload: its index, with the writer marked
    /// inside.
    fn enter(&self, len: usize) -> Result<usize, LaneError> {
        // Never raise the flag while a switch is pending: a writer retrying in a loop would
        // otherwise keep the control waiting for ever.
        if self.shared.active.load(Ordering::Relaxed) == SWITCHING {
            return Err(self.refused(len, LaneError::Switching));
        }
        self.shared.writer_inside.store(true, Ordering::Relaxed);
        // Dekker with `LaneControl::exclude_writer`: orders our store before our load of
        // `active`, as its fence orders its SWITCHING store before its load of our flag.
        fence(Ordering::SeqCst);
        // Pairs with the Release that ends a switch (see `LaneShared::active`).
        match self.shared.active.load(Ordering::Acquire) {
            SWITCHING => {
                self.leave();
                Err(self.refused(len, LaneError::Switching))
            }
            CLOSED => {
                self.leave();
                // Stored before CLOSED was published, which the Acquire load above observed.
                Err(LaneError::Closed(
                    self.shared.close_code.load(Ordering::Relaxed),
                ))
            }
            HELD => {
                self.leave();
                Err(self.refused(len, LaneError::Push(PushError::Full)))
            }
            lane => Ok(lane),
        }
    }

    /// Why a `len`-byte payload is refused while the lane can't be entered: a payload too large
    /// for any lane is told so at once (it never fits, whatever the wait), anything else gets
    /// `wait`, the error to retry on.
    #[cold]
    fn refused(&self, len: usize, wait: LaneError) -> LaneError {
        too_large(len, self.max_record).unwrap_or(wait)
    }

    fn leave(&self) {
        // Pairs with the Acquire in `LaneControl::exclude_writer`.
        self.shared.writer_inside.store(false, Ordering::Release);
    }

    /// Copies `payload` into the active lane as one record. Returns its sequence number.
    pub fn push(&mut self, payload: &[u8]) -> Result<u64, LaneError> {
        let lane = self.enter(payload.len())?;
        let producer = self.shared.producers[lane].get_mut();
        // SAFETY: we are inside and `lane` is active: the control does not touch this producer
        // until we leave (module doc), and `&mut self` makes this writer the only other user.
        let r = unsafe { producer.deref() }.push(payload);
        #[allow(clippy::drop_non_drop)] // ends loom's tracked access before we leave
        drop(producer);
        self.leave();
        Ok(r?)
    }

    /// Copies `payloads` into the active lane as consecutive records with one commit, all or
    /// none ([`Producer::push_batch`]). Returns their sequence numbers.
    pub fn push_batch(&mut self, payloads: &[&[u8]]) -> Result<Range<u64>, LaneError> {
        let longest = payloads.iter().map(|p| p.len()).max().unwrap_or(0);
        let lane = self.enter(longest)?;
        let producer = self.shared.producers[lane].get_mut();
        // SAFETY: as in `push`.
        let r = unsafe { producer.deref() }.push_batch(payloads);
        #[allow(clippy::drop_non_drop)] // ends loom's tracked access before we leave
        drop(producer);
        self.leave();
        Ok(r?)
    }

    /// Reserves a slot of `len` payload bytes in the active lane. Keep it short: a failover waits
    /// for it to be committed or dropped.
    pub fn reserve(&mut self, len: usize) -> Result<LaneReservation<'_>, LaneError> {
        let lane = self.enter(len)?;
        let producer = self.shared.producers[lane].get_mut();
        // SAFETY: as in `push`; the reservation keeps us inside (and borrows `self` mutably) until
        // it is committed or dropped, so the reference stays exclusive for its whole life.
        let raw: *mut Producer = unsafe { producer.deref() };
        // SAFETY: `raw` points into `self.shared`, which outlives the returned reservation (it
        // borrows `self`); exclusivity as above.
        let inner = match unsafe { &mut *raw }.reserve(len) {
            Ok(r) => r,
            Err(e) => {
                #[allow(clippy::drop_non_drop)] // ends loom's tracked access before we leave
                drop(producer);
                self.leave();
                return Err(e.into());
            }
        };
        Ok(LaneReservation {
            inner: Some(inner),
            producer: Some(producer),
            writer: self,
        })
    }
}

impl LaneControl {
    /// The lane taking records.
    pub fn active(&self) -> usize {
        self.active
    }

    /// Largest payload accepted.
    pub fn max_record(&self) -> usize {
        self.max_record
    }

    /// Hands out the writer for another thread (once). From then on records go through it and
    /// [`LaneControl::push_local`] is refused.
    pub fn writer(&mut self) -> Option<LaneWriter> {
        if std::mem::replace(&mut self.writer_out, true) {
            return None;
        }
        Some(LaneWriter {
            shared: self.shared.clone(),
            max_record: self.max_record,
        })
    }

    /// Whether the writer was handed out: records may then be committed by another thread (or
    /// by code this thread calls back) at any time.
    #[inline]
    pub fn writer_elsewhere(&self) -> bool {
        self.writer_out
    }

    /// Whether this thread may write records itself: no writer was handed out, lanes open.
    fn check_local(&self, len: usize) -> Result<(), LaneError> {
        if self.writer_out {
            return Err(LaneError::WriterElsewhere);
        }
        if self.closed {
            return Err(LaneError::Closed(
                self.shared.close_code.load(Ordering::Relaxed),
            ));
        }
        if !self.kept.is_empty() {
            // No room before the kept records (the writer is told the same), unless it never
            // fits anywhere.
            return Err(too_large(len, self.max_record).unwrap_or(LaneError::Push(PushError::Full)));
        }
        Ok(())
    }

    /// Copies `payload` into the active lane as one record, on the control's thread (no
    /// protocol: nothing else can write). Returns its sequence number.
    pub fn push_local(&mut self, payload: &[u8]) -> Result<u64, LaneError> {
        self.check_local(payload.len())?;
        let producer = self.shared.producers[self.active].get_mut();
        // SAFETY: no LaneWriter was handed out (checked), so the producers are touched only
        // through this control, and `&mut self` makes this the only use while it lasts.
        let r = unsafe { producer.deref() }.push(payload);
        #[allow(clippy::drop_non_drop)] // ends loom's tracked access
        drop(producer);
        Ok(r?)
    }

    /// [`LaneControl::push_local`] for a batch: consecutive records, one commit, all or none
    /// ([`Producer::push_batch`]).
    pub fn push_local_batch(&mut self, payloads: &[&[u8]]) -> Result<Range<u64>, LaneError> {
        let longest = payloads.iter().map(|p| p.len()).max().unwrap_or(0);
        self.check_local(longest)?;
        let producer = self.shared.producers[self.active].get_mut();
        // SAFETY: as in `push_local`.
        let r = unsafe { producer.deref() }.push_batch(payloads);
        #[allow(clippy::drop_non_drop)] // ends loom's tracked access
        drop(producer);
        Ok(r?)
    }

    /// Reserves a slot of `len` payload bytes in the active lane, on the control's thread.
    pub fn reserve_local(&mut self, len: usize) -> Result<Reservation<'_>, LaneError> {
        self.check_local(len)?;
        let producer = self.shared.producers[self.active].get_mut();
        // SAFETY: as in `push_local`.
        let raw: *mut Producer = unsafe { producer.deref() };
        #[allow(clippy::drop_non_drop)] // ends loom's tracked access
        drop(producer);
        // SAFETY: `raw` points into `self.shared`, which outlives the reservation; the
        // reservation borrows `self` mutably, so the access stays exclusive for its whole life.
        Ok(unsafe { &mut *raw }.reserve(len)?)
    }

    pub fn lane_count(&self) -> usize {
        self.posters.len()
    }

    pub fn poster(&mut self, lane: usize) -> &mut Poster {
        &mut self.posters[lane]
    }

    pub fn poster_ref(&self, lane: usize) -> &Poster {
        &self.posters[lane]
    }

    /// A stream resumed after `seq` (a new connection continuing an old one's numbering):
    /// everything up to it counts as sent already.
    pub fn resume_after(&mut self, seq: u64) {
        self.left_behind_seq = self.left_behind_seq.max(seq);
    }

    /// The highest sequence number committed into any lane (0: none): what this side has sent.
    pub fn last_committed_seq(&self) -> u64 {
        self.posters
            .iter()
            .map(Poster::committed_seq)
            .fold(self.left_behind_seq, u64::max)
    }

    /// Keeps the writer out of every producer until `readmit`.
    fn exclude_writer(&self) {
        self.shared.active.store(SWITCHING, Ordering::Relaxed);
        // Dekker with `LaneWriter::enter` (see there).
        fence(Ordering::SeqCst);
        // Pairs with the writer's Release in `leave`: its records are visible once it is out.
        while self.shared.writer_inside.load(Ordering::Acquire) {
            spin_wait();
        }
    }

    fn readmit(&self, active: usize) {
        // Pairs with the writer's Acquire in `enter`: our work on the producers is visible first.
        self.shared.active.store(active, Ordering::Release);
    }

    /// A failover: copies every unacknowledged record of the active lane, in order and with
    /// its sequence number, into lane `to` and makes `to` active. Returns the copy's report and
    /// the sequence number the writer's next record takes.
    ///
    /// A hot standby may lack room for the records it doesn't hold yet: its ring holds copies
    /// the peer has not consumed (it was paused, or slow on that wire). Those records are kept
    /// aside, in order after any kept by an earlier failover, and go into `to` as the peer frees
    /// it ([`LaneControl::move_kept`]); the writer stays out until then (its sends are refused
    /// as for a full ring, which may last as long as the peer's pause), so nothing overtakes
    /// them. A failover never fails for room, and the failed lane can be reset at once.
    pub fn fail_over(&mut self, to: usize) -> (CopyReport, u64) {
        let from = self.active;
        self.check_target(to);
        self.exclude_writer();
        let (own, dst) = (
            self.shared.producers[from].get_mut(),
            self.shared.producers[to].get_mut(),
        );
        // SAFETY: the writer is excluded (above) and `from != to`: these are the only references
        // to either producer until `readmit`.
        let (own, dst) = unsafe { (own.deref(), dst.deref()) };
        let earlier = std::mem::take(&mut self.kept);
        let mut report = self.posters[from]
            .copy_unacked_into(own, dst, Some(&mut self.kept))
            .expect("a copy keeping what doesn't fit does not fail");
        // Records kept by an earlier failover come after all of `from`'s.
        let after = self.kept.back().map_or(dst.next_seq(), |k| k.0 + 1);
        for (seq, payload) in earlier.into_iter().filter(|k| k.0 >= after) {
            report.records += 1;
            report.bytes += payload.len();
            if !self.kept.is_empty() || dst.push_with_seq(seq, &payload).is_err() {
                self.kept.push_back((seq, payload));
            }
            report.first_seq.get_or_insert(seq);
            report.last_seq = Some(seq);
        }
        self.kept_next_seq = self.kept_next_seq.max(own.next_seq());
        if self.kept.is_empty() {
            dst.number_on_from(self.kept_next_seq);
        }
        let next_seq = self.kept_next_seq.max(dst.next_seq());
        #[allow(clippy::drop_non_drop)] // ends loom's tracked accesses
        drop((own, dst));
        self.finish_move(from, to);
        self.readmit(if self.closed {
            CLOSED
        } else if self.kept.is_empty() {
            self.active
        } else {
            HELD // (the writer stays out of the producers: see `enter`)
        });
        (report, next_seq)
    }

    /// A planned switch: [`LaneControl::fail_over`]'s copy, all or nothing. On an error (`to`
    /// has no room for every record, or records a failover kept still wait for room: they
    /// must go first) the active lane stays as it was.
    pub fn switch_to(&mut self, to: usize) -> Result<(CopyReport, u64), PushError> {
        let from = self.active;
        self.check_target(to);
        if !self.kept.is_empty() {
            return Err(PushError::Full);
        }
        self.exclude_writer();
        let (own, dst) = (
            self.shared.producers[from].get_mut(),
            self.shared.producers[to].get_mut(),
        );
        // SAFETY: as in `fail_over`.
        let (own, dst) = unsafe { (own.deref(), dst.deref()) };
        let result = self.posters[from].copy_unacked_into(own, dst, None);
        let next_seq = dst.next_seq();
        #[allow(clippy::drop_non_drop)] // ends loom's tracked accesses
        drop((own, dst));
        if result.is_ok() {
            self.finish_move(from, to);
        }
        self.readmit(if self.closed { CLOSED } else { self.active });
        result.map(|r| (r, next_seq))
    }

    fn check_target(&self, to: usize) {
        assert!(
            to != self.active && to < self.posters.len(),
            "bad failover target {to}"
        );
    }

    /// `to` is active now: what `from` acknowledged counts as delivered there.
    fn finish_move(&mut self, from: usize, to: usize) {
        // Final: the writer is out of `from` for good once `to` is active.
        self.left_behind_seq = self.left_behind_seq.max(self.posters[from].committed_seq());
        let acked = self.posters[from].acked_seq();
        self.posters[to].note_delivered(acked);
        self.active = to;
        self.shadow_from.fill(0);
    }

    /// Whether a failover kept records aside that the active lane had no room for yet (see
    /// [`LaneControl::fail_over`]).
    #[inline]
    pub fn keeps_records(&self) -> bool {
        !self.kept.is_empty()
    }

    /// Moves the records a failover kept aside into the active lane, oldest first, as far as
    /// it has room (those known delivered meanwhile are dropped: the receiver discards them).
    /// Once none is left the writer is let back in. Returns how many went in.
    pub fn move_kept(&mut self) -> usize {
        if self.kept.is_empty() {
            return 0;
        }
        let delivered = self.posters[self.active].acked_seq();
        let producer = self.shared.producers[self.active].get_mut();
        // SAFETY: the writer has stayed out since the failover that kept the records (it is
        // readmitted only below, once they are all in): this is the only reference.
        let dst = unsafe { producer.deref() };
        let mut moved = 0;
        while let Some((seq, payload)) = self.kept.front() {
            if *seq > delivered {
                if dst.push_with_seq(*seq, payload).is_err() {
                    break; // no room yet: the peer's next acknowledgement frees some
                }
                moved += 1;
            }
            self.kept.pop_front();
        }
        if self.kept.is_empty() {
            dst.number_on_from(self.kept_next_seq);
        }
        #[allow(clippy::drop_non_drop)] // ends loom's tracked access
        drop(producer);
        if self.kept.is_empty() || self.closed {
            self.readmit(if self.closed { CLOSED } else { self.active });
        }
        moved
    }

    /// Visits every record accepted and not known delivered, in order: the active lane's, then
    /// those a failover kept aside.
    pub fn for_each_unacked(&self, mut f: impl FnMut(u64, &[u8])) {
        let poster = &self.posters[self.active];
        poster.for_each_unacked(&mut f);
        let delivered = poster.acked_seq();
        for (seq, payload) in self.kept.iter().filter(|k| k.0 > delivered) {
            f(*seq, payload);
        }
    }

    /// Empties lane `lane` (a fresh connection on its rail), numbering from `next_seq`. Refused
    /// (false) for the active lane, which the writer may be using.
    pub fn reset(&mut self, lane: usize, next_seq: u64) -> bool {
        if lane == self.active {
            return false;
        }
        let producer = self.shared.producers[lane].get_mut();
        // SAFETY: the writer only touches the active lane's producer, and `lane` is not active
        // (switches happen only here, under exclusion, so the writer cannot be inside it).
        let producer = unsafe { producer.deref() };
        reset_halves(producer, &mut self.posters[lane], next_seq);
        self.shadow_from[lane] = 0;
        true
    }

    /// Hot standby: copies the active lane's records that lane `to` lacks into it, in order and
    /// with their sequence numbers (see `Poster::copy_new_into`), without stopping the
    /// writer. Refused (None) for the active lane itself.
    pub fn shadow(&mut self, to: usize) -> Option<ShadowReport> {
        let from = self.active;
        if to == from || to >= self.posters.len() {
            return None;
        }
        let producer = self.shared.producers[to].get_mut();
        // The active lane's records are read through its poster, as for posting.
        // SAFETY: `to` is not active and the writer touches only the active producer (switches
        // happen under exclusion): this is the only reference to it.
        let dst = unsafe { producer.deref() };
        let report = self.posters[from].copy_new_into(&mut self.shadow_from[to], dst);
        #[allow(clippy::drop_non_drop)] // ends loom's tracked access
        drop(producer);
        Some(report)
    }

    /// Lane `lane` (not the active one) gave its records not yet posted to another lane (a
    /// planned switch): they are retired here, never to be sent from it (see
    /// `Poster::retire_unposted`). Returns how many, or None for the active lane.
    pub fn retire_unposted(&mut self, lane: usize) -> Option<usize> {
        if lane == self.active || lane >= self.posters.len() {
            return None;
        }
        let producer = self.shared.producers[lane].get_mut();
        // SAFETY: as in `shadow`: `lane` is not active, so the writer is not in it.
        let retired = self.posters[lane].retire_unposted(unsafe { producer.deref() });
        #[allow(clippy::drop_non_drop)] // ends loom's tracked access
        drop(producer);
        Some(retired)
    }

    /// Every lane is dead: the writer fails with [`LaneError::Closed`] from now on.
    pub fn close(&mut self) {
        self.close_with(0);
    }

    /// Like [`LaneControl::close`], leaving `code` (the owner's reason) for the writer to read
    /// in [`LaneError::Closed`]. The first close's code stays.
    pub fn close_with(&mut self, code: u8) {
        if !self.closed {
            self.shared.close_code.store(code, Ordering::Relaxed);
            self.closed = true;
        }
        self.exclude_writer();
        // Pairs with the writer's Acquire in `enter`: the code above is visible once it sees CLOSED.
        self.shared.active.store(CLOSED, Ordering::Release);
    }
}
