"""Recovery fine-tuning: the distillation loss, the BN-bearing training form and its fusion, the threshold-branch
initialisation, adaptive BN, and a tiny real recovery of a pruned PP-OCRv4 det (shipped weights, rendered text)."""
from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path

import numpy as np
import paddle
import pytest
from omegaconf import OmegaConf
from prune_fixtures import perturbed

from prune.distill import backbone_feature_channels, neck_feature_channels
from prune.groups import discover_groups
from prune.plan import apply_plan, make_plan
from train.data.dataset import build_split
from train.data.synthetic import SyntheticSpec, ensure_synthetic_dataset, label_path
from train.errors import ConfigError
from train.models.training_form import fuse, unfuse
from train.models.zoo import MODEL_NAMES, build_detector, is_deploy_form, model_spec
from train.recovery import (
    FUSED_DIFF,
    DistillationLoss,
    RecoverySettings,
    feature_distillation,
    map_distillation,
    recalibrate_bn,
    recover,
    untouched_prefix,
)
from train.runtime import seed_everything
from train.weights import load_detector

REPO = Path(__file__).resolve().parents[1]
TINY = SyntheticSpec(n_train=6, n_eval=3, width_range=(128, 160), height_range=(128, 160), lines_range=(1, 3),
                     font_size_range=(18, 28))


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> Path:
    return ensure_synthetic_dataset(tmp_path_factory.mktemp("data") / "tiny", TINY, progress=False)


@pytest.fixture(scope="module")
def teacher() -> paddle.nn.Layer:
    return load_detector("ppocrv4_det", "pretrained")


def _images(seed: int = 0, shape=(2, 3, 64, 64)) -> paddle.Tensor:
    return paddle.to_tensor(np.random.RandomState(seed).uniform(-1, 1, shape).astype("float32"))


def test_map_distillation_values_on_a_hand_example():
    teacher = paddle.to_tensor([[0.5, 0.9]])
    student = paddle.to_tensor([[0.5, 0.6]])
    # Bernoulli KL(0.9 || 0.6) = 0.9 ln(0.9/0.6) + 0.1 ln(0.1/0.4); the first pixel agrees; mean over 2 pixels.
    kl = (0.9 * np.log(0.9 / 0.6) + 0.1 * np.log(0.1 / 0.4)) / 2
    assert float(map_distillation(student, teacher, "kl")) == pytest.approx(kl, rel=1e-5)
    assert float(map_distillation(student, teacher, "l2")) == pytest.approx(0.09 / 2, rel=1e-5)
    dice = 1 - 2 * (0.25 + 0.54) / ((0.25 + 0.36) + (0.25 + 0.81))
    assert float(map_distillation(student, teacher, "dice")) == pytest.approx(dice, rel=1e-5)
    features = paddle.to_tensor([[1.0, 3.0]])
    assert float(feature_distillation(paddle.to_tensor([[1.0, 1.0]]), features)) == pytest.approx(4 / 2 / 5)


