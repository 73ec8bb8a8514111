#!/usr/bin/env bash
# One call on a GPU machine, sized for 7 minutes on an H100/H200 (GPU_CHECK_SECONDS, default 400),
# most valuable results first, so that a run cut short still reports them:
#   1. device and versions                               (seconds)
#   2. CUDA extension build for this GPU's arch only, all cores, in the background;
#      meanwhile the Triton gpu tests (they need no extension)
#   3. fastbert.info, then the remaining gpu tests (CUDA backend, model), then small-batch
#      inference latency (BERT-base, batch 1/8/32, 16-128 tokens: fastbert eager / lean /
#      cuda_graphs / Triton with and without pre-bound launches against transformers eager / sdpa
#      and torch.compile reduce-overhead; benchmarks/small_batch.py, preset "check")
#      and the Triton kernels at a09870e (before issue 21; FASTBERT_BEFORE_REV) and now, timed
#      side by side (needs the git history), and RoPE fused into the attention forward against
#      an apply_rotary pass, for global and local layers (benchmarks/rope_fusion.py)
#   4. the quick benchmarks -> <device>.csv (written case by case) and the host-overhead numbers
#   5. compute-sanitizer memcheck (then racecheck, time allowing) on a small case
#   6. a summary that fits one screen (also in summary.txt)
# Every stage runs under `timeout`, capped by the time left. Everything lands flat in OUTDIR:
# summary.txt, log.txt (device, build, info, benchmarks), tests.txt, sanitizer.txt, <device>.csv
# and the benchmark PNGs (8 files at most: what a device call brings back).
#
#   scripts/gpu_check.sh OUTDIR          # quick benchmark suite
#   scripts/gpu_check.sh OUTDIR full     # full suite (give it more time: GPU_CHECK_SECONDS)
set -uo pipefail

OUT=${1:?usage: scripts/gpu_check.sh OUTDIR [full]}
SUITE=--quick
[[ "${2:-}" == "full" ]] && SUITE=""
TOTAL=${GPU_CHECK_SECONDS:-400}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
LOG=$OUT/log.txt TESTS=$OUT/tests.txt SAN=$OUT/sanitizer.txt SUMMARY=$OUT/summary.txt
: > "$LOG"; : > "$TESTS"; : > "$SAN"
START=$SECONDS
PY=$(command -v python3 || command -v python)
export PYTHONUNBUFFERED=1
NPROC=$(nproc 2>/dev/null || echo 4)

left() { echo $(( TOTAL - (SECONDS - START) )); }
# limit WANT [RESERVE]: at most WANT seconds, leaving RESERVE (default 20) for what follows
limit() { local want=$1 reserve=${2:-20} l; l=$(( $(left) - reserve )); (( l < want )) && want=$l; (( want < 5 )) && want=5; echo "$want"; }
step() { echo; echo "== $* ($(date -u +%H:%M:%S) UTC, $(left) s left)"; }
declare -A STAGE_S STAGE_RC
run_stage() {  # run_stage NAME SECONDS cmd...: timed, its exit status kept for the summary
    local name=$1 secs=$2 t0=$SECONDS; shift 2
    timeout --kill-after=5 "$secs" "$@"
    STAGE_RC[$name]=$?
    STAGE_S[$name]=$(( SECONDS - t0 ))
    (( STAGE_RC[$name] == 124 || STAGE_RC[$name] == 137 )) && echo "!! $name stopped at its ${secs} s limit"
    progress "$name exit ${STAGE_RC[$name]} after ${STAGE_S[$name]} s"
    return 0
}
# one line per stage on the terminal as it ends, for a run cut short before the summary
progress() { echo "[gpu_check $(( SECONDS - START )) s] $*" >&3; }
exec 3>&1

# ---- 1. device ---------------------------------------------------------------------------
{
    step "device"
    nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv 2>&1
    "$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', torch.__version__, 'cuda', torch.version.cuda, '| triton', triton.__version__); print('cuda available:', torch.cuda.is_available())"
} >> "$LOG" 2>&1
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: no CUDA GPU is visible to torch here; nothing to check (see $LOG)" | tee "$SUMMARY"
    tail -n 5 "$LOG"
    exit 2
fi
CAP=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d ' .')
[[ -z "$CAP" ]] && CAP=$("$PY" -c "import torch; print('%d%d' % torch.cuda.get_device_capability())")
ARCH=$CAP; [[ "$CAP" == 90 ]] && ARCH=90a  # wgmma needs the arch-specific target

