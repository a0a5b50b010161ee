"""SERModule: the LightningModule that owns losses, metrics and optimisation.

The network is any plain ``nn.Module`` following the models' contract
(``forward(features, lengths) -> {"emotion", "gender", "vad", ...}``); this class
adds the multitask losses (masked where a corpus lacks a label), torchmetrics
per stage (``train/…``, ``val/…``, ``test/…``) and the confusion matrices that
tracking logs.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassRecall,
)

from ser_pipeline.corpora.manifest import DIMENSIONS
from ser_pipeline.losses import (
    TASKS,
    LossSettings,
    UncertaintyWeighting,
    ccc_loss,
    concordance_cc,
    masked_cross_entropy,
)
from ser_pipeline.metrics import uar
from ser_pipeline.models.heads import task_head
from ser_pipeline.models.layers import GradientReversal

STAGES = ("train", "val", "test")
log = logging.getLogger(__name__)


def gather_from_ranks(items: list) -> list:
    """``items`` of every DDP process, rank after rank; ``items`` itself in one process.

    For what torchmetrics does not reduce (CCC inputs, test predictions and their ids): every
    rank holds only its shard of the set. Every rank must call it (it is a collective).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return items
    everyone: list[list | None] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, items)
    return [item for part in everyone for item in part]


class StageMetrics(nn.Module):
    """All metrics of one stage; emotion metrics are torchmetrics, CCC masks missing labels."""

    def __init__(self, n_classes: int, top_k: int) -> None:
        super().__init__()
        self.emotion = MetricCollection({
            "uar": MulticlassRecall(n_classes, average="macro"),
            "wa": MulticlassAccuracy(n_classes, average="micro"),
            "f1": MulticlassF1Score(n_classes, average="macro"),
            f"top{top_k}": MulticlassAccuracy(n_classes, top_k=top_k, average="micro"),
        })
        self.class_recall = MulticlassRecall(n_classes, average=None)
        self.confusion = MulticlassConfusionMatrix(n_classes)
        self.gender = MulticlassAccuracy(2, average="micro")
        self.vad_pred: list[torch.Tensor] = []
        self.vad_true: list[torch.Tensor] = []
        self.has_gender = False

    def update(self, outputs: dict[str, torch.Tensor], batch: dict[str, Any]) -> None:
        logits = outputs["emotion"].detach()
        self.emotion.update(logits, batch["emotion"])
        self.class_recall.update(logits, batch["emotion"])
        self.confusion.update(logits, batch["emotion"])
        labelled = batch["gender"] >= 0
        if labelled.any():
            self.has_gender = True
            self.gender.update(outputs["gender"].detach()[labelled], batch["gender"][labelled])
        self.vad_pred.append(outputs["vad"].detach().cpu())
        self.vad_true.append(batch["vad"].detach().cpu())

    def compute(self) -> dict[str, torch.Tensor]:
        # torchmetrics reduce their states over DDP ranks here; the rest is gathered, and
        # every decision below is the same on all ranks (each compute is a collective)
        values = dict(self.emotion.compute())
        for i, recall in enumerate(self.class_recall.compute()):
            values[f"recall_{i}"] = recall
        if any(gather_from_ranks([self.has_gender])):
            values["gender_acc"] = self.gender.compute()
        vad_pred, vad_true = gather_from_ranks(self.vad_pred), gather_from_ranks(self.vad_true)
        if vad_pred:
            pred, true = torch.cat(vad_pred), torch.cat(vad_true)
            for d, name in enumerate(DIMENSIONS[: true.shape[1]]):
                labelled = ~torch.isnan(true[:, d])
                if labelled.sum() >= 2:
                    values[f"ccc_{name}"] = concordance_cc(pred[labelled, d], true[labelled, d])
        return values

    def reset(self) -> None:
        self.emotion.reset()
        self.class_recall.reset()
        self.confusion.reset()
        self.gender.reset()
        self.vad_pred, self.vad_true, self.has_gender = [], [], False


