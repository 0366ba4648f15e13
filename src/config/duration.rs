//! Durations as a config file writes them: whole seconds (`10`) or a string with a unit
//! (`"250ms"`, `"1.5s"`, `"5m"`, `"1h"`).

use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

/// The longest duration a config accepts (ten years): far beyond any sensible timeout, and far
/// from the point where adding it to a clock reading overflows (which would panic mid-request).
pub const MAX_DURATION: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

fn too_long(text: impl fmt::Display) -> String {
    format!("`{text}` is longer than the longest duration accepted (ten years)")
}

/// Parses `"250ms"`, `"10s"`, `"1.5s"`, `"5m"`, `"1h"` or a bare number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num.parse().map_err(|_| {
        format!("`{text}` is not a duration (write e.g. \"250ms\", \"10s\", \"5m\")")
    })?;
    let secs = match unit.trim() {
        "" | "s" => value,
        "ms" => value / 1000.0,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        other => {
            return Err(format!(
                "`{text}` has unknown unit `{other}` (use ms, s, m or h)"
            ))
        }
    };
    if !secs.is_finite() || secs < 0.0 {
        return Err(format!("`{text}` is not a non-negative duration"));
    }
    match Duration::try_from_secs_f64(secs) {
        Ok(d) if d <= MAX_DURATION => Ok(d),
        _ => Err(too_long(text)),
    }
}

/// A duration as written in the file: integer seconds or a string with a unit.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(in crate::config) struct Dur(pub(in crate::config) Duration);

impl From<Dur> for Duration {
    fn from(d: Dur) -> Duration {
        d.0
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Dur;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("whole seconds or a duration string such as \"250ms\" or \"5m\"")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Dur, E> {
                let secs =
                    u64::try_from(v).map_err(|_| E::custom("a duration cannot be negative"))?;
                self.visit_u64(secs)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Dur, E> {
                match Duration::from_secs(v) {
                    d if d <= MAX_DURATION => Ok(Dur(d)),
                    _ => Err(E::custom(too_long(v))),
                }
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Dur, E> {
                if !(v.is_finite() && v >= 0.0) {
                    return Err(E::custom("a duration cannot be negative"));
                }
                match Duration::try_from_secs_f64(v) {
                    Ok(d) if d <= MAX_DURATION => Ok(Dur(d)),
                    _ => Err(E::custom(too_long(v))),
                }
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Dur, E> {
                parse_duration(v).map(Dur).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}
