"""A plan's latency ratio predicted without timing it: a model of where this machine spends a detector's time,
fitted once to measured plans and cached.

FLOPs are a poor stand-in for time: at −50% FLOPs a uniform plan ran at 0.57× the unpruned latency and the seed
rule's at 0.64-0.69× (README "Channel alignment"). Kinds of work shrink unequally: a dense 3×3 conv's time follows
its multiply-accumulates, a depthwise conv's hardly (it is memory-bound), and part of the time (the input, the
head's upsampling and output maps) does not shrink at all. So the model splits the unpruned model's time into a
fixed share and a share per kind of work, each scaling with that kind's cost in the plan:

    latency_ratio(plan) = fixed + Σ_k share_k · cost_k(plan) / cost_k(unpruned),    fixed + Σ_k share_k = 1

with kinds ``FEATURES``: multiply-accumulates of dense (k×k), pointwise (1×1), depthwise and transposed convs, and
the convs' output volume (the activations, affines and adds that run over every output map). The shares are fitted
(non-negative least squares, the fixed share too, exact at the unpruned model) to random plans timed against the
unpruned model with `prune.latency`'s interleaved rounds. Shares are per machine, thread count, input size and
engine, so the fit is cached under a key of all of them (`LatencyModelKey`); each prediction is a few FLOPs counts,
no timing.

Costs are counted at channel counts rounded up to the CPU's **channel block**: oneDNN computes a conv in blocks of
channels (its fp32 layouts block by 8 on AVX2 and 16 on AVX-512, and its kernels may work on several blocks at
once), so a conv cut from 32 to 24 channels may cost what 32 did. The default block is 16: on this AVX2 machine a
fit at 16 predicted new plans better than one at 1, 8 or 32 in every cross-check (README "Predicting a plan's
latency"), and AVX-512's fp32 block is 16. With several candidate ``blocks`` the fit is made at each and keeps the
one whose leave-one-out prediction error over the timed plans is lowest (`choose_block`; no extra timing), to find
another CPU's block; 24 plans are too few to choose reliably between close blocks on a noisy machine, so the
candidates are a setting, not the default.

Command line: ``python -m prune.latency_model [model=...] [latency_model.plans=12] [latency_model.validate=0]``
(``conf/prune_latency_model.yaml``): builds or loads the fit and prints the shares, then, with ``validate=N``, times
N more random plans and compares. Last stdout line: ``plans=<int> fixed=<f> mae=<f|nan> max_error=<f|nan>
seconds=<f>`` (errors relative to the measured ratio, over the validation plans).
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import paddle
from omegaconf import DictConfig
from paddle import nn
from scipy.optimize import nnls

from prune.budget import ModelCost, plan_of_counts
from prune.groups import ChannelGroup, discover_groups
from prune.latency import LatencyRatio, interleaved_ratio, round_settings
from prune.measure import conv_macs, hooked_forward
from prune.plan import apply_plan
from train.cli import exit_on_user_error, print_result_line, print_warning, run_app
from train.errors import ConfigError
from train.inference import export_inference
from train.models.detector import check_input_size
from train.models.zoo import model_spec
from train.weights import load_detector

SCHEMA_VERSION = 2
BLOCKS = (16,)
FEATURES = ("dense", "pointwise", "depthwise", "transposed", "conv_output")
FIXED = "fixed"


def conv_kind(layer: nn.Layer) -> str | None:
    """Which kind of work a layer is (a `FEATURES` name), or None for a layer that is not a conv."""
    if isinstance(layer, nn.Conv2DTranspose):
        return "transposed"
    if isinstance(layer, nn.Conv2D):
        if layer._groups > 1:
            return "depthwise"
        return "pointwise" if int(np.prod(layer.weight.shape[2:])) == 1 else "dense"
    return None


def _blocked(channels: int, block: int) -> int:
    return -(-channels // block) * block


def cost_features_by_block(model: nn.Layer, input_size: tuple[int, int],
                           blocks: Sequence[int] = (1,)) -> dict[int, dict[str, float]]:
    """Each kind's cost in one eval-mode forward at batch 1, for each channel block: multiply-accumulates per conv
    kind and the convs' output volume (values), with every conv's input and output channels rounded up to the block
    (1: the plain counts)."""
    costs = {block: dict.fromkeys(FEATURES, 0.0) for block in blocks}

    def hook(layer: nn.Layer, inputs: tuple, output: paddle.Tensor) -> None:
        kind = conv_kind(layer)
        c_in, c_out = int(inputs[0].shape[1]), int(output.shape[1])
        macs, volume = conv_macs(layer, inputs, output), int(np.prod(output.shape))
        for block, row in costs.items():
            scale_out = _blocked(c_out, block) / c_out
            scale_in = 1.0 if kind == "depthwise" else _blocked(c_in, block) / c_in  # one input channel per output
            row[kind] += macs * scale_out * scale_in
            row["conv_output"] += volume * scale_out

    hooked_forward(model, input_size, hook, layers=lambda layer: conv_kind(layer) is not None)
    return costs


def cost_features(model: nn.Layer, input_size: tuple[int, int], block: int = 1) -> dict[str, float]:
    """`cost_features_by_block` for one block."""
    return cost_features_by_block(model, input_size, (block,))[block]


def relative_features(costs: Mapping[str, float], reference: Mapping[str, float]) -> dict[str, float]:
    """Costs as fractions of the unpruned model's (a kind the model lacks counts 1: it cannot shrink)."""
    return {k: costs[k] / reference[k] if reference[k] else 1.0 for k in FEATURES}


