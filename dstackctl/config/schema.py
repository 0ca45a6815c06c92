"""JSON Schema of a service file, as editors read it."""

from __future__ import annotations

from typing import Any

from dstackctl.config.models import ServiceConfiguration

SCHEMA_URI = "https://json-schema.org/draft/2020-12/schema"


def service_json_schema() -> dict[str, Any]:
    schema = ServiceConfiguration.model_json_schema(mode="validation")
    return {"$schema": SCHEMA_URI, "title": "dstack service (dstackctl)", **schema}
