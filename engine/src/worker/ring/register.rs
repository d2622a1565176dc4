//! io_uring_register calls the io-uring crate does not wrap (FILE_ALLOC_RANGE, PBUF_STATUS), or
//! wraps in a way that loses what the kernel answered (SYNC_CANCEL's count of requests it found).

use std::io;
use std::os::fd::AsRawFd;
use std::time::Duration;

use io_uring::IoUring;

const IORING_REGISTER_SYNC_CANCEL: libc::c_long = 24;
const IORING_REGISTER_FILE_ALLOC_RANGE: libc::c_long = 25;
const IORING_REGISTER_PBUF_STATUS: libc::c_long = 26;
const IORING_ASYNC_CANCEL_ANY: u32 = 1 << 2;

/// Tells the kernel which slots its accepts may allocate from.
pub(super) fn file_alloc_range(ring: &IoUring, off: u32, len: u32) -> io::Result<()> {
    #[repr(C)]
    struct Range {
        off: u32,
        len: u32,
        resv: u64,
    }
    let range = Range { off, len, resv: 0 };
    // SAFETY: `range` is a valid io_uring_file_index_range that the kernel only reads during the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_io_uring_register,
            ring.as_raw_fd(),
            IORING_REGISTER_FILE_ALLOC_RANGE,
            &raw const range,
            0,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The head of provided-buffer ring `bgid`: the next descriptor a receive will consume (Linux
/// 6.8+; EINVAL before). Descriptors from it to the tail have not been consumed: with
/// `DEFER_TASKRUN` receives consume them only within this thread's `io_uring_enter`.
pub(super) fn pbuf_head(ring: &IoUring, bgid: u16) -> io::Result<u16> {
    #[repr(C)]
    struct Status {
        buf_group: u32,
        head: u32,
        resv: [u32; 8],
    }
    let mut status = Status { buf_group: u32::from(bgid), head: 0, resv: [0; 8] };
    // SAFETY: `status` is a valid io_uring_buf_status (40 bytes, as the kernel's) that the kernel
    // reads and writes only during the call.
    let r = unsafe {
        libc::syscall(libc::SYS_io_uring_register, ring.as_raw_fd(), IORING_REGISTER_PBUF_STATUS, &raw mut status, 1)
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(status.head as u16)
}

/// Bytes of the `bytes` at `p` (a mapping made by [`map_lazy`]) that are resident now.
pub(super) fn resident(p: *mut u8, bytes: usize) -> usize {
    let page = crate::host::page_size() as usize;
    let mut vec = vec![0u8; bytes.div_ceil(page)];
    // SAFETY: `p` is page-aligned (a mapping's start) and the span lies in the mapping; mincore
    // writes one byte per page into `vec`, which has that many.
    let r = unsafe { libc::mincore(p.cast(), bytes, vec.as_mut_ptr()) };
    if r < 0 {
        return 0;
    }
    vec.iter().filter(|&&b| b & 1 == 1).count() * page
}

/// Cancels every request of the ring, waiting up to `timeout` for those that can be waited for;
/// returns how many it found (still running ones included: they were only interrupted). Only the
/// ring's submitter thread may call it (SINGLE_ISSUER).
pub(super) fn sync_cancel_any(ring: &IoUring, timeout: Duration) -> io::Result<u32> {
    #[repr(C)]
    struct SyncCancel {
        addr: u64,
        fd: i32,
        flags: u32,
        timeout_sec: i64,
        timeout_nsec: i64,
        opcode: u8,
        pad: [u8; 7],
        pad2: [u64; 3],
    }
    let arg = SyncCancel {
        addr: 0,
        fd: -1,
        flags: IORING_ASYNC_CANCEL_ANY,
        timeout_sec: timeout.as_secs() as i64,
        timeout_nsec: i64::from(timeout.subsec_nanos()),
        opcode: 0,
        pad: [0; 7],
        pad2: [0; 3],
    };
    // SAFETY: `arg` is a valid io_uring_sync_cancel_reg (64 bytes, as the kernel's) that the
    // kernel only reads during the call.
    let r = unsafe {
        libc::syscall(libc::SYS_io_uring_register, ring.as_raw_fd(), IORING_REGISTER_SYNC_CANCEL, &raw const arg, 1)
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r as u32)
}

/// An anonymous, zeroed, page-aligned mapping of `bytes` (a provided-buffer ring's descriptors).
pub(super) fn map_anonymous(bytes: usize) -> io::Result<std::ptr::NonNull<u8>> {
    map(bytes, 0)
}

/// An anonymous, zeroed, page-aligned mapping of `bytes` whose pages become memory only when they
/// are first written (MAP_NORESERVE: no swap is reserved for the whole span): the receive buffers.
pub(super) fn map_lazy(bytes: usize) -> io::Result<std::ptr::NonNull<u8>> {
    let p = map(bytes, libc::MAP_NORESERVE)?;
    // No transparent huge pages: where THP is `always` (the default of some distributions), a
    // first write into a 2 MiB extent may make all of it resident — 512 pages for a heartbeat that
    // needs one — and the trim's MADV_DONTNEED of one buffer inside a huge page frees nothing until
    // the kernel splits it. (Advice only: a kernel without THP ignores it.)
    // SAFETY: advice on the mapping just made, which nothing uses yet; it changes no contents.
    unsafe { libc::madvise(p.as_ptr().cast(), bytes, libc::MADV_NOHUGEPAGE) };
    Ok(p)
}

/// Gives the pages of `bytes` at `p` back to the kernel: they read as zeros and cost no memory
/// until written again (MADV_DONTNEED on a private anonymous mapping).
///
/// # Safety
/// The span lies in a mapping made by [`map_lazy`], and nothing (the kernel included) may be
/// writing into it or reading from it.
pub(super) unsafe fn discard(p: *mut u8, bytes: usize) {
    // SAFETY: forwarded to the caller; madvise does not touch memory outside the span.
    unsafe { libc::madvise(p.cast(), bytes, libc::MADV_DONTNEED) };
}

fn map(bytes: usize, flags: libc::c_int) -> io::Result<std::ptr::NonNull<u8>> {
    // SAFETY: an anonymous private mapping at an address of the kernel's choosing: no pointer is
    // passed in, and the result is checked before use.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            bytes,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | flags,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    std::ptr::NonNull::new(p.cast()).ok_or_else(|| io::Error::other("mmap returned null"))
}

/// Unmaps a mapping made by [`map_anonymous`] or [`map_lazy`].
///
/// # Safety
/// `p` and `bytes` are exactly such a mapping, and nothing (the kernel
/// included) uses it any more.
pub(super) unsafe fn unmap(p: std::ptr::NonNull<u8>, bytes: usize) {
    // SAFETY: forwarded to the caller.
    unsafe { libc::munmap(p.as_ptr().cast(), bytes) };
}

#[cfg(test)]
mod tests {
    /// The receive buffers' mapping is marked no-huge-page (`nh` in its smaps flags), so THP
    /// `always` cannot make a whole 2 MiB extent resident for one small receive.
    #[test]
    fn the_lazy_mapping_asks_for_no_huge_pages() {
        let bytes = 8 << 20;
        let p = super::map_lazy(bytes).expect("a lazy mapping");
        let at = p.as_ptr() as usize;
        let smaps = std::fs::read_to_string("/proc/self/smaps").expect("/proc/self/smaps");
        // The entry whose range holds the mapping (the kernel may have merged it with a neighbour
        // of the same kind), up to its VmFlags line.
        let holds = |l: &str| {
            let range = l.split_whitespace().next().unwrap_or("");
            let mut ends = range.split('-').map(|x| usize::from_str_radix(x, 16));
            matches!((ends.next(), ends.next()), (Some(Ok(a)), Some(Ok(b))) if a <= at && at < b)
        };
        let flags = smaps
            .lines()
            .skip_while(|l| !holds(l))
            .find(|l| l.starts_with("VmFlags:"))
            .expect("the mapping's entry and its VmFlags");
        assert!(flags.split_whitespace().any(|f| f == "nh"), "{flags}");
        // SAFETY: the mapping made above, used by nothing.
        unsafe { super::unmap(p, bytes) };
    }
}
