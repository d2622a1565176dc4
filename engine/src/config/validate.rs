//! The Validator: the raw file (`raw.rs`) in, the validated [`Config`] out, once.
//!
//! Every value is parsed and range-checked here, names are checked for uniqueness and references
//! (a frontend's backend) for existence, and every refusal points at the value's line and column.
//! The first error ends validation; warnings (allowed but probably unintended) are collected into
//! [`Config::warnings`]. Nothing here touches the host.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::time::Duration;

use serde_saphyr::{Location, Spanned};

use super::message::{ConfigError, warning};
use super::raw::{
    self, AutoOrDuration, Balance, Count, OnDown, OnRemoved, RawBackend, RawConfig, RawDefaults, RawFrontend,
    RawGlobal, RawKeepalive, RawServer, RawTimeouts, StringList, Workers,
};
use super::types::{
    Acl, Backend, BatchWait, Config, Frontend, Global, HealthCheck, Keepalive, Lifetime, LogTarget, MAXCONN_LIMIT,
    PerSource, Server, SpliceMode, Stats, Tune, WEIGHT_LIMIT, default,
};
use super::{address, duration};

type Result<T, E = ConfigError> = std::result::Result<T, E>;

/// The longest duration any key accepts: 24 days (just under HAProxy's limit of 2^31 ms), so that
/// every deadline computed from one fits on every clock it is added to.
pub const MAX_DURATION: Duration = Duration::from_secs(24 * 86_400);

/// The longest frontend, backend or server name (they appear in every stats row and log line).
pub const NAME_MAX: usize = 128;

/// Validates a parsed file; `origin` names it in messages.
pub(super) fn validate(raw: RawConfig, origin: &str) -> Result<Config> {
    Validator { origin, warnings: Vec::new() }.config(raw)
}

struct Validator<'a> {
    origin: &'a str,
    warnings: Vec<String>,
}

/// Values from the `defaults` section, resolved.
struct Defaults {
    connect: Duration,
    client: Duration,
    server: Duration,
    /// `None`: each backend waits as long as its own connect timeout (HAProxy's rule).
    queue: Option<Duration>,
    proxy_header: Duration,
    /// Maximum connection age and its jitter (`None`: connections may live forever).
    lifetime: Option<Lifetime>,
    drain: Duration,
    retries: u32,
    backlog: Option<u32>,
    maxconn: Option<u32>,
    balance: Balance,
}

/// Backend names, each with its index in [`Config::backends`] and where it is defined.
type BackendNames = HashMap<String, (usize, Location)>;

