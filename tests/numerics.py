"""How close two float32 model outputs must be when the kernels that computed them may differ.

Equal maths summed in another order (MKL's generic, AVX2 or AVX-512 GEMM paths; another thread split) moves our
outputs against PaddleOCR's saved fixtures and against Paddle Inference by up to 9.3e-5 of the tensor's largest
magnitude; the real mismatches we plant (two filters of one conv swapped, one conv's weights 10% off) move them by
1.1e-2 or more. ``python benchmarks/numeric_spread.py`` measures both (README "Numerics across CPUs"); the bound
sits at their geometric middle, about 10x from either. Where both sides run the same kernels in one process
(export parity, masking vs pruning), the tests keep their tight bounds.
"""

from __future__ import annotations

import numpy as np

KERNEL_TOL = 1e-3


def max_deviation(actual: np.ndarray, expected: np.ndarray) -> float:
    """max |actual - expected| over the expected tensor's largest magnitude (at least 1)."""
    actual, expected = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"shape {actual.shape} != {expected.shape}"
    return float(np.abs(actual - expected).max() / max(1.0, float(np.abs(expected).max())))


def assert_close(actual: np.ndarray, expected: np.ndarray, what: str, tol: float = KERNEL_TOL) -> None:
    deviation = max_deviation(actual, expected)
    assert deviation <= tol, f"{what}: max |diff| / max(1, max |expected|) = {deviation:.3g} > {tol:.3g}"
