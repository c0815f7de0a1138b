//! Expandable segments and memory pools through the shim: cuMemAddressReserve / cuMemCreate / cuMemMap /
//! cuMemSetAccess / copies / cuMemUnmap / cuMemRelease / cuMemAddressFree, and cuMemAllocFromPoolAsync on the default
//! pool, from a `python3 -c` ctypes program under `devproxy run` (emulated device).

mod common;

use common::*;
use std::path::Path;

fn run_py(py: &str) -> String {
    let sb = Sandbox::new();
    let out = sb.run_under(None, Path::new("python3"), &["-c", py]);
    assert!(
        out.status.success(),
        "python failed\nstdout:\n{}\nstderr:\n{}",
        stdout(&out),
        stderr(&out)
    );
    stdout(&out)
}

const PRELUDE: &str = r#"
import ctypes
lib = ctypes.CDLL("libcuda.so.1")
def ok(r, what):
    assert r == 0, f"{what} returned {r}"
ok(lib.cuInit(0), "cuInit")
ctx = ctypes.c_void_p(0)
ok(lib.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), 0), "retain")
ok(lib.cuCtxSetCurrent(ctx), "set current")
"#;

#[test]
fn reserve_create_map_copy_unmap_free() {
    let py = format!(
        "{PRELUDE}{}",
        r#"
class Loc(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]
class Flags(ctypes.Structure):
    _fields_ = [("compressionType", ctypes.c_ubyte), ("gpuDirectRDMACapable", ctypes.c_ubyte),
                ("usage", ctypes.c_ushort), ("reserved", ctypes.c_ubyte * 4)]
class Prop(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("requestedHandleTypes", ctypes.c_int), ("location", Loc),
                ("win32HandleMetaData", ctypes.c_void_p), ("allocFlags", Flags)]
class Access(ctypes.Structure):
    _fields_ = [("location", Loc), ("flags", ctypes.c_int)]
prop = Prop()
prop.type = 1            # CU_MEM_ALLOCATION_TYPE_PINNED
prop.location.type = 1   # CU_MEM_LOCATION_TYPE_DEVICE
prop.location.id = 0
gran = ctypes.c_size_t(0)
ok(lib.cuMemGetAllocationGranularity(ctypes.byref(gran), ctypes.byref(prop), 1), "granularity")
G = gran.value
assert G == 2 << 20, G
base = ctypes.c_uint64(0)
ok(lib.cuMemAddressReserve(ctypes.byref(base), ctypes.c_size_t(8 * G), ctypes.c_size_t(0), ctypes.c_uint64(0), ctypes.c_uint64(0)), "reserve")
assert base.value % G == 0
# An ordinary allocation does not land in the reservation.
other = ctypes.c_uint64(0)
ok(lib.cuMemAlloc_v2(ctypes.byref(other), ctypes.c_size_t(3 * G)), "cuMemAlloc")
assert other.value + 3 * G <= base.value or other.value >= base.value + 8 * G
# Nothing mapped yet: a copy into the reservation is refused.
one = (ctypes.c_ubyte * 1)(1)
assert lib.cuMemcpyHtoD_v2(ctypes.c_uint64(base.value), one, ctypes.c_size_t(1)) != 0
h1 = ctypes.c_uint64(0); h2 = ctypes.c_uint64(0)
ok(lib.cuMemCreate(ctypes.byref(h1), ctypes.c_size_t(2 * G), ctypes.byref(prop), ctypes.c_uint64(0)), "create 1")
ok(lib.cuMemCreate(ctypes.byref(h2), ctypes.c_size_t(G), ctypes.byref(prop), ctypes.c_uint64(0)), "create 2")
got = Prop()
ok(lib.cuMemGetAllocationPropertiesFromHandle(ctypes.byref(got), h1), "props")
assert got.type == 1 and got.location.type == 1
# Map two handles back to back: [base, base+2G) and [base+2G, base+3G).
ok(lib.cuMemMap(ctypes.c_uint64(base.value), ctypes.c_size_t(2 * G), ctypes.c_size_t(0), h1, ctypes.c_uint64(0)), "map 1")
ok(lib.cuMemMap(ctypes.c_uint64(base.value + 2 * G), ctypes.c_size_t(G), ctypes.c_size_t(0), h2, ctypes.c_uint64(0)), "map 2")
assert lib.cuMemMap(ctypes.c_uint64(base.value + 4 * G), ctypes.c_size_t(G), ctypes.c_size_t(0), h2, ctypes.c_uint64(0)) != 0, "aliasing is refused"
acc = Access(); acc.location.type = 1; acc.location.id = 0; acc.flags = 3
ok(lib.cuMemSetAccess(ctypes.c_uint64(base.value), ctypes.c_size_t(3 * G), ctypes.byref(acc), ctypes.c_size_t(1)), "set access")
fl = ctypes.c_uint64(0)
ok(lib.cuMemGetAccess(ctypes.byref(fl), ctypes.byref(acc.location), ctypes.c_uint64(base.value + G)), "get access")
assert fl.value == 3
# Bytes in and out exactly, within each mapping and across the boundary between the two.
n = 3 * G
src = (ctypes.c_ubyte * n).from_buffer_copy(bytes((i * 7 + 3) % 256 for i in range(n)))
dst = (ctypes.c_ubyte * n)()
ok(lib.cuMemcpyHtoD_v2(ctypes.c_uint64(base.value), src, ctypes.c_size_t(2 * G)), "htod 1")
ok(lib.cuMemcpyHtoD_v2(ctypes.c_uint64(base.value + 2 * G), ctypes.byref(src, 2 * G), ctypes.c_size_t(G)), "htod 2")
ok(lib.cuMemcpyDtoH_v2(dst, ctypes.c_uint64(base.value), ctypes.c_size_t(2 * G)), "dtoh 1")
ok(lib.cuMemcpyDtoH_v2(ctypes.byref(dst, 2 * G), ctypes.c_uint64(base.value + 2 * G), ctypes.c_size_t(G)), "dtoh 2")
assert bytes(dst) == bytes(src), "round trip through mapped memory"
# One copy across the boundary between the two mappings (PyTorch's expandable segments place tensors so).
dst2 = (ctypes.c_ubyte * n)()
ok(lib.cuMemcpyHtoD_v2(ctypes.c_uint64(base.value), src, ctypes.c_size_t(n)), "htod across")
ok(lib.cuMemcpyDtoH_v2(dst2, ctypes.c_uint64(base.value), ctypes.c_size_t(n)), "dtoh across")
assert bytes(dst2) == bytes(src), "round trip across two mappings"
# Past the end of the mapped range is still refused.
assert lib.cuMemcpyDtoH_v2(dst2, ctypes.c_uint64(base.value + G), ctypes.c_size_t(2 * G + 1)) != 0
# A device-to-device copy from the mapping into the cuMemAlloc buffer and back out.
ok(lib.cuMemcpyDtoD_v2(other, ctypes.c_uint64(base.value + 2 * G - 4096), ctypes.c_size_t(8192)), "dtod across")
small = (ctypes.c_ubyte * 8192)()
ok(lib.cuMemcpyDtoH_v2(small, other, ctypes.c_size_t(8192)), "dtoh small")
assert bytes(small) == bytes(src)[2 * G - 4096:2 * G + 4096]
pb = ctypes.c_uint64(0); ps = ctypes.c_size_t(0)
ok(lib.cuMemGetAddressRange_v2(ctypes.byref(pb), ctypes.byref(ps), ctypes.c_uint64(base.value + 5)), "address range")
assert (pb.value, ps.value) == (base.value, 2 * G)
# Freeing the reservation while mapped is refused; unmap, release, free.
assert lib.cuMemAddressFree(ctypes.c_uint64(base.value), ctypes.c_size_t(8 * G)) != 0
ok(lib.cuMemUnmap(ctypes.c_uint64(base.value), ctypes.c_size_t(3 * G)), "unmap")
ok(lib.cuMemRelease(h1), "release 1")
ok(lib.cuMemRelease(h2), "release 2")
assert lib.cuMemcpyDtoH_v2(dst, ctypes.c_uint64(base.value), ctypes.c_size_t(16)) != 0, "unmapped memory is gone"
# The range is still reserved: map again, then free everything.
h3 = ctypes.c_uint64(0)
ok(lib.cuMemCreate(ctypes.byref(h3), ctypes.c_size_t(G), ctypes.byref(prop), ctypes.c_uint64(0)), "create 3")
ok(lib.cuMemMap(ctypes.c_uint64(base.value + 7 * G), ctypes.c_size_t(G), ctypes.c_size_t(0), h3, ctypes.c_uint64(0)), "map 3")
ok(lib.cuMemUnmap(ctypes.c_uint64(base.value + 7 * G), ctypes.c_size_t(G)), "unmap 3")
ok(lib.cuMemRelease(h3), "release 3")
ok(lib.cuMemAddressFree(ctypes.c_uint64(base.value), ctypes.c_size_t(8 * G)), "address free")
assert lib.cuMemAddressFree(ctypes.c_uint64(base.value), ctypes.c_size_t(8 * G)) != 0, "double free"
ok(lib.cuMemFree_v2(other), "free")
print("vmm ok")
"#
    );
    assert!(run_py(&py).contains("vmm ok"));
}

