//! Where a connection's time comes from.
//!
//! The data path reads the time once per `progress`. Asking the OS each time costs a vDSO read
//! on a host whose clocksource is the TSC, but a system call where it is not (virtual machines
//! on hpet or acpi_pm: the rxe guest of `ci/softroce`). [`RealClock`] asks the OS about once a
//! millisecond and in between extends that reading with the CPU's time-stamp counter: one
//! `rdtsc` and a multiplication per read. The counter is rated against the OS clock between
//! quick OS reads, once two windows of at least a millisecond agree, and every later window
//! must agree with the rate (a window with a jump in it is set aside). Whatever the counter
//! does (jump, stall, run backwards after a migration between cores), the time returned never
//! goes back and stays within about one interval of the OS clock's; a counter that looks
//! wrong only makes the next read ask the OS. A property test drives it through random
//! schedules of all of these.

use std::cell::Cell;
use std::time::Instant;

use crate::core::Nanos;

/// A source of time for the driver.
pub trait Clock {
    /// Nanoseconds since some fixed instant; never less than an earlier reading (timers and
    /// the quiet rails' polling wait for the time to pass their deadlines).
    fn now(&self) -> Nanos;
    /// Called while a bounded wait spins, with the wait's deadline: a real clock just hints the
    /// CPU; a virtual clock moves time forward (at most to `deadline`) so the wait can end.
    fn idle(&self, deadline: Nanos) {
        let _ = deadline;
        std::hint::spin_loop();
    }
    /// Called after the driver slept in the kernel (a blocking wait): a clock that extends its
    /// last OS reading asks the OS again at its next read (a CPU's counter may stop while the
    /// core sleeps, where it is not invariant).
    fn woke(&self) {}
}

/// Wall-clock time since the clock was made (monotonic). Its clones count from the same
/// instant, so an endpoint's connections agree on the time to within their errors (usually
/// microseconds); each keeps its own counter state (a clock is read by one thread).
///
/// The counter must keep running while the thread is off its core: an invariant TSC (every
/// x86 server CPU of the last 15 years; virtual machines' counters run with the host's). On a
/// CPU whose counter stops in deep idle, a caller that sleeps in its own code should call
/// [`Clock::woke`] afterwards (railover's own blocking waits do): otherwise the time may lag
/// until 1 ms of counter ticks or 4,096 reads have passed.
#[derive(Clone)]
pub struct RealClock {
    epoch: Instant,
    /// A read between OS reads copies this alone (48 bytes), not the rating's state.
    ext: Cell<Extension>,
    rating: Cell<Rating>,
}

impl Default for RealClock {
    fn default() -> Self {
        RealClock {
            epoch: Instant::now(),
            ext: Cell::new(Extension::default()),
            rating: Cell::new(Rating::default()),
        }
    }
}

impl Clock for RealClock {
    #[inline]
    fn now(&self) -> Nanos {
        let counter = read_counter();
        let mut ext = self.ext.get();
        match ext.extend(counter) {
            Some(t) => {
                self.ext.set(ext);
                t
            }
            None => self.sync(counter),
        }
    }

    fn woke(&self) {
        let mut clock = self.state();
        clock.ask_os_next();
        self.set_state(clock);
    }
}

impl RealClock {
    /// How many times this clock (this copy) asked the OS for the time: about once per
    /// millisecond of reads once the counter is rated, every read where there is no counter.
    pub fn os_reads(&self) -> u64 {
        self.rating.get().os_reads
    }

    /// How many of those OS reads were too slow to extend from (each made the next read ask the
    /// OS again): on a host whose OS clock is slow to read, most of them.
    pub fn slow_os_reads(&self) -> u64 {
        self.rating.get().slow_os_reads
    }

    /// A read that asks the OS (out of line: about once per millisecond of reads).
    #[cold]
    #[inline(never)]
    fn sync(&self, counter: u64) -> Nanos {
        let mut clock = self.state();
        let t = clock.sync(counter, || self.os_now());
        self.set_state(clock);
        t
    }

    fn state(&self) -> CounterClock {
        CounterClock {
            ext: self.ext.get(),
            rating: self.rating.get(),
        }
    }

    fn set_state(&self, clock: CounterClock) {
        self.ext.set(clock.ext);
        self.rating.set(clock.rating);
    }

