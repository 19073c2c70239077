//! Validated configuration.

use std::time::Duration;

use railover_rdma::LinkParams;
use railover_segq::{Backing, Geometry, GeometryError};

/// Most rails a connection may have (fault reports pack one generation per rail into a u64).
pub const MAX_RAILS: usize = 4;

/// Why a configuration was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    #[error("invalid queue geometry: {0}")]
    Geometry(#[from] GeometryError),
    #[error("need 2..={MAX_RAILS} rails, got {0}")]
    Rails(usize),
    #[error("heartbeat interval must be > 0")]
    HeartbeatInterval,
    #[error("heartbeat miss threshold must be >= 2 (one late beat is not a failure)")]
    HeartbeatMisses,
    #[error("invalid RC parameters: {0}")]
    Link(&'static str),
    #[error("max write size {0} must be at least one maximal record")]
    MaxWrite(usize),
    #[error("session timeout {session_ns} ns must exceed the heartbeat timeout {heartbeat_ns} ns")]
    SessionTimeout { session_ns: u64, heartbeat_ns: u64 },
    #[error("gray-failure switch: the window must be > 0 and the hold-down at least the window")]
    GraySwitch,
}

/// How a connection uses its rails (see the README's "Rail modes").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum RailMode {
    /// One rail carries the stream; the others are connected, heart-beating standbys. A fault
    /// costs a blackout: detection, then a resend of what was not acknowledged.
    #[default]
    ActiveStandby,
    /// Every record is written on every live rail; the receiver delivers the first copy and
    /// drops the others by sequence number. A fault on one rail costs no blackout; the price is
    /// the wire traffic times the number of rails (reported in the stats).
    HotHot,
}

/// Proactive switching away from a rail that degrades before it fails (gray failure), judged by
/// each rail's write-completion latency (a moving average over its signaled writes: data and
/// heartbeats).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct GraySwitch {
    /// The active rail counts as degraded while its latency exceeds the best standby's by more
    /// than this. Set it above the queueing delay a loaded rail shows (tens of microseconds on
    /// hardware; milliseconds on SoftRoCE).
    pub margin_ns: u64,
    /// How long the active rail must stay degraded before the switch (evaluated each heartbeat).
    pub window_ns: u64,
    /// A rail left for being degraded is not chosen by a later switch for this long (a failover
    /// still takes it if nothing else is left).
    pub hold_down_ns: u64,
    /// Also switch when the active rail's card counted at least this many RC retransmissions in
    /// one window while a standby's counted fewer (0: latency alone). Judged at every heartbeat
    /// tick on the window's count so far: the switch comes as soon as the count is reached, not
    /// at the window's end. Where the card exposes
    /// them (`hw_counters`: rxe, ConnectX); read off the data path (the control thread, or the
    /// simulator's card), per card, so every connection on it shares the count. Ask for more
    /// than one: a single retransmission happens on healthy wires when a host stalls.
    pub retransmits_per_window: u32,
}

impl GraySwitch {
    /// Leave the active rail once its latency exceeded the best standby's by `margin` for
    /// `window`; don't come back to it for `hold_down` (retransmissions not counted).
    pub const fn new(margin: Duration, window: Duration, hold_down: Duration) -> GraySwitch {
        GraySwitch {
            margin_ns: nanos(margin),
            window_ns: nanos(window),
            hold_down_ns: nanos(hold_down),
            retransmits_per_window: 0,
        }
    }

    /// Also leave it when its card counted `n` RC retransmissions in one window (see
    /// [`GraySwitch::retransmits_per_window`]).
    pub const fn retransmits_per_window(mut self, n: u32) -> GraySwitch {
        self.retransmits_per_window = n;
        self
    }
}

/// A configured time in the nanoseconds the core counts in (saturating: `Duration::MAX` is
/// "never").
const fn nanos(t: Duration) -> u64 {
    let ns = t.as_nanos();
    if ns > u64::MAX as u128 {
        u64::MAX
    } else {
        ns as u64
    }
}

