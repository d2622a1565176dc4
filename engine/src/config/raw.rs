//! The configuration file as written: serde types that mirror the YAML one to one.
//!
//! Nothing here is trusted. Every field a later check may reject is `Spanned`, so the validator in
//! `validate.rs` can point at the line and column of the offending value. Unknown keys are refused here,
//! by serde, with the position of the key.

use std::fmt;

use serde::Deserialize;
use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde_saphyr::Spanned;

use super::duration::ConfigDuration;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub global: RawGlobal,
    #[serde(default)]
    pub defaults: RawDefaults,
    #[serde(default)]
    pub frontends: Option<Spanned<Vec<RawFrontend>>>,
    #[serde(default)]
    pub backends: Option<Spanned<Vec<RawBackend>>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawGlobal {
    pub workers: Option<Spanned<Workers>>,
    pub pin_cpus: Option<bool>,
    pub maxconn: Option<Spanned<Count>>,
    #[serde(default)]
    pub tune: RawTune,
    pub stats: Option<Spanned<RawStats>>,
    /// `stdout`, `stderr` or a file path; absent: no connection log.
    pub connection_log: Option<Spanned<String>>,
    /// Drop root to this user (and group) once everything is bound.
    pub user: Option<Spanned<String>>,
    pub group: Option<Spanned<String>>,
    /// On SIGTERM, report not ready (`show ready`) this long, still accepting, before draining.
    pub withdraw_delay: Option<Spanned<ConfigDuration>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStats {
    pub socket: Option<Spanned<String>>,
    /// Octal permission bits for the socket, e.g. "0600".
    pub mode: Option<Spanned<String>>,
    /// Unix socket that also takes commands that change state (the runtime API).
    pub admin_socket: Option<Spanned<String>>,
    /// Octal permission bits for the admin socket (default "0600").
    pub admin_mode: Option<Spanned<String>>,
    pub prometheus: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTune {
    pub pipe_size: Option<Spanned<Size>>,
    pub max_pipes: Option<Spanned<Count>>,
    pub recv_buffers: Option<Spanned<Count>>,
    pub recv_buffer_size: Option<Spanned<Size>>,
    pub ring_entries: Option<Spanned<Count>>,
    pub iowq_workers: Option<Spanned<Count>>,
    pub peer_lookups: Option<Spanned<Count>>,
    pub io_features: Option<Spanned<String>>,
    pub splice: Option<super::SpliceMode>,
    pub rcvbuf_client: Option<Spanned<Size>>,
    pub sndbuf_client: Option<Spanned<Size>>,
    pub rcvbuf_server: Option<Spanned<Size>>,
    pub sndbuf_server: Option<Spanned<Size>>,
    pub notsent_lowat: Option<Spanned<Size>>,
    pub send_zerocopy: Option<Spanned<SizeOrOff>>,
    pub batch_wait: Option<Spanned<BatchWaitRaw>>,
    pub idle_poll_after: Option<Spanned<DurationOrOff>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDefaults {
    #[serde(default)]
    pub timeout: RawTimeouts,
    pub retries: Option<Spanned<Count>>,
    pub backlog: Option<Spanned<Count>>,
    pub maxconn: Option<Spanned<Count>>,
    pub balance: Option<Balance>,
}

/// TCP keepalive probes on one side's sockets.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawKeepalive {
    pub idle: Option<Spanned<ConfigDuration>>,
    pub interval: Option<Spanned<ConfigDuration>>,
    pub count: Option<Spanned<Count>>,
}

/// Timeouts; which keys are allowed depends on the section and is checked by the validator.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTimeouts {
    pub connect: Option<Spanned<ConfigDuration>>,
    pub client: Option<Spanned<ConfigDuration>>,
    pub server: Option<Spanned<ConfigDuration>>,
    pub queue: Option<Spanned<ConfigDuration>>,
    pub drain: Option<Spanned<ConfigDuration>>,
    pub proxy_header: Option<Spanned<ConfigDuration>>,
    /// Maximum age of a client connection (none by default).
    pub lifetime: Option<Spanned<ConfigDuration>>,
    /// Up to this much is taken off each connection's lifetime, at random.
    pub lifetime_jitter: Option<Spanned<ConfigDuration>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFrontend {
    pub name: Spanned<String>,
    pub bind: Spanned<StringList>,
    pub backend: Spanned<String>,
    pub maxconn: Option<Spanned<Count>>,
    pub backlog: Option<Spanned<Count>>,
    pub timeout: Option<Spanned<RawTimeouts>>,
    /// Expect a PROXY protocol header (v1 or v2) from clients.
    pub accept_proxy: Option<bool>,
    /// The most connections reading their PROXY header at once.
    pub proxy_header_maxconn: Option<Spanned<Count>>,
    /// Client addresses or CIDR blocks served (all when absent).
    pub allow: Option<Spanned<StringList>>,
    /// Client addresses or CIDR blocks refused at accept.
    pub deny: Option<Spanned<StringList>>,
    /// Keepalive probes on client sockets.
    pub tcp_keepalive: Option<Spanned<RawKeepalive>>,
    /// New connections accepted per second, at most (the others wait in the backlog).
    pub rate_limit: Option<Spanned<Rate>>,
    /// Connections open at once from one source (address or prefix), at most.
    pub maxconn_per_source: Option<Spanned<Count>>,
    /// New connections per second from one source, at most.
    pub rate_per_source: Option<Spanned<Rate>>,
    /// IPv4 prefix length a source is keyed by (default 32: the address).
    pub source_prefix: Option<Spanned<Count>>,
    /// IPv6 prefix length a source is keyed by (default 128: the address).
    pub source_prefix_v6: Option<Spanned<Count>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCheck {
    pub interval: Option<Spanned<ConfigDuration>>,
    pub timeout: Option<Spanned<ConfigDuration>>,
    pub rise: Option<Spanned<Count>>,
    pub fall: Option<Spanned<Count>>,
    pub send: Option<Spanned<String>>,
    pub expect: Option<Spanned<String>>,
}

/// What happens to a server's connections when its health check marks it down.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnDown {
    /// Established connections continue; only new ones avoid the server.
    Keep,
    /// Close (reset) every connection to the server.
    ShutdownSessions,
}

/// What a reload does with the established connections of a server it removes (one the new
/// configuration no longer has, by name and address).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnRemoved {
    /// They stay on the old engine until they end or `timeout.drain` passes.
    Keep,
    /// They are closed (over the backend's `close_spread`, when it has one).
    Close,
}

/// PROXY protocol version to send to a server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProxyVersion {
    V1,
    V2,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBackend {
    pub name: Spanned<String>,
    pub balance: Option<Balance>,
    pub maxconn: Option<Spanned<Count>>,
    pub retries: Option<Spanned<Count>>,
    pub timeout: Option<Spanned<RawTimeouts>>,
    pub check: Option<Spanned<RawCheck>>,
    pub on_down: Option<OnDown>,
    /// Connections to a server a reload removes: kept until the drain ends, or closed.
    pub on_removed: Option<OnRemoved>,
    /// Keepalive probes on server sockets.
    pub tcp_keepalive: Option<Spanned<RawKeepalive>>,
    /// Connections shut down together (`on_down: shutdown_sessions`, `shutdown sessions server`)
    /// are closed at an even pace over this window.
    pub close_spread: Option<Spanned<ConfigDuration>>,
    /// What `balance: hash` hashes (default: source).
    pub hash_key: Option<Spanned<HashKey>>,
    /// How this backend's connections move bulk data (default: `tune.splice`).
    pub splice: Option<super::SpliceMode>,
    pub servers: Spanned<Vec<RawServer>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    pub name: Spanned<String>,
    pub address: Spanned<String>,
    pub weight: Option<Spanned<Count>>,
    pub maxconn: Option<Spanned<Count>>,
    pub source: Option<Spanned<StringList>>,
    /// Health-check this server (default: yes when its backend has a `check` section).
    pub check: Option<bool>,
    pub send_proxy: Option<ProxyVersion>,
    /// Only when no normal server of the backend is UP.
    pub backup: Option<bool>,
    /// A server that comes back ramps its weight from ~0 to full over this time.
    pub slowstart: Option<Spanned<ConfigDuration>>,
}

/// Deserializes one of a fixed set of words, with an error that lists them (serde's derived enum
/// errors speak of "unit variants" and "externally tagged enums").
fn keyword<'de, D: Deserializer<'de>, T: Copy>(
    d: D,
    what: &'static str,
    words: &'static [(&'static str, T)],
) -> Result<T, D::Error> {
    struct V<T: 'static> {
        what: &'static str,
        words: &'static [(&'static str, T)],
    }
    impl<T: Copy> Visitor<'_> for V<T> {
        type Value = T;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            let names: Vec<&str> = self.words.iter().map(|(n, _)| *n).collect();
            write!(f, "{} to be one of {}", self.what, names.join(", "))
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
            match self.words.iter().find(|(n, _)| *n == v) {
                Some((_, t)) => Ok(*t),
                None => Err(E::custom(format!(
                    "{} \"{v}\" is not one of {}",
                    self.what,
                    self.words.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
                ))),
            }
        }
    }
    d.deserialize_any(V { what, words })
}

