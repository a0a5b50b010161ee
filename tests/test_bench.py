"""Benchmark scripts (bench/): argument parsing, measurements on tiny inputs, tables, report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from bench import accuracy, baseline, features, inference, kernel_time, report, training_speed
from bench.common import command_line, format_table, split_model_feature
from ser_pipeline.corpora.synthetic import make_speaker, synthesise_utterance
from tests.e2e import FAST, REPO, run_script


@pytest.fixture(scope="module")
def speech_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three synthetic utterances (about 1.5 s each) at 22.05 kHz: resampled like EMO-DB."""
    folder = tmp_path_factory.mktemp("speech")
    for i in range(3):
        wave, _ = synthesise_utterance(make_speaker(i, 0), "anger", np.random.default_rng(i),
                                       22050)
        sf.write(folder / f"utt{i}.wav", wave, 22050, subtype="PCM_16")
    return folder


def accuracy_result(model: str = "cnn_blstm_attn", protocol: str = "loso", uar: float = 0.7,
                    wall_seconds: float = 600.0, cpus: int = 2) -> dict:
    """What bench/accuracy.py writes, with made-up numbers."""
    return {
        "benchmark": "accuracy", "corpus": "emodb", "protocol": protocol, "model": model,
        "feature": "logmel", "complete": True, "n_folds": 10, "folds_run": 10,
        "mean": {"uar": uar, "wa": uar + 0.02, "f1": uar - 0.01, "val_uar": uar},
        "std": {"uar": 0.05, "wa": 0.04, "f1": 0.06, "val_uar": 0.03}, "epochs_mean": 21.5,
        "wall_seconds": wall_seconds, "threads": None,
        "command": f"python train.py data=emodb model={model} +tags.bench_id=abc",
        "bench_command": f"python bench/accuracy.py --protocols {protocol} --models {model}",
        "machine": {"cpu": "Intel(R) Xeon(R) Processor @ 2.50GHz", "cpus_available": cpus,
                    "load_average": [1.0, 1.0, 1.0]},
    }