/// Connection configuration. Build it with [`Config::builder`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    pub(crate) geometry: Geometry,
    pub(crate) rails: usize,
    pub(crate) heartbeat_interval_ns: u64,
    pub(crate) heartbeat_misses: u32,
    pub(crate) link: LinkParams,
    pub(crate) max_write_bytes: usize,
    pub(crate) ack_every_bytes: u64,
    pub(crate) rearm_after_ns: u64,
    pub(crate) first_contact_grace_ns: u64,
    pub(crate) session_timeout_ns: u64,
    pub(crate) close_linger_ns: u64,
    pub(crate) rearm_exchange_timeout_ns: u64,
    pub(crate) backing: Backing,
    pub(crate) mode: RailMode,
    pub(crate) gray: Option<GraySwitch>,
}

impl Config {
    pub fn builder() -> ConfigBuilder {
        ConfigBuilder::default()
    }
    pub fn geometry(&self) -> Geometry {
        self.geometry
    }
    pub fn rails(&self) -> usize {
        self.rails
    }
    pub fn heartbeat_interval_ns(&self) -> u64 {
        self.heartbeat_interval_ns
    }
    pub fn heartbeat_misses(&self) -> u32 {
        self.heartbeat_misses
    }
    pub fn link(&self) -> LinkParams {
        self.link
    }
    pub fn backing(&self) -> Backing {
        self.backing
    }
    /// How long the peer may stay unresponsive (every rail silent at once) before the session ends.
    pub fn session_timeout_ns(&self) -> u64 {
        self.session_timeout_ns
    }
    /// How long closing (or dropping) a connection waits for the peer to deliver what was sent.
    pub fn close_linger_ns(&self) -> u64 {
        self.close_linger_ns
    }
    /// How long one re-arm exchange may wait for the peer before it is retried.
    pub fn rearm_exchange_timeout_ns(&self) -> u64 {
        self.rearm_exchange_timeout_ns
    }
    /// How the rails carry the stream.
    pub fn rail_mode(&self) -> RailMode {
        self.mode
    }
    /// The gray-failure switch, if enabled.
    pub fn gray_switch(&self) -> Option<GraySwitch> {
        self.gray
    }
    /// How long silence lasts before the heartbeat declares a rail dead.
    pub fn heartbeat_timeout_ns(&self) -> u64 {
        self.heartbeat_interval_ns * self.heartbeat_misses as u64
    }
}

/// Builder with validated values; defaults suit a trading engine on two NIC pairs.
#[derive(Debug, Clone)]
pub struct ConfigBuilder {
    segment_size: usize,
    segment_count: usize,
    max_record: usize,
    rails: usize,
    heartbeat_interval_ns: u64,
    heartbeat_misses: u32,
    link: LinkParams,
    max_write_bytes: usize,
    rearm_after_ns: u64,
    first_contact_grace_ns: u64,
    session_timeout_ns: u64,
    close_linger_ns: u64,
    rearm_exchange_timeout_ns: u64,
    backing: Backing,
    mode: RailMode,
    gray: Option<GraySwitch>,
}

impl Default for ConfigBuilder {
    fn default() -> Self {
        ConfigBuilder {
            segment_size: 64 * 1024,
            segment_count: 64,
            max_record: 8 * 1024,
            rails: 2,
            heartbeat_interval_ns: 1_000_000,
            heartbeat_misses: 3,
            link: LinkParams::default(),
            max_write_bytes: 64 * 1024,
            rearm_after_ns: 100_000_000,
            first_contact_grace_ns: 100_000_000,
            session_timeout_ns: 5_000_000_000,
            close_linger_ns: 1_000_000_000,
            rearm_exchange_timeout_ns: crate::rearm::EXCHANGE_TIMEOUT_NS,
            backing: Backing::Anonymous,
            mode: RailMode::ActiveStandby,
            gray: None,
        }
    }
}

