#!/usr/bin/env bash
# One call on a GPU machine: build the CUDA extension, print what is usable, run the gpu test tier,
# run compute-sanitizer (memcheck, racecheck) on a small case, run the benchmarks. Everything lands
# flat in OUTDIR: log.txt (build, info, benchmark output), tests.txt, sanitizer.txt, <device>.csv
# and three PNGs.
#
#   scripts/gpu_check.sh OUTDIR          # the quick benchmark suite; about 9 minutes in all
#   scripts/gpu_check.sh OUTDIR full     # the full suite (give it more time: GPU_CHECK_SECONDS)
#
# Each step has a time limit so that a hang in one still leaves the others' logs; the benchmark
# step gets whatever time is left and stops starting new cases before it runs out.
set -uo pipefail

OUT=${1:?usage: scripts/gpu_check.sh OUTDIR [full]}
SUITE=--quick
[[ "${2:-}" == "full" ]] && SUITE=""
TOTAL=${GPU_CHECK_SECONDS:-540}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
LOG=$OUT/log.txt
START=$SECONDS

left() { echo $(( TOTAL - (SECONDS - START) )); }
limit() { local want=$1 l; l=$(left); (( l - 60 < want )) && want=$(( l - 60 )); (( want < 10 )) && want=10; echo "$want"; }
step() { echo; echo "== $* ($(date -u +%H:%M:%S) UTC, $(left) s left)"; }

{
    step "device"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
    python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| triton', triton.__version__)"

    step "build (pip install --no-build-isolation -e .; the machine has no package registry)"
    timeout "$(limit 240)" pip install --no-build-isolation --no-deps -e . > "$OUT/build.tmp" 2>&1
    echo "build exit status: $?"
    tail -n 60 "$OUT/build.tmp"
    rm -f "$OUT/build.tmp"

    step "python -m fastbert.info"
    timeout 60 python -m fastbert.info
} > "$LOG" 2>&1

{
    step "gpu test tier: python -m pytest -m gpu -q"
    timeout "$(limit 150)" python -m pytest -m gpu -q -rs -p no:cacheprovider --durations=10
    echo "pytest exit status: $?"
} > "$OUT/tests.txt" 2>&1

# A small case with odd sizes (partial tiles everywhere) on the CUDA backend, or on Triton when the
# extension is not usable, forward and backward of every op.
SANITIZE_PY=$(mktemp /tmp/fastbert_sanitize.XXXXXX.py)
cat > "$SANITIZE_PY" <<'EOF'
import torch
import fastbert
from fastbert import cuda

reason = cuda.unavailable_reason()
backend = "cuda" if reason is None else "triton"
print(f"backend {backend}" + ("" if reason is None else f" (cuda unusable: {reason})"))
torch.manual_seed(0)
dev, dt = "cuda", torch.bfloat16
b, s, h, d = 2, 70, 3, 64
q, k, v = (torch.randn(b, s, h, d, device=dev, dtype=dt, requires_grad=True) for _ in range(3))
mask = torch.arange(s, device=dev)[None, :] < torch.tensor([s, 33], device=dev)[:, None]
for kw in (dict(), dict(causal=True), dict(dropout_p=0.1)):
    out = fastbert.attention(q, k, v, mask, backend=backend, **kw)
    out.backward(torch.randn_like(out))
x, r = (torch.randn(37, 96, device=dev, dtype=dt, requires_grad=True) for _ in range(2))
w = torch.randn(96, device=dev, dtype=dt, requires_grad=True)
bias = torch.randn(96, device=dev, dtype=dt, requires_grad=True)
y = fastbert.add_layer_norm(x, r, w, bias, dropout_p=0.1, backend=backend)
y.backward(torch.randn_like(y))
w2 = torch.randn(200, 96, device=dev, dtype=dt, requires_grad=True)
b2 = torch.randn(200, device=dev, dtype=dt, requires_grad=True)
z = fastbert.linear_bias_gelu(x, w2, b2, backend=backend)
z.backward(torch.randn_like(z))
torch.cuda.synchronize()
print("sanitizer case finished")
EOF
SANITIZER=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -n 1)
{
    if [[ -z "$SANITIZER" ]]; then
        echo "compute-sanitizer not found: not run"
    else
        for tool in memcheck racecheck; do
            step "compute-sanitizer --tool $tool"
            timeout "$(limit 90)" "$SANITIZER" --tool "$tool" --print-limit 20 --error-exitcode 3 \
                python "$SANITIZE_PY"
            echo "compute-sanitizer $tool exit status: $? (0 = clean, 3 = errors found, 124 = timed out)"
        done
    fi
} > "$OUT/sanitizer.txt" 2>&1
rm -f "$SANITIZE_PY"

{
    BUDGET=$(( $(left) - 45 ))
    (( BUDGET < 30 )) && BUDGET=30
    step "python -m benchmarks $SUITE --out OUTDIR --budget $BUDGET"
    timeout "$(( BUDGET + 30 ))" python -m benchmarks $SUITE --out "$OUT" --budget "$BUDGET"
    echo "benchmarks exit status: $?"
    step "done"
} >> "$LOG" 2>&1

# the summary, for whoever reads only this call's output
ls -l "$OUT"
tail -n 3 "$OUT/tests.txt"
grep -E "^backend|ERROR SUMMARY|exit status|not found" "$OUT/sanitizer.txt"
sed -n '/^measured ceilings/,$p' "$LOG" | tail -n 120
