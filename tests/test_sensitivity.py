"""Sensitivity scan on the real pretrained PP-OCRv4 det and tiny rendered probe images: values, cache, resume."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from conftest import TINY_POOL, TINY_SYNTHETIC, run_cli
from prune.groups import discover_groups
from prune.sensitivity import (
    probe_images,
    MapDiceProbe,
    SensitivityKey,
    SensitivityTable,
    compute_sensitivity,
    dice,
    relative_loss,
    sensitivity_key,
    shard_file,
)
from train.data.dataset import build_split
from train.data.source import resolve_data
from train.data.unlabeled import resolve_unlabeled
from train.data.synthetic import SyntheticSpec, ensure_synthetic_dataset, label_path
from train.errors import ConfigError
from train.weights import load_detector

TINY = SyntheticSpec(n_train=2, n_eval=1, width_range=(96, 128), height_range=(96, 128), lines_range=(1, 2),
                     font_size_range=(16, 24))
RATIOS = (0.3, 0.7)


class Setup(NamedTuple):
    model: object
    groups: list
    probe: MapDiceProbe
    key: SensitivityKey
    dataset: object


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = ensure_synthetic_dataset(tmp_path_factory.mktemp("data") / "tiny", TINY, progress=False)
    dataset = build_split(root, label_path(root, "train"), "eval", limit_side_len=128)
    model = load_detector("ppocrv4_det", "pretrained")
    groups = discover_groups(model)
    key = sensitivity_key(model, "ppocrv4_det", dataset, 2, (128, "max"), "fpgm", "map_dice", RATIOS)
    return Setup(model, groups, MapDiceProbe(dataset, 2, model), key, dataset)


class CountingProbe:
    """The real map-Dice probe, counting its evaluations and optionally stopping the scan after `stop_after`."""

    def __init__(self, probe: MapDiceProbe, stop_after: int | None = None):
        self.probe, self.stop_after, self.calls = probe, stop_after, 0
        self.metric = probe.metric

    def score(self, model) -> float:
        if self.stop_after is not None and self.calls >= self.stop_after:
            raise KeyboardInterrupt
        self.calls += 1
        return self.probe.score(model)


def test_relative_loss_and_dice():
    assert relative_loss(0.8, 0.6) == pytest.approx(0.2 / 0.801)
    assert relative_loss(0.5, 0.6) < 0
    assert dice(np.zeros((2, 2), bool), np.zeros((2, 2), bool)) == 1.0
    a = np.array([[1, 1, 0, 0]], bool)
    assert dice(a, np.array([[1, 0, 0, 0]], bool)) == pytest.approx(2 / 3)


def test_scan_resumes_after_kill_without_recomputing(setup, tmp_path: Path):
    model, groups, probe, key, _ = setup
    cache = tmp_path / "sens.json"
    first = CountingProbe(probe, stop_after=5)  # base + 4 evaluations, then "killed"
    with pytest.raises(KeyboardInterrupt):
        compute_sensitivity(model, "ppocrv4_det", first, key, cache, groups, progress=False)
    partial = SensitivityTable.load(cache, key)
    assert partial.base == 1.0
    assert sum(len(row) for row in partial.losses.values()) == 4

    second = CountingProbe(probe)
    table = compute_sensitivity(model, "ppocrv4_det", second, key, cache, groups, progress=False)
    prunable = [g for g in groups if g.prunable]
    assert second.calls == len(prunable) * len(RATIOS) - 4  # nothing finished is measured again
    assert table.is_complete()
    assert table.groups == [g.name for g in prunable]
    # Pruning 70% of the stem (16 channels) wrecks the maps; losses are real numbers, not placeholders.
    assert table.raw("backbone.conv1.conv")[-1] > 0.3
    assert all(np.isfinite(table.raw(g)).all() for g in table.groups)

    again = CountingProbe(probe)
    compute_sensitivity(model, "ppocrv4_det", again, key, cache, groups, progress=False)
    assert again.calls == 0


@pytest.mark.parametrize("damage", ["garbage", "edited_key", "nan_value"])
def test_corrupt_cache_is_reported_and_rebuilt(setup, tmp_path: Path, capsys, damage: str):
    model, groups, probe, key, _ = setup
    cache = tmp_path / "sens.json"
    prunable = [g for g in groups if g.prunable][:1]
    good = SensitivityTable(key=key, base=1.0, channels={g.name: g.channels for g in groups if g.prunable},
                            losses={prunable[0].name: {"0.3": 0.01}})
    good.save(cache)
    data = json.loads(cache.read_text())
    if damage == "garbage":
        cache.write_text("{not json")
    elif damage == "edited_key":
        data["key"]["criterion"] = "l1"
        cache.write_text(json.dumps(data))
    else:
        data["base"] = math.nan
        cache.write_text(json.dumps(data))

    counting = CountingProbe(probe, stop_after=1)  # only the base is recomputed before we stop
    with pytest.raises(KeyboardInterrupt):
        compute_sensitivity(model, "ppocrv4_det", counting, key, cache, groups, progress=False)
    report = capsys.readouterr().err.strip().splitlines()
    assert len(report) == 1 and report[0].startswith(f"warning: sensitivity cache {cache} is corrupt (")
    assert list(tmp_path.glob("sens.json.corrupt-*"))
    rebuilt = SensitivityTable.load(cache, key)
    assert rebuilt.losses == {}  # the untrusted entry was not carried over


def test_curve_is_monotone_and_raw_is_kept(tmp_path: Path):
    key = SensitivityKey("ppocrv4_det", "w", "d", "fpgm", "map_dice", (0.2, 0.4, 0.6))
    table = SensitivityTable(key=key, base=0.9, channels={"g": 8},
                             losses={"g": {"0.2": 0.10, "0.4": 0.05, "0.6": 0.30}})
    np.testing.assert_allclose(table.curve("g"), [0.10, 0.10, 0.30])
    table.save(tmp_path / "t.json")
    assert SensitivityTable.load(tmp_path / "t.json", key).raw("g").tolist() == [0.10, 0.05, 0.30]
    assert table.max_ratio_under("g", 0.2) == 0.4
    assert table.max_ratio_under("g", 0.01) == 0.0


@pytest.mark.parametrize("ratios", [[], [0.5, 0.3], [0.0, 0.5], [0.5, 1.0]])
def test_bad_ratio_grids_are_rejected(setup, ratios):
    with pytest.raises(ConfigError, match="sensitivity.ratios"):
        sensitivity_key(setup.model, "ppocrv4_det", setup.dataset, 1, (128, "max"), "fpgm", "map_dice", ratios)


def test_cli_writes_table_and_plot_and_reuses_cache(tmp_path: Path, cache_env):
    args = [*TINY_SYNTHETIC, *TINY_POOL, "sensitivity.images=1", "sensitivity.ratios=[0.5]",
            "sensitivity.limit_side_len=96", f"hydra.run.dir={tmp_path / 'run'}"]
    proc = run_cli("prune.sensitivity", args, cache_env)
    assert proc.returncode == 0, proc.stderr
    match = re.fullmatch(r"table=(\S+) plot=(\S+)", proc.stdout.strip().splitlines()[-1])
    assert match, proc.stdout
    csv_path, png_path = Path(match.group(1)), Path(match.group(2))
    assert png_path.read_bytes()[:4] == b"\x89PNG"
    rows = csv_path.read_text().splitlines()
    assert rows[0] == "group,channels,sensitivity,loss@0.5" and len(rows) > 20

    proc = run_cli("prune.sensitivity", args, cache_env)
    assert proc.returncode == 0, proc.stderr
    assert "sensitivity:" not in proc.stderr  # no progress bar: everything came from the cache


def _probe_config(tmp_path: Path, *overrides: str):
    with initialize_config_dir(str(Path(__file__).resolve().parents[1] / "conf"), version_base="1.3"):
        return compose("prune_sensitivity", overrides=[*TINY_SYNTHETIC, *TINY_POOL, "progress=false",
                                                       f"data.cache_dir={tmp_path / 'synthetic'}",
                                                       f"data.pool_cache_dir={tmp_path / 'pool'}", *overrides])


def test_the_default_probe_spreads_over_the_unlabelled_pool(tmp_path: Path):
    cfg = _probe_config(tmp_path, "sensitivity.images=3")
    assert cfg.sensitivity.split == "unlabeled"
    source = resolve_data(cfg.data, progress=False)
    probe = probe_images(cfg, source, "unlabeled", "map_dice", 3, (96, "max"))
    pool = resolve_unlabeled(cfg.data, progress=False).recovery
    assert [item.image_path for item in probe.items] == [pool[0], pool[2], pool[4]]  # 6 images, every second
    assert probe.mode == "eval" and all(not item.regions for item in probe.items)
    with pytest.raises(ConfigError, match="sensitivity.metric=hmean needs labels"):
        probe_images(cfg, source, "unlabeled", "hmean", 3, (96, "max"))
    none = _probe_config(tmp_path, "data.unlabeled=null")
    with pytest.raises(ConfigError, match="sensitivity.split=unlabeled needs the recovery images"):
        probe_images(none, source, "unlabeled", "map_dice", 3, (96, "max"))


def test_a_shared_scan_measures_each_pair_once_and_gives_the_same_table(setup, tmp_path: Path):
    """A helper measures from the far end into its shard (here stopped after 5 pairs); the builder skips those,
    merges them and removes the shard; the table equals a scan by one process."""
    model, groups, probe, key, _ = setup
    reference = compute_sensitivity(model, "ppocrv4_det", probe, key, tmp_path / "alone.json", groups, progress=False)
    cache = tmp_path / "shared.json"
    helper = CountingProbe(probe, stop_after=1 + 5)  # its base, then 5 pairs
    with pytest.raises(KeyboardInterrupt):
        compute_sensitivity(model, "ppocrv4_det", helper, key, cache, groups, progress=False, helper="w1")
    shard = SensitivityTable.load(shard_file(cache, "w1"), key)
    pairs = [(g.name, r) for g in groups if g.prunable for r in RATIOS]
    assert sorted((g, float(r)) for g, row in shard.losses.items() for r in row) == sorted(pairs[-5:])
    assert not cache.exists()  # a helper never writes the table itself

    builder = CountingProbe(probe)
    table = compute_sensitivity(model, "ppocrv4_det", builder, key, cache, groups, progress=False)
    assert builder.calls == 1 + len(pairs) - 5
    assert table.losses == reference.losses and table.is_complete()
    assert not shard_file(cache, "w1").exists() and SensitivityTable.load(cache, key).losses == reference.losses

    late = CountingProbe(probe)  # a helper that starts after the table is complete measures nothing, writes nothing
    compute_sensitivity(model, "ppocrv4_det", late, key, cache, groups, progress=False, helper="w2")
    assert late.calls == 0 and not shard_file(cache, "w2").exists()

    # A helper whose last pair was saved after the builder's merge (the builder measured it too) removes its shard.
    shard.save(shard_file(cache, "w3"))
    compute_sensitivity(model, "ppocrv4_det", CountingProbe(probe), key, cache, groups, progress=False, helper="w3")
    assert not shard_file(cache, "w3").exists()
