//! Connection logs: one line per finished connection, off by default (`global.connection_log`).
//!
//! Workers never write to a file or a terminal themselves: each formats lines into its own buffer
//! and, when it is full or a second old, hands the buffer to the log thread over a channel and takes
//! an empty one back, so a slow disk or a blocked terminal never stalls the data path. Lines are
//! key=value, one per connection:
//!
//! `ts=2026-11-25T14:10:00.123Z worker=0 client=10.0.0.7:51234 frontend=mqtt server=mqtt/app1
//! source=192.168.8.1 wait_ms=0.012 connect_ms=0.041 total_ms=61234.007 bytes_in=812 bytes_out=1460
//! term=done`

use std::fs::OpenOptions;
use std::io::{self, Write};
use std::thread::JoinHandle;
use std::time::{SystemTime, UNIX_EPOCH};

use crossbeam_channel::{Receiver, Sender, bounded, unbounded};

use crate::config::LogTarget;

/// Flush a worker's buffer when it holds this much.
const FLUSH_BYTES: usize = 32 * 1024;
/// ... or when its oldest line is this old.
const FLUSH_MS: u64 = 1000;

/// The workers' end: where full buffers go and empty ones come back from.
#[derive(Clone)]
pub struct LogSink {
    full: Sender<Vec<u8>>,
    empty: Receiver<Vec<u8>>,
}

/// Starts the log thread for `target`. It exits once every sink is dropped, after writing all.
pub fn spawn(target: &LogTarget) -> io::Result<(LogSink, JoinHandle<()>)> {
    let mut out: Box<dyn Write + Send> = match target {
        LogTarget::Stdout => Box::new(io::stdout()),
        LogTarget::Stderr => Box::new(io::stderr()),
        LogTarget::File(path) => Box::new(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| io::Error::new(e.kind(), format!("connection log {}: {e}", path.display())))?,
        ),
    };
    let (full_tx, full_rx) = unbounded::<Vec<u8>>();
    let (empty_tx, empty_rx) = bounded::<Vec<u8>>(64);
    let thread = std::thread::Builder::new().name("ringproxy-log".into()).spawn(move || {
        for mut buf in full_rx.iter() {
            if out.write_all(&buf).is_err() {
                // A log that cannot be written must not take the proxy down; lines are dropped.
            }
            buf.clear();
            let _ = empty_tx.try_send(buf);
        }
        let _ = out.flush();
    })?;
    Ok((LogSink { full: full_tx, empty: empty_rx }, thread))
}

/// One worker's log buffer.
pub struct ConnLog {
    sink: LogSink,
    pub buf: Vec<u8>,
    oldest_ms: Option<u64>,
}

impl ConnLog {
    pub fn new(sink: LogSink) -> ConnLog {
        ConnLog { sink, buf: Vec::with_capacity(FLUSH_BYTES * 2), oldest_ms: None }
    }

    /// Marks that a line was added at `now_ms`.
    pub fn added(&mut self, now_ms: u64) {
        self.oldest_ms.get_or_insert(now_ms);
    }

    /// Hands the buffer to the log thread if it is full enough or old enough (or `force`).
    pub fn maybe_flush(&mut self, now_ms: u64, force: bool) {
        let due = self.oldest_ms.is_some_and(|t| now_ms >= t + FLUSH_MS);
        if self.buf.is_empty() || !(force || due || self.buf.len() >= FLUSH_BYTES) {
            return;
        }
        let next = self.sink.empty.try_recv().unwrap_or_else(|_| Vec::with_capacity(FLUSH_BYTES * 2));
        let full = std::mem::replace(&mut self.buf, next);
        let _ = self.sink.full.send(full);
        self.oldest_ms = None;
    }
}

/// Writes `ts=...` for now, in RFC 3339 UTC with milliseconds.
pub fn write_timestamp(out: &mut Vec<u8>, now: SystemTime) {
    let d = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, day) = civil_from_days(days as i64);
    let _ = write!(
        out,
        "ts={y:04}-{m:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    );
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

impl ConnLog {
    /// Appends the line of a connection that is being freed (closed for `reason`; `source`: the
    /// source IP it used toward its server).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn line(
        &mut self,
        worker: usize,
        cfg: &crate::config::Config,
        c: &crate::conn::Conn,
        reason: crate::conn::CloseReason,
        source: Option<std::net::IpAddr>,
        now_us: u64,
        now_ms: u64,
    ) {
        let out = &mut self.buf;
        let be = &cfg.backends[c.backend as usize];
        write_timestamp(out, SystemTime::now());
        let _ = write!(out, " worker={worker} client=");
        match c.client_addr {
            Some(a) => {
                let _ = write!(out, "{a}");
            }
            None => out.push(b'-'),
        }
        let _ = write!(out, " frontend={} server={}/", cfg.frontends[c.frontend as usize].name, be.name);
        let server = (c.server != crate::conn::NO_INDEX).then_some(c.server as usize);
        match server {
            Some(s) => out.extend_from_slice(be.servers[s].name.as_bytes()),
            None => out.push(b'-'),
        }
        out.extend_from_slice(b" source=");
        match source {
            Some(ip) => {
                let _ = write!(out, "{ip}");
            }
            None => out.push(b'-'),
        }
        let ms = |us: u64| us as f64 / 1000.0;
        let _ = write!(out, " wait_ms=");
        if server.is_some() {
            let _ = write!(out, "{:.3}", ms(u64::from(c.connect_after_us)));
        } else {
            out.push(b'-');
        }
        let _ = write!(out, " connect_ms=");
        if server.is_some() {
            let _ = write!(out, "{:.3}", ms(u64::from(c.connect_took_us)));
        } else {
            out.push(b'-');
        }
        let _ = writeln!(
            out,
            " total_ms={:.3} bytes_in={} bytes_out={} term={}",
            ms(now_us.saturating_sub(c.t_accept_us)),
            c.bytes_in,
            c.bytes_out,
            reason.as_str()
        );
        self.added(now_ms);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn timestamps() {
        let mut out = Vec::new();
        write_timestamp(&mut out, UNIX_EPOCH + Duration::from_millis(1_795_615_800_123));
        assert_eq!(String::from_utf8(out).unwrap(), "ts=2026-11-25T14:10:00.123Z");
        let mut out = Vec::new();
        write_timestamp(&mut out, UNIX_EPOCH + Duration::from_secs(951_782_400)); // 2000-02-29
        assert_eq!(String::from_utf8(out).unwrap(), "ts=2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn buffers_flow_to_the_writer_and_back() {
        let path = std::env::temp_dir().join(format!("ringproxy-log-test-{}", std::process::id()));
        let (sink, thread) = spawn(&LogTarget::File(path.clone())).unwrap();
        let mut log = ConnLog::new(sink);
        log.buf.extend_from_slice(b"line one\n");
        log.added(0);
        log.maybe_flush(10, false);
        assert!(!log.buf.is_empty(), "neither full nor old: kept");
        log.maybe_flush(1000, false);
        assert!(log.buf.is_empty(), "a second old: handed over");
        log.buf.extend_from_slice(b"line two\n");
        log.maybe_flush(1001, true);
        drop(log);
        thread.join().unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "line one\nline two\n");
        let _ = std::fs::remove_file(path);
    }
}
