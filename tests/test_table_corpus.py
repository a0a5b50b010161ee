"""data=manifest: any corpus from a CSV / JSON-lines table, checked before any audio is read."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from ser_pipeline.corpora import (
    CorpusNotFoundError,
    generate_synthetic_corpus,
    read_table,
    validate_manifest,
)
from ser_pipeline.corpora.table import (
    EmptyTableError,
    MissingAudioError,
    MissingColumnError,
    NonNumericDimensionError,
    SpeakerInSeveralSplitsError,
    UnknownGenderError,
    UnknownSplitError,
)
from ser_pipeline.data import SERDataModule
from ser_pipeline.splits import count_folds, make_split
from tests.corpus_trees import table_rows, write_table, write_tiny_wav
from tests.e2e import FAST, run_script, store_uri


def test_table_becomes_a_valid_manifest_with_absolute_paths_and_canonical_genders(tmp_path):
    manifest = read_table(write_table(tmp_path / "corpus" / "labels.csv", table_rows()))
    validate_manifest(manifest)
    assert len(manifest) == 16
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in manifest["path"])
    assert set(manifest["gender"]) == {"female", "male"}
    assert manifest.set_index("id").loc["audio/spk0/anger_1", "valence"] == pytest.approx(0.1)
    assert manifest["dominance"].isna().all()  # blank = unknown, never a filler value
    assert set(manifest["split"]) == {"train", "val", "test"}
    assert set(manifest["corpus"]) == {"manifest"}


def test_json_lines_table_reads_like_the_csv(tmp_path):
    csv = read_table(write_table(tmp_path / "a" / "labels.csv", table_rows()))
    jsonl = read_table(write_table(tmp_path / "b" / "labels.jsonl", table_rows()))
    assert csv.drop(columns="path").equals(jsonl.drop(columns="path"))


def test_spreadsheet_exports_with_a_byte_order_mark_and_capitalised_headers_read(tmp_path):
    write_tiny_wav(tmp_path / "a.wav")
    (tmp_path / "labels.csv").write_text("\ufeffPath,Emotion,Speaker,Gender\na.wav,anger,s1,Male\n")
    manifest = read_table(tmp_path / "labels.csv")
    assert manifest.loc[0, ["id", "emotion", "speaker", "gender"]].tolist() == [
        "a", "anger", "s1", "male"]


def test_json_array_of_records_reads_like_json_lines(tmp_path):
    write_tiny_wav(tmp_path / "a.wav")
    (tmp_path / "labels.json").write_text('[{"path": "a.wav", "emotion": "anger", "speaker": 7}]')
    assert read_table(tmp_path / "labels.json").loc[0, "speaker"] == "7"


def test_absolute_paths_and_own_ids_are_kept(tmp_path):
    wav = write_tiny_wav(tmp_path / "elsewhere" / "x.wav")
    rows = [{"id": "u1", "path": str(wav), "emotion": "Anger", "speaker": "007"}]
    manifest = read_table(write_table(tmp_path / "t" / "labels.csv", rows))
    assert manifest.loc[0, ["id", "path", "emotion", "speaker"]].tolist() == [
        "u1", str(wav), "anger", "007"]
    assert manifest.loc[0, "gender"] is None


def test_missing_table_raises_corpus_not_found_naming_the_override(tmp_path):
    with pytest.raises(CorpusNotFoundError, match="data.manifest="):
        read_table(tmp_path / "nowhere.csv")


def test_missing_column_is_named_with_the_columns_found(tmp_path):
    rows = [{"path": "a.wav", "emotion": "anger", "talker": "s1"}]
    with pytest.raises(MissingColumnError, match=r"\['speaker'\].*found \['path', 'emotion', "
                                                 r"'talker'\]"):
        read_table(write_table(tmp_path / "labels.csv", rows))


def test_table_without_rows_is_an_empty_table_error(tmp_path):
    (tmp_path / "labels.csv").write_text("path,emotion,speaker\n")
    with pytest.raises(EmptyTableError, match="no rows"):
        read_table(tmp_path / "labels.csv")


def test_blank_required_cell_names_its_line(tmp_path):
    rows = table_rows()
    rows[3]["speaker"] = ""
    with pytest.raises(EmptyTableError, match=r"1 row\(s\) have no speaker \(lines 5\)"):
        read_table(write_table(tmp_path / "labels.csv", rows))


def test_missing_audio_fails_by_default_with_the_count(tmp_path):
    table = write_table(tmp_path / "labels.csv", table_rows())
    for name in ("anger_0", "sadness_1"):
        (tmp_path / "audio" / "spk1" / f"{name}.wav").unlink()
    with pytest.raises(MissingAudioError, match=r"(?s)2 of 16 audio file\(s\) do not exist.*"
                                                r"data.missing=skip") as error:
        read_table(table)
    assert str(tmp_path / "audio" / "spk1" / "anger_0.wav") in str(error.value)


def test_missing_audio_is_skipped_with_missing_skip(tmp_path):
    table = write_table(tmp_path / "labels.csv", table_rows())
    (tmp_path / "audio" / "spk1" / "anger_0.wav").unlink()
    manifest = read_table(table, missing="skip")
    assert len(manifest) == 15 and "audio/spk1/anger_0" not in set(manifest["id"])


def test_unknown_gender_value_is_named(tmp_path):
    rows = table_rows()
    rows[0]["gender"] = "x"
    with pytest.raises(UnknownGenderError, match=r"\['x'\] \(lines 2\)"):
        read_table(write_table(tmp_path / "labels.csv", rows))


def test_non_numeric_dimension_is_named(tmp_path):
    rows = table_rows()
    rows[2]["arousal"] = "high"
    with pytest.raises(NonNumericDimensionError, match=r"arousal value\(s\) \['high'\]"):
        read_table(write_table(tmp_path / "labels.csv", rows))


def test_unknown_split_value_is_named(tmp_path):
    rows = table_rows()
    rows[0]["split"] = "holdout"
    with pytest.raises(UnknownSplitError, match="holdout"):
        read_table(write_table(tmp_path / "labels.csv", rows))


def test_speaker_in_two_predefined_splits_is_refused(tmp_path):
    rows = table_rows()
    rows[0]["split"] = "test"  # spk0 trains and now also tests
    with pytest.raises(SpeakerInSeveralSplitsError, match=r"spk0 in test\+train"):
        read_table(write_table(tmp_path / "labels.csv", rows))


def test_errors_come_before_any_audio_is_read(tmp_path):
    rows = table_rows()
    rows[0]["gender"] = "x"
    table = write_table(tmp_path / "labels.csv", rows, audio=False)  # no audio at all
    with pytest.raises(UnknownGenderError):
        read_table(table)


def test_data_manifest_config_hands_the_table_and_missing_policy_to_the_reader(tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from tests.e2e import REPO

    table = write_table(tmp_path / "labels.csv", table_rows())
    (tmp_path / "audio" / "spk1" / "anger_0.wav").unlink()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["data=manifest", f"data.manifest={table}",
                                          "data.missing=skip"])
    manifest = instantiate(cfg.data.reader)(cfg.data.root)
    assert len(manifest) == 15 and set(manifest["corpus"]) == {"manifest"}


# --------------------------------------------------------------------------- predefined split

def test_predefined_split_is_one_speaker_independent_fold(tmp_path):
    manifest = read_table(write_table(tmp_path / "labels.csv", table_rows()))
    assert count_folds(manifest, "predefined") == 1
    split = make_split(manifest, "predefined")
    assert split.speaker_independent
    assert split.test_speakers == ["spk3"] and split.val_speakers == ["spk2"]
    assert len(split.train) == 8 and len(split.val) == 4 and len(split.test) == 4


def test_predefined_split_tells_when_a_speaker_crosses_parts(tmp_path):
    manifest = read_table(write_table(tmp_path / "labels.csv", table_rows()))
    manifest.loc[0, "split"] = "test"  # e.g. an official split that is not speaker-independent
    split = make_split(manifest, "predefined")
    assert not split.speaker_independent
    assert split.summary()["speaker_independent"] is False


def test_predefined_split_leaves_out_other_parts(tmp_path):
    manifest = read_table(write_table(tmp_path / "labels.csv", table_rows()))
    manifest.loc[0, "split"] = "test2"
    split = make_split(manifest, "predefined")
    assert manifest.loc[0, "id"] not in split.train + split.val + split.test


def test_predefined_split_without_split_column_says_what_to_use(tmp_path):
    rows = [{k: v for k, v in row.items() if k != "split"} for row in table_rows()]
    manifest = read_table(write_table(tmp_path / "labels.csv", rows))
    with pytest.raises(ValueError, match="needs a 'split' column"):
        make_split(manifest, "predefined")


def test_classes_default_to_the_labels_found_after_label_map(tmp_path):
    table = write_table(tmp_path / "labels.csv",
                        table_rows(emotions=("angry", "sad", "neutral")))
    datamodule = SERDataModule(name="manifest", reader=read_table, root=str(table),
                               features=None, classes=[], label_map={"angry": "anger"})
    manifest = datamodule.load_manifest()
    assert datamodule.classes == ["anger", "neutral", "sad"]
    assert len(manifest) == 24


# --------------------------------------------------------------------------- end to end

#: train.py overrides of a short run on the generated table (FAST without its synthetic options)
TABLE_FAST = ["data=manifest", "data.val_speakers=1",
              *[o for o in FAST if not o.startswith("data.")]]


@pytest.fixture(scope="module")
def table_project(tmp_path_factory):
    """A generated 4-speaker corpus listed in a CSV with a predefined split, and one run on it."""
    root = tmp_path_factory.mktemp("table_project")
    corpus = generate_synthetic_corpus(root / "mycorpus", n_speakers=4, utterances_per_class=3)
    table = pd.read_csv(corpus / "labels.csv").drop(columns=["id", "duration"])
    parts = dict(zip(sorted(table["speaker"].unique()), ["train", "train", "val", "test"],
                     strict=True))
    table["split"] = table["speaker"].map(parts)
    table.to_csv(corpus / "labels.csv", index=False)
    args = [*TABLE_FAST, f"data.manifest={corpus / 'labels.csv'}", "data.split=predefined"]
    result = run_script("train.py", args, root)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return root, corpus / "labels.csv", MlflowClient(tracking_uri=store_uri(root))


def _runs(client: MlflowClient) -> list:
    return client.search_runs([client.get_experiment_by_name("ser-pipeline").experiment_id])


@pytest.mark.slow
def test_training_on_a_table_uses_its_predefined_split_and_the_labels_found(table_project):
    root, _, client = table_project
    (run,) = _runs(client)
    assert run.info.status == "FINISHED"
    assert run.data.tags["split_protocol"] == "predefined"
    assert run.data.tags["speaker_independent"] == "true"
    assert run.data.tags["test_speakers"] == "spk03"
    summary = json.loads(Path(client.download_artifacts(run.info.run_id, "data/summary.json",
                                                        str(root))).read_text())
    assert summary["classes"] == ["anger", "happiness", "neutral", "sadness"]  # data.classes: []
    assert summary["test"]["utterances"] == 12 and summary["val"]["speakers"] == ["spk02"]


@pytest.mark.slow
def test_infer_predicts_with_the_model_trained_on_a_table(table_project):
    root, table, _ = table_project
    model_dir = next((root / "outputs").rglob("model/model.yaml")).parent
    wav = table.parent / "wav" / "spk03" / "spk03_anger_000.wav"
    result = run_script("infer.py", ["--model", str(model_dir), "--json", str(wav)], root)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads(result.stdout.strip().splitlines()[-1])
    assert record["emotion"] in {"anger", "happiness", "neutral", "sadness"}
    assert set(record["scores"]) == {"anger", "happiness", "neutral", "sadness"}


@pytest.mark.slow
@pytest.mark.parametrize("split,folds", [("predefined", 1), ("loso", 4)])
def test_cross_validation_on_a_table(table_project, tmp_path, split, folds):
    _, table, _ = table_project
    args = [*TABLE_FAST, f"data.manifest={table}", f"data.split={split}", "data.fold=all",
            "logger.mlflow.log_model=false"]
    result = run_script("train.py", args, tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"=== cross-validation: {split}, {folds}/{folds} folds ===" in result.stdout
    runs = _runs(MlflowClient(tracking_uri=store_uri(tmp_path)))
    (parent,) = [r for r in runs if r.data.tags.get("cross_validation") == "true"]
    assert parent.data.metrics["cv/folds_run"] == folds
    assert len(runs) == folds + 1
