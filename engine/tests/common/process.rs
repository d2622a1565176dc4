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

use super::{GAUGES, wait_until};

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

/// A running `ringproxy` process.
pub struct Proxy {
    child: Child,
    config: PathBuf,
    ready_file: PathBuf,
    ready: Ready,
    /// The configured drain timeout: how long a SIGTERM may take.
    drain: Duration,
    stderr: Arc<Mutex<Vec<String>>>,
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
        let config = dir.join(format!("{name}.yaml"));
        let ready_file = dir.join(format!("{name}.ready.json"));
        std::fs::write(&config, yaml).unwrap();
        let _ = std::fs::remove_file(&ready_file);
        let mut child = ringproxy()
            .arg("--ready-file")
            .arg(&ready_file)
            .arg("-c")
            .arg(&config)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let pipe = child.stderr.take().unwrap();
        let lines = stderr.clone();
        let reader = std::thread::spawn(move || {
            for l in BufReader::new(pipe).lines().map_while(Result::ok) {
                lines.lock().unwrap().push(l);
            }
        });
        let mut exited = None;
        wait_until(&format!("{} to write its ready file", config.display()), START_LIMIT, || {
            exited = child.try_wait().unwrap();
            exited.is_some() || ready_file.exists()
        });
        if let Some(status) = exited {
            // The pipe closed with the process: the reader has its last words.
            let _ = reader.join();
            panic!("ringproxy exited before it was ready ({status}): {:#?}", stderr.lock().unwrap());
        }
        let ready = ReadyFile::read(&ready_file).unwrap();
        let drain = drain_timeout(yaml);
        Proxy { child, config, ready_file, ready, drain, stderr }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What the ready file said when last read.
    pub fn ready(&self) -> &Ready {
        &self.ready
    }

    pub fn ready_file(&self) -> &Path {
        &self.ready_file
    }

    /// The configuration file the process was started with (rewrite it, then reload).
    pub fn config(&self) -> &Path {
        &self.config
    }

    /// Replaces the configuration file (takes effect at the next reload).
    pub fn write_config(&mut self, yaml: &str) {
        std::fs::write(&self.config, yaml).unwrap();
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
        self.ready.stats_socket.as_deref()
    }

    /// Waits until the ready file reports `generation` (the number of successful reloads).
    pub fn wait_generation(&mut self, generation: u64) {
        let path = self.ready_file.clone();
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
        ReadyFile::read(&self.ready_file).unwrap()
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

    /// The subprocess's `assert_clean`: its gauges are all 0 (when it has a stats socket), then
    /// SIGTERM makes it exit with status 0 within its drain timeout.
    pub fn stop_clean(mut self) {
        if let Some(sock) = self.stats_socket().map(Path::to_owned) {
            let mut last = None;
            wait_until("ringproxy's gauges to be 0 (ringproxy stats)", Duration::from_secs(10), || {
                last = socket::fetch(&sock).ok();
                last.as_ref().is_some_and(|s| GAUGES.iter().all(|(_, g)| s.total(g) == 0))
            });
        }
        self.sigterm();
        let limit = self.drain + EXIT_MARGIN;
        assert_eq!(self.wait_exit(limit), Some(0), "ringproxy's exit status after SIGTERM");
    }
}

impl Drop for Proxy {
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

fn drain_timeout(yaml: &str) -> Duration {
    ringproxy::config::parse(yaml, "test.yaml").map_or(Duration::from_secs(30), |c| c.global.drain_timeout)
}
