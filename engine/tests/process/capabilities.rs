//! Least privilege, read from `/proc/PID/task/*/status` of a running `ringproxy`: once it has
//! started, no thread holds a capability (effective, permitted, inheritable, ambient) and every
//! thread has no_new_privs, whether it was started as root with `user: nobody` or as nobody
//! holding ambient capabilities; and a reload cannot bind a privileged port.

use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ringproxy::privileges::{self, Ids};
use ringproxy::sys::{self, CapSets};

use crate::common::*;

const CAP_NET_BIND_SERVICE: u64 = 10;
const CAP_NET_ADMIN: u64 = 12;

/// Root, or the test is skipped (it switches users and hands out capabilities).
fn root() -> bool {
    let root = sys::ids().0 == 0;
    if !root {
        eprintln!("skipped: needs root, to start ringproxy as another user");
    }
    root
}

fn nobody() -> Ids {
    privileges::resolve("nobody", None).unwrap()
}

/// A directory owned by nobody, like /run/ringproxy owned by the service user: for the ready
/// file, the stats socket and the connection log.
fn run_dir(name: &str) -> PathBuf {
    let dir = temp_path(name);
    std::fs::create_dir_all(&dir).unwrap();
    let n = nobody();
    std::os::unix::fs::chown(&dir, Some(n.uid), Some(n.gid)).unwrap();
    dir
}

/// A copy of the binary under test that `nobody` can run, in `dir`: the build's own may lie in a
/// directory only its owner can enter (a checkout in `mktemp -d`).
fn runnable_copy(dir: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let copy = dir.join("ringproxy");
    std::fs::copy(RINGPROXY, &copy).unwrap();
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755)).unwrap();
    copy
}

/// A port below 1024 nobody listens on now.
fn free_privileged_port() -> u16 {
    (700..1000).find(|&p| TcpListener::bind(("127.0.0.1", p)).is_ok()).expect("a free port in 700..1000")
}

/// Every helper thread there is: stats and admin sockets, Prometheus, connection log, health checks, two
/// workers.
fn config(dir: &Path, bind: &str, server: std::net::SocketAddr) -> String {
    format!(
        "global:\n  workers: 2\n  user: nobody\n  connection_log: {}\n  stats: {{ socket: {}, admin_socket: {}, prometheus: \"127.0.0.1:0\" }}\n\
         frontends: [{{ name: fe, bind: \"{bind}\", backend: be }}]\n\
         backends:\n  - name: be\n    check: {{ interval: 100ms }}\n    servers: [{{ name: s, address: \"{server}\" }}]\n",
        dir.join("conn.log").display(),
        dir.join("s.sock").display(),
        dir.join("a.sock").display(),
    )
}

/// One line of a status file (`CapEff:\t0000000000000000` → `0000000000000000`).
fn field<'a>(status: &'a str, key: &str) -> &'a str {
    let line = status.lines().find(|l| l.starts_with(&format!("{key}:"))).unwrap_or_else(|| panic!("no {key}"));
    line[key.len() + 1..].trim()
}

/// Each thread of `pid`: its name and its status file.
fn threads(pid: u32) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let dir = task.unwrap().path();
        let (Ok(comm), Ok(status)) =
            (std::fs::read_to_string(dir.join("comm")), std::fs::read_to_string(dir.join("status")))
        else {
            continue; // the thread has just ended
        };
        out.push((comm.trim().to_owned(), status));
    }
    out
}

/// Every thread of `pid` runs as `ids` without any capability and with no_new_privs (and, when
/// `bounding` is set, with an empty bounding set). Returns the threads' names.
fn assert_unprivileged(pid: u32, ids: Ids, bounding: bool) -> Vec<String> {
    let all = threads(pid);
    for (name, status) in &all {
        for key in ["CapInh", "CapPrm", "CapEff", "CapAmb"] {
            assert_eq!(u64::from_str_radix(field(status, key), 16).unwrap(), 0, "thread {name}: {key}");
        }
        if bounding {
            assert_eq!(u64::from_str_radix(field(status, "CapBnd"), 16).unwrap(), 0, "thread {name}: CapBnd");
        }
        assert_eq!(field(status, "NoNewPrivs"), "1", "thread {name}: NoNewPrivs");
        let uids: Vec<&str> = field(status, "Uid").split_whitespace().collect();
        assert!(uids.iter().all(|u| *u == ids.uid.to_string()), "thread {name}: Uid {uids:?}");
    }
    all.into_iter().map(|(name, _)| name).collect()
}

