//! The few system calls the engine makes outside its rings, each behind a safe function.
//!
//! The data path talks to the kernel through `worker/ring/` only; this module holds the rest:
//! the control eventfd, the signal mask, RLIMIT_NOFILE, account lookups, id switching and
//! capabilities, opening a file without following symbolic links, a pipe, one socket option,
//! poll(2) for health checks, the kernel release and the page size. Every `unsafe` block is a
//! single libc call (or a call and the adoption of the descriptor it returned) on arguments owned
//! by the calling frame, with a `SAFETY:` line saying so. Nothing here keeps state, and nothing
//! here is called per connection.

use std::ffi::CStr;
use std::fs::File;
use std::io::{self, Write as _};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

/// An eventfd used as a doorbell: a sender signals, the woken side's ring has a read armed on it.
pub struct EventFd(File);

impl EventFd {
    /// A non-blocking, close-on-exec eventfd with its counter at 0.
    pub fn new() -> io::Result<EventFd> {
        // SAFETY: eventfd takes no pointers. On success `fd` is a new descriptor nothing else owns,
        // so the File may take it over (and close it once).
        let file = unsafe {
            let fd = libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK);
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            File::from_raw_fd(fd)
        };
        Ok(EventFd(file))
    }

    /// Adds 1 to the counter. A saturated counter (EAGAIN) is still signalled, so errors are moot.
    pub fn signal(&self) {
        let _ = (&self.0).write(&1u64.to_ne_bytes());
    }

    pub fn fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }

    /// Reads the counter and sets it back to 0 (0 when it was not signalled).
    pub fn take(&self) -> u64 {
        let mut count = [0u8; 8];
        match io::Read::read(&mut &self.0, &mut count) {
            Ok(8) => u64::from_ne_bytes(count),
            _ => 0,
        }
    }
}

/// A set of signals blocked in the calling thread, and in every thread it starts afterwards, to be
/// received synchronously with [`Signals::wait`] (so no handler runs inside a worker); with a
/// signalfd of the same set, so that a wait can also end on a doorbell ([`Signals::wait_or`]).
pub struct Signals(libc::sigset_t, OwnedFd);

impl Signals {
    /// Blocks `signals` in the calling thread. Call it before starting any thread.
    pub fn block(signals: &[libc::c_int]) -> io::Result<Signals> {
        // SAFETY: `set` is a local sigset_t (plain data, valid all-zero) that sigemptyset
        // initialises before sigaddset, pthread_sigmask and signalfd read it; the old mask is not
        // asked for (null is allowed). On success signalfd returns a new descriptor nothing else
        // owns, which the OwnedFd takes over.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            for &s in signals {
                if libc::sigaddset(&mut set, s) != 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            match libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) {
                0 => {}
                e => return Err(io::Error::from_raw_os_error(e)),
            }
            let fd = libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC);
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(Signals(set, OwnedFd::from_raw_fd(fd)))
        }
    }

    /// The next of these signals, or `None` once `timeout` has passed.
    pub fn wait(&self, timeout: Duration) -> Option<libc::c_int> {
        let ts = libc::timespec { tv_sec: timeout.as_secs() as libc::time_t, tv_nsec: timeout.subsec_nanos() as _ };
        loop {
            // SAFETY: `self.0` is an initialised set and `ts` a timespec, both alive across the
            // call; no siginfo is asked for (null is allowed).
            let r = unsafe { libc::sigtimedwait(&self.0, std::ptr::null_mut(), &ts) };
            if r > 0 {
                return Some(r);
            }
            if io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
                return None;
            }
        }
    }

    /// As [`Signals::wait`], but `None` also as soon as `bell` rings (its counter is then set back
    /// to 0). A signal pending already is returned first.
    pub fn wait_or(&self, bell: &EventFd, timeout: Duration) -> Option<libc::c_int> {
        let ms = timeout.as_millis().min(libc::c_int::MAX as u128) as libc::c_int;
        loop {
            if let Some(sig) = self.wait(Duration::ZERO) {
                return Some(sig);
            }
            let mut fds = [
                libc::pollfd { fd: self.1.as_raw_fd(), events: libc::POLLIN, revents: 0 },
                libc::pollfd { fd: bell.fd(), events: libc::POLLIN, revents: 0 },
            ];
            match poll(&mut fds, ms) {
                Ok(0) => return None,
                Ok(_) if fds[1].revents != 0 => {
                    bell.take();
                    return None;
                }
                // A signal is pending: the next turn takes it.
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(_) => return None,
            }
        }
    }
}

