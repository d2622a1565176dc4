//! The stats socket: a Unix socket speaking a small line protocol, and its client.
//!
//! A client connects, writes one command line, reads the answer until the server closes. Commands:
//! `help`, `show info`, `show cores`, `show frontends`, `show servers`, `show sources`, `show stat`
//! (HAProxy-style CSV), `show json` (everything, for `ringproxy stats`), `show prometheus`, and
//! those of the runtime API (admin.rs: `show conns`, `set server`, `shutdown sessions`, `reload`),
//! whose answer starts with a status line (`OK` or `FAIL`) that [`command`] reads so no caller
//! parses prose.
//! The admin socket takes them all; the stats socket refuses those that change state. Clients are
//! served at once, each within deadlines and under a cap (`serve`).
//!
//! The socket file is made so that nobody connects with more rights than configured and, when the
//! engine starts as root, no path another user can swap is ever followed (review items 6d, 1i).
//! What is at the configured path is looked at first, without following it: nothing, or a socket
//! nobody answers on (left by a crashed engine, removed), is fine; a live socket, or anything that
//! is not a socket (a typo naming the configuration file), is refused and left untouched. The
//! socket is then bound in a new 0700 directory beside the path, which the engine checks is its own
//! and from then on reaches only through its open descriptor (`/proc/self/fd/N`), so the directory
//! being renamed or replaced by whoever can write the parent changes nothing. Its mode and owner are
//! set in there, where nobody else can add or swap an entry, before it is linked into place with
//! link(2), which never replaces what is at the path. The umask is not used: it is the whole
//! process's, and engines in one process (the tests) bind at once. At exit the file is removed only
//! if it is still this socket.

