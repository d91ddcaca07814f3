"""Every translation rule in rawvm_resolver.rules.RULES, each with its own case (a rule without one fails)."""

from __future__ import annotations

import pytest
from rawvm_resolver.environment import Distribution, Environment, SourcePlatform
from rawvm_resolver.rules import RULES, TORCH_CPU_INDEX, is_macos_only, rule_for
from rawvm_resolver.target import Target
from rawvm_resolver.translate import translate

MAC = SourcePlatform(python="3.11.9", platform="macosx_14_0_arm64", os="macos", arch="arm64", libc="14.0")
CPU_X86 = Target(arch="x86_64", python="3.11")
CUDA_X86 = Target(arch="x86_64", python="3.11", accelerator="cuda", cuda="12.8")
CPU_ARM = Target(arch="aarch64", python="3.11")


def env_of(*dists: Distribution) -> Environment:
    return Environment(origin="test", kind="environment", platform=MAC, distributions=tuple(dists))


def requested(name: str, version: str) -> Distribution:
    return Distribution(name=name, version=version, requested=True)


Case = tuple[str, str, str, Target, str | None, str]


def dropped_on_cpu_x86(*pins: tuple[str, str]) -> list[Case]:
    """Cases of packages whose rule is their own name, each dropped for a CPU x86_64 target: (name, version)s."""
    return [(name, name, version, CPU_X86, None, "dropped") for name, version in pins]


# (rule pattern, package that triggers it, version, target, expected requirement line or None, expected action)
CASES = [
    ("pyobjc", "pyobjc", "10.3.1", CPU_X86, None, "dropped"),
    ("pyobjc-*", "pyobjc-framework-cocoa", "10.3.1", CPU_X86, None, "dropped"),
    ("appnope", "appnope", "0.1.4", CPU_X86, None, "dropped"),
    ("applaunchservices", "applaunchservices", "0.3.0", CPU_X86, None, "dropped"),  # versions from a real freeze
    ("appscript", "appscript", "1.1.2", CPU_X86, None, "dropped"),
    ("tensorflow-metal", "tensorflow-metal", "1.1.0", CUDA_X86, None, "dropped"),
    ("tensorflow-macos", "tensorflow-macos", "2.16.2", CPU_X86, "tensorflow", "translated"),
    ("jax-metal", "jax-metal", "0.1.1", CPU_ARM, "jax", "translated"),
    ("torch", "torch", "2.5.1", CUDA_X86, "torch", "translated"),
    ("faiss", "faiss", "1.7.4", CPU_X86, "faiss-cpu", "translated"),
    ("sklearn", "sklearn", "0.0.post12", CPU_X86, "scikit-learn", "translated"),
    # PyG's extensions (versions from a real freeze: ipastore/colon_matching requirements.txt)
    *dropped_on_cpu_x86(
        ("pyg-lib", "0.4.0"),
        ("torch-cluster", "1.6.3"),
        ("torch-scatter", "2.1.2"),
        ("torch-sparse", "0.6.18"),
        ("torch-spline-conv", "1.2.2"),
    ),
    ("onnxruntime-silicon", "onnxruntime-silicon", "1.16.0", CPU_ARM, "onnxruntime", "translated"),
    ("mlx", "mlx", "0.29.0", CPU_X86, "mlx[cpu]", "translated"),
    ("mlx-metal", "mlx-metal", "0.29.0", CPU_X86, None, "dropped"),
    ("pywin32", "pywin32", "306", CPU_X86, None, "dropped"),
    ("pywinpty", "pywinpty", "2.0.13", CPU_X86, None, "dropped"),
    # conda's own tools, as a pip freeze inside a conda environment lists them (versions from real freezes)
    *dropped_on_cpu_x86(
        ("conda", "4.12.0"),
        ("conda-build", "3.21.8"),
        ("conda-content-trust", "0.1.1"),
        ("conda-libmamba-solver", "23.1.0"),
        ("conda-package-handling", "1.7.3"),
        ("conda-package-streaming", "0.7.0"),
        ("conda-repo-cli", "1.0.4"),
        ("conda-token", "0.3.0"),
        ("conda-verify", "3.4.2"),
        ("ruamel-yaml-conda", "0.15.80"),
        ("anaconda-client", "1.9.0"),
        ("anaconda-navigator", "2.1.4"),
        ("anaconda-project", "0.10.2"),
        ("navigator-updater", "0.2.1"),
    ),
]


def test_every_rule_has_a_case() -> None:
    assert {case[0] for case in CASES} == {rule.pattern for rule in RULES}


def test_every_rule_has_a_reason() -> None:
    assert all(len(rule.reason) > 20 for rule in RULES)


