"""The SVM of ``model=svm`` as a model: prediction from stored arrays, no scikit-learn.

Utterance vectors (:func:`utterance_vector`: 8 functionals of every feature row and its delta,
or a 1-frame feature as is) and :class:`SVMClassifier`, libsvm's one-vs-one decision values
and voting reimplemented in torch. Fitting (scikit-learn) and the training run live in
``ser_pipeline.classic``; this module imports nothing of the pipeline, so the model directory
loader (``artifact.py``) can allow-list the class without an import circle.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import torch
from torch import nn

#: the summaries of every feature row (and of its delta), in the order of :func:`functionals`
FUNCTIONALS = ("mean", "std", "min", "max", "p10", "p50", "p90", "slope")
#: ``model.summary``: ``functionals`` of the frames, ``vector`` (a 1-frame feature as is), or
#: ``auto`` (``vector`` when every training utterance has exactly one frame)
SUMMARIES = ("auto", "functionals", "vector")


# -- utterance vectors ---------------------------------------------------------------------------

def functionals(frames: np.ndarray) -> np.ndarray:
    """``(rows, time)`` frame features -> ``(8 * 2 * rows,)``: 8 functionals of every row and its
    delta (all means, then all stds, ... in :data:`FUNCTIONALS` order), in float64."""
    frames = np.asarray(frames, dtype=np.float64)
    delta = np.gradient(frames, axis=1) if frames.shape[1] > 1 else np.zeros_like(frames)
    rows = np.concatenate([frames, delta])
    time_axis = np.arange(rows.shape[1], dtype=np.float64)
    centred = time_axis - time_axis.mean()
    denominator = float((centred**2).sum()) or 1.0
    p10, p50, p90 = np.percentile(rows, [10, 50, 90], axis=1)
    slope = (rows * centred).sum(axis=1) / denominator
    return np.concatenate([rows.mean(1), rows.std(1), rows.min(1), rows.max(1),
                           p10, p50, p90, slope])


def utterance_vector(features: torch.Tensor, summary: str) -> np.ndarray:
    """One utterance's ``(channels, n_features, frames)`` -> its float64 vector.

    ``functionals``: :func:`functionals` of the ``channels * n_features`` rows; ``vector``:
    the first (only) frame, flattened.
    """
    rows = features.detach().cpu().reshape(-1, features.shape[-1]).numpy()
    if summary == "vector":
        return rows[:, 0].astype(np.float64)
    if summary == "functionals":
        return functionals(rows)
    raise ValueError(f"summary must be 'functionals' or 'vector', not {summary!r}")



# -- prediction from stored arrays (no scikit-learn) -----------------------------------------------

def rbf_kernel(x: torch.Tensor, support_vectors: torch.Tensor, gamma: float,
               chunk_elements: int = 4_000_000) -> torch.Tensor:
    """``exp(-gamma * |x - sv|^2)``: ``(batch, d)`` x ``(n_sv, d)`` -> ``(batch, n_sv)``.

    Squared differences summed directly, as libsvm's dense kernel does (not the
    ``|x|^2 + |sv|^2 - 2 x.sv`` expansion, which loses digits), in chunks of rows.
    """
    rows = max(1, chunk_elements // max(1, support_vectors.numel()))
    parts = [(x[start:start + rows, None, :] - support_vectors[None]).square().sum(-1)
             for start in range(0, x.shape[0], rows)]
    distances = torch.cat(parts) if parts else x.new_zeros((0, support_vectors.shape[0]))
    return torch.exp(-gamma * distances)


def ovo_decision_values(kernel: torch.Tensor, dual_coef: torch.Tensor, intercept: torch.Tensor,
                        n_support: list[int]) -> torch.Tensor:
    """libsvm's one-vs-one decision values ``(batch, n_pairs)`` from the kernel ``(batch, n_sv)``.

    Support vectors are grouped by class (``n_support`` each); pairs are ``(i, j)``, ``i < j``,
    in order; pair ``(i, j)`` weighs class i's support vectors with ``dual_coef[j - 1]`` and
    class j's with ``dual_coef[i]`` and adds its intercept (scikit-learn's ``_dual_coef_`` and
    ``_intercept_``, i.e. minus libsvm's rho). Positive: a vote for i.
    """
    starts = np.concatenate([[0], np.cumsum(n_support)]).tolist()
    values = []
    for p, (i, j) in enumerate(itertools.combinations(range(len(n_support)), 2)):
        si, sj = slice(starts[i], starts[i + 1]), slice(starts[j], starts[j + 1])
        values.append(kernel[:, si] @ dual_coef[j - 1, si] + kernel[:, sj] @ dual_coef[i, sj]
                      + intercept[p])
    return torch.stack(values, dim=1)


def ovo_votes(decision_values: torch.Tensor, n_classes: int) -> torch.Tensor:
    """``(batch, n_pairs)`` decision values -> ``(batch, n_classes)`` vote counts (float64)."""
    votes = decision_values.new_zeros((decision_values.shape[0], n_classes))
    for p, (i, j) in enumerate(itertools.combinations(range(n_classes), 2)):
        wins = (decision_values[:, p] > 0).to(votes.dtype)  # libsvm: > 0 for i, else j
        votes[:, i] += wins
        votes[:, j] += 1 - wins
    return votes


def fit_temperature(votes: np.ndarray, truth: np.ndarray,
                    bounds: tuple[float, float] = (0.05, 20.0)) -> float:
    """The ``T`` that minimises the negative log-likelihood of ``softmax(votes / T)``.

    ``votes`` ``(rows, n_classes)`` of utterances the SVM was *not* fitted on (held-out
    validation speakers or inner folds; ``-inf`` for a class it never saw), ``truth`` their
    class indices. Temperature scaling (Guo et al., 2017) keeps the arg-max, so predictions
    and UAR are unchanged; it only makes the scores mean what they say, which is what an
    ensemble averages and what ``eval.py``'s reliability diagram checks. Rows whose class
    has no votes are left out; with none left, 1.0. (scipy's bounded scalar search on log T:
    one parameter needs no optimiser library of its own.)
    """
    from scipy.optimize import minimize_scalar

    votes = np.asarray(votes, dtype=np.float64)
    truth = np.asarray(truth, dtype=int)
    if not len(truth):
        return 1.0
    usable = np.isfinite(votes[np.arange(len(truth)), truth])
    if not usable.any():
        return 1.0
    votes, truth = votes[usable], truth[usable]

    def nll(log_t: float) -> float:
        logits = votes / np.exp(log_t)  # -inf (a class never seen) stays -inf
        top = logits.max(1, keepdims=True)
        log_norm = top[:, 0] + np.log(np.exp(logits - top).sum(1))
        return float((log_norm - logits[np.arange(len(truth)), truth]).mean())

    best = minimize_scalar(nll, bounds=(np.log(bounds[0]), np.log(bounds[1])),
                           method="bounded", options={"xatol": 1e-4})
    return float(np.exp(best.x))


class SVMClassifier(nn.Module):
    """A fitted RBF SVM on utterance vectors, with a network's call contract.

    ``forward(features (batch, channels, n_features, frames), lengths (batch,))`` -> dict:
    ``emotion`` ``(batch, n_emotions)`` one-vs-one vote counts divided by ``temperature``
    (``-inf`` for a class the SVM never saw), so that their softmax is a calibrated
    probability (the temperature is fitted on held-out votes, :func:`fit_temperature`; 1.0:
    the softmax of the raw counts, whose confidence is an accident of the number of classes)
    and their arg-max is libsvm's prediction, ``gender`` ``(batch, n_genders)`` and ``vad`` ``(batch, n_dims)`` zeros (it
    predicts neither: its model directory says ``has_gender: false``), ``embedding`` the
    z-scored utterance vectors. Every array is a float64 buffer, so the state dict is the
    model and nothing else is stored.
    """

    def __init__(self, n_inputs: int, n_support: list[int], svm_classes: list[int],
                 n_emotions: int, gamma: float, summary: str = "functionals",
                 n_genders: int = 2, n_dims: int = 3, temperature: float = 1.0) -> None:
        super().__init__()
        if summary not in ("functionals", "vector"):
            raise ValueError(f"summary must be 'functionals' or 'vector', not {summary!r}")
        if len(n_support) != len(svm_classes) or len(svm_classes) < 2:
            raise ValueError("need n_support for each of at least two svm_classes")
        if any(not 0 <= c < n_emotions for c in svm_classes):
            raise ValueError(f"svm_classes must index the {n_emotions} emotion classes")
        self.n_inputs, self.n_support = int(n_inputs), [int(n) for n in n_support]
        self.svm_classes, self.n_emotions = [int(c) for c in svm_classes], int(n_emotions)
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, not {temperature!r}")
        self.gamma, self.summary = float(gamma), summary
        self.temperature = float(temperature)
        self.n_genders, self.n_dims = n_genders, n_dims
        n_sv, k = sum(self.n_support), len(self.svm_classes)
        double = torch.float64
        self.register_buffer("input_mean", torch.zeros(self.n_inputs, dtype=double))
        self.register_buffer("input_std", torch.ones(self.n_inputs, dtype=double))
        self.register_buffer("support_vectors", torch.zeros(n_sv, self.n_inputs, dtype=double))
        self.register_buffer("dual_coef", torch.zeros(k - 1, n_sv, dtype=double))
        self.register_buffer("intercept", torch.zeros(k * (k - 1) // 2, dtype=double))

    @classmethod
    def from_fitted(cls, fitted: Any, n_emotions: int, summary: str, temperature: float = 1.0
                    ) -> tuple[SVMClassifier, dict[str, Any]]:
        """The arrays of ``fitted`` (trained on class indices) -> ``(model, its kwargs)``."""
        svc = fitted.svc
        kwargs = {"n_inputs": int(svc.support_vectors_.shape[1]),
                  "n_support": [int(n) for n in svc.n_support_],
                  "svm_classes": [int(c) for c in svc.classes_], "n_emotions": int(n_emotions),
                  "gamma": float(svc._gamma), "summary": summary,
                  "temperature": float(temperature)}
        net = cls(**kwargs)
        arrays = {"input_mean": fitted.mean, "input_std": fitted.std,
                  "support_vectors": svc.support_vectors_,
                  # libsvm's own signs (the public dual_coef_/intercept_ flip for two classes)
                  "dual_coef": svc._dual_coef_, "intercept": svc._intercept_}
        net.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float64))
                             for k, v in arrays.items()})
        return net.eval(), kwargs

    def votes(self, vectors: torch.Tensor) -> torch.Tensor:
        """``(batch, n_inputs)`` unstandardised vectors -> ``(batch, n_emotions)`` votes."""
        if vectors.shape[-1] != self.n_inputs:
            raise ValueError(f"expected {self.n_inputs} inputs per utterance, got "
                             f"{vectors.shape[-1]} (another feature than the model's?)")
        x = (vectors.to(torch.float64) - self.input_mean) / self.input_std
        kernel = rbf_kernel(x, self.support_vectors, self.gamma)
        decision = ovo_decision_values(kernel, self.dual_coef, self.intercept, self.n_support)
        per_class = ovo_votes(decision, len(self.svm_classes))
        votes = per_class.new_full((x.shape[0], self.n_emotions), float("-inf"))
        votes[:, self.svm_classes] = per_class
        return votes

    def predict_vectors(self, vectors: np.ndarray | torch.Tensor) -> np.ndarray:
        """Emotion class indices: the most votes, the first class among equals (libsvm's rule)."""
        return self.votes(torch.as_tensor(vectors)).argmax(-1).numpy()

    def forward(self, features: torch.Tensor, lengths: torch.Tensor) -> dict[str, torch.Tensor]:
        vectors = torch.from_numpy(np.stack([
            utterance_vector(features[i, ..., : int(n)], self.summary)
            for i, n in enumerate(lengths)]))
        votes = self.votes(vectors)
        batch = features.shape[0]
        return {"emotion": (votes / self.temperature).float(),
                "gender": features.new_zeros((batch, self.n_genders)),
                "vad": features.new_zeros((batch, self.n_dims)),
                "embedding": ((vectors - self.input_mean) / self.input_std).float()}