def test_distillation_is_zero_for_an_identical_student_and_its_gradient_flows():
    teacher = perturbed("ppocrv4_det")
    student = copy.deepcopy(teacher)
    images = _images()
    student.eval()
    for map_loss in ("kl", RecoverySettings().map_loss):
        loss = DistillationLoss(student, teacher, map_weight=1.0, map_loss=map_loss, feature_weight=1.0)
        terms = loss(student(images), {"image": images})
        assert float(terms["loss_map"]) == pytest.approx(0.0, abs=1e-6), map_loss
        assert float(terms["loss_feature"]) == pytest.approx(0.0, abs=1e-9)
        loss.close()

    groups = discover_groups(student)
    plan = make_plan(student, "ppocrv4_det", {"neck.inp_conv.1.in_conv": 0.5, "head.binarize.conv1": 0.25},
                     groups=groups)
    apply_plan(student, plan, groups)
    student.train()
    channels = neck_feature_channels(plan, groups, teacher)
    assert len(channels) == 84 and channels[:24] == list(range(24)) and 48 not in channels
    terms = DistillationLoss(student, teacher, feature_weight=1.0, feature_channels=channels)(
        student(images), {"image": images})
    assert float(terms["loss_map"]) > 0 and float(terms["loss_feature"]) > 0
    terms["loss"].backward()
    assert float(student.backbone.conv1.conv.weight.grad.abs().sum()) > 0
    assert float(student.head.binarize.conv1.weight.grad.abs().sum()) > 0
    assert all(p.grad is None for p in teacher.parameters())
    with pytest.raises(ConfigError, match="feature_channels"):
        DistillationLoss(student, teacher, feature_weight=1.0)(student(images), {"image": images})


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_teacher_program_computes_the_dygraph_teachers_targets(name: str):
    """On CPU the teacher's targets come from its compiled program: every target equal to dygraph's up to float
    rounding (oneDNN sums in another order; 1e-4 of each target's scale, the predictor bound of test_measure), so
    the loss terms are the same, and an identical student is still 0."""
    teacher = perturbed(name)
    images = _images(shape=(2, 3, 96, 64))
    student = copy.deepcopy(teacher)
    student.eval()
    program = DistillationLoss(student, teacher, feature_weight=1.0, backbone_weight=1.0)
    dygraph = DistillationLoss(copy.deepcopy(teacher), teacher, feature_weight=1.0, backbone_weight=1.0,
                               teacher_program=False)
    assert program.teacher_program and not dygraph.teacher_program  # on CPU the program is the default
    fast, slow = program.teacher_outputs(images), dygraph.teacher_outputs(images)
    pairs = [*zip(fast.backbone, slow.backbone, strict=True), (fast.neck, slow.neck), (fast.shrink, slow.shrink)]
    assert len(pairs) == len(list(teacher.backbone.out_channels)) + 2
    for got, expected in pairs:
        assert got.shape == expected.shape and got.stop_gradient
        scale = max(1.0, float(expected.abs().max()))
        assert float((got - expected).abs().max()) <= 1e-4 * scale
    terms = program(student(images), {"image": images})
    assert float(terms["loss_map"]) == pytest.approx(0.0, abs=1e-5)
    assert float(terms["loss_feature"]) == pytest.approx(0.0, abs=1e-8)
    assert float(terms["loss_backbone"]) == pytest.approx(0.0, abs=1e-8)
    program.close()
    dygraph.close()


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_zoo_model_names_where_its_features_enter(name: str):
    model = build_detector(name)
    spec = model_spec(name)
    state = model.state_dict()
    assert [state[p].shape[1] for p in spec.neck_inputs] == list(model.backbone.out_channels)
    assert state[spec.head_input].shape[1] == model.neck.out_channels


def test_backbone_distillation_compares_every_output_at_the_kept_channels():
    """Identical student: 0. A student whose backbone outputs were cut: each output is compared with the teacher's
    channels it kept (read from the plan by the model's ModelSpec.neck_inputs), and the gradient reaches the
    backbone; without the kept channels it is a one-line error."""
    teacher = perturbed("ppocrv4_det")
    student = copy.deepcopy(teacher)
    images = _images()
    loss = DistillationLoss(student, teacher, map_weight=0.0, backbone_weight=1.0)
    student.eval()
    assert float(loss(student(images), {"image": images})["loss_backbone"]) == pytest.approx(0.0, abs=1e-9)
    loss.close()

    groups = discover_groups(student)
    plan = make_plan(student, "ppocrv4_det", {"backbone.layer_list.3": 0.5, "backbone.layer_list.1": 0.25},
                     groups=groups)
    apply_plan(student, plan, groups)
    channels = backbone_feature_channels(plan, groups, teacher)
    assert [len(c) for c in channels] == [12, 18 - 4, 42, 180]
    assert channels[0] == list(range(12)) and channels[3] == plan.kept["backbone.layer_list.3"]
    student.train()
    loss = DistillationLoss(student, teacher, map_weight=0.0, backbone_weight=1.0, backbone_channels=channels)
    terms = loss(student(images), {"image": images})
    assert float(terms["loss_backbone"]) > 0 and float(terms["loss"]) == float(terms["loss_backbone"])
    terms["loss"].backward()
    assert float(student.backbone.layer_list[3].weight.grad.abs().sum()) > 0
    assert student.head.binarize.conv1.weight.grad is None  # only the backbone is pulled
    loss.close()
    with pytest.raises(ConfigError, match="backbone output 1 has 14 channels but 18 .* backbone_channels"):
        DistillationLoss(student, teacher, map_weight=0.0, backbone_weight=1.0)(student(images), {"image": images})


