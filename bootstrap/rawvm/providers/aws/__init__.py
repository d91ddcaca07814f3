"""The aws provider: EC2 machines from one CreateFleet, staged through a private S3 bucket.

One module per AWS concern, as SkyPilot keeps one folder per cloud: ``provider`` (the Provider), ``fleet``
(launch template, CreateFleet), ``network`` (VPC, security group), ``prices`` (Price List, spot history),
``staging`` (S3 bucket, presigned URLs), ``teardown`` and ``sweep`` (finding and ending what rawvm left).
"""

from __future__ import annotations

from rawvm.providers.aws.config import default_config_path, read_settings, write_settings
from rawvm.providers.aws.provider import AwsProvider

__all__ = ["AwsProvider", "default_config_path", "read_settings", "write_settings"]
