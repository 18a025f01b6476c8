"""`prune.profile`: Paddle Inference's per-op profile of real exported models, grouped into kinds of work."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from paddle import nn

from conftest import run_cli
from prune.measure import count_flops
from prune.profile import OTHER, op_kind, profile_model
from train.models import zoo


@pytest.mark.parametrize("op, kind", [
    ("onednn_op.fused_conv2d", "conv"), ("depthwise_conv2d", "conv"), ("onednn_op.conv2d_transpose", "transposed conv"),
    ("conv2d_transpose_bias", "transposed conv"), ("onednn_op.fused_elementwise_add", "elementwise"),
    ("onednn_op.multiply", "elementwise"), ("hard_swish", "elementwise"), ("onednn_op.batch_norm_", "batch norm"),
    ("onednn_op.nearest_interp", "resize, concat, pool"), ("pd_op.onednn_to_paddle_layout", OTHER),
])
def test_op_kinds(op: str, kind: str):
    assert op_kind(op) == kind


def test_profile_counts_the_programs_ops_and_carries_the_flops():
    """det_mv3_db: every Conv2D of the inference graph is one conv op per run (oneDNN fuses BN and activations into
    it), and so is the head's last transposed conv (exported as a 1x1 conv and a pixel shuffle), the other one a
    transposed conv; FLOPs by kind add up to the model's."""
    model = zoo.det_mv3_db()
    model.eval()
    profile = profile_model(model, (96, 96), threads=1, warmup=1, runs=3)
    convs = [name for name, layer in model.named_sublayers()
             if type(layer) is nn.Conv2D and not name.startswith("head.thresh")]
    calls = {kind: sum(op.calls for op in profile.ops if op_kind(op.op) == kind) for kind in profile.kinds()}
    assert calls["conv"] == len(convs) + 1 and len(convs) > 50
    assert calls["transposed conv"] == 1
    assert profile.total_ms > 0 and all(op.ms >= 0 for op in profile.ops)
    assert sum(profile.kind_flops.values()) == count_flops(model, (96, 96))
    assert profile.kind_flops["conv"] > 0.9 * count_flops(model, (96, 96)) and profile.kind_flops["elementwise"] == 0


LAST_LINE = re.compile(r"^ms=([0-9.]+) transposed_conv_share=([0-9.]+) conv_share=([0-9.]+) batch_norm_share=([0-9.]+) "
                       r"elementwise_share=([0-9.]+) resize_share=([0-9.]+) other_share=([0-9.]+)$")


def test_cli_prints_the_tables_and_a_last_line(tmp_path: Path, cache_env):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    proc = run_cli("prune.profile", ["profile.input_size=[64,64]", "profile.warmup=1", "profile.runs=2",
                                     f"hydra.run.dir={tmp_path}"], cache_env, cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    assert list(cwd.iterdir()) == []  # Paddle's profiler dump (./profile.log) stays out of the user's folder
    lines = proc.stdout.strip().splitlines()
    assert "| kind | time share | FLOPs share | ms |" in lines and any("fused_conv2d" in line for line in lines)
    match = LAST_LINE.match(lines[-1])
    assert match, lines[-1]
    assert float(match.group(1)) > 0 and sum(float(share) for share in match.groups()[1:]) == pytest.approx(1, abs=1e-3)
    bad = run_cli("prune.profile", ["profile.runs=0", f"hydra.run.dir={tmp_path}"], cache_env, cwd=tmp_path)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1].startswith("error: profile.threads=1, profile.runs=0")
