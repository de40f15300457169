"""pytest's first stop from the repository root, before any test imports transformers.

``python -m pytest`` puts the current folder first on ``sys.path``; from the root that folder is
the package's own (kernels/, decoder/, ...), whose names would shadow installed packages
(transformers imports one called ``kernels``). Importing the package takes its folder off the
path again (see ``dflash_batch/__init__.py``), so the suite runs however it is started.
"""

import dflash_batch  # noqa: F401 - imported for its effect on sys.path
