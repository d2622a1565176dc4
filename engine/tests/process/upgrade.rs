//! Binary upgrade without closing (`ringproxy upgrade`, SIGUSR2; upgrade.rs): the new process takes
//! the listening sockets and the established connections, the old one exits; a new binary that
//! fails, or speaks another hand-over protocol, leaves the old process serving.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::common::*;

fn yaml(port: u16, server: SocketAddr, sock: &Path, admin: &Path) -> String {
    format!(
        "global: {{ workers: 2, stats: {{ socket: {}, admin_socket: {} }} }}\n\
         frontends:\n  - {{ name: fe, bind: \"127.0.0.1:{port}\", backend: be }}\n\
         backends:\n  - {{ name: be, servers: [{{ name: s, address: \"{server}\" }}] }}\n",
        sock.display(),
        admin.display()
    )
}

/// The pid in the upgrade command's answer ("... (pid N) serves the listening sockets ...").
fn pid_in(text: &str) -> u32 {
    let after = text.split("(pid ").nth(1).unwrap_or_else(|| panic!("no pid in: {text}"));
    after.split(')').next().and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("no pid in: {text}"))
}

/// SIGKILLs a process the test did not spawn itself if the test panics while it still runs.
struct KilledIfTheTestFails(u32);

impl Drop for KilledIfTheTestFails {
    fn drop(&mut self) {
        if std::thread::panicking() && !ringproxy::upgrade::exited(self.0) {
            // SAFETY: kill(2) on the pid the upgrade started for this test, still running.
            unsafe { libc::kill(self.0 as i32, libc::SIGKILL) };
        }
    }
}

/// The clients gone, the new process of an upgrade (serving stats on `sock`) holds nothing — every
/// gauge at 0 — and exits on SIGTERM.
fn new_process_ends_clean(sock: &Path, new_pid: u32) {
    wait_until("the new process's gauges to be 0", Duration::from_secs(10), || {
        let s = ringproxy::stats::socket::fetch(sock).unwrap();
        GAUGES.iter().all(|(_, g)| s.total(g) == 0)
    });
    // SAFETY: kill on a pid this test started (through the old process).
    unsafe { libc::kill(new_pid as i32, libc::SIGTERM) };
    wait_until("the new process to exit on SIGTERM", Duration::from_secs(10), || ringproxy::upgrade::exited(new_pid));
}

/// `proxy`, where this io_uring feature set hands established connections over in an upgrade
/// (FIXED_FD_INSTALL, Linux 6.8); elsewhere a test of handed-over connections has nothing to see:
/// `proxy` stops cleanly and the test says it was skipped.
fn handing_over_connections(proxy: Proxy) -> Option<Proxy> {
    let (io, _) = ringproxy::features::effective(None).unwrap();
    if io.fd_install {
        return Some(proxy);
    }
    eprintln!("skipped: this io_uring feature set hands over listening sockets only");
    proxy.stop_clean();
    None
}

