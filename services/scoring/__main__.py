"""Run a scoring worker: `python -m services.scoring`."""

from __future__ import annotations

from services.scoring.settings import ScoringSettings
from touchstream.settings import CoreSettings
from touchstream.startup import exit_on_configuration_error, settings_or_exit


def main() -> None:
    core = settings_or_exit("scoring", CoreSettings)
    settings = settings_or_exit("scoring", ScoringSettings)
    with exit_on_configuration_error("scoring"):
        settings.refuse_placeholders(core.is_production)
    # Imported once the settings passed: the model's libraries (river, scipy, sklearn) take seconds
    # to import, which a worker refusing its configuration need not wait for.
    from services.scoring.app import build_app
    from touchstream.streams import run_worker

    run_worker(build_app(core, settings))


if __name__ == "__main__":
    main()