use crate::stats::Detail;
use crate::watch::Watch;
use std::fs::{DirBuilder, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;

use crate::admin::Command;

use super::{EngineStats, prometheus, render, serve};
use crate::privileges::Ids;

pub const HELP: &str = "\
commands (one per connection):
  help              this list
  show info         engine facts and totals, key: value
  show cores        the per-core table
  show frontends    per-frontend table: connections, rates, bytes, refusals, limits
  show servers      per-server and per-backend table
  show sources      per-core source IPs: ports in use and capacity
  show stat         CSV with HAProxy's column names
  show json         everything, as one JSON object
  show prometheus   the Prometheus text format
  show conns [BACKEND/SERVER] [frontend NAME] [client IP[:PORT]] [limit N]
                    open connections, one per line (100 unless limit says, at most 10000);
                    those to the server, of the frontend, from the client when given
admin socket only (global.stats.admin_socket):
  set server BACKEND/SERVER state ready|drain|maint
                    drain and maint take no new connection (open ones continue); ready again
                    ramps up over the server's slowstart
  set server BACKEND/SERVER weight N
                    0 to 256; 0 takes no new connection
  shutdown sessions server BACKEND/SERVER
                    close its connections (over the backend's close_spread)
  add server BACKEND/SERVER ADDRESS:PORT [source IP[,IP...]] [weight N] [maxconn N] [slowstart T]
                    a new server, balanced to at once, checked like the backend's others
  del server BACKEND/SERVER
                    remove a server that has no connection left
  show ready        OK when this host should get new connections (every frontend's backend has a
                    server up and ready, not going away); FAIL and why otherwise: for a routing
                    daemon's health check (`ringproxy cmd show ready` exits 0 or 1)
  reload            re-read the configuration file (like SIGHUP); runtime changes are dropped
                    and established connections move to the new configuration
  upgrade [BINARY]  start BINARY (default: this program's path) with the same arguments and hand
                    it the listening sockets, then every established connection (like SIGUSR2)
answers of show conns and of the admin commands start with a status line, OK or FAIL
";

/// How a command carried out by the supervisor ended, with the text for the operator.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    /// Done (for a reload: the new configuration runs).
    Ok(String),
    /// Refused: nothing changed.
    Fail(String),
}

impl Answer {
    /// On the wire: a status line, then the text.
    fn encode(&self) -> String {
        match self {
            Answer::Ok(text) => format!("OK\n{text}"),
            Answer::Fail(text) => format!("FAIL\n{text}"),
        }
    }

    fn decode(answer: &str) -> Option<Answer> {
        let (status, text) = answer.split_once('\n')?;
        match status {
            "OK" => Some(Answer::Ok(text.to_owned())),
            "FAIL" => Some(Answer::Fail(text.to_owned())),
            _ => None,
        }
    }
}

/// A command for the supervisor: it answers on `reply`.
pub struct Request {
    pub command: Command,
    pub reply: Sender<Answer>,
}

/// Where a socket hands the commands the supervisor answers: its channel, and its doorbell, rung
/// after each command so that the supervisor's loop takes it at once rather than at its next tick
/// (100 ms: a service-discovery agent sending hundreds of `add server` / `del server` would wait
/// that long for each).
#[derive(Clone)]
pub struct Requests {
    pub tx: Sender<Request>,
    pub bell: std::sync::Arc<crate::sys::EventFd>,
}

/// What a socket may be asked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    /// Reads only (`global.stats.socket`).
    Read,
    /// Reads and changes (`global.stats.admin_socket`).
    Admin,
}

/// How long a command handed to the supervisor may take to be answered.
const ASK_DEADLINE: Duration = Duration::from_secs(60);

/// Answers one command line. Commands for the supervisor go to `requests` (when this socket has a
/// supervisor behind it): their answer comes later, on the channel returned.
fn answer(
    command: &str,
    collect: &dyn Fn(Detail) -> EngineStats,
    requests: Option<&Requests>,
    level: Level,
) -> serve::Reply<Answer> {
    let words: Vec<&str> = command.split_whitespace().collect();
    let now = |a: Answer| serve::Reply::Now(a.encode().into_bytes());
    match Command::parse(&words) {
        Ok(Some(cmd)) if cmd.changes_state() && level == Level::Read => {
            return now(Answer::Fail(format!(
                "\"{}\" changes the engine: this socket is read-only; send it to the admin socket \
                 (global.stats.admin_socket)\n",
                words[0]
            )));
        }
        Ok(Some(cmd)) => return ask(requests, cmd).unwrap_or_else(now),
        Err(why) => return now(Answer::Fail(format!("{why}\n"))),
        Ok(None) => {}
    }
    serve::Reply::Now(view(&words, command, collect).into_bytes())
}

/// The answer to a command the socket answers itself (a view of the statistics, or help).
fn view(words: &[&str], command: &str, collect: &dyn Fn(Detail) -> EngineStats) -> String {
    match words {
        ["help"] | [] => HELP.to_string(),
        // (The two views without server rows do not have the workers copy them.)
        ["show", "info"] => render::info(&collect(Detail::Totals)),
        ["show", "cores"] => render::cores(&collect(Detail::Totals), None),
        ["show", "frontends"] => render::frontends(&collect(Detail::Totals), None),
        ["show", "servers"] => render::servers(&collect(Detail::Servers)),
        ["show", "sources"] => render::sources(&collect(Detail::Full)),
        ["show", "stat"] => render::csv(&collect(Detail::Servers)),
        ["show", "json"] => {
            serde_json::to_string(&collect(Detail::Full)).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
        }
        ["show", "prometheus"] => prometheus::render(&collect(Detail::Full)),
        _ => Answer::Fail(format!("unknown command \"{}\"\n{HELP}", command.trim())).encode(),
    }
}

/// Hands `command` to the supervisor: its outcome will come on the channel returned (by
/// [`ASK_DEADLINE`]). `Err`: refused at once.
fn ask(requests: Option<&Requests>, command: Command) -> Result<serve::Reply<Answer>, Answer> {
    let Some(to) = requests else {
        return Err(Answer::Fail(format!("{} is not available on this socket\n", command.line())));
    };
    let (reply, reply_rx) = crossbeam_channel::bounded(1);
    if to.tx.send(Request { command, reply }).is_err() {
        return Err(Answer::Fail("the engine is shutting down\n".into()));
    }
    to.bell.signal();
    Ok(serve::Reply::Later(reply_rx, Instant::now() + ASK_DEADLINE))
}

/// The line protocol as `serve` runs it.
struct Lines<C> {
    collect: C,
    requests: Option<Requests>,
    level: Level,
}

impl<C: Fn(Detail) -> EngineStats + Send + 'static> serve::Protocol for Lines<C> {
    const MAX_REQUEST: usize = 4096;

    fn complete(buf: &[u8]) -> bool {
        buf.contains(&b'\n')
    }

    /// The first line, if it is text.
    fn request(buf: &[u8]) -> Option<String> {
        let line = buf.split(|&b| b == b'\n').next().unwrap_or_default();
        std::str::from_utf8(line).ok().map(|l| l.trim().to_owned())
    }

    type Later = Answer;

    fn answer(&self, request: &str) -> serve::Reply<Answer> {
        answer(request, &self.collect, self.requests.as_ref(), self.level)
    }

    fn settle(&self, answer: Option<Answer>) -> Vec<u8> {
        let answer = answer.unwrap_or_else(|| {
            Answer::Fail(format!("no answer within {}s, or the engine is shutting down\n", ASK_DEADLINE.as_secs()))
        });
        answer.encode().into_bytes()
    }
}

