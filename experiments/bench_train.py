"""Benchmark a training step of LoRI-S against PEFT LoRA, LoRI-D and the frozen-model floor.

Every method trains the same random-init model (same rank, alpha, dropout, target modules, batch,
sequence length, dtype and threads), with AdamW built as ``LoRIModule.configure_optimizers``
builds it (``lori.core.trainable_parameters``, lr 1e-4, no weight decay). One step is zero_grad,
forward, token-mean cross-entropy, backward and optimizer step. Steps of all methods are
interleaved, in a new random order every round, so that load from other processes falls on all
of them alike; every time is the median of ``--steps`` steps after ``--warmup``, every time ratio
the median over rounds of the ratio within a round.

The floor is the cost no adapter on these modules can avoid: the same model with every weight
frozen, its forward, and the backward any adapter needs, i.e. the gradient of the loss with
respect to the output of every target module (a forward hook makes those outputs require grad;
nothing else does). An adapter adds only its own work to that. Backpropagating to the input
embeddings instead (``floor_embed``, reported beside it) also forms the input gradients of layer
0's q/k/v/gate/up, which no adapter needs since the embeddings are frozen: a higher floor that
would flatter the adapters, so the targets use ``floor``.

Precision (``--precision fp32 bf16``): fp32 trains everything in fp32; bf16 stores the frozen
base in bf16 and computes in bf16 while every trained tensor (LoRI's A and B, PEFT LoRA's A and B,
as ``get_peft_model``'s ``autocast_adapter_dtype`` keeps them) and its AdamW state stay fp32, as
``model.dtype: bfloat16`` trains. Both precisions of a size are stepped in the same interleaved
rounds, so cross-precision ratios are paired like the others.

Reported per size and precision, one JSON line each:
  * ``step_ms`` (wall clock) and ``step_cpu_ms`` (process CPU time) per method; ratios LoRI-S /
    LoRA (target <= 0.80) and LoRI-S / floor (target <= 1.10), each also on CPU time (``_cpu``)
    and as the ratio of the fastest steps (``_best``);
  * ``matmul_bound``: each method's linear-layer matmul FLOPs over the floor's, the ratio an
    implementation with no overhead at all would reach (attention, norms, softmax left out);
  * ``optimizer_state_bytes`` after the steps; LoRI-S / LoRI-D (target <= 0.12);
  * ``trainable`` counts, and for LoRI-S the mask count (they must be equal);
  * ``peak_rss_bytes``: each method trains in a fresh process (no method sees another's
    allocations); ``peak`` is the resident-set high-water mark over two steps (``VmHWM``,
    reset once the model is built), ``over_base`` that peak minus the resident set of
    the bare base model; LoRI-S <= LoRA is the target. On CUDA also peak allocated device memory;
  * ``forward``: eval-mode forward of the base, LoRI-S unmerged and merged (merged / base ~ 1);
  * bf16 lines, when fp32 ran too: ``floor_bf16_vs_fp32`` (target <= 0.60), LoRI-S / floor (target
    <= 1.12) and LoRI-S / LoRA (<= 0.90) within bf16, ``opt_state_lori_s_bf16_vs_lori_d_fp32``
    (0.10: the kept 10% in fp32, as in fp32 mode).

Threads default to 1: on a few cores shared with other jobs, two OpenMP threads spin-wait
whenever the other is descheduled, which made steps 5-10x slower and far noisier when measured.

Sizes: ``smollm2-135m`` (SmolLM2-135M shape: 30 layers, width 576, tied 49k vocabulary) and
``llama3-8b-2l`` (Llama-3-8B widths, 2 layers, ``--layers`` to change it; the 128k vocabulary
cut to 32000 by default, ``--vocab`` to change it, so that the output layer does not swamp the
adapted layers).

    python experiments/bench_train.py                                 # both sizes, CPU fp32
    python experiments/bench_train.py --sizes smollm2-135m --steps 25
    python experiments/bench_train.py --precision fp32 bf16       # both, paired, on CPU
    python experiments/bench_train.py --device cuda --precision bf16 --threads 0
    python experiments/bench_train.py --sizes toy --steps 1 --warmup 0 --rss-repeats 0  # smoke
    python experiments/bench_train.py --table experiments/results/bench_train.json  # markdown
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import LlamaConfig, LlamaForCausalLM

from lori.core import (
    LoRIConfig,
    calibrate,
    count_trainable,
    get_B,
    get_masks,
    inject_lori,
    lori_layers,
    merge_lori,
    set_masks,
    trainable_parameters,
    unmerge_lori,
)
from lori.training.base_model import load_arch_config

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FIRST_LAYER_NO_DX = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")  # read the embeddings
SIZES = {"smollm2-135m": (2, 64, 12), "llama3-8b-2l": (1, 64, 7), "toy": (2, 16, 2)}  # batch, seq, steps
DEFAULT_SIZES = ["smollm2-135m", "llama3-8b-2l"]  # toy: a 2-layer width-64 model for smoke tests
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}  # dtype of the frozen base and compute
METHODS = ["floor", "floor_embed", "lori_d", "lori_s", "lora", "lori_s_p0", "lora_p0"]
RSS_METHODS = ["floor", "lori_d", "lori_s", "lora"]
TARGET_RATIOS = {
    "lori_s_vs_lora": 0.80, "lori_s_vs_floor": 1.10, "opt_state_lori_s_vs_lori_d": 0.12,
    "peak_rss_lori_s_vs_lora": 1.0,
}
TARGET_RATIOS_BF16 = {  # issue 15: bf16 compute with fp32 adapters
    "floor_bf16_vs_fp32": 0.60, "lori_s_vs_floor": 1.12, "lori_s_vs_lora": 0.90,
    "opt_state_lori_s_bf16_vs_lori_d_fp32": 0.105,  # 0.10 (a bf16 state would give 0.05)
    "opt_state_lori_s_vs_lori_d": 0.12, "peak_rss_lori_s_vs_lora": 1.0,
}


# ---- models ------------------------------------------------------------------------------
def model_config(size: str, vocab: int, layers: int = 0) -> LlamaConfig:
    """The architecture of a benchmark size, without a KV cache (training); ``layers`` (0: the
    size's own) sets the depth of ``llama3-8b-2l``."""
    if size == "toy":
        return LlamaConfig(
            hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
            num_hidden_layers=2, vocab_size=512, max_position_embeddings=128, use_cache=False,
        )
    if size == "smollm2-135m":
        return LlamaConfig(
            hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
            head_dim=64, num_hidden_layers=30, vocab_size=49152, tie_word_embeddings=True,
            max_position_embeddings=8192, rms_norm_eps=1e-5, use_cache=False,
        )
    return load_arch_config("llama3_8b", num_hidden_layers=layers or 2, vocab_size=vocab, use_cache=False)


def build_base(args: argparse.Namespace, size: str, precision: str = "fp32") -> nn.Module:
    """Random-init (seeded) frozen base model on the benchmark device, in the precision's dtype
    (the same weights for every precision, rounded once to bf16)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        with torch.device(args.device):
            model = LlamaForCausalLM(model_config(size, args.vocab, args.layers))
    model.to(PRECISIONS[precision]).requires_grad_(False)
    return model.train()


def share_weights(base: nn.Module) -> nn.Module:
    """A copy of ``base`` holding the very same parameter tensors (all frozen, so safe)."""
    return copy.deepcopy(base, memo={id(p): p for p in base.parameters()})


def require_grad_hook(module: nn.Module, inputs: tuple, output: Tensor) -> Tensor:
    return output if output.requires_grad else output.requires_grad_()


def make_method(name: str, base: nn.Module, args: argparse.Namespace) -> nn.Module:
    """The model a method trains, on ``base``'s weights; ``*_p0`` variants use dropout 0."""
    model = share_weights(base)
    dropout = 0.0 if name.endswith("_p0") else args.dropout
    if name in ("floor", "floor_embed"):
        hooked = ("embed_tokens",) if name == "floor_embed" else tuple(TARGETS)
        for path, module in model.named_modules():
            if path.rsplit(".", 1)[-1] in hooked:
                module.register_forward_hook(require_grad_hook)
    elif name.startswith("lori"):
        config = LoRIConfig(r=args.r, alpha=args.alpha, dropout=dropout, target_modules=TARGETS)
        inject_lori(model, config)
        if name.startswith("lori_s"):
            make_lori_s(model)
    elif name.startswith("lora"):
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            r=args.r, lora_alpha=args.alpha, lora_dropout=dropout, target_modules=TARGETS
        )
        # adapters fp32 on a bf16 base (PEFT's default), as LoRI's A and B and lori.training.baselines.attach
        model = get_peft_model(model, config, autocast_adapter_dtype=True)
    else:
        raise ValueError(f"unknown method {name!r}; choose from {METHODS + ['floor_embed']}")
    return model.train()


