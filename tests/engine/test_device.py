"""`precision=auto`: bf16 where a bf16 matrix product is faster than fp32 (a CUDA device with
native bf16, a CPU where it measures >= 1.2x fp32), else fp32; explicit precisions are used as
given. The CPU's measurement and the GPU's capabilities are mocked, so every branch runs on any
machine."""

from __future__ import annotations

import logging
from contextlib import nullcontext

import pytest
import torch
from torch import nn

import vfm.engine.device as vdevice
import vfm.engine.trainer as vtrainer
from conftest import Regression, compose_cfg
from conftest import regression_collate as collate
from vfm.data.datasets import TensorImageDataset
from vfm.engine.device import cpu_bf16_speedup, describe_precision, resolve_precision
from vfm.engine.optim import OptimSpec
from vfm.engine.trainer import Trainer
from vfm.evaluators.features import extract_features
from vfm.evaluators.finetune import FineTune

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)
SLOW_CPU = "this CPU runs bf16 matrix products at 0.50x fp32"
FAST_CPU = "this CPU runs bf16 matrix products at 2.00x fp32"


@pytest.fixture
def amx(monkeypatch: pytest.MonkeyPatch):
    """`amx(True)`: this CPU runs bf16 matrix products at 2x fp32 (AMX-BF16, Zen 4); `amx(False)`:
    at 0.5x (AVX512-BF16 without AMX)."""
    return lambda fast: monkeypatch.setattr(vdevice, "cpu_bf16_speedup", lambda: 2.0 if fast else 0.5)


@pytest.fixture
def cuda_bf16(monkeypatch: pytest.MonkeyPatch):
    """`cuda_bf16(native)`: a CUDA device whose native bf16 support is `native`; returns the
    keyword arguments `torch.cuda.is_bf16_supported` was asked with."""
    asked: list[dict] = []

    def make(native: bool) -> list[dict]:
        def supported(**kw) -> bool:
            asked.append(kw)
            # torch's default counts bf16 that a pre-Ampere GPU only emulates (slowly) as support
            return native or kw.get("including_emulation", True)

        monkeypatch.setattr(torch.cuda, "is_bf16_supported", supported)
        monkeypatch.setattr(torch.cuda, "device", lambda device: nullcontext())
        return asked

    return make


# ---------------------------------------------------------------------- resolve_precision
def test_auto_on_a_cpu_with_amx_is_bf16(amx) -> None:
    amx(True)
    assert resolve_precision("auto", CPU) == ("bf16", FAST_CPU)


def test_auto_on_a_cpu_without_amx_is_fp32(amx) -> None:
    amx(False)
    assert resolve_precision("auto", CPU) == ("fp32", SLOW_CPU)


def test_auto_on_cuda_follows_native_bf16_support(cuda_bf16) -> None:
    asked = cuda_bf16(True)
    assert resolve_precision("auto", CUDA) == ("bf16", "CUDA device with bf16 support")
    assert asked == [{"including_emulation": False}]


def test_auto_on_cuda_without_native_bf16_is_fp32(cuda_bf16) -> None:
    cuda_bf16(False)  # e.g. a V100 or T4: bf16 only emulated
    assert resolve_precision("auto", CUDA) == ("fp32", "CUDA device without native bf16 support")


def test_auto_on_another_device_is_fp32() -> None:
    chosen, reason = resolve_precision("auto", torch.device("mps"))
    assert chosen == "fp32" and reason.startswith("mps device")


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("has_amx", [True, False])
def test_explicit_precisions_are_used_as_given(amx, cuda_bf16, precision: str, has_amx: bool) -> None:
    amx(has_amx)
    cuda_bf16(not has_amx)
    for device in (CPU, CUDA):
        chosen, reason = resolve_precision(precision, device)
        assert chosen == precision and reason.startswith("as configured")


def test_explicit_bf16_on_a_cpu_without_amx_says_it_is_slower(amx) -> None:
    amx(False)
    assert resolve_precision("bf16", CPU) == ("bf16", "as configured; this CPU runs bf16 matrix products at 0.50x fp32")


def test_unknown_precision_is_refused() -> None:
    with pytest.raises(ValueError, match=r"precision must be one of \['auto', 'fp32', 'bf16', 'fp16'\], got 'fp8'"):
        resolve_precision("fp8", CPU)


def test_log_line() -> None:
    assert describe_precision("auto", "fp32", SLOW_CPU) == f"precision auto -> fp32 ({SLOW_CPU})"
    assert describe_precision("bf16", "bf16", "as configured") == "precision bf16 (as configured)"


