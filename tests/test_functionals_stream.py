"""The functionals stream (``functionals=lld|compare|egemaps``): utterance vectors fused beside a
deep model's embedding, from the data module through training to the model directory and
``Predictor``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from ser_pipeline.artifact import (
    SPEC_FILE,
    STATS_FILE,
    UnsafeArtifactError,
    load_model_dir,
    save_model_dir,
)
from ser_pipeline.audio import set_level
from ser_pipeline.corpora.synthetic import DEFAULT_EMOTIONS, read_synthetic
from ser_pipeline.features import LogMelFeatures
from ser_pipeline.features.batching import FeatureStats, pad_batch
from ser_pipeline.features.functionals import FunctionalsStream
from ser_pipeline.features.lld import LLDFeatures
from ser_pipeline.inference import Predictor
from ser_pipeline.models import MODELS
from tests.e2e import FAST, run_script, served_test_accuracy, store_uri
from tests.test_level_robustness import GAINS_DB, PROBABILITY_TOLERANCE, gained, speech_like

#: 34 LLDs and their deltas x 8 functionals (the SVM reference's vector)
LLD_INPUTS = 544


def lld_stream(**options) -> FunctionalsStream:
    return FunctionalsStream(LLDFeatures(sample_rate=16000), **options)


def test_lld_stream_gives_the_references_544_functionals_z_scored_with_training_statistics():
    stream = lld_stream()
    waves = speech_like(6)
    raw = [stream.raw(w) for w in waves]
    assert all(v.shape == (LLD_INPUTS,) and v.dtype == torch.float32 for v in raw)
    stream.fit(raw)
    z = torch.stack([stream.normalize(v) for v in raw])
    varying = torch.stack(raw).std(0) > 1e-6
    assert torch.allclose(z.mean(0), torch.zeros(LLD_INPUTS), atol=1e-4)
    assert torch.allclose(z.std(0, unbiased=False)[varying], torch.ones(int(varying.sum())),
                          atol=1e-3)
    assert z.abs().max() <= stream.clip


def test_outliers_are_clipped_and_an_unfitted_stream_refuses_to_normalise():
    stream = lld_stream(clip=3.0)
    with pytest.raises(RuntimeError, match="not fitted"):
        stream.normalize(torch.zeros(LLD_INPUTS))
    stream.fit([torch.zeros(4), torch.ones(4) * 2])
    assert stream.normalize(torch.full((4,), 1e6)).tolist() == [3.0] * 4


def test_the_stream_does_not_depend_on_the_recording_level():
    stream = lld_stream()
    waves = speech_like(4)
    stream.fit([stream.raw(w) for w in waves])
    for wave in waves:
        reference = stream(wave)
        for db in GAINS_DB:
            # float32 rounding of the rescaled waveform: below 0.005 training standard deviations
            assert torch.allclose(stream(gained(wave, db)), reference, atol=5e-3), db
    # the contrast: without the level step, energy functionals follow the gain
    unlevelled = lld_stream(level_dbfs=None)
    assert not torch.allclose(unlevelled.raw(gained(waves[0], -20)), unlevelled.raw(waves[0]),
                              atol=1e-2)


def test_trimming_makes_the_stream_ignore_the_silence_around_the_speech():
    wave = speech_like(1)[0]
    quiet = 1e-5 * torch.randn(16000, generator=torch.Generator().manual_seed(0))
    padded = torch.cat([quiet, wave, quiet])
    trimmed = lld_stream(trim_db=40.0)
    untrimmed = lld_stream()
    # the trimmed stream describes the same speech whether a second of silence surrounds it
    # or not (the cut falls within a frame of the speech's edges)
    close = torch.isclose(trimmed.raw(padded), trimmed.raw(wave), rtol=0.05, atol=0.05)
    assert close.float().mean() > 0.95
    far = torch.isclose(untrimmed.raw(padded), untrimmed.raw(wave), rtol=0.05, atol=0.05)
    assert far.float().mean() < close.float().mean() - 0.1
    # the option is part of what the vectors depend on (cache key, model directory), and
    # an untrimmed stream's record is what it was before the option existed
    assert trimmed.config()["trim_db"] == 40.0 and "trim_db" not in untrimmed.config()
    rebuilt = FunctionalsStream.from_spec(trimmed.config(), torch.zeros(1), torch.ones(1))
    assert rebuilt.trim_db == 40.0


def test_set_level_reaches_the_rms_and_leaves_silence_alone():
    wave = speech_like(1)[0]
    rms = set_level(wave, -25.0).pow(2).mean().sqrt()
    assert 20 * torch.log10(rms) == pytest.approx(-25.0, abs=1e-4)
    assert torch.equal(set_level(torch.zeros(100), -25.0), torch.zeros(100))


def test_a_functionals_extractor_given_as_is_is_used_as_the_vector():
    class OneFrame(torch.nn.Module):  # what level=functionals openSMILE sets give
        sample_rate, level = 16000, "functionals"

        def forward(self, wave):
            return torch.stack([wave.mean(), wave.std(), wave.abs().max()]).reshape(1, 3, 1)

    stream = FunctionalsStream(OneFrame(), level_dbfs=None)
    assert stream.summary == "vector" and stream.raw(torch.ones(10)).shape == (3,)


@pytest.mark.parametrize("name", ["cnn_blstm_attn", "cnn_attn_multitask", "dcnn_blstm_attn",
                                  "blstm_local_attn", "ssl_attn"])
def test_every_model_fuses_the_vectors_and_their_content_reaches_the_heads(name):
    torch.manual_seed(0)
    kwargs = {"in_channels": 1, "n_features": 16, "n_emotions": 4, "fusion_dim": 8,
              "functionals_dim": 20, "dropout": 0.0}
    net = MODELS[name](**kwargs).eval()
    features = torch.randn(2, 1, 16, 40)
    lengths = torch.tensor([40, 30])
    vectors = torch.randn(2, 20)
    out = net(features, lengths, functionals=vectors)
    assert out["emotion"].shape == (2, 4)
    other = net(features, lengths, functionals=vectors + 1.0)["emotion"]
    assert not torch.allclose(out["emotion"], other)
    with pytest.raises(ValueError, match="functionals="):
        net(features, lengths)


@pytest.mark.parametrize("name", ["cnn_blstm_attn", "cnn_attn_multitask", "dcnn_blstm_attn",
                                  "blstm_local_attn", "ssl_attn"])
def test_fusion_dropout_sets_the_branch_input_dropout_and_defaults_to_the_models(name):
    from torch import nn

    kwargs = {"in_channels": 1, "n_features": 16, "n_emotions": 4, "fusion_dim": 8,
              "functionals_dim": 20, "dropout": 0.2}

    def branch_rate(**extra):
        first = MODELS[name](**kwargs, **extra).fusion.project[0]
        assert isinstance(first, nn.Dropout)
        return first.p

    assert branch_rate() == 0.2
    assert branch_rate(fusion_dropout=0.6) == 0.6
    # in training mode about 60 % of the vector's inputs are zeroed
    net = MODELS[name](**kwargs, fusion_dropout=0.6).train()
    dropped = net.fusion.project[0](torch.ones(1000, 20))
    assert 0.5 < float((dropped == 0).float().mean()) < 0.7
    with pytest.raises(ValueError, match="fusion_dropout"):
        MODELS[name](**kwargs, fusion_dropout=1.0)


def test_a_stream_without_a_fusion_branch_is_refused():
    with pytest.raises(ValueError, match="fusion_dim"):
        MODELS["cnn_blstm_attn"](in_channels=1, n_features=16, n_emotions=4, functionals_dim=20)


def test_the_data_module_gives_every_batch_the_normalised_vectors(tmp_path):
    from ser_pipeline.data import SERDataModule, collate

    data = SERDataModule(
        "synthetic", lambda r: read_synthetic(r, n_speakers=4, utterances_per_class=2),
        str(tmp_path / "corpus"), LogMelFeatures(n_mels=16), list(DEFAULT_EMOTIONS),
        functionals=lld_stream(), split="loso", fold=0, progress=False,
        cache_dir=str(tmp_path / "cache"), train_crop_seconds=0.25)
    data.setup()
    assert data.functionals_dim == LLD_INPUTS
    train = data.datasets["train"]
    table = torch.stack(train.functionals)
    assert torch.allclose(table.mean(0), torch.zeros(LLD_INPUTS), atol=1e-4)
    batch = collate([train[i] for i in range(3)])
    assert batch["functionals"].shape == (3, LLD_INPUTS)
    # a second data module reads the vectors from the cache: the same values
    again = SERDataModule(
        "synthetic", lambda r: read_synthetic(r, n_speakers=4, utterances_per_class=2),
        str(tmp_path / "corpus"), LogMelFeatures(n_mels=16), list(DEFAULT_EMOTIONS),
        functionals=lld_stream(), split="loso", fold=0, progress=False,
        cache_dir=str(tmp_path / "cache"))
    again.setup()
    assert all(torch.equal(a, b) for a, b in zip(again.datasets["test"].functionals,
                                                 data.datasets["test"].functionals, strict=True))


def test_the_functionals_and_the_features_must_share_a_sample_rate(tmp_path):
    from ser_pipeline.data import SERDataModule

    with pytest.raises(ValueError, match="sample_rate"):
        SERDataModule("synthetic", lambda r: None, str(tmp_path),
                      LogMelFeatures(n_mels=16, sample_rate=8000), [],
                      functionals=lld_stream())


def fused_model_dir(directory: Path) -> tuple[Path, FunctionalsStream]:
    """An untrained tiny level-normalised model with an LLD functionals stream."""
    torch.manual_seed(0)
    extractor = LogMelFeatures(sample_rate=16000, n_mels=16)
    stream = lld_stream()
    stream.fit([stream.raw(w) for w in speech_like(6)])
    kwargs = {"in_channels": 1, "n_features": 16, "n_emotions": len(DEFAULT_EMOTIONS),
              "conv_channels": [4, 8], "lstm_hidden": 8, "lstm_layers": 1, "lstm_dropout": 0.0,
              "attention_dim": 8, "head_hidden": 8, "fusion_dim": 8,
              "functionals_dim": stream.n_inputs}
    net = MODELS["cnn_blstm_attn"](**kwargs)
    save_model_dir(directory, net, kwargs, {
        "features": extractor.config(), "classes": list(DEFAULT_EMOTIONS),
        "genders": ["female", "male"], "dimensions": ["valence", "arousal", "dominance"],
        "has_gender": True, "has_dimensions": False, "normalization": "level",
        "info": {"note": "untrained test model"},
    }, FeatureStats(torch.full((1, 16, 1), 0.5), torch.full((1, 16, 1), 2.0)), stream)
    return directory, stream


def test_a_model_directory_keeps_the_stream_and_the_predictor_feeds_it(tmp_path):
    directory, stream = fused_model_dir(tmp_path / "model")
    loaded = load_model_dir(directory)
    assert loaded.functionals.config() == stream.config()
    assert torch.equal(loaded.functionals.mean, stream.mean)
    predictor = Predictor(loaded)
    waves = speech_like(3)
    features, lengths = pad_batch(predictor._normalize([loaded.extractor(w) for w in waves]))
    expected = loaded.net(features, lengths,
                          functionals=torch.stack([stream(w) for w in waves]))["emotion"]
    got = predictor.predict_waveforms(waves)
    for result, row in zip(got, expected.softmax(-1), strict=True):
        assert [result["scores"][c] for c in DEFAULT_EMOTIONS] == pytest.approx(row.tolist(),
                                                                               abs=1e-6)
    assert Predictor(loaded, tta_views=3).predict_waveform(waves[0])["emotion"] in DEFAULT_EMOTIONS


def test_a_fused_level_normalised_model_predicts_the_same_at_every_gain(tmp_path):
    """The microphone case: level-normalised frames and a levelled stream, -20 ... +10 dB."""
    directory, _ = fused_model_dir(tmp_path / "model")
    predictor = Predictor.from_dir(directory)
    for wave in speech_like(4):
        reference = predictor.predict_waveform(wave)["scores"]
        for db in GAINS_DB:
            scores = predictor.predict_waveform(gained(wave, db))["scores"]
            assert max(abs(scores[c] - reference[c]) for c in reference) < PROBABILITY_TOLERANCE


def test_stream_statistics_that_do_not_fit_the_network_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    directory, _ = fused_model_dir(tmp_path / "model")
    tensors = load_file(directory / STATS_FILE)
    tensors["functionals_mean"] = tensors["functionals_mean"][:10].contiguous()
    save_file(tensors, directory / STATS_FILE)
    with pytest.raises(UnsafeArtifactError, match="functionals_mean"):
        load_model_dir(directory)
    spec = yaml.safe_load((directory / SPEC_FILE).read_text())
    spec["functionals"] = ["not", "a", "mapping"]
    (directory / SPEC_FILE).write_text(yaml.safe_dump(spec))
    with pytest.raises(UnsafeArtifactError, match="mapping"):
        load_model_dir(directory)


@pytest.mark.slow
def test_train_py_with_a_functionals_stream_logs_a_model_that_infer_py_serves(tmp_path, capsys):
    """``train.py functionals=lld model.net.fusion_dim=...``: the run's model directory records
    the stream, and Predictor on the test speaker's files reproduces the logged test WA."""
    root = tmp_path / "project"
    root.mkdir()
    result = run_script("train.py", [*FAST, "functionals=lld", "model.net.fusion_dim=8",
                                     "data.progress=false"], root, OMP_NUM_THREADS="1")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    client = MlflowClient(tracking_uri=store_uri(root))
    [run] = client.search_runs([client.get_experiment_by_name("ser-pipeline").experiment_id])
    assert run.info.status == "FINISHED"
    model_dir = next((root / "outputs").rglob("model/model.yaml")).parent
    spec = yaml.safe_load((model_dir / SPEC_FILE).read_text())
    assert spec["functionals"]["extractor"]["name"] == "lld"
    assert spec["kwargs"]["functionals_dim"] == LLD_INPUTS
    wavs, accuracy = served_test_accuracy(client, run.info.run_id, root, model_dir)
    assert accuracy == pytest.approx(run.data.metrics["test/wa"], abs=1e-6)

    from ser_pipeline.infer_cli import main  # what infer.py runs

    status = main(["--json", "--model", str(model_dir), str(wavs[0])])
    out, err = capsys.readouterr()
    assert status == 0, err[-3000:]
    assert json.loads(out.splitlines()[0])["emotion"] in DEFAULT_EMOTIONS


