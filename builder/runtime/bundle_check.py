"""Verification runtime of a modelpack bundle: what `python load.py --verify` runs.

The bundle's files against manifest.json, the serving contract, the expected answers (greedy, seeded), the
versions it ran with, load time, throughput and placement, as one JSON-ready report. Like load.py it is the same in
every bundle, needs only torch and transformers (and peft in separate mode) and never imports modelpack. It runs
inside the bundle's own code, so it cannot detect a changed load.py or bundle_check.py: see load.py's docstring.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import stat
import sys
import time
import unicodedata
from pathlib import Path
from types import ModuleType

# What a calling tool (modelpack's verify) looks for at the start of a line to show it as progress.
PROGRESS_MARKER = "[verify] "
# The largest rank vLLM's --max-lora-rank accepts.
VLLM_MAX_LORA_RANK = 512
MANIFEST = "manifest.json"
# model_signing's signature file (`modelpack sign`): the one file beside manifest.json that the manifest cannot list.
SIGNATURE = "model.sig"
# README.md and verification.json carry the bundle's digest (sha256 of manifest.json); they were hashed with this
# placeholder in its place.
DIGEST_CARRIERS = ("README.md", "verification.json")
DIGEST_PLACEHOLDER = "sha256:" + "0" * 64


def progress(line: str) -> None:
    """A verification progress line; the marker lets a calling tool show these and keep library output in a log."""
    print(f"{PROGRESS_MARKER}{line}", file=sys.stderr, flush=True)


def check_expectations(answer: str, expect: dict) -> list[str]:
    """Each unmet expectation as a sentence; empty when the answer satisfies all of them."""
    failures = []
    if expect.get("equals") is not None and answer != expect["equals"]:
        failures.append(f"equals {expect['equals']!r}")
    for text in expect.get("contains", []):
        if text not in answer:
            failures.append(f"contains {text!r}")
    for text in expect.get("not_contains", []):
        if text in answer:
            failures.append(f"not_contains {text!r}")
    if expect.get("regex") is not None and not re.search(expect["regex"], answer):
        failures.append(f"regex {expect['regex']!r}")
    return failures


# Limits on what a bundle's manifest.json may hold, so a hostile one fails with a sentence in fixed time and memory.
# They admit real bundles with room to spare: a 72B model's manifest lists about 40 shards and its provenance, some
# 100 KB. The nesting depth is checked by the JSON decoder itself (RecursionError, a thousand levels).
MAX_MANIFEST_BYTES = 16 << 20
MAX_LISTED_FILES = 100_000
# A path component as ext4, XFS, APFS and NTFS allow it (255 bytes), a whole listed name as Linux's PATH_MAX.
MAX_NAME_COMPONENT_BYTES = 255
MAX_NAME_BYTES = 4096
MAX_NAME_DEPTH = 32
# The files that carry the digest are hashed from memory (the digest is blanked first); they are small text files.
MAX_CARRIER_BYTES = 64 << 20
_HEX64 = re.compile(r"[0-9a-f]{64}")


def check_integrity(bundle: Path, *, known_sha256: dict[str, str] | None = None) -> dict:
    """Every file matches manifest.json (sha256 and size) and nothing was added since the build.

    `modelpack verify` applies the same rules from modelpack's own copy (builder/trust.py), to a private snapshot:
    every listed name is a regular file inside the bundle, not behind a symlink, listed once, with its recorded size
    and sha256; no unlisted file, symlink, empty folder or __pycache__ (Python would run a planted .pyc instead of the
    bundle's code). README.md and verification.json are hashed with the bundle's digest blanked, since they carry it.
    known_sha256: hashes the caller computed while writing the files itself (modelpack's build), not read again.
    """
    data, problem = read_manifest_bytes(bundle)
    listed, problems = parse_manifest(data) if problem is None else (None, [f"{MANIFEST}: {problem}"])
    if listed is None:
        return {"ok": False, "files": 0, "problems": problems}
    digest = "sha256:" + hashlib.sha256(data or b"").hexdigest()
    for name, meta in clean_entries(listed):
        found = check_listed_file(bundle, name, meta, digest, (known_sha256 or {}).get(name))
        if isinstance(found, str):
            problems.append(f"{name}: {found}")
        else:
            os.close(found)
    problems += unlisted_entries(bundle, listed)
    return {"ok": not problems, "files": len(listed), "problems": problems}


def read_manifest_bytes(bundle: Path) -> tuple[bytes | None, str | None]:
    """manifest.json's bytes, read once through a handle that is no symlink and no larger than MAX_MANIFEST_BYTES;
    or why not. The digest and every rule apply to these bytes, never to a second read."""
    try:
        fd = os.open(bundle / MANIFEST, os.O_RDONLY | _NOFOLLOW | _NONBLOCK)
    except OSError as exc:
        return None, "is a symlink" if exc.errno == _ELOOP else f"cannot be read ({exc.strerror})"
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            return None, "is not a regular file"
        if info.st_size > MAX_MANIFEST_BYTES:
            return None, f"is {info.st_size} bytes, over the limit of {MAX_MANIFEST_BYTES}"
        return f.read(MAX_MANIFEST_BYTES + 1)[:MAX_MANIFEST_BYTES], None


def parse_manifest(data: bytes | None) -> tuple[dict | None, list[str]]:
    """The manifest's `files` table, and every problem with its shape (None when there is no table to check).

    Strict: a JSON object without repeated keys at any level, at most MAX_LISTED_FILES entries, each a clean
    relative name (listed_name_problem) with a 64-hex sha256 and an integer size; manifest.json and model.sig are
    never listed; two names that one file system could treat as one (case, Unicode normalisation) are refused.
    """
    try:
        manifest = json.loads((data or b"").decode("utf-8"), object_pairs_hook=_unique_keys)
    except RecursionError:
        return None, [f"{MANIFEST}: nested too deeply"]
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError, a repeated key, bytes that are not UTF-8
        return None, [f"{MANIFEST}: not a JSON object ({exc})"]
    listed = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(listed, dict):
        return None, [f"{MANIFEST}: has no 'files' table"]
    if len(listed) > MAX_LISTED_FILES:
        return None, [f"{MANIFEST}: lists {len(listed)} files, over the limit of {MAX_LISTED_FILES}"]
    return listed, [f"{_shown(name)}: {problem}" for name, _, problem in _entries(listed) if problem]


def clean_entries(listed: dict) -> list[tuple[str, dict]]:
    """The listed files parse_manifest found no problem with, to be opened and hashed (never a refused name)."""
    return [(name, meta) for name, meta, problem in _entries(listed) if problem is None]


def _entries(listed: dict) -> list[tuple[str, dict, str | None]]:
    """Each listed name and entry, sorted, with what is wrong with it (None: a clean name and entry)."""
    found = []
    seen: dict[str, str] = {}
    for name, meta in sorted(listed.items()):
        problem = listed_name_problem(name)
        if problem is None and not (isinstance(meta, dict) and isinstance(meta.get("sha256"), str)
                                    and _HEX64.fullmatch(meta["sha256"]) and type(meta.get("size")) is int
                                    and meta["size"] >= 0):
            problem = "its entry is not {\"sha256\": <64 hex digits>, \"size\": <bytes>}"
        folded = unicodedata.normalize("NFC", name).casefold()
        if problem is None and folded in seen:
            problem = f"listed twice (as {_shown(seen[folded])!r} too)"
        seen.setdefault(folded, name)
        found.append((name, meta, problem))
    return found


def listed_name_problem(name: str) -> str | None:
    """Why a manifest name is not a clean relative file name inside the bundle, or None."""
    if not name.isprintable():  # control, format (bidi) and separator characters: no bundle of modelpack's has them
        return "not a file name inside the bundle (control or format characters)"
    if len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        return f"a name longer than {MAX_NAME_BYTES} bytes"
    parts = name.split("/")
    if name.startswith("/") or "\\" in name or any(p in ("", ".", "..") for p in parts) or ":" in parts[0]:
        return "not a file name inside the bundle"
    if len(parts) > MAX_NAME_DEPTH or any(len(p.encode("utf-8", "surrogatepass")) > MAX_NAME_COMPONENT_BYTES
                                          for p in parts):
        return f"a name deeper than {MAX_NAME_DEPTH} folders or with a part over {MAX_NAME_COMPONENT_BYTES} bytes"
    if name in (MANIFEST, SIGNATURE):
        return f"{name} cannot list itself or the signature"
    return None


def check_listed_file(bundle: Path, name: str, meta: dict, digest: str, known: str | None,
                      sink=None) -> int | str:
    """An open read handle on the listed file whose size and sha256 matched, or why it did not.

    The file is opened once, folder by folder without following a symlink, and everything is checked through that
    handle: a rename or a symlink swapped in afterwards cannot change what was checked. sink(chunk), when given,
    receives every byte as it is hashed (a snapshot's copy). The caller closes the handle.
    """
    fd = _open_inside(bundle, name)
    if isinstance(fd, str):
        return fd
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise _Refused("not a regular file")
        if info.st_size != meta.get("size"):
            raise _Refused(f"size {info.st_size} != {meta.get('size')} in manifest.json")
        if name in DIGEST_CARRIERS:
            if info.st_size > MAX_CARRIER_BYTES:
                raise _Refused(f"over the limit of {MAX_CARRIER_BYTES} bytes")
            content = _read_exactly(fd, info.st_size)
            actual = hashlib.sha256(content.replace(digest.encode(), DIGEST_PLACEHOLDER.encode())).hexdigest()
            if sink is not None:
                sink(content)
        elif known and sink is None:
            actual = known
        else:
            hasher = hashlib.sha256()
            remaining = info.st_size
            while remaining:
                chunk = os.read(fd, min(1 << 20, remaining))
                if not chunk:
                    raise _Refused("shrank while it was being checked")
                hasher.update(chunk)
                if sink is not None:
                    sink(chunk)
                remaining -= len(chunk)
            actual = hasher.hexdigest()
        if actual != meta.get("sha256"):
            raise _Refused("sha256 differs from manifest.json (the file changed after the build)")
        if stamp(os.fstat(fd)) != stamp(info):
            raise _Refused("changed while it was being checked")
    except _Refused as refused:
        os.close(fd)
        return str(refused)
    except OSError as exc:
        os.close(fd)
        return f"cannot be read ({exc.strerror})"
    return fd


def stamp(info: os.stat_result) -> tuple[int, ...]:
    """What any write to a file changes: its identity, size and modification and change times (a process cannot
    set the change time back), so an unchanged stamp means unchanged bytes."""
    return info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns


def unlisted_entries(bundle: Path, listed: dict) -> list[str]:
    return [f"{_shown(name)}: not in manifest.json (added after the build)" for name in _present_entries(bundle)
            if name not in listed and name not in (MANIFEST, SIGNATURE)]


class _Refused(Exception):
    pass


def _read_exactly(fd: int, size: int) -> bytes:
    chunks, remaining = [], size
    while remaining:
        chunk = os.read(fd, min(1 << 20, remaining))
        if not chunk:
            raise _Refused("shrank while it was being checked")
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def _open_inside(bundle: Path, name: str) -> int | str:
    """A read handle on bundle/name opened component by component without following symlinks, or why not."""
    parts = name.split("/")
    if not _DIR_FD:  # no openat (Windows): check the path, then open it
        path = bundle.joinpath(*parts)
        if any(bundle.joinpath(*parts[:i]).is_symlink() for i in range(1, len(parts))):
            return "lies behind a symlink"
        if path.is_symlink():
            return "is a symlink"
        try:
            return os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        except OSError:
            return "missing"
    try:
        folder = os.open(bundle, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        return f"cannot be read ({exc.strerror})"
    try:
        for i, part in enumerate(parts[:-1]):
            try:
                inner = os.open(part, os.O_RDONLY | os.O_DIRECTORY | _NOFOLLOW, dir_fd=folder)
            except OSError as exc:
                if exc.errno == _ELOOP or os.path.islink(bundle.joinpath(*parts[:i + 1])):
                    return "lies behind a symlink"
                return "missing"
            os.close(folder)
            folder = inner
        try:
            return os.open(parts[-1], os.O_RDONLY | _NOFOLLOW | _NONBLOCK, dir_fd=folder)
        except OSError as exc:
            return "is a symlink" if exc.errno == _ELOOP else "missing" if exc.errno in (
                errno.ENOENT, errno.ENOTDIR) else f"cannot be read ({exc.strerror})"
    finally:
        os.close(folder)


def _unique_keys(pairs: list) -> dict:
    found = dict(pairs)
    if len(found) != len(pairs):
        keys = [key for key, _ in pairs]
        repeated = next(key for i, key in enumerate(keys) if key in keys[:i])
        raise ValueError(f"the key {_shown(repeated)} appears twice")
    return found


def _shown(name: str) -> str:
    """A name from the bundle as a message may print it: control characters escaped, at most 200 characters."""
    shown = name if name.isprintable() else repr(name)[1:-1]
    return shown if len(shown) <= 200 else shown[:200] + "..."


_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)  # a FIFO planted under a listed name must not block the open
_ELOOP = errno.ELOOP
_DIR_FD = os.open in os.supports_dir_fd and hasattr(os, "O_DIRECTORY")


def _present_entries(bundle: Path) -> list[str]:
    """Every file, symlink and empty folder under the bundle, without following symlinks; a folder deeper than
    MAX_NAME_DEPTH, and the rest of a tree past MAX_LISTED_FILES entries, appear as one entry ending in "/..."
    (never listed, so refused), so a hostile tree costs bounded time and no recursion."""
    if not _DIR_FD:
        return sorted(Path(root, name).relative_to(bundle).as_posix() + suffix for root, folders, files in
                      os.walk(bundle) for name, suffix in [*((f, "") for f in files), *(
                          (f, "") for f in folders if os.path.islink(os.path.join(root, f)))])
    found: list[str] = []
    pending = [""]
    top = os.open(bundle, os.O_RDONLY | os.O_DIRECTORY)
    try:
        _walk(top, pending, found)
    finally:
        os.close(top)
    return sorted(found)


def _walk(top: int, pending: list[str], found: list[str]) -> None:
    while pending:
        prefix = pending.pop()
        if prefix.count("/") >= MAX_NAME_DEPTH or len(found) > MAX_LISTED_FILES:
            found.append(prefix + "...")
            continue
        try:
            fd = os.open(prefix.rstrip("/") or ".", os.O_RDONLY | os.O_DIRECTORY | _NOFOLLOW, dir_fd=top)
        except OSError:
            found.append(prefix or "./")
            continue
        try:
            with os.scandir(fd) as entries:
                children = [(e.name, e.is_dir(follow_symlinks=False)) for e in entries]
        finally:
            os.close(fd)
        if not children and prefix:
            found.append(prefix)
        for name, is_folder in children:
            if is_folder:
                pending.append(f"{prefix}{name}/")
            else:
                found.append(prefix + name)


def sha256_file(path: Path, *, blank: str | None = None) -> str:
    """sha256 of a file; with blank, of its content with that digest replaced by the placeholder it was hashed with."""
    if blank is not None:
        return hashlib.sha256(path.read_bytes().replace(blank.encode(), DIGEST_PLACEHOLDER.encode())).hexdigest()
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def eos_ids(generation: dict) -> list[int]:
    """generation_config.json's eos_token_id as a list (it may be one id, a list or absent)."""
    eos = generation.get("eos_token_id")
    return [eos] if isinstance(eos, int) else list(eos or [])


def check_serving(model, tokenizer, bundle: Path, facts) -> dict:
    """What servers rely on: stop ids, the chat template in both places, special ids inside the vocabulary."""
    problems = []
    generation = json.loads((bundle / "generation_config.json").read_text(encoding="utf-8"))
    eos = eos_ids(generation)
    if facts.end_of_turn_token is not None:
        end_id = tokenizer.convert_tokens_to_ids(facts.end_of_turn_token)
        if end_id not in eos:
            problems.append(
                f"generation_config.json eos_token_id {eos} lacks the chat template's end-of-turn token "
                f"{facts.end_of_turn_token} (id {end_id}): servers would generate past the end of a reply"
            )
    if facts.has_chat_template:
        config = json.loads((bundle / "tokenizer_config.json").read_text(encoding="utf-8"))
        if not config.get("chat_template"):
            problems.append("tokenizer_config.json has no chat_template")
        if not (bundle / "chat_template.jinja").is_file():
            problems.append("chat_template.jinja is missing")
    # Remote chat code (Qwen-v1) stops at its stop_words_ids by itself; servers stop only at eos_token_id.
    for word in generation.get("stop_words_ids") or []:
        if len(word) == 1 and word[0] not in eos:
            problems.append(f"generation_config.json eos_token_id {eos} lacks stop word id {word[0]}: "
                            "servers would generate past it")
    rows = model.get_input_embeddings().weight.shape[0]
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None and not 0 <= value < rows:
            problems.append(f"tokenizer {name}={value} is outside the embedding's {rows} rows")
    for token_id in eos:
        if not 0 <= token_id < rows:
            problems.append(f"generation_config.json eos_token_id {token_id} is outside the embedding's {rows} rows")
    if len(tokenizer) > rows:
        problems.append(f"tokenizer has {len(tokenizer)} tokens but the embedding only {rows} rows")
    warnings = vllm_lora_warnings(adapter_config(bundle)) if facts.mode == "separate" else []
    return {"ok": not problems, "problems": problems, "warnings": warnings}


def adapter_config(bundle: Path) -> dict:
    return json.loads((bundle / "adapter" / "adapter_config.json").read_text(encoding="utf-8"))


def vllm_lora_warnings(config: dict) -> list[str]:
    """What stops vLLM from serving this adapter config as a LoRA (warnings: transformers + peft load it)."""
    warnings = []
    extra = [m for m in config.get("modules_to_save") or [] if m not in ("score", "classifier")]
    if extra:
        warnings.append(f"vLLM: modules_to_save {extra} (full module copies) are not loaded by vLLM's LoRA support")
    if config.get("use_dora"):
        warnings.append("vLLM: DoRA adapters (use_dora) are not supported by vLLM's LoRA support; merge instead")
    if config.get("lora_bias"):
        warnings.append("vLLM: lora_bias is not supported by vLLM's LoRA support; merge instead")
    ranks = [config.get("r", 8), *(config.get("rank_pattern") or {}).values()]
    if max(ranks) > VLLM_MAX_LORA_RANK:
        warnings.append(f"vLLM: rank {max(ranks)} exceeds vLLM's largest --max-lora-rank ({VLLM_MAX_LORA_RANK})")
    return warnings


def answer_all(loader: ModuleType, model, tokenizer, entries: list[dict], max_new_tokens: int,
               clock: GenerationClock) -> list[dict]:
    """Each prompt answered through the bundle's own chat(), greedy and seeded, with its unmet expectations; the
    clock times the generation."""
    import torch

    results = []
    for i, entry in enumerate(entries, 1):
        progress(f"  [{i}/{len(entries)}] {entry['prompt'][:40]}")
        torch.manual_seed(0)
        with clock:
            answer, _ = loader.chat(model, tokenizer, entry["prompt"], greedy=True, max_new_tokens=max_new_tokens)
        failures = check_expectations(answer, entry.get("expect", {}))
        results.append({"prompt": entry["prompt"], "answer": answer, "expect": entry.get("expect", {}),
                        "failures": failures, "ok": not failures, "tokens": clock.last_generation})
    return results


class TopTwoScores:
    """A logits processor that changes nothing and keeps, at each step of a one-sequence generation, the gap between
    the two largest scores (rounded: the figure is judged against tolerances of 1e-3 and up) and the largest |score|."""

    def __init__(self) -> None:
        self.gaps: list[float] = []
        self.largest: list[float] = []

    def __call__(self, input_ids, scores):
        top = scores[0].float().topk(2).values
        self.gaps.append(round(float(top[0] - top[1]), 5))
        self.largest.append(round(float(scores[0].float().abs().max()), 3))
        return scores


class GenerationClock:
    """The tokens generate() adds and the seconds it takes, summed over the answers it times.

    The decoding speed is read off the verification answers themselves (their prompt processing included) rather
    than off a generation run of its own, which at 7B on a CPU costs minutes. It wraps generate for the duration of
    each `with`, on the model and, for a peft model, on the model peft wraps too: remote chat code (Qwen-v1's
    model.chat, which a PeftModel hands to its base model) calls that one's self.generate. A generate called from
    within another (PeftModel.generate calls its base model's) is counted once.

    It also keeps the last generation's token ids (prompt and answer) and, at each generated position, the gap
    between the two largest scores greedy chose from (a log-probability gap: log-softmax shifts every score alike)
    and the largest |score|: what a serving engine's answer is compared with (modelpack's vLLM stage), where a
    divergence is accepted only at a near tie.
    """

    def __init__(self, model) -> None:
        self.tokens, self.seconds = 0, 0.0
        self.last_generation: dict | None = None
        get_base_model = getattr(model, "get_base_model", None)
        self._models = [model] + ([get_base_model()] if callable(get_base_model) else [])
        self._depth = 0

    def __enter__(self) -> GenerationClock:
        for model in self._models:
            model.generate = self._timed(model.generate)
        return self

    def _timed(self, generate):
        from transformers import LogitsProcessorList

        def timed_generate(*args, **kwargs):
            if self._depth:  # inside the generate being timed
                return generate(*args, **kwargs)
            self._depth += 1
            scores = TopTwoScores()
            # Remote chat code (Qwen-v1) passes processors of its own (stop words): ours runs after them.
            kwargs["logits_processor"] = LogitsProcessorList([*(kwargs.get("logits_processor") or []), scores])
            started = time.perf_counter()
            try:
                output = generate(*args, **kwargs)
            finally:
                self._depth -= 1
            self.seconds += time.perf_counter() - started
            prompt = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
            sequences = getattr(output, "sequences", output)
            self.tokens += (sequences.shape[-1] - prompt.shape[-1]) * sequences.shape[0]
            self.last_generation = {"prompt_ids": prompt[0].tolist(), "ids": sequences[0, prompt.shape[-1]:].tolist(),
                                    "gaps": scores.gaps, "max_abs_scores": scores.largest}
            return output

        return timed_generate

    def __exit__(self, *exc) -> None:
        for model in self._models:
            del model.generate  # the class's own generate again

    def tokens_per_second(self) -> float | None:
        return round(self.tokens / self.seconds, 2) if self.tokens else None


def formatted_prompt(tokenizer, model, prompt: str, system: str | None) -> str:
    """The text the model sees before its answer: the chat template's, or ChatML for remote chat code."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if getattr(model.generation_config, "chat_format", None) == "chatml":
        system_text = system or "You are a helpful assistant."
        return (f"<|im_start|>system\n{system_text}<|im_end|>\n<|im_start|>user\n{prompt}<|im_end|>\n"
                "<|im_start|>assistant\n")
    return prompt


def save_answer_logits(model, tokenizer, results: list[dict], system: str | None, folder: Path) -> None:
    """For modelpack's equivalence check, which loads the reference in the next process: each prompt followed by
    this bundle's answer, as token ids, and the bundle's next-token logits at the positions that predict the answer
    (the prompt's last token and every answer token).

    One safetensors file per answer, the logits in their own dtype (lossless: the comparison sees exactly what a
    model in memory would give it), so only one answer's rows are ever in memory: positions x vocabulary x 2 bytes
    in bfloat16, e.g. 1.5 MB for 5 positions of a 152k vocabulary.
    """
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    device = model.get_input_embeddings().weight.device
    for i, result in enumerate(results):
        text = formatted_prompt(tokenizer, model, result["prompt"], system)
        prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(result["answer"], add_special_tokens=False)["input_ids"] if result["answer"] else []
        ids = torch.tensor(prompt_ids + answer_ids)
        with torch.no_grad():
            logits = model(ids[None].to(device)).logits[0, len(prompt_ids) - 1:].cpu().contiguous()
        save_file({"ids": ids, "logits": logits}, str(folder / f"answer-{i:04d}.safetensors"),
                  metadata={"prompt": result["prompt"], "start": str(len(prompt_ids) - 1)})


def peak_rss_gb() -> float | None:
    """This process's peak resident memory so far, in GB (None where the platform does not say)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux, bytes on macOS
    return round(peak * (1 if sys.platform == "darwin" else 1024) / 1e9, 3)


def versions(remote_code_imports: list[str]) -> dict:
    """The versions this interpreter runs, and which distribution provides each import of the model's code."""
    import platform
    from importlib import metadata

    found: dict = {"python": platform.python_version()}
    for package in ("torch", "transformers", "peft", "accelerate", "safetensors", "tokenizers", "tiktoken"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    if remote_code_imports:
        # import name -> [distribution, version]: what provided each import of the model's code here.
        providers: dict[str, list[str]] = getattr(metadata, "packages_distributions", dict)()
        found["imports"] = {}
        for name in remote_code_imports:
            distribution = (providers.get(name) or [name])[0]
            try:
                found["imports"][name] = [distribution, metadata.version(distribution)]
            except metadata.PackageNotFoundError:
                found["imports"][name] = [distribution, None]
    return found


def verify(loader: ModuleType, *, device: str = "cpu", max_memory: dict | None = None,
           files_checked: bool = False, answer_logits: Path | None = None) -> dict:
    """Integrity, expected answers (greedy, seeded) and serving contract of the bundle loader belongs to.

    loader: the bundle's load.py module. files_checked: the caller (modelpack verify) already checked every file
    against manifest.json. answer_logits: a folder for the logits of the answers (see save_answer_logits).
    """
    bundle, facts = loader.BUNDLE_DIR, loader.bundle_facts()
    integrity: dict
    if files_checked:
        integrity = {"ok": True, "files": None, "problems": []}
    else:
        progress("checking files against manifest.json")
        integrity = check_integrity(bundle)
    progress("loading the bundle")
    started = time.perf_counter()
    model, tokenizer = loader.load(device=device, max_memory=max_memory)
    load_seconds = time.perf_counter() - started
    serving = check_serving(model, tokenizer, bundle, facts)
    progress("answering the verification prompts")
    clock = GenerationClock(model)
    prompts = answer_all(loader, model, tokenizer, facts.prompts, facts.verify_max_new_tokens, clock)
    probes = answer_all(loader, model, tokenizer, facts.probes, facts.verify_max_new_tokens, clock) \
        if facts.probes else []
    if answer_logits is not None:
        progress("scoring the answers for the equivalence check")
        save_answer_logits(model, tokenizer, prompts + probes, facts.system_prompt, answer_logits)
    ok = integrity["ok"] and serving["ok"] and all(r["ok"] for r in prompts + probes)
    return {"bundle": facts.name, "ok": ok, "integrity": integrity, "serving": serving,
            "prompts": prompts, "probes": probes, "environment": versions(facts.remote_code_imports),
            "runtime": {"load_seconds": round(load_seconds, 2), "tokens_per_second": clock.tokens_per_second(),
                        "generated_tokens": clock.tokens, "generation_seconds": round(clock.seconds, 3),
                        "placement": placement(model), "peak_rss_gb": peak_rss_gb()}}


def placement(model) -> dict:
    """Parameters per device (as accelerate spread them) and each GPU's peak memory, in GB."""
    import torch

    # accelerate leaves CPU-offloaded weights on the meta device; its device map says where they live.
    device_map = getattr(model, "hf_device_map", None) or {}
    counts: dict[str, int] = {}
    for name, parameter in model.named_parameters():
        owner = max((m for m in device_map if name == m or name.startswith(m + ".") or m == ""), key=len, default=None)
        device = str(device_map[owner]) if owner is not None else str(parameter.device)
        device = f"cuda:{device}" if device.isdigit() else device
        counts[device] = counts.get(device, 0) + parameter.numel()
    found: dict = {"parameters": counts}
    if torch.cuda.is_available():
        found["gpu_peak_gb"] = {f"cuda:{i}": round(torch.cuda.max_memory_allocated(i) / 1e9, 2)
                                for i in range(torch.cuda.device_count())}
    return found


def summary_lines(report: dict) -> list[str]:
    """The terminal summary of `--verify`: one line per prompt, problem and warning, then the verdict."""
    lines = []
    for result in report["prompts"] + report["probes"]:
        status = "ok  " if result["ok"] else "FAIL"
        lines.append(f"{status} {result['prompt'][:30]!r} -> {result['answer'][:60]!r} {result['failures'] or ''}")
    lines += [f"FAIL {problem}" for problem in report["integrity"]["problems"] + report["serving"]["problems"]]
    lines += [f"WARN {warning}" for warning in report["serving"]["warnings"]]
    lines.append("verification passed" if report["ok"] else "verification FAILED")
    return lines


def run_verify(loader: ModuleType, *, device: str, max_memory: str | None, files_checked: bool,
               report_path: Path | None, answer_logits: Path | None = None) -> int:
    """`python load.py --verify`: check, print the summary, write the report; exit status 0 or 3."""
    report = verify(loader, device=device, max_memory=loader.parse_max_memory(max_memory), files_checked=files_checked,
                    answer_logits=answer_logits)
    if report_path:
        report_path.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print("\n".join(summary_lines(report)))
    return 0 if report["ok"] else 3
