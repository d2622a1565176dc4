//! The runtime API: commands that change a running engine's state (or list its connections), as
//! the stats sockets receive them, checked against the running configuration before anything is
//! sent to a worker, so that a refused command changes nothing.
//!
//! Two levels: the stats socket (`global.stats.socket`) answers reads, including `show conns`; the
//! admin socket (`global.stats.admin_socket`, mode 0600 by default) answers those and the commands
//! that change state. Every worker applies a change at its next loop turn; the answer comes once all
//! of them have (the supervisor waits for each). A change made here lasts until the next reload:
//! the file wins, and the reload's answer names the runtime changes it dropped.

use crate::config::Config;
use crate::stats::AdminState;

/// The most connections `show conns` lists (and its default when no `limit` is given: 100).
pub const MAX_LISTED: usize = 10_000;
pub const DEFAULT_LISTED: usize = 100;

/// A command the supervisor carries out (the other commands are answered by the socket's thread).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    Reload,
    /// `upgrade [BINARY]`: start the new binary and hand it everything (upgrade.rs).
    Upgrade {
        binary: Option<std::path::PathBuf>,
    },
    /// `set server B/S state ready|drain|maint`
    SetState {
        server: ServerName,
        state: AdminState,
    },
    /// `set server B/S weight N`
    SetWeight {
        server: ServerName,
        weight: u32,
    },
    /// `shutdown sessions server B/S`
    Shutdown {
        server: ServerName,
    },
    /// `show ready`: whether this host should get new connections (for a routing daemon's check).
    ShowReady,
    /// `show conns [B/S] [frontend NAME] [client IP[:PORT]] [limit N]`
    ShowConns {
        filter: ConnFilter,
        limit: usize,
    },
    /// `add server B/S ADDRESS [source IP[,IP...]] [weight N] [maxconn N]`
    AddServer(NewServer),
    /// `del server B/S` (only once it has no connection)
    DelServer {
        server: ServerName,
    },
}

/// Which connections `show conns` lists: those matching every part given.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConnFilter {
    /// Connected (or connecting) to this server.
    pub server: Option<ServerName>,
    /// Accepted by this frontend.
    pub frontend: Option<String>,
    /// From this client: an address, or an address and port.
    pub client: Option<ClientMatch>,
}

/// A client `show conns` asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientMatch {
    Ip(std::net::IpAddr),
    Addr(std::net::SocketAddr),
}

impl ClientMatch {
    fn parse(word: &str) -> Result<ClientMatch, String> {
        if let Ok(ip) = word.parse() {
            Ok(ClientMatch::Ip(ip))
        } else if let Ok(a) = word.parse() {
            Ok(ClientMatch::Addr(a))
        } else {
            Err(format!("client \"{word}\" is not IP or IP:PORT (an IPv6 address with a port: [IP]:PORT)"))
        }
    }

    pub fn matches(self, client: Option<std::net::SocketAddr>) -> bool {
        match (self, client) {
            // (An IPv4 client of a dual-stack listener shows as ::ffff:a.b.c.d.)
            (ClientMatch::Ip(ip), Some(c)) => c.ip().to_canonical() == ip.to_canonical(),
            (ClientMatch::Addr(a), Some(c)) => c.ip().to_canonical() == a.ip().to_canonical() && c.port() == a.port(),
            (_, None) => false,
        }
    }
}

impl std::fmt::Display for ClientMatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientMatch::Ip(ip) => ip.fmt(f),
            ClientMatch::Addr(a) => a.fmt(f),
        }
    }
}

