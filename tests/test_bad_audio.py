"""Bad and odd audio wherever audio is read: a prediction or a named AudioError, never a hang.

Readers under test: :func:`read_audio` (training, the feature cache, inference),
:func:`iter_audio_blocks` (long recordings), ``Predictor.predict_file`` and the data
module's setup, which must skip bad corpus files and report each one.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import tempfile
import tracemalloc
from pathlib import Path

import pytest
import torch

from ser_pipeline import infer_cli
from ser_pipeline.audio import AudioError, iter_audio_blocks, read_audio
from ser_pipeline.corpora import read_synthetic
from ser_pipeline.data import SERDataModule
from ser_pipeline.features import LogMelFeatures
from ser_pipeline.features.cache import FeatureCache, extract_features
from ser_pipeline.inference import Predictor
from ser_pipeline.vad import SegmenterConfig
from tests import audio_zoo
from tests.audio_zoo import BAD, BAD_REASONS, ODD, ODD_SECONDS

CLASSES = ["anger", "happiness", "neutral", "sadness"]


@pytest.fixture(scope="module")
def predictor(tiny_model_dir: Path) -> Predictor:
    return Predictor.from_dir(tiny_model_dir)


# --------------------------------------------------------------------------- single files


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_file_is_refused_with_its_reason(tmp_path, name):
    path = BAD[name](tmp_path / "bad.wav")
    with pytest.raises(AudioError, match=re.escape(BAD_REASONS[name])) as caught:
        read_audio(path, 16000)
    assert caught.value.path == str(path)


# a 1-sample file is a valid (if useless) stream: only whole-file readers refuse it as too short
STREAM_BAD = sorted(set(BAD) - {"one_sample"})


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", STREAM_BAD)
def test_bad_file_is_refused_by_the_streaming_reader(tmp_path, name):
    path = BAD[name](tmp_path / "bad.wav")
    with pytest.raises(AudioError, match=re.escape(BAD_REASONS[name])):
        list(iter_audio_blocks(path, 16000))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_file_gives_a_named_error_from_the_predictor(tmp_path, predictor, name):
    path = BAD[name](tmp_path / "bad.wav")
    with pytest.raises(AudioError, match=re.escape(BAD_REASONS[name])):
        predictor.predict_file(path)


def test_missing_file_is_refused_as_not_found(tmp_path, predictor):
    with pytest.raises(AudioError, match="file not found"):
        predictor.predict_file(tmp_path / "nowhere.wav")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", sorted(ODD))
def test_odd_file_decodes_to_finite_mono_at_the_target_rate(tmp_path, name):
    writer, rate, _channels = ODD[name]
    path = writer(tmp_path / "odd.wav")
    wave = read_audio(path, 16000)
    samples = 2 if name == "two_samples" else round(ODD_SECONDS * rate)
    assert wave.ndim == 1 and wave.dtype == torch.float32
    assert abs(wave.shape[0] - samples * 16000 / rate) <= 1
    assert torch.isfinite(wave).all()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", sorted(ODD))
def test_odd_file_gets_a_prediction(tmp_path, predictor, name):
    path = ODD[name][0](tmp_path / "odd.wav")
    result = predictor.predict_file(path)
    assert result["emotion"] in CLASSES
    assert sum(result["scores"].values()) == pytest.approx(1.0, abs=1e-4)


@pytest.mark.timeout(60)
def test_surround_channels_are_averaged_not_dropped(tmp_path):
    mono = read_audio(audio_zoo.write_tone(tmp_path / "mono.wav", subtype="FLOAT"), 16000)
    surround = read_audio(
        audio_zoo.write_tone(tmp_path / "51.wav", channels=6, subtype="FLOAT"), 16000)
    assert torch.allclose(mono, surround, atol=1e-6)


# --------------------------------------------------------------------------- permissions

def _probe_as_nobody(paths: dict[str, Path], predictor: Predictor, cache: Path) -> dict:
    """``{name: {reader: reason}}`` for each path, read by a forked child that is not root.

    Root ignores permission bits, so when the tests run as root the child drops to
    ``nobody`` (uid 65534) first. (Not a subprocess: the venv's interpreter may live
    where nobody cannot execute it.) The child only decodes, it runs no torch kernels.
    """
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 1
        try:
            os.close(read_end)
            if os.geteuid() == 0:
                os.setuid(65534)
            out: dict[str, dict[str, str | None]] = {}
            for name, path in paths.items():
                found: dict[str, str | None] = {}
                for reader, call in (("read_audio", lambda p: read_audio(p, 16000)),
                                     ("predict_file", predictor.predict_file)):
                    try:
                        call(path)
                        found[reader] = None
                    except AudioError as error:
                        found[reader] = error.reason
                    except Exception as error:  # noqa: BLE001 - reported, and fails the test
                        found[reader] = f"UNNAMED {type(error).__name__}: {error}"
                for key, folder in (("extract_features", None), ("extract_features_cached", cache)):
                    try:
                        _, skipped = extract_features(
                            [str(path)], lambda p: read_audio(p, 16000),
                            FeatureCache(folder, {"name": "probe"}) if folder else None,
                            progress=False)
                        found[key] = skipped.get(str(path))
                    except Exception as error:  # noqa: BLE001
                        found[key] = f"UNNAMED {type(error).__name__}: {error}"
                out[name] = found
            os.write(write_end, json.dumps(out).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end) as reply:
        text = reply.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "probe child failed"
    return json.loads(text)


@pytest.fixture(scope="module")
def unreadable_results(predictor: Predictor) -> dict[str, dict[str, str | None]]:
    """Readers' verdicts on a file without read permission and one in a closed folder."""
    folder = Path(tempfile.mkdtemp(prefix="ser-unreadable-"))
    try:
        folder.chmod(0o777)  # nobody may enter it and write the cache there
        locked = audio_zoo.write_tone(folder / "locked.wav")
        locked.chmod(0o000)
        closed = folder / "closed"
        closed.mkdir(mode=0o700)
        hidden = audio_zoo.write_tone(closed / "hidden.wav")
        (folder / "cache").mkdir(mode=0o777)
        (folder / "cache").chmod(0o777)
        return _probe_as_nobody({"locked": locked, "in_closed_folder": hidden}, predictor,
                                folder / "cache")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def assert_named_permission_error(reason: str | None) -> None:
    assert reason is not None and not reason.startswith("UNNAMED"), reason
    assert "permission denied" in reason.lower()


