"""``rawvm batch run|status|logs|retry``: batch arrays on the command line (see rawvm.batches.array)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from rawvm.cli.flags import launch_options, machine_flags


def with_header_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """Apply ``# rawvm: ...`` lines of the command's script where the command line left a flag at its default:
    explicit flags win (a flag given with its default value counts as not given)."""
    from rawvm.batches.plan import header_options

    header = header_options(args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd)
    if not header:
        return args
    from_header = parser.parse_args([*header, "--", "true"])
    merged = argparse.Namespace(**vars(args))
    for key, value in vars(from_header).items():
        if key not in {"cmd", "func", "parser"} and getattr(args, key) == parser.get_default(key):
            setattr(merged, key, value)
    return merged


def _run(args: argparse.Namespace) -> int:
    from rawvm.batches import array as batches

    args = with_header_options(args.parser, args)
    result = batches.run_batch(
        args.cmd,
        launch_options(args),
        array=args.array,
        map_over_file=args.map_over_file,
        map_over_values=args.map_over_values,
        tasks_per_machine=args.tasks_per_machine,
        max_retries=args.max_retries,
        task_timeout=args.task_timeout,
        detach=args.detach,
    )
    print(result.cluster)
    return result.exit_code


def _status(args: argparse.Namespace) -> int:
    from rawvm.batches import array as batches
    from rawvm.batches import watch as batch_watch

    st = batches.status(args.cluster)
    if args.json:
        print(
            json.dumps(
                {"cluster": st.cluster, "counts": st.counts(), "states": {str(k): v for k, v in st.states.items()}},
                sort_keys=True,
            )
        )
    else:
        batch_watch.summary(st, sys.stdout)
    return 0 if not (st.ids("failed") or st.ids("lost")) else 1


def _logs(args: argparse.Namespace) -> int:
    from rawvm.batches import array as batches

    return batches.logs(args.cluster, args.task)


def _retry(args: argparse.Namespace) -> int:
    from rawvm.batches import array as batches

    result = batches.retry(args.cluster, n=args.n, detach=args.detach)
    return result.exit_code


def register(subparsers: Any) -> None:
    group = subparsers.add_parser(
        "batch",
        help="run a command once per task id or value, over many machines (no controller)",
        description="Batch arrays: run a command once per task id or value over many machines that share the "
        "tasks among themselves and stop when they are done; see a batch's state, a task's output, retry.",
    )
    commands = group.add_subparsers(dest="batch_command", required=True, parser_class=type(group))

    run = commands.add_parser(
        "run",
        help="launch machines that run every task and stop by themselves",
        description="Run CMD once per task: RAWVM_TASK_ID, RAWVM_TASK_COUNT and (for a map) RAWVM_TASK_VALUE tell "
        "it which. '# rawvm: --gpu -n 10' lines at the top of CMD's script are read as options; flags win.",
        usage="rawvm batch run (--array 0-999 | --map-over-file F | --map-over-values a,b) [options] -- CMD ...",
    )
    tasks = run.add_argument_group("tasks")
    tasks.add_argument("--array", default=None, metavar="IDS", help="task ids: 0-999 or 1,4-6")
    tasks.add_argument("--map-over-file", default=None, metavar="F", help="one task per non-empty line of F")
    tasks.add_argument("--map-over-values", default=None, metavar="A,B", help="one task per comma-separated value")
    tasks.add_argument(
        "--tasks-per-machine", type=int, default=0, metavar="K", help="K at a time per machine (0: its cores)"
    )
    tasks.add_argument("--max-retries", type=int, default=2, metavar="R", help="retries of a failed task (%(default)s)")
    tasks.add_argument("--task-timeout", default="", metavar="D", help="end a task after D, e.g. 10m (none)")
    tasks.add_argument("--detach", action="store_true", help="return right after the launch; see 'batch status'")
    machine_flags(run)
    run.set_defaults(keepalive="2m")
    run.add_argument("cmd", nargs=argparse.REMAINDER, metavar="CMD", help="the command, after '--'")
    run.set_defaults(func=_run, parser=run)

    status = commands.add_parser(
        "status",
        help="every task's state, also after the machines are gone",
        description="Every task's state in the batch CLUSTER (done, failed, lost, running, pending), also after "
        "its machines are gone; exits 1 when a task failed or was lost.",
    )
    status.add_argument("cluster", metavar="CLUSTER")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(func=_status)

    logs = commands.add_parser(
        "logs",
        help="one task's output (its last attempt)",
        description="Print the output of task TASK of the batch CLUSTER, from its last attempt; also after the "
        "machines are gone.",
    )
    logs.add_argument("cluster", metavar="CLUSTER")
    logs.add_argument("task", type=int, metavar="TASK")
    logs.set_defaults(func=_logs)

    retry = commands.add_parser(
        "retry",
        help="rerun the lost and failed tasks on fresh machines",
        description="Rerun the lost and failed tasks of the batch CLUSTER on fresh machines, launched as the "
        "batch was.",
    )
    retry.add_argument("cluster", metavar="CLUSTER")
    retry.add_argument("-n", type=int, default=0, metavar="N", help="machines (default: as many as the last round)")
    retry.add_argument("--detach", action="store_true", help="return right after the launch")
    retry.set_defaults(func=_retry)
