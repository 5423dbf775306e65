"""The `--json` outputs' shapes: their version and a JSON Schema for each, committed in schemas/."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter

from builder.formatting import JSON_SCHEMA_VERSION
from builder.report import VerificationReport

DIALECT = "https://json-schema.org/draft/2020-12/schema"

_VERSION = {"const": JSON_SCHEMA_VERSION}
_NAMES_AND_BYTES = {"type": "array", "items": {
    "type": "object", "required": ["name", "bytes"], "additionalProperties": False,
    "properties": {"name": {"type": "string"}, "bytes": {"type": "integer", "minimum": 0}}}}
_STRINGS = {"type": "array", "items": {"type": "string"}}
_DIGEST = {"type": "string", "pattern": "^sha256:[0-9a-f]{64}$"}
_CHOSEN_RULE = {"enum": ["given", "best_model_checkpoint", "only", "last"]}


def _output(title: str, properties: dict[str, Any], *, ok: bool | None = True, optional: tuple[str, ...] = ()) -> dict:
    """An output object: schema_version and ok, then the command's own keys, every one required but `optional`."""
    keys = {"schema_version": _VERSION, "ok": {"type": "boolean"} if ok is None else {"const": ok}, **properties}
    return {"$schema": DIALECT, "title": title, "type": "object", "additionalProperties": False,
            "required": [key for key in keys if key not in optional], "properties": keys}


def _report_schema() -> dict:
    """verification.json's shape (report.VerificationReport), generated from its types."""
    return TypeAdapter(VerificationReport).json_schema()


def _verify_output() -> dict:
    """`verify --json`: the verification report, with the output's version and the checks that did not run (left
    out when verification failed: `skipped` says the same)."""
    report = _report_schema()
    report["properties"] = {"schema_version": _VERSION, **report["properties"], "not_run": _STRINGS}
    report["required"] = ["schema_version", *report["required"]]
    return {"$schema": DIALECT, **report, "title": "modelpack verify --json"}


def _build_output() -> dict:
    report = _report_schema()
    defs = report.pop("$defs")
    schema = _output("modelpack build --json", {
        "bundle": {"type": "string"},
        "digest": {"type": "string", "pattern": "^sha256:[0-9a-f]{64}$"},
        "timings": {"type": "object", "additionalProperties": {"type": "number"}},
        "verified": {"type": "boolean"},
        "verification": {"anyOf": [{"$ref": "#/$defs/VerificationReport"}, {"type": "null"}]},
        "not_run": _STRINGS,
        "run_file": {"type": ["string", "null"]},
        "warnings": _STRINGS,
    })
    return {**schema, "$defs": {**defs, "VerificationReport": report}}


def output_schemas() -> dict[str, dict]:
    """schemas/NAME.schema.json -> its schema: every --json output, the error every command prints, and the
    bundle's verification.json."""
    return {
        "version": _output("modelpack --version --json", {"modelpack_version": {"type": "string"}}),
        "error": _output("any modelpack command's --json output on failure (verify's: verify.schema.json)", {
            "exit_code": {"enum": [2, 3]}, "error": {"type": "string"}}, ok=False),
        "init": _output("modelpack init --json", {
            "spec": {"type": "string"}, "base": {"type": "string"},
            "checkpoint": {"type": "object", "required": ["path", "rule", "reason"], "additionalProperties": False,
                           "properties": {"path": {"type": "string"}, "rule": _CHOSEN_RULE,
                                          "reason": {"type": "string"}}}}),
        "inspect": _output("modelpack inspect --json", {
            "path": {"type": "string"},
            "kind": {"enum": ["base model", "adapter checkpoint", "Trainer output", "bundle"]},
            "model": {"type": "object", "required": ["architecture", "parameters", "dtype", "weight_files"],
                      "properties": {"weight_files": _NAMES_AND_BYTES, "parameters": {"type": "integer"}}},
            "adapter": {"type": "object", "required": ["rank", "alpha", "training_leftovers"],
                        "properties": {"training_leftovers": _NAMES_AND_BYTES}},
            "bundle": {"type": "object", "required": ["name", "files", "digest", "integrity_problems"],
                       "properties": {"files": {"type": "integer"}, "integrity_problems": _STRINGS}},
            "checkpoints": _STRINGS,
            "chosen_checkpoint": {"type": "object", "required": ["name", "rule", "reason"],
                                  "additionalProperties": False,
                                  "properties": {"name": {"type": "string"}, "rule": _CHOSEN_RULE,
                                                 "reason": {"type": "string"}}},
        }, optional=("model", "adapter", "bundle", "checkpoints", "chosen_checkpoint")),
        "validate": _output("modelpack validate --json", {
            "spec": {"type": "string"}, "name": {"type": "string"}, "mode": {"enum": ["merge", "separate"]},
            "merged_tensors": {"type": "integer"}, "warnings": _STRINGS}),
        "build-plan": _output("modelpack build --dry-run --json", {
            "bundle": {"type": "string"}, "mode": {"enum": ["merge", "separate"]}, "dtype": {"type": "string"},
            "files": _NAMES_AND_BYTES,
            "tensors": {"type": "object", "required": ["merged", "copied", "cast"], "additionalProperties": False,
                        "properties": {k: {"type": "integer"} for k in ("merged", "copied", "cast")}},
            "skipped_training_files": _STRINGS,
            "disk": {"type": "object", "required": ["needed", "free"], "additionalProperties": False,
                     "properties": {"needed": {"type": "integer"}, "free": {"type": "integer"}}},
            "verification": {"type": "object", "additionalProperties": False,
                             "required": ["run", "checks", "prompts", "probes", "max_new_tokens", "model_loads",
                                          "device"],
                             "properties": {"run": {"type": "boolean"}, "checks": _STRINGS,
                                            "prompts": {"type": "integer"}, "probes": {"type": "integer"},
                                            "max_new_tokens": {"type": "integer"},
                                            "model_loads": {"type": "integer"}, "device": {"type": "string"}}},
            "warnings": _STRINGS}),
        "build": _build_output(),
        "verify": _verify_output(),
        "sign": _output("modelpack sign --json", {
            "bundle": {"type": "string"}, "digest": {"type": "string", "pattern": "^sha256:[0-9a-f]{64}$"},
            "signature": {"type": "string"}}),
        "push": _output("modelpack push --json", {
            "reference": {"type": "string"}, "artifact": {"type": "string", "pattern": "@sha256:[0-9a-f]{64}$"},
            "digest": _DIGEST, "bundle_digest": _DIGEST, "layers": {"type": "integer", "minimum": 1},
            "uploaded": {"type": "integer", "minimum": 0}, "bytes": {"type": "integer", "minimum": 0}}),
        "pull": _output("modelpack pull --json", {
            "reference": {"type": "string"}, "artifact": {"type": "string", "pattern": "@sha256:[0-9a-f]{64}$"},
            "digest": _DIGEST, "bundle": {"type": "string"}, "bundle_digest": _DIGEST,
            "files": {"type": "integer", "minimum": 0},
            "anchor": {"enum": ["signature", "bundle digest", "artifact digest", "integrity only"]},
            "warnings": _STRINGS}),
        "verification": {"$schema": DIALECT, **_report_schema(),
                         "title": "a bundle's verification.json (report.bundle_record)"},
    }


def write_schemas(folder: Path) -> None:
    for name, schema in output_schemas().items():
        (folder / f"{name}.schema.json").write_text(json.dumps(schema, indent=2, ensure_ascii=False) + "\n",
                                                    encoding="utf-8")


if __name__ == "__main__":  # python -m builder.json_outputs schemas
    write_schemas(Path(sys.argv[1]))
