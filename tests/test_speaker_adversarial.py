"""Speaker-adversarial training (``model.loss.weights.speaker``): labels, reversal, packaging."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
import torch
from safetensors.torch import load_file

from ser_pipeline.corpora import read_synthetic
from ser_pipeline.data import SERDataModule
from ser_pipeline.features import LogMelFeatures
from ser_pipeline.inference import Predictor
from ser_pipeline.losses import LossSettings
from ser_pipeline.models import CnnBlstmAttn
from ser_pipeline.module import SERModule
from tests.e2e import FAST, run_script, store_uri

CLASSES = ["anger", "happiness", "neutral", "sadness"]


def setup_data(root: Path) -> SERDataModule:
    data = SERDataModule(
        "synthetic", lambda r: read_synthetic(r, n_speakers=5, utterances_per_class=2),
        str(root), LogMelFeatures(n_mels=16), CLASSES, split="loso", fold=0, progress=False)
    data.setup()
    return data


def test_batches_index_the_training_speakers_and_mask_the_others(tmp_path):
    data = setup_data(tmp_path / "corpus")
    train_speakers = sorted(data.datasets["train"].rows["speaker"].astype(str).unique())
    assert [s for _, s in data.train_speakers] == train_speakers
    assert len(train_speakers) == 3  # 5 speakers: 1 test, 1 validation
    train = data.datasets["train"]
    for i in range(len(train)):
        index = int(train[i]["speaker"])
        assert data.train_speakers[index] == ("synthetic", str(train.rows.at[i, "speaker"]))
    for part in ("val", "test"):  # never a class of the adversary
        assert all(int(item["speaker"]) == -1 for item in data.datasets[part])
    batch = next(iter(data.train_dataloader()))
    assert batch["speaker"].shape == (len(batch["ids"]),) and (batch["speaker"] >= 0).all()


def small_module(n_speakers: int = 3, speaker_weight: float = 1.0) -> SERModule:
    torch.manual_seed(0)
    net = CnnBlstmAttn(in_channels=1, n_features=16, n_emotions=4, conv_channels=[4, 8],
                            lstm_hidden=8, lstm_layers=1, attention_dim=8, head_hidden=8)
    return SERModule(net, torch.optim.AdamW, CLASSES, n_speakers=n_speakers,
                     loss=LossSettings(weights={"emotion": 1.0, "speaker": speaker_weight}))


def fake_batch(n: int = 6) -> dict:
    torch.manual_seed(1)
    return {"features": torch.randn(n, 1, 16, 30), "lengths": torch.full((n,), 30),
            "emotion": torch.arange(n) % 4, "gender": torch.full((n,), -1),
            "vad": torch.full((n, 3), float("nan")), "domain": torch.zeros(n, dtype=torch.long),
            "speaker": torch.tensor([0, 1, 2, 0, -1, -1]), "ids": [str(i) for i in range(n)]}


def speaker_loss_gradients(module: SERModule, scale: float) -> tuple[dict, dict]:
    module.zero_grad()
    module.speaker_reversal.scale = scale
    batch = fake_batch()
    module.losses(module(batch["features"], batch["lengths"]), batch)["speaker"].backward()
    encoder = {n: p.grad.clone() for n, p in module.net.named_parameters()
               if not n.startswith("heads.") and p.grad is not None}
    head = {n: p.grad.clone() for n, p in module.speaker_head.named_parameters()}
    return encoder, head


def test_the_speaker_loss_trains_its_classifier_and_pushes_the_encoder_the_other_way():
    module = small_module()
    module.eval()  # no dropout: the two passes see the same network
    reversed_encoder, reversed_head = speaker_loss_gradients(module, 1.0)
    plain_encoder, plain_head = speaker_loss_gradients(module, -1.0)  # -1: no reversal
    assert reversed_encoder and reversed_encoder.keys() == plain_encoder.keys()
    assert any(g.abs().sum() > 0 for g in reversed_encoder.values())
    for name, grad in reversed_encoder.items():
        torch.testing.assert_close(grad, -plain_encoder[name])
    for name, grad in reversed_head.items():  # the classifier itself learns the speakers
        torch.testing.assert_close(grad, plain_head[name])


def test_the_speaker_loss_ignores_validation_and_test_speakers():
    module = small_module()
    module.eval()
    batch = fake_batch()
    outputs = module(batch["features"], batch["lengths"])
    full = module.losses(outputs, batch)["speaker"]
    labelled = batch["speaker"] >= 0
    only = module.speaker_head(outputs["embedding"][labelled])
    expected = torch.nn.functional.cross_entropy(only, batch["speaker"][labelled])
    torch.testing.assert_close(full, expected)


def test_it_is_off_by_default_and_where_there_is_no_second_speaker(caplog):
    assert small_module(speaker_weight=0.0).speaker_head is None
    lone = small_module(n_speakers=1)  # a recipe still runs on such a split, without it
    assert lone.speaker_head is None and lone.loss_weights["speaker"] == 0.0
    assert "speaker-adversarial training is off" in caplog.text
    with pytest.raises(ValueError, match="weighting=fixed"):
        LossSettings(weights={"speaker": 0.5}, weighting="uncertainty")


@pytest.mark.slow
def test_training_with_a_speaker_adversary_logs_its_loss_and_packages_only_the_net(tmp_path):
    out = tmp_path / "run"
    done = run_script("train.py", [*FAST, "model.loss.weights.speaker=0.5",
                                   f"hydra.run.dir={out}"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    client = mlflow.tracking.MlflowClient(store_uri(tmp_path))
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FINISHED"
    assert run.data.metrics["train/loss_speaker"] > 0
    assert run.data.params["model.loss.weights.speaker"] == "0.5"
    checkpoint = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu",
                            weights_only=True)
    assert any(k.startswith("speaker_head.") for k in checkpoint["state_dict"])  # resumable
    packaged = load_file(out / "model" / "weights.safetensors")
    assert not any("speaker" in k for k in packaged)
    predictor = Predictor.from_dir(out / "model")
    assert len(predictor.classes) == 4
