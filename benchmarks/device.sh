#!/usr/bin/env bash
# The accelerator's benchmark table in one command, on a machine with a GPU, from anywhere in the repository:
#
#   bash benchmarks/device.sh            [extra benchmarks.run arguments: --only ROWS, --smoke (on a CPU), --list]
#
# bf16 training rows (SFT, DPO) and the RTO PPO iteration at SmolLM2-135M's and Llama-3.2-1B's shapes, decode at
# batch 1 and 32 with the fraction of the memory read rate, and the attention implementations at 2k and 8k
# tokens, each beside its PyTorch peer (benchmarks/workloads.py: device_rows). It writes
# <out>/<date>-device.json, <out>/device-log.txt and, while it runs, <out>/.progress.json (a run cut off and
# started again on the same code measures only the rows left; see below). <out> is $OUT where set (the device
# tool's return folder), else benchmarks/results, relative to the repository root. Rows not started within
# $RTO_DEVICE_BUDGET seconds (default 420), and the one the budget cuts off, are recorded as skipped, so the file
# is written inside a short lease.
#
# From an agent session with a device (docs/performance.md#on-an-accelerator): `make device-wheels` here first
# (the packages the device image lacks or holds at other versions, as wheels in .whl/), then
#   run(command="bash benchmarks/device.sh", carry=[".whl"], timeout_s=540)
# and commit the returned <date>-device.json under benchmarks/results/. Rows skipped for the budget: save the
# returned .progress.json as benchmarks/results/device-progress.json, call again with that path in `carry` too.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/results}"
budget="${RTO_DEVICE_BUDGET:-420}"
python="${PYTHON:-python3}"
mkdir -p "$out"

if compgen -G ".whl/*.whl" >/dev/null; then
    site="$(mktemp -d)"
    trap 'rm -rf "$site"' EXIT
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl \
        || { echo "device.sh: could not install the wheels in .whl/" >&2; exit 2; }
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
# A run cut off by the budget leaves <out>/.progress.json (the rows measured so far). Saved here as
# benchmarks/results/device-progress.json (ignored by git) and carried, it makes this call measure only the rest.
if [ -f benchmarks/results/device-progress.json ] && [ ! -f "$out/.progress.json" ]; then
    cp benchmarks/results/device-progress.json "$out/.progress.json"
fi

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi"
    "$python" - <<'EOF'
from importlib import metadata
import jax
print("jax devices:", jax.devices())
for name in ("jax", "jaxlib", "flax", "optax", "torch", "transformers"):
    try:
        print(f"{name} {metadata.version(name)}")
    except metadata.PackageNotFoundError:
        print(f"{name} missing")
EOF
    "$python" -m benchmarks.run --suite device --budget "$budget" --timeout 300 --out "$out" "$@"
} 2>&1 | tee "$out/device-log.txt"
