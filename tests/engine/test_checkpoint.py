import os

import pytest
import torch

from vfm.engine.checkpoint import (
    CheckpointError,
    check_keys,
    load_checkpoint,
    load_model_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
)


def test_round_trip_and_no_temp_left(tmp_path):
    m = torch.nn.Linear(3, 2)
    path = save_checkpoint({"model": m.state_dict(), "step": 7}, tmp_path / "ck" / "last.pt")
    assert os.listdir(tmp_path / "ck") == ["last.pt"]
    state = load_checkpoint(path)
    m2 = torch.nn.Linear(3, 2)
    load_model_state(m2, state["model"], path)
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), m2.state_dict().values()))
    assert state["step"] == 7


def test_failed_write_keeps_previous_file(tmp_path, monkeypatch):
    path = save_checkpoint({"step": 1}, tmp_path / "last.pt")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError):
        save_checkpoint({"step": 2}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1


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
