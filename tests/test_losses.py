"""Multitask losses: missing labels are masked out, never trained on filler values."""

import math

import torch

from ser_pipeline.losses import UncertaintyWeighting, ccc_loss, concordance_cc, masked_cross_entropy


def test_ccc_is_one_for_identical_vectors_and_lower_for_shifted():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert math.isclose(float(concordance_cc(x, x)), 1.0, rel_tol=1e-6)
    assert float(concordance_cc(x + 1, x)) < 1.0


def test_ccc_loss_ignores_nan_targets():
    pred = torch.tensor([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0], [99.0, 0.0]])
    target = torch.tensor([[1.0, float("nan")], [2.0, float("nan")], [3.0, float("nan")],
                           [float("nan"), float("nan")]])
    loss = ccc_loss(pred, target)
    assert loss is not None and abs(float(loss)) < 1e-6


def test_ccc_loss_is_none_without_labels():
    assert ccc_loss(torch.zeros(4, 3), torch.full((4, 3), float("nan"))) is None


def test_cross_entropy_skips_unlabelled_items():
    logits = torch.tensor([[5.0, 0.0], [0.0, 5.0], [100.0, -100.0]])
    target = torch.tensor([0, 1, -1])
    masked = masked_cross_entropy(logits, target)
    expected = torch.nn.functional.cross_entropy(logits[:2], target[:2])
    assert torch.allclose(masked, expected)


def test_cross_entropy_is_none_when_nothing_is_labelled():
    assert masked_cross_entropy(torch.zeros(3, 2), torch.full((3,), -1)) is None


def test_class_mask_removes_classes_a_corpus_lacks():
    logits = torch.tensor([[2.0, 0.0, 10.0]], requires_grad=True)
    mask = torch.tensor([[True, True, False]])
    loss = masked_cross_entropy(logits, torch.tensor([0]), class_mask=mask)
    expected = torch.nn.functional.cross_entropy(logits[:, :2], torch.tensor([0]))
    assert torch.allclose(loss, expected)
    loss.backward()
    assert logits.grad[0, 2] == 0


def test_uncertainty_weighting_learns_a_weight_per_task():
    weighting = UncertaintyWeighting(["emotion", "gender"])
    total = weighting({"emotion": torch.tensor(2.0)})
    total.backward()
    assert weighting.log_vars.grad[0] != 0 and weighting.log_vars.grad[1] == 0
