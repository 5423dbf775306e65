"""Hand-over to serving runtimes: the Ollama Modelfile and the card's serving commands, from what the bundle holds."""

from __future__ import annotations

import json
import shlex
import textwrap
from collections.abc import Callable
from dataclasses import dataclass

from builder.chat import QWEN_V1_DEFAULT_SYSTEM, ChatFacts
from builder.chat_template import compile_chat_template
from builder.errors import SpecError
from builder.runtimes import VLLM_MAX_LORA_RANKS, vllm_max_lora_rank
from builder.tokenizer_files import TEMPLATE_TOKEN_KEYS

# What the probes' renderings get for today's date (transformers' strftime_now): a prompt holding it changes daily,
# which a Modelfile's fixed text cannot follow.
CLOCK_MARK = "MODELPACK_TODAY"

Message = dict[str, str]
# Conversations the bundle's chat template is rendered for, to learn which prompt format it writes. Contents
# carry no leading or trailing whitespace (templates that trim messages agree on them), a line break and non-ASCII
# text; the last one ends with an assistant message that the prompt continues (Ollama's prefill).
PROBES: tuple[tuple[Message, ...], ...] = (
    ({"role": "user", "content": "Hello"},),
    ({"role": "system", "content": "Be brief."}, {"role": "user", "content": "你好，\n请问？"}),
    ({"role": "system", "content": "S"}, {"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
     {"role": "user", "content": "Q2"}),
    ({"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1\nA2"}, {"role": "user", "content": "Q2"}),
    ({"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"},
     {"role": "assistant", "content": "The answer is"}),
)


@dataclass(frozen=True)
class RoleBlocks:
    """A prompt format in which each message is `head(role) + content + close` and a reply opens with
    head("assistant") (ChatML, Llama 3)."""

    name: str
    head_start: str
    head_end: str
    close: str
    # Where the runtime's tokenizer adds a BOS token itself, the Jinja template's leading bos_token is not text.
    runtime_adds_bos: bool
    trims_messages: bool = False  # the Jinja template strips whitespace around each message's text
    caveats: tuple[str, ...] = ()

    def head(self, role: str) -> str:
        return f"{self.head_start}{role}{self.head_end}"


CHATML = RoleBlocks("ChatML", "<|im_start|>", "\n", "<|im_end|>\n", runtime_adds_bos=False)
LLAMA3 = RoleBlocks(
    "Llama 3", "<|start_header_id|>", "<|end_header_id|>\n\n", "<|eot_id|>", runtime_adds_bos=True, trims_messages=True,
    caveats=("Llama 3's Jinja template trims whitespace around each message and Ollama's template language cannot "
             "(it has no trim), so a message that begins or ends with whitespace keeps it under Ollama",
             "the template's leading <|begin_of_text|> is left to llama.cpp, which adds it when tokenizing",
             "SYSTEM is written trimmed, as the template would trim it"),
)
FORMATS = (CHATML, LLAMA3)


@dataclass(frozen=True)
class OllamaTemplate:
    """The bundle's prompt format in Ollama's Go template language, or why there is none."""

    format: str | None  # "ChatML", "Llama 3"; None when no faithful translation exists
    template: str | None
    default_system: str | None  # the system message the format inserts when a conversation has none
    notes: tuple[str, ...]  # caveats of the translation, or the reason there is none
    trims_messages: bool = False  # the Jinja template strips each message, so SYSTEM is written stripped


def format_prompt(blocks: RoleBlocks, messages: list[Message] | tuple[Message, ...], *,
                  default_system: str | None) -> str:
    """The prompt a RoleBlocks format gives, as Ollama asks for it: a generation prompt after a message that is
    not the assistant's, and a final assistant message left open so the reply continues it."""
    parts = []
    if default_system is not None and messages[0]["role"] != "system":
        parts.append(blocks.head("system") + default_system + blocks.close)
    for i, message in enumerate(messages):
        last = i == len(messages) - 1
        parts.append(blocks.head(message["role"]) + message["content"])
        if not (last and message["role"] == "assistant"):
            parts.append(blocks.close)
    if messages[-1]["role"] != "assistant":
        parts.append(blocks.head("assistant"))
    return "".join(parts)


def go_template(blocks: RoleBlocks, *, default_system: str | None) -> str:
    """format_prompt in Ollama's template language: over `.Messages` (Ollama passes the system message, the
    Modelfile's SYSTEM included, as the first message), `$last` for the open final assistant message."""
    default = ""
    if default_system is not None:
        text = default_system if "{{" not in default_system else "{{ " + _go_string(default_system) + " }}"
        default = ('{{- if and (eq $i 0) (ne .Role "system") }}'
                   f'{blocks.head("system")}{text}{blocks.close}{{{{ end }}}}\n')
    return (
        "{{- range $i, $_ := .Messages }}\n"
        f"{default}"
        "{{- $last := eq (len (slice $.Messages $i)) 1 }}"
        f"{blocks.head_start}{{{{ .Role }}}}{blocks.head_end}{{{{ .Content }}}}\n"
        f'{{{{- if or (ne .Role "assistant") (not $last) }}}}{blocks.close}{{{{ end }}}}\n'
        f'{{{{- if and $last (ne .Role "assistant") }}}}{blocks.head("assistant")}{{{{ end }}}}\n'
        "{{- end }}"
    )


def _go_string(text: str) -> str:
    """A Go interpreted string literal (JSON's string syntax is a subset of Go's)."""
    return json.dumps(text, ensure_ascii=False)


def jinja_prompt(render: Callable[..., str], messages: list[Message] | tuple[Message, ...]) -> str:
    """What the Jinja chat template gives for the prompt Ollama builds: with the generation prompt, or, after a
    final assistant message, that message continued (transformers' continue_final_message)."""
    if messages[-1]["role"] != "assistant":
        return render(messages=list(messages), add_generation_prompt=True)
    text = render(messages=list(messages), add_generation_prompt=False)
    final = messages[-1]["content"].strip()
    if final not in text:
        raise ValueError("the chat template drops the final assistant message")
    return text[: text.rindex(final) + len(final)]


def ollama_template(chat: ChatFacts, generation: dict) -> OllamaTemplate:
    """The Ollama TEMPLATE that gives the prompt the bundle's own chat gives, decided by rendering the bundle's
    chat template for PROBES and comparing with each known format; None (with the reason) when none matches."""
    if chat.template is None:
        if generation.get("chat_format") == "chatml" and chat.end_of_turn_token == CHATML.close.strip():
            return OllamaTemplate(
                CHATML.name, go_template(CHATML, default_system=QWEN_V1_DEFAULT_SYSTEM), QWEN_V1_DEFAULT_SYSTEM,
                ("the model's own chat code (make_context) writes text inside messages as plain text and drops "
                 "old turns past 6144 tokens; Ollama reads special tokens inside messages and keeps the turns that "
                 "fit its num_ctx",),
            )
        return OllamaTemplate(None, None, None, (
            "the bundle has no chat template and its chat format is not one modelpack can translate",))
    render = _TemplateRenderer(chat)
    try:
        dated = any(CLOCK_MARK in jinja_prompt(render, p) for p in PROBES)
    except Exception:
        dated = False
    if dated:
        return OllamaTemplate(None, None, None, (
            "the chat template writes today's date into the prompt, which a Modelfile's fixed template cannot",))
    for blocks in FORMATS:
        try:
            default_system = _default_system(blocks, render)
            matches = all(render.expected(blocks, p) == format_prompt(blocks, p, default_system=default_system)
                          for p in PROBES)
        except Exception:  # a template may refuse a probe (roles that must alternate, no system role)
            continue
        if matches:
            text = go_template(blocks, default_system=default_system)
            if modelfile_problem(text) is None:
                return OllamaTemplate(blocks.name, text, default_system, blocks.caveats, blocks.trims_messages)
            return OllamaTemplate(None, None, None, (
                f"the chat template is {blocks.name}, but its text cannot be written in a Modelfile: "
                f"{modelfile_problem(text)}",))
    return OllamaTemplate(None, None, None, (
        "the chat template writes a prompt format that modelpack cannot translate to Ollama's template language "
        f"faithfully (it knows {', '.join(b.name for b in FORMATS)})",))


class _TemplateRenderer:
    """The bundle's chat template in transformers' own template environment, with its token variables."""

    def __init__(self, chat: ChatFacts):
        assert chat.template is not None
        self.compiled = compile_chat_template(chat.template)
        self.tokens = {}
        for key in TEMPLATE_TOKEN_KEYS:
            value = (chat.tokenizer_config or {}).get(key)
            value = value.get("content") if isinstance(value, dict) else value
            if isinstance(value, str):
                self.tokens[key] = value

    def __call__(self, **kwargs) -> str:
        return self.compiled.render(**kwargs, **self.tokens, strftime_now=lambda _format: CLOCK_MARK)

    def expected(self, blocks: RoleBlocks, messages: tuple[Message, ...]) -> str:
        """The template's prompt, less a leading BOS token that the runtime adds itself for this format."""
        text = jinja_prompt(self, messages)
        bos = self.tokens.get("bos_token")
        return text[len(bos):] if blocks.runtime_adds_bos and bos and text.startswith(bos) else text


def _default_system(blocks: RoleBlocks, render: _TemplateRenderer) -> str | None:
    """The system message the template inserts into a conversation that has none, if any."""
    text = render.expected(blocks, PROBES[0])
    opening = blocks.head("system")
    if not text.startswith(opening) or blocks.close not in text:
        return None
    return text[len(opening):text.index(blocks.close)]


def stop_tokens(chat: ChatFacts, generation: dict) -> tuple[list[str], list[int]]:
    """The end-of-turn token and the names of generation_config.json's eos ids; and the eos ids that the
    tokenizer files do not name (the model's own code defines them: Qwen-v1)."""
    names = {token_id: token for token, token_id in chat.special_ids.items()}
    eos = generation.get("eos_token_id")
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
    stops = [chat.end_of_turn_token] if chat.end_of_turn_token else []
    unnamed = []
    for token_id in eos_ids:
        if token_id in names:
            stops.append(names[token_id])
        elif token_id != chat.end_of_turn_id:
            unnamed.append(token_id)
    return list(dict.fromkeys(stops)), unnamed


def sampling_parameters(generation: dict) -> tuple[list[tuple[str, object]], str]:
    """Ollama PARAMETERs that decode as the bundle's generation_config.json does, and the comment saying how.

    Every value is written, defaults included: Ollama's own defaults (temperature 0.8, top_k 40, top_p 0.9,
    repeat_penalty 1.1) differ from transformers' (1.0, 50, 1.0, 1.0) and would change the answers.
    """
    penalty = generation.get("repetition_penalty", 1.0)
    if not generation.get("do_sample", False):
        # temperature 0 makes Ollama pick the most likely token (its greedy path), which is what transformers'
        # do_sample=false does; top_k 1 would reach the same token through the sampler and its random state.
        parameters: list[tuple[str, object]] = [("temperature", 0)]
        comment = ("generation_config.json decodes greedily (do_sample false): temperature 0 is Ollama's greedy "
                   "decoding (top_k 1 would reach the same token through the sampler)")
    else:
        parameters = [("temperature", generation.get("temperature", 1.0)), ("top_p", generation.get("top_p", 1.0)),
                      ("top_k", generation.get("top_k", 50))]
        comment = ("generation_config.json samples (do_sample true): its values, transformers' defaults for those "
                   "it leaves out")
    parameters.append(("repeat_penalty", penalty))
    if penalty != 1.0:
        parameters.append(("repeat_last_n", -1))  # transformers penalises the whole context, Ollama the last 64
    if generation.get("max_new_tokens"):
        parameters.append(("num_predict", generation["max_new_tokens"]))
    return parameters, comment


def modelfile_problem(text: str) -> str | None:
    """Why `text` cannot be a triple-quoted Modelfile value, or None.

    Ollama's parser (parser/parser.go) drops characters that are not printable (every Unicode space but ' ', and
    control characters but tab and line ends), and ends a triple-quoted value at the first line end that follows
    three quotes.
    """
    for character in text:
        if not character.isprintable() and character not in "\t\r\n":
            return f"Ollama's Modelfile parser drops the character U+{ord(character):04X}"
    for i, character in enumerate(text):
        if character in "\r\n" and text[:i].rstrip().endswith('"""'):
            return 'a line ends with """, which ends a Modelfile value early'
    return None


def modelfile_value(text: str) -> str:
    """A Modelfile value: bare when Ollama's parser reads it back as it is, else in triple quotes."""
    if text and text == text.strip() and "\n" not in text and "\r" not in text and not text.startswith('"'):
        return text
    return f'"""{text}"""'


def gguf_file_name(name: str, gguf_type: str) -> str:
    """The GGUF export's file name in the bundle's gguf/ folder (the spec's export.gguf.types)."""
    return f"{name}-{gguf_type}.gguf"


def variant_modelfile_name(gguf_type: str) -> str:
    """The Modelfile of a GGUF type after the first, beside gguf/Modelfile (which serves the first)."""
    return f"Modelfile.{gguf_type}"


def render_modelfile(*, name: str, gguf_type: str, template: OllamaTemplate, chat: ChatFacts, generation: dict,
                     system_prompt: str | None, modelpack_version: str, license: str = "other",
                     context_length: int | None = None, variant: bool = False) -> str:
    """gguf/Modelfile: the first GGUF export with the bundle's license id, prompt format, system prompt, stops,
    sampling and context length; with variant, gguf/Modelfile.<type>, the same for another type."""
    created = f"{name}:{gguf_type} -f {variant_modelfile_name(gguf_type)}" if variant else f"{name} -f Modelfile"
    lines = [
        f"# Ollama Modelfile for {name}, written by modelpack {modelpack_version}.",
        f"# ollama create {created}   (FROM is relative to this file's folder)",
        f"FROM ./{gguf_file_name(name, gguf_type)}",
        "",
        "# The model card's license id (README.md's front matter).",
        f"LICENSE {modelfile_value(license)}",
        "",
    ]
    if template.template is not None:
        origin = "chat template" if chat.template is not None else "model's own chat code"
        lines += [f"# The bundle's {origin} ({template.format}) in Ollama's template language: the same prompt,",
                  "# byte for byte. Ollama passes SYSTEM as the first message when a request has no system message.",
                  *_comment(*(f"Note: {note}." for note in template.notes)),
                  f'TEMPLATE """{template.template}"""', ""]
    else:
        lines += [*_comment("No TEMPLATE: " + "; ".join(template.notes) + ".",
                            "Ollama then picks a template from the GGUF's embedded chat template itself."), ""]
    if system_prompt and template.trims_messages:
        system_prompt = system_prompt.strip()  # the prompt the chat template makes of it; Ollama could not strip it
    if system_prompt:
        problem = modelfile_problem(system_prompt)
        if problem:
            raise SpecError(f"chat.system_prompt cannot be written into gguf/Modelfile: {problem}; "
                            "change the system prompt or remove export.gguf from the spec")
        lines += ["# The spec's chat.system_prompt, the default system message as in load.py's chat().",
                  f"SYSTEM {modelfile_value(system_prompt)}", ""]
    stops, unnamed = stop_tokens(chat, generation)
    lines.append("# Stop at the end-of-turn token and at every eos token of generation_config.json.")
    if unnamed:
        lines += _comment(f"eos id(s) {', '.join(map(str, unnamed))} have no name in the tokenizer files; llama.cpp "
                          "stops at the GGUF's own end-of-generation tokens.")
    lines += [f"PARAMETER stop {modelfile_value(stop)}" for stop in stops]
    if context_length:
        lines += _comment(f"The model's context ({context_length} tokens, config.json): Ollama's default num_ctx "
                          "(2048 or 4096 by version) would silently cut longer conversations. Lower it where memory is "
                          "short (the card's Memory section gives the cache per token).")
        lines.append(f"PARAMETER num_ctx {context_length}")
    parameters, comment = sampling_parameters(generation)
    lines += _comment(comment + ".")
    lines += [f"PARAMETER {key} {value:g}" if isinstance(value, float) else f"PARAMETER {key} {value}"
              for key, value in parameters]
    return "\n".join(lines) + "\n"


def _comment(*paragraphs: str) -> list[str]:
    return [f"# {line}" for paragraph in paragraphs for line in textwrap.wrap(paragraph, 110)]


@dataclass(frozen=True)
class ServedBundle:
    """What the serving commands depend on."""

    # The spec's name: the served model's name, the GGUF files', and the bundle folder's in the commands. Not the
    # output folder's, which a build may name otherwise: the bundle's bytes depend only on its inputs.
    name: str
    mode: str  # "merge" | "separate"
    trust_remote_code: bool
    has_chat_template: bool
    max_lora_rank: int
    gguf_files: list[str]  # file names in gguf/, the Modelfile's first
    gguf_has_chat_template: bool  # tokenizer.chat_template is in the GGUF files
    has_modelfile: bool
    context_length: int | None  # config.json's positions: the servers' --max-model-len / -c
    max_new_tokens: int | None  # generation_config.json's, which vLLM makes every request's default max_tokens
    system_prompt: str | None  # the spec's chat.system_prompt, sent by the example request
    example_prompt: str  # the first verification prompt: the example request asks it
    tensor_parallel_size: int | None = None  # verify.vllm_tensor_parallel_size: the GPUs vLLM splits the model over


@dataclass(frozen=True)
class ServingCommand:
    runtime: str
    command: str | None  # run from the folder that holds the bundle; None when the runtime cannot serve it
    notes: list[str]
    port: int | None = None  # where it listens (the runtime's own default, written out in the command)
    model: str | None = None  # the `model` of a request, as the server names the bundle (or its adapter)
    health: str | None = None  # a command that exits 0 once the server is ready
    request: str | None = None  # a curl of its OpenAI-compatible /v1/chat/completions


def chat_request(model: str, bundle: ServedBundle) -> dict:
    """An OpenAI chat-completions request body: the bundle's system prompt, its first verification prompt, and
    max_tokens said outright (vLLM would otherwise take generation_config.json's max_new_tokens as the limit)."""
    system = [{"role": "system", "content": bundle.system_prompt}] if bundle.system_prompt else []
    return {"model": model, "messages": [*system, {"role": "user", "content": bundle.example_prompt}],
            "max_tokens": max(bundle.max_new_tokens or 0, 512)}


def _curl(port: int, model: str, bundle: ServedBundle) -> str:
    body = json.dumps(chat_request(model, bundle), ensure_ascii=False)
    return (f"curl -s http://localhost:{port}/v1/chat/completions -H 'Content-Type: application/json' "
            f"-d {shlex.quote(body)}")


def _health(port: int, path: str = "/health") -> str:
    return f"curl -sf http://localhost:{port}{path}"


def vllm_arguments(folder: str, *, name: str, separate: bool, max_lora_rank: int, context_length: int | None,
                   trust_remote_code: bool, port: int = 8000) -> list[str] | None:
    """What follows `vllm serve` in the card's command, the model folder first: the card prints them (folder
    ./NAME, port 8000) and verification's serving stage runs them (the bundle's folder, a free port, a shorter
    context). In separate mode requests name the adapter `name`, and the base alone answers as name-base. None
    where vLLM cannot serve the adapter as a LoRA (its rank is above every --max-lora-rank vLLM accepts)."""
    served_as = f"{name}-base" if separate else name
    arguments = [folder, "--served-model-name", served_as, "--port", str(port)]
    arguments += ["--max-model-len", str(context_length)] if context_length else []
    arguments += ["--trust-remote-code"] if trust_remote_code else []
    if separate:
        rank = vllm_max_lora_rank(max_lora_rank)
        if rank is None:
            return None
        arguments += ["--enable-lora", "--lora-modules", f"{name}={folder}/adapter", "--max-lora-rank", str(rank)]
    return arguments


def serving_commands(bundle: ServedBundle) -> list[ServingCommand]:
    """The command line of each runtime that can serve the bundle, run from the folder that holds it."""
    name, folder = bundle.name, f"./{bundle.name}"
    remote = " --trust-remote-code" if bundle.trust_remote_code else ""
    separate = bundle.mode == "separate"
    template_note = ([] if bundle.has_chat_template else [
        "the bundle has no chat template: the chat endpoint needs one for the model's format "
        "(`--chat-template FILE`); the completions endpoint works without"])
    commands = []

    # Separate mode: requests name the adapter `name`; the base alone answers as name-base.
    served_as = f"{name}-base" if separate else name
    arguments = vllm_arguments(folder, name=name, separate=separate, max_lora_rank=bundle.max_lora_rank,
                               context_length=bundle.context_length, trust_remote_code=bundle.trust_remote_code)
    if arguments is not None and bundle.tensor_parallel_size:
        arguments += ["--tensor-parallel-size", str(bundle.tensor_parallel_size)]
    vllm = "vllm serve " + shlex.join(arguments) if arguments is not None else None
    vllm_notes = ["vLLM reads `generation_config.json` for its default sampling and stop tokens "
                  "(`--generation-config vllm` ignores it)", *template_note]
    if bundle.max_new_tokens:
        vllm_notes.insert(0, f"vLLM makes `generation_config.json`'s `max_new_tokens` ({bundle.max_new_tokens}) the "
                             "default `max_tokens` of every request that gives none, so answers stop there: send "
                             "`max_tokens` (the example does), or start it with `--override-generation-config "
                             "'{\"max_new_tokens\": N}'`")
    if separate:
        rank = vllm_max_lora_rank(bundle.max_lora_rank)
        if rank is None:
            vllm_notes.insert(0, f"vLLM cannot serve this adapter as a LoRA: its rank {bundle.max_lora_rank} is "
                                 f"above {VLLM_MAX_LORA_RANKS[-1]}, the largest --max-lora-rank vLLM accepts; "
                                 "build with `mode: merge` to serve it")
        else:
            vllm_notes.insert(0, f"requests name the model `{name}` to use the adapter (rank {bundle.max_lora_rank}, "
                                 f"served with --max-lora-rank {rank}, the smallest vLLM accepts that holds it)")
    commands.append(ServingCommand("vLLM", vllm, vllm_notes, 8000, name, _health(8000), _curl(8000, name, bundle))
                    if vllm is not None else ServingCommand("vLLM", None, vllm_notes))

    sglang_context = f" --context-length {bundle.context_length}" if bundle.context_length else ""
    sglang = (f"python -m sglang.launch_server --model-path {folder} --served-model-name {served_as} --port 30000"
              f"{sglang_context}{remote}")
    if separate:
        sglang += f" --lora-paths {name}={folder}/adapter"
    commands.append(ServingCommand("SGLang", sglang, list(template_note), 30000, served_as, _health(30000),
                                   # SGLang selects a LoRA per request by its own field: the example asks the base.
                                   _curl(30000, served_as, bundle)))

    mounted = f"/data/{name}"
    tgi = (f"docker run --gpus all --shm-size 1g -p 8080:80 -v $PWD/{name}:{mounted} "
           f"ghcr.io/huggingface/text-generation-inference --model-id {mounted}{remote}")
    if separate:
        tgi += f" --lora-adapters {name}={mounted}/adapter"
    # TGI serves one model and ignores a request's model name, but takes it as the adapter's id for a LoRA.
    tgi_model = name if separate else "tgi"
    commands.append(ServingCommand("TGI", tgi, list(template_note), 8080, tgi_model, _health(8080),
                                   _curl(8080, tgi_model, bundle)))

    if bundle.gguf_files:
        if bundle.has_modelfile:
            commands.append(ServingCommand(
                "Ollama", f"ollama create {name} -f {folder}/gguf/Modelfile",
                ["`ollama serve` (or the Ollama app) listens on port 11434; `ollama run " + name + "` chats in the "
                 "terminal"] + [f"`gguf/{file}`: `ollama create {name}:{gguf_type} -f "
                                f"{folder}/gguf/{variant_modelfile_name(gguf_type)}`"
                                for file, gguf_type in _variants(bundle)[1:]],
                11434, name, _health(11434, "/api/version"), _curl(11434, name, bundle)))
        others = bundle.gguf_files[1:]
        llama_context = f" -c {bundle.context_length}" if bundle.context_length else ""
        commands.append(ServingCommand(
            "llama.cpp", f"llama-server -m {folder}/gguf/{bundle.gguf_files[0]} --jinja --alias {name} --port 8080"
                         f"{llama_context}",
            (["`--jinja` uses the chat template embedded in the GGUF file"] if bundle.gguf_has_chat_template else
             ["the GGUF file embeds no chat template: give one with `--chat-template-file FILE`"])
            + ([f"also exported: {', '.join(f'`gguf/{f}`' for f in others)}"] if others else []),
            8080, name, _health(8080), _curl(8080, name, bundle),
        ))
    return commands


def _variants(bundle: ServedBundle) -> list[tuple[str, str]]:
    """Each GGUF file in gguf/ with its type (files are named NAME-<type>.gguf), the Modelfile's first."""
    return [(file, file.removeprefix(f"{bundle.name}-").removesuffix(".gguf")) for file in bundle.gguf_files]
