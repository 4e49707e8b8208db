"""Base models and tokenizers: hub ids, local directories, and rlkit's built-in tiny models.

A built-in model (`rlkit-tiny`, ...) is built by rlkit's own code from a fixed config and seed,
so no machine needs to download anything. Building is deterministic: the same spec gives the
same bytes. The result is cached under `$RLKIT_CACHE_DIR` (default `~/.cache/rlkit`) with a
checksum of every file; a cache entry whose checksums do not match is rebuilt, never trusted.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
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


def _checksums(directory: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
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
    if _cache_is_valid(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # One builder at a time (several processes of a run share the cache): the others wait,
    # then find it built.
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _cache_is_valid(target):
            _build(name, spec, target)
    return target


def _build(name: str, spec: BuiltinSpec, target: Path) -> None:
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        tokenizer = build_tokenizer()
        model = build_model(spec, len(tokenizer), tokenizer)
        # Not model.save_pretrained: under torch.distributed it writes only on rank 0, and the
        # process that builds the shared cache may be any rank.
        save_file(model.state_dict(), staging / "model.safetensors", metadata={"format": "pt"})
        model.config.architectures = [type(model).__name__]
        model.config.dtype = next(model.parameters()).dtype
        model.config.save_pretrained(staging)
        model.generation_config.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        manifest = {"name": name, "spec": asdict(spec), "sha256": _checksums(staging)}
        (staging / "rlkit_build.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
        if target.exists():  # a corrupt or partial entry: replace it
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def resolve(base_model: str) -> str:
    """What `from_pretrained` should be given for `base_model`: a built-in, a dir, or a hub id."""
    if not isinstance(base_model, str) or not base_model:
        raise ModelNotFoundError(f"base_model must be a non-empty string, got {base_model!r}")
    if base_model in BUILTIN_MODELS:
        return str(builtin_path(base_model))
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
) -> PreTrainedModel:
    source = resolve(base_model)
    quiet = base_model in BUILTIN_MODELS and hf_logging.is_progress_bar_enabled()
    if quiet:  # a bar for loading a tiny local model is noise
        hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(_not_found_message(base_model, exc)) from exc
    finally:
        if quiet:
            hf_logging.enable_progress_bar()
    return model.to(device)


def _not_found_message(base_model: str, exc: Exception) -> str:
    local = Path(base_model).expanduser().resolve()
    where = "exists but could not be loaded" if local.exists() else "does not exist"
    return (
        f"base_model {base_model!r} could not be loaded. Tried: "
        f"(1) built-in models {sorted(BUILTIN_MODELS)} — not one of them; "
        f"(2) local directory {local} — {where}; "
        f"(3) the model hub / its local cache — {type(exc).__name__}: {str(exc).splitlines()[0]}"
    )
