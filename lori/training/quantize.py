"""A frozen base stored quantized (``model.quantize``): bitsandbytes NF4, FP4 or int8 linear layers.

    model.quantize  layer                  one weight of d_out x d_in is stored as          bytes / entry
    null            nn.Linear              model.dtype                                      4 (fp32), 2 (bf16)
    nf4 | fp4       bnb.nn.Linear4bit      4-bit codes, one absmax per 64 entries, the      ~0.53
                                           absmaxes themselves 8-bit (double quantization)
    int8            bnb.nn.Linear8bitLt    int8 codes, one fp32 scale per output row        ~1

Every ``nn.Linear`` of the base except the LM head (``get_output_embeddings``) is replaced by the
bitsandbytes layer holding its weight, the LoRI-adapted ones included: ``LoRILinear`` then wraps the
quantized layer,

    y = deq(Q(W0)) x + (alpha / r) * B_eff A x        deq(Q(W0)) in the compute dtype, per matmul

and A, B, the masks and B's optimizer state stay fp32 (``lori.core.layer``). Embeddings, norms, the
LM head and the biases keep ``model.dtype``, which is also the compute dtype of the 4-bit layers
(int8 layers compute in their input's dtype). Nothing of the base trains, so nothing that trains is
quantized; a method that changes the base (``full``; ``pissa``, whose residual replaces W0) refuses
a quantized base.

The model loads in full precision (``from_pretrained`` maps the checkpoint file), then each layer is
quantized in turn and its full-precision weight dropped, and the parameters left unquantized are
copied out of the mapping (``own_storage``) so that it is unmapped: nothing of the fp32 weights stays
resident (tests/test_quantize.py checks both with weak references and /proc/self/maps). On
``quantize_device()``: the process's GPU when there is one (there
bitsandbytes quantizes a layer in milliseconds; its CPU backend took 49-97 s for SmolLM2-135M's
210 layers in 4 bits, 13 s in int8, on 2 shared cores), else the CPU; the model then lives on that device, and Lightning moves it where the run computes. A GGUF base is dequantized to float32 first, as without ``quantize``. A quantized layer
keeps the first 64 entries of its original weight (``lori.core.adapter.FINGERPRINT_HEAD``), so the
base fingerprint, and with it every adapter file, is the one of the unquantized base: adapters move
between a quantized and an unquantized base both ways. Merging into a quantized weight is refused
(``lori.core.layer.QuantizedMergeError``): merge into the unquantized base instead.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lori.core.adapter import FINGERPRINT_HEAD
from lori.training import console
from lori.training.base_model import ModelLoadError
from lori.training.baselines.registry import get_method

QUANTIZE_MODES: tuple[str, ...] = ("nf4", "fp4", "int8")
INSTALL_HINT = "pip install bitsandbytes"
BLOCKSIZE = 64  # entries per absmax of a 4-bit layer (bitsandbytes' and QLoRA's default)
INT8_THRESHOLD = 6.0  # LLM.int8's outlier threshold (bitsandbytes' and transformers' default)
# which methods cannot train on a frozen 4/8-bit copy (their training changes the base: ``Method.changes_base``)
# and which (method, mode) pairs fail in a dependency (``Method.quantize_refused``): the method registry says
# a sharding strategy flattens each unit's parameters into one tensor of one dtype: 4/8-bit storage
# and the fp32 adapter cannot share it, and the quantization state is not a tensor it could shard
SHARDING_STRATEGIES = ("fsdp", "deepspeed_stage_3")


class QuantizeError(ModelLoadError):
    """A ``model.quantize`` setting that cannot run; the message names the value and the fix."""


def bitsandbytes_available() -> bool:
    """Whether bitsandbytes is installed (looked up, not imported)."""
    return importlib.util.find_spec("bitsandbytes") is not None


def import_bitsandbytes() -> Any:
    """``import bitsandbytes``, without the warning its CPU backend logs at import when the optional
    hub kernel ``kernels-community/quantization-bitsandbytes`` cannot be fetched (its pure-torch
    kernels run instead; nothing a user can act on), and, unless ``--verbose``, without the line
    LLM.int8 logs at every evaluation matmul. A level the user set on those loggers stays."""
    with _quiet_logger("bitsandbytes.backends.cpu.ops"):
        bnb = importlib.import_module("bitsandbytes")
    if not console.is_verbose():  # LLM.int8's no-grad matmul logs its (inherent) fp16 input cast at every call
        logger = logging.getLogger("bitsandbytes.autograd._functions")
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.ERROR)
    return bnb


@contextlib.contextmanager
def _quiet_logger(name: str) -> Iterator[None]:
    logger = logging.getLogger(name)
    level = logger.level
    if level == logging.NOTSET:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def check_quantize(
    quantize: str | None, method: str = "lori", model: str | None = None, gguf_file: str | None = None,
    protocol: str = "lori", strategy: Any = None,
) -> None:
    """Refuse a ``model.quantize`` that cannot run, before anything loads.

    Args:
        quantize: ``None`` (nothing to check) or one of ``QUANTIZE_MODES``.
        method: ``model.method``; one whose training changes the base (its registry entry's
            ``changes_base``), or a mode in its ``quantize_refused``, is refused.
        model: ``model.model``: a local HF folder whose config.json holds a ``quantization_config``
            (a base already stored quantized, e.g. GPTQ or bitsandbytes) is refused.
        gguf_file: ``model.gguf_file`` (a GGUF base is accepted: it is dequantized first).
        protocol: ``official`` is refused (the official code trains and evaluates unquantized).
        strategy: ``trainer.strategy`` as configured; FSDP and DeepSpeed ZeRO-3 are refused.

    Raises:
        QuantizeError: naming the bad value and what to do instead.
    """
    if quantize is None:
        return
    if quantize not in QUANTIZE_MODES:
        raise QuantizeError(f"unknown model.quantize {quantize!r}; choose one of {[None, *QUANTIZE_MODES]}")
    entry = get_method(method)
    if entry.changes_base:
        raise QuantizeError(f"model.quantize {quantize!r} with method {method!r}: {entry.changes_base}, which "
                            "a frozen quantized copy cannot hold; drop model.quantize or use an adapter method")
    if quantize in entry.quantize_refused:
        raise QuantizeError(f"model.quantize {quantize!r} with method {method!r}: {entry.quantize_refused[quantize]}")
    if protocol == "official":
        raise QuantizeError(f"model.quantize {quantize!r} under protocol official: the official code trains and "
                            "evaluates an unquantized base; drop model.quantize or use protocol: lori")
    if (name := _sharding_name(strategy)) is not None:
        raise QuantizeError(f"model.quantize {quantize!r} with trainer.strategy {name}: sharding flattens the "
                            "4/8-bit storage with the fp32 adapter; run on one device or with DDP (each rank "
                            "holds the quantized base), or shard without model.quantize")
    stored = stored_quantization(model, gguf_file)
    if stored is not None:
        raise QuantizeError(f"model {model!r} is already stored quantized ({stored}); model.quantize "
                            f"{quantize!r} would quantize it twice: drop model.quantize, or point model at the "
                            "unquantized weights")
    if not bitsandbytes_available():
        raise QuantizeError(f"model.quantize {quantize!r} needs bitsandbytes, which is not installed: {INSTALL_HINT}")


def stored_quantization(model: str | None, gguf_file: str | None = None) -> str | None:
    """The ``quant_method`` of a local HF model folder stored quantized (its config.json's
    ``quantization_config``), else None (GGUF files, hub ids and unquantized folders)."""
    if model is None or gguf_file is not None:
        return None
    config = Path(str(model)).expanduser() / "config.json"
    if not config.is_file():
        return None
    try:
        quant = json.loads(config.read_text()).get("quantization_config")
    except (OSError, ValueError):
        return None  # unreadable: the loader says so, with its own message
    if not quant:
        return None
    return str(quant.get("quant_method", "quantization_config")) if isinstance(quant, dict) else "quantization_config"


def _sharding_name(strategy: Any) -> str | None:
    """The configured strategy when it shards parameters (FSDP, DeepSpeed ZeRO-3), else None."""
    if isinstance(strategy, str):
        return strategy if strategy.startswith(SHARDING_STRATEGIES) else None
    if strategy is None or not hasattr(strategy, "get"):
        return None
    path = str(strategy.get("class_path", ""))
    init = strategy.get("init_args") or {}
    if path.endswith("FSDPStrategy") or "FSDP" in path.rsplit(".", 1)[-1]:
        return path.rsplit(".", 1)[-1]
    if path.endswith("DeepSpeedStrategy") and init.get("stage", 2) == 3:
        return "DeepSpeedStrategy (ZeRO-3)"
    return None


def quantize_device() -> torch.device:
    """Where ``quantize_base`` quantizes: this process's GPU (``cuda:$LOCAL_RANK``, the rank's own
    under DDP), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def quantize_base(
    model: nn.Module, mode: str, compute_dtype: torch.dtype, device: str | torch.device | None = None, *,
    blocksize: int = BLOCKSIZE, double_quant: bool = True,
) -> dict[str, Any]:
    """Replace every ``nn.Linear`` of ``model`` but its LM head by a bitsandbytes layer, in place.

    Args:
        model: the loaded base (on the CPU), before any adapter is attached.
        mode: ``nf4``, ``fp4`` (``bnb.nn.Linear4bit``) or ``int8`` (``bnb.nn.Linear8bitLt``,
            outlier threshold ``INT8_THRESHOLD``).
        compute_dtype: what the 4-bit layers dequantize to for each matmul (``model.dtype``).
        device: where to quantize and then keep the model (default ``quantize_device()``).
        blocksize: entries per absmax of the 4-bit layers (bitsandbytes' ``Params4bit``: 32 to 4096).
        double_quant: 4-bit absmaxes themselves stored in 8 bits (``compress_statistics``), as
            QLoRA's ``bnb_4bit_use_double_quant``. These two are bitsandbytes' defaults unless set;
            ``experiments/bench_memory.py`` (part ``base_loss``) measures what they change.

    Returns:
        What is stored (also kept as ``model.lori_quantize``): ``mode``, ``layers`` (how many were
        quantized), ``quantized_bytes`` (their weights and quantization state), ``unquantized_bytes``
        (what the same weights took before) and ``kept`` (the linear layers left unquantized).
    """
    check_quantize(mode)
    bnb = import_bitsandbytes()
    device = torch.device(device) if device is not None else quantize_device()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    found = [(path, m) for path, m in model.named_modules() if type(m) is nn.Linear and m is not head]
    before = sum(m.weight.numel() * m.weight.element_size() for _, m in found)
    for path, linear in found:
        parent, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, name,
                _quantized_linear(bnb, linear, mode, compute_dtype, device, blocksize, double_quant))
    if device.type != "cpu":
        model.to(device)  # the rest follows the quantized layers (a loaded model sits on the CPU)
    else:
        own_storage(model)  # the checkpoint's file mapping (the fp32 weights' pages) goes with its last tensor
    info = {"mode": mode, "layers": len(found), "quantized_bytes": quantized_bytes(model),
            "unquantized_bytes": before, "compute_dtype": str(compute_dtype).removeprefix("torch."),
            "kept": [p for p, m in model.named_modules() if type(m) is nn.Linear]}
    model.lori_quantize = info
    # PEFT (the baselines) reads these to wrap bitsandbytes layers in its own 4/8-bit LoRA layers
    model.is_loaded_in_4bit, model.is_loaded_in_8bit = mode != "int8", mode == "int8"
    return info


