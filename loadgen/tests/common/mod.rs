//! What loadgen's integration tests share: `ringload serve` (and, in `through_proxy.rs`,
//! `ringproxy`) children started with `--ready-file` and located by reading that file, never by
//! parsing log wording; one bounded wait for a child and its stdout; and the `ringproxy` binary,
//! built on demand when `cargo test -p ringload` runs without it.
//!
//! Every wait is bounded, every port is picked by the kernel, every child is killed on drop.

// Each test binary uses part of this module.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, mpsc};
use std::time::{Duration, Instant};

use ringload::ready::Ready;

pub const RINGLOAD: &str = env!("CARGO_BIN_EXE_ringload");

/// A path in the temp directory unique to this process and call: `ringload-test-<pid>-<n>-<what>`.
pub fn temp_path(what: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let n = N.fetch_add(1, Ordering::SeqCst);
    std::env::temp_dir().join(format!("ringload-test-{}-{n}-{what}", std::process::id()))
}

/// Lines a child writes on a pipe, collected by a thread.
pub struct Lines {
    all: Arc<Mutex<Vec<String>>>,
    rx: mpsc::Receiver<String>,
}

impl Lines {
    pub fn read(pipe: impl std::io::Read + Send + 'static) -> Lines {
        let all = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        let keep = all.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                keep.lock().unwrap().push(line.clone());
                let _ = tx.send(line);
            }
        });
        Lines { all, rx }
    }

    /// The rest of the first line not yet taken that contains `marker`, waiting at most `limit`.
    pub fn after(&self, marker: &str, limit: Duration) -> Option<String> {
        let end = Instant::now() + limit;
        loop {
            let left = end.checked_duration_since(Instant::now())?;
            let line = self.rx.recv_timeout(left).ok()?;
            if let Some(i) = line.find(marker) {
                return Some(line[i + marker.len()..].trim().to_string());
            }
        }
    }

    /// Everything read so far.
    pub fn text(&self) -> String {
        self.all.lock().unwrap().join("\n")
    }
}

