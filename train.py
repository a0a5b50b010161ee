"""Train a speech emotion recognition model: `python train.py [overrides]`.

See conf/train.yaml for what can be overridden; `python train.py --help` lists the groups.
"""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float:
    from ser_pipeline.train_command import run

    return run(cfg)


if __name__ == "__main__":
    main()