impl ConnFilter {
    /// The filter's words and the `limit` from what follows `show conns`.
    fn parse(mut words: &[&str]) -> Result<(ConnFilter, usize), String> {
        const USAGE: &str = "usage: show conns [BACKEND/SERVER] [frontend NAME] [client IP[:PORT]] [limit N]";
        let mut filter = ConnFilter::default();
        let mut limit = None;
        while let [word, rest @ ..] = words {
            let twice = || format!("\"{word}\" is given twice; {USAGE}");
            match (*word, rest) {
                ("limit", [n, rest @ ..]) => {
                    if limit.is_some() {
                        return Err(twice());
                    }
                    limit = Some(
                        n.parse()
                            .ok()
                            .filter(|n| (1..=MAX_LISTED).contains(n))
                            .ok_or_else(|| format!("limit \"{n}\" is not a whole number from 1 to {MAX_LISTED}"))?,
                    );
                    words = rest;
                }
                ("frontend", [name, rest @ ..]) => {
                    if filter.frontend.replace((*name).to_owned()).is_some() {
                        return Err(twice());
                    }
                    words = rest;
                }
                ("client", [addr, rest @ ..]) => {
                    if filter.client.replace(ClientMatch::parse(addr)?).is_some() {
                        return Err(twice());
                    }
                    words = rest;
                }
                ("limit" | "frontend" | "client", []) => return Err(USAGE.into()),
                (name, rest) if name.contains('/') => {
                    if filter.server.replace(ServerName::parse(name)?).is_some() {
                        return Err(format!("two servers given; {USAGE}"));
                    }
                    words = rest;
                }
                _ => return Err(USAGE.into()),
            }
        }
        Ok((filter, limit.unwrap_or(DEFAULT_LISTED)))
    }

    /// As typed, each part followed by a space.
    fn words(&self) -> String {
        let mut out = String::new();
        if let Some(s) = &self.server {
            out.push_str(&format!("{s} "));
        }
        if let Some(f) = &self.frontend {
            out.push_str(&format!("frontend {f} "));
        }
        if let Some(c) = &self.client {
            out.push_str(&format!("client {c} "));
        }
        out
    }
}

/// A [`ConnFilter`] checked against the running configuration: indices, as a worker matches them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnMatch {
    /// (backend, server)
    pub server: Option<(usize, usize)>,
    pub frontend: Option<usize>,
    pub client: Option<ClientMatch>,
}

/// A server `add server` describes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewServer {
    pub server: ServerName,
    pub address: std::net::SocketAddr,
    pub sources: Vec<std::net::IpAddr>,
    /// The sources as typed (addresses and ranges): how the command is echoed and logged, which
    /// for a /16 is one range rather than 65,536 addresses.
    pub source_words: Vec<String>,
    pub weight: u32,
    pub maxconn: Option<u32>,
    /// Ramps up from ~0 over this time once added.
    pub slowstart: Option<std::time::Duration>,
}

impl NewServer {
    /// `B/S ADDRESS [source IP[,IP...]] [weight N] [maxconn N]`, the options in any order.
    fn parse(words: &[&str]) -> Result<NewServer, String> {
        const USAGE: &str =
            "usage: add server BACKEND/SERVER ADDRESS:PORT [source IP[,IP...]] [weight N] [maxconn N] [slowstart T]";
        let [name, address, rest @ ..] = words else { return Err(USAGE.into()) };
        let server = ServerName::parse(name)?;
        let address = crate::config::address::parse_server(address).map_err(|e| format!("address {e}"))?;
        let mut new = NewServer {
            server,
            address,
            sources: Vec::new(),
            source_words: Vec::new(),
            weight: 1,
            maxconn: None,
            slowstart: None,
        };
        let mut rest = rest;
        while let [key, value, more @ ..] = rest {
            match *key {
                "source" => {
                    for text in value.split(',') {
                        crate::config::address::expand_source(text, &mut new.sources)?;
                        new.source_words.push(text.trim().to_owned());
                    }
                    if let Some(bad) = new.sources.iter().find(|ip| ip.is_ipv4() != address.is_ipv4()) {
                        return Err(format!("source {bad} is not of the same address family as {address}"));
                    }
                }
                "weight" => {
                    new.weight =
                        value.parse().ok().filter(|w| *w <= MAX_WEIGHT).ok_or_else(|| {
                            format!("weight \"{value}\" is not a whole number from 0 to {MAX_WEIGHT}")
                        })?;
                }
                "maxconn" => {
                    let limit = crate::config::MAXCONN_LIMIT;
                    new.maxconn = Some(
                        value
                            .parse::<u64>()
                            .ok()
                            .filter(|m| (1..=limit).contains(m))
                            .ok_or_else(|| format!("maxconn \"{value}\" is not a whole number from 1 to {limit}"))?
                            as u32,
                    );
                }
                "slowstart" => {
                    let d = crate::config::duration::parse(value).map_err(|e| format!("slowstart: {e}"))?;
                    if d.is_zero() || d > std::time::Duration::from_secs(3600) {
                        return Err(format!("slowstart must be above zero and at most 1h, not {value}"));
                    }
                    new.slowstart = Some(d);
                }
                _ => return Err(format!("unknown option \"{key}\"; {USAGE}")),
            }
            rest = more;
        }
        if let [key] = rest {
            return Err(format!("\"{key}\" has no value; {USAGE}"));
        }
        Ok(new)
    }

