//! The monitoring plane of the binary (security review 7b9477c, items 1g, 1c/1d/1f, 1i, 6d): what
//! thousands of servers cost in memory and per query, exit whatever the stats clients do (and
//! whatever happened to the socket file), and what is at the socket's path, as `ringproxy` and
//! `ringproxy check` see it.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use crate::common::*;
use ringproxy::stats::socket;

const MIB: u64 = 1024 * 1024;

/// A field of /proc/PID/status, in bytes (`VmRSS`, `VmHWM`).
fn status_bytes(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with(field)).unwrap_or_else(|| panic!("no {field}"));
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
}

/// `servers` servers in backends of 100, all at an address nothing listens on (no connection is
/// made); a stats socket at `sock` and a /metrics endpoint.
fn many_servers(servers: usize, workers: usize, sock: &Path) -> String {
    let mut yaml = format!(
        "global: {{ workers: {workers}, stats: {{ socket: {}, prometheus: \"127.0.0.1:0\" }} }}\n\
         defaults: {{ timeout: {{ drain: 1s }} }}\n\
         frontends: [{{ name: fe, bind: \"127.0.0.1:0\", backend: b0 }}]\nbackends:\n",
        sock.display()
    );
    for b in 0..servers.div_ceil(100) {
        yaml.push_str(&format!("  - name: b{b}\n    servers:\n"));
        for s in 0..(servers - 100 * b).min(100) {
            yaml.push_str(&format!("      - {{ name: s{s}, address: \"127.0.9.1:9\" }}\n"));
        }
    }
    yaml
}

/// Sends one request, reads the whole answer.
fn http_get(to: std::net::SocketAddr, request: &str) -> String {
    let mut c = TcpStream::connect(to).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    c.write_all(request.as_bytes()).unwrap();
    let mut resp = String::new();
    c.read_to_string(&mut resp).unwrap();
    resp
}

/// Review 1g: 2,000 servers on 2 workers cost a few MiB, and queries do not grow that (at 7b9477c:
/// a 184 KiB histogram per server per worker, 720 MiB for these, and every query copied all of
/// them). Memory, not time: RSS when idle, and its growth and peak over 20 rounds of `show info`,
/// `show json` and /metrics.
#[test]
fn stats_of_2000_servers_stay_small_across_queries() {
    let sock = temp_path("many.sock");
    let proxy = Proxy::start("many", &many_servers(2000, 2, &sock));
    let pid = proxy.pid();
    let metrics = proxy.ready().metrics.expect("a /metrics endpoint");
    let idle = status_bytes(pid, "VmRSS");
    assert!(idle < 64 * MIB, "idle with 2000 servers: {} MiB", idle / MIB);
    for _ in 0..20 {
        assert!(socket::query(&sock, "show info").unwrap().contains("workers: 2"));
        let json = socket::query(&sock, "show json").unwrap();
        let s: ringproxy::stats::EngineStats = serde_json::from_str(&json).unwrap();
        assert_eq!(s.servers.len(), 2000);
        assert!(http_get(metrics, "GET /metrics HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 200"));
    }
    let (after, peak) = (status_bytes(pid, "VmRSS"), status_bytes(pid, "VmHWM"));
    assert!(after < idle + 32 * MIB, "RSS after 20 rounds of queries: {} MiB, idle {} MiB", after / MIB, idle / MIB);
    assert!(peak < idle + 64 * MIB, "peak RSS {} MiB, idle {} MiB", peak / MIB, idle / MIB);
    proxy.stop_clean();
}

/// Review 1c/1d/1f: the stats socket's file deleted while the engine runs (as tmp cleaners do), a
/// dripping client on it and an idle one on /metrics, then SIGTERM: the process exits within its
/// drain time (at 7b9477c it hung for good after "drained, exiting": the stats thread blocked in a
/// read, the Prometheus thread in accept).
#[test]
fn sigterm_exits_after_the_socket_file_was_deleted() {
    let sock = temp_path("deleted.sock");
    let mut proxy = Proxy::start("deleted", &many_servers(1, 2, &sock));
    let metrics = proxy.ready().metrics.expect("a /metrics endpoint");
    let mut drip = UnixStream::connect(&sock).unwrap();
    let idle = TcpStream::connect(metrics).unwrap();
    drip.write_all(b"s").unwrap();
    std::fs::remove_file(&sock).unwrap();
    std::thread::sleep(Duration::from_millis(1000));
    let _ = drip.write_all(b"h");
    proxy.sigterm();
    assert_eq!(proxy.wait_exit(Duration::from_secs(1) + Duration::from_secs(5)), Some(0), "exit status");
    drop((drip, idle));
    assert!(!sock.exists(), "nothing was recreated");
}

/// Review 1i: `socket:` naming the configuration file itself. `ringproxy` refuses to start and
/// says why, the file is left as it was (at 7b9477c it was deleted and replaced by the socket), and
/// `ringproxy check` fails the item.
#[test]
fn a_configuration_file_named_as_the_socket_is_refused_and_kept() {
    let config = temp_path("typo.yaml");
    let yaml = many_servers(1, 1, &config);
    std::fs::write(&config, &yaml).unwrap();
    let mut child = ringproxy().arg("-c").arg(&config).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("ringproxy started over a regular file at its stats socket path");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut stderr = String::new();
    child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    assert_ne!(status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("a regular file is there, not a socket"), "{stderr}");
    assert_eq!(std::fs::read_to_string(&config).unwrap(), yaml, "the configuration is intact");

    let out = ringproxy().args(["check", "-c"]).arg(&config).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(2), "{text}");
    let line =
        text.lines().find(|l| l.contains("stats socket")).unwrap_or_else(|| panic!("no stats socket item: {text}"));
    assert!(line.starts_with("FAIL") && line.contains("is a regular file, not a socket"), "{line}");
    assert_eq!(std::fs::read_to_string(&config).unwrap(), yaml);
}

