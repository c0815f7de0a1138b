//! The device arena on the VMM API: address placement plus physical-memory chunks.
//!
//! One [`RangeAllocator`] (256-byte alignment) over the reserved arena decides every address. Physical memory is
//! mapped in *chunks*: granularity-aligned ranges, each backed by one `cuMemCreate` handle (a handle can only be
//! unmapped whole). A chunk counts the live allocations touching it and is unmapped and released when the last goes.
//!
//! Placement policy (`alloc`):
//! - `bytes >= granularity` (large): its own chunk, rounded up to the granularity and granularity-aligned; the
//!   allocation's recorded size is the rounded one, so nothing else ever shares its chunk.
//! - smaller: first fit inside an existing *slab* (a one-granule chunk made for small allocations); else a new slab
//!   at the first free granularity-aligned granule.
//!
//! Restore (`alloc_at`) re-creates exactly the same addresses from (addr, bytes) alone, in any order: it records the
//! 256-rounded size (never the granularity-rounded one, so a packed foreign layout cannot collide with a rounded
//! tail), and whatever granules the range touches that are not mapped yet are mapped as new chunks (one per gap).
//! The tail of a restored large allocation stays unused: `alloc` places small allocations only in slabs and large
//! ones at free granules. Because an allocation may span
//! several chunks (VA-contiguous mappings of different handles are fine for the GPU), any layout — also one made by
//! the emulated backend — can be rebuilt. The chunk structure after restore may differ from the original; only the
//! addresses matter.
//!
//! The logic is generic over [`Mapper`] so it is unit-tested without a GPU.

use crate::backend::arena::RangeAllocator;
use crate::backend::BResult;
use crate::protocol::CuError;
use std::collections::{BTreeMap, BTreeSet};

/// Maps and unmaps physical memory at arena addresses.
pub trait Mapper {
    type Handle;
    /// Backs `[addr, addr + size)` (granularity-aligned) with new physical memory.
    fn map(&mut self, addr: u64, size: u64) -> BResult<Self::Handle>;
    /// Unmaps and releases what `map` created.
    fn unmap(&mut self, addr: u64, size: u64, handle: Self::Handle);
}

struct Chunk<H> {
    size: u64,
    users: u32,
    handle: H,
}

pub struct VmmArena<M: Mapper> {
    gran: u64,
    allocs: RangeAllocator,
    chunks: BTreeMap<u64, Chunk<M::Handle>>,
    /// One-granule chunks that host small allocations.
    slabs: BTreeSet<u64>,
    pub mapper: M,
}

impl<M: Mapper> VmmArena<M> {
    /// An arena over `[base, base + size)`; `gran` is the mapping granularity (a power of two), `base` aligned to it.
    pub fn new(base: u64, size: u64, gran: u64, mapper: M) -> Self {
        assert!(gran.is_power_of_two() && base % gran == 0);
        VmmArena {
            gran,
            allocs: RangeAllocator::new(base, size, 256),
            chunks: BTreeMap::new(),
            slabs: BTreeSet::new(),
            mapper,
        }
    }

    /// Caps what live allocations may hold in all (the device's memory; the arena is address space).
    pub fn set_limit(&mut self, bytes: u64) {
        self.allocs.set_limit(bytes);
    }

    pub fn granularity(&self) -> u64 {
        self.gran
    }
    pub fn allocator(&self) -> &RangeAllocator {
        &self.allocs
    }
    /// Bytes of physical memory mapped.
    pub fn mapped_bytes(&self) -> u64 {
        self.chunks.values().map(|c| c.size).sum()
    }
    /// (addr, size) of each mapped chunk.
    pub fn chunks(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.chunks.iter().map(|(&a, c)| (a, c.size))
    }

    fn is_large(&self, bytes: u64) -> bool {
        bytes >= self.gran
    }

