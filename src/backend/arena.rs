//! Address-range bookkeeping for the fixed device arena, shared by both backends.
//!
//! [`RangeAllocator`] manages `[base, base + size)`: first-fit placement with a per-call alignment (never below
//! [`MIN_ALIGN`], CUDA's allocation alignment), coalescing of freed ranges, exact placement for restore
//! ([`RangeAllocator::alloc_at`]) and the containment check copies need ([`RangeAllocator::find`]). It is pure logic:
//! no memory is touched, so the same placement decisions can be replayed in another process (restore re-creates
//! exactly the same addresses with `alloc_at`).
//!
//! The range is address space; what live allocations may hold in all is a separate *limit* (the device's memory,
//! [`RangeAllocator::set_limit`], by default the whole range): reservations take address space only, allocations
//! (also those placed inside reservations) count against the limit.
//!
//! Every size is rounded up to the allocator's alignment; the rounded size is what [`RangeAllocator::size_of`] and
//! [`RangeAllocator::free`] report. Lookups are `O(log n)` (two `BTreeMap`s: live allocations by address, free
//! ranges by address); first-fit placement scans the free ranges in address order.

use std::collections::BTreeMap;

/// The minimum alignment of every allocation (what cuMemAlloc guarantees).
pub const MIN_ALIGN: u64 = 256;

/// First-fit allocator over an address range. Not thread-safe by itself: the owner wraps it in a lock.
#[derive(Clone, Debug)]
pub struct RangeAllocator {
    base: u64,
    size: u64,
    align: u64,
    /// Live allocations: start -> rounded size.
    live: BTreeMap<u64, u64>,
    /// Free ranges, coalesced (no two adjacent): start -> length.
    free: BTreeMap<u64, u64>,
    used: u64,
    /// Most bytes live allocations may hold in all (the device's memory); by default the whole range.
    limit: u64,
    /// Reserved ranges (cuMemAddressReserve): out of `free`, not counted in `used`; live allocations may be placed
    /// inside one only with [`RangeAllocator::alloc_at`], and freeing them leaves the range reserved.
    reserved: BTreeMap<u64, u64>,
}

fn round_up(x: u64, align: u64) -> Option<u64> {
    debug_assert!(align.is_power_of_two());
    x.checked_add(align - 1).map(|v| v & !(align - 1))
}

impl RangeAllocator {
    /// An allocator over `[base, base + size)`. `align` is raised to [`MIN_ALIGN`] and must be a power of two;
    /// `base` and `size` are trimmed inwards to it.
    pub fn new(base: u64, size: u64, align: u64) -> Self {
        let align = align.max(MIN_ALIGN);
        assert!(
            align.is_power_of_two(),
            "alignment {align} is not a power of two"
        );
        let start = round_up(base, align).expect("arena base overflows");
        let end = base.checked_add(size).expect("arena end overflows") & !(align - 1);
        let size = end.saturating_sub(start);
        let mut free = BTreeMap::new();
        if size > 0 {
            free.insert(start, size);
        }
        RangeAllocator {
            base: start,
            size,
            align,
            live: BTreeMap::new(),
            free,
            used: 0,
            limit: size,
            reserved: BTreeMap::new(),
        }
    }