# ---------------------------------------------------------------------- measuring the CPU
@pytest.fixture
def fresh_cpu_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VFM_CACHE_DIR", str(tmp_path))
    cpu_bf16_speedup.cache_clear()
    yield tmp_path
    cpu_bf16_speedup.cache_clear()  # the next test sees the real CPU again


def test_speedup_is_measured_once_per_machine_and_kept(monkeypatch, fresh_cpu_cache) -> None:
    timings = {torch.float32: 0.010, torch.bfloat16: 0.004}
    calls: list[torch.dtype] = []

    def fake(dtype: torch.dtype, repeats: int = 3) -> float:
        calls.append(dtype)
        return timings[dtype]

    monkeypatch.setattr(vdevice, "_matmul_seconds", fake)
    assert cpu_bf16_speedup() == pytest.approx(2.5)
    assert resolve_precision("auto", CPU) == ("bf16", "this CPU runs bf16 matrix products at 2.50x fp32")
    cpu_bf16_speedup.cache_clear()  # a new process on the same machine: read from the file
    assert cpu_bf16_speedup() == pytest.approx(2.5) and len(calls) == 2
    assert (fresh_cpu_cache / "cpu_bf16_speedup.json").is_file()


@pytest.mark.parametrize("speedup, chosen", [(0.5, "fp32"), (1.1, "fp32"), (1.2, "bf16"), (2.2, "bf16")])
def test_bf16_only_when_clearly_faster(monkeypatch, speedup: float, chosen: str) -> None:
    monkeypatch.setattr(vdevice, "cpu_bf16_speedup", lambda: speedup)
    assert resolve_precision("auto", CPU)[0] == chosen


def test_real_measurement_is_a_positive_ratio(fresh_cpu_cache) -> None:
    assert cpu_bf16_speedup() > 0


# ---------------------------------------------------------------------- the trainer
def fit_and_log(tmp_path, monkeypatch, caplog, precision: str) -> tuple[Trainer, list[str], list[str]]:
    """Train 2 steps on the CPU; return the trainer, the precision lines it logged, and the
    precision every forward was autocast to."""
    forwards: list[str] = []
    real = vtrainer.autocast
    monkeypatch.setattr(vtrainer, "autocast", lambda p, device: forwards.append(p) or real(p, device))
    data = TensorImageDataset(torch.randint(0, 256, (16, 1, 4, 4), dtype=torch.uint8), torch.randint(0, 2, (16,)))
    trainer = Trainer(max_epochs=1, batch_size=8, precision=precision, device="cpu", progress=False)
    with caplog.at_level(logging.INFO, logger="vfm.engine.trainer"):
        trainer.fit(Regression(), data, collate, optim=OptimSpec(blr=0.1, warmup_epochs=0), schedules={}, run_dir=tmp_path)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("precision")]
    return trainer, lines, forwards


def test_trainer_defaults_to_auto() -> None:
    assert Trainer().precision == "auto"


@pytest.mark.parametrize("has_amx, chosen, reason", [(False, "fp32", SLOW_CPU), (True, "bf16", FAST_CPU)])
def test_trainer_logs_its_choice_once_and_trains_in_it(tmp_path, monkeypatch, caplog, amx, has_amx, chosen, reason) -> None:
    amx(has_amx)
    trainer, lines, forwards = fit_and_log(tmp_path, monkeypatch, caplog, "auto")
    assert lines == [f"precision auto -> {chosen} ({reason})"]
    assert trainer.run_precision == chosen and trainer.precision == "auto"
    assert forwards == [chosen, chosen]  # 16 images, batch 8: two steps


def test_trainer_uses_an_explicit_precision_as_given(tmp_path, monkeypatch, caplog, amx) -> None:
    amx(True)
    _, lines, forwards = fit_and_log(tmp_path, monkeypatch, caplog, "fp32")
    assert lines == ["precision fp32 (as configured)"] and forwards == ["fp32", "fp32"]


def test_trainer_refuses_an_unknown_precision() -> None:
    with pytest.raises(ValueError, match="trainer.precision must be one of .*'auto'"):
        Trainer(precision="fp8")


