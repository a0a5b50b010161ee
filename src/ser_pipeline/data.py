"""SERDataModule: manifest -> split -> cached features -> padded batches.

A batch is a dict:

* ``features``: ``(batch, channels, n_features, frames)`` float32, normalised with
  training-split statistics, zero-padded after each item's length;
* ``lengths``: ``(batch,)`` long, valid frames per item;
* ``emotion``: ``(batch,)`` long class index; ``gender``: ``(batch,)`` long, -1 where unknown;
* ``vad``: ``(batch, 3)`` float, NaN where the corpus has no dimensional labels;
* ``domain``: ``(batch,)`` long corpus index; ``class_mask``: ``(batch, n_emotions)`` bool,
  the classes the item's corpus has (multi-corpus training masks the others);
* ``speaker``: ``(batch,)`` long index among the *training* speakers
  (``SERDataModule.train_speakers``), -1 for validation and test speakers (speaker-adversarial
  training, ``model.loss.weights.speaker``);
* ``functionals``: ``(batch, functionals_dim)`` float32, with a functionals stream only
  (``functionals=...``): each utterance's vector z-scored with the training statistics;
* ``ids``: list of utterance ids.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytorch_lightning as pl
import torch
from pytorch_lightning.overrides.distributed import UnrepeatedDistributedSampler
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from ser_pipeline.audio import read_audio
from ser_pipeline.corpora.labels import select_classes
from ser_pipeline.corpora.manifest import (
    DIMENSIONS,
    GENDERS,
    validate_manifest,
    write_manifest,
)
from ser_pipeline.features.batching import (
    FeatureStats,
    normalize_utterances,
    pad_batch,
    remove_level,
)
from ser_pipeline.features.cache import FeatureCache, extract_features
from ser_pipeline.features.functionals import FunctionalsStream
from ser_pipeline.files import atomic_write_text
from ser_pipeline.splits import Split, is_refit, make_split

log = logging.getLogger(__name__)

#: ``data.normalization``: ``global`` z-scores features with the training speakers' statistics
#: (stored with the model); ``speaker`` with each speaker's own statistics over all of its
#: utterances - classic speaker normalisation, which needs unlabelled audio of a test speaker
#: before predicting (transductive; inference takes it from the inputs of one call);
#: ``utterance`` z-scores every utterance with its own statistics (inductive, level-invariant);
#: ``level`` removes each utterance's mean level, then uses training statistics (inductive,
#: level-invariant for log features, keeps the spectral envelope)
NORMALIZATIONS = ("global", "speaker", "utterance", "level")


class UtteranceDataset(Dataset):
    """Items of one split; features are computed once (or taken from the cache)."""

    def __init__(
        self,
        rows: pd.DataFrame,
        features: list[torch.Tensor],
        stats: FeatureStats | list[FeatureStats],
        classes: list[str],
        domains: list[str],
        domain_classes: dict[str, list[str]],
        crop_frames: int | None = None,
        random_crop: bool = False,
        waveforms: list[torch.Tensor] | None = None,
        wave_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        normalization: str = "global",
        speakers: list[tuple[str, str]] | None = None,
        functionals: list[torch.Tensor] | None = None,
    ) -> None:
        """``speakers``: the training speakers as ``(corpus, speaker)``; an item's ``speaker``
        is its index there, -1 when it is not one of them. ``functionals``: every item's
        normalised utterance vector (the functionals stream), or None without one."""
        self.rows = rows.reset_index(drop=True)
        # one FeatureStats for all (training statistics) or one per item (its speaker's);
        # ``normalization`` says how they apply (``normalize_utterances``, as at inference)
        self.normalization = normalization
        self.stats = stats if isinstance(stats, list) else [stats] * len(features)
        self.features = [self._normalize(i, f) for i, f in enumerate(features)]
        # with waveform augmentation, features are recomputed from an augmented waveform
        self.waveforms, self.wave_transform = waveforms, wave_transform
        self.crop_frames, self.random_crop = crop_frames, random_crop
        self.functionals = functionals
        class_index = {name: i for i, name in enumerate(classes)}
        self.emotion = torch.tensor([class_index[e] for e in self.rows["emotion"]], dtype=torch.long)
        gender_index = {name: i for i, name in enumerate(GENDERS)}
        self.gender = torch.tensor(
            [gender_index.get(g, -1) if isinstance(g, str) else -1 for g in self.rows["gender"]],
            dtype=torch.long,
        )
        self.vad = torch.tensor(self.rows[list(DIMENSIONS)].to_numpy(dtype=np.float32))
        domain_index = {name: i for i, name in enumerate(domains)}
        self.domain = torch.tensor([domain_index[d] for d in self.rows["corpus"]], dtype=torch.long)
        masks = {
            d: torch.tensor([c in domain_classes[d] for c in classes], dtype=torch.bool)
            for d in domains
        }
        self.class_mask = torch.stack([masks[d] for d in self.rows["corpus"]])
        speaker_index = {key: i for i, key in enumerate(speakers or [])}
        self.speaker = torch.tensor(
            [speaker_index.get(key, -1) for key in zip(self.rows["corpus"],
                                                        self.rows["speaker"].astype(str),
                                                        strict=True)], dtype=torch.long)

    def __len__(self) -> int:
        return len(self.rows)

    def _normalize(self, index: int, features: torch.Tensor) -> torch.Tensor:
        return normalize_utterances([features], self.normalization, self.stats[index])[0]

    def __getitem__(self, index: int) -> dict[str, Any]:
        features = self.features[index]
        if self.waveforms is not None and self.wave_transform is not None:
            features = self._normalize(index, self.wave_transform(self.waveforms[index]))
        if self.crop_frames is not None and features.shape[-1] > self.crop_frames:
            excess = features.shape[-1] - self.crop_frames
            start = int(torch.randint(0, excess + 1, ())) if self.random_crop else 0
            features = features[..., start : start + self.crop_frames]
        item = {
            "features": features,
            "emotion": self.emotion[index],
            "gender": self.gender[index],
            "vad": self.vad[index],
            "domain": self.domain[index],
            "class_mask": self.class_mask[index],
            "speaker": self.speaker[index],
            "id": self.rows.at[index, "id"],
        }
        if self.functionals is not None:
            item["functionals"] = self.functionals[index]
        return item


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    features, lengths = pad_batch([item["features"] for item in items])
    batch = {key: torch.stack([item[key] for item in items])
             for key in ("emotion", "gender", "vad", "domain", "class_mask", "speaker")}
    batch.update(features=features, lengths=lengths, ids=[item["id"] for item in items])
    if "functionals" in items[0]:
        batch["functionals"] = torch.stack([item["functionals"] for item in items])
    return batch


def class_balanced_weights(labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Per-item sampling weights ``(n,)`` that make every class equally likely."""
    counts = labels.bincount(minlength=n_classes).float()
    return (1.0 / counts.clamp_min(1))[labels]


