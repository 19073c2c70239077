//! `cargo +nightly fuzz run parse_record` (from segq/): any bytes, any claimed length, never a
//! panic or an out-of-bounds read; a parsed record always lies inside the input.
#![no_main]
use libfuzzer_sys::fuzz_target;
use railover_segq::record::{parse_record, Parsed};

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let available = u16::from_le_bytes([data[0], data[1]]) as usize;
    let max = u16::from_le_bytes([data[2], data[3]]) as usize;
    let seg = &data[4..];
    if let Ok(Parsed::Record { payload_start, payload_len, size, .. }) = parse_record(seg, available, max) {
        assert!(payload_start + payload_len <= size && size <= seg.len() && payload_len <= max);
    }
});
