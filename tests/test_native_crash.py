"""A native crash during or after Lightning training prints the Python stacks (faulthandler)."""

from __future__ import annotations

import subprocess
import sys

import pytest

#: a tiny fit (whose teardown restores SIGSEGV's default handler), then a segfault
CRASH_AFTER_FIT = """
import ctypes, sys
import pytorch_lightning as pl, torch
from ser_pipeline.callbacks import report_native_crashes

class Tiny(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)
    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).sum()
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

report_native_crashes()
data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.ones(4, 2)))
pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
           enable_model_summary=False).fit(Tiny(), data)
if sys.argv[1] == "re-armed":
    report_native_crashes()
ctypes.string_at(0)  # SIGSEGV
"""


def crash(mode: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CRASH_AFTER_FIT, mode], capture_output=True,
                          text=True, timeout=300)


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_lightnings_teardown_silences_faulthandler_and_re_arming_restores_it():
    silent = crash("after-teardown")
    assert silent.returncode != 0 and "Fatal Python error" not in silent.stderr
    reported = crash("re-armed")
    assert reported.returncode != 0
    assert "Fatal Python error: Segmentation fault" in reported.stderr
    assert "File \"<string>\"" in reported.stderr  # the Python stack of the crash


def test_a_stderr_without_a_file_descriptor_falls_back_to_the_processs_own(monkeypatch):
    import faulthandler
    import io

    from ser_pipeline.callbacks import report_native_crashes

    monkeypatch.setattr(sys, "stderr", io.StringIO())  # as under capsys: no fileno()
    report_native_crashes()
    assert faulthandler.is_enabled()
