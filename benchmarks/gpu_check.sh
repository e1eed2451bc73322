#!/usr/bin/env bash
# Every check that needs a GPU, in one command: ≤ 8 minutes on one H100/H200 with what that
# machine has (PyTorch 2.11 + CUDA, Triton 3.6, transformers, pytest; nothing to download or carry).
#
#   OUT=DIR bash benchmarks/gpu_check.sh      (from the repository root; DIR default benchmarks/results/gpu/check)
#
# 1. correctness on the GPU: the compiled Triton kernel's cases (tests/test_decode_kernel.py with
#    MLA_PASS_KERNEL_DEVICE=cuda) and the static-cache decode tests;
# 2. the latent kernel alone: bandwidth and speed-up against SDPA on the original K/V, by shape
#    (benchmarks/gpu_decode.py);
# 3. the whole model: decode ms/token, original vs converted, growing cache, static cache and static
#    cache under CUDA graphs, SmolLM2-135M at T = 4k / 16k / 64k, batch 1 and 16, plus the GPU checks
#    (benchmarks/gpu_model_decode.py);
# then one JSON (gpu_check.json: test outcome, kernel table, model rows and checks) beside the PNGs.
# Without CUDA (a dry run on CPU) every step runs up to its first CUDA call and says so.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu/check}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MLA_PASS_KERNEL_DEVICE=cuda
started=$(date +%s)
"$PY" -c "import torch, sys; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
          torch.cuda.get_device_name() if torch.cuda.is_available() else '')" | tee "$OUT/device.log"

timeout 120 "$PY" -m pytest -q -p no:cacheprovider tests/test_decode_kernel.py tests/test_static_cache.py \
    > "$OUT/tests.log" 2>&1
echo "tests: exit $? ($(tail -n 1 "$OUT/tests.log"))" | tee -a "$OUT/device.log"

timeout 100 "$PY" benchmarks/gpu_decode.py --no-smoke --plot "$OUT/kernel.png" > "$OUT/kernel.log" 2>&1
echo "kernel benchmark: exit $?" | tee -a "$OUT/device.log"

timeout 240 "$PY" benchmarks/gpu_model_decode.py --shapes SmolLM2-135M --steps 10 --json "$OUT/model_decode.json" \
    --plot "$OUT/model_decode.png" > "$OUT/model_decode.log" 2>&1
echo "model benchmark: exit $?" | tee -a "$OUT/device.log"

"$PY" - "$OUT" "$started" <<'EOF'
import json, pathlib, sys, time
out, started = pathlib.Path(sys.argv[1]), float(sys.argv[2])
read = lambda name: (out / name).read_text() if (out / name).exists() else ""
model = json.loads(read("model_decode.json") or "{}")
summary = {"device": read("device.log").splitlines()[:1], "tests": read("tests.log").strip().splitlines()[-1:],
           "kernel_table": [l for l in read("kernel.log").splitlines() if l.startswith("|")],
           "model_checks": model.get("checks"), "model_rows": model.get("rows"), "seconds": round(time.time() - started)}
(out / "gpu_check.json").write_text(json.dumps(summary, indent=1))
print(f"gpu_check: {summary['seconds']} s; {out / 'gpu_check.json'}")
EOF
