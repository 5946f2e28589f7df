"""Profiles of benchmark cases: jax's profiler around a few calls, and a summary of the trace.

`python scripts/benchmark.py --profile DIR` writes, after each jax case's timing, a trace of
`PROFILE_CALLS` more calls to DIR/<row>-<case>.xplane.pb (an XSpace protobuf, what TensorBoard's
profile plugin and Perfetto's converters read). `summarize` reads one back with
`jax.profiler.ProfileData`, here or on the machine that made it: per line of the device's plane
(the host's on the CPU), its events, their total time, and the costliest names. Nested events
(the host's Python frames) count at each level; `timeline` says how much of the line's span its
events cover and where the gaps are (on a GPU stream: launch latency, and the host's work
between calls); `host_calls` splits each traced call's time on the host's thread among what ran
in it (jax's dispatch, the runtime's, the kernels' launches, the wait). It is how a device
session's few minutes turn into a breakdown to work from here.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from collections import defaultdict
from pathlib import Path

PROFILE_CALLS = 3

# The name of the annotation around each traced call on the host's Python thread (`trace_calls`):
# the roots of `host_calls`. Traces written before it (session 17's) have the harness's own
# frame there, `$harness.py:<line> call`, which `host_calls` takes in its place.
CALL_ANNOTATION = "jaxdiff traced call"
_HARNESS_CALL = re.compile(r"^\$harness\.py:\d+ call$")
# A thunk's, kernel's or CUDA graph's number: `host_calls` adds up, say, every
# `command_buffer_<n>` (one CUDA graph's launch) or `cudnn-conv-bw-filter.<n>` under one name.
_NUMBERED = re.compile(r"(?<=[A-Za-z][._])\d+$|(?<=CudaGraph:)\d+(?=\)$)")


def trace_name(row: str, case: str) -> str:
    """A file name for a case's trace: letters, digits, '.', '_' and '-' only."""
    return re.sub(r"[^A-Za-z0-9._]+", "-", f"{row}-{case}").strip("-") + ".xplane.pb"


def trace_calls(call, folder: str | Path, name: str, calls: int = PROFILE_CALLS) -> Path | None:
    """`calls` calls of `call` under jax's profiler; the trace moved to folder/name. None where
    the profiler wrote no trace."""
    import jax

    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp):
            for _ in range(calls):
                with jax.profiler.TraceAnnotation(CALL_ANNOTATION):
                    call()
        found = sorted(Path(tmp).rglob("*.xplane.pb"))
        if not found:
            return None
        dest = Path(folder) / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(found[-1]), dest)
    return dest


def timeline(intervals) -> dict:
    """How a line's (start_ns, end_ns) events cover its span: the span from the first start to
    the last end, the time covered by at least one event (nested and overlapping events once),
    and the gaps where none runs, in ms, largest first. On a GPU stream, where kernels run one
    after another, busy / span is the device's occupancy over the traced calls, and the gaps are
    launch latency and, between calls, the host's per-call work."""
    spans = sorted(intervals)
    if not spans:
        return {"span_ms": 0.0, "busy_ms": 0.0, "gaps_ms": []}
    busy, gaps = 0, []
    start, end = spans[0]
    for s, e in spans[1:]:
        if s > end:
            busy += end - start
            gaps.append(s - end)
            start, end = s, e
        else:
            end = max(end, e)
    busy += end - start
    return {
        "span_ms": (end - spans[0][0]) / 1e6,
        "busy_ms": busy / 1e6,
        "gaps_ms": sorted((g / 1e6 for g in gaps), reverse=True),
    }


def per_call(intervals, calls: int = PROFILE_CALLS) -> list[dict]:
    """A traced line's events cut into `calls` calls at its `calls - 1` largest gaps (the host's
    work between calls): each call's span from its first start to its last end, and the time some
    event runs in it (ms), with its number of events. Where the line has fewer gaps, none.

    A GPU stream's span per call, set beside the timed call, splits the call into the device's
    part and the host's (dispatch, launch, synchronisation)."""
    spans = sorted(intervals)
    if calls < 2 or len(spans) < calls:
        return []
    gaps, end = [], spans[0][1]  # the gap before each event: its start less the latest end
    for i, (s, e) in enumerate(spans[1:]):
        gaps.append((s - end, i))
        end = max(end, e)
    gaps.sort(reverse=True)
    cuts = sorted(i + 1 for g, i in gaps[: calls - 1] if g > 0)
    if len(cuts) < calls - 1:
        return []
    out = []
    for lo, hi in zip([0, *cuts], [*cuts, len(spans)], strict=True):
        t = timeline(spans[lo:hi])
        out.append({"span_ms": t["span_ms"], "busy_ms": t["busy_ms"], "events": hi - lo})
    return out


