"""Run a scoring worker: `python -m services.scoring`."""

from __future__ import annotations

from services.scoring.app import build_app
from services.scoring.settings import ScoringSettings
from touchstream.settings import CoreSettings
from touchstream.startup import exit_on_configuration_error, settings_or_exit
from touchstream.streams import run_worker


def main() -> None:
    core = settings_or_exit("scoring", CoreSettings)
    settings = settings_or_exit("scoring", ScoringSettings)
    with exit_on_configuration_error("scoring"):
        settings.refuse_placeholders(core.is_production)
    run_worker(build_app(core, settings))


if __name__ == "__main__":
    main()
