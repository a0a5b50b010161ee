"""`mlflow models serve` with the project's model under bad input: every bad request is a 400
naming the problem, limits are stated, and the server keeps answering good requests.

One real server on 127.0.0.1 for the module, serving a model trained once on the synthetic
corpus; expected predictions come from the project's own Predictor on the same files.
"""

from __future__ import annotations

import base64
import io
import json
import subprocess
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from ser_pipeline.inference import Predictor
from ser_pipeline.pyfunc_model import MAX_AUDIO_BYTES, MAX_AUDIO_SECONDS, MAX_REQUEST_SECONDS
from tests.e2e import FAST, MLFLOW, free_port, project_env, run_script, store_uri, wait_for

pytestmark = pytest.mark.slow
HOUR_FRAMES = 3600 * 16000


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(invocations URL, project root, serving process): a trained, registered model served."""
    root = tmp_path_factory.mktemp("project")
    result = run_script("train.py", FAST, root)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    port = free_port()
    process = subprocess.Popen(
        [MLFLOW, "models", "serve", "-m", "models:/ser-synthetic-cnn_blstm_attn/1",
         "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)],
        cwd=root, env=project_env(root, MLFLOW_TRACKING_URI=store_uri(root)),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(f"http://127.0.0.1:{port}/ping", process, timeout_s=180)
        yield f"http://127.0.0.1:{port}/invocations", root, process
    finally:
        process.terminate()
        process.wait(timeout=30)


def post(url: str, body: bytes | dict) -> tuple[int, dict]:
    """(HTTP status, the JSON answer) of one request."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def frame(columns: list[str], *rows: list) -> dict:
    return {"dataframe_split": {"columns": columns, "data": [list(r) for r in rows]}}


def encoded(data: bytes) -> str:
    return base64.b64encode(data).decode()


def wav_bytes(wave: np.ndarray, sample_rate: int = 16000) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, wave, sample_rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def write_silence(target, frames: int, **format_options) -> None:
    """``frames`` of 16 kHz silence, written 10 s at a time (never all in memory)."""
    with sf.SoundFile(target, "w", 16000, 1, **format_options) as handle:
        block = np.zeros(160_000, dtype=np.int16)
        for start in range(0, frames, len(block)):
            handle.write(block[: frames - start])


def serving_worker(process: subprocess.Popen) -> int:
    """The pid of the uvicorn worker that ``mlflow models serve`` started (it holds the model)."""
    def tree(pid: int) -> list[int]:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        return [pid, *(p for child in children for p in tree(int(child)))]

    workers = [p for p in tree(process.pid) if b"uvicorn" in Path(f"/proc/{p}/cmdline").read_bytes()]
    assert len(workers) == 1, workers
    return workers[0]


