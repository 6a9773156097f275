"""Dry run of a lori config: adapter sizes and a GPU-memory estimate, with no weights and no GPU.

    lori dryrun configs/paper/llama3_8b_r32_gsm8k.yaml [more configs ...]
    lori dryrun --trainer configs/trainer/fsdp.yaml configs/paper/*.yaml
    lori dryrun --json configs/paper/mistral_7b_r64_gsm8k.yaml
    lori dryrun --method dora configs/paper/llama3_8b_r32_gsm8k.yaml   (a baseline: model.method replaced)

The base model is built from its architecture config on the meta device (shapes only, no memory),
LoRI is injected with the config's ``model.lori`` settings and the trainable entries are counted:

    LoRI-D: every entry of every B   = sum over adapted W0 (d_out x d_in) of d_out * r
    LoRI-S: the entries calibration keeps = sum over calibration groups of keep_count(n_group, s)

Meta tensors hold no values, so LoRI-S cannot be calibrated here; its size does not depend on the
values though: calibration keeps exactly ``keep_count(n, s) = n - round(s * n)`` entries of each
group (``lori.core.masks``), which is what is summed.

A config whose ``model.method`` is a baseline (``lori.training.baselines``) also gets that method's count:
its adapter is built on the meta device by ``lori.training.baselines.attach(..., shapes_only=True)`` and its
trainable tensors counted (PiSSA's SVD does not run: its tensors are LoRA's; VeRA's shared
projections are built, they are small). On Llama-3-8B, r = 32, all seven projections: LoRA / rsLoRA
/ PiSSA / LoRA+ 83,886,080; AdaLoRA 83,893,248 (+ E); DoRA 85,262,336; LoRA-FA and LoRI-D
44,040,192; IA3 1,703,936; VeRA 1,383,424 (the paper's 84M, 85M, 44M, 1.70M, 1.38M).

Percentages are ``trainable / (base parameters + adapter entries A and B)``, the denominator of
PEFT's ``print_trainable_parameters`` (the paper's "# Params (%)" column matches it); the percentage
of the base model alone is reported too. The memory estimate is explained in ``estimate_memory``
and in docs/reproducing_the_paper.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from lori.core import InjectionError, LoRIConfig, count_trainable, inject_lori, lori_layers
from lori.core.masks import group_of, keep_count
from lori.training.base_model import (
    ModelLoadError,
    arch_config_names,
    build_from_arch_config,
    count_parameters,
)

# hub ids of the paper's base models -> the architecture configs shipped in configs/arch
KNOWN_ARCHS = {
    "meta-llama/Meta-Llama-3-8B": "llama3_8b",
    "mistralai/Mistral-7B-v0.1": "mistral_7b",
}
GIB = 1024**3
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "auto": 2}  # auto: bf16 on any recent GPU
ADAPTER_BYTES = 4  # A, B, B's gradient and AdamW states are fp32 whatever model.dtype is
LOGIT_FP32_BYTES = 8  # per logit of the loss chunk, besides its compute-dtype copy: fp32 copy + gradient
OVERHEAD_GIB = 1.0  # CUDA context, cuBLAS / NCCL workspaces, allocator slack: a flat guess


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


def arch_for(model: str | None) -> str:
    """The architecture config of a ``model:`` value: a known hub id, a shipped name or a local folder.

    Raises:
        ModelLoadError: no architecture config is known for the model.
    """
    if model in KNOWN_ARCHS:
        return KNOWN_ARCHS[model]
    if model in arch_config_names():
        return model
    if model and (Path(model).expanduser() / "config.json").is_file():
        return str(Path(model).expanduser())
    raise ModelLoadError(
        f"no architecture config for model {model!r}: use one of {sorted(KNOWN_ARCHS)}, a shipped "
        f"architecture {arch_config_names()} or a local folder holding a config.json"
    )


@lru_cache(maxsize=32)
def adapter_shape(arch: str, r: int, targets: tuple[str, ...]) -> AdapterShape:
    """Build ``arch`` on the meta device, inject LoRI (rank ``r`` on ``targets``) and measure it."""
    model = build_from_arch_config(arch, device="meta")
    base = count_parameters(model)
    layer = count_parameters(model.model.layers[0])
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
    )


def _entries(model: Any) -> int:
    """Parameters and buffers of a model, each shared tensor once."""
    return sum(t.numel() for t in model.parameters()) + sum(t.numel() for t in model.buffers())


@lru_cache(maxsize=64)
def method_size(
    arch: str, method: str, r: int, targets: tuple[str, ...], options: tuple[tuple[str, Any], ...] = ()
) -> tuple[int, int]:
    """(trainable entries, entries the adapter adds) of ``method`` on ``arch``, on the meta device.

    Args:
        arch: an architecture config (``configs/arch`` name or folder).
        method: a ``lori.training.baselines.METHODS`` name.
        r: rank (AdaLoRA: initial rank; unused by IA3 and full fine-tuning).
        targets: target module names.
        options: the method's ``model.baseline`` options as sorted (key, value) pairs.
    """
    # PEFT; kept out of module import time
    from lori.training.baselines import BaselineOptions, attach

    model = build_from_arch_config(arch, device="meta")
    before = _entries(model)
    opts = BaselineOptions(**{k: list(v) if isinstance(v, tuple) else v for k, v in options})
    attach(model, method, LoRIConfig(r=r, target_modules=list(targets), sparsity=0.0), opts, shapes_only=True)
    return count_trainable(model), _entries(model) - before


def _option_items(baseline: dict[str, Any] | None) -> tuple[tuple[str, Any], ...]:
    items = {k: tuple(v) if isinstance(v, list) else v for k, v in (baseline or {}).items() if v is not None}
    return tuple(sorted(items.items()))


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


def plan_of(trainer: dict[str, Any], dtype: str, micro_batch: int, seq_len: int) -> Plan:
    """Read strategy, world size, precision and activation checkpointing from a ``trainer:`` section.

    Stored base weights: ``model.dtype`` (``auto``: bf16, which every recent GPU has), except that
    FSDP shards them in fp32 (``LoRIModule.configure_model``: FSDP flattens one dtype per unit) and
    DeepSpeed's mixed precision casts the module to bf16. Compute: 16-bit under ``*-mixed`` or a
    16-bit stored base, else fp32.
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
    checkpointing = kind == "fsdp" and bool(args.get("activation_checkpointing_policy"))
    precision = str(trainer.get("precision") or "32-true")
    autocast = precision.endswith("-mixed") or precision in ("bf16", "16")
    weight_bytes = DTYPE_BYTES.get(str(dtype), 4)
    if kind == "fsdp":
        weight_bytes = 4
    elif kind.startswith("zero") and autocast:  # DeepSpeed's bf16 mode: fp32 masters of B only
        weight_bytes = 2
    compute_bytes = 2 if autocast or weight_bytes == 2 else 4
    return Plan(kind, world, checkpointing, weight_bytes, micro_batch, seq_len, compute_bytes, autocast)


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


