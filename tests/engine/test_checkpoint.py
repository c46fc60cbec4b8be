import errno
import os
import time
from pathlib import Path

import pytest
import torch

from vfm.engine.checkpoint import (
    CheckpointError,
    check_keys,
    find_resume_checkpoint,
    load_checkpoint,
    load_model_state,
    remove_stale_temporaries,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from vfm.io import temporary_name


def test_round_trip_and_no_temp_left(tmp_path):
    m = torch.nn.Linear(3, 2)
    path = save_checkpoint({"model": m.state_dict(), "step": 7}, tmp_path / "ck" / "last.pt")
    assert os.listdir(tmp_path / "ck") == ["last.pt"]
    state = load_checkpoint(path)
    m2 = torch.nn.Linear(3, 2)
    load_model_state(m2, state["model"], path)
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), m2.state_dict().values()))
    assert state["step"] == 7


def _training_state(step: int) -> dict:
    return {"model": {"w": torch.full((4,), float(step))}, "optimizer": {}, "scaler": {}, "step": step,
            "epoch": 0, "rng": rng_state()}


def test_failed_write_midway_keeps_previous_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = save_checkpoint(_training_state(1), tmp_path / "last.pt")
    real_save = torch.save

    def disk_full_midway(obj, f, *a, **k):  # half the bytes reach the disk, then ENOSPC
        real_save(obj, f)
        f.truncate(f.tell() // 2)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", disk_full_midway)
    with pytest.raises(CheckpointError, match=r"could not write checkpoint .*last.pt.*No space left.*previous last.pt"):
        save_checkpoint(_training_state(2), path)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["last.pt"]  # no torn temporary left to fill the disk further
    assert load_checkpoint(path)["step"] == 1
    assert find_resume_checkpoint(tmp_path)[1]["step"] == 1


def test_truncated_checkpoint_is_never_chosen_for_resume(tmp_path):
    ckpt = tmp_path / "checkpoints"
    save_checkpoint(_training_state(8), ckpt / "epoch_0001.pt")
    time.sleep(0.01)
    last = save_checkpoint(_training_state(12), ckpt / "last.pt")
    assert find_resume_checkpoint(ckpt)[0] == last
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2])  # a copy cut short, a damaged disk
    path, state = find_resume_checkpoint(ckpt)
    assert path.name == "epoch_0001.pt" and state["step"] == 8
    # a readable file that is not a training state is skipped too
    torch.save({"model": {}}, ckpt / "last.pt")
    assert find_resume_checkpoint(ckpt)[0].name == "epoch_0001.pt"
    # nothing readable: an error that says how to start over, never a silent restart from scratch
    (ckpt / "epoch_0001.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="none of the 2 checkpoint.*trainer.resume=never"):
        find_resume_checkpoint(ckpt)
    assert find_resume_checkpoint(tmp_path / "nothing_here") is None


def test_stale_temporaries_are_removed(tmp_path):
    save_checkpoint(_training_state(1), tmp_path / "last.pt")
    (tmp_path / ".last.pt.tmp-4242").write_bytes(b"torn")  # a process killed while writing
    assert [p.name for p in remove_stale_temporaries(tmp_path)] == [".last.pt.tmp-4242"]
    assert os.listdir(tmp_path) == ["last.pt"]


def test_checkpoints_are_written_under_the_temporary_name_removed_as_stale(tmp_path, monkeypatch):
    written, real_save = [], torch.save

    def spy(obj, f, *a, **k):
        written.append(Path(f.name))
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", spy)
    save_checkpoint(_training_state(1), tmp_path / "last.pt")
    assert written == [temporary_name(tmp_path / "last.pt")]
    written[0].write_bytes(b"torn")  # as if killed while writing
    assert remove_stale_temporaries(tmp_path) == written


def test_strict_load_names_missing_key(tmp_path):
    m = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 2))
    state = m.state_dict()
    del state["1.bias"]
    with pytest.raises(CheckpointError, match=r"missing keys \['1.bias'\]"):
        load_model_state(m, state, "x.pt")
    with pytest.raises(CheckpointError, match=r"missing \['optimizer'"):
        check_keys({"model": {}}, "x.pt", required=("model", "optimizer"))
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")


def test_rng_state_round_trip():
    s = rng_state()
    a = torch.rand(3)
    set_rng_state(s)
    assert torch.equal(a, torch.rand(3))