@torch.no_grad()
def own_storage(model: nn.Module) -> None:
    """Give every floating-point parameter and buffer of ``model`` a storage of its own, in place.

    ``from_pretrained`` maps a safetensors checkpoint into memory and its tensors are views of that
    one mapping, so the parameters left unquantized (embeddings, LM head, norms) would keep all of
    it, the full-precision weights of the quantized layers included, mapped, and every page the
    quantization read resident (the process's RSS, file-backed: 538 MiB of fp32 SmolLM2-135M). A
    parameter's ``.data`` is replaced, so tied weights stay one parameter; the copies are what the
    model would hold anyway.
    """
    for param in model.parameters():  # each shared (tied) parameter once
        if param.is_floating_point():
            param.data = param.data.clone()
    copies: dict[int, torch.Tensor] = {}  # a buffer shared by modules stays shared
    for module in model.modules():
        for name, buffer in module._buffers.items():
            if buffer is not None and buffer.is_floating_point():
                module._buffers[name] = copies.setdefault(id(buffer), buffer.clone())


@torch.no_grad()
def _quantized_linear(
    bnb: Any, linear: nn.Linear, mode: str, compute_dtype: torch.dtype, device: torch.device,
    blocksize: int = BLOCKSIZE, double_quant: bool = True,
) -> nn.Module:
    """The bitsandbytes layer holding ``linear``'s weight (quantized on ``device``) and bias."""
    w, bias = linear.weight.detach().to(device), linear.bias is not None
    if mode == "int8":
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=bias, has_fp16_weights=False,
                                    threshold=INT8_THRESHOLD, device="meta")
        layer.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False).to(w.device)
    else:
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=bias, compute_dtype=compute_dtype,
                                  quant_type=mode, device="meta")
        layer.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type=mode, blocksize=blocksize,
                                         compress_statistics=double_quant).to(w.device)
        # bitsandbytes 0.50 repacks a 4-bit weight in place for its CPU inference kernel on the first
        # no-grad eval forward (AVX512-BF16 CPUs); that layout fails for widths under 64 and is not the
        # one training reads: every forward here takes the same path
        layer.support_avx512bf16_for_cpu = False
    if bias:
        layer.bias = nn.Parameter(linear.bias.detach().to(device), requires_grad=False)
    setattr(layer, FINGERPRINT_HEAD, w.reshape(-1)[:64].to("cpu", copy=True))  # the unquantized base's digest
    layer.train(linear.training)
    return layer


