//! Record framing: `crc32c: u32 | len: u32 | seq: u64 | payload | pad to 8`, all little endian,
//! every field aligned to its size. The crc covers everything after it (the length, the sequence
//! number and the payload: one contiguous run, one crc pass), so a record damaged anywhere
//! (header or body) is caught. A header whose length is [`PAD_MARKER`] closes its segment.

/// Bytes of framing in front of every payload.
pub const HEADER_LEN: usize = 16;
/// Every record starts 8-byte aligned.
pub const RECORD_ALIGN: usize = 8;
/// Length value of the marker that says "the rest of this segment is unused".
pub const PAD_MARKER: u32 = u32::MAX;

/// Bytes a record with `payload_len` bytes occupies in the ring.
#[inline]
pub const fn record_size(payload_len: usize) -> usize {
    HEADER_LEN + payload_len.next_multiple_of(RECORD_ALIGN)
}

/// Where the bytes the crc covers start in a record (right after the crc).
pub const CRC_COVERS_FROM: usize = 4;

/// crc32c of a record whose bytes from [`CRC_COVERS_FROM`] to the payload's end are `covered`
/// (the length, the sequence number, the payload): one pass.
#[inline]
pub fn record_crc(covered: &[u8]) -> u32 {
    crc32c(covered)
}

/// The same crc as [`record_crc`], from the record's length, sequence number and payload
/// where they don't lie in a row: the producer's `push` computes it from the caller's payload,
/// not from the ring, so it never reads back what it just stored. (Reading back the line it just wrote
/// waits for that line to arrive: when the poster on another core has read the slot's last
/// header, that is a cross-core transfer on every record; stores alone wait in the store
/// buffer.)
#[inline]
pub fn record_crc_parts(len: u32, seq: u64, payload: &[u8]) -> u32 {
    #[cfg(all(target_arch = "x86_64", target_feature = "sse4.2"))]
    {
        let head = record_crc_head(len, seq);
        if HEADER_LEN - CRC_COVERS_FROM + payload.len() >= CRC_INTERLEAVED_FROM {
            // The crate continues from a finished crc (the running value inverted).
            return crc32c_append_interleaved(!head, payload);
        }
        !crc32c_chain(head, payload)
    }
    #[cfg(not(all(target_arch = "x86_64", target_feature = "sse4.2")))]
    {
        let mut head = [0u8; HEADER_LEN - CRC_COVERS_FROM];
        head[..4].copy_from_slice(&len.to_le_bytes());
        head[4..].copy_from_slice(&seq.to_le_bytes());
        crc32c::crc32c_append(crc32c::crc32c(&head), payload)
    }
}

/// The crc chain's running value (not inverted) after a record's length and sequence number:
/// what its payload's steps continue from.
#[cfg(all(target_arch = "x86_64", target_feature = "sse4.2"))]
#[inline]
pub(crate) fn record_crc_head(len: u32, seq: u64) -> u32 {
    let head = safe_arch::crc32_u32(u32::MAX, len);
    safe_arch::crc32_u64(u64::from(head), seq) as u32
}

/// crc32c (Castagnoli) of `bytes`, the same value as the `crc32c` crate's.
///
/// Built for a CPU with SSE4.2 (`-C target-cpu=x86-64-v2` or later: this workspace's
/// `.cargo/config.toml`), it is the CPU's crc32 instruction over 8 bytes at a time, inline:
/// ~35 instructions for a 64 B record's 76 bytes, against ~170 through the crate, whose
/// dispatch and alignment handling are made for long buffers. Otherwise the crate (which
/// detects the instruction at run time).
///
/// One chain of crc32 instructions waits on the last (3 cycles a step), so from
/// [`CRC_INTERLEAVED_FROM`] bytes on the crate's three interleaved chains are faster: 2x at
/// 4-8 KiB (`cargo bench -p railover-segq --bench crc`, `segq/BENCH.md`).
#[inline]
pub fn crc32c(bytes: &[u8]) -> u32 {
    #[cfg(all(target_arch = "x86_64", target_feature = "sse4.2"))]
    {
        if bytes.len() >= CRC_INTERLEAVED_FROM {
            return crc32c_interleaved(bytes);
        }
        crc32c_one_chain(bytes)
    }
    #[cfg(not(all(target_arch = "x86_64", target_feature = "sse4.2")))]
    {
        crc32c::crc32c(bytes)
    }
}

