//! Request/response exchanges on a [`ClientWorker`]'s slots, for the modes
//! that send one sequenced message and wait for its whole echo (`rate`,
//! `latency`): start one, send what is left, collect the echo, count it.
//!
//! Invariant: a slot's message is rewritten only by
//! [`ClientWorker::start_exchange`], which the modes call only on a new
//! connection or once the previous echo is complete, so never while a send
//! of it may be in flight (the kernel has copied every byte of a message
//! out before the peer can echo it). One receive per slot at a time.

use anyhow::Result;

use crate::client::ClientWorker;
use crate::stats::Progress;
use crate::wire::Exchange;

/// A mode's per-connection data that holds the slot's exchange.
pub trait HasExchange {
    fn exchange(&mut self) -> &mut Exchange;
}

impl HasExchange for Exchange {
    fn exchange(&mut self) -> &mut Exchange {
        self
    }
}

impl<C: HasExchange, B> ClientWorker<'_, C, B> {
    /// Start the slot's next message (of connection `id`) on an Open slot:
    /// fill it in, send it and arm the receive of its echo.
    pub fn start_exchange(&mut self, slot: u32, id: u64) -> Result<()> {
        let (c, m) = self.conn_mut(slot);
        c.exchange().prepare(id);
        m.msgs_sent += 1;
        self.send_rest(slot)?;
        self.recv_rest(slot)
    }

    /// `n` more bytes of the message went out: send the rest, if any.
    pub fn exchange_sent(&mut self, slot: u32, n: usize) -> Result<()> {
        if self.conn_mut(slot).0.exchange().sent_bytes(n) { Ok(()) } else { self.send_rest(slot) }
    }

    /// `n` more bytes of the echo arrived. `None` while it is incomplete (the
    /// next receive is armed); once whole, counted (echoed ok or corrupted,
    /// completed) and `Some(true)` if it matched.
    pub fn exchange_received(&mut self, slot: u32, n: usize) -> Result<Option<bool>> {
        let progress = self.progress();
        let (c, m) = self.conn_mut(slot);
        let Some(ok) = c.exchange().received(n) else {
            self.recv_rest(slot)?;
            return Ok(None);
        };
        if ok {
            m.msgs_ok += 1;
        } else {
            m.corrupted += 1;
            Progress::inc(&progress.corrupted);
        }
        m.completed += 1;
        Progress::inc(&progress.completed);
        Ok(Some(ok))
    }

    fn send_rest(&mut self, slot: u32) -> Result<()> {
        // SAFETY: the message is rewritten only by `start_exchange`, never
        // while a send of it may be in flight (module invariant).
        unsafe { self.send(slot, |c, _| c.exchange().unsent()) }
    }

    fn recv_rest(&mut self, slot: u32) -> Result<()> {
        // SAFETY: one receive per slot at a time, and the echo buffer is read
        // (`received`) only after that receive completed.
        unsafe { self.recv(slot, |c, _| c.exchange().unreceived()) }
    }
}
