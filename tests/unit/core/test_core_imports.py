"""The core package depends on no service: dependencies point down (services -> touchstream).

The `touchstream` command and the local stack, which do reach every service, live above both in
`touchstream_cli/`.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import touchstream
from tests.import_scan import imported_modules

CORE = Path(touchstream.__file__).resolve().parent
REPO = CORE.parent
# Packages that sit above the core: it may import neither.
ABOVE = ("services", "touchstream_cli")


def upward_imports(source: str) -> list[str]:
    """Return the modules of `ABOVE` that `source` imports (import, from-import, importlib), in order."""
    return [n for n in imported_modules(source) if n.split(".")[0] in ABOVE]


def test_the_scan_finds_every_way_of_importing_a_service() -> None:
    source = """
import services.ingest.keys as keys
from services.triggers.rules import parse_rule_file
from touchstream.topics import TOPICS
from touchstream_cli import local
import servicesish
def lazy():
    from services.identity.settings import DEV_ADMIN_KEY
import importlib
importlib.import_module("services.scoring.model")
"""
    assert upward_imports(source) == ["services.ingest.keys", "services.triggers.rules", "touchstream_cli",
                                      "services.identity.settings", "services.scoring.model"]


def test_no_core_module_imports_a_service_or_the_cli() -> None:
    modules = sorted(CORE.rglob("*.py"))
    assert len(modules) >= 15, modules  # the scan reads the core's sources, not an empty folder
    found = {f"{path.relative_to(REPO)}: {name}" for path in modules
             for name in upward_imports(path.read_text(encoding="utf-8"))}
    assert found == set(), f"move this code to the service or to touchstream_cli/: {sorted(found)}"


def test_importing_every_core_module_loads_no_service() -> None:
    # In a fresh interpreter, so what other tests imported does not count.
    names = sorted(f"touchstream.{p.stem}" for p in CORE.glob("*.py") if p.stem != "__init__")
    probe = (f"import importlib, sys\nfor name in {names!r}: importlib.import_module(name)\n"
             "print('\\n'.join(sorted(m for m in sys.modules if m.split('.')[0] in ('services', 'touchstream_cli'))))")
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=REPO,
                            timeout=120).stdout.split()
    assert loaded == []