class SERModule(pl.LightningModule):
    """Multitask speech emotion recognition training."""

    def __init__(
        self,
        net: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        class_names: list[str],
        scheduler: Callable[..., Any] | None = None,
        loss: LossSettings | None = None,
        spec_augment: nn.Module | None = None,
        mixup_alpha: float = 0.0,
        domain_names: list[str] | None = None,
        class_counts: list[int] | None = None,
        top_k: int = 3,
        encoder_lr: float | None = None,
        n_speakers: int = 0,
    ) -> None:
        """``net``, ``class_names``, ``domain_names``, ``class_counts`` (training split,
        for ``loss.class_weights=balanced``) and ``n_speakers`` (training speakers) come from
        the data; the rest is ``conf/model`` (``optimizer``/``scheduler`` are factories:
        ``_partial_: true``).

        With ``loss.weights.speaker > 0`` (speaker-adversarial training, the inductive cousin
        of speaker normalisation) a speaker classifier on the net's ``"embedding"`` learns the
        training speakers behind a gradient-reversal layer, so the encoder is pushed towards
        embeddings that do not tell the speakers apart; the reversal is annealed from 0 to 1
        over training (Ganin & Lempitsky's DANN schedule). The classifier is a training aid:
        it lives here, not in the net, so model directories never hold it.
        """
        super().__init__()
        self.net = net
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.class_names = list(class_names)
        loss = loss or LossSettings()
        self.loss_weights = loss.task_weights()
        tasks = [t for t, w in self.loss_weights.items() if w > 0]
        self.uncertainty = UncertaintyWeighting(tasks) if loss.weighting == "uncertainty" else None
        self.label_smoothing = loss.label_smoothing
        class_weights = loss.emotion_class_weights(class_counts)
        self.register_buffer("class_weights",
                             torch.tensor(class_weights, dtype=torch.float32)
                             if class_weights else None, persistent=False)
        self.spec_augment = spec_augment
        self.mixup_alpha = float(mixup_alpha or 0.0)
        self.domain_names = list(domain_names or [])
        self.speaker_head: nn.Module | None = None
        self.speaker_reversal: GradientReversal | None = None
        if self.loss_weights["speaker"] > 0 and n_speakers < 2:
            # a recipe must run unchanged on any corpus: a split without two training speakers
            # (a tiny corpus, a predefined split without speaker ids) trains without it
            log.warning("model.loss.weights.speaker: %d training speaker(s), nothing to tell "
                        "apart; speaker-adversarial training is off for this run", n_speakers)
            self.loss_weights["speaker"] = 0.0
        if self.loss_weights["speaker"] > 0:
            heads = getattr(net, "heads", None)
            if not hasattr(heads, "embedding_dim"):
                raise ValueError(f"model.loss.weights.speaker needs a net with EmotionHeads "
                                 f"(net.heads); {type(net).__name__} has none")
            self.speaker_reversal = GradientReversal(scale=0.0)
            self.speaker_head = task_head(heads.embedding_dim, n_speakers, hidden_dim=128,
                                          dropout=0.3)
        # a fine-tuned encoder's own learning rate (the net's ``parameter_groups``)
        self.encoder_lr = encoder_lr
        self._test_outputs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.top_k = min(top_k, len(class_names))
        # ModuleDict keys cannot be "train" (nn.Module.train exists), hence the suffix
        self.metrics = nn.ModuleDict({f"{s}_metrics": StageMetrics(len(class_names), self.top_k)
                                      for s in STAGES})
        self.best_val_uar = -1.0
        self.last_val_uar = -1.0  # the latest epoch's (test_weights=last tests those weights)
        self.best_val_confusion: torch.Tensor | None = None
        self.test_confusion: torch.Tensor | None = None
        self.test_results: dict[str, float] = {}
        # class probabilities of the last test, in loader order (breakdown and calibration
        # reports): ``(n_test, n_classes)``, with the utterance ids beside them
        self._test_probabilities: list[torch.Tensor] = []
        self._test_ids: list[str] = []
        self.test_probabilities: torch.Tensor | None = None
        self.test_ids: list[str] = []

    def forward(self, features: torch.Tensor, lengths: torch.Tensor,
                functionals: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``functionals``: the batch's functionals-stream vectors, for a model that fuses them."""
        if functionals is None:
            return self.net(features, lengths)
        return self.net(features, lengths, functionals=functionals)

    def losses(self, outputs: dict[str, torch.Tensor], batch: dict[str, Any]) -> dict[str, Any]:
        """Per-task losses; tasks without labelled items in the batch are absent."""
        losses: dict[str, torch.Tensor] = {}
        candidates = {
            "emotion": lambda: masked_cross_entropy(
                outputs["emotion"], batch["emotion"], self.class_weights,
                self.label_smoothing, batch.get("class_mask")),
            "gender": lambda: masked_cross_entropy(outputs["gender"], batch["gender"]),
            "vad": lambda: ccc_loss(outputs["vad"], batch["vad"]),
            "domain": lambda: (masked_cross_entropy(outputs["domain"], batch["domain"])
                               if "domain" in outputs else None),
            "speaker": lambda: (masked_cross_entropy(
                self.speaker_head(self.speaker_reversal(outputs["embedding"])), batch["speaker"])
                if self.speaker_head is not None and "speaker" in batch else None),
        }
        for task, weight in self.loss_weights.items():
            if weight > 0:
                value = candidates[task]()
                if value is not None:
                    losses[task] = value
        if self.uncertainty is not None:
            total = self.uncertainty(losses)
        else:
            total = sum(self.loss_weights[t] * v for t, v in losses.items())
        return {"total": total, **losses}

    def _step(self, batch: dict[str, Any], stage: str) -> torch.Tensor:
        features = batch["features"]
        if stage == "train" and self.spec_augment is not None:
            features = self.spec_augment(features, batch["lengths"])
        if stage == "train" and self.mixup_alpha > 0:
            return self._mixup_step(batch, features)
        outputs = self(features, batch["lengths"], batch.get("functionals"))
        losses = self.losses(outputs, batch)
        size = len(batch["ids"])
        # sync_dist: under DDP the epoch's loss is the mean over ranks (a no-op in one process)
        self.log(f"{stage}/loss", losses["total"], on_step=False, on_epoch=True, batch_size=size,
                 prog_bar=stage != "train", sync_dist=True)
        for task in TASKS:
            if task in losses:
                self.log(f"{stage}/loss_{task}", losses[task], on_step=False, on_epoch=True,
                         batch_size=size, sync_dist=True)
        self.metrics[f"{stage}_metrics"].update(outputs, batch)
        if stage == "test":
            self._test_probabilities.append(outputs["emotion"].detach().softmax(-1).cpu())
            self._test_ids += list(batch["ids"])
            self._test_outputs.append((outputs["emotion"].argmax(-1).cpu(),
                                       batch["emotion"].cpu(), batch["domain"].cpu()))
        return losses["total"]

    def _mixup_step(self, batch: dict[str, Any], features: torch.Tensor) -> torch.Tensor:
        """Mixup (Zhang et al., 2018): the loss of a mixed batch is the lam-weighted loss
        against both items' labels, which for cross-entropy equals soft-target training."""
        from ser_pipeline.augment import mixup

        onehot = torch.nn.functional.one_hot(batch["emotion"], len(self.class_names)).float()
        mixed = mixup(features, onehot, self.mixup_alpha, lengths=batch["lengths"])
        functionals = batch.get("functionals")
        if functionals is not None:  # mixed like the features: the same partners and lam
            functionals = mixed.lam * functionals + (1 - mixed.lam) * functionals[mixed.permutation]
        outputs = self(mixed.features, mixed.lengths, functionals)
        permuted = {k: (v[mixed.permutation] if torch.is_tensor(v) else v)
                    for k, v in batch.items()}
        total = (mixed.lam * self.losses(outputs, batch)["total"]
                 + (1 - mixed.lam) * self.losses(outputs, permuted)["total"])
        self.log("train/loss", total, on_step=False, on_epoch=True, batch_size=len(batch["ids"]),
                 sync_dist=True)
        return total

    def _per_domain_uar(self) -> dict[str, float]:
        """Test UAR per corpus (multi-corpus training), the one UAR of ``metrics.uar``."""
        if len(self.domain_names) < 2:
            return {}
        outputs = gather_from_ranks(self._test_outputs)
        if not outputs:
            return {}
        pred, true, domain = (torch.cat(x) for x in zip(*outputs, strict=True))
        values = {}
        for d, name in enumerate(self.domain_names):
            here = domain == d
            if here.any():
                values[f"uar_{name}"] = uar(true[here].numpy(), pred[here].numpy())
        return values

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        if self.speaker_reversal is not None:  # DANN: 2 / (1 + exp(-10 p)) - 1, p in [0, 1]
            progress = min(1.0, self.global_step / max(1, self.trainer.estimated_stepping_batches))
            self.speaker_reversal.scale = 2.0 / (1.0 + math.exp(-10.0 * progress)) - 1.0
        return self._step(batch, "train")

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._step(batch, "test")

    def _epoch_end(self, stage: str) -> dict[str, float]:
        metrics = self.metrics[f"{stage}_metrics"]
        values = metrics.compute()
        named = {}
        for key, value in values.items():
            if key.startswith("recall_"):
                key = f"recall_{self.class_names[int(key.split('_')[1])]}"
            named[key] = float(value)
            # already the whole set's on every rank: sync_dist averages equal values (DDP)
            self.log(f"{stage}/{key}", value, prog_bar=key == "uar", sync_dist=True)
        confusion = metrics.confusion.compute().cpu()
        metrics.reset()
        if stage == "val" and not self.trainer.sanity_checking:
            self.last_val_uar = named["uar"]
        if stage == "val" and not self.trainer.sanity_checking and named["uar"] > self.best_val_uar:
            self.best_val_uar, self.best_val_confusion = named["uar"], confusion
        if stage == "test":
            for key, value in self._per_domain_uar().items():
                named[key] = value
                self.log(f"test/{key}", value, sync_dist=True)
            self._test_outputs = []
            self.test_confusion, self.test_results = confusion, named
            probabilities = gather_from_ranks(self._test_probabilities)
            if probabilities:  # the whole test set's, with its ids in the same order
                self.test_probabilities = torch.cat(probabilities)
                self.test_ids = gather_from_ranks(self._test_ids)
            self._test_probabilities, self._test_ids = [], []
        return named

    def on_train_epoch_end(self) -> None:
        self._epoch_end("train")

    def on_validation_epoch_end(self) -> None:
        values = self._epoch_end("val")
        if not self.trainer.sanity_checking:
            log.info("epoch %d  val/uar %.4f  val/wa %.4f  val/loss %.4f  (best uar %.4f)",
                     self.current_epoch, values["uar"], values["wa"],
                     float(self.trainer.callback_metrics.get("val/loss", float("nan"))),
                     self.best_val_uar)

    def on_test_epoch_end(self) -> None:
        self._epoch_end("test")

    def configure_optimizers(self) -> Any:
        params: Any = self.parameters()
        if self.encoder_lr is not None and hasattr(self.net, "parameter_groups"):
            params = self.net.parameter_groups(self.encoder_lr)
            # the module's own parameters (learned task weights) at the optimizer's rate
            own = [p for name, p in self.named_parameters() if not name.startswith("net.")]
            params += [{"params": own}] if own else []
        optimizer = self.optimizer_factory(params=params)
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer=optimizer),
                                 "monitor": "val/uar", "interval": "epoch"}}
