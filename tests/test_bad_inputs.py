"""The bad-input matrix of `python -m search` (issue 6): each mistake in data, model, checkpoint, plan or overrides is
one line `error: ...` on stderr and exit code 2 before any trial work, with no Optuna storage, MLflow store or trial
folder written; a corrupt sensitivity cache is reported on stderr, not trusted, and the study still completes.

The data is the user's kind (`data=icdar`): PaddleOCR label files written here over a few rendered images.
(Unknown skip-list groups, unreachable storage and tracking URLs are in test_search_cli.py.)
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Callable

import paddle
import pytest

from conftest import TINY_SEARCH, run_cli
from prune.plan import make_plan
from train.data.synthetic import SyntheticSpec, ensure_synthetic_dataset, label_path
from train.models.zoo import build_detector

BASE = [o for o in TINY_SEARCH if not o.startswith("data.generator.")]


@dataclasses.dataclass(frozen=True)
class Inputs:
    """A good icdar-format dataset, bad variants of its label files, and a checkpoint and plans of another model."""

    root: Path
    train: Path
    eval: Path
    bad_json: Path
    two_points: Path
    not_image: Path
    empty: Path
    other_checkpoint: Path
    other_plan: Path
    renamed_plan: Path
    image: Path  # a PNG of the dataset
    outside: Path  # eval labels plus a line whose region lies right of its image

    def data(self) -> list[str]:
        return ["data=icdar", f"data.root={self.root}", f"data.label_file={self.eval}",
                f"data.train_label_file={self.train}"]


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Inputs:
    base = tmp_path_factory.mktemp("inputs")
    spec = SyntheticSpec(n_train=4, n_eval=3, width_range=(160, 192), height_range=(160, 192), lines_range=(1, 2),
                         font_size_range=(20, 32))
    rendered = ensure_synthetic_dataset(base / "rendered", spec, progress=False)
    root = base / "dataset"
    shutil.copytree(rendered / "images", root / "images")
    train_lines = label_path(rendered, "train").read_text(encoding="utf-8").splitlines()
    eval_lines = label_path(rendered, "eval").read_text(encoding="utf-8").splitlines()
    (root / "notes.png").write_text("meeting notes, not an image\n")
    labels = base / "labels"
    labels.mkdir()

    image, _ = train_lines[0].split("\t")
    other = build_detector("ppocrv3_det")
    paddle.save(other.state_dict(), str(base / "ppocrv3_det.pdparams"))
    plan = make_plan(other, "ppocrv3_det", {})
    plan.save(base / "ppocrv3_det_plan.json")
    dataclasses.replace(plan, model="ppocrv4_det").save(base / "renamed_plan.json")
    return Inputs(
        root=root,
        train=_write(labels / "train.txt", train_lines),
        eval=_write(labels / "eval.txt", eval_lines),
        bad_json=_write(labels / "bad_json.txt", [eval_lines[0], eval_lines[1][:-1], eval_lines[2]]),
        two_points=_write(labels / "two_points.txt", [
            *train_lines[:2], image + "\t" + json.dumps([{"transcription": "x", "points": [[10, 10], [60, 10]]}])]),
        not_image=_write(labels / "not_image.txt", [
            *eval_lines, "notes.png\t" + json.dumps([{"transcription": "x", "points": [[0, 0], [9, 0], [9, 9]]}])]),
        empty=_write(labels / "empty.txt", []),
        image=root / image,
        outside=_write(labels / "outside.txt", [
            *eval_lines, image + "\t" + json.dumps([{"transcription": "x", "points": [[400, 10], [460, 10],
                                                                                      [460, 40], [400, 40]]}])]),
        other_checkpoint=base / "ppocrv3_det.pdparams",
        other_plan=base / "ppocrv3_det_plan.json",
        renamed_plan=base / "renamed_plan.json",
    )


GROUP = "backbone.blocks3.0.pw_conv.reparam_conv"  # a prunable group of ppocrv4_det
Case = Callable[[Inputs], tuple[list[str], str]]  # inputs -> (overrides, start of the last stderr line)

MULTIRUN: dict[str, Case] = {
    "missing dataset root": lambda i: (
        [f"data.root={i.root / 'nowhere'}"], f"error: data.root={i.root / 'nowhere'} is not a directory"),
    "malformed JSON line": lambda i: (
        [f"data.label_file={i.bad_json}"], f"error: {i.bad_json}:2: label is not valid JSON ("),
    "polygon with 2 points": lambda i: (
        [f"data.train_label_file={i.two_points}"],
        f"error: {i.two_points}:3: region 0: polygon has 2 point(s), needs at least 3"),
    "file that is not an image": lambda i: (
        [f"data.label_file={i.not_image}"],
        f"error: {i.not_image}:4: not an image OpenCV can read (unknown format or unreadable file): "
        f"{i.root / 'notes.png'}"),
    "empty eval split": lambda i: (
        [f"data.label_file={i.empty}"], f"error: no usable labelled images in {i.empty}"),
    "unknown model config": lambda i: (["model=nope"], "error: In 'search': Could not find 'model/nope'"),
    "unknown model name": lambda i: (
        ["model.name=nope"], "error: unknown detector 'nope'; known: det_mv3_db, ppocrv3_det, ppocrv4_det"),
    "checkpoint of another model": lambda i: (
        [f"model.checkpoint={i.other_checkpoint}"], f"error: {i.other_checkpoint}: missing key 'backbone."),
    "align 0": lambda i: (["prune.align=0"], "error: prune.align=0: must be >= 1"),
    "negative recovery steps": lambda i: (["finetune.steps=-5"], "error: finetune.steps=-5: must be >= 1"),
    "zero learning rate": lambda i: (["finetune.lr=0"], "error: finetune.lr=0: must be > 0"),
    "guard threshold out of range": lambda i: (
        ["search.select.min_agreement=2"], "error: search.select.min_agreement=2: must be in [0, 1] or null"),
    "align negative": lambda i: (["prune.align=-8"], "error: prune.align=-8: must be >= 1"),
    # Settings the study freezes: a typo here must not create a study that refuses the corrected command.
    "unknown sensitivity metric": lambda i: (
        ["sensitivity.metric=nope"], "error: sensitivity.metric='nope': known metrics are map_dice, hmean"),
    "unknown criterion": lambda i: (
        ["prune.criterion=nope"], "error: prune.criterion='nope': known criteria are fpgm, l1"),
    "zero timing threads": lambda i: (["measure.threads=0"], "error: measure.threads=0: must be >= 1"),
    "sensitivity ratio out of range": lambda i: (
        ["sensitivity.ratios=[0.5,1.5]"], "error: sensitivity.ratios [1.5]: every ratio must be in (0, 1)"),
    "label file that is an image": lambda i: (
        [f"data.label_file={i.image}"], f"error: {i.image}: not a text label file (byte 0 is not UTF-8)"),
    "label file that is a folder": lambda i: (
        [f"data.label_file={i.root}"], f"error: label file {i.root} is a folder, not a file"),
    "region outside its image": lambda i: (
        [f"data.label_file={i.outside}"], f"error: {i.outside}:4: region 0: polygon lies outside the "),
    "out_dir under a file": lambda i: (
        [f"out_dir={i.image}/study"], f"error: out_dir={i.image}/study: {i.image} is a file, not a folder"),
    "unknown override key": lambda i: (
        ["search.nope=1"], "error: Could not override 'search.nope': Key 'nope' is not in struct"),
    "override that does not parse": lambda i: (
        ["search.n_trials=["], "error: search.n_trials=[: no viable alternative at input '['"),
    "sweeper setting out of range": lambda i: (
        ["hydra.sweeper.batch_size=0"], "error: hydra.sweeper.batch_size=0: must be >= 1"),
}

SINGLE: dict[str, Case] = {
    "plan of another model": lambda i: (
        [f"trial.plan={i.other_plan}"], f"error: trial.plan={i.other_plan} is for model 'ppocrv3_det', not "
                                         "model=ppocrv4_det"),
    "plan of another model, renamed": lambda i: (
        [f"trial.plan={i.renamed_plan}"], "error: plan for ppocrv4_det: group 'backbone.conv.conv' is not a prunable "
                                          "group of this model (plan made for another model?)"),
    "ratio 1.2": lambda i: (
        [f"trial.ratios={{{GROUP}: 1.2}}"], f"error: group '{GROUP}': pruning ratio 1.2 must be in [0, 1)"),
    "ratio negative": lambda i: (
        [f"trial.ratios={{{GROUP}: -0.1}}"], f"error: group '{GROUP}': pruning ratio -0.1 must be in [0, 1)"),
    "checkpoint of another model": MULTIRUN["checkpoint of another model"],
    "empty eval split": MULTIRUN["empty eval split"],
}


def test_export_without_a_study_writes_no_store(tmp_path, cache_env):
    out = tmp_path / "nothing"
    proc = run_cli("search.export", [f"out_dir={out}"], cache_env)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: no study in out_dir={out}: ")
    assert not list(tmp_path.rglob("*.db")), "a store was written"


def _check_fails_untouched(proc, out: Path, expected: str) -> None:
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(expected), last
    assert not list(out.rglob("*.db")), "a store was written"
    assert not list(out.rglob("trials")) and not list(out.rglob("mlartifacts"))


@pytest.mark.parametrize("case", list(MULTIRUN))
def test_multirun_fails_in_one_line_before_any_work(inputs, tmp_path, cache_env, case):
    overrides, expected = MULTIRUN[case](inputs)
    out = tmp_path / "study"
    proc = run_cli("search", ["multirun", *BASE, *inputs.data(), f"out_dir={out}", *overrides], cache_env)
    _check_fails_untouched(proc, out, expected)


@pytest.mark.parametrize("case", list(SINGLE))
def test_single_trial_fails_in_one_line_before_any_work(inputs, tmp_path, cache_env, case):
    overrides, expected = SINGLE[case](inputs)
    out = tmp_path / "study"
    proc = run_cli("search", [*BASE, *inputs.data(), f"out_dir={out}", *overrides], cache_env)
    _check_fails_untouched(proc, out, expected)


# One trial (the unpruned baseline, no fine-tune) over a one-ratio scan: the cheapest study that builds a prior.
SHORT_STUDY = ["search.n_trials=1", "search.targets=[]", "search.warm_start.seed_rule_targets=[]",
               "sensitivity.ratios=[0.5]",
               "search.screening.enabled=false", "tracking.log_weights=false"]


@pytest.fixture(scope="module")
def scanned(inputs, tmp_path_factory):
    """A finished short study, its environment and the sensitivity cache file it wrote (and its content)."""
    root = tmp_path_factory.mktemp("scanned")
    env = dict(os.environ, OCRDET_CACHE_DIR=str(root / "cache"))
    env.setdefault("OMP_NUM_THREADS", "2")
    proc = run_cli("search", ["multirun", *BASE, *inputs.data(), *SHORT_STUDY, f"out_dir={root / 'first'}"], env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "warning:" not in proc.stderr
    [cache] = (root / "cache" / "sensitivity").glob("ppocrv4_det-*.json")
    return root, env, cache, json.loads(cache.read_text())


@pytest.mark.parametrize("damage", ["garbage bytes", "truncated JSON"])
def test_corrupt_sensitivity_cache_is_reported_and_rebuilt(inputs, scanned, damage):
    root, env, cache, good = scanned
    text = json.dumps(good, indent=1).encode()
    damaged = bytes(range(256)) * 4 if damage == "garbage bytes" else text[: len(text) // 2]
    cache.write_bytes(damaged)
    out = root / damage.replace(" ", "_")
    proc = run_cli("search", ["multirun", *BASE, *inputs.data(), *SHORT_STUDY, f"out_dir={out}"], env)

    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1].startswith("chosen_trial=0 hmean=")
    reports = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    assert len(reports) == 1 and reports[0].startswith(f"warning: sensitivity cache {cache} is corrupt ("), reports
    aside = reports[0].rsplit("moved to ", 1)[1].split(",")[0]
    assert (cache.parent / aside).read_bytes() == damaged  # set aside as it was, for a look
    rebuilt = json.loads(cache.read_text())
    assert rebuilt["key"] == good["key"] and rebuilt["channels"] == good["channels"]
    assert {g: set(row) for g, row in rebuilt["losses"].items()} == {g: {"0.5"} for g in good["channels"]}
    for group, row in good["losses"].items():
        assert rebuilt["losses"][group]["0.5"] == pytest.approx(row["0.5"], abs=0.05), group
    assert json.loads((out / "prior" / "sensitivity.json").read_text())["losses"] == rebuilt["losses"]
