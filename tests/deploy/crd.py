"""Checking a Kubernetes manifest against a CRD's openAPIV3Schema the way the API server does, for the fields it
defines: a field the schema does not define is an error (the server prunes it, silently, which is worse), and
types, enums, required fields and patterns are checked with jsonschema (OpenAPI v3 schemas are JSON Schema plus
`x-kubernetes-*` markers, which jsonschema ignores)."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema

KUBERAY = Path(__file__).resolve().parent / "kuberay"


def rayjob_schema() -> dict:
    """The vendored RayJob v1 schema (tests/deploy/kuberay/README.md says where it comes from)."""
    return json.loads((KUBERAY / "rayjob-v1.schema.json").read_text(encoding="utf-8"))


def unknown_fields(obj, schema: dict, path: str = "") -> list[str]:
    """Paths in `obj` that `schema` does not define (structural-schema pruning rules)."""
    if schema.get("x-kubernetes-preserve-unknown-fields") or schema.get("x-kubernetes-int-or-string"):
        return []
    found: list[str] = []
    if isinstance(obj, dict):
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        for key, value in obj.items():
            where = f"{path}.{key}" if path else key
            if props is not None and key in props:
                found += unknown_fields(value, props[key], where)
            elif isinstance(extra, dict):  # a map: any key, values of one schema
                found += unknown_fields(value, extra, where)
            elif extra is True or path == "metadata":
                continue  # the object's own ObjectMeta: a bare `type: object` here, checked by the API server itself
            else:
                found.append(where)
    elif isinstance(obj, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(obj):
            found += unknown_fields(item, schema["items"], f"{path}[{i}]")
    return found


def schema_errors(obj, schema: dict) -> list[str]:
    """Type, enum, required and pattern violations, as 'path: message'."""
    validator = jsonschema.Draft7Validator(schema)
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(obj)]
