//! Queue geometry: how many segments, how large, how large a record may be. Both ends of a rail must
//! agree on it exactly (the handshake checks), since the sender writes at the receiver's offsets.

use crate::record::HEADER_LEN;

/// Smallest segment: a header plus a little payload.
pub const MIN_SEGMENT_SIZE: usize = 64;
/// Largest ring: a write's end position travels in the low [`crate::NOTIFY_BITS`] bits of its
/// immediate, in 8-byte units (a 128 MiB window), and one write never spans more than a ring; a
/// ring at most a quarter of the window keeps every notification unambiguous, a stale one (up
/// to a ring behind) included: it reads as more than a ring ahead and is refused.
pub const MAX_CAPACITY: usize = 1 << 25;

/// Why a geometry was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GeometryError {
    #[error("segment size {0} is not a power of two >= {MIN_SEGMENT_SIZE}")]
    SegmentSize(usize),
    #[error("segment count {0} is not a power of two >= 2")]
    SegmentCount(usize),
    #[error("capacity {segment_size} x {segment_count} exceeds {MAX_CAPACITY} bytes")]
    TooLarge {
        segment_size: usize,
        segment_count: usize,
    },
    #[error("max record {max_record} is 0 or does not fit a segment of {segment_size} with its {HEADER_LEN}-byte header")]
    MaxRecord {
        max_record: usize,
        segment_size: usize,
    },
}

/// Validated queue geometry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    segment_size: usize,
    segment_count: usize,
    max_record: usize,
    /// `segment_size * segment_count`, kept: every position's offset masks with it.
    capacity: usize,
}

impl Geometry {
    /// Validates and builds a geometry. `max_record` is the largest payload in bytes.
    pub fn new(
        segment_size: usize,
        segment_count: usize,
        max_record: usize,
    ) -> Result<Self, GeometryError> {
        if !segment_size.is_power_of_two() || segment_size < MIN_SEGMENT_SIZE {
            return Err(GeometryError::SegmentSize(segment_size));
        }
        if !segment_count.is_power_of_two() || segment_count < 2 {
            return Err(GeometryError::SegmentCount(segment_count));
        }
        if segment_size
            .checked_mul(segment_count)
            .is_none_or(|c| c > MAX_CAPACITY)
        {
            return Err(GeometryError::TooLarge {
                segment_size,
                segment_count,
            });
        }
        if max_record == 0 || max_record > segment_size - HEADER_LEN {
            return Err(GeometryError::MaxRecord {
                max_record,
                segment_size,
            });
        }
        Ok(Geometry {
            segment_size,
            segment_count,
            max_record,
            capacity: segment_size * segment_count,
        })
    }

    pub fn segment_size(&self) -> usize {
        self.segment_size
    }
    pub fn segment_count(&self) -> usize {
        self.segment_count
    }
    /// Largest payload a record may carry.
    pub fn max_record(&self) -> usize {
        self.max_record
    }
    /// Ring size in bytes (a power of two).
    #[inline]
    pub fn capacity(&self) -> usize {
        self.capacity
    }
    /// Physical offset in the ring of a monotonic byte position.
    #[inline]
    pub fn offset(&self, pos: u64) -> usize {
        (pos as usize) & (self.capacity() - 1)
    }
    /// Start of the segment holding `pos`.
    #[inline]
    pub fn segment_floor(&self, pos: u64) -> u64 {
        pos & !(self.segment_size as u64 - 1)
    }
    /// Bytes from `pos` to the end of its segment (never 0).
    #[inline]
    pub fn segment_remaining(&self, pos: u64) -> usize {
        self.segment_size - ((pos as usize) & (self.segment_size - 1))
    }
}

impl Default for Geometry {
    /// 64 segments of 64 KiB (4 MiB ring), records up to 8 KiB.
    fn default() -> Self {
        Geometry::new(64 * 1024, 64, 8 * 1024).expect("default geometry is valid")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_geometries_are_typed_errors() {
        assert_eq!(
            Geometry::new(100, 4, 10),
            Err(GeometryError::SegmentSize(100))
        );
        assert_eq!(
            Geometry::new(32, 4, 10),
            Err(GeometryError::SegmentSize(32))
        );
        assert_eq!(
            Geometry::new(64, 3, 10),
            Err(GeometryError::SegmentCount(3))
        );
        assert_eq!(
            Geometry::new(64, 1, 10),
            Err(GeometryError::SegmentCount(1))
        );
        assert!(matches!(
            Geometry::new(1 << 24, 4, 10),
            Err(GeometryError::TooLarge { .. })
        ));
        assert!(matches!(
            Geometry::new(64, 4, 49),
            Err(GeometryError::MaxRecord { .. })
        ));
        assert!(matches!(
            Geometry::new(64, 4, 0),
            Err(GeometryError::MaxRecord { .. })
        ));
        let g = Geometry::new(64, 4, 48).unwrap();
        assert_eq!(g.capacity(), 256);
        assert_eq!(g.offset(300), 44);
        assert_eq!(g.segment_floor(130), 128);
        assert_eq!(g.segment_remaining(130), 62);
    }
}
