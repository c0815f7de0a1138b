#!/usr/bin/env python3
"""NVIDIA's driver checkpoint (cuCheckpointProcessLock/Checkpoint/Restore/Unlock) on a process holding N GiB, for
comparison with devproxy in the same run. Usage: nv_checkpoint.py GIB. Prints one line:
`nv_checkpoint gib G checkpoint_s C restore_s R checkpoint_gbps X restore_gbps Y`."""
import ctypes, subprocess, sys, time

HOLDER = r'''
import ctypes, sys
cu = ctypes.CDLL("libcuda.so.1")
gib = float(sys.argv[1])
assert cu.cuInit(0) == 0
ctx = ctypes.c_void_p()
assert cu.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), 0) == 0
assert cu.cuCtxSetCurrent(ctx) == 0
ptrs = []
left = int(gib * (1 << 30))
while left > 0:
    n = min(left, 1 << 30)
    p = ctypes.c_uint64()
    assert cu.cuMemAlloc_v2(ctypes.byref(p), ctypes.c_size_t(n)) == 0
    assert cu.cuMemsetD32_v2(p, ctypes.c_uint(0x5a5a5a5a), ctypes.c_size_t(n // 4)) == 0
    ptrs.append(p); left -= n
assert cu.cuCtxSynchronize() == 0
print("ready", flush=True)
sys.stdin.readline()
print("done", flush=True)
'''

def main():
    gib = float(sys.argv[1])
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(gib)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    line = holder.stdout.readline().strip()
    if line != "ready":
        print(f"nv_checkpoint gib {gib} FAILED holder said {line!r}"); sys.exit(1)
    cu = ctypes.CDLL("libcuda.so.1")
    assert cu.cuInit(0) == 0
    args = (ctypes.c_ubyte * 64)()
    pid = holder.pid
    t0 = time.perf_counter()
    r1 = cu.cuCheckpointProcessLock(pid, ctypes.byref(args))
    r2 = cu.cuCheckpointProcessCheckpoint(pid, ctypes.byref(args))
    t1 = time.perf_counter()
    r3 = cu.cuCheckpointProcessRestore(pid, ctypes.byref(args))
    r4 = cu.cuCheckpointProcessUnlock(pid, ctypes.byref(args))
    t2 = time.perf_counter()
    holder.stdin.write("go\n"); holder.stdin.flush()
    holder.wait(timeout=60)
    if any((r1, r2, r3, r4)):
        print(f"nv_checkpoint gib {gib} FAILED codes {r1} {r2} {r3} {r4}"); sys.exit(1)
    b = gib * (1 << 30)
    print(f"nv_checkpoint gib {gib} checkpoint_s {t1-t0:.3f} restore_s {t2-t1:.3f} "
          f"checkpoint_gbps {b/(t1-t0)/1e9:.2f} restore_gbps {b/(t2-t1)/1e9:.2f}")

main()
