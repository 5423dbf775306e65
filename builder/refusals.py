"""What stops a build before any tensor is matched or written: checks over the spec and the source folders, each a
user error naming the file or key and the fix."""

from __future__ import annotations

from pathlib import Path

from builder.adapter_compose import WeightedAdapter, tokenizer_adapter
from builder.errors import ModelpackError, OutputError, SourceError, SpecError
from builder.runtimes import vllm_lora_refusals
from builder.sources import AdapterCheckpoint, BaseModelFolder, TokenizerFolder, code_files, tokenizer_vocabulary_size
from builder.spec import Spec
from builder.tokenizer_files import tokenizer_declarations
from builder.trust import BUNDLE_RUNTIME


def refuse_unpackageable(spec: Spec, base: BaseModelFolder, adapters: tuple[WeightedAdapter, ...],
                         spec_file: Path, tokenizer: TokenizerFolder | None = None) -> None:
    """What stops a build before any tensor is matched: the base's kind, its code, the output's name, lengths,
    a missing tokenizer."""
    refuse_quantized_base(base)
    carrier = tokenizer or tokenizer_adapter(adapters)
    code = code_files(base, carrier)
    clashing = sorted({p.name for p in code} & set(BUNDLE_RUNTIME))
    if clashing:  # the bundle's own runtime would overwrite the model's file of the same name
        raise SourceError(f"base.path {base.path}: the model's own code has a file named {clashing[0]}, which is the "
                          "name of the bundle's loader; rename it in the model's code (and in what imports it)")
    if code and not spec.base.trust_remote_code:
        names = ", ".join(p.name for p in code)
        owner = f"base.path {base.path}"
        if isinstance(carrier, TokenizerFolder) and not base.remote_code_files:
            owner = f"tokenizer.path {carrier.path}"
        raise SourceError(
            f"{owner} ships its own model code ({names}); packaging it runs that code at load time. "
            "Read it, then set `base.trust_remote_code: true` in the spec."
        )
    if code:
        refuse_unimportable_folder_name(spec.output.dir)
    refuse_unusable_generation_length(spec, base, spec_file)
    if not base.tokenizer_files and carrier is None:
        # The seed's pitfall: merge_and_unload + save_pretrained writes weights and config but no tokenizer.
        raise SourceError(
            f"base.path {base.path} has no tokenizer files (tokenizer.json, tokenizer_config.json, vocab files) and "
            "neither has the checkpoint, as when the base was written by merge_and_unload + save_pretrained: set "
            "`tokenizer.path` in the spec to a folder that holds them (the original base model, or the checkpoint "
            "the trainer saved the tokenizer into)"
        )


def refuse_chatless(spec: Spec, base: BaseModelFolder, tokenizer: dict[str, Path],
                    carrier: AdapterCheckpoint | TokenizerFolder | None) -> None:
    """A bundle chats (load.py's chat(), verification, servers' chat endpoints): without a chat template, only a
    model whose own code builds its prompts (Qwen v1's model.chat()) can. Refused at plan time, not after the
    weights are written."""
    if spec.chat.template is not None or code_files(base, carrier):
        return
    if tokenizer_declarations(tokenizer).template is None:
        folder = next(iter(tokenizer.values())).parent
        raise SourceError(
            f"the tokenizer in {folder} has no chat template (chat_template in tokenizer_config.json, or "
            "chat_template.jinja), and the bundle's chat(), its verification and servers' chat endpoints need one: "
            "set `chat.template` in the spec to a .jinja file with the template the adapter was trained with"
        )


def refuse_oversized_tokenizer(tokenizer: TokenizerFolder, base: BaseModelFolder, vocab_size: int | None) -> None:
    """A tokenizer from elsewhere must fit the model: an id past the embedding's last row fails at the first use
    (an index error on CPU, a device assert on GPU), or silently reads another token's row if the rows are padded."""
    rows = vocab_size or base.config.get("vocab_size") or (base.config.get("text_config") or {}).get("vocab_size")
    defined = tokenizer_vocabulary_size(tokenizer.tokenizer_files)
    if type(rows) is not int or defined is None or defined[0] <= rows:
        return
    where = "the adapter's resized embedding" if vocab_size else f"vocab_size in {base.path / 'config.json'}"
    raise SourceError(
        f"tokenizer.path {tokenizer.path}: its tokenizer defines {defined[0]} token ids ({defined[1]}), but the "
        f"model's embedding has {rows} rows ({where}); point tokenizer.path at the tokenizer this base was "
        "trained with"
    )


