#!/usr/bin/env python3
"""Deterministic PyTorch trainings for the GPU check (issue: unmodified PyTorch under devproxy).

Run natively and under `devproxy run` with the same arguments: the printed losses must be identical.
Prints `step N loss <float.hex()>` per step on stdout and `model M: X ms/step (steps 2..N)` on stderr.

  torch_train.py --model mlp|transformer|cnn --steps N [--seed S] [--step-delay-ms MS]
"""
import argparse, os, sys, time

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
import torch
import torch.nn as nn

p = argparse.ArgumentParser()
p.add_argument("--model", default="mlp")
p.add_argument("--steps", type=int, default=20)
p.add_argument("--seed", type=int, default=0)
p.add_argument("--step-delay-ms", type=int, default=0, help="sleep after each step (room for a checkpoint)")
a = p.parse_args()

torch.manual_seed(a.seed)
torch.use_deterministic_algorithms(True)
torch.backends.cudnn.benchmark = False
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
dev = torch.device("cuda")

if a.model == "mlp":
    model = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)).to(dev)
    x = torch.randn(64, 512, device=dev)
    y = torch.randint(0, 10, (64,), device=dev)
    loss_fn = nn.CrossEntropyLoss()
    step_fn = lambda: loss_fn(model(x), y)
elif a.model == "cnn":
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    ).to(dev)
    x = torch.randn(32, 3, 32, 32, device=dev)
    y = torch.randint(0, 10, (32,), device=dev)
    loss_fn = nn.CrossEntropyLoss()
    step_fn = lambda: loss_fn(model(x), y)
elif a.model == "transformer":
    layer = nn.TransformerEncoderLayer(d_model=1024, nhead=16, dim_feedforward=4096, batch_first=True, dropout=0.0)
    model = nn.TransformerEncoder(layer, num_layers=12).to(dev)
    x = torch.randn(8, 1024, 1024, device=dev)

    def step_fn():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return model(x).float().pow(2).mean()
else:
    sys.exit(f"unknown model {a.model}")

opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
t1 = None
for step in range(a.steps):
    opt.zero_grad(set_to_none=True)
    loss = step_fn()
    loss.backward()
    opt.step()
    v = loss.item()
    print(f"step {step} loss {v.hex()}", flush=True)
    if step == 0:
        t1 = time.perf_counter()
    if a.step_delay_ms:
        time.sleep(a.step_delay_ms / 1e3)
torch.cuda.synchronize()
if a.steps > 1:
    ms = (time.perf_counter() - t1) * 1e3 / (a.steps - 1)
    print(f"model {a.model}: {ms:.3f} ms/step (steps 2..{a.steps})", file=sys.stderr)
