//! The sequenced messages clients send to an echo backend, and how an echo
//! is checked.
//!
//! A message is `size` bytes (at least [`HEADER`]): sequence number (u64 LE),
//! connection id (u32 LE, low bits of the global id), a check word (u32 LE)
//! mixing both, then a payload pattern derived from id, sequence and offset.
//! Every byte depends on (id, seq), so an echo that is corrupted, reordered,
//! or delivered to the wrong connection (a proxy mixing up streams) differs
//! from what the client sent. Invariant: a client keeps the message it sent
//! unchanged until its echo has been compared ([`matches()`]).

/// Smallest message: the header.
pub const HEADER: usize = 16;

fn mix(id: u64, seq: u64) -> u64 {
    let mut x = id.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ seq.wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
    x ^= x >> 29;
    x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x ^ (x >> 32)
}

/// Write message `seq` of connection `id` into `buf` (whole buffer).
pub fn fill(buf: &mut [u8], id: u64, seq: u64) {
    let m = mix(id, seq);
    if buf.len() >= HEADER {
        buf[0..8].copy_from_slice(&seq.to_le_bytes());
        buf[8..12].copy_from_slice(&(id as u32).to_le_bytes());
        buf[12..16].copy_from_slice(&(m as u32).to_le_bytes());
    }
    let start = HEADER.min(buf.len());
    for (i, b) in buf[start..].iter_mut().enumerate() {
        *b = (m >> ((i % 8) * 8)) as u8 ^ (i as u8);
    }
}

/// Does `echo` equal what was sent?
pub fn matches(sent: &[u8], echo: &[u8]) -> bool {
    sent == echo
}

/// One request/response exchange on a connection: the message sent and the
/// echo being collected. Its buffers are allocated once and never resized,
/// so pointers into them stay valid for the owner's whole life.
#[derive(Debug)]
pub struct Exchange {
    pub sbuf: Box<[u8]>,
    pub rbuf: Box<[u8]>,
    /// Bytes of the echo received so far.
    pub got: usize,
    /// Bytes of the message sent so far.
    pub sent: usize,
    /// Messages started so far: the current one's sequence number.
    pub seq: u64,
}

impl Exchange {
    pub fn new(size: usize) -> Exchange {
        let size = size.max(HEADER);
        Exchange {
            sbuf: vec![0; size].into_boxed_slice(),
            rbuf: vec![0; size].into_boxed_slice(),
            got: 0,
            sent: 0,
            seq: 0,
        }
    }

    /// Start the next message (sequence number `seq + 1`) of connection `id`.
    pub fn prepare(&mut self, id: u64) {
        self.seq += 1;
        fill(&mut self.sbuf, id, self.seq);
        self.got = 0;
        self.sent = 0;
    }

    /// Where the next bytes of the echo go.
    pub fn unreceived(&mut self) -> &mut [u8] {
        &mut self.rbuf[self.got..]
    }

    /// What is left to send.
    pub fn unsent(&self) -> &[u8] {
        &self.sbuf[self.sent..]
    }

    /// Account `n` received bytes; once the whole echo is in, returns
    /// `Some(true)` if it matches what was sent, `Some(false)` if corrupted.
    pub fn received(&mut self, n: usize) -> Option<bool> {
        self.got = (self.got + n).min(self.rbuf.len());
        (self.got == self.rbuf.len()).then(|| matches(&self.sbuf, &self.rbuf))
    }

    /// Account `n` sent bytes; true once the whole message is sent.
    pub fn sent_bytes(&mut self, n: usize) -> bool {
        self.sent = (self.sent + n).min(self.sbuf.len());
        self.sent == self.sbuf.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exchange_collects_partial_echoes() {
        let mut x = Exchange::new(40);
        x.prepare(7);
        assert!(!x.sent_bytes(10));
        assert!(x.sent_bytes(30));
        let sent = x.sbuf.to_vec();
        x.rbuf[..20].copy_from_slice(&sent[..20]);
        assert_eq!(x.received(20), None);
        x.rbuf[20..].copy_from_slice(&sent[20..]);
        x.rbuf[39] ^= 1;
        assert_eq!(x.received(20), Some(false));
        x.prepare(7);
        let sent = x.sbuf.to_vec();
        x.rbuf.copy_from_slice(&sent);
        assert_eq!(x.received(40), Some(true));
    }

    #[test]
    fn messages_differ_by_id_and_seq_and_detect_flips() {
        let mut a = [0u8; 64];
        let mut b = [0u8; 64];
        fill(&mut a, 1, 1);
        fill(&mut b, 1, 2);
        assert!(!matches(&a, &b));
        fill(&mut b, 2, 1);
        assert!(!matches(&a, &b));
        fill(&mut b, 1, 1);
        assert!(matches(&a, &b));
        for i in 0..64 {
            let mut c = a;
            c[i] ^= 0x01;
            assert!(!matches(&a, &c));
        }
    }
}