def make_lori_s(model: nn.Module) -> None:
    """The LoRI-S phase: a model-wise 90% mask calibrated on (random) dense B, then B reset."""
    g = torch.Generator().manual_seed(1)
    for layer in lori_layers(model).values():
        layer.lori_B.data.copy_(torch.randn(layer.lori_B.shape, generator=g))
    set_masks(model, calibrate(get_B(model), 0.9, "model"), reset=True)


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer | None:
    """AdamW over the trainable parameters, as ``LoRIModule.configure_optimizers`` builds it."""
    params = trainable_parameters(model)
    if not params:
        return None
    return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, betas=(0.9, 0.999))


@dataclass
class Runner:
    """One method: its model, optimizer and training step."""

    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer | None

    @classmethod
    def build(cls, name: str, base: nn.Module, args: argparse.Namespace) -> Runner:
        model = make_method(name, base, args)
        return cls(name, model, make_optimizer(model))

    def step(self, ids: Tensor) -> None:
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
        logits = self.model(input_ids=ids).logits
        loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        if self.optimizer is not None:
            self.optimizer.step()


# ---- timing ------------------------------------------------------------------------------
def sync() -> None:
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """Wall-clock and process CPU seconds of one call, with Python's cyclic GC held off."""
    gc.collect()
    gc.disable()
    try:
        sync()
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        sync()
        return time.perf_counter() - wall, time.process_time() - cpu
    finally:
        gc.enable()


