//! What the kernel's io_uring offers above the 6.1 floor, and what the engine does without it.
//!
//! The engine's data path needs nothing newer than 6.1 (multishot accept and receive, provided
//! buffer rings, direct descriptors, DEFER_TASKRUN). Three operations on a direct socket came later;
//! each has a fallback that costs a few system calls when a connection opens, never memory while it
//! is idle; and one receive flag came later, whose fallback costs completions on bulk flows:
//!
//! | feature | kernel | without it |
//! |---|---|---|
//! | uring_cmd `SETSOCKOPT` / `GETSOCKOPT` on a socket | 6.7 | accepts into plain descriptors: the client's address (`getpeername`) and, where a PROXY header needs it, the local one (`getsockname`) are read at once, then the socket moves into a direct slot the worker picks (`IORING_REGISTER_FILES_UPDATE`) and the plain descriptor is closed; server sockets are made the same way (below); a reset is passed on by a connect to `AF_UNSPEC` before the close (SO_LINGER cannot be set on a direct socket; both run `tcp_disconnect`, which sends the RST) |
//! | `IORING_OP_FIXED_FD_INSTALL` | 6.8 | as above for the local address |
//! | `IORING_OP_BIND` | 6.11 | server sockets are made with `socket`, `setsockopt` and `bind` and moved into their direct slot; CONNECT and its timeout stay in the ring |
//! | `IORING_RECVSEND_BUNDLE` on the multishot receive | 6.10 | each receive completion brings one receive buffer instead of as many as the data fills (more completions per byte on bulk flows) |
//! | `IORING_REGISTER_PBUF_STATUS` | 6.8 | receive buffers left offered after a burst keep their pages until receives take them |
//! | `IORING_SEND_ZC_REPORT_USAGE` | 6.2 | with `tune.send_zerocopy`, the stats cannot tell zero-copy sends the kernel copied anyway |
//! | `IORING_FEAT_MIN_TIMEOUT` (`min_wait_usec`) | 6.12 | `tune.batch_wait` is not applied (`auto` quietly, a duration with a warning at start): every event wakes the worker |
//!
//! `global.tune.io_features` (or, where the file does not set it, the environment variable
//! `RINGPROXY_IO_FEATURES`) pins the set to what a named kernel offers, so that every fallback is
//! exercised on a newer kernel: a testing and support aid.

use std::fmt;
use std::io;

use io_uring::opcode;
use io_uring::types::{DestinationSlot, Fixed};

/// The lowest kernel the engine runs on.
pub const FLOOR: (u32, u32) = (6, 1);

/// The environment variable that pins the feature set when the configuration does not.
pub const ENV: &str = "RINGPROXY_IO_FEATURES";

/// Operations above the floor that the engine uses when the kernel has them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IoFeatures {
    /// uring_cmd SOCKET_URING_OP_SETSOCKOPT / GETSOCKOPT (6.7).
    pub sockopt: bool,
    /// IORING_OP_FIXED_FD_INSTALL (6.8).
    pub fd_install: bool,
    /// IORING_OP_BIND (6.11).
    pub bind: bool,
    /// IORING_RECVSEND_BUNDLE on a multishot receive: one completion for several buffers (6.10).
    pub bundle: bool,
    /// IORING_REGISTER_PBUF_STATUS: the kernel tells a provided-buffer ring's head, so buffers
    /// left offered after a burst can give their pages back (6.8).
    pub pbuf_status: bool,
    /// IORING_SEND_ZC_REPORT_USAGE: a zero-copy send's notification says whether the kernel
    /// copied the bytes after all (6.2).
    pub zc_report: bool,
    /// IORING_FEAT_MIN_TIMEOUT: a wait may ask for `min_wait_usec`, the batching `tune.batch_wait`
    /// sets (6.12).
    pub min_wait: bool,
}

impl IoFeatures {
    pub const ALL: IoFeatures = IoFeatures {
        sockopt: true,
        fd_install: true,
        bind: true,
        bundle: true,
        pbuf_status: true,
        zc_report: true,
        min_wait: true,
    };

    /// What kernel `version` offers.
    pub fn of_kernel(version: (u32, u32)) -> IoFeatures {
        IoFeatures {
            sockopt: version >= (6, 7),
            fd_install: version >= (6, 8),
            bind: version >= (6, 11),
            bundle: version >= (6, 10),
            pbuf_status: version >= (6, 8),
            zc_report: version >= (6, 2),
            min_wait: version >= (6, 12),
        }
    }

