"""The ``landscape`` command: from an experiment config to loss-landscape maps and figures.

Subcommands: train, plan, run, hessian, analyze, trace, submit, reduce, status, plot, report,
export, demo.
Each subcommand is a thin shell over one module; a :class:`UserError` anywhere prints
one line and exits with status 2, a bug keeps its traceback. SIGINT and SIGTERM stop any
command with one line saying what was saved and how to go on, and exit status 130 / 143.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
from collections.abc import Callable

import matplotlib

from landscape.errors import FailedElsewhere, Interrupted, UserError
from landscape.jobs import JOB_KINDS, JOBS
from landscape.ranks import configure_logging, launched_size, launcher_rank


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="experiment YAML file")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set grid.x.num=11 (repeatable)",
    )


def command_train(args) -> None:
    from landscape.config import load_config
    from landscape.train import train

    print(train(load_config(args.config, args.overrides)))


def command_plan(args) -> None:
    from landscape.config import load_config
    from landscape.plan import plan_surface

    print(plan_surface(load_config(args.config, args.overrides)))


def command_job(args) -> None:
    from landscape.workers import run_job

    target = args.target
    if is_config(target):
        from landscape.config import load_config
        from landscape.plan import PLANNERS

        target = PLANNERS[JOBS[args.job].file](load_config(target, args.overrides))
    elif args.overrides:
        raise UserError(f"--set: only for a config; {target} is planned already")
    run_job(
        target,
        args.job,
        device=args.device,
        show_progress=not args.no_progress,
        writer=args.writer,
        task=array_task(args.task_index, args.num_tasks),
    )


def is_config(target: str) -> bool:
    """Whether a command's target names an experiment YAML (else a result file)."""
    return target.endswith((".yaml", ".yml"))


def array_task(index: int | None, count: int | None):
    """The ArrayTask of ``--task-index I --num-tasks N`` (N defaults to 1), or None."""
    from landscape.workers import ArrayTask

    if index is None:
        if count is not None:
            raise UserError("--num-tasks: given without --task-index; give both, or neither")
        return None
    return ArrayTask(index, 1 if count is None else count)


def command_submit(args) -> None:
    from pathlib import Path

    from landscape.slurm import SlurmOptions, require_sbatch, submit

    require_sbatch()  # before planning: a failed submit leaves nothing on disk
    target = Path(args.target)
    if is_config(args.target):
        from landscape.config import load_config
        from landscape.plan import PLANNERS

        file = "analysis" if args.analysis else "surface"
        target = PLANNERS[file](load_config(target, args.overrides))
    elif args.analysis:
        raise UserError(f"--analysis: only with a config; {target} is planned already")
    sbatch = dict(flag.partition("=")[::2] for flag in args.sbatch)
    options = SlurmOptions(
        tasks=args.tasks,
        parallelism=args.parallelism,
        partition=args.partition,
        time_min=args.time,
        cpus_per_task=args.cpus_per_task,
        gpus_per_task=args.gpus_per_task,
        mem_gb=args.mem_gb,
        account=args.account,
        qos=args.qos,
        mpi=args.mpi,
        sbatch=sbatch,
    )
    record = submit(target.resolve(), options, args.jobs)
    for job, entry in record["jobs"].items():
        what = f"{len(entry['tasks'])} array tasks" if "tasks" in entry else "MPI"
        print(f"{job}: job {entry['id']} ({what}, shards {len(entry_shards(entry))})")
    print(f"reduce: job {record['reduce']['id']} (merges and plots when the others succeed)")
    print(f"watch:  landscape status {target}    (or squeue --me)")


def entry_shards(entry: dict) -> list[int]:
    return entry.get("shards") or [s for task in entry["tasks"] for s in task["shards"]]


def command_trace(args) -> None:
    from landscape.trace import estimate_trace

    print(estimate_trace(args.surface, args.device))


def command_reduce(args) -> None:
    from landscape.reduce import reduce

    print(f"{reduce(args.surface)} points merged into {args.surface}")


def command_status(args) -> None:
    from landscape.status import surface_status

    print(surface_status(args.surface))


def command_plot(args) -> None:
    from landscape.plot import plot_surface_file

    for path in plot_surface_file(args.surface, args.out, tuple(args.format)):
        print(path)


