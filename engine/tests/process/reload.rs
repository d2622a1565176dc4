//! Hot reload (SIGHUP and `ringproxy reload`): established connections continue, new ones follow
//! the new configuration, no connection is refused while reloading, an invalid file changes
//! nothing, listeners can be added and removed. And privileges are dropped after binding.

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::Duration;

use crate::common::*;

fn tag_of(mut c: TcpStream) -> u8 {
    let mut t = [0u8];
    c.read_exact(&mut t).unwrap();
    echo_once(&mut c, b"x");
    t[0]
}

fn config(port: u16, server: SocketAddr, sock: &Path, extra: &str) -> String {
    format!(
        "global: {{ workers: 2, stats: {{ admin_socket: {} }} }}\nfrontends:\n  - {{ name: fe, bind: \"127.0.0.1:{port}\", backend: be }}\n{extra}\
         backends:\n  - {{ name: be, servers: [{{ name: s, address: \"{server}\" }}] }}\n",
        sock.display()
    )
}

#[test]
fn reload_switches_new_connections_keeps_old_ones_and_refuses_bad_files() {
    let (a, b) = (Backend::start(Mode::Tag(1)), Backend::start(Mode::Tag(2)));
    let port = free_port();
    let sock = temp_path("r1.sock");
    let mut proxy = Proxy::start("r1", &config(port, a.addr, &sock, ""));
    let cfg = proxy.config().to_owned();
    let front: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    assert_eq!(tag_of(connect(front)), 1);
    // An established connection through the old configuration.
    let mut old = connect(front);
    let mut t = [0u8];
    old.read_exact(&mut t).unwrap();
    assert_eq!(t[0], 1);

    // Clients keep connecting during the reloads; none may be refused.
    let churn = Churn::start(front, reads_a_byte);

    // SIGHUP with the server switched to b.
    proxy.write_config(&config(port, b.addr, &sock, ""));
    proxy.signal(libc::SIGHUP);
    proxy.wait_generation(1);
    assert_eq!(tag_of(connect(front)), 2, "new connections follow the new configuration");
    echo_once(&mut old, b"the old connection lives on");

    // An invalid file is refused with its position; the running configuration stays.
    proxy.write_config("global:\n  workers: lots\n");
    let out = ringproxy().args(["reload", "--socket"]).arg(&sock).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains(&format!("{}:2:12:", cfg.display())), "{text}");
    assert!(text.contains("running configuration stays"), "{text}");
    assert_eq!(tag_of(connect(front)), 2);
    assert_eq!(proxy.read_ready().generation, 1, "a refused reload is not a generation");

    // `ringproxy reload` back to a, with a second frontend added.
    let port2 = free_port();
    let extra = format!("  - {{ name: fe2, bind: \"127.0.0.1:{port2}\", backend: be }}\n");
    proxy.write_config(&config(port, a.addr, &sock, &extra));
    let out = ringproxy().args(["reload", "-c"]).arg(&cfg).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    proxy.wait_generation(2);
    assert_eq!(tag_of(connect(front)), 1);
    assert_eq!(tag_of(connect(format!("127.0.0.1:{port2}").parse().unwrap())), 1);
    echo_once(&mut old, b"still alive after two reloads");

    // Remove the second frontend again: its port is closed once the old engine has drained.
    proxy.write_config(&config(port, a.addr, &sock, ""));
    proxy.signal(libc::SIGHUP);
    proxy.wait_generation(3);
    wait_until("the removed port to be closed", Duration::from_secs(5), || {
        TcpStream::connect_timeout(&format!("127.0.0.1:{port2}").parse().unwrap(), Duration::from_millis(200)).is_err()
    });

    let before = churn.served();
    wait_until("the churn to keep connecting after the last reload", Duration::from_secs(5), || {
        churn.served() >= before + 10
    });
    let (served, failed) = churn.stop();
    assert!(served > 10, "the churn ran");
    assert_eq!(failed, 0, "no connection failed during the reloads");
    echo_once(&mut old, b"end");
    drop(old);
    proxy.stop_clean();
}

