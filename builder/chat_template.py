"""Chat templates rendered as transformers renders them: its Jinja environment, rebuilt on jinja2 alone, and
within limits on time, output and memory (a template is the sender's code)."""

from __future__ import annotations

import functools
import json
import os
import resource
import select
import signal
import sys
import time
from datetime import datetime

import jinja2
import jinja2.exceptions
import jinja2.ext
import jinja2.nodes
import jinja2.parser
import jinja2.runtime
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

from builder.errors import SourceError

# transformers' environment is transformers.utils.chat_template_utils._compile_jinja_template (as of 5.25), reached
# only by importing transformers, and with it torch: seconds that `inspect` and `init` would pay for one rendering.
# This is the same environment, setting for setting; tests/test_chat_template.py renders real templates in both.


# Limits on one rendering of a chat template. The sandbox keeps a template from Python's internals but not from
# looping (two nested loops over range(100000) never call anything), building strings (`'x' * 10**9`, `s ~ s` in a
# loop) or recursing through macros. Real templates compile in 2-10 ms and render in 0.02 ms (Qwen2.5's with
# tools, Llama 3's), so the limits leave a hundredfold margin on a loaded machine and stop a hostile one fast.
RENDER_SECONDS = 2.0
RENDER_OUTPUT_CHARS = 1 << 20
# Address space a rendering may add to the process it runs in (Python's MemoryError past it).
RENDER_MEMORY_BYTES = 512 << 20
# Python frames a rendering may use beyond where it starts: a macro call costs about 7, so about 45 levels of
# macro recursion (a real template recurses over a tool's JSON schema, a few levels), well below the 1,000 frames
# Python allows transformers' own rendering in the verification process, so what passes here passes there.
RENDER_FRAMES = 300


class ChatTemplateError(Exception):
    """A chat template's own error (a syntax error, raise_exception, an undefined name called), raised by a rendering
    in a child process: `kind` is the name of the error's class there, the message its text."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


class ChatTemplateLimitError(SourceError):
    """A chat template that went past a rendering limit (exit 2): it names the template and the limit."""


class ChatTemplate:
    """A chat template compiled in transformers' environment: a sandbox that also refuses to change lists and dicts,
    trim_blocks and lstrip_blocks, loop controls, the `{% generation %}` tag, and the globals templates use
    (raise_exception, strftime_now, a `tojson` that writes JSON as json.dumps does, dict, namespace).

    Each rendering runs in a forked child process, killed after RENDER_SECONDS, with RENDER_MEMORY_BYTES more
    address space and RENDER_FRAMES more Python frames than its parent, its output counted as it is produced and
    stopped past RENDER_OUTPUT_CHARS: only a separate process can stop Python-level loops from any thread (a timer
    signal reaches the main thread only, and build renders in a worker thread) and bound the memory of a string
    built in one step. Past a limit it raises ChatTemplateLimitError naming `source`; a template's own error is
    a ChatTemplateError.
    """

    def __init__(self, text: str, source: str | None):
        self.text = text
        self.source = source

    def render(self, **context: object) -> str:
        if self.text in _over_limit:  # a second try would cost the same time again, and fail the same way
            raise self._past(_over_limit[self.text])
        try:  # a conversation rendered before (the plan's check, then the build's verification) is not forked again
            key: tuple[str, str] | None = (self.text, json.dumps(context, sort_keys=True))
        except TypeError:  # a callable in the context (serving's clock): not a value to remember by
            key = None
        if key in _rendered:
            return _rendered[key]
        outcome = _render_in_child(self.text, context)
        if "text" in outcome:
            _compiled(self.text)  # compiled within the limits there: the next children inherit it compiled
            if key is not None and len(_rendered) < _RENDERED_KEPT:
                _rendered[key] = outcome["text"]
            return outcome["text"]
        if "error" in outcome:
            raise ChatTemplateError(outcome["kind"], outcome["error"])
        _over_limit[self.text] = outcome["limit"]
        raise self._past(outcome["limit"])

    def _past(self, limit: str) -> ChatTemplateLimitError:
        where = f"{self.source}: the" if self.source else "The"
        return ChatTemplateLimitError(f"{where} chat template {_LIMITS[limit]}")


def compile_chat_template(template: str, *, source: str | None = None) -> ChatTemplate:
    """The chat template, to render within the limits in transformers' environment (see ChatTemplate); source
    names where it came from (a file) in errors."""
    return ChatTemplate(template, source)


_LIMITS = {
    "time": f"did not finish rendering within {RENDER_SECONDS:g} s, modelpack's limit for one rendering (real "
            "templates take milliseconds): a loop over a huge range, or recursion, would hang every runtime that "
            "renders it; fix the template",
    "output": f"rendered more than {RENDER_OUTPUT_CHARS:,} characters for one conversation, modelpack's limit "
              "(a real prompt is a few kB); fix the template",
    "memory": f"needed more than {RENDER_MEMORY_BYTES >> 20} MiB of memory for one rendering, modelpack's limit "
              "(a string built by repetition?); fix the template",
    "recursion": f"nests or recurses deeper than modelpack's limit of {RENDER_FRAMES} Python frames for one "
                 "rendering (macros calling themselves?); fix the template",
    "crash": "crashed the process that rendered it; fix the template",
}
# Templates that went past a limit in this process, text -> the limit (a key of _LIMITS).
_over_limit: dict[str, str] = {}
# Renderings this process made, (template, context as JSON) -> text: a fork costs 5-40 ms, a rendering 0.02 ms.
_rendered: dict[tuple[str, str], str] = {}
_RENDERED_KEPT = 1024


def _render_in_child(text: str, context: dict) -> dict:
    """One rendering in a forked child: {"text"}, or the template's {"error", "kind"}, or the {"limit"} passed."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: nothing here returns; it writes one JSON answer and exits at once
        try:
            os.close(read_end)
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C is the parent's to handle (it kills us)
            answer = _render_bounded(text, context)
        except BaseException:  # noqa: BLE001 - whatever went wrong, the parent gets an answer, not a second parent
            answer = {"limit": "crash"}
        try:
            payload = json.dumps(answer).encode("ascii")
        except BaseException:  # noqa: BLE001
            payload = b'{"limit": "memory"}'
        try:
            view = memoryview(payload)
            while view:
                view = view[os.write(write_end, view):]
        finally:
            os._exit(0)
    os.close(write_end)
    chunks: list[bytes] = []
    deadline = time.monotonic() + RENDER_SECONDS
    finished = False
    waiting = select.poll()  # not select.select: it refuses descriptors past 1,023, which a busy process may hold
    waiting.register(read_end, select.POLLIN)
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not waiting.poll(remaining * 1000):
                break
            chunk = os.read(read_end, 1 << 20)
            if not chunk:
                finished = True
                break
            chunks.append(chunk)
    finally:
        os.close(read_end)
        if not finished:
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    if not finished:
        return {"limit": "time"}
    try:
        answer = json.loads(b"".join(chunks))
    except ValueError:
        return {"limit": "crash"}
    return answer if isinstance(answer, dict) else {"limit": "crash"}


