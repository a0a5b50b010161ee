"""The model directory: everything inference needs, safe to load.

Layout (fixed file names; nothing else is read)::

    model.yaml                  architecture name + kwargs, feature config, labels, ...
    weights.safetensors         the network's state dict
    preprocessing.safetensors   feature normalisation statistics (training split only), and
                                the functionals stream's (``functionals=``) where there is one

An *ensemble* directory (late fusion of several models, e.g. a recipe's seeds) holds
``ensemble.yaml`` (its members' folder names) and one such model directory per member in a
sub-folder; it is used wherever a model directory is (``infer.py --model``, the pyfunc model,
the registry), its members' class probabilities averaged.

Loading never unpickles: YAML is read with ``safe_load``, tensors with
safetensors, and the network is rebuilt by our own code from an allow-list of
architectures, so a planted pickle or an unknown class name is refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ser_pipeline.features import build_features
from ser_pipeline.features.batching import FeatureStats
from ser_pipeline.features.functionals import FunctionalsStream
from ser_pipeline.files import atomic_write_text

FORMAT_VERSION = 1
SPEC_FILE = "model.yaml"
WEIGHTS_FILE = "weights.safetensors"
STATS_FILE = "preprocessing.safetensors"
ENSEMBLE_FILE = "ensemble.yaml"


class UnsafeArtifactError(ValueError):
    """A model directory that is not what we wrote: refused instead of loaded."""


@dataclass
class ModelSpec:
    """What ``model.yaml`` holds."""

    architecture: str
    kwargs: dict[str, Any]
    features: dict[str, Any]
    classes: list[str]
    genders: list[str]
    dimensions: list[str]
    has_gender: bool
    has_dimensions: bool
    info: dict[str, Any] = field(default_factory=dict)
    #: ``global`` (the stored training statistics) or ``speaker`` (see ``data.NORMALIZATIONS``)
    normalization: str = "global"
    #: the functionals stream's ``FunctionalsStream.config()`` (None: the model has none)
    functionals: dict[str, Any] | None = None

    @property
    def sample_rate(self) -> int:
        return int(self.features["sample_rate"])


@dataclass
class LoadedModel:
    spec: ModelSpec
    net: nn.Module
    extractor: nn.Module
    stats: FeatureStats
    functionals: FunctionalsStream | None = None


def _architectures() -> dict[str, type[nn.Module]]:
    from ser_pipeline.models import MODELS
    from ser_pipeline.models.svm import SVMClassifier

    return {cls.__name__: cls for cls in (*MODELS.values(), SVMClassifier)}


def save_model_dir(
    directory: str | Path, net: nn.Module, kwargs: dict[str, Any], spec_fields: dict[str, Any],
    stats: FeatureStats, functionals: FunctionalsStream | None = None,
) -> Path:
    """Write a model directory; ``spec_fields`` are the remaining :class:`ModelSpec` fields;
    ``functionals``: the fitted functionals stream the network reads, if any."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    architecture = type(net).__name__
    if architecture not in _architectures():
        raise ValueError(f"{architecture} is not a registered ser_pipeline model")
    spec = {"format_version": FORMAT_VERSION, "architecture": architecture,
            "kwargs": kwargs, **spec_fields}
    tensors = dict(stats.to_dict())
    if functionals is not None:
        spec["functionals"] = functionals.config()
        tensors.update(functionals_mean=functionals.mean, functionals_std=functionals.std)
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    save_file(state, directory / WEIGHTS_FILE)
    save_file({k: v.contiguous() for k, v in tensors.items()}, directory / STATS_FILE)
    atomic_write_text(directory / SPEC_FILE, yaml.safe_dump(spec, sort_keys=False))
    return directory


def is_model_dir(directory: str | Path) -> bool:
    """Whether ``directory`` holds a model directory or an ensemble directory."""
    directory = Path(directory)
    return (directory / SPEC_FILE).is_file() or (directory / ENSEMBLE_FILE).is_file()


def save_ensemble_dir(directory: str | Path, members: list[str | Path]) -> Path:
    """Write an ensemble directory of the model directories ``members`` (copied, in order, as
    ``member<i>/``; members that are ensembles themselves are flattened into their members)."""
    import shutil

    flat = [m for member in members for m in ensemble_members(member)]
    if not flat:
        raise ValueError("an ensemble needs at least one model")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    names = []
    for i, member in enumerate(flat):
        read_spec(member)  # only what loads is copied
        names.append(f"member{i}")
        target = directory / names[-1]
        target.mkdir(exist_ok=True)
        for name in (SPEC_FILE, WEIGHTS_FILE, STATS_FILE):
            shutil.copyfile(_inside(Path(member), name), target / name)
    atomic_write_text(directory / ENSEMBLE_FILE, yaml.safe_dump(
        {"format_version": FORMAT_VERSION, "members": names}, sort_keys=False))
    return directory


