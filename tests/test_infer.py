"""infer.py on files: model choice, every input kind, output formats and every error.

Audio is generated per test (speech-like harmonics between silences, see test_vad);
the model is the untrained ``tiny_model_dir``, so only the shape of predictions is
checked, never which emotion wins.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pytest
import soundfile as sf
import yaml
from mlflow.tracking import MlflowClient

from ser_pipeline.artifact import SPEC_FILE
from ser_pipeline.infer_cli import main
from ser_pipeline.model_uri import (
    SOURCE_FILE,
    ModelNotFoundError,
    default_model_uri,
    resolve_model,
)
from ser_pipeline.packaging import log_pyfunc_model
from tests.test_vad import recording

CLASSES = ["anger", "happiness", "neutral", "sadness"]
FIELDS = ["source", "start_s", "end_s", "emotion", "scores", "top_k", "gender", "valence",
          "arousal", "dominance"]


def write_audio(path: Path, wave: np.ndarray, sample_rate: int = 16000, channels: int = 1,
                **options) -> Path:
    """``wave`` at 16 kHz, written at ``sample_rate`` with ``channels`` identical channels."""
    import torch

    from ser_pipeline.audio import resample

    wave = resample(torch.from_numpy(wave), 16000, sample_rate).numpy()
    sf.write(path, np.repeat(wave[:, None], channels, axis=1), sample_rate, **options)
    return path


def short_speech() -> np.ndarray:
    """1 s silence, 2 s speech, 1 s silence."""
    return recording(("silence", 1.0), ("speech", 2.0), ("silence", 1.0))


@pytest.fixture(autouse=True)
def model_cache(tmp_path, monkeypatch) -> Path:
    """Store models are fetched into $SER_PIPELINE_ROOT/.cache/models: here, the test's own."""
    monkeypatch.setenv("SER_PIPELINE_ROOT", str(tmp_path))
    return tmp_path / ".cache" / "models"


def infer(capsys, *argv: str) -> tuple[int, list[dict], str]:
    """Run infer.py with --json; (exit status, one dict per utterance, stderr)."""
    status = main(["--json", *argv])
    out, err = capsys.readouterr()
    return status, [json.loads(line) for line in out.splitlines()], err


def model_variant(model_dir: Path, target: Path, **spec_changes) -> Path:
    """A copy of ``model_dir`` whose model.yaml has ``spec_changes`` (dicts are merged)."""
    shutil.copytree(model_dir, target)
    spec = yaml.safe_load((target / SPEC_FILE).read_text())
    for key, value in spec_changes.items():
        spec[key] = {**spec[key], **value} if isinstance(value, dict) else value
    (target / SPEC_FILE).write_text(yaml.safe_dump(spec, sort_keys=False))
    return target


# -- files ------------------------------------------------------------------------------------

def test_short_wav_gets_one_prediction_for_its_speech(tiny_model_dir, tmp_path, capsys):
    path = write_audio(tmp_path / "a.wav", short_speech())
    status, [record], _ = infer(capsys, "--model", str(tiny_model_dir), str(path))
    assert status == 0
    assert record["source"] == str(path)
    assert record["start_s"] == pytest.approx(1.0, abs=0.15)  # silence trimmed by the VAD
    assert record["end_s"] == pytest.approx(3.0, abs=0.45)


def test_json_record_has_every_field_and_a_score_for_every_class(tiny_model_dir, tmp_path,
                                                                 capsys):
    path = write_audio(tmp_path / "a.wav", short_speech())
    _, [record], _ = infer(capsys, "--model", str(tiny_model_dir), str(path))
    assert list(record) == FIELDS
    assert sorted(record["scores"]) == CLASSES
    assert sum(record["scores"].values()) == pytest.approx(1.0, abs=1e-5)
    assert record["emotion"] == max(record["scores"], key=record["scores"].get)
    assert record["gender"] in ("female", "male")
    assert all(isinstance(record[d], float) for d in ("valence", "arousal", "dominance"))


