"""A test of the suite itself: no test runs a guarded system tool without ``need_tool`` (tests/systools.py).

On a fresh machine (uv and the OS only) a test whose tool is missing must skip, naming the Debian package, and
under CI fail; a bare ``subprocess.run(["cloud-init", ...])`` instead dies with FileNotFoundError. So every
argv in the tests that starts with a guarded tool's name (a literal list or tuple, or a shell string) must sit in
a function that calls ``need_tool`` for that tool -- itself, through a function of the same file it calls, or
through a fixture it takes (from its file or a conftest.py above it). ``need_vm_tools()`` guards the VM tools.
Running the tool by the path ``need_tool`` returned (``exe = need_tool(...)``; ``[exe, ...]``) is the usual way
and needs no literal at all.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

TESTS = Path(__file__).parent

GUARDED = frozenset(
    {
        "cloud-init",
        "cloud-localds",
        "promtool",
        "prometheus",
        "debootstrap",
        "chromium",
        "chromium-browser",
        "google-chrome",
        "tmux",
        "openssl",
        "mount",
        "umount",
        "genisoimage",
        "mkisofs",
        "nvidia-smi",
        "dcgmi",
        "docker",
        "ssh",
        "sudo",
        "kvm",
    }
)
GUARDED_PREFIXES = ("qemu-", "systemd-", "mkfs", "dcgm-")
VM_TOOLS = frozenset({"qemu-system-x86_64", "qemu-system-aarch64", "qemu-img", "debootstrap", "cloud-localds"})


def guarded(tool: str) -> bool:
    name = tool.rsplit("/", 1)[-1]
    return name in GUARDED or name.startswith(GUARDED_PREFIXES)


@dataclass
class Function:
    """What one function of a test file does about system tools."""

    name: str
    params: list[str]
    guards: set[str] = field(default_factory=set)  # tools it calls need_tool for
    calls: set[str] = field(default_factory=set)  # names it calls (same-file functions count)


RUNNERS = frozenset(
    {
        "subprocess.run",
        "subprocess.Popen",
        "subprocess.call",
        "subprocess.check_call",
        "subprocess.check_output",
        "psutil.Popen",
        "os.system",
        "os.popen",
        "asyncio.create_subprocess_shell",
    }
)
PROGRAM_FIRST = frozenset({"asyncio.create_subprocess_exec", "os.execv", "os.execvp", "os.execl", "os.execlp"})
GUARD_CALLS = frozenset({"need_tool", "tool_path"})


def _word(node: ast.expr) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.strip():
        return node.value.split()[0]
    return None


def _tool(node: ast.expr | None, names: dict[str, ast.expr], depth: int = 0) -> str | None:
    """The program an argv (or a shell string) starts with, following names to the list they were given."""
    if node is None or depth > 5:
        return None
    if isinstance(node, ast.Name):
        return _tool(names.get(node.id), names, depth + 1)
    if isinstance(node, ast.Starred):
        return _tool(node.value, names, depth + 1)
    if isinstance(node, ast.List | ast.Tuple):
        return _tool(node.elts[0], names, depth + 1) if node.elts else None
    if isinstance(node, ast.Call) and ast.unparse(node.func).rsplit(".", 1)[-1] in GUARD_CALLS:
        return None  # the path need_tool gave: guarded where it was made
    if isinstance(node, ast.Call) and ast.unparse(node.func) in {"shutil.which", "which"} and node.args:
        return _word(node.args[0])  # found or None, and no skip or CI failure when it is not there
    return _word(node)


def _runs(call: ast.Call, names: dict[str, ast.expr]) -> str | None:
    """The program ``call`` starts on this machine, when it starts one."""
    callee = ast.unparse(call.func)
    if callee in PROGRAM_FIRST:
        return _tool(call.args[0] if call.args else None, names)
    if callee not in RUNNERS:
        return None
    argv = call.args[0] if call.args else next((k.value for k in call.keywords if k.arg == "args"), None)
    return _tool(argv, names)


def _assignments(node: ast.AST) -> dict[str, ast.expr]:
    """``name = value`` in ``node`` (the last one wins: good enough for an argv built once)."""
    names: dict[str, ast.expr] = {}
    for inner in ast.walk(node):
        if isinstance(inner, ast.Assign) and len(inner.targets) == 1 and isinstance(inner.targets[0], ast.Name):
            names[inner.targets[0].id] = inner.value
        elif isinstance(inner, ast.AnnAssign) and isinstance(inner.target, ast.Name) and inner.value is not None:
            names[inner.target.id] = inner.value
    return names


def _functions(tree: ast.Module) -> dict[str, Function]:
    found = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            fn = Function(node.name, [a.arg for a in node.args.args + node.args.kwonlyargs])
            for inner in ast.walk(node):
                if isinstance(inner, ast.Call):
                    callee = ast.unparse(inner.func).rsplit(".", 1)[-1]
                    fn.calls.add(callee)
                    first = inner.args[0] if inner.args else None
                    if callee in {"need_tool", "tool_path"} and isinstance(first, ast.Constant):
                        fn.guards.add(str(first.value))
                    if callee == "need_vm_tools":
                        fn.guards |= VM_TOOLS
            found[node.name] = fn
    return found


def _conftest_functions(path: Path, root: Path) -> dict[str, Function]:
    """The fixtures of every conftest.py from the tests' ``root`` down to ``path``'s directory."""
    out: dict[str, Function] = {}
    directory = path.parent
    chain = [directory, *directory.parents]
    for folder in reversed([d for d in chain if d == root or root in d.parents]):
        conftest = folder / "conftest.py"
        if conftest.is_file():
            out.update(_functions(ast.parse(conftest.read_text())))
    return out


def _guards_of(name: str, functions: dict[str, Function], seen: set[str]) -> set[str]:
    """The tools ``name`` guards: its own need_tool calls, and those of the functions and fixtures it uses."""
    fn = functions.get(name)
    if fn is None or name in seen:
        return set()
    seen.add(name)
    tools = set(fn.guards)
    for other in fn.calls | set(fn.params):
        tools |= _guards_of(other, functions, seen)
    return tools


def _enclosing(tree: ast.Module) -> Iterator[tuple[ast.AST, list[ast.AST]]]:
    """Every node with the functions around it, innermost last."""

    def walk(node: ast.AST, chain: list[ast.AST]) -> Iterator[tuple[ast.AST, list[ast.AST]]]:
        yield node, chain
        inner = [*chain, node] if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) else chain
        for child in ast.iter_child_nodes(node):
            yield from walk(child, inner)

    yield from walk(tree, [])


def unguarded_runs(path: Path, root: Path = TESTS) -> list[str]:
    """``file:line: tool`` for each guarded tool ``path`` starts by name outside a need_tool guard."""
    tree = ast.parse(path.read_text())
    functions = {**_conftest_functions(path, root), **_functions(tree)}
    module_names = _assignments(tree)
    offenders = []
    local_names: dict[int, dict[str, ast.expr]] = {}
    for node, chain in _enclosing(tree):
        if not isinstance(node, ast.Call):
            continue
        if chain and id(chain[-1]) not in local_names:
            local_names[id(chain[-1])] = _assignments(chain[-1])
        names = {**module_names, **(local_names[id(chain[-1])] if chain else {})}
        tool = _runs(node, names)
        if tool is None or not guarded(tool):
            continue
        name = tool.rsplit("/", 1)[-1]
        covered: set[str] = set()
        for fn in chain:
            covered |= _guards_of(fn.name, functions, set())  # type: ignore[attr-defined]
        if name not in covered:
            offenders.append(f"{path.relative_to(root.parent)}:{node.lineno}: {name}")
    return offenders


def test_no_test_runs_a_guarded_tool_without_need_tool() -> None:
    offenders = [line for path in sorted(TESTS.rglob("*.py")) for line in unguarded_runs(path)]
    assert not offenders, "run these through tests/systools.py need_tool:\n" + "\n".join(offenders)


UNGUARDED = """
import subprocess