Samples = dict[str, list[tuple[float, float]]]  # name -> (wall, CPU) seconds, one per round


def interleaved(fns: dict[str, Callable[[], object]], warmup: int, steps: int) -> Samples:
    """(wall, CPU) seconds of each function in each of ``steps`` rounds after ``warmup``.

    Every round calls each function once, in a fresh seeded random order, so that no function
    always follows the same one (whose freed memory or cache state it would inherit).
    """
    order, times = random.Random(0), {k: [] for k in fns}
    for i in range(warmup + steps):
        for name in order.sample(list(fns), len(fns)):
            t = timed(fns[name])
            if i >= warmup:
                times[name].append(t)
    return times


def median_s(samples: Samples, name: str, col: int = 0) -> float:
    """Median seconds of ``name``: wall clock (col 0) or CPU time (col 1)."""
    return statistics.median(t[col] for t in samples[name])


def best_ratio(samples: Samples, a: str, b: str) -> float:
    """a's fastest step over b's: interference only adds time, so minima are the least noisy."""
    return round(min(t[0] for t in samples[a]) / min(t[0] for t in samples[b]), 3)


def paired_ratio(samples: Samples, a: str, b: str, col: int = 0) -> float:
    """Median over rounds of a's time over b's in the same round (cancels drifting load)."""
    return round(statistics.median(x[col] / y[col] for x, y in zip(samples[a], samples[b])), 3)


def forward_times(base: nn.Module, lori_s: nn.Module, ids: Tensor, steps: int) -> dict:
    """Eval-mode forward of the base, LoRI-S unmerged and LoRI-S merged, interleaved pairwise.

    Merging edits the shared base weights in place: harmless, as every training step has been
    timed already and the cost does not depend on the values. Unmerged again afterwards.
    """
    base.eval()
    lori_s.eval()

    def run(model: nn.Module) -> Callable[[], object]:
        return lambda: model(input_ids=ids)

    with torch.no_grad():
        unmerged = interleaved({"base": run(base), "lori_s": run(lori_s)}, 1, steps)
        merge_lori(lori_s)
        merged = interleaved({"base": run(base), "lori_s": run(lori_s)}, 1, steps)
        unmerge_lori(lori_s)
    return {
        "base_ms": ms(median_s(merged, "base")),
        "lori_s_unmerged_ms": ms(median_s(unmerged, "lori_s")),
        "lori_s_merged_ms": ms(median_s(merged, "lori_s")),
        "unmerged_vs_base": paired_ratio(unmerged, "lori_s", "base"),
        "merged_vs_base": paired_ratio(merged, "lori_s", "base"),
        "merged_vs_base_cpu": paired_ratio(merged, "lori_s", "base", col=1),
    }


