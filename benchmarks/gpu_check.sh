#!/usr/bin/env bash
# GPU device check: exercises the CUDA path end to end and measures throughput, in one short run (about 5 minutes on
# one H200). Writes everything under $OUT (default: runs/gpu_check): gpu_check.log, the default grid's leaderboard,
# the throughput benchmark's JSON and own-model checks. Results go into benchmarks/RESULTS.md's GPU section.
#
#   bash benchmarks/gpu_check.sh            # on a machine with CUDA and the project installed
#
# On a bare machine whose Python lacks some dependencies, put their wheels in .whl/ (see the device tool's notes);
# they are installed into /tmp/site first, with the project itself (no network is used).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-runs/gpu_check}"
mkdir -p "$OUT"
# PYTHONSAFEPATH: run from the repository root without its robustbench_med/ folder shadowing the installed package
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONSAFEPATH=1
export ROBUSTBENCH_MED_HOME="${ROBUSTBENCH_MED_HOME:-/tmp/rbm_gpu_home}"
PY="${PY:-python3}"
log() { echo "== $(date +%T) $*" | tee -a "$OUT/gpu_check.log"; }

if ! "$PY" -c "import robustbench_med" 2>/dev/null; then
  log "installing the project (and carried wheels) into /tmp/site"
  ls .whl/*.whl >/dev/null 2>&1 && "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --upgrade --target /tmp/site . || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  export PATH=/tmp/site/bin:$PATH
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee -a "$OUT/gpu_check.log"
"$PY" - <<'EOF' 2>&1 | tee -a "$OUT/gpu_check.log"
import torch, robustbench_med
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
EOF

log "own model on CUDA: benchmark() of a BatchNorm CNN; flags, statistics and device restored"
"$PY" - <<'EOF' 2>&1 | tee -a "$OUT/gpu_check.log"
import time, torch
from torch import nn
import robustbench_med as rbm
torch.manual_seed(0)
net = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 3)).cuda().train()
state = {k: v.clone() for k, v in net.state_dict().items()}
t = time.perf_counter()
df = rbm.benchmark(net, task="classification", mean=0.25, std=0.25, eps=["2/255", "8/255"], attacks="standard", n=256, device="cuda")
print(df[["attack", "eps_display", "clean", "robust"]].to_string(), f"\n{time.perf_counter() - t:.1f} s")
same = all(torch.equal(state[k], v) for k, v in net.state_dict().items())
print("statistics unchanged:", same, "| training flag restored:", net.training, "| still on", next(net.parameters()).device)
assert same and net.training and next(net.parameters()).is_cuda
EOF

log "default grid on CUDA (training included)"
start=$(date +%s)
timeout 300 "$PY" -m robustbench_med run default --device cuda --out "$OUT/default" --quiet > "$OUT/default_run.log" 2>&1
rc=$?
log "default grid: exit $rc in $(( $(date +%s) - start )) s"
tail -n 40 "$OUT/default_run.log" >> "$OUT/gpu_check.log"

log "compute settings on CUDA: the same grid in float32 and with {autocast: bf16, channels_last: true} (side by side)"
OUT="$OUT" "$PY" - <<'EOF' 2>&1 | tee -a "$OUT/gpu_check.log"
import os, sqlite3, time
from robustbench_med.grid import parse_grid
from robustbench_med.runner import run_grid
out = os.environ["OUT"]
base = {"name": "compute", "n_examples": 256, "unit_size": 256, "victims": ["resnet18.phantom", "unet.phantom"],
        "attacks": [{"name": "pgd.linf", "params": {"eps": "8/255", "steps": 20}}]}
seconds, robust = {}, {}
for label, compute in (("float32", None), ("bf16 autocast + channels_last", {"autocast": "bf16", "channels_last": True})):
    grid = parse_grid({**base, **({"compute": compute} if compute else {})})
    t = time.perf_counter()
    db = run_grid(grid, f"{out}/compute-{label.split()[0]}", device="cuda", progress=False)
    seconds[label] = time.perf_counter() - t
    con = sqlite3.connect(db)
    robust[label] = con.execute("SELECT c.victim, ROUND(AVG(s.adv_score), 3) FROM samples s JOIN cells c USING (cell_id) GROUP BY 1").fetchall()
    con.close()
for label in seconds:
    print(f"{label:32s} {seconds[label]:7.1f} s  {seconds['float32'] / seconds[label]:.2f}x  robust {robust[label]}")
EOF

log "throughput benchmark on CUDA"
timeout 240 "$PY" benchmarks/bench_throughput.py --victim resnet18.phantom --n 256 --repeats 3 --json "$OUT/throughput.json" \
  2>&1 | tail -n 40 | tee -a "$OUT/gpu_check.log"
log "done"
