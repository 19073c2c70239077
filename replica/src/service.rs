//! The replicated service and the library it takes non-determinism from.
//!
//! A [`Service`] must be deterministic: given the same requests and the same values from its
//! [`Ctx`] it produces the same replies and the same state. Everything else it needs (the time,
//! random numbers, the answers of external systems) comes through [`Ctx`]: on the primary, `Ctx`
//! produces the value and records it; on the backup, it hands back the primary's recorded value
//! without calling out.

use crate::wire::Recorded;

/// A deterministic service (the matching engine of [`crate::matching`], say).
pub trait Service: Sized {
    /// Applies one request of `client` and returns the reply.
    fn apply(&mut self, ctx: &mut Ctx<'_>, client: u64, request: &[u8]) -> Vec<u8>;
    /// The whole state, for a joining backup.
    fn snapshot(&self) -> Vec<u8>;
    /// The state a [`Service::snapshot`] produced.
    fn restore(snapshot: &[u8]) -> Result<Self, RestoreError>;
}

/// A snapshot that does not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("snapshot does not decode: {0}")]
pub struct RestoreError(pub String);

/// Something outside the service it asks a question (a risk check, a reference price). Called
/// on the primary only.
pub trait External {
    fn call(&mut self, call: &[u8]) -> Vec<u8>;
}

/// No external system: every call answers an empty result.
pub struct NoExternal;

impl External for NoExternal {
    fn call(&mut self, _call: &[u8]) -> Vec<u8> {
        Vec::new()
    }
}

/// Deterministic pseudo-random numbers (splitmix64): seeded from entropy on a real primary, from
/// the seed in the simulation.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// Why a backup's replay did not match what the primary recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplayMismatch {
    /// The service asked for value number `at` of another kind than the primary recorded (or
    /// for more values than it recorded).
    Kind { at: usize },
    /// The service made another external call than the primary did.
    Call { at: usize },
    /// The service used fewer values than the primary recorded.
    Unused { used: usize, recorded: usize },
}

enum Mode<'a> {
    Record {
        now: u64,
        rng: &'a mut Rng,
        external: &'a mut dyn External,
        recorded: &'a mut Vec<Recorded>,
    },
    Replay {
        recorded: &'a [Recorded],
        next: usize,
    },
}

/// What a service may use besides its request. See the module docs.
pub struct Ctx<'a> {
    mode: Mode<'a>,
    mismatch: Option<ReplayMismatch>,
}