/// Every kind of thread was among those looked at (names as the kernel keeps them: 15 bytes).
fn assert_helpers_seen(names: &[String]) {
    for helper in
        ["ringproxy-stats", "ringproxy-admin", "ringproxy-metrics", "ringproxy-log", "ringproxy-health", "ringproxy-w0"]
    {
        let comm = &helper[..helper.len().min(15)];
        assert!(names.iter().any(|n| n == comm), "no thread {comm} in {names:?}");
    }
}

/// Review 6a: started as root with `user: nobody`, every thread (the stats threads started before
/// the switch included) ends with no capability, an empty bounding set and no_new_privs (0 on
/// 7b9477c), also the threads a reload starts; a reload to a port below 1024 is refused and says
/// why.
#[test]
fn root_start_with_a_user_leaves_no_thread_a_capability() {
    if !root() {
        return;
    }
    let echo = Backend::start(Mode::Echo);
    let dir = run_dir("caps-root");
    let mut proxy = Proxy::start_in(&dir, "caps-root", &config(&dir, "127.0.0.1:0", echo.addr), &[]);
    let names = assert_unprivileged(proxy.pid(), nobody(), true);
    assert_helpers_seen(&names);
    let mut c = connect(proxy.addr("fe"));
    echo_once(&mut c, b"proxied without privileges");
    drop(c);

    proxy.write_config(&config(&dir, "127.0.0.1:0", echo.addr).replace("workers: 2", "workers: 1"));
    proxy.signal(libc::SIGHUP);
    proxy.wait_generation(1);
    assert_unprivileged(proxy.pid(), nobody(), true);

    let low = free_privileged_port();
    proxy.write_config(&config(&dir, &format!("127.0.0.1:{low}"), echo.addr));
    let out = ringproxy().args(["reload", "--socket"]).arg(dir.join("a.sock")).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("Permission denied") && text.contains("CAP_NET_BIND_SERVICE"), "{text}");
    assert!(text.contains("running configuration stays"), "{text}");
    proxy.write_config(&config(&dir, "127.0.0.1:0", echo.addr));
    proxy.stop_clean();
}

/// Review 6b: started as nobody holding ambient CAP_NET_BIND_SERVICE and CAP_NET_ADMIN (as with
/// systemd's `AmbientCapabilities=`), with `user: nobody` (ids already right): the process binds a
/// port below 1024, then no thread keeps a capability (7b9477c kept 0x1400 on every thread) and
/// every thread has no_new_privs.
#[test]
fn non_root_start_with_ambient_capabilities_leaves_no_thread_a_capability() {
    if !root() {
        return;
    }
    let echo = Backend::start(Mode::Echo);
    let dir = run_dir("caps-ambient");
    let low = free_privileged_port();
    let n = nobody();
    let binary = runnable_copy(&dir);
    let yaml = config(&dir, &format!("127.0.0.1:{low}"), echo.addr);
    let mut proxy = Started::spawn_binary(&binary, &dir, "caps-ambient", &yaml, &[], |cmd| {
        let caps = 1 << CAP_NET_BIND_SERVICE | 1 << CAP_NET_ADMIN;
        let child = move || {
            // Keep the permitted set across the switch to nobody, then make the capabilities
            // ambient, so that they survive exec.
            // SAFETY: prctl with integer arguments only.
            if unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            sys::clear_groups()?;
            sys::set_gid(n.gid)?;
            sys::set_uid(n.uid)?;
            sys::set_caps(CapSets { effective: caps, permitted: caps, inheritable: caps })?;
            for cap in [CAP_NET_BIND_SERVICE, CAP_NET_ADMIN] {
                // SAFETY: as above.
                if unsafe { libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_RAISE, cap, 0, 0) } != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        };
        // SAFETY: between fork and exec the closure makes system calls only (no allocation, no
        // lock), on values copied in before the fork.
        unsafe { cmd.pre_exec(child) };
    });
    let ready = proxy.wait_ready();
    assert_eq!(ready.listeners[0].addr.port(), low, "bound below 1024 with the ambient capability");
    let names = assert_unprivileged(proxy.pid(), n, false);
    assert_helpers_seen(&names);
    let mut c = connect(ready.listeners[0].addr);
    echo_once(&mut c, b"proxied without capabilities");
    drop(c);
    // SAFETY: kill(2) on our own child's pid, not reaped before Drop.
    unsafe { libc::kill(proxy.pid() as i32, libc::SIGTERM) };
    assert_eq!(proxy.wait_exit(Duration::from_secs(10)), Some(0), "{:#?}", proxy.stderr());
}