    /// As a command line.
    fn line(&self) -> String {
        let mut l = format!("add server {} {}", self.server, self.address);
        if !self.source_words.is_empty() {
            l += &format!(" source {}", self.source_words.join(","));
        }
        l += &format!(" weight {}", self.weight);
        if let Some(m) = self.maxconn {
            l += &format!(" maxconn {m}");
        }
        if let Some(d) = self.slowstart {
            l += &format!(" slowstart {}", crate::config::duration::format(d));
        }
        l
    }
}

/// `backend/server`, as typed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerName {
    pub backend: String,
    pub server: String,
}

impl std::fmt::Display for ServerName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.backend, self.server)
    }
}

impl ServerName {
    fn parse(word: &str) -> Result<ServerName, String> {
        match word.split_once('/') {
            Some((b, s)) if !b.is_empty() && !s.is_empty() && !s.contains('/') => {
                Ok(ServerName { backend: b.to_owned(), server: s.to_owned() })
            }
            _ => Err(format!("\"{word}\" is not BACKEND/SERVER")),
        }
    }

    /// Indices of the backend and the server in `config` (the last server of that name for which
    /// `live` holds: servers deleted at run time keep their index), or what does not exist.
    pub fn find(&self, config: &Config, live: impl Fn(usize, usize) -> bool) -> Result<(usize, usize), String> {
        let b = backend_index(config, &self.backend)?;
        let servers = &config.backends[b].servers;
        if let Some(s) = (0..servers.len()).rev().find(|&s| live(b, s) && servers[s].name == self.server) {
            return Ok((b, s));
        }
        let names: Vec<&str> = (0..servers.len()).filter(|&s| live(b, s)).map(|s| servers[s].name.as_str()).collect();
        Err(format!("backend \"{}\" has no server \"{}\" (servers: {})", self.backend, self.server, names.join(", ")))
    }
}

/// The index of backend `name` in `config`, or what the backends are.
pub fn backend_index(config: &Config, name: &str) -> Result<usize, String> {
    config.backends.iter().position(|b| b.name == name).ok_or_else(|| {
        let names: Vec<&str> = config.backends.iter().map(|b| b.name.as_str()).collect();
        format!("no backend \"{name}\" (backends: {})", names.join(", "))
    })
}

/// The highest weight a server can be given (as in the configuration).
pub const MAX_WEIGHT: u32 = crate::config::WEIGHT_LIMIT as u32;

