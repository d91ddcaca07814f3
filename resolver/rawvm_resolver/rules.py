"""Translation rules: ONE table. Each rule says what happens to a package on a Linux target, and why.

Everything not in the table keeps its exact version; uv decides which platform-conditional dependencies
appear or disappear. Each rule has a test in tests/resolver/test_rules.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase

# Actions
DROP = "drop"  # never on the target
RENAME = "rename"  # becomes another distribution at the same version (plus extras on CUDA)
TORCH = "torch"  # keep; the build (CPU/CUDA, index) depends on the target
LINUX_OR_DROP = "linux-or-drop"  # keep where the target has an artifact, else drop with a warning

TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
TORCH_CUDA_INDEX = "https://download.pytorch.org/whl/cu{cuda}"  # e.g. cu128


@dataclass(frozen=True)
class Rule:
    pattern: str  # canonical name, or an fnmatch pattern such as "pyobjc*"
    action: str
    reason: str
    replacement: str = ""  # RENAME: the Linux distribution
    cuda_extras: tuple[str, ...] = ()  # RENAME: extras added on a CUDA target
    cuda_reason: str = ""  # RENAME: the reason on a CUDA target
    cpu_extras: tuple[str, ...] = ()  # LINUX_OR_DROP: extras the Linux build needs on a CPU target
    macos_only: bool = False  # the package exists only for macOS: a Linux lock must never pin it
    same_version: bool = True  # RENAME: the replacement takes the renamed package's version


# A pip freeze taken inside a conda environment lists conda's own tools; their PyPI releases are stale or do not
# build (ruamel-yaml-conda 0.15.80's sdist fails), and the VM's environment is a uv venv that needs none of them.
_CONDA_TOOLING = "conda's own tooling, listed by a pip freeze of a conda environment: the VM's uv venv needs no conda"

_PYG_EXTENSION = (
    "WARNING: PyG extension whose PyPI release is an sdist that needs torch to build: dropped (torch_geometric "
    "runs without it); install its wheel on the VM from https://data.pyg.org/whl/ for your torch and CUDA"
)

RULES: tuple[Rule, ...] = (
    Rule("pyobjc", DROP, "macOS-only bridge to Objective-C frameworks: no Linux build exists", macos_only=True),
    Rule("pyobjc-*", DROP, "macOS-only bridge to Objective-C frameworks: no Linux build exists", macos_only=True),
    Rule(
        "applaunchservices",
        DROP,
        "macOS Launch Services bindings (Spyder's helper, built on pyobjc): nothing on Linux can use them",
        macos_only=True,
    ),
    Rule("appscript", DROP, "macOS Apple Events bridge: no Linux counterpart exists", macos_only=True),
    Rule(
        "appnope",
        DROP,
        "macOS App Nap control: nothing on Linux needs it (uv adds it back if a Linux package does)",
        macos_only=True,
    ),
    Rule(
        "tensorflow-metal",
        DROP,
        "Apple Metal GPU plugin for TensorFlow: Linux uses TensorFlow's own kernels",
        macos_only=True,
    ),
    Rule(
        "tensorflow-macos",
        RENAME,
        "Apple's TensorFlow build: the same version of tensorflow from PyPI on Linux",
        replacement="tensorflow",
        cuda_extras=("and-cuda",),
        cuda_reason="Apple's TensorFlow build: tensorflow[and-cuda] on a CUDA target (its CUDA libraries as wheels)",
        macos_only=True,
    ),
    Rule(
        "jax-metal",
        RENAME,
        "Apple Metal plugin for JAX: plain jax on a CPU target",
        replacement="jax",
        cuda_extras=("cuda12",),
        cuda_reason="Apple Metal plugin for JAX: jax[cuda12] on a CUDA target (the CUDA 12 plugin and libraries)",
        macos_only=True,
    ),
    Rule(
        "onnxruntime-silicon",
        RENAME,
        "community build of ONNX Runtime for Apple silicon: onnxruntime from PyPI on Linux",
        replacement="onnxruntime",
        macos_only=True,
    ),
    Rule(
        "faiss",
        RENAME,
        "conda's faiss: on PyPI the FAISS project's wheels are faiss-cpu, same version (PyPI's `faiss` is an "
        "unrelated 2019 build for CPython <= 3.7); it runs on a GPU machine too, on the CPU",
        replacement="faiss-cpu",
    ),
    Rule(
        "sklearn",
        RENAME,
        "the deprecated `sklearn` alias on PyPI (its sdist refuses to install since 0.0.post12): scikit-learn, at "
        "the environment's own scikit-learn version if it has one",
        replacement="scikit-learn",
        same_version=False,
    ),
    Rule("torch", TORCH, "the target's build of torch, same version"),
    # PyG's compiled extensions: PyPI has only sdists, whose setup.py imports torch (so no resolver can even read
    # their metadata without installing torch); the wheels are on PyG's own index, per torch version and CUDA.
    # torch_geometric itself runs without them (they speed up some layers).
    *(
        Rule(name, DROP, _PYG_EXTENSION)
        for name in ("pyg-lib", "torch-cluster", "torch-scatter", "torch-sparse", "torch-spline-conv")
    ),
    # mlx's Linux wheels (manylinux_2_35 since 0.26.5, so glibc >= 2.35) hold only the Python binding: the
    # library itself is mlx-cpu or mlx-cuda, which mlx's own `cpu` / `cuda` extras pull in on Linux.
    Rule(
        "mlx",
        LINUX_OR_DROP,
        "Apple's array framework: its Linux build with the backend the target needs (mlx[cpu] or mlx[cuda])",
        cpu_extras=("cpu",),
        cuda_extras=("cuda",),
    ),
    Rule(
        "mlx-metal",
        DROP,
        "mlx's Metal backend, macOS-only: on Linux mlx[cpu] / mlx[cuda] bring mlx-cpu / mlx-cuda instead",
        macos_only=True,
    ),
    *(
        Rule(name, DROP, _CONDA_TOOLING)
        for name in (
            "conda",
            "conda-build",
            "conda-content-trust",
            "conda-libmamba-solver",
            "conda-package-handling",
            "conda-package-streaming",
            "conda-repo-cli",
            "conda-token",
            "conda-verify",
            "ruamel-yaml-conda",
            "anaconda-client",
            "anaconda-navigator",
            "anaconda-project",
            "navigator-updater",
        )
    ),
    Rule("pywin32", DROP, "Windows-only API bindings: no Linux build exists"),
    Rule("pywinpty", DROP, "Windows-only pseudo-terminal: Linux terminals need no helper"),
)


def rule_for(name: str) -> Rule | None:
    """The first rule whose pattern matches the canonical ``name``."""
    for rule in RULES:
        if fnmatchcase(name, rule.pattern):
            return rule
    return None


def is_macos_only(name: str) -> bool:
    """Whether the table says ``name`` exists only for macOS (a Linux lock that pins it is wrong)."""
    rule = rule_for(name)
    return rule is not None and rule.macos_only


def torch_reason(arch: str, cuda: bool, index: str) -> str:
    """Why torch is what it is on the target; honest about which build PyPI serves."""
    if index:
        return f"torch from {index} for linux-{arch} ({'CUDA' if cuda else 'CPU'} build), same version"
    if cuda:
        return f"CUDA build for linux-{arch}: PyPI's default wheel brings the nvidia-* packages"
    if arch == "x86_64":
        return (
            "PyPI's linux-x86_64 wheel (runs on CPU; recent releases pull the nvidia-* CUDA libraries too); "
            f"for the CPU-only build pass --torch-index {TORCH_CPU_INDEX}"
        )
    return "PyPI's linux-aarch64 wheel, same version (runs on CPU)"


# Packages that follow torch to its index when --torch-index is given.
TORCH_FAMILY = ("torch", "torchvision", "torchaudio", "triton")
