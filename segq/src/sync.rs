//! Loom shim (as crossbeam does it): under `--cfg loom` the atomics, cells and `Arc` come from loom
//! so the model checker sees every ordering decision; otherwise they are std's.

#[cfg(loom)]
pub(crate) use loom::cell::{MutPtr, UnsafeCell};
#[cfg(loom)]
pub(crate) use loom::sync::atomic::{
    fence, AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering,
};
#[cfg(loom)]
pub(crate) use loom::sync::Arc;

#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{fence, AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
#[cfg(not(loom))]
pub(crate) use std::sync::Arc;

/// What a spinning thread does while it waits for another: a CPU hint (loom: a yield, so the
/// model checker runs the other thread).
#[inline]
pub(crate) fn spin_wait() {
    #[cfg(loom)]
    loom::thread::yield_now();
    #[cfg(not(loom))]
    std::hint::spin_loop();
}

/// `std::cell::UnsafeCell` with loom's API (`get_mut` handing out a tracked pointer).
#[cfg(not(loom))]
pub(crate) struct UnsafeCell<T>(std::cell::UnsafeCell<T>);

#[cfg(not(loom))]
impl<T> UnsafeCell<T> {
    pub(crate) fn new(v: T) -> Self {
        UnsafeCell(std::cell::UnsafeCell::new(v))
    }
    pub(crate) fn get_mut(&self) -> MutPtr<T> {
        MutPtr(self.0.get())
    }
}

/// A raw pointer out of an [`UnsafeCell`] (loom's tracks the access while it lives).
#[cfg(not(loom))]
pub(crate) struct MutPtr<T>(*mut T);

#[cfg(not(loom))]
impl<T> MutPtr<T> {
    /// # Safety
    /// No other reference to the value may exist while the returned one lives.
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn deref(&self) -> &mut T {
        // SAFETY: the caller guarantees exclusive access (see above).
        unsafe { &mut *self.0 }
    }
}
