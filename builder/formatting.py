"""How modelpack spells sizes, counts and JSON, everywhere: one formatter each."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

# The version of every --json output's shape; it changes when a key changes meaning or goes (a new key is no change).
JSON_SCHEMA_VERSION = 1


def describe_bytes(nbytes: float) -> str:
    """A size in decimal units, as disks and the Hub count them: 512 B, 2.3 KB, 15.2 MB, 14.8 GB."""
    unit = "B"
    for unit in ("B", "KB", "MB", "GB"):
        if nbytes < 1000 or unit == "GB":
            break
        nbytes /= 1000
    return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"


def describe_count(count: int) -> str:
    """A count of parameters or tokens: 494.0M, 7.7B."""
    for limit, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if count >= limit:
            return f"{count / limit:.1f}{unit}"
    return str(count)


def dump_json(data: Mapping[str, Any]) -> str:
    """Every JSON file modelpack writes: indented, UTF-8 text as is, keys in the order built, a final newline."""
    return json.dumps(data, indent=2, ensure_ascii=False, sort_keys=False) + "\n"
