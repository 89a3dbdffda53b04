"""Run the ingest HTTP server: `python -m services.ingest`."""

from __future__ import annotations

import uvicorn

from services.ingest.app import build_app
from services.ingest.settings import IngestSettings
from touchstream.settings import CoreSettings
from touchstream.startup import exit_on_configuration_error, settings_or_exit


def main() -> None:
    core = settings_or_exit("ingest", CoreSettings)
    settings = settings_or_exit("ingest", IngestSettings)
    with exit_on_configuration_error("ingest"):
        app = build_app(core, settings)
    uvicorn.run(app, host=settings.web_host, port=settings.web_port, log_level="info", access_log=False)


if __name__ == "__main__":
    main()