def _render_bounded(text: str, context: dict) -> dict:
    """In the child: render with the memory, frame and output limits (the parent keeps the time). Nothing here
    imports a module anew: another thread of the parent may have held an import lock when it forked."""
    try:
        with open("/proc/self/statm") as statm:
            used = int(statm.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        used = None
    if used is not None:
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        limit = used + RENDER_MEMORY_BYTES
        limit = min(limit, soft) if soft != resource.RLIM_INFINITY else limit
        limit = min(limit, hard) if hard != resource.RLIM_INFINITY else limit
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        compiled = _compiled(text)  # within Python's own limit, as transformers compiles it
        depth, frame = 0, sys._getframe()
        while frame.f_back is not None:
            depth, frame = depth + 1, frame.f_back
        sys.setrecursionlimit(depth + RENDER_FRAMES)
        parts, total = [], 0
        for part in compiled.generate(**context):
            total += len(part)
            if total > RENDER_OUTPUT_CHARS:
                return {"limit": "output"}
            parts.append(part)
        return {"text": "".join(parts)}
    except MemoryError:
        return {"limit": "memory"}
    except RecursionError:
        return {"limit": "recursion"}
    except Exception as error:  # noqa: BLE001 - the template's own error, for the caller to judge
        return {"error": str(error), "kind": type(error).__name__}


@functools.lru_cache(maxsize=32)
def _compiled(text: str) -> jinja2.Template:
    return _environment().from_string(text)


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks the assistant's part (for transformers' assistant masks);
    rendering gives its body unchanged."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: jinja2.runtime.Macro) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: object, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    """Jinja's own tojson escapes HTML characters (`<` as \\u003c), which would change the prompt."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


class _TemplateDict:
    """`dict(...)` and `dict.fromkeys(...)` for templates, without the type itself (no type tricks from there)."""

    def __call__(self, *args, **kwargs) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """Jinja's namespace, refusing attribute names that start with an underscore (no way to CPython internals)."""

    def __init__(*args, **kwargs) -> None:  # Jinja's own signature, so that namespace(self=...) works too
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: object) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: object) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"Chat templates cannot store underscore-prefixed attributes on a namespace, but got {name!r}. "
                "Please rename the attribute."
            )


@functools.cache
def _environment() -> ImmutableSandboxedEnvironment:
    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = _strftime_now
    environment.globals["dict"] = _TemplateDict()
    environment.globals["namespace"] = _TemplateNamespace
    return environment
