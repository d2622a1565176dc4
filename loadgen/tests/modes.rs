//! Every client mode against `ringload serve` on loopback (small counts),
//! the multi-process split, integrity checking against a corrupting
//! backend, failure classification, reports and Ctrl-C. Real sockets, real
//! binary; every wait has a timeout and every port is chosen by the kernel
//! (and read back from `serve --ready-file`).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

mod common;
use common::{RINGLOAD as BIN, Serve, wait_child};

/// Run ringload with `args`; returns (exit code, stdout). Killed after `limit`.
fn run(args: &[&str], limit: Duration) -> (i32, String) {
    let child =
        Command::new(BIN).args(args).stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn().expect("start ringload");
    wait_child(child, limit)
}

fn json(args: &[&str]) -> (i32, Value) {
    let mut a = args.to_vec();
    a.push("--json");
    let (code, out) = run(&a, Duration::from_secs(60));
    let v: Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("bad JSON ({e}): {out}"));
    assert_eq!(v["schema"], "ringload.v1");
    assert_eq!(v["exit_code"].as_i64(), Some(code as i64), "exit code matches JSON");
    (code, v)
}

fn u(v: &Value, path: &str) -> u64 {
    path.split('.').fold(v, |v, k| &v[k]).as_u64().unwrap_or_else(|| panic!("{path} missing in {v}"))
}

#[test]
fn hold_500_connections_all_heartbeats_echoed() {
    let s = Serve::start("echo", &[]);
    let (code, v) = json(&[
        "hold",
        "--target",
        &s.addr,
        "--conns",
        "500",
        "--ramp",
        "20000/s",
        "--heartbeat",
        "200ms",
        "--duration",
        "1500ms",
    ]);
    assert_eq!(code, 0, "{v}");
    assert_eq!(u(&v, "connections.established"), 500);
    assert_eq!(u(&v, "connections.failed"), 0);
    assert_eq!(u(&v, "messages.lost"), 0);
    assert_eq!(u(&v, "messages.corrupted"), 0);
    assert!(u(&v, "messages.echoed_ok") >= 500 * 3, "{}", v["messages"]);
    assert!(u(&v, "latency_us.count") > 0);
    assert!(v["connections"]["ramp_time_s"].as_f64().is_some());
}

/// An echo connection starts with a small buffer (most of serve's memory at a million idle
/// connections) and grows it while messages fill it: a 48 KiB exchange comes back whole.
#[test]
fn echo_grows_its_buffer_for_messages_larger_than_the_first() {
    let s = Serve::start("echo", &["--workers", "1"]);
    let (code, v) = json(&["rate", "--target", &s.addr, "--concurrency", "2", "--size", "49152", "--duration", "1s"]);
    assert_eq!(code, 0, "{v}");
    assert_eq!(u(&v, "connections.failed"), 0, "{v}");
    assert_eq!(u(&v, "messages.lost"), 0, "{v}");
    assert_eq!(u(&v, "messages.corrupted"), 0, "{v}");
    assert!(u(&v, "messages.echoed_ok") > 0, "{v}");
}

#[test]
fn hold_splits_into_processes_and_merges() {
    let s = Serve::start("echo", &[]);
    let (code, v) = json(&[
        "hold",
        "--target",
        &s.addr,
        "--conns",
        "1000",
        "--fds-per-process",
        "300",
        "--sources",
        "127.0.1.1-127.0.1.4",
        "--ramp",
        "20000/s",
        "--heartbeat",
        "300ms",
        "--duration",
        "1500ms",
    ]);
    assert_eq!(code, 0, "{v}");
    assert_eq!(u(&v, "processes"), 4);
    assert_eq!(u(&v, "connections.established"), 1000);
    assert_eq!(u(&v, "connections.peak_open"), 1000);
    assert_eq!(u(&v, "messages.lost"), 0);
    // The merged histogram holds every heartbeat of every child.
    assert_eq!(u(&v, "latency_us.count"), u(&v, "messages.echoed_ok"));
    let peak = v["timeline"].as_array().unwrap().iter().map(|s| s["open"].as_u64().unwrap()).max();
    assert_eq!(peak, Some(1000));
}