#[test]
fn an_upgrade_hands_over_listeners_and_established_connections_then_the_old_process_exits() {
    let echo = Backend::start(Mode::Echo);
    let port = free_port();
    let (sock, admin) = (temp_path("up1.sock"), temp_path("up1-admin.sock"));
    let mut proxy = Proxy::start("up1", &yaml(port, echo.addr, &sock, &admin));
    let old_pid = proxy.pid();
    let front: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut held = held_echoing(front, 200);
    // Transfers both ways through the upgrade, checked byte for byte.
    let mut transfers = Some(spawn(move || {
        let mut pumps: Vec<Pump> =
            (0..2).map(|i| Pump::connect(front, 900 + i, false).unwrap().limit(6 * MIB).paced(3 * MIB)).collect();
        let deadline = Instant::now() + Duration::from_secs(60);
        for p in &mut pumps {
            p.run(deadline).unwrap();
            p.intact().unwrap();
        }
    }));
    // New connections all along: none may be refused or reset.
    let churn = Churn::start(front, echoes_a_byte);
    std::thread::sleep(Duration::from_millis(300));
    let out = ringproxy().args(["upgrade", "--socket"]).arg(&admin).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("serves the listening sockets"), "{text}");
    // The new process is not this test's child: should the test fail from here on, it must not
    // outlive it (its ring would hold this host's locked memory, and the next tests' rings fail).
    let _new_process = KilledIfTheTestFails(pid_in(&text));
    // Connections move only where the kernel makes descriptors of direct sockets
    // (FIXED_FD_INSTALL, 6.8); elsewhere the old process keeps its own until they end.
    let (io, _) = ringproxy::features::effective(None).unwrap();
    if !io.fd_install {
        for (i, c) in held.iter_mut().enumerate() {
            echo_once(c, format!("still with the old process {i}").as_bytes());
        }
        transfers.take().unwrap().join().expect("the transfers came through intact");
        drop(std::mem::take(&mut held));
    }
    let line = proxy.wait_stderr("upgrade: handed the listening sockets and");
    assert_eq!(proxy.wait_exit(Duration::from_secs(20)), Some(0), "the old process exits once it has handed over");
    let s = ringproxy::stats::socket::fetch(&sock).unwrap();
    let new_pid = s.pid;
    assert_ne!(new_pid, old_pid, "the stats socket is the new process's");
    if io.fd_install {
        assert!(s.total(|w| w.moved_in) >= 200, "{line}; moved in: {}", s.total(|w| w.moved_in));
        for (i, c) in held.iter_mut().enumerate() {
            echo_once(c, format!("after the upgrade {i}").as_bytes());
        }
        transfers.take().unwrap().join().expect("the transfers came through intact");
    }
    let before = churn.served();
    wait_until("the churn to go on after the upgrade", Duration::from_secs(5), || churn.served() > before + 10);
    let (_, failed) = churn.stop();
    assert_eq!(failed, 0, "no new connection refused, reset or unanswered");
    drop(held);
    new_process_ends_clean(&sock, new_pid);
    assert!(!sock.exists() && !admin.exists(), "the new process removed the stats sockets at exit");
}

#[test]
fn a_new_binary_that_fails_or_speaks_another_protocol_leaves_the_old_process_serving() {
    let echo = Backend::start(Mode::Echo);
    let port = free_port();
    let (sock, admin) = (temp_path("up2.sock"), temp_path("up2-admin.sock"));
    // Every binary this process starts claims another hand-over protocol.
    let proxy = Proxy::start_adjusted("up2", &yaml(port, echo.addr, &sock, &admin), |c| {
        c.env("RINGPROXY_UPGRADE_PROTOCOL", "99");
    });
    let front: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut held = connect(front);
    echo_once(&mut held, b"before");
    let upgrade = |binary: Option<&str>| {
        let mut cmd = ringproxy();
        cmd.args(["upgrade", "--socket"]).arg(&admin).args(binary);
        let out = cmd.output().unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let (code, text) = upgrade(Some("/bin/false"));
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("exited") && text.contains("serves on"), "{text}");
    let (code, text) = upgrade(None);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("speaks hand-over protocol 99") && text.contains("serves on"), "{text}");
    // SIGUSR2 does the same (default binary), and says so in the log.
    proxy.signal(libc::SIGUSR2);
    proxy.wait_stderr("SIGUSR2: upgrade: started");
    let line = proxy.wait_stderr("SIGUSR2: upgrade to");
    assert!(line.contains("speaks hand-over protocol 99") && line.contains("serves on"), "{line}");
    // Still the same process, serving old and new connections.
    assert_eq!(ringproxy::stats::socket::fetch(&sock).unwrap().pid, proxy.pid());
    echo_once(&mut held, b"after two failed upgrades");
    let mut fresh = connect(front);
    echo_once(&mut fresh, b"new");
    drop((held, fresh));
    proxy.stop_clean();
}

