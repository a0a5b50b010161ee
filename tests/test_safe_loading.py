"""Model directories never run code on load, and nothing in them reaches outside them.

Each planted payload would create a marker file if it ever ran; the tests check the
load is refused with :class:`UnsafeArtifactError` *and* that the marker is absent.
"""

from __future__ import annotations

import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from ser_pipeline.artifact import (
    SPEC_FILE,
    STATS_FILE,
    WEIGHTS_FILE,
    UnsafeArtifactError,
    load_model_dir,
    read_spec,
    save_model_dir,
)
from ser_pipeline.data import FeatureStats
from ser_pipeline.features import LogMelFeatures
from ser_pipeline.models import CnnBlstmAttn

SOURCE = Path(__file__).resolve().parents[1] / "src" / "ser_pipeline"
KWARGS = {"in_channels": 1, "n_features": 64, "n_emotions": 4, "conv_channels": [4],
          "lstm_hidden": 4, "lstm_layers": 1, "lstm_dropout": 0.0, "attention_dim": 4,
          "head_hidden": 4}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A valid model directory (tiny CnnBlstmAttn on 64 log-mels); copy before changing it."""
    return save_model_dir(
        tmp_path_factory.mktemp("model"), CnnBlstmAttn(**KWARGS), KWARGS,
        {"features": LogMelFeatures(n_mels=64).config(),
         "classes": ["anger", "happiness", "neutral", "sadness"],
         "genders": ["female", "male"], "dimensions": ["valence", "arousal", "dominance"],
         "has_gender": True, "has_dimensions": True},
        FeatureStats(torch.zeros(1, 64, 1), torch.ones(1, 64, 1)))


@pytest.fixture
def copy(model_dir: Path, tmp_path: Path) -> Path:
    return shutil.copytree(model_dir, tmp_path / "model")


class _Payload:
    """Unpickling this calls ``Path(marker).touch()``: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def edit_spec(directory: Path, change) -> None:
    spec = yaml.safe_load((directory / SPEC_FILE).read_text())
    change(spec)
    (directory / SPEC_FILE).write_text(yaml.safe_dump(spec))


def test_untouched_model_directory_loads(model_dir):
    loaded = load_model_dir(model_dir)
    assert type(loaded.net).__name__ == "CnnBlstmAttn" and not loaded.net.training


def test_payload_runs_when_unpickled_so_the_markers_below_mean_something(tmp_path):
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(_Payload(marker)))  # noqa: S301 - the control experiment
    assert marker.exists()


@pytest.mark.parametrize("name", [WEIGHTS_FILE, STATS_FILE])
def test_planted_pickle_is_refused_and_never_run(copy, tmp_path, name):
    marker = tmp_path / "pwned"
    (copy / name).write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(UnsafeArtifactError, match="not a valid safetensors file"):
        load_model_dir(copy)
    assert not marker.exists()


@pytest.mark.parametrize("name", [WEIGHTS_FILE, STATS_FILE])
def test_torch_save_file_is_refused_and_never_run(copy, tmp_path, name):
    marker = tmp_path / "pwned"
    torch.save({"weight": torch.zeros(1), "payload": _Payload(marker)}, copy / name)
    with pytest.raises(UnsafeArtifactError, match="not a valid safetensors file"):
        load_model_dir(copy)
    assert not marker.exists()