@pytest.mark.parametrize("pruned", [False, True])
def test_training_form_trains_with_batch_norms_and_fuses_back_exactly(pruned: bool):
    model = perturbed("ppocrv4_det")
    if pruned:
        groups = discover_groups(model)
        ratios = {g.name: 0.3 for g in groups if g.prunable and g.name.startswith("backbone.blocks")}
        apply_plan(model, make_plan(model, "ppocrv4_det", ratios, groups=groups), groups)
    keys = sorted(model.state_dict())
    images = _images(1)
    model.eval()
    before = model(images)["maps"].numpy()

    unfuse(model, [images])
    assert not is_deploy_form(model)
    assert any(".conv_kxk.0.bn." in k for k in model.state_dict())
    model.eval()
    np.testing.assert_allclose(model(images)["maps"].numpy(), before, atol=1e-5)

    # A few real optimisation steps move conv weights, BN affines and BN running statistics.
    model.train()
    optimizer = paddle.optimizer.Adam(1e-3, parameters=model.parameters())
    for seed in range(3):
        model(_images(seed + 2))["maps"].mean().backward()
        optimizer.step()
        optimizer.clear_grad()
    model.eval()
    tuned = model(images)["maps"].numpy()
    assert np.abs(tuned - before).max() > 1e-3

    fuse(model)
    assert is_deploy_form(model) and sorted(model.state_dict()) == keys
    np.testing.assert_allclose(model(images)["maps"].numpy(), tuned, atol=1e-5)


def test_threshold_branch_initialisations(teacher: paddle.nn.Layer):
    model = copy.deepcopy(teacher)
    for tensor in model.head.thresh.parameters():
        tensor.set_value(paddle.zeros_like(tensor))
    model.head.init_thresh("copy")
    features = model.neck(model.backbone(_images(3)))
    np.testing.assert_array_equal(model.head.thresh(features).numpy(), model.head.binarize(features).numpy())

    paddle.seed(5)
    model.head.init_thresh("fresh")
    thresh = model.head.thresh
    assert float(thresh.conv1.weight.std()) > 0
    assert not np.allclose(thresh.conv1.weight.numpy(), model.head.binarize.conv1.weight.numpy())
    np.testing.assert_array_equal(thresh.conv_bn1.weight.numpy(), 1.0)
    np.testing.assert_array_equal(thresh.conv_bn1._mean.numpy(), 0.0)
    kept = copy.deepcopy(thresh.state_dict())
    model.head.init_thresh("keep")
    assert all(np.array_equal(kept[k].numpy(), v.numpy()) for k, v in thresh.state_dict().items())

    groups = discover_groups(model)
    ratios = {"head.binarize.conv1": 0.5, "neck.inp_conv.1.in_conv": 0.5}
    apply_plan(model, make_plan(model, "ppocrv4_det", ratios, groups=groups), groups)
    with pytest.raises(ConfigError, match="thresh_init"):
        model.head.init_thresh("copy")
    model.head.init_thresh("fresh")  # the train-only branch keeps its width, its input follows the neck
    assert list(model.head.thresh.conv1.weight.shape) == [24, 84, 3, 3]
    model.train()
    assert list(model(_images(4))["maps"].shape) == [2, 3, 64, 64]


def test_recalibrate_bn_sets_plain_batch_statistics():
    model = perturbed("ppocrv3_det")
    images = [_images(seed, (2, 3, 64, 64)) for seed in range(3)]
    stem_bn = model.backbone.conv.bn
    captured = []
    hook = model.backbone.conv.conv.register_forward_post_hook(lambda layer, inputs, out: captured.append(out.numpy()))
    recalibrate_bn(model, iter({"image": x} for x in images), steps=3)
    hook.remove()
    expected = np.mean([c.mean(axis=(0, 2, 3)) for c in captured], axis=0)
    np.testing.assert_allclose(stem_bn._mean.numpy(), expected, rtol=1e-4, atol=1e-6)
    assert not model.training and stem_bn._momentum == 0.9


