"""Per-op profile of the train step: `python -m metachex_jax.bench profile [--torch] [--form scanned]`.

Where the step's time goes (issue 24, the CPU step): the trainer's step for one model form (the one `bench train`
times: CheXNet head, random batch, Adam) runs `--steps` times under `jax.profiler.trace`; every XLA operation
executed (a CPU thunk: a fusion, a convolution, a copy, a while loop) is matched with the compiled HLO and its
self time (a while loop's own time excludes its body's operations) is added up by

    phase   from the operation's JAX name stack: forward (`jvp`), backward (`transpose(jvp)`, the hand-written
            backward passes included), optimizer (the rest: Adam, the BatchNorm running statistics, the input's
            normalisation)
    kind    convolution (convolutions and matmuls: 1x1 convolutions and the classifier), batchnorm (fusions with a
            reduction: BatchNorm's statistics and its gradient's sums, with the elementwise work fused into them),
            elementwise (the other fusions: normalise + ReLU, their gradients, Adam), concat_copy (concatenation,
            dynamic-update-slice into the dense block's buffer, slices, pads, copies), pooling, other

`--torch` profiles torchvision's DenseNet with the same step in the same process (`torch.profiler`, phases from
`record_function` labels around forward, backward and the optimizer) and groups its aten operations the same way
(native batch norm and its backward are batchnorm; ReLU (clamp_min_), threshold_backward and the optimizer's ops
are elementwise; cat and copies are concat_copy). Prints both breakdowns (ms per step and share) and the top
operations; the last line is one JSON object. Shares are meaningful on a loaded machine; milliseconds are not.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import re
import sys
import tempfile
from typing import Any

import jax

from metachex_jax.bench import train as train_bench
from metachex_jax.bench.results import cpu_model

PHASES = ("forward", "backward", "optimizer")
KINDS = ("convolution", "batchnorm", "elementwise", "concat_copy", "pooling", "other")
DATA_MOVEMENT = {"concatenate", "dynamic-update-slice", "dynamic-slice", "slice", "pad", "copy", "transpose",
                 "bitcast", "broadcast", "reshape", "gather", "scatter", "parameter", "constant", "tuple",
                 "get-tuple-element", "iota", "reverse", "copy-start", "copy-done"}
CONTROL = {"while", "conditional", "call"}

# `  %name = shape opcode(operands), attributes` (the shape may be a tuple with spaces; opcode is the word before
# the first "(" that follows whitespace)
INSTRUCTION = re.compile(r"^\s+(?:ROOT )?%?([\w.\-]+) = .*?\s([a-z][a-z0-9\-]*)\((.*)$")
COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$")


def hlo_operations(hlo_text: str) -> dict[str, dict[str, Any]]:
    """Every HLO instruction of the compiled module: name -> {"opcode", "op_name", "ops"} where "ops" are the
    opcodes it runs (a fusion's: those of its fused computation)."""
    computations: dict[str, list[str]] = collections.defaultdict(list)
    instructions = {}
    current = None
    for line in hlo_text.splitlines():
        header = COMPUTATION.match(line)
        if header:
            current = header.group(1)
            continue
        match = INSTRUCTION.match(line)
        if not match or current is None:
            continue
        name, opcode, rest = match.groups()
        computations[current].append(opcode)
        calls = re.search(r"calls=%?([\w.\-]+)", rest)
        op_name = re.search(r'op_name="([^"]*)"', rest)
        instructions[name] = {"opcode": opcode, "calls": calls.group(1) if calls else None,
                              "op_name": op_name.group(1) if op_name else ""}
    for info in instructions.values():
        fused = computations.get(info.pop("calls"), []) if info["opcode"] == "fusion" else []
        info["ops"] = set(fused) or {info["opcode"]}
    return instructions


def xla_phase(op_name: str) -> str:
    if "transpose(" in op_name:
        return "backward"
    return "forward" if "jvp(" in op_name else "optimizer"


def xla_kind(ops: set[str]) -> str:
    if ops & {"convolution", "dot"}:
        return "convolution"
    if ops & {"reduce-window", "select-and-scatter"}:
        return "pooling"
    if "reduce" in ops:
        return "batchnorm"
    if ops & CONTROL:
        return "other"
    if ops <= DATA_MOVEMENT:
        return "concat_copy"
    return "elementwise"


def self_times(events) -> list[tuple[str, float]]:
    """(name, self nanoseconds) of one thread's events: an event's time minus that of the events nested in it."""
    events = sorted(events, key=lambda e: (e.start_ns, -e.duration_ns))
    out, stack = [], []  # stack: [end_ns, index into out] of the enclosing events
    for event in events:
        while stack and event.start_ns >= stack[-1][0]:
            stack.pop()
        if stack:
            out[stack[-1][1]][1] -= event.duration_ns
        out.append([event.name, float(event.duration_ns)])
        stack.append((event.start_ns + event.duration_ns, len(out) - 1))
    return [(name, t) for name, t in out]


def breakdown(samples: list[tuple[str, str, str, float]], steps: int) -> dict[str, Any]:
    """(phase, kind, operation, seconds) samples -> ms per step by phase x kind, shares, the top operations."""
    table = {phase: dict.fromkeys(KINDS, 0.0) for phase in PHASES}
    by_op: dict[str, float] = collections.Counter()
    for phase, kind, op, seconds in samples:
        table[phase][kind] += 1e3 * seconds / steps
        by_op[f"{phase}/{kind}/{op}"] += 1e3 * seconds / steps
    total = sum(sum(row.values()) for row in table.values())
    kinds = {kind: sum(table[p][kind] for p in PHASES) for kind in KINDS}
    return {"ms_per_step": {p: {k: round(v, 2) for k, v in row.items()} for p, row in table.items()},
            "total_ms": round(total, 1),
            "phase_share": {p: round(sum(table[p].values()) / total, 3) for p in PHASES},
            "kind_share": {k: round(v / total, 3) for k, v in kinds.items()},
            "top_ops_ms": {op: round(ms, 2) for op, ms in by_op.most_common(15)}}


def profile_jax(arch: str, batch: int, resolution: int, dtype: str, form: str, steps: int) -> dict[str, Any]:
    compiled, state, data, _, compile_s = train_bench.compile_jax_step(arch, batch, resolution, dtype, form)
    operations = hlo_operations(compiled.as_text())
    for _ in range(2):  # warm-up
        state, metrics = compiled(state, data)
    jax.block_until_ready(metrics)
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            for _ in range(steps):
                state, metrics = compiled(state, data)
            jax.block_until_ready(metrics)
        profile = jax.profiler.ProfileData.from_file(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)[0])
    samples = []
    for plane in profile.planes:
        for line in plane.lines:
            for name, ns in self_times([e for e in line.events if e.name in operations]):
                op = operations[name]
                samples.append((xla_phase(op["op_name"]), xla_kind(op["ops"]), name, ns * 1e-9))
    result = breakdown(samples, steps)
    result["compile_s"] = round(compile_s, 1)
    return result


