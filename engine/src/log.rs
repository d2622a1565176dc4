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
//!
//! A log file is opened by [`open`] with the rights the engine runs with (after the privilege drop),
//! never through a symbolic link in any component of its path, and only if it is a regular file
//! with a single link or a FIFO. The log thread never stops the engine: when a write fails (disk
//! full, the FIFO's reader gone) it says so once, drops lines, and says so again when writing works
//! again.

use std::ffi::{CString, OsStr};
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Component, Path, PathBuf};
use std::thread::JoinHandle;
use std::time::{SystemTime, UNIX_EPOCH};

use crossbeam_channel::{Receiver, Sender, bounded, unbounded};

use crate::config::LogTarget;
use crate::sys;
use crate::watch::Watch;

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

/// Permission bits of a log file ringproxy creates (less the umask): client addresses are for the
/// service's user and group only.
const FILE_MODE: libc::mode_t = 0o640;

/// An opened log target, for [`spawn`].
pub struct Output {
    /// `stdout`, `stderr` or the path, for messages.
    name: String,
    out: Box<dyn Write + Send>,
}

/// Why a connection log could not be opened (each message names the path).
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(
        "connection log {}: {} is a symbolic link; ringproxy does not follow symbolic links on the way to its log: \
         give the real path",
        .path.display(), .link.display()
    )]
    Symlink { path: PathBuf, link: PathBuf },
    #[error("connection log {}: it is {what}; a connection log must be a regular file or a FIFO", .path.display())]
    Kind { path: PathBuf, what: &'static str },
    #[error(
        "connection log {}: the file has {links} hard links; a connection log must have one (another name of the \
         same file could be anywhere)",
        .path.display()
    )]
    HardLinks { path: PathBuf, links: u64 },
    #[error("connection log {}: no process has this FIFO open for reading; start its reader first", .path.display())]
    NoReader { path: PathBuf },
    #[error(
        "connection log {}: {source} (ringproxy opens it as uid {uid}, gid {gid}: give them write access to the \
         file, or to its directory to let ringproxy create it)",
        .path.display()
    )]
    Denied { path: PathBuf, source: io::Error, uid: libc::uid_t, gid: libc::gid_t },
    #[error("connection log {}: {source}", .path.display())]
    Io { path: PathBuf, source: io::Error },
}

/// Opens `target` (see the module documentation for what a file must be).
pub fn open(target: &LogTarget) -> Result<Output, OpenError> {
    match target {
        LogTarget::Stdout => Ok(Output { name: "stdout".into(), out: Box::new(io::stdout()) }),
        LogTarget::Stderr => Ok(Output { name: "stderr".into(), out: Box::new(io::stderr()) }),
        LogTarget::File(path) => Ok(Output { name: path.display().to_string(), out: Box::new(open_file(path)?) }),
    }
}

/// Walks `path` one directory at a time from a descriptor of the previous one, refusing symbolic
/// links (checked, then opened with O_NOFOLLOW, so a link swapped in between is refused too), and
/// opens the last component for appending, creating it when absent.
fn open_file(path: &Path) -> Result<File, OpenError> {
    let io = |source: io::Error| match source.raw_os_error() {
        Some(libc::EACCES | libc::EPERM) => {
            let (uid, gid) = sys::ids();
            OpenError::Denied { path: path.to_owned(), source, uid, gid }
        }
        _ => OpenError::Io { path: path.to_owned(), source },
    };
    let symlink = |link: &Path| OpenError::Symlink { path: path.to_owned(), link: link.to_owned() };
    let mut dir: Option<OwnedFd> = None;
    let mut walked = PathBuf::new();
    let mut parts = path.components().peekable();
    while let Some(part) = parts.next() {
        let name: &OsStr = match part {
            Component::RootDir => {
                dir = Some(sys::open_dir_at(None, c"/").map_err(io)?);
                walked.push("/");
                continue;
            }
            Component::CurDir | Component::Prefix(_) => continue,
            Component::ParentDir => OsStr::new(".."),
            Component::Normal(name) => name,
        };
        walked.push(name);
        let c_name = CString::new(name.as_bytes()).map_err(|e| io(e.into()))?;
        let at = dir.as_ref().map(|d| d.as_fd());
        let kind = match sys::file_type_at(at, &c_name) {
            Ok(kind) => Some(kind),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) && parts.peek().is_none() => None,
            Err(e) => return Err(io(e)),
        };
        if kind == Some(libc::S_IFLNK) {
            return Err(symlink(&walked));
        }
        if parts.peek().is_some() {
            dir = Some(sys::open_dir_at(at, &c_name).map_err(io)?);
            continue;
        }
        if let Some(kind) = kind.filter(|&k| k != libc::S_IFREG && k != libc::S_IFIFO) {
            return Err(OpenError::Kind { path: path.to_owned(), what: describe(kind) });
        }
        let file = sys::open_append_at(at, &c_name, FILE_MODE).map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => symlink(&walked),
            Some(libc::ENXIO) => OpenError::NoReader { path: path.to_owned() },
            _ => io(e),
        })?;
        let meta = file.metadata().map_err(io)?;
        return if meta.file_type().is_fifo() {
            Ok(file)
        } else if !meta.is_file() {
            Err(OpenError::Kind { path: path.to_owned(), what: describe(meta.mode() & libc::S_IFMT) })
        } else if meta.nlink() > 1 {
            Err(OpenError::HardLinks { path: path.to_owned(), links: meta.nlink() })
        } else {
            Ok(file)
        };
    }
    Err(OpenError::Kind { path: path.to_owned(), what: "a directory" })
}

