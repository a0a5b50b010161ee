"""DCNN-BLSTMwA (Zhang et al. 2021): an image CNN per log-mel segment, BLSTM, attention.

The 3-channel log-mel (static, delta, delta-delta) is cut into overlapping segments
of ``segment_frames`` frames every ``segment_hop`` frames, like image patches. An
image CNN (a small ResNet or an AlexNet-style net) embeds each segment; the segment
embeddings of an utterance form a sequence for a BLSTM with attention pooling.

The backbones mirror torchvision's module names (``conv1``, ``layer1.0.bn2``,
``features.3`` ...), so ImageNet weights (``pretrained_weights="imagenet"``, needs
torchvision and a network) or a state dict exported from torchvision load as is.
Local weight files are read without unpickling code: safetensors, or
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ser_pipeline.models.heads import EmotionHeads
from ser_pipeline.models.layers import BLSTM, fuse, fusion_branch, length_mask, mask_frames
from ser_pipeline.models.pooling import AttentionPooling

BACKBONES = ("resnet", "alexnet")
#: torchvision weight names whose architecture the backbone defaults can match
IMAGENET_WEIGHTS = {
    "resnet": "ResNet18_Weights.IMAGENET1K_V1",
    "alexnet": "AlexNet_Weights.IMAGENET1K_V1",
}
#: key prefixes of an ImageNet classifier's final layers, which the backbones do not have
_CLASSIFIER_PREFIXES = ("fc.", "classifier.")


def count_segments(lengths: torch.Tensor, segment_frames: int, segment_hop: int) -> torch.Tensor:
    """Segments covering each utterance: ``1 + ceil(max(length - segment_frames, 0) / hop)``.

    The last segment may run past the utterance end (zero-padded); an utterance
    shorter than one segment gives one zero-padded segment. ``lengths (batch,)`` ->
    ``(batch,)`` long.
    """
    overhang = (lengths - segment_frames).clamp(min=0)
    return 1 + torch.div(overhang + segment_hop - 1, segment_hop, rounding_mode="floor")


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convs with batch norm and a shortcut (torchvision names)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + shortcut)


class ResNetBackbone(nn.Module):
    """ResNet-style image CNN: ``(n, in_channels, H, W)`` -> ``(n, channels[-1])``.

    Stem (7x7 stride-2 conv, batch norm, ReLU, 3x3 stride-2 max-pool), one stage of
    ``blocks[i]`` basic blocks per entry of ``channels`` (stride 2 from the second
    stage), global average pooling. ``channels=[64, 128, 256, 512]``,
    ``blocks=[2, 2, 2, 2]`` is exactly torchvision's ResNet-18 without its ``fc``.
    """

    def __init__(
        self,
        in_channels: int = 3,
        channels: Sequence[int] = (32, 64, 128, 256),
        blocks: Sequence[int] = (1, 1, 1, 1),
    ) -> None:
        super().__init__()
        if len(channels) != len(blocks):
            raise ValueError(f"resnet: {len(channels)} stage widths but {len(blocks)} block counts")
        self.conv1 = nn.Conv2d(in_channels, channels[0], 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(channels[0])
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        width = channels[0]
        for stage, (out_channels, count) in enumerate(zip(channels, blocks, strict=True)):
            stride = 1 if stage == 0 else 2
            layers = [BasicBlock(width, out_channels, stride)]
            layers += [BasicBlock(out_channels, out_channels) for _ in range(count - 1)]
            self.add_module(f"layer{stage + 1}", nn.Sequential(*layers))
            width = out_channels
        self.n_stages = len(channels)
        self.output_dim = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
        for stage in range(self.n_stages):
            x = getattr(self, f"layer{stage + 1}")(x)
        return x.mean(dim=(2, 3))


class AlexNetBackbone(nn.Module):
    """AlexNet-style image CNN: ``(n, in_channels, H, W)`` -> ``(n, channels[-1])``.

    Five convs (11x11/4, 5x5, 3x3, 3x3, 3x3) with three 3x3/2 max-pools in
    torchvision's ``features`` layout, then global average pooling in place of the
    4096-wide classifier. Inputs smaller than 63x63 (the least the stride-4 conv and
    three poolings accept) are zero-padded at the bottom/right.
    """

    min_size = 63

    def __init__(
        self, in_channels: int = 3, channels: Sequence[int] = (64, 192, 384, 256, 256)
    ) -> None:
        super().__init__()
        if len(channels) != 5:
            raise ValueError(f"alexnet: needs 5 conv widths, got {list(channels)}")
        c1, c2, c3, c4, c5 = channels
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, kernel_size=11, stride=4, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(c1, c2, kernel_size=5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(c2, c3, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(c3, c4, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(c4, c5, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
        )
        self.output_dim = c5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad_h = max(self.min_size - x.shape[2], 0)
        pad_w = max(self.min_size - x.shape[3], 0)
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        return self.features(x).mean(dim=(2, 3))


def build_backbone(
    name: str,
    in_channels: int,
    channels: Sequence[int] | None = None,
    blocks: Sequence[int] = (1, 1, 1, 1),
) -> ResNetBackbone | AlexNetBackbone:
    """The segment CNN called ``name`` (``"resnet"`` or ``"alexnet"``); default widths if None."""
    if name == "resnet":
        return ResNetBackbone(in_channels, channels or (32, 64, 128, 256), blocks)
    if name == "alexnet":
        return AlexNetBackbone(in_channels, channels or (64, 192, 384, 256, 256))
    raise ValueError(f"unknown backbone '{name}' (known: {', '.join(BACKBONES)})")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from a ``.safetensors`` file or a torch state dict, never running pickled code.

    Torch files are read with ``weights_only=True``, which refuses any object other
    than tensors and plain containers. A checkpoint dict with a ``"state_dict"`` entry
    is unwrapped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained backbone weights: no such file '{path}'")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as error:
        raise ValueError(
            f"pretrained backbone weights: refusing to load '{path}': it is not a plain "
            f"tensor state dict (only safetensors or torch.save(state_dict) files are "
            f"accepted; arbitrary pickled objects are never loaded): {error}"
        ) from error
    if isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping) or not all(
        isinstance(value, torch.Tensor) for value in loaded.values()
    ):
        raise ValueError(f"pretrained backbone weights: '{path}' does not hold a state dict")
    return dict(loaded)


def imagenet_state_dict(backbone: str) -> dict[str, torch.Tensor]:
    """torchvision's ImageNet weights for ``backbone``; RuntimeError if they cannot be had."""
    hint = (
        "pass pretrained_weights=<local .safetensors or state-dict file> instead "
        "(e.g. a torchvision state dict saved on a machine with network access)"
    )
    try:
        from torchvision.models import get_weight
    except ImportError as error:
        raise RuntimeError(
            f"pretrained_weights='imagenet' needs torchvision, which is not installed: {hint}"
        ) from error
    try:
        return get_weight(IMAGENET_WEIGHTS[backbone]).get_state_dict(progress=False)
    except (OSError, RuntimeError, ValueError) as error:
        raise RuntimeError(
            f"could not fetch ImageNet weights {IMAGENET_WEIGHTS[backbone]} "
            f"(offline?): {error}; {hint}"
        ) from error