def test_settings_come_from_the_config_group_and_reject_bad_values():
    cfg = OmegaConf.load(REPO / "conf" / "finetune" / "recovery.yaml")
    assert RecoverySettings(**cfg) == RecoverySettings()
    with pytest.raises(ConfigError, match="map_loss"):
        RecoverySettings(map_loss="huber")
    with pytest.raises(ConfigError, match="crop_size"):
        RecoverySettings(crop_size=100)
    with pytest.raises(ConfigError, match="nothing to learn"):
        RecoverySettings(map_weight=0, feature_weight=0, backbone_weight=0, label_weight=0)
    with pytest.raises(ConfigError, match="freeze_untouched"):
        RecoverySettings(freeze_untouched=True, training_form=True)


def _outputs(model: paddle.nn.Layer, names: list[str], image: paddle.Tensor) -> dict[str, np.ndarray]:
    """The outputs of ``model``'s sublayers ``names`` on ``image`` (eval mode)."""
    layers = dict(model.named_sublayers())
    found: dict[str, np.ndarray] = {}

    def keeper(name: str):
        def keep(layer: paddle.nn.Layer, inputs: tuple, output: paddle.Tensor) -> None:
            found.setdefault(name, output.numpy())
        return keep

    hooks = [layers[name].register_forward_post_hook(keeper(name)) for name in names]
    model.eval()
    with paddle.no_grad():
        model(image)
    for hook in hooks:
        hook.remove()
    return found


def test_the_untouched_prefix_ends_where_the_plan_first_changes_a_layer(teacher: paddle.nn.Layer):
    cut = "backbone.blocks4.1.pw_conv.reparam_conv"
    student = copy.deepcopy(teacher)
    apply_plan(student, make_plan(student, "ppocrv4_det", {cut: 0.25}))
    prefix = untouched_prefix(student, teacher)
    names = {id(layer): name for name, layer in student.named_sublayers()}
    prefix_names = [names[id(layer)] for layer in prefix]
    # The stem, stages 2 and 3, block 4.0 and block 4.1's depthwise conv run before the cut conv, and nothing else.
    assert prefix_names[0].startswith("backbone.conv1") and prefix_names[-1].startswith("backbone.blocks4.1.dw_conv")
    assert not any(name.startswith(("backbone.blocks4.1.pw_conv", "backbone.blocks5", "neck", "head"))
                   for name in prefix_names)
    # What makes freezing them safe: they compute exactly what the teacher's layers do.
    image = _images(3, (1, 3, 96, 96))
    ours, theirs = _outputs(student, prefix_names, image), _outputs(teacher, prefix_names, image)
    assert all(np.array_equal(ours[name], theirs[name]) for name in prefix_names)

    # Any difference ends it, a value as much as a shape; an unchanged model is untouched everywhere it runs.
    changed = copy.deepcopy(teacher)
    scale = changed.backbone.blocks3[0].dw_conv.lab.scale
    scale.set_value(scale * 1.01)
    changed_names = {id(layer): name for name, layer in changed.named_sublayers()}
    changed_prefix = [changed_names[id(layer)] for layer in untouched_prefix(changed, teacher)]
    assert changed_prefix[-1] == "backbone.blocks3.0.dw_conv.reparam_conv", changed_prefix[-3:]
    whole = untouched_prefix(copy.deepcopy(teacher), teacher)
    assert len(whole) > len(prefix) and any(names.get(id(layer)) is None for layer in whole)


def test_recovery_leaves_the_untouched_prefix_as_the_teacher_has_it(tiny_root: Path, teacher: paddle.nn.Layer):
    train_set = build_split(tiny_root, label_path(tiny_root, "train"), "train", crop_size=64)
    student = copy.deepcopy(teacher)
    plan = make_plan(student, "ppocrv4_det", {"backbone.blocks4.1.pw_conv.reparam_conv": 0.25})
    apply_plan(student, plan)
    prefix = untouched_prefix(student, teacher)
    before = {id(p): p.numpy().copy() for p in student.parameters()}
    frozen = {id(p) for layer in prefix for p in layer.parameters(include_sublayers=False)}
    trainable = [p.stop_gradient for p in student.parameters()]  # a BN's running statistics never train
    settings = RecoverySettings(steps=2, batch_size=2, crop_size=64, warmup_steps=1, freeze_untouched=True)
    recover(student, teacher, train_set, settings, progress=False)
    moved = {id(p) for p in student.parameters() if not np.array_equal(before[id(p)], p.numpy())}
    assert frozen and not moved & frozen
    assert moved, "the layers after the cut trained"
    assert [p.stop_gradient for p in student.parameters()] == trainable, "trainable again afterwards"
    assert [id(layer) for layer in untouched_prefix(student, teacher)] == [id(layer) for layer in prefix]