# ---- 2. build in the background, Triton gpu tests meanwhile -------------------------------
BUILD_T0=$SECONDS
( FASTBERT_CUDA_ARCHS=$ARCH CMAKE_BUILD_PARALLEL_LEVEL=$NPROC MAX_JOBS=$NPROC \
      timeout --kill-after=5 "$(limit 200 180)" "$PY" setup.py build_ext --inplace > "$OUT/build.tmp" 2>&1
  echo $? > "$OUT/build.rc" ) &
BUILD_PID=$!

{
    step "gpu tests, Triton backend (while the extension builds): pytest -m gpu tests/test_triton_*.py"
    run_stage triton_tests "$(limit 150 170)" "$PY" -m pytest -m gpu -q -rfEs -p no:cacheprovider \
        --tb=short --durations=5 tests/test_triton_*.py
    echo "pytest exit status: ${STAGE_RC[triton_tests]}"
} >> "$TESTS" 2>&1

wait "$BUILD_PID"
STAGE_RC[build]=$(cat "$OUT/build.rc" 2>/dev/null || echo 1)
STAGE_S[build]=$(( SECONDS - BUILD_T0 ))
progress "build exit ${STAGE_RC[build]} after ${STAGE_S[build]} s"
{
    step "build: FASTBERT_CUDA_ARCHS=$ARCH setup.py build_ext --inplace (-j $NPROC): exit ${STAGE_RC[build]}, ${STAGE_S[build]} s"
    tail -n 40 "$OUT/build.tmp"
    rm -f "$OUT/build.tmp" "$OUT/build.rc"
    step "python -m fastbert.info"
    run_stage info "$(limit 60 150)" "$PY" -m fastbert.info
} >> "$LOG" 2>&1

# ---- 3. the other gpu tests (CUDA backend, model, ops) -------------------------------------
{
    step "gpu tests, the rest: pytest -m gpu (not the Triton files)"
    run_stage gpu_tests "$(limit 120 140)" "$PY" -m pytest -m gpu -q -rfEs -p no:cacheprovider \
        --tb=short --durations=5 --ignore-glob='tests/test_triton_*.py' tests
    echo "pytest exit status: ${STAGE_RC[gpu_tests]}"
} >> "$TESTS" 2>&1

# ---- 3a. small-batch latency (issue 22): at most 110 s, compiles last ------------------------
{
    SB_LIMIT=$(limit 110 60)
    step "python -m benchmarks.small_batch --preset check --budget $(( SB_LIMIT - 10 ))"
    run_stage small_batch "$SB_LIMIT" "$PY" -m benchmarks.small_batch --preset check \
        --budget "$(( SB_LIMIT - 10 ))" --compile-seconds 45
} >> "$LOG" 2>&1

# ---- 3b. Triton kernels before / after issue 21, side by side (needs the git history) ---------
BEFORE_REV=${FASTBERT_BEFORE_REV:-a09870e}
BEFORE_DIR=$(mktemp -d /tmp/fastbert_before.XXXXXX)
TIMING_PY=$BEFORE_DIR/time_before_after.py
cat > "$TIMING_PY" <<'EOF'
"""ms per call of fastbert.triton's kernels now and at BEFORE_REV (fastbert_before_triton), BERT-base
shapes in bf16: B=32, S=512, H=12, D=64, hidden 768, FFN 3072."""
import sys

import torch
import triton.testing

import fastbert.triton as now
import fastbert_before_triton as before

