#!/usr/bin/env python3
"""PyTorch DistributedDataParallel over NCCL, world size 1, for the GPU check (issue 7: NCCL on the cuda backend).

The transformer of torch_train.py (12 encoder layers, d 1024, 16 heads, ff 4096, batch 8 x 1024 tokens, bf16
autocast, AdamW, same seed and deterministic settings) wrapped in DDP with backend "nccl": DDP broadcasts the
parameters at start and all-reduces the gradient buckets every step through NCCL. Run natively and under
`devproxy run` with the same arguments: the printed losses must be identical.
Prints `step N loss <float.hex()>` per step on stdout; on stderr `nccl version X.Y.Z` (the NCCL this process calls:
under devproxy the shim answers) and `model ddp: X ms/step (steps 2..N)`.

  torch_ddp.py --steps N [--seed S] [--port P]
"""
import argparse, os, sys, time

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

p = argparse.ArgumentParser()
p.add_argument("--steps", type=int, default=6)
p.add_argument("--seed", type=int, default=0)
p.add_argument("--port", type=int, default=29511, help="MASTER_PORT of the (local) rendezvous")
a = p.parse_args()

os.environ["MASTER_ADDR"] = "127.0.0.1"
os.environ["MASTER_PORT"] = str(a.port)
os.environ["RANK"] = "0"
os.environ["WORLD_SIZE"] = "1"
os.environ["LOCAL_RANK"] = "0"

torch.manual_seed(a.seed)
torch.use_deterministic_algorithms(True)
torch.backends.cudnn.benchmark = False
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
dev = torch.device("cuda", 0)
torch.cuda.set_device(dev)
dist.init_process_group("nccl", rank=0, world_size=1)
# torch.cuda.nccl.version() is the version torch was compiled against; ncclGetVersion looked up in the process's
# global scope is the one its NCCL calls bind to (under devproxy the preloaded shim, which says 2.30.0).
import ctypes
_v = ctypes.c_int(0)
try:
    ctypes.CDLL(None).ncclGetVersion(ctypes.byref(_v))
    _nv = f"{_v.value // 10000}.{_v.value // 100 % 100}.{_v.value % 100}"
except AttributeError:  # NCCL loaded privately (RTLD_LOCAL): not in the global scope
    _nv = ".".join(str(v) for v in torch.cuda.nccl.version()) + " (compiled; no global ncclGetVersion)"
print(f"nccl version {_nv}", file=sys.stderr, flush=True)

layer = nn.TransformerEncoderLayer(d_model=1024, nhead=16, dim_feedforward=4096, batch_first=True, dropout=0.0)
model = nn.TransformerEncoder(layer, num_layers=12).to(dev)
x = torch.randn(8, 1024, 1024, device=dev)
ddp = DDP(model, device_ids=[0])
opt = torch.optim.AdamW(ddp.parameters(), lr=1e-3)

t1 = None
for step in range(a.steps):
    opt.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = ddp(x).float().pow(2).mean()
    loss.backward()
    opt.step()
    v = loss.item()
    print(f"step {step} loss {v.hex()}", flush=True)
    if step == 0:
        t1 = time.perf_counter()
torch.cuda.synchronize()
if a.steps > 1:
    ms = (time.perf_counter() - t1) * 1e3 / (a.steps - 1)
    print(f"model ddp: {ms:.3f} ms/step (steps 2..{a.steps})", file=sys.stderr)
dist.destroy_process_group()
