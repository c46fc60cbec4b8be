"""The trainer's own guarantees on a toy method (the fault tests in tests/test_faults.py run the
whole `pretrain` entry point)."""

from __future__ import annotations

import functools

import pytest
import torch

import vfm.engine.trainer as vtrainer
from conftest import Regression
from conftest import regression_collate as collate
from vfm.data.datasets import TensorImageDataset
from vfm.engine.device import map_tensors
from vfm.engine.optim import OptimSpec
from vfm.engine.trainer import Trainer


def fit(tmp_path, precision: str, **kw):
    torch.manual_seed(0)
    data = TensorImageDataset(torch.randint(0, 256, (64, 1, 4, 4), dtype=torch.uint8), torch.randint(0, 2, (64,)))
    method = Regression()
    trainer = Trainer(max_epochs=1, batch_size=8, precision=precision, device="cpu", progress=False, **kw)
    history = []
    steps = {"n": 0}
    real_clip = vtrainer.clip_gradients

    def record(params, *a, **k):  # the weights entering each optimizer step
        history.append(method.net.weight.detach().clone())
        steps["n"] += 1
        return real_clip(params, *a, **k)

    vtrainer.clip_gradients = record
    try:
        out = trainer.fit(method, data, collate, optim=OptimSpec(blr=0.1, warmup_epochs=0), schedules={}, run_dir=tmp_path)
    finally:
        vtrainer.clip_gradients = real_clip
    return out, method, history


def test_fp16_overflow_steps_are_skipped_by_the_scaler(tmp_path, monkeypatch, caplog):
    # a loss scale of 2^19 overflows fp16 gradients: the scaler skips those updates and halves
    # the scale until the gradients fit, and training goes on (no non-finite-loss stop)
    monkeypatch.setattr(torch.amp, "GradScaler", functools.partial(torch.amp.GradScaler, init_scale=2.0**19))
    caplog.set_level("DEBUG", logger="vfm.engine.trainer")
    out, method, before_step = fit(tmp_path, "fp16")
    skipped = [r.getMessage() for r in caplog.records if "gradient overflow" in r.getMessage()]
    assert out["step"] == 8 and 1 <= len(skipped) < 8, skipped
    n = len(skipped)
    assert "at step 0, update skipped" in skipped[0]
    # the skipped steps left the weights exactly as they were; the first finite one moved them
    for i in range(n):
        assert torch.equal(before_step[i], before_step[0])
    assert not torch.equal(method.net.weight, before_step[0])
    state = torch.load(tmp_path / "checkpoints/last.pt", weights_only=False)
    assert state["scaler"]["scale"] == pytest.approx(2.0 ** (19 - n))


def test_fp32_is_unaffected_by_the_scaler(tmp_path):
    out, method, before_step = fit(tmp_path, "fp32")
    assert out["step"] == 8
    assert all(not torch.equal(a, b) for a, b in zip(before_step, before_step[1:]))


def test_channels_last_converts_image_batches_only():
    batch = {"crops": [torch.randn(2, 3, 8, 8)], "label": torch.tensor([0, 1]), "tokens": torch.randint(0, 9, (2, 1, 4, 4))}
    out = vtrainer.channels_last_batch(batch)
    assert out["crops"][0].is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out["crops"][0], batch["crops"][0])
    assert out["tokens"].is_contiguous()  # integer tensors are left alone
    assert torch.equal(out["label"], batch["label"])


def test_map_tensors_keeps_the_containers_and_what_is_not_a_tensor():
    batch = {"crops": [torch.ones(2), torch.zeros(1)], "pair": (torch.ones(1), 3), "seed": 7, "text": ["a cat"]}
    out = map_tensors(lambda t: t + 1, batch)
    assert isinstance(out["crops"], list) and isinstance(out["pair"], tuple)
    assert torch.equal(out["crops"][0], torch.full((2,), 2.0)) and torch.equal(out["pair"][0], torch.full((1,), 2.0))
    assert out["pair"][1] == 3 and out["seed"] == 7 and out["text"] == ["a cat"]
    assert vtrainer.to_device(batch, torch.device("cpu"))["seed"] == 7


