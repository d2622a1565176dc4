//! ringload through ringproxy: every client mode against `ringload serve` behind the real
//! `ringproxy` binary, with results checked against what the backends saw (connections accepted,
//! bytes in and out), and a corrupting backend behind the proxy still caught (the proxy does not
//! hide corruption).
//!
//! `ringproxy` is the binary next to this test's (`target/<profile>/ringproxy`); `cargo test
//! --workspace` builds it, and `cargo test -p ringload` alone builds it when it is missing
//! ([`common::ringproxy_bin`]). Both children say where they listen in their `--ready-file`.
//! Loopback only, every port picked by the kernel and read back, every wait bounded, every child
//! killed on drop.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

mod common;
use common::{Lines, RINGLOAD, Serve, ringproxy_bin, temp_path, terminate, wait_child, wait_ready};

/// The real `ringproxy` binary with a configuration in a temp file, frontend on a kernel-picked port.
struct Proxy {
    child: Child,
    addr: String,
    stderr: Lines,
    config: PathBuf,
    ready: PathBuf,
}

/// A server line: backend address and optional source set.
struct Server<'a>(&'a str, Option<&'a str>);

impl Proxy {
    fn start(servers: &[Server]) -> Proxy {
        let mut yaml = String::from(
            "global: { workers: 2, maxconn: 4000 }\n\
             defaults: { timeout: { connect: 5s, client: 60s, server: 60s } }\n\
             frontends: [{ name: t, bind: \"127.0.0.1:0\", backend: b }]\n\
             backends:\n  - name: b\n    balance: roundrobin\n    servers:\n",
        );
        for (i, Server(addr, source)) in servers.iter().enumerate() {
            let source = source.map(|s| format!(", source: \"{s}\"")).unwrap_or_default();
            yaml.push_str(&format!("      - {{ name: s{i}, address: \"{addr}\"{source} }}\n"));
        }
        let config = temp_path("proxy.yaml");
        let ready = temp_path("proxy.ready");
        std::fs::write(&config, &yaml).expect("write the proxy configuration");
        let mut child = Command::new(ringproxy_bin())
            .arg("-c")
            .arg(&config)
            .arg("--ready-file")
            .arg(&ready)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start ringproxy");
        let stderr = Lines::read(child.stderr.take().expect("ringproxy stderr"));
        let addr = wait_ready(&mut child, &ready, Duration::from_secs(15))
            .and_then(|r| {
                let t = r.listeners.iter().find(|l| l.name == "t");
                t.map(|l| l.addr.to_string()).ok_or_else(|| format!("no frontend \"t\" in {r:?}"))
            })
            .unwrap_or_else(|e| {
                let _ = child.kill();
                let _ = child.wait();
                let _ = std::fs::remove_file(&config);
                panic!("ringproxy: {e}\n{}\nconfig:\n{yaml}", stderr.text())
            });
        Proxy { child, addr, stderr, config, ready }
    }

    /// SIGTERM: the proxy drains and exits 0, quickly when no connection is left open.
    fn stop_cleanly(mut self) {
        let code = terminate(&mut self.child, Duration::from_secs(10));
        assert_eq!(code, Some(0), "ringproxy did not drain and exit 0 within 10s:\n{}", self.stderr.text());
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.config);
        let _ = std::fs::remove_file(&self.ready);
    }
}