/// The crate's interleaved chains, out of line: a short record's crc (inline) doesn't pay for
/// the call's register saves.
#[cfg(all(target_arch = "x86_64", target_feature = "sse4.2"))]
#[cold]
#[inline(never)]
fn crc32c_interleaved(bytes: &[u8]) -> u32 {
    crc32c::crc32c(bytes)
}

/// As [`crc32c_interleaved`], continuing from the finished crc of the bytes before `bytes`.
#[cfg(all(target_arch = "x86_64", target_feature = "sse4.2"))]
#[cold]
#[inline(never)]
fn crc32c_append_interleaved(crc: u32, bytes: &[u8]) -> u32 {
    crc32c::crc32c_append(crc, bytes)
}

/// crc32c of `bytes` as one inline chain of the CPU's crc32 instruction, 8 bytes a step (what
/// [`crc32c()`] runs below [`CRC_INTERLEAVED_FROM`] bytes; public for the benchmark).
#[cfg(all(target_arch = "x86_64", target_feature = "sse4.2"))]
#[inline]
pub fn crc32c_one_chain(bytes: &[u8]) -> u32 {
    !crc32c_chain(u32::MAX, bytes)
}

/// The crc32 instruction's chain over `bytes` from the running value `crc` (not inverted at
/// either end).
#[cfg(all(target_arch = "x86_64", target_feature = "sse4.2"))]
#[inline]
fn crc32c_chain(crc: u32, bytes: &[u8]) -> u32 {
    let mut crc = u64::from(crc);
    let mut words = bytes.chunks_exact(8);
    for w in &mut words {
        let word = u64::from_le_bytes(w.try_into().expect("8 bytes"));
        crc = safe_arch::crc32_u64(crc, word);
    }
    // The tail (under 8 bytes) as at most one 4-, one 2- and one 1-byte step: a payload of
    // whole words has none.
    let mut crc = crc as u32;
    let mut tail = words.remainder();
    if let Some((four, rest)) = tail.split_first_chunk::<4>() {
        crc = safe_arch::crc32_u32(crc, u32::from_le_bytes(*four));
        tail = rest;
    }
    if let Some((two, rest)) = tail.split_first_chunk::<2>() {
        crc = safe_arch::crc32_u16(crc, u16::from_le_bytes(*two));
        tail = rest;
    }
    if let Some(&b) = tail.first() {
        crc = safe_arch::crc32_u8(crc, b);
    }
    crc
}

/// From this many bytes on, [`crc32c()`] runs the crate's interleaved chains instead of one
/// inline chain (where they broke even on this project's machines).
pub const CRC_INTERLEAVED_FROM: usize = 1024;

/// A decoded record header (not yet validated against anything).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub seq: u64,
    pub len: u32,
    pub crc: u32,
}

impl Header {
    #[inline]
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[..4].copy_from_slice(&self.crc.to_le_bytes());
        b[4..8].copy_from_slice(&self.len.to_le_bytes());
        b[8..].copy_from_slice(&self.seq.to_le_bytes());
        b
    }

    #[inline]
    pub fn decode(b: &[u8; HEADER_LEN]) -> Header {
        Header {
            crc: u32::from_le_bytes(b[..4].try_into().expect("4 bytes")),
            len: u32::from_le_bytes(b[4..8].try_into().expect("4 bytes")),
            seq: u64::from_le_bytes(b[8..].try_into().expect("8 bytes")),
        }
    }

    /// The header from its two little-endian words as loaded (`crc | len`, then `seq`).
    #[inline]
    pub fn from_words(first: u64, seq: u64) -> Header {
        Header {
            crc: first as u32,
            len: (first >> 32) as u32,
            seq,
        }
    }

    pub fn pad() -> Header {
        Header {
            seq: 0,
            len: PAD_MARKER,
            crc: 0,
        }
    }

    #[inline]
    pub fn is_pad(&self) -> bool {
        self.len == PAD_MARKER
    }
}