torch.manual_seed(0)
dev, dt = "cuda", torch.bfloat16
b, s, h, d, hidden, ffn = 32, 512, 12, 64, 768, 3072
q, k, v, dout = (torch.randn(b, s, h, d, device=dev, dtype=dt) for _ in range(4))
mask = torch.arange(s, device=dev)[None, :] < torch.randint(s // 2, s + 1, (b, 1), device=dev)
x, r, dy = (torch.randn(b * s, hidden, device=dev, dtype=dt) for _ in range(3))
w, bias = torch.randn(hidden, device=dev, dtype=dt), torch.randn(hidden, device=dev, dtype=dt)
w1, b1 = torch.randn(ffn, hidden, device=dev, dtype=dt), torch.randn(ffn, device=dev, dtype=dt)
scale = d ** -0.5


def cases(m):
    for name, attn_mask, p in (("attention", None, 0.0), ("attention mask", mask, 0.0),
                               ("attention dropout", None, 0.1)):
        yield f"{name} fwd", lambda: m.attention_forward(q, k, v, attn_mask, False, p, scale, 1)
        out, lse = m.attention_forward(q, k, v, attn_mask, False, p, scale, 1)
        for det in (False, True):
            yield f"{name} bwd{' deterministic' if det else ''}", lambda det=det: \
                m.attention_backward(dout, q, k, v, out, lse, attn_mask, False, p, scale, 1, det)
    yield "add_layer_norm fwd dropout", lambda: m.add_layer_norm_forward(x, r, w, bias, 1e-12, 0.1, 1)
    _, mean, rstd = m.add_layer_norm_forward(x, r, w, bias, 1e-12, 0.1, 1)
    yield "add_layer_norm bwd dropout", lambda: m.add_layer_norm_backward(dy, x, r, w, mean, rstd,
                                                                          0.1, 1)
    yield "linear_bias_gelu fwd", lambda: m.linear_bias_gelu_forward(x, w1, b1, "none")


print(f"{'kernel (bf16, BERT-base)':34s} {'before ms':>10s} {'after ms':>10s} {'speedup':>8s}")
for (name, old), (_, new) in zip(cases(before), cases(now)):
    t_old, t_new = (triton.testing.do_bench(f, warmup=10, rep=40) for f in (old, new))
    print(f"{name:34s} {t_old:10.3f} {t_new:10.3f} {t_old / t_new:7.2f}x")
    sys.stdout.flush()
EOF
{
    step "Triton kernels before ($BEFORE_REV) / after, side by side"
    if git rev-parse --verify -q "$BEFORE_REV^{commit}" > /dev/null 2>&1; then
        mkdir -p "$BEFORE_DIR/fastbert_before_triton"
        for f in $(git ls-tree --name-only "$BEFORE_REV" fastbert/triton/ | grep '\.py$'); do
            git show "$BEFORE_REV:$f" | sed 's/fastbert\.triton/fastbert_before_triton/g' \
                > "$BEFORE_DIR/fastbert_before_triton/$(basename "$f")"
        done
        PYTHONPATH="$BEFORE_DIR${PYTHONPATH:+:$PYTHONPATH}" \
            run_stage before_after "$(limit 90 150)" "$PY" "$TIMING_PY"
    else
        echo "no git history with $BEFORE_REV here: not run"
    fi
} >> "$LOG" 2>&1
rm -rf "$BEFORE_DIR"

# ---- 3c. RoPE inside the attention forward vs an apply_rotary pass (issue 20), per layer kind --
{
    step "python -m benchmarks.rope_fusion"
    run_stage rope_fusion "$(limit 40 130)" "$PY" -m benchmarks.rope_fusion
} >> "$LOG" 2>&1

# ---- 4. quick benchmarks (CSV written case by case, so a cut run keeps what it measured) ----
{
    BUDGET=$(( $(left) - 90 ))
    (( BUDGET < 30 )) && BUDGET=30
    step "python -m benchmarks $SUITE --out OUTDIR --budget $BUDGET"
    run_stage benchmarks "$(( BUDGET + 45 ))" "$PY" -m benchmarks $SUITE --out "$OUT" --budget "$BUDGET"
    echo "benchmarks exit status: ${STAGE_RC[benchmarks]}"
} >> "$LOG" 2>&1

# ---- 5. compute-sanitizer on a small case: odd sizes, partial tiles, every op fwd + bwd --------
SANITIZE_PY=$(mktemp /tmp/fastbert_sanitize.XXXXXX.py)
cat > "$SANITIZE_PY" <<'EOF'
import torch
import fastbert
from fastbert import cuda

reason = cuda.unavailable_reason()
backends = ["triton"] + (["cuda"] if reason is None else [])
print(f"backends {backends}" + ("" if reason is None else f" (cuda unusable: {reason})"))
torch.manual_seed(0)
dev, dt = "cuda", torch.bfloat16
b, s, h, d = 2, 70, 3, 64
q, k, v = (torch.randn(b, s, h, d, device=dev, dtype=dt, requires_grad=True) for _ in range(3))
mask = torch.arange(s, device=dev)[None, :] < torch.tensor([s, 33], device=dev)[:, None]
x, r = (torch.randn(37, 96, device=dev, dtype=dt, requires_grad=True) for _ in range(2))
w = torch.randn(96, device=dev, dtype=dt, requires_grad=True)
bias = torch.randn(96, device=dev, dtype=dt, requires_grad=True)
w2 = torch.randn(200, 96, device=dev, dtype=dt, requires_grad=True)
b2 = torch.randn(200, device=dev, dtype=dt, requires_grad=True)
for backend in backends:
    for kw in (dict(), dict(causal=True), dict(dropout_p=0.1)):
        out = fastbert.attention(q, k, v, mask, backend=backend, **kw)
        out.backward(torch.randn_like(out))
    y = fastbert.add_layer_norm(x, r, w, bias, dropout_p=0.1, backend=backend)
    y.backward(torch.randn_like(y))
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
            (( $(left) < 25 )) && { echo "compute-sanitizer $tool: not run, no time left"; continue; }
            step "compute-sanitizer --tool $tool"
            run_stage "sanitizer_$tool" "$(limit 90 10)" "$SANITIZER" --tool "$tool" --print-limit 20 \
                --error-exitcode 3 "$PY" "$SANITIZE_PY"
            echo "compute-sanitizer $tool exit status: ${STAGE_RC[sanitizer_$tool]} (0 = clean, 3 = errors found, 124 = timed out)"
        done
    fi
} >> "$SAN" 2>&1
rm -f "$SANITIZE_PY"