# Kinds of GPU kernels by name (cuDNN's, cuBLAS's and XLA's fusion names); the first match wins:
# cuDNN's convolution kernels are "implicit gemm"s, and a fusion that concatenates into a
# reduction is a reduction.
KERNEL_KINDS = (
    ("attention", ("sdpa", "flash", "fmha")),
    ("convolution", ("fprop_implicit_gemm", "dgrad", "wgrad", "convolution")),
    ("matrix product", ("nvjet", "gemm", "cublas", "cutlass")),
    ("reduction", ("reduce",)),
    ("copy, slice, concatenate", ("concatenate", "slice", "copy", "transpose", "dynamic_update")),
    ("memset", ("memset",)),
)


def self_times(events) -> tuple[list, dict]:
    """The traced calls on one host line and where their time goes: (the calls' (start_ns,
    end_ns), {name: [self ns, count]}) over every event inside a call. An event's self time is its
    duration less its direct children's (events nest on a thread), so the self times of a call's
    events add up to the call's duration.

    events: (name, start_ns, duration_ns). A call is an event named `CALL_ANNOTATION`, or, where
    there is none, the harness's call frame."""
    ordered = sorted(events, key=lambda e: (e[1], -e[2]))
    is_call = [name == CALL_ANNOTATION for name, _, _ in ordered]
    if not any(is_call):
        is_call = [bool(_HARNESS_CALL.match(name)) for name, _, _ in ordered]
    calls, totals = [], defaultdict(lambda: [0, 0])
    stack = []  # open events inside a call: [end_ns, name, self_ns]
    call_end = None
    for (name, start, duration), root in zip(ordered, is_call, strict=True):
        end = start + duration
        while stack and start >= stack[-1][0]:
            _, done, own = stack.pop()
            totals[done][0] += own
            totals[done][1] += 1
        if call_end is not None and start >= call_end:  # the call, popped above, is over
            call_end = None
        if root and call_end is None:
            calls.append((start, end))
            call_end = end
        elif call_end is None or end > call_end:
            continue  # outside any call (the profiler's own frames), or crossing its end
        if stack:
            stack[-1][2] -= duration
        stack.append([end, name, duration])
    for _, done, own in stack:
        totals[done][0] += own
        totals[done][1] += 1
    return calls, dict(totals)


def host_calls(plane, top: int = 15) -> dict | None:
    """Per traced call, what the host's thread that made the calls did: the calls' mean duration
    and the `top` names by self time (`self_times`), per call, in ms, numbered names together
    (`command_buffer_*`: every CUDA graph's launch). On a GPU, the host's side
    of each call: jax's dispatch (`PjitFunction`: the arguments and results, array by array),
    the runtime's (the buffers, donation), the kernels' launches (`ExecuteThunks`: CUDA graphs
    and the kernels outside them) and the wait. None where no line of `plane` holds a call."""
    for line in plane.lines:
        events = [(e.name, e.start_ns, e.duration_ns) for e in line.events]
        calls, totals = self_times(events)
        if not calls:
            continue
        n = len(calls)
        grouped = defaultdict(lambda: [0, 0])
        for name, (own, count) in totals.items():
            group = grouped[_NUMBERED.sub("*", name)]
            group[0] += own
            group[1] += count
        totals = grouped
        names = sorted(totals, key=lambda k: totals[k][0], reverse=True)[:top]
        return {
            "line": line.name,
            "calls": n,
            "call_ms": sum(e - s for s, e in calls) / n / 1e6,
            "self": [
                {"name": k, "per_call_ms": totals[k][0] / n / 1e6, "per_call": totals[k][1] / n}
                for k in names
            ],
        }
    return None


def kernel_kind(name: str) -> str:
    lowered = name.lower()
    for kind, keys in KERNEL_KINDS:
        if any(k in lowered for k in keys):
            return kind
    return "other fusion"


