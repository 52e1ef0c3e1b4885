"""``landscape`` whose planner pauses before writing the surface file, then says which plan
it wrote: two planners started at once are sure to overlap. Launched by test_locking."""

import sys
import time

from landscape import cli, plan
from landscape.store import SurfaceFile

create_surface_file = plan.create_surface_file


def slow_create_surface_file(path, *args):
    time.sleep(2)
    create_surface_file(path, *args)
    with SurfaceFile.open(path) as surface:
        print(f"created plan {surface.plan_id}", file=sys.stderr)


plan.create_surface_file = slow_create_surface_file
sys.exit(cli.main())
