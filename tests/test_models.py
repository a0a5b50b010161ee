"""Specification of the models: output contract, padding invariance, gradients, weights loading."""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from ser_pipeline.models import MODELS, EmotionHeads
from ser_pipeline.models.dcnn_blstm_attn import DcnnBlstmAttn, count_segments
from ser_pipeline.models.layers import BLSTM, reverse_gradient

N_EMOTIONS = 5

#: tiny hyperparameters per case: (registry name, constructor kwargs, first layer's weight)
CASES = {
    "cnn_blstm_attn": (
        "cnn_blstm_attn",
        dict(
            in_channels=1,
            n_features=16,
            conv_channels=[4, 8],
            lstm_hidden=8,
            attention_dim=8,
            head_hidden=8,
        ),
        "conv_blocks.0.conv.weight",
    ),
    "cnn_attn_multitask": (
        "cnn_attn_multitask",
        dict(
            in_channels=1,
            n_features=16,
            conv_channels=[4, 4, 8, 8],
            attention_dim=8,
            attention_heads=2,
            embedding_dim=16,
            head_hidden=8,
        ),
        "conv_blocks.0.conv.weight",
    ),
    "dcnn_resnet": (
        "dcnn_blstm_attn",
        dict(
            in_channels=3,
            n_features=16,
            segment_frames=16,
            segment_hop=8,
            backbone_channels=[4, 8],
            backbone_blocks=[1, 1],
            lstm_hidden=8,
            attention_dim=8,
            fc_dims=[16],
            head_hidden=8,
        ),
        "backbone.conv1.weight",
    ),
    "dcnn_alexnet": (
        "dcnn_blstm_attn",
        dict(
            in_channels=3,
            n_features=16,
            segment_frames=16,
            segment_hop=8,
            backbone="alexnet",
            backbone_channels=[4, 8, 8, 8, 8],
            lstm_hidden=8,
            attention_dim=8,
            fc_dims=[16],
            head_hidden=8,
        ),
        "backbone.features.0.weight",
    ),
    "blstm_local_attn": (
        "blstm_local_attn",
        dict(in_channels=1, n_features=34, frame_dims=[16], lstm_hidden=8, head_hidden=8),
        "frame_layers.0.weight",
    ),
}


def make_model(case: str, **overrides: object) -> torch.nn.Module:
    """A seeded tiny model whose batch-norm running statistics are no longer the identity."""
    name, kwargs, _ = CASES[case]
    torch.manual_seed(0)
    model = MODELS[name](n_emotions=N_EMOTIONS, **{**kwargs, **overrides})
    model.train()
    with torch.no_grad():
        model(*make_batch(model_input_shape(case), [40, 30, 25]))
    return model.eval()


def model_input_shape(case: str) -> tuple[int, int]:
    kwargs = CASES[case][1]
    return kwargs["in_channels"], kwargs["n_features"]


