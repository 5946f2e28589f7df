#!/usr/bin/env bash
# The prepared GPU run of issue 7 (docs/benchmarks.md, "GPU: the prepared run"), for a session
# that is lent the device machine, whose 15 minutes of device time include the machine's start.
# One phase per device command, each inside a total of SECONDS; its groups of rows run in priority
# order, each in its own process, each limited to what is left of SECONDS less what the groups
# after it are promised. A report is rewritten after every row, so a group stopped at its limit
# keeps the rows it finished. Reports and logs go to $OUT (at most 8 files come back), with XLA's
# autotuning results (below).
#
#   bash scripts/gpu_bench.sh targets [SECONDS]   # the timed targets and their diffusers peers
#   bash scripts/gpu_bench.sh train [SECONDS]     # text encoding and the SD 1.5 train step only
#   bash scripts/gpu_bench.sh memory [SECONDS]    # SDXL training with remat; SD 1.5's at b32
#   bash scripts/gpu_bench.sh train32 [SECONDS]   # SD 1.5's train step at b32 only
#   bash scripts/gpu_bench.sh maxbatch [SECONDS]  # the largest SD 1.5 and SDXL sampling batches
#   bash scripts/gpu_bench.sh profile [SECONDS]   # the UNet steps with their peers, and traces
#   bash scripts/gpu_bench.sh flags [SECONDS]     # XLA flag candidates, a call's dispatch cost
#
# SECONDS defaults to 540. diffusers travels as wheels in .whl/ (carry ".whl"; see
# docs/benchmarks.md for the download). GPU_BENCH_DRY=1 prints each group's command and limit
# instead of running it (tests/test_bench.py checks the rows and flags that way).
set -u
phase=${1:-targets}
total=${2:-540}
case "$phase" in
    targets | train | memory | train32 | maxbatch | profile | flags) ;;
    *)
        echo "gpu_bench.sh: unknown phase '$phase' (targets, train, memory, train32, maxbatch," \
            "profile or flags)" >&2
        exit 2
        ;;
esac
if ! [[ "$total" =~ ^[0-9]+$ ]] || ((total < 60)); then
    echo "gpu_bench.sh: SECONDS must be a whole number >= 60, got '$total'" >&2
    exit 2
fi
dry=${GPU_BENCH_DRY:-0}
OUT=${OUT:-bench-out}
log="$OUT/$phase.log"

# XLA's autotuning results (one file per fusion, the kernels it chose for each product,
# convolution and fusion), kept from one device session to the next. Most of a compile on the
# device is autotuning: the SD 1.5 train step compiled in 112 s on an H200 and in 62 s here
# without a GPU, on 2 cores and without autotuning (docs/benchmarks.md, session 18). The results
# of earlier runs with the same jaxlib travel in the repository ($autotune_carried); each phase
# returns its folder as $OUT/xla-autotune.tar.xz, to be saved there. The cold-compile target's
# group runs without it (`cold`), so that compile stays cold.
autotune=/tmp/xla-autotune
autotune_flag=--xla_gpu_per_fusion_autotune_cache_dir
autotune_carried=docs/runs/xla-autotune/jaxlib-VERSION.tar.xz
cold=${XLA_FLAGS:-}  # XLA_FLAGS without the autotuning folder
if [[ "$dry" == 1 ]]; then
    echo "autotune $autotune_flag=$autotune $autotune_carried" >&2
    export XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }$autotune_flag=$autotune"