    pub fn alloc(&mut self, bytes: u64) -> BResult<u64> {
        if bytes == 0 {
            return Err(CuError::INVALID_VALUE);
        }
        if !self.allocs.fits_limit(bytes) {
            return Err(CuError::OUT_OF_MEMORY);
        }
        let (lo, hi) = (self.allocs.base(), self.allocs.end());
        if self.is_large(bytes) {
            let size = bytes
                .checked_next_multiple_of(self.gran)
                .ok_or(CuError::OUT_OF_MEMORY)?;
            let addr = self
                .allocs
                .find_free(size, self.gran, lo, hi)
                .ok_or(CuError::OUT_OF_MEMORY)?;
            return self.place(addr, size);
        }
        let size = bytes.next_multiple_of(256);
        let in_slab = self
            .slabs
            .iter()
            .find_map(|&s| self.allocs.find_free(size, 256, s, s + self.gran));
        if let Some(addr) = in_slab {
            return self.place(addr, size);
        }
        let slab = self
            .allocs
            .find_free(self.gran, self.gran, lo, hi)
            .ok_or(CuError::OUT_OF_MEMORY)?;
        let addr = self.place(slab, size)?;
        self.slabs.insert(slab);
        Ok(addr)
    }

    /// Allocates exactly at `addr` (restore). Fails with INVALID_VALUE if any of it is taken or outside the arena.
    pub fn alloc_at(&mut self, addr: u64, bytes: u64) -> BResult<()> {
        if bytes == 0 || addr % 256 != 0 {
            return Err(CuError::INVALID_VALUE);
        }
        let size = bytes
            .checked_next_multiple_of(256)
            .ok_or(CuError::INVALID_VALUE)?;
        if !self.allocs.fits_limit(size) {
            return Err(CuError::OUT_OF_MEMORY);
        }
        if !self.allocs.can_place_at(addr, size) {
            return Err(CuError::INVALID_VALUE);
        }
        self.place(addr, size)?;
        if size < self.gran {
            let g = addr & !(self.gran - 1);
            if self.chunks.get(&g).is_some_and(|c| c.size == self.gran)
                && addr + size <= g + self.gran
            {
                self.slabs.insert(g);
            }
        }
        Ok(())
    }

    /// Reserves granularity-aligned address space (cuMemAddressReserve): maps nothing; `alloc_at` inside it maps
    /// the granules it touches (cuMemMap), `free` unmaps them and leaves the range reserved.
    pub fn reserve(&mut self, bytes: u64, align: u64) -> BResult<u64> {
        if bytes == 0 {
            return Err(CuError::INVALID_VALUE);
        }
        let size = bytes
            .checked_next_multiple_of(self.gran)
            .ok_or(CuError::OUT_OF_MEMORY)?;
        let align = align
            .max(self.gran)
            .checked_next_power_of_two()
            .ok_or(CuError::INVALID_VALUE)?;
        self.allocs
            .reserve(size, align)
            .ok_or(CuError::OUT_OF_MEMORY)
    }

    /// Reserves exactly `[addr, addr + bytes)` (restore); INVALID_VALUE if it is not free or not granule-aligned.
    pub fn reserve_at(&mut self, addr: u64, bytes: u64) -> BResult<()> {
        let size = bytes
            .checked_next_multiple_of(self.gran)
            .ok_or(CuError::INVALID_VALUE)?;
        if bytes == 0 || addr % self.gran != 0 || !self.allocs.reserve_at(addr, size) {
            return Err(CuError::INVALID_VALUE);
        }
        Ok(())
    }

    /// Gives a reservation back; INVALID_VALUE if none starts at `addr` or memory is still mapped inside it.
    pub fn unreserve(&mut self, addr: u64) -> BResult<()> {
        self.allocs
            .unreserve(addr)
            .map(|_| ())
            .ok_or(CuError::INVALID_VALUE)
    }

    /// Records `[addr, addr + size)` (known free) and maps what it touches.
    fn place(&mut self, addr: u64, size: u64) -> BResult<u64> {
        if !self.allocs.alloc_at(addr, size) {
            // Known free, so only the memory limit can refuse it (a large allocation rounded up past it).
            return Err(CuError::OUT_OF_MEMORY);
        }
        if let Err(e) = self.ensure_mapped(addr, size) {
            self.allocs.free(addr);
            return Err(e);
        }
        Ok(addr)
    }

    fn granules(&self, addr: u64, size: u64) -> (u64, u64) {
        let g0 = addr & !(self.gran - 1);
        let g1 = (addr + size).next_multiple_of(self.gran);
        (g0, g1)
    }

