"""The reviewer's import-cycle check (tools/review_numbers.py), and the product holding to it."""

import ast

import review_numbers


def _graph() -> dict[str, set[str]]:
    files = review_numbers.product_files()
    packages = {m for m, p in files.items() if p.name == "__init__.py"}
    return {m: review_numbers.imported_modules(ast.parse(p.read_text()), m, set(files), m in packages) - packages
            for m, p in files.items() if m not in packages}


def test_an_import_inside_a_function_closes_a_cycle():
    a = "import os\n\ndef f():\n    from dflash_batch.jobs._b import g\n"
    found = review_numbers.imported_modules(ast.parse(a), "dflash_batch.jobs._a",
                                            {"dflash_batch.jobs._a", "dflash_batch.jobs._b"}, False)
    assert found == {"dflash_batch.jobs._b"}
    assert review_numbers.cycles({"x": {"y"}, "y": {"x"}, "z": {"x"}}) == [["x", "y"]]


def test_the_audit_and_its_report_do_not_import_each_other():
    graph = _graph()
    assert "dflash_batch.jobs._report" in graph["dflash_batch.jobs._audit"]
    assert "dflash_batch.jobs._audit" not in graph["dflash_batch.jobs._report"]
    assert review_numbers.cycles(graph) == []
