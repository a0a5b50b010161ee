"""Multitask losses with masking of labels a corpus lacks.

A head whose label is missing for an item (gender -1, dimensions NaN) gets no
loss from that item; a head with no labelled item in the batch contributes
nothing at all - never a loss on filler values.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

#: the tasks a loss weight can name
#: ``speaker`` is adversarial: a speaker classifier behind gradient reversal (SERModule)
TASKS = ("emotion", "gender", "vad", "domain", "speaker")


@dataclass(frozen=True)
class LossSettings:
    """How the multitask loss is put together (``model.loss`` in the config).

    ``weights``: per task (missing tasks weigh 0, emotion 1); ``weighting``: ``fixed`` or
    ``uncertainty`` (learned task weights, :class:`UncertaintyWeighting`);
    ``class_weights``: None, ``"balanced"`` (inverse training-class frequency, from the
    class counts the module is given) or one weight per class.
    """

    weights: Mapping[str, float] = field(default_factory=lambda: {"emotion": 1.0})
    weighting: str = "fixed"
    label_smoothing: float = 0.0
    class_weights: str | Sequence[float] | None = None

    def __post_init__(self) -> None:
        if self.weighting not in ("fixed", "uncertainty"):
            raise ValueError("model.loss.weighting must be 'fixed' or 'uncertainty', "
                             f"not {self.weighting!r}")
        unknown = set(self.weights) - set(TASKS)
        if unknown:
            raise ValueError(f"model.loss.weights names unknown tasks {sorted(unknown)}; "
                             f"tasks: {list(TASKS)}")
        if self.weighting == "uncertainty" and float(self.weights.get("speaker", 0)) > 0:
            # a learned weight would simply switch the adversary off
            raise ValueError("model.loss.weights.speaker (adversarial) needs weighting=fixed")
        if isinstance(self.class_weights, str) and self.class_weights != "balanced":
            raise ValueError("model.loss.class_weights must be null, balanced or a list, "
                             f"not {self.class_weights!r}")

    def task_weights(self) -> dict[str, float]:
        """Every task's weight: emotion 1 and the others 0 unless given."""
        return {"emotion": 1.0, "gender": 0.0, "vad": 0.0, "domain": 0.0, "speaker": 0.0,
                **{str(k): float(v) for k, v in self.weights.items()}}

    def emotion_class_weights(self, class_counts: Sequence[int] | None) -> list[float] | None:
        """The emotion loss's class weights; ``class_counts``: the training split's counts."""
        if self.class_weights is None:
            return None
        if self.class_weights != "balanced":
            return [float(w) for w in self.class_weights]
        if class_counts is None:
            raise ValueError("model.loss.class_weights=balanced needs the training class counts")
        counts = torch.as_tensor(list(class_counts))
        return (counts.sum() / (len(counts) * counts.clamp_min(1))).tolist()


def concordance_cc(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Lin's concordance correlation coefficient of two ``(n,)`` vectors."""
    pred_mean, target_mean = pred.mean(), target.mean()
    covariance = ((pred - pred_mean) * (target - target_mean)).mean()
    return 2 * covariance / (pred.var(unbiased=False) + target.var(unbiased=False)
                             + (pred_mean - target_mean) ** 2 + eps)


def ccc_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor | None:
    """Mean over dimensions of ``1 - CCC``; ``pred``/``target`` ``(batch, dims)``, NaN = missing.

    Returns None when no dimension has at least two labelled items.
    """
    losses = []
    for dim in range(target.shape[1]):
        labelled = ~torch.isnan(target[:, dim])
        if labelled.sum() >= 2:
            losses.append(1 - concordance_cc(pred[labelled, dim], target[labelled, dim]))
    return torch.stack(losses).mean() if losses else None


def masked_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    class_mask: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Cross-entropy over items whose ``target`` is not -1; None when there are none.

    ``class_mask (batch, classes)`` removes classes an item's corpus does not have
    from its softmax (multi-corpus training: a missing class is masked, never relabelled).
    """
    labelled = target >= 0
    if not labelled.any():
        return None
    logits = logits[labelled]
    if class_mask is not None:
        logits = logits.masked_fill(~class_mask[labelled], torch.finfo(logits.dtype).min)
    return F.cross_entropy(logits, target[labelled], weight=weight,
                           label_smoothing=label_smoothing)


class UncertaintyWeighting(nn.Module):
    """Learned task weighting (Kendall et al., 2018): ``sum_i exp(-s_i) L_i + s_i``."""

    def __init__(self, tasks: list[str]) -> None:
        super().__init__()
        self.tasks = list(tasks)
        self.log_vars = nn.Parameter(torch.zeros(len(tasks)))

    def forward(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        total = self.log_vars.new_zeros(())
        for i, task in enumerate(self.tasks):
            if task in losses:
                total = total + torch.exp(-self.log_vars[i]) * losses[task] + self.log_vars[i]
        return total
