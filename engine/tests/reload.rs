//! Hot reload (SIGHUP and `ringproxy reload`): established connections continue, new ones follow
//! the new configuration, no connection is refused while reloading, an invalid file changes
//! nothing, listeners can be added and removed. And privileges are dropped after binding.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use common::*;

const BIN: &str = env!("CARGO_BIN_EXE_ringproxy");

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ringproxy-reload-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

/// A free port below nothing in particular: bind port 0 and give it back.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

struct Proxy {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Proxy {
    fn start(config: &Path) -> Proxy {
        let mut child = Command::new(BIN).arg("-c").arg(config).stderr(Stdio::piped()).spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(l);
            }
        });
        let p = Proxy { child, lines };
        p.expect("listening on");
        p
    }

    /// Waits for a stderr line containing `what`; returns it.
    fn expect(&self, what: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut seen = Vec::new();
        while Instant::now() < deadline {
            if let Ok(l) = self.lines.recv_timeout(Duration::from_millis(100)) {
                if l.contains(what) {
                    return l;
                }
                seen.push(l);
            }
        }
        panic!("ringproxy never said {what:?}; it said: {seen:#?}");
    }

    fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn tag_of(mut c: TcpStream) -> u8 {
    let mut t = [0u8];
    c.read_exact(&mut t).unwrap();
    echo_once(&mut c, b"x");
    t[0]
}

fn config(port: u16, server: SocketAddr, sock: &Path, extra: &str) -> String {
    format!(
        "global: {{ workers: 2, stats: {{ socket: {} }} }}\nfrontends:\n  - {{ name: fe, bind: \"127.0.0.1:{port}\", backend: be }}\n{extra}\
         backends:\n  - {{ name: be, servers: [{{ name: s, address: \"{server}\" }}] }}\n",
        sock.display()
    )
}

#[test]
fn reload_switches_new_connections_keeps_old_ones_and_refuses_bad_files() {
    let (a, b) = (Backend::start(Mode::Tag(1)), Backend::start(Mode::Tag(2)));
    let port = free_port();
    let sock = tmp("r1.sock");
    let cfg = tmp("r1.yaml");
    std::fs::write(&cfg, config(port, a.addr, &sock, "")).unwrap();
    let proxy = Proxy::start(&cfg);
    let front: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    assert_eq!(tag_of(connect(front)), 1);
    // An established connection through the old configuration.
    let mut old = connect(front);
    let mut t = [0u8];
    old.read_exact(&mut t).unwrap();
    assert_eq!(t[0], 1);

    // Clients keep connecting during the reloads; none may be refused.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let churn = {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                match TcpStream::connect_timeout(&front, Duration::from_secs(2)) {
                    Ok(mut c) => {
                        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                        let mut t = [0u8];
                        match c.read_exact(&mut t) {
                            Ok(()) => ok.fetch_add(1, Ordering::SeqCst),
                            Err(_) => failed.fetch_add(1, Ordering::SeqCst),
                        };
                    }
                    Err(_) => {
                        failed.fetch_add(1, Ordering::SeqCst);
                    }
                }
            }
        })
    };

    // SIGHUP with the server switched to b.
    std::fs::write(&cfg, config(port, b.addr, &sock, "")).unwrap();
    proxy.signal(libc::SIGHUP);
    proxy.expect("SIGHUP: reloaded");
    assert_eq!(tag_of(connect(front)), 2, "new connections follow the new configuration");
    echo_once(&mut old, b"the old connection lives on");

    // An invalid file is refused with its position; the running configuration stays.
    std::fs::write(&cfg, "global:\n  workers: lots\n").unwrap();
    let out = Command::new(BIN).args(["reload", "--socket"]).arg(&sock).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains(&format!("{}:2:12:", cfg.display())), "{text}");
    assert!(text.contains("running configuration stays"), "{text}");
    assert_eq!(tag_of(connect(front)), 2);

    // `ringproxy reload` back to a, with a second frontend added.
    let port2 = free_port();
    let extra = format!("  - {{ name: fe2, bind: \"127.0.0.1:{port2}\", backend: be }}\n");
    std::fs::write(&cfg, config(port, a.addr, &sock, &extra)).unwrap();
    let out = Command::new(BIN).args(["reload", "-c"]).arg(&cfg).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    assert_eq!(tag_of(connect(front)), 1);
    assert_eq!(tag_of(connect(format!("127.0.0.1:{port2}").parse().unwrap())), 1);
    echo_once(&mut old, b"still alive after two reloads");

    // Remove the second frontend again: its port is closed once the old engine has drained.
    std::fs::write(&cfg, config(port, a.addr, &sock, "")).unwrap();
    proxy.signal(libc::SIGHUP);
    proxy.expect("SIGHUP: reloaded");
    wait_until("the removed port to be closed", Duration::from_secs(5), || {
        TcpStream::connect_timeout(&format!("127.0.0.1:{port2}").parse().unwrap(), Duration::from_millis(200)).is_err()
    });

    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::SeqCst);
    churn.join().unwrap();
    assert!(ok.load(Ordering::SeqCst) > 10, "the churn ran");
    assert_eq!(failed.load(Ordering::SeqCst), 0, "no connection failed during the reloads");
    echo_once(&mut old, b"end");
    drop(old);
    proxy.signal(libc::SIGTERM);
    proxy.expect("drained, exiting");
}

