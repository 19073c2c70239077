//! Configuration from a JSON file or the environment, onto a [`ConfigBuilder`]: the same
//! validation ([`ConfigBuilder::build`]) and typed errors. Every setting is optional (the
//! builder's value stays); times are strings with a unit (`"500ns"`, `"250us"`, `"1ms"`, `"5s"`).
//!
//! ```json
//! { "rails": 2, "heartbeat_interval": "1ms", "heartbeat_misses": 3,
//!   "rail_mode": "hot-hot", "gray_margin": "300us", "gray_window": "2ms",
//!   "gray_hold_down": "50ms" }
//! ```
//!
//! The environment uses the same names, upper-cased after `RAILOVER_`
//! (`RAILOVER_HEARTBEAT_INTERVAL=1ms`, `RAILOVER_RAIL_MODE=hot-hot`).

use serde::Deserialize;
use std::time::Duration;

use crate::config::{ConfigBuilder, GraySwitch, RailMode};

/// Settings as read (all optional). See the module doc for the names and formats.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub rails: Option<usize>,
    pub segment_size: Option<usize>,
    pub segment_count: Option<usize>,
    pub max_record: Option<usize>,
    pub heartbeat_interval: Option<String>,
    pub heartbeat_misses: Option<u32>,
    pub max_write_bytes: Option<usize>,
    pub rearm_after: Option<String>,
    pub first_contact_grace: Option<String>,
    pub session_timeout: Option<String>,
    pub close_linger: Option<String>,
    pub rearm_exchange_timeout: Option<String>,
    /// `"active-standby"` or `"hot-hot"`.
    pub rail_mode: Option<String>,
    /// The gray switch: margin, window and hold-down all, or none.
    pub gray_margin: Option<String>,
    pub gray_window: Option<String>,
    pub gray_hold_down: Option<String>,
    pub gray_retransmits: Option<u32>,
}

/// A setting that could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SettingsError {
    #[error("configuration file: {0}")]
    Json(#[from] serde_json::Error),
    #[error("setting {name}: {value:?} is not {expected}")]
    Value {
        name: &'static str,
        value: String,
        expected: &'static str,
    },
    #[error("the gray switch needs gray_margin, gray_window and gray_hold_down together")]
    GrayIncomplete,
}

/// The names the environment is read under (after `RAILOVER_`, upper-cased).
const NAMES: [&str; 17] = [
    "rails",
    "segment_size",
    "segment_count",
    "max_record",
    "heartbeat_interval",
    "heartbeat_misses",
    "max_write_bytes",
    "rearm_after",
    "first_contact_grace",
    "session_timeout",
    "close_linger",
    "rearm_exchange_timeout",
    "rail_mode",
    "gray_margin",
    "gray_window",
    "gray_hold_down",
    "gray_retransmits",
];

impl Settings {
    /// Parses a JSON document (unknown names are refused, so a typo is not silently ignored).
    pub fn from_json(text: &str) -> Result<Settings, SettingsError> {
        Ok(serde_json::from_str(text)?)
    }

    /// Reads the `RAILOVER_*` variables that are set.
    pub fn from_env() -> Result<Settings, SettingsError> {
        Settings::from_lookup(|name| {
            std::env::var(format!("RAILOVER_{}", name.to_uppercase())).ok()
        })
    }

    /// Like [`Settings::from_env`], from any lookup of the names (lower-case, as in JSON).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Settings, SettingsError> {
        let mut map = serde_json::Map::new();
        for name in NAMES {
            let Some(v) = get(name) else { continue };
            // Counts are numbers in JSON; the rest stay strings.
            let value = match v.parse::<u64>() {
                Ok(n) if !v.is_empty() && counts(name) => serde_json::Value::from(n),
                _ if counts(name) => {
                    return Err(SettingsError::Value {
                        name: static_name(name),
                        value: v,
                        expected: "a whole number",
                    })
                }
                _ => serde_json::Value::String(v),
            };
            map.insert(name.to_string(), value);
        }
        Ok(serde_json::from_value(serde_json::Value::Object(map))?)
    }

    /// Applies what is set onto `b` (which then validates as usual in `build`).
    pub fn apply(&self, mut b: ConfigBuilder) -> Result<ConfigBuilder, SettingsError> {
        let ns = |name: &'static str, v: &Option<String>| v.as_deref().map(|s| nanos(name, s));
        if let Some(n) = self.rails {
            b = b.rails(n);
        }
        if self.segment_size.is_some() || self.segment_count.is_some() || self.max_record.is_some()
        {
            let (size, count, max) = b.geometry_values();
            b = b.geometry(
                self.segment_size.unwrap_or(size),
                self.segment_count.unwrap_or(count),
                self.max_record.unwrap_or(max),
            );
        }
        if let Some(t) = ns("heartbeat_interval", &self.heartbeat_interval) {
            b = b.heartbeat_interval(Duration::from_nanos(t?));
        }
        if let Some(k) = self.heartbeat_misses {
            b = b.heartbeat_misses(k);
        }
        if let Some(n) = self.max_write_bytes {
            b = b.max_write_bytes(n);
        }
        if let Some(t) = ns("rearm_after", &self.rearm_after) {
            b = b.rearm_after(Duration::from_nanos(t?));
        }
        if let Some(t) = ns("first_contact_grace", &self.first_contact_grace) {
            b = b.first_contact_grace(Duration::from_nanos(t?));
        }
        if let Some(t) = ns("session_timeout", &self.session_timeout) {
            b = b.session_timeout(Duration::from_nanos(t?));
        }
        if let Some(t) = ns("close_linger", &self.close_linger) {
            b = b.close_linger(Duration::from_nanos(t?));
        }
        if let Some(t) = ns("rearm_exchange_timeout", &self.rearm_exchange_timeout) {
            b = b.rearm_exchange_timeout(Duration::from_nanos(t?));
        }
        if let Some(m) = &self.rail_mode {
            b = b.rail_mode(match m.as_str() {
                "active-standby" => RailMode::ActiveStandby,
                "hot-hot" => RailMode::HotHot,
                _ => {
                    return Err(SettingsError::Value {
                        name: "rail_mode",
                        value: m.clone(),
                        expected: "\"active-standby\" or \"hot-hot\"",
                    })
                }
            });
        }
        let gray = (
            ns("gray_margin", &self.gray_margin),
            ns("gray_window", &self.gray_window),
            ns("gray_hold_down", &self.gray_hold_down),
        );
        match gray {
            (None, None, None) if self.gray_retransmits.is_none() => {}
            (Some(margin), Some(window), Some(hold)) => {
                let g = GraySwitch::new(
                    Duration::from_nanos(margin?),
                    Duration::from_nanos(window?),
                    Duration::from_nanos(hold?),
                )
                .retransmits_per_window(self.gray_retransmits.unwrap_or(0));
                b = b.gray_switch(g);
            }
            _ => return Err(SettingsError::GrayIncomplete),
        }
        Ok(b)
    }
}

