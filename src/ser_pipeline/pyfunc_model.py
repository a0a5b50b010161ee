"""The MLflow pyfunc model, written as *models from code* (nothing is cloudpickled).

MLflow stores this file with the model; loading it imports ser_pipeline and
rebuilds the network (or an ensemble's networks) from the model directory logged as the
``model_dir`` artifact, through the same :class:`~ser_pipeline.inference.Predictor` that
``infer.py`` uses.

Input: a DataFrame with, per row, either ``path`` (an audio file on the
serving machine) or ``audio_base64`` (the bytes of any audio file libsndfile
reads, base64-encoded). Output: one row per input with ``emotion``, ``gender``,
``valence``, ``arousal``, ``dominance`` and ``score_<class>`` columns.

Limits, so that no request can exhaust the server's memory: a row's audio lasts at most
:data:`MAX_AUDIO_SECONDS` and its file holds at most :data:`MAX_AUDIO_BYTES`; a request's
rows together last at most :data:`MAX_REQUEST_SECONDS`. Lengths are read from the audio
header (and the size from the base64 text) before anything is decoded.

A bad request raises :class:`~mlflow.exceptions.MlflowException` with
``INVALID_PARAMETER_VALUE`` and a message naming the row and the problem: ``mlflow models
serve`` answers it with HTTP 400 and that message (any other exception would become a 400
saying only "an unexpected error").
"""

from __future__ import annotations

import base64
import binascii
import math
from dataclasses import dataclass

import mlflow.pyfunc
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import set_model
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

INPUT_COLUMNS = ("path", "audio_base64")
#: one row is one utterance: longer recordings are cut into utterances first (infer.py does)
MAX_AUDIO_SECONDS = 60.0
MAX_AUDIO_BYTES = 32 * 1024 * 1024
MAX_REQUEST_SECONDS = 600.0
#: base64 spends 4 characters on every 3 bytes (the last group padded)
_MAX_BASE64_CHARS = 4 * math.ceil(MAX_AUDIO_BYTES / 3)


def bad_request(message: str) -> MlflowException:
    """The error MLflow's scoring server answers with HTTP 400 and ``message``."""
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


@dataclass(frozen=True)
class RequestedAudio:
    """One row's audio, checked but not decoded: a file on the server or the bytes of one."""

    row: int
    path: str | None = None
    data: bytes | None = None


def _text(value: object, column: str, row: int) -> str:
    """A cell as text; missing values (None, NaN) are empty."""
    if value is None or (isinstance(value, float) and value != value):
        return ""
    if not isinstance(value, str):
        raise bad_request(f"row {row}: {column!r} must be a string, not {type(value).__name__}")
    return value


def _decode_base64(text: str, row: int) -> bytes:
    too_large = bad_request(
        f"row {row}: audio_base64 holds about {len(text) * 3 / 4 / 2**20:.0f} MiB of audio "
        f"file; the limit is {MAX_AUDIO_BYTES // 2**20} MiB (and {MAX_AUDIO_SECONDS:g} s) per "
        "row: cut long recordings into utterances")
    if len(text) > 2 * _MAX_BASE64_CHARS:  # refused before copying it, whatever its line breaks
        raise too_large
    compact = "".join(text.split())  # `base64` wraps lines at 76 characters unless told not to
    if len(compact) > _MAX_BASE64_CHARS:
        raise too_large
    try:
        return base64.b64decode(compact, validate=True)
    except binascii.Error as error:
        raise bad_request(f"row {row}: audio_base64 is not valid base64 ({error})") from error


def requested_audio(model_input: pd.DataFrame) -> list[RequestedAudio]:
    """Every row's audio, its length read from the header; raises :func:`bad_request` errors
    for a request without rows or known columns, a row without (or with two) sources, bad
    base64, a file that is missing or not audio, and audio beyond the limits."""
    from ser_pipeline.audio import AudioError, audio_bytes_info, audio_info

    known = [c for c in INPUT_COLUMNS if c in model_input.columns]
    if not known:
        unknown = [str(c) for c in model_input.columns]
        raise bad_request(
            "the request has neither a 'path' nor an 'audio_base64' column"
            + (f" (it has {', '.join(unknown)})" if unknown else
               " (MLflow ignores columns the model does not know: check their spelling)"))
    if len(model_input) == 0:
        raise bad_request("the request holds no rows: send one row per utterance")
    items, total = [], 0.0
    for row, (_, cells) in enumerate(model_input.iterrows()):
        path, encoded = (_text(cells.get(c), c, row) for c in INPUT_COLUMNS)
        if path and encoded:
            raise bad_request(f"row {row}: has both 'path' and 'audio_base64': give one")
        if not (path or encoded):
            raise bad_request(f"row {row}: neither 'path' nor 'audio_base64' has a value "
                              "(missing or empty)")
        data = _decode_base64(encoded, row) if encoded else None
        name = path or "audio_base64"
        try:
            rate, frames, _ = audio_info(path) if path else audio_bytes_info(data, name)
        except AudioError as error:
            raise bad_request(f"row {row}: {error}") from error
        if frames == 0:
            raise bad_request(f"row {row}: {name}: no audio samples (0 frames)")
        seconds = frames / rate
        if seconds > MAX_AUDIO_SECONDS:
            raise bad_request(f"row {row}: {name}: {seconds:.0f} s of audio; the limit is "
                              f"{MAX_AUDIO_SECONDS:g} s per row: cut long recordings into "
                              "utterances")
        total += seconds
        if total > MAX_REQUEST_SECONDS:
            raise bad_request(f"the request's rows hold more than {MAX_REQUEST_SECONDS:g} s of "
                              f"audio (the limit) by row {row}: send fewer rows per request")
        items.append(RequestedAudio(row, path or None, data))
    return items


class SERPyfuncModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from ser_pipeline.inference import EnsemblePredictor

        # a model directory or an ensemble directory (its members' probabilities averaged)
        self.predictor = EnsemblePredictor.from_dirs([context.artifacts["model_dir"]])

    def _waveform(self, item: RequestedAudio):
        from ser_pipeline.audio import AudioError, decode_audio_bytes, read_audio

        rate = self.predictor.sample_rate
        try:
            if item.path is not None:
                return read_audio(item.path, rate)
            return decode_audio_bytes(item.data, rate, "audio_base64")
        except AudioError as error:
            raise bad_request(f"row {item.row}: {error}") from error

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        items = requested_audio(pd.DataFrame(model_input))
        if self.predictor.speaker_normalized:  # a request is one speaker: its statistics
            results = self.predictor.predict_waveforms([self._waveform(i) for i in items])
        else:  # one row at a time: memory is that of the longest row, not of the request
            results = [self.predictor.predict_waveform(self._waveform(i)) for i in items]
        rows = []
        for result in results:
            row = {key: result[key] for key in ("emotion", "gender", "valence", "arousal",
                                                "dominance")}
            row.update({f"score_{c}": s for c, s in result["scores"].items()})
            rows.append(row)
        return pd.DataFrame(rows)


set_model(SERPyfuncModel())