impl Command {
    /// Parses the words of a command line: `Ok(None)` when it is none of these commands (the
    /// socket answers it, or says it is unknown), `Err` with the reason when it is one of them
    /// written wrong.
    pub fn parse(words: &[&str]) -> Result<Option<Command>, String> {
        let cmd = match words {
            ["reload"] => Command::Reload,
            ["upgrade"] => Command::Upgrade { binary: None },
            ["upgrade", path] => Command::Upgrade { binary: Some(std::path::PathBuf::from(path)) },
            ["set", "server", name, "state", state] => Command::SetState {
                server: ServerName::parse(name)?,
                state: AdminState::parse(state)
                    .ok_or_else(|| format!("state \"{state}\" is not one of ready, drain, maint"))?,
            },
            ["set", "server", name, "weight", w] => Command::SetWeight {
                server: ServerName::parse(name)?,
                weight: w
                    .parse()
                    .ok()
                    .filter(|w| *w <= MAX_WEIGHT)
                    .ok_or_else(|| format!("weight \"{w}\" is not a whole number from 0 to {MAX_WEIGHT}"))?,
            },
            ["set", "server", ..] => {
                return Err("usage: set server BACKEND/SERVER state ready|drain|maint, or set server \
                            BACKEND/SERVER weight N"
                    .into());
            }
            ["shutdown", "sessions", "server", name] => Command::Shutdown { server: ServerName::parse(name)? },
            ["add", "server", rest @ ..] => Command::AddServer(NewServer::parse(rest)?),
            ["del", "server", name] => Command::DelServer { server: ServerName::parse(name)? },
            ["del", ..] => return Err("usage: del server BACKEND/SERVER".into()),
            ["shutdown", ..] => return Err("usage: shutdown sessions server BACKEND/SERVER".into()),
            ["show", "ready"] => Command::ShowReady,
            ["show", "conns", rest @ ..] => {
                let (filter, limit) = ConnFilter::parse(rest)?;
                Command::ShowConns { filter, limit }
            }
            _ => return Ok(None),
        };
        Ok(Some(cmd))
    }

    /// Whether it changes the engine (admin socket only).
    pub fn changes_state(&self) -> bool {
        !matches!(self, Command::ShowConns { .. } | Command::ShowReady)
    }

    /// The command as a line (for the answer and the list of runtime changes a reload drops).
    pub fn line(&self) -> String {
        match self {
            Command::Reload => "reload".into(),
            Command::Upgrade { binary: None } => "upgrade".into(),
            Command::Upgrade { binary: Some(b) } => format!("upgrade {}", b.display()),
            Command::SetState { server, state } => format!("set server {server} state {}", state.as_str()),
            Command::SetWeight { server, weight } => format!("set server {server} weight {weight}"),
            Command::Shutdown { server } => format!("shutdown sessions server {server}"),
            Command::ShowReady => "show ready".into(),
            Command::ShowConns { filter, limit } => format!("show conns {}limit {limit}", filter.words()),
            Command::AddServer(new) => new.line(),
            Command::DelServer { server } => format!("del server {server}"),
        }
    }
}

