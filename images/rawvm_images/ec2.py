"""The EC2 image catalog: which AMI a machine boots, read from AWS's public SSM parameters (never hard-coded IDs).

- CPU: Canonical's Ubuntu 24.04 LTS (gp3 root), amd64 or arm64.
- GPU: AWS's "Deep Learning Base OSS Nvidia Driver GPU AMI (Ubuntu 24.04)": the NVIDIA driver and CUDA are
  already installed, so the bootstrap stays the same as on CPU.

Both are Ubuntu 24.04, so the resolver's target is the same: glibc 2.39, system Python 3.12.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

ARCHES = ("x86_64", "aarch64")

# /aws/service/canonical/ubuntu/server/<release>/stable/current/<arch>/hvm/ebs-gp3/ami-id
UBUNTU_PARAMETERS = {
    "x86_64": "/aws/service/canonical/ubuntu/server/24.04/stable/current/amd64/hvm/ebs-gp3/ami-id",
    "aarch64": "/aws/service/canonical/ubuntu/server/24.04/stable/current/arm64/hvm/ebs-gp3/ami-id",
}
# /aws/service/deeplearning/ami/<arch>/<ami type>/latest/ami-id (AWS DLAMI docs, "Finding the ID of a DLAMI")
GPU_PARAMETERS = {
    "x86_64": "/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-24.04/latest/ami-id",
    "aarch64": "/aws/service/deeplearning/ami/arm64/base-oss-nvidia-driver-gpu-ubuntu-24.04/latest/ami-id",
}
UBUNTU_2404_GLIBC = "2.39"
UBUNTU_2404_PYTHON = "3.12"


class CatalogError(Exception):
    """No image or instance type fits; the message names what was asked and what to do."""


@dataclass(frozen=True)
class Image:
    image_id: str
    parameter: str  # the SSM public parameter it came from
    arch: str  # x86_64 | aarch64
    gpu: bool
    glibc: str = UBUNTU_2404_GLIBC
    python: str = UBUNTU_2404_PYTHON
    root_device: str = "/dev/sda1"  # Ubuntu and the DLAMI both boot from /dev/sda1

    @property
    def platform(self) -> str:
        """The resolver's platform string for machines booted from it."""
        return f"linux-{self.arch}"


def image_parameter(*, arch: str, gpu: bool) -> str:
    if arch not in ARCHES:
        raise CatalogError(f"unknown architecture {arch!r}: rawvm's EC2 images are x86_64 or aarch64")
    return (GPU_PARAMETERS if gpu else UBUNTU_PARAMETERS)[arch]


def find_image(ssm: Any, *, arch: str, gpu: bool) -> Image:
    """The current AMI for ``arch``/``gpu`` in the SSM client's region (one GetParameter call)."""
    name = image_parameter(arch=arch, gpu=gpu)
    region = getattr(getattr(ssm, "meta", None), "region_name", "?")
    try:
        value = ssm.get_parameter(Name=name)["Parameter"]["Value"]
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        if code == "ParameterNotFound":
            kind = "GPU (Deep Learning Base OSS Nvidia Driver)" if gpu else "Ubuntu 24.04"
            raise CatalogError(
                f"no {kind} {arch} image in region {region} (SSM parameter {name}); pick another region"
            ) from None
        raise CatalogError(f"cannot read SSM parameter {name} in {region}: {code or exc}") from None
    except BotoCoreError as exc:
        raise CatalogError(f"cannot read SSM parameter {name} in {region}: {exc}") from None
    if not str(value).startswith("ami-"):
        raise CatalogError(f"SSM parameter {name} in {region} holds {value!r}, not an AMI id")
    return Image(image_id=str(value), parameter=name, arch=arch, gpu=gpu)
