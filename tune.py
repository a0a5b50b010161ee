"""Search hyperparameters with Optuna: `python tune.py search_space=default tune.n_trials=20`.

Takes every train.py override, plus `tune.*` settings (conf/tune.yaml) and a search
space (conf/search_space/). Running the same command again resumes the study; workers
on other machines join it with the same `tune.study_name` and an RDB `tune.storage`.
"""

import os

import hydra
from omegaconf import DictConfig, OmegaConf

# workers started in the same second get separate Hydra run folders
OmegaConf.register_new_resolver("pid", os.getpid, replace=True)


@hydra.main(version_base="1.3", config_path="conf", config_name="tune")
def main(cfg: DictConfig) -> float:
    from ser_pipeline.tuning import tune

    return tune(cfg)


if __name__ == "__main__":
    main()
