//! How the binary ends besides a clean drain: a second SIGTERM exits at once (review 7c).

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
