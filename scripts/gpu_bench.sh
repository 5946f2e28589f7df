#!/usr/bin/env bash
# The prepared GPU run of issue 7 (docs/benchmarks.md, "GPU: prepared"), for a session that is
# lent the device machine: one phase per device command, each under the tool's 10-minute limit,
# every group of rows in its own process under its own time limit (a group that overruns is
# stopped and the next one still runs). Reports and logs go to $OUT (at most 8 files come back).
#
#   bash scripts/gpu_bench.sh targets   # the timed targets with their diffusers peers
#   bash scripts/gpu_bench.sh memory    # SDXL training with remat, the largest sampling batches
#
# diffusers travels as wheels in .whl/ (carry ".whl"; see docs/benchmarks.md for the download).
set -u
phase=${1:-targets}
if [[ "$phase" != targets && "$phase" != memory ]]; then
    echo "gpu_bench.sh: unknown phase '$phase' (targets or memory)" >&2
    exit 2
fi
OUT=${OUT:-bench-out}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 2
    export PYTHONPATH="/tmp/site:$PWD"
else
    export PYTHONPATH="$PWD"
fi
export PYTHONUNBUFFERED=1
log="$OUT/$phase.log"
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; } \
    >> "$log" 2>&1

group() {  # group NAME SECONDS FLAGS...: one benchmark process, its report in $OUT/NAME.json
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit} s): $*" >> "$log"
    timeout "$limit" python3 scripts/benchmark.py --json "$OUT/$name.json" "$@" >> "$log" 2>&1
    echo "== $name: exit $?" >> "$log"
}

case "$phase" in
    targets)
        # Cold compiles (no cache), then text-to-image again from the persistent cache filled
        # by the first run: that second compile_s is the warm-compile target.
        group unet-vae 170 --rows sd15-unet vae-decode text-encode --compare
        group sdxl-unet 150 --rows sdxl-unet --compare
        group txt2img-train 170 --rows sd15-txt2img sd15-train --compare --cache /tmp/xla-cache
        group txt2img-warm 60 --rows sd15-txt2img --no-compare --cache /tmp/xla-cache
        ;;
    memory)
        # Each in a fresh process: these rows let jax's pool take 95% of the GPU.
        group sdxl-train 200 --rows sdxl-train --compare
        group sd15-max-batch 170 --rows sd15-max-batch
        group sdxl-max-batch 200 --rows sdxl-max-batch
        ;;
esac
tail -n 60 "$log"
