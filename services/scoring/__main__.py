"""Run a scoring worker: `python -m services.scoring`."""

from __future__ import annotations

from services.scoring.app import build_app
from services.scoring.settings import ScoringSettings
from touchstream.settings import CoreSettings
from touchstream.streams import run_worker


def main() -> None:
    core = CoreSettings()
    settings = ScoringSettings()
    run_worker(build_app(core, settings))


if __name__ == "__main__":
    main()
