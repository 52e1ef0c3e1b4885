"""``landscape`` whose planner, about to write the surface file, waits until another
planner says it waits for the lock, then says which plan it wrote: two planners started
at once are sure to overlap. Launched by test_locking as ``slow_plan.py plan CONFIG``."""

import logging
import sys
import time
from pathlib import Path

from landscape import cli, plan
from landscape.store import SurfaceFile

create_surface_file = plan.create_surface_file
WAITING = Path(sys.argv[2]).with_suffix(".waiting")  # created by the planner that waits


class SayWaiting(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        if "waiting for another landscape job" in record.getMessage():
            WAITING.touch()


def slow_create_surface_file(path, *args):
    deadline = time.monotonic() + 120
    while not WAITING.exists():
        assert time.monotonic() < deadline, "no other planner waited in 120 s"
        time.sleep(0.01)
    create_surface_file(path, *args)
    with SurfaceFile.open(path) as surface:
        print(f"created plan {surface.plan_id}", file=sys.stderr)


logging.getLogger("landscape.locking").addHandler(SayWaiting())
plan.create_surface_file = slow_create_surface_file
sys.exit(cli.main())