def test_top_k_lists_the_k_best_emotions_in_order(tiny_model_dir, tmp_path, capsys):
    path = write_audio(tmp_path / "a.wav", short_speech())
    _, [record], _ = infer(capsys, "--model", str(tiny_model_dir), "--top-k", "2", str(path))
    ranked = sorted(record["scores"], key=record["scores"].get, reverse=True)
    assert record["top_k"] == ranked[:2]


def test_tta_averages_augmented_views_into_one_distribution(tiny_model_dir, tmp_path, capsys):
    path = write_audio(tmp_path / "a.wav", short_speech())
    _, [plain], _ = infer(capsys, "--model", str(tiny_model_dir), str(path))
    _, [tta], _ = infer(capsys, "--model", str(tiny_model_dir), "--tta", "4", str(path))
    assert sum(tta["scores"].values()) == pytest.approx(1.0, abs=1e-5)
    assert tta["scores"] != plain["scores"]  # the noisy/shifted views moved the average
    assert (tta["start_s"], tta["end_s"]) == (plain["start_s"], plain["end_s"])


def test_missing_heads_are_null(tiny_model_dir, tmp_path, capsys):
    plain = model_variant(tiny_model_dir, tmp_path / "plain", has_gender=False,
                          has_dimensions=False)
    path = write_audio(tmp_path / "a.wav", short_speech())
    _, [record], _ = infer(capsys, "--model", str(plain), str(path))
    assert [record[k] for k in ("gender", "valence", "arousal", "dominance")] == [None] * 4


@pytest.mark.parametrize("suffix, options", [
    ("flac", {}), ("ogg", {"subtype": "VORBIS"}), ("mp3", {"subtype": "MPEG_LAYER_III"}),
])
def test_compressed_formats_are_read(tiny_model_dir, tmp_path, capsys, suffix, options):
    if "MP3" not in sf.available_formats() and suffix == "mp3":
        pytest.skip("this libsndfile cannot write MP3 (needs libsndfile >= 1.1)")
    path = write_audio(tmp_path / f"a.{suffix}", short_speech(), **options)
    status, [record], _ = infer(capsys, "--model", str(tiny_model_dir), str(path))
    assert status == 0
    assert record["start_s"] == pytest.approx(1.0, abs=0.15)


def test_any_rate_and_channel_count_gives_the_same_times(tiny_model_dir, tmp_path, capsys):
    mono = write_audio(tmp_path / "mono16k.wav", short_speech())
    stereo = write_audio(tmp_path / "stereo44k.wav", short_speech(), sample_rate=44100,
                         channels=2)
    _, [a, b], _ = infer(capsys, "--model", str(tiny_model_dir), str(mono), str(stereo))
    assert b["start_s"] == pytest.approx(a["start_s"], abs=0.035)
    assert b["end_s"] == pytest.approx(a["end_s"], abs=0.035)
    assert b["scores"] == pytest.approx(a["scores"], abs=0.05)


def test_long_recording_is_cut_into_utterances_with_times(tiny_model_dir, tmp_path, capsys):
    wave = recording(("silence", 1.0), ("speech", 2.0), ("silence", 1.5), ("speech", 1.5),
                     ("silence", 1.0))
    path = write_audio(tmp_path / "long.flac", wave, sample_rate=22050)
    status, records, _ = infer(capsys, "--model", str(tiny_model_dir), "--segment-above-s", "3",
                               str(path))
    assert status == 0
    starts = [r["start_s"] for r in records]
    assert starts == pytest.approx([1.0, 4.5], abs=0.15)
    assert records[0]["end_s"] < records[1]["start_s"]
    assert all(r["emotion"] in CLASSES for r in records)


def test_long_recording_for_a_model_at_another_rate(tiny_model_dir, tmp_path, capsys):
    model_8k = model_variant(tiny_model_dir, tmp_path / "m8k", features={
        "sample_rate": 8000, "n_fft": 256, "win_length": 200, "hop_length": 80,
        "f_max": 4000.0})
    wave = recording(("silence", 1.0), ("speech", 1.5), ("silence", 1.5), ("speech", 1.5),
                     ("silence", 1.0))
    path = write_audio(tmp_path / "long.wav", wave, sample_rate=48000)
    status, records, _ = infer(capsys, "--model", str(model_8k), "--segment-above-s", "3",
                               str(path))
    assert status == 0
    assert [r["start_s"] for r in records] == pytest.approx([1.0, 4.0], abs=0.15)


