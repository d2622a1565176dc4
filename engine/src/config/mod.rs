//! Configuration: YAML text in, validated types out.
//!
//! `raw.rs` mirrors the file; this module checks it once and produces [`Config`], whose values are
//! already parsed (addresses, durations, source sets) and cross-checked (a frontend's backend exists,
//! names are unique). Nothing downstream re-checks strings. Every rejection is a [`ConfigError`] that
//! prints as `FILE:LINE:COLUMN: message`; loading never binds, connects or spawns anything.

pub mod address;
pub mod duration;
mod raw;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use serde_saphyr::{Location, Spanned};

pub use raw::{Balance, OnDown, ProxyVersion};
use raw::{Count, RawBackend, RawConfig, RawFrontend, RawServer, RawTimeouts, Workers};

/// Defaults that apply when neither the section nor `defaults` says otherwise.
pub mod default {
    use std::time::Duration;
    pub const CONNECT: Duration = Duration::from_secs(5);
    pub const CLIENT: Duration = Duration::from_secs(50);
    pub const SERVER: Duration = Duration::from_secs(50);
    pub const DRAIN: Duration = Duration::from_secs(30);
    pub const RETRIES: u32 = 3;
    pub const BACKLOG_MAX: u32 = 65_535;
    pub const WEIGHT: u32 = 1;
    pub const PIPE_SIZE: u32 = 256 * 1024;
    pub const MAX_PIPES: u32 = 4096;
    pub const RING_ENTRIES: u32 = 4096;
    pub const IOWQ_WORKERS: u32 = 4;
    pub const PROXY_HEADER: Duration = Duration::from_secs(5);
    pub const CHECK_INTERVAL: Duration = Duration::from_secs(2);
    pub const CHECK_TIMEOUT: Duration = Duration::from_secs(1);
    pub const CHECK_RISE: u32 = 2;
    pub const CHECK_FALL: u32 = 3;
}

/// Upper bound for any `maxconn`: far above what one host can hold, low enough to keep arithmetic exact.
pub const MAXCONN_LIMIT: u64 = 100_000_000;
/// Highest server weight (as in HAProxy).
pub const WEIGHT_LIMIT: u64 = 256;

/// A validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// Where the configuration came from (a path, or a label for text), used in messages.
    pub origin: String,
    pub global: Global,
    pub frontends: Vec<Frontend>,
    pub backends: Vec<Backend>,
    /// Things that are allowed but probably not intended, as `FILE:LINE:COLUMN: warning: ...`.
    pub warnings: Vec<String>,
}

#[derive(Clone, Debug)]
pub struct Global {
    /// `None` means one worker per online CPU.
    pub workers: Option<usize>,
    pub pin_cpus: bool,
    /// `None` means as many as this host's limits allow.
    pub maxconn: Option<u32>,
    pub drain_timeout: Duration,
    pub tune: Tune,
    pub stats: Stats,
    pub connection_log: Option<LogTarget>,
    /// Drop root to this user / group once everything is bound.
    pub user: Option<String>,
    pub group: Option<String>,
}

/// Where operators read the engine's counters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Unix socket speaking the stats line protocol (docs/operations.md).
    pub socket: Option<std::path::PathBuf>,
    /// Permission bits of the socket (default 0600).
    pub mode: u32,
    /// Address of the Prometheus /metrics endpoint.
    pub prometheus: Option<SocketAddr>,
}

/// Where connection log lines go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LogTarget {
    Stdout,
    Stderr,
    File(std::path::PathBuf),
}

/// How a flow moves its bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SpliceMode {
    /// Small chunks through a buffer (inline recv/send), bulk transfers by splice.
    #[default]
    Auto,
    /// Every chunk by splice.
    Always,
}

/// Engine knobs with safe defaults; see docs/configuration.md.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tune {
    /// Bytes per splice pipe (F_SETPIPE_SZ).
    pub pipe_size: u32,
    /// Most pipes one worker keeps (in flight plus pooled).
    pub max_pipes: u32,
    /// Submission queue entries per worker ring.
    pub ring_entries: u32,
    /// Most io-wq threads the kernel may run for one worker's splices.
    pub iowq_workers: u32,
    pub splice: SpliceMode,
}

