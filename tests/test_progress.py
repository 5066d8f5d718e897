"""Progress bars (utils.logger.progress_bar): redrawn in place on a terminal; written to a file (a SLURM job's
stderr, a pipe) as plain lines, a few a run, not a carriage-return redraw per batch piled onto one line."""
import io
import sys

import utils.logger
from conftest import Terminal
from utils.logger import progress_bar


def test_a_bar_into_a_file_writes_whole_ascii_lines(monkeypatch):
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    monkeypatch.setattr(utils.logger, "FILE_BAR_SECONDS", 0)  # a line at every update
    for _ in progress_bar(range(4), desc="epoch 1"):
        pass
    text = stream.getvalue()
    lines = text.splitlines()
    assert "\r" not in text and text.endswith("\n") and text.isascii()
    assert len(lines) >= 4 and all(line.startswith("epoch 1:") for line in lines)
    assert lines[-1].startswith("epoch 1: 100%") and "4/4" in lines[-1]


def test_a_short_loop_writes_nothing_into_a_file(monkeypatch):
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    with progress_bar(total=1000, desc="eval", unit="batch") as bar:
        for _ in range(1000):
            bar.update()
    assert stream.getvalue() == ""  # under FILE_BAR_SECONDS: the log line that follows says it all


def test_a_bar_on_a_terminal_is_redrawn_in_place_and_cleared(monkeypatch):
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    for _ in progress_bar(range(3), desc="epoch 1", mininterval=0):
        pass
    text = terminal.getvalue()
    assert text.count("\r") >= 4 and "\n" not in text  # redraws, then cleared (leave=False)
    assert "epoch 1:" in text and text.rstrip("\r").endswith(" ")


def test_a_bar_in_a_jupyter_notebook_is_redrawn_as_on_a_terminal(monkeypatch):
    """A notebook's output stream (ipykernel's OutStream) says it is no terminal but shows carriage returns as
    redraws: a library user's bar there stays a bar."""
    notebook_stream = type("OutStream", (io.StringIO,), {"__module__": "ipykernel.iostream"})()
    monkeypatch.setattr(sys, "stderr", notebook_stream)
    for _ in progress_bar(range(3), desc="eval", mininterval=0):
        pass
    assert notebook_stream.getvalue().count("\r") >= 4