def test_folders_and_globs_name_their_audio_files(tiny_model_dir, tmp_path, capsys):
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    write_audio(folder / "one.wav", short_speech())
    write_audio(folder / "sub" / "two.flac", short_speech())
    (folder / "notes.txt").write_text("not audio")
    other = tmp_path / "other"
    other.mkdir()
    write_audio(other / "three.wav", short_speech())
    status, records, _ = infer(capsys, "--model", str(tiny_model_dir), str(folder),
                               str(other / "*.wav"))
    assert status == 0
    assert [Path(r["source"]).name for r in records] == ["one.wav", "two.flac", "three.wav"]


def test_table_is_the_default_output(tiny_model_dir, tmp_path, capsys):
    path = write_audio(tmp_path / "a.wav", short_speech())
    assert main(["--model", str(tiny_model_dir), str(path)]) == 0
    header, row = capsys.readouterr().out.splitlines()
    assert header.split()[:5] == ["source", "start", "end", "emotion", "score"]
    assert row.split()[0].endswith("a.wav")
    assert row.split()[3] in CLASSES


# -- file errors ------------------------------------------------------------------------------

def bad_files(folder: Path) -> dict[str, Path]:
    """One file per way a file can fail, with the words its error line must contain."""
    empty = folder / "empty.wav"
    empty.touch()
    garbage = folder / "garbage.wav"
    garbage.write_bytes(b"this is not a RIFF file at all" * 10)
    header_only = folder / "header_only.wav"
    sf.write(header_only, np.zeros(0, np.float32), 16000)
    silent = write_audio(folder / "silent.wav", np.zeros(32000, np.float32))
    noise = write_audio(folder / "tooshort.wav", recording(("speech", 0.1)))
    return {"file not found": folder / "missing.wav", "empty file": empty,
            "not a readable audio file": garbage, "no audio samples": header_only,
            "silent": silent, "too short": noise}


@pytest.mark.parametrize("reason", ["file not found", "empty file", "not a readable audio file",
                                    "no audio samples", "silent", "too short"])
def test_bad_file_gives_one_error_line_naming_it_and_the_reason(tiny_model_dir, tmp_path,
                                                                capsys, reason):
    path = bad_files(tmp_path)[reason]
    status, records, err = infer(capsys, "--model", str(tiny_model_dir), str(path))
    assert status == 1 and records == []
    [line] = err.splitlines()
    assert str(path) in line and reason in line


def test_noise_without_speech_is_reported(tiny_model_dir, tmp_path, capsys):
    noise = np.random.default_rng(0).uniform(-0.01, 0.01, 32000).astype(np.float32)
    path = write_audio(tmp_path / "hiss.wav", noise)
    status, _, err = infer(capsys, "--model", str(tiny_model_dir), "--vad-aggressiveness", "3",
                           str(path))
    assert status == 1 and "no speech found" in err


def test_other_files_are_still_predicted_when_some_fail(tiny_model_dir, tmp_path, capsys):
    bad = bad_files(tmp_path)
    good = write_audio(tmp_path / "good.wav", short_speech())
    status, records, err = infer(capsys, "--model", str(tiny_model_dir), str(bad["silent"]),
                                 str(good), str(bad["file not found"]))
    assert status == 1
    assert [r["source"] for r in records] == [str(good)]
    assert len(err.splitlines()) == 2


def test_folder_without_audio_and_glob_without_match_are_errors(tiny_model_dir, tmp_path,
                                                                capsys):
    (tmp_path / "nothing").mkdir()
    status, _, err = infer(capsys, "--model", str(tiny_model_dir), str(tmp_path / "nothing"),
                           str(tmp_path / "*.flac"))
    assert status == 1
    assert "holds no audio files" in err and "no file matches" in err


