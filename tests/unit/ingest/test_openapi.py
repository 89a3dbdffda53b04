"""schemas/openapi.yaml is a valid OpenAPI 3.0 document that describes every route the app serves."""

from __future__ import annotations

import jsonschema
from schemathesis.specs.openapi.definitions import OPENAPI_30
from starlette.routing import Route

from services.ingest.app import build_app, load_openapi
from services.ingest.segment import EVENT_TYPES
from services.ingest.settings import IngestSettings
from touchstream.settings import CoreSettings


def test_document_is_valid_openapi_3_0() -> None:
    document = load_openapi()
    assert document["openapi"].startswith("3.0")
    jsonschema.Draft4Validator(OPENAPI_30).validate(document)


def test_every_route_is_documented_with_its_method() -> None:
    document = load_openapi()
    app = build_app(CoreSettings(), IngestSettings())
    served = {(route.path.replace("{call_type}", "{callType}"), method.lower())
              for route in app.routes if isinstance(route, Route) for method in route.methods or () if method != "HEAD"}
    by_type = {(f"/v1/{kind}", "post") for kind in EVENT_TYPES}
    documented = {(path, method) for path, item in document["paths"].items() for method in item}
    # The app routes the six calls through /v1/{call_type}; the document names each one.
    assert served | by_type == documented


def test_error_shape_names_index_field_and_reason() -> None:
    error = load_openapi()["components"]["schemas"]["Error"]
    item = error["properties"]["errors"]["items"]
    assert item["required"] == ["index", "field", "reason"]
    assert item["properties"]["index"]["nullable"] is True