/// Review 6d and 1i: started as root with `user: nobody`, in a directory nobody owns (as the docs
/// suggest for /run/ringproxy), over a stale socket: the stale socket is replaced, and the new one
/// has the configured mode and belongs to nobody.
#[test]
fn the_socket_gets_its_mode_and_owner_in_the_service_users_directory() {
    if ringproxy::sys::ids().0 != 0 {
        return eprintln!("skipped: needs root");
    }
    let nobody = ringproxy::privileges::resolve("nobody", None).unwrap();
    let run_dir = temp_path("run-6d");
    std::fs::create_dir_all(&run_dir).unwrap();
    std::os::unix::fs::chown(&run_dir, Some(nobody.uid), Some(nobody.gid)).unwrap();
    let sock = run_dir.join("ringproxy.sock");
    let _ = std::fs::remove_file(&sock);
    drop(UnixListener::bind(&sock).unwrap());
    let yaml = many_servers(1, 1, &sock)
        .replace("global: { workers: 1, stats: {", "global: { workers: 1, user: nobody, stats: { mode: \"0660\",");
    let proxy = Proxy::start_in(&run_dir, "owner", &yaml, &[]);
    let m = std::fs::symlink_metadata(&sock).unwrap();
    assert!(m.file_type().is_socket());
    assert_eq!((m.uid(), m.gid()), (nobody.uid, nobody.gid), "owned by the service user");
    assert_eq!(m.permissions().mode() & 0o7777, 0o660);
    assert!(socket::query(&sock, "show info").unwrap().contains("workers: 1"));
    let leftovers: Vec<_> = std::fs::read_dir(&run_dir)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .filter(|n| n.starts_with(".ringproxy-"))
        .collect();
    assert!(leftovers.is_empty(), "the private directory is gone: {leftovers:?}");
    proxy.stop_clean();
    assert!(!sock.exists());
}

/// After a burst the receive buffers give their memory back even when nothing follows. The proxy
/// (4 KiB receive buffers) is stopped (SIGSTOP) while 300 clients each write 64 KiB, then
/// continued: its worker finds 300 sockets with data at once, each receive taking 16 buffers,
/// far more than its ring offers, so receives run short and the offer widens; the buffers the burst wrote
/// come back and are offered again; then
/// nothing more is received. Once a second the offer narrows and the trim gives back the pages of
/// the free buffers and (6.8+, where the kernel tells the ring's head) of the offered ones past
/// the narrowed offer that no receive reached: within a few quiet seconds what the buffers hold
/// is the narrowest offer's 64 buffers. `recv_buffers_resident` (mincore) says it.
#[test]
fn the_receive_buffers_give_their_memory_back_after_a_burst_even_when_nothing_follows() {
    const CONNS: usize = 300;
    const LEN: usize = 64 * 1024;
    let echo = Backend::start(Mode::Echo);
    let sock = temp_path("burst.sock");
    let proxy = Proxy::start(
        "burst",
        &format!(
            "global: {{ workers: 1, tune: {{ splice: never, recv_buffer_size: 4k }}, stats: {{ socket: {} }} }}\n\
             frontends: [{{ name: fe, bind: \"127.0.0.1:0\", backend: be }}]\n\
             backends: [{{ name: be, servers: [{{ name: s, address: \"{}\", source: 127.0.2.32 }}] }}]\n",
            sock.display(),
            echo.addr
        ),
    );
    let front = proxy.addr("fe");
    let mut conns: Vec<TcpStream> = (0..CONNS).map(|_| connect(front)).collect();
    for c in &mut conns {
        echo_once(c, b"up");
    }
    let message = |i: usize| -> Vec<u8> {
        let mut m = vec![0u8; LEN];
        Stream::new(i as u64).fill(&mut m);
        m
    };
    proxy.signal(libc::SIGSTOP);
    for (i, c) in conns.iter_mut().enumerate() {
        // (64 KiB fits in the sockets' buffers while the proxy is stopped.)
        c.write_all(&message(i)).unwrap();
    }
    proxy.signal(libc::SIGCONT);
    for (i, c) in conns.iter_mut().enumerate() {
        let mut back = vec![0u8; LEN];
        c.read_exact(&mut back).unwrap();
        assert!(back == message(i), "connection {i}: the echo differs");
    }
    let fetch = || socket::fetch(&sock).unwrap();
    let s = fetch();
    let (after_burst, waits) = (s.total(|w| w.recv_buffers_resident), s.total(|w| w.buffer_waits));
    let bound = 64 * 4096;
    let started = std::time::Instant::now();
    let mut last = after_burst;
    while started.elapsed() < Duration::from_secs(8) && last > bound {
        std::thread::sleep(Duration::from_millis(100));
        last = fetch().total(|w| w.recv_buffers_resident);
    }
    eprintln!(
        "{CONNS} x {LEN} B at once: {waits} receives waited for a buffer, {} buffers created; the buffers' resident \
         pages: {after_burst} B after the burst, {last} B {:.1} s later",
        s.total(|w| w.buffers_in_use + w.buffers_pooled),
        started.elapsed().as_secs_f64()
    );
    assert!(waits > 0, "the burst ran the ring short");
    assert!(after_burst > 4 * bound, "the burst wrote into more buffers than the narrowest offer: {after_burst} B");
    let (io, _) = ringproxy::features::effective(None).unwrap();
    if io.pbuf_status {
        assert!(last <= bound, "the buffers still hold {last} B after {:?} of quiet", started.elapsed());
    }
    drop(conns);
    proxy.stop_clean();
}