def test_schema(tmp_path):
    subprocess.run(["cloud-init", "schema", "--config-file", str(tmp_path)], check=True)

def test_shell():
    subprocess.run("tmux new-session -d", shell=True)

def test_which():
    exe = shutil.which("promtool")
    subprocess.run([exe, "check"])
"""

GUARDED_SOURCE = """
import subprocess
import pytest
from tests.systools import need_tool, need_vm_tools

@pytest.fixture
def promtool():
    return need_tool("promtool", "prometheus")

def helper():
    need_tool("openssl", "openssl")

def test_direct():
    need_tool("cloud-init", "cloud-init")
    subprocess.run(["cloud-init", "schema"])

def test_by_path():
    exe = need_tool("cloud-init", "cloud-init")
    subprocess.run([exe, "schema"])

def test_through_a_helper():
    helper()
    subprocess.run(("openssl", "version"))

def test_through_a_fixture(promtool):
    subprocess.run(["promtool", "check", "metrics"])

def test_vm():
    need_vm_tools()
    subprocess.run(["qemu-img", "info", "x"])

def test_not_guarded_tools():
    subprocess.run(["uv", "--version"])
    subprocess.run(["sh", "-c", "true"])
"""


@pytest.mark.parametrize(
    ("source", "expected"), [(UNGUARDED, [":5: cloud-init", ":8: tmux", ":12: promtool"]), (GUARDED_SOURCE, [])]
)
def test_the_check_tells_guarded_from_unguarded(source: str, expected: list[str], tmp_path: Path) -> None:
    path = tmp_path / "tests" / "test_probe.py"
    path.parent.mkdir()
    path.write_text(source)
    found = unguarded_runs(path, root=path.parent)
    assert [line[line.index(":") :] for line in found] == expected