/// "a directory", "a socket", ... for a file type (`S_IFMT` bits).
fn describe(kind: libc::mode_t) -> &'static str {
    match kind {
        libc::S_IFDIR => "a directory",
        libc::S_IFSOCK => "a socket",
        libc::S_IFCHR => "a character device",
        libc::S_IFBLK => "a block device",
        libc::S_IFLNK => "a symbolic link",
        _ => "not a regular file",
    }
}

/// Starts the log thread writing to `out`, watched by `watch`. It exits once every sink is
/// dropped, after writing all.
pub fn spawn(out: Output, watch: &Watch) -> io::Result<(LogSink, JoinHandle<()>)> {
    let Output { name, mut out } = out;
    let (full_tx, full_rx) = unbounded::<Vec<u8>>();
    let (empty_tx, empty_rx) = bounded::<Vec<u8>>(64);
    let thread = watch.spawn("ringproxy-log", move || {
        // Lines dropped since writing last failed; `None` while writes succeed.
        let mut dropped: Option<usize> = None;
        for mut buf in full_rx.iter() {
            match (out.write_all(&buf), dropped) {
                (Ok(()), None) => {}
                (Ok(()), Some(n)) => {
                    eprintln!("ringproxy: connection log {name}: writing again; {n} line(s) were dropped");
                    dropped = None;
                }
                (Err(e), None) => {
                    let hint = if e.kind() == io::ErrorKind::BrokenPipe { " (its reader is gone)" } else { "" };
                    eprintln!(
                        "ringproxy: connection log {name}: cannot write: {e}{hint}; lines are dropped until it can \
                         write again"
                    );
                    dropped = Some(lines(&buf));
                }
                (Err(_), Some(n)) => dropped = Some(n + lines(&buf)),
            }
            buf.clear();
            let _ = empty_tx.try_send(buf);
        }
        let _ = out.flush();
        Ok::<(), io::Error>(())
    })?;
    Ok((LogSink { full: full_tx, empty: empty_rx }, thread))
}

fn lines(buf: &[u8]) -> usize {
    buf.iter().filter(|&&b| b == b'\n').count()
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

    /// How long until the buffer is old enough to be handed over (None: it is empty). The worker
    /// wakes for it: a connection's log line waits at most `FLUSH_MS` on an otherwise idle worker.
    pub fn flush_in(&self, now_ms: u64) -> Option<u64> {
        self.oldest_ms.map(|t| (t + FLUSH_MS).saturating_sub(now_ms))
    }

    /// Hands the buffer to the log thread if it is full enough or old enough (or `force`).
    pub fn maybe_flush(&mut self, now_ms: u64, force: bool) {
        let due = self.flush_in(now_ms) == Some(0);
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
    use std::os::unix::fs::OpenOptionsExt;
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
        let (sink, thread) = spawn(open(&LogTarget::File(path.clone())).unwrap(), &Watch::detached()).unwrap();
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

    /// A fresh directory for one test.
    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ringproxy-log-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn refused(path: &Path) -> String {
        match open(&LogTarget::File(path.to_owned())) {
            Ok(_) => panic!("{} was opened", path.display()),
            Err(e) => e.to_string(),
        }
    }

    /// Review 6c: no symbolic link is followed, in the last component or before it, and only a
    /// regular file with one link or a FIFO is written to.
    #[test]
    fn opens_only_real_regular_files_and_fifos_without_following_links() {
        let d = dir("open");
        let target = d.join("target");
        std::fs::write(&target, "untouched\n").unwrap();
        std::os::unix::fs::symlink(&target, d.join("link.log")).unwrap();
        let e = refused(&d.join("link.log"));
        assert!(e.contains("link.log is a symbolic link"), "{e}");
        std::os::unix::fs::symlink(d.join("nowhere/created.log"), d.join("dangling.log")).unwrap();
        assert!(refused(&d.join("dangling.log")).contains("is a symbolic link"));
        std::fs::create_dir(d.join("real")).unwrap();
        std::os::unix::fs::symlink(d.join("real"), d.join("linked-dir")).unwrap();
        let e = refused(&d.join("linked-dir/c.log"));
        assert!(e.contains(&format!("{} is a symbolic link", d.join("linked-dir").display())), "{e}");
        assert!(!d.join("real/c.log").exists(), "nothing created through the linked directory");
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "untouched\n");
        assert!(!d.join("nowhere").exists());

        std::fs::hard_link(&target, d.join("hard.log")).unwrap();
        assert!(refused(&d.join("hard.log")).contains("has 2 hard links"));
        assert!(refused(&d.join("real")).contains("it is a directory"));
        assert!(refused(Path::new("/dev/null")).contains("it is a character device"));
        assert!(refused(&d.join("missing/c.log")).contains("No such file or directory"));

        let fifo = d.join("fifo");
        let c_fifo = CString::new(fifo.as_os_str().as_bytes()).unwrap();
        // SAFETY: mkfifo reads the NUL-terminated path, alive across the call.
        assert_eq!(unsafe { libc::mkfifo(c_fifo.as_ptr(), 0o600) }, 0);
        assert!(refused(&fifo).contains("no process has this FIFO open for reading"));
        let reader = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(&fifo).unwrap();
        assert!(open(&LogTarget::File(fifo.clone())).is_ok(), "a FIFO with a reader");
        drop(reader);

        // Created when absent (relative paths too), and appended to.
        let created = d.join("real/new.log");
        let mut out = open(&LogTarget::File(created.clone())).unwrap().out;
        out.write_all(b"one\n").unwrap();
        let mut out = open(&LogTarget::File(created.clone())).unwrap().out;
        out.write_all(b"two\n").unwrap();
        assert_eq!(std::fs::read_to_string(&created).unwrap(), "one\ntwo\n");
        let _ = std::fs::remove_dir_all(d);
    }
}
