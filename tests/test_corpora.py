"""Corpus readers: each real layout -> a manifest with canonical labels."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from ser_pipeline.corpora import (
    EMOTIONS,
    MANIFEST_COLUMNS,
    CorpusNotFoundError,
    make_manifest,
    read_cremad,
    read_emodb,
    read_iemocap,
    read_manifest,
    read_msppodcast,
    read_ravdess,
    select_classes,
    validate_manifest,
    write_manifest,
)
from tests.corpus_trees import (
    CREMAD_FILES,
    EMODB_FILES,
    IEMOCAP_EXPECTED,
    IEMOCAP_MISSING_WAV,
    IEMOCAP_NO_AGREEMENT,
    IEMOCAP_UNLABELLED,
    MSP_EXPECTED,
    MSP_MISSING_WAV,
    MSP_NO_AGREEMENT,
    RAVDESS_SPEECH,
    build_cremad_tree,
    build_emodb_tree,
    build_iemocap_tree,
    build_msppodcast_tree,
    build_ravdess_tree,
    write_tiny_wav,
)

# ../shared beside the checkout (as in CI), else this workplace's copy
REAL_EMODB = next((p for p in (Path(__file__).resolve().parents[2] / "shared/datasets/emodb",
                               Path("/work/shared/datasets/emodb")) if p.exists()),
                  Path("/nonexistent/emodb"))
READERS = {
    "emodb": (read_emodb, build_emodb_tree),
    "ravdess": (read_ravdess, build_ravdess_tree),
    "iemocap": (read_iemocap, build_iemocap_tree),
    "cremad": (read_cremad, build_cremad_tree),
    "msppodcast": (read_msppodcast, build_msppodcast_tree),
}


def _labels(manifest: pd.DataFrame, *columns: str) -> dict[str, tuple]:
    """id -> tuple of ``columns``, with missing values as None."""
    rows = manifest.set_index("id")[list(columns)].astype(object)
    rows = rows.where(rows.notna(), None)
    return {uid: tuple(values) for uid, values in zip(rows.index, rows.values, strict=True)}


# --------------------------------------------------------------------------- all readers


@pytest.mark.parametrize("corpus", sorted(READERS))
def test_reader_returns_a_valid_sorted_manifest_with_absolute_existing_paths(corpus, tmp_path):
    read, build = READERS[corpus]
    manifest = read(build(tmp_path / corpus))
    validate_manifest(manifest)
    assert list(manifest.columns[: len(MANIFEST_COLUMNS)]) == list(MANIFEST_COLUMNS)
    assert manifest["id"].tolist() == sorted(manifest["id"])
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in manifest["path"])
    assert set(manifest["emotion"]) <= set(EMOTIONS)
    assert set(manifest["corpus"]) == {corpus}


@pytest.mark.parametrize("corpus", sorted(READERS))
def test_reader_accepts_a_relative_root_and_returns_absolute_paths(corpus, tmp_path, monkeypatch):
    read, build = READERS[corpus]
    build(tmp_path / corpus)
    monkeypatch.chdir(tmp_path)
    manifest = read(corpus)
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in manifest["path"])


@pytest.mark.parametrize("corpus", sorted(READERS))
def test_missing_root_raises_corpus_not_found_naming_layout_and_override(corpus, tmp_path):
    read, _ = READERS[corpus]
    with pytest.raises(CorpusNotFoundError) as error:
        read(tmp_path / "nowhere")
    message = str(error.value)
    assert "Expected layout: root/" in message
    assert "data.root=" in message
    assert str(tmp_path / "nowhere") in message


@pytest.mark.parametrize("corpus", sorted(READERS))
def test_root_with_another_layout_raises_corpus_not_found(corpus, tmp_path):
    read, _ = READERS[corpus]
    write_tiny_wav(tmp_path / "some" / "other" / "clip.wav")
    with pytest.raises(CorpusNotFoundError, match="data.root="):
        read(tmp_path)


@pytest.mark.parametrize("corpus", sorted(READERS))
def test_reader_is_deterministic(corpus, tmp_path):
    read, build = READERS[corpus]
    root = build(tmp_path / corpus)
    pd.testing.assert_frame_equal(read(root), read(root))


# --------------------------------------------------------------------------- EMO-DB


def test_emodb_maps_letters_speakers_and_sex(tmp_path):
    manifest = read_emodb(build_emodb_tree(tmp_path))
    expected = {name[:-4]: labels for name, labels in EMODB_FILES.items()}
    assert _labels(manifest, "emotion", "speaker", "gender") == expected


def test_emodb_ignores_files_outside_the_naming_scheme_and_has_no_dimensions(tmp_path):
    manifest = read_emodb(build_emodb_tree(tmp_path))
    assert len(manifest) == len(EMODB_FILES)
    assert manifest[["valence", "arousal", "dominance"]].isna().all().all()
    assert manifest.set_index("id").loc["03a01Wa", "text"] == "a01"


@pytest.mark.skipif(not (REAL_EMODB / "wav").is_dir(), reason="real EMO-DB not available")
def test_real_emodb_has_535_utterances_of_10_speakers_with_published_counts():
    manifest = read_emodb(REAL_EMODB)
    assert len(manifest) == 535
    assert manifest["speaker"].nunique() == 10
    assert manifest["emotion"].value_counts().to_dict() == {
        "anger": 127,
        "boredom": 81,
        "neutral": 79,
        "happiness": 71,
        "fear": 69,
        "sadness": 62,
        "disgust": 46,
    }
    assert manifest["gender"].notna().all()


# --------------------------------------------------------------------------- RAVDESS


def test_ravdess_keeps_speech_only_with_actor_speakers_and_intensity(tmp_path):
    manifest = read_ravdess(build_ravdess_tree(tmp_path))
    expected = {name[:-4]: labels for name, labels in RAVDESS_SPEECH.items()}
    assert _labels(manifest, "emotion", "speaker", "gender", "intensity") == expected


def test_ravdess_records_the_statement(tmp_path):
    manifest = read_ravdess(build_ravdess_tree(tmp_path)).set_index("id")
    assert manifest.loc["03-01-05-02-02-01-01", "statement"] == "02"


# --------------------------------------------------------------------------- IEMOCAP


def test_iemocap_lists_utterances_with_both_label_and_wav(tmp_path):
    manifest = read_iemocap(build_iemocap_tree(tmp_path))
    assert sorted(manifest["id"]) == sorted(IEMOCAP_EXPECTED)
    assert IEMOCAP_UNLABELLED not in set(manifest["id"])
    assert IEMOCAP_MISSING_WAV not in set(manifest["id"])


def test_iemocap_drops_turns_without_agreement(tmp_path):
    manifest = read_iemocap(build_iemocap_tree(tmp_path))
    assert IEMOCAP_NO_AGREEMENT not in set(manifest["id"])


def test_iemocap_maps_categories_and_takes_the_speaker_from_the_turn(tmp_path):
    manifest = read_iemocap(build_iemocap_tree(tmp_path))
    expected = {uid: labels[:4] for uid, labels in IEMOCAP_EXPECTED.items()}
    assert _labels(manifest, "emotion", "speaker", "gender", "session") == expected


def test_iemocap_keeps_raw_valence_arousal_dominance(tmp_path):
    manifest = read_iemocap(build_iemocap_tree(tmp_path))
    expected = {uid: labels[4] for uid, labels in IEMOCAP_EXPECTED.items()}
    assert _labels(manifest, "valence", "arousal", "dominance") == expected


def test_iemocap_records_the_dialog(tmp_path):
    manifest = read_iemocap(build_iemocap_tree(tmp_path)).set_index("id")
    assert manifest.loc["Ses02M_script01_1_F000", "dialog"] == "Ses02M_script01_1"


# --------------------------------------------------------------------------- CREMA-D


def test_cremad_takes_sex_from_the_demographics_and_maps_levels(tmp_path):
    manifest = read_cremad(build_cremad_tree(tmp_path))
    expected = {name[:-4]: labels for name, labels in CREMAD_FILES.items()}
    assert _labels(manifest, "emotion", "speaker", "gender", "level") == expected


def test_cremad_without_demographics_raises_naming_the_csv(tmp_path):
    with pytest.raises(CorpusNotFoundError, match="VideoDemographics.csv is missing"):
        read_cremad(build_cremad_tree(tmp_path, demographics=False))


# --------------------------------------------------------------------------- MSP-Podcast


def test_msppodcast_maps_codes_dimensions_speakers_and_official_splits(tmp_path):
    manifest = read_msppodcast(build_msppodcast_tree(tmp_path))
    labels = _labels(manifest, "emotion", "speaker", "gender", "split",
                     "valence", "arousal", "dominance")
    assert {k: (*v[:4], v[4:]) for k, v in labels.items()} == MSP_EXPECTED


def test_msppodcast_drops_no_agreement_and_segments_without_audio(tmp_path):
    ids = set(read_msppodcast(build_msppodcast_tree(tmp_path))["id"])
    assert MSP_NO_AGREEMENT not in ids and MSP_MISSING_WAV not in ids


def test_msppodcast_unknown_speakers_are_never_merged_into_one(tmp_path):
    manifest = read_msppodcast(build_msppodcast_tree(tmp_path))
    unknown = manifest[manifest["speaker"].str.startswith("unknown")]
    assert len(unknown) == 2 and unknown["speaker"].nunique() == 2


def test_msppodcast_official_split_is_the_predefined_speaker_independent_fold(tmp_path):
    from ser_pipeline.splits import make_split

    manifest = read_msppodcast(build_msppodcast_tree(tmp_path))
    split = make_split(manifest, "predefined")
    assert split.speaker_independent
    assert split.test == ["MSP-PODCAST_0005_0002", "MSP-PODCAST_0005_0007"]  # Test1 only
    assert split.val_speakers == ["200"]


def test_msppodcast_test_set_option_picks_the_second_test_set(tmp_path):
    manifest = read_msppodcast(build_msppodcast_tree(tmp_path), test_set="Test2")
    assert manifest.loc[manifest["split"] == "test", "id"].tolist() == ["MSP-PODCAST_0006_0001"]


def test_msppodcast_renamed_column_is_named_with_what_was_found(tmp_path):
    labels = "FileName,EmoClass,EmoAct,EmoVal,EmoDom,SpeakerID,Gender,Split_Set\n"
    build_msppodcast_tree(tmp_path, labels=labels)
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['SpkrID'\].*found .*'SpeakerID'"):
        read_msppodcast(tmp_path)

# --------------------------------------------------------------------------- select_classes


@pytest.fixture
def iemocap_like() -> pd.DataFrame:
    emotions = ["anger"] * 3 + ["happiness"] * 2 + ["excitement"] * 4 + ["sadness"]
    emotions += ["neutral"] * 2 + ["frustration"] * 5 + ["other"]
    rows = [
        {"id": f"u{i:02d}", "path": f"/x/u{i:02d}.wav", "emotion": e, "speaker": "s", "corpus": "c"}
        for i, e in enumerate(emotions)
    ]
    return make_manifest(rows)


def test_select_classes_merges_via_label_map_before_filtering(iemocap_like):
    selected, _ = select_classes(
        iemocap_like, ["anger", "happiness", "neutral", "sadness"], {"excitement": "happiness"}
    )
    assert selected["emotion"].value_counts().to_dict() == {
        "happiness": 6,
        "anger": 3,
        "neutral": 2,
        "sadness": 1,
    }


def test_select_classes_counts_dropped_rows_per_original_emotion(iemocap_like):
    _, dropped = select_classes(
        iemocap_like, ["anger", "happiness", "neutral", "sadness"], {"excitement": "happiness"}
    )
    assert dropped == {"frustration": 5, "other": 1}


def test_select_classes_without_label_map_drops_unlisted_emotions(iemocap_like):
    selected, dropped = select_classes(iemocap_like, ["anger", "happiness"], None)
    assert set(selected["emotion"]) == {"anger", "happiness"}
    assert len(selected) == 5
    assert dropped["excitement"] == 4


def test_select_classes_keeps_columns_and_returns_a_fresh_index(iemocap_like):
    selected, _ = select_classes(iemocap_like, ["sadness", "neutral"], None)
    assert list(selected.columns) == list(iemocap_like.columns)
    assert selected.index.tolist() == [0, 1, 2]


def test_select_classes_does_not_modify_its_input(iemocap_like):
    before = iemocap_like.copy()
    select_classes(iemocap_like, ["happiness"], {"excitement": "happiness"})
    pd.testing.assert_frame_equal(iemocap_like, before)


def test_select_classes_rejects_a_class_without_utterances(iemocap_like):
    with pytest.raises(ValueError, match="boredom"):
        select_classes(iemocap_like, ["anger", "boredom"], None)


def test_data_msppodcast_config_reads_the_tree_with_its_official_split(tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from ser_pipeline.splits import make_split
    from tests.e2e import REPO

    root = build_msppodcast_tree(tmp_path / "MSP-Podcast")
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["data=msppodcast", f"data.root={root}"])
    assert cfg.data.split == "predefined"
    datamodule = instantiate(cfg.data, features=None, _convert_="partial")
    split = make_split(datamodule.load_manifest(), **datamodule.split_options)
    assert split.protocol == "predefined" and split.speaker_independent
    assert split.test == ["MSP-PODCAST_0005_0002"]  # Test1 within the 4 default classes


def test_a_manifest_written_to_disk_reads_back_identical(tmp_path):
    """What a run's manifest.csv holds is what the next step (a fold worker) reads."""
    manifest = make_manifest([
        {"id": "03a01Fa", "path": "/c/wav/03a01Fa.wav", "emotion": "anger", "speaker": "03",
         "gender": "male", "corpus": "emodb", "session": "1"},
        {"id": "0012", "path": "/c/wav/0012.wav", "emotion": "sadness", "speaker": "10",
         "gender": None, "corpus": "emodb", "valence": 2.5, "arousal": 1.0, "session": "2"},
    ]).assign(duration=[1.25, 2.0])
    again = read_manifest(write_manifest(manifest, tmp_path / "run" / "manifest.csv"))
    pd.testing.assert_frame_equal(again, manifest)  # zeros kept, blanks missing, floats floats
