//! The memory a queue lives in: one contiguous, page-aligned block whose address and length are
//! exposed so a fabric can register it with a NIC.

use std::alloc::Layout;
use std::ptr::NonNull;

/// Page size assumed for alignment of heap-backed regions (mmap'd regions are always page aligned).
pub const PAGE_SIZE: usize = 4096;

/// How a region's memory is obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Backing {
    /// Anonymous private mapping (the default for real traffic).
    #[default]
    Anonymous,
    /// Anonymous mapping backed by huge pages; falls back to [`Backing::Anonymous`] (with a logged
    /// reason) when the kernel has none to give.
    HugePages,
    /// Page-aligned heap allocation: no mmap, so it runs under Miri and loom.
    Heap,
}

enum Storage {
    Map(#[allow(dead_code)] memmap2::MmapMut),
    Heap(Layout),
}

/// A contiguous, zero-initialised, page-aligned block of memory.
///
/// The memory is written by this process and, once registered, by a NIC on behalf of the peer.
/// It is therefore only ever touched through raw pointers (never through a `&mut [u8]` that would
/// claim exclusivity the NIC doesn't respect).
pub struct Region {
    ptr: NonNull<u8>,
    len: usize,
    storage: Storage,
}

// SAFETY: Region owns its memory exclusively (like a Box<[u8]>); all access goes through raw
// pointers whose synchronisation is the queue's job (Acquire/Release on its indices).
unsafe impl Send for Region {}
// SAFETY: shared access only hands out raw pointers; see the Send impl.
unsafe impl Sync for Region {}

impl std::fmt::Debug for Region {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Region")
            .field("addr", &self.ptr)
            .field("len", &self.len)
            .field("mapped", &matches!(self.storage, Storage::Map(_)))
            .finish()
    }
}

impl Region {
    /// Allocates `len` bytes (rounded up to whole pages), zeroed.
    pub fn new(len: usize, backing: Backing) -> std::io::Result<Region> {
        let len = len.max(1).div_ceil(PAGE_SIZE) * PAGE_SIZE;
        match backing {
            Backing::Heap => Self::heap(len),
            Backing::Anonymous => Self::map(len, false),
            Backing::HugePages => match Self::map(len, true) {
                Ok(r) => Ok(r),
                Err(e) => {
                    tracing::warn!(len, error = %e, "huge pages unavailable; using normal pages");
                    Self::map(len, false)
                }
            },
        }
    }

    fn map(len: usize, huge: bool) -> std::io::Result<Region> {
        let mut opts = memmap2::MmapOptions::new();
        opts.len(len);
        if huge {
            opts.huge(None);
        }
        let mut map = opts.map_anon()?;
        let ptr = NonNull::new(map.as_mut_ptr()).expect("mmap never returns null on success");
        Ok(Region {
            ptr,
            len,
            storage: Storage::Map(map),
        })
    }

