"""Speaker normalisation (``data.normalization=speaker``): training, the artifact, inference."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch
import yaml

from ser_pipeline.artifact import SPEC_FILE, UnsafeArtifactError, load_model_dir
from ser_pipeline.corpora import read_synthetic
from ser_pipeline.corpora.synthetic import make_speaker, synthesise_utterance
from ser_pipeline.data import SERDataModule
from ser_pipeline.features import LogMelFeatures
from ser_pipeline.features.batching import FeatureStats, RunningStats
from ser_pipeline.infer_cli import main as infer_main
from ser_pipeline.inference import Predictor

CLASSES = ["anger", "happiness", "neutral", "sadness"]


def test_running_statistics_equal_those_of_all_frames_at_once():
    torch.manual_seed(0)
    parts = [torch.randn(2, 5, n) * 3 + 7 for n in (1, 40, 13)]
    running = RunningStats()
    for part in parts:
        running.update(part)
    frames = torch.cat(parts, dim=-1).double()
    stats = running.stats()
    torch.testing.assert_close(stats.mean, frames.mean(-1, keepdim=True).float())
    torch.testing.assert_close(stats.std, frames.std(-1, keepdim=True).float())
    with pytest.raises(ValueError, match="no frames"):
        RunningStats().stats()


def datamodule(root: Path, normalization: str) -> SERDataModule:
    return SERDataModule(
        "synthetic", lambda r: read_synthetic(r, n_speakers=4, utterances_per_class=3),
        str(root), LogMelFeatures(n_mels=16), CLASSES, split="loso", fold=0,
        progress=False, normalization=normalization)


def test_speaker_normalisation_z_scores_every_speaker_with_its_own_frames(tmp_path):
    data = datamodule(tmp_path / "corpus", "speaker")
    data.setup()
    for dataset in data.datasets.values():
        for speaker in dataset.rows["speaker"].unique():
            picks = np.flatnonzero(dataset.rows["speaker"].to_numpy() == speaker)
            frames = torch.cat([dataset.features[i] for i in picks], dim=-1).double()
            torch.testing.assert_close(frames.mean(-1), torch.zeros_like(frames[..., 0]),
                                       atol=1e-4, rtol=0)
            torch.testing.assert_close(frames.std(-1), torch.ones_like(frames[..., 0]),
                                       atol=1e-4, rtol=0)
    # the global default differs: the test speaker is scaled with the training statistics
    plain = datamodule(tmp_path / "corpus", "global")
    plain.setup()
    test = torch.cat(plain.datasets["test"].features, dim=-1)
    assert test.mean(-1).abs().max() > 0.05


def test_an_unknown_normalisation_is_refused():
    with pytest.raises(ValueError, match="data.normalization must be one of global, speaker"):
        datamodule(Path("unused"), "per-corpus")


@pytest.fixture()
def speaker_model_dir(tiny_model_dir: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "speaker_model"
    shutil.copytree(tiny_model_dir, folder)
    spec = yaml.safe_load((folder / SPEC_FILE).read_text())
    (folder / SPEC_FILE).write_text(yaml.safe_dump({**spec, "normalization": "speaker"}))
    return folder


def voices(n: int, rate: int = 16000) -> list[torch.Tensor]:
    speaker = make_speaker(3, 1)
    return [torch.from_numpy(synthesise_utterance(speaker, emotion, np.random.default_rng(i),
                                                  rate)[0]).float()
            for i, emotion in enumerate((["anger", "sadness", "neutral", "happiness"] * n)[:n])]


def manual_prediction(model_dir: Path, waves: list[torch.Tensor], stats_from: list[torch.Tensor]
                      ) -> list[dict]:
    """What a speaker-normalised model should predict, with the statistics made by hand."""
    loaded = load_model_dir(model_dir)
    stats = FeatureStats.from_features([loaded.extractor(w) for w in stats_from])
    predictor = Predictor(loaded)
    predictor.speaker = None  # this copy normalises with whatever stats we give it
    loaded.stats = stats
    return predictor.predict_waveforms(waves)


def test_one_call_of_a_speaker_normalized_model_is_one_speaker(speaker_model_dir):
    predictor = Predictor.from_dir(speaker_model_dir)
    assert predictor.speaker_normalized
    waves = voices(3)
    got = predictor.predict_waveforms(waves)
    expected = manual_prediction(speaker_model_dir, waves, waves)
    for a, b in zip(got, expected, strict=True):
        assert a["scores"] == pytest.approx(b["scores"], abs=1e-5)
    # and the stored training statistics would have given something else
    plain = Predictor.from_dir(speaker_model_dir)
    plain.speaker = None
    assert plain.predict_waveforms(waves)[0]["scores"] != pytest.approx(got[0]["scores"],
                                                                         abs=1e-5)


def test_a_session_accumulates_every_utterance_it_hears(speaker_model_dir):
    predictor = Predictor.from_dir(speaker_model_dir)
    waves = voices(3)
    predictor.predict_utterance(waves[0])
    predictor.predict_utterance(waves[1])
    third = predictor.predict_utterance(waves[2])
    assert predictor.speaker.count > 0
    expected = manual_prediction(speaker_model_dir, [waves[2]], waves)[0]
    assert third["scores"] == pytest.approx(expected["scores"], abs=1e-5)
    predictor.reset_speaker()
    assert predictor.speaker.count == 0


def test_a_globally_normalised_model_ignores_adaptation(tiny_model_dir):
    predictor = Predictor.from_dir(tiny_model_dir)
    waves = voices(2)
    before = predictor.predict_waveform(waves[1])
    predictor.predict_utterance(waves[0])
    assert predictor.speaker is None
    assert predictor.predict_waveform(waves[1])["scores"] == before["scores"]


def test_infer_py_says_it_normalises_per_speaker_and_uses_the_session(speaker_model_dir,
                                                                      tmp_path, capsys):
    paths = []
    for i, wave in enumerate(voices(2)):
        paths.append(tmp_path / f"u{i}.wav")
        sf.write(paths[-1], wave.numpy(), 16000)
    assert infer_main(["--model", str(speaker_model_dir), "--json", *map(str, paths)]) == 0
    out, err = capsys.readouterr()
    records = [json.loads(line) for line in out.splitlines()]
    assert len(records) == 2 and "normalises features per speaker" in err


def test_an_unknown_normalisation_in_a_model_directory_is_refused(speaker_model_dir):
    spec = yaml.safe_load((speaker_model_dir / SPEC_FILE).read_text())
    (speaker_model_dir / SPEC_FILE).write_text(yaml.safe_dump({**spec, "normalization": "x"}))
    with pytest.raises(UnsafeArtifactError, match="unknown normalization"):
        load_model_dir(speaker_model_dir)


def test_a_pyfunc_request_is_one_speaker(speaker_model_dir, tmp_path):
    from types import SimpleNamespace

    from ser_pipeline.pyfunc_model import SERPyfuncModel

    waves = voices(2)
    paths = []
    for i, wave in enumerate(waves):
        paths.append(str(tmp_path / f"u{i}.wav"))
        sf.write(paths[-1], wave.numpy(), 16000, subtype="FLOAT")
    model = SERPyfuncModel()
    model.load_context(SimpleNamespace(artifacts={"model_dir": str(speaker_model_dir)}))
    frame = model.predict(None, pd.DataFrame({"path": paths}))
    expected = manual_prediction(speaker_model_dir, waves, waves)
    for i, result in enumerate(expected):
        for emotion, score in result["scores"].items():
            assert frame.loc[i, f"score_{emotion}"] == pytest.approx(score, abs=1e-5)
