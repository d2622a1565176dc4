//! The ring's direct-descriptor table: slots `[0, accept_slots)` are filled by the kernel's
//! accepts, slots `[accept_slots, files)` are ours for server sockets.
//!
//! A socket in the table is named by a handle that is not `Copy`: [`ClientSlot`] (made from an
//! accept's completion) and [`ServerSlot`] (taken from [`ServerSlots`]). The only way to give one
//! up is to close it through the ring (`Ring::close`), so a slot is closed exactly once, and a
//! server slot goes back to the free list only when that close has completed — never while an
//! operation may still resolve the number. Operations borrow a slot as a [`Sock`], which can only
//! be made from a handle that is still held.

use std::marker::PhantomData;
use std::mem::ManuallyDrop;
use std::num::NonZeroU32;

/// A socket in the direct table, borrowed for building one SQE.
#[derive(Clone, Copy, Debug)]
pub struct Sock<'a> {
    index: u32,
    _held: PhantomData<&'a ()>,
}

impl Sock<'_> {
    pub(super) fn index(self) -> u32 {
        self.index
    }
}

macro_rules! slot {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[must_use = "a direct slot must be closed through the ring"]
        #[derive(Debug, PartialEq, Eq)]
        pub struct $name {
            /// The slot's number + 1 (so `Option<Self>` costs no more than `Self`).
            plus_one: NonZeroU32,
        }

        impl $name {
            fn new(index: u32) -> $name {
                $name { plus_one: NonZeroU32::new(index.wrapping_add(1)).unwrap_or(NonZeroU32::MAX) }
            }

            /// Borrows the socket for an operation.
            pub fn sock(&self) -> Sock<'_> {
                Sock { index: self.index(), _held: PhantomData }
            }

            /// The slot's number (for logs and the close completion's token).
            pub fn index(&self) -> u32 {
                self.plus_one.get() - 1
            }

            /// Gives the handle up: only the ring's close does this.
            pub(super) fn into_index(self) -> u32 {
                ManuallyDrop::new(self).index()
            }
        }

        impl Drop for $name {
            fn drop(&mut self) {
                // Dropped without a close: the socket would stay open in the table for good.
                debug_assert!(std::thread::panicking(), concat!($what, " {} dropped without being closed"), self.index());
            }
        }
    };
}

slot!(
    /// A direct slot holding an accepted client socket.
    ClientSlot,
    "client slot"
);
slot!(
    /// A direct slot of our range, for a server socket (open or not yet).
    ServerSlot,
    "server slot"
);

impl ClientSlot {
    /// The slot a successful accept's completion names (its result).
    pub(in crate::worker) fn accepted(result: u32) -> ClientSlot {
        ClientSlot::new(result)
    }
}

/// The free server slots of one worker.
pub struct ServerSlots {
    free: Vec<u32>,
    first: u32,
    end: u32,
}

impl ServerSlots {
    /// Slots `[first, end)` of the table, all free.
    pub fn new(first: u32, end: u32) -> ServerSlots {
        ServerSlots { free: (first..end).rev().collect(), first, end }
    }

    pub fn take(&mut self) -> Option<ServerSlot> {
        self.free.pop().map(ServerSlot::new)
    }

    pub fn is_empty(&self) -> bool {
        self.free.is_empty()
    }

    pub fn len(&self) -> usize {
        self.free.len()
    }

    /// Whether `index` is one of ours (a close completion for it gives it back).
    pub fn owns(&self, index: u32) -> bool {
        (self.first..self.end).contains(&index)
    }

    /// A close of server slot `index` completed: the number is free again.
    pub(in crate::worker) fn closed(&mut self, index: u32) {
        debug_assert!(self.owns(index) && !self.free.contains(&index));
        self.free.push(index);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_optional_slot_costs_nothing() {
        assert_eq!(std::mem::size_of::<Option<ClientSlot>>(), 4);
        assert_eq!(std::mem::size_of::<Option<ServerSlot>>(), 4);
    }

    #[test]
    fn server_slots_come_back_only_by_a_close() {
        let mut s = ServerSlots::new(10, 12);
        let a = s.take().unwrap();
        let b = s.take().unwrap();
        assert!(s.take().is_none());
        assert_eq!((a.index(), b.index()), (10, 11));
        assert!(s.owns(11) && !s.owns(12) && !s.owns(9));
        s.closed(a.into_index());
        s.closed(b.into_index());
        assert_eq!(s.len(), 2);
    }
}