    pub fn base(&self) -> u64 {
        self.base
    }
    pub fn size(&self) -> u64 {
        self.size
    }
    pub fn end(&self) -> u64 {
        self.base + self.size
    }
    pub fn align(&self) -> u64 {
        self.align
    }
    /// Bytes held by live allocations (rounded sizes).
    pub fn used(&self) -> u64 {
        self.used
    }
    /// Bytes live allocations may still take (the limit less what they hold).
    pub fn free_bytes(&self) -> u64 {
        self.limit.saturating_sub(self.used)
    }
    /// Caps what live allocations may hold in all (the device's memory), below the address range's size.
    pub fn set_limit(&mut self, limit: u64) {
        self.limit = limit;
    }
    pub fn limit(&self) -> u64 {
        self.limit
    }
    /// Whether `size` more bytes (already rounded) stay within the limit.
    fn fits(&self, size: u64) -> bool {
        self.used.checked_add(size).is_some_and(|u| u <= self.limit)
    }
    /// Whether an allocation of `bytes` (rounded) would stay within the limit, wherever it is placed.
    pub fn fits_limit(&self, bytes: u64) -> bool {
        self.rounded(bytes).is_some_and(|size| self.fits(size))
    }
    /// Number of live allocations.
    pub fn len(&self) -> usize {
        self.live.len()
    }
    pub fn is_empty(&self) -> bool {
        self.live.is_empty()
    }
    /// `bytes` rounded up to the allocator's alignment (`None` on overflow).
    pub fn rounded(&self, bytes: u64) -> Option<u64> {
        round_up(bytes, self.align)
    }

    /// First-fit allocation aligned to the allocator's alignment. `None` for 0 bytes or when nothing fits.
    pub fn alloc(&mut self, bytes: u64) -> Option<u64> {
        self.alloc_aligned(bytes, self.align)
    }

    /// First-fit allocation at an address aligned to `align` (a power of two; raised to the allocator's alignment).
    pub fn alloc_aligned(&mut self, bytes: u64, align: u64) -> Option<u64> {
        self.alloc_within(bytes, align, self.base, self.end())
    }

    /// First-fit allocation inside `[lo, hi)`; `None` also past the limit.
    pub fn alloc_within(&mut self, bytes: u64, align: u64, lo: u64, hi: u64) -> Option<u64> {
        let size = self.rounded(bytes)?;
        if !self.fits(size) {
            return None;
        }
        let addr = self.find_free(size, align, lo, hi)?;
        self.take(addr, size);
        self.live.insert(addr, size);
        self.used += size;
        Some(addr)
    }

    /// The first address in `[lo, hi)` aligned to `align` where `bytes` (rounded) are free; allocates nothing.
    pub fn find_free(&self, bytes: u64, align: u64, lo: u64, hi: u64) -> Option<u64> {
        let size = self.rounded(bytes)?;
        if size == 0 {
            return None;
        }
        let align = align.max(self.align);
        if !align.is_power_of_two() {
            return None;
        }
        let lo = lo.max(self.base);
        let hi = hi.min(self.end());
        if lo >= hi {
            return None;
        }
        // A free range starting before `lo` may still cover it.
        let before = self.free.range(..lo).next_back().map(|(&s, &l)| (s, l));
        let candidates = before
            .into_iter()
            .chain(self.free.range(lo..hi).map(|(&s, &l)| (s, l)));
        for (s, l) in candidates {
            let Some(start) = round_up(s.max(lo), align) else {
                continue;
            };
            let end = (s + l).min(hi);
            if start < end && end - start >= size {
                return Some(start);
            }
        }
        None
    }

    /// Allocates exactly `[addr, addr + bytes)` (rounded); `false` if `addr` is misaligned, outside the range, any
    /// of it is taken, or it would pass the limit.
    pub fn alloc_at(&mut self, addr: u64, bytes: u64) -> bool {
        let Some(size) = self.rounded(bytes) else {
            return false;
        };
        if size == 0 || addr % self.align != 0 || addr < self.base || !self.fits(size) {
            return false;
        }
        match addr.checked_add(size) {
            Some(end) if end <= self.end() => {}
            _ => return false,
        }
        if self.reservation_of(addr, size).is_some() {
            if !self.no_live_in(addr, size) {
                return false;
            }
            self.live.insert(addr, size);
            self.used += size;
            return true;
        }
        match self.free.range(..=addr).next_back() {
            Some((&s, &l)) if s + l >= addr + size => {}
            _ => return false,
        }
        self.take(addr, size);
        self.live.insert(addr, size);
        self.used += size;
        true
    }