def loss_chunk_rows(vocab: int) -> int:
    """Tokens per chunk of the response-token loss (``lori.training.module.response_loss``)."""
    # imports Lightning; kept out of module import time
    from lori.training.module import LOSS_CHUNK_LOGITS

    return max(1, LOSS_CHUNK_LOGITS // vocab)


def estimate_memory(
    shape: AdapterShape, lori: LoRIConfig, trainable: int, sparse: bool, plan: Plan
) -> dict[str, float]:
    """Peak GPU memory per device in GiB, by term and ``total``, to 2 decimals: ``memory_terms``."""
    terms = memory_terms(shape, lori, trainable, sparse, plan)
    return {k: round(v / GIB, 2) for k, v in terms.items()}


def memory_terms(
    shape: AdapterShape, lori: LoRIConfig, trainable: int, sparse: bool, plan: Plan
) -> dict[str, float]:
    """Peak GPU memory per device in bytes, by term and ``total`` (see docs/reproducing_the_paper.md).

    weights      base parameters x stored bytes (``plan_of``: 2 for a bf16 base, 16 GB for
                 Llama-3-8B), divided over the devices when FSDP / ZeRO-3 shard them
    gathered     FSDP / ZeRO-3: compute-dtype copies of the gathered root unit and two decoder layers
    casts        fp32 weights under autocast without sharding: the 16-bit copies of frozen matrices
                 that backward keeps; LoRI's fused layer casts its W0 again in backward and keeps
                 none, so only the non-adapted linears count (one layer's with activation
                 checkpointing) plus the LM head's, cast in each loss chunk
    adapter      A and dense B in fp32 (bf16 under DeepSpeed's mixed precision, whose fp32 masters
                 are in ``optimizer``), plus for LoRI-S the bool mask and the int64 kept-entry index
    optimizer    trainable x fp32 (gradient + 2 AdamW states) = 12 bytes; DeepSpeed: bf16 gradient
                 + fp32 master + 2 states = 14; sharded by FSDP / ZeRO
    activations  tokens x per-layer bytes (``activation_bytes_per_token``) x layers; with
                 checkpointing only each layer's input plus one layer recomputed
    logits       the response-token loss runs chunk by chunk (``lori.training.module.response_loss``):
                 one chunk's logits (compute dtype, fp32 copy, fp32 gradient), plus the gathered
                 last hidden states and their gradient (tokens x hidden x 2 x compute bytes)
    overhead     a flat 1 GiB (CUDA context, workspaces, allocator slack)
    """
    wb, cb, tokens = plan.weight_bytes, plan.compute_bytes, plan.micro_batch * plan.seq_len
    b_entries = sum(n for _, n in shape.b_by_path)
    weights = shape.base_params * wb / (plan.world if plan.shards_weights else 1)
    gathered = (shape.root_params + 2 * shape.layer_params) * cb if plan.shards_weights else 0
    unadapted_layer = shape.layer_params - shape.adapted_weights // shape.layers  # (norms included)
    kept_casts = unadapted_layer * (1 if plan.checkpointing else shape.layers) + shape.vocab * shape.hidden
    casts = kept_casts * cb if wb == 4 and cb < 4 and not plan.shards_weights else 0
    deepspeed = plan.strategy.startswith("zero") and plan.autocast
    adapter_bytes = 2 if deepspeed else ADAPTER_BYTES
    adapter = (shape.a_entries + b_entries) * adapter_bytes + ((b_entries + 8 * trainable) if sparse else 0)
    per_entry = 2 + 4 + 4 + 4 if deepspeed else 3 * ADAPTER_BYTES
    optimizer = trainable * per_entry / (plan.world if plan.shards_optimizer else 1)
    per_layer = activation_bytes_per_token(shape, lori.r, lori.dropout, cb) * tokens
    if plan.checkpointing:
        activations = shape.layers * tokens * shape.hidden * cb + per_layer
    else:
        activations = shape.layers * per_layer
    rows = min(tokens, loss_chunk_rows(shape.vocab))
    logits = rows * shape.vocab * (cb + LOGIT_FP32_BYTES) + 2 * tokens * shape.hidden * cb
    terms = {
        "weights": weights, "gathered": gathered, "casts": casts, "adapter": adapter,
        "optimizer": optimizer, "activations": activations, "logits": logits,
    }
    out = terms | {"overhead": OVERHEAD_GIB * GIB}
    out["total"] = sum(out.values())
    return out


def _plain(value: Any) -> Any:
    return value.as_dict() if hasattr(value, "as_dict") else dict(value)


def _load(config_path: str | Path, trainer_preset: str | Path | None, method: str | None = None) -> dict[str, Any]:
    """The parsed config as plain dicts, the preset's ``trainer:`` keys laid over it, ``method`` (if
    given) as ``model.method``."""
    # imports Lightning; kept out of module import time
    from lori.commands.lightning_cli import parse_config

    cfg = {k: _plain(parse_config(config_path)[k]) for k in ("model", "data", "trainer", "pipeline")}
    if trainer_preset is not None:
        parse_config(trainer_preset)  # the preset must be a valid config on its own
        cfg["trainer"].update(yaml.safe_load(Path(trainer_preset).read_text()).get("trainer") or {})
    if method is not None:
        from lori.training.baselines.methods import check_method

        check_method(method)
        cfg["model"]["method"] = method
    return cfg


def dry_run(
    config_path: str | Path, trainer_preset: str | Path | None = None, method: str | None = None
) -> dict[str, Any]:
    """Sizes of a config's LoRI-D and LoRI-S adapters and the memory they need, from shapes alone.

    Args:
        config_path: a ``lori pipeline`` YAML (e.g. ``configs/paper/llama3_8b_r32_gsm8k.yaml``).
        trainer_preset: a YAML whose ``trainer:`` keys replace the config's (``configs/trainer/*.yaml``).
        method: a ``model.method`` in place of the config's (a baseline's count from a LoRI config).

    Returns:
        method, its trainable entries and percentage (of base + adapter entries), model, arch, r,
        alphas, learning rates, epochs, global batch, base parameters, trainable entries and
        percentages of LoRI-D and LoRI-S, the device plan and memory estimates (GiB).
    """
    cfg = _load(config_path, trainer_preset, method)
    model, data, trainer, pipe = cfg["model"], cfg["data"], cfg["trainer"], cfg["pipeline"]
    lori = LoRIConfig.from_dict(dict(model["lori"]))
    arch = arch_for(model["model"])
    shape = adapter_shape(arch, lori.r, tuple(lori.target_modules))
    dense = shape.trainable_dense
    sparse = sparse_trainable(shape.b_by_path, lori.sparsity, lori.granularity)
    total = shape.base_params + shape.a_entries + sum(n for _, n in shape.b_by_path)
    plan = plan_of(trainer, model["dtype"], data["batch_size"], data["max_length"])
    world_batch = data["batch_size"] * plan.world * int(trainer.get("accumulate_grad_batches") or 1)
    method = model.get("method", "lori")
    if method == "lori":
        trainable, added = dense, total - shape.base_params
    else:
        trainable, added = method_size(arch, method, lori.r, tuple(lori.target_modules),
                                       _option_items(model.get("baseline")))
    return {
        "method": method, "trainable": trainable,
        "percent": 100 * trainable / (shape.base_params + added),
        "config": str(config_path), "model": model["model"], "arch": Path(arch).name, "r": lori.r,
        "alpha": lori.alpha, "sparse_alpha": pipe.get("sparse_alpha") or lori.alpha,
        "sparsity": lori.sparsity, "granularity": lori.granularity, "seed": lori.seed,
        "lr": model["lr"], "sparse_lr": pipe.get("sparse_lr") or model["lr"],
        "epochs": [pipe.get("dense_epochs"), pipe.get("sparse_epochs")], "global_batch": world_batch,
        "base_params": shape.base_params, "adapter_entries": total - shape.base_params,
        "trainable_lori_d": dense, "trainable_lori_s": sparse,
        "percent_lori_d": 100 * dense / total, "percent_lori_s": 100 * sparse / total,
        "percent_of_base_lori_d": 100 * dense / shape.base_params,
        "percent_of_base_lori_s": 100 * sparse / shape.base_params,
        "plan": asdict(plan),
        "memory_gib_lori_d": estimate_memory(shape, lori, dense, False, plan),
        "memory_gib_lori_s": estimate_memory(shape, lori, sparse, True, plan),
    }


def _millions(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n < 1e7 else f"{n / 1e6:.0f}M"


def format_table(rows: list[dict[str, Any]]) -> str:
    """A text table of dry-run results, one line per config."""
    head = (f"{'config':<34} {'r':>3} {'alpha D/S':>10} {'lr D/S':>15} {'ep':>3} {'batch':>5}  "
            f"{'LoRI-D':>14}  {'LoRI-S':>14}  {'GiB/GPU D/S':>13}  plan")
    lines = [head, "-" * len(head)]
    for row in rows:
        plan = row["plan"]
        lines.append(
            f"{Path(row['config']).stem:<34} {row['r']:>3} {row['alpha']:>4g}/{row['sparse_alpha']:<5g} "
            f"{row['lr']:>7.0e}/{row['sparse_lr']:<7.0e} {row['epochs'][0] or '-':>3} "
            f"{row['global_batch']:>5}  "
            f"{_millions(row['trainable_lori_d']):>6} ({row['percent_lori_d']:.2f}%)  "
            f"{_millions(row['trainable_lori_s']):>6} ({row['percent_lori_s']:.2f}%)  "
            f"{row['memory_gib_lori_d']['total']:>6.1f}/{row['memory_gib_lori_s']['total']:<6.1f}  "
            f"{plan['strategy']} x{plan['world']}{' +ckpt' if plan['checkpointing'] else ''}"
            + (f"  {row['method']}: {_millions(row['trainable'])} ({row['percent']:.2f}%)"
               if row.get("method", "lori") != "lori" else "")
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """``lori dryrun [--trainer PRESET] [--json] CONFIG...``: print the table (or JSON)."""
    parser = argparse.ArgumentParser(prog="lori dryrun", description=__doc__.split("\n\n")[0])
    parser.add_argument("configs", nargs="+", help="lori pipeline YAML files")
    parser.add_argument("--trainer", help="configs/trainer/*.yaml preset laid over each config's trainer:")
    parser.add_argument("--json", action="store_true", help="print the full results as JSON")
    parser.add_argument("--method", help="a model.method in place of each config's (a baseline's trainable count)")
    args = parser.parse_args(argv)
    # the configs are parsed one by one from Python, not from this process's argv
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
    try:
        rows = [dry_run(path, args.trainer, args.method) for path in args.configs]
    except (ModelLoadError, FileNotFoundError, InjectionError) as err:
        print(f"lori dryrun: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    print(json.dumps(rows, indent=2) if args.json else format_table(rows))


if __name__ == "__main__":
    main()