    fn os_now(&self) -> (Nanos, u64) {
        let t = self.epoch.elapsed().as_nanos() as Nanos;
        // The counter after the OS read: how long the read took (a preemption in between
        // spoils the sample for rating the counter).
        (t, read_counter())
    }
}

/// The CPU's time-stamp counter (0 where there is none: every read then asks the OS).
#[inline]
fn read_counter() -> u64 {
    #[cfg(any(target_arch = "x86_64", target_arch = "x86"))]
    {
        safe_arch::read_timestamp_counter()
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "x86")))]
    {
        0
    }
}

/// How long the counter alone may carry the time before the OS is asked again.
const INTERVAL_NS: Nanos = 1_000_000;
/// Reads the counter alone may serve in a row (a stalled counter is caught by this).
const MAX_READS: u32 = 4_096;
/// The shortest window the counter is rated over: an OS read's jitter (at most
/// [`MAX_OS_READ_NS`], half of it at each end) weighs at most 2.5% on a window's rate, less on
/// the rate from the anchor, whose baseline grows.
const MIN_SAMPLE_NS: Nanos = 1_000_000;
/// An OS read longer than this (preempted, a page fault, a slow hypervisor clock) rates
/// nothing and is not extended from: when it happened between the two counter values around
/// it is too vague. Where OS reads are always slower, every read asks the OS.
const MAX_OS_READ_NS: Nanos = 25_000;
/// The same before the counter is rated: 25 us at 1 GHz, 5 us at 5 GHz (a read quick enough
/// before the rating is quick enough after it, at any rate from 1 GHz).
const MAX_OS_READ_TICKS: u64 = 25_000;

/// The counter's state between OS reads (plain data: the logic is tested with made-up counters
/// and OS clocks): what every read needs, and what only an OS read touches.
#[derive(Clone, Copy, Debug, Default)]
struct CounterClock {
    ext: Extension,
    rating: Rating,
}

/// What a read needs to extend the last OS reading by the counter (kept apart from
/// [`Rating`] so that a read copies only this).
#[derive(Clone, Copy, Debug, Default)]
struct Extension {
    /// Counter value and OS time at the last OS read: the time is extended from there.
    sync_counter: u64,
    sync_ns: Nanos,
    /// Nanoseconds per counter tick, 32.32 fixed point (0: not rated yet, ask the OS).
    ns_per_tick: u64,
    /// Counter ticks in [`INTERVAL_NS`] at that rate.
    interval_ticks: u64,
    /// Reads served by the counter since the last OS read.
    reads: u32,
    /// The last time returned: never go back.
    last: Nanos,
}

/// How the counter is rated against the OS clock (touched at OS reads only).
#[derive(Clone, Copy, Debug, Default)]
struct Rating {
    /// The reading the counter is rated from (the longer ago, the less an OS read's jitter
    /// weighs on the rate), and the start of the window being judged: every window of at
    /// least [`MIN_SAMPLE_NS`] between quick OS reads must agree with the rate, else the
    /// counter jumped inside it (or, if it keeps happening, changed rate).
    anchor: Option<(u64, Nanos)>,
    checkpoint: Option<(u64, Nanos)>,
    /// The last window's rate: before the counter is rated, the next window must confirm it.
    window_rate: u64,
    /// Windows in a row that disagreed with the rate.
    off_windows: u32,
    /// OS reads so far.
    os_reads: u64,
    /// OS reads too slow (or spanning a move between cores) to extend from.
    slow_os_reads: u64,
}

impl Extension {
    /// The time at counter value `counter`, if the counter alone may carry it (under one
    /// interval's ticks and [`MAX_READS`] reads past the last OS reading); else None: ask the OS.
    #[inline]
    fn extend(&mut self, counter: u64) -> Option<Nanos> {
        let ticks = counter.wrapping_sub(self.sync_counter);
        if ticks < self.interval_ticks && self.reads < MAX_READS {
            self.reads += 1;
            // Below one interval's ticks: under INTERVAL_NS past the OS reading.
            let t =
                self.sync_ns + ((u128::from(ticks) * u128::from(self.ns_per_tick)) >> 32) as u64;
            self.last = self.last.max(t);
            return Some(self.last);
        }
        None
    }
}

