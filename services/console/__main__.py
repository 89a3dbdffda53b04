"""Run one console worker: `python -m services.console`."""

from __future__ import annotations

from services.console.app import build_app
from services.console.settings import ConsoleSettings
from touchstream.settings import CoreSettings
from touchstream.streams import run_worker


def main() -> None:
    """Build the settings from the environment and run the worker until stopped."""
    run_worker(build_app(CoreSettings(), ConsoleSettings()))


if __name__ == "__main__":
    main()