/// Why the stats socket could not be served.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("stats socket {}: another engine is answering on it; stop it or choose another path", .path.display())]
    InUse { path: PathBuf },
    #[error(
        "stats socket {}: {kind} is there, not a socket. ringproxy replaces only a stale socket, so it left it \
         untouched: set global.stats.socket to a path of its own (e.g. /run/ringproxy/ringproxy.sock)",
        .path.display()
    )]
    NotASocket { path: PathBuf, kind: &'static str },
    #[error("stats socket {}: cannot remove the stale socket: {source}", .path.display())]
    Stale { path: PathBuf, source: io::Error },
    #[error("stats socket {}: a file appeared there while the socket was being created; nothing was replaced", .path.display())]
    Taken { path: PathBuf },
    /// Creating the socket file (its private directory, the bind, the link into place).
    #[error("stats socket {}: {source}", .path.display())]
    Create { path: PathBuf, source: io::Error },
    #[error("stats socket {}: chmod {mode:o}: {source}", .path.display())]
    Chmod { path: PathBuf, mode: u32, source: io::Error },
    #[error("stats socket {}: chown to {}:{}: {source}", .path.display(), .owner.uid, .owner.gid)]
    Chown { path: PathBuf, owner: Ids, source: io::Error },
    #[error("stats thread: {0}")]
    Thread(io::Error),
}

/// What is at the stats socket's path before the engine creates its socket there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Occupant {
    Nothing,
    /// A socket: replaced if nobody answers on it, else refused.
    Socket,
    /// Anything else (`"a regular file"`, `"a directory"`, ...): refused, never touched.
    Other(&'static str),
    /// The path cannot be looked at (the error says why).
    Unknown(String),
}

/// Looks at `path` without following it.
pub fn occupant(path: &Path) -> Occupant {
    let kind = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta.file_type(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Occupant::Nothing,
        Err(e) => return Occupant::Unknown(e.to_string()),
    };
    match () {
        _ if kind.is_socket() => Occupant::Socket,
        _ if kind.is_file() => Occupant::Other("a regular file"),
        _ if kind.is_dir() => Occupant::Other("a directory"),
        _ if kind.is_symlink() => Occupant::Other("a symbolic link"),
        _ if kind.is_fifo() => Occupant::Other("a FIFO"),
        _ if kind.is_char_device() || kind.is_block_device() => Occupant::Other("a device"),
        _ => Occupant::Other("a file that is not a socket"),
    }
}

/// A socket file, by identity: removed at exit only if the path still names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileId {
    dev: u64,
    ino: u64,
}

impl FileId {
    fn of(path: &Path) -> Option<FileId> {
        std::fs::symlink_metadata(path).ok().map(|m| FileId { dev: m.dev(), ino: m.ino() })
    }
}

/// A running stats socket; stops, then removes its file (if it is still there), when dropped.
pub struct Server {
    path: PathBuf,
    file: FileId,
    running: Option<serve::Running>,
    /// A copy of the listening socket, for a binary upgrade to hand to the new process.
    listener: std::os::fd::OwnedFd,
    /// Handed over: stop serving, but leave the file to the new process.
    disowned: bool,
}