def load_backbone_weights(backbone: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Load ``state_dict`` into ``backbone``, raising ValueError on any key or shape mismatch.

    ``module.``/``backbone.`` key prefixes are stripped and an ImageNet classifier's
    ``fc.*``/``classifier.*`` entries are ignored (the backbones have no classifier).
    """
    cleaned: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        for prefix in ("module.", "backbone."):
            key = key.removeprefix(prefix)
        if not key.startswith(_CLASSIFIER_PREFIXES):
            cleaned[key] = value
    expected = backbone.state_dict()
    missing = sorted(set(expected) - set(cleaned))
    unexpected = sorted(set(cleaned) - set(expected))
    wrong_shape = [
        f"{key}: file {tuple(cleaned[key].shape)} vs model {tuple(expected[key].shape)}"
        for key in sorted(set(expected) & set(cleaned))
        if cleaned[key].shape != expected[key].shape
    ]
    if missing or unexpected or wrong_shape:
        raise ValueError(
            "pretrained backbone weights do not match the backbone architecture "
            "(check backbone, backbone_channels, backbone_blocks and in_channels): "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}, "
            f"wrong shape {wrong_shape[:5]}{'...' if len(wrong_shape) > 5 else ''}"
        )
    backbone.load_state_dict(cleaned, strict=True)


class DcnnBlstmAttn(nn.Module):
    """Segment CNN -> BLSTM over segments -> attention pooling -> FC layers -> task heads.

    Input ``features (batch, in_channels, n_features, frames)`` (3 channels: static,
    delta, delta-delta log-mel) and ``lengths (batch,)``. Only the segments inside
    each utterance (see :func:`count_segments`) reach the CNN and the BLSTM.
    ``pretrained_weights``: None, a local weights file, or ``"imagenet"``; it is read
    once at construction (rebuilding a trained model should pass None and load the
    full state dict instead).
    """

    def __init__(
        self,
        in_channels: int,
        n_features: int,
        n_emotions: int,
        n_genders: int = 2,
        n_dims: int = 3,
        n_domains: int = 0,
        domain_adversarial: bool = False,
        segment_frames: int = 64,
        segment_hop: int = 32,
        backbone: str = "resnet",
        backbone_channels: list[int] | None = None,
        backbone_blocks: list[int] | tuple[int, ...] = (1, 1, 1, 1),
        pretrained_weights: str | None = None,
        lstm_hidden: int = 128,
        lstm_layers: int = 1,
        lstm_dropout: float = 0.0,
        attention_dim: int = 128,
        fc_dims: list[int] | tuple[int, ...] = (256,),
        head_hidden: int = 128,
        dropout: float = 0.3,
        fusion_dim: int = 0,
        fusion_dropout: float | None = None,
        functionals_dim: int = 0,
    ) -> None:
        super().__init__()
        if segment_frames < 1 or not 1 <= segment_hop <= segment_frames:
            raise ValueError(
                f"need segment_frames >= 1 and 1 <= segment_hop <= segment_frames, "
                f"got {segment_frames}, {segment_hop}"
            )
        self.segment_frames, self.segment_hop = segment_frames, segment_hop
        self.backbone = build_backbone(backbone, in_channels, backbone_channels, backbone_blocks)
        if pretrained_weights == "imagenet":
            load_backbone_weights(self.backbone, imagenet_state_dict(backbone))
        elif pretrained_weights:
            load_backbone_weights(self.backbone, read_state_dict(pretrained_weights))
        self.blstm = BLSTM(self.backbone.output_dim, lstm_hidden, lstm_layers, lstm_dropout)
        self.attention = AttentionPooling(self.blstm.output_size, attention_dim)
        fc: list[nn.Module] = []
        width = self.attention.output_dim
        for fc_dim in fc_dims:
            fc += [nn.Dropout(dropout), nn.Linear(width, fc_dim), nn.ReLU()]
            width = fc_dim
        self.fc = nn.Sequential(*fc)
        self.embedding_dim = width
        self.fusion = fusion_branch(in_channels * n_features, fusion_dim, functionals_dim, dropout,
                                    fusion_dropout)
        self.heads = EmotionHeads(
            width + fusion_dim,
            n_emotions,
            n_genders,
            n_dims,
            n_domains,
            domain_adversarial,
            dropout,
            hidden_dim=head_hidden,
        )

    def segment(
        self, features: torch.Tensor, lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Cut ``(batch, C, F, frames)`` into ``(batch, n_max, C, F, segment_frames)``.

        Also returns the segment counts ``(batch,)``; segments past an utterance's
        count are all padding.
        """
        counts = count_segments(lengths, self.segment_frames, self.segment_hop)
        width = (int(counts.max()) - 1) * self.segment_hop + self.segment_frames
        x = mask_frames(features, lengths)  # the last segment's overhang must be zeros
        if x.shape[-1] < width:
            x = F.pad(x, (0, width - x.shape[-1]))
        segments = x[..., :width].unfold(-1, self.segment_frames, self.segment_hop)
        return segments.permute(0, 3, 1, 2, 4), counts

    def encode(self, features: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """``(batch, in_channels, n_features, frames)`` -> embedding ``(batch, embedding_dim)``."""
        segments, counts = self.segment(features, lengths)
        batch, n_max = segments.shape[:2]
        valid = length_mask(counts, n_max)
        embedded = self.backbone(segments[valid])  # (n_valid_segments, backbone_dim)
        sequence = embedded.new_zeros(batch, n_max, embedded.shape[-1])
        sequence[valid] = embedded
        hidden = self.blstm(sequence, counts)
        return self.fc(self.attention(hidden, valid))

    def forward(self, features: torch.Tensor, lengths: torch.Tensor,
                functionals: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """See :class:`EmotionHeads` for the returned keys and shapes."""
        return self.heads(fuse(self.encode(features, lengths), self.fusion, features, lengths,
                               functionals))