def _agreement(student: paddle.nn.Layer, teacher: paddle.nn.Layer, dataset) -> float:
    """Mean Dice between the binarised probability maps of student and teacher on the eval images."""
    scores = []
    for index in range(len(dataset)):
        image = paddle.to_tensor(dataset[index]["image"][None])
        with paddle.no_grad():
            s, t = student(image)["maps"].numpy() > 0.3, teacher(image)["maps"].numpy() > 0.3
        scores.append(2 * (s & t).sum() / (s.sum() + t.sum() + 1e-6))
    return float(np.mean(scores))


@pytest.mark.parametrize("training_form", [False, True])
def test_a_tiny_recovery_run_brings_a_pruned_model_back_towards_its_teacher(tiny_root: Path,
                                                                           teacher: paddle.nn.Layer,
                                                                           training_form: bool):
    train_set = build_split(tiny_root, label_path(tiny_root, "train"), "train", crop_size=96)
    eval_set = build_split(tiny_root, label_path(tiny_root, "eval"), "eval", limit_side_len=160)
    student = copy.deepcopy(teacher)
    groups = discover_groups(student)
    ratios = {g.name: 0.1 for g in groups if g.prunable}
    plan = make_plan(student, "ppocrv4_det", ratios, groups=groups)
    apply_plan(student, plan, groups)
    before = _agreement(student, teacher, eval_set)

    # The default recipe (deploy form, frozen BNs, labels), scaled down; and the same in the training form.
    settings = RecoverySettings(steps=12, lr=5e-3, warmup_steps=2, batch_size=2, crop_size=96, calibration_batches=1,
                                training_form=training_form, freeze_untouched=not training_form)
    steps = []
    seed_everything(0)  # the loader's shuffle draws from the global generators
    result = recover(student, teacher, train_set, settings,
                     feature_channels=neck_feature_channels(plan, groups, teacher),
                     backbone_channels=backbone_feature_channels(plan, groups, teacher),
                     on_step=lambda step, terms: steps.append(step), progress=False)
    after = _agreement(student, teacher, eval_set)
    assert steps == list(range(1, 13))
    terms = {"loss", "loss_map", "loss_feature", "loss_backbone", "loss_label"}
    assert set(result.final_terms) == (terms | {FUSED_DIFF} if training_form else terms)
    assert result.final_terms.get(FUSED_DIFF, 0.0) <= 1e-4
    assert is_deploy_form(student) and not student.training
    # Measured in the training form: 0.05 -> 0.55..0.64 over shuffle seeds 0-3 (binarised-map Dice with the teacher).
    assert after > before + 0.3, (before, after)


def test_frozen_batch_norms_and_the_unused_threshold_branch_stay_untouched(tiny_root: Path,
                                                                           teacher: paddle.nn.Layer):
    train_set = build_split(tiny_root, label_path(tiny_root, "train"), "train", crop_size=64)
    student = copy.deepcopy(teacher)
    # A student off its teacher, so distillation has something to train (an exact copy has zero loss).
    student.head.binarize.conv1.weight.set_value(student.head.binarize.conv1.weight * 1.1)
    head_bn = student.head.binarize.conv_bn1
    stats = head_bn._mean.numpy().copy()
    thresh = {k: v.numpy().copy() for k, v in student.head.thresh.state_dict().items()}
    conv = student.head.binarize.conv1.weight.numpy().copy()
    settings = RecoverySettings(steps=2, batch_size=2, crop_size=64, bn_mode="frozen", label_weight=0,
                                thresh_init="keep", training_form=False)
    recover(student, teacher, train_set, settings, progress=False)
    np.testing.assert_array_equal(head_bn._mean.numpy(), stats)
    assert all(np.array_equal(thresh[k], v.numpy()) for k, v in student.head.thresh.state_dict().items())
    assert not np.array_equal(student.head.binarize.conv1.weight.numpy(), conv)

    recover(student, teacher, train_set, replace(settings, steps=1, bn_mode="train"), progress=False)
    assert not np.array_equal(head_bn._mean.numpy(), stats)
