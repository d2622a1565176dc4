//! Client sockets and what the kernel says about sockets: connect helpers, the kernel's TCP
//! sockets (with each one's inode), and this process's descriptors (`/proc/self/fd`).

use std::collections::HashSet;
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpStream};
use std::time::Duration;

pub fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect to the proxy");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
    s
}

/// Connects from a given local IP.
pub fn connect_from(addr: SocketAddr, from: IpAddr) -> TcpStream {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.bind(&SocketAddr::new(from, 0).into()).unwrap();
    sock.connect_timeout(&addr.into(), Duration::from_secs(5)).unwrap();
    let s: TcpStream = sock.into();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s
}

/// Writes `msg`, reads the same number of bytes back, and checks them.
pub fn echo_once(s: &mut TcpStream, msg: &[u8]) {
    s.write_all(msg).unwrap();
    let mut got = vec![0u8; msg.len()];
    s.read_exact(&mut got).unwrap();
    assert_eq!(got, msg);
}

/// Reads until EOF or error; returns what was read and whether it ended with an error.
pub fn read_to_end(s: &mut TcpStream) -> (Vec<u8>, Option<std::io::Error>) {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return (out, None),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return (out, Some(e)),
        }
    }
}

pub fn half_close(s: &TcpStream) {
    s.shutdown(Shutdown::Write).unwrap();
}

/// Closes with RST (SO_LINGER 0).
pub fn reset(conn: TcpStream) {
    let s = socket2::Socket::from(conn);
    let _ = s.set_linger(Some(Duration::ZERO));
    drop(s);
}

/// A port nobody listens on right now: bind port 0 and give it back.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// One TCP socket as the kernel reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TcpSocket {
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// As `ss` names it: ESTAB, SYN-SENT, LISTEN, FIN-WAIT-2, ...
    pub state: &'static str,
    /// For a listening socket, connections waiting in its accept queue; else bytes received and
    /// not read.
    pub rx_queue: u64,
    /// For a listening socket, the accept queue's limit (its backlog); else bytes not yet acked.
    pub tx_queue: u64,
    /// The socket's inode (what `/proc/PID/fd/N` links to as `socket:[INODE]`); 0 for a
    /// connection still in an accept queue, which no descriptor holds yet.
    pub inode: u64,
    /// The timer running (`ss -o`): 0 none, 1 retransmit, 2 keepalive, 3 TIME-WAIT, 4 zero-window
    /// probe; and when it fires, in milliseconds from now.
    pub timer: u8,
    pub expires_ms: u32,
    /// The socket's receive and send buffer sizes (`ss -m`'s `rb` and `tb`: the kernel's
    /// sk_rcvbuf and sk_sndbuf, twice what SO_RCVBUF / SO_SNDBUF set).
    pub rcvbuf: u32,
    pub sndbuf: u32,
}

impl TcpSocket {
    pub fn on_port(&self, port: u16) -> bool {
        self.local.port() == port || self.remote.port() == port
    }

    /// Still holds a connection open: anything but LISTEN and CLOSE (TIME-WAIT is never listed).
    pub fn is_open(&self) -> bool {
        !matches!(self.state, "LISTEN" | "CLOSE")
    }
}

/// The TCP sockets of this network namespace whose local or remote port is one of `ports`, in
/// every state but TIME-WAIT.
///
/// Asked of the kernel's sock_diag netlink interface (as `ss` does) rather than read from
/// /proc/net/tcp: the kernel then skips the TIME-WAIT sockets, which no descriptor holds and nothing
/// here looks at, and of which a test run leaves tens of thousands (making every read of
/// /proc/net/tcp take 50 ms or more).
pub fn tcp_sockets_on(ports: &[u16]) -> Vec<TcpSocket> {
    let mut out = Vec::new();
    for family in [libc::AF_INET, libc::AF_INET6] {
        let all = diag::dump(family as u8).unwrap_or_else(|e| panic!("sock_diag dump (family {family}): {e}"));
        out.extend(all.into_iter().filter(|s| ports.iter().any(|&p| s.on_port(p))));
    }
    out
}

/// The NETLINK_SOCK_DIAG request for every TCP socket of one address family (linux/inet_diag.h).
mod diag {
    use std::io;
    use std::mem::size_of;
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    use super::TcpSocket;