@pytest.mark.parametrize(("pattern", "name", "version", "target", "requirement", "action"), CASES)
def test_rule(
    pattern: str, name: str, version: str, target: Target, requirement: str | None, action: str | None
) -> None:
    rule = rule_for(name)
    assert rule is not None and rule.pattern == pattern
    plan = translate(env_of(requested(name, version)), target)
    lines = plan.requirement_lines()
    assert lines == ([requirement] if requirement else [])
    if action is None:
        assert name not in plan.rows
    else:
        assert plan.rows[name].action == action
        assert plan.rows[name].reason
    if action == "dropped":
        assert plan.constraint_lines() == []


def test_renamed_packages_keep_the_version_and_gain_cuda_extras() -> None:
    plan = translate(env_of(requested("tensorflow-macos", "2.16.2")), CUDA_X86)
    assert plan.requirement_lines() == ["tensorflow[and-cuda]"]
    assert plan.constraint_lines() == ["tensorflow==2.16.2"]
    assert plan.optional_extras == {"tensorflow": ("and-cuda",)}
    assert "and-cuda" in plan.rows["tensorflow-macos"].reason

    plan = translate(env_of(requested("jax-metal", "0.1.1"), Distribution("jax", "0.4.34")), CUDA_X86)
    assert plan.requirement_lines() == ["jax[cuda12]"]
    assert plan.constraint_lines() == ["jax==0.4.34"]  # jax's own pin, not jax-metal's version


def test_the_sklearn_alias_becomes_scikit_learn_at_its_own_version() -> None:
    alone = translate(env_of(requested("sklearn", "0.0.post12")), CPU_X86)
    assert alone.requirement_lines() == ["scikit-learn"] and alone.constraint_lines() == []  # 0.0 is no sklearn
    both = translate(env_of(requested("scikit-learn", "1.3.2"), requested("sklearn", "0.0.post12")), CPU_X86)
    assert both.constraints["scikit-learn"] == "1.3.2"


def test_torch_reason_is_honest_about_the_build() -> None:
    cuda = translate(env_of(requested("torch", "2.5.1")), CUDA_X86).rows["torch"].reason
    assert "nvidia-*" in cuda
    cpu = translate(env_of(requested("torch", "2.5.1")), CPU_X86).rows["torch"].reason
    assert TORCH_CPU_INDEX in cpu
    indexed = translate(env_of(requested("torch", "2.5.1")), CPU_X86, torch_index=TORCH_CPU_INDEX)
    assert indexed.extra_index_urls == [TORCH_CPU_INDEX]
    assert TORCH_CPU_INDEX in indexed.rows["torch"].reason


def test_torch_index_is_ignored_without_torch() -> None:
    assert translate(env_of(requested("six", "1.17.0")), CPU_X86, torch_index=TORCH_CPU_INDEX).extra_index_urls == []


def test_mlx_is_marked_for_drop_when_linux_lacks_it() -> None:
    assert translate(env_of(requested("mlx", "0.29.0")), CPU_X86).linux_or_drop == {"mlx"}


def test_mlx_takes_the_backend_extra_its_linux_wheels_need() -> None:
    # mlx's Linux wheel is only the binding: libmlx comes from mlx-cpu / mlx-cuda through mlx's extras.
    cpu = translate(env_of(requested("mlx", "0.29.0"), Distribution("mlx-metal", "0.29.0")), CPU_ARM)
    assert cpu.requirement_lines() == ["mlx[cpu]"]
    assert cpu.constraint_lines() == ["mlx==0.29.0"]
    assert cpu.optional_extras == {"mlx": ("cpu",)}
    cuda = translate(env_of(requested("mlx", "0.29.0")), CUDA_X86)
    assert cuda.requirement_lines() == ["mlx[cuda]"]
    assert translate(env_of(requested("mlx-metal", "0.29.0")), CPU_X86).rows["mlx-metal"].action == "dropped"


def test_macos_only_names_come_from_the_table() -> None:
    assert is_macos_only("pyobjc-framework-quartz") and is_macos_only("tensorflow-macos")
    assert is_macos_only("mlx-metal") and is_macos_only("appnope")
    assert not is_macos_only("mlx") and not is_macos_only("torch") and not is_macos_only("pywin32")


def test_unruled_packages_are_pinned_and_dependencies_are_constraints_only() -> None:
    plan = translate(env_of(requested("pandas", "2.2.3"), Distribution("numpy", "2.1.3")), CPU_X86)
    assert plan.requirement_lines() == ["pandas"]
    assert plan.constraint_lines() == ["numpy==2.1.3", "pandas==2.2.3"]
    assert plan.rows == {}
