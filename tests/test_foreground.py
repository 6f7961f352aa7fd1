"""Ctrl-C in `labctl run` / `sweep --local`: a flag the training loop acts on, so the
interrupt can never be lost (tests/test_run_interrupt.py sends a real SIGINT end to end)."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from labctl.cli.foreground import CtrlC, TerminalReporter


def test_first_press_stops_at_the_next_batch_second_press_at_once():
    with CtrlC() as ctrl_c:
        reporter = TerminalReporter(3, ctrl_c)
        reporter.ctrl_c.training = True
        reporter.on_batch(1, 1, 10)  # nothing pressed: trains on
        signal.raise_signal(signal.SIGINT)  # the handler only takes note
        assert ctrl_c.requested
        with pytest.raises(KeyboardInterrupt):
            reporter.on_batch(1, 2, 10)
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)


def test_a_press_during_evaluation_stops_after_the_epoch_line(capsys):
    with CtrlC() as ctrl_c:
        ctrl_c.training = True
        signal.raise_signal(signal.SIGINT)
        row = {"epoch": 1, "train_loss": 1.0, "test_loss": 1.0, "test_accuracy": 0.5,
               "test_f1_macro": 0.5, "epoch_seconds": 1.0, "images_per_second": 10.0}
        with pytest.raises(KeyboardInterrupt):
            TerminalReporter(3, ctrl_c).on_epoch(row)
    assert "epoch 1/3" in capsys.readouterr().err  # the finished epoch is still reported


def test_before_training_starts_a_press_interrupts_at_once():
    with CtrlC(), pytest.raises(KeyboardInterrupt):
        signal.raise_signal(signal.SIGINT)  # loading data: no batch loop to stop yet


def test_a_press_landing_in_a_finaliser_is_not_lost():
    # Python's own KeyboardInterrupt raised inside __del__ is printed and dropped; the job
    # then trained to the end and exited 0. The flag survives.
    class Finalised:
        def __del__(self):
            signal.raise_signal(signal.SIGINT)

    with CtrlC() as ctrl_c:
        ctrl_c.training = True
        Finalised()
        assert ctrl_c.requested
        with pytest.raises(KeyboardInterrupt):
            TerminalReporter(3, ctrl_c).on_batch(1, 1, 10)


def test_the_previous_handler_is_restored():
    before = signal.getsignal(signal.SIGINT)
    with CtrlC():
        assert signal.getsignal(signal.SIGINT) is not before
    assert signal.getsignal(signal.SIGINT) is before


def test_after_the_last_epoch_a_press_interrupts_at_once():
    row = {"epoch": 3, "train_loss": 1.0, "test_loss": 1.0, "test_accuracy": 0.5,
           "test_f1_macro": 0.5, "epoch_seconds": 1.0, "images_per_second": 10.0}
    with CtrlC() as ctrl_c:
        ctrl_c.training = True
        TerminalReporter(3, ctrl_c).on_epoch(row)  # the final artefacts come next
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)


def test_sigterm_is_handled_like_ctrl_c():
    before = signal.getsignal(signal.SIGTERM)
    with CtrlC() as ctrl_c:
        ctrl_c.training = True
        signal.raise_signal(signal.SIGTERM)
        assert ctrl_c.requested
    assert signal.getsignal(signal.SIGTERM) is before


def test_ctrl_c_while_the_commands_import_exits_130_in_one_line():
    # The console script imports the commands inside its handler (cli:main).
    interrupt_import = (
        "import sys\n"
        "class Cut:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'labctl.cli.main':\n"
        "            raise KeyboardInterrupt\n"
        "sys.meta_path.insert(0, Cut())\n"
        "import labctl.cli\n"
        "labctl.cli.main()\n")
    done = subprocess.run([sys.executable, "-c", interrupt_import], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 130
    assert done.stderr.strip() == "labctl: interrupted"
