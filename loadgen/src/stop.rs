//! The process-wide stop flag: set by SIGINT/SIGTERM (Ctrl-C) and read by
//! every event loop at least every 100 ms, so a run ends cleanly, drains its
//! in-flight operations and still reports what it measured.
//!
//! Invariant: the signal handler only stores to an atomic (async-signal-safe).

use std::sync::atomic::{AtomicBool, Ordering};

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

/// Install the SIGINT/SIGTERM handlers.
pub fn install() {
    let handler: extern "C" fn(libc::c_int) = on_signal;
    // SAFETY: installing a handler that only stores to a static atomic.
    unsafe {
        libc::signal(libc::SIGINT, handler as libc::sighandler_t);
        libc::signal(libc::SIGTERM, handler as libc::sighandler_t);
    }
}

pub fn requested() -> bool {
    STOP.load(Ordering::Relaxed)
}

/// Ask every loop in this process to stop (used when a worker fails).
pub fn request() {
    STOP.store(true, Ordering::Relaxed);
}