impl Server {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The listening socket (a binary upgrade hands a copy to the new process).
    pub fn listener(&self) -> std::os::fd::BorrowedFd<'_> {
        std::os::fd::AsFd::as_fd(&self.listener)
    }

    /// Stops serving without removing the socket's file: a new process serves it now.
    pub fn disown(mut self) {
        self.disowned = true;
    }

    /// Accepts no more clients (a new process shares the socket and takes them) and answers
    /// those it has; [`Server::quiet`] once it has.
    pub fn stop_accepting(&self) {
        if let Some(r) = &self.running {
            r.stop_accepting();
        }
    }

    pub fn quiet(&self) -> bool {
        self.running.as_ref().is_none_or(|r| r.quiet())
    }

    pub fn resume_accepting(&self) {
        if let Some(r) = &self.running {
            r.resume_accepting();
        }
    }
}

/// Serves a stats socket another process created and handed over (binary upgrade): the same
/// listening socket, the file at `path` as it is.
pub fn serve_inherited(
    path: &Path,
    listener: std::os::fd::OwnedFd,
    collect: impl Fn(Detail) -> EngineStats + Send + 'static,
    requests: Option<Requests>,
    level: Level,
    watch: &Watch,
) -> Result<Server, ServeError> {
    let create = |source| ServeError::Create { path: path.to_owned(), source };
    let file = FileId::of(path).ok_or_else(|| create(io::Error::other("the handed-over socket's file is gone")))?;
    let copy = listener.try_clone().map_err(create)?;
    let listener = UnixListener::from(listener);
    let name = if level == Level::Admin { "ringproxy-admin" } else { "ringproxy-stats" };
    let running =
        serve::start(name, listener, Lines { collect, requests, level }, watch).map_err(ServeError::Thread)?;
    Ok(Server { path: path.to_owned(), file, running: Some(running), listener: copy, disowned: false })
}

/// Creates the socket at `path` with permission bits `mode` (and `owner`, when the engine will run
/// as another user) and serves it at `level`. `requests`, when given, is where the commands the
/// supervisor carries out are forwarded.
pub fn serve(
    path: &Path,
    mode: u32,
    collect: impl Fn(Detail) -> EngineStats + Send + 'static,
    requests: Option<Requests>,
    level: Level,
    owner: Option<Ids>,
    watch: &Watch,
) -> Result<Server, ServeError> {
    claim(path)?;
    let (listener, file) = bind_private(path, mode, owner, &|_, _| {})?;
    let copy = match std::os::fd::AsFd::as_fd(&listener).try_clone_to_owned() {
        Ok(c) => c,
        Err(source) => {
            remove_if_ours(path, file);
            return Err(ServeError::Create { path: path.to_owned(), source });
        }
    };
    let name = if level == Level::Admin { "ringproxy-admin" } else { "ringproxy-stats" };
    match serve::start(name, listener, Lines { collect, requests, level }, watch) {
        Ok(running) => {
            Ok(Server { path: path.to_owned(), file, running: Some(running), listener: copy, disowned: false })
        }
        Err(e) => {
            remove_if_ours(path, file);
            Err(ServeError::Thread(e))
        }
    }
}

/// Makes room at `path`: nothing there, or a stale socket (removed). Anything else is refused.
fn claim(path: &Path) -> Result<(), ServeError> {
    match occupant(path) {
        Occupant::Nothing => Ok(()),
        Occupant::Other(kind) => Err(ServeError::NotASocket { path: path.to_owned(), kind }),
        Occupant::Unknown(e) => Err(ServeError::Create { path: path.to_owned(), source: io::Error::other(e) }),
        Occupant::Socket => match UnixStream::connect(path) {
            Ok(_) => Err(ServeError::InUse { path: path.to_owned() }),
            // Nobody listens: left by an engine that crashed. (Only a socket is ever removed.)
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                std::fs::remove_file(path).map_err(|source| ServeError::Stale { path: path.to_owned(), source })
            }
            Err(source) => Err(ServeError::Create { path: path.to_owned(), source }),
        },
    }
}

/// Where [`bind_private`] is, for tests that play someone swapping paths under it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    /// The private directory was just made (not yet opened).
    Made,
    /// The socket is bound in it (its mode and owner not yet set).
    Bound,
}

