//! Zero-copy sends of the receive-buffer path (`tune.send_zerocopy`): `IORING_OP_SENDMSG_ZC`.
//!
//! A zero-copy send posts two completions with the same `user_data`: the first says how many
//! bytes were sent (flagged `IORING_CQE_F_MORE` when a notification follows), the second
//! (`IORING_CQE_F_NOTIF`) that the kernel no longer reads from our buffers — on a NIC once the
//! bytes are acknowledged and the device is done with them, on loopback once the receiver's copy
//! is made. The first is the connection's, and may free it; the notification may come after the
//! connection is gone, or moved to another worker. So each such send has a record here, named by
//! its `user_data` (`Op::SendZc`, the record's index and the generation of this use of it, so that
//! a cancel or completion meant for an earlier use never matches a later one): the connection's
//! send token for the first completion, and the buffers it reads from for the notification. Each
//! buffer counts the sends reading it (`BufRing::zc_hold`); one given back meanwhile goes back to
//! the ring when the last of them is done (`BufRing::zc_done`). Records are reused, and so is
//! their list's memory.
//!
//! Invariant: a record lives from its SQE until its first completion came and, if that one said
//! a notification follows, until the notification came; every completion of ours names a live
//! record.

use io_uring::opcode;
use io_uring::types::Fixed;

use super::{Ring, RingBuf, Sock};
use crate::worker::token::{Op, Token};

/// `IORING_SEND_ZC_REPORT_USAGE` (sqe ioprio, 6.2): the notification's result says whether the
/// kernel copied; and that result's `IORING_NOTIF_USAGE_ZC_COPIED` (the crate does not export
/// them; include/uapi/linux/io_uring.h).
pub const SEND_ZC_REPORT_USAGE: u16 = 1 << 3;
const NOTIF_USAGE_ZC_COPIED: u32 = 1 << 31;

struct Record {
    live: bool,
    /// Bumped at each use of the record (the `user_data`'s generation).
    generation: u32,
    /// The connection's token for the send's first completion (`None`: came already).
    conn: Option<Token>,
    /// The notification came.
    notified: bool,
    /// The receive buffers the send reads from (ids).
    bufs: Vec<u16>,
}

/// The zero-copy sends whose completions have not all come.
#[derive(Default)]
pub(super) struct ZcSends {
    records: Vec<Record>,
    free: Vec<u32>,
    /// Records live now.
    live: u32,
}

/// What a completion of a zero-copy send is.
pub enum ZcCompletion {
    /// The send's result: hand it to the connection as its send completion (`token`).
    Sent(Token),
    /// The notification: the buffers went back; `copied` when the kernel says it copied the bytes
    /// after all (loopback, a device without scatter-gather: `IORING_NOTIF_USAGE_ZC_COPIED`).
    Done { copied: bool },
}

impl Ring {
    /// Starts the record of a zero-copy send for connection token `conn` that will read from
    /// `bufs`: the send's token, for [`Ring::sendmsg_zc`] (and a cancel).
    pub fn zc_begin<'a>(&mut self, conn: Token, bufs: impl Iterator<Item = &'a RingBuf>) -> Token {
        let Some(r) = self.recv_bufs.as_mut() else { unreachable!("a zero-copy send without receive buffers") };
        let index = match self.zc.free.pop() {
            Some(i) => i,
            None => {
                self.zc.records.push(Record {
                    live: false,
                    generation: 0,
                    conn: None,
                    notified: false,
                    bufs: Vec::new(),
                });
                self.zc.records.len() as u32 - 1
            }
        };
        let rec = &mut self.zc.records[index as usize];
        debug_assert!(!rec.live && rec.bufs.is_empty());
        (rec.live, rec.conn, rec.notified) = (true, Some(conn), false);
        rec.generation = rec.generation.wrapping_add(1);
        rec.bufs.extend(bufs.map(|b| r.zc_hold(b)));
        self.zc.live += 1;
        Token::record(Op::SendZc, index, rec.generation)
    }

    /// `sendmsg` of the iovecs `msg` names, whole, zero-copy, as `send` ([`Ring::zc_begin`]).
    ///
    /// # Safety
    /// `msg` and its iovec array stay valid and unchanged until the op's first completion, and the
    /// buffers they point into until its notification: the record holds them (a buffer given
    /// back before goes back to the ring only after it); the rest as for [`Ring::sendmsg`].
    pub unsafe fn sendmsg_zc(&mut self, sock: Sock<'_>, msg: *const libc::msghdr, send: Token) {
        let report = if self.io.zc_report { SEND_ZC_REPORT_USAGE } else { 0 };
        let e = opcode::SendMsgZc::new(Fixed(sock.index()), msg)
            .ioprio(report)
            .flags(libc::MSG_WAITALL as u32 | libc::MSG_NOSIGNAL as u32)
            .build()
            .user_data(send.encode());
        // SAFETY: forwarded to the caller.
        unsafe { self.push(e) };
    }

    /// A completion of zero-copy send `send`, with its flags and result: what it is. `None` for a
    /// record that is not live or not in that use, or a completion it had already (counted by the
    /// caller as unexpected).
    pub fn zc_completion(&mut self, send: Token, flags: u32, res: i32) -> Option<ZcCompletion> {
        let rec = send.index;
        let r = self
            .zc
            .records
            .get_mut(rec as usize)
            .filter(|r| r.live && Token::record(Op::SendZc, rec, r.generation) == send)?;
        let (out, finished) = if io_uring::cqueue::notif(flags) {
            if std::mem::replace(&mut r.notified, true) {
                return None;
            }
            let copied = res as u32 & NOTIF_USAGE_ZC_COPIED != 0;
            // (The notification comes after the first completion; were it otherwise, the
            // record would wait for that one.)
            (ZcCompletion::Done { copied }, r.conn.is_none())
        } else {
            let conn = r.conn.take()?;
            // Without `F_MORE` no notification follows: the send failed before it read anything.
            (ZcCompletion::Sent(conn), r.notified || !io_uring::cqueue::more(flags))
        };
        if matches!(out, ZcCompletion::Done { .. }) || finished {
            // The kernel reads none of the buffers any more.
            if let Some(bufs) = self.recv_bufs.as_mut() {
                for bid in r.bufs.drain(..) {
                    bufs.zc_done(bid);
                }
            }
        }
        if finished {
            r.live = false;
            self.zc.free.push(rec);
            self.zc.live -= 1;
        }
        Some(out)
    }

    /// Zero-copy sends with a completion still to come (their buffers are held until then).
    pub fn zc_live(&self) -> u32 {
        self.zc.live
    }
}
