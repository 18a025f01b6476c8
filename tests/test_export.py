"""`python -m search.export` on the tiny study of conftest.py: selection (chosen, trial number, run id), the files,
reload and parity in another process, FLOPs equal to the trial's, MLflow artifacts and registered model, the
strict mismatch error, and predict on the export."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import mlflow
import numpy as np
import paddle
import pytest
import yaml
from omegaconf import OmegaConf
from optuna.trial import TrialState

from conftest import STUDY, TINY_SEARCH, run_cli
from prune.plan import PruningPlan, load_pruned
from search.export import ParityError, _write_export
from search.export_recovery import resolve_runs
from train.inference import LEGACY_MODEL_FILE, PIR_MODEL_FILE, InferenceSession
from train.onnx import ONNX_FILE, OnnxSession

EXPORT_LINE = re.compile(r"^export_dir=(\S+) hmean=(\d+\.\d+) flops=(\d+) latency_ms=(\d+\.\d+)$")
QUICK = ["export.finetune.steps=0", "export.parity.images=2"]


def export(study_run, *overrides: str):
    _, out, env, _, _ = study_run
    return run_cli("search.export", [*TINY_SEARCH, f"out_dir={out}", *QUICK, *overrides], env)


def exported(proc) -> tuple[Path, dict]:
    assert proc.returncode == 0, proc.stderr[-3000:]
    match = EXPORT_LINE.match(proc.stdout.strip().splitlines()[-1])
    assert match, proc.stdout[-2000:]
    folder = Path(match.group(1))
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["hmean"] == pytest.approx(float(match.group(2)), abs=1e-6)
    assert metrics["flops"] == int(match.group(3))
    return folder, metrics


@pytest.fixture(scope="module")
def chosen_export(study_run):
    return exported(export(study_run))


def test_chosen_trial_exports_with_the_trial_numbers(study_run, chosen_export):
    _, out, _, study, _ = study_run
    folder, metrics = chosen_export
    chosen = study.trials[study.user_attrs["chosen_trial"]]
    assert folder == (out / "export" / f"trial-{chosen.number}").resolve()
    assert {p.name for p in folder.iterdir()} >= {PIR_MODEL_FILE, LEGACY_MODEL_FILE, "inference.pdiparams",
                                                  "inference.yml",
                                                  "plan.json", "model.pdparams", "metrics.json"}
    assert not folder.with_name(folder.name + ".partial").exists()
    # PaddleOCR 3 / PaddleX load the folder only under one of their model names (README "Export").
    assert yaml.safe_load((folder / "inference.yml").read_text())["Global"]["model_name"] == "PP-OCRv4_mobile_det"
    assert metrics["trial"] == chosen.number and metrics["run_id"] == chosen.user_attrs["mlflow_run_id"]
    assert metrics["flops"] == chosen.user_attrs["flops"] and metrics["params"] == chosen.user_attrs["params"]
    # No extra fine-tune: the replayed plan and weights score exactly what the trial scored.
    assert metrics["hmean"] == pytest.approx(chosen.user_attrs["hmean"], abs=1e-9)
    assert metrics["parity_max_abs_diff"] <= 1e-4
    assert metrics["onnx_max_abs_diff"] <= 1e-4 and (folder / ONNX_FILE).is_file()
    assert 0 < metrics["onnx_latency_ratio_low"] <= metrics["onnx_latency_ratio"] <= metrics["onnx_latency_ratio_high"]
    assert 0 < metrics["latency_ratio_low"] <= metrics["latency_ratio"] <= metrics["latency_ratio_high"]
    assert PruningPlan.load(folder / "plan.json") == PruningPlan.load(out / "trials" / str(chosen.number) / "plan.json")


def test_export_reloads_in_another_process_and_predicts_like_the_pruned_model(chosen_export):
    folder, _ = chosen_export
    model = load_pruned("ppocrv4_det", PruningPlan.load(folder / "plan.json"), folder / "model.pdparams")
    x = np.random.default_rng(3).uniform(-2, 2, size=(1, 3, 96, 128)).astype(np.float32)
    with paddle.no_grad():
        expected = model(paddle.to_tensor(x))["maps"].numpy()
    assert np.abs(InferenceSession(folder, use_mkldnn=False)(x) - expected).max() <= 1e-5
    for program in ("pir", "legacy"):
        assert np.abs(InferenceSession(folder, use_mkldnn=False, program=program)(x) - expected).max() <= 1e-5
    assert np.abs(OnnxSession(folder / ONNX_FILE)(x) - expected).max() <= 1e-4


def test_export_is_an_artifact_of_the_trial_run_and_a_registered_model(study_run, chosen_export):
    _, out, _, _, client = study_run
    folder, metrics = chosen_export
    artifacts = {a.path for a in client.list_artifacts(metrics["run_id"], "export")}
    assert {f"export/{PIR_MODEL_FILE}", "export/inference.yml", "export/metrics.json"} <= artifacts
    run = client.get_run(metrics["run_id"])
    assert run.data.tags["exported"] == "true"
    assert run.data.metrics["export_hmean"] == pytest.approx(metrics["hmean"])
    version = client.get_model_version_by_alias(f"{STUDY}-det", "chosen")
    assert version.run_id == metrics["run_id"] and version.tags["trial"] == str(metrics["trial"])
    mlflow.set_tracking_uri(f"sqlite:///{out}/mlflow.db")
    downloaded = Path(mlflow.artifacts.download_artifacts(f"models:/{STUDY}-det@chosen", dst_path=str(out / "dl")))
    assert (downloaded / PIR_MODEL_FILE).read_bytes() == (folder / PIR_MODEL_FILE).read_bytes()


def test_exporting_another_trial_leaves_the_chosen_alias_where_it_was(study_run, chosen_export, tmp_path):
    _, _, _, study, client = study_run
    chosen = study.user_attrs["chosen_trial"]
    other = next(t for t in study.trials if t.state == TrialState.COMPLETE and t.number != chosen)
    folder, metrics = exported(export(study_run, f"trial={other.number}", "export.format=legacy", "export.onnx=false",
                                      f"export.dir={tmp_path / 'other'}"))
    assert metrics["trial"] == other.number
    assert client.get_model_version_by_alias(f"{STUDY}-det", "chosen").tags["trial"] == str(chosen)
    assert client.get_model_version_by_alias(f"{STUDY}-det", f"trial-{other.number}").tags["trial"] == str(other.number)


def test_selection_by_trial_number_and_by_run_id_agree(study_run, tmp_path):
    _, _, _, study, _ = study_run
    trial = next(t for t in study.trials if t.user_attrs.get("baseline") == "seed_rule"
                 and t.state == TrialState.COMPLETE)
    by_number, metrics = exported(export(study_run, f"trial={trial.number}", "export.format=legacy",
                                         "export.onnx=false",
                                         f"export.dir={tmp_path / 'by-number'}", "export.register.enabled=false"))
    assert metrics["trial"] == trial.number and metrics["format"] == "legacy"
    assert (by_number / LEGACY_MODEL_FILE).is_file() and not (by_number / PIR_MODEL_FILE).exists()
    # Two more recovery steps before export: counted, and the weights moved.
    by_run, again = exported(export(study_run, f"run_id={trial.user_attrs['mlflow_run_id']}", "export.onnx=false",
                                    f"export.dir={tmp_path / 'by-run'}", "export.finetune.steps=2",
                                    "export.register.enabled=false"))
    assert again["trial"] == trial.number and again["finetune_steps"] == 2 and again["flops"] == metrics["flops"]
    # export.finetune.runs=auto: a run per core (one thread each), averaged; none without recovery steps.
    assert again["recovery_runs"] == resolve_runs("auto", threads=1, device="cpu") and metrics["recovery_runs"] == 0
    assert (by_run / "model.pdparams").read_bytes() != (by_number / "model.pdparams").read_bytes()


def test_weights_that_do_not_fit_the_plan_are_one_line_errors(study_run, tmp_path):
    _, out, env, study, _ = study_run
    complete = [t.number for t in study.trials if t.state == TrialState.COMPLETE]
    copy = tmp_path / "study"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("export", "mlartifacts"))
    victim, donor = complete[-1], next(n for n in complete if n != complete[-1])
    shutil.copy(copy / "trials" / str(donor) / "finetuned.pdparams",
                copy / "trials" / str(victim) / "finetuned.pdparams")
    proc = run_cli("search.export", [*TINY_SEARCH, f"out_dir={copy}", *QUICK, f"trial={victim}"], env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "finetuned.pdparams" in last and "shape" in last, last
    assert not (copy / "export" / f"trial-{victim}").exists()


@pytest.mark.parametrize("overrides, message", [
    (["trial=0", "run_id=abc"], "error: trial=0 and run_id=abc: select a trial by one of them, not both"),
    (["run_id=0123"], f"error: run_id=0123: no trial of study '{STUDY}' has this MLflow run"),
    (["trial=99"], f"error: trial=99: study '{STUDY}' has trials 0..4"),
    (["export.format=onnx"], "error: export.format='onnx': expected one of ['both', 'pir', 'legacy']"),
    (["search.study_name=nope"], "error: search.study_name='nope': no such study in the storage"),
])
def test_bad_selections_are_one_line_errors(study_run, overrides, message):
    proc = export(study_run, *overrides)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == message


def test_screened_out_trial_cannot_be_exported(study_run):
    _, _, _, study, _ = study_run
    screened = next(t.number for t in study.trials if t.state == TrialState.PRUNED)
    proc = export(study_run, f"trial={screened}")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(
        f"error: trial {screened} was screened out and never fine-tuned; export a complete trial")


def test_export_that_fails_parity_is_not_put_in_place(study_run, tmp_path):
    _, out, _, study, _ = study_run
    number = study.user_attrs["chosen_trial"]
    plan = PruningPlan.load(out / "trials" / str(number) / "plan.json")
    model = load_pruned("ppocrv4_det", plan, out / "trials" / str(number) / "finetuned.pdparams")
    cfg = OmegaConf.create({"model": {"name": "ppocrv4_det"}, "data": {"eval": {"limit_side_len": 96,
                                                                                 "limit_type": "max"}},
                            "postprocess": {"thresh": 0.3},
                            "export": {"input_size": None, "format": "pir", "parity": {"tolerance": -1.0}}})
    image = np.random.default_rng(0).normal(size=(3, 64, 64)).astype(np.float32)
    with pytest.raises(ParityError, match="differs from the dygraph model"):
        _write_export(model, plan, cfg, tmp_path / "target", [image])
    assert not (tmp_path / "target").exists() and (tmp_path / "target.partial" / PIR_MODEL_FILE).exists()


def test_predict_runs_the_export(study_run, chosen_export, tmp_path):
    _, _, env, _, _ = study_run
    folder, _ = chosen_export
    images = next(Path(env["OCRDET_CACHE_DIR"]).rglob("images/eval"))
    proc = run_cli("search.predict", [f"export_dir={folder}", f"images={images}", f"out_dir={tmp_path}"], env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert re.match(r"^images=3 boxes=\d+ mean_latency_ms=\d+\.\d+ out_dir=", last), last
    lines = (tmp_path / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == 3 and all("latency_ms" in json.loads(line) for line in lines)
