"""The package's shape stays as issue 33 left it: the library never imports the CLI, nothing inside imports
the package root (the version comes from hmt.version), and no two modules import each other in a circle."""

from __future__ import annotations

from benchmarks.architecture import census


def test_the_library_stands_below_the_cli_without_circles():
    shape = census()
    assert shape["library_imports_cli"] == []
    assert shape["root_imported_by"] == []
    assert shape["cycles"] == []
    assert next(lines for lines, name in shape["largest_modules"] if name == "hmt.model") <= 600