#[test]
fn a_new_process_that_dies_while_taking_over_leaves_the_old_one_serving_every_connection_it_kept() {
    let echo = Backend::start(Mode::Echo);
    let port = free_port();
    let (sock, admin) = (temp_path("up3.sock"), temp_path("up3-admin.sock"));
    // The new process dies once it has moved its first connections in, before it answers for them.
    let proxy = Proxy::start_adjusted("up3", &yaml(port, echo.addr, &sock, &admin), |c| {
        c.env("RINGPROXY_UPGRADE_DIE_AFTER", "1");
    });
    // (Without FIXED_FD_INSTALL no connection is handed over — the first test covers that case —
    // so none can be lost with a dying new process.)
    let Some(mut proxy) = handing_over_connections(proxy) else { return };
    let front: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut held = held_echoing(front, 100);
    let out = ringproxy().args(["upgrade", "--socket"]).arg(&admin).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    let line = proxy.wait_stderr("upgrade: the new process");
    assert!(line.contains("broke off while taking over") && line.contains("serves on"), "{line}");
    // Every connection the dead process never answered for is still here, and still served.
    for (i, c) in held.iter_mut().enumerate() {
        echo_once(c, format!("after the failed hand-over {i}").as_bytes());
    }
    let s = ringproxy::stats::socket::fetch(&sock).unwrap();
    assert_eq!(s.pid, proxy.pid(), "the old process serves on");
    let mut fresh = connect(front);
    echo_once(&mut fresh, b"new");
    assert!(!proxy.has_exited());
    drop((held, fresh));
    proxy.stop_clean();
}

/// A `timeout.drain` shorter than a hand-over takes cuts nothing the new process can take: the old
/// process's drain deadline stays ahead of the connections on their way (worker/moving.rs).
#[test]
fn an_upgrade_with_a_drain_shorter_than_a_hand_over_still_hands_over_every_connection() {
    let echo = Backend::start(Mode::Echo);
    let port = free_port();
    let (sock, admin) = (temp_path("up5.sock"), temp_path("up5-admin.sock"));
    let yaml = format!("{}defaults: {{ timeout: {{ drain: 1ms }} }}\n", yaml(port, echo.addr, &sock, &admin));
    let proxy = Proxy::start("up5", &yaml);
    // (Without FIXED_FD_INSTALL no connection is handed over: they end with the drain.)
    let Some(mut proxy) = handing_over_connections(proxy) else { return };
    let front: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut held = held_echoing(front, 300);
    let out = ringproxy().args(["upgrade", "--socket"]).arg(&admin).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    let _new_process = KilledIfTheTestFails(pid_in(&text));
    let line = proxy.wait_stderr("upgrade: handed the listening sockets and");
    assert!(line.contains("and 300 established connections"), "{line}");
    assert_eq!(proxy.wait_exit(Duration::from_secs(20)), Some(0), "the old process exits once it has handed over");
    let s = ringproxy::stats::socket::fetch(&sock).unwrap();
    assert_eq!(s.total(|w| w.moved_in), 300, "every connection handed over");
    for (i, c) in held.iter_mut().enumerate() {
        echo_once(c, format!("handed over despite a 1 ms drain {i}").as_bytes());
    }
    drop(held);
    new_process_ends_clean(&sock, s.pid);
}

