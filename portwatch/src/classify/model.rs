//! Small value types shared by the catalogue, the rules file and the classifier.

use std::fmt;

use serde::de::{self, Deserializer, IntoDeserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize, Serializer};

pub use crate::socket::Transport;

/// How bad an exposed service is. Ordered: `Low < Medium < High < Critical`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Worth knowing, rarely urgent.
    Low,
    /// Should be fixed in the normal course of work.
    Medium,
    /// Should be fixed soon: data exposure or a well-known attack vector.
    High,
    /// Fix now: routinely exploited or abused at scale.
    Critical,
}

impl Severity {
    /// One step less severe (`Low` stays `Low`); used for exposure limited to a
    /// local network.
    pub fn lowered(self) -> Severity {
        match self {
            Severity::Critical => Severity::High,
            Severity::High => Severity::Medium,
            Severity::Medium | Severity::Low => Severity::Low,
        }
    }

    /// Lowercase name, as written in the catalogue and rules file.
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Low => "low",
            Severity::Medium => "medium",
            Severity::High => "high",
            Severity::Critical => "critical",
        }
    }
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An inclusive port range; a single port has `lo == hi`.
///
/// In TOML it is written as an integer (`11211`) or a string range
/// (`"5900-5909"`). Port 0 is rejected: nothing listens on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PortSpec {
    /// First port of the range.
    pub lo: u16,
    /// Last port of the range (inclusive).
    pub hi: u16,
}

impl PortSpec {
    /// A single port.
    pub fn single(port: u16) -> Self {
        PortSpec { lo: port, hi: port }
    }

    /// Whether `port` lies in the range.
    pub fn contains(&self, port: u16) -> bool {
        self.lo <= port && port <= self.hi
    }

    fn checked(lo: i64, hi: i64) -> Result<Self, String> {
        for p in [lo, hi] {
            if !(1..=65535).contains(&p) {
                return Err(format!("bad port {p}: ports are 1-65535"));
            }
        }
        if lo > hi {
            return Err(format!("bad port range {lo}-{hi}: start is after end"));
        }
        // Both values were range-checked just above.
        Ok(PortSpec {
            lo: lo as u16,
            hi: hi as u16,
        })
    }
}

impl fmt::Display for PortSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.lo == self.hi {
            write!(f, "{}", self.lo)
        } else {
            write!(f, "{}-{}", self.lo, self.hi)
        }
    }
}

impl Serialize for PortSpec {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.lo == self.hi {
            s.serialize_u16(self.lo)
        } else {
            s.collect_str(self)
        }
    }
}

impl<'de> Deserialize<'de> for PortSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = PortSpec;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a port number 1-65535 or a range string like \"6000-6063\"")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<PortSpec, E> {
                PortSpec::checked(v, v).map_err(E::custom)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<PortSpec, E> {
                let v = i64::try_from(v).unwrap_or(i64::MAX);
                PortSpec::checked(v, v).map_err(E::custom)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<PortSpec, E> {
                let bad = || E::custom(format!("bad port range {v:?}: expected \"LOW-HIGH\""));
                let (lo, hi) = match v.split_once('-') {
                    Some((lo, hi)) => (lo.trim(), hi.trim()),
                    None => (v.trim(), v.trim()),
                };
                let lo: i64 = lo.parse().map_err(|_| bad())?;
                let hi: i64 = hi.parse().map_err(|_| bad())?;
                PortSpec::checked(lo, hi).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// Text in English with an optional Japanese translation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Localized {
    /// English text.
    pub en: String,
    /// Japanese text; English is used when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ja: Option<String>,
}

impl Localized {
    /// English-only text.
    pub fn en(text: impl Into<String>) -> Self {
        Localized {
            en: text.into(),
            ja: None,
        }
    }

    /// The text for `lang`, falling back to English.
    pub fn get(&self, lang: Lang) -> &str {
        match lang {
            Lang::Ja => self.ja.as_deref().unwrap_or(&self.en),
            Lang::En => &self.en,
        }
    }
}

/// A string that must not be empty (process names, unit names, ids...).
///
/// An empty string in a rule would never match, which is almost certainly a
/// mistake, so it is rejected at load time with its position.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct NonEmpty(pub String);

impl<'de> Deserialize<'de> for NonEmpty {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if s.trim().is_empty() {
            return Err(de::Error::custom("empty string"));
        }
        Ok(NonEmpty(s))
    }
}

/// `#[serde(deserialize_with)]` helper: accept either one value or a non-empty
/// array of values, so `scope = "private"` and `scope = ["private"]` both work.
///
/// Empty arrays are rejected: in a match rule an absent key means "any", and an
/// empty list would silently mean either "any" or "nothing".
pub(crate) fn one_or_many<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    struct V<T>(std::marker::PhantomData<T>);
    impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
        type Value = Vec<T>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a value or a non-empty array of values")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
            let mut out = Vec::new();
            while let Some(v) = seq.next_element()? {
                out.push(v);
            }
            if out.is_empty() {
                return Err(de::Error::custom(
                    "empty array: omit the key to match any value",
                ));
            }
            Ok(out)
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Vec<T>, E> {
            T::deserialize(v.into_deserializer()).map(|t| vec![t])
        }
        fn visit_string<E: de::Error>(self, v: String) -> Result<Vec<T>, E> {
            T::deserialize(v.into_deserializer()).map(|t| vec![t])
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<Vec<T>, E> {
            T::deserialize(v.into_deserializer()).map(|t| vec![t])
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<Vec<T>, E> {
            T::deserialize(v.into_deserializer()).map(|t| vec![t])
        }
        fn visit_bool<E: de::Error>(self, v: bool) -> Result<Vec<T>, E> {
            T::deserialize(v.into_deserializer()).map(|t| vec![t])
        }
    }
    d.deserialize_any(V(std::marker::PhantomData))
}

/// Language for people-facing text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Lang {
    /// English.
    #[default]
    En,
    /// Japanese.
    Ja,
}

/// Language from the environment: the first non-empty of `LC_ALL`,
/// `LC_MESSAGES`, `LANG` (POSIX precedence); Japanese if it starts with "ja".
pub fn lang_from_env() -> Lang {
    let get = |k: &str| std::env::var(k).ok();
    lang_from_locale_vars(
        get("LC_ALL").as_deref(),
        get("LC_MESSAGES").as_deref(),
        get("LANG").as_deref(),
    )
}

/// [`lang_from_env`] on explicit values (testable without touching the environment).
pub fn lang_from_locale_vars(
    lc_all: Option<&str>,
    lc_messages: Option<&str>,
    lang: Option<&str>,
) -> Lang {
    let chosen = [lc_all, lc_messages, lang]
        .into_iter()
        .flatten()
        .find(|v| !v.is_empty());
    match chosen {
        Some(v) if v.starts_with("ja") => Lang::Ja,
        _ => Lang::En,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lang_selection() {
        assert_eq!(
            lang_from_locale_vars(None, None, Some("ja_JP.UTF-8")),
            Lang::Ja
        );
        assert_eq!(
            lang_from_locale_vars(Some("C"), None, Some("ja_JP.UTF-8")),
            Lang::En
        );
        assert_eq!(
            lang_from_locale_vars(Some(""), Some("ja_JP"), Some("en_US")),
            Lang::Ja
        );
        assert_eq!(lang_from_locale_vars(None, None, None), Lang::En);
        assert_eq!(
            lang_from_locale_vars(None, None, Some("en_US.UTF-8")),
            Lang::En
        );
    }
}