impl ConfigBuilder {
    /// Ring geometry of every rail (both ends must use the same; the handshake checks).
    pub fn geometry(
        mut self,
        segment_size: usize,
        segment_count: usize,
        max_record: usize,
    ) -> Self {
        (self.segment_size, self.segment_count, self.max_record) =
            (segment_size, segment_count, max_record);
        self
    }
    /// The ring geometry set so far: (segment size, segment count, max record). (Settings from a
    /// file or the environment go on with [`crate::settings::Settings::apply`].)
    pub fn geometry_values(&self) -> (usize, usize, usize) {
        (self.segment_size, self.segment_count, self.max_record)
    }
    /// Number of rails (NIC pairs): the first is primary, the rest warm standbys, in order.
    pub fn rails(mut self, n: usize) -> Self {
        self.rails = n;
        self
    }
    /// Heartbeat period (default 1 ms).
    pub fn heartbeat_interval(mut self, t: Duration) -> Self {
        self.heartbeat_interval_ns = nanos(t);
        self
    }
    /// Silent intervals before a rail is declared dead (default 3).
    pub fn heartbeat_misses(mut self, k: u32) -> Self {
        self.heartbeat_misses = k;
        self
    }
    /// RC timeout / retry parameters.
    pub fn link_params(mut self, p: LinkParams) -> Self {
        self.link = p;
        self
    }
    /// Largest single RDMA write (coalescing limit).
    pub fn max_write_bytes(mut self, n: usize) -> Self {
        self.max_write_bytes = n;
        self
    }
    /// How long a failed rail without a port-active event waits before a re-arm attempt.
    pub fn rearm_after(mut self, t: Duration) -> Self {
        self.rearm_after_ns = nanos(t);
        self
    }
    /// How long a freshly (re)connected rail may stay silent before it is declared failed (the
    /// first packets of a new connection can take far longer than later ones). Default 100 ms.
    pub fn first_contact_grace(mut self, t: Duration) -> Self {
        self.first_contact_grace_ns = nanos(t);
        self
    }
    /// How long the peer may be unresponsive — every rail silent at once, as when its process is
    /// paused, descheduled or stopped — before the session ends with
    /// [`crate::core::EndReason::SessionTimeout`] (default 5 s). Until then nothing is failed over
    /// or dropped: sends queue (back-pressure when the ring is full) and traffic resumes by itself.
    pub fn session_timeout(mut self, t: Duration) -> Self {
        self.session_timeout_ns = nanos(t);
        self
    }
    /// How long [`Receiver::close`](crate::runtime::Receiver::close) (and dropping a connection) waits for the peer to
    /// deliver every record accepted before telling it the connection is closed (default 1 s).
    pub fn close_linger(mut self, t: Duration) -> Self {
        self.close_linger_ns = nanos(t);
        self
    }
    /// How long one re-arm exchange with the peer (over the control channel) may take before
    /// it is given up and retried (default 5 s).
    pub fn rearm_exchange_timeout(mut self, t: Duration) -> Self {
        self.rearm_exchange_timeout_ns = nanos(t);
        self
    }
    /// Memory backing of the rings.
    pub fn backing(mut self, b: Backing) -> Self {
        self.backing = b;
        self
    }
    /// How this side's stream uses the rails (default [`RailMode::ActiveStandby`]). A sender's
    /// choice: the receiver takes either.
    pub fn rail_mode(mut self, mode: RailMode) -> Self {
        self.mode = mode;
        self
    }
    /// Switch away from a degrading active rail before it fails (default off).
    pub fn gray_switch(mut self, gray: GraySwitch) -> Self {
        self.gray = Some(gray);
        self
    }

