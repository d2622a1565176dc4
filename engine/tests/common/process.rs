//! The `ringproxy` binary as a child process, started one way: the configuration written to a
//! file, `--ready-file PATH` on the command line, and the ready file (not log wording) read for
//! the pid, the bound addresses and the stats socket.
//!
//! [`Proxy`] captures stderr on a thread (the child never blocks on a full pipe), waits for
//! everything with a limit, and kills the child when dropped.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ringproxy::ready::{Ready, ReadyFile};
use ringproxy::stats::socket;

use super::{held_in, wait_for, wait_until};

/// The binary under test.
pub const RINGPROXY: &str = env!("CARGO_BIN_EXE_ringproxy");

/// How long the binary may take to bind and report ready.
const START_LIMIT: Duration = Duration::from_secs(10);
/// Allowed beyond the drain timeout for the process to exit.
const EXIT_MARGIN: Duration = Duration::from_secs(5);

/// A `ringproxy` command, for one-shot runs (`check`, `stats`, `reload`, refused configurations).
pub fn ringproxy() -> Command {
    Command::new(RINGPROXY)
}

/// This test process's own temporary directory (created on first use).
pub fn temp_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ringproxy-tests-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A path in [`temp_dir`].
pub fn temp_path(name: &str) -> PathBuf {
    temp_dir().join(name)
}

