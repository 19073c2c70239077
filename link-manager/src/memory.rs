//! Lets the fabrics register the queues' memory (the queue knows no verbs, the fabric no queues).

use std::sync::Arc;

use railover_rdma::RegisterableMemory;
use railover_segq::{Memory, Region};

pub(crate) struct QueueMem(pub Memory);
pub(crate) struct RegionMem(pub Arc<Region>);

// SAFETY: `Memory` keeps its mapping alive and fixed for as long as the handle lives.
unsafe impl RegisterableMemory for QueueMem {
    fn addr(&self) -> *mut u8 {
        self.0.addr()
    }
    fn len(&self) -> usize {
        self.0.len()
    }
}

// SAFETY: the Arc keeps the region alive; a region never moves or resizes.
unsafe impl RegisterableMemory for RegionMem {
    fn addr(&self) -> *mut u8 {
        self.0.addr()
    }
    fn len(&self) -> usize {
        self.0.len()
    }
}