/// Wait at most `limit` for `child` to write its ready file at `path`. Err: why not (the child
/// exited first, or the time ran out).
pub fn wait_ready(child: &mut Child, path: &Path, limit: Duration) -> Result<Ready, String> {
    let end = Instant::now() + limit;
    loop {
        // The file appears whole (written beside it, then renamed) or not at all.
        if path.exists() {
            return Ready::read(path).map_err(|e| format!("{e:#}"));
        }
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            return Err(format!("exited ({status}) before writing its ready file"));
        }
        if Instant::now() > end {
            return Err(format!("no ready file {} within {limit:?}", path.display()));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Wait at most `limit` for `child` to exit, collecting its stdout: (exit code, stdout). A child
/// still running then is killed and the test fails.
pub fn wait_child(mut child: Child, limit: Duration) -> (i32, String) {
    let out = child.stdout.take().expect("the child's stdout is piped");
    let reader = std::thread::spawn(move || std::io::read_to_string(out).unwrap_or_default());
    let end = Instant::now() + limit;
    let status = loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            break s;
        }
        if Instant::now() > end {
            let _ = child.kill();
            let _ = child.wait();
            panic!("child {} did not finish within {limit:?}", child.id());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (status.code().unwrap_or(-1), reader.join().unwrap_or_default())
}

/// SIGTERM, then wait up to `limit`; SIGKILL if it is still running. The exit code (None: killed).
pub fn terminate(child: &mut Child, limit: Duration) -> Option<i32> {
    // SAFETY: kill(2) on the pid of a child we have not reaped yet (so it cannot have been reused).
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let end = Instant::now() + limit;
    loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            return s.code();
        }
        if Instant::now() > end {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A `ringload serve` child on kernel-picked ports, killed on drop.
pub struct Serve {
    child: Child,
    /// The first listening address.
    pub addr: String,
    /// Every listening address, in `--listen` order.
    pub all: Vec<String>,
    stderr: Lines,
    ready: PathBuf,
}

/// What `ringload serve` says on exit.
#[derive(Debug, Default)]
pub struct ServeSummary {
    pub accepted: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

impl Serve {
    /// `ringload serve --mode MODE` on 127.0.0.1:0, plus `extra` flags.
    pub fn start(mode: &str, extra: &[&str]) -> Serve {
        Serve::start_on(&["127.0.0.1:0"], mode, extra)
    }

    /// The same on each of `listen`.
    pub fn start_on(listen: &[&str], mode: &str, extra: &[&str]) -> Serve {
        let ready = temp_path("serve.ready");
        let mut cmd = Command::new(RINGLOAD);
        cmd.args(["serve", "--mode", mode, "--duration", "120s", "--ready-file"]).arg(&ready);
        for l in listen {
            cmd.args(["--listen", l]);
        }
        let mut child =
            cmd.args(extra).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().expect("start ringload serve");
        let stderr = Lines::read(child.stderr.take().expect("serve stderr"));
        let r = wait_ready(&mut child, &ready, Duration::from_secs(10)).unwrap_or_else(|e| {
            let _ = child.kill();
            let _ = child.wait();
            panic!("ringload serve: {e}\n{}", stderr.text())
        });
        let all: Vec<String> = r.listeners.iter().map(|l| l.addr.to_string()).collect();
        assert_eq!(all.len(), listen.len(), "one address per --listen: {r:?}");
        Serve { child, addr: all[0].clone(), all, stderr, ready }
    }

    pub fn port(&self) -> u16 {
        self.addr.rsplit(':').next().unwrap().parse().unwrap()
    }

    /// Stop it (SIGTERM) and parse its summary line: `N connections accepted, I bytes in, O bytes out`.
    pub fn stop(mut self) -> ServeSummary {
        let code = terminate(&mut self.child, Duration::from_secs(10));
        assert_eq!(code, Some(0), "ringload serve exit: {}", self.stderr.text());
        assert!(!self.ready.exists(), "serve removes its ready file at exit");
        let line = self
            .stderr
            .after("ringload serve: ", Duration::from_secs(5))
            .unwrap_or_else(|| panic!("no summary line from ringload serve: {}", self.stderr.text()));
        // "7501 connections accepted, 480064 bytes in, 480064 bytes out, 0 accept errors, ..."
        let num = |what: &str| -> u64 {
            let part =
                line.split(", ").find(|p| p.ends_with(what)).unwrap_or_else(|| panic!("no \"{what}\" in {line:?}"));
            part.split(' ').next().and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("bad count in {line:?}"))
        };
        ServeSummary { accepted: num("connections accepted"), bytes_in: num("bytes in"), bytes_out: num("bytes out") }
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.ready);
    }
}

/// The `ringproxy` binary of this build (`target/<profile>/ringproxy`, beside this test's
/// `deps/`). `cargo test --workspace` builds it; when it is missing (`cargo test -p ringload`
/// alone), it is built once per test binary with `cargo build -p ringproxy` for the same profile
/// and target directory.
pub fn ringproxy_bin() -> PathBuf {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(find_or_build_ringproxy).clone().unwrap_or_else(|e| panic!("{e}"))
}

fn find_or_build_ringproxy() -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    // target/<profile>/deps/<test>
    let profile_dir = exe.parent().and_then(Path::parent).ok_or("this test is not in target/<profile>/deps")?;
    let bin = profile_dir.join("ringproxy");
    if bin.is_file() {
        return Ok(bin);
    }
    let target_dir = profile_dir.parent().ok_or("no target directory above the profile's")?;
    let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") => "dev",
        Some(p) => p,
        None => return Err(format!("cannot tell the profile of {}", profile_dir.display())),
    };
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().ok_or("no workspace above loadgen/")?;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    eprintln!("{} is missing: building it (cargo build -p ringproxy --profile {profile})", bin.display());
    let status = Command::new(&cargo)
        .args(["build", "-p", "ringproxy", "--profile", profile, "--target-dir"])
        .arg(target_dir)
        .current_dir(workspace)
        .status()
        .map_err(|e| format!("cannot run {}: {e}", cargo.to_string_lossy()))?;
    if !status.success() || !bin.is_file() {
        return Err(format!(
            "{} is missing and `cargo build -p ringproxy` failed ({status}); build it, or run cargo test --workspace",
            bin.display()
        ));
    }
    Ok(bin)
}