def is_quantized(module: nn.Module) -> bool:
    """Whether a layer stores its weight quantized (a weight that is not floating point)."""
    weight = getattr(module, "weight", None)
    return isinstance(weight, torch.Tensor) and not weight.is_floating_point()


def quantized_bytes(model: nn.Module) -> int:
    """Bytes of the quantized layers' weights with their quantization state (absmax, scales, maps)."""
    total = 0
    for module in model.modules():
        if not is_quantized(module):
            continue
        weight = module.weight
        total += weight.numel() * weight.element_size()
        state = getattr(weight, "quant_state", None)
        if state is not None:  # 4-bit: absmax (8-bit when double-quantized) + the nested state
            total += sum(t.numel() * t.element_size() for t in _state_tensors(state))
        scales = getattr(weight, "SCB", None)
        if isinstance(scales, torch.Tensor):  # int8: one scale per row
            total += scales.numel() * scales.element_size()
    return total


def _state_tensors(state: Any) -> list[torch.Tensor]:
    tensors = [state.absmax, state.code]
    nested = getattr(state, "state2", None)
    if nested is not None:
        tensors += [nested.absmax, nested.code]
    return [t for t in tensors if isinstance(t, torch.Tensor)]


def storage_line(model: nn.Module, base_dtype: torch.dtype) -> str:
    """How the base is stored, in words (the run summary's): e.g. ``nf4 (bitsandbytes) for 210
    linear layers, 93.4 MiB (from 338.0 MiB); the rest float32; GGUF dequantized to float32 first``."""
    dtype = str(base_dtype).removeprefix("torch.")
    info = getattr(model, "lori_quantize", None)
    gguf = (getattr(model, "lori_load_info", None) or {}).get("kind") == "gguf"
    source = "; loaded from a GGUF, dequantized to float32 first" if gguf else ""
    if info is None:
        return f"{dtype}{source}"
    return (f"{info['mode']} (bitsandbytes) for {info['layers']} linear layers, {_mib(info['quantized_bytes'])} "
            f"(from {_mib(info['unquantized_bytes'])}); the rest {dtype}{source}")


def _mib(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"
