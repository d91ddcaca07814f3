"""Launching 1000 machines: rawvm's one CreateFleet against a naive RunInstances loop, on moto (server mode).

    uv run python bench/launch.py [-n 1000]

Both sides run against the same moto server over real HTTP with the same botocore client settings, and each
starts from a reset mock. Mutating EC2 calls are counted with a botocore ``before-call`` hook, so the counts
are what went over the wire, not what our code believes it sent.

- rawvm: ``AwsProvider.launch`` for N machines, spot_with_fallback (spot capacity is plentiful on moto, so
  one fleet fills it). The wall time includes everything the provider does: choosing types, the image
  lookup, S3 staging of the agent wheel, user-data, the caller's security group (made here: each run starts
  from a reset mock, as a first launch from an address does), launch template, the fleet, and the
  DescribeInstances that returns the machines.
- naive: the same preparation, security group and launch template, then one ``RunInstances`` per machine
  (MinCount=MaxCount=1). This is the loop a launcher written as "for each machine: start it" makes, and the
  one that meets EC2's request rate limit first; it is the baseline the fleet replaces. (Batching with
  MaxCount would cut calls too, but then the caller re-implements zone/type fallback that CreateFleet does.)
  It ends, like rawvm's launch, with DescribeInstances until every machine has an address.

moto is not EC2: absolute times say little about AWS, where each call also waits on the control plane. The
ratio of mutating calls is what carries over.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from rawvm.agent.tls import make_channel  # noqa: E402
from rawvm.options import MachineRequest  # noqa: E402
from rawvm.providers.aws.fleet import launch_template_data, tag_list  # noqa: E402
from rawvm.providers.aws.network import default_network, ensure_security_group  # noqa: E402
from rawvm.providers.aws.provider import AwsProvider  # noqa: E402
from rawvm.providers.aws.teardown import described  # noqa: E402
from rawvm.providers.base import MachineSpec  # noqa: E402
from rawvm_agent.config import AgentConfig  # noqa: E402

from tests.bootstrap.test_aws_moto import (  # noqa: E402
    CALLER_IP,
    REGION,
    MotoServer,
    fake_wheel,
    moto_provider,
    record_calls,
)


def provider_for(server: MotoServer, tmp: Path) -> AwsProvider:
    provider = moto_provider(server, tmp, "rawvm-bench")
    provider.instance_types(REGION)  # warm the type cache on both sides: it is not what is compared
    return provider


def spec(tmp: Path, cluster: str, n: int) -> MachineSpec:
    agent = AgentConfig(token="bench-token")
    return MachineSpec(
        cluster,
        MachineRequest(provider="aws", n=n, cpu=2, spot_policy="spot_with_fallback"),
        agent,
        fake_wheel(tmp),
        owner="bench",
        channel=make_channel(cluster, tmp / "tls" / cluster, 3600)[1],
    )


def run_fleet(server: MotoServer, tmp: Path, n: int) -> tuple[int, float, int]:
    server.reset()
    provider = provider_for(server, tmp)
    log = record_calls(provider.client("ec2", REGION))
    start = time.perf_counter()
    machines = provider.launch(spec(tmp, "fleet", n))
    return len(log.mutating), time.perf_counter() - start, len(machines)


def run_naive(server: MotoServer, tmp: Path, n: int) -> tuple[int, float, int]:
    server.reset()
    provider = provider_for(server, tmp)
    ec2 = provider.client("ec2", REGION)
    log = record_calls(ec2)
    the_spec = spec(tmp, "naive", n)
    start = time.perf_counter()
    chosen = provider.choose_types(the_spec, REGION)
    image, root_gib = provider._image(REGION, "x86_64", False)
    vpc_id, subnets = default_network(ec2)
    tags = provider._tags(the_spec)
    user_data = provider.user_data(the_spec, image)
    group = ensure_security_group(ec2, vpc_id=vpc_id, caller_ip=CALLER_IP, port=8470, ssh=False, tags=tags)
    data = launch_template_data(
        image_id=image.image_id,
        root_device=image.root_device,
        root_size_gib=root_gib,
        security_group_id=group,
        user_data=user_data,
        tags=tags,
    )
    template = ec2.create_launch_template(
        LaunchTemplateName="rawvm-naive",
        LaunchTemplateData=data,
        TagSpecifications=[{"ResourceType": "launch-template", "Tags": tag_list(tags)}],
    )["LaunchTemplate"]["LaunchTemplateId"]
    ids = []
    for i in range(n):
        subnet, _zone = subnets[i % len(subnets)]
        reply = ec2.run_instances(
            MinCount=1,
            MaxCount=1,
            InstanceType=chosen[0].name,
            SubnetId=subnet,
            LaunchTemplate={"LaunchTemplateId": template, "Version": "$Latest"},
        )
        ids += [i["InstanceId"] for i in reply["Instances"]]
    # Like rawvm's launch, end with every machine's address in hand (RunInstances answers before addresses).
    addressed = [i for i in described(ec2, ids) if i.get("PublicIpAddress") or i.get("PrivateIpAddress")]
    return len(log.mutating), time.perf_counter() - start, len(addressed)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=1000, help="machines per launch (%(default)s)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each side; wall time is the median")
    args = parser.parse_args()
    fleet_runs, naive_runs = [], []
    with tempfile.TemporaryDirectory(prefix="rawvm-bench-") as tmp_name, MotoServer() as server:
        tmp = Path(tmp_name)
        for _ in range(args.repeat):  # interleaved, so load on the machine hits both sides alike
            fleet_runs.append(run_fleet(server, tmp, args.n))
            naive_runs.append(run_naive(server, tmp, args.n))
    fleet_calls, _, fleet_n = fleet_runs[0]
    naive_calls, _, naive_n = naive_runs[0]
    fleet_s = statistics.median(r[1] for r in fleet_runs)
    naive_s = statistics.median(r[1] for r in naive_runs)
    print(f"launching {args.n} machines on moto (server mode, loopback HTTP), median of {args.repeat} runs each")
    print(f"{'':28}{'mutating EC2 calls':>20}{'wall time':>12}{'addressed':>11}")
    print(f"{'rawvm CreateFleet':28}{fleet_calls:>20}{fleet_s:>11.1f}s{fleet_n:>11}")
    print(f"{'naive RunInstances loop':28}{naive_calls:>20}{naive_s:>11.1f}s{naive_n:>11}")
    print(f"{'ratio naive / rawvm':28}{naive_calls / fleet_calls:>19.0f}x{naive_s / fleet_s:>11.1f}x")
    return 0 if fleet_n == naive_n == args.n else 1


if __name__ == "__main__":
    sys.exit(main())