    fn heap(len: usize) -> std::io::Result<Region> {
        let layout = Layout::from_size_align(len, PAGE_SIZE)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        // SAFETY: layout has non-zero size (len >= PAGE_SIZE after rounding).
        let raw = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(raw)
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::OutOfMemory))?;
        Ok(Region {
            ptr,
            len,
            storage: Storage::Heap(layout),
        })
    }

    /// First byte of the block (what a fabric registers).
    pub fn addr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Length in bytes (a whole number of pages).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Never true: a region has at least one page.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Copies `src` into the region at `offset`. Panics (a bug of the caller, never input-driven)
    /// when the range is outside the region.
    ///
    /// # Safety
    /// No one else (another thread through this region) may read or write those bytes meanwhile:
    /// a region is shared (`&self`), so exclusivity is the caller's protocol (the queue's indices).
    pub unsafe fn write(&self, offset: usize, src: &[u8]) {
        assert!(
            offset <= self.len && src.len() <= self.len - offset,
            "region write out of bounds"
        );
        // SAFETY: bounds checked above; src cannot overlap our private mapping; no concurrent
        // access is the caller's contract.
        unsafe { copy_bytes(src.as_ptr(), self.ptr.as_ptr().add(offset), src.len()) }
    }

    /// Copies bytes at `offset` into `dst`. Panics when out of bounds (caller bug).
    ///
    /// # Safety
    /// No one else (another thread through this region) may write those bytes meanwhile.
    pub unsafe fn read(&self, offset: usize, dst: &mut [u8]) {
        assert!(
            offset <= self.len && dst.len() <= self.len - offset,
            "region read out of bounds"
        );
        // SAFETY: bounds checked above; no concurrent writer is the caller's contract.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.ptr.as_ptr().add(offset),
                dst.as_mut_ptr(),
                dst.len(),
            )
        }
    }

    /// The u64 at an 8-aligned `offset`, as an atomic: threads may share it freely (no data race
    /// from safe code), and a NIC writing it behind the compiler's back is seen by the next load.
    #[inline]
    fn word(&self, offset: usize) -> &std::sync::atomic::AtomicU64 {
        assert!(
            offset % 8 == 0 && offset + 8 <= self.len,
            "region u64 access out of bounds"
        );
        // The reference lives no longer than the region; every non-atomic access to these bytes
        // from Rust goes through `unsafe fn`s whose callers promise no concurrent use.
        // SAFETY: in bounds and 8-aligned (page-aligned region), valid for the borrow's life.
        unsafe { std::sync::atomic::AtomicU64::from_ptr(self.ptr.as_ptr().add(offset).cast()) }
    }

    /// Reads a little-endian u64 at an 8-aligned `offset` with one aligned load.
    #[inline]
    pub fn read_u64(&self, offset: usize) -> u64 {
        // Relaxed: a single word; ordering with other memory is the caller's protocol (control
        // blocks carry a crc and are re-read every heartbeat).
        u64::from_le(self.word(offset).load(std::sync::atomic::Ordering::Relaxed))
    }

    /// Reads `N` consecutive little-endian u64s from an 8-aligned `offset`, one aligned load
    /// each (one bounds check for all: a control block is read on every poll).
    #[inline]
    pub fn read_words<const N: usize>(&self, offset: usize) -> [u64; N] {
        assert!(
            offset % 8 == 0 && offset <= self.len && N * 8 <= self.len - offset,
            "region u64 access out of bounds"
        );
        std::array::from_fn(|i| {
            // SAFETY: in bounds (checked above for all N words) and 8-aligned (page-aligned
            // region, 8-aligned offset); atomics, so concurrent writers are no data race.
            let word = unsafe {
                std::sync::atomic::AtomicU64::from_ptr(self.ptr.as_ptr().add(offset + i * 8).cast())
            };
            // Relaxed: as read_u64.
            u64::from_le(word.load(std::sync::atomic::Ordering::Relaxed))
        })
    }

    /// Writes a little-endian u64 at an 8-aligned `offset` with one aligned store.
    #[inline]
    pub fn write_u64(&self, offset: usize, value: u64) {
        // Relaxed: see read_u64; the NIC reads it after the post (a system call or a doorbell
        // write, both ordered after this store).
        self.word(offset)
            .store(value.to_le(), std::sync::atomic::Ordering::Relaxed)
    }

    /// Borrows `len` bytes at `offset`.
    ///
    /// # Safety
    /// No one (this process or a NIC) may write those bytes while the slice lives.
    #[inline]
    pub unsafe fn slice(&self, offset: usize, len: usize) -> &[u8] {
        assert!(
            offset <= self.len && len <= self.len - offset,
            "region slice out of bounds"
        );
        // SAFETY: bounds checked; absence of writers is the caller's contract.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().add(offset), len) }
    }

    /// Mutably borrows `len` bytes at `offset`.
    ///
    /// # Safety
    /// No one else may read or write those bytes while the slice lives.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn slice_mut(&self, offset: usize, len: usize) -> &mut [u8] {
        assert!(
            offset <= self.len && len <= self.len - offset,
            "region slice out of bounds"
        );
        // SAFETY: bounds checked; exclusivity is the caller's contract.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr().add(offset), len) }
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        if let Storage::Heap(layout) = self.storage {
            // SAFETY: allocated in `heap` with exactly this layout, freed once.
            unsafe { std::alloc::dealloc(self.ptr.as_ptr(), layout) }
        }
        // A mapping unmaps itself when MmapMut drops.
    }
}

/// Copies `src` into the start of `dst` (which must be at least as long: a caller bug panics),
/// short messages inline as [`Region::write`] does (no `memcpy` call for up to 64 bytes).
#[inline]
pub fn copy_message(dst: &mut [u8], src: &[u8]) {
    assert!(
        src.len() <= dst.len(),
        "copy_message: destination too short"
    );
    // SAFETY: both lengths checked above; `&mut` and `&` slices never overlap.
    unsafe { copy_bytes(src.as_ptr(), dst.as_mut_ptr(), src.len()) }
}

