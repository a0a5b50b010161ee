"""Hidden states of a pretrained self-supervised speech encoder (wav2vec 2.0, HuBERT, WavLM).

The encoder is torchaudio's own implementation, chosen either by bundle name
(``encoder="WAVLM_BASE"``: a :mod:`torchaudio.pipelines` bundle, weights taken from the torch
hub cache, never downloaded here) or by a local checkpoint file (``checkpoint=path``) that
holds its architecture beside the weights, so a full-size model and a tiny test model load
through the same code:

* ``torch.save({"builder": "wav2vec2_model" | "wavlm_model", "kwargs": {...},
  "state_dict": {...}, "normalize_waveform": False}, path)``: plain tensors and containers
  only, read back with ``torch.load(weights_only=True)``;
* ``path.safetensors`` with the architecture (``{"builder": ..., "kwargs": ...}``) in a
  ``path.json`` beside it;
* a bare state dict (either format) of a named bundle's architecture, with ``encoder=`` set.

Output: ``(channels=layers, n_features=encoder dim, frames)`` in float16 (half the cache size;
normalisation promotes it back to float32), one frame per ``hop_length`` samples (320 at
16 kHz for every torchaudio bundle: 50 frames per second). The extractor is frozen: the
encoder runs in eval mode without gradients, so its outputs can be cached.

``config()`` records the bundle name, the checkpoint path, the builder and the sha256 of the
weights; rebuilding from it (inference) refuses weights whose digest differs.

Fine-tuning (``finetune=True`` or a number of top layers): the encoder becomes part of the
network (``models.speech_encoder.SpeechEncoder`` inside ``model=ssl_attn``), so this stage
yields the waveform instead (:class:`WaveformFeatures`, cached like any feature), hands the
network its architecture (:meth:`SSLFeatures.network_kwargs`) and pretrained weights
(:attr:`SSLFeatures.pretrained_encoder`), and ``config()`` is the waveform stage's, with the
pretrained encoder's name, path, builder and digest recorded as provenance. A fine-tuned
model directory holds the whole encoder in its weights, so inference needs neither the
original file nor this class.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
import torchaudio
from torch import nn

from ser_pipeline.audio import trim_silence

log = logging.getLogger(__name__)

#: the torchaudio builders a checkpoint may name (nothing else is ever called)
BUILDERS = {
    "wav2vec2_model": torchaudio.models.wav2vec2_model,
    "wavlm_model": torchaudio.models.wavlm_model,
}
_BUNDLE_BUILDERS = {"Wav2Vec2": "wav2vec2_model", "WavLM": "wavlm_model"}
#: hidden states are stored in this dtype (cache size); see the module docstring
STORE_DTYPE = torch.float16


class EncoderWeightsMissing(ValueError):
    """A named bundle's weights are not in the torch hub cache (and are never downloaded)."""


class EncoderMismatch(ValueError):
    """Weights that are not the ones a model was trained with (digest or builder differs)."""


