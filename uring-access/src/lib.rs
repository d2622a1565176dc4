//! Whether this process may use io_uring, and when it may not, the cause and the fix in one line.
//!
//! `io_uring_setup` fails the same way (EPERM) for three different reasons: a seccomp filter (the
//! default profiles of Docker and of containerd / Kubernetes `RuntimeDefault` deny the io_uring
//! system calls), the `kernel.io_uring_disabled` sysctl, or a missing `kernel.io_uring_group`
//! membership; ENOSYS means a kernel (or a sandbox such as gVisor) without io_uring, or a filter
//! that answers ENOSYS; ENOMEM on kernels before 5.12 means RLIMIT_MEMLOCK is too small. [`check`]
//! tries a ring and, when it fails, reads `/proc` to tell which; [`diagnose`] is the pure part.

use std::fmt;
use std::io;

/// The seccomp profile shipped with ringproxy (Docker's default plus the three io_uring calls), as
/// installed by the Debian package.
pub const PROFILE: &str = "/usr/share/ringproxy/seccomp.json";

/// Why io_uring cannot be used here, and what to do about it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Blocked {
    pub cause: String,
    pub fix: String,
}

impl fmt::Display for Blocked {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "io_uring is not available: {}; fix: {}", self.cause, self.fix)
    }
}

/// What `/proc` says about this process and host, for [`diagnose`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Host {
    /// `uname -r`.
    pub release: String,
    /// `kernel.io_uring_disabled` (absent before 6.6).
    pub disabled: Option<i64>,
    /// `kernel.io_uring_group` (-1: nobody but CAP_SYS_ADMIN).
    pub group: Option<i64>,
    /// The process's effective and supplementary groups.
    pub groups: Vec<u32>,
    /// `Seccomp:` of /proc/self/status: 0 none, 1 strict, 2 filter.
    pub seccomp: Option<u32>,
    /// RLIMIT_MEMLOCK (soft), bytes; `None`: unlimited or unknown.
    pub memlock: Option<u64>,
}

impl Host {
    pub fn read() -> Host {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let field = |name: &str| status.lines().find_map(|l| l.strip_prefix(name)).map(str::trim).map(str::to_owned);
        let mut groups: Vec<u32> =
            field("Groups:").unwrap_or_default().split_whitespace().filter_map(|g| g.parse().ok()).collect();
        // SAFETY: getegid has no preconditions.
        groups.push(unsafe { libc::getegid() });
        let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: `lim` is a local the call only writes into.
        let memlock = (unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) } == 0
            && lim.rlim_cur != libc::RLIM_INFINITY)
            .then_some(lim.rlim_cur);
        Host {
            release: release(),
            disabled: sysctl("kernel/io_uring_disabled"),
            group: sysctl("kernel/io_uring_group"),
            groups,
            seccomp: field("Seccomp:").and_then(|s| s.parse().ok()),
            memlock,
        }
    }
}

fn sysctl(name: &str) -> Option<i64> {
    std::fs::read_to_string(format!("/proc/sys/{name}")).ok()?.trim().parse().ok()
}

/// `uname -r` (empty if uname fails).
pub fn release() -> String {
    // SAFETY: `u` is a local utsname (plain data, valid all-zero) that uname only writes into.
    let u = unsafe {
        let mut u: libc::utsname = std::mem::zeroed();
        if libc::uname(&mut u) != 0 {
            return String::new();
        }
        u
    };
    u.release.iter().take_while(|&&c| c != 0).map(|&c| c as u8 as char).collect()
}

/// `(major, minor)` of a release string such as `6.1.0-28-amd64`.
pub fn version(release: &str) -> Option<(u32, u32)> {
    let mut it = release.split(|c: char| !c.is_ascii_digit());
    Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
}