    const NETLINK_SOCK_DIAG: i32 = 4;
    const SOCK_DIAG_BY_FAMILY: u16 = 20;
    const NLM_F_REQUEST: u16 = 0x1;
    const NLM_F_DUMP: u16 = 0x300;
    const NLMSG_ERROR: u16 = 0x2;
    const NLMSG_DONE: u16 = 0x3;
    const TCP_TIME_WAIT: u32 = 6;
    /// The extension asked for: INET_DIAG_SKMEMINFO (an array of u32, SK_MEMINFO_*).
    const INET_DIAG_SKMEMINFO: u16 = 7;
    const SK_MEMINFO_RCVBUF: usize = 1;
    const SK_MEMINFO_SNDBUF: usize = 3;

    #[repr(C)]
    #[derive(Clone, Copy)]
    struct NlMsgHdr {
        len: u32,
        kind: u16,
        flags: u16,
        seq: u32,
        pid: u32,
    }

    #[repr(C)]
    #[derive(Clone, Copy)]
    struct SockId {
        sport: [u8; 2],
        dport: [u8; 2],
        src: [u8; 16],
        dst: [u8; 16],
        interface: u32,
        cookie: [u32; 2],
    }

    #[repr(C)]
    #[derive(Clone, Copy)]
    struct ReqV2 {
        family: u8,
        protocol: u8,
        ext: u8,
        pad: u8,
        states: u32,
        id: SockId,
    }

    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Msg {
        family: u8,
        state: u8,
        timer: u8,
        retrans: u8,
        id: SockId,
        expires: u32,
        rqueue: u32,
        wqueue: u32,
        uid: u32,
        inode: u32,
    }

    #[repr(C)]
    struct Request {
        hdr: NlMsgHdr,
        req: ReqV2,
    }

    pub fn dump(family: u8) -> io::Result<Vec<TcpSocket>> {
        // SAFETY: socket(2) with constant arguments; the result is checked before use.
        let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, NETLINK_SOCK_DIAG) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just opened and is owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let id = SockId { sport: [0; 2], dport: [0; 2], src: [0; 16], dst: [0; 16], interface: 0, cookie: [0; 2] };
        let request = Request {
            hdr: NlMsgHdr {
                len: size_of::<Request>() as u32,
                kind: SOCK_DIAG_BY_FAMILY,
                flags: NLM_F_REQUEST | NLM_F_DUMP,
                seq: 1,
                pid: 0,
            },
            req: ReqV2 {
                family,
                protocol: libc::IPPROTO_TCP as u8,
                ext: 1 << (INET_DIAG_SKMEMINFO - 1),
                pad: 0,
                states: !(1 << TCP_TIME_WAIT),
                id,
            },
        };
        // SAFETY: `request` is a plain repr(C) value that outlives the call; the length is its size.
        let sent = unsafe { libc::send(fd.as_raw_fd(), (&raw const request).cast(), size_of::<Request>(), 0) };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut out = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            // SAFETY: `buf` is valid for writes of its whole length for the duration of the call.
            let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            let data = &buf[..n as usize];
            let mut off = 0;
            while off + size_of::<NlMsgHdr>() <= data.len() {
                let hdr: NlMsgHdr = read(&data[off..]);
                let len = hdr.len as usize;
                if len < size_of::<NlMsgHdr>() || off + len > data.len() {
                    return Err(io::Error::other("truncated netlink message"));
                }
                let body = &data[off + size_of::<NlMsgHdr>()..off + len];
                match hdr.kind {
                    NLMSG_DONE => return Ok(out),
                    NLMSG_ERROR => {
                        let errno: i32 = read(body);
                        return Err(io::Error::from_raw_os_error(-errno));
                    }
                    SOCK_DIAG_BY_FAMILY if body.len() >= size_of::<Msg>() => {
                        out.push(socket(&read(body), &body[size_of::<Msg>()..]))
                    }
                    _ => {}
                }
                off += len.next_multiple_of(4);
            }
        }
    }

    /// A `T` from the start of `bytes` (netlink messages are 4-byte aligned, a `Vec<u8>` need not be).
    fn read<T: Copy>(bytes: &[u8]) -> T {
        assert!(bytes.len() >= size_of::<T>());
        // SAFETY: `bytes` holds at least size_of::<T>() bytes (checked above), read unaligned, and
        // `T` is only instantiated with the plain-integer repr(C) types above, valid for any bits.
        unsafe { bytes.as_ptr().cast::<T>().read_unaligned() }
    }

    /// The u32 at `index` of the INET_DIAG_SKMEMINFO attribute among `attrs` (netlink attributes:
    /// u16 length, u16 type, payload, each 4-byte aligned); 0 if absent.
    fn meminfo(mut attrs: &[u8], index: usize) -> u32 {
        while attrs.len() >= 4 {
            let (len, kind) =
                (u16::from_ne_bytes([attrs[0], attrs[1]]) as usize, u16::from_ne_bytes([attrs[2], attrs[3]]));
            if len < 4 || len > attrs.len() {
                break;
            }
            let payload = &attrs[4..len];
            if kind == INET_DIAG_SKMEMINFO && payload.len() >= (index + 1) * 4 {
                return read(&payload[index * 4..]);
            }
            attrs = &attrs[len.next_multiple_of(4).min(attrs.len())..];
        }
        0
    }

    fn socket(m: &Msg, attrs: &[u8]) -> TcpSocket {
        let addr = |ip: &[u8; 16], port: [u8; 2]| {
            let ip = if m.family == libc::AF_INET as u8 {
                IpAddr::V4(Ipv4Addr::new(ip[0], ip[1], ip[2], ip[3]))
            } else {
                IpAddr::V6(Ipv6Addr::from(*ip))
            };
            SocketAddr::new(ip, u16::from_be_bytes(port))
        };
        TcpSocket {
            local: addr(&m.id.src, m.id.sport),
            remote: addr(&m.id.dst, m.id.dport),
            state: super::state_name(m.state),
            rx_queue: m.rqueue.into(),
            tx_queue: m.wqueue.into(),
            inode: m.inode.into(),
            timer: m.timer,
            expires_ms: m.expires,
            rcvbuf: meminfo(attrs, SK_MEMINFO_RCVBUF),
            sndbuf: meminfo(attrs, SK_MEMINFO_SNDBUF),
        }
    }
}