/// Binds a Unix socket at `path` that nobody else can connect to before it has `mode` and `owner`
/// (see the module's doc). `race` runs at each [`Step`] with the private directory's path.
fn bind_private(
    path: &Path,
    mode: u32,
    owner: Option<Ids>,
    race: &dyn Fn(Step, &Path),
) -> Result<(UnixListener, FileId), ServeError> {
    let create = |source| ServeError::Create { path: path.to_owned(), source };
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let (dir, dir_path) = private_dir(parent, race).map_err(create)?;
    // Through the descriptor: whatever is done to `dir_path` meanwhile, this is our directory.
    let inside = PathBuf::from(format!("/proc/self/fd/{}/s", dir.as_raw_fd()));
    let bound = (|| {
        let listener = UnixListener::bind(&inside).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => {
                create(io::Error::other(format!("binding in {}: {e} (is /proc mounted?)", inside.display())))
            }
            _ => create(e),
        })?;
        race(Step::Bound, &dir_path);
        std::fs::set_permissions(&inside, std::fs::Permissions::from_mode(mode))
            .map_err(|source| ServeError::Chmod { path: path.to_owned(), mode, source })?;
        if let Some(owner) = owner {
            // The engine will run as this user: let it remove its socket at exit.
            std::os::unix::fs::lchown(&inside, Some(owner.uid), Some(owner.gid))
                .map_err(|source| ServeError::Chown { path: path.to_owned(), owner, source })?;
        }
        let file = FileId::of(&inside).ok_or_else(|| create(io::Error::other("the bound socket vanished")))?;
        std::fs::hard_link(&inside, path).map_err(|e| match e.kind() {
            io::ErrorKind::AlreadyExists => ServeError::Taken { path: path.to_owned() },
            _ => create(e),
        })?;
        Ok((listener, file))
    })();
    let _ = std::fs::remove_file(&inside);
    drop(dir);
    // (By path: if it was swapped, this removes the stand-in when empty, and ours stays, empty.)
    let _ = std::fs::remove_dir(&dir_path);
    bound
}

/// A new directory beside the socket's path that only this user can enter, opened; fails if what
/// got opened is not the directory just made (someone who can write `parent` swapped it).
fn private_dir(parent: &Path, race: &dyn Fn(Step, &Path)) -> io::Result<(File, PathBuf)> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    for _ in 0..16 {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir_path = parent.join(format!(".ringproxy-{}-{n}", std::process::id()));
        match DirBuilder::new().mode(0o700).create(&dir_path) {
            Ok(()) => {}
            // Left by a process that crashed while binding and had this pid (a container's pid 1).
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
        race(Step::Made, &dir_path);
        let opened = OpenOptions::new().read(true).custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW).open(&dir_path);
        let ours = opened
            .as_ref()
            .ok()
            .and_then(|d| d.metadata().ok())
            .is_some_and(|m| m.is_dir() && m.uid() == crate::sys::ids().0 && m.mode() & 0o077 == 0);
        return match (opened, ours) {
            (Ok(dir), true) => Ok((dir, dir_path)),
            (opened, _) => {
                let _ = std::fs::remove_dir(&dir_path);
                Err(opened.err().unwrap_or_else(|| {
                    io::Error::other(format!(
                        "{} was replaced while the socket was being created: another user can write to {}; \
                         put the stats socket in a directory only the engine's user can write",
                        dir_path.display(),
                        parent.display()
                    ))
                }))
            }
        };
    }
    Err(io::Error::new(io::ErrorKind::AlreadyExists, format!("no free private directory name in {}", parent.display())))
}