def ms(seconds: float) -> float:
    return round(seconds * 1e3, 1)


# ---- counts ------------------------------------------------------------------------------
def optimizer_state_bytes(optimizer: torch.optim.Optimizer | None) -> int:
    if optimizer is None:
        return 0
    tensors = [t for s in optimizer.state.values() for t in s.values() if isinstance(t, Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors)


def matmul_flops(base: nn.Module, tokens: int, r: int) -> dict[str, float]:
    """Linear-layer matmul FLOPs of one step: the floor's, and each method's over the floor's.

    Floor: every linear layer's forward, and its input gradient unless its input needs none
    (layer 0's q/k/v/gate/up read the frozen embeddings). An adapter on a d_in x d_out layer adds
    forward A x and B h, backward B^T g, g h^T and A^T dh (LoRA also dh x^T, the gradient of A).
    """
    floor = adapter = lora_extra = 0
    for path, m in base.named_modules():
        if not isinstance(m, nn.Linear):
            continue
        name = path.rsplit(".", 1)[-1]
        no_dx = ".layers.0." in path and name in FIRST_LAYER_NO_DX
        floor += 2 * tokens * m.in_features * m.out_features * (1 if no_dx else 2)
        if name in TARGETS:
            dx = 0 if no_dx else m.in_features
            adapter += 2 * tokens * r * (m.in_features + 3 * m.out_features + dx)
            lora_extra += 2 * tokens * r * m.in_features
    return {
        "floor_gflop": round(floor / 1e9, 2),
        "lori": round(1 + adapter / floor, 4),
        "lora": round(1 + (adapter + lora_extra) / floor, 4),
    }


def trainable_counts(runners: dict[str, Runner]) -> dict[str, int]:
    counts = {k: count_trainable(r.model) for k, r in runners.items() if r.optimizer is not None}
    if "lori_s" in runners:
        masks = get_masks(runners["lori_s"].model).values()
        counts["lori_s_mask"] = sum(int(m.sum()) for m in masks)
    return counts


# ---- one size ----------------------------------------------------------------------------
def input_ids(args: argparse.Namespace, size: str, vocab: int) -> Tensor:
    batch, seq, _ = SIZES[size]
    batch, seq = args.batch or batch, args.seq or seq
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (batch, seq), generator=g).to(args.device)


def bench_size(args: argparse.Namespace, size: str) -> list[dict]:
    """All in-process figures for one size, every precision stepped in the same rounds, then the
    per-method subprocess memory figures; one result per precision."""
    bases = {prec: build_base(args, size, prec) for prec in args.precision}
    vocab = next(iter(bases.values())).config.vocab_size
    ids = input_ids(args, size, vocab)
    runners = {(prec, name): Runner.build(name, base, args) for prec, base in bases.items()
               for name in args.methods}
    log(f"[{size}] timing {args.methods} x {args.precision} on {tuple(ids.shape)} tokens")
    steps = {f"{name}@{prec}": (lambda r=r: r.step(ids)) for (prec, name), r in runners.items()}
    rounds = args.steps or SIZES[size][2]
    every = interleaved(steps, args.warmup, rounds)
    results = []
    for prec, base in bases.items():
        samples = {name: every[f"{name}@{prec}"] for name in args.methods}
        mine = {name: runners[prec, name] for name in args.methods}
        result = precision_figures(base, ids, samples, mine, args) | {"size": size, "precision": prec}
        if "lori_s" in mine:
            log(f"[{size}, {prec}] eval forward: base vs LoRI-S unmerged / merged")
            result["forward"] = forward_times(base, mine["lori_s"].model, ids, rounds)
        results.append((result, samples))
    del runners, steps, bases
    gc.collect()
    for result, samples in results:
        result["peak_rss_bytes"] = peak_memory(args, size, result["precision"])
        result["ratios"] = summary_ratios(result, samples)
        result["steps"] = rounds
    out = [result for result, _ in results]
    cross_precision_ratios(out, every)
    return out


