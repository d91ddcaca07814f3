"""The ``aws`` provider: EC2 machines from one launch template and one ``CreateFleet`` per launch.

Per cluster it makes a security group (agent port open to the caller's /32 only) and a launch template
(image, user-data, IMDSv2 only, terminate on shutdown, encrypted gp3 root deleted on termination, tags). The
template is deleted as soon as the fleets have answered: an instant fleet does not need it afterwards, and its
user-data holds the agents' TLS key, which must not outlive the launch in an API that read-only principals see. A
launch is one instant fleet across the cheapest fitting instance types x every zone of the default VPC;
``spot_with_fallback`` asks for spot first and for the shortfall on demand in a second fleet. Throttling
(``RequestLimitExceeded``) is retried by botocore's ``standard`` retry mode, with exponential backoff.
Staging is an S3 bucket with presigned URLs (``staging``); teardown is by tag (``teardown``).
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import boto3
from botocore.exceptions import NoCredentialsError, NoRegionError
from rawvm_agent.config import AgentConfig
from rawvm_images.ec2 import CatalogError, Image, find_image
from rawvm_images.instance_types import InstanceType, choose_instance_types, describe_instance_types, lookup

from rawvm.agent.runtime import RuntimeTarget
from rawvm.agent.staged import stage_agent
from rawvm.agent.userdata import encode_user_data, render_user_data
from rawvm.agent.uvwheel import UvWheel, find_uv_wheel
from rawvm.cost_guard import FleetPrice
from rawvm.errors import RawvmError, UsageError
from rawvm.options import BACKSTOP_GRACE
from rawvm.progress import say
from rawvm.providers.aws import fleet as aws_fleet
from rawvm.providers.aws import network as aws_network
from rawvm.providers.aws import peers as aws_peers
from rawvm.providers.aws import prices as aws_prices
from rawvm.providers.aws import staging as aws_staging
from rawvm.providers.aws import teardown as aws_teardown
from rawvm.providers.aws.config import (
    AWS_ERRORS,
    PRICING_CONFIG,
    RETRY_CONFIG,
    aws_error,
    default_config_path,
    local_user,
    read_settings,
)
from rawvm.providers.aws.instances import await_addresses, machine_of
from rawvm.providers.base import Machine, MachineSpec, Provider, SinkPost

ROOT_HEADROOM_GIB = 24  # room for the environment above the image's own size
MIN_ROOT_GIB = 32
_CLUSTER = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
_PARTITIONS = ("aws", "aws-cn", "aws-us-gov")


class AwsProvider(Provider):
    """EC2 through boto3. ``endpoint_url`` points every client elsewhere (moto in tests)."""

    name = "aws"

    def __init__(
        self,
        region: str = "",
        bucket: str = "",
        *,
        session: boto3.session.Session | None = None,
        endpoint_url: str | None = None,
        caller_ip: Callable[[], str] = aws_network.public_ip,
        ssh_key_name: str = "",
        instance_type_limit: int = 3,
        uv_wheel: UvWheel | None = None,
        cache_dir: Path | None = None,
        config_path: Path | None = None,
        poll: float = 5.0,
        address_timeout: float = 180.0,
        down_timeout: float = 900.0,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.time,
        pricing_client: Any | None = None,
        price_cache_dir: Path | None = None,
    ) -> None:
        settings = read_settings(config_path or default_config_path())
        self.session = session or boto3.session.Session()
        self.region = region or settings.get("region", "")
        self.bucket = bucket or settings.get("bucket", "")
        self.endpoint_url = endpoint_url
        self.caller_ip = caller_ip
        self.ssh_key_name = ssh_key_name
        self.instance_type_limit = instance_type_limit
        self._uv_wheel = uv_wheel
        self.cache_dir = cache_dir
        self.poll = poll
        self.down_timeout = down_timeout
        self.address_timeout = address_timeout
        self.sleep = sleep
        self.clock = clock
        self._clients: dict[tuple[str, str], Any] = {}
        self._account = ""
        self._types: dict[str, list[InstanceType]] = {}
        self._placements: dict[str, set[str]] = {}  # cluster -> placement groups its launches made (rawvm down)
        self._pricing_client = pricing_client
        self.prices = aws_prices.PriceBook(
            self._pricing, lambda r: self.client("ec2", r), cache_dir=price_cache_dir, clock=clock
        )

    # -- clients and inputs ------------------------------------------------------------------------------------

    def resolve_region(self, region: str = "") -> str:
        name = region or self.region or self.session.region_name or ""
        if not name:
            raise UsageError("no AWS region: pass --region (e.g. us-east-1) or set AWS_REGION")
        known = {r for p in _PARTITIONS for r in self.session.get_available_regions("ec2", partition_name=p)}
        if name not in known:
            raise UsageError(f"unknown AWS region {name!r}: use one like us-east-1 or eu-west-1")
        return name

    def client(self, service: str, region: str) -> Any:
        key = (service, region)
        if key not in self._clients:
            config = RETRY_CONFIG
            if service == "s3":
                path_style = bool(self.endpoint_url) or "." in self.bucket
                config = config.merge(aws_staging.s3_config(path_style=path_style))
            self._clients[key] = self.session.client(
                service,  # type: ignore[call-overload]
                region_name=region,
                endpoint_url=self.endpoint_url,
                config=config,
            )
            if service == "s3":  # a bucket of another account is refused, never written to or read from
                aws_staging.expect_owner(self._clients[key], lambda: self.account_id(region))
        return self._clients[key]

    def _pricing(self) -> Any | None:
        """The Price List client. None with a custom endpoint (a test server) and no client given: prices are
        then unknown unless cached, and nothing reaches the real AWS."""
        if self._pricing_client is None and not self.endpoint_url:
            self._pricing_client = self.session.client(
                "pricing",
                region_name=aws_prices.PRICING_REGION,
                config=PRICING_CONFIG,
            )
        return self._pricing_client

    @staticmethod
    def check_cluster(cluster: str) -> str:
        if not _CLUSTER.fullmatch(cluster):
            raise UsageError(f"invalid cluster name {cluster!r}: up to 63 letters, digits, '.', '_' or '-'")
        return cluster

    def instance_types(self, region: str) -> list[InstanceType]:
        if region not in self._types:
            try:
                self._types[region] = describe_instance_types(self.client("ec2", region), cache_dir=self.cache_dir)
            except CatalogError as exc:
                raise RawvmError(str(exc)) from None
        return self._types[region]

    def choose_types(self, spec: MachineSpec, region: str) -> list[InstanceType]:
        types, efa = self.instance_types(region), spec.request.efa
        try:
            if spec.request.vm_type:
                chosen = [lookup(types, spec.request.vm_type, region)]
            else:
                chosen = choose_instance_types(
                    types,
                    cpu=spec.request.cpu,
                    memory_gib=spec.request.memory,
                    gpu=spec.request.gpu,
                    arm=spec.request.arm,
                    spot=spec.request.spot_policy != "on-demand",
                    limit=aws_peers.ALL_TYPES if efa else self.instance_type_limit,
                )
        except CatalogError as exc:
            raise UsageError(str(exc)) from None
        return aws_peers.with_efa(self.client("ec2", region), chosen, self.instance_type_limit) if efa else chosen

    @staticmethod
    def _arch(spec: MachineSpec, chosen: Sequence[InstanceType]) -> str:
        if spec.request.vm_type:
            arches = chosen[0].arches
            return "aarch64" if "aarch64" in arches and ("x86_64" not in arches or spec.request.arm) else "x86_64"
        return "aarch64" if spec.request.arm else "x86_64"

    def target_platform(self, spec: MachineSpec) -> str:
        """Checks the region (and a named instance type) first: the front door asks before the slow lock."""
        region = self.resolve_region(spec.request.region)
        if spec.request.vm_type:
            return f"linux-{self._arch(spec, self.choose_types(spec, region))}"
        return "linux-aarch64" if spec.request.arm else "linux-x86_64"

    # -- prices ------------------------------------------------------------------------------------------------

    def estimate(self, spec: MachineSpec) -> FleetPrice:
        """Optional provider hook: the launch's price before it happens (rawvm.cost_guard says it and keeps
        --max-cost). The dearest type the fleet may pick; spot at the dearest zone's latest price;
        spot_with_fallback the dearer of spot and on-demand, since the fallback may start every machine on
        demand."""
        region = self.resolve_region(spec.request.region)
        chosen = [t.name for t in self.choose_types(spec, region)]
        lifecycles = {"on-demand": ["on-demand"], "spot": ["spot"], "spot_with_fallback": ["spot", "on-demand"]}
        kinds = lifecycles.get(spec.request.spot_policy, ["on-demand"])
        spot = self.prices.spot(region, chosen) if "spot" in kinds else {}
        known: dict[str, float] = {}
        missing: list[str] = []
        for name in chosen:
            zones = spot.get(name, {})
            each = [
                (max(zones.values()) if zones else None) if kind == "spot" else self.prices.on_demand(region, name)
                for kind in kinds
            ]
            if any(p is None for p in each):
                missing.append(name)
            else:
                known[name] = max(p for p in each if p is not None)
        label = " or ".join(kinds)
        if missing:
            source = " and ".join(
                s for s, k in (("the AWS Price List", "on-demand"), ("EC2's spot price history", "spot")) if k in kinds
            )
            why = f"no {label} price for {', '.join(missing)} in {region} from {source}"
            return FleetPrice(spec.count, None, f"{'/'.join(chosen)} {label}", why)
        dearest = max(chosen, key=lambda n: known[n])
        basis = f"{dearest} {label}" if len(chosen) == 1 else f"up to {dearest} {label} (of {', '.join(chosen)})"
        return FleetPrice(spec.count, known[dearest], basis)

    def machine_price(self, region: str, machine: Machine) -> float:
        """$/hour of a launched machine (its type, lifecycle and zone); 0.0 when unknown."""
        price = self.prices.machine_hour(region, machine.instance_type, spot=machine.spot, zone=machine.zone)
        return price or 0.0

    def target_glibc(self) -> str:
        return Image("", "", "x86_64", False).glibc

    def target_python(self) -> str:
        return Image("", "", "x86_64", False).python

    # -- staging -----------------------------------------------------------------------------------------------

    def account_id(self, region: str) -> str:
        """The caller's AWS account (STS, asked once): the default bucket's name and its expected owner."""
        if not self._account:
            try:
                self._account = str(self.client("sts", region).get_caller_identity()["Account"])
            except AWS_ERRORS as exc:
                raise RawvmError(
                    f"cannot identify the AWS account ({aws_error(exc)}); check your AWS credentials"
                ) from None
        return self._account

    def bucket_name(self, region: str) -> str:
        return self.bucket or aws_staging.default_bucket_name(self.account_id(region), region)

    def stager(self, region: str = "") -> aws_staging.S3Stager:
        region = self.resolve_region(region)
        return aws_staging.S3Stager(self.client("s3", region), self.bucket_name(region))

    def stage(self, cluster: str, files: Sequence[tuple[str, Path]], *, valid_s: float = 0.0) -> dict[str, str]:
        """Presigned GET URLs valid ``valid_s`` (0: the boot's hour; SigV4 allows at most 7 days)."""
        try:
            return self.stager().stage(self.check_cluster(cluster), files, valid_s=valid_s)
        except AWS_ERRORS as exc:
            raise RawvmError(f"staging to S3 failed: {aws_error(exc)}") from None

    def sink_url(self, cluster: str) -> str:
        """Nothing in the user-data, which every machine shares and the launch template keeps: each machine gets
        its own presigned POST over the agent API once it serves (``sink_form_for``). One that never gets it
        cannot upload; its logs stay on it until it powers off."""
        return ""

    def sink_form_for(self, cluster: str, machine: Machine, lifetime_s: float) -> SinkPost | None:
        """A presigned POST for ``machine``'s keys only, expiring when its backstop has powered it off (launch
        time + max_lifetime + BACKSTOP_GRACE); None once that time has passed."""
        now = self.clock()
        expires_in = int((machine.launched_at or now) + lifetime_s + BACKSTOP_GRACE - now)
        if expires_in <= 0:
            return None
        url, fields = self.sink_post(cluster, machine.id, expires_in)
        return SinkPost(url, fields)

    def sink_post(self, cluster: str, machine: str, expires_in: int) -> tuple[str, dict[str, str]]:
        """The presigned POST behind ``sink_form_for`` (see ``aws_staging.S3Stager.sink_post``)."""
        try:
            return self.stager().sink_post(self.check_cluster(cluster), machine, expires_in)
        except AWS_ERRORS as exc:
            raise RawvmError(f"presigning the S3 sink failed: {aws_error(exc)}") from None

    def fetch_sink(self, cluster: str, dest: Path) -> int:
        """Optional provider hook: the cluster's flushes (S3 objects) unpacked into ``dest``; see aws_staging."""
        try:
            return self.stager().fetch_sink(self.check_cluster(cluster), dest)
        except AWS_ERRORS as exc:
            raise RawvmError(f"fetching the flushed logs from S3 failed: {aws_error(exc)}") from None

    def setup(self, region: str = "") -> tuple[str, str, bool]:
        """``rawvm setup aws``: the staging bucket (nothing with a standing cost); (region, bucket, created)."""
        region = self.resolve_region(region)
        bucket = self.bucket_name(region)
        try:
            created = aws_staging.ensure_bucket(self.client("s3", region), bucket, region)
        except AWS_ERRORS as exc:
            raise RawvmError(f"cannot set up staging bucket {bucket}: {aws_error(exc)}") from None
        return region, bucket, created

    # -- machines ----------------------------------------------------------------------------------------------

    @property
    def uv_wheel(self) -> UvWheel:
        if self._uv_wheel is None:
            self._uv_wheel = find_uv_wheel()
        return self._uv_wheel

    def _tags(self, spec: MachineSpec) -> dict[str, str]:
        now = datetime.fromtimestamp(self.clock(), UTC).replace(microsecond=0)
        expires = now + timedelta(seconds=spec.agent.idle.max_lifetime + BACKSTOP_GRACE)
        return {
            "rawvm:cluster": spec.cluster,
            "rawvm:owner": spec.owner or local_user(),
            "rawvm:created": now.isoformat().replace("+00:00", "Z"),
            "rawvm:expires": expires.isoformat().replace("+00:00", "Z"),
            "rawvm:port": str(spec.agent.port),
            "Name": f"rawvm-{spec.cluster}",
        }

    def machine_config(self, spec: MachineSpec) -> AgentConfig:
        """The agent config every machine of this launch gets: listening on all interfaces (the security
        group is the fence), watching for spot notices when it may be spot."""
        spot = dataclasses.replace(spec.agent.spot, enabled=spec.request.spot_policy != "on-demand")
        # No sink: each machine is handed its own upload once it serves (sink_form_for), never in the user-data.
        return dataclasses.replace(spec.agent, cluster=spec.cluster, bind="0.0.0.0", spot=spot)  # noqa: S104

    def user_data(self, spec: MachineSpec, image: Image) -> bytes:
        """The user-data of this launch's machines, booted from ``image`` (the agent's venv is built for it)."""
        runtime = RuntimeTarget(python=image.python, arch=image.arch, glibc=image.glibc)
        agent = stage_agent(spec.agent_wheel, lambda files: self.stage(spec.cluster, files), runtime, say)
        text = render_user_data(
            self.machine_config(spec),
            channel=spec.server_credentials(),
            agent=agent,
            uv_wheel=self.uv_wheel,
            extra_ca_certs=spec.request.extra_ca_certs,
        )
        return encode_user_data(text)

    def _image(self, region: str, arch: str, gpu: bool) -> tuple[Image, int]:
        """The AMI and the root volume size to give it."""
        try:
            image = find_image(self.client("ssm", region), arch=arch, gpu=gpu)
        except CatalogError as exc:
            raise RawvmError(str(exc)) from None
        described = self.client("ec2", region).describe_images(ImageIds=[image.image_id]).get("Images", [])
        size = 0
        if described:
            root = described[0].get("RootDeviceName") or image.root_device
            image = dataclasses.replace(image, root_device=root)
            for mapping in described[0].get("BlockDeviceMappings", []):
                if mapping.get("DeviceName") == root:
                    size = int(mapping.get("Ebs", {}).get("VolumeSize", 0))
        return image, max(MIN_ROOT_GIB, size + ROOT_HEADROOM_GIB)

    def _launch_template(self, ec2: Any, cluster: str, data: dict[str, Any], tags: dict[str, str]) -> str:
        name = f"rawvm-{cluster}"
        existing = ec2.describe_launch_templates(Filters=aws_teardown.cluster_filters(cluster))["LaunchTemplates"]
        if existing:
            template_id = str(existing[0]["LaunchTemplateId"])
            ec2.create_launch_template_version(LaunchTemplateId=template_id, LaunchTemplateData=data)
            return template_id
        response = ec2.create_launch_template(
            LaunchTemplateName=name,
            LaunchTemplateData=data,
            TagSpecifications=[{"ResourceType": "launch-template", "Tags": aws_fleet.tag_list(tags)}],
        )
        return str(response["LaunchTemplate"]["LaunchTemplateId"])

    def launch(self, spec: MachineSpec) -> list[Machine]:
        if spec.request.spot_policy not in aws_fleet.SPOT_POLICIES:
            raise UsageError(
                f"unknown spot policy {spec.request.spot_policy!r}: choose one of {', '.join(aws_fleet.SPOT_POLICIES)}"
            )
        if spec.count < 1:
            raise UsageError(f"machine count must be at least 1, got {spec.count}")
        self.check_cluster(spec.cluster)
        region = self.resolve_region(spec.request.region)
        try:
            return self._launch(spec, region)
        except (NoCredentialsError, NoRegionError) as exc:
            raise RawvmError(f"AWS is not configured: {exc}") from None
        except AWS_ERRORS as exc:
            raise RawvmError(f"EC2 launch failed: {aws_error(exc)}") from None

    def _launch(self, spec: MachineSpec, region: str) -> list[Machine]:
        ec2 = self.client("ec2", region)
        chosen = self.choose_types(spec, region)
        arch = self._arch(spec, chosen)
        gpu = spec.request.gpu or any(t.gpus for t in chosen)
        image, root_gib = self._image(region, arch, gpu)
        vpc_id, subnets = aws_network.default_network(ec2)
        tags = self._tags(spec)
        user_data = self.user_data(spec, image)
        group_id = aws_network.ensure_security_group(
            ec2,
            vpc_id=vpc_id,
            caller_ip=self.caller_ip(),
            port=spec.agent.port,
            ssh=bool(self.ssh_key_name),
            tags=tags,
            extra_ports=spec.open_ports,
            peer_ports=spec.peer_ports,
            made_by=spec.cluster,
        )
        peers = aws_peers.plan(ec2, spec, chosen, vpc_id, tags)  # gang jobs: peer group, placement, EFA
        self._placements.setdefault(spec.cluster, set()).update(
            [peers.placement_group] if peers.placement_group else []
        )
        tags |= peers.tags
        data = aws_fleet.launch_template_data(
            image_id=image.image_id,
            root_device=image.root_device,
            root_size_gib=root_gib,
            security_group_id=group_id,
            user_data=user_data,
            tags=tags | {aws_teardown.GROUP_TAG: group_id},  # 'rawvm down' finds the group on the instances
            key_name=self.ssh_key_name,
        )
        template_id = self._launch_template(ec2, spec.cluster, aws_peers.amend_template(data, peers), tags)
        placements = aws_fleet.overrides([t.name for t in chosen], aws_peers.subnets_for(peers, subnets))
        zones = dict(subnets)
        try:
            launched, tried = aws_fleet.launch_fleets(
                ec2, template_id, placements, spec.request.spot_policy, spec.count, tags, zones
            )
        finally:
            # Instant fleets have started (or refused) their instances: the template, whose user-data holds the
            # agents' key, is no longer needed. 'rawvm down' finds the cluster's groups on its instances.
            ec2.delete_launch_template(LaunchTemplateId=template_id)
        if len(launched) < spec.count:
            aws_teardown.terminate(ec2, [m.instance_id for m in launched])
            raise RawvmError(
                f"EC2 started {len(launched)} of {spec.count} machines in {region} (released them); tried: "
                + "; ".join(tried or ["no placement answered"])
                + ". Try other types (--vm-type), another region, or --spot-policy spot_with_fallback"
            )
        machines = await_addresses(
            ec2, spec.cluster, launched, tags, self.clock, self.sleep, self.poll, self.address_timeout
        )
        return [dataclasses.replace(m, price_per_hour=self.machine_price(region, m)) for m in machines]

    def list(self, cluster: str | None = None, *, region: str = "") -> list[Machine]:
        region = self.resolve_region(region)
        ec2 = self.client("ec2", region)
        try:
            found = list(aws_teardown.instances(ec2, cluster))
        except AWS_ERRORS as exc:
            raise RawvmError(f"cannot list EC2 instances: {aws_error(exc)}") from None
        return [machine_of(i) for i in found]

    def down(self, cluster: str, *, region: str = "") -> int:
        """Terminate the cluster's machines, delete its launch template, the security groups only it used, and
        its staged files (the machines fetched them at boot; the flushed logs under ``sink/`` stay)."""
        ec2 = self.client("ec2", self.resolve_region(region))
        try:
            every_state = (*aws_teardown.LIVE_STATES, "terminated")  # a group outlives its instances' termination
            placed = aws_peers.placement_groups_of(
                aws_teardown.instances(ec2, self.check_cluster(cluster), every_state)
            )
            stopped = aws_teardown.down(ec2, cluster, timeout=self.down_timeout, poll=self.poll, sleep=self.sleep)
            aws_peers.remove(ec2, placed | self._placements.pop(cluster, set()))  # once its instances are gone
            self.stager(region).delete_files(cluster)
        except AWS_ERRORS as exc:
            raise RawvmError(f"rawvm down {cluster} failed: {aws_error(exc)}; run it again") from None
        return stopped