def fit_shares(features: Sequence[Mapping[str, float]], ratios: Sequence[float]) -> dict[str, float]:
    """Non-negative shares per kind and a non-negative fixed share, summing to one (so the unpruned model is
    exactly 1), that best explain the measured ratios (least squares on ``ratio = fixed + Σ share_k x_k``; the sum
    is held by a heavily weighted extra row, the fixed share then set to the exact remainder)."""
    if len(features) != len(ratios) or not ratios:
        raise ValueError(f"{len(features)} feature rows for {len(ratios)} ratios")
    weight = 1e4 * math.sqrt(len(ratios))
    a = np.array([[row[k] for k in FEATURES] + [1.0] for row in features] + [[weight] * (len(FEATURES) + 1)])
    b = np.array([*ratios, weight])
    shares, _ = nnls(a, b)
    out = {k: float(v) for k, v in zip(FEATURES, shares[:-1])}
    out[FIXED] = 1.0 - sum(out.values())
    return out


def leave_one_out_error(features: Sequence[Mapping[str, float]], ratios: Sequence[float]) -> float:
    """Mean |predicted - measured| / measured of each plan predicted by the fit to the others."""
    errors = []
    for i, (row, ratio) in enumerate(zip(features, ratios)):
        shares = fit_shares([*features[:i], *features[i + 1:]], [*ratios[:i], *ratios[i + 1:]])
        errors.append(abs(predict_ratio(shares, row) - ratio) / ratio)
    return statistics.fmean(errors)


def check_blocks(blocks: Sequence[int], name: str) -> tuple[int, ...]:
    """The candidate channel blocks of a setting, as a key holds them; ConfigError unless positive integers."""
    values = tuple(blocks) if isinstance(blocks, Sequence) and not isinstance(blocks, str) else ()
    if not values or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in values):
        raise ConfigError(f"{name}={list(blocks) if values else blocks}: need a list of channel counts >= 1")
    return tuple(sorted(set(values)))


def choose_block(measured: Sequence[MeasuredPlan], blocks: Sequence[int]) -> tuple[int, dict[int, float]]:
    """The channel block whose fit predicts the timed plans best (leave-one-out), and each block's error; ties go to
    the smaller block."""
    ratios = [m.ratio for m in measured]
    errors = {b: leave_one_out_error([m.features_by_block[b] for m in measured], ratios) for b in blocks}
    return min(blocks, key=lambda b: (round(errors[b], 4), b)), errors


def predict_ratio(shares: Mapping[str, float], features: Mapping[str, float]) -> float:
    return shares[FIXED] + sum(shares[k] * features[k] for k in FEATURES)


