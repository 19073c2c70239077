//! `cargo +nightly fuzz run hello_decode` (from rdma-core/): the handshake decoder never panics;
//! whatever it accepts re-encodes to the same bytes and passes its own validation again.
#![no_main]
use libfuzzer_sys::fuzz_target;
use railover_rdma::handshake::Hello;

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = Hello::decode(data) {
        assert_eq!(&h.encode()[..], data);
        assert_eq!(Hello::decode(&h.encode()).unwrap(), h);
    }
});
