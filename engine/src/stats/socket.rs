//! The stats socket: a Unix socket speaking a small line protocol, and its client.
//!
//! A client connects, writes one command line, reads the answer until the server closes. Commands:
//! `help`, `show info`, `show cores`, `show servers`, `show sources`, `show stat` (HAProxy-style
//! CSV), `show json` (everything, for `ringproxy stats`), `show prometheus`, and `reload`, whose
//! answer starts with a status line (`OK` or `FAIL`) that [`reload`] reads so no caller parses
//! prose. The socket is created inside a private directory and moved into place only once it has
//! the configured mode (0600 by default) and owner, so nobody connects with more rights than
//! configured, without touching the process-wide umask. A stale socket file left by a crashed
//! engine is replaced, a live one is refused.

use std::fs::DirBuilder;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::Sender;

use super::{EngineStats, prometheus, render};
use crate::privileges::Ids;

pub const HELP: &str = "\
commands (one per connection):
  help              this list
  show info         engine facts and totals, key: value
  show cores        the per-core table
  show servers      per-server and per-backend table
  show sources      per-core source IPs: ports in use and capacity
  show stat         CSV with HAProxy's column names
  show json         everything, as one JSON object
  show prometheus   the Prometheus text format
  reload            re-read the configuration file (like SIGHUP); answers OK or FAIL on the
                    first line, then the outcome
";

/// How a reload asked for through the socket ended, with the text for the operator.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReloadAnswer {
    /// The new configuration runs.
    Reloaded(String),
    /// Nothing changed.
    Refused(String),
}

impl ReloadAnswer {
    /// On the wire: a status line, then the text.
    fn encode(&self) -> String {
        match self {
            ReloadAnswer::Reloaded(text) => format!("OK\n{text}"),
            ReloadAnswer::Refused(text) => format!("FAIL\n{text}"),
        }
    }

    fn decode(answer: &str) -> Option<ReloadAnswer> {
        let (status, text) = answer.split_once('\n')?;
        match status {
            "OK" => Some(ReloadAnswer::Reloaded(text.to_owned())),
            "FAIL" => Some(ReloadAnswer::Refused(text.to_owned())),
            _ => None,
        }
    }
}

/// A reload request: the supervisor answers on the enclosed channel.
pub type ReloadRequest = Sender<ReloadAnswer>;

/// Answers one command line.
pub fn answer(command: &str, collect: &dyn Fn() -> EngineStats, reload: Option<&Sender<ReloadRequest>>) -> String {
    let words: Vec<&str> = command.split_whitespace().collect();
    match words.as_slice() {
        ["reload"] => ask_reload(reload).encode(),
        ["help"] | [] => HELP.to_string(),
        ["show", "info"] => render::info(&collect()),
        ["show", "cores"] => render::cores(&collect(), None),
        ["show", "servers"] => render::servers(&collect()),
        ["show", "sources"] => render::sources(&collect()),
        ["show", "stat"] => render::csv(&collect()),
        ["show", "json"] => serde_json::to_string(&collect()).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}")),
        ["show", "prometheus"] => prometheus::render(&collect()),
        _ => format!("unknown command \"{}\"\n{HELP}", command.trim()),
    }
}

/// Forwards a reload to the supervisor and waits for its outcome.
fn ask_reload(reload: Option<&Sender<ReloadRequest>>) -> ReloadAnswer {
    let Some(tx) = reload else {
        return ReloadAnswer::Refused("reload is not available on this socket\n".into());
    };
    let (reply_tx, reply_rx) = crossbeam_channel::bounded(1);
    if tx.send(reply_tx).is_err() {
        return ReloadAnswer::Refused("reload failed: the engine is shutting down\n".into());
    }
    (reply_rx.recv_timeout(Duration::from_secs(60)))
        .unwrap_or_else(|_| ReloadAnswer::Refused("reload: no answer within 60s\n".into()))
}

/// Why the stats socket could not be served.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("stats socket {}: another engine is answering on it; stop it or choose another path", .path.display())]
    InUse { path: PathBuf },
    #[error("stats socket {}: cannot remove the stale file: {source}", .path.display())]
    Stale { path: PathBuf, source: io::Error },
    /// Creating the socket file (its private directory, the bind, the move into place).
    #[error("stats socket {}: {source}", .path.display())]
    Create { path: PathBuf, source: io::Error },
    #[error("stats socket {}: chmod {mode:o}: {source}", .path.display())]
    Chmod { path: PathBuf, mode: u32, source: io::Error },
    #[error("stats socket {}: chown to {}:{}: {source}", .path.display(), .owner.uid, .owner.gid)]
    Chown { path: PathBuf, owner: Ids, source: io::Error },
    #[error("stats thread: {0}")]
    Thread(io::Error),
}

/// A running stats socket; removes its file and stops when dropped.
pub struct Server {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// Creates the socket at `path` with permission bits `mode` (and `owner`, when the engine will run
/// as another user) and serves it on a thread. `reload`, when given, is where the `reload` command
/// is forwarded.
pub fn serve(
    path: &Path,
    mode: u32,
    collect: impl Fn() -> EngineStats + Send + 'static,
    reload: Option<Sender<ReloadRequest>>,
    owner: Option<Ids>,
) -> Result<Server, ServeError> {
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(ServeError::InUse { path: path.to_owned() });
        }
        std::fs::remove_file(path).map_err(|source| ServeError::Stale { path: path.to_owned(), source })?;
    }
    let listener = bind_private(path, mode, owner)?;
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let thread = std::thread::Builder::new()
        .name("ringproxy-stats".into())
        .spawn(move || {
            for conn in listener.incoming() {
                if flag.load(Ordering::SeqCst) {
                    break;
                }
                if let Ok(conn) = conn {
                    let _ = handle(conn, &collect, reload.as_ref());
                }
            }
        })
        .map_err(ServeError::Thread)?;
    Ok(Server { path: path.to_owned(), stop, thread: Some(thread) })
}

