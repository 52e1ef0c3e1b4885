"""``landscape`` with a fault injected: the loss evaluator raises on its third call, as a
GPU that fails mid-run would, whether it evaluates one point per call or several.
Launched as one rank of an MPI job by test_mpi."""

import sys

from landscape import cli, evaluators

calls = 0


def failing_on_third_call(evaluate):
    def failing(self, items):
        global calls
        calls += 1
        if calls == 3:
            raise RuntimeError("injected fault: device lost")
        return evaluate(self, items)

    return failing


for kind in (evaluators.PointByPoint, evaluators.SeveralPoints):
    kind.__call__ = failing_on_third_call(kind.__call__)
sys.exit(cli.main())
