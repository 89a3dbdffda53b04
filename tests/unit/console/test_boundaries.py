"""The console is a pure consumer: no module of it imports another service's code beyond the shared contracts.

It reads other services through their topics and identity's HTTP API, never through their Redis
layouts (identity's graph, customer360 and domain, triggers' state store and delivery ledger).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import services.console
from tests.import_scan import imported_modules

CONSOLE = Path(services.console.__file__).resolve().parent
REPO = CONSOLE.parents[1]
# What the console may import from other services, each for a reason that is not their storage.
ALLOWED = {
    "services.triggers.rules": "the rule file is a shared contract with one parser (thresholds on the charts)",
    "services.identity.admin": "admin keys are checked as sha256 hashes, the way identity checks them",
}
# What those modules import in turn (pure: parsing and templates, no Redis), and their packages (docstrings).
ALLOWED_BENEATH = {"services.triggers.conditions", "services.triggers.templates", "services.triggers",
                   "services.identity"}


def other_service_imports(source: str, own: str = "services.console") -> list[str]:
    """Return the modules of other services that `source` imports (import, from-import, importlib), in order."""
    return [n for n in imported_modules(source)
            if n.startswith("services.") and not (n == own or n.startswith(own + "."))]


def test_the_scan_finds_every_way_of_importing_another_service() -> None:
    source = """
import services.triggers.state_store as ledger
from services.identity.graph import IdentityGraph
from services.console.store import ReadModelStore
from . import web
import importlib
layout = importlib.import_module("services.identity.customer360")
"""
    assert other_service_imports(source) == ["services.triggers.state_store", "services.identity.graph",
                                             "services.identity.customer360"]


def test_no_console_module_imports_another_services_storage_code() -> None:
    modules = sorted(CONSOLE.rglob("*.py"))
    assert len(modules) >= 8, modules  # the scan reads the console's sources, not an empty folder
    refused = {f"{path.relative_to(REPO)}: {name}" for path in modules
               for name in other_service_imports(path.read_text(encoding="utf-8")) if name not in ALLOWED}
    assert refused == set(), f"import these through the service's topics or HTTP API instead: {sorted(refused)}"


def test_a_running_console_loads_no_storage_module_of_another_service() -> None:
    # In a fresh interpreter: what the console's entry points load, directly or through what they import.
    probe = ("import sys, services.console.__main__, services.console.app; "
             "print('\\n'.join(sorted(m for m in sys.modules if m.startswith('services.'))))")
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=REPO,
                            timeout=120).stdout.split()
    assert "services.console.store" in loaded and "services.triggers.rules" in loaded
    others = {m for m in loaded if not m.startswith("services.console") and m != "services"}
    assert others - set(ALLOWED) - ALLOWED_BENEATH == set()
    for storage in ("services.identity.graph", "services.identity.customer360", "services.identity.domain",
                    "services.triggers.state_store", "services.triggers.delivery"):
        assert storage not in loaded
