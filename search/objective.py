"""One trial's work: prune the pretrained model by a plan, measure it, screen it, recover it, score it.

1. The plan is applied to a freshly loaded pretrained model, so filters are ranked on trained weights.
2. Cost of the inference graph: FLOPs, params, exported size (`prune.measure`), and the Paddle Inference CPU
   latency ratio to the unpruned model, timed interleaved with it (`prune.latency`).
3. Optional cheap screening: BatchNorm statistics re-estimated on a few train batches (adaptive BN, kept for
   fine-tuning) and hmean on the first eval images; a candidate that an already screened one beats by `margin` at
   no higher cost skips fine-tuning (it is "screened out").
4. Brief recovery fine-tune (`train.recovery`, distillation from the unpruned model on labelled train crops mixed
   with the unlabelled pool), then hmean / precision / recall on the eval split and the generalization guard
   (`train.agreement`: teacher agreement and false boxes per text-free image on the held-out unlabelled pool).
   With `search.rungs`, the candidate is scored on the eval split at those recovery steps too, and stopped there
   when a trial at its cost scored `margin` higher at the same rung (`search/rungs.py`).
   A plan that cuts nothing is not fine-tuned: a student equal to its teacher has nothing to recover, so the
   unpruned baseline is the pretrained model as the user brought it (not BN-recalibrated either; it agrees with
   itself by definition), and the search's budget goes to pruned candidates.
Metrics reach a `MetricSink` as soon as they exist, so a trial that fails late still shows what it measured.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Protocol, Sequence

import numpy as np
import paddle
from omegaconf import DictConfig, OmegaConf

from prune.distill import backbone_feature_channels, neck_feature_channels
from prune.groups import ChannelGroup, discover_groups
from prune.latency import LatencyRatio, round_settings
from prune.measure import Measurement, measure, measure_against
from prune.plan import PruningPlan, apply_plan, make_plan
from search.attributes import SECONDS_PREFIX, Metric
from search.pareto import dominated_with_margin
from search.space import cut_counts
from search.tracking import DatasetRecord, files_digest
from train.agreement import AgreementScores, agreement_scores
from train.data.dataset import DetDataset, endless_batches
from train.data.source import build_dataset, resolve_data
from train.data.unlabeled import resolve_unlabeled, unlabeled_eval_set
from train.evaluation import Boxes, detect, evaluate_detector, images_scored
from train.inference import ExportedDetector, fast_forward
from train.metric import DetScores
from train.postprocess import DBPostProcess
from train.recovery import RecoverySettings, recalibrate_bn, recover, recovery_dataset
from train.trainer import FinetuneResult, save_weights
from train.weights import detector_from_config

PLAN_FILE = "plan.json"
WEIGHTS_FILE = "finetuned.pdparams"


class MetricSink(Protocol):
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None: ...

    def log_series(self, name: str, values: list[float], first_step: int = 1) -> None: ...


@dataclass
class TrialData:
    """The datasets and post-processing every trial of a study uses."""

    train_set: DetDataset
    eval_set: DetDataset
    postprocess: DBPostProcess
    unlabeled: list[Path] | None = None       # recovery's unlabelled pool (data.unlabeled)
    guard_set: DetDataset | None = None       # the generalization guard's images (data.unlabeled_eval)


def study_datasets(data: TrialData) -> list[DatasetRecord]:
    """The study's datasets as MLflow inputs: labelled splits digested with their labels, pools by their files."""
    def labelled(name: str, dataset: DetDataset, context: str) -> DatasetRecord:
        items = dataset.items
        labels = json.dumps([[str(i.image_path.name), [r.points.tolist() for r in i.regions]] for i in items])
        folder = Path(os.path.commonpath([str(i.image_path.parent) for i in items]))
        return DatasetRecord(name, folder, files_digest([i.image_path for i in items], labels), context)

    records = [labelled("train", data.train_set, "train"), labelled("eval", data.eval_set, "eval")]
    for name, paths in (("unlabeled", data.unlabeled),
                        ("guard", None if data.guard_set is None else [i.image_path for i in data.guard_set.items])):
        if paths:
            folder = Path(os.path.commonpath([str(Path(p).parent) for p in paths]))
            records.append(DatasetRecord(name, folder, files_digest(paths), name))
    return records


def load_trial_data(cfg: DictConfig) -> TrialData:
    source = resolve_data(cfg.data, progress=cfg.progress)
    pools = resolve_unlabeled(cfg.data, progress=cfg.progress)
    guard = (None if pools.guard is None
             else unlabeled_eval_set(pools.guard, cfg.data.eval.limit_side_len, cfg.data.eval.limit_type))
    return TrialData(train_set=build_dataset(cfg.data, source, "train", seed=cfg.seed),
                     eval_set=build_dataset(cfg.data, source, "eval"),
                     postprocess=DBPostProcess(**cfg.postprocess), unlabeled=pools.recovery, guard_set=guard)