impl Default for Tune {
    fn default() -> Self {
        Tune {
            pipe_size: default::PIPE_SIZE,
            max_pipes: default::MAX_PIPES,
            ring_entries: default::RING_ENTRIES,
            iowq_workers: default::IOWQ_WORKERS,
            splice: SpliceMode::Auto,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Frontend {
    pub name: String,
    pub binds: Vec<SocketAddr>,
    /// Index into [`Config::backends`].
    pub backend: usize,
    pub maxconn: Option<u32>,
    pub backlog: u32,
    pub client_timeout: Duration,
    /// Expect a PROXY protocol header from clients, within `proxy_header_timeout`.
    pub accept_proxy: bool,
    pub proxy_header_timeout: Duration,
}

#[derive(Clone, Debug)]
pub struct Backend {
    pub name: String,
    pub balance: Balance,
    pub maxconn: Option<u32>,
    pub retries: u32,
    pub connect_timeout: Duration,
    pub server_timeout: Duration,
    pub queue_timeout: Duration,
    pub check: Option<HealthCheck>,
    pub on_down: OnDown,
    pub servers: Vec<Server>,
}

/// A backend's health check (applied to each of its servers that has `check` enabled).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    pub interval: Duration,
    pub timeout: Duration,
    /// Consecutive successes that bring a down server up, and failures that take an up server down.
    pub rise: u32,
    pub fall: u32,
    /// Sent after connecting (none: a plain TCP connect check).
    pub send: Option<Vec<u8>>,
    /// Must appear in what the server answers within the timeout.
    pub expect: Option<Vec<u8>>,
}

#[derive(Clone, Debug)]
pub struct Server {
    pub name: String,
    pub address: SocketAddr,
    pub weight: u32,
    pub maxconn: Option<u32>,
    /// Source addresses for connections to this server; empty means the kernel chooses.
    pub sources: Vec<IpAddr>,
    /// Health-checked (only when the backend has a check).
    pub check: bool,
    pub send_proxy: Option<ProxyVersion>,
}

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read the configuration: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{origin}:{line}:{column}: {message}")]
    Invalid { origin: String, line: u64, column: u64, message: String },
}

impl ConfigError {
    /// The line and column, when the error points into the file.
    pub fn position(&self) -> Option<(u64, u64)> {
        match self {
            ConfigError::Invalid { line, column, .. } => Some((*line, *column)),
            ConfigError::Read { .. } => None,
        }
    }
}

/// Reads and validates the configuration file at `path`.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| ConfigError::Read { path: path.display().to_string(), source })?;
    parse(&text, &path.display().to_string())
}

/// Validates configuration text; `origin` names it in messages (normally the file path).
pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
    let raw: RawConfig = serde_saphyr::from_str(text).map_err(|e| {
        let (line, column) = e.location().map_or((1, 1), |l| (l.line(), l.column()));
        ConfigError::Invalid {
            origin: origin.to_owned(),
            line: line.max(1),
            column: column.max(1),
            message: yaml_message(&e),
        }
    })?;
    Validator { origin, warnings: Vec::new() }.config(raw)
}

/// The parser's message without the " at line N, column M" it appends (we print the position first).
fn yaml_message(e: &serde_saphyr::Error) -> String {
    let full = e.without_snippet().to_string();
    let msg = match full.rsplit_once(" at line ") {
        Some((head, tail)) if tail.contains(", column ") => head.to_owned(),
        _ => full,
    };
    let msg = msg.trim_start_matches("error: ").to_owned();
    operator_words(&msg)
}

/// Rewrites the deserializer's wording (Rust types, library options) into the file's terms.
fn operator_words(msg: &str) -> String {
    if let Some(rest) = msg.strip_prefix("duplicate mapping key: ") {
        let key = rest.split(',').next().unwrap_or(rest).trim();
        return format!("key `{key}` appears twice in this section; keep one");
    }
    if msg.starts_with("cannot deserialize null") || msg.contains("invalid type: unit value") {
        return "a value is missing here".into();
    }
    // serde's wording for a misspelt key lists every valid one: keep it, it is the fix.
    let msg = msg.replace("unknown field", "unknown key");
    // "invalid type: sequence, expected X" -> "expected X, found a list"
    if let Some(rest) = msg.strip_prefix("invalid type: ")
        && let Some((found, expected)) = rest.split_once(", expected ")
    {
        let found = match found {
            "sequence" => "a list".to_string(),
            "map" => "a mapping".to_string(),
            "unit value" => "nothing".to_string(),
            other => other.replace("string ", "").to_string(),
        };
        return format!("expected {expected}, found {found}");
    }
    msg
}

