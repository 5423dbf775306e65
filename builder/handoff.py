"""Hand-off through a registry: push a checked bundle as a ModelPack artifact, pull one back proved before it lands."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from builder.errors import BundleError, RegistryError, VerificationError
from builder.manifest import MANIFEST, read_manifest, sha256_file
from builder.model_artifact import (
    BUNDLE_DIGEST,
    BUNDLE_MODE,
    GENERATOR,
    LORA_ALPHA,
    LORA_RANK,
    MAX_CONFIG_BYTES,
    MAX_MANIFEST_BYTES,
    OCI_MANIFEST,
    Layer,
    artifact_manifest,
    canonical_json,
    layer_media_type,
    model_config,
    received_artifact,
    received_config,
    sha256_digest,
)
from builder.registry import Reference, RegistryClient, docker_credentials, parse_reference
from builder.runtime.bundle_check import DIGEST_CARRIERS, SIGNATURE
from builder.runtime.load import FACTS_FILE
from builder.safetensors_io import read_safetensors_header
from builder.staging import publish, staged_output
from builder.trust import (
    DIGEST_FORM,
    bundle_digest,
    normalized_digest,
    require_integrity,
    require_signature,
)

# What proved a pulled bundle, strongest first: the sender's key, the bundle digest the sender gave, the artifact's
# own digest (pulled by @sha256:, which covers the bundle digest in its annotations), or only the registry's word.
SIGNATURE_ANCHOR = "signature"
BUNDLE_DIGEST_ANCHOR = "bundle digest"
ARTIFACT_DIGEST_ANCHOR = "artifact digest"
INTEGRITY_ONLY = "integrity only"
INTEGRITY_ONLY_WARNING = (
    "pulled by tag without --digest or --public-key: this proves integrity only (every file matches the "
    "manifest.json the registry served), not that the bundle is the sender's; ask the sender for its digest or "
    "pull by @sha256:"
)
# Configs read from the bundle for the artifact's config, bounded like every JSON read from a bundle.
MAX_FACT_BYTES = 16 << 20


@dataclass(frozen=True)
class PushResult:
    """What a push stored: the artifact's manifest digest, the bundle's digest, its layers and what was uploaded."""

    reference: Reference
    digest: str
    bundle_digest: str
    layers: tuple[Layer, ...]
    uploaded: int
    manifest: bytes
    config: bytes

    @property
    def artifact(self) -> str:
        return f"{self.reference.name}@{self.digest}"

    def as_json(self) -> dict:
        return {"ok": True, "reference": str(self.reference), "artifact": self.artifact, "digest": self.digest,
                "bundle_digest": self.bundle_digest, "layers": len(self.layers), "uploaded": self.uploaded,
                "bytes": sum(layer.size for layer in self.layers)}


@dataclass(frozen=True)
class PullResult:
    """Where a pulled bundle landed, what it is, and what proved it (one of the anchors above)."""

    reference: Reference
    digest: str
    bundle: Path
    bundle_digest: str
    files: int
    anchor: str

    @property
    def artifact(self) -> str:
        return f"{self.reference.name}@{self.digest}"

    def as_json(self) -> dict:
        return {"ok": True, "reference": str(self.reference), "artifact": self.artifact, "digest": self.digest,
                "bundle": str(self.bundle), "bundle_digest": self.bundle_digest, "files": self.files,
                "anchor": self.anchor,
                "warnings": [INTEGRITY_ONLY_WARNING] if self.anchor == INTEGRITY_ONLY else []}


def push_bundle(bundle: Path, reference: str, *, plain_http: bool = False, chunk_bytes: int | None = None,
                progress: Callable[[str], None] = lambda line: None) -> PushResult:
    """Check the bundle's files against its manifest.json (nothing from it runs), then push one raw layer per file,
    the ModelPack config and the manifest under the reference's tag. Blobs the registry has are not sent again."""
    target = parse_reference(reference)
    if target.tag is None or target.digest is not None:
        raise RegistryError(f"push needs a tag, not a digest: REGISTRY/REPOSITORY:TAG (got {reference[:200]!r})")
    bundle = bundle.resolve()
    manifest = read_manifest(bundle)
    progress("checking every file against manifest.json")
    require_integrity(bundle)
    digest = bundle_digest(bundle)
    layers = bundle_layers(bundle, manifest)
    config = canonical_json(bundle_config(bundle, manifest, version=target.tag,
                                          diff_ids=[layer.digest for layer in layers]))
    data = artifact_manifest(config, layers, bundle_annotations(bundle, manifest, digest))
    client = RegistryClient(target, plain_http=plain_http, credentials=docker_credentials(target.registry),
                            push=True)
    uploaded = 0
    try:
        for layer in layers:
            if client.has_blob(layer.digest):
                progress(f"{layer.path}: already in the registry")
                continue
            progress(f"uploading {layer.path}")
            path = bundle.joinpath(*layer.path.split("/"))
            try:
                client.upload_blob(layer.digest, layer.size, lambda path=path: open(path, "rb"),  # type: ignore[misc]
                                   chunk_bytes=chunk_bytes)
            except RegistryError as error:
                if "DIGEST_INVALID" not in error.message:
                    raise
                raise VerificationError(f"{layer.path} of {bundle} changed while it was being pushed (the registry "
                                        f"received bytes whose sha256 is not {layer.digest}); nothing was tagged, "
                                        "push again once nothing writes to the bundle") from error
            uploaded += 1
        config_digest = sha256_digest(config)
        if not client.has_blob(config_digest):
            client.upload_bytes(config_digest, config)
        stored = client.put_manifest(target.tag, data, OCI_MANIFEST)
    finally:
        client.close()
    pushed = sha256_digest(data)
    if stored is not None and stored != pushed:
        raise RegistryError(f"the registry stored the manifest of {target} as {stored}, not as the {pushed} of the "
                            "bytes sent; it rewrote the manifest, so pulls by digest would not match")
    return PushResult(target, pushed, digest, tuple(layers), uploaded, data, config)


