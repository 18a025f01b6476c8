"""Where a detector's CPU time goes: Paddle Inference's per-op-type profile, grouped into kinds of work (convs,
transposed convs, elementwise, ...) with each kind's FLOPs share beside its time share, for the unpruned model and
(with ``plan=``) a pruned one.

FLOPs are what pruning removes; time is what a user wants removed. Kinds whose time does not shrink with their
FLOPs (elementwise ops over full feature maps count no FLOPs at all) are where a pruned model's latency ratio stays
above its FLOPs ratio (README "Where the time goes").

Op types come from Paddle Inference's own profiler (``Config.enable_profile()``) over the exported PIR program
(what the study times and Paddle 3 clients load; op names as the engine reports them, e.g.
``onednn_op.fused_conv2d``). A predictor's first runs build oneDNN's kernels, inside the profile, so the figures
are the difference between a predictor profiled over ``warmup + runs`` runs and one over ``warmup``, per run.
The profiler prints its table from C++ when the predictor is destroyed; it is read from the process's stdout.
FLOPs per kind are ``prune.measure.layer_flops`` grouped by layer type.

Command line: ``python -m prune.profile [model=...] [plan=path.json [weights=pruned.pdparams]]
[profile.input_size=[640,640]] [profile.threads=1]`` (``conf/prune_profile.yaml``). Last stdout line:
``ms=<float> transposed_conv_share=<f> conv_share=<f> batch_norm_share=<f> elementwise_share=<f> resize_share=<f>
other_share=<f>`` (each kind's time share) for the model named (the pruned one with a plan), and with a plan
``latency_ratio_profiled=<f>`` (its total over the unpruned model's).
"""
from __future__ import annotations

import gc
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig
from paddle import nn

from prune.measure import layer_flops, load_measured_model
from train.cli import exit_on_user_error, print_result_line, run_app
from train.errors import ConfigError
from train.inference import InferenceSession, export_inference
from train.locks import quiet_host
from train.models.detector import check_input_size
from train.weights import load_detector

# Kinds of work, matched in this order: (name, op-name tokens, dygraph layer types whose FLOPs it carries). An op
# name ("onednn_op.fused_elementwise_add") is split at "." and "_" into tokens.
KINDS = (
    ("transposed conv", ("transpose",), ("Conv2DTranspose",)),
    ("conv", ("conv2d", "depthwise"), ("Conv2D",)),
    ("batch norm", ("batch", "norm"), ("BatchNorm", "BatchNorm2D")),
    ("elementwise", ("add", "multiply", "elementwise", "scale", "hardswish", "swish", "relu", "sigmoid"), ()),
    ("resize, concat, pool", ("interp", "concat", "pool2d"), ("AdaptiveAvgPool2D", "AvgPool2D", "MaxPool2D")),
)
OTHER = "other"
# A row of the profiler's "Event Summary": "thread0::fused_conv2d   270   414.419   <min> <max> <ave> <ratio>".
# Indented rows are nested events (the executor's one-off parameter loading) and are skipped.
_EVENT = re.compile(r"^thread\d+::(\S+)\s+(\d+)\s+([0-9.]+)\s")
_NOT_OPS = ("Executor::Run",)


@dataclass(frozen=True)
class OpTime:
    """One op type's share of a run: its calls and milliseconds per run."""

    op: str
    calls: float
    ms: float


def op_kind(op: str) -> str:
    """The kind of work an op type of the profile does (``KINDS``)."""
    tokens = set(op.replace(".", "_").split("_"))
    return next((kind for kind, names, _ in KINDS if tokens.intersection(names)), OTHER)


@dataclass(frozen=True)
class Profile:
    """A model's per-op-type times (ms per run, slowest first) and its FLOPs per kind of work."""

    ops: list[OpTime]
    kind_flops: dict[str, int]

    @property
    def total_ms(self) -> float:
        return sum(op.ms for op in self.ops)

    def op_ms(self, op: str) -> float:
        return next((row.ms for row in self.ops if row.op == op), 0.0)

    def kind_ms(self, kind: str) -> float:
        return sum(op.ms for op in self.ops if op_kind(op.op) == kind)

    def kinds(self) -> list[str]:
        return [kind for kind, _, _ in KINDS] + [OTHER]


@contextmanager
def _stdout_captured() -> Iterator[list[str]]:
    """Collect what C++ code writes to file descriptor 1 during the block (Python's sys.stdout included)."""
    lines: list[str] = []
    sys.stdout.flush()
    saved = os.dup(1)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 1)
        try:
            yield lines
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)
            sink.seek(0)
            lines.extend(sink.read().decode(errors="replace").splitlines())


def parse_op_table(lines: list[str]) -> dict[str, tuple[int, float]]:
    """(calls, total ms) by op type from the event table of a Paddle profiler report."""
    rows = {}
    for line in lines:
        match = _EVENT.match(line)
        if match and match.group(1) not in _NOT_OPS:
            rows[match.group(1)] = (int(match.group(2)), float(match.group(3)))
    if not rows:
        raise RuntimeError("the Paddle Inference profiler printed no op table (enable_profile unsupported here?)")
    return rows


@contextmanager
def _working_directory(path: str) -> Iterator[None]:
    saved = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(saved)


def _profiled_runs(folder: Path, batch: np.ndarray, threads: int, runs: int,
                   use_mkldnn: bool) -> dict[str, tuple[int, float]]:
    folder = Path(folder).resolve()
    # Besides the printed table, the profiler writes a binary "./profile.log" into the working directory: keep it
    # out of the user's folder.
    with tempfile.TemporaryDirectory(prefix="profile-cwd-") as scratch, _working_directory(scratch), \
            _stdout_captured() as lines:
        session = InferenceSession(folder, threads, use_mkldnn, profile=True)
        for _ in range(runs):
            session(batch)
        del session
        gc.collect()  # the report is printed when the predictor is destroyed
    return parse_op_table(lines)