def latency_predictor(shares: Mapping[str, float], reference: Mapping[str, float],
                      input_size: tuple[int, int], block: int = 1) -> ModelCost:
    """A pruned model -> its predicted latency ratio, from a fit's shares and the unpruned model's costs (both
    counted at ``block``)."""
    return lambda model: predict_ratio(shares, relative_features(cost_features(model, tuple(input_size), block),
                                                                 reference))


@dataclass(frozen=True)
class LatencyModelKey:
    """What a fit is valid for: the architecture, input, threads and engine, and the machine."""

    model: str
    input_size: tuple[int, int]
    threads: int
    use_mkldnn: bool
    align: int
    plans: int
    seed: int
    blocks: tuple[int, ...] = BLOCKS
    cpu: str = field(default_factory=lambda: cpu_name())
    isa_cap: str = field(default_factory=lambda: os.environ.get("ONEDNN_MAX_CPU_ISA", ""))
    paddle: str = field(default_factory=lambda: paddle.__version__)

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or what `platform` knows elsewhere."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@dataclass
class MeasuredPlan:
    kept: dict[str, int]
    features_by_block: dict[int, dict[str, float]]  # relative_features at each candidate channel block
    ratio: float
    low: float
    high: float

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> MeasuredPlan:
        return cls(**{**data, "features_by_block": {int(b): {k: float(f[k]) for k in FEATURES}
                                                    for b, f in data["features_by_block"].items()}})


@dataclass
class LatencyModel:
    """Fitted shares (see module docstring) at the measured channel block, and the measured plans they come from."""

    key: LatencyModelKey
    block: int                   # the channel block costs are counted at (`choose_block`)
    block_errors: dict[int, float]  # each candidate block's leave-one-out error over the measured plans
    reference: dict[str, float]  # the unpruned model's costs at `block`
    shares: dict[str, float]
    measured: list[MeasuredPlan]
    seconds: float

    def predict(self, model: nn.Layer) -> float:
        """Predicted latency ratio of ``model`` (a pruned copy of the key's architecture) to the unpruned one."""
        return latency_predictor(self.shares, self.reference, self.key.input_size, self.block)(model)

    def predict_measured(self, plan: MeasuredPlan) -> float:
        return predict_ratio(self.shares, plan.features_by_block[self.block])

    def stored(self) -> dict[str, Any]:
        """What a study keeps of the fit to predict with it (`latency_predictor`), and where it came from."""
        return {"shares": dict(self.shares), "reference": dict(self.reference), "block": self.block,
                "key": asdict(self.key), "plans": len(self.measured)}

    def save(self, path: Path) -> None:
        data = {"schema_version": SCHEMA_VERSION, "key": asdict(self.key), "block": self.block,
                "block_errors": self.block_errors, "reference": self.reference, "shares": self.shares,
                "measured": [asdict(m) for m in self.measured], "seconds": self.seconds}
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path, key: LatencyModelKey) -> LatencyModel:
        """The fit saved at ``path``; ValueError when the file is unreadable or is for another key."""
        try:
            data = json.loads(path.read_text())
            if data.get("schema_version") != SCHEMA_VERSION:
                raise ValueError(f"schema version {data.get('schema_version')}, expected {SCHEMA_VERSION}")
            stored = {**data["key"], "input_size": tuple(data["key"]["input_size"]),
                      "blocks": tuple(data["key"]["blocks"])}
            if LatencyModelKey(**stored) != key:
                raise ValueError("its key differs from the requested one")
            model = cls(key=key, block=int(data["block"]),
                        block_errors={int(b): float(e) for b, e in data["block_errors"].items()},
                        reference={k: float(data["reference"][k]) for k in FEATURES},
                        shares={k: float(data["shares"][k]) for k in (*FEATURES, FIXED)},
                        measured=[MeasuredPlan.from_json(m) for m in data["measured"]],
                        seconds=float(data["seconds"]))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{type(exc).__name__}: {exc}") from None
        return model


