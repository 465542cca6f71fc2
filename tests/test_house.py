"""The house rules that keep the code's layout readable: no import cycles inside the library, errors.py depends on
nothing of ours, and the programs follow one convention for meshes, errors and moved commands."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

from llama_jax.cli import parse_mesh
from llama_jax.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "llama_jax"


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, modules: set[str]) -> set[str]:
    """Every llama_jax module `path` imports, at the top or inside a function (a lazy import still runs)."""
    found = set()
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: `from . import x` in package p is p.x; each further dot goes one package up
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            # `import a.b.c` also runs a and a.b; the edge that matters is to the deepest module that exists.
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != "llama_jax":
                found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    files = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    return {name: imported_modules(path, set(files)) - {name} for name, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_graph_sees_lazy_and_relative_imports(tmp_path):
    module = tmp_path / "llama_jax" / "x.py"
    module.parent.mkdir()
    module.write_text("def f():\n    from llama_jax.errors import ConfigError\n    from . import model\n")
    global REPO
    saved, REPO = REPO, tmp_path
    try:
        assert imported_modules(module, {"llama_jax.errors", "llama_jax.model", "llama_jax.x"}) == {
            "llama_jax.errors", "llama_jax.model"}
    finally:
        REPO = saved


def test_no_import_cycles_inside_the_library():
    assert find_cycle(import_graph()) is None


def test_errors_imports_nothing_of_ours():
    assert import_graph()["llama_jax.errors"] == set()


@pytest.mark.parametrize("text, sizes", [("1x-1x1", (1, -1, 1)), ("2x2x2", (2, 2, 2)), ("-1x1x4", (-1, 1, 4))])
def test_one_mesh_spelling(text, sizes):
    assert parse_mesh(text) == sizes


@pytest.mark.parametrize("text", ["1,-1,1", "2x2", "1x0x1", "-1x-1x1", "axbxc", "1x-2x1"])
def test_a_bad_mesh_is_one_clear_error(text):
    with pytest.raises(ConfigError, match=r"--mesh .*DATAxFSDPxTENSOR") as raised:
        parse_mesh(text)
    assert ("comma spelling is gone" in str(raised.value)) == ("," in text)


def test_only_the_library_is_installed():
    """setup.cfg installs llama_jax alone: train/, eval/ and scripts/ are programs run from a checkout."""
    config = (REPO / "setup.cfg").read_text()
    packages = config.split("[options.packages.find]")[1].split("[")[0]
    assert [line.strip() for line in packages.splitlines()[1:] if line.strip() and not line.startswith("#")] == [
        "include =", "llama_jax*"]


def test_programs_report_user_errors_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "eval.perplexity", "--model", str(tmp_path / "missing"),
                             "--data", "stdlib:valid", "--mesh", "1,-1,1"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("error: ")


def main_block_calls(path: Path) -> list[str]:
    """The calls made under `if __name__ == "__main__":` of a program file."""
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test):
            return [ast.unparse(call) for call in ast.walk(node) if isinstance(call, ast.Call)]
    return []


# lm-eval's own command line handles its errors; the adapter only registers the model before handing over.
DELEGATING_PROGRAMS = {"eval/lm_eval_adapter.py"}


@pytest.mark.parametrize("program", sorted(str(path.relative_to(REPO)) for package in ("train", "eval")
                                           for path in (REPO / package).glob("*.py") if path.name != "__init__.py"))
def test_every_program_runs_through_the_shared_error_handling(program):
    calls = main_block_calls(REPO / program)
    if program in DELEGATING_PROGRAMS:
        assert calls == ["main()"]
    else:
        assert calls == ["run_program(main)"], f"{program} must end with `run_program(main)`"


def test_the_benchmarks_lean_copy_of_the_attention_choices_is_current():
    """scripts.bench's parent process may not import llama_jax.config, so it spells the choices out."""
    from llama_jax.config import ATTENTION_IMPLS
    from scripts import bench

    assert bench.ATTENTION_IMPLS == ATTENTION_IMPLS