@pytest.mark.parametrize("argv", [[], ["--top-k", "0", "a.wav"], ["--vad-aggressiveness", "4",
                                  "a.wav"], ["--mic", "a.wav"], ["--max-utterance-s", "0.1",
                                                                 "a.wav"]])
def test_bad_arguments_exit_with_status_2(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert "error" in capsys.readouterr().err


# -- model choice -----------------------------------------------------------------------------

def test_missing_model_folder_is_one_clear_error(tmp_path, capsys):
    path = write_audio(tmp_path / "a.wav", short_speech())
    status, _, err = infer(capsys, "--model", str(tmp_path / "nope"), str(path))
    assert status == 1
    assert "not found" in err and "train.py" in err


def test_no_model_anywhere_says_how_to_train_one(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    path = write_audio(tmp_path / "a.wav", short_speech())
    status, _, err = infer(capsys, str(path))
    assert status == 1
    [line] = err.splitlines()
    assert "no trained model found" in line and "python train.py" in line
    assert not (tmp_path / "mlruns").exists()  # looking did not create a store


def test_folder_that_is_no_model_is_refused(tmp_path):
    with pytest.raises(ModelNotFoundError, match="neither a model directory"):
        resolve_model(str(tmp_path))


def test_local_model_directory_is_used_as_is(tiny_model_dir):
    assert resolve_model(str(tiny_model_dir)) == tiny_model_dir


@pytest.fixture(scope="module")
def mlflow_store(tmp_path_factory, tiny_model_dir) -> dict[str, str]:
    """A real SQLite MLflow store with one finished run that logged the tiny model (slow:
    MLflow infers the model's requirements in a subprocess)."""
    root = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        experiment = mlflow.create_experiment("infer-test", (root / "artifacts").as_uri())
        with mlflow.start_run(experiment_id=experiment) as run:
            info = log_pyfunc_model(tiny_model_dir)
    finally:
        mlflow.set_tracking_uri(previous)
    return {"uri": uri, "run_id": run.info.run_id, "model_uri": info.model_uri,
            "model_dir": str(tiny_model_dir)}


@pytest.fixture
def registered(mlflow_store):
    """The store's model registered as ``ser`` version 1 with alias ``champion``; removed after."""
    client = MlflowClient(tracking_uri=mlflow_store["uri"])
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(mlflow_store["uri"])  # register_model resolves models:/ globally
    try:
        version = mlflow.register_model(mlflow_store["model_uri"], "ser")
        client.set_registered_model_alias("ser", "champion", version.version)
    finally:
        mlflow.set_tracking_uri(previous)
    yield mlflow_store
    client.delete_registered_model("ser")


def assert_is_the_tiny_model(directory: Path) -> None:
    spec = yaml.safe_load((directory / SPEC_FILE).read_text())
    assert spec["classes"] == CLASSES


@pytest.mark.slow
def test_runs_uri_resolves_to_the_logged_model_directory(mlflow_store):
    uri = f"runs:/{mlflow_store['run_id']}/model"
    assert_is_the_tiny_model(resolve_model(uri, mlflow_store["uri"]))


@pytest.mark.slow
def test_logged_model_id_uri_resolves(mlflow_store):
    assert_is_the_tiny_model(resolve_model(mlflow_store["model_uri"], mlflow_store["uri"]))


@pytest.mark.slow
@pytest.mark.parametrize("uri", ["models:/ser/1", "models:/ser@champion"])
def test_registered_version_and_alias_resolve(registered, uri):
    assert_is_the_tiny_model(resolve_model(uri, registered["uri"]))


@pytest.mark.slow
def test_default_is_the_newest_registered_version(registered):
    assert default_model_uri(registered["uri"]) == "models:/ser/1"


@pytest.mark.slow
def test_default_without_registry_is_the_newest_finished_runs_model(mlflow_store):
    assert default_model_uri(mlflow_store["uri"]) == mlflow_store["model_uri"]


@pytest.mark.slow
def test_unknown_registered_model_is_one_clear_error(mlflow_store):
    with pytest.raises(ModelNotFoundError, match="models:/nosuchmodel/1"):
        resolve_model("models:/nosuchmodel/1", mlflow_store["uri"])


@pytest.mark.slow
def test_a_registered_model_is_fetched_once_then_read_from_the_cache(registered, model_cache,
                                                                      tmp_path, capsys):
    wav = write_audio(tmp_path / "a.wav", short_speech())
    argv = ["--model", "models:/ser@champion", "--tracking-uri", registered["uri"], str(wav)]
    status, first, err = infer(capsys, *argv)
    assert status == 0 and "Downloading artifacts" not in err and "it/s" not in err
    artifacts = Path(registered["uri"].removeprefix("sqlite:///")).parent / "artifacts"
    hidden = artifacts.rename(artifacts.with_name("artifacts-hidden"))
    try:  # with the store's files gone, only the cache can answer
        status, second, err = infer(capsys, *argv)
    finally:
        hidden.rename(artifacts)
    assert status == 0 and second == first and "Downloading artifacts" not in err
    assert len(list(model_cache.iterdir())) == 1


@pytest.mark.slow
def test_only_the_model_directory_is_fetched(registered, model_cache):
    model_dir = resolve_model("models:/ser/1", registered["uri"])
    entry = model_dir.parent
    assert entry.parent == model_cache
    assert sorted(p.name for p in entry.iterdir()) == sorted(["MLmodel", SOURCE_FILE,
                                                              model_dir.name])
    assert sorted(p.name for p in model_dir.iterdir()) == sorted(
        p.name for p in Path(registered["model_dir"]).iterdir())
    assert_is_the_tiny_model(model_dir)


@pytest.mark.slow
def test_the_cache_entry_records_uri_version_run_and_model(registered):
    model_dir = resolve_model("models:/ser@champion", registered["uri"])
    source = json.loads((model_dir.parent / SOURCE_FILE).read_text())
    assert source["uri"] == "models:/ser@champion" and source["version"] == "1"
    assert source["name"] == "ser" and source["run_id"] == registered["run_id"]
    assert model_dir.parent.name == source["model_id"] == registered["model_uri"].split("/")[-1]


@pytest.mark.slow
def test_without_a_project_root_the_cache_is_in_the_working_folder(registered, tmp_path,
                                                                  monkeypatch):
    monkeypatch.delenv("SER_PIPELINE_ROOT")
    monkeypatch.chdir(tmp_path)
    model_dir = resolve_model("models:/ser/1", registered["uri"])
    assert model_dir.parent.parent == tmp_path / ".cache" / "models"


@pytest.mark.slow
def test_a_run_uri_and_a_registered_version_of_one_model_share_its_cache_entry(registered):
    by_run = resolve_model(f"runs:/{registered['run_id']}/model", registered["uri"])
    assert resolve_model("models:/ser/1", registered["uri"]) == by_run


@pytest.mark.slow
def test_a_damaged_cache_entry_is_fetched_again(registered):
    model_dir = resolve_model("models:/ser/1", registered["uri"])
    (model_dir / SPEC_FILE).unlink()
    assert resolve_model("models:/ser/1", registered["uri"]) == model_dir
    assert_is_the_tiny_model(model_dir)


@pytest.mark.slow
def test_cli_uses_the_default_store_model(registered, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registered["uri"])
    path = write_audio(tmp_path / "a.wav", short_speech())
    status, [record], _ = infer(capsys, str(path))
    assert status == 0 and sorted(record["scores"]) == CLASSES


def test_pyfunc_model_root_is_accepted_as_a_folder(tiny_model_dir, tmp_path):
    """The layout MLflow downloads: MLmodel naming the model_dir artifact's folder."""
    root = tmp_path / "pyfunc"
    shutil.copytree(tiny_model_dir, root / "artifacts" / "model")
    (root / "MLmodel").write_text(yaml.safe_dump({"flavors": {"python_function": {
        "artifacts": {"model_dir": {"path": "artifacts/model", "uri": "/elsewhere"}}}}}))
    assert resolve_model(str(root)) == root / "artifacts" / "model"
