"""Train/validation/test splits of a manifest, speaker-independent by default.

Protocols (``data.split``):

* ``loso`` - leave one group out: fold k tests group k (group = ``speaker``, or
  ``session`` for IEMOCAP's leave-one-session-out);
* ``ltso`` - leave two speakers out: fold k tests the k-th male and k-th female
  speaker (EMO-DB's 5-fold protocol);
* ``group_kfold`` - k folds of whole groups (e.g. RAVDESS 6 x 4 actors);
* ``predefined`` - the corpus's own assignment in the manifest's ``split`` column
  (``train``/``val``/``test``; other values, e.g. MSP-Podcast's second test set, are left
  out): one fold, speaker-independent only if no speaker appears in two parts;
* ``random`` - stratified random utterances: **speaker-dependent**, flagged so.

In every speaker-independent protocol the validation speakers are drawn from
the non-test speakers and removed from training, so train, validation and test
speakers are pairwise disjoint.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd
from sklearn.model_selection import GroupKFold, LeaveOneGroupOut, train_test_split

PROTOCOLS = ("loso", "ltso", "group_kfold", "predefined", "random")
#: the protocols whose validation part is ``val_speakers`` whole speakers
SPEAKER_PROTOCOLS = ("loso", "ltso", "group_kfold")
#: the parts a ``predefined`` split reads from the manifest's ``split`` column
PREDEFINED_PARTS = ("train", "val", "test")


@dataclass(frozen=True)
class Split:
    """Utterance ids of each part plus what the split promises."""

    train: list[str]
    val: list[str]
    test: list[str]
    protocol: str
    fold: int
    n_folds: int
    speaker_independent: bool
    test_speakers: list[str] = field(default_factory=list)
    val_speakers: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        return {
            "protocol": self.protocol,
            "fold": self.fold,
            "n_folds": self.n_folds,
            "speaker_independent": self.speaker_independent,
            "test_speakers": self.test_speakers,
            "val_speakers": self.val_speakers,
        }


def count_folds(
    manifest: pd.DataFrame, protocol: str = "loso", group_by: str = "speaker", n_folds: int = 5,
    train_only: Sequence[str] = (),
) -> int:
    """How many folds ``protocol`` has on this manifest (``train_only`` corpora left out)."""
    if len(train_only):
        manifest = manifest[~manifest["corpus"].isin(list(train_only))]
    if protocol == "loso":
        return manifest[group_by].nunique()
    if protocol == "ltso":
        return len(_paired_speakers(manifest))
    if protocol in ("group_kfold", "predefined", "random"):
        return n_folds if protocol == "group_kfold" else 1
    raise ValueError(f"unknown split protocol '{protocol}' (known: {', '.join(PROTOCOLS)})")


def _paired_speakers(manifest: pd.DataFrame) -> list[tuple[str, str]]:
    speakers = manifest.drop_duplicates("speaker").set_index("speaker")["gender"]
    males = sorted(s for s, g in speakers.items() if g == "male")
    females = sorted(s for s, g in speakers.items() if g == "female")
    if not males or len(males) != len(females):
        raise ValueError(
            f"leave-two-speakers-out needs as many male as female speakers "
            f"(found {len(males)} male, {len(females)} female)"
        )
    return list(zip(males, females, strict=True))


def is_refit(protocol: str, val_speakers: int) -> bool:
    """True for a speaker protocol with ``val_speakers=0``: every non-test speaker trains and
    nothing validates (a fixed epoch budget, ``test_weights=last``: the deep models' refit)."""
    return val_speakers == 0 and protocol in SPEAKER_PROTOCOLS


def _pick_val_speakers(
    manifest: pd.DataFrame, candidates: list[str], n_val: int, seed: int
) -> list[str]:
    """``n_val`` speakers from ``candidates``, alternating genders where possible."""
    rng = np.random.default_rng(seed)
    genders = manifest.drop_duplicates("speaker").set_index("speaker")["gender"].to_dict()
    by_gender: dict[object, list[str]] = {}
    for speaker in rng.permutation(sorted(candidates)).tolist():
        by_gender.setdefault(genders.get(speaker), []).append(speaker)
    queues = [by_gender[key] for key in sorted(by_gender, key=str)]
    picked: list[str] = []
    while len(picked) < n_val and any(queues):
        for queue in queues:
            if queue and len(picked) < n_val:
                picked.append(queue.pop(0))
    return sorted(picked)


def speakers_in_several_parts(manifest: pd.DataFrame) -> dict[str, list[str]]:
    """Speaker -> the predefined parts it appears in, for speakers in more than one."""
    rows = manifest[manifest["split"].isin(PREDEFINED_PARTS)]
    parts = rows.groupby("speaker")["split"].unique()
    return {str(s): sorted(p) for s, p in parts.items() if len(p) > 1}


def predefined_split(manifest: pd.DataFrame) -> Split:
    """The assignment in the manifest's ``split`` column, as one fold.

    ``speaker_independent`` is True only if no speaker is in two of train/val/test (a
    corpus's official split may not promise that; the flag reports what the data shows).
    """
    if "split" not in manifest.columns:
        raise ValueError("data.split=predefined needs a 'split' column (train/val/test) in "
                         "the manifest; this corpus has none - use loso, ltso or group_kfold")
    parts = {part: manifest.loc[manifest["split"] == part] for part in PREDEFINED_PARTS}
    empty = [part for part, rows in parts.items() if rows.empty]
    if empty:
        found = sorted(manifest["split"].dropna().astype(str).unique())
        raise ValueError(f"predefined split: no utterance in {empty} (split values found: "
                         f"{found}; expected {list(PREDEFINED_PARTS)})")
    return Split(
        train=sorted(parts["train"]["id"].tolist()),
        val=sorted(parts["val"]["id"].tolist()),
        test=sorted(parts["test"]["id"].tolist()),
        protocol="predefined",
        fold=0,
        n_folds=1,
        speaker_independent=not speakers_in_several_parts(manifest),
        test_speakers=sorted(parts["test"]["speaker"].unique().tolist()),
        val_speakers=sorted(parts["val"]["speaker"].unique().tolist()),
    )


def make_split(
    manifest: pd.DataFrame,
    protocol: str = "loso",
    fold: int = 0,
    group_by: str = "speaker",
    n_folds: int = 5,
    val_speakers: int = 1,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
    train_only: Sequence[str] = (),
) -> Split:
    """Split ``manifest`` into train/val/test utterance ids for ``fold``.

    ``train_only``: corpora (the manifest's ``corpus`` values, e.g. ``data=emodb_ravdess``'s
    ``ravdess``) whose utterances are all training data: the folds, test and validation
    speakers come from the other corpora only (more data, the test speakers still unseen).
    """
    if len(train_only):
        extra = manifest["corpus"].isin(list(train_only)).to_numpy()
        if extra.all() or not extra.any():
            raise ValueError(f"data.train_only={list(train_only)} must name some but not all of "
                             f"the corpora {sorted(manifest['corpus'].unique())}")
        split = make_split(manifest[~extra], protocol, fold, group_by, n_folds, val_speakers,
                           val_fraction, test_fraction, seed)
        return replace(split, train=sorted([*split.train, *manifest.loc[extra, "id"]]))
    total = count_folds(manifest, protocol, group_by, n_folds)
    if not 0 <= fold < total:
        raise ValueError(f"fold {fold} out of range: protocol '{protocol}' has {total} folds")
    ids = manifest["id"].to_numpy()

    if protocol == "random":
        stratify = manifest["emotion"].to_numpy()
        rest, test = train_test_split(ids, test_size=test_fraction, random_state=seed,
                                      stratify=stratify)
        rest_labels = manifest.set_index("id").loc[rest, "emotion"].to_numpy()
        train, val = train_test_split(rest, test_size=val_fraction / (1 - test_fraction),
                                      random_state=seed, stratify=rest_labels)
        return Split(sorted(train), sorted(val), sorted(test), protocol, fold, total, False)

    if protocol == "predefined":
        return predefined_split(manifest)

    if protocol == "ltso":
        test_speakers = list(_paired_speakers(manifest)[fold])
        test_mask = manifest["speaker"].isin(test_speakers).to_numpy()
    else:
        groups = manifest[group_by].to_numpy()
        splitter = LeaveOneGroupOut() if protocol == "loso" else GroupKFold(n_splits=n_folds)
        _, test_index = list(splitter.split(ids, groups=groups))[fold]
        test_mask = np.zeros(len(ids), dtype=bool)
        test_mask[test_index] = True
        test_speakers = sorted(manifest.loc[test_mask, "speaker"].unique().tolist())

    remaining = sorted(manifest.loc[~test_mask, "speaker"].unique().tolist())
    if val_speakers < 0:
        raise ValueError(f"data.val_speakers must be 0 or more, not {val_speakers}")
    if val_speakers >= len(remaining):
        raise ValueError(
            f"cannot hold out {val_speakers} validation speakers: only {len(remaining)} "
            "non-test speakers remain"
        )
    val_list = _pick_val_speakers(manifest, remaining, val_speakers, seed + fold)
    val_mask = manifest["speaker"].isin(val_list).to_numpy() & ~test_mask
    train_mask = ~test_mask & ~val_mask
    return Split(
        train=sorted(ids[train_mask].tolist()),
        val=sorted(ids[val_mask].tolist()),
        test=sorted(ids[test_mask].tolist()),
        protocol=protocol,
        fold=fold,
        n_folds=total,
        speaker_independent=True,
        test_speakers=test_speakers,
        val_speakers=val_list,
    )