def hub_checkpoint_dir() -> Path:
    """Where torch hub (and so ``bundle.get_model()``) keeps downloaded weights."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def bundle_names() -> list[str]:
    """Every self-supervised encoder bundle in :mod:`torchaudio.pipelines`."""
    bundle_type = torchaudio.pipelines.Wav2Vec2Bundle
    return sorted(name for name in dir(torchaudio.pipelines)
                  if isinstance(getattr(torchaudio.pipelines, name), bundle_type))


def get_bundle(name: str) -> torchaudio.pipelines.Wav2Vec2Bundle:
    bundle = getattr(torchaudio.pipelines, name, None)
    if not isinstance(bundle, torchaudio.pipelines.Wav2Vec2Bundle):
        raise ValueError(f"feature.encoder={name!r} is not a torchaudio wav2vec2/HuBERT/WavLM "
                         f"bundle (known: {', '.join(bundle_names())})")
    return bundle


def bundle_weights_file(name: str) -> Path:
    """The file ``torchaudio.pipelines.<name>.get_model()`` downloads into the hub cache."""
    return hub_checkpoint_dir() / os.path.basename(get_bundle(name)._path)


def missing_weights_message(name: str) -> str:
    path = bundle_weights_file(name)
    return (
        f"the weights of torchaudio bundle {name} are not on this machine: expected "
        f"{path.name} in the torch hub cache folder {path.parent} (nothing is downloaded "
        f"during training or inference). On a machine with internet run "
        f"`python -c 'import torchaudio; torchaudio.pipelines.{name}.get_model()'`, "
        f"then copy ~/.cache/torch/hub/checkpoints/{path.name} into {path.parent} here "
        f"(or point TORCH_HOME at a folder holding hub/checkpoints/{path.name}), or give a "
        f"local file with feature.checkpoint=/path/model.pth")


_DIGESTS: dict[tuple[str, int, int], str] = {}


def weights_digest(*paths: Path) -> str:
    """sha256 over the bytes of ``paths`` (remembered per path, size and mtime)."""
    key = tuple((str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in paths)
    if key not in _DIGESTS:
        digest = hashlib.sha256()
        for path in paths:
            with open(path, "rb") as handle:
                for chunk in iter(lambda h=handle: h.read(1 << 22), b""):
                    digest.update(chunk)
        _DIGESTS[key] = digest.hexdigest()
    return _DIGESTS[key]


def _read_checkpoint(path: Path) -> tuple[dict[str, Any], list[Path]]:
    """The checkpoint's contents (architecture fields + ``state_dict``) and the files read."""
    if not path.is_file():  # a ValueError, so a model directory names it (UnsafeArtifactError)
        raise EncoderWeightsMissing(f"feature.checkpoint={path}: no such file (a model "
                                    "references its frozen encoder by path and sha256)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        files = [path]
        content: dict[str, Any] = {"state_dict": load_file(path)}
        sidecar = path.with_suffix(".json")
        if sidecar.is_file():
            content.update(json.loads(sidecar.read_text()))
            files.append(sidecar)
        return content, files
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # an unpickling refusal or a corrupt file: say which file
        raise ValueError(f"feature.checkpoint={path} is not a torch.save file of plain "
                         f"tensors and containers ({error})") from error
    if not isinstance(loaded, dict):
        raise ValueError(f"feature.checkpoint={path} must hold a dict, not {type(loaded).__name__}")
    if "state_dict" in loaded:
        return dict(loaded), [path]
    return {"state_dict": loaded}, [path]


class SSLFeatures(nn.Module):
    """Waveform ``(time,)`` or ``(batch, time)`` -> hidden states ``([batch,] layers, dim, frames)``.

    ``layers``: transformer layer numbers, 1 = the first layer's output (default: all).
    ``builder`` and ``digest`` are what :meth:`config` recorded; when given they must match
    the weights found, so a model never runs on an encoder it was not trained with.
    ``device``: where the encoder runs (``auto``: CUDA when available); outputs are on the CPU.
    ``trim_db``: cut leading/trailing silence more than this below the loudest frame first.
    ``finetune``: ``True`` (the whole encoder above its convolutions) or a number of top
    layers to train inside the network; the output is then the waveform (module docstring).
    ``finetune_cnn`` trains the convolutional feature extractor too; ``gradient_checkpointing``
    recomputes the trainable layers' activations in the backward pass (less memory, one more
    forward pass of those layers). Both are the network's settings, passed on by :meth:`network_kwargs`.
    """

    def __init__(
        self,
        encoder: str | None = "WAVLM_BASE",
        checkpoint: str | None = None,
        layers: list[int] | None = None,
        sample_rate: int = 16000,
        builder: str | None = None,
        digest: str | None = None,
        device: str = "auto",
        finetune: bool | int = False,
        trim_db: float | None = None,
        finetune_cnn: bool = False,
        gradient_checkpointing: bool = True,
    ) -> None:
        super().__init__()
        if encoder is None and checkpoint is None:
            raise ValueError("feature=ssl needs feature.encoder=<torchaudio bundle name> or "
                             "feature.checkpoint=/path/model.pth")
        self.sample_rate = int(sample_rate)
        self.trim_db = trim_db
        model, self.builder, self.encoder_name, files, architecture = self._load(encoder,
                                                                                 checkpoint)
        self.checkpoint = str(Path(checkpoint).resolve()) if checkpoint else None
        self.digest = weights_digest(*files)
        if digest is not None and digest != self.digest:
            raise EncoderMismatch(
                f"encoder weights {', '.join(map(str, files))} have sha256 {self.digest}, but "
                f"the model was trained with {digest}: put the original weights back")
        if builder is not None and builder != self.builder:
            raise EncoderMismatch(f"encoder builder {self.builder} differs from the recorded "
                                  f"{builder}")
        model.eval().requires_grad_(False)
        self.encoder = model
        n_layers = len(self._model.encoder.transformer.layers)
        self.layers = list(range(1, n_layers + 1)) if layers is None else [int(i) for i in layers]
        if not self.layers or not all(1 <= i <= n_layers for i in self.layers):
            raise ValueError(f"feature.layers must be layer numbers in 1..{n_layers}, "
                             f"not {layers}")
        self._dim = self._model.encoder.feature_projection.projection.out_features
        convs = [layer.conv for layer in self._model.feature_extractor.conv_layers]
        self._receptive_field, self._hop = 1, 1
        for conv in convs:  # receptive field and stride of the stacked 1-d convolutions
            self._receptive_field += (conv.kernel_size[0] - 1) * self._hop
            self._hop *= conv.stride[0]
        self.finetune = finetune or False  # 0 is frozen too
        if self.finetune is not False and self.finetune is not True and not (
                type(self.finetune) is int and 1 <= self.finetune <= max(self.layers)):
            raise ValueError(f"feature.finetune must be false, true (the whole encoder) or a "
                             f"number of top layers in 1..{max(self.layers)}, not {finetune!r}")
        self.waveform: WaveformFeatures | None = None
        if self.finetune:  # the network runs the encoder: this stage yields the waveform
            self._network = {**architecture, "layers": list(self.layers),
                             "finetune": self.finetune, "finetune_cnn": bool(finetune_cnn),
                             "gradient_checkpointing": bool(gradient_checkpointing)}
            self.waveform = WaveformFeatures(self.sample_rate, trim_db, self._receptive_field,
                                             pretrained=self._provenance())
            device = "cpu"  # the encoder here is only where the network's weights start from
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.encoder.to(device)
        self.device_name = device

    def _load(self, encoder: str | None, checkpoint: str | None
              ) -> tuple[nn.Module, str, str | None, list[Path], dict[str, Any]]:
        """(model, builder, bundle name or None, files the weights came from, architecture:
        ``{"builder", "kwargs", "normalize_waveform"}`` in plain values)."""
        bundle = get_bundle(encoder) if encoder else None
        if bundle is not None and int(bundle.sample_rate) != self.sample_rate:
            raise ValueError(f"{encoder} expects {int(bundle.sample_rate)} Hz audio, not "
                             f"feature.sample_rate={self.sample_rate}")
        if checkpoint is None:
            path = bundle_weights_file(encoder)
            if not path.is_file():  # checked before torchaudio could try to download it
                raise EncoderWeightsMissing(missing_weights_message(encoder))
            # the hub cache holds the file, so get_model reads it (unpickling refused)
            model = bundle.get_model(dl_kwargs={"weights_only": True, "progress": False})
            builder = _BUNDLE_BUILDERS[bundle._model_type]
            return model, builder, encoder, [path], _architecture(
                builder, bundle._params, bundle._normalize_waveform)
        content, files = _read_checkpoint(Path(checkpoint))
        if "builder" in content:  # the file carries its architecture: it wins over encoder=
            builder, kwargs = content["builder"], dict(content.get("kwargs") or {})
            normalize = bool(content.get("normalize_waveform", False))
            if bundle is not None:
                log.info("feature.checkpoint=%s holds its own architecture (%s); "
                         "feature.encoder=%s is not used", checkpoint, builder, encoder)
            encoder = None
        elif bundle is not None:
            builder, kwargs = _BUNDLE_BUILDERS[bundle._model_type], dict(bundle._params)
            normalize = bundle._normalize_waveform
        else:
            raise ValueError(f"feature.checkpoint={checkpoint} holds a bare state dict: name "
                             "its architecture with feature.encoder=<bundle name>, or save it "
                             "as {'builder': ..., 'kwargs': ..., 'state_dict': ...}")
        if builder not in BUILDERS:
            raise ValueError(f"feature.checkpoint={checkpoint}: builder {builder!r} is not one "
                             f"of {sorted(BUILDERS)}")
        model = BUILDERS[builder](**kwargs)
        try:
            model.load_state_dict(content["state_dict"])
        except RuntimeError as error:
            raise ValueError(f"feature.checkpoint={checkpoint}: the weights do not fit "
                             f"{builder}: {error}") from error
        if normalize:  # as torchaudio's large bundles do: layer norm over each waveform
            from torchaudio.pipelines._wav2vec2.utils import _extend_model

            model = _extend_model(model, normalize_waveform=True)
        return model, builder, encoder, files, _architecture(builder, kwargs, normalize)

    @property
    def _model(self) -> nn.Module:
        """The ``Wav2Vec2Model`` inside torchaudio's optional waveform-normalising wrapper."""
        return getattr(self.encoder, "model", self.encoder)

    @property
    def out_channels(self) -> int:
        return self.waveform.out_channels if self.waveform is not None else len(self.layers)

    @property
    def n_features(self) -> int:
        return self.waveform.n_features if self.waveform is not None else self._dim

    @property
    def hop_length(self) -> int:
        """Samples per output frame (the product of the convolution strides)."""
        return self.waveform.hop_length if self.waveform is not None else self._hop

    def frames_for(self, num_samples: int) -> int:
        """Frames produced for ``num_samples`` samples (clips are padded to one frame)."""
        if self.waveform is not None:
            return self.waveform.frames_for(num_samples)
        return (max(num_samples, self._receptive_field) - self._receptive_field) // self._hop + 1

    @property
    def pretrained_encoder(self) -> nn.Module | None:
        """Fine-tuning: the torchaudio ``Wav2Vec2Model`` the network's encoder starts from."""
        return self._model if self.finetune else None

    def network_kwargs(self) -> dict[str, Any]:
        """Fine-tuning: ``{"encoder": ...}`` for the network (``SslAttn``): architecture,
        layers and what trains, in plain values (they go into ``model.yaml``); else ``{}``."""
        return {"encoder": copy.deepcopy(self._network)} if self.finetune else {}

    def _provenance(self) -> dict[str, Any]:
        return {"encoder": self.encoder_name, "checkpoint": self.checkpoint,
                "builder": self.builder, "digest": self.digest}

    def config(self) -> dict[str, Any]:
        if self.waveform is not None:
            return self.waveform.config()
        return {
            "name": "ssl",
            "encoder": self.encoder_name,
            "checkpoint": self.checkpoint,
            "builder": self.builder,
            "digest": self.digest,
            "layers": list(self.layers),
            "sample_rate": self.sample_rate,
            "trim_db": self.trim_db,
        }

    def train(self, mode: bool = True) -> SSLFeatures:
        super().train(mode)
        self.encoder.eval()  # frozen: dropout and layer drop stay off
        return self

    @torch.no_grad()
    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        """``(time,)`` or ``(batch, time)`` -> ``([batch,] layers, dim, frames)`` float16.

        Items of a batch run one at a time: each one's output is what it gives alone (no
        padding reaches the attention; large bundles normalise each waveform on its own).
        Fine-tuning: :class:`WaveformFeatures` instead, ``([batch,] 1, 1, samples)``.
        """
        if self.waveform is not None:
            return self.waveform(waveform)
        if waveform.dim() == 1:
            return self._hidden_states(waveform)
        return torch.stack([self._hidden_states(item) for item in waveform])

    def _hidden_states(self, waveform: torch.Tensor) -> torch.Tensor:
        """``(time,)`` -> ``(layers, dim, frames)`` float16 on the CPU."""
        if self.trim_db is not None:
            waveform = trim_silence(waveform, self.sample_rate, self.trim_db)
        wave = waveform.float().reshape(1, -1)
        if wave.shape[-1] < self._receptive_field:  # shorter than one frame: pad to one
            wave = nn.functional.pad(wave, (0, self._receptive_field - wave.shape[-1]))
        hidden, _ = self.encoder.extract_features(wave.to(self.device_name),
                                                  num_layers=max(self.layers))
        stacked = torch.stack([hidden[i - 1][0] for i in self.layers])  # (layers, frames, dim)
        return stacked.transpose(-1, -2).to("cpu", STORE_DTYPE)


def _plain(value: Any) -> Any:
    """Tuples as lists, recursively: builder arguments as ``yaml.safe_dump`` writes them."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def _architecture(builder: str, kwargs: dict[str, Any], normalize: bool) -> dict[str, Any]:
    return {"builder": builder, "kwargs": _plain(dict(kwargs)),
            "normalize_waveform": bool(normalize)}


class WaveformFeatures(nn.Module):
    """Waveform ``(time,)`` -> ``(1, 1, samples)`` float32: the input of a network that runs
    the encoder itself (``feature.finetune``). ``([batch,] ...)`` for ``(batch, time)``.

    ``trim_db`` cuts leading/trailing silence as the frozen path does; clips shorter than
    ``min_samples`` (the encoder's receptive field, one frame) are zero-padded to it.
    ``pretrained`` records where the network's encoder started (bundle name, checkpoint
    path, builder, sha256): provenance only, nothing is loaded from it.
    """

    out_channels = 1
    n_features = 1
    hop_length = 1

    def __init__(self, sample_rate: int = 16000, trim_db: float | None = None,
                 min_samples: int = 400, pretrained: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.sample_rate, self.trim_db = int(sample_rate), trim_db
        self.min_samples = int(min_samples)
        self.pretrained = dict(pretrained or {})

    def frames_for(self, num_samples: int) -> int:
        return max(num_samples, self.min_samples)

    def config(self) -> dict[str, Any]:
        return {"name": "waveform", "sample_rate": self.sample_rate, "trim_db": self.trim_db,
                "min_samples": self.min_samples, "pretrained": dict(self.pretrained)}

    @torch.no_grad()
    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        if waveform.dim() == 2:
            return torch.stack([self(item) for item in waveform])
        if self.trim_db is not None:
            waveform = trim_silence(waveform, self.sample_rate, self.trim_db)
        wave = waveform.float().reshape(1, 1, -1)
        if wave.shape[-1] < self.min_samples:
            wave = nn.functional.pad(wave, (0, self.min_samples - wave.shape[-1]))
        return wave
