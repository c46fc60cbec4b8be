"""Bad input a new user types ends in one line naming the key and the fix, exit code 2, no traceback.

Values out of range are checked in-process through `validate_pretrain` (what the command runs
first); every distinct error path (a value, a misspelt key, an unwritable run directory, too
little data, undecodable data, `evaluate`) also runs as a real command.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TINY, compose_cfg
from vfm.cli import check_command_line, run_or_exit
from vfm.config import ConfigError, validate_pretrain
from vfm.config_ranges import COUNT, NON_NEGATIVE, PROBABILITY, rule_for

# (override, key the message must name): each was accepted, or ended in a traceback, before
BAD_VALUES = [
    ("optim.blr=-1", "optim.blr"),
    ("optim.blr=0", "optim.blr"),
    ("optim.lr=-0.001", "optim.lr"),
    ("optim.min_lr=-1", "optim.min_lr"),
    ("optim.weight_decay=-1", "optim.weight_decay"),
    ("optim.weight_decay_end=-0.1", "optim.weight_decay_end"),
    ("optim.warmup_epochs=-1", "optim.warmup_epochs"),
    ("optim.eps=0", "optim.eps"),
    ("optim.betas=[0.9,1.5]", "optim.betas"),
    ("method.out_dim=0", "method.out_dim"),
    ("method.hidden_dim=-4", "method.hidden_dim"),
    ("method.student_temp=0", "method.student_temp"),
    ("method.center_momentum=1.5", "method.center_momentum"),
    ("method.schedules.teacher_temp.value=0", "method.schedules.teacher_temp.value"),
    ("method.schedules.teacher_momentum.base=2", "method.schedules.teacher_momentum.base"),
    ("method.augment.n_global=0", "method.augment.n_global"),
    ("method.augment.n_local=-1", "method.augment.n_local"),
    ("method.augment.flip_p=1.5", "method.augment.flip_p"),
    ("method.augment.blur_p=[1.0,0.1,2.0]", "method.augment.blur_p"),
    ("method.augment.global_scale=[0.0,1.0]", "method.augment.global_scale"),
    ("trainer.num_workers=-3", "trainer.num_workers"),
    ("trainer.max_epochs=0", "trainer.max_epochs"),
    ("trainer.batch_size=0", "trainer.batch_size"),
    ("trainer.accum_steps=0", "trainer.accum_steps"),
    ("trainer.log_every_n_steps=0", "trainer.log_every_n_steps"),
    ("trainer.prefetch_factor=0", "trainer.prefetch_factor"),
    ("trainer.seed=-1", "trainer.seed"),
    ("trainer.device=gpu", "trainer.device"),
    ("trainer.device=cuda:x", "trainer.device"),
    ("eval.batch_size=0", "eval.batch_size"),
    ("eval.every_n_epochs=-1", "eval.every_n_epochs"),
    ("evaluator.knn.k=0", "evaluator.knn.k"),
    ("evaluator.knn.temperature=0", "evaluator.knn.temperature"),
    ("evaluator.linear.epochs=0", "evaluator.linear.epochs"),
    ("evaluator.linear.lrs=[0.1,-1.0]", "evaluator.linear.lrs"),
    ("backbone.patch_size=0", "backbone.patch_size"),
    ("backbone.drop_path_rate=1.0", "backbone.drop_path_rate"),
    ("dataset.num_train=0", "dataset.num_train"),
]


@pytest.mark.parametrize("override,key", BAD_VALUES, ids=[o for o, _ in BAD_VALUES])
def test_value_out_of_range_names_key_and_fix(override, key):
    with pytest.raises(ConfigError) as info:
        validate_pretrain(compose_cfg(TINY + [override]))
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{key}=") and f"set {key} to " in message


def test_every_value_of_the_tiny_run_is_allowed():
    validate_pretrain(compose_cfg(TINY))
    validate_pretrain(compose_cfg(TINY + ["trainer.device=cpu", "optim.lr=0.01", "trainer.max_steps=1"]))


def test_rules_put_the_specific_pattern_first():
    assert rule_for("optim.warmup_epochs") is NON_NEGATIVE and rule_for("trainer.max_epochs") is COUNT
    assert rule_for("method.schedules.freeze_last_layer.epochs") is NON_NEGATIVE
    assert rule_for("method.augment.blur_p") is PROBABILITY and rule_for("dataset.templates") is None
    assert rule_for("paths.output_dir") is None and rule_for("method.init_logit_scale") is None


def test_cuda_device_that_is_not_there(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"trainer\.device=cuda:1 but 0 CUDA device\(s\) are visible; use trainer\.device=auto or cpu"):
        validate_pretrain(compose_cfg(TINY + ["trainer.device=cuda:1"]))


@pytest.mark.parametrize("argv,message", [
    (["trainer.max_epoch=3"], "unknown key trainer.max_epoch. Did you mean trainer.max_epochs?"),
    (["trainr.max_epochs=3"], "Did you mean trainer.max_epochs?"),
    (["method=mae", "method.decoder_dimm=8"], "Did you mean method.decoder_dim?"),
    (["trainer.unheard_of_key=1"], "trainer has no 'unheard_of_key' (it has max_epochs, batch_size"),
    (["-m", "optim.blr=1e-3,5e-4", "hydra.sweep.dir=/proc/vfm-sweep"], "run directory /proc/vfm-sweep is not writable"),
])
def test_command_line_checked_before_hydra(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        check_command_line("pretrain", argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("config error: ") and message in err


def test_command_line_left_to_hydra(tmp_path):
    # a group option that does not exist (Hydra lists the options), or a valid command: no exit,
    # and no folder is left behind
    check_command_line("pretrain", ["method=no_such_method", f"hydra.run.dir={tmp_path}/a"])
    check_command_line("pretrain", [f"hydra.run.dir={tmp_path}/b"])
    check_command_line("pretrain", ["-m", "method=dino,mae", f"hydra.sweep.dir={tmp_path}/s"])
    check_command_line("pretrain", ["--help"])
    assert list(tmp_path.iterdir()) == []


def test_error_from_a_dataloader_worker_is_one_line(capsys):
    from vfm.data.datasets.bad_files import ImageDecodeError

    def run(cfg):
        raise ImageDecodeError("Caught ImageDecodeError in DataLoader worker process 0.\nOriginal Traceback (most "
                               "recent call last):\n  File \"x.py\", line 1\nvfm.ImageDecodeError: cannot decode a.png")

    with pytest.raises(SystemExit) as info:
        run_or_exit(run, None)
    assert info.value.code == 2 and capsys.readouterr().err == "data error: cannot decode a.png\n"


@pytest.mark.parametrize("overrides,message", [
    (["evaluator=[knn]", "eval.periodic=[linear]"],
     r"^eval\.periodic=\[linear\] names linear, not among this run's evaluator=\[knn\]; set eval\.periodic=\[knn\] "
     r"or eval\.every_n_epochs=0$"),
    (["eval.periodic=[]"], r"^eval\.periodic=\[\] runs nothing every eval\.every_n_epochs=1 epochs; set eval\.periodic=\[knn\]"),
])
def test_periodic_evaluators_are_some_of_the_runs(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate_pretrain(compose_cfg(TINY + ["eval.every_n_epochs=1", *overrides]))
    validate_pretrain(compose_cfg(TINY + overrides))  # no evaluation during training: not read


def test_run_directory_and_data_errors_in_process(tmp_path):
    from vfm.pretrain import run

    with pytest.raises(ConfigError, match=r"run directory /proc/vfm-out is not writable .*set paths\.output_dir="):
        run(compose_cfg(TINY, Path("/proc/vfm-out")))
    with pytest.raises(ConfigError, match=r"^dataset \(vfm\.data\.datasets\.imagefolder\): .*Set dataset\.root"):
        run(compose_cfg(TINY[1:] + ["dataset=imagefolder", f"dataset.root={tmp_path}/none", "dataset.img_size=28",
                                    "dataset.in_chans=1", "dataset.mean=[0.5]", "dataset.std=[0.25]"], tmp_path / "r"))
    with pytest.raises(ConfigError, match=r"^eval\.every_n_epochs=1 evaluates on the validation split during "
                                          r"training, but dataset synthetic has none; .* or set eval\.every_n_epochs=0$"):
        run(compose_cfg(TINY + ["eval.every_n_epochs=1", "dataset.num_val=0"], tmp_path / "v"))
    assert not (tmp_path / "v" / "checkpoints").exists()  # refused before training


def _garbage_images(root: Path, n: int = 20) -> Path:
    root.mkdir(parents=True)
    for i in range(n):
        (root / f"img{i:02d}.png").write_bytes(b"not an image " * 8)
    return root


def _folder_overrides(root: Path) -> list[str]:
    return TINY[1:] + ["dataset=unlabeled_folder", f"dataset.root={root}", "dataset.img_size=28", "dataset.load_size=28",
                       "dataset.in_chans=1", "dataset.mean=[0.5]", "dataset.std=[0.25]", "evaluator=[]",
                       "trainer.batch_size=16"]


def test_bad_files_fail_is_a_data_error(tmp_path):
    from vfm.data.datasets.bad_files import ImageDecodeError
    from vfm.pretrain import run

    root = _garbage_images(tmp_path / "imgs")
    with pytest.raises(ImageDecodeError, match="dataset.bad_files=skip"):
        run(compose_cfg(_folder_overrides(root) + ["dataset.bad_files=fail"], tmp_path / "r"))


# (name, command, what its one error line must contain): one per error path, run as a user runs it
COMMANDS = [
    ("value", ["vfm.pretrain", "optim.blr=-1"], "optim.blr=-1 is not allowed: set optim.blr to a value > 0"),
    ("typo", ["vfm.pretrain", "trainer.max_epoch=3"], "Did you mean trainer.max_epochs?"),
    ("run_dir", ["vfm.pretrain", "hydra.run.dir=/proc/foo"],
     "run directory /proc/foo is not writable (No such file or directory): set hydra.run.dir=... to a writable folder "
     "or paths.output_dir=..."),
    ("small_data", ["vfm.pretrain", "dataset.num_train=16"], "has 16 images, fewer than one batch of trainer.batch_size=64"),
    ("undecodable", ["vfm.pretrain"], "dataset.root="),
    ("evaluate_device", ["vfm.evaluate", "checkpoint=random", "trainer.device=gpu"],
     "trainer.device='gpu' is not allowed: set trainer.device to one of auto, cpu, cuda, cuda:N"),
]
HELP = ["vfm.pretrain", "vfm.evaluate"]


@pytest.fixture(scope="module")
def command_results(tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    """Every command above and `--help` of both entry points, started together: each process
    spends its few seconds importing, so they overlap instead of queueing."""
    tmp = tmp_path_factory.mktemp("commands")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    argvs = {f"help:{m}": ["-m", m, "--help"] for m in HELP}
    for name, (module, *overrides), _ in COMMANDS:
        base = TINY if module == "vfm.pretrain" else ["dataset=synthetic"]
        if name == "undecodable":
            base = _folder_overrides(_garbage_images(tmp / "imgs"))
        run_dir = [] if any(o.startswith("hydra.run.dir=") for o in overrides) else [f"hydra.run.dir={tmp}/{name}"]
        argvs[name] = ["-m", module, *base, *overrides, *run_dir]
    procs = {name: subprocess.Popen([sys.executable, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True, env=env) for name, argv in argvs.items()}
    results = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        results[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    return results


@pytest.mark.parametrize("name,expected", [(c[0], c[2]) for c in COMMANDS], ids=[c[0] for c in COMMANDS])
def test_command_fails_with_one_line(name, expected, command_results):
    proc = command_results[name]
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert "Traceback" not in out and "+trainer.max_epoch" not in out, out
    errors = [line for line in out.splitlines() if line.startswith(("config error:", "data error:"))]
    assert len(errors) == 1 and expected in errors[0], out
    assert errors[0] in proc.stderr.splitlines()


@pytest.mark.parametrize("module", HELP)
def test_help_is_a_short_usage(module, command_results):
    proc = command_results[f"help:{module}"]
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) < 40, proc.stdout
    assert sum("checkpoint=" in line or " -m " in line or "torchrun" in line for line in lines) >= 3
    assert "Config groups" in proc.stdout and "backbone:" in proc.stdout and "evaluator:" in proc.stdout
    assert "$APP_CONFIG_GROUPS" not in proc.stdout and "Powered by Hydra" not in proc.stdout
