//! Loom shim (as crossbeam does it): under `--cfg loom` the atomics and `Arc` come from loom so the
//! model checker sees every ordering decision; otherwise they are std's.

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicU64, Ordering};
#[cfg(loom)]
pub(crate) use loom::sync::Arc;

#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{AtomicU64, Ordering};
#[cfg(not(loom))]
pub(crate) use std::sync::Arc;
