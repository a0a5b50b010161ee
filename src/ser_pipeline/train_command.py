"""What ``python train.py`` does: one training run, or cross-validation with ``data.fold=all``.

The one place that chooses between the two, above both: ``crossval.py`` calls
``training.train`` for every fold, and neither imports this module.
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from ser_pipeline.crossval import cross_validate
from ser_pipeline.training import print_summary, train


def run(cfg: DictConfig) -> float:
    """Entry point behind ``train.py``: returns the optimised metric (val UAR by default)."""
    print(OmegaConf.to_yaml(cfg, resolve=True), flush=True)
    stage, name = str(cfg.get("optimized_metric", "val/uar")).split("/")
    if str(cfg.data.fold) == "all":
        mean = cross_validate(cfg)["mean"]
        return float(mean[name] if stage == "test" else mean["val_uar"])
    result = train(cfg)
    print_summary(result)
    return float(result["test"][name] if stage == "test" else result["best_val_uar"])
