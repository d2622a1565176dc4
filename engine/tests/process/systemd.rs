//! systemd's readiness protocol as `Type=notify` units see it (packaging/systemd/): the messages
//! arrive on a datagram socket this test binds and names in `NOTIFY_SOCKET`, as systemd does.

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

use crate::common::*;

fn yaml(drain: &str) -> String {
    format!(
        "global: {{ workers: 1 }}\ndefaults: {{ timeout: {{ drain: {drain} }} }}\n\
         frontends:\n  - {{ name: fe, bind: \"127.0.0.1:0\", backend: be }}\n\
         backends:\n  - {{ name: be, servers: [ {{ name: s, address: \"127.0.0.1:9\" }} ] }}\n"
    )
}

/// The next message, as `KEY=VALUE` lines.
fn next(sock: &UnixDatagram) -> Vec<String> {
    let mut buf = [0u8; 4096];
    let n = sock.recv(&mut buf).expect("a notification within the timeout");
    String::from_utf8_lossy(&buf[..n]).lines().map(str::to_owned).collect()
}

fn run(sock: UnixDatagram, env: String, name: &str) {
    sock.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut proxy = Proxy::start_adjusted(name, &yaml("1s"), |c| {
        c.env("NOTIFY_SOCKET", &env);
    });
    // READY=1 once every listener is bound (the ready file, which start waited for, says so too).
    let m = next(&sock);
    assert_eq!(m[0], "READY=1", "{m:?}");
    assert!(m.contains(&format!("MAINPID={}", proxy.pid())), "{m:?}");
    assert!(m.iter().any(|l| l.starts_with("STATUS=generation 0: 1 workers")), "{m:?}");
    // A reload (what ExecReload sends): RELOADING=1 with the time, then READY=1 for the new one.
    proxy.write_config(&yaml("2s"));
    proxy.signal(libc::SIGHUP);
    let m = next(&sock);
    assert_eq!(m[0], "RELOADING=1", "{m:?}");
    assert!(m[1].starts_with("MONOTONIC_USEC="), "{m:?}");
    let m = next(&sock);
    assert_eq!(m[0], "READY=1", "{m:?}");
    assert!(m.iter().any(|l| l.starts_with("STATUS=generation 1:")), "{m:?}");
    // A refused reload still ends the reload: READY=1, the running generation.
    proxy.write_config("frontends: [");
    proxy.signal(libc::SIGHUP);
    assert_eq!(next(&sock)[0], "RELOADING=1");
    let m = next(&sock);
    assert!(m[0] == "READY=1" && m.iter().any(|l| l.starts_with("STATUS=generation 1:")), "{m:?}");
    // SIGTERM: STOPPING=1 as the drain begins.
    proxy.sigterm();
    let m = next(&sock);
    assert_eq!(m[0], "STOPPING=1", "{m:?}");
    assert_eq!(proxy.wait_exit(Duration::from_secs(10)), Some(0));
}

#[test]
fn type_notify_hears_ready_reloading_and_stopping_on_a_path_socket() {
    let path = temp_path("notify.sock");
    let _ = std::fs::remove_file(&path);
    let sock = UnixDatagram::bind(&path).unwrap();
    run(sock, path.display().to_string(), "notify-path");
}

#[test]
fn type_notify_hears_ready_on_an_abstract_socket() {
    let name = format!("ringproxy-test-notify-{}", std::process::id());
    let sock = UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap()).unwrap();
    run(sock, format!("@{name}"), "notify-abstract");
}