def bundle_layers(bundle: Path, manifest: dict) -> list[Layer]:
    """One raw layer per file, sorted by path. A listed file's layer digest is the sha256 manifest.json records;
    the files that carry the bundle digest (recorded as hashed with a placeholder in its place), manifest.json and
    the signature are hashed here."""
    files = {name: (meta["sha256"], meta["size"]) for name, meta in manifest["files"].items()}
    hashed_here = [name for name in DIGEST_CARRIERS if name in files]
    hashed_here += [name for name in (MANIFEST, SIGNATURE) if (bundle / name).is_file()]
    for name in hashed_here:
        files[name] = (sha256_file(bundle / name), (bundle / name).stat().st_size)
    return [Layer(name, layer_media_type(name), f"sha256:{sha256}", size)
            for name, (sha256, size) in sorted(files.items())]


def bundle_config(bundle: Path, manifest: dict, *, version: str, diff_ids: list[str]) -> dict:
    """The ModelPack config from the bundle's facts: its name, the tag as version, the model type as family, the
    card's license (when SPDX), description, parameter count from the safetensors headers, the dtype."""
    facts = _bundle_json(bundle, FACTS_FILE)
    config = _bundle_json(bundle, "config.json")
    spec = _spec_card(manifest)
    weights = [name for name in manifest["files"] if name.endswith(".safetensors") and "/" not in name]
    params = sum(_count(shape) for name in weights
                 for shape in (t.shape for t in read_safetensors_header(bundle / name).values()))
    family = config.get("model_type")
    return model_config(
        name=str(manifest.get("name") or bundle.name), version=version,
        family=family if isinstance(family, str) else None,
        license_id=spec.get("license") if isinstance(spec.get("license"), str) else None,
        description=spec.get("description") if isinstance(spec.get("description"), str) else None,
        param_count=params, precision=facts["dtype"] if isinstance(facts.get("dtype"), str) else None,
        diff_ids=diff_ids,
    )


def bundle_annotations(bundle: Path, manifest: dict, digest: str) -> dict[str, str]:
    """The manifest's annotations: the bundle digest (a pull checks the bundle against it), the mode, LoRA facts
    where the bundle keeps the adapter, and the modelpack version that built it."""
    annotations = {BUNDLE_DIGEST: digest, BUNDLE_MODE: str(manifest.get("mode")),
                   GENERATOR: str(manifest.get("modelpack_version"))}
    if "adapter/adapter_config.json" in manifest["files"]:
        adapter = _bundle_json(bundle, "adapter/adapter_config.json")
        for key, annotation in (("r", LORA_RANK), ("lora_alpha", LORA_ALPHA)):
            if isinstance(adapter.get(key), (int, float)):
                annotations[annotation] = str(adapter[key])
    return annotations


