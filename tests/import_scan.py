"""The modules a Python source imports, for the tests that hold package boundaries."""

from __future__ import annotations

import ast


def imported_modules(source: str) -> list[str]:
    """Return every absolute module `source` imports (import, from-import, importlib), in order.

    >>> imported_modules("import a.b, c\\nfrom d import e\\nimportlib.import_module('f')\\nfrom . import g")
    ['a.b', 'c', 'd', 'f']
    """
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append(node.module)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "import_module" and node.args and isinstance(node.args[0], ast.Constant)):
            found.append(str(node.args[0].value))
    return found
