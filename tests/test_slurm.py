"""SLURM-native process groups: torchrun's variables derived from a multi-task SLURM step."""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TINY
from vfm import distributed as vdist

# task 11 (the 4th on the second node) of a 2-node x 8-task step, as srun exports it
STEP = {
    "SLURM_NTASKS": "16",
    "SLURM_PROCID": "11",
    "SLURM_LOCALID": "3",
    "SLURM_JOB_ID": "1234567",
    "SLURM_JOB_NODELIST": "gpu[007-008]",
}


@pytest.fixture
def no_scontrol(monkeypatch):
    """The pure-Python host list parser, whatever this machine has on its PATH."""
    monkeypatch.setattr(vdist.shutil, "which", lambda name: None)


@pytest.mark.parametrize(
    "nodelist, hosts",
    [
        ("localhost", ["localhost"]),
        ("node[01-03,07],gpu5", ["node01", "node02", "node03", "node07", "gpu5"]),
        ("gpu5,node[1-2]", ["gpu5", "node1", "node2"]),
        ("n[098-101]", ["n098", "n099", "n100", "n101"]),
        ("n[8-10]", ["n8", "n9", "n10"]),
        ("a[1-2]-ib,b[0003]", ["a1-ib", "a2-ib", "b0003"]),
        ("rack[1-2]-n[08-09]", ["rack1-n08", "rack1-n09", "rack2-n08", "rack2-n09"]),
    ],
)
def test_expand_nodelist(nodelist, hosts):
    assert vdist.expand_nodelist(nodelist) == hosts


def test_slurm_env_from_a_multi_task_step(no_scontrol):
    env = vdist.slurm_env({**STEP, "SLURM_JOB_NODELIST": "node[01-03,07],gpu5"})
    assert env == {"RANK": "11", "WORLD_SIZE": "16", "LOCAL_RANK": "3",
                   "MASTER_ADDR": "node01", "MASTER_PORT": str(20000 + 1234567 % 20000)}


def test_step_nodelist_preferred_and_overrides_kept(no_scontrol):
    env = vdist.slurm_env({**STEP, "SLURM_STEP_NODELIST": "gpu[010-011]"})
    assert env is not None and env["MASTER_ADDR"] == "gpu010"
    env = vdist.slurm_env({**STEP, "MASTER_ADDR": "head", "MASTER_PORT": "29501"})
    assert env is not None and (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("head", "29501")


def test_port_differs_between_jobs_and_stays_in_range(no_scontrol):
    ports = {int(vdist.slurm_env({**STEP, "SLURM_JOB_ID": str(j)})["MASTER_PORT"]) for j in range(1000, 1100)}
    assert len(ports) == 100 and all(20000 <= p < 40000 for p in ports)


def test_scontrol_is_asked_when_present(tmp_path, monkeypatch):
    fake = tmp_path / "scontrol"
    fake.write_text("#!/bin/sh\n[ \"$1 $2 $3\" = 'show hostnames odd{syntax}' ] && printf 'head1\\nhead2\\n'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert vdist.slurm_env({**STEP, "SLURM_JOB_NODELIST": "odd{syntax}"})["MASTER_ADDR"] == "head1"


@pytest.mark.parametrize(
    "extra",
    [
        {"RANK": "0", "WORLD_SIZE": "2"},  # torchrun inside SLURM (srun per node): torchrun's ranks
        {"WORLD_SIZE": "8"},
        {"SLURM_NTASKS": "1"},  # a single-task sbatch / srun: nothing to derive
    ],
)
def test_torchrun_and_single_task_are_left_alone(extra, no_scontrol):
    assert vdist.slurm_env({**STEP, **extra}) is None


def test_not_under_slurm():
    assert vdist.slurm_env({}) is None
    assert vdist.slurm_env({"SLURM_NTASKS": "4"}) is None  # an salloc shell: no task of a step


def test_env_world_size_agrees(monkeypatch, no_scontrol):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    for key, value in STEP.items():
        monkeypatch.setenv(key, value)
    assert vdist.env_world_size() == 16
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert vdist.env_world_size() == 2
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.delenv("RANK")
    assert vdist.env_world_size() == 1


def _free_port() -> int:
    """A port in the SLURM-derived range that nothing listens on now."""
    for _ in range(100):
        port = random.randrange(vdist.SLURM_PORT_BASE, vdist.SLURM_PORT_BASE + vdist.SLURM_PORT_SPAN)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port")


@pytest.mark.slow
def test_two_process_gloo_from_slurm_variables(tmp_path):
    """Two tasks of a fake SLURM step, started as plain `python -m vfm.pretrain` (no torchrun), form
    one process group: the rendezvous port is the one derived from the job id."""
    run = tmp_path / "slurm"
    job_id = 3_000_000 + _free_port() - vdist.SLURM_PORT_BASE  # 3_000_000 % 20000 == 0
    cmd = [sys.executable, "-m", "vfm.pretrain", *TINY, "trainer.max_epochs=1", "eval.baseline=false",
           "evaluator=[]", "logger=none", f"hydra.run.dir={run}"]
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    base = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("SLURM_")}
    base.update(OMP_NUM_THREADS="1", SLURM_NTASKS="2", SLURM_JOB_NODELIST="localhost", SLURM_JOB_ID=str(job_id))
    procs = [
        subprocess.Popen(cmd, env={**base, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r)},
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for r in range(2)
    ]
    try:
        outputs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]
    assert "2 process(es) x 32 images" in (Path(run) / "pretrain.log").read_text()
    assert (run / "checkpoints" / "last.pt").is_file()