    /// Removes `[addr, addr + size)` from the free ranges; the caller checked that one free range covers it.
    fn take(&mut self, addr: u64, size: u64) {
        let (&s, &l) = self.free.range(..=addr).next_back().expect("range is free");
        debug_assert!(s + l >= addr + size);
        self.free.remove(&s);
        if addr > s {
            self.free.insert(s, addr - s);
        }
        let tail = s + l - (addr + size);
        if tail > 0 {
            self.free.insert(addr + size, tail);
        }
    }

    /// Whether [`RangeAllocator::alloc_at`] would succeed for `[addr, addr + bytes)` (allocates nothing).
    pub fn can_place_at(&self, addr: u64, bytes: u64) -> bool {
        let Some(size) = self.rounded(bytes) else {
            return false;
        };
        if size == 0 || addr % self.align != 0 || addr < self.base || !self.fits(size) {
            return false;
        }
        match addr.checked_add(size) {
            Some(end) if end <= self.end() => {}
            _ => return false,
        }
        if self.reservation_of(addr, size).is_some() {
            return self.no_live_in(addr, size);
        }
        matches!(self.free.range(..=addr).next_back(), Some((&s, &l)) if s + l >= addr + size)
    }

    /// Whether no live allocation overlaps `[addr, addr + size)`.
    fn no_live_in(&self, addr: u64, size: u64) -> bool {
        let end = addr + size;
        let before = self
            .live
            .range(..addr)
            .next_back()
            .is_some_and(|(&b, &s)| b + s > addr);
        !before && self.live.range(addr..end).next().is_none()
    }

    /// Reserves `bytes` (rounded) of address space aligned to `align`, first fit: nothing is allocated, the range
    /// only stops being handed out by the first-fit calls. `None` when nothing fits.
    pub fn reserve(&mut self, bytes: u64, align: u64) -> Option<u64> {
        let size = self.rounded(bytes)?;
        let addr = self.find_free(size, align, self.base, self.end())?;
        self.take(addr, size);
        self.reserved.insert(addr, size);
        Some(addr)
    }

    /// Reserves exactly `[addr, addr + bytes)` (rounded; restore puts a saved reservation back where it was); `false`
    /// if `addr` is misaligned, outside the range, or any of it is taken or reserved.
    pub fn reserve_at(&mut self, addr: u64, bytes: u64) -> bool {
        let Some(size) = self.rounded(bytes) else {
            return false;
        };
        if size == 0 || addr % self.align != 0 || addr < self.base {
            return false;
        }
        match addr.checked_add(size) {
            Some(end) if end <= self.end() => {}
            _ => return false,
        }
        match self.free.range(..=addr).next_back() {
            Some((&s, &l)) if s + l >= addr + size => {}
            _ => return false,
        }
        self.take(addr, size);
        self.reserved.insert(addr, size);
        true
    }

    /// The reservation `(start, size)` that contains all of `[addr, addr + len)`.
    pub fn reservation_of(&self, addr: u64, len: u64) -> Option<(u64, u64)> {
        let (&b, &s) = self.reserved.range(..=addr).next_back()?;
        let end = addr.checked_add(len.max(1))?;
        (end <= b + s).then_some((b, s))
    }

    /// Gives a reservation starting at `addr` back; its size, or `None` if no reservation starts there or a live
    /// allocation still lies inside it.
    pub fn unreserve(&mut self, addr: u64) -> Option<u64> {
        let size = *self.reserved.get(&addr)?;
        if !self.no_live_in(addr, size) {
            return None;
        }
        self.reserved.remove(&addr);
        self.give_back(addr, size);
        Some(size)
    }

    /// Reserved ranges `(start, size)` in address order.
    pub fn reservations(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.reserved.iter().map(|(&a, &s)| (a, s))
    }

    /// Frees the allocation starting at `addr`; returns its (rounded) size, `None` if no allocation starts there.
    /// An allocation inside a reservation leaves its range reserved.
    pub fn free(&mut self, addr: u64) -> Option<u64> {
        let size = self.live.remove(&addr)?;
        self.used -= size;
        if self.reservation_of(addr, size).is_none() {
            self.give_back(addr, size);
        }
        Some(size)
    }

