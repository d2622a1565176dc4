//! A `ringproxy` child whose command the test adjusts before it starts (an environment variable,
//! or another user with capabilities set up between fork and exec): what `common::Proxy`, which
//! starts every child the same way, cannot do. Same conventions: `--ready-file`, stderr captured
//! on a thread, every wait bounded, the child killed when dropped.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ringproxy::ready::{Ready, ReadyFile};

use crate::common::*;

pub struct Adjusted {
    child: Child,
    ready_file: PathBuf,
    stderr: Arc<Mutex<Vec<String>>>,
}

impl Adjusted {
    /// Writes `yaml` to `dir/NAME.yaml` and starts `ringproxy --ready-file dir/NAME.ready.json -c
    /// dir/NAME.yaml`, after `adjust` has had its say on the command. Does not wait.
    pub fn spawn(dir: &Path, name: &str, yaml: &str, adjust: impl FnOnce(&mut Command)) -> Adjusted {
        let config = dir.join(format!("{name}.yaml"));
        let ready_file = dir.join(format!("{name}.ready.json"));
        std::fs::write(&config, yaml).unwrap();
        let _ = std::fs::remove_file(&ready_file);
        let mut cmd = ringproxy();
        cmd.arg("--ready-file").arg(&ready_file).arg("-c").arg(&config);
        cmd.stdout(Stdio::null()).stderr(Stdio::piped());
        adjust(&mut cmd);
        let mut child = cmd.spawn().unwrap();
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let (pipe, lines) = (child.stderr.take().unwrap(), stderr.clone());
        std::thread::spawn(move || {
            for l in BufReader::new(pipe).lines().map_while(Result::ok) {
                lines.lock().unwrap().push(l);
            }
        });
        Adjusted { child, ready_file, stderr }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the ready file; fails the test if the process exits first.
    pub fn ready(&mut self) -> Ready {
        let (file, child) = (&self.ready_file, &mut self.child);
        let mut exited = None;
        wait_until("ringproxy to write its ready file", Duration::from_secs(10), || {
            exited = child.try_wait().unwrap();
            exited.is_some() || file.exists()
        });
        if let Some(status) = exited {
            std::thread::sleep(Duration::from_millis(100)); // its last words
            panic!("ringproxy exited before it was ready ({status}): {:#?}", self.stderr());
        }
        ReadyFile::read(&self.ready_file).unwrap()
    }

    /// Waits for the exit (failing the test after `limit`); returns the exit code.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let mut status = None;
        wait_until("ringproxy to exit", limit, || {
            status = self.child.try_wait().unwrap();
            status.is_some()
        });
        status.unwrap().code()
    }

    pub fn stderr(&self) -> Vec<String> {
        self.stderr.lock().unwrap().clone()
    }

    /// Waits until a stderr line contains `what`; returns it.
    pub fn wait_stderr(&self, what: &str) -> String {
        let mut found = None;
        wait_until(&format!("ringproxy to say {what:?}"), Duration::from_secs(10), || {
            found = self.stderr().into_iter().find(|l| l.contains(what));
            found.is_some()
        });
        found.unwrap()
    }
}

impl Drop for Adjusted {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!("ringproxy said:\n{}", self.stderr().join("\n"));
        }
    }
}