    /// Chunks overlapping `[g0, g1)`, in order.
    fn overlapping(&self, g0: u64, g1: u64) -> Vec<u64> {
        let first = self
            .chunks
            .range(..g0)
            .next_back()
            .filter(|(&a, c)| a + c.size > g0)
            .map(|(&a, _)| a);
        first
            .into_iter()
            .chain(self.chunks.range(g0..g1).map(|(&a, _)| a))
            .collect()
    }

    fn ensure_mapped(&mut self, addr: u64, size: u64) -> BResult<()> {
        let (g0, g1) = self.granules(addr, size);
        let existing = self.overlapping(g0, g1);
        let mut gaps = Vec::new();
        let mut cursor = g0;
        for &a in &existing {
            if a > cursor {
                gaps.push((cursor, a - cursor));
            }
            cursor = cursor.max(a + self.chunks[&a].size);
        }
        if cursor < g1 {
            gaps.push((cursor, g1 - cursor));
        }
        let mut made = Vec::with_capacity(gaps.len());
        for &(a, s) in &gaps {
            match self.mapper.map(a, s) {
                Ok(h) => made.push((a, s, h)),
                Err(e) => {
                    for (a, s, h) in made {
                        self.mapper.unmap(a, s, h);
                    }
                    return Err(e);
                }
            }
        }
        for (a, s, h) in made {
            self.chunks.insert(
                a,
                Chunk {
                    size: s,
                    users: 0,
                    handle: h,
                },
            );
        }
        for a in existing.into_iter().chain(gaps.into_iter().map(|(a, _)| a)) {
            self.chunks.get_mut(&a).expect("chunk").users += 1;
        }
        Ok(())
    }

    /// Frees the allocation at `addr` (the caller synchronized the device); unmaps chunks left without users.
    /// Returns the freed (rounded) size.
    pub fn free(&mut self, addr: u64) -> BResult<u64> {
        let size = self.allocs.free(addr).ok_or(CuError::INVALID_VALUE)?;
        let (g0, g1) = self.granules(addr, size);
        for a in self.overlapping(g0, g1) {
            let c = self.chunks.get_mut(&a).expect("chunk");
            c.users -= 1;
            if c.users == 0 {
                let c = self.chunks.remove(&a).expect("chunk");
                self.slabs.remove(&a);
                self.mapper.unmap(a, c.size, c.handle);
            }
        }
        Ok(size)
    }

