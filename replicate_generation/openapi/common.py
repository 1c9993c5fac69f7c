"""What every part of the document uses: the schema type and the two small builders."""

from __future__ import annotations

import re
from typing import Any

Schema = dict[str, Any]
SCHEMAS = "#/components/schemas/"


def identifier(name: str) -> str:
    """A component's name as the document shows it: a plain identifier (code generators make
    class names of them), each character outside [A-Za-z0-9_] an underscore: `Model_flux-1.1`
    is `Model_flux_1_1`."""
    return re.sub(r"[^A-Za-z0-9_]", "_", name)


def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def nullable(kind: str, **extra: Any) -> Schema:
    return {"type": [kind, "null"], **extra}


def answer(properties: Schema, optional: tuple[str, ...] = (), **extra: Any) -> Schema:
    """An object the service answers: every property is always present (so `required`) but
    the `optional` ones; generated clients then type the rest as present."""
    return {"type": "object", "properties": properties,
            "required": [name for name in properties if name not in optional], **extra}
