//! The connection log of the binary (review 6c): never opened through a symbolic link, only a
//! regular file or a FIFO, opened with the rights the engine runs with; a FIFO whose reader goes
//! away is reported (and lines are dropped) while proxying goes on.

use std::ffi::CString;
use std::fs::File;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::common::*;

fn config(log: &Path, server: std::net::SocketAddr, global: &str) -> String {
    format!(
        "global: {{ workers: 1, connection_log: {}{global} }}\n\
         frontends: [{{ name: fe, bind: \"127.0.0.1:0\", backend: be }}]\n\
         backends: [{{ name: be, servers: [{{ name: s, address: \"{server}\" }}] }}]\n",
        log.display()
    )
}

/// Runs `ringproxy -c` on `yaml`, which must be refused at start: exit 1, no ready file, and a
/// message that names `log` and contains `why`.
fn refused_at_start(name: &str, dir: &Path, yaml: &str, log: &Path, why: &str) {
    let mut proxy = Started::spawn(dir, name, yaml, &[], |_| {});
    assert_eq!(proxy.wait_exit(Duration::from_secs(10)), Some(1), "{name}: {:#?}", proxy.stderr());
    assert!(!dir.join(format!("{name}.ready.json")).exists(), "{name}: it said it was ready");
    let line = proxy.wait_stderr("connection log");
    assert!(line.contains(&log.display().to_string()) && line.contains(why), "{name}: {line}");
}

/// A fresh directory; `nobodys`: owned by nobody, as a log directory given to the service user.
fn fresh_dir(name: &str, nobodys: bool) -> PathBuf {
    let dir = temp_path(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    if nobodys {
        let n = ringproxy::privileges::resolve("nobody", None).unwrap();
        std::os::unix::fs::chown(&dir, Some(n.uid), Some(n.gid)).unwrap();
    }
    dir
}

/// Review 6c: the service user plants `connections.log -> a root-owned file` (or a link to where a
/// file would be created, or links its log directory elsewhere) in the log directory it owns. The
/// engine refuses to start, naming the path and the link, and nothing is written or created
/// through the link. On 7b9477c root appended to the target.
#[test]
fn a_symbolic_link_on_the_way_to_the_log_is_refused_and_not_followed() {
    let echo = Backend::start(Mode::Echo);
    let secret_dir = fresh_dir("log-secret", false);
    let secret = secret_dir.join("root-owned");
    std::fs::write(&secret, "root's\n").unwrap();
    let logs = fresh_dir("log-planted", true);
    let planted = logs.join("connections.log");
    std::os::unix::fs::symlink(&secret, &planted).unwrap();
    let dangling = logs.join("dangling.log");
    std::os::unix::fs::symlink(secret_dir.join("created-by-root"), &dangling).unwrap();
    let linked = logs.join("linked-dir");
    std::os::unix::fs::symlink(&secret_dir, &linked).unwrap();
    for (name, log, global) in [
        ("planted-as-nobody", planted.clone(), ", user: nobody"),
        ("planted-as-root", planted.clone(), ""),
        ("dangling", dangling.clone(), ""),
        ("linked-dir", linked.join("connections.log"), ""),
    ] {
        refused_at_start(name, &secret_dir, &config(&log, echo.addr, global), &log, "is a symbolic link");
    }
    assert_eq!(std::fs::read_to_string(&secret).unwrap(), "root's\n", "the target is untouched");
    let mut left: Vec<_> = std::fs::read_dir(&secret_dir).unwrap().map(|e| e.unwrap().file_name()).collect();
    left.retain(|n| !n.to_string_lossy().ends_with(".yaml"));
    assert_eq!(left, vec![std::ffi::OsString::from("root-owned")], "nothing created through a link");
}

/// A FIFO in the temporary directory; returns its path.
fn mkfifo(name: &str) -> PathBuf {
    let path = temp_path(name);
    let _ = std::fs::remove_file(&path);
    let c = CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: mkfifo reads the NUL-terminated path, alive across the call.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo {}", path.display());
    path
}

/// The reading end of a FIFO, opened without waiting for a writer.
fn fifo_reader(path: &Path) -> File {
    std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(path).unwrap()
}

/// Reads what the FIFO holds until it has a line containing `what`.
fn read_until(reader: &mut File, what: &str) -> String {
    let mut got = Vec::new();
    wait_until(&format!("a log line with {what:?}"), Duration::from_secs(10), || {
        let mut buf = [0u8; 4096];
        if let Ok(n) = reader.read(&mut buf) {
            got.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&got).contains(what)
    });
    String::from_utf8_lossy(&got).into_owned()
}

/// Review 6c and issue 10 item 4 (the log writer): a FIFO without a reader is refused at start (on
/// 7b9477c the start blocked in open); with a reader, lines arrive; when the reader goes away the
/// engine says so once and keeps proxying (7b9477c dropped the lines silently); with a reader
/// back, it says how many lines were lost.
#[test]
fn a_fifo_log_works_and_a_gone_reader_is_reported() {
    let echo = Backend::start(Mode::Echo);
    let fifo = mkfifo("conn.fifo");
    refused_at_start(
        "fifo-no-reader",
        &temp_dir(),
        &config(&fifo, echo.addr, ""),
        &fifo,
        "no process has this FIFO open",
    );

    let mut reader = fifo_reader(&fifo);
    let proxy = Proxy::start("fifo-log", &config(&fifo, echo.addr, ""));
    let front = proxy.addr("fe");
    let mut c = connect(front);
    echo_once(&mut c, b"logged");
    drop(c);
    let text = read_until(&mut reader, "term=");
    assert!(text.contains("frontend=fe server=be/s"), "{text}");

    drop(reader);
    let mut c = connect(front);
    echo_once(&mut c, b"dropped");
    drop(c);
    let said = proxy.wait_stderr("cannot write");
    assert!(said.contains(&fifo.display().to_string()) && said.contains("its reader is gone"), "{said}");
    still_reachable(front);

    let mut reader = fifo_reader(&fifo);
    let mut c = connect(front);
    echo_once(&mut c, b"logged again");
    drop(c);
    read_until(&mut reader, "term=");
    let said = proxy.wait_stderr("writing again");
    assert!(said.contains("line(s) were dropped"), "{said}");
    proxy.stop_clean();
}

/// A few more connections are proxied.
fn still_reachable(front: std::net::SocketAddr) {
    for i in 0..3u8 {
        let mut c = connect(front);
        echo_once(&mut c, &[b'a' + i; 16]);
    }
}
