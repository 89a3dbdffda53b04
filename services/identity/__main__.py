"""Run one identity worker: `python -m services.identity`."""

from __future__ import annotations

from services.identity.app import build_app
from services.identity.settings import IdentitySettings
from touchstream.settings import CoreSettings
from touchstream.streams import run_worker


def main() -> None:
    """Build the settings from the environment and run the worker until stopped."""
    run_worker(build_app(CoreSettings(), IdentitySettings()))


if __name__ == "__main__":
    main()
