//! The ready file (`ringproxy --ready-file PATH`): how scripts and tests learn that the proxy is
//! serving and where, without parsing log wording.
//!
//! Written once every listener is bound and every worker accepts, and written again after each
//! successful reload (its `generation` counts them). The file is replaced atomically (written
//! beside it, then renamed), so a reader sees either nothing or a whole JSON object, and it is
//! removed when the process exits normally. `ringload serve --ready-file` writes the same shape.
//!
//! ```json
//! {"pid": 4242, "generation": 0,
//!  "listeners": [{"name": "mqtt", "addr": "127.0.0.1:40091"}],
//!  "stats_socket": "/run/ringproxy.sock", "metrics": "127.0.0.1:9100"}
//! ```

use std::io::{self, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// One bound listening address.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadyListener {
    /// The frontend's name.
    pub name: String,
    pub addr: SocketAddr,
}

/// What the ready file says.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ready {
    pub pid: u32,
    /// Successful reloads since start (0 for the first engine).
    pub generation: u64,
    pub listeners: Vec<ReadyListener>,
    pub stats_socket: Option<PathBuf>,
    /// The admin socket (runtime API), when configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin_socket: Option<PathBuf>,
    pub metrics: Option<SocketAddr>,
}

/// The ready file of this process; removed when dropped.
pub struct ReadyFile {
    path: PathBuf,
}

impl ReadyFile {
    pub fn new(path: &Path) -> ReadyFile {
        ReadyFile { path: path.to_owned() }
    }

    /// Replaces the file's contents with `ready`, atomically.
    pub fn write(&self, ready: &Ready) -> io::Result<()> {
        let mut tmp = self.path.clone().into_os_string();
        tmp.push(format!(".{}.tmp", std::process::id()));
        let tmp = PathBuf::from(tmp);
        let text = serde_json::to_string(ready).map_err(io::Error::other)?;
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.write_all(b"\n")?;
        f.sync_all()?;
        std::fs::rename(&tmp, &self.path)
    }

    /// Reads a ready file (for tests and tools).
    pub fn read(path: &Path) -> io::Result<Ready> {
        let text = std::fs::read_to_string(path)?;
        serde_json::from_str(&text).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }
}

impl ReadyFile {
    /// Leaves the file as it is (a binary upgrade: the new process has rewritten it).
    pub fn leave(self) {
        std::mem::forget(self);
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
    fn written_atomically_read_back_and_removed() {
        let path = std::env::temp_dir().join(format!("ringproxy-ready-test-{}", std::process::id()));
        let ready = Ready {
            pid: 7,
            generation: 1,
            listeners: vec![ReadyListener { name: "mqtt".into(), addr: "127.0.0.1:1883".parse().unwrap() }],
            stats_socket: Some("/tmp/s.sock".into()),
            admin_socket: None,
            metrics: None,
        };
        {
            let f = ReadyFile::new(&path);
            f.write(&ready).unwrap();
            assert_eq!(ReadyFile::read(&path).unwrap(), ready);
            let text = std::fs::read_to_string(&path).unwrap();
            assert!(text.contains("\"addr\":\"127.0.0.1:1883\""), "{text}");
        }
        assert!(!path.exists(), "removed on drop");
    }
}
