#!/usr/bin/env bash
# The GPU check: run on a GPU host from the repository root, with binaries built elsewhere by gpu/pack.sh (in .gpu/).
# Each step has its own timeout and prints PASS/FAIL with figures; everything native is measured in the same run.
# Writes $OUT/summary.txt (PASS/FAIL lines and figures) and $OUT/log.txt (all output).
#
#   STEPS="..." gpu/check.sh   steps: backend examples overhead ckpt migrate suspend throughput hostmem pinprobe
#                              nvidia torch torchckpt nccl nccl2
#                              (default: all)
#   RESTORE_TRIALS="buffered direct mmap threads24 mmap+threads24"  the throughput step's restore drills of each image
#                              (`restore --trial`) before the real restore: buffered (pread into page-locked buffers),
#                              direct (DMA from the image's own pages), mmap (buffers filled from a mapping of the
#                              image), threadsN (N copy workers), chunkN (N MiB per worker read, so its buffer stays in
#                              the CPU caches until the device reads it), devcrc (the device checks the CRC of what
#                              it read in place: DEVPROXY_DEVICE_CRC=1), overlap (each worker reads its next chunk while
#                              the device copies its last: DEVPROXY_RESTORE_OVERLAP=1), nt (mmap with streaming stores:
#                              DEVPROXY_RESTORE_NT=1); "" for none
#   IMAGE_MODES="direct buffered"  how the throughput step's servers move images: direct (default: DMA to and from the
#                              image's own page-locked pages, src/checkpoint/direct.rs), buffered
#                              (DEVPROXY_IMAGE_DIRECT=0: the buffer pipeline with pwrite), mmap (buffered + DEVPROXY_IMAGE_MMAP=1),
#                              crcafter (direct, the checkpoint's CRC after the device's copy: DEVPROXY_CRC_AFTER_COPY=1),
#                              devcrc (direct, CRCs computed by the device: DEVPROXY_DEVICE_CRC=1)
set -u
cd "$(dirname "$0")/.."
B=${GPU_BIN:-$PWD/.gpu}
OUT=${OUT:-/tmp/devproxy-gpu-out}
mkdir -p "$OUT"
SUM="$OUT/summary.txt"
LOG="$OUT/log.txt"
: >"$SUM"
: >"$LOG"
NVRTC=${NVRTC_DIR:-/opt/torch/.venv/lib/python3.12/site-packages/nvidia/cu13/lib}
export LD_LIBRARY_PATH="$NVRTC${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export DEVPROXY_RUNTIME_DIR=/tmp/devproxy-gpu-rt
export DEVPROXY_SHIM="$B/libdevproxy_interpose.so"
rm -rf "$DEVPROXY_RUNTIME_DIR"; mkdir -p "$DEVPROXY_RUNTIME_DIR"
# Images and scratch files live on tmpfs. HUGE_TMPFS=1 mounts a tmpfs with huge pages (huge=always; needs root) and
# uses it instead of /dev/shm: 2 MiB pages make preparing, page-locking and reading an image far cheaper.
W=/dev/shm/devproxy-gpu
if [ "${HUGE_TMPFS:-0}" = 1 ]; then
  mkdir -p /mnt/devproxy-huge
  mountpoint -q /mnt/devproxy-huge || mount -t tmpfs -o size=60g,huge=always tmpfs /mnt/devproxy-huge 2>>"$LOG"
  if mountpoint -q /mnt/devproxy-huge; then W=/mnt/devproxy-huge/w; fi
fi
rm -rf "$W"; mkdir -p "$W"
PY=$(command -v python3 || echo /opt/torch/.venv/bin/python3)
BACKEND=${BACKEND:-cuda}   # emulated: rehearse the script on a machine without a GPU
GIBS=${GIBS:-"1 16"}
STEPS=${STEPS:-"backend examples overhead ckpt migrate suspend throughput hostmem pinprobe nvidia torch torchckpt nccl nccl2"}
IMAGE_MODES=${IMAGE_MODES:-direct}
RESTORE_TRIALS=${RESTORE_TRIALS:-"buffered direct direct+devcrc mmap chunk4 chunk16 mmap+chunk4 overlap mmap+overlap nt nt+overlap"}
export PYTHONFAULTHANDLER=1 PYTHONUNBUFFERED=1