@pytest.mark.parametrize("stream", ["lld", "compare", "egemaps"])
def test_every_stream_config_composes_and_every_fold_of_a_cross_validation_gets_it(
        stream, tmp_path):
    from bench.common import compose_train_config
    from ser_pipeline.crossval import _datamodule

    cfg = compose_train_config([f"functionals={stream}", "model.net.fusion_dim=8"], tmp_path)
    assert cfg.functionals._target_.endswith("FunctionalsStream")
    if stream != "lld":  # openSMILE sets: the optional extra may be absent here
        pytest.importorskip("opensmile")
    fold_data = _datamodule(cfg, tmp_path / "manifest.csv")
    assert isinstance(fold_data.functionals, FunctionalsStream)
    plain = compose_train_config([], tmp_path)
    assert plain.get("functionals") is None
    assert _datamodule(plain, tmp_path / "manifest.csv").functionals is None


def test_the_compare_stream_is_level_invariant_up_to_a_few_thresholded_functionals():
    """openSMILE's 6,373 ComParE functionals after the level step: float rounding moves a few
    threshold decisions (a frame voiced or not), nothing else follows the gain."""
    pytest.importorskip("opensmile")
    from ser_pipeline.features.opensmile import OpenSmileFeatures

    stream = FunctionalsStream(OpenSmileFeatures(feature_set="ComParE_2016", level="functionals"))
    waves = speech_like(4)
    stream.fit([stream.raw(w) for w in waves])
    assert stream.summary == "vector" and stream.n_inputs == 6373
    for wave in waves[:2]:
        reference = stream(wave)
        for db in GAINS_DB:
            moved = (stream(gained(wave, db)) - reference).abs()
            assert moved.mean() < 0.01, db  # training standard deviations
            assert (moved > 0.1).float().mean() < 0.002, db  # at most ~12 of 6,373