#[test]
fn corrupting_backend_is_caught_by_hold_and_latency() {
    let s = Serve::start("echo", &["--corrupt-every", "64"]);
    let (code, v) = json(&["hold", "--target", &s.addr, "--conns", "20", "--heartbeat", "100ms", "--duration", "1s"]);
    assert_eq!(code, 1, "{v}");
    assert!(u(&v, "messages.corrupted") > 0, "{}", v["messages"]);
    assert_eq!(v["verdict"].as_str().map(|s| s.starts_with("integrity")), Some(true));
    let (code, v) = json(&["latency", "--target", &s.addr, "--conns", "2", "--rate", "200", "--duration", "1s"]);
    assert_eq!(code, 1, "{v}");
    assert!(u(&v, "messages.corrupted") > 0);
}

#[test]
fn rate_mode_counts_connections() {
    let s = Serve::start("echo", &[]);
    let (code, v) = json(&[
        "rate",
        "--target",
        &s.addr,
        "--concurrency",
        "8",
        "--duration",
        "1s",
        "--sources",
        "127.0.1.10,127.0.1.11",
    ]);
    assert_eq!(code, 0, "{v}");
    assert!(v["connections_per_s"].as_f64().unwrap() > 100.0, "{v}");
    assert_eq!(u(&v, "connections.failed"), 0);
    assert_eq!(u(&v, "messages.corrupted"), 0);
    assert_eq!(u(&v, "latency_us.count"), u(&v, "messages.echoed_ok"));
}

#[test]
fn throughput_up_down_and_both() {
    let sink = Serve::start("sink", &[]);
    let source = Serve::start("source", &[]);
    let (code, v) = json(&["throughput", "--target", &sink.addr, "--streams", "2", "--duration", "700ms"]);
    assert_eq!(code, 0, "{v}");
    assert!(v["throughput"]["up_gbps"].as_f64().unwrap() > 0.1, "{v}");
    let (code, v) = json(&["throughput", "--target", &source.addr, "--direction", "down", "--duration", "700ms"]);
    assert_eq!(code, 0, "{v}");
    assert!(v["throughput"]["down_gbps"].as_f64().unwrap() > 0.1, "{v}");
    assert_eq!(u(&v, "throughput.up_bytes"), 0);
    let (code, v) = json(&["throughput", "--target", &source.addr, "--direction", "both", "--duration", "700ms"]);
    assert_eq!(code, 0, "{v}");
    assert!(u(&v, "throughput.up_bytes") > 0 && u(&v, "throughput.down_bytes") > 0, "{v}");
}

#[test]
fn latency_mode_holds_the_rate_and_reports_both_histograms() {
    let s = Serve::start("echo", &[]);
    let (code, v) = json(&["latency", "--target", &s.addr, "--conns", "4", "--rate", "500/s", "--duration", "2s"]);
    assert_eq!(code, 0, "{v}");
    let rps = v["requests_per_s"].as_f64().unwrap();
    assert!((350.0..=560.0).contains(&rps), "requests/s {rps}");
    let corrected = u(&v, "latency_us.p50");
    let raw = u(&v, "latency_uncorrected_us.p50");
    assert!(corrected >= raw, "corrected {corrected} < uncorrected {raw}");
    assert_eq!(u(&v, "messages.lost"), 0);
}

#[test]
fn refused_connections_are_classified() {
    // A bound socket that does not listen: connects to it are refused.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    drop(l);
    let (code, v) = json(&["hold", "--target", &addr, "--conns", "5", "--duration", "500ms"]);
    assert_eq!(code, 3, "{v}");
    assert_eq!(u(&v, "connections.failed_by_cause.refused"), 5);
    assert_eq!(u(&v, "connections.established"), 0);
}