say() { echo "$*" | tee -a "$SUM"; }
log() { echo "$*" >>"$LOG"; }
pass() { say "PASS $*"; }
fail() { say "FAIL $*"; }
want() { [[ " $STEPS " == *" $1 "* ]]; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.3f", a / b; else print "n/a" }'; }
cleanup_servers() { pkill -9 -f "$B/devproxy (serve|restore)" 2>/dev/null; sleep 0.2; rm -f "$DEVPROXY_RUNTIME_DIR"/*.sock*; }

# Starts a cuda server on socket $1 in the background.
serve() {
  ( "$B/devproxy" serve --backend "$BACKEND" --socket "$1" >>"$LOG" 2>&1 & )
  for _ in $(seq 200); do [ -S "$1.ctl" ] && return 0; sleep 0.05; done
  log "server on $1 did not start"; return 1
}
# pid of the session whose command matches $2 on server $1
sess_pid() { "$B/devproxy" ps --server "$1" 2>>"$LOG" | awk -v pat="$2" '$0 ~ pat && $2 ~ /^[0-9]+$/ { print $2; exit }'; }
# waits until file $1 contains $2 (timeout $3 s)
wait_line() { for _ in $(seq $(($3 * 20))); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.05; done; return 1; }

say "devproxy GPU check $(date -u +%Y-%m-%dT%H:%MZ) on $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -n1)"
say "  host: kernel $(uname -r), $(nproc) cores; NCCL: $(ls /opt/torch/.venv/lib/python3.12/site-packages/nvidia/nccl/lib/ 2>/dev/null | tr '\n' ' ')"
say "  images in $W ($(df -h --output=source,size "$W" 2>/dev/null | tail -n1 | tr -s ' '), $(grep " $(df --output=target "$W" | tail -n1) " /proc/mounts | head -n1 | cut -d' ' -f4))"
say "  huge pages: anon $(cat /sys/kernel/mm/transparent_hugepage/enabled 2>/dev/null), shmem $(cat /sys/kernel/mm/transparent_hugepage/shmem_enabled 2>/dev/null); /dev/shm: $(grep ' /dev/shm ' /proc/mounts | head -n1 | cut -d' ' -f4)"

# Reference output for the state-moving checks: the CPU reference, bit-identical to a GPU run (the examples step
# checks that natively).
REF_ARGS="--steps 400 --log-every 20 --step-delay-ms 4"
[ -s "$W/train.ref" ] || timeout 120 "$B/train" --cpu --steps 400 --log-every 20 >"$W/train.ref" 2>>"$LOG"

# ---- 4. checkpoint --stop, server SIGKILLed, restored by a new server
if want ckpt; then
  cleanup_servers
  S="$DEVPROXY_RUNTIME_DIR/a.sock"
  serve "$S"
  "$B/devproxy" run --server "$S" -- "$B/train" $REF_ARGS >"$W/ckpt.out" 2>>"$LOG" &
  RUN=$!
  wait_line "$W/ckpt.out" "step   100" 60
  pid=$(sess_pid "$S" train)
  timeout 120 "$B/devproxy" checkpoint --server "$S" --pid "$pid" --out "$W/img-ckpt" --stop 2>>"$LOG" | tee -a "$LOG" | sed 's/^/  /' | tee -a "$SUM" >/dev/null
  pkill -9 -f "$B/devproxy serve --backend $BACKEND --socket $S"
  sleep 0.3
  ( "$B/devproxy" restore "$W/img-ckpt" --socket "$S" --backend "$BACKEND" >>"$LOG" 2>&1 & )
  timeout 180 tail --pid=$RUN -f /dev/null
  if cmp -s "$W/train.ref" "$W/ckpt.out"; then
    pass "ckpt: train checkpointed with --stop, server killed, restored: output identical"
  else
    fail "ckpt: output differs after restore ($(tail -n1 "$W/ckpt.out") vs $(tail -n1 "$W/train.ref"))"
  fi
  cleanup_servers
fi

# ---- 5. live migration between two servers
if want migrate; then
  cleanup_servers
  S1="$DEVPROXY_RUNTIME_DIR/m1.sock"; S2="$DEVPROXY_RUNTIME_DIR/m2.sock"
  serve "$S1"; serve "$S2"
  "$B/devproxy" run --server "$S1" -- "$B/train" $REF_ARGS >"$W/mig.out" 2>>"$LOG" &
  RUN=$!
  wait_line "$W/mig.out" "step   100" 60
  pid=$(sess_pid "$S1" train)
  timeout 120 "$B/devproxy" migrate --server "$S1" --pid "$pid" --to "$S2" 2>>"$LOG" | tee -a "$LOG" | sed 's/^/  /' | tee -a "$SUM" >/dev/null
  timeout 180 tail --pid=$RUN -f /dev/null
  if cmp -s "$W/train.ref" "$W/mig.out"; then
    pass "migrate: train live-migrated between two servers: output identical"
  else
    fail "migrate: output differs ($(tail -n1 "$W/mig.out") vs $(tail -n1 "$W/train.ref"))"
  fi
  cleanup_servers
fi

# ---- 6. suspend / resume
if want suspend; then
  cleanup_servers
  S="$DEVPROXY_RUNTIME_DIR/s.sock"
  serve "$S"
  "$B/devproxy" run --server "$S" -- "$B/train" $REF_ARGS >"$W/sus.out" 2>>"$LOG" &
  RUN=$!
  wait_line "$W/sus.out" "step   100" 60
  pid=$(sess_pid "$S" train)
  timeout 60 "$B/devproxy" suspend --server "$S" --pid "$pid" >>"$LOG" 2>&1
  held=$("$B/devproxy" ps --server "$S" | awk -v p="$pid" '$2 == p { print $3, $4 }')
  sleep 0.5
  timeout 60 "$B/devproxy" resume --server "$S" --pid "$pid" >>"$LOG" 2>&1
  timeout 180 tail --pid=$RUN -f /dev/null
  if cmp -s "$W/train.ref" "$W/sus.out" && [[ "$held" == "0 B" ]]; then
    pass "suspend: suspended (device memory held: $held), resumed: output identical"
  else
    fail "suspend: held '$held' while suspended; output $(tail -n1 "$W/sus.out") vs $(tail -n1 "$W/train.ref")"
  fi
  cleanup_servers
fi

# ---- 2. examples natively and under devproxy: identical output
TRAIN_ARGS="--steps 300 --log-every 25"
if want examples; then
  for ex in "saxpy" "train $TRAIN_ARGS" "kernel_corpus"; do
    set -- $ex
    name=$1; shift
    timeout 120 "$B/$name" "$@" >"$W/$name.native" 2>"$W/$name.native.err"
    timeout 300 "$B/devproxy" run --backend "$BACKEND" -- "$B/$name" "$@" >"$W/$name.proxy" 2>"$W/$name.proxy.err"
    cat "$W/$name.native.err" "$W/$name.proxy.err" >>"$LOG"
    if [ -s "$W/$name.native" ] && cmp -s "$W/$name.native" "$W/$name.proxy"; then
      pass "examples: $name identical natively and under devproxy ($(tail -n1 "$W/$name.proxy"))"
    else
      fail "examples: $name differs: native '$(tail -n1 "$W/$name.native")' proxy '$(tail -n1 "$W/$name.proxy")'"
    fi
  done
  n=$(grep -o '[0-9.]* ms/step' "$W/train.native.err" | awk '{print $1}')
  p=$(grep -o '[0-9.]* ms/step' "$W/train.proxy.err" | awk '{print $1}')
  say "  train step: native $n ms, devproxy $p ms, ratio $(ratio "$p" "$n")"
fi

# ---- 3. per-call overhead
if want overhead; then
  timeout 120 "$B/launch_overhead" >"$W/lo.native" 2>>"$LOG"
  timeout 300 "$B/devproxy" run --backend "$BACKEND" -- "$B/launch_overhead" >"$W/lo.proxy" 2>>"$LOG"
  read -r _ nl _ nr _ nh <"$W/lo.native"
  read -r _ pl _ pr _ ph <"$W/lo.proxy"
  if [ -n "${pl:-}" ] && [ -n "${nl:-}" ]; then
    pass "overhead: measured"
    say "  launch (async) native ${nl} us, devproxy ${pl} us, ratio $(ratio "$pl" "$nl"), added $(awk -v a="$pl" -v b="$nl" 'BEGIN{printf "%.2f", a-b}') us"
    say "  launch+sync    native ${nr} us, devproxy ${pr} us, ratio $(ratio "$pr" "$nr")"
    say "  4-byte H2D+sync native ${nh} us, devproxy ${ph} us, ratio $(ratio "$ph" "$nh")"
  else
    fail "overhead: launch_overhead did not run (native '$(cat "$W/lo.native")' proxy '$(cat "$W/lo.proxy")')"
  fi
fi

# ---- 7. checkpoint / restore throughput on a process holding N GiB
if want throughput; then
  for mode in $IMAGE_MODES; do
  for gib in $GIBS; do
    cleanup_servers
    S="$DEVPROXY_RUNTIME_DIR/t.sock"
    unset DEVPROXY_IMAGE_MMAP DEVPROXY_IMAGE_DIRECT DEVPROXY_CRC_AFTER_COPY DEVPROXY_DEVICE_CRC
    case $mode in
      buffered) export DEVPROXY_IMAGE_DIRECT=0 ;;
      mmap) export DEVPROXY_IMAGE_DIRECT=0 DEVPROXY_IMAGE_MMAP=1 ;;
      crcafter) export DEVPROXY_CRC_AFTER_COPY=1 ;;
      devcrc) export DEVPROXY_DEVICE_CRC=1 ;;
    esac
    serve "$S"
    rm -f "$W/go"
    "$B/devproxy" run --server "$S" -- "$B/hold" --gib "$gib" --until "$W/go" >"$W/hold.out" 2>>"$LOG" &
    RUN=$!
    wait_line "$W/hold.out" "ready" 120
    pid=$(sess_pid "$S" hold)
    c1="(skipped above 1 GiB)"
    [ "$gib" = 1 ] && c1=$(timeout 240 "$B/devproxy" checkpoint --server "$S" --pid "$pid" --out "$W/img-t" 2>>"$LOG")
    c2=$(timeout 240 "$B/devproxy" checkpoint --server "$S" --pid "$pid" --out "$W/img-t" --stop 2>>"$LOG")
    pkill -9 -f "$B/devproxy serve --backend $BACKEND --socket $S"; sleep 0.3
    # Restore drills of the same image first (`restore --trial`: rebuilt, CRCs checked, released; the process stays
    # paused), one per way of reading it.
    trials=()
    for t in $RESTORE_TRIALS; do
      e=()
      for part in ${t//+/ }; do
        case $part in
          direct) e+=(DEVPROXY_IMAGE_DIRECT_RESTORE=1) ;;
          mmap) e+=(DEVPROXY_RESTORE_READ=mmap) ;;
          threads*) e+=(DEVPROXY_IO_THREADS=${part#threads}) ;;
          chunk*) e+=(DEVPROXY_RESTORE_CHUNK_MIB=${part#chunk}) ;;
          devcrc) e+=(DEVPROXY_DEVICE_CRC=1) ;;
          overlap) e+=(DEVPROXY_RESTORE_OVERLAP=1) ;;
          nt) e+=(DEVPROXY_RESTORE_READ=mmap DEVPROXY_RESTORE_NT=1) ;;
        esac
      done
      r=$(env "${e[@]}" timeout 120 "$B/devproxy" restore "$W/img-t" --backend "$BACKEND" --trial 2>>"$LOG" | grep -m1 'GB/s')
      trials+=("  [$mode] ${gib} GiB trial restore ($t): ${r:-FAILED}")
    done
    # RESTORE_DIRECT=1: the restore DMAs from the image's own page-locked pages instead of through buffers.
    ( [ "${RESTORE_DIRECT:-0}" = 1 ] && export DEVPROXY_IMAGE_DIRECT_RESTORE=1
      "$B/devproxy" restore "$W/img-t" --socket "$S" --backend "$BACKEND" >"$W/restore.log" 2>&1 & )
    wait_line "$W/restore.log" "GB/s" 240
    # Then live-migrate the restored process to a second server (retried until it has re-attached).
    S2="$DEVPROXY_RUNTIME_DIR/t2.sock"
    serve "$S2"
    mg="(not migrated)"
    for _ in $(seq 40); do
      pid=$(sess_pid "$S" hold)
      if [ -n "$pid" ] && mg=$(timeout 240 "$B/devproxy" migrate --server "$S" --pid "$pid" --to "$S2" 2>>"$LOG"); then
        break
      fi
      sleep 0.25
    done
    # Then suspend it there (device memory to host memory) and resume it.
    sp="(not suspended)"; rs=""
    pid=$(sess_pid "$S2" hold)
    if [ -n "$pid" ]; then
      sp=$(timeout 240 "$B/devproxy" suspend --server "$S2" --pid "$pid" 2>>"$LOG")
      rs=$(timeout 240 "$B/devproxy" resume --server "$S2" --pid "$pid" 2>>"$LOG")
    fi
    touch "$W/go"
    timeout 240 tail --pid=$RUN -f /dev/null
    cat "$W/restore.log" >>"$LOG"
    say "  [$mode] ${gib} GiB checkpoint (running): $c1"
    say "  [$mode] ${gib} GiB checkpoint (--stop):  $c2"
    say "  [$mode] ${gib} GiB restore: $(grep -m1 'GB/s' "$W/restore.log")"
    for l in "${trials[@]}"; do say "$l"; done
    say "  [$mode] ${gib} GiB migration: $mg"
    say "  [$mode] ${gib} GiB suspend: $sp"
    say "  [$mode] ${gib} GiB resume: $rs"
    if grep -q "verified.*OK" "$W/hold.out"; then
      pass "throughput: [$mode] ${gib} GiB checkpointed, server killed, restored, migrated, suspended, resumed, memory verified"
    else
      fail "throughput: [$mode] ${gib} GiB: $(tail -n1 "$W/hold.out")"
    fi
    rm -rf "$W/img-t"
    cleanup_servers
  done
  done
  unset DEVPROXY_IMAGE_MMAP DEVPROXY_IMAGE_DIRECT DEVPROXY_CRC_AFTER_COPY DEVPROXY_DEVICE_CRC
fi

# ---- 7b. host memory bandwidth, no device (examples/hostmem.rs): read, memcpy, pread from tmpfs in 2 MiB slices with
# and without CRC (the restore's pattern), copies and CRC from a mapping of the file, per thread count
if want hostmem; then
  timeout 120 "$B/hostmem" --gib 4 --dir "$W" >"$W/hostmem.out" 2>"$W/hostmem.err"
  rc=$?
  cat "$W/hostmem.out" "$W/hostmem.err" >>"$LOG"
  while read -r l; do say "  $l"; done <"$W/hostmem.out"
  if [ $rc = 0 ]; then
    pass "hostmem: host memory bandwidth measured"
  else
    fail "hostmem: exit status $rc: $(tail -n1 "$W/hostmem.err")"
  fi
fi

# ---- 7c. page-locking for the GPU, natively (examples/pinprobe.rs): GB/s of locking a tmpfs file's pages and
# anonymous memory per thread count, copies while other threads lock, and the direct restore's lock-then-copy pipeline
if want pinprobe; then
  PRE=(); [ "$BACKEND" = cuda ] || PRE=("$B/devproxy" run --backend "$BACKEND" --)  # rehearsal: through the shim
  timeout 150 "${PRE[@]}" "$B/pinprobe" --gib 4 --dir "$W" --threads 1,2,4,8 >"$W/pinprobe.out" 2>"$W/pinprobe.err"
  rc=$?
  cat "$W/pinprobe.out" "$W/pinprobe.err" >>"$LOG"
  while read -r l; do say "  $l"; done <"$W/pinprobe.out"
  if [ $rc = 0 ] && grep -q "^pinprobe data check ok" "$W/pinprobe.out"; then
    pass "pinprobe: page-locking and copies measured, data on the device checked"
  else
    fail "pinprobe: exit status $rc: $(tail -n1 "$W/pinprobe.err")"
  fi
fi

# ---- 8. NVIDIA's driver checkpoint on the same amounts
if want nvidia; then
  for gib in $GIBS; do
    r=$(timeout 120 "$PY" gpu/nv_checkpoint.py "$gib" 2>>"$LOG")
    say "  $r"
  done
fi

# ---- 1. the cuda backend's own tests
if want backend; then
  if timeout 180 "$B/gpu_backend" --ignored --nocapture --test-threads=1 >>"$LOG" 2>&1; then
    pass "backend: cuda backend tests"
  else
    fail "backend: cuda backend tests (see log)"
  fi
  grep -E "GB/s" "$LOG" | sed 's/^/  /' | tee -a "$SUM" >/dev/null
fi

# ---- 9. unmodified PyTorch (issue 6): losses natively and under devproxy, step-time ratio
if want torch; then
  TPY=${TORCH_PY:-/opt/torch/.venv/bin/python3}
  set -- ${TORCH_MODELS:-mlp 30 cnn 20 transformer 8}
  while [ $# -ge 2 ]; do
    m=$1; n=$2; shift 2
    timeout 60 "$TPY" gpu/torch_train.py --model "$m" --steps "$n" >"$W/t-$m.native" 2>"$W/t-$m.native.err"
    timeout 60 "$B/devproxy" run --backend "$BACKEND" -- "$TPY" gpu/torch_train.py --model "$m" --steps "$n" >"$W/t-$m.proxy" 2>"$W/t-$m.proxy.err"
    tail -n 30 "$W/t-$m.native.err" "$W/t-$m.proxy.err" >>"$LOG"
    nt=$(grep -o '[0-9.]* ms/step' "$W/t-$m.native.err" | awk '{print $1}')
    pt=$(grep -o '[0-9.]* ms/step' "$W/t-$m.proxy.err" | awk '{print $1}')
    if [ -s "$W/t-$m.native" ] && cmp -s "$W/t-$m.native" "$W/t-$m.proxy"; then
      pass "torch: $m losses identical natively and under devproxy ($n steps); step native $nt ms, devproxy $pt ms, ratio $(ratio "$pt" "$nt")"
    else
      fail "torch: $m: native $(wc -l <"$W/t-$m.native") steps, devproxy $(wc -l <"$W/t-$m.proxy") steps; first proxy error: $(grep -m1 -iE 'error|not supported|fault' "$W/t-$m.proxy.err")"
      # The same run, two steps, with every driver call traced: the tail names the last calls before the failure.
      DEVPROXY_LOG=trace timeout 90 "$B/devproxy" run --backend "$BACKEND" -- "$TPY" gpu/torch_train.py --model "$m" --steps 2 >/dev/null 2>"$W/trace-$m.txt"
      { grep -v ' -> CUDA_SUCCESS$' "$W/trace-$m.txt" | grep -v '^devproxy: cu[A-Za-z_0-9]* -> ' | head -n 60; echo ...; tail -n 250 "$W/trace-$m.txt"; } >"$OUT/trace-$m.txt"
    fi
  done
fi

# ---- 10. the transformer checkpointed with --stop mid-training (server killed, restored) and live-migrated: the
# remaining losses must equal an uninterrupted native run's. `ckpt-expandable`: the same checkpoint with PyTorch's
# expandable segments (cuMemAddressReserve/Map: reservations saved in the image), against a native run with them.
if want torchckpt; then
  TPY=${TORCH_PY:-/opt/torch/.venv/bin/python3}
  TM=${TORCHCKPT_MODEL:-transformer}
  TARGS="--model $TM --steps 12 --step-delay-ms 300"
  timeout 90 "$TPY" gpu/torch_train.py $TARGS >"$W/tc.native" 2>>"$LOG"
  for how in ${TORCHCKPT_HOW:-ckpt migrate ckpt-expandable}; do
    cleanup_servers
    REF="$W/tc.native"
    if [ $how = ckpt-expandable ]; then
      export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
      REF="$W/tc.native-expandable"
      timeout 90 "$TPY" gpu/torch_train.py $TARGS >"$REF" 2>>"$LOG"
    fi
    S1="$DEVPROXY_RUNTIME_DIR/tc1.sock"; S2="$DEVPROXY_RUNTIME_DIR/tc2.sock"
    serve "$S1"; [ $how = migrate ] && serve "$S2"
    "$B/devproxy" run --server "$S1" -- "$TPY" gpu/torch_train.py $TARGS >"$W/tc.$how" 2>>"$LOG" &
    RUN=$!
    wait_line "$W/tc.$how" "step 4 " 90
    pid=$(sess_pid "$S1" python)
    if [ $how != migrate ]; then
      timeout 120 "$B/devproxy" checkpoint --server "$S1" --pid "$pid" --out "$W/img-tc" --stop 2>>"$LOG" | tee -a "$LOG" | sed 's/^/  /' | tee -a "$SUM" >/dev/null
      pkill -9 -f "$B/devproxy serve --backend $BACKEND --socket $S1"; sleep 0.3
      ( "$B/devproxy" restore "$W/img-tc" --socket "$S1" --backend "$BACKEND" >>"$LOG" 2>&1 & )
    else
      timeout 120 "$B/devproxy" migrate --server "$S1" --pid "$pid" --to "$S2" 2>>"$LOG" | tee -a "$LOG" | sed 's/^/  /' | tee -a "$SUM" >/dev/null
    fi
    timeout 120 tail --pid=$RUN -f /dev/null
    unset PYTORCH_CUDA_ALLOC_CONF
    if [ -s "$REF" ] && cmp -s "$REF" "$W/tc.$how"; then
      pass "torchckpt: $TM $how mid-training: all $(wc -l <"$REF") losses identical to native"
    else
      fail "torchckpt: $TM $how: native $(wc -l <"$REF") steps, devproxy $(wc -l <"$W/tc.$how") ($(tail -n1 "$W/tc.$how"))"
    fi
    rm -rf "$W/img-tc"
    cleanup_servers
  done
fi

# ---- 11. NCCL on the cuda backend (issue 7): the server runs the real libnccl. ddp_train with one rank under devproxy
# must give the CPU reference's checksum; PyTorch DDP (backend nccl, world size 1) must give the native losses.
if want nccl; then
  export DEVPROXY_NCCL_LIB=${DEVPROXY_NCCL_LIB:-/opt/torch/.venv/lib/python3.12/site-packages/nvidia/nccl/lib/libnccl.so.2}
  TPY=${TORCH_PY:-/opt/torch/.venv/bin/python3}
  DDP="$B/ddp_train"; [ -x "$DDP" ] || DDP=target/release/examples/ddp_train
  say "  nccl: server library DEVPROXY_NCCL_LIB=$DEVPROXY_NCCL_LIB ($([ -f "$DEVPROXY_NCCL_LIB" ] && echo present || echo MISSING))"
  if [ -x "$DDP" ]; then
    timeout 120 "$DDP" --cpu --ranks 1 --steps 60 >"$W/ddp.ref" 2>>"$LOG"
    timeout 300 "$B/devproxy" run --backend "$BACKEND" -- "$DDP" --ranks 1 --steps 60 >"$W/ddp.proxy" 2>"$W/ddp.proxy.err"
    cat "$W/ddp.proxy.err" >>"$LOG"
    grep -m1 -E 'NCCL .* loaded from|NCCL not found|not a usable NCCL' "$W/ddp.proxy.err" | sed 's/^/  server: /' | tee -a "$SUM" >/dev/null
    r=$(grep -m1 '^checksum' "$W/ddp.ref"); p=$(grep -m1 '^checksum' "$W/ddp.proxy")
    if [ -n "$r" ] && [ "$r" = "$p" ]; then
      pass "nccl: ddp_train, 1 rank, NCCL in the $BACKEND server: $p, identical to the CPU reference"
    else
      fail "nccl: ddp_train, 1 rank: reference '$r', devproxy '${p:-none}': $(grep -m1 -iE 'error|panic' "$W/ddp.proxy.err")"
    fi
  else
    fail "nccl: no ddp_train binary in $B (gpu/pack.sh must copy examples/ddp_train)"
  fi
  # Every collective with every reduction op, one rank, results checked on the host.
  timeout 120 "$B/devproxy" run --backend "$BACKEND" -- "$B/nccl_collectives" >"$W/coll.out" 2>"$W/coll.err"
  cat "$W/coll.err" >>"$LOG"
  if grep -q "^collectives ok" "$W/coll.out"; then
    pass "nccl: $(grep '^collectives ok' "$W/coll.out") through the $BACKEND server"
  else
    fail "nccl: collectives: $(grep -m1 -iE 'error|mismatch|expected' "$W/coll.err" "$W/coll.out")"
  fi
  timeout 120 "$TPY" gpu/torch_ddp.py --steps 6 --port 29511 >"$W/tddp.native" 2>"$W/tddp.native.err"
  timeout 240 "$B/devproxy" run --backend "$BACKEND" -- "$TPY" gpu/torch_ddp.py --steps 6 --port 29512 >"$W/tddp.proxy" 2>"$W/tddp.proxy.err"
  tail -n 40 "$W/tddp.native.err" "$W/tddp.proxy.err" >>"$LOG"
  nt=$(grep -o '[0-9.]* ms/step' "$W/tddp.native.err" | awk '{print $1}')
  pt=$(grep -o '[0-9.]* ms/step' "$W/tddp.proxy.err" | awk '{print $1}')
  # The NCCL the application called: natively the real one, under devproxy the shim (its own version number); the
  # same number on both lines would mean the application loaded the real libnccl past the shim.
  nv=$(grep -m1 '^nccl version' "$W/tddp.native.err"); pv=$(grep -m1 '^nccl version' "$W/tddp.proxy.err")
  say "  torch ddp: application's NCCL natively '${nv:-?}', under devproxy '${pv:-?}'"
  if [ -s "$W/tddp.native" ] && cmp -s "$W/tddp.native" "$W/tddp.proxy"; then
    pass "nccl: torch DDP (nccl, world size 1) transformer losses identical natively and under devproxy ($(wc -l <"$W/tddp.native") steps); step native $nt ms, devproxy $pt ms, ratio $(ratio "$pt" "$nt")"
  else
    fail "nccl: torch DDP: native $(wc -l <"$W/tddp.native") steps, devproxy $(wc -l <"$W/tddp.proxy") steps; first proxy error: $(grep -m1 -iE 'error|not supported|fault' "$W/tddp.proxy.err")"
    DEVPROXY_LOG=trace timeout 120 "$B/devproxy" run --backend "$BACKEND" -- "$TPY" gpu/torch_ddp.py --steps 2 --port 29513 >/dev/null 2>"$W/trace-ddp.txt"
    { grep -v ' -> CUDA_SUCCESS$' "$W/trace-ddp.txt" | grep -v '^devproxy: cu[A-Za-z_0-9]* -> ' | head -n 60; echo ...; tail -n 250 "$W/trace-ddp.txt"; } >"$OUT/trace-ddp.txt"
  fi
fi

# ---- 11. two NCCL ranks on one GPU: each rank's server gets its own NCCL_HOSTID, so NCCL treats them as two hosts
if want nccl2; then
  export DEVPROXY_NCCL_LIB=${DEVPROXY_NCCL_LIB:-/opt/torch/.venv/lib/python3.12/site-packages/nvidia/nccl/lib/libnccl.so.2}
  DDP="$B/ddp_train"
  cleanup_servers
  timeout 120 "$DDP" --cpu --ranks 2 --steps 60 >"$W/ddp2.ref" 2>>"$LOG"
  S1="$DEVPROXY_RUNTIME_DIR/r0.sock"; S2="$DEVPROXY_RUNTIME_DIR/r1.sock"
  NCCL_HOSTID=devproxy-rank0 serve "$S1"; NCCL_HOSTID=devproxy-rank1 serve "$S2"
  rm -f "$W/ddp2.id"
  for r in 0 1; do
    S=$S1; [ $r = 1 ] && S=$S2
    timeout 180 "$B/devproxy" run --server "$S" -- "$DDP" --ranks 2 --rank $r --id-file "$W/ddp2.id" --steps 60 >"$W/ddp2.$r" 2>"$W/ddp2.$r.err" &
  done
  wait
  cat "$W/ddp2.0.err" "$W/ddp2.1.err" >>"$LOG"
  r=$(grep -m1 '^checksum' "$W/ddp2.ref"); p0=$(grep -m1 '^checksum' "$W/ddp2.0"); p1=$(grep -m1 '^checksum' "$W/ddp2.1")
  if [ -n "$r" ] && [ "$r" = "$p0" ] && [ "$r" = "$p1" ]; then
    pass "nccl2: ddp_train, 2 ranks on one GPU (one server each, NCCL_HOSTID per server), real NCCL: $p0 on both, identical to the CPU reference"
  else
    fail "nccl2: 2 ranks: reference '$r', rank 0 '${p0:-none}', rank 1 '${p1:-none}': $(grep -h -m1 -iE 'error|panic|refused' "$W/ddp2.0.err" "$W/ddp2.1.err" | head -n2 | tr '\n' ' ')"
  fi
  # The same job checkpointed with --stop, both servers killed, and each rank restored by its own
  # `devproxy restore --ranks R` (with its server's NCCL_HOSTID; one attempt name for both), which re-create the
  # communicator under a new unique id that rank 0's server publishes in the job image's directory.
  cleanup_servers
  NCCL_HOSTID=devproxy-rank0 serve "$S1"; NCCL_HOSTID=devproxy-rank1 serve "$S2"
  rm -rf "$W/ddp2c.id" "$W/ddp2-img"
  for r in 0 1; do
    S=$S1; [ $r = 1 ] && S=$S2
    timeout 240 "$B/devproxy" run --server "$S" -- "$DDP" --ranks 2 --rank $r --id-file "$W/ddp2c.id" --steps 60 --step-delay-ms 40 >"$W/ddp2c.$r" 2>"$W/ddp2c.$r.err" &
  done
  job=""
  for _ in $(seq 300); do
    job=$("$B/devproxy" ps --server "$S1" 2>>"$LOG" | awk 'f && NF { print $1; exit } /NCCL JOB/ { f = 1 }')
    [ -n "$job" ] && break; sleep 0.1
  done
  sleep 1
  timeout 120 "$B/devproxy" checkpoint --job "${job:-none}" --stop --out "$W/ddp2-img" 2>&1 | tee -a "$LOG" | sed 's/^/  /' | tee -a "$SUM" >/dev/null
  pkill -9 -f "$B/devproxy serve --backend $BACKEND --socket $S1"; pkill -9 -f "$B/devproxy serve --backend $BACKEND --socket $S2"
  sleep 0.3
  for r in 0 1; do
    ( DEVPROXY_RESTORE_ATTEMPT=gpucheck NCCL_HOSTID=devproxy-rank$r timeout 240 "$B/devproxy" restore "$W/ddp2-img" --ranks $r --backend "$BACKEND" >>"$LOG" 2>&1 & )
  done
  wait
  cat "$W/ddp2c.0.err" "$W/ddp2c.1.err" >>"$LOG"
  ref=$(grep -m1 '^checksum' "$W/ddp2.ref")
  p0=$(grep -m1 '^checksum' "$W/ddp2c.0"); p1=$(grep -m1 '^checksum' "$W/ddp2c.1")
  if [ -n "$job" ] && [ -n "$ref" ] && [ "$ref" = "$p0" ] && [ "$ref" = "$p1" ]; then
    pass "nccl2: the 2-rank job ($job) checkpointed with --stop, servers killed, ranks restored by two servers, real NCCL re-created: $p0 on both, identical to the CPU reference"
  else
    fail "nccl2: 2-rank job checkpoint/restore: job '${job:-not found}', reference '$ref', rank 0 '${p0:-none}', rank 1 '${p1:-none}': $(grep -h -m1 -iE 'error|panic|refused' "$W/ddp2c.0.err" "$W/ddp2c.1.err" | head -n2 | tr '\n' ' ')"
  fi
  cleanup_servers
fi

rm -rf "$W"
say "done $(date -u +%H:%M:%SZ)"
grep -c '^PASS' "$SUM" | xargs echo "passed:" | tee -a "$SUM"
grep -c '^FAIL' "$SUM" | xargs echo "failed:" | tee -a "$SUM"