@pytest.mark.timeout(120)
def test_unreadable_file_is_refused_as_permission_denied(unreadable_results):
    assert unreadable_results["locked"]["read_audio"] == "permission denied"


@pytest.mark.timeout(120)
def test_unreadable_file_gives_a_named_error_from_the_predictor(unreadable_results):
    assert unreadable_results["locked"]["predict_file"] == "permission denied"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("key", ["extract_features", "extract_features_cached"])
def test_unreadable_file_is_skipped_by_feature_extraction(unreadable_results, key):
    assert_named_permission_error(unreadable_results["locked"][key])


@pytest.mark.timeout(120)
@pytest.mark.parametrize("reader", ["read_audio", "predict_file", "extract_features",
                                    "extract_features_cached"])
def test_file_in_a_closed_folder_is_refused_as_permission_denied(unreadable_results, reader):
    assert_named_permission_error(unreadable_results["in_closed_folder"][reader])


# --------------------------------------------------------------------------- long recordings


@pytest.mark.timeout(120)
def test_hour_long_recording_streams_in_bounded_memory(tmp_path):
    rate = 8000  # the model's rate here, so the test measures reading, not resampling
    path = audio_zoo.write_long_recording(tmp_path / "hour.wav", 3600, rate)
    whole_file_bytes = 3600 * rate * 4  # what read_audio would hold as float32 alone
    tracemalloc.start()
    try:
        samples = sum(block.shape[0] for block in iter_audio_blocks(path, rate))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert samples == 3600 * rate
    assert peak < whole_file_bytes / 8, f"peak {peak / 1e6:.1f} MB while streaming"


@pytest.mark.timeout(120)
def test_long_recording_in_the_cli_is_never_read_whole(tmp_path, predictor, monkeypatch):
    path = audio_zoo.write_long_recording(tmp_path / "long.wav", 120, 16000, silent=True)

    def whole_file_read(*args, **kwargs):
        raise AssertionError("read_audio used for a long recording")

    monkeypatch.setattr(infer_cli, "read_audio", whole_file_read)
    # silence: the streamed VAD finds no speech and says so, after reading every block
    with pytest.raises(AudioError, match="silent"):
        list(infer_cli.predict_file(predictor, path, SegmenterConfig(), segment_above_s=30.0))


# --------------------------------------------------------------------------- a corpus


@pytest.fixture(scope="module")
def synthetic_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synthetic") / "corpus"
    read_synthetic(root, n_speakers=3, utterances_per_class=2)
    return root


def corpus_datamodule(root: Path, cache_dir: Path | None) -> SERDataModule:
    return SERDataModule(
        name="synthetic",
        reader=functools.partial(read_synthetic, n_speakers=3, utterances_per_class=2),
        root=str(root), features=LogMelFeatures(n_mels=16), classes=CLASSES,
        split="loso", fold=0, val_speakers=1, batch_size=4,
        cache_dir=str(cache_dir) if cache_dir else None, progress=False)


#: corpus file -> how it is damaged in place
CORRUPTIONS = {
    "spk00/spk00_anger_000.wav": "random_bytes",
    "spk00/spk00_sadness_001.wav": "zero_length",
    "spk01/spk01_happiness_000.wav": "nan_floats",
    "spk01/spk01_neutral_001.wav": "truncated_header",
    "spk02/spk02_anger_001.wav": "directory",
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("cached", [False, True], ids=["no-cache", "cache"])
def test_corrupt_corpus_files_are_skipped_and_reported(tmp_path, synthetic_corpus, cached):
    root = shutil.copytree(synthetic_corpus, tmp_path / "corpus")
    cache_dir = tmp_path / "cache" if cached else None
    if cached:  # the good versions are cached first: a corrupted file must not hit them
        corpus_datamodule(root, cache_dir).setup()
    damaged = set()
    for relative, kind in CORRUPTIONS.items():
        path = root / "wav" / relative
        path.unlink()
        BAD[kind](path)
        damaged.add(str(path))
    datamodule = corpus_datamodule(root, cache_dir)
    datamodule.setup()
    assert set(datamodule.skipped) == damaged
    assert all(reason for reason in datamodule.skipped.values())
    assert datamodule.summary()["skipped_files"] == datamodule.skipped
    kept = sum(len(d) for d in datamodule.datasets.values())
    assert kept == 3 * 4 * 2 - len(CORRUPTIONS)
    assert not set(datamodule.manifest["path"]) & damaged


@pytest.mark.timeout(120)
def test_corrupt_corpus_file_reasons_name_the_damage(tmp_path, synthetic_corpus):
    root = shutil.copytree(synthetic_corpus, tmp_path / "corpus")
    for relative, kind in CORRUPTIONS.items():
        (root / "wav" / relative).unlink()
        BAD[kind](root / "wav" / relative)
    datamodule = corpus_datamodule(root, None)
    datamodule.setup()
    for relative, kind in CORRUPTIONS.items():
        assert BAD_REASONS[kind] in datamodule.skipped[str(root / "wav" / relative)]
