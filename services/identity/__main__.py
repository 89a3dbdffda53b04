"""Run one identity worker: `python -m services.identity`."""

from __future__ import annotations

import gc

from services.identity.app import build_app
from services.identity.settings import IdentitySettings
from touchstream.settings import CoreSettings
from touchstream.streams import run_worker


def main() -> None:
    """Build the settings from the environment and run the worker until stopped."""
    core, settings = CoreSettings(), IdentitySettings()
    settings.refuse_placeholders(core.environment)
    app = build_app(core, settings)
    # What exists now (modules, the app) lives as long as the process: spare the collector from
    # walking it on every full collection (matching allocates enough to trigger many).
    gc.freeze()
    run_worker(app)


if __name__ == "__main__":
    main()
