"""`hydra/sweeper=vfm` (the default of `pretrain -m` / `evaluate -m`): Hydra's basic sweeper plus
what a long sweep needs.

- **Every job's config is checked before any job starts**: the same validation a single run does
  (`vfm.config.validate_pretrain` / `validate_evaluate`), so an invalid combination found at job 7
  does not cost the hours of jobs 1-6 first.
- **Finished jobs are skipped**: a job whose run directory already holds `metrics.json` is not run
  again, so re-running a sweep after a failure or a lost machine only runs what is missing
  (unfinished jobs resume from their last checkpoint). `hydra.sweeper.skip_finished=false` reruns all.
- **Partial failure**: a failing job does not stop the others. At the end the sweeper writes
  `<sweep dir>/sweep_summary.json` and `.md` (overrides, status, error, log of every job), names
  the failed jobs and their logs, and exits with status 1.

Works with any launcher (basic, submitit_local, submitit_slurm): it only decides which jobs to
give the launcher and reads back what the launcher returns.
"""

# no `from __future__ import annotations`: Hydra loads this module outside sys.modules while
# scanning for plugins, and dataclasses cannot resolve string annotations there
import logging
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

log = logging.getLogger(__name__)


@dataclass
class VfmSweeperConf:
    _target_: str = "hydra_plugins.vfm_sweeper.vfm_sweeper.VfmSweeper"
    max_batch_size: Any = None  # jobs handed to the launcher at once (None: all)
    skip_finished: bool = True
    validate: bool = True
    params: Any = None  # like the basic sweeper's `hydra.sweeper.params`


ConfigStore.instance().store(group="hydra/sweeper", name="vfm", node=VfmSweeperConf, provider="vfm")


def _validate(cfg: DictConfig) -> None:
    """The checks a single run of the job's task makes before it starts (pretrain / evaluate)."""
    from vfm import config as vconfig
    from vfm import distributed as vdist

    task, task_cfg = str(cfg.get("task", "")), OmegaConf.masked_copy(cfg, [k for k in cfg.keys() if k != "hydra"])
    if task == "pretrain":
        vconfig.validate_pretrain(task_cfg, vdist.env_world_size())
    elif task == "evaluate":
        vconfig.validate_evaluate(task_cfg)


