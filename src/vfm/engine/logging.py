"""TensorBoard logging (rank 0 only) behind a tiny interface, and a no-op stand-in."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter


class NullLogger:
    """Logs nothing (`logger=none`, and every rank but 0)."""

    def __init__(self, save_dir: str | Path = ".") -> None:
        self.save_dir = save_dir

    def start(self, step: int) -> None: ...
    def log_scalars(self, values: dict[str, float], step: int) -> None: ...
    def log_text(self, tag: str, text: str, step: int = 0) -> None: ...
    def log_image(self, tag: str, image: Any, step: int) -> None: ...
    def log_hparams(self, hparams: dict[str, Any], metrics: dict[str, float]) -> None: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...


class TensorBoardLogger(NullLogger):
    """Writes event files under `<run_dir>/<subdir>`.

    The trainer calls `start(step)` once it knows where training begins: on a resumed run, events
    an interrupted run wrote at or after that step are purged (TensorBoard's `purge_step`), so each
    step keeps exactly one value. Text logged before `start` is held until then.

    Args:
        save_dir: the run directory (passed by the entry point).
        subdir: folder for the event files.
        flush_secs: how often pending events are written to disk.
    """

    def __init__(self, save_dir: str | Path = ".", subdir: str = "tb", flush_secs: int = 30) -> None:
        super().__init__(save_dir)
        self.log_dir = Path(save_dir) / subdir
        self.flush_secs = flush_secs
        self._writer: SummaryWriter | None = None
        self._pending: list[tuple[str, str, int]] = []

    def start(self, step: int) -> None:
        """Open the event file; events at or after `step` from an earlier run are hidden."""
        from torch.utils.tensorboard import SummaryWriter

        if self._writer is not None:
            return
        self._writer = SummaryWriter(log_dir=str(self.log_dir), flush_secs=self.flush_secs, purge_step=step)
        for tag, text, at in self._pending:
            self.log_text(tag, text, at)
        self._pending.clear()

    @property
    def writer(self) -> SummaryWriter:
        if self._writer is None:  # used without the trainer (e.g. `evaluate`): nothing to purge
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.log_dir), flush_secs=self.flush_secs)
        return self._writer

    def log_scalars(self, values: dict[str, float], step: int) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, float(v), step)

    def log_text(self, tag: str, text: str, step: int = 0) -> None:
        if self._writer is None:
            self._pending.append((tag, text, step))
            return
        # Markdown code block keeps YAML indentation readable in TensorBoard's text tab.
        self.writer.add_text(tag, "```\n" + text + "\n```", step)

    def log_image(self, tag: str, image: Any, step: int) -> None:
        self.writer.add_image(tag, image, step)

    def log_hparams(self, hparams: dict[str, Any], metrics: dict[str, float]) -> None:
        clean = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in hparams.items()}
        self.writer.add_hparams(clean, {f"hparam/{k}": float(v) for k, v in metrics.items()}, run_name="hparams")

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is None and not self._pending:
            return
        self.writer.flush()
        self.writer.close()