def pull_bundle(reference: str, dest: Path, *, expected_digest: str | None = None, public_key: Path | None = None,
                plain_http: bool = False, force: bool = False,
                progress: Callable[[str], None] = lambda line: None) -> PullResult:
    """Download an artifact into the staging folder beside dest (mode 0700, as a build's), checking the manifest's
    digest (pulled by digest) and every blob's sha256 as it streams; check the bundle there as `verify` does before
    anything runs (files against manifest.json, the bundle digest given or carried in the annotations, the
    signature with a key); publish it as dest only if all of that passed. On any failure dest is as it was."""
    source = parse_reference(reference)
    wanted = normalized_digest(expected_digest) if expected_digest is not None else None
    if public_key is not None and not public_key.is_file():
        raise BundleError(f"--public-key {public_key}: no such file")
    dest = dest.absolute()
    client = RegistryClient(source, plain_http=plain_http, credentials=docker_credentials(source.registry))
    try:
        data = client.get_manifest(source.digest or source.tag or "latest", max_bytes=MAX_MANIFEST_BYTES)
        pulled = sha256_digest(data)
        if source.digest is not None and pulled != source.digest:
            raise VerificationError(f"{source}: the registry served a manifest whose digest is {pulled}, not the "
                                    f"{source.digest} asked for; nothing was written to {dest}")
        artifact = received_artifact(data, shown=str(source))
        config = _download_small(client, artifact.config_digest, artifact.config_size, shown=f"{source} config")
        document = received_config(config, shown=str(source))
        if document["modelfs"]["diffIds"] != [layer.digest for layer in artifact.layers]:
            raise VerificationError(f"{source}: the config's modelfs.diffIds are not the manifest's layers; "
                                    f"refused before anything was written to {dest}")
        carried = artifact.annotations.get(BUNDLE_DIGEST)
        anchor_digest = wanted or (carried if carried and DIGEST_FORM.fullmatch(carried) else None)
        if wanted is not None and carried is not None and carried != wanted:
            raise VerificationError(f"{source}: the artifact carries the bundle digest {carried[:80]}, not the "
                                    f"expected {wanted}: it is not the bundle the sender built; nothing was "
                                    f"downloaded or written to {dest}")
        anchor = (SIGNATURE_ANCHOR if public_key is not None else BUNDLE_DIGEST_ANCHOR if wanted is not None
                  else ARTIFACT_DIGEST_ANCHOR if source.digest is not None else INTEGRITY_ONLY)
        with staged_output(dest, force=force, needed=artifact.size, progress=progress) as staging:
            for layer in artifact.layers:
                progress(f"downloading {layer.path}")
                target = staging.joinpath(*layer.path.split("/"))
                target.parent.mkdir(parents=True, exist_ok=True)
                with open(target, "xb") as file:
                    found, size = client.download_blob(layer.digest, layer.size, file)
                if (found, size) != (layer.digest, layer.size):
                    raise VerificationError(
                        f"{source}: {layer.path} is not the file the artifact lists: its blob's sha256 is {found} "
                        f"({size} bytes) where the manifest says {layer.digest} ({layer.size} bytes); the registry's "
                        f"copy was changed or damaged, and nothing was written to {dest}")
            client.close()
            progress("checking the pulled bundle in staging, before anything of it runs")
            bundle_digest_checked, files = _checked(
                staging, source, dest, anchor_digest, public_key,
                {layer.path: layer.digest.split(":", 1)[1] for layer in artifact.layers})
            publish(staging, dest)
    finally:
        client.close()
    return PullResult(source, pulled, dest, bundle_digest_checked, files, anchor)


def _checked(staging: Path, source: Reference, dest: Path, anchor_digest: str | None, public_key: Path | None,
             known_sha256: dict[str, str]) -> tuple[str, int]:
    """The staged bundle's digest and file count once it passed verify's checks (every file against manifest.json
    and the anchor digest, then the signature); a refusal names the reference, not the staging folder.

    known_sha256: the hashes computed as the blobs streamed into this process's own staging folder (mode 0700: no
    other user can write there), so the files are not read a second time, as a build does with the weights it
    wrote."""
    try:
        integrity = require_integrity(staging, expected_digest=anchor_digest, known_sha256=known_sha256)
        if public_key is not None:
            require_signature(staging, public_key, shown=dest)
        return bundle_digest(staging), integrity.files
    except (VerificationError, BundleError) as error:
        raise type(error)(f"{source}: " + error.message.replace(str(staging), "the pulled bundle")
                          + f"; nothing was written to {dest}") from error


def _download_small(client: RegistryClient, digest: str, size: int, *, shown: str) -> bytes:
    import io

    buffer = io.BytesIO()
    found, received = client.download_blob(digest, min(size, MAX_CONFIG_BYTES), buffer)
    if (found, received) != (digest, size):
        raise VerificationError(f"{shown}: the blob's sha256 is {found} ({received} bytes) where the manifest says "
                                f"{digest} ({size} bytes); refused before anything was written")
    return buffer.getvalue()


def _bundle_json(bundle: Path, name: str) -> dict:
    path = bundle / name
    try:
        with open(path, "rb") as file:
            found = json.loads(file.read(MAX_FACT_BYTES + 1)[:MAX_FACT_BYTES].decode("utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path}: cannot be read as JSON ({exc.__class__.__name__})") from exc
    return found if isinstance(found, dict) else {}


def _spec_card(manifest: dict) -> dict:
    """The card section of the spec the bundle records (its license and description)."""
    spec = manifest.get("spec")
    text = spec.get("text") if isinstance(spec, dict) else None
    try:
        parsed = yaml.safe_load(text) if isinstance(text, str) else None
    except yaml.YAMLError:
        return {}
    card = parsed.get("card") if isinstance(parsed, dict) else None
    return card if isinstance(card, dict) else {}


def _count(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count