def test_yaml_with_a_python_tag_is_refused_and_never_run(copy, tmp_path):
    marker = tmp_path / "pwned"
    (copy / SPEC_FILE).write_text(f"!!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(UnsafeArtifactError, match="not plain YAML"):
        load_model_dir(copy)
    assert not marker.exists()


def test_python_tag_inside_a_field_is_refused(copy, tmp_path):
    marker = tmp_path / "pwned"
    text = (copy / SPEC_FILE).read_text()
    (copy / SPEC_FILE).write_text(
        text + f"extra: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(UnsafeArtifactError, match="not plain YAML"):
        read_spec(copy)
    assert not marker.exists()


@pytest.mark.parametrize("architecture", ["Sequential", "torch.nn.Linear", "os.system",
                                          "EmotionHeads", None])
def test_architecture_outside_the_allow_list_is_refused(copy, architecture):
    edit_spec(copy, lambda spec: spec.update(architecture=architecture))
    with pytest.raises(UnsafeArtifactError, match="is not one of"):
        load_model_dir(copy)


@pytest.mark.parametrize("name", ["os.system", "builtins.eval"])
def test_feature_extractor_outside_the_allow_list_is_refused(copy, name):
    edit_spec(copy, lambda spec: spec["features"].update(name=name))
    with pytest.raises(UnsafeArtifactError, match="unknown feature extractor"):
        load_model_dir(copy)


@pytest.mark.parametrize("change,match", [
    (lambda spec: spec.update(surprise=1), "unexpected keyword"),
    (lambda spec: spec.pop("classes"), "missing"),
    (lambda spec: spec.update(kwargs=["not", "a", "mapping"]), "must be mappings"),
    (lambda spec: spec["kwargs"].update(__class__="os.system"), "cannot rebuild"),
    (lambda spec: spec.update(format_version=99), "unknown model format"),
], ids=["unknown-field", "missing-field", "kwargs-list", "unknown-kwarg", "format"])
def test_malformed_spec_is_refused_with_a_named_error(copy, change, match):
    edit_spec(copy, change)
    with pytest.raises(UnsafeArtifactError, match=match):
        load_model_dir(copy)


@pytest.mark.parametrize("tensors", [
    {"something_else": torch.zeros(1)},
    {"feature_mean": torch.zeros(3), "feature_std": torch.ones(3)},
], ids=["wrong-keys", "wrong-shape"])
def test_statistics_that_do_not_fit_the_features_are_refused(copy, tensors):
    save_file(tensors, copy / STATS_FILE)
    with pytest.raises(UnsafeArtifactError, match="feature_mean and feature_std"):
        load_model_dir(copy)


def test_weights_of_another_shape_are_refused(copy):
    save_file({"heads.emotion.weight": torch.zeros(2, 2)}, copy / WEIGHTS_FILE)
    with pytest.raises(UnsafeArtifactError, match="do not fit"):
        load_model_dir(copy)


@pytest.mark.parametrize("name", [WEIGHTS_FILE, STATS_FILE, SPEC_FILE])
def test_symlink_pointing_outside_the_model_dir_is_refused(copy, tmp_path, name):
    outside = tmp_path / "elsewhere" / name
    outside.parent.mkdir()
    shutil.move(copy / name, outside)  # a genuine file: only its location is wrong
    (copy / name).symlink_to(outside)
    with pytest.raises(UnsafeArtifactError, match="outside its model directory"):
        load_model_dir(copy)


def test_symlink_staying_inside_the_model_dir_is_followed(copy):
    shutil.move(copy / WEIGHTS_FILE, copy / "weights-v1.safetensors")
    (copy / WEIGHTS_FILE).symlink_to("weights-v1.safetensors")
    assert load_model_dir(copy).spec.architecture == "CnnBlstmAttn"


def test_missing_file_is_named(copy):
    (copy / STATS_FILE).unlink()
    with pytest.raises(UnsafeArtifactError, match=f"has no {STATS_FILE}"):
        load_model_dir(copy)


# eval(...)/exec(...)/builtins.eval(...), but not a module's .eval() (switching to eval mode)
_EVAL_OR_EXEC = re.compile(r"(?:^|[^\w.]|builtins\.)(eval|exec)\s*\(")


def test_source_tree_never_evaluates_strings():
    offenders = [
        f"{path.relative_to(SOURCE)}:{number}: {line.strip()}"
        for path in sorted(SOURCE.rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if _EVAL_OR_EXEC.search(line.split("#")[0])
    ]
    assert not offenders, "\n".join(offenders)


def test_source_tree_never_unpickles_or_loads_yaml_unsafely():
    unsafe = re.compile(r"pickle\.loads?\(|yaml\.(load|unsafe_load|full_load)\(|"
                        r"weights_only\s*=\s*False")
    offenders = [
        f"{path.relative_to(SOURCE)}:{number}: {line.strip()}"
        for path in sorted(SOURCE.rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if unsafe.search(line.split("#")[0])
    ]
    assert not offenders, "\n".join(offenders)
