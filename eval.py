"""Test a logged model on any corpus: `python eval.py model_uri=<uri> data=<corpus> [overrides]`.

See conf/eval.yaml: eval.split (all | train | val | test), eval.label_map (model class ->
corpus class). Logs an MLflow evaluation run; predictions and report also land in the run folder.
"""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> float:
    from ser_pipeline.evaluation import evaluate

    return float(evaluate(cfg)["metrics"]["uar"])


if __name__ == "__main__":
    main()