def memory_kb(pid: int, field: str) -> int:
    """``VmRSS`` (resident now) or ``VmHWM`` (peak) of ``pid``, in kB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise KeyError(field)


def corpus_wavs(root: Path) -> list[Path]:
    return sorted((root / "data" / "synthetic" / "wav").rglob("*.wav"))


def assert_predictions_match_the_predictor(root: Path, wavs: list[Path], predictions: list[dict]
                                           ) -> None:
    predictor = Predictor.from_dir(next((root / "outputs").rglob("model/model.yaml")).parent)
    assert len(predictions) == len(wavs)
    for wav, prediction in zip(wavs, predictions, strict=True):
        own = predictor.predict_file(wav)
        assert prediction["emotion"] == own["emotion"]
        for name, score in own["scores"].items():
            assert prediction[f"score_{name}"] == pytest.approx(score, abs=1e-5)


def assert_bad_request(answer: tuple[int, dict], *fragments: str) -> None:
    status, body = answer
    assert status == 400, body
    assert body["error_code"] in {"INVALID_PARAMETER_VALUE", "BAD_REQUEST"}  # both are 400
    for fragment in fragments:
        assert fragment in body["message"], body["message"]


#: (request, what its message must say) for every small bad request
BAD_REQUESTS = {
    "malformed base64": (frame(["audio_base64"], ["UklGR!!not*base64"]),
                         ["row 0", "audio_base64 is not valid base64"]),
    "bytes that are not audio": (frame(["audio_base64"], [encoded(b"plain text, no audio " * 9)]),
                                 ["row 0", "audio_base64: not a readable audio file"]),
    "empty audio_base64": (frame(["audio_base64"], [""]),
                           ["row 0", "neither 'path' nor 'audio_base64' has a value"]),
    "misspelled column": (frame(["audio_b64"], [encoded(b"RIFF")]),
                          ["neither a 'path' nor an 'audio_base64' column", "spelling"]),
    "no column at all": ({"dataframe_records": [{}]},
                         ["neither a 'path' nor an 'audio_base64' column"]),
    "no rows": (frame(["path"]), ["no rows"]),
    "non-existent path": (frame(["path"], ["/nonexistent/speech.wav"]),
                          ["row 0", "/nonexistent/speech.wav: file not found"]),
    "a path that is not a string": ({"dataframe_records": [{"path": 7}]},
                                    ["row 0", "'path' must be a string"]),
    "both sources in one row": (frame(["path", "audio_base64"], ["/a.wav", encoded(b"RIFF")]),
                                ["row 0", "both 'path' and 'audio_base64'"]),
    "an empty body": (b"", ["valid JSON"]),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_request_is_a_400_naming_the_problem(served, case):
    url, _, _ = served
    body, fragments = BAD_REQUESTS[case]
    assert_bad_request(post(url, body), *fragments)


def test_a_later_bad_row_is_named_by_its_index(served):
    url, root, _ = served
    wav = str(corpus_wavs(root)[0])
    assert_bad_request(post(url, frame(["path"], [wav], [wav], ["/nowhere/x.wav"])),
                       "row 2: /nowhere/x.wav: file not found")


def test_an_hour_long_wav_is_refused_naming_the_size_limit(served):
    url, _, _ = served
    buffer = io.BytesIO()
    write_silence(buffer, HOUR_FRAMES, format="WAV", subtype="PCM_16")  # 115 MB
    body = (b'{"dataframe_split": {"columns": ["audio_base64"], "data": [["'
            + base64.b64encode(buffer.getbuffer()) + b'"]]}}')
    del buffer
    assert_bad_request(post(url, body), "row 0", f"the limit is {MAX_AUDIO_BYTES // 2**20} MiB")


def test_an_hour_of_compressed_audio_is_refused_naming_the_length_limit(served, tmp_path):
    """A few kilobytes of FLAC that would decode to an hour (230 MB of samples): the length is
    read from the header and refused before decoding."""
    url, _, process = served
    flac = tmp_path / "hour.flac"
    write_silence(flac, HOUR_FRAMES, format="FLAC", subtype="PCM_16")
    assert flac.stat().st_size < MAX_AUDIO_BYTES
    worker = serving_worker(process)
    Path(f"/proc/{worker}/clear_refs").write_text("5")  # the peak (VmHWM) restarts from now
    before = memory_kb(worker, "VmRSS")
    answer = post(url, frame(["audio_base64"], [encoded(flac.read_bytes())]))
    assert_bad_request(answer, "row 0", "3600 s of audio",
                       f"the limit is {MAX_AUDIO_SECONDS:g} s per row")
    assert memory_kb(worker, "VmHWM") - before < 50_000  # decoded, it would be 230 MB
    assert_bad_request(post(url, frame(["path"], [str(flac)])), "row 0", str(flac), "3600 s")


def test_a_request_longer_than_the_request_limit_is_refused(served, tmp_path):
    url, _, _ = served
    minute = tmp_path / "minute.wav"
    write_silence(minute, int(MAX_AUDIO_SECONDS * 16000), format="WAV")
    rows = int(MAX_REQUEST_SECONDS // MAX_AUDIO_SECONDS) + 1
    assert_bad_request(post(url, frame(["path"], *[[str(minute)]] * rows)),
                       f"more than {MAX_REQUEST_SECONDS:g} s", "fewer rows")


def test_twenty_concurrent_requests_are_all_answered_correctly(served):
    url, root, _ = served
    wavs = corpus_wavs(root)[:20]
    bodies = [frame(["audio_base64"], [encoded(w.read_bytes())]) for w in wavs]
    with ThreadPoolExecutor(max_workers=20) as pool:
        answers = list(pool.map(lambda body: post(url, body), bodies))
    assert [status for status, _ in answers] == [200] * 20
    assert_predictions_match_the_predictor(root, wavs, [a["predictions"][0] for _, a in answers])


def test_the_server_keeps_serving_after_every_bad_request(served):
    url, root, process = served
    for body, _ in BAD_REQUESTS.values():
        assert post(url, body)[0] == 400
    wavs = corpus_wavs(root)[:2]
    status, answer = post(url, frame(["path", "audio_base64"], [str(wavs[0]), ""],
                                     ["", encoded(wavs[1].read_bytes())]))
    assert status == 200 and process.poll() is None
    assert_predictions_match_the_predictor(root, wavs, answer["predictions"])
