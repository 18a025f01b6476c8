"""The export's recovery in several runs at once: a spawned run recovers the same start with the next recovery seed,
and the model ends as the average of the runs' weights."""
from __future__ import annotations

import copy

import numpy as np
import paddle
import pytest
from hydra import compose, initialize_config_dir

from conftest import REPO, TINY_SEARCH
from prune.budget import plan_of_counts
from prune.groups import discover_groups
from prune.plan import apply_plan
from search.export_recovery import (average_weights, export_recovery_settings, recover_in_runs, recover_run,
                                     resolve_runs)
from search.objective import load_trial_data
from search.workers import usable_cores
from train.errors import ConfigError
from train.weights import load_detector, strip_backup_keys


def test_the_average_is_exact_and_keeps_what_every_run_shares():
    shared = np.array([0.1, 1e-7, 3.3], dtype="float32")
    states = [{"w": np.array([1.0, 2.0], dtype="float32"), "bn_mean": shared.copy(), "steps": np.array([5])},
              {"w": np.array([2.0, 5.0], dtype="float32"), "bn_mean": shared.copy(), "steps": np.array([7])},
              {"w": np.array([4.0, 1.0], dtype="float32"), "bn_mean": shared.copy(), "steps": np.array([9])}]
    averaged = average_weights(states)
    np.testing.assert_array_equal(averaged["w"], np.array([7 / 3, 8 / 3], dtype="float32"))
    assert averaged["w"].dtype == np.float32
    assert averaged["bn_mean"].tobytes() == shared.tobytes()  # frozen statistics stay bit-identical
    assert averaged["steps"].tolist() == [5]


def test_the_runs_setting():
    assert resolve_runs(3, threads=1, device="cpu") == 3
    assert resolve_runs("auto", threads=1, device="gpu:0") == 1  # the runs would share one device
    assert 1 <= resolve_runs("auto", threads=1, device="cpu") <= usable_cores()
    assert resolve_runs("auto", threads=usable_cores(), device="cpu") == 1
    for bad in (0, "-1", "many"):
        with pytest.raises(ConfigError, match=r"export\.finetune\.runs="):
            resolve_runs(bad, threads=1, device="cpu")


def test_two_runs_recover_with_their_own_seeds_and_the_model_is_their_average(tmp_path, monkeypatch):
    monkeypatch.setenv("OCRDET_CACHE_DIR", str(tmp_path / "cache"))
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        cfg = compose("export", overrides=[*TINY_SEARCH, "export.finetune.steps=2", "export.finetune.save_every=0",
                                           f"out_dir={tmp_path / 'study'}"])
    teacher = load_detector("ppocrv4_det", "pretrained")
    groups = discover_groups(teacher)
    channels = {g.name: g.channels for g in groups if g.prunable}
    cut = [name for name, width in channels.items() if width >= 32][:3]
    plan = plan_of_counts("ppocrv4_det", {name: 16 for name in cut}, channels, 8, (64, 64))
    model = apply_plan(copy.deepcopy(teacher), plan, groups)
    start = {k: v.numpy().copy() for k, v in strip_backup_keys(model.state_dict()).items()}
    data = load_trial_data(cfg)
    settings = export_recovery_settings(cfg)
    run_zero = {}

    def recover_here(student, checkpoint_prefix):
        recover_run(cfg, student, plan, teacher, data, settings, checkpoint_prefix, progress=False)
        run_zero.update({k: v.numpy().copy() for k, v in strip_backup_keys(student.state_dict()).items()})

    folder = tmp_path / "recovery"
    recover_in_runs(cfg, model, plan, settings, 2, folder, recover_here)

    run_one = paddle.load(str(folder / "run-1.pdparams"), return_numpy=True)
    assert set(run_one) == set(run_zero)
    moved = [k for k in start if not np.array_equal(run_one[k], start[k])]
    assert moved, "the spawned run did not train"
    assert any(not np.array_equal(run_one[k], run_zero[k]) for k in moved), "both runs used one recovery seed"
    final = strip_backup_keys(model.state_dict())
    for name, value in run_zero.items():
        expected = ((value.astype(np.float64) + run_one[name].astype(np.float64)) / 2).astype(value.dtype) \
            if np.issubdtype(value.dtype, np.floating) else value
        np.testing.assert_array_equal(final[name].numpy(), expected, err_msg=name)
