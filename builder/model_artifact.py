"""A bundle as a CNCF ModelPack OCI artifact: its config from the bundle's facts, its manifest, and the rules a
received one must pass before anything of it is written."""

from __future__ import annotations

import functools
import hashlib
import json
import re
import unicodedata
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import NoReturn

from builder.errors import BundleError, VerificationError
from builder.manifest import MANIFEST
from builder.runtime.bundle_check import listed_name_problem
from builder.trust import CODE_SUFFIXES, SIGNATURE

# modelpack/model-spec v0.0.7 (commit 6440437b4932ef6cdd134d24a410f73181303ce7), schema/config-schema.json, copied
# byte for byte (Apache-2.0): the config allows no field it does not name.
CONFIG_SCHEMA = Path(__file__).resolve().parent / "model-spec" / "config-schema.json"
MODEL_SPEC_VERSION = "v0.0.7"

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
ARTIFACT_TYPE = "application/vnd.cncf.model.manifest.v1+json"
CONFIG_MEDIA_TYPE = "application/vnd.cncf.model.config.v1+json"
WEIGHT = "application/vnd.cncf.model.weight.v1.raw"
WEIGHT_CONFIG = "application/vnd.cncf.model.weight.config.v1.raw"
DOC = "application/vnd.cncf.model.doc.v1.raw"
CODE = "application/vnd.cncf.model.code.v1.raw"
LAYER_MEDIA_TYPES = (WEIGHT, WEIGHT_CONFIG, DOC, CODE)
FILEPATH = "org.cncf.model.filepath"
TITLE = "org.opencontainers.image.title"
# Facts of ours the spec's config has no field for, in a namespace of ours (manifest annotations).
BUNDLE_DIGEST = "org.modelpack-lora.bundle.digest"
BUNDLE_MODE = "org.modelpack-lora.bundle.mode"
LORA_RANK = "org.modelpack-lora.lora.rank"
LORA_ALPHA = "org.modelpack-lora.lora.alpha"
GENERATOR = "org.modelpack-lora.version"

# Reproducible: the same bundle gives the same config bytes, so the same artifact digest (the bundle itself records
# no time either). The Unix epoch, as reproducible builds date what has no date of its own.
CREATED_AT = "1970-01-01T00:00:00Z"

WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt", ".pth")
DOC_NAMES = frozenset({"README.md", MANIFEST, SIGNATURE, "verification.json", "requirements.txt", "Modelfile",
                       "LICENSE", "NOTICE"})

# Limits on what a registry hands over before anything of it is written: a modelpack artifact's manifest lists one
# layer per file (a 72B bundle has some 60), its config is a few hundred bytes.
MAX_MANIFEST_BYTES = 4 << 20
MAX_CONFIG_BYTES = 1 << 20
MAX_LAYERS = 10_000
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")

# Hugging Face card licenses that are SPDX identifiers, in SPDX's spelling; any other goes to the card only.
SPDX_LICENSES = {spdx.lower(): spdx for spdx in (
    "Apache-2.0", "MIT", "BSD-2-Clause", "BSD-3-Clause", "BSL-1.0", "MPL-2.0", "GPL-2.0", "GPL-3.0", "LGPL-2.1",
    "LGPL-3.0", "AGPL-3.0", "CC0-1.0", "CC-BY-2.0", "CC-BY-3.0", "CC-BY-4.0", "CC-BY-SA-3.0", "CC-BY-SA-4.0",
    "CC-BY-NC-2.0", "CC-BY-NC-3.0", "CC-BY-NC-4.0", "CC-BY-NC-SA-3.0", "CC-BY-NC-SA-4.0", "CC-BY-NC-ND-3.0",
    "CC-BY-NC-ND-4.0", "Artistic-2.0", "ISC", "Unlicense", "WTFPL", "EPL-1.0", "EPL-2.0", "AFL-3.0", "ECL-2.0",
    "EUPL-1.1", "OSL-3.0", "PDDL-1.0", "ODbL-1.0", "ODC-By-1.0", "BSD-3-Clause-Clear", "Zlib", "PostgreSQL")}


@dataclass(frozen=True)
class Layer:
    """One bundle file as a raw layer: its path in the bundle, media type, blob digest and size."""

    path: str
    media_type: str
    digest: str
    size: int

    def descriptor(self) -> dict:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size,
                "annotations": {FILEPATH: self.path, TITLE: self.path}}


@dataclass(frozen=True)
class ReceivedArtifact:
    """An artifact manifest that passed every rule: its config's descriptor, its layers and annotations."""

    config_digest: str
    config_size: int
    layers: tuple[Layer, ...]
    annotations: dict[str, str]

    @property
    def size(self) -> int:
        return sum(layer.size for layer in self.layers)


