//! The device arena: one fixed host mapping and the allocation table inside it.
//!
//! Device address == host address in the server process, so a device pointer can be dereferenced directly once it
//! has been checked against the table. The table is the emulated device's page table: an access must lie inside one
//! live allocation, everything else is an illegal address (like unmapped pages on a GPU), even though the host mapping
//! itself spans the whole arena.
//!
//! Placement is the shared [`RangeAllocator`] (first fit, 256-byte granularity as cuMemAlloc guarantees, coalescing
//! on free, exact placement for restore), the same bookkeeping the cuda backend uses for its VMM arena. Freed ranges of 64 KiB or more are handed back to the
//! OS with `MADV_DONTNEED`, so RSS follows what is allocated. Contents of a new allocation are unspecified, as with
//! cuMemAlloc: never-touched or released pages read as zero, a reused small block keeps its old bytes.

use crate::backend::arena::RangeAllocator;
use crate::protocol::CuError;
use parking_lot::RwLock;
use std::sync::Arc;

/// Granularity and minimum alignment of allocations.
pub const ALLOC_ALIGN: u64 = 256;
/// Freed ranges at least this large are returned to the OS.
const RELEASE_MIN: u64 = 64 << 10;

/// A sorted list of live `(start, end)` ranges, taken once per kernel launch so the interpreter's address checks
/// do not touch the lock.
pub type Snapshot = Arc<Vec<(u64, u64)>>;

struct Table {
    ranges: RangeAllocator,
    snapshot: Option<Snapshot>,
}

/// The fixed mapping and its allocator.
pub struct Arena {
    base: u64,
    /// The mapping's size: the arena's address space.
    size: u64,
    /// The device's memory: what live allocations may hold in all.
    memory: u64,
    page: u64,
    table: RwLock<Table>,
}

fn round_up(v: u64, a: u64) -> Option<u64> {
    Some(v.checked_add(a - 1)? / a * a)
}