/// What [`parse_record`] found at a position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parsed {
    /// A whole, crc-valid record: its sequence number, payload range within the input, total size.
    Record {
        seq: u64,
        payload_start: usize,
        payload_len: usize,
        size: usize,
    },
    /// The segment ends here: skip `skip` bytes to the next segment.
    EndOfSegment { skip: usize },
}

/// Why bytes at a position are not a valid record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("record length {len} exceeds the maximum {max} or its segment")]
    BadLength { len: u32, max: usize },
    #[error("crc mismatch in record seq {seq}: header says {expected:#010x}, payload gives {actual:#010x}")]
    Crc {
        seq: u64,
        expected: u32,
        actual: u32,
    },
    #[error("record extends past the notified end of data")]
    Truncated,
}

/// Parses the record at the start of `seg_rest`, the bytes from the current position to the end of
/// its segment, of which only the first `available` are known to have fully arrived.
/// Never reads outside `seg_rest` and never panics, whatever the bytes.
pub fn parse_record(
    seg_rest: &[u8],
    available: usize,
    max_record: usize,
) -> Result<Parsed, ParseError> {
    let available = available.min(seg_rest.len());
    parse_arrived(&seg_rest[..available], seg_rest.len(), max_record)
}

/// [`parse_record`] given only the bytes known to have arrived (`arrived`, from the current
/// position) and how many bytes are left in the segment (`seg_rest_len`): the receiver never
/// forms a slice over bytes a NIC may still be writing. Never reads outside `arrived`.
#[inline]
pub fn parse_arrived(
    arrived: &[u8],
    seg_rest_len: usize,
    max_record: usize,
) -> Result<Parsed, ParseError> {
    let available = arrived.len().min(seg_rest_len);
    if seg_rest_len < HEADER_LEN {
        return Ok(Parsed::EndOfSegment { skip: seg_rest_len });
    }
    if available < HEADER_LEN {
        return Err(ParseError::Truncated);
    }
    let header = Header::decode(arrived[..HEADER_LEN].try_into().expect("checked length"));
    if header.is_pad() {
        if available < seg_rest_len {
            return Err(ParseError::Truncated);
        }
        return Ok(Parsed::EndOfSegment { skip: seg_rest_len });
    }
    let len = header.len as usize;
    if len > max_record || record_size(len) > seg_rest_len {
        return Err(ParseError::BadLength {
            len: header.len,
            max: max_record,
        });
    }
    let size = record_size(len);
    if size > available {
        return Err(ParseError::Truncated);
    }
    // From the header's fields as loaded and the payload (8-byte aligned: a 64 B payload is
    // eight whole steps), not from the record's bytes from offset 4, which end in a 4-byte tail.
    let actual = record_crc_parts(
        header.len,
        header.seq,
        &arrived[HEADER_LEN..HEADER_LEN + len],
    );
    if actual != header.crc {
        return Err(ParseError::Crc {
            seq: header.seq,
            expected: header.crc,
            actual,
        });
    }
    Ok(Parsed::Record {
        seq: header.seq,
        payload_start: HEADER_LEN,
        payload_len: len,
        size,
    })
}

