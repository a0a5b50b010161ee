"""feature=ssl and model=ssl_attn: pretrained-encoder front end, offline, end to end.

Encoders here are tiny and randomly initialised (torchaudio's own builders with small
dimensions) or full-size with random weights; nothing is ever downloaded, and the tests that
touch the torch hub cache point TORCH_HOME at an empty folder and make any download fail.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
import torchaudio
from mlflow.tracking import MlflowClient
from safetensors.torch import save_file

from ser_pipeline.artifact import UnsafeArtifactError, read_spec
from ser_pipeline.features import build_features
from ser_pipeline.features.cache import FeatureCache
from ser_pipeline.features.ssl import EncoderMismatch, EncoderWeightsMissing, SSLFeatures
from ser_pipeline.inference import Predictor
from ser_pipeline.models import SslAttn
from tests.e2e import run_script, store_uri

#: the strides of every torchaudio bundle (320 samples per frame), 16 channels
TINY_CONVS = [(16, 10, 5), (16, 3, 2), (16, 3, 2), (16, 3, 2), (16, 3, 2), (16, 2, 2), (16, 2, 2)]
TINY_COMMON = dict(
    extractor_mode="group_norm", extractor_conv_layer_config=TINY_CONVS, extractor_conv_bias=False,
    encoder_embed_dim=32, encoder_projection_dropout=0.0, encoder_pos_conv_kernel=16,
    encoder_pos_conv_groups=4, encoder_num_layers=2, encoder_num_heads=2,
    encoder_attention_dropout=0.0, encoder_ff_interm_features=64, encoder_ff_interm_dropout=0.0,
    encoder_dropout=0.0, encoder_layer_norm_first=False, encoder_layer_drop=0.0,
    aux_num_out=None)
TINY = {
    "wav2vec2_model": TINY_COMMON,
    "wavlm_model": {**TINY_COMMON, "encoder_num_buckets": 16, "encoder_max_distance": 64},
}


def save_tiny_encoder(path: Path, builder: str = "wav2vec2_model", seed: int = 0) -> Path:
    """A randomly initialised tiny encoder, saved with its architecture (torch.save)."""
    torch.manual_seed(seed)
    model = getattr(torchaudio.models, builder)(**TINY[builder])
    torch.save({"builder": builder, "kwargs": TINY[builder], "state_dict": model.state_dict()},
               path)
    return path


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return save_tiny_encoder(tmp_path_factory.mktemp("encoder") / "tiny_w2v2.pth")


@pytest.fixture
def offline_hub(tmp_path, monkeypatch) -> Path:
    """An empty torch hub cache; any attempt to download raises."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def no_download(*args, **kwargs):
        raise AssertionError(f"a download was attempted: {args}")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    return tmp_path / "torch" / "hub" / "checkpoints"


@pytest.mark.parametrize("builder", ["wav2vec2_model", "wavlm_model"])
def test_hidden_states_are_layers_by_dim_by_frames_in_float16(tmp_path, builder):
    extractor = SSLFeatures(encoder=None, checkpoint=str(save_tiny_encoder(
        tmp_path / "enc.pth", builder)))
    features = extractor(torch.randn(16000))
    assert (extractor.out_channels, extractor.n_features, extractor.hop_length) == (2, 32, 320)
    assert features.shape == (2, 32, extractor.frames_for(16000)) == (2, 32, 49)
    assert features.dtype == torch.float16 and torch.isfinite(features).all()
    assert extractor.config()["builder"] == builder


def test_chosen_layers_and_clips_shorter_than_one_frame(tiny_checkpoint):
    extractor = SSLFeatures(encoder=None, checkpoint=str(tiny_checkpoint), layers=[2])
    both = SSLFeatures(encoder=None, checkpoint=str(tiny_checkpoint))
    wave = torch.randn(8000)
    assert torch.equal(extractor(wave)[0], both(wave)[1])
    assert extractor(torch.randn(50)).shape == (1, 32, 1)
    with pytest.raises(ValueError, match="1..2"):
        SSLFeatures(encoder=None, checkpoint=str(tiny_checkpoint), layers=[3])