    /// Unmaps everything (teardown).
    pub fn clear(&mut self) {
        for (a, c) in std::mem::take(&mut self.chunks) {
            self.mapper.unmap(a, c.size, c.handle);
        }
        self.slabs.clear();
        let (b, s, limit) = (self.allocs.base(), self.allocs.size(), self.allocs.limit());
        self.allocs = RangeAllocator::new(b, s, 256);
        self.allocs.set_limit(limit);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const B: u64 = 0x7e00_0000_0000;
    const G: u64 = 2 << 20;

    /// Records mappings and refuses overlapping or unaligned ones.
    #[derive(Default)]
    struct FakeMapper {
        mapped: BTreeMap<u64, (u64, u32)>,
        next: u32,
        fail_next: bool,
        maps: u32,
        unmaps: u32,
    }
    impl Mapper for FakeMapper {
        type Handle = u32;
        fn map(&mut self, addr: u64, size: u64) -> BResult<u32> {
            assert!(addr % G == 0 && size % G == 0 && size > 0);
            if self.fail_next {
                self.fail_next = false;
                return Err(CuError::OUT_OF_MEMORY);
            }
            for (&a, &(s, _)) in &self.mapped {
                assert!(addr + size <= a || a + s <= addr, "double mapping");
            }
            self.next += 1;
            self.maps += 1;
            self.mapped.insert(addr, (size, self.next));
            Ok(self.next)
        }
        fn unmap(&mut self, addr: u64, size: u64, handle: u32) {
            assert_eq!(
                self.mapped.remove(&addr),
                Some((size, handle)),
                "unmap must match a map"
            );
            self.unmaps += 1;
        }
    }

    fn arena(gib: u64) -> VmmArena<FakeMapper> {
        VmmArena::new(B, gib << 30, G, FakeMapper::default())
    }

    /// Every live allocation is fully mapped.
    fn check(a: &VmmArena<FakeMapper>) {
        a.allocator().check_invariants();
        for (addr, size) in a.allocator().iter() {
            let mut cur = addr;
            while cur < addr + size {
                let (&m, &(s, _)) = a.mapper.mapped.range(..=cur).next_back().expect("mapped");
                assert!(
                    m + s > cur,
                    "byte {cur:#x} of allocation {addr:#x} is not mapped"
                );
                cur = m + s;
            }
        }
        assert_eq!(a.mapper.mapped.len(), a.chunks.len());
    }

    #[test]
    fn reservation_maps_only_what_is_mapped() {
        let mut a = arena(1);
        let r = a.reserve(5 << 20, 0).unwrap();
        assert_eq!(r % G, 0);
        assert_eq!(a.mapped_bytes(), 0, "a reservation maps nothing");
        // Ordinary allocations go around it.
        let big = a.alloc(G).unwrap();
        assert!(big >= r + 3 * G || big + G <= r);
        a.alloc_at(r + G, G).unwrap();
        assert_eq!(a.mapped_bytes(), 2 * G);
        assert_eq!(a.alloc_at(r + G, G), Err(CuError::INVALID_VALUE));
        check(&a);
        assert_eq!(a.unreserve(r), Err(CuError::INVALID_VALUE), "still mapped");
        a.free(r + G).unwrap();
        assert_eq!(a.mapped_bytes(), G);
        a.alloc_at(r, 2 * G).unwrap();
        a.free(r).unwrap();
        a.unreserve(r).unwrap();
        a.free(big).unwrap();
        assert_eq!(a.mapped_bytes(), 0);
        check(&a);
    }

    #[test]
    fn memory_limit_caps_mappings_not_reservations() {
        // 4 granules of memory in 1 GiB of address space.
        let mut a = arena(1);
        a.set_limit(4 * G);
        let r1 = a.reserve(300 * G, 0).unwrap();
        let r2 = a.reserve(100 * G, 0).unwrap();
        a.alloc_at(r1, 3 * G).unwrap();
        assert_eq!(a.alloc_at(r2, 2 * G), Err(CuError::OUT_OF_MEMORY));
        assert_eq!(a.alloc(2 * G), Err(CuError::OUT_OF_MEMORY));
        let x = a.alloc(G).unwrap();
        assert_eq!(a.alloc(1), Err(CuError::OUT_OF_MEMORY));
        assert_eq!(a.mapped_bytes(), 4 * G);
        check(&a);
        a.free(x).unwrap();
        a.free(r1).unwrap();
        a.unreserve(r1).unwrap();
        a.unreserve(r2).unwrap();
        a.clear();
        assert_eq!(a.allocator().limit(), 4 * G, "clear keeps the limit");
    }

    #[test]
    fn small_allocations_share_a_slab() {
        let mut a = arena(1);
        let x = a.alloc(100).unwrap();
        let y = a.alloc(4096).unwrap();
        assert_eq!((x, y), (B, B + 256));
        assert_eq!(a.mapper.maps, 1);
        assert_eq!(a.mapped_bytes(), G);
        a.free(x).unwrap();
        assert_eq!(a.mapper.unmaps, 0, "slab still used");
        a.free(y).unwrap();
        assert_eq!(a.mapper.unmaps, 1, "last user gone: slab released");
        assert_eq!(a.free(y), Err(CuError::INVALID_VALUE));
        check(&a);
    }

    #[test]
    fn large_allocations_get_own_chunks() {
        let mut a = arena(1);
        let s = a.alloc(1000).unwrap();
        let l = a.alloc(5 << 20).unwrap();
        assert_eq!(l, B + G, "granularity-aligned after the slab");
        assert_eq!(a.allocator().size_of(l), Some(6 << 20));
        let s2 = a.alloc(G - 256).unwrap();
        assert_eq!(
            s2,
            B + 4 * G,
            "does not fit the first slab, new slab after the large chunk"
        );
        assert_eq!(
            a.chunks().collect::<Vec<_>>(),
            vec![(B, G), (B + G, 3 * G), (B + 4 * G, G)]
        );
        a.free(l).unwrap();
        assert_eq!(a.chunks().count(), 2);
        check(&a);
        // The hole is reused by the next large allocation.
        assert_eq!(a.alloc(G).unwrap(), B + G);
        a.free(s).unwrap();
        a.free(s2).unwrap();
        check(&a);
    }

    #[test]
    fn out_of_memory_and_map_failure_roll_back() {
        let mut a = VmmArena::new(B, 4 * G, G, FakeMapper::default());
        assert_eq!(a.alloc(0), Err(CuError::INVALID_VALUE));
        assert_eq!(a.alloc(5 * G), Err(CuError::OUT_OF_MEMORY));
        a.mapper.fail_next = true;
        assert_eq!(a.alloc(G), Err(CuError::OUT_OF_MEMORY));
        assert_eq!(a.allocator().used(), 0);
        let x = a.alloc(4 * G).unwrap();
        assert_eq!(a.alloc(1), Err(CuError::OUT_OF_MEMORY));
        a.free(x).unwrap();
        check(&a);
    }

    #[test]
    fn restore_recreates_the_same_addresses() {
        let mut rng = 0x1234_5678_9abc_def1u64;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let mut a = arena(4);
        let mut live = Vec::new();
        for _ in 0..400 {
            if next() % 3 == 0 && !live.is_empty() {
                let i = (next() % live.len() as u64) as usize;
                let (addr, _) = live.swap_remove(i);
                a.free(addr).unwrap();
            } else {
                let bytes = match next() % 4 {
                    0 => 1 + next() % (8 * G),
                    _ => 1 + next() % 65536,
                };
                live.push((a.alloc(bytes).unwrap(), bytes));
            }
            check(&a);
        }
        let layout: Vec<u64> = a.allocator().iter().map(|(addr, _)| addr).collect();
        // Restore into a fresh arena, in reverse order, from (addr, requested bytes) only.
        let mut b = arena(4);
        for &(addr, bytes) in live.iter().rev() {
            b.alloc_at(addr, bytes).unwrap();
            check(&b);
        }
        assert_eq!(
            b.allocator()
                .iter()
                .map(|(addr, _)| addr)
                .collect::<Vec<_>>(),
            layout
        );
        assert_eq!(
            b.mapped_bytes(),
            a.mapped_bytes(),
            "the same granules are mapped"
        );
        // Taken ranges are refused.
        let (addr, bytes) = live[0];
        assert_eq!(b.alloc_at(addr, bytes), Err(CuError::INVALID_VALUE));
        // Freeing everything releases every chunk.
        for (addr, _) in live {
            b.free(addr).unwrap();
        }
        assert!(b.mapper.mapped.is_empty());
        assert_eq!(b.mapper.maps, b.mapper.unmaps);
    }

    #[test]
    fn foreign_layouts_spanning_granules() {
        // A packed layout (as the emulated backend might make) crossing granule boundaries.
        let mut a = arena(1);
        a.alloc_at(B, G + 256).unwrap();
        a.alloc_at(B + G + 256, 3 * G).unwrap();
        a.alloc_at(B + 4 * G + 256, 512).unwrap();
        check(&a);
        assert_eq!(
            a.allocator().size_of(B + G + 256),
            Some(3 * G),
            "not granularity-aligned: not rounded"
        );
        a.free(B).unwrap();
        check(&a);
        a.free(B + G + 256).unwrap();
        check(&a);
        a.free(B + 4 * G + 256).unwrap();
        assert!(a.mapper.mapped.is_empty());
        // Restored large allocations keep their 256-rounded size; new allocations never use their tail.
        a.alloc_at(B, G + 512).unwrap();
        assert_eq!(a.allocator().size_of(B), Some(G + 512));
        assert_eq!(
            a.alloc(100).unwrap(),
            B + 2 * G,
            "a new slab, not the restored chunk's tail"
        );
        assert_eq!(a.alloc(G).unwrap(), B + 3 * G);
        check(&a);
        a.clear();
        assert!(a.mapper.mapped.is_empty());
        assert_eq!(a.allocator().used(), 0);
    }
}
