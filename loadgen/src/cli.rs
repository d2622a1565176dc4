//! Command-line interface: every mode, flag and value parser (durations like
//! `30s`/`500ms`, rates like `5000/s`, sizes like `128KiB`).
//!
//! Invariant: everything a user can type is validated here or in the mode's
//! setup with a message that says what to change; nothing past parsing
//! panics on user input. The hidden `--child I/K` flag marks a worker
//! process started by [`crate::spawn`].

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Parser, Debug)]
#[command(
    name = "ringload",
    version,
    about = "io_uring load generator and test backends bundled with ringproxy",
    after_help = "Exit codes: 0 ok; 1 lost or corrupted messages (hold: or heartbeats late after --latency-after); 2 usage or setup error; 3 connection failures or drops; 130 interrupted."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run test backends: echo back, discard (sink) or stream out (source).
    Serve(ServeArgs),
    /// Open N connections, keep them, heartbeat each one and check the echo.
    Hold(HoldArgs),
    /// Connect, send, read the echo, close, as fast as C loops can.
    Rate(RateArgs),
    /// Bulk transfer over S streams; Gbit/s per direction.
    Throughput(ThroughputArgs),
    /// Fixed-rate request/response over persistent connections (coordinated-omission corrected).
    Latency(LatencyArgs),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ServeMode {
    /// Send back every byte received.
    Echo,
    /// Read and discard everything.
    Sink,
    /// Stream data out as fast as the peer reads (and discard what it sends).
    Source,
}

#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    /// Address to listen on (repeatable; port 0 picks a free port, printed on stdout).
    #[arg(long = "listen", required = true, value_parser = parse_addr)]
    pub listen: Vec<SocketAddr>,
    #[arg(long, value_enum, default_value = "echo")]
    pub mode: ServeMode,
    /// Worker threads, each with its own io_uring and SO_REUSEPORT listener;
    /// each holds up to RLIMIT_NOFILE connections. Default: number of CPUs.
    #[arg(long)]
    pub workers: Option<usize>,
    /// Stop after this long (default: run until Ctrl-C / SIGTERM).
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// TEST AID: in echo mode, flip one byte of the echo every N bytes echoed
    /// (per worker), to check that clients detect corruption.
    #[arg(long, value_name = "N")]
    pub corrupt_every: Option<u64>,
    /// Once every listener is bound, write PATH: one line of JSON with the
    /// pid and the bound addresses (ringproxy's --ready-file shape; removed
    /// at exit).
    #[arg(long, value_name = "PATH")]
    pub ready_file: Option<PathBuf>,
}

/// Flags shared by every client mode.
#[derive(Args, Debug, Clone)]
pub struct ClientArgs {
    /// Address to connect to (repeatable or comma-separated; connections are spread evenly).
    #[arg(long = "target", required = true, value_delimiter = ',', value_parser = parse_addr)]
    pub targets: Vec<SocketAddr>,
    /// How long the measurement runs (e.g. 30s, 2m, 500ms); default 60s for
    /// hold, 10s for the other modes. The run always stops by itself.
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Source addresses: list, A-B range or CIDR (e.g. 127.0.1.0/28). Spreads
    /// connections over them with IP_BIND_ADDRESS_NO_PORT.
    #[arg(long)]
    pub sources: Option<String>,
    /// Give up on a connect after this long (counted as a timeout failure).
    #[arg(long, value_parser = parse_duration, default_value = "5s")]
    pub connect_timeout: Duration,
    /// Worker threads per process (default: CPUs divided among the processes).
    #[arg(long)]
    pub workers: Option<usize>,
    /// Connections one process may hold; more are split over several
    /// processes. Default: RLIMIT_NOFILE minus a reserve of 200.
    #[arg(long)]
    pub fds_per_process: Option<u64>,
    /// Print one JSON object (the final report) on stdout instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Write a picture of the run: FILE.svg or FILE.html.
    #[arg(long, value_name = "FILE")]
    pub report: Option<PathBuf>,
    /// Do not show the live progress line even on a terminal.
    #[arg(long)]
    pub no_progress: bool,
    /// Internal: this process is worker process I of K started by a parent ringload.
    #[arg(long, hide = true, value_parser = parse_child)]
    pub child: Option<(usize, usize)>,
}

/// Where in the heartbeat interval a held connection's heartbeats fall (`hold --phase`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Phase {
    /// Each connection at its own point of the interval: an even rate over the run.
    Spread,
    /// One interval after the connection was established (then every interval).
    Connect,
}

#[derive(Args, Debug, Clone)]
pub struct HoldArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// Connections to open and keep.
    #[arg(long)]
    pub conns: u64,
    /// Connection attempts per second while ramping up (e.g. 5000/s).
    #[arg(long, value_parser = parse_rate, default_value = "10000/s")]
    pub ramp: f64,
    /// Interval between heartbeats on each connection.
    #[arg(long, value_parser = parse_duration, default_value = "30s")]
    pub heartbeat: Duration,
    /// Where in the interval each connection's heartbeats fall. `spread`: connection i of N at
    /// i/N of the way through it (to the millisecond), whenever it was established, so the
    /// heartbeats of the run come at an even rate, as from clients that connected over hours;
    /// `connect`: one interval after it was established, so connections established together
    /// (a ramp's burst, a reconnect storm) heartbeat together from then on. Either way the
    /// first heartbeat goes as soon as the connection is established.
    #[arg(long, value_enum, default_value = "spread")]
    pub phase: Phase,
    /// A warm-up (e.g. the ramp): the round-trip times of heartbeats sent this long after the
    /// start or later are recorded, and only their late echoes fail the run (those sent before
    /// are counted apart, `late_in_warmup`); every heartbeat is still checked, and one never
    /// echoed is lost.
    #[arg(long, value_parser = parse_duration, default_value = "0s")]
    pub latency_after: Duration,
    /// Like a real client, dial again this long after a held connection ended (closed or reset by
    /// the other side) or a connect failed; counted as reconnects. The run then passes when every
    /// planned connection is open at the end (drops are expected, not errors).
    #[arg(long, value_parser = parse_duration)]
    pub reconnect: Option<Duration>,
}