impl Validator<'_> {
    fn err<T>(&self, loc: Location, message: impl Into<String>) -> Result<T> {
        Err(ConfigError::at(self.origin, loc, message))
    }

    fn warn(&mut self, loc: Location, message: impl AsRef<str>) {
        self.warnings.push(warning(self.origin, loc, message.as_ref()));
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
            Some(s) if s.value.0 > MAX_DURATION => self.err(
                s.referenced,
                format!(
                    "timeout {what} must be at most {} (as in HAProxy), not {}",
                    duration::format(MAX_DURATION),
                    duration::format(s.value.0)
                ),
            ),
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
            ("lifetime", t.value.lifetime.as_ref()),
            ("lifetime_jitter", t.value.lifetime_jitter.as_ref()),
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

    /// Checks the sections in the order their errors are reported: global, defaults, backends,
    /// frontends, then the accounts to run as.
    fn config(mut self, raw: RawConfig) -> Result<Config> {
        let mut global = self.global(&raw.global)?;
        let defaults = self.defaults(&raw.defaults)?;
        global.drain_timeout = defaults.drain;
        let (backends, names) = self.backends(raw.backends.as_ref(), &defaults, global.tune.splice)?;
        let frontends = self.frontends(raw.frontends.as_ref(), &defaults, &names, global.maxconn)?;
        for (i, b) in backends.iter().enumerate() {
            if !frontends.iter().any(|f| f.backend == i) {
                self.warn(names[&b.name].1, format!("backend \"{}\" is not used by any frontend", b.name));
            }
        }
        global.user = self.account(&raw.global.user, "user")?;
        global.group = self.account(&raw.global.group, "group")?;
        let mut config =
            Config { origin: self.origin.to_owned(), global, frontends, backends, warnings: self.warnings };
        if raw.global.tune.recv_buffers.is_none() {
            // The pool of receive buffers of the most copying mode a used backend has (`never`'s
            // where one copies all its bytes), in buffers of the size set.
            let mode =
                if config.modes().any(|m| m == SpliceMode::Never) { SpliceMode::Never } else { SpliceMode::Auto };
            let tune = &mut config.global.tune;
            tune.recv_buffers = default::recv_buffers(mode, tune.recv_buffer_size);
        }
        Ok(config)
    }

    /// The `global` section; [`Self::config`] fills in `drain_timeout` (from `defaults`), the
    /// accounts, and `tune.recv_buffers` where the file leaves it (the backends' modes decide).
    fn global(&mut self, g: &RawGlobal) -> Result<Global> {
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
        let maxconn = match &g.maxconn {
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
        Ok(Global {
            workers,
            pin_cpus: g.pin_cpus.unwrap_or(true),
            maxconn,
            drain_timeout: default::DRAIN,
            withdraw_delay: self.window(&g.withdraw_delay, "withdraw_delay")?,
            tune,
            stats,
            connection_log,
            user: None,
            group: None,
        })
    }

    /// The `defaults` section: what each frontend and backend gets unless it says otherwise.
    fn defaults(&self, d: &RawDefaults) -> Result<Defaults> {
        let connect = self.duration(&d.timeout.connect, "connect", default::CONNECT)?;
        Ok(Defaults {
            connect,
            client: self.duration(&d.timeout.client, "client", default::CLIENT)?,
            server: self.duration(&d.timeout.server, "server", default::SERVER)?,
            queue: match &d.timeout.queue {
                Some(_) => Some(self.duration(&d.timeout.queue, "queue", connect)?),
                None => None,
            },
            drain: self.duration(&d.timeout.drain, "drain", default::DRAIN)?,
            proxy_header: self.duration(&d.timeout.proxy_header, "proxy_header", default::PROXY_HEADER)?,
            lifetime: self.lifetime(&d.timeout, None)?,
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
        })
    }

    /// The `backends` section: at least one, names unique.
    fn backends(
        &self,
        raw: Option<&Spanned<Vec<RawBackend>>>,
        defaults: &Defaults,
        splice: SpliceMode,
    ) -> Result<(Vec<Backend>, BackendNames)> {
        let Some(raw) = raw else {
            return self.err(Location::UNKNOWN, "no `backends:` section; at least one backend is needed");
        };
        if raw.value.is_empty() {
            return self.err(raw.referenced, "`backends` is empty; at least one backend is needed");
        }
        let mut backends = Vec::with_capacity(raw.value.len());
        let mut names = BackendNames::new();
        for rb in &raw.value {
            let name = self.name(&rb.name, "backend")?;
            if let Some((_, first)) = names.get(&name) {
                return self.err(
                    rb.name.referenced,
                    format!("duplicate backend name \"{name}\" (first defined at line {})", first.line()),
                );
            }
            names.insert(name.clone(), (backends.len(), rb.name.referenced));
            backends.push(self.backend(rb, name, defaults, splice)?);
        }
        Ok((backends, names))
    }

    /// The `frontends` section: at least one, names unique, no address bound by two of them.
    fn frontends(
        &mut self,
        raw: Option<&Spanned<Vec<RawFrontend>>>,
        defaults: &Defaults,
        backends: &BackendNames,
        global_maxconn: Option<u32>,
    ) -> Result<Vec<Frontend>> {
        let Some(raw) = raw else {
            return self.err(Location::UNKNOWN, "no `frontends:` section; at least one frontend is needed");
        };
        if raw.value.is_empty() {
            return self.err(raw.referenced, "`frontends` is empty; at least one frontend is needed");
        }
        let mut frontends: Vec<Frontend> = Vec::with_capacity(raw.value.len());
        let mut names: HashMap<String, Location> = HashMap::new();
        let mut all_binds: Vec<(SocketAddr, String)> = Vec::new();
        for rf in &raw.value {
            let name = self.name(&rf.name, "frontend")?;
            if let Some(first) = names.get(&name) {
                return self.err(
                    rf.name.referenced,
                    format!("duplicate frontend name \"{name}\" (first defined at line {})", first.line()),
                );
            }
            names.insert(name.clone(), rf.name.referenced);
            let fe = self.frontend(rf, name, defaults, backends, global_maxconn)?;
            for bind in &fe.binds {
                if let Some((other, owner)) = all_binds.iter().find(|(b, _)| binds_overlap(*b, *bind)) {
                    return self.err(
                        rf.bind.referenced,
                        format!(
                            "bind {bind} overlaps {other} of frontend \"{owner}\"; each address:port may be bound by one frontend"
                        ),
                    );
                }
                all_binds.push((*bind, fe.name.clone()));
            }
            frontends.push(fe);
        }
        Ok(frontends)
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
        let mut stats = Stats { socket: None, mode: 0o600, admin_socket: None, admin_mode: 0o600, prometheus: None };
        let Some(raw) = raw else { return Ok(stats) };
        for (key, p, to) in [
            ("socket", &raw.value.socket, &mut stats.socket),
            ("admin_socket", &raw.value.admin_socket, &mut stats.admin_socket),
        ] {
            if let Some(p) = p {
                if p.value.trim().is_empty() {
                    return self.err(p.referenced, format!("stats {key} path is empty"));
                }
                *to = Some(p.value.trim().into());
            }
        }
        if let (Some(a), Some(b)) = (&stats.socket, &stats.admin_socket)
            && a == b
        {
            let at = raw.value.admin_socket.as_ref().map_or(raw.referenced, |p| p.referenced);
            return self.err(
                at,
                format!("stats admin_socket is the same path as stats socket ({}): give each its own", a.display()),
            );
        }
        for (key, m, to) in
            [("mode", &raw.value.mode, &mut stats.mode), ("admin_mode", &raw.value.admin_mode, &mut stats.admin_mode)]
        {
            let Some(m) = m else { continue };
            let text = m.value.trim();
            let Some(mode) = u32::from_str_radix(text.trim_start_matches("0o"), 8).ok().filter(|m| *m <= 0o777) else {
                return self.err(
                    m.referenced,
                    format!("stats {key} \"{text}\" is not octal permission bits such as \"0600\""),
                );
            };
            if mode & 0o002 != 0 {
                return self.err(
                    m.referenced,
                    format!("stats {key} {text} makes the socket world-writable: anyone on the host could drive the engine; use 0600 or 0660"),
                );
            }
            *to = mode;
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
        if let Some(s) = &t.recv_buffers {
            let (min, max) = (default::RECV_BUFFERS_MIN, default::RECV_BUFFERS_MAX);
            tune.recv_buffers = self.count(s, "recv_buffers", u64::from(min), u64::from(max))? as u32;
        }
        if let Some(s) = &t.recv_buffer_size {
            let n = s.value.0;
            if !(4096..=1 << 20).contains(&n) || n % 4096 != 0 {
                return self.err(
                    s.referenced,
                    format!("recv_buffer_size must be a multiple of 4k between 4k and 1m bytes, not {n}"),
                );
            }
            tune.recv_buffer_size = n as u32;
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
        if let Some(s) = &t.peer_lookups {
            tune.peer_lookups = self.count(s, "peer_lookups", 1, 1 << 20)? as u32;
        }
        if let Some(s) = &t.io_features {
            let v = s.value.trim();
            if v != "native" {
                tune.io_features = Some(crate::features::parse(v).or_else(|e| self.err(s.referenced, e))?);
            }
        }
        tune.splice = t.splice.unwrap_or_default();
        let buffer = |v: &Option<Spanned<raw::Size>>, what: &str| -> Result<Option<u32>> {
            let Some(s) = v else { return Ok(None) };
            let (n, min, max) = (s.value.0, default::SOCKET_BUFFER_MIN, default::SOCKET_BUFFER_MAX);
            if !(min..=max).contains(&n) {
                return self.err(s.referenced, format!("{what} must be between 4k and 1g bytes, not {n}"));
            }
            Ok(Some(n as u32))
        };
        tune.client_buffers.receive = buffer(&t.rcvbuf_client, "rcvbuf_client")?;
        tune.client_buffers.send = buffer(&t.sndbuf_client, "sndbuf_client")?;
        tune.server_buffers.receive = buffer(&t.rcvbuf_server, "rcvbuf_server")?;
        tune.server_buffers.send = buffer(&t.sndbuf_server, "sndbuf_server")?;
        tune.notsent_lowat = buffer(&t.notsent_lowat, "notsent_lowat")?;
        if let Some(s) = &t.send_zerocopy
            && let Some(n) = s.value.0
        {
            if !(4096..=1 << 30).contains(&n) {
                return self
                    .err(s.referenced, format!("send_zerocopy must be off or between 4k and 1g bytes, not {n}"));
            }
            tune.send_zerocopy = Some(n as u32);
        }
        if let Some(s) = &t.batch_wait {
            let window = |d: Duration| (Duration::from_micros(10)..=Duration::from_millis(100)).contains(&d);
            tune.batch_wait = match s.value.0 {
                None => BatchWait::Off,
                Some(AutoOrDuration::Auto(None)) => BatchWait::default(),
                Some(AutoOrDuration::Auto(Some(d))) if window(d) => BatchWait::Auto(d),
                Some(AutoOrDuration::Duration(d)) if window(d) => BatchWait::Every(d),
                Some(AutoOrDuration::Auto(Some(d)) | AutoOrDuration::Duration(d)) => {
                    return self.err(
                        s.referenced,
                        format!(
                            "batch_wait's window must be between 10us and 100ms (batch_wait: off, auto, auto 1ms or 2ms), not {}",
                            duration::format(d)
                        ),
                    );
                }
            };
        }
        if let Some(s) = &t.idle_poll_after {
            tune.idle_poll_after = match s.value.0 {
                None => None,
                Some(d) if (Duration::from_millis(100)..=Duration::from_secs(86_400)).contains(&d) => Some(d),
                Some(d) => {
                    return self.err(
                        s.referenced,
                        format!("idle_poll_after must be off or between 100ms and 1d, not {}", duration::format(d)),
                    );
                }
            };
        }
        Ok(tune)
    }

    fn name(&self, s: &Spanned<String>, what: &str) -> Result<String> {
        check_name(&s.value, what).or_else(|m| self.err(s.referenced, m))
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
        let mut lifetime = defaults.lifetime;
        if let Some(t) = &rf.timeout {
            self.only_timeouts(t, "frontend", &["client", "proxy_header", "lifetime", "lifetime_jitter"])?;
            client_timeout = self.duration(&t.value.client, "client", defaults.client)?;
            proxy_header_timeout = self.duration(&t.value.proxy_header, "proxy_header", defaults.proxy_header)?;
            lifetime = self.lifetime(&t.value, defaults.lifetime)?;
        }
        let accept_proxy = rf.accept_proxy.unwrap_or(false);
        let proxy_header_maxconn = match &rf.proxy_header_maxconn {
            Some(s) => {
                if !accept_proxy {
                    self.warn(
                        s.referenced,
                        format!("frontend \"{name}\" sets proxy_header_maxconn without accept_proxy: it has no effect"),
                    );
                }
                self.count(s, "proxy_header_maxconn", 1, MAXCONN_LIMIT)? as u32
            }
            None => default::PROXY_HEADER_MAXCONN,
        };
        let list = |l: &Option<Spanned<StringList>>, what: &str| -> Result<Vec<address::Cidr>> {
            let Some(l) = l else { return Ok(Vec::new()) };
            if l.value.0.is_empty() {
                return self.err(l.referenced, format!("frontend \"{name}\": `{what}` lists no address"));
            }
            l.value
                .0
                .iter()
                .map(|t| {
                    address::Cidr::parse(t)
                        .or_else(|m| self.err(l.referenced, format!("frontend \"{name}\": {what} {m}")))
                })
                .collect()
        };
        let (allow, deny) = (list(&rf.allow, "allow")?, list(&rf.deny, "deny")?);
        let acl = (!allow.is_empty() || !deny.is_empty()).then_some(Acl { allow, deny });
        let per_source = self.per_source(rf, &name, accept_proxy)?;
        Ok(Frontend {
            name,
            binds,
            backend,
            maxconn,
            backlog,
            client_timeout,
            accept_proxy,
            proxy_header_timeout,
            proxy_header_maxconn,
            lifetime,
            acl,
            tcp_keepalive: self.keepalive(&rf.tcp_keepalive)?,
            rate_limit: match &rf.rate_limit {
                None => None,
                Some(r) if r.value.0 == 0 || r.value.0 > 10_000_000 => {
                    return self
                        .err(r.referenced, format!("rate_limit must be from 1/s to 10000000/s, not {}/s", r.value.0));
                }
                Some(r) => Some(r.value.0 as u32),
            },
            per_source,
        })
    }

    /// `maxconn_per_source`, `rate_per_source` and the prefixes a source is keyed by.
    fn per_source(&mut self, rf: &RawFrontend, name: &str, accept_proxy: bool) -> Result<Option<PerSource>> {
        let maxconn = match &rf.maxconn_per_source {
            Some(m) => Some(self.count(m, "maxconn_per_source", 1, MAXCONN_LIMIT)? as u32),
            None => None,
        };
        let rate = match &rf.rate_per_source {
            Some(r) if r.value.0 == 0 || r.value.0 > 1_000_000 => {
                return self
                    .err(r.referenced, format!("rate_per_source must be from 1/s to 1000000/s, not {}/s", r.value.0));
            }
            Some(r) => Some(r.value.0 as u32),
            None => None,
        };
        let prefix_v4 = match &rf.source_prefix {
            Some(p) => self.count(p, "source_prefix", 0, 32)? as u8,
            None => 32,
        };
        let prefix_v6 = match &rf.source_prefix_v6 {
            Some(p) => self.count(p, "source_prefix_v6", 0, 128)? as u8,
            None => 128,
        };
        if maxconn.is_none() && rate.is_none() {
            if let Some(p) =
                rf.source_prefix.as_ref().map(|p| p.referenced).or(rf.source_prefix_v6.as_ref().map(|p| p.referenced))
            {
                self.warn(p, format!("frontend \"{name}\" sets a source prefix without maxconn_per_source or rate_per_source: it has no effect"));
            }
            return Ok(None);
        }
        if accept_proxy {
            let at = rf
                .maxconn_per_source
                .as_ref()
                .map(|m| m.referenced)
                .or(rf.rate_per_source.as_ref().map(|r| r.referenced));
            return self.err(
                at.unwrap_or(rf.name.referenced),
                format!(
                    "frontend \"{name}\": maxconn_per_source and rate_per_source count the connection's own source, which on \
                     an accept_proxy frontend is the load balancer in front; set them on that load balancer"
                ),
            );
        }
        Ok(Some(PerSource { maxconn, rate, prefix_v4, prefix_v6 }))
    }

    /// One backend; `splice` is `tune.splice`, its mode unless it sets its own.
    fn backend(&self, rb: &RawBackend, name: String, defaults: &Defaults, splice: SpliceMode) -> Result<Backend> {
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
        let balance = rb.balance.unwrap_or(defaults.balance);
        if let Some(k) = &rb.hash_key
            && balance != Balance::Hash
        {
            return self.err(
                k.referenced,
                format!("backend \"{name}\": hash_key applies to balance: hash, not {}", balance.as_str()),
            );
        }
        Ok(Backend {
            name,
            balance,
            maxconn: self.maxconn(&rb.maxconn, "backend maxconn")?,
            retries,
            connect_timeout: connect,
            server_timeout: server,
            queue_timeout: queue,
            check,
            on_down: rb.on_down.unwrap_or(OnDown::Keep),
            on_removed: rb.on_removed.unwrap_or(OnRemoved::Keep),
            tcp_keepalive: self.keepalive(&rb.tcp_keepalive)?,
            close_spread: self.window(&rb.close_spread, "close_spread")?,
            splice: rb.splice.unwrap_or(splice),
            servers,
        })
    }

    /// `timeout.lifetime` and `timeout.lifetime_jitter` of one section, over `inherited` (the
    /// defaults'): a jitter below the lifetime; `lifetime: 0` turns an inherited one off.
    fn lifetime(&self, t: &RawTimeouts, inherited: Option<Lifetime>) -> Result<Option<Lifetime>> {
        let max = match &t.lifetime {
            None => match (&t.lifetime_jitter, inherited) {
                (Some(j), None) => return self.err(j.referenced, "timeout lifetime_jitter needs a timeout lifetime"),
                (_, inherited) => inherited.map(|l| l.max),
            },
            Some(s) if s.value.0.is_zero() => None,
            Some(s) if s.value.0 < Duration::from_secs(1) || s.value.0 > Duration::from_secs(365 * 86_400) => {
                return self.err(
                    s.referenced,
                    format!(
                        "timeout lifetime must be from 1s to 365d (0 for none), not {}",
                        duration::format(s.value.0)
                    ),
                );
            }
            Some(s) => Some(s.value.0),
        };
        let Some(max) = max else { return Ok(None) };
        let jitter = match &t.lifetime_jitter {
            Some(j) if j.value.0 >= max => {
                return self.err(
                    j.referenced,
                    format!(
                        "timeout lifetime_jitter ({}) must be below the lifetime ({})",
                        duration::format(j.value.0),
                        duration::format(max)
                    ),
                );
            }
            Some(j) => j.value.0,
            None => inherited.map_or(Duration::ZERO, |l| l.jitter.min(max / 2)),
        };
        Ok(Some(Lifetime { max, jitter }))
    }

    /// A ramp or spread window (`slowstart`, `close_spread`): above zero, at most an hour.
    fn window(&self, v: &Option<Spanned<duration::ConfigDuration>>, what: &str) -> Result<Option<Duration>> {
        match v {
            None => Ok(None),
            Some(s) if s.value.0.is_zero() || s.value.0 > Duration::from_secs(3600) => self.err(
                s.referenced,
                format!("{what} must be above zero and at most 1h, not {}", duration::format(s.value.0)),
            ),
            Some(s) => Ok(Some(s.value.0)),
        }
    }

    /// `tcp_keepalive: { idle, interval, count }`: whole seconds within what the kernel takes.
    fn keepalive(&self, k: &Option<Spanned<RawKeepalive>>) -> Result<Option<Keepalive>> {
        let Some(k) = k else { return Ok(None) };
        let secs = |v: &Option<Spanned<duration::ConfigDuration>>, what: &str, fallback: Duration| match v {
            None => Ok(fallback),
            Some(s) => {
                let d = s.value.0;
                if d.subsec_nanos() != 0 || !(1..=32_767).contains(&d.as_secs()) {
                    return self.err(
                        s.referenced,
                        format!("tcp_keepalive {what} must be whole seconds from 1s to 32767s, not {d:?}"),
                    );
                }
                Ok(d)
            }
        };
        Ok(Some(Keepalive {
            idle: secs(&k.value.idle, "idle", default::KEEPALIVE_IDLE)?,
            interval: secs(&k.value.interval, "interval", default::KEEPALIVE_INTERVAL)?,
            count: match &k.value.count {
                Some(c) => self.count(c, "tcp_keepalive count", 1, 127)? as u32,
                None => default::KEEPALIVE_COUNT,
            },
        }))
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
            let mut seen = HashSet::new();
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
            backup: rs.backup.unwrap_or(false),
            slowstart: self.window(&rs.slowstart, "slowstart")?,
        })
    }
}

/// A frontend, backend or server name (`what`), trimmed, or why it is refused.
pub fn check_name(text: &str, what: &str) -> std::result::Result<String, String> {
    let n = text.trim();
    if n.is_empty() {
        return Err(format!("{what} name is empty"));
    }
    if n.len() > NAME_MAX {
        return Err(format!("{what} name is {} characters long; at most {NAME_MAX}", n.len()));
    }
    if !n.chars().all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c)) {
        return Err(format!("{what} name \"{n}\" may only contain letters, digits, '-', '_', '.' and ':'"));
    }
    Ok(n.to_owned())
}

/// Whether two listener addresses would receive the same connections.
fn binds_overlap(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() != 0
        && a.port() == b.port()
        && a.is_ipv4() == b.is_ipv4()
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}
