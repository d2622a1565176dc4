//! Where io_uring is blocked, `ringproxy` and `ringproxy check` say why and how to fix it in one
//! line, before anything binds. The block is real: the child runs under a seccomp filter that
//! denies the io_uring system calls, as Docker's default profile and Kubernetes `RuntimeDefault`
//! do (the test installs it between fork and exec).

use std::os::unix::process::CommandExt;
use std::process::Output;

use crate::common::*;

const YAML: &str = "frontends:\n  - { name: fe, bind: \"127.0.0.1:0\", backend: be }\n\
                    backends:\n  - { name: be, servers: [ { name: s, address: \"127.0.0.1:9\" } ] }\n";

fn under_filter(errno: i32, args: &[&str]) -> Output {
    let config = write_temp(&format!("access-{errno}.yaml"), YAML);
    let mut cmd = ringproxy();
    cmd.args(args).arg("-c").arg(&config);
    // SAFETY: the closure only makes prctl calls (`deny_io_uring`), allowed after fork.
    unsafe { cmd.pre_exec(move || uring_access::deny_io_uring(errno as u16)) };
    cmd.output().expect("run ringproxy")
}

fn one_line(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(stderr.lines().count(), 1, "one line, got: {stderr}");
    stderr
}

#[test]
fn under_a_seccomp_filter_the_engine_names_the_filter_and_the_profile_before_it_binds() {
    let out = under_filter(libc::EPERM, &[]);
    assert_eq!(out.status.code(), Some(1));
    let line = one_line(&out);
    assert!(
        line.starts_with(
            "ringproxy: io_uring is not available: io_uring_setup failed (EPERM, Operation not permitted)"
        )
    );
    assert!(line.contains("under a seccomp filter"), "{line}");
    assert!(line.contains("docker run --security-opt seccomp="), "{line}");
    assert!(line.contains("seccompProfile"), "{line}");
    assert!(!line.contains("listening"), "nothing was bound: {line}");
}

#[test]
fn a_filter_that_answers_enosys_is_named_too() {
    let line = one_line(&under_filter(libc::ENOSYS, &[]));
    assert!(line.contains("seccomp filter that answers ENOSYS"), "{line}");
}

#[test]
fn check_under_a_seccomp_filter_gives_the_same_line_and_fails() {
    let out = under_filter(libc::EPERM, &["check"]);
    assert_eq!(out.status.code(), Some(2), "check's code for a failure");
    assert!(out.stdout.is_empty(), "no report when io_uring itself is out of reach");
    let line = one_line(&out);
    assert!(line.starts_with("ringproxy check: io_uring is not available:"), "{line}");
    assert!(line.contains("--security-opt seccomp="), "{line}");
}

/// `packaging/seccomp/run-under.py [--without-io-uring] ringproxy.json -- ringproxy`: the shipped
/// profile compiled with libseccomp as Docker compiles it (scripts/test.sh installs the binding).
fn under_profile(with_io_uring: bool) -> std::process::Command {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/seccomp");
    let mut cmd = std::process::Command::new("/usr/bin/python3");
    cmd.arg(dir.join("run-under.py"));
    if !with_io_uring {
        cmd.arg("--without-io-uring");
    }
    cmd.arg(dir.join("ringproxy.json")).arg("--").arg(RINGPROXY);
    cmd
}

#[test]
fn docker_s_default_profile_stops_the_engine_with_the_line_and_the_shipped_one_lets_it_proxy() {
    // Docker's own default profile (the shipped one without its io_uring rule): refused, one line.
    let config = write_temp("access-docker.yaml", YAML);
    let out = under_profile(false).arg("-c").arg(&config).output().expect("run run-under.py");
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(one_line(&out).contains("under a seccomp filter"));

    // The shipped profile: the engine starts, proxies (from a source address: BIND too), drains.
    let backend = Backend::start(Mode::Echo);
    let yaml = format!(
        "global: {{ stats: {{ socket: \"{}\" }} }}\n\
         frontends:\n  - {{ name: fe, bind: \"127.0.0.1:0\", backend: be }}\n\
         backends:\n  - {{ name: be, servers: [ {{ name: s, address: \"{}\", source: 127.0.9.1 }} ] }}\n",
        temp_path("access-profile.sock").display(),
        backend.addr
    );
    let proxy = Proxy::start_through(under_profile(true), "access-profile", &yaml);
    let status = std::fs::read_to_string(format!("/proc/{}/status", proxy.pid())).unwrap();
    assert!(status.lines().any(|l| l == "Seccomp:\t2"), "the engine runs under the filter");
    let mut pump = Pump::connect(proxy.addr("fe"), 7, false).unwrap().limit(1 << 20);
    pump.run(std::time::Instant::now() + std::time::Duration::from_secs(10)).unwrap();
    pump.intact().unwrap();
    assert_eq!(pump.received, 1 << 20, "the megabyte came back through the proxy");
    drop(pump);
    assert!(backend.peer_ips().contains_key(&"127.0.9.1".parse().unwrap()), "bound to the source");
    proxy.stop_clean();
}