def layer_media_type(path: str) -> str:
    """The ModelPack layer type of a bundle file: weights (safetensors, GGUF), code (the loader and model code),
    docs (the card, manifest, signature, report), and the configs and tokenizer files that go with the weights."""
    name = path.rsplit("/", 1)[-1]
    if name.endswith(WEIGHT_SUFFIXES):
        return WEIGHT
    if name.endswith(CODE_SUFFIXES):
        return CODE
    if path in DOC_NAMES or name in DOC_NAMES or name.endswith(".md"):
        return DOC
    return WEIGHT_CONFIG


def describe_param_count(count: int) -> str:
    """A parameter count as model names write it: 626K, 494M, 7.7B (one decimal below 100, none above)."""
    for unit, scale in (("T", 10**12), ("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if count >= scale:
            value = count / scale
            return f"{value:.1f}".rstrip("0").rstrip(".") + unit if value < 100 else f"{value:.0f}{unit}"
    return str(count)


def model_config(*, name: str, version: str, family: str | None, license_id: str | None, description: str | None,
                 param_count: int | None, precision: str | None, diff_ids: list[str]) -> dict:
    """The ModelPack config of a bundle, checked against the spec's schema (an exit-2 error names the field)."""
    descriptor: dict = {"createdAt": CREATED_AT, "name": name, "version": version, "title": name}
    if family:
        descriptor["family"] = family
    spdx = SPDX_LICENSES.get((license_id or "").lower())
    if spdx:
        descriptor["licenses"] = [spdx]
    if description:
        descriptor["description"] = description
    config: dict = {"architecture": "transformer", "format": "safetensors",
                    "capabilities": {"inputTypes": ["text"], "outputTypes": ["text"]}}
    if precision:
        config["precision"] = precision
    if param_count:
        config["paramSize"] = describe_param_count(param_count)
    document = {"descriptor": descriptor, "config": config, "modelfs": {"type": "layers", "diffIds": diff_ids}}
    problems = config_problems(document)
    if problems:
        raise BundleError("the ModelPack config built from the bundle does not satisfy model-spec "
                          f"{MODEL_SPEC_VERSION}'s schema: " + "; ".join(problems))
    return document


def config_problems(document: object) -> list[str]:
    """Each way a config breaks the spec's schema, as `field.path: message`."""
    import jsonschema  # type: ignore[import-untyped]  # it ships no types

    validator = jsonschema.Draft202012Validator(_config_schema(), format_checker=_format_checker())
    return [f"{'.'.join(str(p) for p in error.absolute_path) or '(config)'}: {error.message}"
            for error in sorted(validator.iter_errors(document), key=lambda e: list(map(str, e.absolute_path)))]


@functools.cache
def _config_schema() -> dict:
    return json.loads(CONFIG_SCHEMA.read_text(encoding="utf-8"))


def _is_date_time(value: object) -> bool:
    """RFC 3339 date-time, as the spec's Go validator checks `format: date-time` (with a zone, a T between)."""
    if not isinstance(value, str):
        return True
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})", value):
        return False
    try:
        datetime.fromisoformat(value.upper().replace("Z", "+00:00"))
    except ValueError:
        return False
    return True


@functools.cache
def _format_checker():
    import jsonschema

    checker = jsonschema.FormatChecker(formats=())
    checker.checks("date-time")(_is_date_time)
    return checker