GUARD_TEACHER_FILE = "guard_teacher.json"


def guard_teacher_boxes(cfg: DictConfig, teacher: paddle.nn.Layer, data: TrialData) -> list[Boxes]:
    """The unpruned teacher's boxes on the guard's images: the guard's ground truth, computed once per study and
    cached in its folder.

    Keyed by the settings that decide them (model, data, post-processing), so a cache from other settings is
    recomputed rather than trusted; written atomically, so workers computing it at once cannot tear it.
    """
    key = hashlib.sha256(json.dumps([OmegaConf.to_container(cfg[k], resolve=True) for k in
                                     ("model", "data", "postprocess")], sort_keys=True).encode()).hexdigest()[:16]
    assert data.guard_set is not None
    path = Path(cfg.out_dir) / GUARD_TEACHER_FILE
    try:
        cached = json.loads(path.read_text())
        if cached["key"] == key and len(cached["boxes"]) == len(data.guard_set):
            return [[np.asarray(box, dtype=np.float64) for box in image] for image in cached["boxes"]]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    boxes = detect(fast_forward(teacher, len(data.guard_set)), data.guard_set, data.postprocess,
                   progress=cfg.progress, desc="guard (teacher)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"key": key, "boxes": [[b.tolist() for b in image] for image in boxes]}))
    tmp.replace(path)
    return boxes


def evaluated_images(cfg: DictConfig, data: TrialData) -> int:
    """How many images a recovered candidate is run on: the eval split (up to `data.eval.max_images`) and the
    guard's."""
    return images_scored(data.eval_set, cfg.data.eval.max_images) + len(data.guard_set or [])


def guard_candidate(cfg: DictConfig, student: paddle.nn.Layer | ExportedDetector, teacher: paddle.nn.Layer,
                    data: TrialData) -> AgreementScores | None:
    """The generalization guard of a recovered student (None without `data.unlabeled_eval`); pass the student as
    `fast_forward` gives it when it is also evaluated (one compile for both)."""
    if data.guard_set is None:
        return None
    reference = guard_teacher_boxes(cfg, teacher, data)
    return agreement_scores(detect(student, data.guard_set, data.postprocess, progress=cfg.progress, desc="guard"),
                            reference)


def measure_model(model: paddle.nn.Layer, cfg: DictConfig) -> Measurement:
    """`prune.measure` with the study's input size and timing settings."""
    m = cfg.measure
    return measure(model, tuple(cfg.prune.input_size), threads=m.threads, warmup=m.warmup, runs=m.runs,
                   use_mkldnn=m.use_mkldnn)


def measure_against_unpruned(model: paddle.nn.Layer, unpruned: paddle.nn.Layer,
                             cfg: DictConfig) -> tuple[Measurement, LatencyRatio]:
    """The candidate's costs, its latency timed interleaved with the unpruned model's (`prune.measure_against`):
    each exported and timed once."""
    return measure_against(model, unpruned, tuple(cfg.prune.input_size), threads=cfg.measure.threads,
                           use_mkldnn=cfg.measure.use_mkldnn, **round_settings(cfg.measure))


def recover_candidate(student: paddle.nn.Layer, teacher: paddle.nn.Layer, plan: PruningPlan,
                      groups: list[ChannelGroup], train_set: DetDataset, settings: RecoverySettings,
                      progress: bool = True, unlabeled: Sequence[Path] | None = None,
                      checkpoint_prefix: Path | None = None,
                      on_step: Callable[[int, dict[str, float]], bool | None] | None = None) -> FinetuneResult:
    """Fine-tune a pruned candidate in place (`train.recovery`), with feature distillation at the backbone and neck
    channels the plan kept, on labelled crops of `train_set` mixed with crops of the `unlabeled` images. The one
    recovery entry point of the search (trials, and a longer run before export). `on_step`: `train.trainer.finetune`'s
    (a true return stops the recovery: a trial that lost at a rung)."""
    return recover(student, teacher, train_set, settings, feature_channels=neck_feature_channels(plan, groups, teacher),
                   progress=progress, unlabeled=unlabeled, checkpoint_prefix=checkpoint_prefix,
                   backbone_channels=backbone_feature_channels(plan, groups, teacher), on_step=on_step)


def screen_candidate(model: paddle.nn.Layer, data: TrialData, settings: RecoverySettings, bn_batches: int,
                     max_images: int, progress: bool = True) -> DetScores:
    """Cheap quality estimate of an unrecovered candidate: adaptive BN on `bn_batches` train batches (cropped and
    batched as recovery does), then hmean on the first `max_images` eval images.

    On a copy: the candidate recovers from its own statistics. Statistics re-estimated on a few labelled crops fit
    those crops only; recovery keeps BNs frozen, so they stayed in the model for good. On the default study's
    −50.8% plan (PP-OCRv4: 3 head BNs) recovering from them gave hmean 0.836 in-distribution and 0.186 on
    `shifted_v1`, from the pruned model's own 0.929 and 0.494 (60 steps; README "Generalization").
    """
    probe = copy.deepcopy(model)
    recalibrate_bn(probe, endless_batches(recovery_dataset(data.train_set, settings), settings.batch_size), bn_batches)
    return evaluate_detector(probe, data.eval_set, data.postprocess, max_images, progress=progress)


@dataclass
class TrialResult:
    """What a trial measured; `scores` is None for a screened-out candidate and for one stopped at a rung
    (`stopped_at`: its recovery steps then; `rungs`: hmean at each rung it reached), `finetune` also when nothing
    was cut."""

    plan: PruningPlan
    measurement: Measurement
    reference: Measurement
    latency: LatencyRatio  # timed interleaved with the unpruned model
    screen: DetScores | None = None
    screened_out: bool = False
    finetune: FinetuneResult | None = None
    scores: DetScores | None = None
    guard: AgreementScores | None = None
    rungs: dict[int, float] = field(default_factory=dict)
    stopped_at: int | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def flops_ratio(self) -> float:
        return self.measurement.flops / self.reference.flops

    @property
    def latency_ratio(self) -> float:
        return self.latency.ratio

    def cost_metrics(self) -> dict[str, float]:
        m = self.measurement
        return {Metric.FLOPS: m.flops, Metric.FLOPS_RATIO: self.flops_ratio,
                Metric.FLOPS_REDUCTION: 1.0 - self.flops_ratio, Metric.PARAMS: m.params,
                Metric.LATENCY_MS: m.latency_ms, Metric.LATENCY_RATIO: self.latency_ratio,
                Metric.LATENCY_RATIO_LOW: self.latency.low, Metric.LATENCY_RATIO_HIGH: self.latency.high,
                Metric.LATENCY_ROUNDS: self.latency.rounds, Metric.SPEEDUP: 1.0 / self.latency_ratio,
                Metric.SIZE_BYTES: m.size_bytes}

    def screen_metrics(self) -> dict[str, float]:
        s = self.screen
        return {Metric.SCREEN_HMEAN: s.hmean, Metric.SCREEN_PRECISION: s.precision, Metric.SCREEN_RECALL: s.recall}

    def metrics(self) -> dict[str, float]:
        """Every scalar the trial produced, under the names MLflow and the study's user attributes use."""
        out = self.cost_metrics()
        if self.screen is not None:
            out.update(self.screen_metrics())
        if self.scores is not None:
            out.update({Metric.HMEAN: self.scores.hmean, Metric.PRECISION: self.scores.precision,
                        Metric.RECALL: self.scores.recall})
        if self.guard is not None:
            g = self.guard
            out.update({Metric.AGREEMENT: g.agreement, Metric.AGREEMENT_PRECISION: g.precision,
                        Metric.AGREEMENT_RECALL: g.recall, Metric.FALSE_BOXES: g.false_boxes})
        if self.finetune is not None and self.finetune.losses:
            out[Metric.FINETUNE_FINAL_LOSS] = self.finetune.losses[-1]
        if self.stopped_at is not None:
            out[Metric.RUNG_HMEAN] = self.rungs[self.stopped_at]
        out.update({f"{SECONDS_PREFIX}{k}": v for k, v in self.seconds.items()})
        return out


@dataclass
class RungCheck:
    """The rungs of a trial's recovery (`search.rungs`): the steps to score at, and the judge that records each
    score and returns the rival that stops the trial (`search.rungs.RungJudge`), or None to go on."""

    steps: Sequence[int]
    judge: Callable[[int, float, float], object | None]

    def callback(self, model: paddle.nn.Layer, cfg: DictConfig, data: TrialData, result: TrialResult,
                 sink: MetricSink, cost_metric: str) -> Callable[[int, dict[str, float]], bool]:
        """`recover`'s `on_step`: at a rung, the candidate's hmean on the eval split (scored like its final hmean)
        goes to the judge; true stops the recovery (`result.stopped_at`)."""
        def on_step(step: int, terms: dict[str, float]) -> bool:
            if step not in self.steps:
                return False
            tic = time.perf_counter()
            limit = cfg.data.eval.max_images  # the eval split only: the guard runs once, at the end
            forwards = fast_forward(model, images_scored(data.eval_set, limit))
            hmean = evaluate_detector(forwards, data.eval_set, data.postprocess, limit, progress=False).hmean
            result.rungs[step] = hmean
            result.seconds["rungs"] = result.seconds.get("rungs", 0.0) + time.perf_counter() - tic
            sink.log_metrics({Metric.RUNG_HMEAN: hmean}, step=step)
            if self.judge(step, hmean, result.cost_metrics()[cost_metric]) is None:
                return False
            result.stopped_at = step
            return True
        return on_step


def run_candidate(cfg: DictConfig, data: TrialData, reference: Measurement, out_dir: Path, sink: MetricSink,
                  ratios: Mapping[str, float] | None = None, plan: PruningPlan | None = None,
                  screening_front: Sequence[tuple[float, float]] | None = None, cost_metric: str = Metric.FLOPS_RATIO,
                  rung: RungCheck | None = None) -> TrialResult:
    """Run steps 1-4 of the module docstring for a plan given as `ratios` (ranked here) or as a ready `plan`.

    `screening_front`: (screening hmean, cost ratio) of earlier candidates; None never screens out (baselines).
    `rung`: at each of its recovery steps the candidate is scored on the eval split and `rung.judge` decides whether
    it stops there (`search.rungs`). Writes the plan and the fine-tuned weights (not of a stopped one) to `out_dir`.
    """
    started = time.perf_counter()
    model = detector_from_config(cfg.model)
    groups = discover_groups(model)
    if plan is None:
        plan = make_plan(model, cfg.model.name, dict(ratios or {}), cfg.prune.criterion, cfg.prune.align,
                         tuple(cfg.prune.input_size), groups)
    apply_plan(model, plan, groups)
    out_dir.mkdir(parents=True, exist_ok=True)
    plan.save(out_dir / PLAN_FILE)

    tic = time.perf_counter()
    unpruned = detector_from_config(cfg.model)  # the latency reference, and the teacher if there is recovery
    measurement, latency = measure_against_unpruned(model, unpruned, cfg)
    result = TrialResult(plan=plan, measurement=measurement, reference=reference, latency=latency)
    result.seconds["measure"] = time.perf_counter() - tic
    sink.log_metrics(result.cost_metrics())

    settings = RecoverySettings(**cfg.finetune)
    screening = cfg.search.screening
    if screening.enabled:
        tic = time.perf_counter()
        # An unpruned model's statistics still fit its weights; re-estimating them on a few crops only adds noise
        # (PP-OCRv4 det: hmean 0.959 -> 0.930 with 4 batches of 4 crops).
        bn_batches = screening.bn_batches if cut_counts(plan) else 0
        result.screen = screen_candidate(model, data, settings, bn_batches, screening.max_images, cfg.progress)
        result.seconds["screen"] = time.perf_counter() - tic
        sink.log_metrics(result.screen_metrics())
        cost = result.cost_metrics()[cost_metric]
        if screening_front is not None and dominated_with_margin(result.screen.hmean, cost, screening_front,
                                                                 screening.margin):
            result.screened_out = True
            result.seconds["total"] = time.perf_counter() - started
            return result

    recovered = bool(cut_counts(plan))
    if recovered:
        tic = time.perf_counter()
        on_step = None if rung is None else rung.callback(model, cfg, data, result, sink, cost_metric)
        result.finetune = recover_candidate(model, unpruned, plan, groups, data.train_set, settings, cfg.progress,
                                            unlabeled=data.unlabeled, on_step=on_step)
        result.seconds["finetune"] = time.perf_counter() - tic
        sink.log_series(Metric.FINETUNE_LOSS, result.finetune.losses)
        if result.stopped_at is not None:
            result.seconds["total"] = time.perf_counter() - started
            return result

    tic = time.perf_counter()
    forwards = fast_forward(model, evaluated_images(cfg, data))  # on CPU the compiled program (README "Search")
    result.scores = evaluate_detector(forwards, data.eval_set, data.postprocess, cfg.data.eval.max_images,
                                      progress=cfg.progress)
    result.seconds["evaluate"] = time.perf_counter() - tic
    if recovered:
        tic = time.perf_counter()
        result.guard = guard_candidate(cfg, forwards, unpruned, data)
        result.seconds["guard"] = time.perf_counter() - tic
    elif data.guard_set is not None:  # nothing cut: the student is its teacher, and agrees with it by definition
        result.guard = AgreementScores(agreement=1.0, precision=1.0, recall=1.0, false_boxes=0.0,
                                       images=len(data.guard_set), text_free=0)
    save_weights(model, out_dir / WEIGHTS_FILE)
    result.seconds["total"] = time.perf_counter() - started
    return result