fn remove_if_ours(path: &Path, file: FileId) {
    if FileId::of(path) == Some(file) {
        let _ = std::fs::remove_file(path);
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        drop(self.running.take());
        if !self.disowned {
            remove_if_ours(&self.path, self.file);
        }
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

/// Client side: a command line, answered by the supervisor (a status line first) or by the socket
/// (plain text: taken as done).
pub fn any_command(path: &Path, line: &str) -> Result<Answer, ClientError> {
    let text = query(path, line)?;
    if text.is_empty() {
        // Every command has an answer: none means the engine went away meanwhile. Never an OK:
        // a routing daemon's `show ready` check would announce a host that is stopping.
        return Err(ClientError::Answer {
            path: path.to_owned(),
            detail: "the connection closed without an answer (is ringproxy stopping?)".into(),
        });
    }
    Ok(Answer::decode(&text).unwrap_or(Answer::Ok(text)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_survives_the_wire() {
        for a in [Answer::Ok("reloaded t.yaml: 2 workers\n".into()), Answer::Fail("no\n".into())] {
            assert_eq!(Answer::decode(&a.encode()), Some(a));
        }
        assert_eq!(Answer::decode("reloaded t.yaml: 2 workers\n"), None, "a status line is required");
    }

    #[test]
    fn no_answer_is_never_an_ok() {
        // An engine going away closes the connection without a word: `show ready` must fail.
        let dir = std::env::temp_dir().join(format!("rp-noanswer-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.sock");
        let _ = std::fs::remove_file(&path);
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let closer = std::thread::spawn(move || {
            let (mut c, _) = listener.accept().unwrap();
            let mut line = [0u8; 64];
            let _ = c.read(&mut line);
        });
        let r = any_command(&path, "show ready");
        closer.join().unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(matches!(r, Err(ClientError::Answer { .. })), "{r:?}");
    }

    /// The answer given at once (not handed to the supervisor), as text.
    fn at_once(command: &str, requests: Option<&Requests>, level: Level) -> String {
        match answer(command, &|_| EngineStats::default(), requests, level) {
            serve::Reply::Now(bytes) => String::from_utf8(bytes).unwrap(),
            serve::Reply::Later(..) => panic!("{command}: handed to the supervisor"),
        }
    }

    #[test]
    fn reload_without_a_supervisor_fails() {
        assert_eq!(at_once("reload", None, Level::Admin), "FAIL\nreload is not available on this socket\n");
    }

    /// The supervisor's end of the requests: the channel and the doorbell.
    fn supervisor() -> (Requests, crossbeam_channel::Receiver<Request>) {
        let (tx, rx) = crossbeam_channel::unbounded();
        (Requests { tx, bell: std::sync::Arc::new(crate::sys::EventFd::new().unwrap()) }, rx)
    }

    #[test]
    fn the_read_only_socket_refuses_every_change_and_sends_nothing_on() {
        let (to, rx) = supervisor();
        for line in ["reload", "set server a/b state drain", "set server a/b weight 3", "shutdown sessions server a/b"]
        {
            let text = at_once(line, Some(&to), Level::Read);
            assert!(text.starts_with("FAIL\n") && text.contains("this socket is read-only"), "{line}: {text}");
        }
        assert!(rx.try_recv().is_err(), "nothing reached the supervisor");
        let text = at_once("set server a/b state up", Some(&to), Level::Admin);
        assert_eq!(text, "FAIL\nstate \"up\" is not one of ready, drain, maint\n");
        assert!(rx.try_recv().is_err(), "a malformed command reaches nobody");
        assert_eq!(to.bell.take(), 0, "nor rings the doorbell");
    }

    /// A command for the supervisor is handed over and rings its doorbell, once per command.
    #[test]
    fn a_command_handed_to_the_supervisor_rings_its_doorbell() {
        let (to, rx) = supervisor();
        for line in ["set server a/b state drain", "del server a/b"] {
            let reply = answer(line, &|_| EngineStats::default(), Some(&to), Level::Admin);
            assert!(matches!(reply, serve::Reply::Later(..)), "{line}: handed over");
        }
        assert_eq!(to.bell.take(), 2);
        assert_eq!(
            rx.try_iter().map(|r| r.command.line()).collect::<Vec<_>>(),
            ["set server a/b state drain", "del server a/b"]
        );
    }

    /// A fresh directory for one test, under the system's temporary directory.
    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ringproxy-socket-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// A root-owned file with mode 0644, as /etc/shadow stands for in the attack.
    fn target(dir: &Path) -> PathBuf {
        let t = dir.join("target");
        std::fs::write(&t, "root's\n").unwrap();
        std::fs::set_permissions(&t, std::fs::Permissions::from_mode(0o644)).unwrap();
        t
    }

    /// Plays the service user who owns the socket's directory: moves the engine's private
    /// directory away and puts one of its own in its place, holding `s` -> `target`.
    fn swap(private: &Path, target: &Path) {
        std::fs::rename(private, private.with_extension("moved")).unwrap();
        std::fs::create_dir(private).unwrap();
        std::os::unix::fs::symlink(target, private.join("s")).unwrap();
        std::os::unix::fs::lchown(private, Some(65534), Some(65534)).unwrap();
    }

    fn unchanged(target: &Path) {
        let m = std::fs::symlink_metadata(target).unwrap();
        assert_eq!((m.uid(), m.gid(), m.mode() & 0o7777), (0, 0, 0o644), "the target was not touched");
        assert_eq!(std::fs::read_to_string(target).unwrap(), "root's\n");
    }

    /// Binds `stats.sock` (owner nobody) in a fresh directory while the service user swaps the
    /// private directory at step `at`; returns the directory, the target and the outcome.
    fn bind_under_attack(
        name: &str,
        at: Step,
        mode: u32,
    ) -> (PathBuf, PathBuf, Result<(UnixListener, FileId), ServeError>) {
        let dir = scratch(name);
        let t = target(&dir);
        let owner = Some(Ids { uid: 65534, gid: 65534 });
        let bound = bind_private(&dir.join("stats.sock"), mode, owner, &|step, private| {
            if step == at {
                swap(private, &t);
            }
        });
        (dir, t, bound)
    }

    /// Review 6d: the directory the socket is created in is swapped for the service user's own, with
    /// a symlink where the socket goes, right after it was made (at 7b9477c, chmod and chown by
    /// path then changed the symlink's target: root's file became the service user's). The engine
    /// sees the directory is not its own and stops; the target is untouched.
    #[test]
    fn a_private_directory_swapped_before_it_is_opened_is_refused() {
        if crate::sys::ids().0 != 0 {
            return eprintln!("skipped: needs root to play another user");
        }
        let (dir, t, bound) = bind_under_attack("made", Step::Made, 0o600);
        let err = bound.expect_err("a swapped directory is refused");
        assert!(err.to_string().contains("was replaced while the socket was being created"), "{err}");
        unchanged(&t);
        assert_eq!(occupant(&dir.join("stats.sock")), Occupant::Nothing);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Review 6d: the same swap once the socket is bound, before its mode and owner are set: they
    /// are set through the engine's descriptor of its own directory, so the symlink is never
    /// followed, and the socket gets them.
    #[test]
    fn a_private_directory_swapped_after_bind_changes_nothing() {
        if crate::sys::ids().0 != 0 {
            return eprintln!("skipped: needs root to play another user");
        }
        let (dir, t, bound) = bind_under_attack("bound", Step::Bound, 0o640);
        let (listener, file) = bound.unwrap();
        unchanged(&t);
        let path = dir.join("stats.sock");
        let m = std::fs::symlink_metadata(&path).unwrap();
        assert!(m.file_type().is_socket());
        assert_eq!((m.uid(), m.gid(), m.mode() & 0o7777), (65534, 65534, 0o640));
        assert_eq!(FileId::of(&path), Some(file));
        UnixStream::connect(&path).unwrap();
        drop(listener);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Review 1i: only a socket is ever removed from the path; anything else is refused as it is.
    #[test]
    fn claim_refuses_what_is_not_a_socket_and_replaces_a_stale_one() {
        let dir = scratch("claim");
        let file = dir.join("ringproxy.yaml");
        std::fs::write(&file, "global: {}\n").unwrap();
        let err = claim(&file).unwrap_err().to_string();
        assert!(err.contains("a regular file is there, not a socket") && err.contains("left it untouched"), "{err}");
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "global: {}\n");
        std::os::unix::fs::symlink(&file, dir.join("link")).unwrap();
        assert!(claim(&dir.join("link")).unwrap_err().to_string().contains("a symbolic link"));
        assert!(claim(&dir).unwrap_err().to_string().contains("a directory"));
        let stale = dir.join("stale.sock");
        drop(UnixListener::bind(&stale).unwrap());
        assert_eq!(occupant(&stale), Occupant::Socket);
        claim(&stale).unwrap();
        assert_eq!(occupant(&stale), Occupant::Nothing, "a socket nobody answers on is removed");
        let live = UnixListener::bind(&stale).unwrap();
        assert!(matches!(claim(&stale), Err(ServeError::InUse { .. })));
        drop(live);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
