"""Base models and tokenizers: hub ids, local directories, and rlkit's built-in tiny models.

A built-in model (`rlkit-tiny`, ...) is built by rlkit's own code from a fixed config and seed,
so no machine needs to download anything. Building is deterministic: the same spec gives the
same bytes. The result is cached under `$RLKIT_CACHE_DIR` (default `~/.cache/rlkit`) with a
checksum of every file; a cache entry whose checksums do not match is rebuilt, never trusted.
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    Qwen3Config,
    Qwen3ForCausalLM,
)
from transformers.utils import logging as hf_logging

from rlkit.api.errors import ModelNotFoundError, RlkitError
from rlkit.api.quant import QuantSpec
from rlkit.backend import attention, pretrained

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# The Qwen chat format: one `<|im_start|>role\n...<|im_end|>\n` block per message.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
BUILD_FORMAT = 1  # bump when the build procedure changes, so old caches are rebuilt


@dataclass(frozen=True)
class BuiltinSpec:
    """Shape of a built-in Qwen3-style model with a byte-level tokenizer."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int = 2048
    seed: int = 0

    def digest(self) -> str:
        blob = json.dumps({"format": BUILD_FORMAT, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


BUILTIN_MODELS: dict[str, BuiltinSpec] = {
    # ~0.13M parameters: unit tests and the first SFT tutorial.
    "rlkit-tiny": BuiltinSpec(64, 192, 2, 4, 2, 16),
    # ~1.8M parameters: small enough to train from scratch on 2 CPU cores.
    "rlkit-small": BuiltinSpec(192, 576, 4, 6, 2, 32),
}


def cache_dir() -> Path:
    """$RLKIT_CACHE_DIR, default ~/.cache/rlkit; an error naming the variable if it is not a
    directory rlkit can use."""
    path = Path(os.environ.get("RLKIT_CACHE_DIR", Path.home() / ".cache" / "rlkit")).expanduser()
    if path.exists() and not path.is_dir():
        raise RlkitError(
            f"RLKIT_CACHE_DIR={path} is a file, not a directory: point it at a directory "
            "(created if missing) where rlkit may keep built-in models and checkpoints"
        )
    return path


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level tokenizer: 3 special tokens, then one token per byte (any text encodes)."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *alphabet])}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(list(SPECIAL_TOKENS))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_model(spec: BuiltinSpec, vocab_size: int, tokenizer) -> Qwen3ForCausalLM:
    config = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        head_dim=spec.head_dim,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = Qwen3ForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def sha256_file(path: Path) -> str:
    """The SHA-256 of a file, read in blocks (checkpoints and GGUF files run to gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _checksums(directory: Path) -> dict[str, str]:
    return {
        p.name: sha256_file(p)
        for p in sorted(directory.iterdir())
        if p.is_file() and p.name != "rlkit_build.json"
    }


def _cache_is_valid(directory: Path) -> bool:
    manifest = directory / "rlkit_build.json"
    try:
        recorded = json.loads(manifest.read_text())["sha256"]
        return bool(recorded) and recorded == _checksums(directory)
    except (OSError, ValueError, KeyError, TypeError):
        return False


def builtin_path(name: str) -> Path:
    """Directory of the built-in model `name`, building (or rebuilding) it if needed."""
    spec = BUILTIN_MODELS[name]
    target = cache_dir() / "models" / f"{name}-{spec.digest()}"

    def build(staging: Path) -> dict:
        tokenizer = build_tokenizer()
        save_checkpoint(build_model(spec, len(tokenizer), tokenizer), tokenizer, staging)
        return {"name": name, "spec": asdict(spec)}

    return cached(target, build)


# Cache entries whose checksums this process has verified, with their files' sizes and times
# then (a 0.5 GB checkpoint takes a second to hash, and the tokenizer, config and weights each
# resolve the name): an entry whose files have not changed since is not hashed again.
_VERIFIED: dict[Path, tuple] = {}


def _stamp(directory: Path) -> tuple:
    try:
        return tuple(
            (p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(directory.iterdir())
        )
    except OSError:
        return ()


def cached(target: Path, build) -> Path:
    """`target`, a cache entry with a checksum of every file, made by `build(staging)` (which
    writes the files and returns what the entry records) unless it is there and intact; a
    corrupt or partial entry is rebuilt. One builder at a time, across processes (a run's
    processes share the cache): the others wait for it, then find the entry built."""
    if _VERIFIED.get(target) == _stamp(target) or _cache_is_valid(target):
        _VERIFIED[target] = _stamp(target)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _cache_is_valid(target):
            staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
            try:
                record = {**build(staging), "sha256": _checksums(staging)}
                (staging / "rlkit_build.json").write_text(
                    json.dumps(record, indent=2, sort_keys=True)
                )
                if target.exists():  # a corrupt or partial entry: replace it
                    shutil.rmtree(target)
                os.replace(staging, target)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    _VERIFIED[target] = _stamp(target)
    return target


def save_checkpoint(model: PreTrainedModel, tokenizer, directory: Path) -> None:
    """A transformers checkpoint of `model` and `tokenizer` in `directory`. Not
    model.save_pretrained: under torch.distributed it writes only on rank 0, and the process
    that builds a shared cache entry may be any rank. An output layer tied to the input
    embeddings is stored once, under the input embeddings' name, as transformers writes it:
    vLLM loads only that name for a tied model (with the output layer's name alone, it served a
    uniform distribution)."""
    state = dict(model.state_dict())
    output = tied_output(model)
    if output is not None:
        name = next(n for n, m in model.named_modules() if m is output)
        del state[f"{name}.weight"]
    state = {k: v.contiguous() for k, v in state.items()}
    save_file(state, directory / "model.safetensors", metadata={"format": "pt"})
    model.config.architectures = [type(model).__name__]
    model.config.dtype = next(model.parameters()).dtype
    model.config.save_pretrained(directory)
    model.generation_config.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def tied_output(model) -> torch.nn.Module | None:
    """The output layer of `model` (an adapter's wrapper looked through) when it shares its
    weight with the input embeddings (SmolLM2, Gemma), else None."""
    embeddings, output = model.get_input_embeddings(), model.get_output_embeddings()
    if hasattr(output, "get_base_layer"):
        output = output.get_base_layer()
    if embeddings is None or output is None or output.weight is not embeddings.weight:
        return None
    return output


def untie_embeddings(model) -> None:
    """Gives the input embeddings of `model` their own copy of a weight they share with the
    output layer, so that merging an adapter into the output layer leaves them as they are (the
    adapter does not change them); the config no longer says the two are tied."""
    if tied_output(model) is not None:
        embeddings = model.get_input_embeddings()
        embeddings.weight = torch.nn.Parameter(embeddings.weight.detach().clone(), False)
    if getattr(model.config, "tie_word_embeddings", False):
        model.config.tie_word_embeddings = False


def resolve(base_model: str) -> str:
    """What `from_pretrained` should be given for `base_model`: a built-in, a dir, or a hub id."""
    if not isinstance(base_model, str) or not base_model:
        raise ModelNotFoundError(f"base_model must be a non-empty string, got {base_model!r}")
    if base_model in BUILTIN_MODELS:
        return str(builtin_path(base_model))
    if base_model in pretrained.PRETRAINED or base_model.endswith(".gguf"):
        return str(pretrained.converted_path(base_model))
    looks_like_path = base_model.startswith(("/", "./", "../", "~"))
    if looks_like_path and not Path(base_model).expanduser().exists():
        # No hub id starts like this: fail now rather than after the hub's retries.
        raise ModelNotFoundError(_not_found_message(base_model, FileNotFoundError(base_model)))
    if looks_like_path:
        return str(Path(base_model).expanduser())
    _check_hub(base_model)
    return base_model


def _check_hub(repo_id: str) -> None:
    """A hub id that is not in the local cache is looked up once, without retries, so an
    unreachable hub or a wrong id fails in a second, not after a minute of retried downloads."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return  # from_pretrained reads the cache only, and fails at once
    from huggingface_hub import HfApi, try_to_load_from_cache

    if repo_id in _HUB_FOUND:  # resolve() runs for the tokenizer, config and weights alike
        return
    if not isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
        try:
            HfApi().model_info(repo_id, timeout=10)
        except Exception as exc:  # unreachable, not found, gated: from_pretrained would fail too
            raise ModelNotFoundError(_not_found_message(repo_id, exc)) from None
    _HUB_FOUND.add(repo_id)


# Hub ids found in the cache or on the hub by this process.
_HUB_FOUND: set[str] = set()


def load_tokenizer(base_model: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    source = resolve(base_model)
    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(_not_found_message(base_model, exc)) from exc


def load_config(base_model: str, trust_remote_code: bool = False):
    """The model's transformers config, without its weights."""
    try:
        return AutoConfig.from_pretrained(resolve(base_model), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(_not_found_message(base_model, exc)) from exc


def load_model(
    base_model: str,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
    quant: QuantSpec | None = None,
) -> PreTrainedModel:
    """The base model, in `dtype` on `device`; with `quant`, its linear layers (but the output
    layer) are quantized by bitsandbytes as they load."""
    source = resolve(base_model)
    quiet = base_model in BUILTIN_MODELS and hf_logging.is_progress_bar_enabled()
    if quiet:  # a bar for loading a tiny local model is noise
        hf_logging.disable_progress_bar()
    quantized = quant is not None and quant.enabled
    extra = (
        {"quantization_config": bnb_config(quant, dtype), "device_map": {"": str(device)}}
        if quantized
        else {}
    )
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, trust_remote_code=trust_remote_code, **extra
        )
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(_not_found_message(base_model, exc)) from exc
    finally:
        if quiet:
            hf_logging.enable_progress_bar()
    attention.use(model)  # grouped key/value heads read in place on CPU (attention.py)
    if not quantized:
        return model.to(device)
    _own_memory(model)
    if torch.device(device).type == "cpu":
        _return_large_blocks()
    for module in model.modules():
        # bitsandbytes' CPU backend repacks a 4-bit layer's weights in place for a bfloat16
        # kernel the first time it runs in eval mode without gradients: sampling would then
        # compute in another precision than training, and the trainer's own weights would
        # change format. Every forward pass takes the training path instead.
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model


def _own_memory(model: PreTrainedModel) -> None:
    """Copies the tensors a quantized load left as views of the memory-mapped checkpoint
    (embeddings, norms, the output layer) into memory of their own. While any view lives, the
    whole full-precision checkpoint stays mapped, and every page the quantizer read stays in
    the process's resident memory (measured: 0.9 GiB of file pages next to 0.1 GiB of 4-bit
    weights for a 0.2B model)."""
    import bitsandbytes as bnb

    quantized = (bnb.nn.Params4bit, bnb.nn.Int8Params)
    with torch.no_grad():
        for module in model.modules():
            for tensor in [*module._parameters.values(), *module._buffers.values()]:
                if tensor is not None and not isinstance(tensor, quantized):
                    tensor.data = tensor.data.clone()
    import gc

    gc.collect()


def _return_large_blocks() -> None:
    """On glibc: blocks of 1 MiB or more are mapped for each allocation and unmapped when freed.

    A quantized layer dequantizes its weight into a fresh full-precision tensor at each forward
    and backward pass. glibc's default raises its mapping threshold after the first such block
    is freed, so that later ones come from the heap and stay with the process once freed: the
    resident memory then grows by about the full-precision model's size, the saving quantization
    is for (measured, 0.2B model, nf4, float32: peak 1.45 GiB with the default, 1.12 with this).
    Process-wide; the environment's MALLOC_MMAP_THRESHOLD_, if set, is left as it is."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, 1 << 20)
    except (OSError, AttributeError):  # not glibc
        pass


M_MMAP_THRESHOLD = -3  # glibc's malloc.h


def bnb_config(quant: QuantSpec, dtype: torch.dtype):
    """transformers' BitsAndBytesConfig for `quant`. Not peft's prepare_model_for_kbit_training:
    it would cast the norms to float32 and turn on gradient checkpointing, changing the numbers
    of a bfloat16 run behind the config's back; the model stays as configured instead."""
    from transformers import BitsAndBytesConfig

    # Noise: a warning at every int8 forward pass that it computes in float16 (LLM.int8 always
    # does; see docs/quantization.md).
    logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
    if quant.method == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = dtype if quant.compute_dtype == "auto" else getattr(torch, quant.compute_dtype)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.method,
        bnb_4bit_compute_dtype=compute,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_quant_storage=torch.uint8,
    )


def _not_found_message(base_model: str, exc: Exception) -> str:
    local = Path(base_model).expanduser().resolve()
    where = "exists but could not be loaded" if local.exists() else "does not exist"
    return (
        f"base_model {base_model!r} could not be loaded. Tried: "
        f"(1) built-in models {sorted([*BUILTIN_MODELS, *pretrained.PRETRAINED])} — not one of them; "
        f"(2) local directory {local} — {where}; "
        f"(3) the model hub / its local cache — {type(exc).__name__}: {str(exc).splitlines()[0]}"
    )