/// Copies `n` bytes from `src` to `dst`: up to 64 inline, as two overlapping unaligned blocks
/// (a framed message is usually that short, and `memcpy`'s call and size dispatch cost more
/// than such a copy: segq/BENCH.md, run 8), longer through `copy_nonoverlapping`.
///
/// # Safety
/// `src` is valid for `n` bytes of reads, `dst` for `n` bytes of writes, and they don't overlap.
#[inline(always)]
unsafe fn copy_bytes(src: *const u8, dst: *mut u8, n: usize) {
    /// The `N` bytes at the start and the `N` at the end (overlapping when `n < 2N`).
    ///
    /// # Safety
    /// As `copy_bytes`'s, and `N <= n`.
    #[inline(always)]
    unsafe fn ends<const N: usize>(src: *const u8, dst: *mut u8, n: usize) {
        // SAFETY: `N <= n`, so both blocks lie inside the `n` bytes the caller vouches for.
        unsafe {
            let head = src.cast::<[u8; N]>().read_unaligned();
            let tail = src.add(n - N).cast::<[u8; N]>().read_unaligned();
            dst.cast::<[u8; N]>().write_unaligned(head);
            dst.add(n - N).cast::<[u8; N]>().write_unaligned(tail);
        }
    }
    // SAFETY: each arm's block is at most `n` bytes; the rest is the caller's promise.
    unsafe {
        // Longest first: a message's payload is more often 32-64 bytes than less.
        if n >= 32 {
            if n <= 64 {
                ends::<32>(src, dst, n)
            } else {
                std::ptr::copy_nonoverlapping(src, dst, n)
            }
        } else if n >= 16 {
            ends::<16>(src, dst, n)
        } else if n >= 8 {
            ends::<8>(src, dst, n)
        } else if n >= 4 {
            ends::<4>(src, dst, n)
        } else if n >= 2 {
            ends::<2>(src, dst, n)
        } else if n == 1 {
            *dst = *src
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_copies_write_exactly_the_bytes_given_at_every_length_and_offset() {
        let src: Vec<u8> = (1..=140).collect();
        for n in 0..=130 {
            for at in [0, 1, 7, 8, 13] {
                let mut dst = [0u8; 160];
                copy_message(&mut dst[at..], &src[3..3 + n]);
                assert_eq!(&dst[at..at + n], &src[3..3 + n], "length {n} at {at}");
                assert!(
                    dst[..at].iter().all(|&b| b == 0),
                    "before, length {n} at {at}"
                );
                assert!(
                    dst[at + n..].iter().all(|&b| b == 0),
                    "after, length {n} at {at}"
                );
            }
        }
        let r = Region::new(64, Backing::Heap).unwrap();
        for n in [0, 1, 5, 16, 33, 64, 65] {
            let at = r.len() - n; // flush with the region's end
                                  // SAFETY: this thread is the region's only user.
            unsafe { r.write(at, &src[..n]) };
            let mut back = vec![0u8; n];
            // SAFETY: as above.
            unsafe { r.read(at, &mut back) };
            assert_eq!(back, &src[..n]);
        }
        let too_short = std::panic::catch_unwind(|| copy_message(&mut [0u8; 3], &[1, 2, 3, 4]));
        assert!(too_short.is_err(), "a destination shorter than the source");
    }

    #[test]
    fn read_words_reads_what_read_u64_reads_and_stays_in_bounds() {
        let r = Region::new(64, Backing::Heap).unwrap();
        let last = r.len() - 24;
        for i in 0..3 {
            r.write_u64(last + i * 8, 0x0101_0101 * (i as u64 + 1));
        }
        let words: [u64; 3] = r.read_words(last);
        assert_eq!(words, std::array::from_fn(|i| r.read_u64(last + i * 8)));
        assert_eq!(words[2], 0x0303_0303);
        let past_the_end = std::panic::catch_unwind(|| r.read_words::<4>(last));
        assert!(past_the_end.is_err(), "read past the region's end");
    }

    #[test]
    fn heap_region_is_page_aligned_zeroed_and_rounded() {
        let r = Region::new(5000, Backing::Heap).unwrap();
        assert_eq!(r.len(), 8192);
        assert_eq!(r.addr() as usize % PAGE_SIZE, 0);
        let mut buf = [1u8; 16];
        // SAFETY: this thread is the region's only user.
        unsafe { r.read(8000, &mut buf) };
        assert_eq!(buf, [0u8; 16]);
        r.write_u64(8, 0xdead_beef);
        assert_eq!(r.read_u64(8), 0xdead_beef);
    }

    #[test]
    #[cfg(not(miri))] // Miri has no mmap; heap regions cover the same code.
    fn mapped_region_is_page_aligned() {
        let r = Region::new(1, Backing::Anonymous).unwrap();
        assert_eq!(r.len(), PAGE_SIZE);
        assert_eq!(r.addr() as usize % PAGE_SIZE, 0);
        let mut out = [0u8; 3];
        // SAFETY: this thread is the region's only user.
        unsafe {
            r.write(10, b"abc");
            r.read(10, &mut out);
        }
        assert_eq!(&out, b"abc");
    }

    #[test]
    #[cfg(not(miri))]
    fn huge_pages_fall_back_instead_of_failing() {
        // Most CI kernels have no reserved huge pages: this must still hand out memory.
        let r = Region::new(2 << 20, Backing::HugePages).unwrap();
        assert!(r.len() >= 2 << 20);
    }

    #[test]
    #[should_panic(expected = "out of bounds")]
    fn out_of_bounds_write_is_refused() {
        let r = Region::new(4096, Backing::Heap).unwrap();
        // SAFETY: this thread is the region's only user (the bounds check panics first).
        unsafe { r.write(4090, &[0u8; 8]) };
    }
}