def torch_kind(name: str) -> str:
    if "conv" in name or name in ("aten::addmm", "aten::mm", "aten::linear"):
        return "convolution"
    if "batch_norm" in name:
        return "batchnorm"
    if "pool" in name:
        return "pooling"
    if any(word in name for word in ("cat", "copy", "slice", "narrow", "clone", "contiguous", "empty", "zero")):
        return "concat_copy"
    if any(word in name for word in ("relu", "clamp", "threshold", "add", "mul", "div", "sqrt", "lerp", "foreach",
                                     "sub")):
        return "elementwise"
    return "other"


def profile_torch(arch: str, batch: int, resolution: int, dtype: str, steps: int) -> dict[str, Any]:
    torch, _ = train_bench.import_torch()  # optional dependency (the `torch` extra)
    settings, step = train_bench.setup_torch(arch, batch, resolution, dtype, jax.default_backend())
    for _ in range(2):
        step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    samples = []
    for event in prof.events():
        if not event.name.startswith("aten::") or event.self_cpu_time_total <= 0:
            continue
        parent, phase = event.cpu_parent, None
        while parent is not None and phase is None:
            phase = parent.name if parent.name in PHASES else None
            parent = parent.cpu_parent
        phase = phase or "optimizer"  # zero_grad and the like: outside the labelled phases
        samples.append((phase, torch_kind(event.name), event.name, event.self_cpu_time_total * 1e-6))
    return breakdown(samples, steps) | settings


def print_breakdown(title: str, b: dict[str, Any], out) -> None:
    print(f"{title}: {b['total_ms']:.0f} ms of operations per step", file=out)
    print(f"  {'ms per step':<12}" + "".join(f"{k:>13}" for k in KINDS) + f"{'share':>8}", file=out)
    for phase in PHASES:
        row = b["ms_per_step"][phase]
        print(f"  {phase:<12}" + "".join(f"{row[k]:13.1f}" for k in KINDS) + f"{b['phase_share'][phase]:8.1%}",
              file=out)
    print(f"  {'share':<12}" + "".join(f"{b['kind_share'][k]:13.1%}" for k in KINDS), file=out)
    print("  top operations (ms per step): " + "; ".join(f"{op} {ms:.1f}" for op, ms in
                                                          list(b["top_ops_ms"].items())[:8]), file=out)


def run(arch: str = "densenet121", batch: int = 8, resolution: int = 224, dtype: str = "float32",
        form: str = "scanned", steps: int = 3, torch: bool = False, out=None) -> dict[str, Any]:
    out = out or sys.stdout  # read at call time (tests capture it)
    if form not in train_bench.FORMS:
        raise ValueError(f"unknown --form {form!r}; choose from {list(train_bench.FORMS)}")
    if torch:
        train_bench.import_torch()  # fail before the (long) JAX part
    result = {"arch": arch, "batch": batch, "resolution": resolution, "dtype": dtype, "form": form, "steps": steps,
              "backend": jax.default_backend(), "cpu_model": cpu_model(),
              "load_avg_start": train_bench.load_average()}
    result["jax"] = profile_jax(arch, batch, resolution, dtype, form, steps)
    if torch:
        result["torch"] = profile_torch(arch, batch, resolution, dtype, steps)
    result["load_avg_end"] = train_bench.load_average()
    print(f"{arch}, batch {batch}, {resolution}², {dtype}, {result['backend']} ({result['cpu_model']}); load "
          f"{result['load_avg_start']} before, {result['load_avg_end']} after", file=out)
    print_breakdown(f"JAX, {form} form (compile {result['jax']['compile_s']} s)", result["jax"], out)
    if torch:
        print_breakdown("torchvision eager", result["torch"], out)
    print(json.dumps(result), file=out, flush=True)
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m metachex_jax.bench profile", description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default="densenet121")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--form", default="scanned", help=f"one of {list(train_bench.FORMS)}")
    parser.add_argument("--steps", type=int, default=3, help="profiled steps (after 2 warm-up steps)")
    parser.add_argument("--torch", action="store_true", help="also profile torchvision's step (the torch extra)")
    args = parser.parse_args(argv)
    try:
        return run(args.arch, args.batch, args.resolution, args.dtype, args.form, args.steps, args.torch)
    except ValueError as e:
        parser.error(str(e))
