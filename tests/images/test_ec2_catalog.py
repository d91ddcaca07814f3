"""The EC2 image catalog and instance-type choice.

The choice rule is tested on hand-written types (each rule in isolation) and on moto's copy of EC2's real
DescribeInstanceTypes data, served by moto in server mode (the standard AWS mock: AWS is unreachable here).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from rawvm_images.ec2 import GPU_PARAMETERS, UBUNTU_PARAMETERS, CatalogError, find_image, image_parameter
from rawvm_images.instance_types import (
    InstanceType,
    choose_instance_types,
    describe_instance_types,
    fits,
    from_api,
    lookup,
)

from tests.bootstrap.test_aws_moto import REGION, MotoServer, seed_public_image_parameters, session


def _t(name: str, vcpus: int, mem: float, **kw: Any) -> InstanceType:
    return InstanceType(name=name, vcpus=vcpus, memory_gib=mem, arches=kw.pop("arches", ("x86_64",)), **kw)


TYPES = [
    _t("c7i.large", 2, 4),
    _t("m7i.large", 2, 8),
    _t("c7i.xlarge", 4, 8),
    _t("t3.large", 2, 8, burstable=True),
    _t("c5.large", 2, 4, current_generation=False),
    _t("c7i.metal-24xl", 96, 192, bare_metal=True),
    _t("c7g.large", 2, 4, arches=("aarch64",)),
    _t("g5.xlarge", 4, 16, gpus=1, gpu_memory_gib=24),
    _t("g6.xlarge", 4, 16, gpus=1, gpu_memory_gib=24, spot=False),
    _t("g5g.xlarge", 4, 8, gpus=1, arches=("aarch64",)),
]


def names(types: list[InstanceType]) -> list[str]:
    return [t.name for t in types]


def test_smallest_fitting_type_first() -> None:
    assert names(choose_instance_types(TYPES, cpu=2)) == ["c7i.large", "m7i.large", "c7i.xlarge"]
    assert names(choose_instance_types(TYPES, cpu=2, memory_gib=6)) == ["m7i.large", "c7i.xlarge"]
    assert names(choose_instance_types(TYPES, cpu=3)) == ["c7i.xlarge"]


def test_no_cpu_asked_means_at_least_two() -> None:
    tiny = [_t("c7i.medium", 1, 2), *TYPES]
    assert choose_instance_types(tiny)[0].name == "c7i.large"


def test_burstable_previous_generation_and_metal_are_never_chosen() -> None:
    chosen = names(choose_instance_types(TYPES, cpu=1, limit=100))
    assert not {"t3.large", "c5.large", "c7i.metal-24xl"} & set(chosen)


def test_gpu_only_when_asked_and_arm_by_architecture() -> None:
    assert names(choose_instance_types(TYPES, gpu=True)) == ["g5.xlarge", "g6.xlarge"]
    assert names(choose_instance_types(TYPES, gpu=True, spot=True)) == ["g5.xlarge"]
    assert names(choose_instance_types(TYPES, arm=True, limit=5)) == ["c7g.large"]
    assert names(choose_instance_types(TYPES, arm=True, gpu=True)) == ["g5g.xlarge"]


def test_nothing_fits_is_one_clear_error() -> None:
    with pytest.raises(CatalogError) as info:
        choose_instance_types(TYPES, cpu=512)
    assert "512 vCPUs" in str(info.value) and "--vm-type" in str(info.value)


def test_lookup_names_the_region() -> None:
    assert lookup(TYPES, "c7g.large", REGION).arches == ("aarch64",)
    with pytest.raises(CatalogError, match=r"unknown instance type 'c99.huge' in us-east-1"):
        lookup(TYPES, "c99.huge", REGION)


def test_from_api_reads_a_describe_instance_types_entry() -> None:
    entry = {
        "InstanceType": "g5.2xlarge",
        "CurrentGeneration": True,
        "BareMetal": False,
        "BurstablePerformanceSupported": False,
        "SupportedUsageClasses": ["on-demand", "spot"],
        "ProcessorInfo": {"SupportedArchitectures": ["x86_64"]},
        "VCpuInfo": {"DefaultVCpus": 8},
        "MemoryInfo": {"SizeInMiB": 32768},
        "GpuInfo": {"Gpus": [{"Name": "A10G", "Manufacturer": "NVIDIA", "Count": 1}], "TotalGpuMemoryInMiB": 24576},
    }
    t = from_api(entry)
    assert (t.vcpus, t.memory_gib, t.gpus, t.gpu_memory_gib, t.arches, t.spot) == (8, 32.0, 1, 24.0, ("x86_64",), True)
    assert fits(t, cpu=8, memory_gib=32, gpu=True, arch="x86_64", spot=True)
    assert not fits(t, cpu=8, memory_gib=32, gpu=False, arch="x86_64", spot=False)


def test_image_parameters_are_the_public_ones() -> None:
    assert image_parameter(arch="x86_64", gpu=False).startswith("/aws/service/canonical/ubuntu/server/24.04/")
    assert image_parameter(arch="aarch64", gpu=False).endswith("/arm64/hvm/ebs-gp3/ami-id")
    assert image_parameter(arch="x86_64", gpu=True) == GPU_PARAMETERS["x86_64"]
    assert "base-oss-nvidia-driver-gpu-ubuntu-24.04" in GPU_PARAMETERS["aarch64"]
    with pytest.raises(CatalogError, match="unknown architecture"):
        image_parameter(arch="riscv64", gpu=False)


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoServer]:
    with MotoServer() as server:
        yield server


@pytest.mark.slow
def test_real_instance_type_data_through_the_api_and_the_disk_cache(moto: MotoServer, tmp_path: Path) -> None:
    ec2 = session().client("ec2", endpoint_url=moto.url)
    calls: list[str] = []
    ec2.meta.events.register("before-call.ec2.DescribeInstanceTypes", lambda model, **kw: calls.append(model.name))
    clock = [1000.0]
    types = describe_instance_types(ec2, cache_dir=tmp_path, ttl=3600, now=lambda: clock[0])
    assert len(types) > 500 and calls
    cached = json.loads((tmp_path / f"{REGION}.json").read_text())
    assert cached["fetched_at"] == 1000.0 and len(cached["types"]) == len(types)
    first = len(calls)
    clock[0] += 60
    assert describe_instance_types(ec2, cache_dir=tmp_path, ttl=3600, now=lambda: clock[0]) == types
    assert len(calls) == first  # served from the cache
    clock[0] += 7200
    describe_instance_types(ec2, cache_dir=tmp_path, ttl=3600, now=lambda: clock[0])
    assert len(calls) > first  # expired: asked again
    # On EC2's own catalogue the rule picks a 2-vCPU compute type for small asks, an NVIDIA type for --gpu.
    small = choose_instance_types(types, cpu=2)[0]
    assert small.vcpus == 2 and not small.burstable and small.gpus == 0
    assert all(t.gpus >= 1 for t in choose_instance_types(types, gpu=True))
    assert all("aarch64" in t.arches for t in choose_instance_types(types, arm=True))


@pytest.mark.slow
def test_find_image_reads_the_public_parameter(moto: MotoServer) -> None:
    moto.reset()
    ec2 = session().client("ec2", endpoint_url=moto.url)
    seeded = seed_public_image_parameters(ec2)
    ssm = session().client("ssm", endpoint_url=moto.url)
    image = find_image(ssm, arch="x86_64", gpu=True)
    assert image.image_id == seeded[GPU_PARAMETERS["x86_64"]] and image.gpu
    assert find_image(ssm, arch="aarch64", gpu=False).image_id == seeded[UBUNTU_PARAMETERS["aarch64"]]
    other = session().client("ssm", region_name="eu-west-1", endpoint_url=moto.url)
    with pytest.raises(CatalogError, match=r"no Ubuntu 24.04 x86_64 image in region eu-west-1"):
        find_image(other, arch="x86_64", gpu=False)
