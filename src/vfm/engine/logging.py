"""TensorBoard logging (rank 0 only) behind a tiny interface, and a no-op stand-in."""

from __future__ import annotations

from pathlib import Path
from typing import Any


class NullLogger:
    """Logs nothing (`logger=none`, and every rank but 0)."""

    def __init__(self, save_dir: str | Path = ".") -> None:
        self.save_dir = save_dir

    def log_scalars(self, values: dict[str, float], step: int) -> None: ...
    def log_text(self, tag: str, text: str, step: int = 0) -> None: ...
    def log_image(self, tag: str, image: Any, step: int) -> None: ...
    def log_hparams(self, hparams: dict[str, Any], metrics: dict[str, float]) -> None: ...
    def close(self) -> None: ...


class TensorBoardLogger(NullLogger):
    """Writes event files under `<run_dir>/<subdir>`.

    Args:
        save_dir: the run directory (passed by the entry point).
        subdir: folder for the event files.
        flush_secs: how often pending events are written to disk.
    """

    def __init__(self, save_dir: str | Path = ".", subdir: str = "tb", flush_secs: int = 30) -> None:
        from torch.utils.tensorboard import SummaryWriter

        super().__init__(save_dir)
        self.log_dir = Path(save_dir) / subdir
        self.writer = SummaryWriter(log_dir=str(self.log_dir), flush_secs=flush_secs)

    def log_scalars(self, values: dict[str, float], step: int) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, float(v), step)

    def log_text(self, tag: str, text: str, step: int = 0) -> None:
        # Markdown code block keeps YAML indentation readable in TensorBoard's text tab.
        self.writer.add_text(tag, "```\n" + text + "\n```", step)

    def log_image(self, tag: str, image: Any, step: int) -> None:
        self.writer.add_image(tag, image, step)

    def log_hparams(self, hparams: dict[str, Any], metrics: dict[str, float]) -> None:
        clean = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in hparams.items()}
        self.writer.add_hparams(clean, {f"hparam/{k}": float(v) for k, v in metrics.items()}, run_name="hparams")

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()
