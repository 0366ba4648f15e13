//! How one table of the file is read, filled in from `[defaults]` and checked: the [`table!`]
//! macro every section declares its keys with, and the rules its rows share.
//!
//! A table is read into a `Raw…` struct whose every key is optional, so that `[defaults]` (and,
//! for three keys, `[gateway]`) can fill it in ([`Merge`]); `resolve` then applies the defaults
//! and checks each value, naming the key in the error.

use std::collections::BTreeMap;
use std::fmt;
use std::marker::PhantomData;
use std::ops::RangeInclusive;
use std::path::Path;
use std::time::Duration;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, Visitor};

use super::duration::Dur;
use super::ConfigError;

/// Declares one table of the file from one list of keys: the struct as written (every key
/// optional, read and merged key by key) and the checked struct the rest of the crate reads, with
/// `resolve` turning one into the other.
///
/// ```text
/// table! {
///     /// Doc of the struct as written.
///     struct RawThing;
///     /// Doc of the checked struct.
///     #[derive(Clone, Debug)]
///     pub struct Thing {
///         /// A field resolved by the caller and passed to `resolve` (there may be none).
///         pub name: String,
///     }
///     given(base_dir: &Path);          // optional: more arguments of `resolve`
///     keys {
///         key: RawType => {
///             /// Doc of the field: its unit, and what 0 means.
///             pub field: Type = rule(key, DEFAULT_KEY),
///         },
///         other_key: RawType,             // read and merged; the caller resolves it
///     }
/// }
/// ```
///
/// The keys are listed in the order the file documents them: "unknown field" messages list
/// them in that order, and `resolve` checks them in that order. In a rule, a key's name is its
/// value as written (`Option<RawType>`, `[defaults]` applied), and the name of a field resolved
/// by an earlier row is its checked value (so `async_concurrency`'s rule can use the resolved
/// `max_ongoing_requests`); the fields passed in and the `given` arguments are in scope too. A
/// rule returns `Result<Type, String>`; the error names the row's key.
macro_rules! table {
    (
        $(#[$raw_meta:meta])*
        struct $raw:ident;
        $(#[$meta:meta])*
        pub struct $name:ident {
            $( $(#[$extra_meta:meta])* pub $extra:ident : $extra_ty:ty ),* $(,)?
        }
        $( given( $($param:ident : $param_ty:ty),* $(,)? ); )?
        keys {
            $(
                $key:ident : $key_ty:ty $( => {
                    $(#[$field_meta:meta])*
                    $vis:vis $field:ident : $field_ty:ty = $rule:expr $(,)?
                } )?
            ),* $(,)?
        }
    ) => {
        $(#[$raw_meta])*
        #[derive(Clone, Debug, Default)]
        pub(in crate::config) struct $raw {
            $( pub(in crate::config) $key: Option<$key_ty>, )*
        }

        impl $crate::config::table::Merge for $raw {
            fn over(self, under: Self) -> Self {
                $raw { $( $key: $crate::config::table::Merge::over(self.$key, under.$key), )* }
            }
        }

        impl $crate::config::table::Table for $raw {
            fn keys() -> &'static [&'static str] {
                const KEYS: &[&str] = &[$( $crate::config::table::key_name(stringify!($key)) ),*];
                KEYS
            }

            fn read<'de, A: serde::de::MapAccess<'de>>(
                &mut self,
                key: &str,
                map: &mut A,
            ) -> Result<bool, A::Error> {
                $(
                    if key == $crate::config::table::key_name(stringify!($key)) {
                        self.$key = Some(map.next_value()?);
                        return Ok(true);
                    }
                )*
                Ok(false)
            }
        }

        impl<'de> serde::Deserialize<'de> for $raw {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                $crate::config::table::deserialize(d, stringify!($raw))
            }
        }

        $(#[$meta])*
        pub struct $name {
            $( $(#[$extra_meta])* pub $extra: $extra_ty, )*
            $( $( $(#[$field_meta])* $vis $field: $field_ty, )? )*
        }

        impl $name {
            /// Applies the defaults to the table as written and checks every value.
            #[allow(unused_variables, clippy::too_many_arguments)]
            pub(in crate::config) fn resolve(
                raw: $raw,
                at: &$crate::config::table::At<'_>,
                $( $extra: $extra_ty, )*
                $( $( $param: $param_ty, )* )?
            ) -> Result<$name, $crate::config::ConfigError> {
                $( let $key = raw.$key; )*
                $( $(
                    let $field: $field_ty =
                        at.check($crate::config::table::key_name(stringify!($key)), $rule)?;
                )? )*
                Ok($name { $( $extra, )* $( $( $field, )? )* })
            }
        }
    };
}

pub(super) use table;

/// A value as written, filled in from a default: a value written here wins; a map merges entry
/// by entry and a table key by key.
pub(in crate::config) trait Merge {
    /// `self` (the more specific table's value) over `under` (the default's).
    fn over(self, under: Self) -> Self;
}

impl<T: Merge> Merge for Option<T> {
    fn over(self, under: Self) -> Self {
        match (self, under) {
            (Some(value), Some(default)) => Some(value.over(default)),
            (value, default) => value.or(default),
        }
    }
}

macro_rules! written_value_wins {
    ($($t:ty),*) => {
        $( impl Merge for $t {
            fn over(self, _: Self) -> Self {
                self
            }
        } )*
    };
}

written_value_wins!(
    String,
    Vec<String>,
    Vec<u16>,
    bool,
    i64,
    u64,
    usize,
    f64,
    Dur
);

impl Merge for BTreeMap<String, String> {
    fn over(mut self, mut under: Self) -> Self {
        under.append(&mut self);
        under
    }
}

/// One table of the file as written.
pub(in crate::config) trait Table: Merge + Default {
    /// Its keys, in the order a message about an unknown key lists them.
    fn keys() -> &'static [&'static str];
    /// Reads the value of `key` if it is one of this table's keys; `Ok(false)` if it is not.
    fn read<'de, A: MapAccess<'de>>(&mut self, key: &str, map: &mut A) -> Result<bool, A::Error>;
}

/// Deserializes a [`Table`] named `name`. An unknown key is an error at its line and column,
/// worded as serde's derive words it (`unknown field `x`, expected one of …`).
pub(in crate::config) fn deserialize<'de, T: Table, D: Deserializer<'de>>(
    d: D,
    name: &'static str,
) -> Result<T, D::Error> {
    d.deserialize_struct(name, T::keys(), TableVisitor::<T>(name, PhantomData))
}

struct TableVisitor<T>(&'static str, PhantomData<T>);

impl<'de, T: Table> Visitor<'de> for TableVisitor<T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "struct {}", self.0)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<T, A::Error> {
        let mut table = T::default();
        // The key is checked as it is read, so that the error points at the key.
        while let Some(key) = map.next_key_seed(Key(T::keys()))? {
            let known = table.read(key, &mut map)?;
            debug_assert!(known, "`{key}` is listed but not read");
        }
        Ok(table)
    }
}

/// A key of a table whose keys are `self.0`.
struct Key(&'static [&'static str]);

impl<'de> DeserializeSeed<'de> for Key {
    type Value = &'static str;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<&'static str, D::Error> {
        d.deserialize_identifier(self)
    }
}

impl Visitor<'_> for Key {
    type Value = &'static str;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("field identifier")
    }

    fn visit_str<E: de::Error>(self, key: &str) -> Result<&'static str, E> {
        let known = self.0.iter().find(|k| **k == key);
        known.copied().ok_or_else(|| E::unknown_field(key, self.0))
    }
}

/// A key as the file spells it: the field's name without `r#` (`r#type` is the key `type`).
pub(in crate::config) const fn key_name(field: &'static str) -> &'static str {
    match field.as_bytes() {
        [b'r', b'#', ..] => match std::str::from_utf8(field.as_bytes().split_at(2).1) {
            Ok(key) => key,
            Err(_) => field,
        },
        _ => field,
    }
}

/// Where values come from, for messages: the file and the dotted prefix of a table's keys.
#[derive(Clone, Debug)]
pub(in crate::config) struct At<'a> {
    path: &'a Path,
    prefix: String,
}

impl<'a> At<'a> {
    /// Keys under `prefix` (e.g. `"gateway."`) in the file at `path`.
    pub(in crate::config) fn new(path: &'a Path, prefix: String) -> At<'a> {
        At { path, prefix }
    }

    /// The keys of the sub-table `name` (e.g. `autoscaler`).
    pub(in crate::config) fn table(&self, name: &str) -> At<'a> {
        At::new(self.path, format!("{}{name}.", self.prefix))
    }

    /// The error for `key`'s value.
    pub(in crate::config) fn invalid(&self, key: &str, reason: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.to_owned(),
            key: format!("{}{key}", self.prefix),
            reason: reason.into(),
        }
    }

    /// `checked`, or the error naming `key` and why.
    pub(in crate::config) fn check<T>(
        &self,
        key: &str,
        checked: Result<T, String>,
    ) -> Result<T, ConfigError> {
        checked.map_err(|reason| self.invalid(key, reason))
    }
}

// ---------------------------------------------------------------------------------------------
// Rules shared by the rows of every table. Each takes the value as written (`None`: not set
// anywhere) and what it defaults to.

/// Any value.
pub(in crate::config) fn given<R: Into<T>, T>(value: Option<R>, default: T) -> Result<T, String> {
    Ok(value.map_or(default, Into::into))
}

/// A duration greater than zero.
pub(in crate::config) fn positive(
    value: Option<Dur>,
    default: Duration,
) -> Result<Duration, String> {
    match value.map_or(default, Duration::from) {
        d if d.is_zero() => Err("must be greater than zero".into()),
        d => Ok(d),
    }
}

/// A count in `range`, as the field's type.
pub(in crate::config) fn count<R, T>(
    value: Option<R>,
    default: R,
    range: RangeInclusive<R>,
) -> Result<T, String>
where
    R: Copy + PartialOrd + fmt::Display,
    T: TryFrom<R>,
{
    let n = value.unwrap_or(default);
    range
        .contains(&n)
        .then(|| T::try_from(n).ok())
        .flatten()
        .ok_or_else(|| format!("{n} is outside {}..={}", range.start(), range.end()))
}
