"""``landscape`` with a fault injected: the evaluator raises on its third point, as a GPU
that fails mid-run would. Launched as one rank of an MPI job by test_mpi."""

import sys

from landscape import cli, evaluators

evaluate_point = evaluators.LossAtPoint.__call__
calls = 0


def failing_on_third_point(self, a, b):
    global calls
    calls += 1
    if calls == 3:
        raise RuntimeError("injected fault: device lost")
    return evaluate_point(self, a, b)


evaluators.LossAtPoint.__call__ = failing_on_third_point
sys.exit(cli.main())
