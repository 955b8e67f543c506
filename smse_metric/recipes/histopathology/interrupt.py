"""Ctrl-C for a training loop: the first SIGINT / SIGTERM becomes a flag polled between
steps, so the loop can write its checkpoint before it stops."""

from __future__ import annotations

import signal
import threading
from pathlib import Path

__all__ = ["Interrupt", "TrainingInterrupted"]


class TrainingInterrupted(Exception):
    """Raised after Ctrl-C (SIGINT / SIGTERM) once the checkpoint is written.

    Args:
        checkpoint: the ``last.pt`` written before stopping.
        epoch: the epoch interrupted, from 0 (the message counts from 1, as the
            per-epoch lines do).
        step: the step of that epoch reached, from 0 (the message counts from 1).

    Examples:
        >>> from pathlib import Path
        >>> e = TrainingInterrupted(Path("runs/a/checkpoints/last.pt"), epoch=3, step=17)
        >>> str(e).split(";")[0]
        'interrupted at epoch 4 step 18'
    """

    def __init__(self, checkpoint: Path, epoch: int, step: int) -> None:
        super().__init__(
            f"interrupted at epoch {epoch + 1} step {step + 1}; checkpoint saved to "
            f"{checkpoint}; continue with --resume"
        )
        self.checkpoint, self.epoch, self.step = checkpoint, epoch, step


class Interrupt:
    """Turns the first SIGINT / SIGTERM into a flag the loop polls between steps; a
    second SIGINT interrupts at once. Installs nothing outside the main thread.

    Examples:
        >>> with Interrupt() as interrupt:
        ...     interrupt.requested  # polled between steps
        False
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> Interrupt:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
