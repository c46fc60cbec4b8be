"""Loading a file never runs code from it: every checkpoint, teacher, tokenizer, resume and
fine-tuning file goes through `vfm.io.load_torch` (`torch.load(weights_only=True)`). A file whose
pickle would run a command is refused with one line naming it and the opt-in
(`VFM_TRUST_CHECKPOINTS=1`); our own files, as `pretrain` and fine-tuning write them, load.
"""

from __future__ import annotations

import os
import random
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from conftest import TINY, TINY_BASE, tiny_method_overrides
from vfm.engine.checkpoint import CheckpointError, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from vfm.evaluators.finetune_state import FORMAT, ValSelection
from vfm.io import TRUST_ENV, UnreadableFileError, UntrustedFileError, load_torch

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
ENV.pop(TRUST_ENV, None)


class _RunsACommand:
    """Unpickling this calls os.system: what a malicious checkpoint does."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def malicious_checkpoint(path: Path, marker: Path) -> Path:
    """A `.pt` that looks like a checkpoint and whose pickle would `touch marker`."""
    torch.save({"model": {"w": torch.zeros(2)}, "step": 1, "payload": _RunsACommand(f"touch {shlex.quote(str(marker))}")},
               path)
    return path


def test_a_file_that_would_run_code_is_refused_before_it_runs(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    evil = malicious_checkpoint(tmp_path / "evil.pt", marker)
    monkeypatch.delenv(TRUST_ENV, raising=False)
    with pytest.raises(UntrustedFileError) as info:
        load_torch(evil)
    message = str(info.value)
    assert str(evil) in message and "system" in message and f"{TRUST_ENV}=1" in message and "\n" not in message
    assert not marker.exists()
    with pytest.raises(UntrustedFileError):  # resume/evaluate read through the same function
        load_checkpoint(evil)
    assert not marker.exists()
    # the payload is real: with the documented opt-in the file loads, and its command runs
    monkeypatch.setenv(TRUST_ENV, "1")
    assert load_torch(evil)["step"] == 1 and marker.exists()


def test_our_checkpoint_with_rng_state_loads_with_weights_only(tmp_path):
    """A checkpoint as `pretrain` writes it (the format before loading went weights-only): the
    model, an optimizer that has stepped, the grad scaler, Python's, NumPy's and torch's RNG
    states, the history, the config as plain types."""
    model = nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    random.random(), np.random.rand(), torch.rand(1)
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scaler": torch.amp.GradScaler("cpu").state_dict(),
             "step": 5, "epoch": 1, "steps_per_epoch": 4, "rng": rng_state(),
             "history": [{"epoch": 1, "loss": 0.5, "images_per_s": 10.0}], "lr_rule": "lr = blr * 64 / 256",
             "config": {"backbone": {"name": "vit_tiny_patch16_224", "img_size": 28}, "optim": {"blr": 1e-3}},
             "encoder_prefix": "backbone."}
    save_checkpoint(state, tmp_path / "last.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1))

    loaded = load_checkpoint(tmp_path / "last.pt")
    assert torch.equal(loaded["model"]["weight"], model.weight) and loaded["config"] == state["config"]
    assert loaded["optimizer"]["state"][0]["exp_avg"].equal(opt.state_dict()["state"][0]["exp_avg"])
    assert loaded["history"] == state["history"] and loaded["scaler"] == state["scaler"]
    set_rng_state(loaded["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected


def test_a_fine_tuning_best_pt_loads_back(tmp_path):
    model = nn.Linear(3, 2)
    fingerprint = {"epochs": 2, "blr": 1e-3, "crop_scale": [0.08, 1.0], "encoder_digest": "abc"}
    ValSelection(lambda: 75.0, model, tmp_path / "best.pt", fingerprint, select=True)(model, 1)
    other = nn.Linear(3, 2)
    selection = ValSelection(lambda: 0.0, other, tmp_path / "best.pt", fingerprint, select=True)
    selection.restore(resumed=True)
    assert (selection.best_top1, selection.best_epoch) == (75.0, 1)
    assert selection.load_best() == 1 and torch.equal(other.weight, model.weight)
    assert load_torch(tmp_path / "best.pt")["format"] == FORMAT


def test_a_file_that_is_not_a_checkpoint_is_named_in_one_line(tmp_path):
    text = tmp_path / "notes.pt"
    text.write_text("hello, these are my notes\n")
    with pytest.raises(UnreadableFileError, match=rf"^{text} is not a PyTorch checkpoint: .*begins with b'hello"):
        load_torch(text)
    with pytest.raises(CheckpointError, match="is not a PyTorch checkpoint"):
        load_checkpoint(text)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(UnreadableFileError, match="is not a PyTorch checkpoint: it is empty"):
        load_torch(empty)


# ---------------------------------------------------------------------------------------------
# Through the command line, as a user meets it
# ---------------------------------------------------------------------------------------------

QUICK = ["trainer.max_steps=1", "evaluator=[]", "eval.baseline=false", "trainer.precision=fp32"]


def _command(entry: str, file: Path, run_dir: Path) -> list[str]:
    artifacts = {"teacher": file, "tokenizer": file}
    overrides = {
        "evaluate": [f"checkpoint={file}", *TINY_BASE[:3], "evaluator=[knn]", "trainer.device=cpu"],
        "teacher": [*tiny_method_overrides("eva", artifacts), *QUICK],
        "tokenizer": [*tiny_method_overrides("beit", artifacts), *QUICK],
        "resume": [*TINY, f"trainer.resume={file}", *QUICK],
    }[entry]
    module = "vfm.evaluate" if entry == "evaluate" else "vfm.pretrain"
    return [sys.executable, "-m", module, *overrides, f"hydra.run.dir={run_dir}"]


def _one_line_error(proc: subprocess.CompletedProcess, file: Path) -> str:
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert "Traceback" not in out, out
    errors = [line for line in proc.stderr.splitlines() if line.startswith("config error: ")]
    assert len(errors) == 1 and str(file) in errors[0], out
    return errors[0]


@pytest.mark.parametrize("entry", ["evaluate", "teacher", "tokenizer", "resume"])
def test_cli_refuses_a_checkpoint_that_would_run_a_command(entry, tmp_path):
    marker = tmp_path / "pwned"
    evil = malicious_checkpoint(tmp_path / "evil.pt", marker)
    proc = subprocess.run(_command(entry, evil, tmp_path / "run"), capture_output=True, text=True, timeout=300, env=ENV)
    line = _one_line_error(proc, evil)
    assert "system" in line and f"{TRUST_ENV}=1" in line
    assert not marker.exists()


def test_cli_names_a_text_file_that_is_not_a_checkpoint(tmp_path):
    text = tmp_path / "weights.pt"
    text.write_text("not weights\n")
    proc = subprocess.run(_command("evaluate", text, tmp_path / "run"), capture_output=True, text=True, timeout=300,
                          env=ENV)
    assert f"{text} is not a PyTorch checkpoint" in _one_line_error(proc, text)
