"""Run the ingest HTTP server: `python -m services.ingest`."""

from __future__ import annotations

import uvicorn

from services.ingest.app import build_app
from services.ingest.settings import IngestSettings
from touchstream.settings import CoreSettings


def main() -> None:
    core = CoreSettings()
    settings = IngestSettings()
    uvicorn.run(build_app(core, settings), host=settings.web_host, port=settings.web_port, log_level="info",
                access_log=False)


if __name__ == "__main__":
    main()