impl Arena {
    /// Maps `size` bytes of address space at exactly `base` (sparse, no swap reservation), of which allocations may
    /// hold `memory` bytes in all. Fails, never relocates, if the address range is taken or refused.
    pub fn map(base: u64, size: u64, memory: u64) -> Result<Arena, String> {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        let page = if page > 0 { page as u64 } else { 4096 };
        if size == 0 || size % page != 0 || base % page != 0 {
            return Err(format!(
                "arena of {size} bytes at {base:#x} is not page-aligned"
            ));
        }
        let flags = libc::MAP_PRIVATE
            | libc::MAP_ANONYMOUS
            | libc::MAP_NORESERVE
            | libc::MAP_FIXED_NOREPLACE;
        // SAFETY: MAP_FIXED_NOREPLACE never replaces an existing mapping: the kernel either maps fresh anonymous
        // memory at `base` or fails; no Rust object refers to that range before this call.
        let p = unsafe {
            libc::mmap(
                base as *mut libc::c_void,
                size as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            let err = std::io::Error::last_os_error();
            return Err(format!(
                "cannot map the emulated device arena ({size} bytes) at the fixed address {base:#x}: {err}. \
                 The range is taken (another emulated device in this process?) or refused by the kernel; \
                 device pointers must be stable, so the arena is never relocated"
            ));
        }
        if p as u64 != base {
            // Old kernels ignore MAP_FIXED_NOREPLACE and treat the address as a hint.
            // SAFETY: `p` is the mapping just created, of `size` bytes, and nothing refers to it.
            unsafe { libc::munmap(p, size as usize) };
            return Err(format!(
                "the kernel placed the emulated device arena at {:#x} instead of {base:#x} \
                 (MAP_FIXED_NOREPLACE unsupported?); device pointers must be stable, refusing to relocate",
                p as u64
            ));
        }
        let mut ranges = RangeAllocator::new(base, size, ALLOC_ALIGN);
        ranges.set_limit(memory.min(size));
        Ok(Arena {
            base,
            size,
            memory: memory.min(size),
            page,
            table: RwLock::new(Table {
                ranges,
                snapshot: None,
            }),
        })
    }

    /// (free, total) bytes of memory.
    pub fn info(&self) -> (u64, u64) {
        (self.table.read().ranges.free_bytes(), self.memory)
    }

    /// First-fit allocation of `bytes` aligned to `align` (at least `ALLOC_ALIGN`).
    pub fn alloc(&self, bytes: u64, align: u64) -> Result<u64, CuError> {
        if bytes == 0 {
            return Err(CuError::INVALID_VALUE);
        }
        let align = align
            .max(ALLOC_ALIGN)
            .checked_next_power_of_two()
            .ok_or(CuError::INVALID_VALUE)?;
        let mut t = self.table.write();
        let at = t
            .ranges
            .alloc_aligned(bytes, align)
            .ok_or(CuError::OUT_OF_MEMORY)?;
        t.snapshot = None;
        Ok(at)
    }

    /// Allocates exactly `[addr, addr + bytes)`; fails if any of it is taken or outside the arena (INVALID_VALUE),
    /// or the memory is used up (OUT_OF_MEMORY).
    pub fn alloc_at(&self, addr: u64, bytes: u64) -> Result<(), CuError> {
        let mut t = self.table.write();
        if !t.ranges.fits_limit(bytes) {
            return Err(CuError::OUT_OF_MEMORY);
        }
        if !t.ranges.alloc_at(addr, bytes) {
            return Err(CuError::INVALID_VALUE);
        }
        t.snapshot = None;
        Ok(())
    }

    /// Reserves address space (see [`crate::backend::Backend::mem_reserve`]).
    pub fn reserve(&self, bytes: u64, align: u64) -> Result<u64, CuError> {
        if bytes == 0 {
            return Err(CuError::INVALID_VALUE);
        }
        let align = align
            .max(ALLOC_ALIGN)
            .checked_next_power_of_two()
            .ok_or(CuError::INVALID_VALUE)?;
        self.table
            .write()
            .ranges
            .reserve(bytes, align)
            .ok_or(CuError::OUT_OF_MEMORY)
    }

    /// Reserves exactly `[addr, addr + bytes)` (restore); INVALID_VALUE if any of it is taken.
    pub fn reserve_at(&self, addr: u64, bytes: u64) -> Result<(), CuError> {
        if bytes == 0 || !self.table.write().ranges.reserve_at(addr, bytes) {
            return Err(CuError::INVALID_VALUE);
        }
        Ok(())
    }

    /// Gives a reservation back; INVALID_VALUE if none starts at `addr` or memory is still allocated inside it.
    pub fn unreserve(&self, addr: u64) -> Result<(), CuError> {
        self.table
            .write()
            .ranges
            .unreserve(addr)
            .map(|_| ())
            .ok_or(CuError::INVALID_VALUE)
    }

    /// Frees the allocation starting at `addr`; returns its size. Large ranges go back to the OS.
    pub fn free(&self, addr: u64) -> Result<u64, CuError> {
        let mut t = self.table.write();
        let len = t.ranges.free(addr).ok_or(CuError::INVALID_VALUE)?;
        t.snapshot = None;
        if len >= RELEASE_MIN {
            let lo = round_up(addr, self.page).unwrap_or(u64::MAX);
            let hi = (addr + len) / self.page * self.page;
            if lo < hi {
                // SAFETY: [lo, hi) lies inside the arena mapping and inside a range that was just freed, so no
                // enqueued operation or allocation refers to it (the caller synchronized the device first); dropping
                // the pages of a private anonymous mapping only makes them read as zero.
                unsafe {
                    libc::madvise(
                        lo as *mut libc::c_void,
                        (hi - lo) as usize,
                        libc::MADV_DONTNEED,
                    )
                };
            }
        }
        Ok(len)
    }

    /// The live allocation `(start, bytes)` containing `addr`.
    pub fn find(&self, addr: u64) -> Option<(u64, u64)> {
        self.table.read().ranges.find(addr, 1)
    }

    /// Whether `[addr, addr + len)` lies inside live allocations placed back to back (usually one; see
    /// [`RangeAllocator::covers`](crate::backend::arena::RangeAllocator::covers)); `len` 0 counts as 1 byte.
    pub fn check(&self, addr: u64, len: u64) -> bool {
        self.table.read().ranges.covers(addr, len)
    }

    /// Like [`Arena::check`] but an error for the API.
    pub fn check_range(&self, addr: u64, len: u64) -> Result<(), CuError> {
        if self.check(addr, len) {
            Ok(())
        } else {
            Err(CuError::INVALID_VALUE)
        }
    }

    /// The live allocations, sorted, shared until the table next changes.
    pub fn snapshot(&self) -> Snapshot {
        if let Some(s) = self.table.read().snapshot.clone() {
            return s;
        }
        let mut t = self.table.write();
        let s: Snapshot = Arc::new(t.ranges.iter().map(|(s, l)| (s, s + l)).collect());
        t.snapshot = Some(s.clone());
        s
    }

    /// Number of live allocations (tests, diagnostics).
    #[cfg(test)]
    pub fn live_count(&self) -> usize {
        self.table.read().ranges.len()
    }
}

/// Whether `[addr, addr + len)` lies inside one range of a snapshot.
pub fn snapshot_contains(snap: &[(u64, u64)], addr: u64, len: u64) -> bool {
    let i = snap.partition_point(|&(s, _)| s <= addr);
    if i == 0 {
        return false;
    }
    let (_, end) = snap[i - 1];
    addr < end && addr.checked_add(len).is_some_and(|e| e <= end)
}

impl Drop for Arena {
    fn drop(&mut self) {
        // SAFETY: the mapping was created by `map` with exactly this base and size; the backend drops the arena
        // only after its stream workers have stopped, so nothing uses it any more.
        unsafe { libc::munmap(self.base as *mut libc::c_void, self.size as usize) };
    }
}
