"""The MLflow pyfunc model, written as *models from code* (nothing is cloudpickled).

MLflow stores this file with the model; loading it imports ser_pipeline and
rebuilds the network from the model directory logged as the ``model_dir``
artifact, through the same :class:`~ser_pipeline.inference.Predictor` that
``infer.py`` uses.

Input: a DataFrame with, per row, either ``path`` (an audio file on the
serving machine) or ``audio_base64`` (the bytes of any audio file libsndfile
reads, base64-encoded). Output: one row per input with ``emotion``, ``gender``,
``valence``, ``arousal``, ``dominance`` and ``score_<class>`` columns.
"""

from __future__ import annotations

import base64

import mlflow.pyfunc
import pandas as pd
from mlflow.models import set_model


class SERPyfuncModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from ser_pipeline.inference import Predictor

        self.predictor = Predictor.from_dir(context.artifacts["model_dir"])

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        from ser_pipeline.audio import decode_audio_bytes, read_audio

        waves = []
        for _, item in model_input.iterrows():
            path, encoded = item.get("path"), item.get("audio_base64")
            if isinstance(encoded, str) and encoded:
                waves.append(decode_audio_bytes(base64.b64decode(encoded),
                                                self.predictor.sample_rate))
            elif isinstance(path, str) and path:
                waves.append(read_audio(path, self.predictor.sample_rate))
            else:
                raise ValueError("each row needs a 'path' or an 'audio_base64' value")
        if self.predictor.speaker_normalised:  # a request is one speaker: its statistics
            results = self.predictor.predict_waveforms(waves)
        else:
            results = [self.predictor.predict_waveform(wave) for wave in waves]
        rows = []
        for result in results:
            row = {key: result[key] for key in ("emotion", "gender", "valence", "arousal",
                                                "dominance")}
            row.update({f"score_{c}": s for c, s in result["scores"].items()})
            rows.append(row)
        return pd.DataFrame(rows)


set_model(SERPyfuncModel())