def make_batch(
    shape: tuple[int, int], lengths: list[int], width: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random features ``(batch, channels, n_features, width)``, zero beyond each length."""
    channels, n_features = shape
    width = width or max(lengths)
    features = torch.randn(len(lengths), channels, n_features, width)
    for i, length in enumerate(lengths):
        features[i, ..., length:] = 0.0
    return features, torch.tensor(lengths)


@pytest.mark.parametrize("case", CASES)
def test_padded_batch_outputs_equal_outputs_alone(case: str) -> None:
    model = make_model(case, n_domains=2)
    lengths = [37, 9, 53, 20]
    features, lengths_t = make_batch(model_input_shape(case), lengths, width=61)
    with torch.no_grad():
        batched = model(features, lengths_t)
        for i, length in enumerate(lengths):
            alone = model(features[i : i + 1, ..., :length], lengths_t[i : i + 1])
            for key, value in alone.items():
                torch.testing.assert_close(batched[key][i : i + 1], value, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("case", CASES)
def test_heads_have_contract_shapes_without_domain_head(case: str) -> None:
    model = make_model(case, n_genders=2, n_dims=3)
    with torch.no_grad():
        out = model(*make_batch(model_input_shape(case), [30, 22]))
    assert set(out) == {"emotion", "gender", "vad", "embedding"}
    assert out["emotion"].shape == (2, N_EMOTIONS)
    assert out["gender"].shape == (2, 2)
    assert out["vad"].shape == (2, 3)
    assert out["embedding"].shape == (2, model.embedding_dim)


@pytest.mark.parametrize("case", CASES)
def test_domain_head_present_when_domains_given(case: str) -> None:
    model = make_model(case, n_domains=4, domain_adversarial=True)
    with torch.no_grad():
        out = model(*make_batch(model_input_shape(case), [30, 22]))
    assert out["domain"].shape == (2, 4)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("head", ["emotion", "gender", "vad", "domain"])
def test_gradients_reach_first_layer_from_every_head(case: str, head: str) -> None:
    model = make_model(case, n_domains=3, domain_adversarial=True).train()
    out = model(*make_batch(model_input_shape(case), [30, 22, 26]))
    out[head].pow(2).sum().backward()
    first = dict(model.named_parameters())[CASES[case][2]]
    assert first.grad is not None
    assert torch.isfinite(first.grad).all()
    assert first.grad.abs().sum() > 0


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("length", [20, 3, 1])
def test_batch_of_one_very_short_input_works(case: str, length: int) -> None:
    model = make_model(case)
    features, lengths = make_batch(model_input_shape(case), [length])
    with torch.no_grad():
        out = model(features, lengths)
    assert out["emotion"].shape == (1, N_EMOTIONS)
    assert all(torch.isfinite(value).all() for value in out.values())


@pytest.mark.parametrize("case", CASES)
def test_batch_of_one_short_input_trains(case: str) -> None:
    model = make_model(case).train()
    out = model(*make_batch(model_input_shape(case), [20]))
    out["emotion"].sum().backward()
    assert torch.isfinite(out["emotion"]).all()


@pytest.mark.parametrize("case", CASES)
def test_eval_mode_is_deterministic(case: str) -> None:
    model = make_model(case)
    batch = make_batch(model_input_shape(case), [30, 17])
    with torch.no_grad():
        first, second = model(*batch), model(*batch)
    for key in first:
        assert torch.equal(first[key], second[key])


def test_registry_names_the_five_models() -> None:
    assert set(MODELS) == {
        "cnn_blstm_attn",
        "cnn_attn_multitask",
        "dcnn_blstm_attn",
        "blstm_local_attn",
        "ssl_attn",
    }


def test_blstm_matches_packed_bidirectional_lstm() -> None:
    torch.manual_seed(0)
    ours = BLSTM(input_size=5, hidden_size=4, num_layers=2).eval()
    reference = torch.nn.LSTM(5, 4, num_layers=2, batch_first=True, bidirectional=True)
    with torch.no_grad():
        for layer in range(2):
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                getattr(reference, f"{name}_l{layer}").copy_(
                    getattr(ours.forward_layers[layer], f"{name}_l0")
                )
                getattr(reference, f"{name}_l{layer}_reverse").copy_(
                    getattr(ours.backward_layers[layer], f"{name}_l0")
                )
    x, lengths = torch.randn(3, 9, 5), torch.tensor([9, 4, 1])
    packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    expected, _ = pad_packed_sequence(reference(packed)[0], batch_first=True, total_length=9)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, lengths), expected, atol=1e-5, rtol=1e-5)


def test_gradient_reversal_is_identity_forward_and_flips_gradient_sign() -> None:
    x = torch.randn(4, 3, requires_grad=True)
    y = reverse_gradient(x, scale=0.5)
    assert torch.equal(y, x)
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, -0.5))


def test_adversarial_domain_head_reverses_gradient_into_embedding() -> None:
    torch.manual_seed(0)
    plain = EmotionHeads(6, N_EMOTIONS, n_domains=2, dropout=0.0)
    adversarial = EmotionHeads(6, N_EMOTIONS, n_domains=2, domain_adversarial=True, dropout=0.0)
    adversarial.load_state_dict(plain.state_dict())
    embedding = torch.randn(3, 6)
    grads = []
    for heads in (plain, adversarial):
        leaf = embedding.clone().requires_grad_(True)
        heads(leaf)["domain"].sum().backward()
        grads.append(leaf.grad)
    torch.testing.assert_close(grads[1], -grads[0])


# --- DCNN-BLSTMwA: segmentation and pretrained backbone weights ---------------------


def test_segment_count_follows_length_and_hop() -> None:
    lengths = torch.tensor([1, 16, 17, 24, 25, 40])
    counts = count_segments(lengths, segment_frames=16, segment_hop=8)
    assert counts.tolist() == [1, 1, 2, 2, 3, 4]


def test_dcnn_backbone_sees_only_segments_inside_each_utterance() -> None:
    model = make_model("dcnn_resnet")
    seen: list[int] = []
    model.backbone.register_forward_hook(lambda _m, args, _out: seen.append(args[0].shape[0]))
    lengths = [40, 9, 25]
    with torch.no_grad():
        model(*make_batch(model_input_shape("dcnn_resnet"), lengths, width=48))
    assert seen == [4 + 1 + 3]


def _dcnn(**overrides: object) -> DcnnBlstmAttn:
    kwargs = {**CASES["dcnn_resnet"][1], **overrides}
    return DcnnBlstmAttn(n_emotions=N_EMOTIONS, **kwargs)


def test_dcnn_loads_backbone_weights_from_safetensors(tmp_path: Path) -> None:
    torch.manual_seed(1)
    source = _dcnn()
    path = tmp_path / "backbone.safetensors"
    save_file(source.backbone.state_dict(), str(path))
    torch.manual_seed(2)
    loaded = _dcnn(pretrained_weights=str(path))
    for key, value in source.backbone.state_dict().items():
        assert torch.equal(loaded.backbone.state_dict()[key], value), key


def test_dcnn_loads_backbone_weights_from_plain_torch_state_dict(tmp_path: Path) -> None:
    torch.manual_seed(1)
    source = _dcnn()
    path = tmp_path / "backbone.pt"
    torch.save(source.backbone.state_dict(), path)
    loaded = _dcnn(pretrained_weights=str(path))
    assert torch.equal(loaded.backbone.conv1.weight, source.backbone.conv1.weight)


def test_dcnn_refuses_backbone_weights_of_another_architecture(tmp_path: Path) -> None:
    path = tmp_path / "wider.safetensors"
    save_file(_dcnn(backbone_channels=[8, 8]).backbone.state_dict(), str(path))
    with pytest.raises(ValueError, match="do not match"):
        _dcnn(pretrained_weights=str(path))


def test_dcnn_missing_weights_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such file"):
        _dcnn(pretrained_weights=str(tmp_path / "absent.safetensors"))


class _Exploit:
    """Pickles as a call to os.system that creates a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def test_dcnn_refuses_malicious_pickle_without_running_it(tmp_path: Path) -> None:
    control_marker, marker = tmp_path / "control_ran", tmp_path / "exploit_ran"
    torch.save({"conv1.weight": _Exploit(control_marker)}, tmp_path / "control.pt")
    torch.load(tmp_path / "control.pt", weights_only=False)  # proves the file is live
    assert control_marker.exists()

    path = tmp_path / "backbone.pt"
    torch.save({"conv1.weight": _Exploit(marker)}, path)
    with pytest.raises(ValueError, match="refusing"):
        _dcnn(pretrained_weights=str(path))
    assert not marker.exists()


def test_dcnn_imagenet_without_torchvision_asks_for_a_local_file(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "torchvision", None)  # makes `import torchvision` fail
    monkeypatch.setitem(sys.modules, "torchvision.models", None)
    with pytest.raises(RuntimeError, match="torchvision.*local"):
        _dcnn(pretrained_weights="imagenet")