def test_a_batch_gives_what_each_item_gives_alone(tiny_checkpoint):
    extractor = SSLFeatures(encoder=None, checkpoint=str(tiny_checkpoint))
    waves = torch.randn(2, 6400)
    batch = extractor(waves)
    assert torch.equal(batch[1], extractor(waves[1]))


def test_config_rebuilds_the_extractor_and_refuses_other_weights(tmp_path):
    path = save_tiny_encoder(tmp_path / "enc.pth")
    extractor = SSLFeatures(encoder=None, checkpoint=str(path))
    config = extractor.config()
    assert config["digest"] and config["checkpoint"] == str(path.resolve())
    rebuilt = build_features(config)
    wave = torch.randn(4000)
    assert torch.equal(rebuilt(wave), extractor(wave))
    save_tiny_encoder(path, seed=1)  # other weights under the same name
    with pytest.raises(EncoderMismatch, match="sha256"):
        build_features(config)


def test_safetensors_with_json_architecture_loads_like_torch_save(tmp_path, tiny_checkpoint):
    content = torch.load(tiny_checkpoint, weights_only=True)
    save_file(content["state_dict"], tmp_path / "enc.safetensors")
    (tmp_path / "enc.json").write_text(json.dumps({"builder": content["builder"],
                                                   "kwargs": content["kwargs"]}))
    wave = torch.randn(4000)
    from_safetensors = SSLFeatures(encoder=None, checkpoint=str(tmp_path / "enc.safetensors"))
    assert torch.equal(from_safetensors(wave),
                       SSLFeatures(encoder=None, checkpoint=str(tiny_checkpoint))(wave))


def test_a_bare_state_dict_needs_the_encoder_name(tmp_path, tiny_checkpoint):
    torch.save(torch.load(tiny_checkpoint, weights_only=True)["state_dict"], tmp_path / "b.pth")
    with pytest.raises(ValueError, match="feature.encoder="):
        SSLFeatures(encoder=None, checkpoint=str(tmp_path / "b.pth"))


def test_missing_bundle_weights_name_bundle_file_hub_folder_and_checkpoint(offline_hub):
    with pytest.raises(EncoderWeightsMissing) as error:
        SSLFeatures(encoder="WAVLM_BASE")
    message = str(error.value)
    assert "WAVLM_BASE" in message and "wavlm_base.pth" in message
    assert str(offline_hub) in message and "feature.checkpoint=" in message
    assert not offline_hub.exists() or not any(offline_hub.iterdir())


def test_unknown_bundle_lists_the_known_ones():
    with pytest.raises(ValueError, match="WAVLM_BASE_PLUS"):
        SSLFeatures(encoder="WAVLM_TINY")


def test_bundle_weights_in_the_hub_cache_or_as_a_bare_state_dict_load_offline(offline_hub):
    """Full-size WAV2VEC2_BASE architecture, random weights, placed where torchaudio looks."""
    bundle = torchaudio.pipelines.WAV2VEC2_BASE
    torch.manual_seed(0)
    offline_hub.mkdir(parents=True)
    weights = offline_hub / "wav2vec2_fairseq_base_ls960.pth"
    torch.save(torchaudio.models.wav2vec2_model(**bundle._params).state_dict(), weights)
    wave = torch.randn(3200)
    named = SSLFeatures(encoder="WAV2VEC2_BASE", layers=[1, 12])
    assert named(wave).shape == (2, 768, 9)
    assert named.config()["encoder"] == "WAV2VEC2_BASE" and named.config()["checkpoint"] is None
    bare = SSLFeatures(encoder="WAV2VEC2_BASE", checkpoint=str(weights), layers=[1, 12])
    assert torch.equal(bare(wave), named(wave)) and bare.digest == named.digest