impl CounterClock {
    /// The time at counter value `counter`; `os` reads the OS clock (and the counter right
    /// after it) when the counter alone can't be trusted. (What [`RealClock`]'s `now` does with
    /// its two cells; the tests drive it with made-up counters and OS clocks.)
    #[cfg(test)]
    fn read(&mut self, counter: u64, os: impl FnOnce() -> (Nanos, u64)) -> Nanos {
        match self.ext.extend(counter) {
            Some(t) => t,
            None => self.sync(counter, os),
        }
    }

    #[cold]
    fn sync(&mut self, before: u64, os: impl FnOnce() -> (Nanos, u64)) -> Nanos {
        let (t, after) = os();
        self.rating.os_reads += 1;
        self.ext.last = self.ext.last.max(t);
        let read_ticks = after.wrapping_sub(before);
        // The OS read happened between the two counter values: pair it with the middle one.
        let (counter, clean) = if read_ticks < u64::MAX / 2 {
            let clean = if self.ext.ns_per_tick == 0 {
                read_ticks <= MAX_OS_READ_TICKS
            } else {
                (u128::from(read_ticks) * u128::from(self.ext.ns_per_tick)) >> 32
                    <= u128::from(MAX_OS_READ_NS)
            };
            (before.wrapping_add(read_ticks / 2), clean)
        } else {
            (before, false) // moved to another core's counter meanwhile
        };
        if clean {
            self.rate(counter, t);
        }
        self.ext.sync_counter = counter;
        self.ext.sync_ns = t;
        self.ext.reads = 0;
        if !clean {
            // When, between the counter values around it, the OS read its clock is too vague
            // to extend from: the next read asks again.
            self.rating.slow_os_reads += 1;
            self.ask_os_next();
        }
        self.ext.last
    }

    /// Makes the next read ask the OS.
    fn ask_os_next(&mut self) {
        self.ext.reads = MAX_READS;
    }

    /// Judges the window that ends at this quick OS reading and rates the counter from the
    /// anchor once two windows in a row agree.
    fn rate(&mut self, counter: u64, t: Nanos) {
        let now = (counter, t);
        let (Some(anchor), Some(checkpoint)) = (self.rating.anchor, self.rating.checkpoint) else {
            self.restart_at(now);
            return;
        };
        let local = match rate_between(checkpoint, now) {
            Sample::Short => return,
            // The counter stood still or went back (another core's, or reset): start over
            // from here, keeping the rate.
            Sample::Invalid => {
                self.restart_at(now);
                return;
            }
            Sample::Rate(r) => r,
        };
        self.rating.checkpoint = Some(now);
        let reference = if self.ext.ns_per_tick != 0 {
            self.ext.ns_per_tick
        } else {
            self.rating.window_rate
        };
        self.rating.window_rate = local;
        if reference == 0 {
            return; // the first window: the next one confirms it or not
        }
        if local.abs_diff(reference) > reference / 8 {
            // A jump inside this window (the next baseline starts after it), or a new rate if
            // it persists.
            self.rating.anchor = Some(now);
            self.rating.off_windows += 1;
            if self.rating.off_windows >= 3 {
                self.rating.off_windows = 0;
                self.ext.ns_per_tick = 0;
                self.ext.interval_ticks = 0;
            }
            return;
        }
        self.rating.off_windows = 0;
        let rate = match rate_between(anchor, now) {
            Sample::Rate(r) if r.abs_diff(local) <= local / 8 => r,
            _ => local,
        };
        self.ext.ns_per_tick = rate;
        self.ext.interval_ticks = ((u128::from(INTERVAL_NS) << 32) / u128::from(rate))
            .clamp(1, u128::from(u64::MAX)) as u64;
    }

    /// The next windows and the baseline start at this reading.
    fn restart_at(&mut self, at: (u64, Nanos)) {
        self.rating.anchor = Some(at);
        self.rating.checkpoint = Some(at);
    }
}

/// A rate measured between two readings (counter, OS time).
enum Sample {
    /// Less than [`MIN_SAMPLE_NS`] apart.
    Short,
    /// The counter stood still or went back.
    Invalid,
    /// Nanoseconds per tick, 32.32 fixed point.
    Rate(u64),
}