def canonical_json(document: dict) -> bytes:
    """The bytes pushed, and hashed, for a JSON blob: fixed key order and separators, so one bundle gives one
    digest."""
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def artifact_manifest(config: bytes, layers: list[Layer], annotations: dict[str, str]) -> bytes:
    """The OCI image manifest of the artifact (artifactType set, as OCI 1.1 registries store it)."""
    return canonical_json({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": ARTIFACT_TYPE,
        "config": {"mediaType": CONFIG_MEDIA_TYPE, "digest": sha256_digest(config), "size": len(config)},
        "layers": [layer.descriptor() for layer in layers],
        "annotations": annotations,
    })


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def received_artifact(data: bytes, *, shown: str) -> ReceivedArtifact:
    """The artifact manifest a registry returned, refused (exit 3) unless it is a ModelPack manifest of raw layers
    whose file paths are clean relative names, each once (also once folded for case and Unicode form), so nothing
    can be written outside the bundle or over another of its files. Checked before anything is written."""
    problems: list[str] = []
    try:
        manifest = json.loads(data.decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        _refuse(shown, [f"the manifest is not JSON ({str(exc)[:200]})"])
    if not isinstance(manifest, dict):
        _refuse(shown, ["the manifest is not a JSON object"])
    if manifest.get("mediaType", OCI_MANIFEST) != OCI_MANIFEST or manifest.get("schemaVersion") != 2:
        problems.append(f"not an OCI image manifest (mediaType {str(manifest.get('mediaType'))[:100]!r})")
    config = manifest.get("config")
    if not isinstance(config, dict):
        config = {}
    if manifest.get("artifactType") != ARTIFACT_TYPE or config.get("mediaType") != CONFIG_MEDIA_TYPE:
        problems.append(f"not a ModelPack model artifact (artifactType {ARTIFACT_TYPE} with a "
                        f"{CONFIG_MEDIA_TYPE} config)")
        _refuse(shown, problems)
    config_digest, config_size = _blob(config, "config", problems)
    if config_size > MAX_CONFIG_BYTES:
        problems.append(f"its config is {config_size} bytes, over the limit of {MAX_CONFIG_BYTES}")
    raw_layers = manifest.get("layers")
    if not isinstance(raw_layers, list) or not raw_layers:
        _refuse(shown, [*problems, "it has no layers"])
    if len(raw_layers) > MAX_LAYERS:
        _refuse(shown, [*problems, f"it has {len(raw_layers)} layers, over the limit of {MAX_LAYERS}"])
    layers = []
    seen: dict[str, str] = {}
    for index, entry in enumerate(raw_layers):
        where = f"layer {index}"
        if not isinstance(entry, dict):
            problems.append(f"{where}: not a descriptor")
            continue
        layer_annotations = entry.get("annotations")
        path = layer_annotations.get(FILEPATH) if isinstance(layer_annotations, dict) else None
        if not isinstance(path, str):
            problems.append(f"{where}: no {FILEPATH} annotation")
            continue
        where = f"layer {index} ({_shown(path)})"
        problem = None if path in (MANIFEST, SIGNATURE) else listed_name_problem(path)
        if problem:
            problems.append(f"{where}: {problem}")
            continue
        if entry.get("mediaType") not in LAYER_MEDIA_TYPES:
            problems.append(f"{where}: media type {str(entry.get('mediaType'))[:100]!r} is not a raw ModelPack layer")
        folded = unicodedata.normalize("NFC", path).casefold()
        if folded in seen:
            problems.append(f"{where}: the path appears twice (as {_shown(seen[folded])!r} too)")
            continue
        seen[folded] = path
        digest, size = _blob(entry, where, problems)
        layers.append(Layer(path, str(entry.get("mediaType")), digest, size))
    # a file and a folder of one name: a/b and a/b/c cannot both be written
    folders = {folded.rsplit("/", i)[0] for folded in seen for i in range(1, folded.count("/") + 1)}
    problems += [f"{_shown(seen[name])}: is a file and a folder of other layers' paths" for name in seen
                 if name in folders]
    annotations = manifest.get("annotations", {})
    if not isinstance(annotations, dict) or not all(isinstance(v, str) for v in annotations.values()):
        problems.append("its annotations are not a map of strings")
        annotations = {}
    if problems:
        _refuse(shown, problems)
    return ReceivedArtifact(config_digest, config_size, tuple(layers), dict(annotations))


def received_config(data: bytes, *, shown: str) -> dict:
    """The artifact's config, refused (exit 3) unless it satisfies the spec's schema."""
    try:
        document = json.loads(data.decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        _refuse(shown, [f"its config is not JSON ({str(exc)[:200]})"])
    problems = config_problems(document)
    if problems:
        _refuse(shown, [f"its config does not satisfy model-spec {MODEL_SPEC_VERSION}: {p}" for p in problems])
    return document


def _blob(descriptor: dict, where: str, problems: list[str]) -> tuple[str, int]:
    digest, size = descriptor.get("digest"), descriptor.get("size")
    if not (isinstance(digest, str) and _DIGEST.fullmatch(digest)):
        problems.append(f"{where}: digest {str(digest)[:100]!r} is not sha256:<64 lower-case hex digits>")
        digest = ""
    if type(size) is not int or size < 0:
        problems.append(f"{where}: size {str(size)[:40]!r} is not a byte count")
        size = 0
    return str(digest), int(size)


def _shown(text: str) -> str:
    shown = text if text.isprintable() else repr(text)[1:-1]
    return shown if len(shown) <= 200 else shown[:200] + "..."


def _refuse(shown: str, problems: list[str]) -> NoReturn:
    raise VerificationError(
        f"{shown}: refused before anything was written, the artifact is not one modelpack pulls:\n  "
        + "\n  ".join(problems[:50]) + (f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else "")
    )