def write_results(folder: Path, *results: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, result in enumerate(results):
        (folder / f"{result['benchmark']}-{i}.json").write_text(json.dumps(result))
    return folder


# -- shared helpers -------------------------------------------------------------------------------

def test_table_right_aligns_numeric_columns_and_left_aligns_text():
    table = format_table(["model", "utt/s"], [["a", "1.5"], ["longer", "12.25"]])
    lines = table.splitlines()
    assert lines[2] == "a         1.5"
    assert lines[3] == "longer  12.25"


def test_markdown_table_marks_numeric_columns_right_aligned():
    table = format_table(["model", "utt/s"], [["a", "1.5"], ["b", "-"]], markdown=True)
    header, rule, *_ = table.splitlines()
    assert header == "| model | utt/s |"
    assert rule == "|-------|------:|"


def test_table_refuses_a_row_with_the_wrong_number_of_cells():
    with pytest.raises(ValueError, match="2 columns"):
        format_table(["a", "b"], [["only one"]])


def test_recorded_command_leaves_out_where_results_are_written():
    command = command_line("bench/x.py", ["--threads", "1", "--results-dir", "/tmp/r",
                                          "--name=n", "--", "a.b=[1, 2]"])
    assert command == "python bench/x.py --threads 1 -- 'a.b=[1, 2]'"


def test_models_default_to_the_feature_they_were_published_with():
    assert split_model_feature("blstm_local_attn") == ("blstm_local_attn", "lld")
    assert split_model_feature("cnn_blstm_attn:logmel_deltas") == ("cnn_blstm_attn",
                                                                   "logmel_deltas")
    with pytest.raises(ValueError, match="unknown model"):
        split_model_feature("no_such_model")


# -- accuracy.py ----------------------------------------------------------------------------------

def test_accuracy_takes_train_overrides_after_double_dash():
    args = accuracy.build_parser().parse_args(
        ["--protocols", "loso", "--models", "cnn_blstm_attn", "--", "trainer.max_epochs=40"])
    assert args.protocols == ["loso"] and args.models == ["cnn_blstm_attn"]
    assert args.overrides == ["trainer.max_epochs=40"]


def test_accuracy_records_the_feature_a_user_override_chose():
    overrides = accuracy.train_overrides("emodb", None, "loso", "svm", "lld", "abc",
                                         ["feature=compare_functionals", "seed=0"])
    assert accuracy.effective_feature(overrides, "lld") == "compare_functionals"
    assert accuracy.effective_feature(["seed=0"], "lld") == "lld"


def test_accuracy_runs_every_fold_and_lets_user_overrides_win():
    overrides = accuracy.train_overrides("ravdess", "/data/R", "group_kfold", "cnn_attn_multitask",
                                         "logmel", "id1", ["data.split=loso"])
    assert overrides[:2] == ["data=ravdess", "data.root=/data/R"]
    assert {"data.fold=all", "model=cnn_attn_multitask", "feature=logmel",
            "+tags.bench_id=id1"} <= set(overrides)
    assert overrides[-1] == "data.split=loso"  # Hydra applies the last one


def test_accuracy_dry_run_prints_one_train_command_per_protocol_and_model(capsys):
    assert accuracy.main(["--dry-run", "--protocols", "loso", "ltso",
                          "--models", "cnn_blstm_attn", "blstm_local_attn"]) == 0
    commands = capsys.readouterr().out.splitlines()
    assert len(commands) == 4
    assert all(c.startswith("python train.py data=emodb data.fold=all") for c in commands)
    assert "data.split=ltso" in commands[3] and "feature=lld" in commands[3]


def test_accuracy_result_keeps_folds_mean_std_and_summed_confusion():
    folds = [{"fold": k, "uar": 0.5 + k / 10, "wa": 0.6, "f1": 0.4, "val_uar": 0.5,
              "epochs": 10 + 2 * k, "test_speakers": [str(k)]} for k in range(2)]
    cv = {"run_id": "r1",
          "summary": {"n_folds": 2, "complete": True, "folds": folds,
                      "mean": {"uar": 0.55}, "std": {"uar": 0.07}},
          "confusion": {"labels": ["anger", "sadness"], "counts": [[3, 1], [0, 4]],
                        "report": {"anger": {"recall": 0.75}}}}
    result = accuracy.accuracy_result(cv)
    assert result["epochs_mean"] == 11.0
    assert result["confusion"] == [[3, 1], [0, 4]] and result["classes"] == ["anger", "sadness"]
    assert (result["folds_run"], result["n_folds"], result["run_id"]) == (2, 2, "r1")


def test_accuracy_result_file_names_a_non_default_feature():
    assert accuracy.result_name("emodb", "loso", "cnn_blstm_attn", "logmel") == \
        "accuracy-emodb-loso-cnn_blstm_attn"
    assert accuracy.result_name("emodb", "loso", "cnn_blstm_attn", "lld") == \
        "accuracy-emodb-loso-cnn_blstm_attn-lld"


@pytest.mark.slow
def test_accuracy_cross_validates_through_train_py_and_writes_the_result(tmp_path):
    results = tmp_path / "results"
    done = run_script("bench/accuracy.py", [
        "--corpus", "synthetic", "--protocols", "group_kfold", "--models", "cnn_blstm_attn",
        "--results-dir", str(results), "--", *FAST, "data.n_folds=2", "trainer.max_epochs=1",
        "logger.mlflow.log_model=false"], tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((results / "accuracy-synthetic-group_kfold-cnn_blstm_attn.json")
                        .read_text())
    assert result["complete"] and len(result["folds"]) == 2
    assert np.asarray(result["confusion"]).sum() == 4 * 4 * 4  # every utterance tested once
    assert result["command"].startswith("python train.py data=synthetic data.fold=all")
    assert result["wall_seconds"] > 0 and result["machine"]["cpus_available"] >= 1


# -- features.py ----------------------------------------------------------------------------------

def test_feature_benchmark_compares_equal_output_and_writes_every_path(speech_dir, tmp_path):
    assert features.main(["--files", str(speech_dir), "--repeats", "1", "--threads", "1",
                          "--results-dir", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "features-1t.json").read_text())
    paths = result["paths"]
    assert set(paths) == {"decode", "resample", "decode + resample", "log-mel", "full",
                          "log-mel, batched", "cache hit"}
    # identical waveforms in: the two implementations agree to a small fraction of a dB
    assert paths["log-mel"]["max_abs_diff_db"] < features.EQUAL_OUTPUT_DB
    assert paths["log-mel, batched"]["max_abs_diff_db"] < features.EQUAL_OUTPUT_DB
    assert paths["cache hit"]["hits_per_pass"] == 3
    assert result["files"] == 3 and result["native_rates"] == [22050]
    assert result["targets"][0]["met"] == (result["speedup"]["full"] >= 2.0)


def test_feature_files_are_spread_over_the_list_when_limited(tmp_path):
    for i in range(10):
        (tmp_path / f"{i}.wav").touch()
    chosen = features.find_audio_files([str(tmp_path)], limit=5)
    assert [p.name for p in chosen] == ["0.wav", "2.wav", "4.wav", "6.wav", "8.wav"]


# -- inference.py ---------------------------------------------------------------------------------

def test_inference_benchmark_times_load_files_and_microphone_delay(tiny_model_dir, speech_dir,
                                                                   tmp_path):
    assert inference.main(["--model", str(tiny_model_dir), "--files", str(speech_dir),
                           "--repeats", "2", "--mic-runs", "2", "--threads", "1",
                           "--results-dir", str(tmp_path), "--name", "inference"]) == 0
    result = json.loads((tmp_path / "inference.json").read_text())
    micro = result["microphone"]
    assert micro["utterances_per_run"] == 1  # the 3-s utterance stays one utterance
    assert micro["utterance_s"] == pytest.approx(3.0)
    assert 0 < micro["delay_ms"]["median"] <= micro["delay_ms"]["max"]
    assert result["files"]["files"] == 3 and result["files"]["rtf_median"] > 0
    assert result["targets"][0]["met"] == (micro["delay_ms"]["median"] < 100)


def test_speech_for_the_microphone_test_is_cut_to_the_asked_length(speech_dir):
    files = sorted(speech_dir.glob("*.wav"))
    assert len(inference.speech_utterance(files, seconds=2.0)) == 32000
    with pytest.raises(ValueError, match="less than 60"):
        inference.speech_utterance(files, seconds=60.0)


# -- training_speed.py ----------------------------------------------------------------------------

def test_throughput_counts_the_batches_after_the_warm_up():
    timer = training_speed.BatchTimer()
    timer.ends, timer.sizes = [10.0, 11.0, 13.0], [32, 32, 16]  # first batch: warm-up
    assert timer.throughput() == pytest.approx(48 / 3.0)


def test_training_table_shows_what_training_adds_to_memory():
    row = {"model": "m", "feature": "logmel", "parameters": 1_500_000, "utterances_per_s": 12.5,
           "epoch_s_estimated": 30.0, "epoch_s_measured": None, "peak_rss_mb": 900.0,
           "rss_before_training_mb": 700.0}
    assert training_speed.table_rows([row]) == [["m", "logmel", "1.50", "12.5", "30.0", "900",
                                                 "200"]]


@pytest.mark.slow
def test_training_throughput_of_a_tiny_model_is_measured(tmp_path):
    result = training_speed.measure_model(
        ["data=synthetic", f"data.root={tmp_path / 'synthetic'}",
         f"paths.cache_dir={tmp_path / 'cache'}", "data.batch_size=4", *FAST[:2], *FAST[4:]],
        batches=3)
    assert result["batches_timed"] == 2 and result["utterances_per_s"] > 0
    assert result["peak_rss_mb"] >= result["rss_before_training_mb"] > 0


# -- report.py ------------------------------------------------------------------------------------

def test_readme_section_is_replaced_only_between_the_markers():
    text = "intro\n<!-- bench:start -->\nold table\n<!-- bench:end -->\noutro\n"
    assert report.replace_block(text, "new table\n") == \
        "intro\n<!-- bench:start -->\nnew table\n<!-- bench:end -->\noutro\n"


def test_readme_without_markers_is_refused():
    with pytest.raises(ValueError, match="bench:start"):
        report.replace_block("no markers here\n", "table\n")


def test_report_lists_each_accuracy_line_with_the_command_that_reproduces_it():
    block = report.render([{**accuracy_result(), "source": "a.json"}], "cnn_blstm_attn")
    assert "| 1 | emodb  | loso     |      - | cnn_blstm_attn | logmel  | 10/10 | 0.700 ± 0.050 |" in block
    assert "1. `python bench/accuracy.py --protocols loso --models cnn_blstm_attn`" in block
    assert "bench_id" not in block


def test_targets_judge_the_best_loso_model_and_the_default_models_time():
    results = [{**accuracy_result("cnn_blstm_attn", uar=0.78, wall_seconds=1700), "source": "a"},
               {**accuracy_result("cnn_attn_multitask", uar=0.82), "source": "b"},
               {**accuracy_result("dcnn_blstm_attn", "ltso", uar=0.9), "source": "c"}]
    uar, time_target = report.accuracy_targets(results, "cnn_blstm_attn")
    assert (uar["met"], uar["source"]) == (True, "b")
    assert time_target["met"] is True and time_target["source"] == "a"


def test_speaker_normalized_lines_are_labelled_and_do_not_count_for_the_target():
    plain = {**accuracy_result(uar=0.6), "source": "a"}
    speaker = {**accuracy_result(uar=0.85), "normalization": "speaker", "source": "b"}
    uar, _ = report.accuracy_targets([plain, speaker], "cnn_blstm_attn")
    assert (uar["met"], uar["source"]) == (False, "a")
    assert "logmel, speaker-normalised (transductive)" in report.render([plain, speaker],
                                                                         "cnn_blstm_attn")
    assert accuracy.result_name("emodb", "loso", "cnn_blstm_attn", "logmel", "speaker") == \
        "accuracy-emodb-loso-cnn_blstm_attn-speaker-norm"


def seed_ensemble_result(bench_ids: list[str], uar: float, model: str = "cnn_blstm_attn",
                         part: str = "test") -> dict:
    """What bench/ensemble.py writes for a seed ensemble of ``model``'s recipe."""
    members = [{"recipe": model, "model": model, "seed": i, "split_seed": 0, "protocol": "loso",
                "bench_id": b} for i, b in enumerate(bench_ids)]
    return {"benchmark": "ensemble", "corpus": "emodb", "part": part, "n_folds": 10,
            "members_info": members, "seed_ensemble_of": model,
            "ensemble": {"mean": {"uar": uar, "wa": uar}, "std": {"uar": 0.05, "wa": 0.05}},
            "source": f"ensemble-{part}-{uar}"}


def test_a_seed_ensemble_counts_for_the_default_recipe_only_within_the_time_budget():
    def member(bench_id: str, seconds: float) -> dict:
        run = accuracy_result(uar=0.66, wall_seconds=seconds)
        return {**run, "recipe": "cnn_blstm_attn", "source": bench_id,
                "command": run["command"].replace("bench_id=abc", f"bench_id={bench_id}")}

    fast = [member("m0", 600), member("m1", 620)]
    target = lambda results: report.issue12_targets(results, "cnn_blstm_attn")[0]  # noqa: E731
    assert target(fast)["met"] is False
    met = target([*fast, seed_ensemble_result(["m0", "m1"], 0.71)])
    assert met["met"] is True and "2-seed ensemble, 20.3 min" in met["value"]
    # over 30 minutes together, a member's result missing, or scored on validation speakers:
    slow = [member("m0", 600), member("m1", 1300)]
    assert target([*slow, seed_ensemble_result(["m0", "m1"], 0.71)])["met"] is False
    assert target([*fast, seed_ensemble_result(["m0", "nope"], 0.71)])["met"] is False
    assert target([*fast, seed_ensemble_result(["m0", "m1"], 0.71, part="val")])["met"] is False


def robustness_result(model: str, ensemble_uar: float) -> dict:
    """What bench/robustness.py writes for EMO-DB fold models tested on RAVDESS."""
    level = {"wa": {"mean": 0.7, "std": 0.1}, "uar": {"mean": 0.7, "std": 0.1}}
    return {"benchmark": "robustness", "corpus": "emodb", "model": model, "target": "ravdess",
            "level": {"+0": level, "-20": level}, "source": f"robustness-{model}",
            "cross_corpus": {"ensemble": {"uar": ensemble_uar}, "chance_uar": 1 / 6}}


def test_the_cross_corpus_target_counts_deep_recipes_and_shows_the_svm_beside_them():
    results = [robustness_result("cnn_blstm_attn", 0.30), robustness_result("svm", 0.36),
               robustness_result("cnn_blstm_attn+svm", 0.37)]
    rows = [r for r in report.issue12_targets(results, "cnn_blstm_attn")
            if r["name"].startswith("EMO-DB -> RAVDESS")]
    deep, reference = rows
    assert (deep["met"], deep["value"]) == (False, "0.300 (cnn_blstm_attn)")
    assert "SVM reference" in reference["name"]
    assert reference["value"] == "0.370 (cnn_blstm_attn+svm)" and reference["met"] is None
    assert "| reference " in report.targets_section(results, "cnn_blstm_attn")[2]


def test_a_target_without_results_is_not_measured_rather_than_met():
    targets = [*report.accuracy_targets([], "cnn_blstm_attn"), *report.recorded_targets([])]
    assert len(targets) == 4 and all(t["met"] is None for t in targets)
    assert "not measured" in report.render([], "cnn_blstm_attn")


def test_cross_validation_time_on_other_than_two_cores_does_not_count_as_met():
    results = [{**accuracy_result(wall_seconds=600, cpus=16), "source": "a"}]
    assert report.accuracy_targets(results, "cnn_blstm_attn")[1]["met"] is None


def test_write_readme_then_check_passes_and_a_new_result_makes_it_stale(tmp_path):
    results = write_results(tmp_path / "results", accuracy_result())
    readme = tmp_path / "README.md"
    readme.write_text("# x\n<!-- bench:start -->\n<!-- bench:end -->\n")
    common = ["--results-dir", str(results)]
    assert report.main([*common, "--write-readme", str(readme)]) == 0
    assert "0.700 ± 0.050" in readme.read_text()
    assert report.main([*common, "--check", str(readme)]) == 0
    write_results(results, accuracy_result(), accuracy_result("blstm_local_attn"))
    assert report.main([*common, "--check", str(readme)]) == 1


def test_report_script_runs_from_a_fresh_checkout_layout():
    done = subprocess.run([sys.executable, str(REPO / "bench" / "report.py"), "--help"],
                          capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0 and "--write-readme" in done.stdout


def test_baseline_functionals_of_a_ramp_have_its_mean_extremes_and_slope():
    ramp = np.stack([np.arange(11, dtype=np.float32), np.full(11, 3.0, dtype=np.float32)])
    vector = baseline.functionals(ramp).reshape(len(baseline.FUNCTIONALS), 4)  # 2 LLDs + deltas
    named = dict(zip(baseline.FUNCTIONALS, vector, strict=True))
    assert named["mean"][:2].tolist() == [5.0, 3.0]
    assert named["min"][0] == 0.0 and named["max"][0] == 10.0 and named["p50"][0] == 5.0
    assert named["slope"][0] == pytest.approx(1.0) and named["slope"][1] == pytest.approx(0.0)
    assert named["mean"][2] == pytest.approx(1.0)  # the delta of a unit ramp
    assert named["std"][3] == 0.0


def test_speaker_normalisation_uses_each_speakers_own_statistics():
    rng = np.random.default_rng(0)
    table = np.concatenate([rng.normal(5, 2, (20, 3)), rng.normal(-1, 0.5, (30, 3))])
    speakers = np.array(["a"] * 20 + ["b"] * 30)
    out = baseline.speaker_normalized(table, speakers)
    for speaker in ("a", "b"):
        rows = out[speakers == speaker]
        np.testing.assert_allclose(rows.mean(0), 0, atol=1e-12)
        np.testing.assert_allclose(rows.std(0), 1, atol=1e-12)


def test_baseline_cross_validates_on_the_pipelines_folds_and_chooses_on_validation(tmp_path):
    results = tmp_path / "results"
    status = baseline.main(["--corpus", "synthetic", "--root", str(tmp_path / "synthetic"),
                            "--protocols", "loso", "--results-dir", str(results),
                            "--", f"paths.cache_dir={tmp_path / 'cache'}",
                            "data.reader.n_speakers=4", "data.reader.utterances_per_class=6"])
    assert status == 0
    for normalisation in ("global", "speaker"):
        result = json.loads((results / f"baseline-synthetic-loso-{normalisation}.json")
                            .read_text())
        assert result["n_folds"] == len(result["folds"]) == 4
        assert result["transductive"] is (normalisation == "speaker")
        for fold in result["folds"]:  # the speakers a fold is tested on were not its choosers
            assert not set(fold["test_speakers"]) & set(fold["val_speakers"])
            assert fold["C"] in baseline.C_GRID and fold["gamma_scale"] in baseline.GAMMA_SCALES
        assert np.asarray(result["confusion"]).sum() == result["utterances"]
        assert result["mean"]["uar"] > 0.5  # 4 classes: chance is 0.25
    block = report.render(report.load_results(results), "cnn_blstm_attn")
    assert "### Reference: classic functionals + SVM" in block
    assert "speaker (transductive)" in block


@pytest.mark.slow
def test_kernel_time_runs_a_cross_validation_with_both_allocators_and_compares(monkeypatch):
    written = []
    monkeypatch.setattr(kernel_time, "write_result", lambda payload, name: written.append(payload))
    overrides = ["data.reader.n_speakers=4", "data.reader.utterances_per_class=2",
                 "data.n_folds=2", "cv.workers=1", "trainer=debug", "model.net.conv_channels=[4,8]",
                 "model.net.lstm_hidden=8", "model.net.lstm_layers=1"]
    assert kernel_time.main(["--name", "t", *overrides]) == 0
    [payload] = written
    assert payload["identical_fold_metrics"] is True
    for row in payload["rows"].values():
        assert len(row["folds"]) == 2 and row["user_s"] > 0 and row["minor_faults"] > 0


def test_mean_std_cells_for_one_fold_and_for_no_figure():
    from bench.common import mean_std

    assert mean_std(0.8123, 0.0341) == "0.812 ± 0.034"
    assert mean_std(0.8123, float("nan")) == "0.812 (one fold)"
    assert mean_std(float("nan"), float("nan")) == "-"  # a refit's validation UAR