def test_a_resumed_run_keeps_the_precision_auto_chose_when_it_started(tmp_path, monkeypatch, caplog, amx) -> None:
    """16 images, batch 8, 2 epochs: stopped after step 2 on a CPU measured fast at bf16, resumed
    after the measurement says fp32 (another machine, or noise near the threshold)."""
    forwards: list[str] = []
    real = vtrainer.autocast
    monkeypatch.setattr(vtrainer, "autocast", lambda p, device: forwards.append(p) or real(p, device))
    data = TensorImageDataset(torch.randint(0, 256, (16, 1, 4, 4), dtype=torch.uint8), torch.randint(0, 2, (16,)))

    def fit(precision: str, **kw) -> None:
        trainer = Trainer(max_epochs=2, batch_size=8, precision=precision, device="cpu", progress=False, **kw)
        trainer.fit(Regression(), data, collate, optim=OptimSpec(blr=0.1, warmup_epochs=0), schedules={}, run_dir=tmp_path)

    amx(True)
    fit("auto", max_steps=2)
    assert torch.load(tmp_path / "checkpoints/last.pt", weights_only=False)["precision"] == "bf16"
    amx(False)
    with caplog.at_level(logging.INFO, logger="vfm.engine.trainer"):
        fit("auto")
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("precision")]
    assert lines == ["precision auto -> bf16 (chosen when the run started, kept from last.pt)"]
    assert forwards == ["bf16"] * 4  # steps 1-2, then 3-4 resumed
    assert torch.load(tmp_path / "checkpoints/last.pt", weights_only=False)["step"] == 4


def test_an_explicit_precision_wins_over_the_checkpoints(tmp_path, monkeypatch, caplog, amx) -> None:
    amx(True)
    fit_and_log(tmp_path, monkeypatch, caplog, "auto")  # one epoch, in bf16
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vfm.engine.trainer"):
        trainer = Trainer(max_epochs=2, batch_size=8, precision="fp32", device="cpu", progress=False)
        data = TensorImageDataset(torch.randint(0, 256, (16, 1, 4, 4), dtype=torch.uint8), torch.randint(0, 2, (16,)))
        trainer.fit(Regression(), data, collate, optim=OptimSpec(blr=0.1, warmup_epochs=0), schedules={}, run_dir=tmp_path)
    assert trainer.run_precision == "fp32"
    assert [r.getMessage() for r in caplog.records] == [
        "last.pt was trained in bf16, this run continues in fp32 (trainer.precision=fp32)"]


@pytest.mark.parametrize("rank", [0, 1])
def test_auto_precision_is_rank_0s_choice_on_every_process(monkeypatch, rank: int) -> None:
    """Under DDP rank 0 resolves "auto" and broadcasts it: rank 1 takes it without measuring its
    own CPU (the collective is simulated: no process group in a unit test)."""
    import vfm.distributed as vdist
    from vfm.engine.strategy import DDP

    sent: list[object] = []

    def broadcast_object_list(box: list, src: int = 0) -> None:
        assert src == 0
        if rank == 0:
            sent.append(box[0])
        else:
            assert box == [None]
            box[0] = ("bf16", FAST_CPU)  # what rank 0 sent

    monkeypatch.setattr(vdist, "is_dist", lambda: True)
    monkeypatch.setattr(vdist, "get_rank", lambda: rank)
    monkeypatch.setattr(vdist, "get_world_size", lambda: 2)
    monkeypatch.setattr(torch.distributed, "broadcast_object_list", broadcast_object_list)
    monkeypatch.setattr(vdevice, "cpu_bf16_speedup", lambda: 2.0 if rank == 0 else pytest.fail("rank 1 measured"))
    strategy = DDP(CPU)
    assert Trainer(precision="auto")._resolve_precision(strategy, None) == "bf16"
    assert sent == ([("bf16", FAST_CPU)] if rank == 0 else [])
    assert Trainer(precision="fp32")._resolve_precision(strategy, None) == "fp32"  # as given: no collective
    assert len(sent) == (1 if rank == 0 else 0)


def test_configs_default_to_auto() -> None:
    for name, extra in (("pretrain", []), ("evaluate", ["checkpoint=random"])):
        cfg = compose_cfg(extra, config_name=name)
        assert cfg.trainer.precision == "auto" and cfg.eval.precision == "auto", name


# ---------------------------------------------------------------------- the evaluators
class Features(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(3 * 8 * 8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x.flatten(1))


@pytest.mark.parametrize("has_amx, same_as", [(False, "fp32"), (True, "bf16")])
def test_features_resolve_auto_like_the_trainer(amx, has_amx: bool, same_as: str) -> None:
    amx(has_amx)
    torch.manual_seed(0)
    enc = Features()
    ds = TensorImageDataset(torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8), torch.arange(6))
    kw = dict(mean=(0.5,) * 3, std=(0.25,) * 3, batch_size=4, progress=False)
    auto, _ = extract_features(enc, ds, precision="auto", **kw)
    expected, _ = extract_features(enc, ds, precision=same_as, **kw)
    assert torch.equal(auto, expected)


def test_finetune_accepts_auto() -> None:
    assert FineTune(precision="auto").precision == "auto"
    with pytest.raises(ValueError, match="precision must be one of"):
        FineTune(precision="fp8")
