//! The binary: configuration errors and exit codes, the startup report, SIGTERM drain, and the
//! bundled example configurations starting and proxying.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::common::*;

/// Runs `ringproxy -c FILE` on a configuration that must be refused.
fn refused(name: &str, text: &str, line_col: &str, needle: &str) {
    let path = write_temp(name, text);
    let out = ringproxy().arg("-c").arg(&path).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{name}: exit code; stderr: {stderr}");
    let want = format!("{}:{line_col}: ", path.display());
    assert!(stderr.starts_with(&want), "{name}: wanted {want:?} at the start of {stderr:?}");
    assert!(stderr.contains(needle), "{name}: {stderr:?} does not mention {needle:?}");
    assert!(!stderr.contains("listening"), "{name}: something was bound");
}

const OK: &str = "frontends:\n  - name: fe\n    bind: 127.0.0.1:0\n    backend: be\nbackends:\n  - name: be\n    servers:\n      - name: s1\n        address: 127.0.0.1:9\n";

#[test]
fn each_class_of_bad_configuration_names_its_line_and_column_and_exits_2() {
    refused(
        "unknown-key.yaml",
        &OK.replace("    backend: be\n", "    backend: be\n    bakclog: 5\n"),
        "5:5",
        "unknown key `bakclog`",
    );
    refused("wrong-type.yaml", &format!("global:\n  maxconn: many\n{OK}"), "2:12", "expected a whole number");
    refused(
        "duplicate.yaml",
        &format!("{OK}      - name: s1\n        address: 127.0.0.1:10\n"),
        "10:15",
        "duplicate server name \"s1\"",
    );
    refused(
        "missing-backend.yaml",
        &OK.replace("backend: be", "backend: mqtt"),
        "4:14",
        "backend \"mqtt\" does not exist",
    );
    refused(
        "no-servers.yaml",
        "frontends: [{ name: fe, bind: \"127.0.0.1:0\", backend: be }]\nbackends:\n  - name: be\n    servers: []\n",
        "4:14",
        "has no servers",
    );
    refused(
        "bad-address.yaml",
        &OK.replace("127.0.0.1:9", "192.168.8.300:1883"),
        "9:18",
        "\"192.168.8.300\" is not an IP address",
    );
    refused(
        "bad-source.yaml",
        &OK.replace("address: 127.0.0.1:9", "address: 127.0.0.1:9\n        source: 10.0.0.0/33"),
        "10:17",
        "prefix length",
    );
    refused("bad-yaml.yaml", "frontends: [\n  - {\n", "2:3", "only valid inside a block");
}