# ---- 6. summary: one screen --------------------------------------------------------------
{
    echo "== gpu_check summary ($(( SECONDS - START )) s of $TOTAL s)"
    sed -n '/== device/,/cuda available/p' "$LOG" | grep -v "^==" | grep -v "^$" | head -n 4
    for s in build triton_tests info gpu_tests small_batch before_after rope_fusion benchmarks sanitizer_memcheck sanitizer_racecheck; do
        [[ -n "${STAGE_RC[$s]:-}" ]] && printf '%-20s exit %-3s %4s s\n' "$s" "${STAGE_RC[$s]}" "${STAGE_S[$s]}"
    done
    echo "-- tests (tests.txt)"
    grep -E "^(FAILED|ERROR) " "$TESTS" | cut -c1-160 | head -n 10
    grep -E "(passed|failed|skipped|error|no tests ran).* in [0-9.]+s" "$TESTS" | cut -c1-160
    echo "-- benchmarks (log.txt; CSV in OUTDIR)"
    "$PY" - "$OUT" <<'EOF' 2>&1 | head -n 18
import csv, glob, sys
from collections import defaultdict
files = [f for f in glob.glob(sys.argv[1] + "/*.csv")]
if not files:
    print("no CSV written"); sys.exit()
times = defaultdict(dict)
for row in csv.DictReader(open(files[0])):
    if row["metric"] == "time_ms" and row["mode"] in ("fwd+bwd", "train", "infer"):
        times[(row["op"], row["mode"], row["shape"])][row["provider"]] = float(row["value"])
print(f"{files[0].split('/')[-1]}, training and inference: ms (fastbert-triton / fastbert-cuda | best other)")
for (op, mode, shape), t in list(times.items())[:16]:
    ours = " / ".join(f"{t[p]:.3g}" if p in t else "-" for p in ("fastbert-triton", "fastbert-cuda"))
    others = {p: v for p, v in t.items() if not p.startswith("fastbert")}
    best = min(others, key=others.get) if others else None
    print(f"  {op} {mode} {shape}: {ours} | " + (f"{others[best]:.3g} {best}" if best else "-"))
EOF
    grep -A5 "^host overhead per layer" "$LOG" | cut -c1-160
    echo "-- small-batch latency (log.txt)"
    grep -A6 "^small-batch inference latency" "$LOG" | head -n 7 | cut -c1-160
    echo "-- Triton kernels before / after issue 21 (log.txt)"
    grep -A14 "^kernel (bf16, BERT-base)" "$LOG" | cut -c1-160
    echo "-- RoPE fused vs an apply_rotary pass (log.txt)"
    grep -A5 "^layer .*fused speedup" "$LOG" | cut -c1-160
    echo "-- sanitizer (sanitizer.txt)"
    grep -E "^backends|ERROR SUMMARY|exit status|not found|not run" "$SAN" | cut -c1-160
} > "$SUMMARY" 2>&1
cat "$SUMMARY"