impl<'a> Ctx<'a> {
    /// The primary's context: values are produced and appended to `recorded`.
    pub(crate) fn record(
        now: u64,
        rng: &'a mut Rng,
        external: &'a mut dyn External,
        recorded: &'a mut Vec<Recorded>,
    ) -> Ctx<'a> {
        Ctx {
            mode: Mode::Record {
                now,
                rng,
                external,
                recorded,
            },
            mismatch: None,
        }
    }

    /// The backup's context: values come from `recorded`, in order.
    pub(crate) fn replay(recorded: &'a [Recorded]) -> Ctx<'a> {
        Ctx {
            mode: Mode::Replay { recorded, next: 0 },
            mismatch: None,
        }
    }

    /// The time (nanoseconds, the primary's clock when the request was applied).
    pub fn now(&mut self) -> u64 {
        match &mut self.mode {
            Mode::Record { now, recorded, .. } => {
                recorded.push(Recorded::Time(*now));
                *now
            }
            Mode::Replay { .. } => match self.replayed() {
                Some(Recorded::Time(t)) => *t,
                _ => self.kind_mismatch(0),
            },
        }
    }

    /// A random number.
    pub fn random(&mut self) -> u64 {
        match &mut self.mode {
            Mode::Record { rng, recorded, .. } => {
                let x = rng.next_u64();
                recorded.push(Recorded::Random(x));
                x
            }
            Mode::Replay { .. } => match self.replayed() {
                Some(Recorded::Random(x)) => *x,
                _ => self.kind_mismatch(0),
            },
        }
    }

    /// Asks an external system (on the primary only; the backup gets the primary's answer).
    pub fn external(&mut self, call: &[u8]) -> Vec<u8> {
        let digest = crc32c::crc32c(call);
        match &mut self.mode {
            Mode::Record {
                external, recorded, ..
            } => {
                let result = external.call(call);
                recorded.push(Recorded::External {
                    call_digest: digest,
                    result: result.clone(),
                });
                result
            }
            Mode::Replay { .. } => match self.replayed() {
                Some(Recorded::External {
                    call_digest,
                    result,
                }) => {
                    if *call_digest != digest {
                        let at = self.position() - 1;
                        self.mismatch.get_or_insert(ReplayMismatch::Call { at });
                    }
                    result.clone()
                }
                _ => self.kind_mismatch(Vec::new()),
            },
        }
    }

    /// The next recorded value (replay only); `None` once they are used up.
    fn replayed(&mut self) -> Option<&'a Recorded> {
        match &mut self.mode {
            Mode::Replay { recorded, next } => {
                let r = recorded.get(*next);
                *next += 1;
                r
            }
            Mode::Record { .. } => None,
        }
    }

    fn position(&self) -> usize {
        match &self.mode {
            Mode::Replay { next, .. } => *next,
            Mode::Record { recorded, .. } => recorded.len(),
        }
    }

    fn kind_mismatch<T>(&mut self, fallback: T) -> T {
        let at = self.position() - 1;
        self.mismatch.get_or_insert(ReplayMismatch::Kind { at });
        fallback
    }

    /// How the replay went (after the service returned).
    pub(crate) fn finish(self) -> Option<ReplayMismatch> {
        if self.mismatch.is_some() {
            return self.mismatch;
        }
        match self.mode {
            Mode::Replay { recorded, next } if next < recorded.len() => {
                Some(ReplayMismatch::Unused {
                    used: next,
                    recorded: recorded.len(),
                })
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo;
    impl External for Echo {
        fn call(&mut self, call: &[u8]) -> Vec<u8> {
            call.iter().rev().copied().collect()
        }
    }

    fn use_everything(ctx: &mut Ctx<'_>, call: &[u8]) -> (u64, u64, Vec<u8>) {
        (ctx.now(), ctx.random(), ctx.external(call))
    }

    #[test]
    fn the_backup_replays_what_the_primary_recorded() {
        let (mut rng, mut recorded, mut echo) = (Rng::new(1), Vec::new(), Echo);
        let mut ctx = Ctx::record(77, &mut rng, &mut echo, &mut recorded);
        let primary = use_everything(&mut ctx, b"abc");
        assert_eq!(ctx.finish(), None);
        assert_eq!(primary.2, b"cba");
        let mut ctx = Ctx::replay(&recorded);
        assert_eq!(use_everything(&mut ctx, b"abc"), primary);
        assert_eq!(ctx.finish(), None);
    }

    #[test]
    fn a_replay_that_asks_otherwise_is_a_mismatch() {
        let (mut rng, mut recorded, mut echo) = (Rng::new(1), Vec::new(), Echo);
        let mut ctx = Ctx::record(77, &mut rng, &mut echo, &mut recorded);
        use_everything(&mut ctx, b"abc");
        let mut ctx = Ctx::replay(&recorded);
        ctx.random();
        assert_eq!(ctx.finish(), Some(ReplayMismatch::Kind { at: 0 }));
        let mut ctx = Ctx::replay(&recorded);
        use_everything(&mut ctx, b"abd");
        assert_eq!(ctx.finish(), Some(ReplayMismatch::Call { at: 2 }));
        let mut ctx = Ctx::replay(&recorded);
        ctx.now();
        assert_eq!(
            ctx.finish(),
            Some(ReplayMismatch::Unused {
                used: 1,
                recorded: 3
            })
        );
        let mut ctx = Ctx::replay(&recorded);
        use_everything(&mut ctx, b"abc");
        ctx.now();
        assert_eq!(ctx.finish(), Some(ReplayMismatch::Kind { at: 3 }));
    }
}
