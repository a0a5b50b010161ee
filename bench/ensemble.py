"""Late fusion of finished cross-validations, fold for fold.

Several ``train.py ... data.fold=all`` runs on the same folds (for example the deep recipe and
``model=svm``, or one recipe with several seeds) give, for each fold ``k``, one model per run
(``<cv-dir>/fold<k>/model``). This averages the fold models' class probabilities on that
fold's test speakers through the inference path (:class:`EnsemblePredictor`, as
``infer.py --model A --model B`` does) and reports the ensemble's and each member's UAR / WA /
macro-F1 per fold (mean ± std). The members are weighted equally: no weight is fitted, so
nothing is chosen on the test speakers. Runs whose folds do not hold the same test speakers
are refused.

``--part val`` scores each fold's *validation* speakers instead, so that whether an ensemble
beats its members can be decided without looking at the test speakers. The members must then
share their validation speakers too: train seed ensembles with one split seed
(``seed=<k> data.seed=0``); each member's validation UAR is that of its best epoch on those
speakers, so the figure is optimistic in the same way a single model's selection UAR is.

Example::

    python bench/ensemble.py --cv-dir outputs/train/<deep-run> --cv-dir outputs/train/<svm-run> \\
        --name emodb-loso-recipe+svm
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python bench/ensemble.py`: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    RESULTS_DIR,
    command_line,
    format_table,
    machine_info,
    mean_std,
    started_at,
    write_result,
)
from bench.robustness import fold_models, read_corpus, share_extraction  # noqa: E402
from bench.robustness import probabilities as utterance_probabilities  # noqa: E402
from ser_pipeline.metrics import label_scores, summarise_folds  # noqa: E402

METRICS = ("uar", "wa", "f1")


def evaluate_fold(model_dirs: list[Path], manifest: Any, part: str = "test") -> dict[str, Any]:
    """Ensemble and member scores of one fold's models on that fold's ``part`` speakers
    (``test`` or ``val``).

    Each member scores every utterance once; the ensemble is the mean of their class
    probabilities, which is what :class:`EnsemblePredictor` computes (checked on the first
    utterances, so the figure is the one ``infer.py --model A --model B`` gives).
    """
    import numpy as np

    from ser_pipeline.audio import read_audio
    from ser_pipeline.inference import EnsemblePredictor, Predictor

    members = [Predictor.from_dir(d) for d in model_dirs]
    share_extraction(members)  # seeds of one recipe extract each file once
    speakers = [sorted(map(str, m.spec.info["split"][f"{part}_speakers"])) for m in members]
    if any(s != speakers[0] for s in speakers):
        raise SystemExit(f"the runs' folds hold different {part} speakers: {speakers}")
    if part == "val" and not speakers[0]:
        raise SystemExit("the fold models were refit (data.val_speakers=0): no validation "
                         "speakers are left to judge them on")
    if part == "val" and any((m.spec.info.get("svm") or {}).get("refit", False) for m in members):
        raise SystemExit("an svm member was refit on its validation speakers, so it cannot be "
                         "judged on them: train it with model.refit=false")
    classes = members[0].classes
    rows = manifest[manifest["speaker"].astype(str).isin(speakers[0])
                    & manifest["emotion"].isin(classes)]
    waves = [read_audio(p, members[0].sample_rate) for p in rows["path"]]
    truth = rows["emotion"].tolist()
    # (members, utterances, classes)
    probabilities = np.stack([utterance_probabilities(m, waves) for m in members])
    mean = probabilities.mean(0)
    if len(members) > 1:
        ensemble = EnsemblePredictor(members)
        for wave, expected in zip(waves[:3], mean[:3], strict=False):
            got = ensemble.predict_waveform(wave)["scores"]
            if not np.allclose([got[c] for c in classes], expected, atol=1e-5):
                raise AssertionError("EnsemblePredictor disagrees with the mean of its members")

    def score(probs: np.ndarray) -> dict[str, float]:
        return label_scores(truth, [classes[i] for i in probs.argmax(1)])

    return {f"{part}_speakers": speakers[0], "utterances": len(rows), "ensemble": score(mean),
            "members": [score(p) for p in probabilities] if len(members) > 1 else []}


def member_info(cv_dir: Path) -> dict[str, Any]:
    """What a member cross-validation ran, from its Hydra config (``.hydra/config.yaml``):
    recipe, model, seed, split seed, protocol and the ``bench_id`` that ties it to its
    ``bench/accuracy.py`` result (and so to its wall time). Empty where there is no config."""
    import yaml

    path = cv_dir / ".hydra" / "config.yaml"
    if not path.is_file():
        return {}
    cfg = yaml.safe_load(path.read_text()) or {}
    tags, data = cfg.get("tags") or {}, cfg.get("data") or {}
    return {"recipe": tags.get("recipe"), "model": (cfg.get("model") or {}).get("name"),
            "seed": cfg.get("seed"), "split_seed": data.get("seed"),
            "protocol": data.get("split"), "bench_id": tags.get("bench_id")}


def seed_ensemble_recipe(members: list[dict[str, Any]]) -> str | None:
    """The recipe a seed ensemble is of: every member ran it, each with its own seed."""
    recipes = {m.get("recipe") for m in members}
    seeds = [m.get("seed") for m in members]
    if len(members) < 2 or len(recipes) != 1 or None in recipes or len(set(seeds)) != len(seeds):
        return None
    return recipes.pop()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bench/ensemble.py", description=__doc__.split("\n")[0])
    parser.add_argument("--cv-dir", type=Path, action="append", required=True,
                        help="output folder of a data.fold=all run (repeat: one per member)")
    parser.add_argument("--corpus", default="emodb", help="the corpus the folds were trained on")
    parser.add_argument("--root", help="its folder (default: the data config's root)")
    parser.add_argument("--part", choices=("test", "val"), default="test",
                        help="score the folds' test speakers, or their validation speakers "
                             "(to decide on an ensemble without the test speakers)")
    parser.add_argument("--name", required=True, help="result file suffix")
    parser.add_argument("--label", help="what the members are (stored in the result)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    begun, started = started_at(), time.perf_counter()
    runs = [fold_models(d) for d in args.cv_dir]
    if len({len(r) for r in runs}) != 1:
        raise SystemExit(f"the runs have different fold counts: {[len(r) for r in runs]}")
    manifest = read_corpus(args.corpus, args.root)
    info = [member_info(d) for d in args.cv_dir]
    folds = [evaluate_fold(list(dirs), manifest, args.part) for dirs in zip(*runs, strict=True)]
    result: dict[str, Any] = {
        "benchmark": "ensemble", "corpus": args.corpus, "part": args.part,
        "label": args.label,
        "cv_dirs": [str(d) for d in args.cv_dir], "n_folds": len(folds),
        "members_info": info, "seed_ensemble_of": seed_ensemble_recipe(info),
        "ensemble": summarise_folds([f["ensemble"] for f in folds], METRICS),
        "members": [summarise_folds([f["members"][i] for f in folds], METRICS)
                    for i in range(len(args.cv_dir))] if len(args.cv_dir) > 1 else [],
        "folds": folds, "command": command_line("bench/ensemble.py", argv),
        "started_at": begun, "machine": machine_info()}
    rows = [[f"member {i}: {d}", *(mean_std(m["mean"][k], m["std"][k]) for k in METRICS)]
            for i, (d, m) in enumerate(zip(args.cv_dir, result["members"], strict=False))]
    rows.append(["ensemble (mean of probabilities)",
                 *(mean_std(result["ensemble"]["mean"][k], result["ensemble"]["std"][k])
                   for k in METRICS)])
    print(format_table(["model", "UAR", "WA", "macro-F1"], rows))
    result["wall_seconds"] = time.perf_counter() - started
    suffix = "" if args.part == "test" else f"-{args.part}"
    path = write_result(result, f"ensemble-{args.name}{suffix}", args.results_dir)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
