//! The per-worker pool of splice pipes.
//!
//! A pipe is lent to one direction of one connection only while bytes are in flight (read from one
//! socket, not yet written to the other), so an idle connection holds none. Invariants: a lent pipe
//! is returned only when the splices using it have completed; a returned pipe is empty, or it is
//! discarded (closed) instead of pooled; at most `max` pipes exist. Pipes are ordinary descriptors
//! (not io_uring direct ones) so the direct table stays free for sockets; their number is bounded
//! by the plan so they fit in RLIMIT_NOFILE.

use std::io;
use std::os::fd::RawFd;

pub type PipeId = u32;
pub const NO_PIPE: PipeId = u32::MAX;

#[derive(Clone, Copy)]
struct Pipe {
    rd: RawFd,
    wr: RawFd,
}

pub struct PipePool {
    pipes: Vec<Pipe>,
    free: Vec<PipeId>,
    /// Ids whose pipe was discarded and may be created again.
    vacant: Vec<PipeId>,
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
            vacant: Vec::new(),
            max,
            size,
            in_use: 0,
            created: 0,
            discarded: 0,
            effective_size: size,
        }
    }

    /// Lends a pipe, creating one if the pool is empty and below its maximum.
    pub fn acquire(&mut self) -> io::Result<Option<PipeId>> {
        if let Some(id) = self.free.pop() {
            self.in_use += 1;
            return Ok(Some(id));
        }
        let live = self.pipes.len() - self.vacant.len();
        if live as u32 >= self.max {
            return Ok(None);
        }
        let pipe = self.create()?;
        let id = match self.vacant.pop() {
            Some(id) => {
                self.pipes[id as usize] = pipe;
                id
            }
            None => {
                self.pipes.push(pipe);
                (self.pipes.len() - 1) as PipeId
            }
        };
        self.in_use += 1;
        Ok(Some(id))
    }

    fn create(&mut self) -> io::Result<Pipe> {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: `fds` has room for the two descriptors pipe2 writes.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fcntl on a descriptor we own; failure only means the default size stays.
        let got = unsafe { libc::fcntl(fds[1], libc::F_SETPIPE_SZ, self.size as libc::c_int) };
        if got > 0 {
            self.effective_size = got as u32;
        } else {
            // SAFETY: as above; F_GETPIPE_SZ only reads.
            let cur = unsafe { libc::fcntl(fds[1], libc::F_GETPIPE_SZ) };
            if cur > 0 {
                self.effective_size = cur as u32;
            }
        }
        self.created += 1;
        Ok(Pipe { rd: fds[0], wr: fds[1] })
    }

    /// (read end, write end) of a lent pipe.
    pub fn fds(&self, id: PipeId) -> (RawFd, RawFd) {
        let p = self.pipes[id as usize];
        (p.rd, p.wr)
    }

    /// Takes back an empty pipe whose splices have completed.
    pub fn release(&mut self, id: PipeId) {
        self.in_use -= 1;
        self.free.push(id);
    }

    /// Takes back a pipe that may still hold bytes: it is closed, never lent again.
    pub fn discard(&mut self, id: PipeId) {
        self.in_use -= 1;
        self.close(id);
        self.vacant.push(id);
        self.discarded += 1;
    }

    fn close(&mut self, id: PipeId) {
        let p = self.pipes[id as usize];
        // SAFETY: both descriptors belong to this pool and no splice uses them (caller's invariant).
        unsafe {
            libc::close(p.rd);
            libc::close(p.wr);
        }
        self.pipes[id as usize] = Pipe { rd: -1, wr: -1 };
    }

    /// Pipes created and not lent.
    pub fn pooled(&self) -> u32 {
        self.free.len() as u32
    }
}

impl Drop for PipePool {
    fn drop(&mut self) {
        for id in 0..self.pipes.len() as PipeId {
            if self.pipes[id as usize].rd >= 0 {
                self.close(id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lends_reuses_and_bounds() {
        let mut pool = PipePool::new(2, 65536);
        let a = pool.acquire().unwrap().unwrap();
        let b = pool.acquire().unwrap().unwrap();
        assert_ne!(a, b);
        assert_eq!(pool.acquire().unwrap(), None, "at most two pipes");
        pool.release(a);
        assert_eq!(pool.acquire().unwrap(), Some(a), "an empty pipe is reused");
        pool.discard(b);
        let c = pool.acquire().unwrap().unwrap();
        assert_eq!(c, b, "the discarded id is recreated with a fresh pipe");
        assert_eq!(pool.created, 3);
        assert_eq!(pool.in_use, 2);
        assert!(pool.effective_size >= 4096);
    }
}
