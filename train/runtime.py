"""What every command does before work starts: pick the device from config and seed the random generators."""
from __future__ import annotations

import random

import numpy as np
import paddle

from train.errors import ConfigError


def set_device(device: str) -> str:
    """Select `device` ("cpu", "gpu", "gpu:1") for paddle; a GPU request on a CPU-only build is a ConfigError."""
    if device.startswith("gpu") and not paddle.device.is_compiled_with_cuda():
        raise ConfigError(f"device={device}: this paddle build has no CUDA support; use device=cpu")
    try:
        return str(paddle.set_device(device))
    except ValueError as err:
        raise ConfigError(f"device={device}: {err}") from None


def seed_everything(seed: int) -> None:
    """Seed python, numpy and paddle so a fine-tune is repeatable on the same machine."""
    random.seed(seed)
    np.random.seed(seed)
    paddle.seed(seed)