class VfmSweeper(Sweeper):
    def __init__(self, max_batch_size: int | None = None, skip_finished: bool = True, validate: bool = True,
                 params: dict[str, str] | None = None) -> None:
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

        self._basic = BasicSweeper(max_batch_size=max_batch_size, params=params)
        self.max_batch_size, self.skip_finished, self.validate = max_batch_size, skip_finished, validate
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.launcher: Any = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:  # noqa: D102
        self._basic.setup(hydra_context=hydra_context, task_function=task_function, config=config)
        self.config, self.hydra_context, self.launcher = config, hydra_context, self._basic.launcher

    # ------------------------------------------------------------------ job list
    def _jobs(self, arguments: list[str]) -> list[list[str]]:
        assert self.hydra_context is not None
        params = self._basic._parse_config()
        params.extend(arguments)
        overrides = OverridesParser.create(config_loader=self.hydra_context.config_loader).parse_overrides(params)
        batches = self._basic.split_arguments(overrides, None)
        return [list(job) for batch in batches for job in batch]

    def _job_config(self, job: list[str], idx: int) -> tuple[DictConfig, Path]:
        """The job's composed config and run directory, as the launcher will make them."""
        assert self.config is not None and self.hydra_context is not None
        cfg = self.hydra_context.config_loader.load_sweep_config(self.config, job)
        with open_dict(cfg):
            cfg.hydra.job.id, cfg.hydra.job.num = idx, idx
        saved = HydraConfig.instance().cfg
        HydraConfig.instance().set_config(cfg)  # ${hydra:...} in paths resolve against this job
        try:
            out = Path(str(cfg.hydra.sweep.dir)) / str(cfg.hydra.sweep.subdir)
            with read_write(cfg.hydra.runtime), open_dict(cfg.hydra.runtime):  # as run_job sets it
                cfg.hydra.runtime.output_dir = str(out.resolve())
            HydraConfig.instance().set_config(cfg)
            if self.validate:
                _validate(cfg)
        finally:
            HydraConfig.instance().cfg = saved  # type: ignore[assignment]
        return cfg, out

    # ------------------------------------------------------------------ sweep
    def sweep(self, arguments: list[str]) -> Any:
        from vfm.config import ConfigError

        assert self.config is not None and self.launcher is not None
        jobs = self._jobs(arguments)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        dirs, errors = [], []
        for idx, job in enumerate(jobs):
            try:
                _, out = self._job_config(job, idx)
            except ConfigError as e:
                errors.append(f"  #{idx} {' '.join(filter_overrides(job))}: {e}")
                continue
            dirs.append(out)
        if errors:
            msg = f"{len(errors)} of {len(jobs)} sweep jobs have an invalid config; no job was started:\n" + "\n".join(errors)
            print(f"config error: {msg}", flush=True)
            raise SystemExit(2)
        log.info("sweep of %d jobs -> %s (all configs valid)", len(jobs), sweep_dir)

        records: list[dict[str, Any]] = [
            {"overrides": filter_overrides(job), "dir": str(d), "status": "pending", "error": None,
             "log": str(d / f"{self.config.hydra.job.name}.log")}
            for job, d in zip(jobs, dirs)
        ]
        todo = []
        for i, rec in enumerate(records):
            if self.skip_finished and (Path(rec["dir"]) / "metrics.json").is_file():
                rec["status"] = "skipped"
                log.info("  #%d %s: finished earlier (%s/metrics.json), skipped", i, " ".join(rec["overrides"]), rec["dir"])
            else:
                todo.append(i)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")

        returns: list[list[JobReturn]] = []
        size = self.max_batch_size or len(todo) or 1
        for start in range(0, len(todo), size):
            chunk = todo[start:start + size]
            try:
                results = self.launcher.launch([jobs[i] for i in chunk], initial_job_idx=chunk[0])
            except Exception as e:  # a launcher-level failure (e.g. SLURM rejected the submission)
                for i in chunk:
                    records[i].update(status="failed", error=f"launcher: {type(e).__name__}: {e}")
                continue
            for i, r in zip(chunk, results):
                self._record(records[i], r)
            returns.append(list(results))
            self._write_summary(sweep_dir, records)  # visible while the sweep runs
        self._write_summary(sweep_dir, records)

        failed = [r for r in records if r["status"] == "failed"]
        done = sum(r["status"] in ("completed", "skipped") for r in records)
        log.info("sweep: %d of %d jobs finished (%d skipped as already done), %d failed; summary in %s",
                 done, len(records), sum(r["status"] == "skipped" for r in records), len(failed),
                 sweep_dir / "sweep_summary.md")
        if failed:
            lines = [f"  {' '.join(r['overrides'])}: {r['error']}\n    log: {r['log']}" for r in failed]
            print(f"{len(failed)} of {len(records)} sweep jobs failed (the others finished):\n" + "\n".join(lines),
                  flush=True)
            raise SystemExit(1)
        return returns

    @staticmethod
    def _record(rec: dict[str, Any], ret: JobReturn) -> None:
        if ret.status == JobStatus.COMPLETED:
            rec["status"] = "completed"
            return
        err = ret._return_value  # the exception run_job caught
        rec["status"] = "failed"
        rec["error"] = f"{type(err).__name__}: {err}".splitlines()[0][:500] if err is not None else "unknown"
        job_dir = Path(rec["dir"])
        if isinstance(err, BaseException) and job_dir.is_dir():
            text = "".join(traceback.format_exception(type(err), err, err.__traceback__))
            (job_dir / "error.txt").write_text(text)
            rec["traceback"] = str(job_dir / "error.txt")

    @staticmethod
    def _write_summary(sweep_dir: Path, records: list[dict[str, Any]]) -> None:
        from vfm.io import atomic_write_json, atomic_write_text

        atomic_write_json(sweep_dir / "sweep_summary.json", {"jobs": records})
        lines = ["| # | overrides | status | error | log |", "|---|---|---|---|---|"]
        for i, r in enumerate(records):
            lines.append(f"| {i} | `{' '.join(r['overrides'])}` | {r['status']} | {r['error'] or ''} | "
                         f"{r['log'] if r['status'] == 'failed' else ''} |")
        atomic_write_text(sweep_dir / "sweep_summary.md", "\n".join(lines) + "\n")
