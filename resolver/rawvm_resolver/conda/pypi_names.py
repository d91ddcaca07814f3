"""conda package name → PyPI distribution name, from kept data rather than guesses.

``conda_pypi_names.json`` beside this module holds the mapping with its source: grayskull's conda-forge ↔ PyPI
table (regro's bot, from conda-forge recipes built from PyPI sources), as the ``conda-pypi`` package on PyPI
ships it (``conda_pypi/grayskull_pypi_mapping.json``, MIT). It maps a conda package to the PyPI distribution it
repackages; a value of null (which parselmouth-format input can carry) means "no PyPI distribution". Refresh::

    pip download --no-deps conda-pypi==VERSION && unzip conda_pypi-*.whl conda_pypi/grayskull_pypi_mapping.json
    python -m rawvm_resolver.conda.pypi_names refresh conda_pypi/grayskull_pypi_mapping.json \\
        --source "conda-pypi VERSION on PyPI: conda_pypi/grayskull_pypi_mapping.json"

The refresh also reads prefix.dev parselmouth's ``compressed_mapping.json`` (conda name → [PyPI names] or null).
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rawvm_resolver.environment import canonical

DATA_FILE = Path(__file__).with_name("conda_pypi_names.json")
_HASHLIKE = re.compile(r"[0-9a-f]{40,}")  # a few bot entries carry a hash, not a name


# Renames the table lacks or gets wrong, kept here with the data: conda-forge's split or renamed packages.
RAWVM_ADDITIONS: dict[str, str] = {
    "brotli-python": "brotli",  # the Python binding; conda's "brotli" is the C library
    "py-xgboost": "xgboost",
    "pytorch-cpu": "torch",
    "pytorch-gpu": "torch",
    "pyqt": "pyqt5",  # conda-forge's pyqt 5.x
    "tensorflow-base": "tensorflow",
    "tensorflow-cpu": "tensorflow",
    "tensorflow-estimator": "tensorflow-estimator",
    "nbconvert-core": "nbconvert",  # conda-forge's split of nbconvert
    "pandera-base": "pandera",
    "torchvision": "torchvision",  # the pytorch channel's, same names as PyPI's
    "torchaudio": "torchaudio",
    "torchtext": "torchtext",
}


@dataclass(frozen=True)
class PypiName:
    known: bool  # the mapping lists this conda package
    pypi: str  # its PyPI distribution (canonical), "" when it has none


def pypi_name(conda_name: str) -> PypiName:
    """What the kept mapping says about ``conda_name``."""
    names = _names()
    key = conda_name.strip().lower()
    if key in RAWVM_ADDITIONS:
        return PypiName(known=True, pypi=RAWVM_ADDITIONS[key])
    if key not in names:
        return PypiName(known=False, pypi="")
    value = names[key]
    return PypiName(known=True, pypi=canonical(value) if value else "")


def mapping_source() -> str:
    """Where the data came from, for reasons in the report."""
    return str(_load()["source"]["from"])


@functools.cache
def _load() -> dict[str, Any]:
    return dict(json.loads(DATA_FILE.read_text()))


def _names() -> dict[str, str | None]:
    return dict(_load()["names"])


def choose(conda_name: str, candidates: list[str] | None) -> str | None:
    """One PyPI name for a conda package whose files hold several distributions.

    A package may vendor others (``ansible`` → ansible, pip, setuptools, wheel): prefer the distribution named
    like the package without its conda-only ``python-``/``-python``/``py-`` affix (``msgpack-python`` → msgpack),
    then the package's own name, then the first listed.
    """
    if not candidates:
        return None
    listed = [canonical(name) for name in candidates]
    own = canonical(conda_name)
    stripped = own.removeprefix("python-").removesuffix("-python").removeprefix("py-")
    for wanted in (stripped, own):
        if wanted in listed:
            return wanted
    return listed[0]


def conda_to_pypi(mapping: dict[str, Any]) -> dict[str, list[str] | None]:
    """Either input format as conda name → candidate PyPI names (None: none).

    grayskull's table is keyed by PyPI name (``{"torch": {"conda_name": "pytorch", ...}}``); parselmouth's by conda
    name (``{"pytorch": ["torch"], "libcxx": null}``).
    """
    out: dict[str, list[str] | None] = {}
    for key, value in mapping.items():
        if isinstance(value, dict):
            pypi, conda = str(value.get("pypi_name", key)), str(value.get("conda_name", ""))
            if conda and not _HASHLIKE.fullmatch(pypi):
                out.setdefault(conda.lower(), [])
                out[conda.lower()].append(pypi)  # type: ignore[union-attr]
        elif value is None or isinstance(value, list):
            out[key.lower()] = None if value is None else [str(name) for name in value]
    return out


def build_data(mappings: list[dict[str, Any]], source: str) -> dict[str, Any]:
    """The data file's content; earlier mappings win where two name the same conda package."""
    names: dict[str, str | None] = {}
    for mapping in mappings:
        for conda_name, candidates in sorted(conda_to_pypi(mapping).items()):
            names.setdefault(conda_name, choose(conda_name, sorted(candidates) if candidates else None))
    return {
        "source": {
            "from": source,
            "refresh": "python -m rawvm_resolver.conda.pypi_names refresh MAPPING_JSON... --source TEXT",
        },
        "names": dict(sorted(names.items())),
    }


def write_data(data: dict[str, Any], path: Path = DATA_FILE) -> None:
    # One entry a line: a refresh shows as a readable diff.
    entries = [f"    {json.dumps(name)}: {json.dumps(value)}" for name, value in data["names"].items()]
    text = "{\n" + f'  "source": {json.dumps(data["source"], sort_keys=True)},\n  "names": {{\n'
    path.write_text(text + ",\n".join(entries) + "\n  }\n}\n")


def _read(location: str) -> dict[str, Any]:
    if location.startswith(("https://", "http://")):
        with urllib.request.urlopen(location, timeout=120) as response:  # noqa: S310 (scheme checked above)
            return dict(json.load(response))
    return dict(json.loads(Path(location).read_text()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rawvm_resolver.conda.pypi_names")
    commands = parser.add_subparsers(dest="command", required=True)
    refresh = commands.add_parser("refresh", help="rewrite the kept mapping from parselmouth's files")
    refresh.add_argument("mappings", nargs="+", metavar="JSON", help="mapping files (paths or URLs), first wins")
    refresh.add_argument("--source", required=True, help="where they came from, e.g. 'conda-pypi 0.13.1 (PyPI)'")
    args = parser.parse_args(argv)
    data = build_data([_read(location) for location in args.mappings], args.source)
    write_data(data)
    print(f"wrote {len(data['names'])} names to {DATA_FILE}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
