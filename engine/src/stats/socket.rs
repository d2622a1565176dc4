//! The stats socket: a Unix socket speaking a small line protocol, and its client.
//!
//! A client connects, writes one command line, reads the answer until the server closes. Commands:
//! `help`, `show info`, `show cores`, `show servers`, `show sources`, `show stat` (HAProxy-style
//! CSV), `show json` (everything, for `ringproxy stats`), `show prometheus`. The socket is created
//! with the configured mode (0600 by default) before anything else can connect; a stale socket file
//! left by a crashed engine is replaced, a live one is refused.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use super::{EngineStats, prometheus, render};

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
  reload            re-read the configuration file (like SIGHUP); answers with the outcome
";

/// A reload request: the supervisor answers on the enclosed channel.
pub type ReloadRequest = crossbeam_channel::Sender<String>;

/// Answers one command line.
pub fn answer(
    command: &str,
    collect: &dyn Fn() -> EngineStats,
    reload: Option<&crossbeam_channel::Sender<ReloadRequest>>,
) -> String {
    let words: Vec<&str> = command.split_whitespace().collect();
    match words.as_slice() {
        ["reload"] => match reload {
            Some(tx) => {
                let (reply_tx, reply_rx) = crossbeam_channel::bounded(1);
                if tx.send(reply_tx).is_err() {
                    return "reload failed: the engine is shutting down\n".into();
                }
                reply_rx
                    .recv_timeout(Duration::from_secs(60))
                    .unwrap_or_else(|_| "reload: no answer within 60s\n".into())
            }
            None => "reload is not available on this socket\n".into(),
        },
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

/// A running stats socket; removes its file and stops when dropped.
pub struct Server {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// Creates the socket at `path` with permission bits `mode` and serves it on a thread.
/// `reload`, when given, is where the `reload` command is forwarded.
pub fn serve(
    path: &Path,
    mode: u32,
    collect: impl Fn() -> EngineStats + Send + 'static,
    reload: Option<crossbeam_channel::Sender<ReloadRequest>>,
    owner: Option<crate::privileges::Ids>,
) -> Result<Server, String> {
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(format!(
                "stats socket {}: another engine is answering on it; stop it or choose another path",
                path.display()
            ));
        }
        std::fs::remove_file(path)
            .map_err(|e| format!("stats socket {}: cannot remove the stale file: {e}", path.display()))?;
    }
    // Create the socket with no permissions for anyone but the owner, then set the configured mode:
    // at no point can another user connect with more rights than configured.
    // SAFETY: umask only swaps the process file-creation mask; called before worker threads exist.
    let old = unsafe { libc::umask(0o177) };
    let bound = UnixListener::bind(path);
    // SAFETY: restores the previous mask.
    unsafe { libc::umask(old) };
    let listener = bound.map_err(|e| format!("stats socket {}: {e}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| format!("stats socket {}: chmod {mode:o}: {e}", path.display()))?;
    if let Some(ids) = owner {
        // The engine will run as this user: let it remove its socket at exit.
        std::os::unix::fs::chown(path, Some(ids.uid), Some(ids.gid))
            .map_err(|e| format!("stats socket {}: chown to {}:{}: {e}", path.display(), ids.uid, ids.gid))?;
    }
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
        .map_err(|e| format!("stats thread: {e}"))?;
    Ok(Server { path: path.to_owned(), stop, thread: Some(thread) })
}

fn handle(
    conn: UnixStream,
    collect: &dyn Fn() -> EngineStats,
    reload: Option<&crossbeam_channel::Sender<ReloadRequest>>,
) -> std::io::Result<()> {
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

/// Client side: sends `command` to the socket at `path` and returns the whole answer.
pub fn query(path: &Path, command: &str) -> Result<String, String> {
    let mut s = UnixStream::connect(path).map_err(|e| {
        format!(
            "cannot connect to the stats socket {}: {e} (is ringproxy running with global.stats.socket set to this path, \
             and do you have permission?)",
            path.display()
        )
    })?;
    // A worker answers between two loop turns; starved of CPU (hundreds of thousands of busy
    // connections on few cores) that can take seconds, so wait long before giving up.
    let wait = Duration::from_secs(60);
    s.set_read_timeout(Some(wait)).map_err(|e| e.to_string())?;
    s.write_all(format!("{command}\n").as_bytes()).map_err(|e| e.to_string())?;
    let mut out = String::new();
    s.read_to_string(&mut out).map_err(|e| match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => format!(
            "ringproxy at {} did not answer within {} s (its workers may be starved of CPU); try again",
            path.display(),
            wait.as_secs()
        ),
        _ => format!("reading from {}: {e}", path.display()),
    })?;
    Ok(out)
}

/// Client side: a full snapshot.
pub fn fetch(path: &Path) -> Result<EngineStats, String> {
    let text = query(path, "show json")?;
    serde_json::from_str(&text).map_err(|e| format!("unexpected answer from {}: {e}", path.display()))
}