/// SIGTERM to the old process while it hands its connections over (systemd stopping the unit, an
/// operator's `kill`): the hand-over goes on to its end — every connection reaches the new process,
/// which serves on — and the old process exits 0 as after any upgrade, telling systemd the new
/// main pid and leaving the stats sockets' files to the new process (until 2026-12-06 its drain
/// removed them at exit, and the new process served on without reachable stats or admin sockets).
#[test]
fn a_sigterm_during_a_hand_over_lets_it_finish_and_the_new_process_keeps_the_stats_sockets() {
    let echo = Backend::start(Mode::Echo);
    let port = free_port();
    let (sock, admin) = (temp_path("up6.sock"), temp_path("up6-admin.sock"));
    let proxy = Proxy::start("up6", &yaml(port, echo.addr, &sock, &admin));
    let Some(mut proxy) = handing_over_connections(proxy) else { return };
    let front: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut held = held_echoing(front, 300);
    // Both at once: of two pending signals the kernel hands the lower-numbered first, and the
    // main loop takes SIGUSR2 whenever it arrives, so SIGTERM comes while the new process starts:
    // it waits until it serves, and applies with the connections still on their way.
    proxy.signal(libc::SIGUSR2);
    proxy.signal(libc::SIGTERM);
    let started = proxy.wait_stderr("serves the listening sockets");
    let new_pid = pid_in(&started);
    let _new_process = KilledIfTheTestFails(new_pid);
    let line = proxy.wait_stderr("SIGTERM: ");
    assert!(line.contains("an upgrade's new process is starting: once it serves"), "{line}");
    let line = proxy.wait_stderr("SIGTERM: an upgrade is under way");
    assert!(
        line.contains(&format!("the established connections still here go on to the new process (pid {new_pid})")),
        "{line}"
    );
    let line = proxy.wait_stderr("upgrade: handed the listening sockets and");
    assert!(line.contains("and 300 established connections"), "{line}");
    assert_eq!(proxy.wait_exit(Duration::from_secs(20)), Some(0), "the old process exits once it has handed over");
    assert!(sock.exists() && admin.exists(), "the stats sockets' files stay: the new process serves them");
    let s = ringproxy::stats::socket::fetch(&sock).unwrap();
    assert_eq!(s.pid, new_pid, "the stats socket is the new process's");
    assert_eq!(s.total(|w| w.moved_in), 300, "every connection handed over");
    let out = ringproxy().args(["cmd", "--socket"]).arg(&admin).arg("show ready").output().unwrap();
    assert!(out.status.success(), "the admin socket answers: {}", String::from_utf8_lossy(&out.stdout));
    for (i, c) in held.iter_mut().enumerate() {
        echo_once(c, format!("handed over through a SIGTERM {i}").as_bytes());
    }
    drop(held);
    new_process_ends_clean(&sock, new_pid);
    assert!(!sock.exists() && !admin.exists(), "the new process removed the stats sockets at exit");
}

/// While the new process starts (here a binary that takes 2 s to), the old one answers the runtime
/// API and its signals as always — a routing daemon's `show ready` is not held up, on the stats
/// socket or on the admin socket whose `upgrade` waits, and a second upgrade is refused at once —
/// and `ringproxy upgrade` answers once the new process serves; from then on the new process takes
/// every monitoring client, and the old one answers those it had before it exits. (Until 2026-12-06
/// the old process's main loop waited for the new one, up to 30 s, and every admin command and
/// signal with it; and it closed the clients it had unanswered at exit. Until the 2026-12-06
/// evening the admin socket answered one command at a time: every command behind the `upgrade`
/// waited for it.)
#[test]
fn the_old_process_answers_the_runtime_api_while_the_new_one_starts() {
    let echo = Backend::start(Mode::Echo);
    let port = free_port();
    let (sock, admin) = (temp_path("up7.sock"), temp_path("up7-admin.sock"));
    let mut proxy = Proxy::start("up7", &yaml(port, echo.addr, &sock, &admin));
    let slow = temp_path("slow-ringproxy.sh");
    std::fs::write(&slow, format!("#!/bin/sh\nsleep 2\nexec {RINGPROXY} \"$@\"\n")).unwrap();
    std::fs::set_permissions(&slow, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let upgrade = {
        let (admin, slow) = (admin.clone(), slow.clone());
        spawn(move || ringproxy().args(["upgrade", "--socket"]).arg(&admin).arg(&slow).output().unwrap())
    };
    let line = proxy.wait_stderr("and handed it the listening sockets; waiting for it to serve them");
    let new_pid = pid_in(&line);
    let _new_process = KilledIfTheTestFails(new_pid);
    let cmd = |socket: &Path, line: &str| {
        let t = Instant::now();
        let out = ringproxy().args(["cmd", "--socket"]).arg(socket).arg(line).output().unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), t.elapsed())
    };
    // The stats socket, which a routing daemon's check reads, and the admin socket, whose
    // `upgrade` is answered once the new process serves: neither waits for that.
    for socket in [&sock, &admin] {
        let (ok, text, took) = cmd(socket, "show ready");
        assert!(ok && took < Duration::from_millis(1500), "show ready during the start: {ok} in {took:?}: {text}");
    }
    let (ok, text, _) = cmd(&sock, "upgrade");
    assert!(!ok && text.contains("read-only"), "{text}");
    let (ok, text, took) = cmd(&admin, "upgrade");
    assert!(!ok && text.contains("already under way") && took < Duration::from_millis(1500), "{text} in {took:?}");
    proxy.signal(libc::SIGUSR2);
    let line = proxy.wait_stderr("SIGUSR2: upgrade refused");
    assert!(line.contains("already under way"), "a second upgrade is refused at once: {line}");
    assert!(!upgrade.is_finished(), "the upgrade still waits for the new process to serve");
    let out = upgrade.join().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains(&format!("(pid {new_pid}) serves the listening sockets")), "{text}");
    // From then on the new process takes every monitoring client: it answers for the service.
    assert_eq!(ringproxy::stats::socket::fetch(&sock).unwrap().pid, new_pid, "the stats socket's answer");
    proxy.wait_stderr("upgrade: handed the listening sockets and");
    assert_eq!(proxy.wait_exit(Duration::from_secs(20)), Some(0), "the old process exits once it has handed over");
    let (ok, text, _) = cmd(&sock, "show ready");
    assert!(ok, "the new process is ready: {text}");
    let mut c = connect(SocketAddr::from(([127, 0, 0, 1], port)));
    echo_once(&mut c, b"served by the new process");
    drop(c);
    new_process_ends_clean(&sock, new_pid);
}

