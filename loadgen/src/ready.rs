//! `ringload serve --ready-file PATH`: how scripts and tests learn that the
//! backends listen and where, without reading stdout.
//!
//! One line of JSON, the shape `ringproxy --ready-file` writes (so one
//! reader serves both; ringload does not depend on the engine crate):
//! `{"pid":4242,"generation":0,"listeners":[{"name":"serve","addr":"127.0.0.1:40091"}],"stats_socket":null,"metrics":null}`.
//! It is written once every listener is bound, replaced atomically (written
//! to `PATH.<pid>.tmp` beside it, then renamed, so a reader sees nothing or
//! the whole line), and removed when serve exits.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// The ready file's contents (either binary's).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ready {
    pub pid: u32,
    /// Reloads since start (always 0 for serve).
    pub generation: u64,
    pub listeners: Vec<Listener>,
    pub stats_socket: Option<PathBuf>,
    pub metrics: Option<SocketAddr>,
}

/// One bound address: `name` is the proxy's frontend, or "serve".
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Listener {
    pub name: String,
    pub addr: SocketAddr,
}

impl Ready {
    /// What `ringload serve` (this process) reports for `bound`.
    pub fn serve(bound: &[SocketAddr]) -> Ready {
        let listeners = bound.iter().map(|&addr| Listener { name: "serve".into(), addr }).collect();
        Ready { pid: std::process::id(), generation: 0, listeners, stats_socket: None, metrics: None }
    }

    /// Parse a ready file.
    pub fn read(path: &Path) -> Result<Ready> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("{}: not a ready file", path.display()))
    }
}

/// A written ready file, removed when dropped (at exit).
pub struct ReadyFile {
    path: PathBuf,
}

impl ReadyFile {
    /// Write `ready` to `path` atomically.
    pub fn create(path: &Path, ready: &Ready) -> Result<ReadyFile> {
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(format!(".{}.tmp", std::process::id()));
        let line = serde_json::to_string(ready).context("encoding the ready file")? + "\n";
        let written = std::fs::File::create(&tmp)
            .and_then(|mut f| f.write_all(line.as_bytes()).and_then(|()| f.sync_all()))
            .and_then(|()| std::fs::rename(&tmp, path));
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(e).with_context(|| format!("cannot write the ready file {}", path.display()));
        }
        Ok(ReadyFile { path: path.to_owned() })
    }
}

impl Drop for ReadyFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_line_has_the_proxy_s_shape_and_goes_at_exit() {
        let path = std::env::temp_dir().join(format!("ringload-ready-test-{}", std::process::id()));
        let ready = Ready { pid: 4242, ..Ready::serve(&["127.0.0.1:40091".parse().unwrap()]) };
        {
            let _f = ReadyFile::create(&path, &ready).unwrap();
            assert_eq!(
                std::fs::read_to_string(&path).unwrap(),
                "{\"pid\":4242,\"generation\":0,\"listeners\":[{\"name\":\"serve\",\"addr\":\"127.0.0.1:40091\"}],\"stats_socket\":null,\"metrics\":null}\n"
            );
            assert_eq!(Ready::read(&path).unwrap(), ready);
        }
        assert!(!path.exists(), "removed on drop");
    }

    #[test]
    fn reads_the_proxy_s_file() {
        let text = r#"{"pid":7,"generation":2,"listeners":[{"name":"mqtt","addr":"[::1]:1883"}],"stats_socket":"/run/s.sock","metrics":"127.0.0.1:9100"}"#;
        let r: Ready = serde_json::from_str(text).unwrap();
        assert_eq!(r.listeners[0].name, "mqtt");
        assert_eq!(r.generation, 2);
        assert_eq!(r.metrics, Some("127.0.0.1:9100".parse().unwrap()));
    }
}
