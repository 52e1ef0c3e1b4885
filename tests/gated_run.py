"""``landscape`` whose evaluator stops at a gate: ``gated_run.py GATE POINTS ARGS...`` runs
``landscape ARGS...``, and each process, before evaluating its point number ``POINTS``
(counting from 0), creates ``GATE.reached.<pid>`` and waits until the file ``GATE`` exists.

The process then holds its lock and has saved exactly the shards before that point, for as
long as the test wants: no race with a run that ends too soon (test_locking,
test_interrupt). A signal interrupts the wait as it would an evaluation.
"""

import os
import sys
import time
from pathlib import Path

from landscape import cli, workers

gate, points, *arguments = sys.argv[1:]
gate = Path(gate)
load_evaluator = workers.load_evaluator


def gated_load_evaluator(*args, **kwargs):
    evaluate = load_evaluator(*args, **kwargs)
    evaluated = 0

    def gated(items):
        nonlocal evaluated
        if evaluated <= int(points) < evaluated + len(items):
            gate.with_name(f"{gate.name}.reached.{os.getpid()}").touch()
            while not gate.exists():
                time.sleep(0.01)
        evaluated += len(items)
        return evaluate(items)

    return gated


workers.load_evaluator = gated_load_evaluator
sys.exit(cli.main(arguments))
