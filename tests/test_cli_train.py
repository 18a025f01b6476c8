"""The train commands as a user runs them: result lines, checkpoints that load back, one-line user errors."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from conftest import TINY_SYNTHETIC, run_cli
from prune.plan import prune_model
from train.inference import export_inference
from train.trainer import save_weights
from train.weights import load_detector

EVAL_LINE = re.compile(r"^hmean=(\d+\.\d+) precision=(\d+\.\d+) recall=(\d+\.\d+) images=(\d+)$")


def _last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


def test_evaluate_pretrained_on_tiny_synthetic(tmp_path: Path, cache_env):
    proc = run_cli("train.evaluate", [*TINY_SYNTHETIC, f"hydra.run.dir={tmp_path / 'run'}"], cache_env)
    assert proc.returncode == 0, proc.stderr
    match = EVAL_LINE.match(_last_line(proc.stdout))
    assert match, proc.stdout
    hmean, precision, recall, images = match.groups()
    assert int(images) == 3
    # The released detector finds clean rendered lines; a broken pipeline (normalisation, resize, box scaling)
    # scores near 0 here.
    assert float(hmean) >= 0.5


SHIFTED_V1 = Path(__file__).resolve().parents[2] / "shared" / "eval" / "shifted_v1"


@pytest.mark.skipif(not (SHIFTED_V1 / "label.txt").is_file(),
                    reason="../shared/eval/shifted_v1 is not beside the clone")
def test_evaluate_on_the_out_of_distribution_check_set(tmp_path: Path, cache_env):
    """`data=shifted_v1` reads ../shared/eval/shifted_v1 from the repository root, at PaddleOCR's eval resize."""
    proc = run_cli("train.evaluate", ["data=shifted_v1", "data.eval.max_images=4", "progress=false",
                                      f"hydra.run.dir={tmp_path / 'run'}"], cache_env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    match = EVAL_LINE.match(_last_line(proc.stdout))
    assert match and int(match.group(4)) == 4, proc.stdout
    assert float(match.group(1)) >= 0.5  # the pretrained model: 0.893 on all 80 images


def test_finetune_writes_checkpoint_that_evaluate_loads(tmp_path: Path, cache_env):
    out = tmp_path / "ft"
    args = [*TINY_SYNTHETIC, "finetune.steps=2", "finetune.batch_size=2", "finetune.warmup_steps=1",
            "data.train.crop_size=128", "evaluate_before=false", f"out_dir={out}", f"hydra.run.dir={out}"]
    proc = run_cli("train.finetune", args, cache_env)
    assert proc.returncode == 0, proc.stderr
    line = _last_line(proc.stdout)
    assert line.startswith(f"checkpoint={out / 'finetuned.pdparams'} hmean="), line
    assert (out / "last.json").exists() and (out / "report.json").exists()

    proc = run_cli("train.evaluate", [*TINY_SYNTHETIC, f"model.checkpoint={out / 'finetuned.pdparams'}",
                                      f"hydra.run.dir={tmp_path / 'eval'}"], cache_env)
    assert proc.returncode == 0, proc.stderr
    assert EVAL_LINE.match(_last_line(proc.stdout))


def test_missing_dataset_root_is_one_line_error(tmp_path: Path, cache_env):
    proc = run_cli("train.evaluate", ["data=icdar", f"data.root={tmp_path / 'nowhere'}", "data.label_file=x.txt",
                                      f"hydra.run.dir={tmp_path / 'run'}"], cache_env)
    assert proc.returncode == 2
    assert _last_line(proc.stderr) == f"error: data.root={tmp_path / 'nowhere'} is not a directory"
    assert proc.stdout.strip() == ""


def test_unset_label_file_is_one_line_error(tmp_path: Path, cache_env):
    proc = run_cli("train.evaluate", ["data=icdar", f"data.root={tmp_path}", f"hydra.run.dir={tmp_path / 'run'}"],
                   cache_env)
    assert proc.returncode == 2
    assert _last_line(proc.stderr) == "error: data.label_file is not set: pass data.label_file=<path>"


def test_checkpoint_that_does_not_exist_is_one_line_error(tmp_path: Path, cache_env):
    missing = tmp_path / "best_accuracy.pdparams"
    proc = run_cli("train.evaluate", [*TINY_SYNTHETIC, "model=det_mv3_db", f"model.checkpoint={missing}",
                                      f"hydra.run.dir={tmp_path / 'run'}"], cache_env)
    assert proc.returncode == 2
    last = _last_line(proc.stderr)
    assert last.startswith("error: ") and str(missing) in last


def test_checkpoint_of_another_model_is_one_line_error(tmp_path: Path, cache_env):
    out = tmp_path / "ft"
    proc = run_cli("train.finetune", [*TINY_SYNTHETIC, "finetune.steps=1", "finetune.batch_size=2",
                                      "finetune.warmup_steps=0", "data.train.crop_size=64", "evaluate_before=false",
                                      "evaluate_after=false", f"out_dir={out}", f"hydra.run.dir={out}"], cache_env)
    assert proc.returncode == 0, proc.stderr
    proc = run_cli("train.evaluate", [*TINY_SYNTHETIC, "model=det_mv3_db",
                                      f"model.checkpoint={out / 'finetuned.pdparams'}",
                                      f"hydra.run.dir={tmp_path / 'run'}"], cache_env)
    assert proc.returncode == 2
    last = _last_line(proc.stderr)
    assert last.startswith("error: ") and "finetuned.pdparams" in last


def test_evaluate_scores_an_export_and_a_pruned_checkpoint_alike(tmp_path, cache_env):
    """`train.evaluate export_dir=` (Paddle Inference) and `model.plan= model.checkpoint=` (dygraph) score the
    same pruned model identically on the same kernels (the deployment's oneDNN ones move maps by ~1e-4, which can
    move a box across a threshold); a plan with weights of another shape is the usual one-line error."""
    model, plan = prune_model(load_detector("ppocrv4_det", "pretrained"), "ppocrv4_det",
                              {"neck.inp_conv.0.in_conv": 0.5, "head.binarize.conv1": 0.5})
    plan.save(tmp_path / "plan.json")
    save_weights(model, tmp_path / "pruned.pdparams")
    export_inference(model, tmp_path / "export", formats=("pir", "legacy"))
    lines = {}
    for name, args in {"export": [f"export_dir={tmp_path / 'export'}", "threads=1", "use_mkldnn=false"],
                       "plan": [f"model.plan={tmp_path / 'plan.json'}",
                                f"model.checkpoint={tmp_path / 'pruned.pdparams'}"]}.items():
        proc = run_cli("train.evaluate", [*TINY_SYNTHETIC, *args, "progress=false"], cache_env)
        assert proc.returncode == 0, proc.stderr[-2000:]
        lines[name] = proc.stdout.strip().splitlines()[-1]
    assert lines["export"] == lines["plan"] and lines["plan"].startswith("hmean=")

    other = tmp_path / "other.json"
    prune_model(load_detector("ppocrv4_det", "pretrained"), "ppocrv4_det", {"head.binarize.conv1": 0.25})[1].save(other)
    proc = run_cli("train.evaluate", [*TINY_SYNTHETIC, f"model.plan={other}",
                                      f"model.checkpoint={tmp_path / 'pruned.pdparams'}"], cache_env)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith(
        f"error: {tmp_path / 'pruned.pdparams'}"), proc.stderr[-2000:]
