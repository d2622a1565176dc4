//! How the binary ends besides a clean drain: a second SIGTERM exits at once (review 7c), and a
//! helper thread that fails makes it say so and exit non-zero (issue 10 item 4).

use std::time::{Duration, Instant};

use crate::common::*;

/// Review 7c: with a connection held open and `timeout drain` 20 s, a second SIGTERM during the
/// drain exits with status 1 at once, without joining the draining workers (7b9477c logged
/// "exiting now" and exited 20 s later), and removes the ready file and the stats socket.
#[test]
fn a_second_sigterm_exits_at_once_with_status_1() {
    let backend = Backend::start(Mode::Hold);
    let sock = temp_path("second-sigterm.sock");
    let mut proxy = Proxy::start(
        "second-sigterm",
        &format!(
            "global: {{ workers: 2, stats: {{ socket: {} }} }}\ndefaults: {{ timeout: {{ drain: 20s }} }}\n\
             frontends: [{{ name: fe, bind: \"127.0.0.1:0\", backend: be }}]\n\
             backends: [{{ name: be, servers: [{{ name: s, address: \"{}\" }}] }}]\n",
            sock.display(),
            backend.addr
        ),
    );
    let mut held = connect(proxy.addr("fe"));
    echo_once(&mut held, b"held open");
    proxy.sigterm();
    proxy.wait_stderr("draining");
    assert!(!proxy.has_exited(), "the drain waits for the held connection");
    let t = Instant::now();
    proxy.sigterm();
    assert_eq!(proxy.wait_exit(Duration::from_secs(5)), Some(1));
    assert!(t.elapsed() < Duration::from_secs(2), "exited {:?} after the second SIGTERM", t.elapsed());
    proxy.wait_stderr("SIGTERM again: exiting now");
    assert!(!proxy.ready_file().exists(), "the ready file is removed");
    assert!(!sock.exists(), "the stats socket is removed");
    let (_, _) = read_to_end(&mut held);
}

/// Issue 10 item 4: a helper thread (health checks, connection log) that fails is named, with its
/// cause, in one line, and the process drains and exits with status 1 (7b9477c went on without
/// it, silently). The failure is injected with RINGPROXY_FAIL_THREAD, which debug builds honour.
#[test]
fn a_failed_helper_thread_is_reported_and_the_process_exits_1() {
    if !cfg!(debug_assertions) {
        eprintln!("skipped: RINGPROXY_FAIL_THREAD is honoured by debug builds only");
        return;
    }
    let echo = Backend::start(Mode::Echo);
    for thread in ["ringproxy-health", "ringproxy-log"] {
        let yaml = format!(
            "global: {{ workers: 1, connection_log: stderr }}\n\
             frontends: [{{ name: fe, bind: \"127.0.0.1:0\", backend: be }}]\n\
             backends: [{{ name: be, check: {{ interval: 100ms }}, servers: [{{ name: s, address: \"{}\" }}] }}]\n",
            echo.addr
        );
        let mut proxy = Started::spawn(&temp_dir(), thread, &yaml, &[], |cmd| {
            cmd.env("RINGPROXY_FAIL_THREAD", thread);
        });
        assert_eq!(proxy.wait_exit(Duration::from_secs(10)), Some(1), "{thread}: {:#?}", proxy.stderr());
        let line = proxy.wait_stderr(&format!("the {thread} thread failed"));
        assert!(line.contains(&format!("panicked: RINGPROXY_FAIL_THREAD={thread}")), "{line}");
        assert!(line.contains("exiting with status 1"), "{line}");
    }
}
