"""Ctrl-C in a training loop: a flag first, an interrupt on the second SIGINT."""

import os
import signal
from pathlib import Path

import pytest

from smse_metric.recipes.histopathology.interrupt import Interrupt, TrainingInterrupted


def test_the_first_signal_sets_a_flag_the_second_sigint_interrupts():
    before = signal.getsignal(signal.SIGINT)
    with Interrupt() as interrupt:
        assert not interrupt.requested
        os.kill(os.getpid(), signal.SIGTERM)
        assert interrupt.requested  # no exception: the loop finishes its step
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored


def test_the_message_counts_from_one_and_names_the_checkpoint():
    e = TrainingInterrupted(Path("r/checkpoints/last.pt"), epoch=0, step=4)
    assert str(e).startswith("interrupted at epoch 1 step 5;")
    assert "r/checkpoints/last.pt" in str(e) and "--resume" in str(e)
