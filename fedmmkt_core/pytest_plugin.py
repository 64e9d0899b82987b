"""pytest plugin (entry point ``pytest11``): assertion rewriting for the conformance suites.

pytest rewrites ``assert`` statements (so a failing one prints the values it compared, ``assert 3 == 4``)
only in test modules, conftest files and modules registered before they are imported. The suites in
:mod:`fedmmkt_core.testing` are imported by a plugin author's test module, too late to register there,
so this module, loaded by pytest at start-up through the ``pytest11`` entry point of the installed
``fedmmkt`` package, registers them first. It imports nothing from the suites.
"""

from __future__ import annotations

import pytest

pytest.register_assert_rewrite("fedmmkt_core.testing")