def ensemble_members(directory: str | Path) -> list[Path]:
    """The model directories ``directory`` stands for: itself, or an ensemble's members.

    An ensemble's member names must be plain sub-folders of it (no path separators, no
    links out): anything else is refused as :class:`UnsafeArtifactError`.
    """
    directory = Path(directory)
    if not (directory / ENSEMBLE_FILE).is_file():
        return [directory]
    try:
        raw = yaml.safe_load(_inside(directory, ENSEMBLE_FILE).read_text())
    except yaml.YAMLError as error:
        raise UnsafeArtifactError(f"{directory / ENSEMBLE_FILE} is not plain YAML: {error}"
                                  ) from error
    if not isinstance(raw, dict) or raw.get("format_version") != FORMAT_VERSION \
            or not isinstance(raw.get("members"), list) or not raw["members"]:
        raise UnsafeArtifactError(f"{directory / ENSEMBLE_FILE}: unknown ensemble format")
    members = []
    for name in raw["members"]:
        if not isinstance(name, str) or not name or name in (".", "..") or "/" in name \
                or "\\" in name:
            raise UnsafeArtifactError(
                f"{directory / ENSEMBLE_FILE}: member {name!r} is not a sub-folder name")
        member = directory / name
        if not member.resolve().is_relative_to(directory.resolve()):
            raise UnsafeArtifactError(f"{member} points outside its ensemble directory")
        members.append(member)
    return members


def _inside(directory: Path, name: str) -> Path:
    """``directory/name``, refusing links or paths that resolve outside ``directory``."""
    path = directory / name
    if not path.is_file():
        raise UnsafeArtifactError(f"model directory {directory} has no {name}")
    if not path.resolve().is_relative_to(directory.resolve()):
        raise UnsafeArtifactError(f"{path} points outside its model directory; refused")
    return path


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as error:
        raise UnsafeArtifactError(
            f"{path} is not a valid safetensors file ({error}); refusing to load it "
            "(model weights are never unpickled, since a pickle can run arbitrary code)"
        ) from error


def read_spec(directory: str | Path) -> ModelSpec:
    directory = Path(directory)
    try:
        raw = yaml.safe_load(_inside(directory, SPEC_FILE).read_text())
    except yaml.YAMLError as error:
        raise UnsafeArtifactError(f"{directory / SPEC_FILE} is not plain YAML: {error}") from error
    if not isinstance(raw, dict) or raw.get("format_version") != FORMAT_VERSION:
        raise UnsafeArtifactError(f"{directory / SPEC_FILE}: unknown model format")
    raw.pop("format_version")
    if raw.get("architecture") not in _architectures():
        raise UnsafeArtifactError(
            f"{directory / SPEC_FILE}: architecture {raw.get('architecture')!r} is not one of "
            f"{sorted(_architectures())}")
    if not isinstance(raw.get("kwargs"), dict) or not isinstance(raw.get("features"), dict):
        raise UnsafeArtifactError(f"{directory / SPEC_FILE}: kwargs and features must be mappings")
    if not isinstance(raw.get("functionals") or {}, dict):
        raise UnsafeArtifactError(f"{directory / SPEC_FILE}: functionals must be a mapping")
    if raw.get("normalization", "global") not in ("global", "speaker", "utterance", "level"):
        raise UnsafeArtifactError(f"{directory / SPEC_FILE}: unknown normalization "
                                  f"{raw.get('normalization')!r}")
    try:
        return ModelSpec(**raw)
    except TypeError as error:  # missing or unknown fields: not a file we wrote
        raise UnsafeArtifactError(f"{directory / SPEC_FILE}: {error}") from error


def load_model_dir(directory: str | Path) -> LoadedModel:
    """Rebuild network, feature extractor and statistics from a model directory (eval mode)."""
    directory = Path(directory)
    spec = read_spec(directory)
    try:
        net = _architectures()[spec.architecture](**spec.kwargs)
        extractor = build_features(spec.features)
    except (TypeError, ValueError, KeyError) as error:
        raise UnsafeArtifactError(
            f"{directory / SPEC_FILE}: cannot rebuild the model from it ({error})") from error
    state = _load_tensors(_inside(directory, WEIGHTS_FILE))
    try:
        net.load_state_dict(state)
    except RuntimeError as error:
        raise UnsafeArtifactError(f"weights do not fit {spec.architecture}: {error}") from error
    stats_tensors = _load_tensors(_inside(directory, STATS_FILE))
    shape = (extractor.out_channels, extractor.n_features, 1)
    if any(tuple(stats_tensors.get(k, torch.empty(0)).shape) != shape
           for k in ("feature_mean", "feature_std")):
        raise UnsafeArtifactError(
            f"{directory / STATS_FILE} must hold feature_mean and feature_std of shape {shape}")
    stats = FeatureStats(stats_tensors["feature_mean"], stats_tensors["feature_std"])
    return LoadedModel(spec, net.eval(), extractor.eval(), stats,
                       _load_functionals(directory, spec, stats_tensors))


def _load_functionals(directory: Path, spec: ModelSpec, tensors: dict[str, torch.Tensor]
                      ) -> FunctionalsStream | None:
    """The fitted functionals stream the spec records (None without one)."""
    if not spec.functionals:
        return None
    mean, std = tensors.get("functionals_mean"), tensors.get("functionals_std")
    n_inputs = spec.kwargs.get("functionals_dim")
    if mean is None or std is None or mean.shape != std.shape or mean.dim() != 1 \
            or mean.numel() != n_inputs:
        raise UnsafeArtifactError(
            f"{directory / STATS_FILE} must hold functionals_mean and functionals_std of "
            f"shape ({n_inputs},) for the functionals stream {directory / SPEC_FILE} records")
    try:
        return FunctionalsStream.from_spec(spec.functionals, mean, std)
    except (TypeError, ValueError, KeyError) as error:
        raise UnsafeArtifactError(
            f"{directory / SPEC_FILE}: cannot rebuild its functionals stream ({error})") from error