fn rate_between(from: (u64, Nanos), to: (u64, Nanos)) -> Sample {
    let elapsed = to.1.saturating_sub(from.1);
    if elapsed < MIN_SAMPLE_NS {
        return Sample::Short;
    }
    let ticks = to.0.wrapping_sub(from.0);
    if ticks == 0 || ticks > u64::MAX / 2 {
        return Sample::Invalid;
    }
    let per_tick = (u128::from(elapsed) << 32) / u128::from(ticks);
    if per_tick == 0 || per_tick > u128::from(u64::MAX) {
        return Sample::Invalid;
    }
    Sample::Rate(per_tick as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A counter at `ghz` ticks per ns and an OS clock, both made up.
    struct Fake {
        clock: CounterClock,
        os_reads: usize,
    }

    impl Fake {
        fn new() -> Fake {
            Fake {
                clock: CounterClock::default(),
                os_reads: 0,
            }
        }
        /// Reads at true time `t` with the counter showing `counter`.
        fn read(&mut self, t: Nanos, counter: u64) -> Nanos {
            let reads = &mut self.os_reads;
            self.clock.read(counter, || {
                *reads += 1;
                (t, counter)
            })
        }
    }

    #[test]
    fn a_steady_counter_carries_the_time_between_os_reads() {
        let mut f = Fake::new();
        // 3 ticks per ns; a read every 100 ns for 10 ms.
        for i in 0..100_000u64 {
            let t = 1_000 + i * 100;
            let got = f.read(t, 7 + 3 * t);
            assert!(got.abs_diff(t) <= 1, "at {t}: {got}");
        }
        // Every read asks the OS while the counter is rated (two windows of MIN_SAMPLE_NS that
        // agree), then one per interval or per MAX_READS reads, whichever comes first.
        let rating_ns = 2 * MIN_SAMPLE_NS;
        let rating = (rating_ns / 100) as usize;
        let per_sync = INTERVAL_NS.min(u64::from(MAX_READS) * 100);
        let syncs = ((10_000_000 - rating_ns) / per_sync) as usize;
        assert!(f.os_reads <= rating + 2 + syncs, "{}", f.os_reads);
        assert!(f.os_reads >= rating + syncs - 2, "{}", f.os_reads);
    }

    #[test]
    fn a_counter_that_jumps_back_or_ahead_asks_the_os_and_time_never_goes_back() {
        let mut f = Fake::new();
        let mut t = 0;
        let mut last = 0;
        let mut counter = 10_000_000_000u64;
        for i in 0..50_000u64 {
            t += 100;
            counter = match i % 5_000 {
                // A migration to a core whose counter is far behind, then far ahead.
                1_000 => counter - 400_000_000,
                3_000 => counter + 900_000_000,
                _ => counter + 200, // 2 ticks per ns
            };
            let got = f.read(t, counter);
            assert!(got >= last, "went back at {i}: {got} < {last}");
            assert!(got.abs_diff(t) <= INTERVAL_NS, "at {i}: {got} vs {t}");
            last = got;
        }
    }

    #[test]
    fn a_stalled_counter_is_caught_within_max_reads() {
        let mut f = Fake::new();
        for i in 0..20_000u64 {
            f.read(i * 100, i * 100);
        }
        let before = f.os_reads;
        // The counter stops; time goes on: the OS is asked at least every MAX_READS reads.
        for i in 0..(3 * MAX_READS as u64) {
            let t = 2_000_000 + i * 100;
            let got = f.read(t, 20_000 * 100);
            assert!(t.abs_diff(got) <= u64::from(MAX_READS) * 100, "{t} {got}");
        }
        assert!(f.os_reads - before >= 3);
    }

    #[test]
    fn a_slow_os_read_rates_nothing() {
        // 2 ticks per ns; every 10th OS read takes 1 ms (a page fault, a preemption) and reads
        // the OS clock at its end: pairing that with the counter half-way through would skew
        // the rate and the time extended from it.
        let mut clock = CounterClock::default();
        let (mut now, mut os_reads, mut slow_reads) = (1_000u64, 0, 0);
        for _ in 0..200_000 {
            now += 100;
            let before = now;
            let slow = os_reads % 10 == 0;
            let got = clock.read(2 * before, || {
                os_reads += 1;
                if slow {
                    slow_reads += 1;
                    now += 1_000_000;
                }
                (now, 2 * now)
            });
            // Never extended from a slow reading: within a nanosecond of the truth (or, for
            // the slow read itself, the time it reports).
            assert!(got.abs_diff(now) <= 1, "at {before}: {got} vs {now}");
            if clock.ext.ns_per_tick != 0 {
                // Rated from quick reads only: exact.
                assert_eq!(clock.ext.ns_per_tick, 1 << 31, "at {before}");
            }
        }
        assert!(clock.ext.ns_per_tick != 0, "rated in the end");
        // Each counted as too slow to extend from (what the ping-pong on rxe tells apart from
        // the reads the interval asks for); the quick ones not.
        assert_eq!(clock.rating.os_reads, os_reads);
        assert_eq!(clock.rating.slow_os_reads, slow_reads);
    }

    #[test]
    fn after_a_sleep_the_os_is_asked() {
        let mut f = Fake::new();
        for i in 0..30_000u64 {
            f.read(i * 100, i * 100);
        }
        let before = f.os_reads;
        f.read(3_000_000, 3_000_000);
        assert_eq!(f.os_reads, before, "served by the counter");
        f.clock.ask_os_next(); // what `woke` does
                               // The counter stood still while the core slept: the OS has the time.
        assert_eq!(f.read(9_000_000, 3_000_100), 9_000_000);
        assert_eq!(f.os_reads, before + 1);
    }

    #[test]
    fn no_counter_means_every_read_asks_the_os() {
        let mut f = Fake::new();
        for i in 0..1_000u64 {
            assert_eq!(f.read(i * 1_000, 0), i * 1_000);
        }
        assert_eq!(f.os_reads, 1_000);
    }

    #[test]
    fn the_real_clock_stays_within_an_interval_of_the_os_clock() {
        let clock = RealClock::default();
        let (mut last, mut reads, mut worst) = (0, 0, 0);
        let start = Instant::now();
        // Until 20 ms passed: long enough to rate the counter and extend many intervals.
        while start.elapsed().as_millis() < 20 {
            let before = clock.epoch.elapsed().as_nanos() as Nanos;
            let t = clock.now();
            let after = clock.epoch.elapsed().as_nanos() as Nanos;
            assert!(t >= last);
            // How far outside the OS readings around it (0: between them): the rate's error
            // over one interval, at most ~1% of it by construction.
            let off = before.saturating_sub(t).max(t.saturating_sub(after));
            assert!(off <= INTERVAL_NS / 10, "{before} {t} {after}");
            worst = worst.max(off);
            last = t;
            reads += 1;
        }
        eprintln!(
            "{reads} reads, {} from the OS, at most {worst} ns outside the OS readings around each",
            clock.os_reads()
        );
        // How many reads the counter served depends on how quick this machine's OS reads are
        // (a slow or loaded one leaves it unrated: every read asks the OS, correct but no
        // gain); that it spares the OS is asserted on made-up clocks above and in the property
        // test below, and on rxe by the two-process ping-pong.
    }

    /// What the counter and the OS do between two reads, in the model below.
    #[derive(Debug, Clone)]
    enum Step {
        /// `reads` reads `gap` ns apart, the counter running; an OS read takes `took` ns.
        Run { reads: u32, gap: u64, took: u64 },
        /// The thread moves to a core whose counter is `offset` ticks away.
        Migrate { offset: i64 },
        /// `reads` reads `gap` ns apart while the counter stands still.
        Stall { reads: u32, gap: u64 },
        /// One read whose OS read takes `took` ns (preempted), the time read at its end.
        SlowRead { took: u64 },
        /// A blocking wait of `slept` ns (the counter runs on), then `woke`.
        Sleep { slept: u64 },
    }

    fn step() -> impl proptest::strategy::Strategy<Value = Step> {
        use proptest::prelude::*;
        prop_oneof![
            4 => (1u32..3_000, 20u64..5_000, 0u64..3_000)
                .prop_map(|(reads, gap, took)| Step::Run { reads, gap, took }),
            // Log-uniform: from a tick to two billion, either way.
            1 => (0u32..31, any::<bool>(), 0i64..1_000).prop_map(|(k, back, extra)| {
                let by = (1i64 << k) + extra;
                Step::Migrate { offset: if back { -by } else { by } }
            }),
            1 => (1u32..3_000, 20u64..200).prop_map(|(reads, gap)| Step::Stall { reads, gap }),
            1 => (MAX_OS_READ_NS + 1..3_000_000).prop_map(|took| Step::SlowRead { took }),
            1 => (1_000u64..50_000_000).prop_map(|slept| Step::Sleep { slept }),
        ]
    }

    /// The model's counter and OS: true time `now`, a counter at `tenths / 10` ticks per ns
    /// from `offset` (wrapping), or standing still at `stalled`.
    struct Model {
        clock: CounterClock,
        now: u64,
        offset: u64,
        tenths: u64,
        stalled: Option<u64>,
        last: u64,
        os_reads: u64,
    }

    impl Model {
        fn counter(&self, at: u64) -> u64 {
            self.stalled
                .unwrap_or_else(|| self.offset.wrapping_add(at * self.tenths / 10))
        }

        /// One read at true time `now`; an OS read, if the clock makes one, takes `took` ns and
        /// reads the time at its end. Checks the invariants.
        fn read(&mut self, took: u64) -> Result<(), proptest::test_runner::TestCaseError> {
            let (before, after) = (self.counter(self.now), self.counter(self.now + took));
            let (now, mut asked) = (self.now, false);
            let got = self.clock.read(before, || {
                asked = true;
                (now + took, after)
            });
            if asked {
                self.now += took;
                self.os_reads += 1;
            }
            let truth = self.now;
            proptest::prop_assert!(got >= self.last, "went back: {got} < {}", self.last);
            // Ahead: at most the extension of one interval (a counter jump forward), and half a
            // quick OS read (its time is paired with the counter half-way through it).
            proptest::prop_assert!(
                got <= truth + INTERVAL_NS + MAX_OS_READ_NS,
                "{got} ahead of {truth}"
            );
            // Behind: an interval, and a stalled counter's reads (at most 200 ns apart here).
            let lag = INTERVAL_NS + u64::from(MAX_READS) * 200 + MAX_OS_READ_NS;
            proptest::prop_assert!(truth <= got + lag, "{got} behind {truth}");
            self.last = got;
            Ok(())
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
        /// Whatever the counter does (jumps between cores, stalls, slow OS reads, sleeps, a
        /// wrap), the time never goes back and stays within about an interval of the OS; and a
        /// steady counter afterwards is rated again and spares the OS most reads.
        #[test]
        fn the_time_stays_near_the_os_clock_whatever_the_counter_does(
            tenths in 10u64..50,
            near_wrap in proptest::prelude::any::<bool>(),
            steps in proptest::collection::vec(step(), 1..40),
        ) {
            let offset = if near_wrap { u64::MAX - (1 << 34) } else { 1 << 40 };
            let mut m = Model {
                clock: CounterClock::default(),
                now: 1_000_000,
                offset,
                tenths,
                stalled: None,
                last: 0,
                os_reads: 0,
            };
            for step in steps {
                match step {
                    Step::Run { reads, gap, took } => {
                        for _ in 0..reads {
                            m.now += gap;
                            m.read(took)?;
                        }
                    }
                    Step::Stall { reads, gap } => {
                        m.stalled = Some(m.counter(m.now));
                        for _ in 0..reads {
                            m.now += gap;
                            m.read(0)?;
                        }
                        // The counter resumes where it stood: from here on it is behind.
                        let stood = m.stalled.take().expect("stalled");
                        m.offset = stood.wrapping_sub(m.now * m.tenths / 10);
                    }
                    Step::Migrate { offset } => m.offset = m.offset.wrapping_add_signed(offset),
                    Step::SlowRead { took } => {
                        m.clock.ask_os_next(); // this read goes to the OS
                        m.now += 1;
                        m.read(took)?;
                    }
                    Step::Sleep { slept } => {
                        m.now += slept;
                        m.clock.ask_os_next(); // what `woke` does
                    }
                }
            }
            // A steady counter from here: rated again within three windows (all OS reads), then
            // about one OS read per interval.
            let before = m.os_reads;
            for _ in 0..20_000 {
                m.now += 400;
                m.read(1_000)?;
            }
            proptest::prop_assert!(m.clock.ext.ns_per_tick != 0, "not rated again");
            let windows = 3 * MIN_SAMPLE_NS / 400;
            proptest::prop_assert!(m.os_reads - before <= windows + 20, "{} OS reads", m.os_reads - before);
        }
    }
}
