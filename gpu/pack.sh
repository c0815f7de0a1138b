#!/usr/bin/env bash
# Builds release binaries here and copies what gpu/check.sh needs into .gpu/ (ignored by git; carried to the GPU
# host). The GPU host has no Rust toolchain; binaries built on glibc 2.36 run on its 2.39.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env
cargo build --release --workspace --lib --bins --examples
cargo test --release --test gpu_backend --no-run 2>&1 | tail -n 3
rm -rf .gpu && mkdir -p .gpu
cp target/release/devproxy target/release/libdevproxy_interpose.so target/release/libdevproxy_nvml.so .gpu/
for e in saxpy train launch_overhead hold kernel_corpus ddp_train nccl_collectives hostmem pinprobe; do cp "target/release/examples/$e" .gpu/; done
t=$(ls -t target/release/deps/gpu_backend-* | grep -v '\.d$' | head -n1); cp "$t" .gpu/gpu_backend
strip --strip-debug .gpu/* 2>/dev/null || true
du -sh .gpu