struct Validator<'a> {
    origin: &'a str,
    warnings: Vec<String>,
}

type Result<T, E = ConfigError> = std::result::Result<T, E>;

impl Validator<'_> {
    fn err<T>(&self, loc: Location, message: impl Into<String>) -> Result<T> {
        Err(ConfigError::Invalid {
            origin: self.origin.to_owned(),
            line: loc.line().max(1),
            column: loc.column().max(1),
            message: message.into(),
        })
    }

    fn warn(&mut self, loc: Location, message: impl AsRef<str>) {
        self.warnings.push(format!(
            "{}:{}:{}: warning: {}",
            self.origin,
            loc.line().max(1),
            loc.column().max(1),
            message.as_ref()
        ));
    }

    fn count(&self, v: &Spanned<Count>, what: &str, min: u64, max: u64) -> Result<u64> {
        let n = v.value.0;
        if n < min || n > max {
            return self.err(v.referenced, format!("{what} must be between {min} and {max}, not {n}"));
        }
        Ok(n)
    }

    /// `maxconn` values: 0 means "no limit" (as in HAProxy) where a limit is optional.
    fn maxconn(&self, v: &Option<Spanned<Count>>, what: &str) -> Result<Option<u32>> {
        match v {
            None => Ok(None),
            Some(s) if s.value.0 == 0 => Ok(None),
            Some(s) => Ok(Some(self.count(s, what, 1, MAXCONN_LIMIT)? as u32)),
        }
    }

    fn duration(
        &self,
        v: &Option<Spanned<duration::ConfigDuration>>,
        what: &str,
        fallback: Duration,
    ) -> Result<Duration> {
        match v {
            None => Ok(fallback),
            Some(s) if s.value.0.is_zero() => {
                self.err(s.referenced, format!("timeout {what} must be greater than zero"))
            }
            Some(s) => Ok(s.value.0),
        }
    }

    /// Refuses timeout keys that mean nothing in this section (e.g. `drain` in a backend).
    fn only_timeouts(&self, t: &Spanned<RawTimeouts>, section: &str, allowed: &[&str]) -> Result<()> {
        let present = [
            ("connect", t.value.connect.as_ref()),
            ("client", t.value.client.as_ref()),
            ("server", t.value.server.as_ref()),
            ("queue", t.value.queue.as_ref()),
            ("drain", t.value.drain.as_ref()),
            ("proxy_header", t.value.proxy_header.as_ref()),
        ];
        for (key, v) in present {
            if let Some(v) = v
                && !allowed.contains(&key)
            {
                return self.err(
                    v.referenced,
                    format!("timeout {key} does not apply to a {section}; allowed here: {}", allowed.join(", ")),
                );
            }
        }
        Ok(())
    }

    fn config(mut self, raw: RawConfig) -> Result<Config> {
        let d = &raw.defaults;
        let g = &raw.global;

        let workers = match &g.workers {
            None => None,
            Some(s) => match s.value {
                Workers::Auto => None,
                Workers::Count(n) if (1..=1024).contains(&n) => Some(n as usize),
                Workers::Count(n) => {
                    return self.err(s.referenced, format!("workers must be `auto` or 1-1024, not {n}"));
                }
            },
        };
        let global_maxconn = match &g.maxconn {
            None => None,
            Some(s) => Some(self.count(s, "global maxconn", 1, MAXCONN_LIMIT)? as u32),
        };
        let tune = self.tune(&g.tune)?;
        let stats = self.stats(g.stats.as_ref())?;
        let connection_log = match &g.connection_log {
            None => None,
            Some(s) => Some(match s.value.trim() {
                "stdout" => LogTarget::Stdout,
                "stderr" => LogTarget::Stderr,
                "" => {
                    return self.err(s.referenced, "connection_log is empty; use stdout, stderr or a file path");
                }
                path => LogTarget::File(path.into()),
            }),
        };

        let defaults_connect = self.duration(&d.timeout.connect, "connect", default::CONNECT)?;
        let defaults = Defaults {
            connect: defaults_connect,
            client: self.duration(&d.timeout.client, "client", default::CLIENT)?,
            server: self.duration(&d.timeout.server, "server", default::SERVER)?,
            queue: match &d.timeout.queue {
                Some(_) => Some(self.duration(&d.timeout.queue, "queue", defaults_connect)?),
                None => None,
            },
            drain: self.duration(&d.timeout.drain, "drain", default::DRAIN)?,
            proxy_header: self.duration(&d.timeout.proxy_header, "proxy_header", default::PROXY_HEADER)?,
            retries: match &d.retries {
                Some(r) => self.count(r, "retries", 0, 100)? as u32,
                None => default::RETRIES,
            },
            backlog: match &d.backlog {
                Some(b) => Some(self.count(b, "backlog", 1, i32::MAX as u64)? as u32),
                None => None,
            },
            maxconn: self.maxconn(&d.maxconn, "defaults maxconn")?,
            balance: d.balance.unwrap_or(Balance::Roundrobin),
        };

        let Some(raw_backends) = raw.backends else {
            return self.err(Location::UNKNOWN, "no `backends:` section; at least one backend is needed");
        };
        if raw_backends.value.is_empty() {
            return self.err(raw_backends.referenced, "`backends` is empty; at least one backend is needed");
        }
        let mut backends = Vec::with_capacity(raw_backends.value.len());
        let mut backend_names: HashMap<String, (usize, Location)> = HashMap::new();
        for rb in &raw_backends.value {
            let name = self.name(&rb.name, "backend")?;
            if let Some((_, first)) = backend_names.get(&name) {
                return self.err(
                    rb.name.referenced,
                    format!("duplicate backend name \"{name}\" (first defined at line {})", first.line()),
                );
            }
            backend_names.insert(name.clone(), (backends.len(), rb.name.referenced));
            backends.push(self.backend(rb, name, &defaults)?);
        }

        let Some(raw_frontends) = raw.frontends else {
            return self.err(Location::UNKNOWN, "no `frontends:` section; at least one frontend is needed");
        };
        if raw_frontends.value.is_empty() {
            return self.err(raw_frontends.referenced, "`frontends` is empty; at least one frontend is needed");
        }
        let mut frontends: Vec<Frontend> = Vec::with_capacity(raw_frontends.value.len());
        let mut frontend_names: HashMap<String, Location> = HashMap::new();
        let mut used = vec![false; backends.len()];
        let mut all_binds: Vec<(SocketAddr, String, Location)> = Vec::new();
        for rf in &raw_frontends.value {
            let name = self.name(&rf.name, "frontend")?;
            if let Some(first) = frontend_names.get(&name) {
                return self.err(
                    rf.name.referenced,
                    format!("duplicate frontend name \"{name}\" (first defined at line {})", first.line()),
                );
            }
            frontend_names.insert(name.clone(), rf.name.referenced);
            let fe = self.frontend(rf, name, &defaults, &backend_names, global_maxconn)?;
            used[fe.backend] = true;
            for bind in &fe.binds {
                if let Some((other, owner, _)) = all_binds.iter().find(|(b, _, _)| binds_overlap(*b, *bind)) {
                    return self.err(
                        rf.bind.referenced,
                        format!(
                            "bind {bind} overlaps {other} of frontend \"{owner}\"; each address:port may be bound by one frontend"
                        ),
                    );
                }
                all_binds.push((*bind, fe.name.clone(), rf.bind.referenced));
            }
            frontends.push(fe);
        }
        for (i, rb) in raw_backends.value.iter().enumerate() {
            if !used[i] {
                self.warn(rb.name.referenced, format!("backend \"{}\" is not used by any frontend", backends[i].name));
            }
        }

        Ok(Config {
            origin: self.origin.to_owned(),
            global: Global {
                workers,
                pin_cpus: g.pin_cpus.unwrap_or(true),
                maxconn: global_maxconn,
                drain_timeout: defaults.drain,
                tune,
                stats,
                connection_log,
                user: self.account(&g.user, "user")?,
                group: self.account(&g.group, "group")?,
            },
            frontends,
            backends,
            warnings: self.warnings,
        })
    }

    fn account(&self, v: &Option<Spanned<String>>, what: &str) -> Result<Option<String>> {
        match v {
            None => Ok(None),
            Some(s) if s.value.trim().is_empty() => self.err(s.referenced, format!("{what} is empty")),
            Some(s) => Ok(Some(s.value.trim().to_owned())),
        }
    }

    fn check(&self, raw: &Spanned<raw::RawCheck>, backend: &str) -> Result<HealthCheck> {
        let r = &raw.value;
        let interval = self.duration(&r.interval, "check interval", default::CHECK_INTERVAL)?;
        let timeout = self.duration(&r.timeout, "check timeout", default::CHECK_TIMEOUT.min(interval))?;
        let rise = match &r.rise {
            Some(v) => self.count(v, "check rise", 1, 1000)? as u32,
            None => default::CHECK_RISE,
        };
        let fall = match &r.fall {
            Some(v) => self.count(v, "check fall", 1, 1000)? as u32,
            None => default::CHECK_FALL,
        };
        let bytes = |v: &Option<Spanned<String>>, what: &str| -> Result<Option<Vec<u8>>> {
            match v {
                None => Ok(None),
                Some(s) if s.value.is_empty() => {
                    self.err(s.referenced, format!("backend \"{backend}\": check {what} is empty"))
                }
                Some(s) if s.value.len() > 1024 => {
                    self.err(s.referenced, format!("backend \"{backend}\": check {what} is longer than 1024 bytes"))
                }
                Some(s) => Ok(Some(s.value.as_bytes().to_vec())),
            }
        };
        Ok(HealthCheck {
            interval,
            timeout,
            rise,
            fall,
            send: bytes(&r.send, "send")?,
            expect: bytes(&r.expect, "expect")?,
        })
    }

    fn stats(&mut self, raw: Option<&Spanned<raw::RawStats>>) -> Result<Stats> {
        let mut stats = Stats { socket: None, mode: 0o600, prometheus: None };
        let Some(raw) = raw else { return Ok(stats) };
        if let Some(p) = &raw.value.socket {
            if p.value.trim().is_empty() {
                return self.err(p.referenced, "stats socket path is empty");
            }
            stats.socket = Some(p.value.trim().into());
        }
        if let Some(m) = &raw.value.mode {
            let text = m.value.trim();
            let Some(mode) = u32::from_str_radix(text.trim_start_matches("0o"), 8).ok().filter(|m| *m <= 0o777) else {
                return self
                    .err(m.referenced, format!("stats mode \"{text}\" is not octal permission bits such as \"0600\""));
            };
            if mode & 0o002 != 0 {
                return self.err(
                    m.referenced,
                    format!("stats mode {text} makes the socket world-writable: anyone on the host could drive the engine; use 0600 or 0660"),
                );
            }
            stats.mode = mode;
        }
        if let Some(p) = &raw.value.prometheus {
            let addr =
                address::parse_bind(&p.value).or_else(|m| self.err(p.referenced, format!("stats prometheus: {m}")))?;
            if !addr.ip().is_loopback() {
                self.warn(
                    p.referenced,
                    format!(
                        "the Prometheus endpoint {addr} is reachable from other hosts; metrics reveal backends and load"
                    ),
                );
            }
            stats.prometheus = Some(addr);
        }
        Ok(stats)
    }

    fn tune(&self, t: &raw::RawTune) -> Result<Tune> {
        let mut tune = Tune::default();
        if let Some(s) = &t.pipe_size {
            let n = s.value.0;
            if !(4096..=64 << 20).contains(&n) {
                return self.err(s.referenced, format!("pipe_size must be between 4k and 64m bytes, not {n}"));
            }
            tune.pipe_size = n as u32;
        }
        if let Some(s) = &t.max_pipes {
            tune.max_pipes = self.count(s, "max_pipes", 1, 1 << 20)? as u32;
        }
        if let Some(s) = &t.ring_entries {
            let n = self.count(s, "ring_entries", 64, 32768)?;
            if !n.is_power_of_two() {
                return self.err(s.referenced, format!("ring_entries must be a power of two, not {n}"));
            }
            tune.ring_entries = n as u32;
        }
        if let Some(s) = &t.iowq_workers {
            tune.iowq_workers = self.count(s, "iowq_workers", 1, 1024)? as u32;
        }
        tune.splice = t.splice.unwrap_or_default();
        Ok(tune)
    }

    fn name(&self, s: &Spanned<String>, what: &str) -> Result<String> {
        let n = s.value.trim();
        if n.is_empty() {
            return self.err(s.referenced, format!("{what} name is empty"));
        }
        if !n.chars().all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c)) {
            return self.err(
                s.referenced,
                format!("{what} name \"{n}\" may only contain letters, digits, '-', '_', '.' and ':'"),
            );
        }
        Ok(n.to_owned())
    }

    fn frontend(
        &mut self,
        rf: &RawFrontend,
        name: String,
        defaults: &Defaults,
        backends: &HashMap<String, (usize, Location)>,
        global_maxconn: Option<u32>,
    ) -> Result<Frontend> {
        let Some(&(backend, _)) = backends.get(rf.backend.value.trim()) else {
            let mut known: Vec<&str> = backends.keys().map(String::as_str).collect();
            known.sort_unstable();
            return self.err(
                rf.backend.referenced,
                format!(
                    "frontend \"{name}\": backend \"{}\" does not exist (defined backends: {})",
                    rf.backend.value,
                    known.join(", ")
                ),
            );
        };
        if rf.bind.value.0.is_empty() {
            return self.err(rf.bind.referenced, format!("frontend \"{name}\": `bind` lists no address"));
        }
        let mut binds = Vec::new();
        for text in &rf.bind.value.0 {
            let addr = address::parse_bind(text)
                .or_else(|m| self.err(rf.bind.referenced, format!("frontend \"{name}\": bind {m}")))?;
            if binds.contains(&addr) && addr.port() != 0 {
                return self.err(rf.bind.referenced, format!("frontend \"{name}\": bind {addr} is listed twice"));
            }
            binds.push(addr);
        }
        let maxconn = self.maxconn(&rf.maxconn, "frontend maxconn")?.or(defaults.maxconn);
        if let (Some(fe), Some(g), Some(s)) = (maxconn, global_maxconn, &rf.maxconn)
            && fe > g
        {
            self.warn(
                s.referenced,
                format!("frontend \"{name}\" maxconn {fe} is above the global maxconn {g}, which caps it"),
            );
        }
        let backlog = match &rf.backlog {
            Some(b) => self.count(b, "backlog", 1, i32::MAX as u64)? as u32,
            None => defaults.backlog.unwrap_or_else(|| {
                maxconn.or(global_maxconn).unwrap_or(default::BACKLOG_MAX).min(default::BACKLOG_MAX)
            }),
        };
        let mut client_timeout = defaults.client;
        let mut proxy_header_timeout = defaults.proxy_header;
        if let Some(t) = &rf.timeout {
            self.only_timeouts(t, "frontend", &["client", "proxy_header"])?;
            client_timeout = self.duration(&t.value.client, "client", defaults.client)?;
            proxy_header_timeout = self.duration(&t.value.proxy_header, "proxy_header", defaults.proxy_header)?;
        }
        Ok(Frontend {
            name,
            binds,
            backend,
            maxconn,
            backlog,
            client_timeout,
            accept_proxy: rf.accept_proxy.unwrap_or(false),
            proxy_header_timeout,
        })
    }

    fn backend(&self, rb: &RawBackend, name: String, defaults: &Defaults) -> Result<Backend> {
        if rb.servers.value.is_empty() {
            return self.err(rb.servers.referenced, format!("backend \"{name}\" has no servers"));
        }
        let (mut connect, mut server) = (defaults.connect, defaults.server);
        let mut queue = None;
        if let Some(t) = &rb.timeout {
            self.only_timeouts(t, "backend", &["connect", "server", "queue"])?;
            connect = self.duration(&t.value.connect, "connect", connect)?;
            server = self.duration(&t.value.server, "server", server)?;
            if t.value.queue.is_some() {
                queue = Some(self.duration(&t.value.queue, "queue", connect)?);
            }
        }
        let queue = queue.or(defaults.queue).unwrap_or(connect);
        let retries = match &rb.retries {
            Some(r) => self.count(r, "retries", 0, 100)? as u32,
            None => defaults.retries,
        };
        let mut servers: Vec<Server> = Vec::with_capacity(rb.servers.value.len());
        let mut names: HashMap<&str, Location> = HashMap::new();
        for rs in &rb.servers.value {
            let sname = self.name(&rs.name, "server")?;
            if let Some(first) = names.get(rs.name.value.trim()) {
                return self.err(
                    rs.name.referenced,
                    format!(
                        "backend \"{name}\": duplicate server name \"{sname}\" (first defined at line {})",
                        first.line()
                    ),
                );
            }
            names.insert(rs.name.value.trim(), rs.name.referenced);
            servers.push(self.server(rs, &name, sname)?);
        }
        if servers.iter().all(|s| s.weight == 0) {
            return self.err(
                rb.servers.referenced,
                format!("backend \"{name}\": every server has weight 0, so none can take a connection"),
            );
        }
        let check = match &rb.check {
            Some(c) => Some(self.check(c, &name)?),
            None => None,
        };
        Ok(Backend {
            name,
            balance: rb.balance.unwrap_or(defaults.balance),
            maxconn: self.maxconn(&rb.maxconn, "backend maxconn")?,
            retries,
            connect_timeout: connect,
            server_timeout: server,
            queue_timeout: queue,
            check,
            on_down: rb.on_down.unwrap_or(OnDown::Keep),
            servers,
        })
    }

    fn server(&self, rs: &RawServer, backend: &str, name: String) -> Result<Server> {
        let ctx = format!("backend \"{backend}\": server \"{name}\"");
        let address = address::parse_server(&rs.address.value)
            .or_else(|m| self.err(rs.address.referenced, format!("{ctx}: address {m}")))?;
        let weight = match &rs.weight {
            Some(w) => self.count(w, "weight", 0, WEIGHT_LIMIT)? as u32,
            None => default::WEIGHT,
        };
        let mut sources = Vec::new();
        if let Some(src) = &rs.source {
            if src.value.0.is_empty() {
                return self.err(src.referenced, format!("{ctx}: `source` lists no address"));
            }
            for text in &src.value.0 {
                address::expand_source(text, &mut sources)
                    .or_else(|m| self.err(src.referenced, format!("{ctx}: {m}")))?;
            }
            if let Some(bad) = sources.iter().find(|ip| ip.is_ipv4() != address.is_ipv4()) {
                return self.err(
                    src.referenced,
                    format!("{ctx}: source {bad} is not of the same address family as the server address {address}"),
                );
            }
            let mut seen = std::collections::HashSet::new();
            if let Some(dup) = sources.iter().find(|ip| !seen.insert(**ip)) {
                return self.err(src.referenced, format!("{ctx}: source {dup} is listed twice"));
            }
        }
        Ok(Server {
            name,
            address,
            weight,
            maxconn: self.maxconn(&rs.maxconn, "server maxconn")?,
            sources,
            check: rs.check.unwrap_or(true),
            send_proxy: rs.send_proxy,
        })
    }
}

/// Values from the `defaults` section, resolved.
struct Defaults {
    connect: Duration,
    client: Duration,
    server: Duration,
    /// `None`: each backend waits as long as its own connect timeout (HAProxy's rule).
    queue: Option<Duration>,
    proxy_header: Duration,
    drain: Duration,
    retries: u32,
    backlog: Option<u32>,
    maxconn: Option<u32>,
    balance: Balance,
}

/// Whether two listener addresses would receive the same connections.
fn binds_overlap(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() != 0
        && a.port() == b.port()
        && a.is_ipv4() == b.is_ipv4()
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

#[cfg(test)]
mod tests;
