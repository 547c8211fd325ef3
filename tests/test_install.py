"""setup.py: the C++ extension is optional, and the DeepSpeed requirement is the tested range."""

import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]


def _install_requires() -> dict:
    """{name: Requirement} of setup.py's install_requires, read without running setup()."""
    tree = ast.parse((REPO / "setup.py").read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "install_requires":
            reqs = [Requirement(r) for r in ast.literal_eval(node.value)]
            return {r.name: r for r in reqs}
    raise AssertionError("setup.py has no install_requires=[...] literal")


def test_deepspeed_requirement_is_the_tested_range():
    """The version CI installs (the one we test) satisfies setup.py, and the next minor release,
    which may drop config keys we write, does not."""
    spec = _install_requires()["deepspeed"].specifier
    tested = re.search(r"deepspeed==([0-9.]+)", (REPO / ".ci" / "run").read_text()).group(1)
    assert spec.contains(tested), (str(spec), tested)
    major, minor = map(int, tested.split(".")[:2])
    assert not spec.contains(f"{major}.{minor + 1}.0"), str(spec)
    assert not spec.contains("0.14.0"), str(spec)


def _copy_sources(dst: Path) -> None:
    shutil.copy(REPO / "setup.py", dst / "setup.py")
    shutil.copytree(REPO / "megatron", dst / "megatron",
                    ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.pyd"))


@pytest.mark.parametrize("compiler", ["false", "/nonexistent/c++"])
def test_extension_build_falls_back_without_a_compiler(tmp_path, compiler):
    """With a compiler that fails (`false`) or none at all, building the extension still succeeds,
    says once that the Python path will be used, and leaves no extension behind."""
    _copy_sources(tmp_path)
    env = dict(os.environ, CC=compiler, CXX=compiler, LDSHARED=compiler, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    notes = [line for line in out.splitlines() if "not built" in line]
    assert len(notes) == 1, out[-3000:]
    assert "_segment_cache" in notes[0] and "pure-Python" in notes[0], notes[0]
    built = list((tmp_path / "megatron" / "data" / "preprocess").glob("_segment_cache*"))
    assert built == [], built