#[test]
fn privileges_are_dropped_after_binding() {
    let echo = Backend::start(Mode::Echo);
    // Like /run/ringproxy owned by the service user: the engine can remove its socket at exit.
    let nobody = ringproxy::privileges::resolve("nobody", None).unwrap();
    let run_dir = tmp("run");
    std::fs::create_dir_all(&run_dir).unwrap();
    std::os::unix::fs::chown(&run_dir, Some(nobody.uid), Some(nobody.gid)).unwrap();
    let sock = run_dir.join("priv.sock");
    let cfg = tmp("priv.yaml");
    let log = tmp("priv.log");
    std::fs::write(
        &cfg,
        format!(
            "global: {{ workers: 2, user: nobody, stats: {{ socket: {} }}, connection_log: {} }}\n\
             frontends: [{{ name: fe, bind: \"127.0.0.1:0\", backend: be }}]\n\
             backends: [{{ name: be, servers: [{{ name: s, address: \"{}\", source: 127.0.2.30 }}] }}]\n",
            sock.display(),
            log.display(),
            echo.addr
        ),
    )
    .unwrap();
    let proxy = Proxy::start(&cfg);
    let status = std::fs::read_to_string(format!("/proc/{}/status", proxy.child.id())).unwrap();
    let uid_line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    let uids: Vec<u32> = uid_line.split_whitespace().skip(1).map(|v| v.parse().unwrap()).collect();
    assert!(uids.iter().all(|&u| u == nobody.uid), "real, effective, saved and fs uid are nobody: {uid_line}");
    let port: SocketAddr = {
        let out = Command::new(BIN).args(["stats", "--json", "--socket"]).arg(&sock).output().unwrap();
        assert!(out.status.success(), "the stats socket still answers");
        let s: ringproxy::stats::EngineStats = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(s.workers.len(), 2);
        // The frontend address was in the startup report (consumed by start); ask the kernel.
        listening_port_of(proxy.child.id())
    };
    let mut c = connect(port);
    echo_once(&mut c, b"proxied by an unprivileged process");
    drop(c);
    proxy.signal(libc::SIGTERM);
    proxy.expect("drained, exiting");
    let mut proxy = proxy;
    assert!(proxy.child.wait().unwrap().success());
    assert!(!sock.exists(), "the unprivileged process could remove its socket");
}

/// The first TCP port process `pid` listens on (via /proc/PID/fd and /proc/net/tcp inodes).
fn listening_port_of(pid: u32) -> SocketAddr {
    let mut inodes = std::collections::HashSet::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().flatten() {
        if let Ok(t) = std::fs::read_link(e.path())
            && let Some(i) = t.to_string_lossy().strip_prefix("socket:[").and_then(|s| s.strip_suffix(']'))
        {
            inodes.insert(i.to_string());
        }
    }
    let tcp = std::fs::read_to_string("/proc/net/tcp").unwrap();
    for line in tcp.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() > 9 && f[3] == "0A" && inodes.contains(f[9]) {
            let port = u16::from_str_radix(f[1].split(':').nth(1).unwrap(), 16).unwrap();
            return format!("127.0.0.1:{port}").parse().unwrap();
        }
    }
    panic!("process {pid} listens on nothing");
}
