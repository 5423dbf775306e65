"""An OCI distribution client: references, docker credentials, streamed blob uploads and downloads, manifests.

Blobs never pass through memory whole: an upload is one PUT whose body is read from the file as it is sent (or
PATCH chunks, for registries that want them), and a download is hashed as it is written. The standard library's
http.client is the transport; nothing here prints a credential.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import io
import json
import os
import re
import socket
import ssl
import subprocess
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, TypeVar

from builder.errors import RegistryError, VerificationError

_T = TypeVar("_T")
MANIFEST_TYPES = ("application/vnd.oci.image.manifest.v1+json",)
# The distribution spec's grammar: a repository path of lower-case components, a tag of up to 128 characters.
_REPOSITORY = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*")
_TAG = re.compile(r"\w[\w.-]{0,127}")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
# Docker Hub answers the API under another name than users write, and its credentials sit under a legacy key.
DOCKER_HUB = ("docker.io", "registry-1.docker.io", "https://index.docker.io/v1/")

READ_BYTES = 1 << 20
TIMEOUT_S = 60
# Transient failures (a dropped connection, a 5xx, 429) are retried after 0.5, 1, 2 and 4 s.
RETRIES = 4
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


@dataclass(frozen=True)
class Reference:
    """REGISTRY/REPOSITORY:TAG or REGISTRY/REPOSITORY@sha256:...: where an artifact lives."""

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def name(self) -> str:
        return f"{self.registry}/{self.repository}"

    def __str__(self) -> str:
        return self.name + (f":{self.tag}" if self.tag else "") + (f"@{self.digest}" if self.digest else "")


def parse_reference(text: str) -> Reference:
    """A reference as docker, skopeo and oras write it; the registry host is required (no implicit Docker Hub)."""
    rest, _, digest = text.partition("@")
    registry, slash, path = rest.partition("/")
    tag = None
    if ":" in path.rsplit("/", 1)[-1]:
        path, tag = path.rsplit(":", 1)
    form = ("give it as REGISTRY/REPOSITORY:TAG or REGISTRY/REPOSITORY@sha256:<64 hex digits>, "
            "e.g. localhost:5000/models/med:v1")
    if not slash or not ("." in registry or ":" in registry or registry == "localhost"):
        raise RegistryError(f"{text[:200]!r} names no registry host: {form}")
    if not _REPOSITORY.fullmatch(path):
        raise RegistryError(f"{text[:200]!r}: the repository {path[:100]!r} is not lower-case letters, digits and "
                            f"separators (. _ - /): {form}")
    if tag is not None and not _TAG.fullmatch(tag):
        raise RegistryError(f"{text[:200]!r}: the tag {tag[:130]!r} is not a tag (letters, digits, _ . -, at most "
                            "128, not starting with . or -)")
    if digest and not _DIGEST.fullmatch(digest):
        raise RegistryError(f"{text[:200]!r}: {digest[:80]!r} is not a digest: {form}")
    return Reference(registry, path, tag, digest or None)


@dataclass(frozen=True)
class Credentials:
    """A user name and secret for one registry; repr shows neither."""

    username: str = field(repr=False)
    secret: str = field(repr=False)

    def basic(self) -> str:
        return "Basic " + base64.b64encode(f"{self.username}:{self.secret}".encode()).decode()


def docker_credentials(registry: str, *, environ: dict[str, str] | None = None) -> Credentials | None:
    """The registry's credentials from the docker config (DOCKER_CONFIG or ~/.docker/config.json): a credential
    helper named for it (credHelpers) or for all (credsStore), else its `auths` entry; None when there are none."""
    env = os.environ if environ is None else environ
    folder = Path(env["DOCKER_CONFIG"]) if env.get("DOCKER_CONFIG") else Path.home() / ".docker"
    path = folder / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise RegistryError(f"cannot read the docker config {path} ({exc.__class__.__name__}); fix or move it") \
            from None
    if not isinstance(config, dict):
        raise RegistryError(f"the docker config {path} is not a JSON object; fix or move it")
    keys = _config_keys(registry)
    helpers = config.get("credHelpers")
    helpers = helpers if isinstance(helpers, dict) else {}
    helper = next((helpers[k] for k in keys if isinstance(helpers.get(k), str)), None) or config.get("credsStore")
    if isinstance(helper, str) and helper:
        found = _from_helper(helper, keys[0])
        if found is not None:
            return found
    auths = config.get("auths")
    auths = auths if isinstance(auths, dict) else {}
    entry = next((auths[k] for k in _auth_keys(auths, keys)), None)
    if not isinstance(entry, dict):
        return None
    if isinstance(entry.get("auth"), str) and entry["auth"]:
        try:
            username, colon, secret = base64.b64decode(entry["auth"], validate=True).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            raise RegistryError(f"the docker config {path}: the auth of {registry} is not base64 of user:password; "
                                f"run `docker login {registry}` again") from None
        if colon:
            return Credentials(username, secret)
    if isinstance(entry.get("username"), str) and isinstance(entry.get("password"), str):
        return Credentials(entry["username"], entry["password"])
    return None


def _config_keys(registry: str) -> list[str]:
    return [DOCKER_HUB[2], *DOCKER_HUB[:2]] if registry in DOCKER_HUB[:2] else [registry]


def _auth_keys(auths: dict, keys: list[str]) -> list[str]:
    """The `auths` keys that name the registry: exactly, or as a URL (https://host, http://host/v2/)."""
    exact = [k for k in keys if k in auths]
    loose = [k for k in auths if isinstance(k, str) and urllib.parse.urlsplit(
        k if "://" in k else f"//{k}").netloc in keys and k not in exact]
    return exact + loose


def _from_helper(helper: str, server: str) -> Credentials | None:
    program = f"docker-credential-{helper}"
    try:
        done = subprocess.run([program, "get"], input=server, capture_output=True, text=True, timeout=60,
                              check=False)
    except FileNotFoundError:
        raise RegistryError(f"the docker config names the credential helper {helper!r}, but {program} is not on "
                            "PATH; install it or remove it from ~/.docker/config.json") from None
    except subprocess.TimeoutExpired:
        raise RegistryError(f"the credential helper {program} did not answer within 60 s") from None
    if done.returncode != 0:
        return None  # "credentials not found in native keychain": anonymous access, or the auths entry
    try:
        answer = json.loads(done.stdout)
        return Credentials(str(answer["Username"]), str(answer["Secret"]))
    except (ValueError, KeyError, TypeError):
        raise RegistryError(f"the credential helper {program} answered something that is not its JSON") from None


class RegistryClient:
    """One registry, one repository: the distribution API's blob and manifest calls over one kept-alive connection,
    with the registry's own authentication (Basic, or a Bearer token from its realm) and retries with backoff."""

    def __init__(self, reference: Reference, *, plain_http: bool = False, credentials: Credentials | None = None,
                 push: bool = False, timeout: float = TIMEOUT_S, sleep: Callable[[float], None] = time.sleep):
        self.reference = reference
        self.host = DOCKER_HUB[1] if reference.registry == DOCKER_HUB[0] else reference.registry
        self.scheme = "http" if plain_http else "https"
        self.credentials = credentials
        self.scope = f"repository:{reference.repository}:{'pull,push' if push else 'pull'}"
        self.timeout = timeout
        self.sleep = sleep
        self._authorization: str | None = None
        self._connection: http.client.HTTPConnection | None = None
        self._ping()

    # ------------------------------------------------------------------ blobs

    def has_blob(self, digest: str) -> bool:
        response = self._call("HEAD", self._path(f"blobs/{digest}"), ok=(200, 404))
        return response.status == 200

    def upload_blob(self, digest: str, size: int, open_blob: Callable[[], BinaryIO], *,
                    chunk_bytes: int | None = None) -> None:
        """Upload one blob read from open_blob() as it is sent: one PUT with its Content-Length, or PATCH requests
        of chunk_bytes each and a closing PUT. The registry checks the digest over the bytes it received."""
        def attempt() -> None:
            location = self._start_upload()
            with open_blob() as blob:
                if chunk_bytes is None:
                    self._request("PUT", _with_query(location, digest=digest), body=blob,
                                  headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)},
                                  ok=(201,), what=f"upload of {digest}")
                    return
                start = 0
                while start < size:
                    length = min(chunk_bytes, size - start)
                    response = self._request("PATCH", location, body=_limited(blob, length), ok=(202,),
                                             headers={"Content-Type": "application/octet-stream",
                                                      "Content-Length": str(length),
                                                      "Content-Range": f"{start}-{start + length - 1}"},
                                             what=f"upload of {digest}")
                    location = self._location(response)
                    start += length
            self._request("PUT", _with_query(location, digest=digest), headers={"Content-Length": "0"}, ok=(201,),
                          what=f"upload of {digest}")

        self._retried(attempt)

    def upload_bytes(self, digest: str, data: bytes) -> None:
        self.upload_blob(digest, len(data), lambda: io.BytesIO(data))

    def download_blob(self, digest: str, size: int, file: BinaryIO) -> tuple[str, int]:
        """Stream one blob into file (from its start, again on a retry), never more than size bytes; returns the
        sha256 and the byte count of what came (one byte past size stops the download), for the caller to
        compare with what it asked for."""
        def attempt() -> tuple[str, int]:
            file.seek(0)
            file.truncate()
            hasher = hashlib.sha256()
            received = 0
            with self._stream(self._path(f"blobs/{digest}")) as response:
                while received <= size:
                    try:
                        chunk = response.read(min(READ_BYTES, size + 1 - received))
                    except (OSError, http.client.HTTPException) as exc:
                        raise _Transient(f"the download of {digest} from {self.host} broke off ({exc})") from None
                    if not chunk:
                        break
                    received += len(chunk)
                    if received > size:
                        break
                    hasher.update(chunk)
                    file.write(chunk)
            return "sha256:" + hasher.hexdigest(), received

        return self._retried(attempt)

    # ------------------------------------------------------------------ manifests

    def get_manifest(self, reference: str, *, max_bytes: int) -> bytes:
        """The manifest's bytes exactly as the registry sent them (its digest is computed over these), refused when
        larger than max_bytes."""
        response = self._call("GET", self._path(f"manifests/{reference}"), ok=(200,),
                              headers={"Accept": ", ".join(MANIFEST_TYPES)}, read=False,
                              missing=f"{self.reference.name} has no {'tag' if ':' not in reference else 'manifest'} "
                                      f"{reference}")
        declared = response.getheader("Content-Length")
        if declared is not None and declared.isdigit() and int(declared) > max_bytes:
            response.close()
            self._drop()
            raise VerificationError(f"{self.reference.name}:{reference}: the manifest is {declared} bytes, over the "
                                    f"limit of {max_bytes}; refused before anything was written")
        data = response.read(max_bytes + 1)
        if len(data) > max_bytes:
            response.close()
            self._drop()
            raise VerificationError(f"{self.reference.name}:{reference}: the manifest is over the limit of "
                                    f"{max_bytes} bytes; refused before anything was written")
        return data

    def put_manifest(self, reference: str, data: bytes, media_type: str) -> str | None:
        """Store a manifest under a tag; the digest the registry says it stored (Docker-Content-Digest), if any."""
        response = self._call("PUT", self._path(f"manifests/{reference}"), body=data,
                              headers={"Content-Type": media_type, "Content-Length": str(len(data))}, ok=(201,))
        return response.getheader("Docker-Content-Digest")

    def close(self) -> None:
        self._drop()

    # ------------------------------------------------------------------ transport

    def _path(self, tail: str) -> str:
        return f"/v2/{self.reference.repository}/{tail}"

    def _start_upload(self) -> str:
        return self._location(self._request("POST", self._path("blobs/uploads/"), headers={"Content-Length": "0"},
                                            ok=(202,), what="starting an upload"))

    def _location(self, response: http.client.HTTPResponse) -> str:
        location = response.getheader("Location")
        if not location:
            raise RegistryError(f"the registry {self.host} started an upload without saying where (no Location)")
        parts = urllib.parse.urlsplit(location)
        if parts.netloc and parts.netloc != self.host:
            raise RegistryError(f"the registry {self.host} sent the upload to another host ({parts.netloc}), which "
                                "modelpack does not follow")
        return urllib.parse.urlunsplit(("", "", parts.path, parts.query, ""))

    def _ping(self) -> None:
        """GET /v2/ once: learns the authentication the registry wants before any large body is sent."""
        self._call("GET", "/v2/", ok=(200,))

    def _call(self, method: str, path: str, *, ok: tuple[int, ...], headers: dict[str, str] | None = None,
              body: bytes | None = None, read: bool = True, missing: str | None = None) -> http.client.HTTPResponse:
        return self._retried(lambda: self._request(method, path, ok=ok, headers=headers, body=body, read=read,
                                                   missing=missing))

    def _retried(self, attempt: Callable[[], _T]) -> _T:
        for tries in range(RETRIES):
            try:
                return attempt()
            except _Transient:
                self._drop()
                self.sleep(0.5 * 2 ** tries)
        try:
            return attempt()
        except _Transient as transient:
            self._drop()
            raise RegistryError(transient.message) from None

    def _request(self, method: str, path: str, *, ok: tuple[int, ...], headers: dict[str, str] | None = None,
                 body=None, read: bool = True, what: str | None = None,
                 missing: str | None = None) -> http.client.HTTPResponse:
        for authenticated in (False, True):
            response = self._send(method, path, headers or {}, body)
            if response.status == 401 and not authenticated and self._authenticate(response):
                response.read()
                if hasattr(body, "seek"):
                    body.seek(0)
                continue
            break
        if response.status in ok:
            if read:
                response.read()
            return response
        detail = _error_detail(response.read(64 << 10))
        self._drop()  # the rest of an error's body, if any, is not read: the connection starts afresh
        if response.status in RETRY_STATUSES:
            raise _Transient(f"the registry {self.host} answered {response.status} {response.reason} to "
                             f"{what or method + ' ' + path}{detail}")
        raise self._refusal(response.status, detail, what or f"{method} {path}", missing)

    def _refusal(self, status: int, detail: str, what: str, missing: str | None) -> RegistryError:
        name = self.reference.name
        if status == 401:
            return RegistryError(
                f"the registry {self.host} refused access to {name} (401 unauthorized)"
                + (": the credentials from the docker config were not accepted; run `docker login` again"
                   if self.credentials else f": it needs credentials; run `docker login {self.reference.registry}`"))
        if status == 403:
            return RegistryError(f"the registry {self.host} denied access to {name} (403 forbidden){detail}")
        if status == 404 and missing:
            return RegistryError(f"{missing} (404){detail}")
        return RegistryError(f"the registry {self.host} answered {status} to {what}{detail}")

    def _authenticate(self, response: http.client.HTTPResponse) -> bool:
        """Answer a 401's challenge: Basic with the docker config's credentials, or a Bearer token from the realm
        (with them, when there are any). False when there is nothing to answer with."""
        challenge = response.getheader("WWW-Authenticate") or ""
        scheme, _, params = challenge.partition(" ")
        if scheme.lower() == "basic":
            if self.credentials is None:
                return False
            self._authorization = self.credentials.basic()
            return True
        if scheme.lower() != "bearer":
            return False
        fields = dict(re.findall(r'(\w+)="([^"]*)"', params))
        realm = fields.get("realm")
        if not realm:
            return False
        query = {"service": fields.get("service", ""), "scope": self.scope}
        import urllib.request

        request = urllib.request.Request(
            realm + ("&" if "?" in realm else "?") + urllib.parse.urlencode({k: v for k, v in query.items() if v}))
        if self.credentials is not None:
            request.add_header("Authorization", self.credentials.basic())
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as answer:
                token = json.loads(answer.read(1 << 20))
        except OSError as exc:
            code = getattr(exc, "code", None)
            if code in (401, 403):
                return False
            raise RegistryError(f"the registry {self.host}'s token service {realm[:100]} failed "
                                f"({str(exc)[:200]})") from None
        except ValueError:
            raise RegistryError(f"the registry {self.host}'s token service answered something that is not JSON") \
                from None
        value = token.get("token") or token.get("access_token") if isinstance(token, dict) else None
        if not isinstance(value, str):
            return False
        self._authorization = f"Bearer {value}"
        return True

    def _send(self, method: str, path: str, headers: dict[str, str], body) -> http.client.HTTPResponse:
        sent = dict(headers)
        if self._authorization:
            sent["Authorization"] = self._authorization
        connection = self._connect()
        try:
            if isinstance(body, io.IOBase):
                # a file: the kernel sends it (sendfile(2)) with no copy through Python; socket.sendfile falls back
                # to reads and sends for what has no file descriptor (BytesIO) and over TLS
                connection.putrequest(method, path, skip_accept_encoding=True)
                for key, value in sent.items():
                    connection.putheader(key, value)
                connection.endheaders()
                assert connection.sock is not None
                connection.sock.sendfile(body, count=int(sent["Content-Length"]))  # never past what was declared
            else:
                connection.request(method, path, body=body, headers=sent)
            return connection.getresponse()
        except ssl.SSLError as exc:
            self._drop()
            raise RegistryError(f"cannot talk TLS to the registry {self.host} ({exc.reason}); for a local registry "
                                "without TLS pass --plain-http") from None
        except (ConnectionRefusedError, socket.gaierror) as exc:
            self._drop()
            raise RegistryError(f"cannot reach the registry {self.host} ({exc.strerror or exc}); check the address "
                                "and that it is running") from None
        except (OSError, http.client.HTTPException) as exc:
            raise _Transient(f"the connection to the registry {self.host} failed ({exc.__class__.__name__}: "
                             f"{str(exc)[:200]})") from None

    def _stream(self, path: str):
        """A GET whose body the caller reads, following a redirect (registries hand blobs to a CDN) without our
        credentials."""
        response = self._request("GET", path, ok=(200, 307, 302, 301, 303, 308), read=False,
                                 missing=f"{self.reference.name} has no blob {path.rsplit('/', 1)[-1]}")
        if response.status == 200:
            return _Closing(response, self)
        target = response.getheader("Location") or ""
        response.read()
        parts = urllib.parse.urlsplit(urllib.parse.urljoin(f"{self.scheme}://{self.host}{path}", target))
        cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        elsewhere = cls(parts.netloc, timeout=self.timeout)
        try:
            elsewhere.request("GET", urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, "")))
            redirected = elsewhere.getresponse()
        except OSError as exc:
            elsewhere.close()
            raise _Transient(f"the blob's download from {parts.netloc} failed ({exc})") from None
        if redirected.status != 200:
            elsewhere.close()
            raise RegistryError(f"the blob's download from {parts.netloc} answered {redirected.status}")
        return _Closing(redirected, None, elsewhere)

    def _connect(self) -> http.client.HTTPConnection:
        if self._connection is None:
            cls = http.client.HTTPConnection if self.scheme == "http" else http.client.HTTPSConnection
            # blocksize: a file body is sent in reads of this size (the default, 8 KiB, costs a syscall per 8 KiB)
            self._connection = cls(self.host, timeout=self.timeout, blocksize=READ_BYTES)
        return self._connection

    def _drop(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None


class _Transient(Exception):
    """A failure worth another try: a dropped connection, a 5xx or a 429."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class _Closing:
    """A streamed response as a context: a body read to its end leaves the connection usable, a body left half
    read closes it."""

    def __init__(self, response: http.client.HTTPResponse, client: RegistryClient | None,
                 connection: http.client.HTTPConnection | None = None):
        self.response, self.client, self.connection = response, client, connection

    def __enter__(self) -> http.client.HTTPResponse:
        return self.response

    def __exit__(self, *exc) -> None:
        if exc[0] is not None or not self.response.isclosed():
            self.response.close()
            if self.client is not None:
                self.client._drop()
        if self.connection is not None:
            self.connection.close()


def _limited(blob: BinaryIO, length: int) -> Iterator[bytes]:
    remaining = length
    while remaining:
        chunk = blob.read(min(READ_BYTES, remaining))
        if not chunk:
            raise RegistryError("a file shrank while it was being uploaded")
        remaining -= len(chunk)
        yield chunk


def _with_query(location: str, **params: str) -> str:
    return location + ("&" if "?" in location else "?") + urllib.parse.urlencode(params)


def _error_detail(body: bytes) -> str:
    """The registry's own error codes and messages (the distribution spec's {"errors": [...]}), shortened."""
    try:
        errors = json.loads(body).get("errors") or []
        text = "; ".join(f"{e.get('code')}: {e.get('message')}" for e in errors if isinstance(e, dict))
    except (ValueError, AttributeError):
        text = body[:200].decode("utf-8", "replace").strip()
    return f" ({text[:300]})" if text else ""