#[test]
fn reloads_in_quick_succession_move_every_established_connection_and_refuse_none() {
    let (a, b) = (Backend::start(Mode::Tag(1)), Backend::start(Mode::Tag(2)));
    let port = free_port();
    let sock = temp_path("r-move.sock");
    let yaml = |timeouts: &str, servers: &str| {
        format!(
            "global: {{ workers: 2, stats: {{ socket: {} }} }}\ndefaults: {{ timeout: {{ {timeouts} }} }}\n\
             frontends:\n  - {{ name: fe, bind: \"127.0.0.1:{port}\", backend: be }}\n\
             backends:\n  - {{ name: be, servers: [{servers}] }}\n",
            sock.display()
        )
    };
    let sa = |w: u32| format!("{{ name: a, address: \"{}\", weight: {w} }}", a.addr);
    let sb = format!("{{ name: b, address: \"{}\" }}", b.addr);
    let mut proxy = Proxy::start("rmove", &yaml("client: 60s", &sa(1)));
    let front: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut held: Vec<TcpStream> = (0..300u32)
        .map(|i| {
            let mut c = connect(front);
            let mut t = [0u8];
            c.read_exact(&mut t).unwrap();
            assert_eq!(t[0], 1);
            echo_once(&mut c, &i.to_le_bytes());
            c
        })
        .collect();
    let churn = Churn::start(front, reads_a_byte);
    // Three reloads, one right after the other (each while the moves of the one before may still
    // be on their way): a weight, the timeouts, then a server added.
    let files = [
        yaml("client: 60s", &sa(5)),
        yaml("client: 90s, server: 90s", &sa(5)),
        yaml("client: 90s, server: 90s", &format!("{}, {sb}", sa(5))),
    ];
    for (g, file) in files.iter().enumerate() {
        proxy.write_config(file);
        proxy.signal(libc::SIGHUP);
        proxy.wait_generation(g as u64 + 1);
    }
    // Each replaced engine exits once it has moved its connections on, and says so. (Churn
    // connections that ended in an old engine count in its "closed"; those established at the
    // moment of a reload moved with the held ones.)
    for g in 1..=3 {
        let line = proxy.wait_stderr(&format!("the engine replaced by reload {g} exited"));
        assert!(line.contains("connections moved on"), "{line}");
    }
    // So every held connection that still answers is in the newest engine.
    for (i, c) in held.iter_mut().enumerate() {
        echo_once(c, format!("after three reloads {i}").as_bytes());
    }
    let s = ringproxy::stats::socket::fetch(&sock).unwrap();
    assert!(s.total(|w| w.moved_in) >= 300, "moved in: {}", s.total(|w| w.moved_in));
    assert!(s.total(|w| w.active) >= 300, "active: {}", s.total(|w| w.active));
    let before = churn.served();
    wait_until("the churn to go on after the reloads", Duration::from_secs(5), || churn.served() >= before + 10);
    let (_, failed) = churn.stop();
    assert_eq!(failed, 0, "no new connection refused, reset or unanswered during the reloads");
    drop(held);
    proxy.stop_clean();
}