else
    mkdir -p "$OUT"
    if compgen -G ".whl/*.whl" > /dev/null; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site .whl/*.whl || exit 2
        export PYTHONPATH="/tmp/site:$PWD"
    else
        export PYTHONPATH="$PWD"
    fi
    export PYTHONUNBUFFERED=1
    { date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; } \
        >> "$log" 2>&1
    jaxlib=$(python3 -c 'import jaxlib; print(jaxlib.__version__)' 2>> "$log")
    autotune_carried=${autotune_carried/VERSION/$jaxlib}
    mkdir -p "$autotune"
    if [[ -f "$autotune_carried" ]] && ! tar -C "$autotune" -xJf "$autotune_carried" >> "$log" 2>&1
    then
        echo "== autotune: cannot unpack $autotune_carried; starting empty" >> "$log"
        rm -rf "$autotune" && mkdir -p "$autotune"
    fi
    # XLA aborts a process at its first compile on a flag it does not know: try it once.
    if XLA_FLAGS="${XLA_FLAGS:-} $autotune_flag=$autotune" python3 -c 'import jax
jax.jit(lambda x: x + 1)(1.0).block_until_ready()' >> "$log" 2>&1; then
        export XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }$autotune_flag=$autotune"
        echo "== autotune: jaxlib $jaxlib, $(find "$autotune" -type f | wc -l) results" \
            "($autotune_carried)" >> "$log"
    else
        echo "== autotune: off (XLA refused $autotune_flag)" >> "$log"
    fi
fi
SECONDS=0

# group NAME CAP RESERVE FLAGS...: one benchmark process, its report in $OUT/NAME.json, limited
# to CAP seconds and to what is left of the total less RESERVE (the groups after it); skipped
# when under 30 seconds are left for it.
group() {
    local name=$1 cap=$2 reserve=$3
    shift 3
    local limit=$((total - SECONDS - reserve))
    ((limit > cap)) && limit=$cap
    if [[ "$dry" == 1 ]]; then
        echo "$name $limit scripts/benchmark.py --json $OUT/$name.json $*"
        [[ "${XLA_FLAGS:-}" == *"$autotune_flag"* ]] && echo "$name autotunes from $autotune" >&2
        return
    fi
    if ((limit < 30)); then
        echo "== $name: skipped, ${limit} s left for it" >> "$log"
        return
    fi
    echo "== $name (limit ${limit} s, at ${SECONDS} s): $*" >> "$log"
    timeout "$limit" python3 scripts/benchmark.py --json "$OUT/$name.json" "$@" >> "$log" 2>&1
    echo "== $name: exit $? after ${SECONDS} s" >> "$log"
}

# A phase that traces writes to $traces, emptied first: two phases in one device command must
# not summarize each other's traces. summarize_traces [PREFIX]: the summary of the traces there
# ($OUT/PREFIXprofile-summary.txt) and, if under 15 MiB, an archive of them
# ($OUT/PREFIXtraces.tar.xz). The traces stay outside $OUT (each may be tens of MB).
traces=/tmp/jaxdiff-traces
fresh_traces() {
    [[ "$dry" == 1 ]] || rm -rf "$traces"
}
summarize_traces() {
    local prefix=${1:-}
    if [[ "$dry" == 1 ]] || ! compgen -G "$traces/*.xplane.pb" > /dev/null; then
        return
    fi
    python3 scripts/profile_summary.py "$traces"/*.xplane.pb --top 40 \
        > "$OUT/${prefix}profile-summary.txt" 2>> "$log"
    tar -C "$traces" -cJf "/tmp/${prefix}traces.tar.xz" . 2>> "$log"
    if (($(stat -c %s "/tmp/${prefix}traces.tar.xz") <= 15 * 1024 * 1024)); then
        cp "/tmp/${prefix}traces.tar.xz" "$OUT/"
    else
        echo "== traces: $(du -sh "$traces" | cut -f1), archive too large to return" >> "$log"
    fi
}

case "$phase" in
    targets)
        # The SD 1.5 UNet, VAE and text-to-image targets first (cold compiles, the cache
        # filling), then text-to-image again in a new process from that cache (the warm-compile
        # target), then SDXL's UNet (the slowest to draw and compile), then text encoding and the
        # train step. Sized from session 11's run on an H200: 75 s, 15 s and 102 s for the first
        # group's rows, 35 s for the warm run, 95 s for SDXL's.
        XLA_FLAGS=$cold group targets 240 300 --rows sd15-unet vae-decode sd15-txt2img \
            --compare --cache /tmp/xla-cache
        if [[ "$dry" == 1 ]] || python3 -c 'import json, sys
results = json.load(open(sys.argv[1]))["results"]
sys.exit(not any(r["row"] == "sd15-txt2img" for r in results))' "$OUT/targets.json" 2> /dev/null
        then
            group txt2img-warm 60 240 --rows sd15-txt2img --no-compare --cache /tmp/xla-cache
        else
            echo "== txt2img-warm: skipped, the cold run measured no sd15-txt2img case" >> "$log"
        fi
        group sdxl-unet 130 110 --rows sdxl-unet --compare
        group train "$total" 0 --rows text-encode sd15-train --compare
        ;;
    train)
        # The rows that `targets` runs last, on their own where the others were measured already,
        # with jax's profiler around 3 more steps (as the `profile` phase). Session 14 on an H200:
        # text-encode 21 s; sd15-train 118 s with its peer, 95 s of it the step's compile.
        fresh_traces
        group train "$total" 0 --rows text-encode sd15-train --compare --profile "$traces"
        summarize_traces "train-"
        ;;
    memory)
        # In a fresh process, where jax's pool may take 95% of the GPU. Its report gives XLA's
        # plan for the step (`memory_bytes`) and the allocator's peak (`device_peak_bytes`), to
        # set against an 80 GB card's 79.6 GiB. Then, in what time is left, SD 1.5's step at
        # batch 32 with its peer. Session 17 (H200): sdxl-train took 330 s, and the batch-32 row,
        # left 85 s, was stopped inside its compile (112 s at batch 8): it needs about 200 s.
        group sdxl-train "$total" 0 --rows sdxl-train --compare
        group sd15-train-b32 "$total" 0 --rows sd15-train-b32 --compare
        ;;
    train32)
        # SD 1.5's train step at batch 32 with its peer, on its own: images/s where the step's
        # fixed costs (AdamW and the EMA over 860 M weights) are shared by 4x the images of the
        # `train` phase's batch 8, whose device span (77 ms, session 17) caps it at about 104
        # images/s. About 200 s without autotuning results (session 17 stopped it compiling).
        group sd15-train-b32 "$total" 0 --rows sd15-train-b32 --compare
        ;;
    maxbatch)
        # Each in a fresh process, where jax's pool may take 95% of the GPU; each search compiles
        # text-to-image at several batches (about 20 s each).
        group sd15-max-batch 300 60 --rows sd15-max-batch
        group sdxl-max-batch "$total" 0 --rows sdxl-max-batch
        ;;
    profile)
        # The UNet cases (SD 1.5 b2 and b16, SDXL b2 and b8) timed with their peers, then jax's
        # profiler around 3 more calls of each jaxdiff case. While jax's profiler traces, XLA runs
        # its kernels one by one, not in CUDA graphs, so the traced calls attribute time but are
        # not timings. Their summary and archive come back (`summarize_traces`).
        fresh_traces
        group profile "$total" 0 --rows sd15-unet sdxl-unet --compare --profile "$traces"
        summarize_traces
        ;;
    flags)
        # A/B groups, each a new process under one candidate set of XLA flags (`--xla-flags`),
        # against the `profile` phase's timings on the same machine, in priority order: no CUDA
        # graphs (the control, and a test of the 1.7-3.5 ms a call costs beyond the device's
        # span), cuBLAS for every product with the latency-hiding scheduler, a call's cost per
        # parameter array with laid-out kernels and per array of a train state (`dispatch`);
        # then the two sets session 14 measured and did not keep (convolutions in CUDA graphs
        # for SD 1.5; no merged matrix products for SDXL), as re-checks. Session 14: about 55 s
        # a sd15-unet group on an H200.
        group xla-nographs 80 0 --rows sd15-unet --no-compare --xla-flags nographs
        group xla-gpu 80 0 --rows sd15-unet --no-compare --xla-flags gpu
        group dispatch 70 0 --rows dispatch --runs 50 --warmup 5
        group xla-graphs 80 0 --rows sd15-unet --no-compare --xla-flags graphs
        group xla-nomerge 120 0 --rows sdxl-unet --no-compare --xla-flags nomerge
        ;;
esac
if [[ "$dry" != 1 ]] && [[ -n "$(ls -A "$autotune" 2> /dev/null)" ]]; then
    tar -C "$autotune" -cJf "$OUT/xla-autotune.tar.xz" . 2>> "$log"
    echo "== autotune: $(find "$autotune" -type f | wc -l) results returned" >> "$log"
fi
[[ "$dry" == 1 ]] || tail -n 60 "$log"