#[test]
fn svg_and_html_reports_and_table() {
    let s = Serve::start("echo", &[]);
    let dir = std::env::temp_dir().join(format!("ringload-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let svg = dir.join("r.svg");
    let html = dir.join("r.html");
    let (code, out) = run(
        &["rate", "--target", &s.addr, "--concurrency", "4", "--duration", "500ms", "--report", svg.to_str().unwrap()],
        Duration::from_secs(30),
    );
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("connections/s"), "{out}");
    let text = std::fs::read_to_string(&svg).unwrap();
    assert!(text.contains("<svg") && text.contains("</svg>"));
    let (code, _) = run(
        &[
            "hold",
            "--target",
            &s.addr,
            "--conns",
            "10",
            // Generous: a heartbeat not echoed before the next is due counts as lost, and this
            // machine may be busy with other work while the suite runs.
            "--heartbeat",
            "400ms",
            "--duration",
            "1s",
            "--report",
            html.to_str().unwrap(),
            "--json",
        ],
        Duration::from_secs(30),
    );
    assert_eq!(code, 0);
    let text = std::fs::read_to_string(&html).unwrap();
    assert!(text.contains("<html") && text.contains("<svg"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn ctrl_c_stops_a_split_run_and_still_reports() {
    let s = Serve::start("echo", &[]);
    let child = Command::new(BIN)
        .args([
            "hold",
            "--target",
            &s.addr,
            "--conns",
            "300",
            "--fds-per-process",
            "100",
            "--heartbeat",
            "100ms",
            "--duration",
            "60s",
            "--json",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    // SAFETY: signalling our own child by pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let started = Instant::now();
    let (code, out) = wait_child(child, Duration::from_secs(20));
    assert!(started.elapsed() < Duration::from_secs(10));
    let v: Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("bad JSON ({e}): {out}"));
    assert_eq!(v["interrupted"], true);
    assert_eq!(u(&v, "processes"), 3);
    assert_eq!(u(&v, "connections.established"), 300);
    assert_eq!(code, 130, "{v}");
}

#[test]
fn bad_flags_exit_2_with_a_message() {
    let out = Command::new(BIN)
        .args(["hold", "--target", "127.0.0.1:1", "--conns", "1", "--sources", "127.0.0.0/8"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--sources"));
}

#[test]
fn unusable_sources_are_refused_up_front() {
    let out = Command::new(BIN)
        .args(["hold", "--target", "127.0.0.1:1", "--conns", "1", "--sources", "192.0.2.1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("192.0.2.1") && err.contains("address of this host"), "{err}");
}

#[test]
fn connections_spread_over_several_targets() {
    let s = Serve::start_on(&["127.0.0.1:0", "127.0.0.2:0"], "echo", &["--workers", "1"]);
    assert_eq!(s.all.len(), 2);
    let targets = s.all.join(",");
    let (code, v) =
        json(&["hold", "--target", &targets, "--conns", "100", "--heartbeat", "200ms", "--duration", "700ms"]);
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["targets"].as_array().map(|a| a.len()), Some(2));
    assert_eq!(u(&v, "connections.established"), 100);
}

#[test]
fn under_a_seccomp_filter_serve_and_hold_say_why_in_one_line() {
    use std::os::unix::process::CommandExt;
    // The filter denies the io_uring calls as Docker's default profile does (installed between
    // fork and exec); each command must name it and the fix, and exit 2 (setup error).
    for args in [&["serve", "--listen", "127.0.0.1:0"][..], &["hold", "--target", "127.0.0.1:9", "--conns", "1"]] {
        let mut cmd = Command::new(BIN);
        cmd.args(args);
        // SAFETY: the closure only makes prctl calls (`deny_io_uring`), allowed after fork.
        unsafe { cmd.pre_exec(|| uring_access::deny_io_uring(libc::EPERM as u16)) };
        let out = cmd.output().expect("run ringload");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: one line, got: {stderr}");
        assert!(stderr.starts_with("ringload: error: io_uring is not available:"), "{stderr}");
        assert!(stderr.contains("under a seccomp filter") && stderr.contains("--security-opt seccomp="), "{stderr}");
    }
}

/// An echo server on loopback that, `cut_after` after it started, closes every connection it has
/// (as a server taken out does) and then serves new ones normally.
fn cutting_echo(cut_after: Duration) -> String {
    use std::io::{Read, Write};
    use std::sync::{Arc, Mutex};
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let open: Arc<Mutex<Vec<std::net::TcpStream>>> = Arc::default();
    let cutter = open.clone();
    std::thread::spawn(move || {
        std::thread::sleep(cut_after);
        for c in cutter.lock().unwrap().drain(..) {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    });
    let started = Instant::now();
    std::thread::spawn(move || {
        for c in l.incoming().flatten() {
            if started.elapsed() < cut_after {
                open.lock().unwrap().push(c.try_clone().unwrap());
            }
            std::thread::spawn(move || {
                let mut c = c;
                let mut buf = [0u8; 4096];
                while let Ok(n) = c.read(&mut buf) {
                    if n == 0 || c.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

#[test]
fn hold_reconnects_what_the_server_closed_and_passes_when_all_are_back() {
    let addr = cutting_echo(Duration::from_millis(700));
    let args = ["hold", "--target", &addr, "--conns", "20", "--heartbeat", "100ms", "--duration", "2s"];
    let (code, v) = json(&[&args[..], &["--reconnect", "100ms"]].concat());
    assert_eq!(code, 0, "{v}");
    assert_eq!(u(&v, "connections.dropped"), 20, "the server closed all 20");
    assert_eq!(u(&v, "connections.reconnects"), 20, "each dialed again once");
    assert_eq!(u(&v, "connections.open_at_end"), 20);
    assert_eq!(u(&v, "messages.lost"), 0);
    assert_eq!(u(&v, "messages.corrupted"), 0);
    assert!(u(&v, "messages.echoed_ok") >= 20 * 12, "heartbeats went on after the reconnect: {}", v["messages"]);
    // Without --reconnect, the same cut leaves them closed: connection errors.
    let addr = cutting_echo(Duration::from_millis(500));
    let args = ["hold", "--target", &addr, "--conns", "20", "--heartbeat", "100ms", "--duration", "1s"];
    let (code, v) = json(&args);
    assert_eq!(code, 3, "{v}");
    assert_eq!(u(&v, "connections.reconnects"), 0);
    assert_eq!(u(&v, "connections.open_at_end"), 0);
}

/// An echo server on loopback that records when each 16-byte heartbeat arrived.
fn timing_echo() -> (String, std::sync::Arc<std::sync::Mutex<Vec<Instant>>>) {
    use std::io::{Read, Write};
    use std::sync::{Arc, Mutex};
    // (A backlog for every connection at once: std's 128 would drop SYNs, retried a second later.)
    let l = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    l.bind(&"127.0.0.1:0".parse::<std::net::SocketAddr>().unwrap().into()).unwrap();
    l.listen(1024).unwrap();
    let l: std::net::TcpListener = l.into();
    let addr = l.local_addr().unwrap().to_string();
    let arrivals: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let seen = arrivals.clone();
    std::thread::spawn(move || {
        for c in l.incoming().flatten() {
            let seen = seen.clone();
            std::thread::spawn(move || {
                let mut c = c;
                let mut msg = [0u8; 16];
                while c.read_exact(&mut msg).is_ok() {
                    seen.lock().unwrap().push(Instant::now());
                    if c.write_all(&msg).is_err() {
                        break;
                    }
                }
            });
        }
    });
    (addr, arrivals)
}

/// Heartbeats per 50 ms the server saw over the three intervals (of 500 ms) after the first,
/// for 200 connections established at once.
fn heartbeats_per_50ms(phase: &str) -> Vec<usize> {
    let (addr, arrivals) = timing_echo();
    let (code, v) = json(&[
        "hold",
        "--target",
        &addr,
        "--conns",
        "200",
        "--ramp",
        "100000/s",
        "--heartbeat",
        "500ms",
        "--phase",
        phase,
        "--duration",
        "2600ms",
    ]);
    assert_eq!(code, 0, "{v}");
    assert!(v["connections"]["ramp_time_s"].as_f64() < Some(0.2), "established at once: {v}");
    let arrivals = arrivals.lock().unwrap().clone();
    let first = *arrivals.iter().min().expect("heartbeats arrived");
    let from = first + Duration::from_millis(600);
    let mut bins = vec![0; 30];
    for a in arrivals {
        if a >= from {
            let i = (a - from).as_millis() as usize / 50;
            if i < bins.len() {
                bins[i] += 1;
            }
        }
    }
    bins
}

#[test]
fn hold_spreads_heartbeats_evenly_over_the_interval_unless_told_to_follow_the_connect() {
    // 200 connections over 500 ms: one heartbeat every 2.5 ms, 20 in each 50 ms, 600 in all.
    let spread = heartbeats_per_50ms("spread");
    // (A heartbeat due right at the window's edge may fall either side of it.)
    assert!((590..=610).contains(&spread.iter().sum::<usize>()), "{spread:?}");
    assert!(spread.iter().all(|&n| (10..=30).contains(&n)), "even over the interval: {spread:?}");
    // Established within a few milliseconds of each other, they heartbeat together.
    let connect = heartbeats_per_50ms("connect");
    assert!((590..=610).contains(&connect.iter().sum::<usize>()), "{connect:?}");
    // (A burst may straddle two bins.)
    let busy_bins = connect.iter().filter(|&&n| n > 0).count();
    assert!(busy_bins <= 3 * 3, "together, once an interval: {connect:?}");
    assert!(connect.windows(2).map(|w| w[0] + w[1]).max() >= Some(180), "together: {connect:?}");
}

/// An echo server on loopback that treats the `k`-th 16-byte heartbeat of every connection apart:
/// its echo waits `delay`, or (`None`) never comes while the others still do.
fn echo_holding_back(k: u32, delay: Option<Duration>) -> String {
    use std::io::{Read, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for c in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut c = c;
                let mut msg = [0u8; 16];
                let mut n = 0;
                while c.read_exact(&mut msg).is_ok() {
                    n += 1;
                    if n == k {
                        match delay {
                            Some(d) => std::thread::sleep(d),
                            None => continue,
                        }
                    }
                    if c.write_all(&msg).is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

#[test]
fn hold_tells_late_heartbeats_in_the_warm_up_and_after_it_from_lost_ones() {
    let hold = |addr: &str, latency_after: &str| {
        json(&[
            "hold",
            "--target",
            addr,
            "--conns",
            "20",
            "--heartbeat",
            "100ms",
            "--duration",
            "2s",
            "--latency-after",
            latency_after,
        ])
    };
    // The 2nd heartbeat of each connection (sent within the first ~250 ms) echoed 250 ms late:
    // the 3rd was due before it came. Within the warm-up: reported, the run passes.
    let (code, v) = hold(&echo_holding_back(2, Some(Duration::from_millis(250))), "1s");
    assert_eq!(code, 0, "{v}");
    assert_eq!(u(&v, "messages.late_in_warmup"), 20, "{}", v["messages"]);
    assert_eq!(u(&v, "messages.late"), 0, "{}", v["messages"]);
    assert_eq!(u(&v, "messages.lost"), 0, "{}", v["messages"]);
    // The 12th (sent after ~1.1 s, past --latency-after): a failure, and its round trip is in the
    // percentiles (a late echo is the tail, not a gap in it).
    let (code, v) = hold(&echo_holding_back(12, Some(Duration::from_millis(250))), "500ms");
    assert_eq!(code, 1, "{v}");
    assert!(v["verdict"].as_str().unwrap().starts_with("late: 20 "), "{v}");
    assert_eq!(u(&v, "messages.late"), 20, "{}", v["messages"]);
    assert_eq!(u(&v, "messages.lost"), 0, "{}", v["messages"]);
    assert!(u(&v, "latency_us.max") >= 250_000, "{}", v["latency_us"]);
    // The 3rd never echoed: lost (not late), whenever it was sent; the run fails on it.
    let (code, v) = hold(&echo_holding_back(3, None), "1s");
    assert_eq!(code, 1, "{v}");
    assert_eq!(u(&v, "messages.lost"), 20, "{}", v["messages"]);
    assert_eq!(u(&v, "messages.late") + u(&v, "messages.late_in_warmup"), 0, "{}", v["messages"]);
    assert!(v["verdict"].as_str().unwrap().starts_with("integrity: 20 lost"), "{v}");
}

#[test]
fn throughput_keeps_reading_while_its_last_sends_complete() {
    use std::io::{Read, Write};
    use std::sync::{Arc, Mutex};
    // One stream both ways for 500 ms against a server that writes without pause and, from 300 ms
    // on, reads nothing for 1.2 s: the client's last send, in flight at its deadline, waits for
    // that, and the client must go on reading meanwhile (else the server's writes stop as soon
    // as the socket buffers are full: a stuck destination for whatever is between them).
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let written: Arc<Mutex<Vec<(Instant, u64)>>> = Arc::default();
    let log = written.clone();
    let accepted = Arc::new(Mutex::new(None));
    let at = accepted.clone();
    std::thread::spawn(move || {
        let (c, _) = l.accept().unwrap();
        *at.lock().unwrap() = Some(Instant::now());
        let start = Instant::now();
        let mut w = c.try_clone().unwrap();
        std::thread::spawn(move || {
            let chunk = vec![7u8; 64 * 1024];
            let mut total = 0u64;
            while let Ok(n) = w.write(&chunk) {
                total += n as u64;
                log.lock().unwrap().push((Instant::now(), total));
            }
        });
        let mut r = c;
        let mut buf = vec![0u8; 64 * 1024];
        while start.elapsed() < Duration::from_millis(300) {
            if matches!(r.read(&mut buf), Ok(0) | Err(_)) {
                return;
            }
        }
        std::thread::sleep(Duration::from_millis(1200));
        while matches!(r.read(&mut buf), Ok(n) if n > 0) {}
    });
    let (code, v) = json(&["throughput", "--target", &addr, "--direction", "both", "--duration", "500ms"]);
    assert_eq!(code, 0, "{v}");
    let start = accepted.lock().unwrap().expect("accepted");
    let written = written.lock().unwrap().clone();
    let by = |t: Duration| written.iter().take_while(|(at, _)| *at < start + t).last().map_or(0, |&(_, n)| n);
    let during_the_wait = by(Duration::from_millis(1400)) - by(Duration::from_millis(700));
    assert!(during_the_wait > 16 << 20, "the client read {during_the_wait} bytes while its last send waited");
}
