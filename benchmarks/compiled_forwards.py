"""What compiling the forward-only work to Paddle Inference programs buys: the teacher's targets in a recovery
step, and evaluation (the eval split and the generalization guard), against dygraph, timed interleaved.

    OMP_NUM_THREADS=1 python benchmarks/compiled_forwards.py [--plan outputs/search/v8/trials/7] [--rounds 6]
        [--steps 10] [hydra overrides of conf/search.yaml]

Per round, in alternating order: `--steps` recovery steps of the plan's pruned model (its trial weights; batch and
crop of `conf/finetune/recovery.yaml`) with the teacher in dygraph and with its compiled program (one warm-up step
each, not timed), then the eval split and the guard's images scored through dygraph and through the compiled model
(compile time included). Prints per-round seconds, the ratio compiled / dygraph with a 95% t interval over rounds,
whether the two engines' scores agree, and a last line
`step_dygraph_s=<f> step_program_s=<f> step_ratio=<f> eval_dygraph_s=<f> eval_compiled_s=<f> eval_ratio=<f>`.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import paddle
from hydra import compose, initialize_config_dir
from scipy import stats

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import train.data.source  # noqa: E402,F401  (registers the data generator schema the configs use)
from prune.distill import backbone_feature_channels, neck_feature_channels  # noqa: E402
from prune.groups import discover_groups  # noqa: E402
from prune.plan import PruningPlan, load_pruned  # noqa: E402
from search.objective import load_trial_data  # noqa: E402
from train.agreement import agreement_scores  # noqa: E402
from train.evaluation import detect, evaluate_detector  # noqa: E402
from train.inference import ExportedDetector, current_threads  # noqa: E402
from train.recovery import (DistillationLoss, RecoverySettings, _train_mode_overrides, recovery_batches,  # noqa: E402
                            recovery_dataset)
from train.weights import detector_from_config  # noqa: E402


def recovery_seconds(model: paddle.nn.Layer, loss: DistillationLoss, batches, steps: int) -> float:
    """Mean seconds of a full recovery step (forward, loss with the teacher's targets, backward, Adam)."""
    optimizer = paddle.optimizer.Adam(learning_rate=1e-5, parameters=[p for p in model.parameters()
                                                                      if not p.stop_gradient])
    model.train()
    times = []
    for step in range(steps + 1):
        batch = next(batches)
        tic = time.perf_counter()
        terms = loss(model(batch["image"]), batch)
        terms["loss"].backward()
        optimizer.step()
        optimizer.clear_grad()
        if step:  # the first step of an engine compiles or warms up
            times.append(time.perf_counter() - tic)
    model.eval()
    return float(np.mean(times))


def interval(ratios: list[float]) -> tuple[float, float]:
    half = stats.t.ppf(0.975, len(ratios) - 1) * statistics.stdev(ratios) / len(ratios) ** 0.5
    return statistics.mean(ratios) - half, statistics.mean(ratios) + half


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plan", type=Path, default=REPO / "outputs/search/v8/trials/7",
                        help="a trial folder with plan.json and finetuned.pdparams")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=10)
    args, overrides = parser.parse_known_args()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("search", overrides=overrides)
    plan = PruningPlan.load(args.plan / "plan.json")
    model = load_pruned(cfg.model.name, plan, args.plan / "finetuned.pdparams")
    teacher = detector_from_config(cfg.model)
    data = load_trial_data(cfg)
    settings = RecoverySettings(**cfg.finetune)
    groups = discover_groups(teacher)
    losses = {engine: DistillationLoss(model, teacher, map_weight=settings.map_weight, map_loss=settings.map_loss,
                                       feature_weight=settings.feature_weight,
                                       feature_channels=neck_feature_channels(plan, groups, teacher),
                                       label_weight=settings.label_weight, backbone_weight=settings.backbone_weight,
                                       backbone_channels=backbone_feature_channels(plan, groups, teacher),
                                       teacher_program=engine == "program")
              for engine in ("dygraph", "program")}
    _train_mode_overrides(model, freeze_bn=True, skip_thresh=settings.label_weight == 0)
    batches = recovery_batches(recovery_dataset(data.train_set, settings), settings, data.unlabeled)
    teacher_boxes = detect(teacher, data.guard_set, data.postprocess) if data.guard_set is not None else None
    print(f"plan {args.plan}, {current_threads()} thread(s), {args.rounds} rounds of {args.steps} steps; eval "
          f"{len(data.eval_set)} + guard {len(data.guard_set or [])} images")

    def scores(forward) -> tuple[float, float]:
        hmean = evaluate_detector(forward, data.eval_set, data.postprocess, progress=False).hmean
        guard = agreement_scores(detect(forward, data.guard_set, data.postprocess), teacher_boxes).agreement \
            if teacher_boxes is not None else float("nan")
        return hmean, guard

    step = {"dygraph": [], "program": []}
    evaluation = {"dygraph": [], "compiled": []}
    for index in range(args.rounds):
        order = ("dygraph", "program") if index % 2 == 0 else ("program", "dygraph")
        for engine in order:
            step[engine].append(recovery_seconds(model, losses[engine], batches, args.steps))
        results = {}
        for engine in (("dygraph", "compiled") if index % 2 == 0 else ("compiled", "dygraph")):
            tic = time.perf_counter()
            results[engine] = scores(model if engine == "dygraph" else ExportedDetector.compile(model))
            evaluation[engine].append(time.perf_counter() - tic)
        print(f"round {index}: step {step['dygraph'][-1]:.3f} s (dygraph teacher) vs {step['program'][-1]:.3f} s "
              f"(program); eval+guard {evaluation['dygraph'][-1]:.1f} s vs {evaluation['compiled'][-1]:.1f} s; "
              f"hmean/agreement {results['dygraph']} vs {results['compiled']}", flush=True)
    step_ratios = [p / d for p, d in zip(step["program"], step["dygraph"])]
    eval_ratios = [c / d for c, d in zip(evaluation["compiled"], evaluation["dygraph"])]
    print(f"recovery step, program teacher / dygraph teacher: {statistics.mean(step_ratios):.3f} "
          f"(95% interval {interval(step_ratios)[0]:.3f}-{interval(step_ratios)[1]:.3f})")
    print(f"eval + guard, compiled / dygraph: {statistics.mean(eval_ratios):.3f} "
          f"(95% interval {interval(eval_ratios)[0]:.3f}-{interval(eval_ratios)[1]:.3f})")
    mean = statistics.mean
    print(f"step_dygraph_s={mean(step['dygraph']):.4f} step_program_s={mean(step['program']):.4f} "
          f"step_ratio={mean(step_ratios):.4f} eval_dygraph_s={mean(evaluation['dygraph']):.3f} "
          f"eval_compiled_s={mean(evaluation['compiled']):.3f} eval_ratio={mean(eval_ratios):.4f}")


if __name__ == "__main__":
    main()
