"""One test beside each rule that carries a conda spec from macOS to a Linux subdir."""

from __future__ import annotations

import pytest
from rawvm_resolver.conda.history import requested_specs
from rawvm_resolver.conda.specs import (
    carry_over,
    drop_build_string,
    expand_channels,
    macos_only_reason,
    normalize_channel,
    spec_name,
)
from rawvm_resolver.errors import InputError


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("numpy=1.26.4=py311he598dae_0", "numpy ==1.26.4"),  # conda env export pin: the build is osx-arm64's
        ("python=3.11.7=hb885b13_0_cpython", "python ==3.11.7"),
        ("conda-forge::pandas=2.2.1=py311hfbe21a1_0", "conda-forge::pandas ==2.2.1"),
        ("python=3.11", "python=3.11"),  # a fuzzy request, no build: kept as the user wrote it
        ("numpy>=1.26,<2", "numpy>=1.26,<2"),
        ("  scipy  ", "scipy"),
        ("pytorch=2.2=*cuda*", "pytorch=2.2=*cuda*"),  # a variant the user asked for, portable across subdirs
    ],
)
def test_drop_build_string_keeps_name_and_exact_version(spec: str, expected: str) -> None:
    assert drop_build_string(spec) == expected


@pytest.mark.parametrize(
    "name",
    ["libcxx", "llvm-openmp", "libgfortran", "libgfortran5", "appnope", "tensorflow-metal", "jax-metal",
     "pyobjc-core", "pyobjc-framework-Cocoa", "clang_osx-arm64", "clangxx_osx-64"],
)  # fmt: skip
def test_macos_only_packages_have_a_reason(name: str) -> None:
    reason = macos_only_reason(name)
    assert reason
    assert reason.strip() == reason


@pytest.mark.parametrize("name", ["numpy", "libstdcxx-ng", "openssl", "libopenblas", "pytorch", "libgomp"])
def test_portable_packages_are_carried_over(name: str) -> None:
    assert macos_only_reason(name) is None
    assert carry_over(name) == name


def test_carry_over_drops_macos_only_pins_and_strips_builds() -> None:
    assert carry_over("libcxx=16.0.6=h4653b0c_0") is None
    assert carry_over("scikit-learn=1.4.1.post1=py311h696ec7d_0") == "scikit-learn ==1.4.1.post1"


def test_spec_name_parses_matchspecs() -> None:
    assert spec_name("conda-forge::NumPy >=1.26") == "numpy"
    assert spec_name("python ==3.11.7") == "python"


def test_invalid_spec_is_one_clear_input_error() -> None:
    with pytest.raises(InputError, match=r"invalid conda spec 'numpy ===<<>'.*MatchSpec") as info:
        spec_name("numpy ===<<>")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("channel", "expected"),
    [
        ("https://conda.anaconda.org/conda-forge/osx-arm64", "conda-forge"),
        ("https://conda.anaconda.org/conda-forge/noarch/", "conda-forge"),
        ("https://conda.anaconda.org/pytorch", "pytorch"),
        ("conda-forge", "conda-forge"),
        ("https://repo.anaconda.com/pkgs/main/osx-arm64", "https://repo.anaconda.com/pkgs/main"),
        ("https://example.org/channels/ml/linux-64", "https://example.org/channels/ml"),
        ("https://conda.anaconda.org/t/tk-1/private/osx-arm64", "https://conda.anaconda.org/t/tk-1/private"),
    ],
)
def test_normalize_channel_removes_the_source_subdir(channel: str, expected: str) -> None:
    assert normalize_channel(channel) == expected


def test_expand_channels_resolves_defaults_and_skips_nodefaults() -> None:
    assert expand_channels(["conda-forge", "nodefaults"]) == ("conda-forge",)
    assert expand_channels(["pytorch", "defaults", "conda-forge", "pytorch"]) == (
        "pytorch",
        "https://repo.anaconda.com/pkgs/main",
        "https://repo.anaconda.com/pkgs/r",
        "conda-forge",
    )


def test_history_replays_installs_updates_and_removals() -> None:
    history = """\
==> 2024-03-01 10:00:00 <==
# cmd: /Users/ana/miniforge3/bin/conda create -n ds python=3.11 numpy
# conda version: 24.1.2
+conda-forge/osx-arm64::python-3.11.7-hdf0ec26_1_cpython
# update specs: ['python=3.11', 'numpy']
==> 2024-03-02 09:00:00 <==
# cmd: /Users/ana/miniforge3/bin/conda install matplotlib numpy>=1.26
# update specs: ['matplotlib', 'numpy>=1.26']
==> 2024-03-03 09:00:00 <==
# cmd: /Users/ana/miniforge3/bin/conda remove matplotlib
# remove specs: ['matplotlib']
==> 2024-03-04 09:00:00 <==
# update specs: scipy, conda-forge::pandas
"""
    assert requested_specs(history.splitlines(), spec_name) == ["python=3.11", "numpy>=1.26", "scipy",
                                                                 "conda-forge::pandas"]  # fmt: skip