/// Sets up (and drops) a small ring with no flags: `Ok` when this process may use io_uring, on a
/// kernel at least `min` (`(6, 1)`: the program's floor; an older kernel may set up a ring and
/// then refuse what the program needs of it).
pub fn check(min: (u32, u32)) -> Result<(), Blocked> {
    // SAFETY: `p` is a zeroed io_uring_params the kernel reads and fills; the returned descriptor
    // is closed at once and nothing is mapped.
    let fd = unsafe {
        let mut p: [u32; 30] = [0; 30]; // struct io_uring_params is 120 bytes
        libc::syscall(libc::SYS_io_uring_setup, 2u32, p.as_mut_ptr())
    };
    if fd >= 0 {
        // SAFETY: `fd` was just returned by io_uring_setup and is owned here.
        unsafe { libc::close(fd as i32) };
        let release = release();
        return match version(&release) {
            Some(v) if v < min => Err(Blocked {
                cause: format!(
                    "Linux {release} is older than {}.{}, the oldest kernel whose io_uring has what this program uses",
                    min.0, min.1
                ),
                fix: format!("run on Linux {}.{} or newer (Debian 12 and Amazon Linux 2023 ship 6.1)", min.0, min.1),
            }),
            _ => Ok(()),
        };
    }
    let errno = io::Error::last_os_error().raw_os_error().unwrap_or(0);
    Err(diagnose(errno, &Host::read()))
}

/// The cause of an `io_uring_setup` failure with `errno`, and its fix.
pub fn diagnose(errno: i32, host: &Host) -> Blocked {
    let err = errno_text(errno);
    let kernel = version(&host.release);
    let seccomp_fix = format!(
        "run it with a seccomp profile that allows io_uring_setup, io_uring_enter and io_uring_register: \
         ringproxy ships one ({PROFILE}, packaging/seccomp/ in the source); Docker: docker run --security-opt \
         seccomp={PROFILE} ...; Kubernetes: securityContext.seccompProfile {{type: Localhost, localhostProfile: \
         ringproxy-seccomp.json}} with the file in the kubelet's seccomp directory; systemd: \
         SystemCallFilter= must allow @aio, which holds the io_uring calls (@system-service does)"
    );
    let b = |cause: String, fix: String| Blocked { cause, fix };
    if kernel.is_some_and(|k| k < (5, 1)) {
        return b(
            format!(
                "io_uring_setup failed ({err}) and the kernel reports release {} (io_uring came in 5.1; gVisor \
                 reports 4.4.0 and offers no usable io_uring)",
                host.release
            ),
            "run on Linux 6.1 or newer, with a runtime that gives the container the host's kernel (runc, crun), \
             not gVisor"
                .into(),
        );
    }
    let filtered = host.seccomp == Some(2);
    match errno {
        libc::EPERM | libc::EACCES => match host.disabled {
            Some(2) => b(
                format!("io_uring_setup failed ({err}): kernel.io_uring_disabled = 2 disables io_uring for everyone"),
                "sysctl -w kernel.io_uring_disabled=0, and keep it in /etc/sysctl.d/ (or set it to 1 and add the \
                 service's user to kernel.io_uring_group)"
                    .into(),
            ),
            Some(1) if host.group.is_none_or(|g| g < 0 || !host.groups.contains(&(g as u32))) => b(
                format!(
                    "io_uring_setup failed ({err}): kernel.io_uring_disabled = 1 and this process is not in \
                     kernel.io_uring_group ({})",
                    host.group.map_or("unset".to_owned(), |g| g.to_string())
                ),
                "add the service's user to the group kernel.io_uring_group names (sysctl -w \
                 kernel.io_uring_group=GID), or sysctl -w kernel.io_uring_disabled=0"
                    .into(),
            ),
            _ if filtered => b(
                format!(
                    "io_uring_setup failed ({err}) under a seccomp filter: the filter denies the io_uring system \
                     calls, as the default profiles of Docker and of containerd / Kubernetes RuntimeDefault do"
                ),
                seccomp_fix,
            ),
            _ => b(
                format!(
                    "io_uring_setup failed ({err}) with no seccomp filter and kernel.io_uring_disabled = {}: a \
                     security module (SELinux's io_uring class, AppArmor) denies it",
                    host.disabled.unwrap_or(0)
                ),
                "allow io_uring for this service in the SELinux or AppArmor policy (see the audit log)".into(),
            ),
        },
        libc::ENOSYS if filtered => {
            b(format!("io_uring_setup failed ({err}) under a seccomp filter that answers ENOSYS for it"), seccomp_fix)
        }
        libc::ENOSYS => b(
            format!(
                "io_uring_setup failed ({err}): kernel {} is built without io_uring (CONFIG_IO_URING), or a \
                 sandbox (gVisor) does not offer it",
                host.release
            ),
            "run on a Linux 6.1+ kernel built with CONFIG_IO_URING=y, with a runtime that gives the container \
             the host's kernel"
                .into(),
        ),
        libc::ENOMEM => b(
            format!(
                "io_uring_setup failed ({err}): RLIMIT_MEMLOCK is {} and kernels before 5.12 charge rings to it",
                host.memlock.map_or("unknown".to_owned(), |m| format!("{} KiB", m / 1024))
            ),
            "raise the locked-memory limit: LimitMEMLOCK=infinity (systemd), ulimit -l unlimited, docker run \
             --ulimit memlock=-1; or run on Linux 5.12+"
                .into(),
        ),
        _ => b(
            format!("io_uring_setup failed ({err}) on kernel {}", host.release),
            "run on Linux 6.1 or newer; `ringproxy check -c FILE` lists what this host lacks".into(),
        ),
    }
}

