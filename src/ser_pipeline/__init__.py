"""ser-pipeline: speech emotion recognition experiments.

Data flow (one module per arrow)::

    corpora/<name>.py  -> manifest (pandas DataFrame, one row per utterance)
    splits.py          -> speaker-independent train/val/test ids
    audio.py           -> mono float32 waveform at the feature sample rate
    features/          -> log-mel / deltas / LLD tensors, cached on disk
    data.py            -> SERDataModule: padded batches with lengths
    models/            -> plain nn.Modules: encoder + EmotionHeads
    module.py          -> SERModule (LightningModule): multitask losses + metrics
    tracking.py        -> MLflow runs, confusion matrices, registry
    artifact.py        -> model directory (safetensors + YAML), safe to load
    inference.py       -> Predictor used by infer.py, the MLflow pyfunc and benchmarks
"""

__version__ = "0.1.0"
