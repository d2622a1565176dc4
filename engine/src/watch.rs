//! Helper threads that cannot die unnoticed: the health checker, the connection-log writer, the
//! stats endpoints.
//!
//! A helper is started with [`Watch::spawn`], which runs it under `catch_unwind`. When it panics
//! or returns an error, a [`Failure`] naming the thread and the cause goes to the [`Watcher`] the
//! `Watch` came from; the supervisor's owner (the binary's main loop) polls it, says so in one
//! line and shuts the process down with a non-zero status. A thread that returns `Ok` has simply
//! finished (its engine stopped it). A [`Watch::detached`] one (an engine run as a library, as in
//! tests) prints the line itself, since nobody polls.
//!
//! Debug builds honour `RINGPROXY_FAIL_THREAD=NAME`: the helper thread of that name panics as it
//! starts. It is how the tests make a helper fail in a real process; release builds ignore it.

use std::any::Any;
use std::fmt;
use std::io;
use std::panic::{self, AssertUnwindSafe};
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender, unbounded};

/// A helper thread that panicked or returned an error.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    /// The thread's name (`ringproxy-health`, `ringproxy-log`, ...).
    pub thread: String,
    /// What went wrong: the error, or `panicked: MESSAGE`.
    pub cause: String,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "the {} thread failed: {}", self.thread, self.cause)
    }
}

/// Receives the failures of every thread started through its [`Watch`]es.
pub struct Watcher {
    tx: Sender<Failure>,
    rx: Receiver<Failure>,
}

impl Default for Watcher {
    fn default() -> Self {
        Watcher::new()
    }
}

impl Watcher {
    pub fn new() -> Watcher {
        let (tx, rx) = unbounded();
        Watcher { tx, rx }
    }

    /// A handle to start watched threads with (cheap to clone, may go to any thread).
    pub fn watch(&self) -> Watch {
        Watch { tx: Some(self.tx.clone()) }
    }

    /// The next failure reported, if any (never waits).
    pub fn failure(&self) -> Option<Failure> {
        self.rx.try_recv().ok()
    }
}

/// Starts helper threads whose failure is reported (see the module documentation).
#[derive(Clone, Debug)]
pub struct Watch {
    tx: Option<Sender<Failure>>,
}

impl Watch {
    /// A watch nobody polls: failures are only printed to stderr.
    pub fn detached() -> Watch {
        Watch { tx: None }
    }

    /// Starts `f` on a thread named `name`. If `f` panics or returns `Err`, the failure is
    /// reported; the returned handle joins without error either way.
    pub fn spawn<E, F>(&self, name: &str, f: F) -> io::Result<JoinHandle<()>>
    where
        E: fmt::Display,
        F: FnOnce() -> Result<(), E> + Send + 'static,
    {
        let tx = self.tx.clone();
        let thread = name.to_owned();
        std::thread::Builder::new().name(thread.clone()).spawn(move || {
            // The closure's state is dropped, never used again, after a panic.
            let cause = match panic::catch_unwind(AssertUnwindSafe(|| {
                fail_point(&thread);
                f()
            })) {
                Ok(Ok(())) => return,
                Ok(Err(e)) => e.to_string(),
                Err(payload) => format!("panicked: {}", panic_message(payload.as_ref())),
            };
            let failure = Failure { thread, cause };
            match tx {
                Some(tx) => {
                    if let Err(unsent) = tx.send(failure) {
                        eprintln!("ringproxy: {}", unsent.into_inner());
                    }
                }
                None => eprintln!("ringproxy: {failure}"),
            }
        })
    }
}

/// The text a panic was raised with (`panic!("...")` gives a `&str` or a `String`).
fn panic_message(payload: &(dyn Any + Send)) -> &str {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s
    } else {
        "(no message)"
    }
}

/// Debug builds: panics when `RINGPROXY_FAIL_THREAD` names this thread.
fn fail_point(thread: &str) {
    if cfg!(debug_assertions) && std::env::var_os("RINGPROXY_FAIL_THREAD").is_some_and(|v| v == thread) {
        panic!("RINGPROXY_FAIL_THREAD={thread}");
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn next(w: &Watcher) -> Failure {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(f) = w.failure() {
                return f;
            }
            assert!(std::time::Instant::now() < deadline, "no failure reported");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn panics_and_errors_are_reported_with_the_thread_name_and_endings_are_not() {
        let w = Watcher::new();
        let watch = w.watch();
        watch.spawn("t-ok", || Ok::<(), String>(())).unwrap().join().unwrap();
        watch.spawn("t-err", || Err("poll: Invalid argument")).unwrap().join().unwrap();
        assert_eq!(next(&w), Failure { thread: "t-err".into(), cause: "poll: Invalid argument".into() });
        let h = watch.spawn("t-panic", || -> Result<(), String> { panic!("overflow at {}", 7) }).unwrap();
        h.join().expect("the panic is caught");
        let f = next(&w);
        assert_eq!(f.to_string(), "the t-panic thread failed: panicked: overflow at 7");
        assert_eq!(w.failure(), None, "a thread that finished is no failure");
    }
}
