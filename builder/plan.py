"""The build plan as data: every adapter tensor matched to a base tensor, every output tensor and file, before any
math."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from builder.adapter_compose import (
    Concatenation,
    WeightedAdapter,
    concatenation,
    match_adapters,
    tokenizer_adapter,
)
from builder.adapter_match import TIED_HEAD, AdapterMatch, LoraDelta, TokenRows, tied_embedding_name
from builder.chat import refuse_runaway_spec_template
from builder.dtypes import FLOAT32, OUTPUT_DTYPES, Dtype
from builder.errors import SourceError
from builder.gguf_facts import estimated_gguf_bytes, refuse_unexportable, source_gguf_type
from builder.refusals import (
    refuse_chatless,
    refuse_oversized_tokenizer,
    refuse_unpackageable,
    refuse_unservable_lora,
)
from builder.runtimes import vllm_max_lora_rank
from builder.safetensors_io import TensorEntry, TensorLocation
from builder.sources import AdapterCheckpoint, BaseModelFolder, TokenizerFolder, code_files
from builder.spec import Spec
from builder.verification_cost import VerificationCost, verification_cost

# The disk-space bound for what is written after the plan: fourteen small files (configs, chat template, card,
# requirements, manifest, report, index, the runtime's two files and its facts), well under 1 MB together.
RENDERED_FILES, RENDERED_BYTES, FILESYSTEM_BLOCK = 14, 1 << 20, 4096


@dataclass(frozen=True)
class TensorPlan:
    """One output tensor: where it comes from, its output dtype, and the deltas merged into it."""

    name: str
    source: TensorLocation
    out_dtype: Dtype
    deltas: tuple[LoraDelta, ...] = ()
    token_rows: TokenRows | None = None
    # The spec composes several adapters: the LoRA updates are summed in float32 and rounded once (an embedding's
    # too, which peft's merge of a single adapter rounds twice); DoRA keeps its own merge.
    summed: bool = False

    @property
    def action(self) -> Literal["copy", "cast", "merge"]:
        if self.deltas or self.token_rows:
            return "merge"
        return "copy" if self.source.dtype == self.out_dtype else "cast"

    @property
    def entry(self) -> TensorEntry:
        return TensorEntry(self.name, self.out_dtype, self.source.shape)


@dataclass(frozen=True)
class ShardPlan:
    filename: str
    tensors: tuple[TensorPlan, ...]

    @property
    def nbytes(self) -> int:
        return sum(t.entry.nbytes for t in self.tensors)


@dataclass(frozen=True)
class FileCopy:
    """A side file copied byte for byte into the bundle."""

    source: Path
    dest: str
    role: Literal["tokenizer", "remote code", "license", "adapter weights"]


@dataclass(frozen=True)
class BuildPlan:
    """Everything the build will write, decided from headers and configs alone."""

    spec: Spec
    spec_file: Path
    base: BaseModelFolder
    adapters: tuple[WeightedAdapter, ...]
    out_dtype: Dtype
    shards: tuple[ShardPlan, ...]
    copies: tuple[FileCopy, ...]
    untie_embeddings: bool = False
    vocab_size: int | None = None
    warnings: tuple[str, ...] = field(default=())
    # a bound for the GGUF export's files (export.gguf), and the 16-bit GGUF the quantized ones are made from when it
    # is not shipped (written beside the bundle while it builds, on the same disk)
    gguf_bytes: int = 0
    # As asked (output.merge_device, or build's --merge-device); weights.merge_device_for resolves it on this machine.
    merge_device: Literal["cpu", "cuda", "auto"] = "cpu"
    # Separate mode with several adapters: the one adapter the bundle ships, their concatenation.
    concatenation: Concatenation | None = None
    tokenizer: TokenizerFolder | None = None  # the spec's tokenizer.path, read


    @property
    def mode(self) -> str:
        return self.spec.output.mode

    @property
    def code_files(self) -> tuple[Path, ...]:
        """Python files shipped in the bundle that loading runs (trust_remote_code)."""
        return code_files(self.base, self.tokenizer or self.tokenizer_adapter)

    @property
    def tokenizer_adapter(self) -> AdapterCheckpoint | None:
        """The adapter whose saved tokenizer the bundle ships (else tokenizer.path's or the base's)."""
        return None if self.tokenizer else tokenizer_adapter(self.adapters)

    @property
    def weight_bytes(self) -> int:
        return sum(s.nbytes for s in self.shards)

    @property
    def disk_needed(self) -> int:
        """Every file the bundle will hold: weights, copies, and a bound for the files rendered later (load.py,
        card, configs, manifest, index, report, shard headers), plus a block of rounding per file."""
        gguf = self.spec.export.gguf
        files = len(self.shards) + len(self.copies) + RENDERED_FILES + (len(gguf.types) if gguf else 0)
        copies = sum(c.source.stat().st_size for c in self.copies)
        adapter = self.concatenation.nbytes if self.concatenation else 0
        return self.weight_bytes + copies + adapter + self.gguf_bytes + RENDERED_BYTES + files * FILESYSTEM_BLOCK

    @property
    def merged_tensors(self) -> list[TensorPlan]:
        return [t for s in self.shards for t in s.tensors if t.action == "merge"]

    @property
    def verification_cost(self) -> VerificationCost:
        """What the build's verification will load and generate; the build always has the sources, so it
        compares."""
        verify = self.spec.verify
        return verification_cost(
            mode=self.mode, answers=len(verify.prompts) + len(verify.probes), max_new_tokens=verify.max_new_tokens,
            compare_base=verify.compare_base, equivalence=True,
            vocab_rows=self.vocab_size or self.base.config.get("vocab_size"),
            logits_itemsize=self.out_dtype.itemsize, adapters=len(self.adapters),
        )


def output_dtype(spec_dtype: str, base: BaseModelFolder) -> Dtype:
    """The spec's dtype, or with `auto` the base's own (its config, else its tensors' float dtype)."""
    if spec_dtype != "auto":
        return OUTPUT_DTYPES[spec_dtype]
    declared = base.config.get("torch_dtype") or base.config.get("dtype")
    if declared in OUTPUT_DTYPES:
        return OUTPUT_DTYPES[declared]
    # The most common one; a tie goes to the first in the base's tensors, whatever the process's string hashing.
    float_dtypes = Counter(t.dtype for t in base.tensors.values() if t.dtype.is_floating_point)
    return float_dtypes.most_common(1)[0][0] if float_dtypes else FLOAT32


def split_into_shards(
    tensors: list[TensorPlan], *, max_shard_size: int, prefix: str = "model"
) -> tuple[ShardPlan, ...]:
    """Fill shards in tensor order up to max_shard_size (a single larger tensor gets a shard of its own)."""
    groups: list[list[TensorPlan]] = [[]]
    size = 0
    for tensor in tensors:
        nbytes = tensor.entry.nbytes
        if groups[-1] and size + nbytes > max_shard_size:
            groups.append([])
            size = 0
        groups[-1].append(tensor)
        size += nbytes
    if len(groups) == 1:
        return (ShardPlan(f"{prefix}.safetensors", tuple(groups[0])),)
    total = len(groups)
    return tuple(
        ShardPlan(f"{prefix}-{i:05d}-of-{total:05d}.safetensors", tuple(group)) for i, group in enumerate(groups, 1)
    )


def plan_build(spec: Spec, base: BaseModelFolder, adapters: tuple[WeightedAdapter, ...], *,
               spec_file: Path, tokenizer: TokenizerFolder | None = None) -> BuildPlan:
    """Decide every tensor and file of the bundle; raises a ModelpackError for anything that cannot be packaged.
    `tokenizer` is the spec's tokenizer.path, read (sources.read_tokenizer_folder)."""
    refuse_unpackageable(spec, base, adapters, spec_file, tokenizer)
    # Separate mode too: the adapters must fit the base they ship with.
    match = match_adapters(base, adapters, mode=spec.output.mode)
    concat = concatenation(base, adapters, match) if spec.output.mode == "separate" and len(adapters) > 1 else None
    if spec.output.mode == "separate":
        refuse_unservable_lora(spec, concat.config if concat is not None else adapters[0].checkpoint.config,
                               tied_head=tied_embedding_name(base) is not None)
        match = AdapterMatch(deltas={}, replacements={}, token_rows={})
    out_dtype = output_dtype(spec.output.dtype, base)
    summed = len(adapters) > 1
    tensors = [_tensor_plan(name, location, match, out_dtype, summed=summed)
               for name, location in _in_file_order(base.tensors)]
    untie = _needs_untying(base, match)
    if untie:
        # A delta on one side of a tied pair must not reach the other: peft's merge writes it into the shared
        # matrix, which changes the input embeddings too (the merged model then answers differently from
        # base + adapter). The bundle stores the head as its own tensor instead and unties it in config.json.
        tied = tied_embedding_name(base)
        assert tied is not None  # _needs_untying is true only when the head is tied to an input embedding
        tensors.append(_tensor_plan(TIED_HEAD, base.tensors[tied], match, out_dtype, summed=summed))
    copies = _file_copies(spec, base, adapters, tokenizer)
    tokenizer_files = {c.dest: c.source for c in copies if c.role == "tokenizer"}
    refuse_chatless(spec, base, tokenizer_files, tokenizer or tokenizer_adapter(adapters))
    refuse_runaway_spec_template(tokenizer_files, template_file=spec.chat.template,
                                 prompts=[p.prompt for p in (*spec.verify.prompts, *spec.verify.probes)],
                                 system_prompt=spec.chat.system_prompt)
    vocab_size = _resized_vocabulary(base, tensors)
    if tokenizer is not None:
        refuse_oversized_tokenizer(tokenizer, base, vocab_size)
    refuse_unexportable(spec, base, tensor_names=[t.name for t in tensors], spec_file=spec_file,
                        tokenizer_files=tokenizer_files)
    return BuildPlan(
        spec=spec,
        spec_file=spec_file,
        base=base,
        adapters=adapters,
        out_dtype=out_dtype,
        shards=split_into_shards(tensors, max_shard_size=spec.output.max_shard_size),
        copies=copies,
        untie_embeddings=untie,
        vocab_size=vocab_size,
        warnings=_warnings(base, adapters, untie=untie, concat=concat, tokenizer=tokenizer),
        gguf_bytes=sum(estimated_gguf_bytes([t.source.shape for t in tensors], gguf_type)
                       for gguf_type in gguf_files_made(spec, out_dtype.name)),
        merge_device=spec.output.merge_device,
        concatenation=concat,
        tokenizer=tokenizer,
    )


def _file_copies(spec: Spec, base: BaseModelFolder, adapters: tuple[WeightedAdapter, ...],
                 tokenizer: TokenizerFolder | None) -> tuple[FileCopy, ...]:
    """The side files copied byte for byte: model code, licenses, the tokenizer (tokenizer.path's when given, else
    the checkpoint's when it saved one, else the base's), and in separate mode the adapter's weights (several
    adapters: their concatenation is written instead)."""
    copies = [FileCopy(p, p.name, "remote code") for p in base.remote_code_files]
    copies += [FileCopy(p, p.name, "license") for p in base.license_files]
    tokenizer_source = tokenizer or tokenizer_adapter(adapters) or base
    copies += [FileCopy(p, p.name, "tokenizer") for p in tokenizer_source.tokenizer_files]
    if spec.output.mode == "separate" and len(adapters) == 1:
        copies.append(FileCopy(adapters[0].checkpoint.weights_file, "adapter/adapter_model.safetensors",
                               "adapter weights"))
    return tuple(_dedupe(copies))


def _warnings(base: BaseModelFolder, adapters: tuple[WeightedAdapter, ...], *, untie: bool,
              concat: Concatenation | None, tokenizer: TokenizerFolder | None) -> tuple[str, ...]:
    warnings = []
    for weighted in adapters:
        recorded = weighted.checkpoint.config.get("base_model_name_or_path")
        if recorded and Path(recorded).name != base.path.name:
            warnings.append(
                f"{weighted.key} records base_model_name_or_path={recorded!r}, base.path is {base.path.name!r}; "
                "shapes match, so packaging goes on"
            )
    adapter = None if tokenizer else tokenizer_adapter(adapters)
    if adapter is not None:
        warnings.append(f"using the tokenizer saved in the adapter checkpoint ({adapter.path.name}), not the base's")
    if concat is not None and vllm_max_lora_rank(concat.rank) is None:
        warnings.append(f"the concatenated adapter has rank {concat.rank}, above the largest --max-lora-rank vLLM "
                        "accepts: peft loads it, vLLM cannot serve it as a LoRA (merge mode can)")
    if untie:
        warnings.append("the adapter changes one side of the tied embedding/lm_head pair: the bundle unties them")
    return tuple(warnings)


def _tensor_plan(name: str, location: TensorLocation, match: AdapterMatch, out_dtype: Dtype, *,
                 summed: bool) -> TensorPlan:
    replacement = match.replacements.get(name)
    source = replacement.location if replacement else location
    deltas = tuple(match.deltas.get(name, ()))
    return TensorPlan(
        name=name,
        source=source,
        out_dtype=out_dtype if location.dtype.is_floating_point else location.dtype,
        deltas=deltas,
        token_rows=match.token_rows.get(name),
        summed=summed and bool(deltas) and all(d.magnitude is None for d in deltas),
    )


def _needs_untying(base: BaseModelFolder, match: AdapterMatch) -> bool:
    tied = tied_embedding_name(base)
    if not tied or TIED_HEAD in base.tensors:
        return False
    head_replaced = TIED_HEAD in match.replacements and not match.replacements[TIED_HEAD].shared
    return head_replaced or TIED_HEAD in match.deltas or tied in match.deltas


def _resized_vocabulary(base: BaseModelFolder, tensors: list[TensorPlan]) -> int | None:
    """The new vocabulary size when the adapter saved resized embeddings; the head must agree with them."""
    embedding = tied_embedding_name(base) or next(
        (t.name for t in tensors if t.name.endswith(("embed_tokens.weight", "wte.weight"))), None
    )
    by_name = {t.name: t for t in tensors}
    if embedding is None or embedding not in by_name:
        return None
    rows = by_name[embedding].source.shape[0]
    if rows == base.tensors[embedding].shape[0]:
        return None
    head = by_name.get(TIED_HEAD)
    if head is not None and head.source.shape[0] != rows:
        raise SourceError(
            f"the adapter resizes {embedding} to {rows} rows but lm_head keeps {head.source.shape[0]}; "
            "save the adapter with both (peft's save_embedding_layers, or lm_head in modules_to_save)"
        )
    return rows


def _in_file_order(tensors: dict[str, TensorLocation]) -> list[tuple[str, TensorLocation]]:
    """Source order (file, then offset) keeps reads sequential, which is what makes streaming fast."""
    return sorted(tensors.items(), key=lambda item: (str(item[1].file), item[1].start))


def _dedupe(copies: list[FileCopy]) -> list[FileCopy]:
    """Later entries win for the same destination (a checkpoint's tokenizer code over the base's)."""
    by_dest = {c.dest: c for c in copies}
    return list(by_dest.values())


def gguf_files_made(spec: Spec, bundle_dtype: str) -> list[str]:
    """The GGUF types a build writes: those listed, and the 16-bit source of the quantized ones when not listed."""
    types: list[str] = list(spec.export.gguf.types) if spec.export.gguf is not None else []
    source = source_gguf_type(types, bundle_dtype)
    return types + ([source] if source is not None and source not in types else [])