    /// Returns `[addr, addr + size)` to the free ranges, coalescing.
    fn give_back(&mut self, addr: u64, size: u64) {
        let mut start = addr;
        let mut len = size;
        if let Some((&ps, &pl)) = self.free.range(..addr).next_back() {
            if ps + pl == addr {
                self.free.remove(&ps);
                start = ps;
                len += pl;
            }
        }
        if let Some(nl) = self.free.remove(&(addr + size)) {
            len += nl;
        }
        self.free.insert(start, len);
    }

    /// The (rounded) size of the allocation starting at `addr`.
    pub fn size_of(&self, addr: u64) -> Option<u64> {
        self.live.get(&addr).copied()
    }

    /// The live allocation `(base, size)` that contains all of `[addr, addr + len)` (`len` 0 counts as 1 byte).
    pub fn find(&self, addr: u64, len: u64) -> Option<(u64, u64)> {
        let (&b, &s) = self.live.range(..=addr).next_back()?;
        let end = addr.checked_add(len.max(1))?;
        (end <= b + s).then_some((b, s))
    }

    /// Whether `[addr, addr + len)` (`len` 0 counts as 1 byte) lies inside one live allocation, or, inside one
    /// reservation, inside mappings that follow each other without a gap: a copy may run across mappings placed back
    /// to back, as on a GPU, where PyTorch's expandable segments put one tensor across two of them. Ordinary
    /// allocations that happen to be adjacent do not count (a copy past one's end is an error).
    pub fn covers(&self, addr: u64, len: u64) -> bool {
        let Some(end) = addr.checked_add(len.max(1)) else {
            return false;
        };
        let Some((&b, &s)) = self.live.range(..=addr).next_back() else {
            return false;
        };
        let mut reached = b + s;
        if reached <= addr {
            return false;
        }
        if reached < end && self.reservation_of(addr, end - addr).is_none() {
            return false;
        }
        for (&b, &s) in self.live.range(reached..) {
            if reached >= end || b != reached {
                break;
            }
            reached = b + s;
        }
        reached >= end
    }