def random_counts(channels: Mapping[str, int], align: int, rng: np.random.Generator) -> dict[str, int]:
    """Keep counts for a random plan, on the ``align`` grid: a uniform cut of every group, a random cut of most
    groups, or a random cut of a few (so the fit sees both even and lopsided plans)."""
    style = rng.choice(["uniform", "most", "few"])
    fraction = rng.uniform(0.3, 0.9)
    cut_probability = {"uniform": 1.0, "most": 0.9, "few": 0.35}[style]
    kept = {}
    for name, width in channels.items():
        if rng.random() >= cut_probability:
            continue
        keep_fraction = fraction if style == "uniform" else rng.uniform(0.15, 0.95)
        keep = int(width * keep_fraction) // align * align
        if 0 < keep < width:
            kept[name] = keep
    return kept


def _prunable_widths(groups: Sequence[ChannelGroup], stem: str | None, align: int) -> dict[str, int]:
    return {g.name: g.channels for g in groups if g.prunable and g.name != stem and g.channels > align}


def measure_plans(model: nn.Layer, model_name: str, groups: Sequence[ChannelGroup], key: LatencyModelKey,
                  reference: Mapping[int, Mapping[str, float]], count: int, rng: np.random.Generator,
                  rounds: Mapping[str, Any],
                  progress: Callable[[int, MeasuredPlan], None] | None = None) -> list[MeasuredPlan]:
    """``count`` random plans of ``model``, each timed against it (interleaved rounds) with its features at each
    of ``key.blocks`` (``reference``: the unpruned model's costs per block)."""
    widths = _prunable_widths(groups, model_spec(model_name).stem, key.align)
    channels = {g.name: g.channels for g in groups if g.prunable}
    measured = []
    with tempfile.TemporaryDirectory(prefix="latency-model-") as tmp:
        reference_dir, candidate_dir = Path(tmp) / "reference", Path(tmp) / "candidate"
        export_inference(model, reference_dir)
        while len(measured) < count:
            kept = random_counts(widths, key.align, rng)
            if not kept:
                continue
            plan = plan_of_counts(model_name, kept, channels, key.align, key.input_size)
            pruned = apply_plan(copy.deepcopy(model), plan, list(groups))
            costs = cost_features_by_block(pruned, key.input_size, key.blocks)
            features = {b: relative_features(costs[b], reference[b]) for b in key.blocks}
            export_inference(pruned, candidate_dir)
            ratio: LatencyRatio = interleaved_ratio(candidate_dir, reference_dir, key.input_size,
                                                    threads=key.threads, use_mkldnn=key.use_mkldnn, **rounds)
            measured.append(MeasuredPlan(kept=kept, features_by_block=features, ratio=ratio.ratio, low=ratio.low,
                                         high=ratio.high))
            if progress is not None:
                progress(len(measured), measured[-1])
    return measured


def build_latency_model(model: nn.Layer, key: LatencyModelKey, rounds: Mapping[str, Any],
                        progress: Callable[[int, MeasuredPlan], None] | None = None) -> LatencyModel:
    """Time ``key.plans`` random plans of ``model`` (the unpruned detector), choose the channel block and fit the
    shares at it."""
    started = time.perf_counter()
    groups = discover_groups(model)
    reference = cost_features_by_block(model, key.input_size, key.blocks)
    measured = measure_plans(model, key.model, groups, key, reference, key.plans, np.random.default_rng(key.seed),
                             rounds, progress)
    block, errors = choose_block(measured, key.blocks)
    shares = fit_shares([m.features_by_block[block] for m in measured], [m.ratio for m in measured])
    return LatencyModel(key=key, block=block, block_errors=errors, reference=reference[block], shares=shares,
                        measured=measured, seconds=time.perf_counter() - started)