    /// Asks the running kernel: IORING_REGISTER_PROBE for the opcodes, a SETSOCKOPT on a direct
    /// socket for the uring_cmd (the probe only says uring_cmd exists, not for sockets), the
    /// ring's feature flags for bundles, PBUF_STATUS on a buffer group nobody registered
    /// (ENOENT where the kernel has it, EINVAL where it does not know the call), and a zero-copy
    /// send asking for the usage report on the unconnected socket (EINVAL where the kernel does not
    /// know the flag, an error of the send itself where it does).
    pub fn probe() -> io::Result<IoFeatures> {
        let mut ring = io_uring::IoUring::new(4)?;
        let mut probe = io_uring::Probe::new();
        ring.submitter().register_probe(&mut probe)?;
        ring.submitter().register_files_sparse(1)?;
        let socket = opcode::Socket::new(libc::AF_INET, libc::SOCK_STREAM, 0)
            .file_index(Some(DestinationSlot::try_from_slot_target(0).map_err(|_| io::ErrorKind::InvalidInput)?))
            .build()
            .user_data(1);
        static ONE: i32 = 1;
        let opt = opcode::SetSockOpt::new(
            Fixed(0),
            libc::SOL_SOCKET as u32,
            libc::SO_KEEPALIVE as u32,
            (&raw const ONE).cast(),
            4,
        )
        .build()
        .user_data(2);
        let mut sockopt = false;
        let mut socket_made = false;
        for e in [socket, opt] {
            // SAFETY: SOCKET holds no pointer; the option value is a `static`; the ring is waited
            // on below before anything is dropped.
            unsafe { ring.submission().push(&e).map_err(|_| io::ErrorKind::OutOfMemory)? };
            ring.submit_and_wait(1)?;
            if let Some(c) = ring.completion().next() {
                socket_made |= c.user_data() == 1 && c.result() >= 0;
                sockopt = c.user_data() == 2 && c.result() >= 0;
                if c.result() < 0 {
                    break;
                }
            }
        }
        let pbuf_status = crate::worker::ring::pbuf_status_known(&ring);
        let mut zc_report = false;
        if socket_made {
            // SAFETY: msghdr is plain old data; all-zero is an empty message.
            let msg: libc::msghdr = unsafe { std::mem::zeroed() };
            let e = opcode::SendMsgZc::new(Fixed(0), &raw const msg)
                .ioprio(crate::worker::ring::SEND_ZC_REPORT_USAGE)
                .flags(libc::MSG_NOSIGNAL as u32)
                .build()
                .user_data(3);
            // SAFETY: `msg` outlives the wait below, which takes the send's first completion
            // (the kernel reads the message while issuing it, before that completion).
            unsafe { ring.submission().push(&e).map_err(|_| io::ErrorKind::OutOfMemory)? };
            ring.submit_and_wait(1)?;
            if let Some(c) = ring.completion().find(|c| c.user_data() == 3) {
                zc_report = c.result() != -libc::EINVAL;
            }
        }
        Ok(IoFeatures {
            sockopt,
            fd_install: probe.is_supported(opcode::FixedFdInstall::CODE),
            bind: probe.is_supported(opcode::Bind::CODE),
            bundle: ring.params().is_feature_recvsend_bundle(),
            pbuf_status,
            zc_report,
            min_wait: ring.params().is_feature_min_timeout(),
        })
    }

    /// Both sets at once.
    pub fn and(self, other: IoFeatures) -> IoFeatures {
        IoFeatures {
            sockopt: self.sockopt && other.sockopt,
            fd_install: self.fd_install && other.fd_install,
            bind: self.bind && other.bind,
            bundle: self.bundle && other.bundle,
            pbuf_status: self.pbuf_status && other.pbuf_status,
            zc_report: self.zc_report && other.zc_report,
            min_wait: self.min_wait && other.min_wait,
        }
    }

    /// Accepted sockets go straight into kernel-chosen direct slots (else: plain accept, then
    /// moved into a slot).
    pub fn direct_accept(&self) -> bool {
        self.sockopt && self.fd_install
    }

    /// Server sockets are made and bound in the ring's connect chain (else: by system calls).
    pub fn chained_connect(&self) -> bool {
        self.sockopt && self.bind
    }