    pub fn build(self) -> Result<Config, ConfigError> {
        let geometry = Geometry::new(self.segment_size, self.segment_count, self.max_record)?;
        if !(2..=MAX_RAILS).contains(&self.rails) {
            return Err(ConfigError::Rails(self.rails));
        }
        if self.heartbeat_interval_ns == 0 {
            return Err(ConfigError::HeartbeatInterval);
        }
        if self.heartbeat_misses < 2 {
            return Err(ConfigError::HeartbeatMisses);
        }
        self.link.validate().map_err(|e| match e {
            railover_rdma::FabricError::InvalidParams(why) => ConfigError::Link(why),
            _ => ConfigError::Link("rejected by the fabric"),
        })?;
        if self.max_write_bytes < railover_segq::record::record_size(self.max_record) {
            return Err(ConfigError::MaxWrite(self.max_write_bytes));
        }
        let heartbeat_ns = self.heartbeat_interval_ns * self.heartbeat_misses as u64;
        if self.session_timeout_ns <= heartbeat_ns {
            return Err(ConfigError::SessionTimeout {
                session_ns: self.session_timeout_ns,
                heartbeat_ns,
            });
        }
        if let Some(g) = self.gray {
            if g.window_ns == 0 || g.hold_down_ns < g.window_ns {
                return Err(ConfigError::GraySwitch);
            }
        }
        Ok(Config {
            geometry,
            rails: self.rails,
            heartbeat_interval_ns: self.heartbeat_interval_ns,
            heartbeat_misses: self.heartbeat_misses,
            link: self.link,
            max_write_bytes: self.max_write_bytes,
            ack_every_bytes: (geometry.capacity() / 4) as u64,
            rearm_after_ns: self.rearm_after_ns,
            first_contact_grace_ns: self.first_contact_grace_ns,
            session_timeout_ns: self.session_timeout_ns,
            close_linger_ns: self.close_linger_ns,
            rearm_exchange_timeout_ns: self.rearm_exchange_timeout_ns,
            backing: self.backing,
            mode: self.mode,
            gray: self.gray,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_values_are_typed_errors() {
        assert!(Config::builder().build().is_ok());
        assert_eq!(
            Config::builder().rails(1).build(),
            Err(ConfigError::Rails(1))
        );
        assert_eq!(
            Config::builder().rails(5).build(),
            Err(ConfigError::Rails(5))
        );
        assert_eq!(
            Config::builder().heartbeat_interval(Duration::ZERO).build(),
            Err(ConfigError::HeartbeatInterval)
        );
        assert_eq!(
            Config::builder().heartbeat_misses(1).build(),
            Err(ConfigError::HeartbeatMisses)
        );
        assert!(matches!(
            Config::builder().geometry(1000, 4, 10).build(),
            Err(ConfigError::Geometry(_))
        ));
        let forever = LinkParams {
            retry_cnt: 7,
            ..LinkParams::default()
        };
        assert!(matches!(
            Config::builder().link_params(forever).build(),
            Err(ConfigError::Link(_))
        ));
        assert!(matches!(
            Config::builder().max_write_bytes(100).build(),
            Err(ConfigError::MaxWrite(100))
        ));
        assert!(matches!(
            Config::builder()
                .session_timeout(Duration::from_millis(3))
                .build(),
            Err(ConfigError::SessionTimeout {
                session_ns: 3_000_000,
                heartbeat_ns: 3_000_000
            })
        ));
        let gray = GraySwitch::new(Duration::from_micros(1), Duration::ZERO, Duration::ZERO);
        assert_eq!(
            Config::builder().gray_switch(gray).build(),
            Err(ConfigError::GraySwitch)
        );
        let gray = GraySwitch {
            window_ns: 5_000_000,
            hold_down_ns: 1_000_000,
            ..gray
        };
        assert_eq!(
            Config::builder().gray_switch(gray).build(),
            Err(ConfigError::GraySwitch),
            "a hold-down shorter than the window lets a flapping rail back at once"
        );
    }
}
