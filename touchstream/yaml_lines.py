"""Where a value sits in a YAML file, so a problem in a configuration file is reported with its line."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import yaml


def node_position(root: yaml.Node | None, path: Iterable[Any]) -> tuple[int, int]:
    """Return the 1-based line and column of the deepest node along `path` (keys and list indexes).

    >>> root = yaml.compose("rules:\\n  - id: a\\n  - id: b\\n", Loader=yaml.SafeLoader)
    >>> node_position(root, ["rules", 1, "id"]), node_position(root, ["rules", 5])
    ((3, 9), (2, 3))
    """
    node = root
    best = (1, 1)
    if node is not None:
        best = (node.start_mark.line + 1, node.start_mark.column + 1)
    for step in path:
        child = None
        if isinstance(node, yaml.MappingNode):
            child = next((v for k, v in node.value if k.value == str(step)), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(step, int) and step < len(node.value):
            child = node.value[step]
        if child is None:
            break
        node = child
        best = (node.start_mark.line + 1, node.start_mark.column + 1)
    return best


def yaml_error_position(exc: yaml.YAMLError) -> str:
    """Return `line:column` of a YAML syntax error ("1:1" when the parser gave none)."""
    mark = getattr(exc, "problem_mark", None)
    return f"{mark.line + 1}:{mark.column + 1}" if mark is not None else "1:1"