#[test]
fn privileges_are_dropped_after_binding() {
    let echo = Backend::start(Mode::Echo);
    // Like /run/ringproxy owned by the service user: the engine can remove its socket at exit.
    let nobody = ringproxy::privileges::resolve("nobody", None).unwrap();
    let run_dir = temp_path("run");
    std::fs::create_dir_all(&run_dir).unwrap();
    std::os::unix::fs::chown(&run_dir, Some(nobody.uid), Some(nobody.gid)).unwrap();
    let sock = run_dir.join("priv.sock");
    // Opened after the switch, as nobody: in nobody's directory too.
    let log = run_dir.join("priv.log");
    // The ready file is written after the privileges are dropped: it goes in the user's directory.
    let proxy = Proxy::start_in(
        &run_dir,
        "priv",
        &format!(
            "global: {{ workers: 2, user: nobody, stats: {{ socket: {} }}, connection_log: {} }}\n\
             frontends: [{{ name: fe, bind: \"127.0.0.1:0\", backend: be }}]\n\
             backends: [{{ name: be, servers: [{{ name: s, address: \"{}\", source: 127.0.2.30 }}] }}]\n",
            sock.display(),
            log.display(),
            echo.addr
        ),
        &[],
    );
    let status = std::fs::read_to_string(format!("/proc/{}/status", proxy.pid())).unwrap();
    let uid_line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    let uids: Vec<u32> = uid_line.split_whitespace().skip(1).map(|v| v.parse().unwrap()).collect();
    assert!(uids.iter().all(|&u| u == nobody.uid), "real, effective, saved and fs uid are nobody: {uid_line}");
    let out = ringproxy().args(["stats", "--json", "--socket"]).arg(&sock).output().unwrap();
    assert!(out.status.success(), "the stats socket still answers");
    let s: ringproxy::stats::EngineStats = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(s.workers.len(), 2);
    let mut c = connect(proxy.addr("fe"));
    echo_once(&mut c, b"proxied by an unprivileged process");
    drop(c);
    let ready = proxy.ready_file().to_owned();
    proxy.stop_clean();
    assert!(!sock.exists(), "the unprivileged process could remove its socket");
    assert!(!ready.exists(), "the unprivileged process could remove its ready file");
}

/// The kernel's buffer sizes of the proxy's accepted sockets (`ss -m`'s `tb`: twice
/// `sndbuf_client`), on `front`.
pub(crate) fn client_send_buffers(front: SocketAddr) -> Vec<u32> {
    tcp_sockets_on(&[front.port()])
        .iter()
        .filter(|s| s.local == front && s.state == "ESTAB")
        .map(|s| s.sndbuf)
        .collect()
}

/// A reload keeps the listening sockets: a `tune.sndbuf_client` it changes applies to the next
/// clients; one the new file no longer sets stays on them (the kernel keeps a size set until the
/// socket closes), and the reload says so.
#[test]
fn a_reload_changes_the_client_buffer_size_and_says_when_a_dropped_one_stays() {
    let echo = Backend::start(Mode::Echo);
    let sock = temp_path("r-buf.sock");
    let yaml = |tune: &str| {
        format!(
            "global: {{ workers: 1, tune: {{ {tune} }}, stats: {{ admin_socket: {} }} }}\n\
             frontends:\n  - {{ name: fe, bind: \"127.0.0.1:0\", backend: be }}\n\
             backends:\n  - {{ name: be, servers: [{{ name: s, address: \"{}\" }}] }}\n",
            sock.display(),
            echo.addr
        )
    };
    let reload = |proxy: &mut Proxy, generation: u64| {
        let out = ringproxy().args(["reload", "--socket"]).arg(&sock).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "{text}");
        proxy.wait_generation(generation);
        text
    };
    let mut proxy = Proxy::start("r-buf", &yaml("sndbuf_client: 48k"));
    let front = proxy.addr("fe");
    let mut first = connect(front);
    echo_once(&mut first, b"48k");
    assert_eq!(client_send_buffers(front), [96 << 10]);

    proxy.write_config(&yaml("sndbuf_client: 96k"));
    let text = reload(&mut proxy, 1);
    assert!(!text.contains("no longer set"), "{text}");
    let mut second = connect(front);
    echo_once(&mut second, b"96k");
    let mut sizes = client_send_buffers(front);
    sizes.sort_unstable();
    assert_eq!(sizes, [96 << 10, 192 << 10], "the next client gets the new size, the first keeps its own");

    proxy.write_config(&yaml(""));
    let text = reload(&mut proxy, 2);
    assert!(
        text.contains(
            "tune.sndbuf_client is no longer set, but the listening sockets keep its 98304 bytes for new clients"
        ),
        "{text}"
    );
    drop((first, second));
    let mut third = connect(front);
    echo_once(&mut third, b"kept");
    assert_eq!(client_send_buffers(front), [192 << 10], "what the reload said");
    drop(third);
    proxy.stop_clean();
}
