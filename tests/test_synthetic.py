"""The built-in synthetic corpus: deterministic, safe to create concurrently, speech-like."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from ser_pipeline.corpora import generate_synthetic_corpus, read_synthetic, validate_manifest
from ser_pipeline.corpora.synthetic import CONFIG_FILE

SMALL = {"n_speakers": 4, "utterances_per_class": 3}
TINY = {"n_speakers": 2, "utterances_per_class": 1}


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> pd.DataFrame:
    """4 speakers x 4 emotions x 3 utterances, generated once for this module."""
    return read_synthetic(tmp_path_factory.mktemp("synthetic") / "corpus", **SMALL)


def _level_db(path: str) -> float:
    wave, _ = sf.read(path)
    return 20 * np.log10(np.sqrt(np.mean(wave**2)))


def _f0_estimate(path: str) -> float:
    """Median autocorrelation F0 (Hz) of the loudest 40 ms frames (60-400 Hz search)."""
    wave, sr = sf.read(path)
    frame = int(0.04 * sr)
    frames = wave[: len(wave) // frame * frame].reshape(-1, frame)
    loud = frames[np.argsort((frames**2).sum(1))[-8:]]
    estimates = []
    for x in loud:
        x = x - x.mean()
        corr = np.correlate(x, x, "full")[frame - 1 :]
        low, high = int(sr / 400), int(sr / 60)
        estimates.append(sr / (low + np.argmax(corr[low:high])))
    return float(np.median(estimates))


def _spectral_centroid(path: str) -> float:
    wave, sr = sf.read(path)
    spectrum = np.abs(np.fft.rfft(wave))
    return float((np.fft.rfftfreq(len(wave), 1 / sr) * spectrum).sum() / spectrum.sum())


# --------------------------------------------------------------------------- contents


def test_manifest_is_valid_and_marked_synthetic(small):
    validate_manifest(small)
    assert set(small["corpus"]) == {"synthetic"}
    assert small["id"].tolist() == sorted(small["id"])


def test_every_speaker_has_utterances_per_class_of_every_emotion(small):
    counts = small.groupby(["speaker", "emotion"]).size()
    assert len(small) == 4 * 4 * 3
    assert set(counts) == {3}
    assert set(small["emotion"]) == {"anger", "happiness", "neutral", "sadness"}


def test_speakers_are_named_spk_nn_and_half_are_female(small):
    genders = small.groupby("speaker")["gender"].first()
    assert list(genders.index) == ["spk00", "spk01", "spk02", "spk03"]
    assert genders.value_counts().to_dict() == {"female": 2, "male": 2}


def test_wavs_are_16_bit_mono_at_the_sample_rate_and_about_1_to_2_5_seconds(small):
    for path in small["path"]:
        info = sf.info(path)
        assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
        assert 0.8 <= info.duration <= 3.0
    assert small["duration"].between(0.8, 3.0).all()


def test_recordings_start_and_end_in_near_silence(small):
    for path in small["path"][:8]:
        wave, sr = sf.read(path)
        edge = int(0.05 * sr)
        assert np.abs(wave[:edge]).max() < 0.01
        assert np.abs(wave[-edge:]).max() < 0.01


def test_dimensions_lie_on_the_1_to_5_scale(small):
    dimensions = small[["valence", "arousal", "dominance"]]
    assert dimensions.notna().all().all()
    assert ((dimensions >= 1) & (dimensions <= 5)).all().all()


def test_unknown_emotion_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="frustration"):
        read_synthetic(tmp_path / "corpus", emotions=("anger", "frustration"))


def test_other_known_emotions_can_be_voiced(tmp_path):
    manifest = read_synthetic(tmp_path / "corpus", emotions=("fear", "boredom"), **TINY)
    assert manifest["emotion"].value_counts().to_dict() == {"boredom": 2, "fear": 2}


# --------------------------------------------------------------------------- speech-like


def test_male_speakers_have_lower_f0_than_female_speakers(small):
    f0 = small.assign(f0=[_f0_estimate(p) for p in small["path"]]).groupby("gender")["f0"]
    assert f0.median()["male"] < 160 < f0.median()["female"]
    assert f0.median()["male"] * 1.4 < f0.median()["female"]


def test_anger_is_louder_than_neutral_and_neutral_louder_than_sadness(small):
    level = small.assign(level=[_level_db(p) for p in small["path"]]).groupby("emotion")["level"]
    assert level.mean()["anger"] > level.mean()["neutral"] + 3
    assert level.mean()["neutral"] > level.mean()["sadness"] + 3


def test_anger_has_a_brighter_spectrum_than_sadness(small):
    centroid = small.assign(c=[_spectral_centroid(p) for p in small["path"]])
    means = centroid.groupby("emotion")["c"].mean()
    assert means["anger"] > 1.15 * means["sadness"]


def test_arousal_follows_loudness_within_an_emotion(small):
    levels = small.assign(level=[_level_db(p) for p in small["path"]])
    within = levels.groupby("emotion")[["level", "arousal"]].transform(lambda x: x - x.mean())
    assert within["level"].corr(within["arousal"]) > 0.3


def test_dimensional_prototypes_order_the_emotions(small):
    means = small.groupby("emotion")[["valence", "arousal"]].mean()
    assert means.loc["anger", "arousal"] > means.loc["neutral", "arousal"]
    assert means.loc["neutral", "arousal"] > means.loc["sadness", "arousal"]
    assert means.loc["happiness", "valence"] > means.loc["anger", "valence"]


# --------------------------------------------------------------------------- on disk


def test_same_options_give_byte_identical_wavs(tmp_path):
    first = read_synthetic(tmp_path / "a", **TINY)
    second = read_synthetic(tmp_path / "b", **TINY)
    for a, b in zip(first["path"], second["path"], strict=True):
        assert Path(a).read_bytes() == Path(b).read_bytes()
    columns = ["id", "emotion", "speaker", "gender", "valence", "arousal", "dominance"]
    pd.testing.assert_frame_equal(first[columns], second[columns])


def test_another_seed_gives_other_audio(tmp_path):
    first = read_synthetic(tmp_path / "a", seed=0, **TINY)
    second = read_synthetic(tmp_path / "b", seed=1, **TINY)
    assert Path(first["path"][0]).read_bytes() != Path(second["path"][0]).read_bytes()


def test_an_utterance_does_not_depend_on_the_corpus_size(small, tmp_path):
    tiny = read_synthetic(tmp_path / "corpus", **TINY)
    same = small.set_index("id").loc[tiny["id"], "path"]
    for a, b in zip(tiny["path"], same, strict=True):
        assert Path(a).read_bytes() == Path(b).read_bytes()


def test_reading_an_existing_corpus_does_not_regenerate_it(tmp_path):
    manifest = read_synthetic(tmp_path / "corpus", **TINY)
    before = Path(manifest["path"][0]).stat()
    again = read_synthetic(tmp_path / "corpus", **TINY)
    after = Path(again["path"][0]).stat()
    assert (before.st_ino, before.st_mtime_ns) == (after.st_ino, after.st_mtime_ns)
    pd.testing.assert_frame_equal(manifest, again)


def test_changed_options_regenerate_the_corpus(tmp_path):
    read_synthetic(tmp_path / "corpus", **TINY)
    manifest = read_synthetic(tmp_path / "corpus", n_speakers=2, utterances_per_class=2)
    assert len(manifest) == 2 * 4 * 2
    assert all(Path(p).is_file() for p in manifest["path"])
    stored = json.loads((tmp_path / "corpus" / CONFIG_FILE).read_text())
    assert stored["utterances_per_class"] == 2


def test_generation_leaves_no_temporary_folders(tmp_path):
    read_synthetic(tmp_path / "corpus", **TINY)
    read_synthetic(tmp_path / "corpus", n_speakers=2, utterances_per_class=2)
    assert [p.name for p in tmp_path.iterdir()] == ["corpus"]


def test_generate_writes_into_an_empty_folder_and_returns_its_absolute_path(tmp_path):
    (tmp_path / "corpus").mkdir()
    root = generate_synthetic_corpus(tmp_path / "corpus", **TINY)
    assert root == (tmp_path / "corpus").absolute()
    assert (root / CONFIG_FILE).is_file()


def test_generating_over_an_identical_corpus_keeps_it(tmp_path):
    manifest = read_synthetic(tmp_path / "corpus", **TINY)
    before = Path(manifest["path"][0]).stat().st_ino
    generate_synthetic_corpus(tmp_path / "corpus", **TINY)
    assert Path(manifest["path"][0]).stat().st_ino == before
    assert [p.name for p in tmp_path.iterdir()] == ["corpus"]


def test_refuses_to_replace_a_folder_that_is_not_a_synthetic_corpus(tmp_path):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "thesis.tex").write_text("precious")
    with pytest.raises(FileExistsError, match="not a synthetic corpus"):
        read_synthetic(tmp_path / "corpus", **TINY)
    assert (tmp_path / "corpus" / "thesis.tex").read_text() == "precious"
    assert [p.name for p in tmp_path.iterdir()] == ["corpus"]


def test_concurrent_first_calls_both_get_the_full_corpus(tmp_path):
    results: list[pd.DataFrame] = []
    errors: list[BaseException] = []

    def call() -> None:
        try:
            results.append(read_synthetic(tmp_path / "corpus", **TINY))
        except BaseException as error:  # surfaced by the assertion below
            errors.append(error)

    threads = [threading.Thread(target=call) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    reference = read_synthetic(tmp_path / "reference", **TINY)
    for manifest in results:
        assert len(manifest) == len(reference)
        for path, expected in zip(manifest["path"], reference["path"], strict=True):
            assert Path(path).read_bytes() == Path(expected).read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "reference"]
