"""PaddleSlim 2.6.0 on paddlepaddle 3.1.1: the one place that reaches into PaddleSlim's internals.

PaddleSlim 2.6.0 was written for paddle 2.x and breaks on paddle 3.1.1 in two ways, both at its
dygraph-to-program trace (``paddleslim.core.dygraph._dy2prog``, used by every dygraph pruner and by
``paddleslim.analysis.dygraph_flops``):

- it enters ``paddle.base.dygraph.base._to_static_mode_guard_``, which paddle 3 renamed ``to_static_mode_guard``
  (same signature and meaning);
- it builds a ``paddle.static.Program`` and walks it with ``GraphWrapper``, which reads legacy op slots
  (``input_arg_names``); under PIR, paddle 3's default, the program holds ``pir.Operation`` objects instead. The
  trace therefore runs inside ``paddle.pir_utils.OldIrGuard()``.

``_dy2prog`` switches to static mode and switches back only on success: a failed trace would leave the whole
process in static mode, so dynamic mode is restored in a ``finally``. The alternative, ``FLAGS_enable_pir_api=0``
for the whole process, would also change how our own export and tracing behave, so the guard is scoped instead.

The other two PaddleSlim fixes NOTES.md lists are properties of our models, not of this shim: the learnable affine
block computes ``x * scale + bias`` (PaddleSlim's elementwise worker asserts on ``scale * x``) and every zoo
constructor, including ``rep()``, builds inside ``paddle.utils.unique_name.guard()`` (PaddleSlim keys parameters
by variable name and merges duplicates). With those, nothing else was needed on 3.1.1 for ``FPGMFilterPruner``
(groups, ``prune_var``/``prune_vars``, applying a plan) and ``dygraph_flops`` on the three zoo detectors.
PaddleSlim calls ``np.product``, removed in numpy 2: numpy stays < 2.
"""

from __future__ import annotations

import functools
import importlib
from types import ModuleType
from typing import Any

import paddle

_RENAMED_GUARD = "_to_static_mode_guard_"


def _alias_static_mode_guard() -> None:
    dygraph_base = paddle.base.dygraph.base
    if not hasattr(dygraph_base, _RENAMED_GUARD):
        setattr(dygraph_base, _RENAMED_GUARD, dygraph_base.to_static_mode_guard)


def _guard_trace(dygraph_module: ModuleType) -> None:
    """Wrap ``_dy2prog`` (looked up by ``dygraph2program`` at call time) in the old IR, restoring dynamic mode."""
    original = dygraph_module._dy2prog

    @functools.wraps(original)
    def dy2prog_old_ir(*args: Any, **kwargs: Any) -> paddle.static.Program:
        try:
            with paddle.pir_utils.OldIrGuard():
                return original(*args, **kwargs)
        finally:
            if not paddle.in_dynamic_mode():
                paddle.disable_static()

    dygraph_module._dy2prog = dy2prog_old_ir


@functools.cache
def import_paddleslim() -> ModuleType:
    """The ``paddleslim`` package, patched (once per process, hence the cache) to run on paddle 3.1.1.

    Imported lazily: PaddleSlim adds ~1.5 s of import time, which only the agreement checks need.
    """
    _alias_static_mode_guard()
    paddleslim = importlib.import_module("paddleslim")
    _guard_trace(importlib.import_module("paddleslim.core.dygraph"))
    return paddleslim
