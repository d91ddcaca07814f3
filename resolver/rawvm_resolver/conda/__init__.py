"""The conda part of an environment: read it (environment.yml or a prefix), re-solve it for the target subdir.

The resolver core imports these names lazily; the rest of the package is private.
"""

from __future__ import annotations

from rawvm_resolver.conda.inputs import CondaInput, read_environment_yml, scan_conda_prefix
from rawvm_resolver.conda.lock import DEFAULT_CHANNELS, lock_conda, target_virtual_packages
from rawvm_resolver.conda.specs import macos_only_reason

__all__ = [
    "DEFAULT_CHANNELS",
    "CondaInput",
    "lock_conda",
    "macos_only_reason",
    "read_environment_yml",
    "scan_conda_prefix",
    "target_virtual_packages",
]
