"""Run one identity worker: `python -m services.identity`."""

from __future__ import annotations

from services.identity.app import build_app
from services.identity.settings import IdentitySettings
from touchstream.settings import CoreSettings
from touchstream.streams import run_worker


def main() -> None:
    """Build the settings from the environment and run the worker until stopped."""
    core, settings = CoreSettings(), IdentitySettings()
    settings.refuse_placeholders(core.environment)
    run_worker(build_app(core, settings))


if __name__ == "__main__":
    main()