/// The kernel's TCP states (include/net/tcp_states.h), as `ss` names them.
fn state_name(state: u8) -> &'static str {
    match state {
        1 => "ESTAB",
        2 => "SYN-SENT",
        3 | 12 => "SYN-RECV",
        4 => "FIN-WAIT-1",
        5 => "FIN-WAIT-2",
        6 => "TIME-WAIT",
        7 => "CLOSE",
        8 => "CLOSE-WAIT",
        9 => "LAST-ACK",
        10 => "LISTEN",
        11 => "CLOSING",
        _ => "?",
    }
}

/// TCP sockets in the kernel whose local or remote port is `port`.
pub fn sockets_on_port(port: u16) -> Vec<TcpSocket> {
    tcp_sockets_on(&[port])
}

/// Sockets on `port` that still hold a connection open (anything but LISTEN, TIME-WAIT, CLOSE).
pub fn open_sockets_on_port(port: u16) -> Vec<TcpSocket> {
    sockets_on_port(port).into_iter().filter(TcpSocket::is_open).collect()
}

/// Number of descriptors this process has open.
pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map(|d| d.count()).unwrap_or(0)
}

/// Inodes of the sockets this process holds a descriptor for (`/proc/self/fd/N -> socket:[INODE]`).
pub fn socket_inodes() -> HashSet<u64> {
    socket_inodes_in("/proc/self/fd")
}

/// Inodes of the sockets process `pid` holds a descriptor for.
pub fn socket_inodes_of(pid: u32) -> HashSet<u64> {
    socket_inodes_in(&format!("/proc/{pid}/fd"))
}

fn socket_inodes_in(fd_dir: &str) -> HashSet<u64> {
    let Ok(dir) = std::fs::read_dir(fd_dir) else {
        return HashSet::new();
    };
    dir.flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .filter_map(|t| t.to_str()?.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok())
        .collect()
}

/// The TCP sockets on `ports` this process holds a descriptor for. Exact even while other tests of
/// the same binary open and close sockets: a socket is recognised by its inode.
pub fn own_tcp_sockets_on(ports: &[u16]) -> Vec<TcpSocket> {
    let mine = socket_inodes();
    tcp_sockets_on(ports).into_iter().filter(|s| s.inode != 0 && mine.contains(&s.inode)).collect()
}