def precision_figures(base: nn.Module, ids: Tensor, samples: Samples, runners: dict[str, Runner],
                      args: argparse.Namespace) -> dict:
    """Step times, ratios to the floor, FLOP bound, optimizer state and counts of one precision."""
    floor = "floor" if "floor" in samples else None
    return {
        "batch": ids.shape[0], "seq": ids.shape[1], "vocab": base.config.vocab_size,
        "layers": base.config.num_hidden_layers,
        "params": sum(p.numel() for p in base.parameters()),
        "step_ms": {k: ms(median_s(samples, k)) for k in samples},
        "step_cpu_ms": {k: ms(median_s(samples, k, col=1)) for k in samples},
        "step_vs_floor": {k: paired_ratio(samples, k, floor) for k in samples} if floor else {},
        "step_cpu_vs_floor": {
            k: paired_ratio(samples, k, floor, col=1) for k in samples} if floor else {},
        "matmul_bound": matmul_flops(base, ids.numel(), args.r),
        "optimizer_state_bytes": {k: optimizer_state_bytes(r.optimizer)
                                  for k, r in runners.items()},
        "trainable": trainable_counts(runners),
    }


def summary_ratios(result: dict, samples: Samples) -> dict:
    """The issue's target ratios (with CPU-time companions) and whether each target is met."""
    opt, rss = result["optimizer_state_bytes"], result["peak_rss_bytes"]
    pairs = [
        ("lori_s_vs_lora", "lori_s", "lora"), ("lori_s_vs_floor", "lori_s", "floor"),
        ("lori_s_vs_lora_p0", "lori_s_p0", "lora_p0"), ("lori_s_p0_vs_floor", "lori_s_p0", "floor"),
    ]
    ratios = {}
    for key, a, b in pairs:
        if a in samples and b in samples:
            ratios[key] = paired_ratio(samples, a, b)
            ratios[key + "_cpu"] = paired_ratio(samples, a, b, col=1)
            ratios[key + "_best"] = best_ratio(samples, a, b)
    if opt.get("lori_d"):
        ratios["opt_state_lori_s_vs_lori_d"] = round(opt.get("lori_s", 0) / opt["lori_d"], 4)
    if "lori_s" in rss and "lora" in rss:
        s, lora = rss["lori_s"], rss["lora"]
        ratios["peak_rss_lori_s_vs_lora"] = round(s["peak"] / lora["peak"], 4)
        ratios["peak_over_base_lori_s_vs_lora"] = round(s["over_base"] / lora["over_base"], 4)
    if "forward" in result:
        ratios["merged_vs_base_forward"] = result["forward"]["merged_vs_base"]
    targets = TARGET_RATIOS_BF16 if result.get("precision") == "bf16" else TARGET_RATIOS
    ratios["met"] = {k: ratios[k] <= v for k, v in targets.items() if k in ratios}
    return ratios


def cross_precision_ratios(results: list[dict], every: Samples) -> None:
    """Into the bf16 result, when fp32 ran in the same rounds: floor bf16 / fp32 (paired, CPU
    time, fastest steps) and LoRI-S's optimizer state in bf16 mode over LoRI-D's in fp32."""
    by = {r["precision"]: r for r in results}
    if not {"fp32", "bf16"} <= set(by):
        return
    ratios = by["bf16"]["ratios"]
    if "floor@fp32" in every:
        ratios["floor_bf16_vs_fp32"] = paired_ratio(every, "floor@bf16", "floor@fp32")
        ratios["floor_bf16_vs_fp32_cpu"] = paired_ratio(every, "floor@bf16", "floor@fp32", col=1)
        ratios["floor_bf16_vs_fp32_best"] = best_ratio(every, "floor@bf16", "floor@fp32")
    d32 = by["fp32"]["optimizer_state_bytes"].get("lori_d")
    if d32:
        s16 = by["bf16"]["optimizer_state_bytes"].get("lori_s", 0)
        ratios["opt_state_lori_s_bf16_vs_lori_d_fp32"] = round(s16 / d32, 4)
    ratios["met"] = {k: ratios[k] <= v for k, v in TARGET_RATIOS_BF16.items() if k in ratios}


