//! Human-written quantities: durations (`"5s"`, `"200ms"`) and byte sizes (`"16MiB"`).
//!
//! Both require a unit: a bare `16` is ambiguous on a device where a wrong guess either
//! starves a component or exhausts the box, so it is an error with a hint.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why a quantity was rejected; the message always quotes the input and the accepted units.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnitError {
    /// `{0}` is not a duration: write a number and a unit, e.g. `200ms`, `5s`, `1m`, `1h`, `7d`
    #[error(
        "`{0}` is not a duration: write a number and a unit (ms, s, m, h, d), e.g. `200ms` or `5s`"
    )]
    Duration(String),
    /// `{0}` is not a size: write a number and a unit, e.g. `512KiB`, `16MiB`
    #[error(
        "`{0}` is not a size: write a number and a unit (B, KiB, MiB, GiB, KB, MB, GB), e.g. `16MiB`"
    )]
    Size(String),
    /// `{0}` must be greater than zero
    #[error("`{0}` must be greater than zero")]
    Zero(String),
}

fn split_number(s: &str) -> Option<(u64, &str)> {
    let s = s.trim();
    let end = s.find(|c: char| !c.is_ascii_digit())?;
    if end == 0 {
        return None;
    }
    let n = s[..end].parse().ok()?;
    Some((n, s[end..].trim()))
}

/// A positive duration written with a unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HumanDuration(pub Duration);

impl FromStr for HumanDuration {
    type Err = UnitError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || UnitError::Duration(s.to_string());
        let (n, unit) = split_number(s).ok_or_else(err)?;
        let d = match unit {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" | "min" => Duration::from_secs(n.checked_mul(60).ok_or_else(err)?),
            "h" => Duration::from_secs(n.checked_mul(3600).ok_or_else(err)?),
            "d" => Duration::from_secs(n.checked_mul(86_400).ok_or_else(err)?),
            _ => return Err(err()),
        };
        if d.is_zero() {
            return Err(UnitError::Zero(s.to_string()));
        }
        Ok(Self(d))
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        if ms.is_multiple_of(86_400_000) {
            write!(f, "{}d", ms / 86_400_000)
        } else if ms.is_multiple_of(3_600_000) {
            write!(f, "{}h", ms / 3_600_000)
        } else if ms.is_multiple_of(60_000) {
            write!(f, "{}m", ms / 60_000)
        } else if ms.is_multiple_of(1000) {
            write!(f, "{}s", ms / 1000)
        } else {
            write!(f, "{ms}ms")
        }
    }
}

/// A positive byte size written with a unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ByteSize(pub u64);

impl ByteSize {
    /// `n` mebibytes.
    pub const fn mib(n: u64) -> Self {
        Self(n << 20)
    }

    /// `n` kibibytes.
    pub const fn kib(n: u64) -> Self {
        Self(n << 10)
    }

    /// The size in bytes.
    pub const fn bytes(self) -> u64 {
        self.0
    }
}

impl FromStr for ByteSize {
    type Err = UnitError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || UnitError::Size(s.to_string());
        let (n, unit) = split_number(s).ok_or_else(err)?;
        let mult: u64 = match unit {
            "B" => 1,
            "KiB" => 1 << 10,
            "MiB" => 1 << 20,
            "GiB" => 1 << 30,
            "KB" | "kB" => 1000,
            "MB" => 1_000_000,
            "GB" => 1_000_000_000,
            _ => return Err(err()),
        };
        let v = n.checked_mul(mult).ok_or_else(err)?;
        if v == 0 {
            return Err(UnitError::Zero(s.to_string()));
        }
        Ok(Self(v))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        if b.is_multiple_of(1 << 30) {
            write!(f, "{}GiB", b >> 30)
        } else if b.is_multiple_of(1 << 20) {
            write!(f, "{}MiB", b >> 20)
        } else if b.is_multiple_of(1 << 10) {
            write!(f, "{}KiB", b >> 10)
        } else {
            write!(f, "{b}B")
        }
    }
}

macro_rules! text_serde {
    ($t:ty) => {
        impl Serialize for $t {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }

        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

text_serde!(HumanDuration);
text_serde!(ByteSize);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(
            "200ms".parse(),
            Ok(HumanDuration(Duration::from_millis(200)))
        );
        assert_eq!("5s".parse(), Ok(HumanDuration(Duration::from_secs(5))));
        assert_eq!("2m".parse(), Ok(HumanDuration(Duration::from_secs(120))));
        assert_eq!("1h".parse(), Ok(HumanDuration(Duration::from_secs(3600))));
        for bad in ["5", "s", "5 sec", "-1s", "1.5s", ""] {
            assert!(
                matches!(bad.parse::<HumanDuration>(), Err(UnitError::Duration(_))),
                "{bad}"
            );
        }
        assert!(matches!(
            "0s".parse::<HumanDuration>(),
            Err(UnitError::Zero(_))
        ));
        for s in ["200ms", "5s", "2m", "1h", "7d", "1500ms"] {
            assert_eq!(
                s.parse::<HumanDuration>().map(|d| d.to_string()).as_deref(),
                Ok(s)
            );
        }
    }

    #[test]
    fn sizes() {
        assert_eq!("16MiB".parse(), Ok(ByteSize(16 << 20)));
        assert_eq!("512KiB".parse(), Ok(ByteSize(512 << 10)));
        assert_eq!("1GB".parse(), Ok(ByteSize(1_000_000_000)));
        for bad in ["16", "16mb", "MiB", "16 MiBs"] {
            assert!(
                matches!(bad.parse::<ByteSize>(), Err(UnitError::Size(_))),
                "{bad}"
            );
        }
        assert_eq!(ByteSize::mib(16).to_string(), "16MiB");
        assert_eq!(ByteSize(1500).to_string(), "1500B");
    }
}