macro_rules! keyword_enum {
    ($ty:ty, $what:literal, [$($word:literal => $val:expr),+ $(,)?]) => {
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                keyword(d, $what, &[$(($word, $val)),+])
            }
        }
    };
}

keyword_enum!(Balance, "balance", [
    "roundrobin" => Balance::Roundrobin,
    "leastconn" => Balance::Leastconn,
    "source" => Balance::Source,
    "random" => Balance::Random,
    "hash" => Balance::Hash,
]);
keyword_enum!(HashKey, "hash_key", ["source" => HashKey::Source]);
keyword_enum!(OnDown, "on_down", ["keep" => OnDown::Keep, "shutdown_sessions" => OnDown::ShutdownSessions]);
keyword_enum!(OnRemoved, "on_removed", ["keep" => OnRemoved::Keep, "close" => OnRemoved::Close]);
keyword_enum!(ProxyVersion, "send_proxy", ["v1" => ProxyVersion::V1, "v2" => ProxyVersion::V2]);
keyword_enum!(
    super::SpliceMode,
    "splice",
    ["auto" => super::SpliceMode::Auto, "always" => super::SpliceMode::Always, "never" => super::SpliceMode::Never]
);

/// How a backend picks a server for a new connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Balance {
    /// Weighted round robin, rotating independently on each worker.
    Roundrobin,
    /// The server with the fewest active connections (per weight) on this worker.
    Leastconn,
    /// A hash of the client IP: the same client reaches the same server while it is up.
    Source,
    /// Two random servers (by weight), the less loaded one wins ("power of two choices").
    Random,
    /// Consistent hashing (Maglev) of `hash_key`: when one of N servers goes away, only its own
    /// ~1/N of the keys move.
    Hash,
}

