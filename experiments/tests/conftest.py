"""The library's test fixtures (tests/conftest.py) for the experiments' tests.

This folder is a package, so this file is `experiments.tests.conftest` and `conftest` stays the library's
(tests/ is on pytest's pythonpath): its helpers import as `from conftest import ...` here too.
"""

from conftest import corpus, tiny_model_dir

__all__ = ["corpus", "tiny_model_dir"]
