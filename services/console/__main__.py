"""Run one console worker: `python -m services.console`."""

from __future__ import annotations

from services.console.app import build_app
from services.console.settings import ConsoleSettings
from services.identity.settings import IdentitySettings
from touchstream.settings import CoreSettings
from touchstream.streams import run_worker


def main() -> None:
    """Build the settings from the environment and run the worker until stopped."""
    # Identity's settings too: the customer pages read identity's graph with its key layout.
    run_worker(build_app(CoreSettings(), ConsoleSettings(), IdentitySettings()))


if __name__ == "__main__":
    main()