/// The TCP sockets on `ports` process `pid` holds a (process-table) descriptor for.
pub fn tcp_sockets_held_by(pid: u32, ports: &[u16]) -> Vec<TcpSocket> {
    let theirs = socket_inodes_of(pid);
    tcp_sockets_on(ports).into_iter().filter(|s| s.inode != 0 && theirs.contains(&s.inode)).collect()
}

/// `n` connections to `front`, each having sent its number and read it back (through an echo
/// server): connections held across a reload or an upgrade.
pub fn held_echoing(front: SocketAddr, n: u32) -> Vec<TcpStream> {
    (0..n)
        .map(|i| {
            let mut c = connect(front);
            echo_once(&mut c, &i.to_le_bytes());
            c
        })
        .collect()
}

/// New connections to a frontend, one after another until stopped, on a thread of their own: each
/// counts as served when `exchange` succeeds on it, else (refused, reset, unanswered) as failed.
pub struct Churn {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    ok: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    failed: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    thread: std::thread::JoinHandle<()>,
}

impl Churn {
    pub fn start(front: SocketAddr, exchange: fn(&mut TcpStream) -> bool) -> Churn {
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let ok = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let failed = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let thread = {
            let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    let t0 = std::time::Instant::now();
                    let served = match TcpStream::connect_timeout(&front, Duration::from_secs(2)) {
                        Ok(mut c) => {
                            c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                            let ok = exchange(&mut c);
                            if !ok {
                                eprintln!(
                                    "churn: the exchange failed after {:?} (local {:?})",
                                    t0.elapsed(),
                                    c.local_addr()
                                );
                            }
                            ok
                        }
                        Err(e) => {
                            eprintln!("churn: connect failed after {:?}: {e}", t0.elapsed());
                            false
                        }
                    };
                    if served { &ok } else { &failed }.fetch_add(1, Ordering::SeqCst);
                }
            })
        };
        Churn { stop, ok, failed, thread }
    }

    /// Connections served so far.
    pub fn served(&self) -> usize {
        self.ok.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Stops; returns (served, failed).
    pub fn stop(self) -> (usize, usize) {
        use std::sync::atomic::Ordering;
        self.stop.store(true, Ordering::SeqCst);
        self.thread.join().unwrap();
        (self.ok.load(Ordering::SeqCst), self.failed.load(Ordering::SeqCst))
    }
}

/// For [`Churn`]: the server's first byte (a tag) arrives.
pub fn reads_a_byte(c: &mut TcpStream) -> bool {
    let mut t = [0u8];
    c.read_exact(&mut t).is_ok()
}

/// For [`Churn`]: one byte echoed back.
pub fn echoes_a_byte(c: &mut TcpStream) -> bool {
    let mut b = [0u8];
    c.write_all(b"c").is_ok() && c.read_exact(&mut b).is_ok() && b[0] == b'c'
}

/// Runs `f` on a thread of its own in a new network namespace — its loopback up, then each of
/// `commands` run there (`ip`, `tc` …; a path under /proc/sys/net written as `path=value`) —
/// with everything it starts (threads, child processes) in that namespace too.
pub fn in_network_namespace<T: Send + 'static>(commands: &[&str], f: impl FnOnce() -> T + Send + 'static) -> T {
    let commands: Vec<String> = commands.iter().map(|c| (*c).to_owned()).collect();
    std::thread::spawn(move || {
        // SAFETY: unshare has no pointer argument; it moves only this thread to a new namespace.
        assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0, "unshare(CLONE_NEWNET)");
        for c in std::iter::once("ip link set lo up").chain(commands.iter().map(String::as_str)) {
            if let Some((path, value)) = c.split_once('=') {
                std::fs::write(path, value).unwrap_or_else(|e| panic!("{path}: {e}"));
                continue;
            }
            let argv: Vec<&str> = c.split_whitespace().collect();
            let ok = std::process::Command::new(argv[0]).args(&argv[1..]).status().expect(argv[0]);
            assert!(ok.success(), "{c}");
        }
        f()
    })
    .join()
    .unwrap()
}
