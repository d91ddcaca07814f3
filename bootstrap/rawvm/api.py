"""The front door: typed public functions with flat keyword arguments (as ``httpx.request`` has), each building
its options once (``launch_options``) and handing them to the layer that does the work.

``rawvm.run``, ``up``, ``ls``, ``logs``, ``down``, ``batch``, ``dask_cluster`` and ``function`` are these.
The machine options mean the same everywhere; see ``rawvm.options`` for each one's documentation.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from rawvm import commands

# ls, logs and down take no launch options: the commands layer's own functions are the public ones
from rawvm.commands import ClusterView as ClusterView
from rawvm.commands import RunResult as RunResult
from rawvm.commands import down as down
from rawvm.commands import logs as logs
from rawvm.commands import ls as ls
from rawvm.commands import ls_json as ls_json
from rawvm.options import (
    CLI_FLAGS,
    DEFAULT_KEEPALIVE,
    DEFAULT_MAX_LIFETIME,
    MAX_COST_NOT_GIVEN,
    CostCap,
    Environment,
    LaunchOptions,
    Lifetime,
    MachineRequest,
    TaskEnvironment,
    check_ca_certs,
)

EnvArg = Mapping[str, str] | Sequence[str] | None  # {NAME: value}, or ["NAME=value", "NAME" (from os.environ)]

if TYPE_CHECKING:
    from rawvm.batches.array import BatchResult
    from rawvm.clusters import ClusterRecord
    from rawvm.dask.cluster import RawvmCluster


def launch_options(
    *,
    provider: str = "local",
    n: int = 1,
    vm_type: str = "",
    cpu: int = 0,
    memory: float = 0,
    gpu: bool = False,
    arm: bool = False,
    region: str = "",
    spot_policy: str = "on-demand",
    extra_ca_certs: Sequence[str | Path] = (),
    keepalive: str | float = DEFAULT_KEEPALIVE,
    max_lifetime: str | float = DEFAULT_MAX_LIFETIME,
    source: str | Path | None = None,
    pypi_only: bool = False,
    compile_bytecode: bool = False,
    max_cost: float | str | None = MAX_COST_NOT_GIVEN,
    max_cost_action: str = "",
    cluster: str | None = None,
    efa: bool = False,
    env: EnvArg = None,
    secrets: EnvArg = None,
    lifetime_flags: tuple[str, str] = CLI_FLAGS,
) -> LaunchOptions:
    """The one place where the flat options of the front door and of the CLI's flags become a checked
    ``LaunchOptions``; each argument is documented on the field it fills (``rawvm.options``)."""
    request = MachineRequest(
        provider=provider,
        n=n,
        vm_type=vm_type,
        cpu=cpu,
        memory=float(memory),
        gpu=gpu,
        arm=arm,
        region=region,
        spot_policy=spot_policy,
        extra_ca_certs=check_ca_certs(extra_ca_certs),
        efa=efa,
    )
    lifetime = Lifetime.parse(keepalive, max_lifetime, lifetime_flags)
    return LaunchOptions(
        request=request,
        lifetime=lifetime,
        environment=Environment(source=source, pypi_only=pypi_only, compile_bytecode=compile_bytecode),
        cost=CostCap(max_cost=max_cost, action=max_cost_action),
        task_env=TaskEnvironment.parse(env, secrets),
        cluster=cluster,
    )


BATCH_KEEPALIVE = "2m"  # a batch's machines are done when its tasks are: a short keepalive by default
FUNCTION_KEEPALIVE = "30s"  # a function's machines are kept warm between calls of one script, no longer


def run(
    command: Sequence[str],
    *,
    provider: str = "local",
    n: int = 1,
    vm_type: str = "",
    cpu: int = 0,
    memory: float = 0,
    gpu: bool = False,
    arm: bool = False,
    region: str = "",
    keepalive: str = DEFAULT_KEEPALIVE,
    max_lifetime: str = DEFAULT_MAX_LIFETIME,
    spot_policy: str = "on-demand",
    source: str | Path | None = None,
    cluster: str | None = None,
    extra_ca_certs: Sequence[str | Path] = (),
    pypi_only: bool = False,
    compile_bytecode: bool = False,
    max_cost: float | str | None = MAX_COST_NOT_GIVEN,
    max_cost_action: str = "",
    efa: bool = False,
    torchrun: bool = False,
    env: EnvArg = None,
    secrets: EnvArg = None,
    capture: bool = False,
    sync: bool = True,
    output: TextIO | None = None,
    error_output: TextIO | None = None,
) -> RunResult:
    """Run ``command`` on ``n`` fresh machines in the locked environment of ``source`` (default: this one).

    With ``cluster`` naming a cluster from ``up``, runs on its machines instead of launching new ones. The
    machines stop by themselves after ``keepalive`` of idleness. ``pypi_only`` locks a conda ``source`` from PyPI
    alone (no conda channel), as ``rawvm lock --pypi-only`` does; ``compile_bytecode`` has the machines compile
    the environment's ``.pyc`` files as they install it (off, as in uv: a slower install for faster first imports).

    ``max_cost`` (USD) caps a launch's worst case (every machine running until its ``max_lifetime``):
    ``"default"`` takes ``max-cost`` from the project's ``pyproject.toml`` ``[tool.rawvm]``, None means no cap.
    Over the cap the launch is refused, or with ``max_cost_action="shorten"`` the lifetimes are lowered to fit.
    The task's stdout goes to ``output`` (default: sys.stdout), its stderr to ``error_output``.

    With ``n`` > 1 the machines run one gang job: each task gets ``RAWVM_NODE_RANK``, ``RAWVM_NODE_IPS``,
    ``MASTER_ADDR``/``MASTER_PORT`` and the rest (``rawvm.gang``), and when one node fails the others' tasks are
    cancelled. ``torchrun`` wraps each node's command in ``torchrun``; ``efa`` (aws) gives GPU machines EFA
    interfaces and the NCCL/libfabric settings for them.

    ``env`` and ``secrets`` are variables every task sees (``{"NAME": "value"}``, or ``["NAME=value", "NAME"]``
    where a bare name is taken from this process's environment); secrets travel only over the agent API and are
    masked in every log and output stream. ``capture`` keeps each machine's output and exit code in the result
    (``RunResult.outputs``). On an existing ``cluster``, the project files that changed since its machines last
    received them are sent first (``sync=False``: not).
    """
    options = launch_options(
        provider=provider,
        n=n,
        vm_type=vm_type,
        cpu=cpu,
        memory=memory,
        gpu=gpu,
        arm=arm,
        region=region,
        keepalive=keepalive,
        max_lifetime=max_lifetime,
        spot_policy=spot_policy,
        source=source,
        cluster=cluster,
        extra_ca_certs=extra_ca_certs,
        env=env,
        secrets=secrets,
        pypi_only=pypi_only,
        compile_bytecode=compile_bytecode,
        max_cost=max_cost,
        max_cost_action=max_cost_action,
        efa=efa,
    )
    return commands.run_command(command, options, output, error_output, torchrun=torchrun, capture=capture, sync=sync)


def up(
    *,
    provider: str = "local",
    n: int = 1,
    vm_type: str = "",
    cpu: int = 0,
    memory: float = 0,
    gpu: bool = False,
    arm: bool = False,
    region: str = "",
    keepalive: str = DEFAULT_KEEPALIVE,
    max_lifetime: str = DEFAULT_MAX_LIFETIME,
    spot_policy: str = "on-demand",
    source: str | Path | None = None,
    cluster: str | None = None,
    extra_ca_certs: Sequence[str | Path] = (),
    pypi_only: bool = False,
    compile_bytecode: bool = False,
    max_cost: float | str | None = MAX_COST_NOT_GIVEN,
    max_cost_action: str = "",
    env: EnvArg = None,
    secrets: EnvArg = None,
) -> ClusterRecord:
    """Launch machines and wait until every one is ready; returns the cluster's record. Options as in ``run``."""
    return commands.up(
        launch_options(
            provider=provider,
            n=n,
            vm_type=vm_type,
            cpu=cpu,
            memory=memory,
            gpu=gpu,
            arm=arm,
            region=region,
            keepalive=keepalive,
            max_lifetime=max_lifetime,
            spot_policy=spot_policy,
            source=source,
            cluster=cluster,
            extra_ca_certs=extra_ca_certs,
            env=env,
            secrets=secrets,
            pypi_only=pypi_only,
            compile_bytecode=compile_bytecode,
            max_cost=max_cost,
            max_cost_action=max_cost_action,
        )
    )


def batch(
    command: Sequence[str],
    *,
    array: str | None = None,
    map_over_file: str | Path | None = None,
    map_over_values: str | Sequence[str] | None = None,
    n: int = 1,
    tasks_per_machine: int = 0,
    max_retries: int = 2,
    task_timeout: str = "",
    detach: bool = False,
    provider: str = "local",
    vm_type: str = "",
    cpu: int = 0,
    memory: float = 0,
    gpu: bool = False,
    arm: bool = False,
    region: str = "",
    keepalive: str = BATCH_KEEPALIVE,
    max_lifetime: str = DEFAULT_MAX_LIFETIME,
    spot_policy: str = "on-demand",
    source: str | Path | None = None,
    cluster: str | None = None,
    extra_ca_certs: Sequence[str | Path] = (),
    pypi_only: bool = False,
    compile_bytecode: bool = False,
    max_cost: float | str | None = MAX_COST_NOT_GIVEN,
    max_cost_action: str = "",
    env: EnvArg = None,
    secrets: EnvArg = None,
) -> BatchResult:
    """Run ``command`` once per task id (``array``: ``0-999`` or ``1,4-6``) or per value (a map), over up to ``n``
    machines, ``tasks_per_machine`` at a time on each (0: its cores, 1 with a GPU), each task retried up to
    ``max_retries`` times. Attached, it shows progress and returns once every task has a final result;
    ``detach`` returns right after the launch, and the machines finish the batch and stop by themselves.
    Machine options as in ``run``."""
    from rawvm.batches.array import run_batch

    options = launch_options(
        provider=provider,
        n=n,
        vm_type=vm_type,
        cpu=cpu,
        memory=memory,
        gpu=gpu,
        arm=arm,
        region=region,
        keepalive=keepalive,
        max_lifetime=max_lifetime,
        spot_policy=spot_policy,
        source=source,
        cluster=cluster,
        extra_ca_certs=extra_ca_certs,
        env=env,
        secrets=secrets,
        pypi_only=pypi_only,
        compile_bytecode=compile_bytecode,
        max_cost=max_cost,
        max_cost_action=max_cost_action,
    )
    return run_batch(
        command,
        options,
        array=array,
        map_over_file=map_over_file,
        map_over_values=map_over_values,
        tasks_per_machine=tasks_per_machine,
        max_retries=max_retries,
        task_timeout=task_timeout,
        detach=detach,
    )


def dask_cluster(
    n: int = 1,
    *,
    provider: str = "local",
    vm_type: str = "",
    cpu: int = 0,
    memory: float = 0,
    gpu: bool = False,
    arm: bool = False,
    region: str = "",
    spot_policy: str = "on-demand",
    keepalive: str = DEFAULT_KEEPALIVE,
    max_lifetime: str = DEFAULT_MAX_LIFETIME,
    scheduler_vm_type: str = "",
    dedicated_scheduler: bool = True,
    source: str | Path | None = None,
    extra_ca_certs: Sequence[str | Path] = (),
    env: EnvArg = None,
    secrets: EnvArg = None,
    name: str | None = None,
    asynchronous: bool = False,
    shutdown_on_close: bool = True,
) -> RawvmCluster:
    """A Dask cluster of ``n`` worker machines plus one for the scheduler (``dedicated_scheduler=False``: the
    scheduler shares the first worker's machine), in the locked environment of ``source`` (default: this one,
    which must contain ``distributed``). Use it as any Dask cluster: ``Client(cluster)``, ``cluster.scale(k)``,
    ``cluster.adapt(minimum=, maximum=)``, ``cluster.dashboard_link``, ``cluster.close()`` or ``with``.

    Every connection is TLS with a CA made for this cluster; the machines power off by themselves after
    ``keepalive`` with no task and no client (a lost laptop costs at most that), and ``close()`` stops them now.
    Needs the ``dask`` extra.
    """
    from rawvm.dask.cluster import make_cluster

    options = launch_options(
        provider=provider,
        n=max(1, n),  # the scheduler's machine at least; make_cluster checks n itself
        vm_type=vm_type,
        cpu=cpu,
        memory=memory,
        gpu=gpu,
        arm=arm,
        region=region,
        spot_policy=spot_policy,
        keepalive=keepalive,
        max_lifetime=max_lifetime,
        source=source,
        extra_ca_certs=extra_ca_certs,
        env=env,
        secrets=secrets,
    )
    return make_cluster(
        n,
        options,
        name=name,
        scheduler_vm_type=scheduler_vm_type,
        dedicated_scheduler=dedicated_scheduler,
        asynchronous=asynchronous,
        shutdown_on_close=shutdown_on_close,
    )


def function(
    fn: Callable[..., Any] | None = None,
    *,
    provider: str = "local",
    vm_type: str = "",
    cpu: int = 0,
    memory: float = 0,
    gpu: bool = False,
    arm: bool = False,
    n: int = 1,
    keepalive: str = FUNCTION_KEEPALIVE,
    spot_policy: str = "on-demand",
    region: str = "",
    max_lifetime: str = DEFAULT_MAX_LIFETIME,
    source: str | Path | None = None,
    packages: Sequence[str] = (),
    slots: int = 0,
    extra_ca_certs: Sequence[str | Path] = (),
    env: EnvArg = None,
    secrets: EnvArg = None,
) -> Any:
    """Run ``fn`` on machines: ``@rawvm.function`` or ``@rawvm.function(n=4, gpu=True, ...)``.

    The machine options are those of ``rawvm.run``. ``source`` is the environment to lock (default: this one);
    ``packages`` are requirements the machines get on top of it (``["humanize>=4"]``); ``slots`` is how many calls
    run at once on each machine (default: its cores; 1 with ``gpu``). The project (code.tar.gz) is the current
    directory when the function is decorated.
    """
    from rawvm.functions import remote

    if remote.on_a_machine():
        return fn if fn is not None else (lambda f: f)
    options = launch_options(
        provider=provider,
        n=n,
        vm_type=vm_type,
        cpu=cpu,
        memory=memory,
        gpu=gpu,
        arm=arm,
        region=region,
        keepalive=keepalive,
        max_lifetime=max_lifetime,
        spot_policy=spot_policy,
        source=source,
        extra_ca_certs=extra_ca_certs,
        env=env,
        secrets=secrets,
        lifetime_flags=("keepalive", "max_lifetime"),  # errors name the arguments, as Python users wrote them
    )
    return remote.remote_function(fn, options, packages=packages, slots=slots)