def test_float16_features_stay_float16_in_the_cache(tmp_path, tiny_checkpoint):
    extractor = SSLFeatures(encoder=None, checkpoint=str(tiny_checkpoint))
    cache = FeatureCache(tmp_path, extractor.config())
    features = extractor(torch.randn(16000))
    cache.put("ab" * 32, features)
    stored = cache.get("ab" * 32)
    assert stored.dtype == torch.float16 and torch.equal(stored, features)


def test_cache_key_follows_encoder_digest_and_layers(tmp_path):
    first = SSLFeatures(encoder=None, checkpoint=str(save_tiny_encoder(tmp_path / "a.pth")))
    other = SSLFeatures(encoder=None, checkpoint=str(save_tiny_encoder(tmp_path / "b.pth", seed=1)))
    one_layer = SSLFeatures(encoder=None, checkpoint=str(tmp_path / "a.pth"), layers=[1])
    folders = {FeatureCache(tmp_path / "cache", e.config()).folder
               for e in (first, other, one_layer)}
    assert len(folders) == 3


def test_ssl_attn_mixes_layers_with_softmax_weights_and_ignores_padding():
    torch.manual_seed(0)
    model = SslAttn(in_channels=3, n_features=8, n_emotions=4, projection_dim=8,
                    attention_dim=4, head_hidden=8).eval()
    assert torch.allclose(model.layer_weights(), torch.full((3,), 1 / 3))
    features = torch.randn(2, 3, 8, 12)
    features[1, ..., 7:] = 0
    batch = model(features, torch.tensor([12, 7]))
    alone = model(features[1:, ..., :7], torch.tensor([7]))
    assert torch.allclose(batch["emotion"][1], alone["emotion"][0], atol=1e-6)
    assert batch["embedding"].shape == (2, 8)