# config.json keys under which model families record how many positions (prompt plus new tokens) they handle.
POSITION_LIMIT_KEYS = ("max_position_embeddings", "n_positions", "seq_length", "max_sequence_length")


def refuse_unusable_generation_length(spec: Spec, base: BaseModelFolder, spec_file: Path) -> None:
    """A max_new_tokens the base cannot reach (its positions hold the prompt too) is a spec error, not a surprise."""
    key = next((k for k in POSITION_LIMIT_KEYS if type(base.config.get(k)) is int), None)
    if key is None:
        return
    limit = base.config[key]
    for name, value in (("generation", spec.generation.max_new_tokens), ("verify", spec.verify.max_new_tokens)):
        if value is not None and value >= limit:
            raise SourceError(
                f"{spec_file}: {name}.max_new_tokens is {value}, but the base model handles at most {limit} positions "
                f"({key} in {base.path / 'config.json'}), prompt included; use at most {limit - 1}"
            )


def refuse_quantized_base(base: BaseModelFolder) -> None:
    """A quantized base (FP8, GPTQ, AWQ, bitsandbytes) stores weights that only make sense with their scales and
    its quantization_config: merging a delta into them, or casting them, would silently give another model."""
    quantization = base.config.get("quantization_config")
    if quantization:
        method = quantization.get("quant_method") if isinstance(quantization, dict) else quantization
        raise SourceError(
            f"base.path {base.path} is a quantized model (quantization_config: quant_method {method!r}); modelpack "
            "merges into full-precision weights: point base.path at the unquantized model"
        )


def refuse_unimportable_folder_name(folder: Path) -> None:
    """A bundle that ships model code must live in a folder whose name transformers 4.x can import it from.

    transformers < 4.57 imports remote code as the package `transformers_modules.<folder name>`, unsanitised, so a
    dot in the name splits the package and every relative import inside the model's code (Qwen-7B-Chat's
    `from .qwen_generation_utils import ...`) fails; other characters (spaces, hyphens, CJK) import fine.
    """
    if "." in folder.name:
        raise OutputError(
            f"output folder {folder.name!r} contains '.', and a bundle with remote code cannot: transformers 4.x "
            f"imports the model's code as the package transformers_modules.<folder name>, which a dot breaks; "
            f"name it e.g. {folder.name.replace('.', '-')!r}"
        )


def require_merge_device(requested: str) -> None:
    """Refuse, before any work, a merge device this machine does not have (output.merge_device: cuda)."""
    if requested != "cuda":
        return
    import torch  # only a spec that asks for a GPU pays for torch's import: only torch can say whether it sees one

    if not torch.cuda.is_available():
        raise ModelpackError(
            f"the merge device is cuda (output.merge_device or --merge-device), but torch {torch.__version__} sees "
            "no CUDA GPU on this machine; use cpu, or auto to merge on a GPU only where there is one"
        )


def refuse_unservable_lora(spec: Spec, config: dict, *, tied_head: bool) -> None:
    """verify.serve: [vllm] in separate mode with an adapter vLLM cannot load as a LoRA: vLLM's rule, and the fix
    (served merged, the adapter is part of the weights and every rule is moot)."""
    if spec.output.mode != "separate" or "vllm" not in spec.verify.serve:
        return
    rules = vllm_lora_refusals(config, tied_head=tied_head)
    if rules:
        raise SpecError(f"verify.serve: [vllm] with output.mode: separate: vLLM cannot serve this adapter as a LoRA "
                        f"({'; '.join(rules)}); serve it merged (`output.mode: merge`), or drop vllm from "
                        "verify.serve")