/// An upgrade keeps the listening sockets, and the kernel keeps a buffer size set on a socket
/// until it closes: a `tune.sndbuf_client` the new file no longer sets stays in force for new
/// clients, as after a reload. The upgrade's answer and the log say so, and so does
/// a later reload of the new process (the old one told it what the sockets keep).
#[test]
fn an_upgrade_whose_file_drops_a_client_buffer_size_says_the_listening_sockets_keep_it() {
    let echo = Backend::start(Mode::Echo);
    let port = free_port();
    let (sock, admin) = (temp_path("up4.sock"), temp_path("up4-admin.sock"));
    let yaml = |tune: &str| {
        format!(
            "global: {{ workers: 1, tune: {{ {tune} }}, stats: {{ socket: {}, admin_socket: {} }} }}\n\
             frontends:\n  - {{ name: fe, bind: \"127.0.0.1:{port}\", backend: be }}\n\
             backends:\n  - {{ name: be, servers: [{{ name: s, address: \"{}\" }}] }}\n",
            sock.display(),
            admin.display(),
            echo.addr
        )
    };
    let kept = "tune.sndbuf_client is no longer set, but the listening sockets keep its 49152 bytes for new clients";
    let mut proxy = Proxy::start("up4", &yaml("sndbuf_client: 48k"));
    let front: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut first = connect(front);
    echo_once(&mut first, b"48k");
    assert_eq!(crate::reload::client_send_buffers(front), [96 << 10]);
    drop(first);

    proxy.write_config(&yaml(""));
    let out = ringproxy().args(["upgrade", "--socket"]).arg(&admin).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains(kept), "the upgrade's answer: {text}");
    let new_pid = pid_in(&text);
    let _new_process = KilledIfTheTestFails(new_pid);
    assert_eq!(proxy.wait_exit(Duration::from_secs(20)), Some(0), "the old process exits once it has handed over");
    proxy.wait_stderr(kept);
    let mut second = connect(front);
    echo_once(&mut second, b"kept");
    assert_eq!(crate::reload::client_send_buffers(front), [96 << 10], "what the upgrade said");
    let s = ringproxy::stats::socket::fetch(&sock).unwrap();
    assert_eq!(s.pid, new_pid, "the new process serves");

    // The new process knows what its sockets keep: its own reload says it again.
    let out = ringproxy().args(["reload", "--socket"]).arg(&admin).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success() && text.contains(kept), "the new process's reload: {text}");
    drop(second);
    new_process_ends_clean(&sock, new_pid);
}