/// RLIMIT_NOFILE as (soft, hard).
pub fn nofile() -> io::Result<(u64, u64)> {
    let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: `r` is a local rlimit, writable for the duration of the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((r.rlim_cur, r.rlim_max))
}

/// Sets RLIMIT_NOFILE to (soft, hard).
pub fn set_nofile(soft: u64, hard: u64) -> io::Result<()> {
    let r = libc::rlimit { rlim_cur: soft, rlim_max: hard };
    // SAFETY: `r` is a local rlimit that setrlimit only reads.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &r) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Size of the buffers the passwd and group lookups write their strings into.
const LOOKUP_BUF: usize = 16 * 1024;

/// The uid and primary gid of the user `name`; `None` when the lookup finds none (or fails).
pub fn lookup_user(name: &CStr) -> Option<(libc::uid_t, libc::gid_t)> {
    let mut buf = vec![0 as libc::c_char; LOOKUP_BUF];
    // SAFETY: `pwd` (plain data, valid all-zero), `buf` (its length passed along) and `out` live
    // in this frame across the call, and `name` is NUL-terminated. The strings getpwnam_r points
    // `pwd` at are in `buf`; only the numeric ids are read, before `buf` is dropped.
    unsafe {
        let mut pwd: libc::passwd = std::mem::zeroed();
        let mut out: *mut libc::passwd = std::ptr::null_mut();
        let r = libc::getpwnam_r(name.as_ptr(), &mut pwd, buf.as_mut_ptr(), buf.len(), &mut out);
        (r == 0 && !out.is_null()).then_some((pwd.pw_uid, pwd.pw_gid))
    }
}

/// The gid of the group `name`; `None` when the lookup finds none (or fails).
pub fn lookup_group(name: &CStr) -> Option<libc::gid_t> {
    let mut buf = vec![0 as libc::c_char; LOOKUP_BUF];
    // SAFETY: as in `lookup_user`, with `group` and getgrnam_r.
    unsafe {
        let mut grp: libc::group = std::mem::zeroed();
        let mut out: *mut libc::group = std::ptr::null_mut();
        let r = libc::getgrnam_r(name.as_ptr(), &mut grp, buf.as_mut_ptr(), buf.len(), &mut out);
        (r == 0 && !out.is_null()).then_some(grp.gr_gid)
    }
}

/// The real uid and gid of this process.
pub fn ids() -> (libc::uid_t, libc::gid_t) {
    // SAFETY: getuid and getgid take no arguments and cannot fail.
    unsafe { (libc::getuid(), libc::getgid()) }
}

/// Empties the supplementary group list.
pub fn clear_groups() -> io::Result<()> {
    // SAFETY: with a count of 0 setgroups reads nothing from the (null) list.
    if unsafe { libc::setgroups(0, std::ptr::null()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sets the real, effective and saved gid.
pub fn set_gid(gid: libc::gid_t) -> io::Result<()> {
    // SAFETY: value arguments only.
    if unsafe { libc::setresgid(gid, gid, gid) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sets the real, effective and saved uid.
pub fn set_uid(uid: libc::uid_t) -> io::Result<()> {
    // SAFETY: value arguments only.
    if unsafe { libc::setresuid(uid, uid, uid) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sets `signal` to be ignored (SIG_IGN), for this and every thread.
pub fn ignore_signal(signal: libc::c_int) -> io::Result<()> {
    // SAFETY: signal(2) with SIG_IGN installs no handler, so no code of ours runs on delivery.
    if unsafe { libc::signal(signal, libc::SIG_IGN) } == libc::SIG_ERR {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A thread's capability sets, one bit per capability (bit 10 is CAP_NET_BIND_SERVICE).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CapSets {
    pub effective: u64,
    pub permitted: u64,
    pub inheritable: u64,
}

/// `struct __user_cap_header_struct` of <linux/capability.h>.
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

/// `struct __user_cap_data_struct`: version 3 takes two, the low and the high 32 capabilities.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// `_LINUX_CAPABILITY_VERSION_3`: 64-bit sets.
const CAP_VERSION_3: u32 = 0x2008_0522;

/// The calling thread's capability sets (capget(2)).
pub fn caps() -> io::Result<CapSets> {
    let mut header = CapHeader { version: CAP_VERSION_3, pid: 0 };
    let mut data = [CapData::default(); 2];
    // SAFETY: `header` and the two-element `data` array (what version 3 writes) are locals alive
    // across the call; pid 0 is the calling thread.
    if unsafe { libc::syscall(libc::SYS_capget, &raw mut header, data.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let join = |f: fn(&CapData) -> u32| u64::from(f(&data[0])) | u64::from(f(&data[1])) << 32;
    Ok(CapSets {
        effective: join(|d| d.effective),
        permitted: join(|d| d.permitted),
        inheritable: join(|d| d.inheritable),
    })
}

/// Sets the calling thread's capability sets (capset(2)); lowering is always allowed.
pub fn set_caps(sets: CapSets) -> io::Result<()> {
    let mut header = CapHeader { version: CAP_VERSION_3, pid: 0 };
    let split = |v: u64| [v as u32, (v >> 32) as u32];
    let (e, p, i) = (split(sets.effective), split(sets.permitted), split(sets.inheritable));
    let data = [0, 1].map(|k| CapData { effective: e[k], permitted: p[k], inheritable: i[k] });
    // SAFETY: as in `caps`; capset only reads `data`.
    if unsafe { libc::syscall(libc::SYS_capset, &raw mut header, data.as_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Empties the calling thread's ambient capability set. A kernel without ambient capabilities
/// (before 4.3) has none to clear.
pub fn clear_ambient_caps() -> io::Result<()> {
    // SAFETY: prctl with integer arguments only.
    let r = unsafe { libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) };
    match r {
        0 => Ok(()),
        _ => match io::Error::last_os_error() {
            e if e.raw_os_error() == Some(libc::EINVAL) => Ok(()),
            e => Err(e),
        },
    }
}

/// Removes every capability from the calling thread's bounding set (needs CAP_SETPCAP).
pub fn clear_bounding_caps() -> io::Result<()> {
    for cap in 0..64 {
        // SAFETY: prctl with integer arguments only.
        if unsafe { libc::prctl(libc::PR_CAPBSET_READ, cap, 0, 0, 0) } < 0 {
            break; // EINVAL: past the last capability this kernel knows
        }
        // SAFETY: as above.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Sets no_new_privs on the calling thread (and every thread and process it starts afterwards):
/// execve can no longer grant privileges (set-user-ID bits and file capabilities are ignored).
pub fn set_no_new_privs() -> io::Result<()> {
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `dir` as the raw descriptor *at() calls take (`None`: the working directory).
fn at(dir: Option<BorrowedFd<'_>>) -> RawFd {
    dir.map_or(libc::AT_FDCWD, |d| d.as_raw_fd())
}

/// The file type bits (`st_mode & S_IFMT`) of `name` in `dir`, not following a symbolic link.
pub fn file_type_at(dir: Option<BorrowedFd<'_>>, name: &CStr) -> io::Result<libc::mode_t> {
    // SAFETY: `st` is a local stat (plain data, valid all-zero) that fstatat only writes into;
    // `name` is NUL-terminated and `dir` (when given) is a descriptor borrowed for the call.
    let st = unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        if libc::fstatat(at(dir), name.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) != 0 {
            return Err(io::Error::last_os_error());
        }
        st
    };
    Ok(st.st_mode & libc::S_IFMT)
}

/// Opens the directory `name` in `dir` as a path-only descriptor (for further *at() calls),
/// failing when `name` is a symbolic link.
pub fn open_dir_at(dir: Option<BorrowedFd<'_>>, name: &CStr) -> io::Result<OwnedFd> {
    let flags = libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC;
    // SAFETY: `name` is NUL-terminated and `dir` borrowed for the call. On success the result is a
    // new descriptor nothing else owns, so the OwnedFd may take it over.
    unsafe {
        let fd = libc::openat(at(dir), name.as_ptr(), flags);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(OwnedFd::from_raw_fd(fd))
    }
}

/// Opens `name` in `dir` for appending, creating it with `mode` (less the umask) when absent.
/// Never follows a symbolic link (ELOOP), never waits for a FIFO's reader (ENXIO when it has
/// none) and never becomes the controlling terminal. The file is returned blocking.
pub fn open_append_at(dir: Option<BorrowedFd<'_>>, name: &CStr, mode: libc::mode_t) -> io::Result<File> {
    let flags = libc::O_WRONLY
        | libc::O_APPEND
        | libc::O_CREAT
        | libc::O_NOFOLLOW
        | libc::O_NONBLOCK
        | libc::O_NOCTTY
        | libc::O_CLOEXEC;
    // SAFETY: as in `open_dir_at`; the mode is passed as the variadic argument O_CREAT reads.
    let file = unsafe {
        let fd = libc::openat(at(dir), name.as_ptr(), flags, libc::c_uint::from(mode));
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        File::from_raw_fd(fd)
    };
    // SAFETY: fcntl on the descriptor `file` owns, with integer arguments.
    let cleared = unsafe {
        let fl = libc::fcntl(file.as_raw_fd(), libc::F_GETFL);
        fl >= 0 && libc::fcntl(file.as_raw_fd(), libc::F_SETFL, fl & !libc::O_NONBLOCK) == 0
    };
    if !cleared {
        return Err(io::Error::last_os_error());
    }
    Ok(file)
}

/// A non-blocking, close-on-exec pipe (read end, write end) asked to hold `size` bytes, and the
/// size it really holds: the kernel rounds up to a power of two of pages, and when it refuses
/// (beyond fs.pipe-max-size, or over the user's pipe pages) the pipe keeps its current size.
pub fn pipe(size: u32) -> io::Result<(OwnedFd, OwnedFd, u32)> {
    let mut fds = [-1 as RawFd; 2];
    // SAFETY: pipe2 writes two descriptors into `fds`, a local array of two. On success they are
    // new descriptors nothing else owns, so each OwnedFd may take one over.
    let (rd, wr) = unsafe {
        if libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) != 0 {
            return Err(io::Error::last_os_error());
        }
        (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1]))
    };
    let size = libc::c_int::try_from(size).unwrap_or(libc::c_int::MAX);
    // SAFETY: fcntl on a descriptor this frame owns, with an integer argument.
    let mut got = unsafe { libc::fcntl(wr.as_raw_fd(), libc::F_SETPIPE_SZ, size) };
    if got <= 0 {
        // SAFETY: as above; F_GETPIPE_SZ takes no argument.
        got = unsafe { libc::fcntl(wr.as_raw_fd(), libc::F_GETPIPE_SZ) };
    }
    if got <= 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((rd, wr, got as u32))
}

/// This thread's CPU time so far, in ns (`CLOCK_THREAD_CPUTIME_ID`; 0 if the clock fails).
pub fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid timespec for the call to write.
    if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) } != 0 {
        return 0;
    }
    (ts.tv_sec as u64).saturating_mul(1_000_000_000).saturating_add(ts.tv_nsec as u64)
}

/// splice(2) of up to `len` bytes from `from` to `to` (one of them a pipe), without blocking:
/// the bytes moved (0: the source is at its end), or the error (`EAGAIN`: nothing to read, or no
/// room to write). Pages move by reference, no copy (SPLICE_F_MOVE).
/// The caller keeps both descriptors open across the call (they are its own).
pub fn splice(from: RawFd, to: RawFd, len: u32) -> Result<u32, i32> {
    // SAFETY: no pointer (null offsets: both ends are a socket or a pipe, read at their current
    // position); a descriptor that were closed would only fail the call (EBADF).
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len as usize,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 { Err(io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO)) } else { Ok(n as u32) }
}

/// Sets IP_BIND_ADDRESS_NO_PORT: bind() fixes only the address, connect() picks the port per
/// 4-tuple (so a source address is not limited to one connection per ephemeral port host-wide).
pub fn set_bind_address_no_port(sock: impl AsFd) -> io::Result<()> {
    set_int_option(sock, libc::IPPROTO_IP, libc::IP_BIND_ADDRESS_NO_PORT, 1)
}

/// setsockopt(level, name) with an int value.
pub fn set_int_option(sock: impl AsFd, level: libc::c_int, name: libc::c_int, value: libc::c_int) -> io::Result<()> {
    // SAFETY: passes a pointer to `value`, a local c_int alive across the call, and its size;
    // setsockopt only reads it.
    let r = unsafe {
        libc::setsockopt(
            sock.as_fd().as_raw_fd(),
            level,
            name,
            (&raw const value).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Waits up to `timeout_ms` for events on `fds` (poll(2)); returns how many have some.
pub fn poll(fds: &mut [libc::pollfd], timeout_ms: libc::c_int) -> io::Result<usize> {
    // SAFETY: `fds` is a live, exclusively borrowed slice of pollfd and its length is passed with
    // it; poll writes only the `revents` fields.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// The kernel release (`uname -r`), when it can be read.
pub fn kernel_release() -> Option<String> {
    Some(uring_access::release()).filter(|r| !r.is_empty())
}

/// The page size in bytes, when sysconf knows it.
pub fn page_size() -> Option<u64> {
    // SAFETY: sysconf takes a value argument and has no memory-safety preconditions.
    let v = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(v).ok().filter(|&v| v > 0)
}

#[cfg(test)]
mod tests {
    use std::io::Read as _;

    use super::*;

    #[test]
    fn a_pipe_holds_exactly_the_size_it_reports() {
        let (rd, wr, got) = pipe(128 << 10).unwrap();
        assert!(got >= 4096 && got.is_power_of_two(), "{got}");
        let (mut rd, mut wr) = (File::from(rd), File::from(wr));
        let mut empty = [0u8; 1];
        assert_eq!(rd.read(&mut empty).unwrap_err().kind(), io::ErrorKind::WouldBlock, "non-blocking");
        let chunk = vec![7u8; 16 << 10];
        let mut held = 0usize;
        loop {
            match wr.write(&chunk) {
                Ok(n) => held += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(held, got as usize, "a full pipe holds the reported size");
    }

    #[test]
    fn an_eventfd_counts_signals() {
        let e = EventFd::new().unwrap();
        assert_eq!(e.take(), 0);
        e.signal();
        e.signal();
        assert_eq!(e.take(), 2);
        assert_eq!(e.take(), 0);
    }

    /// The supervisor's wait ends on its doorbell (rung from another thread) as on a signal, well
    /// before its timeout, and a signal pending is returned first. (On a thread of its own: the
    /// mask it sets stays with that thread; the signal is sent to that thread alone.)
    #[test]
    fn a_wait_ends_on_the_doorbell_or_a_signal() {
        std::thread::spawn(|| {
            let signals = Signals::block(&[libc::SIGUSR2]).unwrap();
            let bell = std::sync::Arc::new(EventFd::new().unwrap());
            let long = Duration::from_secs(60);
            let ringer = {
                let bell = bell.clone();
                std::thread::spawn(move || {
                    std::thread::sleep(Duration::from_millis(20));
                    bell.signal();
                })
            };
            let t = std::time::Instant::now();
            assert_eq!(signals.wait_or(&bell, long), None, "woken by the doorbell");
            assert!(t.elapsed() < Duration::from_secs(30), "long before the timeout: {:?}", t.elapsed());
            ringer.join().unwrap();
            assert_eq!(bell.take(), 0, "the doorbell is reset by the wait that heard it");
            // SAFETY: pthread_self names this live thread; SIGUSR2 is blocked in it, so the
            // signal stays pending until the wait takes it.
            assert_eq!(unsafe { libc::pthread_kill(libc::pthread_self(), libc::SIGUSR2) }, 0);
            bell.signal();
            assert_eq!(signals.wait_or(&bell, long), Some(libc::SIGUSR2), "the pending signal first");
            assert_eq!(signals.wait_or(&bell, long), None, "then the doorbell");
            assert_eq!(signals.wait_or(&bell, Duration::from_millis(10)), None, "then the timeout");
        })
        .join()
        .unwrap();
    }

    #[test]
    fn reads_this_host() {
        let (soft, hard) = nofile().unwrap();
        assert!(soft <= hard);
        set_nofile(soft, hard).unwrap();
        assert!(kernel_release().is_some_and(|r| r.chars().next().is_some_and(|c| c.is_ascii_digit())));
        assert!(page_size().is_some_and(|p| p.is_power_of_two()));
        assert_eq!(lookup_user(c"root"), Some((0, 0)));
        assert_eq!(lookup_user(c"no-such-user-ringproxy"), None);
        assert_eq!(lookup_group(c"root"), Some(0));
        let held = caps().unwrap();
        set_caps(held).unwrap();
        assert_eq!(caps().unwrap(), held, "capget and capset agree on the layout");
    }
}
