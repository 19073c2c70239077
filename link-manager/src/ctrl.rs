//! The control block each side writes into its peer's control slot on every rail: heartbeat,
//! acknowledgement, and fault reports. One RDMA WRITE of [`CTRL_LEN`] bytes, crc-protected so a
//! torn or corrupted block is ignored (the next one replaces it) rather than trusted.
//!
//! ```text
//! 0  heartbeat        u64  bumped every heartbeat interval
//! 8  delivered_seq    u64  highest sequence number the writer delivered (any rail)
//! 16 consumed_pos     u64  how far the writer consumed its mirror of THIS rail
//! 24 fault_gens       u64  per rail (16 bits each): generation+1 of a rail the writer saw fail
//! 32 notified         u64  write-with-immediate notifications the writer processed on THIS rail
//!                          (receive credits: the peer keeps at most half a receive queue beyond it)
//! 40 status           u64  0 while the writer's session runs; STATUS_CLOSED once it closed
//!                          gracefully, STATUS_ENDED once it ended otherwise (timed out, all rails
//!                          down): the peer ends its side without treating the silence as a fault;
//!                          bit 8 (STATUS_ACK_NOW): acknowledge this rail at once (a drain);
//!                          bits 16.. (one per rail, STATUS_AVOIDING_SHIFT): the writer left that
//!                          rail by a planned switch and avoids it (its hold-down)
//! 48 crc              u64  crc32c of bytes 0..48 (low 32 bits)
//! ```
//!
//! The heartbeat number's low 7 bits also ride in every data write's immediate (above the 24
//! position bits): while the active rail carries data, its block is skipped at a heartbeat tick
//! (see `Core::check_liveness`); the reader counts those bits against the last full number it
//! heard on the rail, which the writer refreshes with a block first when they would not reach
//! (`BEAT_REFRESH`). The immediate's top bit carries receive credits: each set bit
//! says the writer processed another `CREDIT_QUANTUM` (16) of the reader's notifications on
//! that rail, so `notified` needs no block while data flows back (`Core::post_lane`).

use railover_segq::Region;

pub const CTRL_LEN: usize = 56;
/// Words before the crc.
const WORDS: usize = 6;
/// Where the crc word is: it changes whenever the block does (but for crc collisions).
pub const CTRL_CRC_OFFSET: usize = WORDS * 8;

/// [`CtrlBlock::status`]: the writer's session runs.
pub const STATUS_LIVE: u64 = 0;
/// The writer closed its connection gracefully (everything it sent was delivered, or its linger
/// ran out).
pub const STATUS_CLOSED: u64 = 1;
/// The writer's session ended otherwise (session timeout, every rail down).
pub const STATUS_ENDED: u64 = 2;
/// Flag above the status: the writer is draining this rail (a planned switch) and asks for an
/// acknowledgement as soon as anything on it is consumed, not at the usual thresholds.
pub const STATUS_ACK_NOW: u64 = 1 << 8;
/// The status proper, without flags.
pub const STATUS_MASK: u64 = 0xff;
/// Where the per-rail "avoiding" bits start: the writer's planned switch left that rail (slow or
/// lossy; the wire carries both directions, so the reader follows).
pub const STATUS_AVOIDING_SHIFT: u32 = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CtrlBlock {
    pub heartbeat: u64,
    pub delivered_seq: u64,
    pub consumed_pos: u64,
    pub fault_gens: u64,
    pub notified: u64,
    pub status: u64,
}

impl CtrlBlock {
    fn crc(words: &[u64; WORDS]) -> u64 {
        let mut b = [0u8; WORDS * 8];
        for (i, w) in words.iter().enumerate() {
            b[i * 8..i * 8 + 8].copy_from_slice(&w.to_le_bytes());
        }
        railover_segq::crc32c(&b) as u64
    }

    /// Writes the block (8-byte stores) at offset 0 of `region`.
    pub fn store(&self, region: &Region) {
        let words = [
            self.heartbeat,
            self.delivered_seq,
            self.consumed_pos,
            self.fault_gens,
            self.notified,
            self.status,
        ];
        for (i, w) in words.iter().enumerate() {
            region.write_u64(i * 8, *w);
        }
        region.write_u64(WORDS * 8, Self::crc(&words));
    }

    /// Reads the block the peer wrote; None while it is torn, corrupted or never written.
    pub fn load(region: &Region) -> Option<CtrlBlock> {
        Self::decode(&Self::read_raw(region))
    }

    /// The block's words as they are now (cheap: compare with the last ones seen before paying
    /// for [`CtrlBlock::decode`]).
    pub fn read_raw(region: &Region) -> [u64; WORDS + 1] {
        region.read_words(0)
    }

    /// Checks and decodes raw words; None if torn, corrupted or never written.
    pub fn decode(raw: &[u64; WORDS + 1]) -> Option<CtrlBlock> {
        let words: [u64; WORDS] = std::array::from_fn(|i| raw[i]);
        if words == [0; WORDS] || raw[WORDS] != Self::crc(&words) {
            return None;
        }
        Some(CtrlBlock {
            heartbeat: words[0],
            delivered_seq: words[1],
            consumed_pos: words[2],
            fault_gens: words[3],
            notified: words[4],
            status: words[5],
        })
    }

    /// Generation+1 the writer reported failed for `rail` (0: none).
    pub fn fault_gen(&self, rail: usize) -> u16 {
        (self.fault_gens >> (16 * rail)) as u16
    }

    pub fn set_fault_gen(&mut self, rail: usize, gen_plus_one: u16) {
        self.fault_gens =
            (self.fault_gens & !(0xffff << (16 * rail))) | ((gen_plus_one as u64) << (16 * rail));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use railover_segq::Backing;

    #[test]
    fn roundtrip_and_any_flip_is_rejected() {
        let r = Region::new(64, Backing::Heap).unwrap();
        assert_eq!(CtrlBlock::load(&r), None, "never written");
        let mut c = CtrlBlock {
            heartbeat: 3,
            delivered_seq: 99,
            consumed_pos: 4096,
            fault_gens: 0,
            notified: 7,
            status: STATUS_CLOSED,
        };
        c.set_fault_gen(1, 5);
        assert_eq!(c.fault_gen(1), 5);
        assert_eq!(c.fault_gen(0), 0);
        c.store(&r);
        assert_eq!(CtrlBlock::load(&r), Some(c));
        let words: Vec<u64> = (0..CTRL_LEN / 8).map(|w| r.read_u64(w * 8)).collect();
        for i in 0..CTRL_LEN {
            let flipped = Region::new(64, Backing::Heap).unwrap();
            for (w, v) in words.iter().enumerate() {
                let v = if w == i / 8 {
                    v ^ (0x10 << (8 * (i % 8)))
                } else {
                    *v
                };
                flipped.write_u64(w * 8, v);
            }
            assert_eq!(CtrlBlock::load(&flipped), None, "flip at byte {i} accepted");
        }
    }
}