@pytest.mark.slow
def test_train_register_and_infer_with_a_tiny_checkpoint(tmp_path, tiny_checkpoint):
    """`train.py feature=ssl feature.checkpoint=<tiny> model=ssl_attn`, then infer.py."""
    args = ["feature=ssl", f"feature.checkpoint={tiny_checkpoint}", "model=ssl_attn",
            "data.reader.n_speakers=4", "data.reader.utterances_per_class=4",
            "trainer=debug", "trainer.enable_progress_bar=false", "model.net.projection_dim=16",
            "model.net.attention_dim=8", "model.net.head_hidden=8"]
    result = run_script("train.py", args, tmp_path, TORCH_HOME=str(tmp_path / "no_torch_hub"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    client = MlflowClient(tracking_uri=store_uri(tmp_path))
    [run] = client.search_runs([client.get_experiment_by_name("ser-pipeline").experiment_id])
    assert run.info.status == "FINISHED" and "test/uar" in run.data.metrics
    version = client.get_model_version_by_alias("ser-synthetic-ssl_attn", "champion")
    assert version.run_id == run.info.run_id

    model_dir = next((tmp_path / "outputs").rglob("model/model.yaml")).parent
    spec = read_spec(model_dir)
    assert spec.architecture == "SslAttn"
    assert spec.features["checkpoint"] == str(tiny_checkpoint.resolve())
    assert spec.features["builder"] == "wav2vec2_model" and len(spec.features["digest"]) == 64
    # the frozen encoder is referenced, not copied: the model holds only the head
    assert (model_dir / "weights.safetensors").stat().st_size < 100_000
    cached = list((tmp_path / ".cache" / "features").rglob("*.safetensors"))
    assert len(cached) == 64  # every utterance went through the cache once

    wavs = sorted((tmp_path / "data" / "synthetic" / "wav").rglob("*.wav"))[:2]
    predicted = run_script("infer.py", ["--model", str(model_dir), "--json", *map(str, wavs)],
                           tmp_path, TORCH_HOME=str(tmp_path / "no_torch_hub"))
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    records = [json.loads(line) for line in predicted.stdout.splitlines()]
    assert len(records) == 2 and all(r["emotion"] in spec.classes for r in records)
    own = Predictor.from_dir(model_dir).predict_file(wavs[0])
    assert own["emotion"] == records[0]["emotion"]
    mlflow.set_tracking_uri(store_uri(tmp_path))  # the registered pyfunc runs the same encoder
    served = mlflow.pyfunc.load_model(f"models:/ser-synthetic-ssl_attn/{version.version}")
    frame = served.predict(pd.DataFrame({"path": [str(wavs[0])], "audio_base64": [""]}))
    assert frame.loc[0, "emotion"] == own["emotion"]
    for name, score in own["scores"].items():
        assert frame.loc[0, f"score_{name}"] == pytest.approx(score, abs=1e-6)


def test_a_model_refuses_an_encoder_checkpoint_that_changed(tmp_path):
    from ser_pipeline.artifact import save_model_dir
    from ser_pipeline.features.batching import FeatureStats

    extractor = SSLFeatures(encoder=None, checkpoint=str(save_tiny_encoder(tmp_path / "e.pth")))
    kwargs = {"in_channels": 2, "n_features": 32, "n_emotions": 2, "projection_dim": 8,
              "attention_dim": 4, "head_hidden": 4}
    stats = FeatureStats(torch.zeros(2, 32, 1), torch.ones(2, 32, 1))
    model_dir = save_model_dir(tmp_path / "model", SslAttn(**kwargs), kwargs, {
        "features": extractor.config(), "classes": ["a", "b"], "genders": ["female", "male"],
        "dimensions": ["valence", "arousal", "dominance"], "has_gender": False,
        "has_dimensions": False}, stats)
    assert Predictor.from_dir(model_dir).predict_waveform(torch.randn(4000))["emotion"] in "ab"
    save_tiny_encoder(tmp_path / "e.pth", seed=1)
    with pytest.raises(UnsafeArtifactError, match="sha256"):
        Predictor.from_dir(model_dir)
    (tmp_path / "e.pth").unlink()
    with pytest.raises(UnsafeArtifactError, match="e.pth: no such file"):
        Predictor.from_dir(model_dir)


def test_ssl_attn_fusion_appends_functionals_of_the_layer_mix():
    torch.manual_seed(0)
    model = SslAttn(in_channels=3, n_features=8, n_emotions=4, projection_dim=8,
                    attention_dim=4, head_hidden=8, fusion_dim=4).eval()
    features = torch.randn(2, 3, 8, 12)
    features[1, ..., 7:] = 0
    batch = model(features, torch.tensor([12, 7]))
    alone = model(features[1:, ..., :7], torch.tensor([7]))
    assert torch.allclose(batch["emotion"][1], alone["emotion"][0], atol=1e-5)


def test_trim_db_cuts_the_silence_around_speech_before_the_encoder(tiny_checkpoint):
    from ser_pipeline.audio import trim_silence

    trimmed = SSLFeatures(encoder=None, checkpoint=str(tiny_checkpoint), trim_db=40.0)
    wave = torch.cat([torch.zeros(8000), 0.1 * torch.randn(8000), torch.zeros(8000)])
    assert trimmed.config()["trim_db"] == 40.0
    assert trimmed(wave).shape[-1] == trimmed.frames_for(len(trim_silence(wave, 16000, 40.0)))
    assert trimmed(wave).shape[-1] < trimmed.frames_for(len(wave))


# -- fine-tuning (feature.finetune): the network runs the encoder --------------------------

def tiny_net(extractor: SSLFeatures) -> SslAttn:
    """A small ``SslAttn`` that runs ``extractor``'s encoder, from its pretrained weights."""
    net = SslAttn(in_channels=1, n_features=1, n_emotions=4, projection_dim=8, attention_dim=4,
                  head_hidden=8, **extractor.network_kwargs())
    net.encoder.load_pretrained(extractor.pretrained_encoder)
    return net


#: the encoder's parts, by the prefix of their parameter names in ``Wav2Vec2Model``
ENCODER_PARTS = {"cnn": "feature_extractor.", "projection": "encoder.feature_projection.",
                 "positional": "encoder.transformer.pos_conv_embed.",
                 "layer 1": "encoder.transformer.layers.0.",
                 "layer 2": "encoder.transformer.layers.1.",
                 # before the layers (tiny and base models), else after them (unused here)
                 "transformer norm": "encoder.transformer.layer_norm."}


def trained_parts(net: SslAttn) -> set[str]:
    """Encoder parts that got a gradient from one backward pass of a training batch."""
    net.train()
    waves = torch.randn(2, 1, 1, 8000)
    net(waves, torch.tensor([8000, 5000]))["emotion"].sum().backward()
    return {part for name, p in net.encoder.model.named_parameters() if p.grad is not None
            for part, prefix in ENCODER_PARTS.items() if name.startswith(prefix)}


def test_finetuning_features_are_the_waveform_and_record_the_pretrained_encoder(tmp_path):
    path = save_tiny_encoder(tmp_path / "enc.pth")
    extractor = SSLFeatures(encoder=None, checkpoint=str(path), finetune=True)
    wave = torch.randn(16000)
    assert torch.equal(extractor(wave), wave.reshape(1, 1, -1))
    assert (extractor.out_channels, extractor.n_features, extractor.hop_length) == (1, 1, 1)
    assert extractor(torch.randn(50)).shape == (1, 1, 400)  # padded to one encoder frame
    config = extractor.config()
    assert config["name"] == "waveform"
    assert config["pretrained"] == {"encoder": None, "checkpoint": str(path.resolve()),
                                    "builder": "wav2vec2_model", "digest": extractor.digest}
    path.unlink()  # a fine-tuned model carries its encoder: the waveform stage needs no file
    assert torch.equal(build_features(config)(wave), extractor(wave))


def test_finetune_is_true_or_a_number_of_layers_that_run(tiny_checkpoint):
    for finetune, layers in ((3, None), (2, [1]), ("yes", None)):
        with pytest.raises(ValueError, match="feature.finetune"):
            SSLFeatures(encoder=None, checkpoint=str(tiny_checkpoint), finetune=finetune,
                        layers=layers)


@pytest.mark.parametrize("builder", ["wav2vec2_model", "wavlm_model"])
def test_the_networks_encoder_starts_as_the_frozen_one_and_ignores_padding(tmp_path, builder):
    path = save_tiny_encoder(tmp_path / "enc.pth", builder)
    frozen = SSLFeatures(encoder=None, checkpoint=str(path))
    net = tiny_net(SSLFeatures(encoder=None, checkpoint=str(path), finetune=True)).eval()
    waves = torch.randn(2, 16000)
    waves[1, 9000:] = 0
    hidden, frames = net.encoder(waves, torch.tensor([16000, 9000]))
    assert frames.tolist() == [frozen.frames_for(16000), frozen.frames_for(9000)]
    alone = frozen(waves[1, :9000]).float()
    assert torch.allclose(hidden[1, ..., : frames[1]], alone, atol=2e-3)  # float16 cache
    assert torch.allclose(hidden[0], frozen(waves[0]).float(), atol=2e-3)
    batch = net(waves.reshape(2, 1, 1, -1), torch.tensor([16000, 9000]))
    single = net(waves[1:, :9000].reshape(1, 1, 1, -1), torch.tensor([9000]))
    assert torch.allclose(batch["emotion"][1], single["emotion"][0], atol=1e-5)


@pytest.mark.parametrize("builder", ["wav2vec2_model", "wavlm_model"])
def test_finetune_true_trains_everything_above_the_convolutions(tmp_path, builder):
    path = save_tiny_encoder(tmp_path / "enc.pth", builder)
    net = tiny_net(SSLFeatures(encoder=None, checkpoint=str(path), finetune=True))
    assert trained_parts(net) == {"projection", "positional", "transformer norm", "layer 1",
                                  "layer 2"}
    assert not any(p.requires_grad for p in net.encoder.model.feature_extractor.parameters())


def test_finetune_n_trains_only_the_top_n_layers(tiny_checkpoint):
    net = tiny_net(SSLFeatures(encoder=None, checkpoint=str(tiny_checkpoint), finetune=1))
    assert trained_parts(net) == {"layer 2"}
    assert net.encoder.model.encoder.transformer.layers[0].training is False  # no dropout


def test_finetune_cnn_trains_the_convolutional_feature_extractor_too(tiny_checkpoint):
    net = tiny_net(SSLFeatures(encoder=None, checkpoint=str(tiny_checkpoint), finetune=True,
                               finetune_cnn=True))
    assert "cnn" in trained_parts(net)


def test_gradient_checkpointing_gives_the_same_gradients(tiny_checkpoint):
    grads = []
    for checkpointing in (True, False):
        torch.manual_seed(0)
        net = tiny_net(SSLFeatures(encoder=None, checkpoint=str(tiny_checkpoint), finetune=True,
                                   gradient_checkpointing=checkpointing)).train()
        torch.manual_seed(1)
        net(torch.randn(2, 1, 1, 8000), torch.tensor([8000, 6000]))["emotion"].sum().backward()
        grads.append({n: p.grad for n, p in net.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    assert all(torch.allclose(grads[0][n], grads[1][n], atol=1e-6) for n in grads[0])


def test_the_encoder_trains_at_its_own_learning_rate(tiny_checkpoint):
    from functools import partial

    from ser_pipeline.module import SERModule

    net = tiny_net(SSLFeatures(encoder=None, checkpoint=str(tiny_checkpoint), finetune=1))
    module = SERModule(net, partial(torch.optim.AdamW, lr=1e-3), ["a", "b", "c", "d"],
                       encoder_lr=1e-5)
    groups = module.configure_optimizers().param_groups
    assert [group["lr"] for group in groups] == [1e-3, 1e-5]
    top_layer = set(net.encoder.model.encoder.transformer.layers[1].parameters())
    assert set(groups[1]["params"]) == top_layer
    assert all(p.requires_grad for group in groups for p in group["params"])


def test_optimizer_steps_with_finetune_one_change_only_the_top_layer(tiny_checkpoint):
    from functools import partial

    from ser_pipeline.module import SERModule

    net = tiny_net(SSLFeatures(encoder=None, checkpoint=str(tiny_checkpoint), finetune=1))
    optimizer = SERModule(net, partial(torch.optim.AdamW, lr=1e-3), ["a", "b", "c", "d"],
                          encoder_lr=1e-5).configure_optimizers()
    before = {k: v.clone() for k, v in net.encoder.model.state_dict().items()}
    net.train()
    for _ in range(2):
        optimizer.zero_grad()
        logits = net(torch.randn(2, 1, 1, 8000), torch.tensor([8000, 5000]))["emotion"]
        torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1])).backward()
        optimizer.step()
    after = net.encoder.model.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed and all(k.startswith(ENCODER_PARTS["layer 2"]) for k in changed)


def test_finetuning_needs_a_model_that_runs_the_encoder(tmp_path, tiny_checkpoint):
    result = run_script("train.py", [
        "feature=ssl", f"feature.checkpoint={tiny_checkpoint}", "feature.finetune=true",
        "model=cnn_blstm_attn", "data.reader.n_speakers=4", "data.reader.utterances_per_class=2",
        "logger=none"], tmp_path, TORCH_HOME=str(tmp_path / "no_torch_hub"))
    assert result.returncode != 0 and "model=ssl_attn" in result.stderr


def encoder_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    prefix = "encoder.model."
    return {k.removeprefix(prefix): v for k, v in load_file(model_dir / "weights.safetensors")
            .items() if k.startswith(prefix)}


def finetune_run(tmp_path: Path, checkpoint: Path, finetune: str) -> Path:
    """``train.py feature=ssl feature.finetune=<finetune> model=ssl_attn``: its model dir."""
    args = ["feature=ssl", f"feature.checkpoint={checkpoint}", f"feature.finetune={finetune}",
            "model=ssl_attn", "data.reader.n_speakers=4", "data.reader.utterances_per_class=4",
            "trainer=debug", "trainer.enable_progress_bar=false", "model.net.projection_dim=16",
            "model.net.attention_dim=8", "model.net.head_hidden=8"]
    result = run_script("train.py", args, tmp_path, TORCH_HOME=str(tmp_path / "no_torch_hub"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return next((tmp_path / "outputs").rglob("model/model.yaml")).parent


@pytest.mark.slow
def test_finetuned_encoder_is_stored_with_the_net_and_infer_py_runs_it(tmp_path):
    checkpoint = save_tiny_encoder(tmp_path / "tiny_w2v2.pth")
    pretrained = torch.load(checkpoint, weights_only=True)["state_dict"]
    model_dir = finetune_run(tmp_path, checkpoint, "true")
    spec = read_spec(model_dir)
    assert spec.features["name"] == "waveform"
    assert spec.features["pretrained"]["digest"] == SSLFeatures(
        encoder=None, checkpoint=str(checkpoint)).digest
    assert spec.kwargs["encoder"]["finetune"] is True
    tuned = encoder_weights(model_dir)
    assert tuned.keys() == pretrained.keys()  # the whole encoder, in safetensors
    changed = {k for k in tuned if not torch.equal(tuned[k], pretrained[k])}
    assert any(k.startswith("encoder.transformer.layers.0.") for k in changed)
    assert any(k.startswith("encoder.feature_projection.") for k in changed)
    assert not any(k.startswith("feature_extractor.") for k in changed)  # the CNN is frozen

    checkpoint.unlink()  # inference needs only the model directory
    wav = sorted((tmp_path / "data" / "synthetic" / "wav").rglob("*.wav"))[0]
    predicted = run_script("infer.py", ["--model", str(model_dir), "--json", str(wav)],
                           tmp_path, TORCH_HOME=str(tmp_path / "no_torch_hub"))
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    [record] = [json.loads(line) for line in predicted.stdout.splitlines()]
    own = Predictor.from_dir(model_dir).predict_file(wav)
    assert record["emotion"] == own["emotion"]
    for name, score in own["scores"].items():
        assert record["scores"][name] == pytest.approx(score, abs=1e-6)
    mlflow.set_tracking_uri(store_uri(tmp_path))
    served = mlflow.pyfunc.load_model("models:/ser-synthetic-ssl_attn/1")
    frame = served.predict(pd.DataFrame({"path": [str(wav)], "audio_base64": [""]}))
    for name, score in own["scores"].items():
        assert frame.loc[0, f"score_{name}"] == pytest.approx(score, abs=1e-6)


@pytest.mark.parametrize("case", ["cnn_blstm_attn", "cnn_attn_multitask", "blstm_local_attn"])
def test_the_other_models_take_encoder_layers_as_input_channels(tiny_checkpoint, case):
    # (layers, encoder dim, frames): the layers are channels, as log-mel deltas are
    from ser_pipeline.models import MODELS
    from tests.test_models import CASES

    extractor = SSLFeatures(encoder=None, checkpoint=str(tiny_checkpoint))
    features = [extractor(torch.randn(n)).float() for n in (16000, 9600)]
    lengths = torch.tensor([f.shape[-1] for f in features])
    batch = torch.zeros(2, extractor.out_channels, extractor.n_features, int(lengths.max()))
    for i, f in enumerate(features):
        batch[i, ..., : f.shape[-1]] = f
    name, kwargs, _ = CASES[case]
    model = MODELS[name](n_emotions=4, **{**kwargs, "in_channels": extractor.out_channels,
                                          "n_features": extractor.n_features}).eval()
    outputs = model(batch, lengths)
    assert outputs["emotion"].shape[0] == 2 and torch.isfinite(outputs["emotion"]).all()