/// Writes a complete record (header and payload) into `dst`, which must be `record_size(len)` long.
pub fn encode_record(dst: &mut [u8], seq: u64, payload: &[u8]) {
    let len = payload.len() as u32;
    dst[..HEADER_LEN].copy_from_slice(&Header { seq, len, crc: 0 }.encode());
    dst[HEADER_LEN..HEADER_LEN + payload.len()].copy_from_slice(payload);
    let crc = record_crc(&dst[CRC_COVERS_FROM..HEADER_LEN + payload.len()]);
    dst[..4].copy_from_slice(&crc.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// The inline crc32 (SSE4.2 builds) and the crate agree on every length and alignment.
        #[test]
        fn crc32c_is_the_crates(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..2100), skip in 0usize..8) {
            let bytes = &bytes[skip.min(bytes.len())..];
            proptest::prop_assert_eq!(crc32c(bytes), ::crc32c::crc32c(bytes));
            #[cfg(all(target_arch = "x86_64", target_feature = "sse4.2"))]
            proptest::prop_assert_eq!(crc32c_one_chain(bytes), ::crc32c::crc32c(bytes));
        }

        /// The crc from a record's parts (the producer's `push`) is the one over its bytes in a
        /// row (what the receiver checks), on both sides of the interleaved threshold.
        #[test]
        fn record_crc_from_parts_is_the_one_in_a_row(payload in proptest::collection::vec(proptest::num::u8::ANY, 0..1200), len in proptest::num::u32::ANY, seq in proptest::num::u64::ANY) {
            let mut row = Vec::with_capacity(HEADER_LEN - CRC_COVERS_FROM + payload.len());
            row.extend_from_slice(&len.to_le_bytes());
            row.extend_from_slice(&seq.to_le_bytes());
            row.extend_from_slice(&payload);
            proptest::prop_assert_eq!(record_crc_parts(len, seq, &payload), record_crc(&row));
            proptest::prop_assert_eq!(record_crc(&row), ::crc32c::crc32c(&row));
        }
    }

    #[test]
    fn crc32c_of_the_standard_check_string() {
        // RFC 3720's check value for "123456789".
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    }

    fn framed(seq: u64, payload: &[u8], seg_len: usize) -> Vec<u8> {
        let mut v = vec![0u8; seg_len];
        encode_record(&mut v[..record_size(payload.len())], seq, payload);
        v
    }

    #[test]
    fn roundtrip() {
        let v = framed(7, b"hello", 64);
        let p = parse_record(&v, 64, 48).unwrap();
        assert_eq!(
            p,
            Parsed::Record {
                seq: 7,
                payload_start: 16,
                payload_len: 5,
                size: 24
            }
        );
    }

    #[test]
    fn every_single_bit_flip_is_detected() {
        let v = framed(42, b"order: buy 100 @ 99.5", 64);
        let size = record_size(21);
        for byte in 0..HEADER_LEN + 21 {
            for bit in 0..8 {
                let mut c = v.clone();
                c[byte] ^= 1 << bit;
                let r = parse_record(&c, 64, 48);
                assert!(
                    !matches!(r, Ok(Parsed::Record { seq: 42, size: s, .. }) if s == size),
                    "flip of byte {byte} bit {bit} went unnoticed: {r:?}"
                );
            }
        }
    }

    #[test]
    fn hostile_lengths_are_errors_not_panics() {
        let mut v = framed(1, b"x", 64);
        v[4..8].copy_from_slice(&1000u32.to_le_bytes());
        assert!(matches!(
            parse_record(&v, 64, 48),
            Err(ParseError::BadLength { len: 1000, .. })
        ));
        v[4..8].copy_from_slice(&(PAD_MARKER - 1).to_le_bytes());
        assert!(matches!(
            parse_record(&v, 64, 48),
            Err(ParseError::BadLength { .. })
        ));
        // max_record larger than the segment still cannot make it read past the segment
        v[4..8].copy_from_slice(&60u32.to_le_bytes());
        assert!(matches!(
            parse_record(&v, 64, 1000),
            Err(ParseError::BadLength { .. })
        ));
    }

    #[test]
    fn incomplete_data_is_truncated_and_short_tail_ends_segment() {
        let v = framed(1, b"abcdefgh", 64);
        assert_eq!(parse_record(&v, 20, 48), Err(ParseError::Truncated));
        assert_eq!(parse_record(&v, 8, 48), Err(ParseError::Truncated));
        assert_eq!(
            parse_record(&v[..8], 8, 48),
            Ok(Parsed::EndOfSegment { skip: 8 })
        );
        let mut pad = vec![0u8; 32];
        pad[..16].copy_from_slice(&Header::pad().encode());
        assert_eq!(
            parse_record(&pad, 32, 48),
            Ok(Parsed::EndOfSegment { skip: 32 })
        );
        assert_eq!(parse_record(&pad, 16, 48), Err(ParseError::Truncated));
    }
}