/// What `balance: hash` hashes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HashKey {
    /// The client's IP address.
    Source,
}

impl Balance {
    pub fn as_str(self) -> &'static str {
        match self {
            Balance::Roundrobin => "roundrobin",
            Balance::Leastconn => "leastconn",
            Balance::Source => "source",
            Balance::Random => "random",
            Balance::Hash => "hash",
        }
    }
}

/// `workers: auto` or a number of worker threads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Workers {
    Auto,
    Count(u64),
}

impl<'de> Deserialize<'de> for Workers {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Workers;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("`auto` or a number of workers")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Workers, E> {
                Ok(Workers::Count(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Workers, E> {
                Err(E::custom(format!("workers must be `auto` or a positive number, not {v}")))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Workers, E> {
                match v {
                    "auto" => Ok(Workers::Auto),
                    _ => Err(E::custom(format!("workers must be `auto` or a positive number, not \"{v}\""))),
                }
            }
        }
        d.deserialize_any(V)
    }
}

/// A non-negative whole number (connections, retries, entries).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Count(pub u64);

impl<'de> Deserialize<'de> for Count {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Count;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a whole number")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Count, E> {
                Ok(Count(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Count, E> {
                Err(E::custom(format!("expected a whole number, not the negative {v}")))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Count, E> {
                Err(E::custom(format!("expected a whole number, not {v}")))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Count, E> {
                Err(E::custom(format!("expected a whole number, not \"{v}\"")))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Count, E> {
                Err(E::custom(format!("expected a whole number, not {v}")))
            }
        }
        d.deserialize_any(V)
    }
}

/// A rate per second: `200/s`, or a bare whole number (per second).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate(pub u64);

impl<'de> Deserialize<'de> for Rate {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Rate;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a rate such as 200/s")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Rate, E> {
                Ok(Rate(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Rate, E> {
                Err(E::custom(format!("expected a rate such as 200/s, not the negative {v}")))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Rate, E> {
                Err(E::custom(format!("expected a rate such as 200/s, not {v}")))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Rate, E> {
                let t = v.trim();
                t.strip_suffix("/s")
                    .unwrap_or(t)
                    .trim()
                    .parse()
                    .map(Rate)
                    .map_err(|_| E::custom(format!("expected a rate such as 200/s, not \"{v}\"")))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Rate, E> {
                Err(E::custom(format!("expected a rate such as 200/s, not {v}")))
            }
        }
        d.deserialize_any(V)
    }
}

/// A size in bytes: a number, or a string with a `k`, `m` or `g` suffix (powers of 1024).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Size(pub u64);

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Size;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a size in bytes such as 262144, 256k or 1m")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Size, E> {
                Ok(Size(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Size, E> {
                Size::parse(v).map(Size).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

impl Size {
    /// `262144`, `256k`, `1m`, `1g` (powers of 1024) → bytes.
    fn parse(v: &str) -> std::result::Result<u64, String> {
        let t = v.trim().to_ascii_lowercase();
        let (digits, mult) = match t.as_bytes().last() {
            Some(b'k') => (&t[..t.len() - 1], 1u64 << 10),
            Some(b'm') => (&t[..t.len() - 1], 1 << 20),
            Some(b'g') => (&t[..t.len() - 1], 1 << 30),
            _ => (&t[..], 1),
        };
        digits
            .parse::<u64>()
            .ok()
            .and_then(|n| n.checked_mul(mult))
            .ok_or_else(|| format!("\"{v}\" is not a size; write bytes such as 262144, 256k or 1m"))
    }
}

/// What [`OrOff`] holds when it is not `off`: how it reads and what the messages call it.
pub trait OffValue: Sized {
    /// What is expected besides `off` ("a size in bytes such as 65536 or 64k").
    const EXPECTED: &'static str;
    /// What a wrong string is not ("a size").
    const KIND: &'static str;
    /// What to write instead ("bytes such as 65536 or 64k").
    const HINT: &'static str;
    /// A bare number.
    fn from_u64(v: u64) -> Self;
    /// A string, not `off`.
    fn parse(v: &str) -> Option<Self>;
}

impl OffValue for u64 {
    const EXPECTED: &'static str = "a size in bytes such as 65536 or 64k";
    const KIND: &'static str = "a size";
    const HINT: &'static str = "bytes such as 65536 or 64k";
    fn from_u64(v: u64) -> u64 {
        v
    }
    fn parse(v: &str) -> Option<u64> {
        Size::parse(v).ok()
    }
}

/// `auto` (with a window of its own: `auto 1ms`), or a duration as [`ConfigDuration`] takes it
/// (`batch_wait`, besides `off`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AutoOrDuration {
    Auto(Option<std::time::Duration>),
    Duration(std::time::Duration),
}

impl OffValue for AutoOrDuration {
    const EXPECTED: &'static str = "auto, auto with its window (auto 1ms), or a duration such as 500us or 2ms";
    const KIND: &'static str = "auto nor a duration";
    const HINT: &'static str = "auto, auto with its window (auto 1ms), or a duration such as 500us or 2ms";
    /// Milliseconds, as [`ConfigDuration`] takes a bare number.
    fn from_u64(v: u64) -> AutoOrDuration {
        AutoOrDuration::Duration(std::time::Duration::from_millis(v))
    }
    fn parse(v: &str) -> Option<AutoOrDuration> {
        let v = v.trim();
        if v.eq_ignore_ascii_case("auto") {
            return Some(AutoOrDuration::Auto(None));
        }
        if let Some((word, window)) = v.split_once(char::is_whitespace)
            && word.eq_ignore_ascii_case("auto")
        {
            return super::duration::parse(window.trim()).ok().map(|d| AutoOrDuration::Auto(Some(d)));
        }
        super::duration::parse(v).ok().map(AutoOrDuration::Duration)
    }
}

impl OffValue for std::time::Duration {
    const EXPECTED: &'static str = "a duration such as 10s or 1m";
    const KIND: &'static str = "a duration";
    const HINT: &'static str = "a duration such as 10s or 1m";
    /// Milliseconds, as [`ConfigDuration`] takes a bare number.
    fn from_u64(v: u64) -> std::time::Duration {
        std::time::Duration::from_millis(v)
    }
    fn parse(v: &str) -> Option<std::time::Duration> {
        super::duration::parse(v).ok()
    }
}

/// `off` (or `false`), or a value as its [`OffValue`] reads it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OrOff<T>(pub Option<T>);

/// `off`, or a size as [`Size`] takes it (`send_zerocopy`).
pub type SizeOrOff = OrOff<u64>;
/// `off`, `auto` (`auto 1ms`), or a duration as [`ConfigDuration`] takes it (`batch_wait`).
pub type BatchWaitRaw = OrOff<AutoOrDuration>;
/// `off`, or a duration as [`ConfigDuration`] takes it (`idle_poll_after`).
pub type DurationOrOff = OrOff<std::time::Duration>;

impl<'de, T: OffValue> Deserialize<'de> for OrOff<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(std::marker::PhantomData<T>);
        impl<T: OffValue> Visitor<'_> for V<T> {
            type Value = OrOff<T>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                write!(f, "off, or {}", T::EXPECTED)
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<OrOff<T>, E> {
                if v { Err(E::custom(format!("write off, or {}", T::EXPECTED))) } else { Ok(OrOff(None)) }
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<OrOff<T>, E> {
                Ok(OrOff(Some(T::from_u64(v))))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<OrOff<T>, E> {
                if v.trim().eq_ignore_ascii_case("off") {
                    return Ok(OrOff(None));
                }
                T::parse(v).map(|x| OrOff(Some(x))).ok_or_else(|| {
                    E::custom(format!("\"{v}\" is neither off nor {}; write off, or {}", T::KIND, T::HINT))
                })
            }
        }
        d.deserialize_any(V(std::marker::PhantomData))
    }
}

/// One string or a list of strings (`bind`, `source`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StringList(pub Vec<String>);

impl<'de> Deserialize<'de> for StringList {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = StringList;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an address or a list of addresses")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<StringList, E> {
                Ok(StringList(vec![v.to_owned()]))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<StringList, A::Error> {
                let mut out = Vec::new();
                while let Some(item) = seq.next_element::<String>()? {
                    out.push(item);
                }
                Ok(StringList(out))
            }
        }
        d.deserialize_any(V)
    }
}
