# One image for every touchstream service; docker-compose.yml and deploy/k8s pick the service
# with the command (`python -m services.<name>`).
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TOUCHSTREAM_STATE_DIR=/var/lib/touchstream

WORKDIR /app
# Schemas, templates and static files ship as package data, but the default rules file is read
# from deploy/rules/ beside the packages, so the checkout is installed in place (editable).
# touchstream/schemas is a link to schemas/: both are copied.
COPY pyproject.toml README.md ./
COPY touchstream ./touchstream
COPY touchstream_cli ./touchstream_cli
COPY services ./services
COPY schemas ./schemas
COPY deploy/rules ./deploy/rules
RUN pip install -e . \
    && useradd --system --uid 10001 --home-dir /var/lib/touchstream --create-home touchstream

USER touchstream
# ingest's HTTP port; identity, scoring and triggers serve /metrics, /healthz, /readyz on 6067-6069.
EXPOSE 6066 6067 6068 6069
CMD ["python", "-m", "services.ingest"]
