"""`python -m search.export [trial=<n> | run_id=<id>] [overrides]`: one trial of a study as a deployable model.

PaddleOCR's slim recipe rebuilt the pruned shapes at export from a different rule than training used and only
warned when the weights did not fit, which produced silently broken models. Here the trial's own plan is replayed
(`prune.plan.load_pruned`: the saved kept indices, then a strict load of the trial's fine-tuned weights), so a
model that does not fit fails in one line, and the export is checked against the dygraph model before it counts.

Steps: select the trial (number, MLflow run id, or the study's chosen one) -> its plan and weights (the trial's
folder, else its MLflow artifacts) -> optional longer recovery (`export.finetune`) -> hmean on the eval split ->
Paddle inference model (PIR `inference.json` or legacy `inference.pdmodel`) with `inference.yml`, the plan, the
weights and `metrics.json`, written to `<dir>.partial` and renamed into place only once Paddle Inference
reproduces the dygraph model (max |diff| <= `export.parity.tolerance`) -> FLOPs, params and latency of the exported
model -> MLflow: the folder as artifacts of the trial's run, a registered model version with an alias.
Last stdout line: `export_dir=<path> hmean=<float> flops=<int> latency_ms=<float>`.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cv2
import hydra
import numpy as np
import optuna
import paddle
from mlflow.exceptions import MlflowException
from omegaconf import DictConfig, OmegaConf
from optuna.trial import TrialState

from prune.latency import LatencyRatio, Runner, round_settings, timed_rounds
from prune.measure import Measurement
from prune.plan import PruningPlan, load_pruned, weights_hash
from search.app import tracker_for
from search.attributes import (EXPORT_PREFIX, STUDY_CHOSEN, STUDY_REFERENCE, TRIAL_FAIL_REASON, TRIAL_RUN_ID,
                               Metric)
from search.export_recovery import export_recovery_settings, recover_in_runs, recover_run, resolve_runs
from search.objective import (PLAN_FILE, WEIGHTS_FILE, evaluated_images, guard_candidate, load_trial_data,
                              measure_against_unpruned)
from search.study import load_study, make_storage, storage_file, trial_records
from search.tracking import RunLogger, Tracker
from train.cli import exit_on_user_error, print_result_line, run_app
from train.data.dataset import DetDataset
from train.deploy_config import DeployConfig
from train.errors import ConfigError, UserError
from train.evaluation import evaluate_detector
from train.inference import (InferenceSession, export_inference, exported_programs, fast_forward,
                             single_threaded)
from train.metric import DetScores
from train.models.zoo import model_spec
from train.onnx import ONNX_FILE, OnnxSession, convert_to_onnx
from train.runtime import set_device
from train.trainer import save_weights
from train.weights import detector_from_config

# export.format -> program formats written (train.inference.PROGRAM_FILES); "both" loads in every client we know.
FORMATS = {"both": ("pir", "legacy"), "pir": ("pir",), "legacy": ("legacy",)}
METRICS_FILE = "metrics.json"
EXPORT_WEIGHTS_FILE = "model.pdparams"  # the dygraph weights of the export (load with prune.plan.load_pruned)
ARTIFACT_PATH = "export"


class ParityError(UserError):
    """The exported program does not reproduce the dygraph model: the export is not usable."""


@dataclass(frozen=True)
class SelectedTrial:
    """A complete trial of the study and what the study recorded for it."""

    number: int
    run_id: str
    attrs: dict[str, Any]
    chosen: bool = False  # the trial the study chose


def registry_alias(configured: str | None, selected: SelectedTrial) -> str:
    """The registered version's alias: the configured one, else ``chosen`` for the study's chosen trial and
    ``trial-<n>`` for another (exporting a trial to look at it must not move the alias deployments follow)."""
    if configured is not None:
        return str(configured)
    return "chosen" if selected.chosen else f"trial-{selected.number}"


def study_hmean(study: optuna.Study, selected: SelectedTrial) -> str:
    """The trial's hmean as the study has it: its own recovery's, and, for a re-evaluated plan, the mean over its
    recovery seeds that the study chose by (the export continues from the trial's own weights)."""
    own = f"hmean {float(selected.attrs['hmean']):.4f}"
    record = next((r for r in trial_records(study, {}) if r.number == selected.number), None)
    if record is None or record.seeds < 2:
        return f"{own} in the study"
    return (f"{own} with its weights in the study, {record.hmean:.4f} ± {record.hmean_sd:.4f} over {record.seeds} "
            "recovery seeds")


def select_trial(study: optuna.Study, trial: int | None, run_id: str | None) -> SelectedTrial:
    """The trial named by number or MLflow run id, else the one the study chose; it must be complete."""
    if trial is not None and run_id is not None:
        raise ConfigError(f"trial={trial} and run_id={run_id}: select a trial by one of them, not both")
    trials = study.get_trials(deepcopy=False)
    if run_id is not None:
        matches = [t.number for t in trials if t.user_attrs.get(TRIAL_RUN_ID) == run_id]
        if not matches:
            raise ConfigError(f"run_id={run_id}: no trial of study {study.study_name!r} has this MLflow run")
        number = matches[0]
    elif trial is not None:
        if not 0 <= trial < len(trials):
            raise ConfigError(f"trial={trial}: study {study.study_name!r} has trials 0..{len(trials) - 1}")
        number = trial
    else:
        if STUDY_CHOSEN not in study.user_attrs:
            raise ConfigError(f"study {study.study_name!r} has not chosen a trial yet (it chooses when a "
                              "`python -m search multirun` finishes); pass trial=<n> or run_id=<id>")
        number = int(study.user_attrs[STUDY_CHOSEN])
    frozen = trials[number]
    if frozen.state == TrialState.PRUNED:
        raise ConfigError(f"trial {number} was screened out and never fine-tuned; export a complete trial "
                          f"(the Pareto front: {sorted(t.number for t in study.best_trials)})")
    if frozen.state != TrialState.COMPLETE:
        reason = frozen.user_attrs.get(TRIAL_FAIL_REASON, "")
        raise ConfigError(f"trial {number} is {frozen.state.name}{': ' + reason if reason else ''}; "
                          "export a complete trial")
    chosen = study.user_attrs.get(STUDY_CHOSEN)
    return SelectedTrial(number=number, run_id=str(frozen.user_attrs.get(TRIAL_RUN_ID, "")),
                         attrs=dict(frozen.user_attrs), chosen=chosen is not None and int(chosen) == number)


def trial_files(out_dir: Path, selected: SelectedTrial, tracker: Tracker, scratch: Path) -> tuple[Path, Path]:
    """(plan, fine-tuned weights) of the trial: from its folder under `out_dir`, else from its MLflow run (the
    only copy when the trial ran on another host)."""
    folder = out_dir / "trials" / str(selected.number)
    if (folder / PLAN_FILE).is_file() and (folder / WEIGHTS_FILE).is_file():
        return folder / PLAN_FILE, folder / WEIGHTS_FILE
    paths = []
    for artifact in (f"plan/{PLAN_FILE}", f"weights/{WEIGHTS_FILE}"):
        try:
            paths.append(Path(tracker.client.download_artifacts(selected.run_id, artifact, str(scratch))))
        except (MlflowException, OSError) as exc:
            raise ConfigError(f"trial {selected.number}: {folder / Path(artifact).name} is missing and MLflow run "
                              f"{selected.run_id} has no artifact {artifact} ({type(exc).__name__})") from None
    return paths[0], paths[1]


def parity_max_abs_diff(model: paddle.nn.Layer, export_dir: Path, images: list[np.ndarray],
                        deployed: bool = False) -> float:
    """The largest difference over every program format in `export_dir` (`_program_parity`)."""
    return max(_program_parity(model, export_dir, images, deployed, program)
               for program in exported_programs(export_dir))


def _program_parity(model: paddle.nn.Layer, export_dir: Path, images: list[np.ndarray], deployed: bool,
                    program: str) -> float:
    """Largest |Paddle Inference - dygraph| over the probability maps of `images` (CHW float32 each).

    By default both sides run the same plain kernels on one thread (no oneDNN, no IR fusion passes), where a
    faithful export agrees to the last bit, so any difference is the export's. `deployed=True` runs the predictor
    as a CPU deployment does (oneDNN, IR passes, 2 threads): float32 re-association, reported for information.
    """
    if deployed:
        session, threads = InferenceSession(export_dir, threads=2, program=program), nullcontext()
    else:
        session = InferenceSession(export_dir, threads=1, use_mkldnn=False, ir_optim=False, program=program)
        threads = single_threaded()
    with threads:
        return _max_abs_diff(model, session, images)


def _max_abs_diff(model: paddle.nn.Layer, run: Runner, images: list[np.ndarray]) -> float:
    """Largest |run(image) - model(image)| over the probability maps of `images` (CHW float32 each)."""
    model.eval()
    worst = 0.0
    with paddle.no_grad():
        for image in images:
            batch = image[None].astype(np.float32)
            expected = model(paddle.to_tensor(batch))["maps"].numpy()
            worst = max(worst, float(np.abs(run(batch) - expected).max()))
    return worst


def parity_images(eval_set: DetDataset, count: int) -> list[np.ndarray]:
    if count < 1:
        raise ConfigError(f"export.parity.images={count}: must be >= 1 (the export is always checked)")
    return [eval_set[i]["image"] for i in range(min(count, len(eval_set)))]


@dataclass
class ExportReport:
    """`metrics.json` of an export: the trial as the study recorded it, and the exported model as measured now."""

    trial: int
    run_id: str
    format: str
    finetune_steps: int
    recovery_runs: int  # recoveries averaged into the exported weights (export.finetune.runs); 0 without recovery
    trial_hmean: float
    hmean: float
    precision: float
    recall: float
    flops: int
    params: int
    latency_ms: float
    size_bytes: int
    trial_flops: int
    trial_latency_ms: float
    flops_ratio: float
    latency_ratio: float  # timed interleaved with the unpruned model (prune.latency), with its 95% interval
    latency_ratio_low: float
    latency_ratio_high: float
    parity_max_abs_diff: float
    deployed_max_abs_diff: float
    onnx_max_abs_diff: float | None = None  # onnxruntime vs dygraph (export.onnx); None without ONNX
    onnx_latency_ratio: float | None = None  # onnxruntime, timed against the unpruned model's ONNX
    onnx_latency_ratio_low: float | None = None
    onnx_latency_ratio_high: float | None = None
    agreement: float | None = None      # generalization guard (data.unlabeled_eval); None without guard images
    false_boxes: float | None = None

    def metrics(self) -> dict[str, float]:
        """The numbers logged to MLflow (prefixed `export_`)."""
        keys = (Metric.HMEAN, Metric.PRECISION, Metric.RECALL, Metric.FLOPS, Metric.PARAMS, Metric.LATENCY_MS,
                Metric.SIZE_BYTES, Metric.FLOPS_RATIO, Metric.LATENCY_RATIO, Metric.PARITY_MAX_ABS_DIFF,
                Metric.DEPLOYED_MAX_ABS_DIFF, Metric.FINETUNE_STEPS, Metric.AGREEMENT, Metric.FALSE_BOXES)
        return {f"{EXPORT_PREFIX}{k}": float(getattr(self, k)) for k in keys if getattr(self, k) is not None}


def _check_export_config(cfg: DictConfig) -> None:
    if cfg.export.format not in FORMATS:
        raise ConfigError(f"export.format={cfg.export.format!r}: expected one of {list(FORMATS)}")
    if int(cfg.export.finetune.steps) < 0:
        raise ConfigError(f"export.finetune.steps={cfg.export.finetune.steps}: must be >= 0")
    if int(cfg.export.finetune.save_every) < 0:
        raise ConfigError(f"export.finetune.save_every={cfg.export.finetune.save_every}: must be >= 0")
    if int(cfg.export.finetune.threads) < 1:
        raise ConfigError(f"export.finetune.threads={cfg.export.finetune.threads}: must be >= 1")


def _write_export(model: paddle.nn.Layer, plan: PruningPlan, cfg: DictConfig, target: Path,
                  images: list[np.ndarray]) -> tuple[Path, float, float, float | None]:
    """Everything of the export into `<target>.partial`, checked, then renamed to `target`; (target, parity diff,
    deployment-kernel diff, ONNX diff or None)."""
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    input_size = None if cfg.export.input_size is None else tuple(cfg.export.input_size)
    export_inference(model, partial, input_size=input_size, formats=FORMATS[cfg.export.format])
    DeployConfig(model_name=model_spec(cfg.model.name).paddlex_name,
                 limit_side_len=int(cfg.data.eval.limit_side_len), limit_type=str(cfg.data.eval.limit_type),
                 postprocess=OmegaConf.to_container(cfg.postprocess)).write(partial)
    plan.save(partial / PLAN_FILE)
    save_weights(model, partial / EXPORT_WEIGHTS_FILE)
    if input_size is not None:  # a fixed-size program only takes that size
        height, width = input_size
        images = [cv2.resize(img.transpose(1, 2, 0), (width, height)).transpose(2, 0, 1) for img in images]
    diff = parity_max_abs_diff(model, partial, images)
    tolerance = float(cfg.export.parity.tolerance)
    if not diff <= tolerance:
        raise ParityError(f"{partial}: Paddle Inference differs from the dygraph model by {diff:.3g} "
                          f"(> export.parity.tolerance={tolerance:g}); the export was not put in place")
    onnx_diff = None
    if cfg.export.onnx:
        onnx_diff = _write_onnx(model, partial, images)
        onnx_tolerance = float(cfg.export.parity.onnx_tolerance)
        if not onnx_diff <= onnx_tolerance:
            raise ParityError(f"{partial / ONNX_FILE}: onnxruntime differs from the dygraph model by {onnx_diff:.3g} "
                              f"(> export.parity.onnx_tolerance={onnx_tolerance:g}); the export was not put in place")
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    return target, diff, parity_max_abs_diff(model, target, images, deployed=True), onnx_diff


def _write_onnx(model: paddle.nn.Layer, folder: Path, images: list[np.ndarray]) -> float:
    """`folder/inference.onnx` converted from the legacy program (saved aside first if the folder has none); the
    largest |onnxruntime - dygraph| over `images`."""
    with tempfile.TemporaryDirectory(prefix="onnx-") as tmp:
        source = folder
        if "legacy" not in exported_programs(folder):
            source = Path(tmp)
            export_inference(model, source, formats=("legacy",))
        convert_to_onnx(source, folder / ONNX_FILE)
    return _max_abs_diff(model, OnnxSession(folder / ONNX_FILE, threads=1), images)


def onnx_latency_ratio(unpruned: paddle.nn.Layer, cfg: DictConfig, export_dir: Path) -> LatencyRatio:
    """The exported ONNX model timed against the unpruned model's ONNX through onnxruntime (`prune.latency`)."""
    threads = cfg.measure.threads
    with tempfile.TemporaryDirectory(prefix="onnx-reference-") as tmp:
        export_inference(unpruned, tmp, formats=("legacy",))
        convert_to_onnx(tmp, Path(tmp) / ONNX_FILE)
        reference = OnnxSession(Path(tmp) / ONNX_FILE, threads=threads)
        candidate = OnnxSession(export_dir / ONNX_FILE, threads=threads)
        return timed_rounds(candidate, reference, tuple(cfg.prune.input_size), **round_settings(cfg.measure))


def _log_to_mlflow(tracker: Tracker, cfg: DictConfig, selected: SelectedTrial, target: Path,
                   report: ExportReport) -> tuple[str, str] | None:
    """Artifacts and metrics under the trial's run; a registered model version with its alias (`registry_alias`):
    (version, alias), None without registration."""
    client = tracker.client
    client.log_artifacts(selected.run_id, str(target), ARTIFACT_PATH)
    run = RunLogger(client, selected.run_id)
    run.log_metrics(report.metrics())
    run.set_tags({"exported": True, "export_dir": str(target)})
    if not cfg.export.register.enabled:
        return None
    name, alias = str(cfg.export.register.name), registry_alias(cfg.export.register.alias, selected)
    try:
        client.create_registered_model(name, description="Pruned DB text detectors exported by search.export")
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    version = client.create_model_version(name, f"runs:/{selected.run_id}/{ARTIFACT_PATH}", run_id=selected.run_id,
                                          tags={"trial": str(selected.number), "format": report.format,
                                                "hmean": f"{report.hmean:.6f}", "flops": str(report.flops)})
    if alias:
        client.set_registered_model_alias(name, alias, version.version)
    return version.version, alias


@hydra.main(version_base="1.3", config_path="../conf", config_name="export")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    _check_export_config(cfg)
    set_device(cfg.device)
    stored = storage_file(cfg.storage)
    if stored is not None and not stored.is_file():  # opening it would create an empty store
        raise ConfigError(f"no study in out_dir={cfg.out_dir}: {stored} does not exist (run `python -m search "
                          "multirun` with the same out_dir first)")
    tracker = tracker_for(cfg)
    tracker.check()
    study = load_study(make_storage(cfg.storage), cfg.search.study_name)
    selected = select_trial(study, cfg.trial, cfg.run_id)
    out_dir = Path(cfg.out_dir)
    target = Path(cfg.export.dir or out_dir / "export" / f"trial-{selected.number}").resolve()
    settings = export_recovery_settings(cfg)
    runs = resolve_runs(cfg.export.finetune.runs, int(cfg.export.finetune.threads), cfg.device)
    in_study = study_hmean(study, selected)
    print(f"exporting trial {selected.number} of study {cfg.search.study_name!r} (MLflow run {selected.run_id}, "
          f"{in_study}) to {target}", flush=True)

    with tempfile.TemporaryDirectory() as scratch:
        plan_path, weights_path = trial_files(out_dir, selected, tracker, Path(scratch))
        plan = PruningPlan.load(plan_path)
        if plan.model != cfg.model.name:
            raise ConfigError(f"{plan_path}: the trial's plan is for model {plan.model!r}, not model={cfg.model.name}")
        model = load_pruned(cfg.model.name, plan, weights_path)

    data = load_trial_data(cfg)
    teacher = detector_from_config(cfg.model)
    steps = settings.steps if settings is not None else 0
    resume = None
    if settings is not None:
        # The long recovery saves its state every export.finetune.save_every steps; a rerun of the same export
        # (same trial weights, settings and seed) resumes there, anything else starts afresh.
        key = hashlib.sha256(json.dumps([settings.to_json(), cfg.seed, weights_hash(model)]).encode()).hexdigest()
        resume = out_dir / "export" / f".recovery-trial-{selected.number}-{key[:12]}"

        def recover_here(student: paddle.nn.Layer, checkpoint_prefix: Path) -> None:
            recover_run(cfg, student, plan, teacher, data, settings, checkpoint_prefix, cfg.progress)

        if runs > 1:
            print(f"recovering {runs} runs at once (recovery seeds {settings.seed}..{settings.seed + runs - 1}, "
                  f"{cfg.export.finetune.threads} thread(s) each); the export is their weights' average", flush=True)
        recover_in_runs(cfg, model, plan, settings, runs, resume, recover_here)
    forwards = fast_forward(model, evaluated_images(cfg, data))
    scores: DetScores = evaluate_detector(forwards, data.eval_set, data.postprocess, cfg.data.eval.max_images,
                                          progress=cfg.progress)
    guard = guard_candidate(cfg, forwards, teacher, data)
    target, diff, deployed_diff, onnx_diff = _write_export(model, plan, cfg, target,
                                                           parity_images(data.eval_set, cfg.export.parity.images))
    measured, latency = measure_against_unpruned(model, teacher, cfg)
    onnx_latency = onnx_latency_ratio(teacher, cfg, target) if onnx_diff is not None else None

    reference = Measurement.from_json(study.user_attrs[STUDY_REFERENCE])  # what the trial's ratios are relative to
    report = ExportReport(
        trial=selected.number, run_id=selected.run_id, format=str(cfg.export.format), finetune_steps=steps,
        recovery_runs=runs if steps else 0,
        trial_hmean=float(selected.attrs["hmean"]), hmean=scores.hmean, precision=scores.precision,
        recall=scores.recall, flops=measured.flops, params=measured.params, latency_ms=measured.latency_ms,
        size_bytes=measured.size_bytes, trial_flops=int(selected.attrs["flops"]),
        trial_latency_ms=float(selected.attrs["latency_ms"]), flops_ratio=measured.flops / reference.flops,
        latency_ratio=latency.ratio, latency_ratio_low=latency.low, latency_ratio_high=latency.high,
        parity_max_abs_diff=diff, onnx_max_abs_diff=onnx_diff,
        onnx_latency_ratio=None if onnx_latency is None else onnx_latency.ratio,
        onnx_latency_ratio_low=None if onnx_latency is None else onnx_latency.low,
        onnx_latency_ratio_high=None if onnx_latency is None else onnx_latency.high,
        deployed_max_abs_diff=deployed_diff, agreement=None if guard is None else guard.agreement,
        false_boxes=None if guard is None else guard.false_boxes)
    if report.flops != report.trial_flops:  # same plan, same input size: anything else is a bug in the replay
        raise AssertionError(f"exported model has {report.flops} FLOPs, trial {selected.number} had "
                             f"{report.trial_flops}")
    (target / METRICS_FILE).write_text(json.dumps(asdict(report), indent=1) + "\n")
    registered = _log_to_mlflow(tracker, cfg, selected, target, report) if selected.run_id else None
    if resume is not None:
        shutil.rmtree(resume, ignore_errors=True)

    print(f"trial {selected.number}: {in_study}; {report.hmean:.4f} exported "
          f"(+{steps} recovery steps)"
          + ("" if guard is None else f", teacher agreement {guard.agreement:.4f}, {guard.false_boxes:.2f} false boxes "
             "per text-free image") + f"; FLOPs {report.flops:,} ({report.flops_ratio:.3f}x), latency "
          f"{report.latency_ms:.2f} ms (study {report.trial_latency_ms:.2f} ms); parity max |diff| {diff:.2g} "
          f"({deployed_diff:.2g} with the deployment's oneDNN kernels)"
          + (f"; registered {cfg.export.register.name} v{registered[0]} @{registered[1]}" if registered else ""))
    print_result_line(f"export_dir={target} hmean={report.hmean:.6f} flops={report.flops} "
                      f"latency_ms={report.latency_ms:.3f}")


if __name__ == "__main__":
    run_app(main)