def cached_latency_model(cache_dir: Path, model: nn.Layer, key: LatencyModelKey, rounds: Mapping[str, Any],
                         progress: Callable[[int, MeasuredPlan], None] | None = None) -> LatencyModel:
    """The fit for ``key`` from ``cache_dir``, built and saved there first if missing; a corrupt file is set aside
    with a warning and rebuilt."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / f"{key.model}-{key.digest()}.json"
    if path.exists():
        try:
            return LatencyModel.load(path, key)
        except ValueError as exc:
            aside = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
            os.replace(path, aside)
            print_warning(f"latency model cache {path} cannot be used ({exc}): moved to {aside.name}, rebuilding")
    fitted = build_latency_model(model, key, rounds, progress)
    fitted.save(path)
    return fitted


def relative_errors(fitted: LatencyModel, plans: Sequence[MeasuredPlan]) -> list[float]:
    """|predicted - measured| / measured for each plan."""
    return [abs(fitted.predict_measured(p) - p.ratio) / p.ratio for p in plans]


def format_shares(fitted: LatencyModel) -> str:
    lines = [f"latency model of {fitted.key.model} at {fitted.key.input_size[0]}x{fitted.key.input_size[1]}, "
             f"{fitted.key.threads} thread(s), {fitted.key.cpu}: {len(fitted.measured)} plans timed in "
             f"{fitted.seconds:.0f} s", f"  {'kind':<12} share of the unpruned model's time"]
    for name in (FIXED, *FEATURES):
        lines.append(f"  {name:<12} {fitted.shares[name]:.3f}")
    fit_errors = relative_errors(fitted, fitted.measured)
    lines.append(f"  fit: mean |error| {statistics.fmean(fit_errors):.3f} over the {len(fit_errors)} fitted plans")
    blocks = ", ".join(f"{b}: {e:.3f}" for b, e in sorted(fitted.block_errors.items()))
    lines.append(f"  channel block {fitted.block} (leave-one-out mean |error| per block: {blocks})")
    return "\n".join(lines)


@hydra.main(version_base="1.3", config_path="../conf", config_name="prune_latency_model")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    settings = cfg.latency_model
    input_size = check_input_size(settings.input_size, key="latency_model.input_size")
    if settings.plans < 3:
        raise ConfigError(f"latency_model.plans={settings.plans}: need at least 3 measured plans to fit")
    if settings.validate < 0:
        raise ConfigError(f"latency_model.validate={settings.validate}: must be >= 0")
    rounds = round_settings(settings, key="latency_model")
    paddle.set_device("cpu")
    model = load_detector(cfg.model.name, cfg.model.checkpoint)
    key = LatencyModelKey(model=cfg.model.name, input_size=input_size, threads=settings.threads,
                          use_mkldnn=settings.use_mkldnn, align=cfg.prune.align, plans=settings.plans,
                          seed=settings.seed, blocks=check_blocks(settings.blocks, "latency_model.blocks"))

    def report(done: int, plan: MeasuredPlan) -> None:
        print(f"plan {done}: {len(plan.kept)} groups cut, measured ratio {plan.ratio:.3f} "
              f"({plan.low:.3f}-{plan.high:.3f})", flush=True)

    started = time.perf_counter()
    fitted = cached_latency_model(Path(settings.cache_dir).expanduser(), model, key, rounds, report)
    print(format_shares(fitted))
    mae = max_error = float("nan")
    if settings.validate:
        groups = discover_groups(model)
        # Another stream of random plans than the fit's (seed + 1 would overlap a neighbouring key's fit).
        rng = np.random.default_rng([settings.seed, 1])
        reference = cost_features_by_block(model, key.input_size, key.blocks)
        held_out = measure_plans(model, key.model, groups, key, reference, settings.validate, rng, rounds, report)
        errors = relative_errors(fitted, held_out)
        mae, max_error = statistics.fmean(errors), max(errors)
        for plan, error in zip(held_out, errors):
            print(f"  measured {plan.ratio:.3f} predicted {fitted.predict_measured(plan):.3f} "
                  f"error {error:.3f}")
        print(f"validation: mean |error| {mae:.3f}, max {max_error:.3f} over {len(held_out)} new plans")
    print_result_line(f"plans={len(fitted.measured)} fixed={fitted.shares[FIXED]:.4f} mae={mae:.4f} "
                      f"max_error={max_error:.4f} seconds={time.perf_counter() - started:.1f}")


if __name__ == "__main__":
    run_app(main)