/// Binds a Unix socket at `path` that nobody else can connect to before it has `mode` and `owner`:
/// it is bound inside a new 0700 directory beside `path`, given its mode and owner there, then
/// renamed into place. (A umask would do the same, but the umask is the whole process's, and
/// engines in one process, as in the tests, bind at the same time.)
fn bind_private(path: &Path, mode: u32, owner: Option<Ids>) -> Result<UnixListener, ServeError> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let create = |source| ServeError::Create { path: path.to_owned(), source };
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let dir = parent.join(format!(".ringproxy-{}-{n}", std::process::id()));
    let mut mkdir = DirBuilder::new();
    mkdir.mode(0o700);
    if let Err(e) = mkdir.create(&dir) {
        if e.kind() != io::ErrorKind::AlreadyExists {
            return Err(create(e));
        }
        // Left by a process that crashed while binding, and had this pid (a container's pid 1).
        std::fs::remove_dir_all(&dir).and_then(|()| mkdir.create(&dir)).map_err(create)?;
    }
    let bound = (|| {
        let inside = dir.join("s");
        let listener = UnixListener::bind(&inside).map_err(create)?;
        std::fs::set_permissions(&inside, std::fs::Permissions::from_mode(mode))
            .map_err(|source| ServeError::Chmod { path: path.to_owned(), mode, source })?;
        if let Some(owner) = owner {
            // The engine will run as this user: let it remove its socket at exit.
            std::os::unix::fs::chown(&inside, Some(owner.uid), Some(owner.gid))
                .map_err(|source| ServeError::Chown { path: path.to_owned(), owner, source })?;
        }
        std::fs::rename(&inside, path).map_err(create)?;
        Ok(listener)
    })();
    let _ = std::fs::remove_dir_all(&dir);
    bound
}

fn handle(
    conn: UnixStream,
    collect: &dyn Fn() -> EngineStats,
    reload: Option<&Sender<ReloadRequest>>,
) -> io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(2)))?;
    conn.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut line = String::new();
    BufReader::new(conn.try_clone()?).take(4096).read_line(&mut line)?;
    let mut conn = conn;
    conn.write_all(answer(&line, collect, reload).as_bytes())
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = UnixStream::connect(&self.path);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Why a client got no answer from a stats socket.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "cannot connect to the stats socket {}: {source} (is ringproxy running with global.stats.socket set to this \
         path, and do you have permission?)",
        .path.display()
    )]
    Connect { path: PathBuf, source: io::Error },
    /// Sending the command.
    #[error("{0}")]
    Send(io::Error),
    #[error("ringproxy at {} did not answer within {secs} s (its workers may be starved of CPU); try again", .path.display())]
    Timeout { path: PathBuf, secs: u64 },
    #[error("reading from {}: {source}", .path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("unexpected answer from {}: {detail}", .path.display())]
    Answer { path: PathBuf, detail: String },
}

/// Client side: sends `command` to the socket at `path` and returns the whole answer.
pub fn query(path: &Path, command: &str) -> Result<String, ClientError> {
    let mut s = UnixStream::connect(path).map_err(|source| ClientError::Connect { path: path.to_owned(), source })?;
    // A worker answers between two loop turns; starved of CPU (hundreds of thousands of busy
    // connections on few cores) that can take seconds, so wait long before giving up.
    let wait = Duration::from_secs(60);
    s.set_read_timeout(Some(wait)).map_err(ClientError::Send)?;
    s.write_all(format!("{command}\n").as_bytes()).map_err(ClientError::Send)?;
    let mut out = String::new();
    s.read_to_string(&mut out).map_err(|source| match source.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
            ClientError::Timeout { path: path.to_owned(), secs: wait.as_secs() }
        }
        _ => ClientError::Read { path: path.to_owned(), source },
    })?;
    Ok(out)
}

/// Client side: a full snapshot.
pub fn fetch(path: &Path) -> Result<EngineStats, ClientError> {
    let text = query(path, "show json")?;
    serde_json::from_str(&text).map_err(|e| ClientError::Answer { path: path.to_owned(), detail: e.to_string() })
}

/// Client side: asks the engine to reload, and how that ended.
pub fn reload(path: &Path) -> Result<ReloadAnswer, ClientError> {
    let text = query(path, "reload")?;
    ReloadAnswer::decode(&text)
        .ok_or_else(|| ClientError::Answer { path: path.to_owned(), detail: format!("no reload status in {text:?}") })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reload_answer_survives_the_wire() {
        for a in [ReloadAnswer::Reloaded("reloaded t.yaml: 2 workers\n".into()), ReloadAnswer::Refused("no\n".into())] {
            assert_eq!(ReloadAnswer::decode(&a.encode()), Some(a));
        }
        assert_eq!(ReloadAnswer::decode("reloaded t.yaml: 2 workers\n"), None, "a status line is required");
    }

    #[test]
    fn reload_without_a_supervisor_fails() {
        let text = answer("reload", &EngineStats::default, None);
        assert_eq!(text, "FAIL\nreload is not available on this socket\n");
    }
}
