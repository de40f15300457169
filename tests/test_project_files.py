"""The project's own files: packaging metadata that installs without warnings, and a README
whose column names are the data contract's."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_pyproject_applies_without_deprecation_warnings(monkeypatch):
    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    monkeypatch.chdir(ROOT)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        apply_configuration(Distribution(), ROOT / "pyproject.toml")
    assert [str(w.message).splitlines()[0] for w in caught if "Deprecat" in w.category.__name__] == []


def test_the_readme_names_the_completions_columns_as_the_schema_does():
    from dflash_batch.schemas import COMPLETIONS_SCHEMA

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    named = set(re.findall(r"`([a-z_]+)`", readme))
    assert "acceptance_length_mean" in named and "acceptance_length_mean" in COMPLETIONS_SCHEMA.names
    output = readme[readme.index("Output: "):]
    output = output[: output.index("\n\n")]
    assert "`acceptance_length_mean`" in output  # the column, not "tau", which is what it measures


def test_the_readme_documents_the_exit_statuses():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    commands = readme[readme.index("## Commands"):]
    commands = commands[: commands.index("\n## ", 3)]
    assert "`2` refused before any work started" in commands and "`1` the work started and failed" in commands


def test_python_started_from_the_repository_root_never_puts_it_on_the_path():
    """The root is the package's own folder, so its top-level names (kernels/, decoder/, ...) would
    shadow installed packages (transformers imports one called ``kernels``) under ``python -m`` run
    from the root: every such command (our modules, pytest) in the Makefile and the tools/ scripts passes ``-P``."""
    files = [ROOT / "Makefile", *sorted((ROOT / "tools").glob("*.sh"))]
    calls = [(f.name, line.strip()) for f in files for line in f.read_text().splitlines()
             if re.search(r"\s-m\s+(dflash_batch|pytest)\b", line) and not line.lstrip().startswith("#")]
    assert len(calls) >= 8, calls
    assert [c for c in calls if not re.search(r"\s-P\s", c[1])] == []


def test_ci_lists_the_slowest_tests():
    """A slow new test shows in the submission that adds it: CI's ``make test`` prints the 15 slowest."""
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    make = (ROOT / "Makefile").read_text()
    recipe = make[make.index("\ntest:"):].split("\n\n")[0]
    assert re.search(r"-m pytest .*--durations=15", recipe), recipe
