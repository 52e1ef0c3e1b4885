"""matplotlib's backend: the command line draws with Agg (no display on a compute node);
importing landscape.plot leaves a backend already chosen alone, so a notebook that
imports it keeps its inline figures."""

from __future__ import annotations

import os
import subprocess
import sys

PROGRAM = """
import matplotlib
matplotlib.use("svg")  # as a notebook chooses its inline backend
import landscape.plot
print(matplotlib.get_backend())
from landscape.cli import main
main(["status", "no-such-surface.h5"])
print(matplotlib.get_backend())
"""


def test_plot_keeps_the_chosen_backend_and_the_cli_chooses_agg(tmp_path):
    """Before: importing landscape.plot switched any backend to Agg."""
    environment = {name: value for name, value in os.environ.items() if name != "MPLBACKEND"}
    found = subprocess.run(
        [sys.executable, "-c", PROGRAM],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert found.stdout.split() == ["svg", "Agg"], found.stderr