#[test]
fn missing_file_and_missing_flag_exit_2() {
    let out = ringproxy().args(["-c", "/nonexistent/x.yaml"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read"));
    let out = ringproxy().output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("-c FILE"));
}

#[test]
fn startup_report_states_workers_and_the_effective_maxconn() {
    let backend = Backend::start(Mode::Echo);
    let sock = temp_path("report.sock");
    let proxy = Proxy::start(
        "report",
        &format!(
            "global: {{ workers: 2, maxconn: 2000000, stats: {{ socket: {} }} }}\n\
             frontends: [{{ name: fe, bind: \"127.0.0.1:0\", backend: be }}]\n\
             backends: [{{ name: be, servers: [{{ name: s, address: \"{}\" }}] }}]\n",
            sock.display(),
            backend.addr
        ),
    );
    proxy.wait_stderr("2 workers");
    // This host allows 20000 open files per process: 2000000 cannot fit, and the report says so.
    let limit = ringproxy::host::nofile().unwrap().hard;
    if limit < 4_000_064 {
        let warning = proxy.wait_stderr("warning: maxconn 2000000 does not fit");
        assert!(warning.contains("LimitNOFILE="), "{warning}");
    }
    let mut c = connect(proxy.addr("fe"));
    echo_once(&mut c, b"through the binary");
    drop(c);
    proxy.stop_clean();
}

#[test]
fn sigterm_drains_open_connections_then_exits_0() {
    let backend = Backend::start(Mode::Echo);
    let mut proxy = Proxy::start_with(
        "drain",
        &format!(
            "global: {{ workers: 2 }}\ndefaults: {{ timeout: {{ drain: 20s }} }}\n\
             frontends: [{{ name: fe, bind: \"127.0.0.1:0\", backend: be }}]\n\
             backends: [{{ name: be, servers: [{{ name: s, address: \"{}\" }}] }}]\n",
            backend.addr
        ),
        &["run"],
    );
    let front = proxy.addr("fe");
    let mut open = connect(front);
    echo_once(&mut open, b"before");
    proxy.sigterm();
    // New connections are refused once the listeners are closed...
    wait_until("new connections to be refused", Duration::from_secs(5), || {
        std::net::TcpStream::connect_timeout(&front, Duration::from_millis(200)).is_err()
    });
    // ...while the open one keeps working.
    echo_once(&mut open, b"during the drain");
    assert!(!proxy.has_exited(), "exited with a connection still open");
    drop(open);
    // Well within the 20 s drain timeout: the drain ends when the last connection does.
    assert_eq!(proxy.wait_exit(Duration::from_secs(5)), Some(0));
}

#[test]
fn sigterm_stops_workers_that_accept_one_connection_at_a_time() {
    // Ten listening sockets with deep backlogs could queue more connections than the accept range of
    // the file table holds, so only the first listeners get multishot accepts and the others accept
    // one connection at a time; a drain must cancel those single accepts too, or the worker never
    // finishes.
    let backend = Backend::start(Mode::Echo);
    let binds: Vec<String> = (0..10).map(|_| "\"127.0.0.1:0\"".to_string()).collect();
    let mut proxy = Proxy::start(
        "single-accept",
        &format!(
            "global: {{ workers: 1, maxconn: 1000 }}\n\
             frontends: [{{ name: fe, bind: [{}], backlog: 4096, backend: be }}]\n\
             backends: [{{ name: be, servers: [{{ name: s, address: \"{}\" }}] }}]\n",
            binds.join(", "),
            backend.addr
        ),
    );
    let addrs = proxy.addrs("fe");
    assert_eq!(addrs.len(), 10);
    for (i, a) in addrs.iter().enumerate() {
        for _ in 0..3 {
            let mut c = connect(*a);
            echo_once(&mut c, format!("bind {i}").as_bytes());
        }
    }
    proxy.sigterm();
    assert_eq!(proxy.wait_exit(Duration::from_secs(5)), Some(0), "the drain did not finish");
}

#[test]
fn drain_timeout_bounds_the_wait() {
    let backend = Backend::start(Mode::Hold);
    let mut proxy = Proxy::start(
        "drain-timeout",
        &format!(
            "global: {{ workers: 2 }}\ndefaults: {{ timeout: {{ drain: 500ms }} }}\n\
             frontends: [{{ name: fe, bind: \"127.0.0.1:0\", backend: be }}]\n\
             backends: [{{ name: be, servers: [{{ name: s, address: \"{}\" }}] }}]\n",
            backend.addr
        ),
    );
    let mut open = connect(proxy.addr("fe"));
    echo_once(&mut open, b"stays open");
    let t = Instant::now();
    // Deliberately not clean: the connection stays open, and the drain timeout must end it.
    proxy.sigterm();
    assert_eq!(proxy.wait_exit(Duration::from_secs(5)), Some(0));
    assert!(t.elapsed() >= Duration::from_millis(400), "exited before the drain timeout");
    let (_, _) = read_to_end(&mut open);
}

#[test]
fn example_configurations_start_and_proxy() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../config-examples");
    let backend = Backend::start(Mode::Echo);
    let mut tried = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "yaml") {
            continue;
        }
        let mut config = ringproxy::config::load(&path).unwrap();
        // Same configuration, but on ephemeral ports and in front of our echo server, so it runs
        // anywhere; sources, balancing and limits stay as written.
        for fe in &mut config.frontends {
            for b in &mut fe.binds {
                let ip = if b.is_ipv6() { "::1".parse().unwrap() } else { "127.0.0.1".parse().unwrap() };
                *b = SocketAddr::new(ip, 0);
            }
        }
        for be in &mut config.backends {
            for s in &mut be.servers {
                s.address = backend.addr;
                // An echo server would send our PROXY header back to the client.
                s.send_proxy = None;
            }
        }
        // In-process: dropping privileges would drop them for the whole test process.
        config.global.user = None;
        config.global.group = None;
        config.global.stats = Default::default();
        config.global.connection_log = None;
        let accept_proxy: Vec<String> =
            config.frontends.iter().filter(|f| f.accept_proxy).map(|f| f.name.clone()).collect();
        eprintln!("{}", path.display());
        let engine = TestEngine::start(config);
        for b in engine.bound() {
            let mut c = connect(b.addr);
            if accept_proxy.contains(&b.frontend) {
                std::io::Write::write_all(&mut c, b"PROXY TCP4 10.1.1.1 10.2.2.2 1000 1883\r\n").unwrap();
            }
            echo_once(&mut c, format!("via {}", path.display()).as_bytes());
        }
        assert_clean(engine, &[backend.addr.port()]);
        tried += 1;
    }
    assert!(tried >= 3);
}

#[test]
fn ready_file_names_every_bound_address_and_goes_away_at_exit() {
    let backend = Backend::start(Mode::Echo);
    let proxy = Proxy::start(
        "ready",
        &format!(
            "global: {{ workers: 1 }}\n\
             frontends: [{{ name: fe, bind: [\"127.0.0.1:0\", \"127.0.0.1:0\"], backend: be }}]\n\
             backends: [{{ name: be, servers: [{{ name: s, address: \"{}\" }}] }}]\n",
            backend.addr
        ),
    );
    // Proxy::start waited for the file and read it.
    let info = proxy.ready().clone();
    assert_eq!(info.pid, proxy.pid());
    assert_eq!(info.generation, 0);
    assert_eq!(info.listeners.len(), 2, "{info:?}");
    for l in &info.listeners {
        assert_eq!(l.name, "fe");
        let mut c = connect(l.addr);
        echo_once(&mut c, b"ready means serving");
    }
    let ready = proxy.ready_file().to_owned();
    proxy.stop_clean();
    assert!(!ready.exists(), "the ready file outlived the process");
}