# ---- peak memory: one fresh process per method -------------------------------------------
def resident_bytes(field: str) -> int:
    """``VmRSS`` or ``VmHWM`` of this process in bytes (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def release_free_memory() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def rss_child(args: argparse.Namespace, size: str, method: str) -> dict:
    """Child process: build, reset the high-water mark, train, print the peak as JSON."""
    base = build_base(args, size, args.precision[0])
    ids = input_ids(args, size, base.config.vocab_size)
    release_free_memory()
    rss_base = resident_bytes("VmRSS")
    runner = Runner.build(method, base, args)
    release_free_memory()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS (Linux >= 4.0)
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for _ in range(2):  # the first step allocates the optimizer state, the second runs with it
        runner.step(ids)
    sync()
    peak = resident_bytes("VmHWM")
    out = {"peak": peak, "over_base": peak - rss_base}
    if cuda:
        out["cuda_peak_allocated"] = torch.cuda.max_memory_allocated()
    print(json.dumps(out))
    return out


def peak_memory(args: argparse.Namespace, size: str, precision: str = "fp32") -> dict[str, dict[str, int]]:
    """Median over ``--rss-repeats`` fresh processes per method, methods interleaved."""
    methods = [m for m in RSS_METHODS if m in args.methods]
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    script = os.path.abspath(__file__)
    for _ in range(args.rss_repeats):
        for method in methods:
            log(f"[{size}, {precision}] peak memory of {method} in a fresh process")
            cmd = [sys.executable, script, "--rss-child", size, method, "--precision", precision,
                   *child_args(args)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            runs[method].append(json.loads(out.strip().splitlines()[-1]))
    return {
        m: {k: int(statistics.median(r[k] for r in rs)) for k in rs[0]}
        for m, rs in runs.items() if rs
    }


def child_args(args: argparse.Namespace) -> list[str]:
    keep = ["threads", "device", "r", "alpha", "dropout", "vocab", "layers", "batch", "seq"]
    return [a for k in keep for a in (f"--{k}", str(getattr(args, k)))]


# ---- report ------------------------------------------------------------------------------
NAMES = {"floor": "floor", "floor_embed": "floor to embeddings", "lori_d": "LoRI-D",
         "lori_s": "LoRI-S", "lora": "PEFT LoRA", "lori_s_p0": "LoRI-S, p = 0",
         "lora_p0": "PEFT LoRA, p = 0"}


def markdown_table(results: list[dict]) -> str:
    """One column per size: step times (x floor), target ratios, state, counts, memory."""
    rows: list[tuple[str, list[str]]] = [
        ("batch x seq; timed steps per method", [
            f"{r['batch']} x {r['seq']}; {r['steps']}" for r in results]),
    ]
    for m in METHODS:
        rows.append((f"step ms: {NAMES[m]} (x floor)", [
            f"{r['step_ms'][m]:.0f} ({r['step_vs_floor'][m]:.3f})" if m in r["step_ms"] else "-"
            for r in results]))
    rows.append(("matmul FLOP bound x floor: LoRI / LoRA", [
        f"{r['matmul_bound']['lori']:.3f} / {r['matmul_bound']['lora']:.3f}" for r in results]))
    for key, label in [("lori_s_vs_lora", "LoRI-S / LoRA step (<= 0.80)"),
                       ("lori_s_vs_floor", "LoRI-S / floor step (<= 1.10)"),
                       ("lori_s_vs_lora_cpu", "LoRI-S / LoRA step, CPU time"),
                       ("lori_s_vs_floor_cpu", "LoRI-S / floor step, CPU time"),
                       ("lori_s_vs_lora_best", "LoRI-S / LoRA, fastest steps"),
                       ("lori_s_vs_floor_best", "LoRI-S / floor, fastest steps"),
                       ("lori_s_vs_lora_p0", "LoRI-S / LoRA step, p = 0"),
                       ("opt_state_lori_s_vs_lori_d", "LoRI-S / LoRI-D optimizer state (<= 0.12)"),
                       ("floor_bf16_vs_fp32", "bf16 floor / fp32 floor (<= 0.60)"),
                       ("opt_state_lori_s_bf16_vs_lori_d_fp32",
                        "LoRI-S bf16 / LoRI-D fp32 optimizer state (0.10)"),
                       ("peak_rss_lori_s_vs_lora", "LoRI-S / LoRA peak RSS (<= 1)"),
                       ("merged_vs_base_forward", "merged LoRI-S / base forward (~1)")]:
        rows.append((label, [f"{r['ratios'].get(key, float('nan')):.3f}" for r in results]))
    for m in ("lori_d", "lori_s", "lora"):
        rows.append((f"optimizer state MB: {NAMES[m]}", [
            f"{r['optimizer_state_bytes'][m] / 1e6:.2f}" for r in results]))
    rows.append(("trainable: LoRI-D / LoRI-S (mask) / LoRA", [
        "{lori_d:,} / {lori_s:,} ({lori_s_mask:,}) / {lora:,}".format(**r["trainable"])
        for r in results]))
    for m in RSS_METHODS:
        rows.append((f"peak RSS MB: {NAMES[m]} (over base)", [
            "{:.0f} ({:.0f})".format(r["peak_rss_bytes"][m]["peak"] / 2**20,
                                     r["peak_rss_bytes"][m]["over_base"] / 2**20)
            if m in r["peak_rss_bytes"] else "-" for r in results]))
    header = "| | " + " | ".join(f"{r['size']} {r.get('precision', 'fp32')}" for r in results) + " |"
    lines = [header, "|---" * (len(results) + 1) + "|"]
    lines += ["| " + label + " | " + " | ".join(cells) + " |" for label, cells in rows]
    return "\n".join(lines)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", default=DEFAULT_SIZES, choices=list(SIZES))
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--steps", type=int, default=0, help="timed steps per method (0: 12 for "
                        "smollm2-135m, 7 for llama3-8b-2l)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: as is)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", nargs="+", default=["fp32"], choices=list(PRECISIONS),
                        help="fp32, and / or bf16: base and compute in bf16, adapters and AdamW fp32")
    parser.add_argument("--r", type=int, default=32)
    parser.add_argument("--alpha", type=float, default=64.0)
    parser.add_argument("--dropout", type=float, default=0.05)
    parser.add_argument("--vocab", type=int, default=32000, help="vocabulary of llama3-8b-2l")
    parser.add_argument("--layers", type=int, default=0, help="decoder layers of llama3-8b-2l (0: 2)")
    parser.add_argument("--batch", type=int, default=0, help="batch size (0: per-size default)")
    parser.add_argument("--seq", type=int, default=0, help="sequence length (0: per-size default)")
    parser.add_argument("--rss-repeats", type=int, default=1, help="processes per method (0: skip)")
    parser.add_argument("--table", metavar="JSONL", help="print a results file as markdown")
    parser.add_argument("--rss-child", nargs=2, metavar=("SIZE", "METHOD"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the sizes (one JSON line per size and precision on stdout) and return the results."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.rss_child:
        rss_child(args, *args.rss_child)
        return []
    if args.table:
        with open(args.table) as f:
            print(markdown_table([json.loads(line) for line in f if line.strip()]))
        return []
    out = []
    for size in args.sizes:
        start = time.perf_counter()
        results = bench_size(args, size)
        seconds = round(time.perf_counter() - start, 1)
        for result in results:
            bf16 = result["precision"] == "bf16"
            result.update(
                benchmark="train_step", device=args.device, dtype=str(PRECISIONS[result["precision"]]).removeprefix("torch."),
                adapter_dtype="float32", threads=torch.get_num_threads(), r=args.r, alpha=args.alpha,
                dropout=args.dropout, sparsity=0.9, targets=TARGETS, warmup=args.warmup,
                torch=torch.__version__, target_ratios=TARGET_RATIOS_BF16 if bf16 else TARGET_RATIOS,
                seconds=seconds,
            )
            print(json.dumps(result), flush=True)
        out += results
    return out


if __name__ == "__main__":
    main()