def command_report(args) -> None:
    from landscape.report import write_report

    print(write_report(args.files, args.out))


def command_export(args) -> None:
    from landscape.export import export

    print(export(args.surface, args.format, args.out))


def command_demo(args) -> None:
    from landscape.demo import run_demo

    run_demo(args.out, quick=args.quick)


class CommandLineParser(argparse.ArgumentParser):
    """argparse whose mistakes are one ``error:`` line like every other bad input (the
    usage text is one ``--help`` away), not a usage block."""

    def error(self, message: str):
        raise UserError(f"{self.prog}: {message}; see `{self.prog} --help`")


def at_least(minimum: int):
    """An argparse type: an integer >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is below {minimum}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = CommandLineParser(prog="landscape", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a model, one checkpoint per epoch")
    add_config_arguments(train)
    train.set_defaults(handler=command_train)

    plan = commands.add_parser("plan", help="create the surface file (no-op if already planned)")
    add_config_arguments(plan)
    plan.set_defaults(handler=command_plan)

    for kind in JOB_KINDS:
        job = commands.add_parser(kind.verb, help=kind.description)
        job.add_argument(
            "target", help=f"{kind.file} file, or an experiment YAML (planned first if needed)"
        )
        job.add_argument("--set", dest="overrides", action="append", default=[], metavar="K=V")
        job.add_argument("--device", help="override evaluation.device (e.g. cpu, cuda:1)")
        job.add_argument("--no-progress", action="store_true", help="no progress bar")
        job.add_argument(
            "--writer",
            choices=["auto", "serial", "mpio", "parts"],
            default="auto",
            help="how results reach the file (auto: serial for 1 rank, else mpio if h5py has "
            "MPI, else part files)",
        )
        job.add_argument(
            "--task-index",
            type=at_least(0),
            metavar="I",
            help="run as array task I of --num-tasks: every N-th shard, to part files "
            "(e.g. $SLURM_ARRAY_TASK_ID); merge with `landscape reduce`",
        )
        job.add_argument("--num-tasks", type=at_least(1), metavar="N")
        job.set_defaults(handler=command_job, job=kind.name)

    submit = commands.add_parser(
        "submit", help="plan if needed, then submit the pending work to SLURM (submitit)"
    )
    submit.add_argument("target", help="experiment YAML (planned first) or result file")
    submit.add_argument("--set", dest="overrides", action="append", default=[], metavar="K=V")
    submit.add_argument(
        "--analysis",
        action="store_true",
        help="with a YAML: plan and submit its analysis (analysis:) instead of its surface",
    )
    submit.add_argument("--jobs", nargs="+", choices=list(JOBS), help="default: all")
    submit.add_argument(
        "--tasks", type=at_least(1), default=4, help="array tasks per job, or MPI ranks"
    )
    submit.add_argument(
        "--parallelism", type=at_least(0), default=0, help="array tasks at once (0: any)"
    )
    submit.add_argument("--mpi", action="store_true", help="one srun job of --tasks MPI ranks")
    submit.add_argument("--partition")
    submit.add_argument("--time", type=at_least(1), default=240, help="minutes per task")
    submit.add_argument("--cpus-per-task", type=at_least(1), default=1)
    submit.add_argument("--gpus-per-task", type=at_least(0), default=0)
    submit.add_argument("--mem-gb", type=float)
    submit.add_argument("--account")
    submit.add_argument("--qos")
    submit.add_argument(
        "--sbatch", action="append", default=[], metavar="FLAG=VALUE", help="extra sbatch flag"
    )
    submit.set_defaults(handler=command_submit)

    trace = commands.add_parser(
        "trace", help="tr(H) by Hutchinson beside n x mean second difference of the loss"
    )
    trace.add_argument("surface")
    trace.add_argument("--device", help="override evaluation.device (e.g. cpu, cuda:1)")
    trace.set_defaults(handler=command_trace)

    reduce = commands.add_parser(
        "reduce", help="merge the part files of a run into its surface, derive derived maps"
    )
    reduce.add_argument("surface")
    reduce.set_defaults(handler=command_reduce)

    status = commands.add_parser("status", help="points done, rate and time left")
    status.add_argument("surface")
    status.set_defaults(handler=command_status)

    plot = commands.add_parser("plot", help="draw the figures of a surface file")
    plot.add_argument("surface")
    plot.add_argument("--out", help="folder for the figures (default: <surface>_plots/)")
    plot.add_argument("--format", nargs="+", default=["png", "pdf"], choices=["png", "pdf", "svg"])
    plot.set_defaults(handler=command_plot)

    report = commands.add_parser(
        "report", help="one self-contained HTML page per result file: figures and key numbers"
    )
    report.add_argument("files", nargs="+", metavar="FILE", help="surface or analysis files")
    report.add_argument("--out", required=True, help="folder for the pages (index.html if several)")
    report.set_defaults(handler=command_report)

    export = commands.add_parser(
        "export", help="a surface as interactive HTML (plotly), ParaView VTK (.vtu) or CSV"
    )
    export.add_argument("surface")
    export.add_argument("--format", required=True, choices=["html", "vtk", "csv"])
    export.add_argument("--out", help="file to write (default: beside the surface, its suffix)")
    export.set_defaults(handler=command_export)

    demo = commands.add_parser("demo", help="train on digits, plan, run and plot 2D + 1D")
    demo.add_argument("--out", default="results/demo")
    demo.add_argument("--quick", action="store_true", help="tiny grid and 1 epoch (smoke test)")
    demo.set_defaults(handler=command_demo)
    return parser


# Commands that go on where they stopped when run again (the others start over).
RESUMABLE = (*(kind.verb for kind in JOB_KINDS), "demo", "submit")


def stop_on_signals(command: str) -> Callable[[], None]:
    """SIGINT (Ctrl-C) and SIGTERM (``kill``, and SLURM before it kills a job) raise
    :class:`Interrupted` where the program is, so files close and temporary files go
    as they unwind, and :func:`main` ends with one line saying what was saved. Returns
    a function that puts the previous handlers back.

    An MPI rank cannot unwind alone (closing the file is collective and would wait
    forever for the others): it says what is kept and aborts the job at once, which
    the crash-safe writes allow at any moment. A SIGINT ignored from the start (``nohup``,
    a background job of a script) stays ignored.
    """
    previous = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}

    def interrupt(number: int, frame) -> None:
        size = launched_size()
        if size > 1:
            print(
                f"rank {launcher_rank()} of {size}: interrupted; finished shards are saved; "
                f"resume with `{command}`",
                file=sys.stderr,
                flush=True,
            )
            abort_ranks(128 + number)
        raise Interrupted(number)

    def restore() -> None:
        for number, handler in previous.items():
            signal.signal(number, handler)

    signal.signal(signal.SIGTERM, interrupt)
    if previous[signal.SIGINT] is signal.default_int_handler:
        signal.signal(signal.SIGINT, interrupt)
    return restore


def abort_ranks(status: int) -> None:
    """End every rank of the job with ``status`` (MPI_Abort), or this process if MPI is
    not started yet (the launcher then ends the others)."""
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.COMM_WORLD.Abort(status)
    os._exit(status)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = build_parser().parse_args(argv)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    configure_logging(args.verbose)
    # The command writes figures to files, on nodes without a display: Agg. Chosen here,
    # not on import of landscape.plot, so a notebook that imports it keeps its backend.
    matplotlib.use("Agg")
    command = shlex.join(["landscape", *argv])
    restore_signals = stop_on_signals(command)
    try:
        args.handler(args)
        sys.stdout.flush()
    except BrokenPipeError:  # the reader went away (`landscape status F | head -1`): stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # for the final flush
        os.close(devnull)
        return 128 + signal.SIGPIPE
    except UserError as exc:
        if not isinstance(exc, FailedElsewhere):
            print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupt:
        saved = getattr(interrupt, "saved", "") or "nothing half-written"
        again = (
            f"resume with `{command}`" if args.command in RESUMABLE else f"run `{command}` again"
        )
        print(f"interrupted; {saved}; {again}", file=sys.stderr)
        return 128 + getattr(interrupt, "signal_number", signal.SIGINT)
    finally:
        restore_signals()
    return 0


if __name__ == "__main__":
    sys.exit(main())
