//! The per-worker pool of splice pipes.
//!
//! A pipe is lent to one direction of one connection only while bytes are in flight (read from one
//! socket, not yet written to the other), so an idle connection holds none. The lease is a
//! [`PipeLease`]: not `Copy`, made only here, and the only way back into the pool is
//! [`PipePool::give_back`], which pools an empty pipe and closes one that may still hold bytes (so
//! the pool never hands another connection a dirty pipe). The connection keeps the lease in the
//! record of the splice that uses it until that splice's completion (conn/inflight.rs), so a pipe
//! is neither closed nor lent again while the kernel uses it. At most `max` pipes exist. Pipes
//! are ordinary descriptors (not io_uring direct ones) so the direct table stays free for sockets;
//! their number is bounded by the plan so they fit in RLIMIT_NOFILE.

use std::io;
use std::mem::ManuallyDrop;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

/// A pipe lent out of the pool.
#[must_use = "a pipe lease must be given back to its pool"]
#[derive(Debug, PartialEq, Eq)]
pub struct PipeLease {
    id: u32,
}

impl PipeLease {
    fn into_id(self) -> u32 {
        ManuallyDrop::new(self).id
    }
}

impl Drop for PipeLease {
    fn drop(&mut self) {
        debug_assert!(std::thread::panicking(), "pipe {} dropped instead of given back", self.id);
    }
}

struct Pipe {
    rd: OwnedFd,
    wr: OwnedFd,
}

pub struct PipePool {
    /// `None`: a pipe that was closed (discarded) and may be created again.
    pipes: Vec<Option<Pipe>>,
    free: Vec<u32>,
    max: u32,
    size: u32,
    pub in_use: u32,
    pub created: u64,
    pub discarded: u64,
    /// Size the kernel actually gave (pipe-max-size may cap it).
    pub effective_size: u32,
}

impl PipePool {
    pub fn new(max: u32, size: u32) -> PipePool {
        PipePool {
            pipes: Vec::new(),
            free: Vec::new(),
            max,
            size,
            in_use: 0,
            created: 0,
            discarded: 0,
            effective_size: size,
        }
    }

    /// Lends a pipe, creating one if the pool is empty and below its maximum; `Ok(None)` at the
    /// maximum.
    pub fn acquire(&mut self) -> io::Result<Option<PipeLease>> {
        if let Some(id) = self.free.pop() {
            self.in_use += 1;
            return Ok(Some(PipeLease { id }));
        }
        let live = self.pipes.iter().filter(|p| p.is_some()).count();
        if live as u32 >= self.max {
            return Ok(None);
        }
        let pipe = self.create()?;
        let id = match self.pipes.iter().position(Option::is_none) {
            Some(i) => {
                self.pipes[i] = Some(pipe);
                i as u32
            }
            None => {
                self.pipes.push(Some(pipe));
                self.pipes.len() as u32 - 1
            }
        };
        self.in_use += 1;
        Ok(Some(PipeLease { id }))
    }

    fn create(&mut self) -> io::Result<Pipe> {
        let (rd, wr, size) = crate::sys::pipe(self.size)?;
        self.effective_size = size;
        self.created += 1;
        Ok(Pipe { rd, wr })
    }

    /// (read end, write end) of a lent pipe.
    pub fn fds(&self, lease: &PipeLease) -> (RawFd, RawFd) {
        match &self.pipes[lease.id as usize] {
            Some(p) => (p.rd.as_raw_fd(), p.wr.as_raw_fd()),
            None => unreachable!("a lease names a live pipe"),
        }
    }

    /// Takes a pipe back once no splice uses it: pooled if it is empty (`pending == 0`), closed
    /// (never lent again) if it may still hold bytes.
    pub fn give_back(&mut self, lease: PipeLease, pending: u32) {
        let id = lease.into_id();
        self.in_use -= 1;
        if pending == 0 {
            self.free.push(id);
        } else {
            self.pipes[id as usize] = None;
            self.discarded += 1;
        }
    }

    /// Most pipes this pool makes.
    pub fn max(&self) -> u32 {
        self.max
    }

    /// Pipes created and not lent.
    pub fn pooled(&self) -> u32 {
        self.free.len() as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lends_reuses_discards_dirty_pipes_and_bounds() {
        let mut pool = PipePool::new(2, 65536);
        let a = pool.acquire().unwrap().unwrap();
        let b = pool.acquire().unwrap().unwrap();
        assert_ne!(a, b);
        assert!(pool.acquire().unwrap().is_none(), "at most two pipes");
        let a_id = a.id;
        pool.give_back(a, 0);
        let a2 = pool.acquire().unwrap().unwrap();
        assert_eq!(a2.id, a_id, "an empty pipe is reused");
        let b_id = b.id;
        pool.give_back(b, 100);
        assert_eq!(pool.discarded, 1, "a pipe that may hold bytes is closed");
        let c = pool.acquire().unwrap().unwrap();
        assert_eq!(c.id, b_id, "the discarded id is recreated with a fresh pipe");
        assert_eq!(pool.created, 3);
        assert_eq!(pool.in_use, 2);
        assert!(pool.effective_size >= 4096);
        pool.give_back(a2, 0);
        pool.give_back(c, 0);
        assert_eq!(pool.in_use, 0);
    }
}
