"""Splits are speaker-independent unless explicitly random, and say so."""

from pathlib import Path

import pandas as pd
import pytest

from ser_pipeline.corpora.manifest import make_manifest
from ser_pipeline.splits import count_folds, make_split


def manifest(n_speakers: int = 10, per_speaker: int = 8, sessions: bool = False) -> pd.DataFrame:
    rows = []
    for s in range(n_speakers):
        for u in range(per_speaker):
            rows.append({
                "id": f"s{s:02d}_{u:02d}", "path": f"/x/s{s}_{u}.wav",
                "emotion": ["anger", "sadness"][u % 2], "speaker": f"s{s:02d}",
                "gender": "male" if s % 2 else "female", "corpus": "toy",
                "session": f"Session{s // 2 + 1}",
            })
    return make_manifest(rows)


def speakers(frame: pd.DataFrame, ids: list[str]) -> set[str]:
    return set(frame.set_index("id").loc[ids, "speaker"])


@pytest.mark.parametrize("protocol,group_by", [("loso", "speaker"), ("ltso", "speaker"),
                                               ("group_kfold", "speaker"), ("loso", "session")])
def test_every_fold_has_disjoint_train_val_test_speakers(protocol, group_by):
    frame = manifest()
    n = count_folds(frame, protocol, group_by, n_folds=5)
    for fold in range(n):
        split = make_split(frame, protocol, fold, group_by=group_by, n_folds=5, val_speakers=2)
        train, val, test = (speakers(frame, ids) for ids in (split.train, split.val, split.test))
        assert train and val and test
        assert not train & val and not train & test and not val & test
        assert split.speaker_independent
        assert len(split.train) + len(split.val) + len(split.test) == len(frame)


def test_leave_one_speaker_out_tests_each_speaker_once():
    frame = manifest()
    tested = [make_split(frame, "loso", f).test_speakers for f in range(10)]
    assert sorted(s for t in tested for s in t) == sorted(frame["speaker"].unique())


def test_leave_two_speakers_out_pairs_one_male_and_one_female():
    frame = manifest()
    assert count_folds(frame, "ltso") == 5
    for fold in range(5):
        split = make_split(frame, "ltso", fold)
        genders = frame.drop_duplicates("speaker").set_index("speaker").loc[
            split.test_speakers, "gender"]
        assert sorted(genders) == ["female", "male"]


def test_leave_one_session_out_tests_whole_sessions():
    frame = manifest()
    split = make_split(frame, "loso", 2, group_by="session")
    assert set(frame.set_index("id").loc[split.test, "session"]) == {"Session3"}
    assert len(split.test_speakers) == 2


def test_random_split_is_flagged_speaker_dependent():
    split = make_split(manifest(), "random")
    assert not split.speaker_independent
    assert split.summary()["speaker_independent"] is False


def test_validation_speakers_alternate_gender():
    split = make_split(manifest(), "loso", 0, val_speakers=2)
    genders = manifest().drop_duplicates("speaker").set_index("speaker").loc[
        split.val_speakers, "gender"]
    assert sorted(genders) == ["female", "male"]


def test_split_is_deterministic():
    assert make_split(manifest(), "loso", 3) == make_split(manifest(), "loso", 3)


def test_out_of_range_fold_is_a_clear_error():
    with pytest.raises(ValueError, match="fold 10 out of range"):
        make_split(manifest(), "loso", 10)


def test_unknown_protocol_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown split protocol"):
        make_split(manifest(), "bogus", 0)


def two_corpora() -> pd.DataFrame:
    core, extra = manifest(n_speakers=4), manifest(n_speakers=3)
    extra["id"], extra["speaker"], extra["corpus"] = ("x_" + extra["id"], "x_" + extra["speaker"],
                                                      "extra")
    return pd.concat([core, extra], ignore_index=True)


def test_train_only_corpora_are_in_every_training_set_and_never_tested():
    frame = two_corpora()
    extra_ids = set(frame.loc[frame["corpus"] == "extra", "id"])
    n = count_folds(frame, "loso", train_only=["extra"])
    assert n == 4  # the folds are the core corpus's speakers only
    for fold in range(n):
        split = make_split(frame, "loso", fold, train_only=["extra"])
        assert extra_ids <= set(split.train)
        assert not extra_ids & (set(split.val) | set(split.test))
        assert speakers(frame, split.test) == {f"s{fold:02d}"}
        assert split.speaker_independent


def test_train_only_must_leave_a_corpus_to_test_on():
    with pytest.raises(ValueError, match="some but not all"):
        make_split(two_corpora(), "loso", 0, train_only=["toy", "extra"])


def test_cross_validation_folds_leave_train_only_corpora_out_of_testing(tmp_path):
    # data=emodb_ravdess as cross-validation builds it: folds are EMO-DB's speakers only
    from hydra import compose, initialize_config_dir

    from ser_pipeline.corpora.manifest import write_manifest
    from ser_pipeline.crossval import fold_splits

    rows = []
    for corpus, speakers in (("emodb", ["03", "08", "09"]), ("ravdess", ["01", "02"])):
        for speaker in speakers:
            for emotion in ("anger", "sadness", "neutral"):
                rows.append({"id": f"{corpus}/{speaker}_{emotion}", "path": f"/x/{speaker}.wav",
                             "emotion": emotion, "speaker": f"{corpus}/{speaker}",
                             "gender": "male", "corpus": corpus})
    path = write_manifest(make_manifest(rows), tmp_path / "manifest.csv")
    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base=None):
        cfg = compose("train", overrides=["data=emodb_ravdess", f"paths.output_dir={tmp_path}",
                                           "data.classes=[anger,neutral,sadness]"])
    splits = fold_splits(cfg, path)
    assert [s.test_speakers for s in splits] == [["emodb/03"], ["emodb/08"], ["emodb/09"]]
    for split in splits:
        assert {i for i in split.train if i.startswith("ravdess/")} == {
            r["id"] for r in rows if r["corpus"] == "ravdess"}
