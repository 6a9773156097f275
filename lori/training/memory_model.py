"""The GPU-memory model of a training step, from shapes alone (no weights, no GPU).

Peak bytes per device of one LoRI (or PEFT LoRA) training step, as a sum of terms, each a pure
function of the architecture's shapes (``AdapterShape``, built on the meta device), the LoRI config
and the device plan (``Plan``: strategy, dtypes, micro-batch, activation checkpointing, a quantized
base). ``lori dryrun`` prints these terms; ``lori.training.memory_budget`` searches the settings
that fit a card; ``experiments/gpu_check.py`` measures them on a GPU and
``experiments/bench_memory.py`` measures the quantized base's bytes on CPU.

A quantized base (``Plan.quantize``, bitsandbytes; every ``nn.Linear`` of the decoder layers, the
LM head and embeddings stay in the stored dtype), bytes of one ``d_out x d_in`` weight, n = d_out d_in:

    nf4 / fp4   n / 2 (two 4-bit codes a byte) + per block of 64 entries an absmax, itself 8-bit
                quantized in blocks of 256 with an fp32 scale (double quantization,
                ``compress_statistics``): n/64 + 4 n/(64*256) bytes, + the two code books
                (16 + 256 fp32) and an fp32 offset           ~ 0.516 byte / parameter
    int8        n (LLM.int8 ``Int8Params.CB``) + an fp32 scale per output row (``SCB``): n + 4 d_out
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from lori.core import LoRIConfig, count_trainable, inject_lori, lori_layers
from lori.core.masks import group_of, keep_count
from lori.training.base_model import build_from_arch_config, count_parameters

GIB = 1024**3
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "auto": 2}  # auto: bf16 on any recent GPU
ADAPTER_BYTES = 4  # A, B, B's gradient and AdamW states are fp32 whatever model.dtype is
LOGIT_FP32_BYTES = 8  # per logit of the loss chunk, besides its compute-dtype copy: fp32 copy + gradient
OVERHEAD_GIB = 1.0  # CUDA context, cuBLAS / NCCL workspaces, allocator slack: a flat guess
QUANTIZE = ("nf4", "fp4", "int8")  # the bitsandbytes formats a base can be stored in
BLOCKSIZE_4BIT = 64  # bitsandbytes' default block of the 4-bit formats (one absmax each)
BLOCKSIZE_ABSMAX = 256  # double quantization: absmax values quantized in blocks of 256
DOUBLE_QUANT = True  # compress_statistics: bitsandbytes' Linear4bit default


@dataclass(frozen=True)
class AdapterShape:
    """Sizes of one (architecture, LoRI config) pair, all counted on the meta device."""

    base_params: int  # parameters of the base model
    layer_params: int  # parameters of one decoder layer
    root_params: int  # parameters outside the decoder layers (embeddings, lm_head, final norm)
    a_entries: int  # entries of all A (frozen buffers)
    adapted_weights: int  # entries of the adapted (frozen) W0
    b_by_path: tuple[tuple[str, int], ...]  # entries of each B, by module path
    trainable_dense: int  # count_trainable after injection (LoRI-D)
    hidden: int
    kv_hidden: int
    intermediate: int
    layers: int
    vocab: int
    linear_shapes: tuple[tuple[int, int], ...] = ()  # (d_out, d_in) of each nn.Linear of one decoder layer


@lru_cache(maxsize=32)
def adapter_shape(arch: str, r: int, targets: tuple[str, ...]) -> AdapterShape:
    """Build ``arch`` on the meta device, inject LoRI (rank ``r`` on ``targets``) and measure it."""
    from torch import nn

    model = build_from_arch_config(arch, device="meta")
    base = count_parameters(model)
    layer = count_parameters(model.model.layers[0])
    linears = tuple(tuple(m.weight.shape) for m in model.model.layers[0].modules() if isinstance(m, nn.Linear))
    inject_lori(model, LoRIConfig(r=r, target_modules=list(targets), sparsity=0.0))
    layers = lori_layers(model)
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return AdapterShape(
        base_params=base,
        layer_params=layer,
        root_params=base - cfg.num_hidden_layers * layer,
        a_entries=sum(m.lori_A.numel() for m in layers.values()),
        adapted_weights=sum(m.base_layer.weight.numel() for m in layers.values()),
        b_by_path=tuple((p, m.lori_B.numel()) for p, m in layers.items()),
        trainable_dense=count_trainable(model),
        hidden=cfg.hidden_size,
        kv_hidden=cfg.num_key_value_heads * head_dim,
        intermediate=cfg.intermediate_size,
        layers=cfg.num_hidden_layers,
        vocab=cfg.vocab_size,
        linear_shapes=linears,  # type: ignore[arg-type]
    )


def sparse_trainable(b_by_path: tuple[tuple[str, int], ...], sparsity: float, granularity: str) -> int:
    """Entries of B that calibration keeps: ``keep_count`` summed over the calibration groups."""
    groups: dict[str, int] = {}
    for path, n in b_by_path:
        key = group_of(path, granularity)
        groups[key] = groups.get(key, 0) + n
    return sum(keep_count(n, sparsity) for n in groups.values())


@dataclass(frozen=True)
class Plan:
    """How the training is laid out over devices."""

    strategy: str  # "single", "ddp", "fsdp", "zero2" or "zero3"
    world: int  # devices x nodes
    checkpointing: bool  # activation checkpointing of every decoder layer
    weight_bytes: int  # bytes per stored base weight (4 fp32, 2 bf16)
    micro_batch: int  # examples per device and step
    seq_len: int  # tokens per example (max_length: padding to the longest is the worst case)
    compute_bytes: int = 2  # bytes per activation: 2 under bf16 / fp16 compute, 4 in fp32
    autocast: bool = False  # trainer.precision *-mixed (autocast, or FSDP / DeepSpeed mixed precision)
    quantize: str | None = None  # bitsandbytes format of the decoder layers' linears (QUANTIZE), or None

    @property
    def shards_weights(self) -> bool:
        return self.strategy in ("fsdp", "zero3")

    @property
    def shards_optimizer(self) -> bool:
        return self.strategy in ("fsdp", "zero2", "zero3")


def _strategy_name(strategy: Any) -> tuple[str, dict[str, Any]]:
    if isinstance(strategy, dict):
        return str(strategy.get("class_path", "")), dict(strategy.get("init_args") or {})
    return str(strategy or "auto"), {}


def plan_of(trainer: dict[str, Any], dtype: str, micro_batch: int, seq_len: int,
            checkpointing: bool = False, quantize: str | None = None) -> Plan:
    """Read strategy, world size, precision and activation checkpointing from a ``trainer:`` section.

    Stored base weights: ``model.dtype`` (``auto``: bf16, which every recent GPU has), except that
    FSDP shards them in fp32 (``LoRIModule.configure_model``: FSDP flattens one dtype per unit) and
    DeepSpeed's mixed precision casts the module to bf16. Compute: 16-bit under ``*-mixed`` or a
    16-bit stored base, else fp32. Checkpointing: ``checkpointing`` (the model's
    ``gradient_checkpointing`` option) or an FSDP ``activation_checkpointing_policy``.
    """
    name, args = _strategy_name(trainer.get("strategy"))
    devices = trainer.get("devices", 1)
    per_node = devices if isinstance(devices, int) and devices > 0 else 1
    world = per_node * int(trainer.get("num_nodes") or 1)
    lowered = name.lower()
    if "fsdp" in lowered:
        kind = "fsdp"
    elif "deepspeed" in lowered:
        stage = args.get("stage", 3 if "stage_3" in lowered else 2)
        kind = "zero3" if int(stage) == 3 else "zero2"
    else:
        kind = "ddp" if world > 1 else "single"
    checkpointing = checkpointing or (kind == "fsdp" and bool(args.get("activation_checkpointing_policy")))
    precision = str(trainer.get("precision") or "32-true")
    autocast = precision.endswith("-mixed") or precision in ("bf16", "16")
    weight_bytes = DTYPE_BYTES.get(str(dtype), 4)
    if kind == "fsdp":
        weight_bytes = 4
    elif kind.startswith("zero") and autocast:  # DeepSpeed's bf16 mode: fp32 masters of B only
        weight_bytes = 2
    compute_bytes = 2 if autocast or weight_bytes == 2 else 4
    return Plan(kind, world, checkpointing, weight_bytes, micro_batch, seq_len, compute_bytes, autocast,
                quantize or None)


def quantized_weight_bytes(d_out: int, d_in: int, quantize: str) -> int:
    """Bytes bitsandbytes stores for one ``d_out x d_in`` weight in ``quantize`` (module docstring).

    Raises:
        ValueError: ``quantize`` is not one of ``QUANTIZE``.
    """
    n = d_out * d_in
    if quantize == "int8":
        return n + 4 * d_out  # int8 codes + fp32 scale per row
    if quantize not in ("nf4", "fp4"):
        raise ValueError(f"unknown quantization {quantize!r}: use one of {list(QUANTIZE)} or null")
    blocks = math.ceil(n / BLOCKSIZE_4BIT)
    codes = math.ceil(n / 2) + 16 * 4  # packed 4-bit codes + the 16-entry fp32 code book
    if not DOUBLE_QUANT:
        return codes + 4 * blocks  # an fp32 absmax per block
    # uint8 absmax per block, an fp32 scale per 256 of them, the 256-entry fp32 code book, an fp32 offset
    return codes + blocks + 4 * math.ceil(blocks / BLOCKSIZE_ABSMAX) + 256 * 4 + 4


def base_weight_bytes(shape: AdapterShape, weight_bytes: int, quantize: str | None) -> int:
    """Bytes of the stored base: quantized decoder-layer linears, the rest in ``weight_bytes``."""
    if quantize is None:
        return shape.base_params * weight_bytes
    per_layer = sum(quantized_weight_bytes(o, i, quantize) for o, i in shape.linear_shapes)
    linear_params = shape.layers * sum(o * i for o, i in shape.linear_shapes)
    return shape.layers * per_layer + (shape.base_params - linear_params) * weight_bytes


def activation_bytes_per_token(shape: AdapterShape, r: int, dropout: float, compute_bytes: int = 2) -> int:
    """Bytes one token keeps for backward in one decoder layer (W0 and A frozen).

    RMSNorm inputs in fp32 (2 x 4h); in the compute dtype (c bytes): attention q and output
    (2 x c h), k and v (2 x c h_kv), SwiGLU gate, act(gate) and up (3 x c i) and the r-wide
    outputs of A that B's gradient needs (7 x c r); LoRI dropout masks on the 7 adapter inputs,
    bool (6h + i, only with dropout > 0). Frozen W0 and A keep no inputs: no weight gradient is
    computed for them.
    """
    h, kv, i = shape.hidden, shape.kv_hidden, shape.intermediate
    kept = 8 * h + compute_bytes * (2 * h + 2 * kv + 3 * i + 7 * r)
    return kept + (6 * h + i if dropout > 0 else 0)


def lora_extra_bytes_per_token(shape: AdapterShape, r: int, dropout: float, compute_bytes: int = 2,
                               autocast: bool = False) -> int:
    """What PEFT LoRA keeps per token and layer beyond LoRI (``activation_bytes_per_token``).

    LoRA trains A, so A's gradient needs each adapted module's input. Under a 16-bit base without
    autocast PEFT casts that input to the adapter's dtype (fp32) once per module
    (``_cast_input_dtype``) and keeps the cast: 4 (6h + i) bytes for q, k, v, o, gate, up, down
    (twice with dropout: the dropped-out copy too), and A's r-wide outputs are fp32 (7 (4 - c) r
    more). Under autocast or fp32 compute the inputs stay in the compute dtype: the two RMSNorm
    outputs and down's input, c (2h + i) (attention's output, o's input, is kept already), or
    with dropout the seven dropped-out inputs, c (6h + i).
    """
    h, i = shape.hidden, shape.intermediate
    if compute_bytes < 4 and not autocast:
        return 4 * (6 * h + i) * (2 if dropout > 0 else 1) + 7 * r * (4 - compute_bytes)
    return compute_bytes * ((6 * h + i) if dropout > 0 else (2 * h + i))


def loss_chunk_rows(vocab: int) -> int:
    """Tokens per chunk of the response-token loss (``lori.training.module.response_loss``)."""
    from lori.training.module import LOSS_CHUNK_LOGITS

    return max(1, LOSS_CHUNK_LOGITS // vocab)


def estimate_memory(
    shape: AdapterShape, lori: LoRIConfig, trainable: int, sparse: bool, plan: Plan, lora: bool = False
) -> dict[str, float]:
    """Peak GPU memory per device in GiB, by term and ``total``, to 2 decimals: ``memory_terms``."""
    terms = memory_terms(shape, lori, trainable, sparse, plan, lora)
    return {k: round(v / GIB, 2) for k, v in terms.items()}


def memory_terms(
    shape: AdapterShape, lori: LoRIConfig, trainable: int, sparse: bool, plan: Plan, lora: bool = False
) -> dict[str, float]:
    """Peak GPU memory per device in bytes, by term and ``total`` (see docs/reproducing_the_paper.md).

    weights      base parameters x stored bytes (``plan_of``: 2 for a bf16 base, 16 GB for
                 Llama-3-8B), divided over the devices when FSDP / ZeRO-3 shard them; a quantized
                 base: ``base_weight_bytes`` (decoder-layer linears in nf4 / fp4 / int8)
    gathered     FSDP / ZeRO-3: compute-dtype copies of the gathered root unit and two decoder layers
    casts        fp32 weights under autocast without sharding: the 16-bit copies of frozen matrices
                 that backward keeps; LoRI's fused layer casts its W0 again in backward and keeps
                 none, so only the non-adapted linears count (one layer's with activation
                 checkpointing) plus the LM head's, cast in each loss chunk
    dequantized  a quantized base: the largest linear dequantized to the compute dtype for a matmul
                 (forward, and again for backward's input gradient), one at a time
    adapter      A and dense B in fp32 (bf16 under DeepSpeed's mixed precision, whose fp32 masters
                 are in ``optimizer``), plus for LoRI-S the bool mask and the int64 kept-entry index
    optimizer    trainable x fp32 (gradient + 2 AdamW states) = 12 bytes; DeepSpeed: bf16 gradient
                 + fp32 master + 2 states = 14; sharded by FSDP / ZeRO
    activations  tokens x per-layer bytes (``activation_bytes_per_token``, plus
                 ``lora_extra_bytes_per_token`` for PEFT LoRA) x layers; with checkpointing only each
                 layer's input (tokens x hidden x compute bytes) plus one layer recomputed
    logits       the response-token loss runs chunk by chunk (``lori.training.module.response_loss``):
                 one chunk's logits (compute dtype, fp32 copy, fp32 gradient), plus the gathered
                 last hidden states and their gradient (tokens x hidden x 2 x compute bytes)
    overhead     a flat 1 GiB (CUDA context, workspaces, allocator slack)

    Args:
        lora: PEFT LoRA in place of LoRI (``trainable`` = entries of A and B): its activations keep
            the adapters' inputs (``lora_extra_bytes_per_token``).
    """
    wb, cb, tokens = plan.weight_bytes, plan.compute_bytes, plan.micro_batch * plan.seq_len
    b_entries = sum(n for _, n in shape.b_by_path)
    weights = base_weight_bytes(shape, wb, plan.quantize) / (plan.world if plan.shards_weights else 1)
    gathered = (shape.root_params + 2 * shape.layer_params) * cb if plan.shards_weights else 0
    unadapted_layer = shape.layer_params - shape.adapted_weights // shape.layers  # (norms included)
    if plan.quantize is not None:
        unadapted_layer = 0  # every linear of a layer is quantized: dequantized on the fly, below
    kept_casts = unadapted_layer * (1 if plan.checkpointing else shape.layers) + shape.vocab * shape.hidden
    casts = kept_casts * cb if wb == 4 and cb < 4 and not plan.shards_weights else 0
    largest = max((o * i for o, i in shape.linear_shapes), default=0)
    dequantized = largest * cb if plan.quantize is not None else 0
    deepspeed = plan.strategy.startswith("zero") and plan.autocast
    adapter_bytes = 2 if deepspeed else ADAPTER_BYTES
    adapter = (shape.a_entries + b_entries) * adapter_bytes + ((b_entries + 8 * trainable) if sparse else 0)
    per_entry = 2 + 4 + 4 + 4 if deepspeed else 3 * ADAPTER_BYTES
    optimizer = trainable * per_entry / (plan.world if plan.shards_optimizer else 1)
    per_token = activation_bytes_per_token(shape, lori.r, lori.dropout, cb)
    if lora:
        per_token += lora_extra_bytes_per_token(shape, lori.r, lori.dropout, cb, plan.autocast)
    per_layer = per_token * tokens
    if plan.checkpointing:
        activations = shape.layers * tokens * shape.hidden * cb + per_layer
    else:
        activations = shape.layers * per_layer
    rows = min(tokens, loss_chunk_rows(shape.vocab))
    logits = rows * shape.vocab * (cb + LOGIT_FP32_BYTES) + 2 * tokens * shape.hidden * cb
    terms = {
        "weights": weights, "gathered": gathered, "casts": casts, "dequantized": dequantized,
        "adapter": adapter, "optimizer": optimizer, "activations": activations, "logits": logits,
    }
    out = terms | {"overhead": OVERHEAD_GIB * GIB}
    out["total"] = sum(out.values())
    return out