    /// Each fallback in use, phrased for the operator.
    pub fn fallbacks(&self) -> Vec<&'static str> {
        let mut f = Vec::new();
        if !self.direct_accept() {
            f.push("client sockets accepted as plain descriptors, addresses read with getpeername/getsockname, then moved into direct slots");
        }
        if !self.chained_connect() {
            f.push("server sockets made with socket/setsockopt/bind, then moved into direct slots");
        }
        if !self.sockopt {
            f.push("a reset is passed on by a connect to AF_UNSPEC instead of SO_LINGER");
        }
        if !self.bundle {
            f.push("one receive buffer per receive completion");
        }
        if !self.pbuf_status {
            f.push("receive buffers left offered after a burst keep their pages until receives take them");
        }
        if !self.zc_report {
            f.push("zero-copy sends not told apart from those the kernel copied");
        }
        f
    }
}

impl fmt::Display for IoFeatures {
    /// One line: what is used, and each fallback.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let on = |b: bool, name: &str| if b { name.to_owned() } else { format!("no {name}") };
        write!(
            f,
            "{}, {}, {}, {}, {}, {}, {}",
            on(self.sockopt, "uring_cmd socket options"),
            on(self.fd_install, "FIXED_FD_INSTALL"),
            on(self.bind, "BIND"),
            on(self.bundle, "receive bundles"),
            on(self.pbuf_status, "PBUF_STATUS"),
            on(self.zc_report, "zero-copy usage reports"),
            on(self.min_wait, "batched waits")
        )?;
        let fallbacks = self.fallbacks();
        if !fallbacks.is_empty() {
            write!(f, "; fallbacks: {}", fallbacks.join("; "))?;
        }
        Ok(())
    }
}

/// The set the engine uses: the running kernel's, narrowed to the pinned kernel's when
/// `tune.io_features` (or [`ENV`]) names one. Returns the set and how it was chosen.
pub fn effective(pinned: Option<(u32, u32)>) -> io::Result<(IoFeatures, String)> {
    let native = IoFeatures::probe()?;
    let pinned = match pinned {
        Some(v) => Some(v),
        None => match std::env::var(ENV) {
            Ok(s) if !s.is_empty() && s != "native" => Some(parse(&s).map_err(io::Error::other)?),
            _ => None,
        },
    };
    Ok(match pinned {
        Some((a, b)) => (native.and(IoFeatures::of_kernel((a, b))), format!("pinned to Linux {a}.{b}")),
        None => (native, "this kernel's".to_owned()),
    })
}

/// `"6.1"` → (6, 1), for kernels at or above the floor.
pub fn parse(s: &str) -> Result<(u32, u32), String> {
    let v = uring_access::version(s)
        .filter(|_| s.chars().all(|c| c.is_ascii_digit() || c == '.'))
        .ok_or_else(|| format!("io_features must be \"native\" or a kernel version such as \"6.1\", not \"{s}\""))?;
    if v < FLOOR {
        return Err(format!("io_features \"{s}\" is below the kernel ringproxy needs, {}.{}", FLOOR.0, FLOOR.1));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn named_kernels_and_the_fallbacks_they_need() {
        let six_one = IoFeatures::of_kernel((6, 1));
        assert_eq!(
            six_one,
            IoFeatures {
                sockopt: false,
                fd_install: false,
                bind: false,
                bundle: false,
                pbuf_status: false,
                zc_report: false,
                min_wait: false
            }
        );
        assert_eq!(six_one.fallbacks().len(), 6);
        assert!(IoFeatures::of_kernel((6, 2)).zc_report);
        assert_eq!(
            IoFeatures::of_kernel((6, 8)),
            IoFeatures {
                sockopt: true,
                fd_install: true,
                bind: false,
                bundle: false,
                pbuf_status: true,
                zc_report: true,
                min_wait: false
            }
        );
        assert!(IoFeatures::of_kernel((6, 10)).bundle);
        assert!(IoFeatures::of_kernel((6, 8)).direct_accept());
        assert!(!IoFeatures::of_kernel((6, 8)).chained_connect());
        assert!(IoFeatures::of_kernel((6, 11)).fallbacks().is_empty());
        assert!(!IoFeatures::of_kernel((6, 11)).min_wait && IoFeatures::of_kernel((6, 12)).min_wait);
        assert_eq!(parse("6.1"), Ok((6, 1)));
        assert!(parse("5.15").unwrap_err().contains("below"));
        assert!(parse("six").is_err());
    }

    #[test]
    fn a_new_kernel_has_everything() {
        // On 6.12+ (the test machine runs 6.18) the probe must find every feature, and so report
        // no fallback the engine does not need.
        let release = crate::sys::kernel_release().unwrap_or_default();
        if uring_access::version(&release).is_some_and(|v| v >= (6, 12)) {
            assert_eq!(IoFeatures::probe().unwrap(), IoFeatures::ALL);
        }
    }
}
