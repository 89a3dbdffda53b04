"""Run a triggers worker: `python -m services.triggers`."""

from __future__ import annotations

from services.triggers.app import build_app
from services.triggers.settings import TriggersSettings
from touchstream.settings import CoreSettings
from touchstream.startup import exit_on_configuration_error, settings_or_exit
from touchstream.streams import run_worker


def main() -> None:
    """Build settings from the environment and run the worker until stopped."""
    core = settings_or_exit("triggers", CoreSettings)
    settings = settings_or_exit("triggers", TriggersSettings)
    # Faust creates its data directory without parents; a bare checkout has no .run/ yet.
    core.state_dir.mkdir(parents=True, exist_ok=True)
    with exit_on_configuration_error("triggers"):
        app = build_app(core, settings)
    run_worker(app)


if __name__ == "__main__":
    main()