#[derive(Args, Debug, Clone)]
pub struct RateArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// Connection loops running at once.
    #[arg(long, default_value_t = 64)]
    pub concurrency: u64,
    /// Request size in bytes (at least 16).
    #[arg(long, value_parser = parse_size, default_value = "64")]
    pub size: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Direction {
    /// Client sends (pair with `serve --mode sink`).
    Up,
    /// Client receives (pair with `serve --mode source`).
    Down,
    /// Both at once (pair with `serve --mode source` or `echo`).
    Both,
}

#[derive(Args, Debug, Clone)]
pub struct ThroughputArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// Parallel TCP streams.
    #[arg(long, default_value_t = 1)]
    pub streams: u64,
    #[arg(long, value_enum, default_value = "up")]
    pub direction: Direction,
    /// Bytes per send/recv call.
    #[arg(long, value_parser = parse_size, default_value = "256KiB")]
    pub chunk: u64,
}

#[derive(Args, Debug, Clone)]
pub struct LatencyArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// Persistent connections.
    #[arg(long, default_value_t = 16)]
    pub conns: u64,
    /// Total requests per second over all connections (e.g. 20000 or 20000/s).
    #[arg(long, value_parser = parse_rate)]
    pub rate: f64,
    /// Request size in bytes (at least 16).
    #[arg(long, value_parser = parse_size, default_value = "64")]
    pub size: u64,
}

fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = s.parse() {
        return Ok(a);
    }
    s.to_socket_addrs()
        .map_err(|e| format!("{s:?} is not HOST:PORT ({e})"))?
        .next()
        .ok_or_else(|| format!("{s:?} resolves to no address"))
}

/// `30s`, `500ms`, `2m`, `1h`, `10us` or a plain number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let v: f64 = num.parse().map_err(|_| format!("{s:?} is not a duration (try 30s, 500ms, 2m)"))?;
    let secs = match unit.trim() {
        "" | "s" => v,
        "ms" => v / 1e3,
        "us" | "µs" => v / 1e6,
        "m" | "min" => v * 60.0,
        "h" => v * 3600.0,
        u => {
            return Err(format!("unknown duration unit {u:?} in {s:?} (use s, ms, us, m or h)"));
        }
    };
    if !secs.is_finite() || !(0.0..=365.0 * 86400.0).contains(&secs) {
        return Err(format!("duration {s:?} is out of range"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// `5000/s`, `5000`, `300/m`: events per second.
pub fn parse_rate(s: &str) -> Result<f64, String> {
    let s = s.trim();
    let (num, per) = match s.split_once('/') {
        Some((n, p)) => (n, p.trim()),
        None => (s, "s"),
    };
    let v: f64 = num.trim().parse().map_err(|_| format!("{s:?} is not a rate (try 5000/s)"))?;
    let v = match per {
        "s" => v,
        "m" | "min" => v / 60.0,
        u => return Err(format!("unknown rate unit /{u} in {s:?} (use /s or /m)")),
    };
    if !v.is_finite() || v <= 0.0 {
        return Err(format!("rate {s:?} must be positive"));
    }
    Ok(v)
}

/// `64`, `4K`/`4KiB` (1024), `1M`/`1MiB`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let v: u64 = num.parse().map_err(|_| format!("{s:?} is not a size (try 64, 16KiB, 1MiB)"))?;
    let mul = match unit.trim() {
        "" | "B" => 1,
        "K" | "KiB" | "k" | "KB" => 1024,
        "M" | "MiB" | "MB" => 1024 * 1024,
        u => return Err(format!("unknown size unit {u:?} in {s:?} (use KiB or MiB)")),
    };
    v.checked_mul(mul)
        .filter(|&b| b > 0 && b <= 64 * 1024 * 1024)
        .ok_or_else(|| format!("size {s:?} must be between 1 byte and 64MiB"))
}

fn parse_child(s: &str) -> Result<(usize, usize), String> {
    let (i, k) = s.split_once('/').ok_or("expected I/K")?;
    let i: usize = i.parse().map_err(|_| "bad child index")?;
    let k: usize = k.parse().map_err(|_| "bad child count")?;
    if k == 0 || i >= k {
        return Err("child index out of range".into());
    }
    Ok((i, k))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_rates_sizes() {
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("1.5").unwrap(), Duration::from_millis(1500));
        assert!(parse_duration("fast").is_err());
        assert!(parse_duration("3 weeks").is_err());
        assert_eq!(parse_rate("5000/s").unwrap(), 5000.0);
        assert_eq!(parse_rate("600/m").unwrap(), 10.0);
        assert!(parse_rate("0/s").is_err());
        assert_eq!(parse_size("256KiB").unwrap(), 262_144);
        assert_eq!(parse_size("64").unwrap(), 64);
        assert!(parse_size("0").is_err());
        assert_eq!(parse_child("2/5").unwrap(), (2, 5));
        assert!(parse_child("5/5").is_err());
    }

    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
