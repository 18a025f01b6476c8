"""How far float32 outputs move across CPU kernels and thread counts: the spread the tests' tolerances come from.

The zoo tests compare our models with outputs PaddleOCR's own code saved (``../shared/reference``) and with Paddle
Inference running the shipped program. Equal maths in a different summation order (MKL's and oneDNN's ISA-specific
kernels, the thread split of a reduction) moves float32 outputs by ~1e-5..1e-4, so a bound set from one machine's
result fails on another CPU. This benchmark runs every comparison the tests make in fresh processes under
different kernel paths and thread counts, prints the largest deviation of each (relative to the tensor's largest
magnitude, at least 1), and, beside it, what real mismatches (a swapped pair of filters, one BN statistic off by
1%) do to the same outputs. The tests' bounds (``tests/numerics.py``) sit between the two with a wide margin.

    python benchmarks/numeric_spread.py            # all configurations (a few minutes)
    python benchmarks/numeric_spread.py --child    # this process only: one JSON line
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REFERENCE_DIR = REPO.parent / "shared" / "reference"

# Kernel paths a user's CPU may take. The dygraph convolutions run MKL's GEMM, which picks its code path by CPU
# (AVX-512 on recent Xeons, AVX2, or a generic path: on AMD it takes the generic one unless told otherwise);
# MKL_CBWR pins a path and MKL_DEBUG_CPU_TYPE=5 forces AVX2 on AMD. oneDNN's ISA caps and the thread count were
# measured too and change nothing here (no dygraph op on these paths uses oneDNN; GEMMs split rows, not sums).
CONFIGS: dict[str, dict[str, str]] = {
    "default-1t": {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
    "default-2t": {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"},
    "cbwr-compat": {"OMP_NUM_THREADS": "1", "MKL_CBWR": "COMPATIBLE"},
    "cbwr-avx": {"OMP_NUM_THREADS": "2", "MKL_CBWR": "AVX"},
    "cbwr-avx2": {"OMP_NUM_THREADS": "2", "MKL_CBWR": "AVX2"},
    "cbwr-avx512": {"OMP_NUM_THREADS": "2", "MKL_CBWR": "AVX512"},
    "mkl-avx2-amd": {"OMP_NUM_THREADS": "2", "MKL_DEBUG_CPU_TYPE": "5"},
    "onednn-sse41": {"OMP_NUM_THREADS": "2", "ONEDNN_MAX_CPU_ISA": "SSE41", "FLAGS_use_mkldnn": "1"},
}


def _deviation(actual, expected) -> float:
    """max |actual - expected| over the tensor's largest magnitude (at least 1): the tests' measure."""
    import numpy as np

    actual, expected = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    return float(np.abs(actual - expected).max() / max(1.0, float(np.abs(expected).max())))


def _measure() -> dict[str, float]:
    """Every comparison of tests/test_models.py and tests/test_weights.py, in this process's kernels."""
    import copy

    import numpy as np
    import paddle

    sys.path.insert(0, str(REPO))
    from train import weights
    from train.inference import InferenceSession
    from train.models import zoo

    paddle.set_device("cpu")
    out: dict[str, float] = {}
    builds = {"det_mv3_db": zoo.det_mv3_db, "ppocrv3_det": zoo.ppocrv3_det,
              "ppocrv4_det": lambda: zoo.ppocrv4_det(deploy=False)}
    for name, build in builds.items():
        folder = REFERENCE_DIR / name
        model = build()
        weights.load_checkpoint(model, folder / "weights.pdparams")
        model.eval()
        x = paddle.to_tensor(np.load(folder / "input.npy"))
        features = np.load(folder / "features_eval.npz")
        with paddle.no_grad():
            backbone = model.backbone(x)
            neck = model.neck(backbone)
            maps = model.head(neck)["maps"].numpy()
            out[f"{name}/backbone"] = max(_deviation(f.numpy(), features[f"backbone_out_{i}"])
                                          for i, f in enumerate(backbone))
            out[f"{name}/neck"] = _deviation(neck.numpy(), features["neck_out"])
            out[f"{name}/eval_maps"] = _deviation(maps, np.load(folder / "output_eval_maps.npy"))
            training = copy.deepcopy(model)  # a train-mode forward updates BN running statistics
            training.train()
            train_maps, expected = training(x)["maps"].numpy(), np.load(folder / "output_train_maps.npy")
            # The binary map is sigmoid(50 * (shrink - thresh)): it multiplies their deviations by up to 12.5, so
            # the tests compare shrink and thresh and check the binary map by its formula.
            out[f"{name}/train_shrink_thresh"] = _deviation(train_maps[:, :2], expected[:, :2])
            out[f"info:{name}/train_binary"] = _deviation(train_maps[:, 2:], expected[:, 2:])
            # Real mismatches, for the other side of the bound: two filters of a mid-network conv swapped (a swapped
            # layer), and the same conv's weights 10% off (a wrong weight).
            # Their deviation is the largest over the compared stages, as the tests fail on any of them.
            for fault in ("swap", "scale"):
                broken = copy.deepcopy(model)
                convs = [layer for layer in broken.sublayers() if isinstance(layer, paddle.nn.Conv2D)
                         and layer.weight.shape[0] > 8 and layer.weight.shape[1] > 1]
                weight = convs[len(convs) // 2].weight
                w = weight.numpy().copy()
                if fault == "swap":
                    w[[0, 1]] = w[[1, 0]]
                else:
                    w *= 1.1
                weight.set_value(w)
                stages = broken.backbone(x)
                faulty_neck = broken.neck(stages)
                out[f"fault:{name}/{fault}"] = max(
                    *(_deviation(f.numpy(), b.numpy()) for f, b in zip(stages, backbone)),
                    _deviation(faulty_neck.numpy(), neck.numpy()),
                    _deviation(broken.head(faulty_neck)["maps"].numpy(), maps))
        if name == "ppocrv4_det":
            zoo.reparameterize(model)
            with paddle.no_grad():
                deploy_maps = model(x)["maps"].numpy()
            out["ppocrv4_det/deploy_maps"] = _deviation(deploy_maps, np.load(folder / "output_eval_deploy_maps.npy"))
            out["ppocrv4_det/deploy_vs_multibranch"] = _deviation(deploy_maps, np.load(folder / "output_eval_maps.npy"))
            loaded = weights.load_detector("ppocrv4_det", folder / "weights.pdparams")
            with paddle.no_grad():
                out["ppocrv4_det/load_detector_fused"] = _deviation(
                    loaded(x)["maps"].numpy(), np.load(folder / "output_eval_deploy_maps.npy"))
    pretrained = weights.load_detector("ppocrv4_det", weights.PRETRAINED)
    program = InferenceSession(weights.pretrained_model_dir("ppocrv4_det"), use_mkldnn=False)
    text = np.load(REFERENCE_DIR / "ppocrv4_det_rapidocr_weights" / "input.npy")
    noise = np.random.default_rng(0).standard_normal((1, 3, 160, 224)).astype(np.float32)
    with paddle.no_grad():
        ours_text = pretrained(paddle.to_tensor(text))["maps"].numpy()
        ours_noise = pretrained(paddle.to_tensor(noise))["maps"].numpy()
    out["pretrained/vs_program_text"] = _deviation(ours_text, program(text))
    out["pretrained/vs_stored_text"] = _deviation(
        ours_text, np.load(REFERENCE_DIR / "ppocrv4_det_rapidocr_weights" / "output_eval_maps.npy"))
    out["pretrained/vs_program_noise"] = _deviation(ours_noise, program(noise))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", action="store_true", help="measure in this process, print one JSON line")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    args = parser.parse_args()
    if not REFERENCE_DIR.is_dir():
        sys.exit(f"error: reference fixtures not found at {REFERENCE_DIR}")
    if args.child:
        print(json.dumps(_measure()))
        return
    rows: dict[str, dict[str, float]] = {}
    for label in args.configs:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MKL_", "ONEDNN_", "OMP_", "FLAGS_"))}
        env.update(CONFIGS[label])
        run = subprocess.run([sys.executable, __file__, "--child"], check=False, env=env, capture_output=True,
                             text=True, cwd=REPO)
        if run.returncode != 0:
            sys.exit(f"error: configuration {label} failed:\n{run.stderr[-2000:]}")
        rows[label] = json.loads(run.stdout.strip().splitlines()[-1])
        print(f"measured {label}", file=sys.stderr, flush=True)
    keys = list(next(iter(rows.values())))
    width = max(len(k) for k in keys)
    print(f"{'comparison':<{width}}  " + "  ".join(f"{c:>17}" for c in rows) + "  " + f"{'max':>9}")
    for key in keys:
        values = [rows[c][key] for c in rows]
        print(f"{key:<{width}}  " + "  ".join(f"{v:>17.2e}" for v in values) + f"  {max(values):>9.2e}")
    spread = max(max(v for k, v in r.items() if not k.startswith(("fault:", "info:"))) for r in rows.values())
    faults = min(min(v for k, v in r.items() if k.startswith("fault:")) for r in rows.values())
    print(f"largest kernel/thread deviation {spread:.2e}; smallest real-mismatch deviation {faults:.2e}; "
          f"ratio {faults / max(spread, 1e-12):.0f}x")


if __name__ == "__main__":
    main()
