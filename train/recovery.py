"""Recovery fine-tuning: pull a pruned detector back to its unpruned teacher in a few hundred CPU steps.

A pruned PP-OCRv4 det detects nothing before it is trained again (see the README), so every search trial ends
with this short fine-tune. The student learns from the unpruned model (its probability map and, optionally, its
neck features at the channels the student kept) on train crops; labels (the DB loss) can be mixed in. The
teacher is the unpruned model in eval mode and never receives gradients.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np
import paddle

from train.data.dataset import DetDataset, endless_batches, mixed_batches
from train.data.transforms import build_train_transform
from train.data.unlabeled import unlabeled_train_set
from train.errors import ConfigError
from train.inference import InferenceSession, compile_program, eval_mode, on_cpu, worth_compiling
from train.loss import DBLoss
from train.models.db_head import THRESH_INITS
from train.models.training_form import fuse, has_fused_layers, unfuse
from train.trainer import Batch, FinetuneResult, FinetuneSettings, finetune

MAP_LOSSES = ("kl", "l2", "dice")
BN_MODES = ("train", "frozen")
_BATCH_NORMS = (paddle.nn.BatchNorm2D, paddle.nn.BatchNorm)
# Largest probability-map difference tolerated between the fine-tuned training-form model and its fused export
# before it counts as a fusion bug. Both are float32 computations of one function: on a recovered PP-OCRv4 det each
# is ~1e-5 away from the float64 result (measured 6e-6 and 1.1e-5), so the check cannot be tighter than the noise.
FUSE_TOLERANCE = 1e-4
# `FinetuneResult.final_terms` entry with that difference (training form only).
FUSED_DIFF = "fused_max_abs_diff"

# Probabilities are clipped before logs so a saturated pixel (sigmoid output exactly 0 or 1 in float32) cannot
# turn the loss into inf.
_PROB_EPS = 1e-6


@dataclass
class RecoverySettings:
    """How a pruned model is recovered; the defaults are the best measured setting (README, "Recovery fine-tuning").

    Flat on purpose: ``RecoverySettings(**cfg.finetune)`` reads ``conf/finetune/recovery.yaml``.
    ``map_weight``: distillation of the teacher's probability map (loss ``map_loss``); ``feature_weight``: relative
    L2 to the teacher's neck output at the student's kept channels; ``backbone_weight``: the same for each of the
    backbone's outputs (the neck's inputs), averaged over them; ``label_weight``: the DB loss on the crop's
    labels (0 turns it off, and then the threshold branch is skipped). ``thresh_init``: how the student's threshold
    branch starts ("keep", "copy" of the binarize branch, "fresh"). ``training_form``: fine-tune PPLCNetV3 with a
    BN per fused conv (``train.models.training_form``), fused back at the end. ``bn_mode``: "frozen" keeps every
    BN on its running statistics (only their affine trains), "train" uses batch statistics.
    ``calibration_batches``: train batches the training form's BN statistics are measured on.
    ``freeze_untouched``: the student's layers that still compute exactly what the teacher's do (``untouched_prefix``)
    are not trained.
    ``unlabeled_share``: the fraction of every batch taken from the unlabelled pool when one is given (distillation
    only: the teacher's near-zero map on text-free images is what stops the student firing there). ``seed`` seeds
    the crops' augmentation (the shuffle follows the global generators). ``teacher_program``: the teacher's targets
    from its compiled program (``DistillationLoss``; None: on CPU for ``COMPILE_MIN_FORWARDS`` steps or more).
    """

    steps: int = 120
    lr: float = 3e-3
    warmup_steps: int = 10
    batch_size: int = 2
    crop_size: int = 384
    augment: bool = True
    map_weight: float = 1.0
    map_loss: str = "dice"
    feature_weight: float = 10.0
    backbone_weight: float = 10.0
    label_weight: float = 1.0
    thresh_init: str = "fresh"
    training_form: bool = False
    bn_mode: str = "frozen"
    calibration_batches: int = 4
    unlabeled_share: float = 0.5
    weight_decay: float = 0.0
    grad_clip_norm: float | None = 10.0
    log_every: int = 10
    save_every: int = 0
    num_workers: int = 0
    seed: int = 0
    teacher_program: bool | None = None
    freeze_untouched: bool = True

    def __post_init__(self) -> None:
        if self.map_loss not in MAP_LOSSES:
            raise ConfigError(f"finetune.map_loss={self.map_loss!r}: expected one of {list(MAP_LOSSES)}")
        if self.thresh_init not in THRESH_INITS:
            raise ConfigError(f"finetune.thresh_init={self.thresh_init!r}: expected one of {list(THRESH_INITS)}")
        weights = ("map_weight", "feature_weight", "backbone_weight", "label_weight")
        for name in weights:
            if getattr(self, name) < 0:
                raise ConfigError(f"finetune.{name}={getattr(self, name)}: must be >= 0")
        if not any(getattr(self, name) for name in weights):
            raise ConfigError(f"finetune: {', '.join(weights)} are all 0; nothing to learn")
        if self.bn_mode not in BN_MODES:
            raise ConfigError(f"finetune.bn_mode={self.bn_mode!r}: expected one of {list(BN_MODES)}")
        if self.batch_size < 1:
            raise ConfigError(f"finetune.batch_size={self.batch_size}: must be >= 1")
        if self.crop_size < 32 or self.crop_size % 32:
            raise ConfigError(f"finetune.crop_size={self.crop_size}: must be a positive multiple of 32")
        if not 0.0 <= self.unlabeled_share < 1.0:
            raise ConfigError(f"finetune.unlabeled_share={self.unlabeled_share}: must be in [0, 1) (the rest of "
                              "each batch is labelled crops)")
        if self.steps < 1:
            raise ConfigError(f"finetune.steps={self.steps}: must be >= 1")
        if not self.lr > 0:
            raise ConfigError(f"finetune.lr={self.lr}: must be > 0")
        if self.freeze_untouched and self.training_form:
            raise ConfigError("finetune.freeze_untouched=true and finetune.training_form=true: the training form "
                              "rewrites the layers compared with the teacher's; set finetune.freeze_untouched=false")

    def unlabeled_per_batch(self) -> int:
        """Unlabelled crops in each batch of ``batch_size`` (at least one labelled crop stays)."""
        return min(self.batch_size - 1, int(round(self.batch_size * self.unlabeled_share)))

    def trainer_settings(self) -> FinetuneSettings:
        return FinetuneSettings(steps=self.steps, lr=self.lr, warmup_steps=self.warmup_steps,
                                weight_decay=self.weight_decay, grad_clip_norm=self.grad_clip_norm,
                                log_every=self.log_every, save_every=self.save_every)

    def to_json(self) -> dict:
        return asdict(self)


def map_distillation(student: paddle.Tensor, teacher: paddle.Tensor, kind: str) -> paddle.Tensor:
    """Mean per-pixel disagreement between two probability maps; 0 when they are equal.

    "kl": Bernoulli KL(teacher || student), i.e. BCE against the teacher's soft map minus the teacher's own
    entropy (same gradient as BCE, but 0 at agreement); "l2": squared error; "dice": 1 - soft Dice.
    """
    if kind == "kl":
        s = student.clip(_PROB_EPS, 1 - _PROB_EPS)
        t = teacher.clip(_PROB_EPS, 1 - _PROB_EPS)
        return (t * (t.log() - s.log()) + (1 - t) * ((1 - t).log() - (1 - s).log())).mean()
    if kind == "l2":
        return ((student - teacher) ** 2).mean()
    if kind == "dice":
        return 1 - 2 * (student * teacher).sum() / ((student * student).sum() + (teacher * teacher).sum() + 1e-6)
    raise ValueError(f"unknown map distillation {kind!r}")


def feature_distillation(student: paddle.Tensor, teacher: paddle.Tensor) -> paddle.Tensor:
    """Squared error relative to the teacher's mean square: scale-free, so one weight fits any neck.

    The raw neck activations of PP-OCRv4 are large (their plain MSE after pruning is ~5e4), which would swamp the
    map term and the gradient clip; relative to the teacher's energy the loss starts near 1 and is 0 at agreement.
    """
    return ((student - teacher) ** 2).mean() / ((teacher ** 2).mean() + 1e-12)


@dataclass
class TeacherOutputs:
    """What the teacher computes once per batch for the distillation terms."""

    backbone: list[paddle.Tensor]
    neck: paddle.Tensor
    shrink: paddle.Tensor

    @classmethod
    def of(cls, outputs: Sequence[paddle.Tensor]) -> TeacherOutputs:
        """From ``TeacherTargets``' flat output list."""
        return cls(backbone=list(outputs[:-2]), neck=outputs[-2], shrink=outputs[-1])


class TeacherTargets(paddle.nn.Layer):
    """A detector's distillation targets as one forward, ``[*backbone outputs, neck output, probability map]``: a
    layer, so that the frozen teacher compiles to one program (``train.inference.compile_program``)."""

    def __init__(self, teacher: paddle.nn.Layer) -> None:
        super().__init__()
        self.teacher = teacher

    def forward(self, images: paddle.Tensor) -> list[paddle.Tensor]:
        backbone = list(self.teacher.backbone(images))
        neck = self.teacher.neck(backbone)
        return [*backbone, neck, self.teacher.head.shrink_map(neck)]


class DistillationLoss:
    """``loss_fn`` for ``train.trainer.finetune``: student vs. a frozen teacher on the same images.

    Terms: ``map_weight`` x map distillation of the probability (shrink) map; ``feature_weight`` x
    ``feature_distillation`` between the student's neck output and the teacher's at ``feature_channels`` (the
    teacher channels the student kept, in the student's channel order; ``None`` = same width);
    ``backbone_weight`` x the mean of ``feature_distillation`` over the backbone's outputs, at
    ``backbone_channels`` (one index list per output; ``None`` = same widths); ``label_weight`` x the DB loss on
    the batch's label maps. The student's features are captured with forward hooks (``close()`` removes them),
    so the model's own forward and state_dict keys are untouched.

    ``teacher_program`` (default: on CPU) computes the teacher's targets with its compiled Paddle Inference
    program instead of dygraph: the same function up to float rounding (1e-5 of each output's scale on PP-OCRv4),
    and a recovery step takes 0.77x the time (PP-OCRv4, 384 px x 2, one thread: the teacher's 0.34 s become 0.07 s;
    README "Recovery fine-tuning"). The teacher is frozen: it is compiled once, at the first batch.

    Why the backbone too: the map and the neck output constrain the student only through the head's narrow view;
    pulling every stage's output back to the teacher's fixes the pruned backbone's features themselves, which is
    what carries over to images recovery never showed (README "Generalization").
    """

    def __init__(self, student: paddle.nn.Layer, teacher: paddle.nn.Layer, map_weight: float = 1.0,
                 map_loss: str = "dice", feature_weight: float = 0.0,
                 feature_channels: Sequence[int] | None = None, label_weight: float = 0.0,
                 db_loss: DBLoss | None = None, backbone_weight: float = 0.0,
                 backbone_channels: Sequence[Sequence[int]] | None = None,
                 teacher_program: bool | None = None) -> None:
        if map_loss not in MAP_LOSSES:
            raise ConfigError(f"map_loss={map_loss!r}: expected one of {list(MAP_LOSSES)}")
        self.map_weight = map_weight
        self.map_loss = map_loss
        self.feature_weight = feature_weight
        self.backbone_weight = backbone_weight
        self.label_weight = label_weight
        self.db_loss = db_loss if db_loss is not None else DBLoss()
        self.channels = _index(feature_channels)
        self.backbone_channels = (None if backbone_channels is None
                                  else [_index(channels) for channels in backbone_channels])
        self._student: dict[str, paddle.Tensor | list[paddle.Tensor]] = {}
        self._targets = TeacherTargets(teacher)
        self.teacher_program = on_cpu() if teacher_program is None else teacher_program
        self._program: InferenceSession | None = None
        self._hooks = []
        if feature_weight:
            self._hooks.append(student.neck.register_forward_post_hook(self._keeper("neck")))
        if backbone_weight:
            self._hooks.append(student.backbone.register_forward_post_hook(self._keeper("backbone")))

    def _keeper(self, part: str):
        def keep(layer: paddle.nn.Layer, inputs: tuple, output) -> None:
            self._student[part] = output
        return keep

    def close(self) -> None:
        """Remove the hooks on the student."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def teacher_outputs(self, images: paddle.Tensor) -> TeacherOutputs:
        """The teacher's backbone outputs, neck output and probability map for ``images`` (eval, no gradients)."""
        if self.teacher_program:
            if self._program is None:
                self._program = compile_program(self._targets)
            return TeacherOutputs.of([paddle.to_tensor(a) for a in self._program.run(images.numpy())])
        self._targets.eval()
        with paddle.no_grad():
            return TeacherOutputs.of(self._targets(images))

    def __call__(self, predicts: Mapping[str, paddle.Tensor], batch: Batch) -> dict[str, paddle.Tensor]:
        maps = predicts["maps"]
        teacher = self.teacher_outputs(batch["image"])
        terms: dict[str, paddle.Tensor] = {}
        total = paddle.zeros([], dtype=maps.dtype)
        if self.map_weight:
            terms["loss_map"] = map_distillation(maps[:, :1], teacher.shrink, self.map_loss)
            total = total + self.map_weight * terms["loss_map"]
        if self.feature_weight:
            terms["loss_feature"] = _selected_distillation(self._student.get("neck"), teacher.neck, self.channels,
                                                           "the neck output", "feature_channels")
            total = total + self.feature_weight * terms["loss_feature"]
        if self.backbone_weight:
            student = self._student.get("backbone")
            assert student is not None, "the student's backbone hook did not fire"
            channels = self.backbone_channels or [None] * len(teacher.backbone)
            if not len(student) == len(teacher.backbone) == len(channels):
                raise ConfigError(f"backbone distillation: the student's backbone has {len(student)} outputs, the "
                                  f"teacher's {len(teacher.backbone)}, and {len(channels)} channel lists were given")
            losses = [_selected_distillation(s, t, c, f"backbone output {i}", "backbone_channels")
                      for i, (s, t, c) in enumerate(zip(student, teacher.backbone, channels))]
            terms["loss_backbone"] = paddle.add_n(losses) / len(losses)
            total = total + self.backbone_weight * terms["loss_backbone"]
        if self.label_weight:
            db = self.db_loss(predicts, batch)
            terms["loss_label"] = db["loss"]
            total = total + self.label_weight * db["loss"]
        terms["loss"] = total
        return terms


def _index(channels: Sequence[int] | None) -> paddle.Tensor | None:
    return None if channels is None else paddle.to_tensor(list(channels), dtype="int64")


def _selected_distillation(student: paddle.Tensor | None, teacher: paddle.Tensor, channels: paddle.Tensor | None,
                           what: str, argument: str) -> paddle.Tensor:
    """``feature_distillation`` of the student's ``what`` against the teacher's at the kept ``channels``."""
    assert student is not None, f"the student's hook for {what} did not fire"
    target = teacher if channels is None else paddle.index_select(teacher, channels, axis=1)
    if target.shape[1] != student.shape[1]:
        raise ConfigError(f"feature distillation: the student's {what} has {student.shape[1]} channels but "
                          f"{target.shape[1]} teacher channels were selected; pass the kept channel indices as "
                          f"{argument}")
    return feature_distillation(student, target)


def recovery_dataset(train_set: DetDataset, settings: RecoverySettings) -> DetDataset:
    """``train_set``'s images and labels with the recovery crop size (the split's own crop may differ)."""
    if train_set.mode != "train":
        raise ValueError("recovery needs the train split (random crops with label maps)")
    return DetDataset(train_set.items, "train", build_train_transform(settings.crop_size, settings.augment),
                      seed=settings.seed)


def recover(
    student: paddle.nn.Layer,
    teacher: paddle.nn.Layer,
    train_set: DetDataset,
    settings: RecoverySettings,
    feature_channels: Sequence[int] | None = None,
    on_step: Callable[[int, dict[str, float]], bool | None] | None = None,
    progress: bool = True,
    checkpoint_prefix: Path | None = None,
    unlabeled: Sequence[Path] | None = None,
    backbone_channels: Sequence[Sequence[int]] | None = None,
) -> FinetuneResult:
    """Fine-tune the pruned ``student`` in place towards the unpruned ``teacher``; returns the loop's result.

    ``train_set``: the train split (its crop size is replaced by ``settings.crop_size``). ``unlabeled``: image
    files of an unlabelled pool; ``settings.unlabeled_share`` of every batch are crops of them. ``feature_channels``:
    for each neck output channel of the student, the teacher channel it was cut from (the kept indices of the
    concat-fed neck convs, in order); needed for feature distillation when the neck output was pruned;
    ``backbone_channels``: the same per backbone output (``prune.distill.backbone_feature_channels``). The
    student ends in eval mode, in the form it came in (deploy form stays deploy form).
    """
    student.head.init_thresh(settings.thresh_init)
    dataset = recovery_dataset(train_set, settings)
    unfused = settings.training_form and has_fused_layers(student)
    if unfused:  # only the training form needs the calibration crops (its BN statistics, the fusion check)
        probe = _calibration_images(dataset, settings)
        unfuse(student, probe)
    # Without labels nothing reads the threshold map: skipping its branch saves about a fifth of every step.
    overrides = _train_mode_overrides(student, freeze_bn=settings.bn_mode == "frozen",
                                      skip_thresh=settings.label_weight == 0)
    loss = DistillationLoss(student, teacher, map_weight=settings.map_weight, map_loss=settings.map_loss,
                            feature_weight=settings.feature_weight, feature_channels=feature_channels,
                            label_weight=settings.label_weight, backbone_weight=settings.backbone_weight,
                            backbone_channels=backbone_channels,
                            teacher_program=(worth_compiling(settings.steps) if settings.teacher_program is None
                                             else settings.teacher_program))
    batches: Iterator[Batch] = recovery_batches(dataset, settings, unlabeled)
    frozen = [p for layer in (untouched_prefix(student, teacher) if settings.freeze_untouched else [])
              for p in layer.parameters(include_sublayers=False) if not p.stop_gradient]
    for parameter in frozen:
        parameter.stop_gradient = True
    try:
        result = finetune(student, batches, loss, settings.trainer_settings(), checkpoint_prefix=checkpoint_prefix,
                          on_step=on_step, progress=progress)
    finally:
        loss.close()
        overrides.remove()
        for parameter in frozen:
            parameter.stop_gradient = False
    if unfused:
        result.final_terms[FUSED_DIFF] = _fuse_checked(student, probe[0])
    return result


def untouched_prefix(student: paddle.nn.Layer, teacher: paddle.nn.Layer,
                     input_size: tuple[int, int] = (64, 64)) -> list[paddle.nn.Layer]:
    """The student's layers with parameters that run before its first layer whose parameters differ from the
    teacher's (in shape or value), in the order they run.

    Such a layer's input comes only from layers that ran before it, all equal to the teacher's, so it computes
    exactly what the teacher's does: the pruning left it alone and recovery has nothing to correct there. Training
    it anyway moves features the teacher learnt on real images towards the recovery crops, and costs the backward
    pass through the model's high-resolution start. Found by one forward of a blank image with hooks (the order
    layers run in, whatever the model's structure); layers are matched to the teacher's by name.
    """
    order: dict[int, tuple[str, paddle.nn.Layer]] = {}  # first call of each layer, in call order
    owners = [(name, layer) for name, layer in student.named_sublayers()
              if layer.parameters(include_sublayers=False)]

    def recorder(name: str, layer: paddle.nn.Layer):
        def record(_layer: paddle.nn.Layer, _inputs: tuple) -> None:
            order.setdefault(id(layer), (name, layer))
        return record

    hooks = [layer.register_forward_pre_hook(recorder(name, layer)) for name, layer in owners]
    try:
        with eval_mode(student), paddle.no_grad():
            student(paddle.zeros([1, 3, *input_size], dtype="float32"))
    finally:
        for hook in hooks:
            hook.remove()
    reference = dict(teacher.named_parameters())
    prefix = []
    for name, layer in order.values():
        for key, parameter in layer.named_parameters(include_sublayers=False):
            theirs = reference.get(f"{name}.{key}")
            if (theirs is None or theirs.shape != parameter.shape
                    or not np.array_equal(theirs.numpy(), parameter.numpy())):
                return prefix
        prefix.append(layer)
    return prefix


def recovery_batches(dataset: DetDataset, settings: RecoverySettings,
                     unlabeled: Sequence[Path] | None = None) -> Iterator[Batch]:
    """Recovery's batches: labelled crops of ``dataset`` mixed with crops of the ``unlabeled`` images (empty DB
    targets, so only distillation learns from them)."""
    extra = settings.unlabeled_per_batch() if unlabeled else 0
    if not extra:
        return endless_batches(dataset, settings.batch_size, settings.num_workers)
    pool = unlabeled_train_set(list(unlabeled), settings.crop_size, settings.augment, seed=settings.seed)
    return mixed_batches([(dataset, settings.batch_size - extra), (pool, extra)], settings.num_workers)


def _calibration_images(dataset: DetDataset, settings: RecoverySettings) -> list[paddle.Tensor]:
    """The first ``calibration_batches`` batches of train crops (fixed: epoch 0, dataset order)."""
    count = min(len(dataset), max(1, settings.calibration_batches) * settings.batch_size)
    images = [dataset[i]["image"] for i in range(count)]
    return [paddle.to_tensor(np.stack(images[i:i + settings.batch_size]))
            for i in range(0, count, settings.batch_size)]


def _train_mode_overrides(model: paddle.nn.Layer, freeze_bn: bool, skip_thresh: bool):
    """A forward pre-hook that undoes parts of ``model.train()`` (which ``finetune`` calls) before every forward.

    ``freeze_bn``: every BN keeps using its running statistics. ``skip_thresh``: the DB head takes its inference
    path (probability map only); only the head object itself is switched, its BNs still follow ``freeze_bn``.
    """
    norms = [layer for layer in model.sublayers() if isinstance(layer, _BATCH_NORMS)] if freeze_bn else []

    def override(layer: paddle.nn.Layer, inputs: tuple) -> None:
        if skip_thresh:
            model.head.training = False
        for norm in norms:
            norm.eval()

    return model.register_forward_pre_hook(override)


def _fuse_checked(model: paddle.nn.Layer, images: paddle.Tensor) -> float:
    """Fuse the training-form branches back (deploy form); returns how much the probability map moved."""
    model.eval()
    with paddle.no_grad():
        before = model(images)["maps"]
        fuse(model)
        after = model(images)["maps"]
    diff = float((before - after).abs().max())
    assert diff <= FUSE_TOLERANCE, f"fusing the recovered model changed its output by {diff:.3g}"
    return diff


def recalibrate_bn(model: paddle.nn.Layer, batches: Iterator[Batch], steps: int) -> None:
    """Re-estimate every BatchNorm's running mean/variance on ``steps`` train batches (adaptive BN, EagleEye).

    Pruning shifts the activation statistics the BNs were fitted to; replacing them with the pruned model's own
    (an equal-weight average over the batches, not an exponential one) is a cheap proxy for its recovered
    quality. Weights are not changed. The model ends in eval mode.
    """
    norms = [layer for layer in model.sublayers() if isinstance(layer, _BATCH_NORMS)]
    if not norms or steps < 1:
        model.eval()
        return
    momenta = [layer._momentum for layer in norms]
    for layer in norms:
        layer._mean.set_value(paddle.zeros_like(layer._mean))
        layer._variance.set_value(paddle.ones_like(layer._variance))
    model.train()
    try:
        with paddle.no_grad():
            for step in range(1, steps + 1):
                # running = momentum * running + (1 - momentum) * batch: momentum (n-1)/n keeps the plain mean.
                for layer in norms:
                    layer._momentum = (step - 1) / step
                model(next(batches)["image"])
    finally:
        for layer, momentum in zip(norms, momenta):
            layer._momentum = momentum
        model.eval()
