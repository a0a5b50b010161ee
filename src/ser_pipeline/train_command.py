"""What ``python train.py`` does: one training run, or cross-validation with ``data.fold=all``.

The one place that chooses between the two, above both: ``crossval.py`` calls
``training.train`` for every fold, and neither imports this module.
"""

from __future__ import annotations

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.utilities import rank_zero_only

from ser_pipeline.allocator import keep_freed_memory
from ser_pipeline.crossval import cross_validate
from ser_pipeline.training import print_summary, train


def launches_ranks(cfg: DictConfig) -> bool:
    """True when training starts further processes of this command (``trainer=ddp``)."""
    strategy = str(cfg.trainer.get("strategy", "auto"))
    return strategy.startswith("ddp") and not strategy.startswith("ddp_spawn")


def check_launch(cfg: DictConfig) -> None:
    """Refuse what Lightning's DDP launcher cannot repeat: it starts ranks 1.. as copies of the
    command line, so a cross-validation or a local ``-m`` sweep would be run again per rank."""
    if not launches_ranks(cfg):
        return
    if str(cfg.data.fold) == "all":
        raise ValueError("data.fold=all (cross-validation) cannot run with trainer=ddp: train "
                         "one fold per command (data.fold=0, 1, ...) or use cv.workers")
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN and \
            "BasicLauncher" in str(HydraConfig.get().launcher.get("_target_", "")):
        raise ValueError("a local -m sweep cannot run with trainer=ddp (every rank would start "
                         "the whole sweep); run one command per setting, or a cluster launcher")


def run(cfg: DictConfig) -> float:
    """Entry point behind ``train.py``: returns the optimised metric (val UAR by default)."""
    check_launch(cfg)
    keep_freed_memory()  # every batch reuses the last one's memory (allocator.py)
    if rank_zero_only.rank == 0:  # DDP ranks 1.. run this command again: print once
        print(OmegaConf.to_yaml(cfg, resolve=True), flush=True)
    stage, name = str(cfg.get("optimized_metric", "val/uar")).split("/")
    if str(cfg.data.fold) == "all":
        mean = cross_validate(cfg)["mean"]
        return float(mean[name] if stage == "test" else mean["val_uar"])
    result = train(cfg)
    if rank_zero_only.rank == 0:
        print_summary(result)
    return float(result["test"][name] if stage == "test" else result["best_val_uar"])