fn counts(name: &str) -> bool {
    matches!(
        name,
        "rails"
            | "segment_size"
            | "segment_count"
            | "max_record"
            | "heartbeat_misses"
            | "max_write_bytes"
            | "gray_retransmits"
    )
}

fn static_name(name: &str) -> &'static str {
    NAMES.iter().find(|n| **n == name).copied().unwrap_or("?")
}

/// `"250us"` -> 250,000: a whole number with a unit (ns, us, ms, s).
fn nanos(name: &'static str, text: &str) -> Result<u64, SettingsError> {
    let bad = || SettingsError::Value {
        name,
        value: text.to_string(),
        expected: "a time such as \"500ns\", \"250us\", \"1ms\" or \"5s\"",
    };
    let t = text.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let (n, unit) = t.split_at(digits);
    let n: u64 = n.parse().map_err(|_| bad())?;
    let scale = match unit.trim() {
        "ns" => 1,
        "us" => 1_000,
        "ms" => 1_000_000,
        "s" => 1_000_000_000,
        _ => return Err(bad()),
    };
    n.checked_mul(scale).ok_or_else(bad)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, ConfigError};

    #[test]
    fn a_file_builds_the_same_config_as_the_builder() {
        let text = r#"{ "rails": 3, "heartbeat_interval": "500us", "heartbeat_misses": 4,
            "segment_count": 32, "session_timeout": "2s", "rail_mode": "hot-hot",
            "gray_margin": "300us", "gray_window": "2ms", "gray_hold_down": "50ms",
            "gray_retransmits": 3 }"#;
        let from_file = Settings::from_json(text)
            .unwrap()
            .apply(Config::builder())
            .unwrap()
            .build()
            .unwrap();
        let by_hand = Config::builder()
            .rails(3)
            .heartbeat_interval(Duration::from_micros(500))
            .heartbeat_misses(4)
            .geometry(64 * 1024, 32, 8 * 1024)
            .session_timeout(Duration::from_secs(2))
            .rail_mode(RailMode::HotHot)
            .gray_switch(
                GraySwitch::new(
                    Duration::from_micros(300),
                    Duration::from_millis(2),
                    Duration::from_millis(50),
                )
                .retransmits_per_window(3),
            )
            .build()
            .unwrap();
        assert_eq!(from_file, by_hand);
    }

    #[test]
    fn the_environment_uses_the_same_names() {
        let env = |name: &str| match name {
            "heartbeat_interval" => Some("2ms".to_string()),
            "rails" => Some("2".to_string()),
            "rail_mode" => Some("active-standby".to_string()),
            _ => None,
        };
        let s = Settings::from_lookup(env).unwrap();
        let cfg = s.apply(Config::builder()).unwrap().build().unwrap();
        assert_eq!(cfg.heartbeat_interval_ns(), 2_000_000);
        assert_eq!(cfg.rail_mode(), RailMode::ActiveStandby);
        let bad = Settings::from_lookup(|n| (n == "rails").then(|| "two".to_string()));
        assert!(matches!(
            bad,
            Err(SettingsError::Value { name: "rails", .. })
        ));
    }

    #[test]
    fn bad_settings_are_typed_errors() {
        // A typo is refused, not ignored.
        assert!(matches!(
            Settings::from_json(r#"{ "heartbeat_intervall": "1ms" }"#),
            Err(SettingsError::Json(_))
        ));
        let apply = |text: &str| Settings::from_json(text).unwrap().apply(Config::builder());
        assert!(matches!(
            apply(r#"{ "heartbeat_interval": "1 fortnight" }"#),
            Err(SettingsError::Value {
                name: "heartbeat_interval",
                ..
            })
        ));
        assert!(matches!(
            apply(r#"{ "rail_mode": "hot-cold" }"#),
            Err(SettingsError::Value {
                name: "rail_mode",
                ..
            })
        ));
        assert!(matches!(
            apply(r#"{ "gray_margin": "1ms" }"#),
            Err(SettingsError::GrayIncomplete)
        ));
        // Values that parse but make no configuration fail in build, as from the builder.
        assert_eq!(
            apply(r#"{ "rails": 9 }"#).unwrap().build(),
            Err(ConfigError::Rails(9))
        );
        assert!(matches!(
            nanos("x", "18446744073709551615s"),
            Err(SettingsError::Value { .. })
        ));
    }
}