#[test]
fn pool_alloc_and_free_through_the_default_pool() {
    let py = format!(
        "{PRELUDE}{}",
        r#"
pool = ctypes.c_void_p(0)
ok(lib.cuDeviceGetDefaultMemPool(ctypes.byref(pool), 0), "default pool")
cur = ctypes.c_void_p(0)
ok(lib.cuDeviceGetMemPool(ctypes.byref(cur), 0), "current pool")
assert cur.value == pool.value and pool.value
thr = ctypes.c_uint64(2**64 - 1)
ok(lib.cuMemPoolSetAttribute(pool, 4, ctypes.byref(thr)), "release threshold")   # CU_MEMPOOL_ATTR_RELEASE_THRESHOLD
stream = ctypes.c_void_p(0)
ok(lib.cuStreamCreate(ctypes.byref(stream), 1), "stream")
p = ctypes.c_uint64(0)
ok(lib.cuMemAllocFromPoolAsync(ctypes.byref(p), ctypes.c_size_t(1 << 20), pool, stream), "alloc from pool")
used = ctypes.c_uint64(0)
ok(lib.cuMemPoolGetAttribute(pool, 7, ctypes.byref(used)), "used")   # USED_MEM_CURRENT
assert used.value == 1 << 20, used.value
src = (ctypes.c_ubyte * 4096).from_buffer_copy(bytes(i % 253 for i in range(4096)))
dst = (ctypes.c_ubyte * 4096)()
ok(lib.cuMemcpyHtoDAsync_v2(p, src, ctypes.c_size_t(4096), stream), "htod")
ok(lib.cuMemcpyDtoHAsync_v2(dst, p, ctypes.c_size_t(4096), stream), "dtoh")
ok(lib.cuStreamSynchronize(stream), "sync")
assert bytes(dst) == bytes(src)
ok(lib.cuMemFreeAsync(p, stream), "free async")
ok(lib.cuStreamSynchronize(stream), "sync 2")
ok(lib.cuMemPoolGetAttribute(pool, 7, ctypes.byref(used)), "used after")
assert used.value == 0
high = ctypes.c_uint64(0)
ok(lib.cuMemPoolGetAttribute(pool, 8, ctypes.byref(high)), "high")   # USED_MEM_HIGH
assert high.value == 1 << 20
ok(lib.cuMemPoolTrimTo(pool, ctypes.c_size_t(0)), "trim")
assert lib.cuMemAllocFromPoolAsync(ctypes.byref(p), ctypes.c_size_t(256), ctypes.c_void_p(8), stream) != 0, "unknown pool"
print("pool ok")
"#
    );
    assert!(run_py(&py).contains("pool ok"));
}