def profile_program(folder: Path, input_size: tuple[int, int], threads: int, warmup: int, runs: int,
                    use_mkldnn: bool = True) -> list[OpTime]:
    """Per-op-type calls and ms per run of the program in ``folder``, slowest first.

    A predictor's first runs build its oneDNN kernels, inside the profile: the figures are the difference between
    a predictor profiled over ``warmup + runs`` runs and one over ``warmup``, divided by ``runs``.
    """
    batch = np.random.default_rng(0).random((1, 3, *input_size), dtype=np.float32)
    with quiet_host():
        short = _profiled_runs(folder, batch, threads, warmup, use_mkldnn) if warmup else {}
        long = _profiled_runs(folder, batch, threads, warmup + runs, use_mkldnn)
    rows = []
    for op, (calls, ms) in long.items():
        short_calls, short_ms = short.get(op, (0, 0.0))
        if calls > short_calls:  # ops of the first runs only (constants built once) are left out
            rows.append(OpTime(op, (calls - short_calls) / runs, max(ms - short_ms, 0.0) / runs))
    return sorted(rows, key=lambda row: -row.ms)


def profile_model(model: nn.Layer, input_size: tuple[int, int], threads: int = 1, warmup: int = 3, runs: int = 20,
                  use_mkldnn: bool = True) -> Profile:
    """``model``'s ``Profile``, exported to a temporary folder (inference form, as deployed)."""
    with tempfile.TemporaryDirectory(prefix="profile-") as tmp:
        export_inference(model, tmp)
        ops = profile_program(Path(tmp), input_size, threads, warmup, runs, use_mkldnn)
    types = {name: type(layer).__name__ for name, layer in model.named_sublayers()}
    kind_flops = {kind: 0 for kind in [k for k, _, _ in KINDS] + [OTHER]}
    for name, flops in layer_flops(model, input_size).items():
        kind = next((k for k, _, layer_types in KINDS if types.get(name) in layer_types), OTHER)
        kind_flops[kind] += flops
    return Profile(ops=ops, kind_flops=kind_flops)


def format_tables(unpruned: Profile, pruned: Profile | None, top: int = 12) -> str:
    """Markdown tables: kinds of work (time and FLOPs shares; pruned/unpruned ratios) and the slowest op types."""
    flops_total = sum(unpruned.kind_flops.values())
    extra = " pruned time ratio | pruned FLOPs ratio |" if pruned else ""
    lines = ["| kind | time share | FLOPs share | ms |" + extra, "|---|---|---|---|" + ("---|---|" if pruned else "")]
    for kind in unpruned.kinds():
        ms, flops = unpruned.kind_ms(kind), unpruned.kind_flops[kind]
        if not ms and not flops:
            continue
        row = f"| {kind} | {ms / unpruned.total_ms:.1%} | {flops / flops_total:.1%} | {ms:.2f} |"
        if pruned:
            row += f" {_ratio(pruned.kind_ms(kind), ms)} | {_ratio(pruned.kind_flops[kind], flops)} |"
        lines.append(row)
    total = f"| total | 100% | 100% | {unpruned.total_ms:.1f} |"
    if pruned:
        total += (f" {_ratio(pruned.total_ms, unpruned.total_ms)} | "
                  f"{_ratio(sum(pruned.kind_flops.values()), flops_total)} |")
    header = "| op type | kind | calls/run | time share | ms |" + (" pruned ms | pruned time ratio |" if pruned else "")
    lines += [total, "", header,
              "|---|---|---|---|---|" + ("---|---|" if pruned else "")]
    for op in unpruned.ops[:top]:
        row = f"| {op.op} | {op_kind(op.op)} | {op.calls:g} | {op.ms / unpruned.total_ms:.1%} | {op.ms:.2f} |"
        if pruned:
            row += f" {pruned.op_ms(op.op):.2f} | {_ratio(pruned.op_ms(op.op), op.ms)} |"
        lines.append(row)
    return "\n".join(lines)


def _ratio(numerator: float, denominator: float) -> str:
    return f"{numerator / denominator:.3f}" if denominator else "-"


@hydra.main(version_base="1.3", config_path="../conf", config_name="prune_profile")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    settings = cfg.profile
    input_size = check_input_size(settings.input_size, key="profile.input_size")
    if settings.threads < 1 or settings.runs < 1 or settings.warmup < 0:
        raise ConfigError(f"profile.threads={settings.threads}, profile.runs={settings.runs}, "
                          f"profile.warmup={settings.warmup}: need threads >= 1, runs >= 1, warmup >= 0")
    timing = dict(threads=settings.threads, warmup=settings.warmup, runs=settings.runs,
                  use_mkldnn=settings.use_mkldnn)
    unpruned = profile_model(load_detector(cfg.model.name, cfg.model.checkpoint), input_size, **timing)
    pruned = None
    if cfg.plan is not None:
        model = load_measured_model(cfg.model.name, cfg.model.checkpoint, cfg.plan, cfg.weights)
        pruned = profile_model(model, input_size, **timing)
    print(format_tables(unpruned, pruned, top=settings.top))
    shown = pruned or unpruned
    shares = " ".join(f"{kind.split(',')[0].replace(' ', '_')}_share={shown.kind_ms(kind) / shown.total_ms:.4f}"
                      for kind in shown.kinds())
    line = f"ms={shown.total_ms:.3f} {shares}"
    if pruned is not None:
        line += f" latency_ratio_profiled={pruned.total_ms / unpruned.total_ms:.4f}"
    print_result_line(line)


if __name__ == "__main__":
    run_app(main)