    /// Live allocations `(base, size)` in address order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.live.iter().map(|(&a, &s)| (a, s))
    }

    /// Free ranges `(start, len)` in address order.
    pub fn free_ranges(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.free.iter().map(|(&a, &s)| (a, s))
    }

    /// Checks the internal invariants (tests and debug assertions).
    pub fn check_invariants(&self) {
        let mut spans: Vec<(u64, u64, bool)> = self
            .live
            .iter()
            .filter(|(&a, &s)| self.reservation_of(a, s).is_none())
            .map(|(&a, &s)| (a, s, true))
            .collect();
        // A reservation tiles like a live range; the allocations inside it are checked against it.
        spans.extend(self.reserved.iter().map(|(&a, &s)| (a, s, true)));
        spans.extend(self.free.iter().map(|(&a, &s)| (a, s, false)));
        spans.sort();
        let mut cursor = self.base;
        let mut prev_free = false;
        let mut used = 0;
        for (a, s, live) in spans {
            assert_eq!(
                a, cursor,
                "ranges must tile the arena without gaps or overlaps"
            );
            assert!(s > 0 && s % self.align == 0);
            assert!(!prev_free || live, "adjacent free ranges must be coalesced");
            if live && !self.reserved.contains_key(&a) {
                used += s;
            }
            prev_free = !live;
            cursor = a + s;
        }
        assert_eq!(cursor, self.end());
        for (&a, &s) in self.live.iter() {
            if self.reservation_of(a, s).is_some() {
                used += s;
            }
        }
        assert_eq!(used, self.used);
        assert!(self.used <= self.limit, "live allocations exceed the limit");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const B: u64 = 0x7e00_0000_0000;

    #[test]
    fn basic_first_fit_and_coalescing() {
        let mut a = RangeAllocator::new(B, 4096, 256);
        assert_eq!(a.alloc(0), None);
        let x = a.alloc(1).unwrap();
        let y = a.alloc(300).unwrap();
        let z = a.alloc(256).unwrap();
        assert_eq!((x, y, z), (B, B + 256, B + 768));
        assert_eq!(a.used(), 1024);
        assert_eq!(a.size_of(y), Some(512));
        assert_eq!(a.free(y), Some(512));
        assert_eq!(a.free(y), None);
        a.check_invariants();
        // First fit reuses the hole.
        assert_eq!(a.alloc(200), Some(B + 256));
        assert_eq!(a.alloc(256), Some(B + 512));
        a.free(x);
        a.free(B + 256);
        a.free(B + 512);
        a.free(z);
        a.check_invariants();
        assert_eq!(a.free_ranges().collect::<Vec<_>>(), vec![(B, 4096)]);
        assert_eq!(a.alloc(4096), Some(B));
        assert_eq!(a.alloc(1), None);
    }

    #[test]
    fn covers_spans_back_to_back_allocations_only() {
        let mut a = RangeAllocator::new(B, 1 << 20, 256);
        let r = a.reserve(4096, 256).unwrap();
        assert!(a.alloc_at(r, 1024) && a.alloc_at(r + 1024, 1024));
        assert!(a.covers(r, 2048), "two mappings back to back");
        assert!(a.covers(r + 1000, 100) && a.covers(r + 2047, 1));
        assert!(!a.covers(r, 2049), "past the second mapping");
        assert!(a.alloc_at(r + 3072, 1024));
        assert!(!a.covers(r + 1024, 3072), "a gap between mappings");
        assert!(!a.covers(r + 2048, 1), "nothing there");
        assert!(!a.covers(u64::MAX - 1, 4));
        // Ordinary allocations next to each other are not one range.
        let p = a.alloc(256).unwrap();
        let q = a.alloc(256).unwrap();
        assert_eq!(q, p + 256);
        assert!(a.covers(p, 256) && !a.covers(p, 257));
    }

    #[test]
    fn reserve_at_places_a_reservation_exactly() {
        let mut a = RangeAllocator::new(B, 1 << 20, 256);
        let p = a.alloc(4096).unwrap();
        assert!(!a.reserve_at(p, 256), "taken");
        assert!(!a.reserve_at(B + 8192 + 1, 256), "misaligned");
        assert!(a.reserve_at(B + 8192, 8192));
        assert_eq!(a.reservation_of(B + 9000, 10), Some((B + 8192, 8192)));
        assert!(!a.reserve_at(B + 12288, 256), "inside the reservation");
        assert_eq!(a.unreserve(B + 8192), Some(8192));
        a.check_invariants();
    }

    #[test]
    fn aligned_and_within() {
        let mut a = RangeAllocator::new(B, 1 << 24, 256);
        assert_eq!(a.alloc(256), Some(B));
        let big = a.alloc_aligned(3 << 20, 2 << 20).unwrap();
        assert_eq!(big, B + (2 << 20));
        assert_eq!(a.size_of(big), Some(3 << 20));
        // Within a window: first fit inside it only.
        let w = a
            .alloc_within(512, 256, B + (1 << 20), B + (2 << 20))
            .unwrap();
        assert_eq!(w, B + (1 << 20));
        assert_eq!(a.alloc_within(2 << 20, 256, B, B + (2 << 20)), None);
        assert_eq!(
            a.find_free(1 << 20, 1 << 20, B, a.end()),
            Some(B + (5 << 20))
        );
        a.check_invariants();
    }

    #[test]
    fn reservations_hold_address_space_until_given_back() {
        let mut a = RangeAllocator::new(B, 1 << 30, 256);
        let r = a.reserve(8 << 20, 2 << 20).unwrap();
        assert_eq!(r % (2 << 20), 0);
        assert_eq!(a.used(), 0, "a reservation commits nothing");
        a.check_invariants();
        // First fit skips the reservation.
        let x = a.alloc(16 << 20).unwrap();
        assert!(x >= r + (8 << 20) || x + (16 << 20) <= r);
        // Mapping inside it: exact placement only, no overlap.
        assert!(a.can_place_at(r + (2 << 20), 2 << 20));
        assert!(a.alloc_at(r + (2 << 20), 2 << 20));
        assert!(!a.alloc_at(r + (2 << 20), 2 << 20));
        assert!(
            !a.alloc_at(r + (6 << 20), 4 << 20),
            "must not cross the reservation's end"
        );
        assert!(a.alloc_at(r, 2 << 20));
        assert_eq!(a.used(), (16 << 20) + (4 << 20));
        a.check_invariants();
        assert_eq!(a.unreserve(r), None, "still mapped");
        assert_eq!(a.free(r + (2 << 20)), Some(2 << 20));
        assert_eq!(a.free(r), Some(2 << 20));
        assert_eq!(
            a.reservation_of(r, 8 << 20),
            Some((r, 8 << 20)),
            "unmapping keeps the reservation"
        );
        a.check_invariants();
        assert_eq!(a.unreserve(r), Some(8 << 20));
        assert_eq!(a.unreserve(r), None);
        a.free(x);
        a.check_invariants();
        assert_eq!(a.free_ranges().count(), 1, "everything coalesced back");
    }

    #[test]
    fn the_limit_caps_allocations_not_reservations() {
        // 1 MiB of memory in 4 MiB of address space.
        let mut a = RangeAllocator::new(B, 4 << 20, 256);
        a.set_limit(1 << 20);
        assert_eq!(a.free_bytes(), 1 << 20);
        let r = a.reserve(3 << 20, 1 << 20).unwrap();
        assert_eq!(a.free_bytes(), 1 << 20, "a reservation takes no memory");
        let x = a.alloc(512 << 10).unwrap();
        assert!(
            a.alloc(768 << 10).is_none(),
            "past the limit, though address space is free"
        );
        assert!(!a.can_place_at(r, 768 << 10));
        assert!(
            !a.alloc_at(r, 768 << 10),
            "mapping inside a reservation counts too"
        );
        assert!(a.alloc_at(r + (2 << 20), 512 << 10));
        assert_eq!(a.free_bytes(), 0);
        assert!(!a.fits_limit(1));
        a.check_invariants();
        a.free(x);
        assert!(a.fits_limit(512 << 10));
        assert!(a.alloc(512 << 10).is_some());
        a.check_invariants();
    }

    #[test]
    fn alloc_at_rules() {
        let mut a = RangeAllocator::new(B, 1 << 20, 256);
        assert!(!a.alloc_at(B + 100, 256), "misaligned");
        assert!(!a.alloc_at(B - 256, 256), "below");
        assert!(!a.alloc_at(B + (1 << 20) - 256, 512), "past the end");
        assert!(!a.alloc_at(B, 0));
        assert!(a.alloc_at(B + 1024, 1000));
        assert_eq!(a.size_of(B + 1024), Some(1024));
        assert!(!a.alloc_at(B + 512, 1024), "overlaps the start");
        assert!(!a.alloc_at(B + 1792, 256), "inside");
        assert!(a.alloc_at(B + 512, 512), "adjacent below");
        assert!(a.alloc_at(B + 2048, 256), "adjacent above");
        a.check_invariants();
        assert_eq!(a.alloc(256), Some(B));
    }

    #[test]
    fn find_containment() {
        let mut a = RangeAllocator::new(B, 1 << 20, 256);
        let x = a.alloc(1000).unwrap();
        let y = a.alloc(256).unwrap();
        assert_eq!(a.find(x, 1024), Some((x, 1024)));
        assert_eq!(a.find(x + 10, 10), Some((x, 1024)));
        assert_eq!(a.find(x + 1000, 24), Some((x, 1024)));
        assert_eq!(a.find(x + 1000, 25), None);
        assert_eq!(a.find(x + 1000, 100), None, "runs into the next allocation");
        assert_eq!(a.find(y, 0), Some((y, 256)));
        assert_eq!(a.find(y + 256, 1), None);
        assert_eq!(a.find(B - 1, 1), None);
        assert_eq!(a.find(u64::MAX, 2), None);
        assert_eq!(a.iter().collect::<Vec<_>>(), vec![(x, 1024), (y, 256)]);
    }

    #[test]
    fn unaligned_bounds_are_trimmed() {
        let a = RangeAllocator::new(B + 1, 4096, 256);
        assert_eq!(a.base(), B + 256);
        assert_eq!(a.end(), B + 4096);
        a.check_invariants();
        let e = RangeAllocator::new(B, 100, 256);
        assert_eq!(e.size(), 0);
        e.check_invariants();
    }

    /// A simple model: a unit bitmap.
    struct Model {
        units: Vec<Option<u64>>, // owner start unit
    }

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    impl Model {
        fn first_fit(&self, units: usize, align_units: usize) -> Option<usize> {
            let mut s = 0;
            while s + units <= self.units.len() {
                if self.units[s..s + units].iter().all(|u| u.is_none()) {
                    return Some(s);
                }
                s += align_units;
            }
            None
        }
        fn is_free(&self, s: usize, n: usize) -> bool {
            s + n <= self.units.len() && self.units[s..s + n].iter().all(|u| u.is_none())
        }
        fn set(&mut self, s: usize, n: usize, v: Option<u64>) {
            for u in &mut self.units[s..s + n] {
                *u = v;
            }
        }
    }

    #[test]
    fn randomized_against_model() {
        const UNITS: usize = 128;
        for seed in 1..40u64 {
            let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
            let mut a = RangeAllocator::new(B, UNITS as u64 * 256, 256);
            let mut m = Model {
                units: vec![None; UNITS],
            };
            let mut live: Vec<(u64, u64)> = Vec::new();
            for _ in 0..600 {
                match rng.below(4) {
                    0 | 1 => {
                        let bytes = 1 + rng.below(12 * 256);
                        let align_units = 1usize << rng.below(4);
                        let units = bytes.div_ceil(256) as usize;
                        let want = m.first_fit(units, align_units);
                        let got = a.alloc_aligned(bytes, align_units as u64 * 256);
                        assert_eq!(got, want.map(|s| B + s as u64 * 256), "seed {seed}");
                        if let Some(s) = want {
                            m.set(s, units, Some(s as u64));
                            live.push((B + s as u64 * 256, units as u64 * 256));
                        }
                    }
                    2 => {
                        let s = rng.below(UNITS as u64) as usize;
                        let n = 1 + rng.below(6) as usize;
                        let want = m.is_free(s, n);
                        let got = a.alloc_at(B + s as u64 * 256, n as u64 * 256 - rng.below(256));
                        assert_eq!(got, want, "seed {seed}");
                        if want {
                            m.set(s, n, Some(s as u64));
                            live.push((B + s as u64 * 256, n as u64 * 256));
                        }
                    }
                    _ => {
                        if live.is_empty() {
                            continue;
                        }
                        let i = rng.below(live.len() as u64) as usize;
                        let (addr, size) = live.swap_remove(i);
                        assert_eq!(a.free(addr), Some(size));
                        let s = ((addr - B) / 256) as usize;
                        m.set(s, (size / 256) as usize, None);
                    }
                }
                a.check_invariants();
                assert_eq!(a.len(), live.len());
                // Containment agrees with the model for a random probe.
                let p = rng.below(UNITS as u64) as usize;
                let len = 1 + rng.below(512);
                let got = a.find(B + p as u64 * 256 + 7, len);
                let want = m.units[p].and_then(|owner| {
                    let (base, size) = *live.iter().find(|(b, _)| *b == B + owner * 256)?;
                    (B + p as u64 * 256 + 7 + len <= base + size).then_some((base, size))
                });
                assert_eq!(got, want, "seed {seed}");
            }
        }
    }
}