/// `EPERM, Operation not permitted`.
fn errno_text(errno: i32) -> String {
    let name = match errno {
        libc::EPERM => "EPERM",
        libc::EACCES => "EACCES",
        libc::ENOSYS => "ENOSYS",
        libc::ENOMEM => "ENOMEM",
        libc::EINVAL => "EINVAL",
        libc::EMFILE => "EMFILE",
        _ => return io::Error::from_raw_os_error(errno).to_string(),
    };
    let text = io::Error::from_raw_os_error(errno).to_string();
    let text = text.split(" (os error").next().unwrap_or_default();
    format!("{name}, {text}")
}

/// Installs, in the calling process, a seccomp filter that answers `errno` to `io_uring_setup`,
/// `io_uring_enter` and `io_uring_register` and allows everything else: what Docker's default
/// profile does (with EPERM). For tests, between fork and exec (`CommandExt::pre_exec`): it
/// allocates nothing and makes only `prctl` calls. Sets `no_new_privs`, as an unprivileged
/// filter must.
pub fn deny_io_uring(errno: u16) -> io::Result<()> {
    const RET: u16 = 0x06; // BPF_RET | BPF_K
    const LD_W_ABS: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS
    const JEQ: u16 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
    const NR: u32 = 0; // offsetof(struct seccomp_data, nr)
    const ARCH: u32 = 4; // offsetof(struct seccomp_data, arch)
    #[cfg(target_arch = "x86_64")]
    const AUDIT_ARCH: u32 = 0xc000_003e;
    #[cfg(target_arch = "aarch64")]
    const AUDIT_ARCH: u32 = 0xc000_00b7;
    const ALLOW: u32 = 0x7fff_0000;
    const ERRNO: u32 = 0x0005_0000;
    let f = |code, jt, jf, k| libc::sock_filter { code, jt, jf, k };
    let calls = [libc::SYS_io_uring_setup, libc::SYS_io_uring_enter, libc::SYS_io_uring_register];
    let prog = [
        f(LD_W_ABS, 0, 0, ARCH),
        f(JEQ, 1, 0, AUDIT_ARCH),
        f(RET, 0, 0, ALLOW), // another ABI (x32 and the like): not this filter's business
        f(LD_W_ABS, 0, 0, NR),
        f(JEQ, 3, 0, calls[0] as u32),
        f(JEQ, 2, 0, calls[1] as u32),
        f(JEQ, 1, 0, calls[2] as u32),
        f(RET, 0, 0, ALLOW),
        f(RET, 0, 0, ERRNO | u32::from(errno)),
    ];
    let fprog = libc::sock_fprog { len: prog.len() as u16, filter: prog.as_ptr().cast_mut() };
    // SAFETY: plain prctl calls; `fprog` points at `prog`, both alive for the call (the kernel
    // copies the program before it returns).
    unsafe {
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
            || libc::prctl(libc::PR_SET_SECCOMP, libc::SECCOMP_MODE_FILTER, &raw const fprog) != 0
        {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host() -> Host {
        Host {
            release: "6.8.0-45-generic".into(),
            disabled: Some(0),
            group: Some(-1),
            groups: vec![1000],
            seccomp: Some(0),
            memlock: Some(8 << 20),
        }
    }

    #[test]
    fn each_cause_is_told_apart() {
        let h = host();
        let seccomp = Host { seccomp: Some(2), ..h.clone() };
        assert!(diagnose(libc::EPERM, &seccomp).cause.contains("seccomp filter"));
        assert!(diagnose(libc::EPERM, &seccomp).fix.contains("--security-opt seccomp="));
        assert!(diagnose(libc::ENOSYS, &seccomp).cause.contains("answers ENOSYS"));
        // The sysctl wins over a filter that may not even mention io_uring.
        let off = Host { disabled: Some(2), ..seccomp.clone() };
        assert!(diagnose(libc::EPERM, &off).cause.contains("kernel.io_uring_disabled = 2"));
        assert!(diagnose(libc::EPERM, &off).fix.starts_with("sysctl -w kernel.io_uring_disabled=0"));
        let group = Host { disabled: Some(1), group: Some(990), ..h.clone() };
        assert!(diagnose(libc::EPERM, &group).cause.contains("not in kernel.io_uring_group (990)"));
        let member = Host { groups: vec![1000, 990], seccomp: Some(2), ..group };
        assert!(diagnose(libc::EPERM, &member).cause.contains("seccomp"), "a member is refused by the filter");
        assert!(diagnose(libc::EPERM, &h).cause.contains("security module"));
        assert!(diagnose(libc::ENOSYS, &h).cause.contains("CONFIG_IO_URING"));
        let old = Host { release: "5.10.0".into(), ..h.clone() };
        assert!(diagnose(libc::ENOMEM, &old).cause.contains("RLIMIT_MEMLOCK is 8192 KiB"));
        let gvisor = Host { release: "4.4.0".into(), ..h };
        assert!(diagnose(libc::ENOSYS, &gvisor).cause.contains("gVisor"));
    }

    #[test]
    fn the_line_is_one_line() {
        let d = diagnose(libc::EPERM, &Host { seccomp: Some(2), ..host() });
        assert!(!d.to_string().contains('\n'));
    }

    #[test]
    fn versions_parse() {
        assert_eq!(version("6.1.0-28-amd64"), Some((6, 1)));
        assert_eq!(version("6.18.0"), Some((6, 18)));
        assert_eq!(version("junk"), None);
    }

    #[test]
    fn a_filtered_child_is_told_why() {
        use std::os::unix::process::CommandExt;
        // A child of this test binary re-runs the check under the filter: its exit status carries
        // the verdict (0: the cause named seccomp; 1: it did not; 2: the filter did not apply).
        if std::env::var_os("URING_ACCESS_CHILD").is_some() {
            std::process::exit(match check((6, 1)) {
                Err(b) if b.cause.contains("seccomp filter") && b.fix.contains("--security-opt seccomp=") => 0,
                Err(_) => 1,
                Ok(()) => 2,
            });
        }
        let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
        cmd.args(["--exact", "tests::a_filtered_child_is_told_why", "--nocapture"]).env("URING_ACCESS_CHILD", "1");
        // SAFETY: the closure only makes prctl calls (`deny_io_uring`), allowed after fork.
        unsafe { cmd.pre_exec(|| deny_io_uring(libc::EPERM as u16)) };
        assert_eq!(cmd.status().unwrap().code(), Some(0));
    }

    #[test]
    fn this_host_may_use_io_uring() {
        // The test machine runs io_uring (every other test needs it); `check` must agree.
        assert_eq!(check((6, 1)), Ok(()));
        let b = check((99, 0)).unwrap_err();
        assert!(b.cause.contains("older than 99.0") && b.fix.starts_with("run on Linux 99.0"), "{b}");
    }
}