/// Writes `text` to `name` in the temporary directory; returns the path.
pub fn write_temp(name: &str, text: &str) -> PathBuf {
    let path = temp_path(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// A `ringproxy` child process as started: the one way tests start the binary. [`Proxy`] is one
/// that reported ready; a test that expects the start to fail, or must adjust the command (an
/// environment variable, another user set up between fork and exec), uses this directly.
pub struct Started {
    child: Child,
    config: PathBuf,
    ready_file: PathBuf,
    stderr: Arc<Mutex<Vec<String>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Started {
    /// Writes `yaml` to `dir/NAME.yaml` and starts `ringproxy --ready-file dir/NAME.ready.json -c
    /// dir/NAME.yaml ARGS`, after `adjust` has had its say on the command. Does not wait.
    pub fn spawn(dir: &Path, name: &str, yaml: &str, args: &[&str], adjust: impl FnOnce(&mut Command)) -> Started {
        Started::spawn_binary(Path::new(RINGPROXY), dir, name, yaml, args, adjust)
    }

    /// [`Started::spawn`] of the `ringproxy` binary at `binary` (a copy another user can run).
    pub fn spawn_binary(
        binary: &Path,
        dir: &Path,
        name: &str,
        yaml: &str,
        args: &[&str],
        adjust: impl FnOnce(&mut Command),
    ) -> Started {
        let mut cmd = Command::new(binary);
        adjust(&mut cmd);
        Started::spawn_command(cmd, dir, name, yaml, args)
    }

    /// [`Started::spawn`] through `cmd`, a command that ends in the binary (a wrapper such as
    /// `run-under.py PROFILE -- ringproxy`): the usual arguments are appended to it.
    pub fn spawn_command(mut cmd: Command, dir: &Path, name: &str, yaml: &str, args: &[&str]) -> Started {
        let config = dir.join(format!("{name}.yaml"));
        let ready_file = dir.join(format!("{name}.ready.json"));
        std::fs::write(&config, yaml).unwrap();
        let _ = std::fs::remove_file(&ready_file);
        cmd.arg("--ready-file").arg(&ready_file).arg("-c").arg(&config).args(args);
        cmd.stdout(Stdio::null()).stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let (pipe, lines) = (child.stderr.take().unwrap(), stderr.clone());
        let reader = std::thread::spawn(move || {
            for l in BufReader::new(pipe).lines().map_while(Result::ok) {
                lines.lock().unwrap().push(l);
            }
        });
        Started { child, config, ready_file, stderr, reader: Some(reader) }
    }

    /// Waits for the ready file and returns what it says; fails the test, with what the process
    /// said, if it exits first.
    pub fn wait_ready(&mut self) -> Ready {
        let (file, child) = (&self.ready_file, &mut self.child);
        let mut exited = None;
        wait_until(&format!("{} to write its ready file", self.config.display()), START_LIMIT, || {
            exited = child.try_wait().unwrap();
            exited.is_some() || file.exists()
        });
        if let Some(status) = exited {
            // The pipe closed with the process: the reader has its last words.
            if let Some(r) = self.reader.take() {
                let _ = r.join();
            }
            panic!("ringproxy exited before it was ready ({status}): {:#?}", self.stderr());
        }
        ReadyFile::read(&self.ready_file).unwrap()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Every line written to stderr so far.
    pub fn stderr(&self) -> Vec<String> {
        self.stderr.lock().unwrap().clone()
    }

    /// Waits until a stderr line contains `what`; returns that line.
    pub fn wait_stderr(&self, what: &str) -> String {
        let mut found = None;
        wait_until(&format!("ringproxy to say {what:?}"), START_LIMIT, || {
            found = self.stderr.lock().unwrap().iter().find(|l| l.contains(what)).cloned();
            found.is_some()
        });
        found.unwrap()
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid; the child is not reaped before Drop.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    pub fn sigterm(&self) {
        self.signal(libc::SIGTERM);
    }

    pub fn has_exited(&mut self) -> bool {
        self.child.try_wait().unwrap().is_some()
    }

    /// Waits for the process to exit (failing the test after `limit`); returns its exit code.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let mut status = None;
        wait_until("ringproxy to exit", limit, || {
            status = self.child.try_wait().unwrap();
            status.is_some()
        });
        status.unwrap().code()
    }
}

impl Drop for Started {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!("ringproxy ({}) said:\n{}", self.config.display(), self.stderr().join("\n"));
        }
    }
}

/// A running `ringproxy` process that reported ready.
pub struct Proxy {
    proc: Started,
    ready: Ready,
    /// The configured drain timeout: how long a SIGTERM may take.
    drain: Duration,
}

impl Proxy {
    /// Runs `ringproxy -c NAME.yaml` on `yaml` and returns once it is ready.
    pub fn start(name: &str, yaml: &str) -> Proxy {
        Proxy::start_with(name, yaml, &[])
    }

    /// Same, with more arguments after `-c FILE` (e.g. `run`).
    pub fn start_with(name: &str, yaml: &str, args: &[&str]) -> Proxy {
        Proxy::start_in(&temp_dir(), name, yaml, args)
    }

    /// Same, with the configuration and the ready file in `dir` (which the process must be able to
    /// write once it has dropped its privileges).
    pub fn start_in(dir: &Path, name: &str, yaml: &str, args: &[&str]) -> Proxy {
        Proxy::started(Started::spawn(dir, name, yaml, args, |_| {}), yaml)
    }

    /// Same, after `adjust` has had its say on the command (an environment variable).
    pub fn start_adjusted(name: &str, yaml: &str, adjust: impl FnOnce(&mut Command)) -> Proxy {
        Proxy::started(Started::spawn(&temp_dir(), name, yaml, &[], adjust), yaml)
    }

    /// Runs `cmd` (a wrapper that ends in the binary, see [`Started::spawn_command`]) on `yaml`.
    pub fn start_through(cmd: Command, name: &str, yaml: &str) -> Proxy {
        Proxy::started(Started::spawn_command(cmd, &temp_dir(), name, yaml, &[]), yaml)
    }

    fn started(mut proc: Started, yaml: &str) -> Proxy {
        let ready = proc.wait_ready();
        Proxy { proc, ready, drain: drain_timeout(yaml) }
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// What the ready file said when last read.
    pub fn ready(&self) -> &Ready {
        &self.ready
    }

    pub fn ready_file(&self) -> &Path {
        &self.proc.ready_file
    }

    /// The configuration file the process was started with (rewrite it, then reload).
    pub fn config(&self) -> &Path {
        &self.proc.config
    }

    /// Replaces the configuration file (takes effect at the next reload).
    pub fn write_config(&mut self, yaml: &str) {
        std::fs::write(&self.proc.config, yaml).unwrap();
        if ringproxy::config::parse(yaml, "reload").is_ok() {
            self.drain = self.drain.max(drain_timeout(yaml));
        }
    }

    /// The first listening address of frontend `fe`.
    pub fn addr(&self, fe: &str) -> SocketAddr {
        self.addrs(fe).first().copied().unwrap_or_else(|| panic!("no listener for frontend {fe}: {:?}", self.ready))
    }

    /// Every listening address of frontend `fe`, in the order the ready file lists them.
    pub fn addrs(&self, fe: &str) -> Vec<SocketAddr> {
        self.ready.listeners.iter().filter(|l| l.name == fe).map(|l| l.addr).collect()
    }

    pub fn stats_socket(&self) -> Option<&Path> {
        self.ready.stats_socket.as_deref().or(self.ready.admin_socket.as_deref())
    }

    /// Waits until the ready file reports `generation` (the number of successful reloads).
    pub fn wait_generation(&mut self, generation: u64) {
        let path = self.proc.ready_file.clone();
        let mut now = None;
        wait_until(&format!("the ready file to reach generation {generation}"), START_LIMIT, || {
            now = ReadyFile::read(&path).ok();
            now.as_ref().is_some_and(|r| r.generation >= generation)
        });
        self.ready = now.unwrap();
        assert_eq!(self.ready.generation, generation, "more reloads than asked for");
    }

    /// The ready file as it is now.
    pub fn read_ready(&self) -> Ready {
        ReadyFile::read(&self.proc.ready_file).unwrap()
    }

    /// Every line written to stderr so far.
    pub fn stderr(&self) -> Vec<String> {
        self.proc.stderr()
    }

    /// Waits until a stderr line contains `what`; returns that line.
    pub fn wait_stderr(&self, what: &str) -> String {
        self.proc.wait_stderr(what)
    }

    pub fn signal(&self, sig: i32) {
        self.proc.signal(sig);
    }

    pub fn sigterm(&self) {
        self.proc.sigterm();
    }

    pub fn has_exited(&mut self) -> bool {
        self.proc.has_exited()
    }

    /// Waits for the process to exit (failing the test after `limit`); returns its exit code.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        self.proc.wait_exit(limit)
    }

    /// The subprocess's `assert_clean`: its gauges are all 0 (when it has a stats socket), then
    /// SIGTERM makes it exit with status 0 within its drain timeout.
    pub fn stop_clean(mut self) {
        if let Some(sock) = self.stats_socket().map(Path::to_owned) {
            wait_for("ringproxy's gauges to be 0 (ringproxy stats)", Duration::from_secs(10), || {
                socket::fetch(&sock).map_err(|e| e.to_string()).and_then(|s| held_in(&s))
            });
        }
        self.sigterm();
        let limit = self.drain + EXIT_MARGIN;
        assert_eq!(self.wait_exit(limit), Some(0), "ringproxy's exit status after SIGTERM");
    }
}

fn drain_timeout(yaml: &str) -> Duration {
    ringproxy::config::parse(yaml, "test.yaml").map_or(Duration::from_secs(30), |c| c.global.drain_timeout)
}