def summarize(path: str | Path, top: int = 15) -> dict:
    """Per line of the device planes (the host's where there is none) that holds events: their
    number and total time (ms), how they cover the line's span (`timeline`), the span and busy
    time of each traced call (`per_call`), on a GPU the time by kind of kernel (`kernel_kind`),
    and the `top` names by total time with their count and share of the line."""
    from jax.profiler import ProfileData

    data = ProfileData.from_file(str(path))
    planes = [p for p in data.planes if p.name.startswith("/device:")]
    planes = planes or [p for p in data.planes if p.name.startswith("/host:")]
    out = {"file": str(path), "planes": [], "host_calls": None}
    for plane in data.planes:
        if plane.name == "/host:CPU" and out["host_calls"] is None:
            out["host_calls"] = host_calls(plane, top)
    for plane in planes:
        lines = []
        for line in plane.lines:
            totals, counts = defaultdict(int), defaultdict(int)
            intervals = []
            for event in line.events:
                totals[event.name] += event.duration_ns
                counts[event.name] += 1
                intervals.append((event.start_ns, event.start_ns + event.duration_ns))
            busy = sum(totals.values())
            if not counts:
                continue
            names = sorted(totals, key=totals.get, reverse=True)[:top]
            kinds = defaultdict(lambda: [0, 0])
            if "GPU" in plane.name:
                for name, total in totals.items():
                    kind = kinds[kernel_kind(name)]
                    kind[0] += total
                    kind[1] += counts[name]
            lines.append(
                {
                    "line": line.name,
                    "events": sum(counts.values()),
                    "total_ms": busy / 1e6,
                    "timeline": timeline(intervals),
                    "calls": per_call(intervals),
                    "kinds": {
                        k: {"total_ms": t / 1e6, "count": c}
                        for k, (t, c) in sorted(kinds.items(), key=lambda kv: -kv[1][0])
                    },
                    "top": [
                        {
                            "name": n,
                            "count": counts[n],
                            "total_ms": totals[n] / 1e6,
                            "share": totals[n] / busy if busy else 0.0,
                        }
                        for n in names
                    ],
                }
            )
        if lines:
            out["planes"].append({"plane": plane.name, "lines": lines})
    return out


def format_summary(summary: dict) -> str:
    """The summary as plain text, one block per line of a plane."""
    text = [summary["file"]]
    host = summary.get("host_calls")
    if host:
        text.append(
            f"\nhost | {host['line']}: {host['calls']} traced calls, {host['call_ms']:.3f} ms a "
            "call; self time a call (an event's own, less the events inside it):"
        )
        for e in host["self"]:
            text.append(f"  {e['per_call_ms']:10.3f} ms x{e['per_call']:<7g} {e['name'][:100]}")
    for plane in summary["planes"]:
        for line in plane["lines"]:
            text.append(
                f"\n{plane['plane']} | {line['line']}: {line['events']} events, "
                f"{line['total_ms']:.3f} ms"
            )
            t = line["timeline"]
            gaps = t["gaps_ms"]
            occupancy = t["busy_ms"] / t["span_ms"] if t["span_ms"] else 1.0
            largest = f", the largest {', '.join(f'{g:.3f}' for g in gaps[:5])}" if gaps else ""
            text.append(
                f"  span {t['span_ms']:.3f} ms, busy {t['busy_ms']:.3f} ms ({occupancy:.1%}), "
                f"{len(gaps)} gaps of {sum(gaps):.3f} ms{largest}"
            )
            for i, call in enumerate(line.get("calls", [])):
                text.append(
                    f"  call {i + 1}: span {call['span_ms']:.3f} ms, busy {call['busy_ms']:.3f} ms, "
                    f"{call['events']} events"
                )
            for kind, k in line.get("kinds", {}).items():
                share = k["total_ms"] / line["total_ms"] if line["total_ms"] else 0.0
                text.append(f"  {k['total_ms']:10.3f} ms {share:6.1%} x{k['count']:<5} [{kind}]")
            for e in line["top"]:
                text.append(
                    f"  {e['total_ms']:10.3f} ms {e['share']:6.1%} x{e['count']:<5} {e['name'][:100]}"
                )
    return "\n".join(text)