/// What a worker is asked to do to one of its servers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServerOp {
    State(AdminState),
    Weight(u32),
    /// Close every connection to it (at the pace of the backend's `close_spread`).
    Shutdown,
    /// `del server`: it takes no connection ever again and leaves the stats (it has none open; its
    /// index stays taken, so that nothing else moves).
    Remove,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(line: &str) -> Result<Option<Command>, String> {
        Command::parse(&line.split_whitespace().collect::<Vec<_>>())
    }

    #[test]
    fn each_command_parses_and_prints_back() {
        for line in [
            "reload",
            "upgrade",
            "upgrade /usr/sbin/ringproxy.new",
            "set server app/s1 state drain",
            "set server app/s1 state maint",
            "set server app/s1 state ready",
            "set server app/s1 weight 0",
            "set server app/s1 weight 256",
            "shutdown sessions server app/s1",
            "show conns limit 100",
            "show ready",
            "show conns app/s1 limit 7",
            "show conns frontend mqtt limit 100",
            "show conns app/s1 frontend mqtt client 10.1.2.3 limit 5",
            "show conns client 10.1.2.3:40000 limit 100",
            "show conns client [2001:db8::7]:40000 limit 100",
            "show conns client 2001:db8::7 limit 100",
            "add server app/s3 127.0.0.1:9000 weight 1",
            "add server app/s3 10.0.0.5:1883 source 10.0.1.1,10.0.1.2 weight 3 maxconn 500 slowstart 30s",
            "add server app/s3 10.0.0.5:1883 source 10.1.0.0/17,10.0.1.2 weight 1",
            "del server app/s3",
        ] {
            assert_eq!(parse(line).unwrap().unwrap().line(), line);
        }
        // A range is echoed as typed, and stands for every address in it.
        let Some(Command::AddServer(new)) = parse("add server app/s3 10.0.0.5:1883 source 10.1.0.0/16").unwrap() else {
            panic!("not an add server")
        };
        assert_eq!(new.sources.len(), 65_536);
        assert_eq!(new.sources[65_535].to_string(), "10.1.255.255");
        assert_eq!(
            parse("show conns").unwrap(),
            Some(Command::ShowConns { filter: ConnFilter::default(), limit: DEFAULT_LISTED })
        );
        // In any order.
        assert_eq!(
            parse("show conns limit 3 client 10.1.2.3 frontend f").unwrap().unwrap().line(),
            "show conns frontend f client 10.1.2.3 limit 3"
        );
        assert_eq!(parse("show info").unwrap(), None, "answered by the socket");
        assert!(!parse("show conns").unwrap().unwrap().changes_state());
        assert!(parse("shutdown sessions server a/b").unwrap().unwrap().changes_state());
    }

    #[test]
    fn a_client_matches_by_address_or_address_and_port_in_either_family_form() {
        let ip = |w: &str| ClientMatch::parse(w).unwrap();
        let client = |a: &str| Some(a.parse::<std::net::SocketAddr>().unwrap());
        assert!(ip("10.1.2.3").matches(client("10.1.2.3:40000")));
        assert!(ip("10.1.2.3").matches(client("[::ffff:10.1.2.3]:40000")), "a dual-stack listener's client");
        assert!(ip("10.1.2.3:40000").matches(client("10.1.2.3:40000")));
        assert!(!ip("10.1.2.3:40001").matches(client("10.1.2.3:40000")));
        assert!(!ip("10.1.2.4").matches(client("10.1.2.3:40000")));
        assert!(ip("[2001:db8::7]:1").matches(client("[2001:db8::7]:1")));
        assert!(!ip("10.1.2.3").matches(None), "a client whose address the engine did not look up");
    }

    #[test]
    fn bad_words_are_named() {
        for (line, want) in [
            ("set server app/s1 state up", "state \"up\" is not one of ready, drain, maint"),
            ("set server app/s1 weight 257", "weight \"257\" is not a whole number from 0 to 256"),
            ("set server app/s1 weight -1", "weight \"-1\""),
            ("set server app state drain", "\"app\" is not BACKEND/SERVER"),
            ("set server a/b/c state drain", "\"a/b/c\" is not BACKEND/SERVER"),
            ("set server app/s1", "usage: set server"),
            ("shutdown sessions app/s1", "usage: shutdown sessions server"),
            ("show conns limit 0", "limit \"0\""),
            ("show conns app/s1 limit", "usage: show conns"),
            ("show conns frontend", "usage: show conns"),
            ("show conns mqtt", "usage: show conns"),
            ("show conns client 10.1.2", "client \"10.1.2\" is not IP or IP:PORT"),
            ("show conns frontend a frontend b", "\"frontend\" is given twice"),
            ("show conns limit 1 limit 2", "\"limit\" is given twice"),
            ("show conns a/b c/d", "two servers given"),
            ("add server app/s3", "usage: add server"),
            ("add server app/s3 nowhere", "address"),
            ("add server app/s3 127.0.0.1:1 weight", "\"weight\" has no value"),
            ("add server app/s3 127.0.0.1:1 colour red", "unknown option \"colour\""),
            ("add server app/s3 127.0.0.1:1 source ::1", "not of the same address family"),
            ("add server app/s3 127.0.0.1:1 maxconn 0", "maxconn \"0\""),
            ("del server", "usage: del server"),
        ] {
            let e = parse(line).unwrap_err();
            assert!(e.contains(want), "{line}: {e}");
        }
    }
}