class EpochShuffleSampler(DistributedSampler):
    """Random order that depends only on (seed, epoch); this process's share of it under DDP.

    Why not RandomSampler: Lightning calls ``set_epoch`` on samplers that have
    it, so a run resumed from a checkpoint sees exactly the orders the
    uninterrupted run saw. Why a ``DistributedSampler``: under DDP Lightning keeps it as it
    is instead of wrapping it (its wrapper would pass ``set_epoch`` to itself only, so a
    class-balanced draw would repeat every epoch). Every rank draws the same order (padded
    by its first items to a multiple of ``num_replicas``) and takes every
    ``num_replicas``-th item from ``rank``, so the ranks' k-th batches together are the
    k-th batch of one process with ``num_replicas`` times the batch size.
    """

    def __init__(self, size: int, seed: int, weights: torch.Tensor | None = None,
                 num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(range(size), num_replicas=num_replicas, rank=rank, seed=seed)
        self.size, self.weights = size, weights

    def __len__(self) -> int:
        return -(-self.size // self.num_replicas)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        total = len(self) * self.num_replicas
        if self.weights is not None:  # class-balanced: draw with replacement by weight
            order = torch.multinomial(self.weights, total, replacement=True,
                                      generator=generator).tolist()
        else:
            order = torch.randperm(self.size, generator=generator).tolist()
            order += order[: total - self.size]
        return iter(order[self.rank :: self.num_replicas])


class SERDataModule(pl.LightningDataModule):
    """Builds the manifest, split, features and loaders for one corpus (or several)."""

    def __init__(
        self,
        name: str,
        reader: Callable[..., pd.DataFrame],
        root: str,
        features: nn.Module,
        classes: list[str],
        functionals: FunctionalsStream | None = None,
        label_map: dict[str, str] | None = None,
        split: str = "loso",
        fold: int = 0,
        group_by: str = "speaker",
        n_folds: int = 5,
        val_speakers: int = 1,
        batch_size: int = 32,
        num_workers: int = 0,
        max_seconds: float | None = None,
        train_crop_seconds: float | None = None,
        cache_dir: str | None = None,
        seed: int = 0,
        progress: bool = True,
        augment: dict[str, Any] | None = None,
        balanced_sampling: bool = False,
        normalization: str = "global",
        manifest: str | None = None,
        missing: str = "fail",
        train_only: list[str] | None = None,
    ) -> None:
        # ``manifest``/``missing``: data=manifest's table and missing-audio policy; its reader
        # config reads them (``root: ${.manifest}``), they are only accepted here
        super().__init__()
        self.name, self.reader, self.root = name, reader, root
        self.extractor = features
        # a second stream: one vector per utterance beside the frames (features.functionals)
        self.functionals = functionals
        if functionals is not None and functionals.sample_rate != features.sample_rate:
            raise ValueError(f"the functionals extractor reads {functionals.sample_rate} Hz, the "
                             f"features {features.sample_rate} Hz: give them one sample_rate")
        # empty (or null): every emotion the corpus has, after label_map, sorted
        self.classes = list(classes or [])
        self.label_map = dict(label_map or {})
        self.split_options = dict(protocol=split, fold=fold, group_by=group_by, n_folds=n_folds,
                                  val_speakers=val_speakers, seed=seed,
                                  train_only=list(train_only or []))
        self.batch_size, self.num_workers = batch_size, num_workers
        self.max_seconds, self.cache_dir = max_seconds, cache_dir
        if train_crop_seconds is not None and train_crop_seconds <= 0:
            raise ValueError(f"data.train_crop_seconds must be positive, not {train_crop_seconds}")
        self.train_crop_seconds = train_crop_seconds
        self.seed, self.progress = seed, progress
        self.augment, self.balanced_sampling = dict(augment or {}), balanced_sampling
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"data.normalization must be one of {', '.join(NORMALIZATIONS)}, "
                             f"not {normalization!r}")
        self.normalization = normalization
        self.split: Split | None = None
        self.train_speakers: list[tuple[str, str]] = []  # (corpus, speaker), after setup
        self.skipped: dict[str, str] = {}
        self._prepared = False

    # -- what the model and tracking need to know -------------------------------------------
    @property
    def in_channels(self) -> int:
        return self.extractor.out_channels

    @property
    def n_features(self) -> int:
        return self.extractor.n_features

    @property
    def sample_rate(self) -> int:
        return self.extractor.sample_rate

    @property
    def refit(self) -> bool:
        """No validation part: every non-test speaker trains (:func:`splits.is_refit`)."""
        return is_refit(self.split_options["protocol"], self.split_options["val_speakers"])

    def part_utterances(self) -> dict[str, int]:
        """Utterances per part after setup (``val`` 0 for a refit), as the runs log them."""
        return {part: len(self.datasets[part]) if part in self.datasets else 0
                for part in ("train", "val", "test")}

    @property
    def functionals_dim(self) -> int:
        """Length of the functionals stream's vectors (0 without one), after setup."""
        return 0 if self.functionals is None else self.functionals.n_inputs

    def load_manifest(self) -> pd.DataFrame:
        """The corpus manifest restricted (and merged) to ``classes``."""
        manifest = self.reader(self.root)
        validate_manifest(manifest)
        if not self.classes:
            self.classes = sorted(manifest["emotion"].replace(self.label_map).dropna().unique())
        manifest, dropped = select_classes(manifest, self.classes, self.label_map)
        if dropped:
            log.info("dropped utterances outside the class set: %s", dropped)
        return manifest

    def setup(self, stage: str | None = None) -> None:
        if self._prepared:
            return
        manifest = self.load_manifest()
        self.split = make_split(manifest, **self.split_options)
        cache = (FeatureCache(self.cache_dir, self.extractor.config())
                 if self.cache_dir else None)
        sample_rate = self.extractor.sample_rate

        def compute(path: str) -> torch.Tensor:
            return self.extractor(read_audio(path, sample_rate))

        wanted = set(self.split.train) | set(self.split.val) | set(self.split.test)
        manifest = manifest[manifest["id"].isin(wanted)].reset_index(drop=True)
        features, self.skipped = extract_features(
            manifest["path"].tolist(), compute, cache, f"{self.name} features",
            self.progress and sys.stderr.isatty()  # a bar in a terminal only, not in logs
        )
        vectors: list[torch.Tensor | None] = [None] * len(features)
        if self.functionals is not None:
            vectors = self._functionals_vectors(manifest, features)
        if self.skipped:
            log.warning("skipped %d undecodable file(s):\n%s", len(self.skipped),
                        "\n".join(f"  {p}: {r}" for p, r in self.skipped.items()))
        if cache is not None:
            log.info("feature cache %s: %d hits, %d computed", cache.folder, cache.hits,
                     cache.misses)
        keep = [f is not None and (self.functionals is None or v is not None)
                for f, v in zip(features, vectors, strict=True)]
        self.manifest = manifest[keep].reset_index(drop=True)
        by_id = dict(zip(self.manifest["id"], [f for f, k in zip(features, keep, strict=True) if k],
                         strict=True))
        vector_of = dict(zip(self.manifest["id"], [v for v, k in zip(vectors, keep, strict=True)
                                                   if k], strict=True))
        self.domains = sorted(self.manifest["corpus"].unique().tolist())
        self.domain_classes = {
            d: sorted(self.manifest.loc[self.manifest["corpus"] == d, "emotion"].unique().tolist())
            for d in self.domains
        }
        parts = {"train": self.split.train, "val": self.split.val, "test": self.split.test}
        if self.refit:  # data.val_speakers=0: no validation part (its speakers train)
            del parts["val"]
        rows = {p: self.manifest[self.manifest["id"].isin(ids)] for p, ids in parts.items()}
        for part, frame in rows.items():
            if frame.empty:
                raise ValueError(f"the {part} split is empty after skipping bad files")
        shift = remove_level if self.normalization == "level" else (lambda f: f)
        self.stats = FeatureStats.from_features([shift(by_id[i]) for i in rows["train"]["id"]])
        if self.functionals is not None:  # z-scored with the training utterances' statistics
            self.functionals.fit([vector_of[i] for i in rows["train"]["id"]])
        item_stats = {part: self.stats for part in rows}
        if self.normalization == "speaker":  # every speaker's own frames (never its labels)
            by_speaker = {  # keyed with the corpus: speaker ids of two corpora may clash
                key: FeatureStats.from_features([by_id[i] for i in group["id"]])
                for key, group in self.manifest.groupby(["corpus", "speaker"])}
            item_stats = {part: [by_speaker[key] for key in zip(frame["corpus"],
                                                                 frame["speaker"], strict=True)]
                          for part, frame in rows.items()}
        # speaker-adversarial training's classes: (corpus, speaker), as ids of two corpora may clash
        self.train_speakers = sorted(set(zip(rows["train"]["corpus"],
                                             rows["train"]["speaker"].astype(str), strict=True)))
        def frames(seconds: float | None) -> int | None:
            return None if seconds is None else int(seconds * sample_rate
                                                    / self.extractor.hop_length) + 1

        # max_seconds crops every part (the start of val/test utterances); train_crop_seconds
        # draws a random segment of each training utterance anew on every access (segment
        # training: more distinct examples from few utterances) while val/test stay whole
        crops = {part: frames(self.max_seconds) for part in rows}
        if self.train_crop_seconds is not None:
            crops["train"] = frames(self.train_crop_seconds if self.max_seconds is None
                                    else min(self.train_crop_seconds, self.max_seconds))
        self.datasets = {
            part: UtteranceDataset(frame, [by_id[i] for i in frame["id"]], item_stats[part],
                                   self.classes, self.domains, self.domain_classes,
                                   crop_frames=crops[part], random_crop=part == "train",
                                   normalization=self.normalization,
                                   speakers=self.train_speakers,
                                   functionals=None if self.functionals is None else
                                   [self.functionals.normalize(vector_of[i]) for i in frame["id"]])
            for part, frame in rows.items()
        }
        if self.augment:
            self._enable_wave_augmentation(rows["train"])
        self._prepared = True

    def _functionals_vectors(self, manifest: pd.DataFrame, features: list[torch.Tensor | None]
                             ) -> list[torch.Tensor | None]:
        """The functionals stream's raw vector of every row whose features were computed
        (cached apart from the frame features); a file its extractor fails on is skipped."""
        stream = self.functionals
        cache = FeatureCache(self.cache_dir, stream.config()) if self.cache_dir else None
        wanted = [p for p, f in zip(manifest["path"], features, strict=True) if f is not None]
        computed, skipped = extract_features(
            wanted, lambda path: stream.raw(read_audio(path, stream.sample_rate)), cache,
            f"{self.name} functionals", self.progress and sys.stderr.isatty())
        self.skipped.update(skipped)
        if cache is not None:
            log.info("functionals cache %s: %d hits, %d computed", cache.folder, cache.hits,
                     cache.misses)
        by_path = dict(zip(wanted, computed, strict=True))
        return [by_path.get(p) if f is not None else None
                for p, f in zip(manifest["path"], features, strict=True)]

    def _enable_wave_augmentation(self, train_rows: pd.DataFrame) -> None:
        """Training items get features of a freshly augmented waveform on every access."""
        from ser_pipeline.augment import WaveAugment

        augment = WaveAugment(sample_rate=self.sample_rate, **self.augment)
        extractor = self.extractor
        waveforms = [read_audio(p, self.sample_rate) for p in train_rows["path"]]
        dataset = self.datasets["train"]
        dataset.waveforms = waveforms
        dataset.wave_transform = lambda wave: extractor(augment(wave))

    # -- loaders ---------------------------------------------------------------------------
    def _loader(self, part: str) -> DataLoader:
        dataset = self.datasets[part]
        sampler: Sampler | None = None
        rank, replicas = self._shard()
        if part == "train":
            weights = None
            if self.balanced_sampling:  # each class drawn equally often (DCNN-BLSTMwA recipe)
                weights = class_balanced_weights(dataset.emotion, len(self.classes))
            sampler = EpochShuffleSampler(len(dataset), self.seed, weights, replicas, rank)
        elif replicas > 1:  # every item once over all ranks: the reduced metrics are the set's
            sampler = UnrepeatedDistributedSampler(dataset, num_replicas=replicas, rank=rank,
                                                   shuffle=False)
        # an own generator: creating an iterator would otherwise draw from the global RNG,
        # shifting dropout masks depending on when Lightning builds it (breaks exact resume)
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler,
                          num_workers=self.num_workers, collate_fn=collate,
                          persistent_workers=self.num_workers > 0,
                          generator=torch.Generator().manual_seed(self.seed))

    def _shard(self) -> tuple[int, int]:
        """(rank, number of ranks) of this process's share of the loaders; (0, 1) unless DDP."""
        if self.trainer is None:
            return 0, 1
        return self.trainer.global_rank, self.trainer.world_size

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader | list:
        # no validation part (data.val_speakers=0): Lightning skips the validation loop
        return self._loader("val") if "val" in self.datasets else []

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    # -- reporting -------------------------------------------------------------------------
    def write_record(self, folder: str | Path) -> list[Path]:
        """``manifest.csv`` (every utterance used, its labels and part) and ``split.json``
        (the split's promise and its utterance ids) in ``folder``: what a run trained and
        tested on, readable without this code (SpeechBrain's prepare -> manifest habit)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        part_of = {i: part for part, ids in (("train", self.split.train), ("val", self.split.val),
                                             ("test", self.split.test)) for i in ids}
        table = self.manifest.assign(part=self.manifest["id"].map(part_of))
        split = {**self.split.summary(), "train": self.split.train, "val": self.split.val,
                 "test": self.split.test}
        return [write_manifest(table, folder / "manifest.csv"),
                atomic_write_text(folder / "split.json", json.dumps(split, indent=1))]

    @property
    def has_gender(self) -> bool:
        return bool(self.manifest["gender"].notna().any())

    @property
    def has_dimensions(self) -> bool:
        return bool(self.manifest[list(DIMENSIONS)].notna().any().any())

    def summary(self) -> dict[str, Any]:
        """Utterances, speakers and class counts per split, plus skipped files."""
        out: dict[str, Any] = {"corpus": self.name, "classes": self.classes,
                               "split": self.split.summary() if self.split else None,
                               "skipped_files": dict(self.skipped)}
        for part, dataset in self.datasets.items():
            rows = dataset.rows
            out[part] = {
                "utterances": len(rows),
                "speakers": sorted(rows["speaker"].unique().tolist()),
                "class_counts": {c: int((rows["emotion"] == c).sum()) for c in self.classes},
            }
        return out