def _tiny_data():
    return TensorImageDataset(torch.randint(0, 256, (64, 1, 4, 4), dtype=torch.uint8), torch.randint(0, 2, (64,)))


@pytest.mark.parametrize(("eval_last_epoch", "expected"), [(False, [1, 2]), (True, [1, 2, 3])])
def test_evaluate_fn_after_the_last_epoch_only_on_request(tmp_path, eval_last_epoch, expected):
    seen = []
    trainer = Trainer(max_epochs=3, batch_size=16, precision="fp32", device="cpu", progress=False)
    out = trainer.fit(
        Regression(), _tiny_data(), collate, optim=OptimSpec(blr=0.1, warmup_epochs=0), schedules={},
        run_dir=tmp_path, evaluate_fn=lambda enc, epoch: seen.append(epoch) or {"acc": 1.0},
        eval_every_n_epochs=1, eval_last_epoch=eval_last_epoch,
    )
    assert seen == expected
    assert [h.get("acc") for h in out["history"]] == [1.0] * len(expected) + [None] * (3 - len(expected))


def _single_on_rank0(rank: int, port: int, run_dir: str) -> None:
    """Rank 0 trains alone under strategy=single while rank 1 waits at a barrier: any collective
    issued by the training would pair with that barrier and fail or hang (the timeout)."""
    import datetime

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    try:
        if rank == 0:
            trainer = Trainer(max_epochs=2, batch_size=16, precision="fp32", device="cpu", progress=False,
                              strategy="single")
            out = trainer.fit(Regression(), _tiny_data(), collate, optim=OptimSpec(blr=0.1, warmup_epochs=0),
                              schedules={}, run_dir=run_dir, evaluate_fn=lambda enc, epoch: {"acc": 1.0},
                              eval_every_n_epochs=1, eval_last_epoch=True)
            # the whole dataset in this process: 64 images / 16 = 4 steps per epoch
            assert out["steps_per_epoch"] == 4 and out["step"] == 8, out
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_strategy_single_trains_on_one_rank_of_a_process_group(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_single_on_rank0, args=(port, str(tmp_path)), nprocs=2, join=True)
    state = torch.load(tmp_path / "checkpoints/last.pt", weights_only=False)
    assert state["step"] == 8 and state["steps_per_epoch"] == 4


def test_curve_keeps_its_points_across_a_resume_without_repeating_one(tmp_path):
    """Each evaluation is a point {epoch, step, metrics} of <run>/curves.json. A run stopped after
    step 6 (the point of epoch 1, step 4, was written) and resumed there keeps that point; a point
    left by evaluations past the checkpoint (a run killed before its next checkpoint) is dropped
    and measured again; the resumed run adds epochs 2 and 3 once each."""
    from vfm.engine.curves import add_point, read_curve

    curves = tmp_path / "curves.json"
    evaluated: list[tuple[int, int]] = []

    def train(**kw):
        trainer = Trainer(max_epochs=3, batch_size=16, precision="fp32", device="cpu", progress=False, **kw)
        return trainer.fit(
            Regression(), _tiny_data(), collate, optim=OptimSpec(blr=0.1, warmup_epochs=0), schedules={},
            run_dir=tmp_path, evaluate_fn=lambda enc, epoch: evaluated.append(epoch) or {"acc": 10.0 * epoch},
            eval_every_n_epochs=1, eval_last_epoch=True, eval_curves=curves,
        )

    train(max_steps=6)  # 4 steps per epoch: stops in epoch 2, checkpoint at step 6
    assert read_curve(curves) == [{"epoch": 1, "step": 4, "metrics": {"acc": 10.0}}]
    add_point(curves, 1.75, 7, {"acc": -1.0})  # measured on weights no checkpoint holds
    train()
    assert evaluated == [1, 2, 3]
    assert read_curve(curves) == [{"epoch": e, "step": 4 * e, "metrics": {"acc": 10.0 * e}} for e in (1, 2, 3)]
    train()  # already finished: nothing evaluated, nothing lost
    assert evaluated == [1, 2, 3] and len(read_curve(curves)) == 3
