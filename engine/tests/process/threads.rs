//! The threads of the process while it proxies: the default data path runs on the workers' own
//! threads, none of its operations on io_uring's io-wq threads (`iou-wrk-*`, kernel threads of the
//! process that run what io_uring cannot run inline: each a wakeup and two context switches).

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::Duration;

use crate::common::*;

/// The process's io-wq threads (`iou-wrk-<tid of the ring's thread>`).
fn io_wq_threads(pid: u32) -> usize {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).unwrap();
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|comm| comm.starts_with("iou-wrk"))
        .count()
}

/// The binary with 2 workers, a stats socket and `tune: { io_features: SET, EXTRA }`, proxying
/// to `backend`. The feature set is the file's alone: `native` in the file means "not pinned",
/// which the environment (scripts/test.sh's 6.1 pass) would otherwise pin.
fn proxy_with(name: &str, set: &str, extra: &str, backend: SocketAddr) -> Proxy {
    let sock = temp_path(&format!("{name}.sock"));
    Proxy::start_adjusted(
        name,
        &format!(
            "global: {{ workers: 2, stats: {{ socket: {} }}, tune: {{ io_features: {set}{extra} }} }}\n\
             frontends: [{{ name: fe, bind: \"127.0.0.1:0\", backend: be }}]\n\
             backends: [{{ name: be, servers: [{{ name: s, address: \"{backend}\" }}] }}]\n",
            sock.display()
        ),
        |cmd| {
            cmd.env_remove(ringproxy::features::ENV);
        },
    )
}

/// `n` connections that each send a request, half-close, read the echo to its end and close:
/// every one has an EOF to forward each way.
fn churn(fe: SocketAddr, n: usize) {
    for i in 0..n {
        let mut c = TcpStream::connect(fe).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let req = format!("request {i:>56}");
        c.write_all(req.as_bytes()).unwrap();
        c.shutdown(Shutdown::Write).unwrap();
        let mut back = String::new();
        c.read_to_string(&mut back).unwrap();
        assert_eq!(back, req, "connection {i}");
    }
}

/// Connection churn with half-closes in the default mode (`splice: never`) starts no io-wq thread:
/// the EOF is forwarded by shutdown(2) on a descriptor FIXED_FD_INSTALL made (io_uring runs a
/// SHUTDOWN op on io-wq). The same churn with the kernel 6.7 feature set (no FIXED_FD_INSTALL, so
/// SHUTDOWN ops) does start them: the count sees io-wq threads when there are some.
#[test]
fn churn_with_half_closes_runs_nothing_on_io_wq_threads() {
    let native = ringproxy::features::IoFeatures::probe().unwrap();
    for (set, fd_install) in [("native", native.fd_install), ("\"6.7\"", false)] {
        let backend = Backend::start(Mode::Echo);
        let proxy = proxy_with("threads", set, "", backend.addr);
        let pid = proxy.pid();
        assert_eq!(io_wq_threads(pid), 0, "{set}: io-wq threads before any connection");
        churn(proxy.addr("fe"), 300);
        let threads = io_wq_threads(pid);
        if fd_install {
            assert_eq!(threads, 0, "{set}: io-wq threads after 300 connections with half-closes");
        } else {
            assert!(threads > 0, "{set}: SHUTDOWN ops run on io-wq threads, but none was seen");
        }
        proxy.stop_clean();
    }
}

/// Bulk transfers both ways, spliced (`splice: auto`, the default, and `always`), start no io-wq
/// thread either: each connection's sockets get process descriptors (FIXED_FD_INSTALL) and the
/// worker splices with splice(2) on its own thread. With the kernel 6.7 feature set (no install)
/// `always` splices through io_uring, on io-wq threads.
#[test]
fn bulk_splicing_runs_nothing_on_io_wq_threads() {
    let native = ringproxy::features::IoFeatures::probe().unwrap();
    for (set, splice, fd_install) in
        [("native", "auto", native.fd_install), ("native", "always", native.fd_install), ("\"6.7\"", "always", false)]
    {
        let backend = Backend::start(Mode::Echo);
        let proxy = proxy_with("threads-bulk", set, &format!(", splice: {splice}"), backend.addr);
        let pid = proxy.pid();
        let mut pumps: Vec<Pump> =
            (0..4).map(|i| Pump::connect(proxy.addr("fe"), 60 + i, false).unwrap().limit(16 << 20)).collect();
        run_all(&mut pumps, Duration::from_secs(60), || {});
        let threads = io_wq_threads(pid);
        if fd_install {
            assert_eq!(threads, 0, "{set} {splice}: io-wq threads after 4 bulk transfers of 16 MiB each way");
        } else {
            assert!(threads > 0, "{set} {splice}: io_uring splices run on io-wq threads, but none was seen");
        }
        drop(pumps);
        proxy.stop_clean();
    }
}