/// Run ringload with `args` plus `--json`, killed after `limit`: (exit code, report).
fn ringload(args: &[&str], limit: Duration) -> (i32, Value) {
    let child = Command::new(RINGLOAD)
        .args(args)
        .args(["--json", "--no-progress"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start ringload");
    let (code, out) = wait_child(child, limit);
    let v: Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("bad JSON ({e}) from {args:?}: {out}"));
    assert_eq!(v["exit_code"].as_i64(), Some(code as i64), "exit code matches the JSON");
    (code, v)
}

const LIMIT: Duration = Duration::from_secs(60);

fn u(v: &Value, path: &str) -> u64 {
    path.split('.').fold(v, |v, k| &v[k]).as_u64().unwrap_or_else(|| panic!("{path} is not a count in {v}"))
}

fn f(v: &Value, path: &str) -> f64 {
    path.split('.').fold(v, |v, k| &v[k]).as_f64().unwrap_or_else(|| panic!("{path} is not a number in {v}"))
}

/// No connection to the backend listening on 127.0.0.1:`port` is in ESTABLISHED or CLOSE_WAIT any
/// more (the backend has seen every connection end), waiting at most `limit`.
fn wait_backend_idle(port: u16, limit: Duration) {
    // /proc/net/tcp prints the address as the raw 32-bit word: 0100007F on little-endian hosts.
    let local = [format!("0100007F:{port:04X}"), format!("7F000001:{port:04X}")];
    let end = Instant::now() + limit;
    loop {
        let busy: Vec<String> = std::fs::read_to_string("/proc/net/tcp")
            .unwrap_or_default()
            .lines()
            .skip(1)
            .filter(|l| {
                let cols: Vec<&str> = l.split_whitespace().collect();
                cols.len() > 3 && local.iter().any(|a| a == cols[1]) && (cols[3] == "01" || cols[3] == "08")
            })
            .map(str::to_string)
            .collect();
        if busy.is_empty() {
            return;
        }
        assert!(
            Instant::now() < end,
            "{} connections to the backend on port {port} still open after {limit:?}:\n{}",
            busy.len(),
            busy.join("\n")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn hold_through_proxy_every_heartbeat_echoed_every_connection_proxied_once() {
    // Like the demo: two backends, one server each with its own source IP, round robin.
    let a = Serve::start("echo", &["--workers", "2"]);
    let b = Serve::start("echo", &["--workers", "2"]);
    let proxy = Proxy::start(&[Server(&a.addr, Some("127.0.2.1")), Server(&b.addr, Some("127.0.2.2"))]);
    let (code, v) = ringload(
        &[
            "hold",
            "--target",
            &proxy.addr,
            "--conns",
            "300",
            "--sources",
            "127.0.1.0/29",
            "--ramp",
            "3000/s",
            // 2 s: a heartbeat counts as lost when its echo is not back by the next one, and this shared
            // 2-CPU host has been seen to stall a process for about a second.
            "--heartbeat",
            "2s",
            "--duration",
            "4s",
        ],
        LIMIT,
    );
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["targets"][0].as_str(), Some(proxy.addr.as_str()));
    assert_eq!(u(&v, "connections.established"), 300);
    assert_eq!(u(&v, "connections.peak_open"), 300);
    assert_eq!(u(&v, "connections.failed"), 0);
    assert_eq!(u(&v, "connections.dropped"), 0);
    assert_eq!(u(&v, "messages.lost"), 0);
    assert_eq!(u(&v, "messages.corrupted"), 0);
    let sent = u(&v, "messages.sent");
    assert!(sent >= 300 * 2, "a heartbeat every 2s for 4s on each connection: {sent}");
    assert_eq!(u(&v, "messages.echoed_ok"), sent);
    // Every connection ended: the proxy drains at once.
    proxy.stop_cleanly();
    let (sa, sb) = (a.stop(), b.stop());
    // One backend connection per client connection, spread by round robin (each worker keeps its
    // own rotation, so the split is even to within the number of workers).
    assert_eq!(sa.accepted + sb.accepted, 300, "{sa:?} {sb:?}");
    assert!(sa.accepted.abs_diff(sb.accepted) <= 4, "round robin: {sa:?} {sb:?}");
    // Every heartbeat byte went through the proxy to a backend and back, nothing else.
    assert_eq!(sa.bytes_in + sb.bytes_in, sent * 16, "{sa:?} {sb:?}");
    assert_eq!(sa.bytes_out + sb.bytes_out, sent * 16, "{sa:?} {sb:?}");
}

#[test]
fn rate_through_proxy() {
    let s = Serve::start("echo", &["--workers", "2"]);
    let proxy = Proxy::start(&[Server(&s.addr, None)]);
    let (code, v) =
        ringload(&["rate", "--target", &proxy.addr, "--concurrency", "8", "--size", "64", "--duration", "2s"], LIMIT);
    assert_eq!(code, 0, "{v}");
    assert!(f(&v, "connections_per_s") > 0.0, "{v}");
    assert_eq!(u(&v, "connections.failed"), 0, "{v}");
    assert_eq!(u(&v, "connections.dropped"), 0, "{v}");
    assert_eq!(u(&v, "messages.lost"), 0);
    assert_eq!(u(&v, "messages.corrupted"), 0);
    let done = u(&v, "messages.echoed_ok");
    assert!(done > 0);
    assert_eq!(u(&v, "latency_us.count"), done);
    drop(proxy);
    // Each completed exchange was one proxied connection carrying 64 bytes each way.
    let sum = s.stop();
    assert!(sum.accepted >= done, "{sum:?} vs {done} exchanges");
    assert!(sum.bytes_in >= done * 64, "{sum:?} vs {done} exchanges");
}

#[test]
fn throughput_through_proxy_up_down_and_both() {
    // up: every byte ringload's sockets took arrives at the backend, exactly.
    let sink = Serve::start("sink", &["--workers", "2"]);
    let proxy = Proxy::start(&[Server(&sink.addr, None)]);
    let (code, v) = ringload(
        &["throughput", "--target", &proxy.addr, "--streams", "2", "--direction", "up", "--duration", "1s"],
        LIMIT,
    );
    assert_eq!(code, 0, "{v}");
    let up = u(&v, "throughput.up_bytes");
    assert!(up > 0 && f(&v, "throughput.up_gbps") > 0.0, "{v}");
    assert_eq!(u(&v, "throughput.down_bytes"), 0);
    wait_backend_idle(sink.port(), Duration::from_secs(10));
    drop(proxy);
    let sum = sink.stop();
    assert_eq!(sum.accepted, 2);
    assert_eq!(sum.bytes_in, up, "bytes sent through the proxy vs bytes the sink read: {sum:?}");

    // down: the backend streams, ringload reads through the proxy.
    let source = Serve::start("source", &["--workers", "2"]);
    let proxy = Proxy::start(&[Server(&source.addr, None)]);
    let (code, v) = ringload(
        &["throughput", "--target", &proxy.addr, "--streams", "2", "--direction", "down", "--duration", "1s"],
        LIMIT,
    );
    assert_eq!(code, 0, "{v}");
    let down = u(&v, "throughput.down_bytes");
    assert!(down > 0 && f(&v, "throughput.down_gbps") > 0.0, "{v}");
    assert_eq!(u(&v, "throughput.up_bytes"), 0);
    drop(proxy);
    let sum = source.stop();
    assert!(sum.bytes_out >= down, "the source wrote at least what ringload read: {sum:?} vs {down}");

    // both, against an echo: what comes back is at most what went up.
    let echo = Serve::start("echo", &["--workers", "2"]);
    let proxy = Proxy::start(&[Server(&echo.addr, None)]);
    let (code, v) = ringload(
        &["throughput", "--target", &proxy.addr, "--streams", "2", "--direction", "both", "--duration", "1s"],
        LIMIT,
    );
    assert_eq!(code, 0, "{v}");
    let (up, down) = (u(&v, "throughput.up_bytes"), u(&v, "throughput.down_bytes"));
    assert!(up > 0 && down > 0, "{v}");
    assert!(down <= up, "echoed more than was sent: up {up}, down {down}");
    assert_eq!(u(&v, "connections.dropped"), 0);
}

#[test]
fn latency_through_proxy() {
    let s = Serve::start("echo", &["--workers", "2"]);
    let proxy = Proxy::start(&[Server(&s.addr, None)]);
    let (code, v) = ringload(
        &["latency", "--target", &proxy.addr, "--conns", "4", "--rate", "400", "--size", "256", "--duration", "2s"],
        LIMIT,
    );
    assert_eq!(code, 0, "{v}");
    assert!(f(&v, "requests_per_s") > 50.0, "{v}");
    assert_eq!(u(&v, "connections.established"), 4);
    assert_eq!(u(&v, "connections.failed"), 0);
    assert_eq!(u(&v, "messages.lost"), 0);
    assert_eq!(u(&v, "messages.corrupted"), 0);
    let sent = u(&v, "messages.sent");
    assert_eq!(u(&v, "messages.echoed_ok"), sent);
    assert_eq!(u(&v, "latency_us.count"), sent);
    assert!(u(&v, "latency_uncorrected_us.count") > 0);
    assert!(f(&v, "latency_us.p99") >= f(&v, "latency_us.p50"));
    proxy.stop_cleanly();
    let sum = s.stop();
    assert_eq!(sum.accepted, 4);
    assert_eq!(sum.bytes_in, sent * 256, "{sum:?}");
}

#[test]
fn corruption_behind_the_proxy_is_detected() {
    let s = Serve::start("echo", &["--workers", "2", "--corrupt-every", "64"]);
    let proxy = Proxy::start(&[Server(&s.addr, None)]);
    let (code, v) = ringload(
        &["hold", "--target", &proxy.addr, "--conns", "20", "--heartbeat", "100ms", "--duration", "1s"],
        LIMIT,
    );
    assert_eq!(code, 1, "{v}");
    assert!(u(&v, "messages.corrupted") > 0, "{}", v["messages"]);
    assert_eq!(v["verdict"].as_str().map(|s| s.starts_with("integrity")), Some(true), "{v}");
    let (code, v) =
        ringload(&["latency", "--target", &proxy.addr, "--conns", "2", "--rate", "200", "--duration", "1s"], LIMIT);
    assert_eq!(code, 1, "{v}");
    assert!(u(&v, "messages.corrupted") > 0, "{}", v["messages"]);
}
