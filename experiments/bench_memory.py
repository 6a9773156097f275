"""Memory of a quantized base and of activation checkpointing, measured on CPU (issue 23's targets).

Every figure is a ratio against a peer measured in the same run; steps and peaks are measured in
fresh processes (one per setting) so that each peak is its own.

    python experiments/bench_memory.py                                  # every part, ~40 min on 2 cores
    python experiments/bench_memory.py --parts base_bytes llama3        # some parts
    python experiments/bench_memory.py --tiny --out /tmp/b.json         # toy sizes, seconds: its test

Parts (targets in brackets):

    base_bytes     SmolLM2-135M-Instruct (the default model): bytes of the stored base (parameters,
                   buffers, quantized codes and their state) with ``model.quantize: nf4`` and the
                   default ``model.dtype`` (auto), and with int8, over the fp32 base's   [nf4 <= 0.30]
    rss            peak RSS during a LoRI-S training step (the default config's r, batch 4 x 384):
                   NF4 base over the fp32 base at the same compute dtype (fp32), and NF4 with
                   model.dtype auto; each in a fresh process, the high-water mark reset right before
                   the timed step; with what is held between steps, what the step adds and the
                   activations autograd saves (``step_figures``)                         [<= 0.6]
    pipeline       ``lori pipeline`` on configs/experiment/default.yaml with model.dtype float32, with
                   an NF4 base and without: held-out loss after LoRI-D and LoRI-S (NF4 within 3% of
                   fp32) and the overlap of the calibrated masks (|M_nf4 & M_fp32| / |M_fp32|)
    base_loss      held-out loss of the untrained base: fp32, lori's NF4 (double quantization on and
                   off, blocksize 64 and 32), FP4, int8, and transformers' own QLoRA NF4 loading of
                   the same dequantized folder: whether the pipeline's NF4 gap is lori's or NF4's
    checkpointing  a LoRI-S step at batch 4 x 1024 with and without model.gradient_checkpointing
                   (lori.training.activation_checkpointing): peak memory of the step (VmHWM over
                   the RSS before it) and step time              [memory <= 0.5x, time <= 1.4x]
    llama3         a Llama-3-8B-shaped model with 2 decoder layers (configs/arch/llama3_8b.json,
                   random init, bf16): measured bytes of the NF4 and int8 base against ``lori
                   dryrun``'s weights term (``memory_model.base_weight_bytes``)          [within 5%]

``--tiny``: tiny-llama (2 layers, hidden 32) and a Llama-3-shaped toy, toy batches, the pipeline on
the toy GSM8K file: the same code paths in seconds. Results: experiments/results/bench_memory.json
(with the command, date and commit) unless ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "experiments"))  # bench_train and _common sit beside this file
from bench_train import release_free_memory, resident_bytes

PARTS = ["base_bytes", "rss", "pipeline", "base_loss", "checkpointing", "llama3"]
TARGETS = {"base_bytes_nf4_vs_fp32": 0.30, "rss_lori_s_nf4_vs_fp32": 0.6, "val_loss_nf4_vs_fp32_within": 0.03,
           "checkpointing_peak_vs_plain": 0.5, "checkpointing_time_vs_plain": 1.4, "llama3_vs_dry_run_within": 0.05}
LLAMA3_TINY = {"hidden_size": 256, "intermediate_size": 896, "num_attention_heads": 4, "num_key_value_heads": 1,
               "head_dim": 64, "vocab_size": 2048}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---- models and steps --------------------------------------------------------------------
def load(tiny: bool, dtype: str, quantize: str | None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The default model (or tiny-llama) as ``lori pipeline`` builds it, and the default config's model section."""
    from _common import base_config  # experiments/_common.py

    from lori.training.module import build_model

    config = base_config(tiny, Path(tempfile.mkdtemp(prefix="bench_memory_cfg_")))
    model, _ = build_model("tiny-llama" if tiny else config["model"]["model"], None, dtype, None, quantize)
    return model, config


def stored_bytes(model: torch.nn.Module) -> int:
    """Bytes the base holds: its floating-point parameters and buffers (each storage once) plus the
    quantized layers' codes and quantization state (``lori.training.quantize.quantized_bytes``)."""
    from lori.training.quantize import quantized_bytes

    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in [*model.parameters(), *model.buffers()] if t.is_floating_point()}
    return sum(storages.values()) + quantized_bytes(model)


def lori_s_model(model: torch.nn.Module, config: dict[str, Any]) -> torch.nn.Module:
    """LoRI injected with the config's settings, B drawn, calibrated to a mask, reset: a LoRI-S model."""
    from lori.core import LoRIConfig, calibrate, get_B, inject_lori, lori_layers, set_masks

    lori = LoRIConfig.from_dict(config["model"]["lori"])
    inject_lori(model, lori)
    g = torch.Generator().manual_seed(0)
    for layer in lori_layers(model).values():
        layer.lori_B.data.copy_(torch.randn(layer.lori_B.shape, generator=g))
    set_masks(model, calibrate(get_B(model), lori.sparsity, lori.granularity), reset=True)
    return model.train()


def step_figures(model: torch.nn.Module, batch: int, seq: int, steps: int, lr: float) -> dict[str, Any]:
    """One warm-up step (AdamW allocates its state; what autograd saves is counted in it), then
    ``steps`` timed steps, and the median step time. Memory, from /proc/self/status, in bytes:

        rss_before_bytes   VmRSS after the warm-up step, gc and malloc_trim: what the process holds
                           between steps (runtime, the base as stored, adapter, AdamW state); with its
                           anonymous and file-backed (mapped files: libraries, a mapped checkpoint) parts
        peak_rss_bytes     VmHWM over the timed steps, the high-water mark reset to VmRSS right before
                           them (clear_refs 5): the process's peak during a step, the load's excluded
        step_peak_bytes    peak_rss_bytes - rss_before_bytes: what a step adds (activations, gradients,
                           temporaries such as a 4-bit layer's weight dequantized for one matmul)
        saved_bytes        what autograd keeps from forward for backward (each storage once, parameters
                           and buffers excluded): the activations
    """
    from lori.core import trainable_parameters
    from lori.training.module import response_loss, split_lm_head

    decoder, head = split_lm_head(model)
    optimizer = torch.optim.AdamW(trainable_parameters(model), lr=lr)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)

    frozen = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in frozen:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    def step(count_saved: bool = False) -> float:
        start = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t) if count_saved else contextlib.nullcontext():
            hidden = decoder(input_ids=ids, attention_mask=mask, use_cache=False)[0]
            loss = response_loss(hidden, ids, head, "token_mean")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    step(count_saved=True)
    release_free_memory()
    before, anon, mapped = resident_bytes("VmRSS"), resident_bytes("RssAnon"), resident_bytes("RssFile")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    times = [step() for _ in range(steps)]
    peak = resident_bytes("VmHWM")
    return {"peak_rss_bytes": peak, "rss_before_bytes": before, "rss_before_anon_bytes": anon,
            "rss_before_file_bytes": mapped, "step_peak_bytes": peak - before, "saved_bytes": sum(saved.values()),
            "step_s": round(statistics.median(times), 3), "step_times_s": [round(t, 3) for t in times]}


def child(args: argparse.Namespace) -> None:
    """A fresh process: build the base, make it LoRI-S, run the steps, print the figures as JSON."""
    kind, dtype, quantize, ckpt, batch, seq = args.child
    from lori.training.activation_checkpointing import enable_activation_checkpointing

    model, config = load(args.tiny, dtype, None if quantize == "none" else quantize)
    release_free_memory()  # what loading and quantizing freed goes back to the OS (malloc_trim)
    lori_s_model(model, config)
    if ckpt == "ckpt":
        enable_activation_checkpointing(model)
    out = {"kind": kind, "dtype": dtype, "quantize": quantize, "checkpointing": ckpt == "ckpt",
           "batch": int(batch), "seq": int(seq), "base_bytes": stored_bytes(model)}
    out |= step_figures(model, int(batch), int(seq), 1 if args.tiny else args.steps, float(config["model"]["lr"]))
    print(json.dumps(out))


def in_fresh_process(args: argparse.Namespace, *spec: str) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", *spec, "--steps", str(args.steps)] + (["--tiny"] if args.tiny else [])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(spec)}: exited {done.returncode}: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---- parts -------------------------------------------------------------------------------
def part_base_bytes(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, dtype, quantize in (("fp32", "float32", None), ("nf4", "auto", "nf4"),
                                  ("nf4_rest_fp32", "float32", "nf4"), ("int8", "auto", "int8")):
        model, _ = load(args.tiny, dtype, quantize)
        out[f"{name}_bytes"] = stored_bytes(model)
        out[f"{name}_rest_dtype"] = str(model.get_input_embeddings().weight.dtype).removeprefix("torch.")
        del model
        release_free_memory()
    for name in ("nf4", "nf4_rest_fp32", "int8"):
        out[f"{name}_vs_fp32"] = round(out[f"{name}_bytes"] / out["fp32_bytes"], 4)
    out["met"] = out["nf4_vs_fp32"] <= TARGETS["base_bytes_nf4_vs_fp32"]
    return out


RSS_FIGURES = ("peak_rss_bytes", "rss_before_bytes", "step_peak_bytes", "saved_bytes", "base_bytes")


def part_rss(args: argparse.Namespace) -> dict[str, Any]:
    """fp32 base, NF4 base computing in fp32 (the same compute: the target's figure), NF4 base with the
    default ``model.dtype: auto`` (bf16 where the CPU has native bf16); each in a fresh process."""
    batch, seq = ("2", "32") if args.tiny else ("4", "384")
    runs = {name: in_fresh_process(args, "rss", dtype, quantize, "plain", batch, seq)
            for name, dtype, quantize in (("fp32", "float32", "none"), ("nf4", "float32", "nf4"),
                                          ("nf4_auto", "auto", "nf4"))}
    ratios = {n: {k.removesuffix("_bytes"): round(runs[n][k] / max(1, runs["fp32"][k]), 4) for k in RSS_FIGURES}
              for n in ("nf4", "nf4_auto")}
    return {"runs": runs, "nf4_vs_fp32": ratios["nf4"]["peak_rss"], "vs_fp32": ratios,
            "met": ratios["nf4"]["peak_rss"] <= TARGETS["rss_lori_s_nf4_vs_fp32"],
            "figure": "peak_rss: VmHWM over the timed LoRI-S step, reset to VmRSS right before it (the load's "
                      "peak excluded); rss_before: held between steps; step_peak: what the step adds; saved: "
                      "activations autograd keeps; base: the stored base (see step_figures)"}


def part_checkpointing(args: argparse.Namespace) -> dict[str, Any]:
    batch, seq = ("2", "64") if args.tiny else ("4", str(args.checkpointing_seq))
    runs = {ckpt: in_fresh_process(args, "checkpointing", "auto", "none", ckpt, batch, seq) for ckpt in ("plain", "ckpt")}
    peak = runs["ckpt"]["step_peak_bytes"] / max(1, runs["plain"]["step_peak_bytes"])
    speed = runs["ckpt"]["step_s"] / runs["plain"]["step_s"]
    return {"runs": runs, "peak_vs_plain": round(peak, 4), "time_vs_plain": round(speed, 4),
            "met": {"peak": peak <= TARGETS["checkpointing_peak_vs_plain"],
                    "time": speed <= TARGETS["checkpointing_time_vs_plain"]},
            "figure": "peak RSS over the timed steps minus the RSS before them (what the step adds)"}


def part_pipeline(args: argparse.Namespace) -> dict[str, Any]:
    from _common import base_config, write_yaml
    from safetensors.torch import load_file

    runs = {}
    for name, quantize in (("nf4", "nf4"), ("fp32", None)):
        folder = args.workdir / f"pipeline_{name}"
        if not (folder / "summary.json").is_file():
            config = base_config(args.tiny, args.workdir, **{"model.dtype": "float32", "model.quantize": quantize,
                                                              "pipeline.output_dir": str(folder)})
            path = write_yaml(config, args.workdir / f"pipeline_{name}.yaml")
            log(f"[bench_memory] lori pipeline --config {path}")
            subprocess.run([sys.executable, "-m", "lori", "pipeline", "--config", str(path)], cwd=REPO, check=True,
                           env={**os.environ, "PYTHONPATH": str(REPO)})
        runs[name] = json.loads((folder / "summary.json").read_text())
    losses = {name: {f"{stage}/{k}": v for stage in ("lori_d", "lori_s") for k, v in run.get(stage, {}).items()
                     if k.startswith("val_loss") and isinstance(v, (int, float))} for name, run in runs.items()}
    relative = {k: round(v / losses["fp32"][k] - 1, 4) for k, v in losses["nf4"].items() if k in losses["fp32"]}
    masks = {n: load_file(str(args.workdir / f"pipeline_{n}" / "calibration" / "masks.safetensors")) for n in runs}
    kept = sum(int(m.sum()) for m in masks["fp32"].values())
    both = sum(int((masks["nf4"][p] & masks["fp32"][p]).sum()) for p in masks["fp32"])
    return {"losses": losses, "nf4_vs_fp32_relative": relative, "mask_overlap": round(both / max(1, kept), 4),
            "met": bool(relative) and all(abs(v) <= TARGETS["val_loss_nf4_vs_fp32_within"] for v in relative.values()),
            "storage": {n: run.get("precision", {}).get("storage") for n, run in runs.items()}}


BASE_LOSS_VARIANTS: dict[str, dict[str, Any]] = {  # lori's quantize_base with bitsandbytes' settings
    "lori_nf4": {"mode": "nf4"}, "lori_nf4_no_double_quant": {"mode": "nf4", "double_quant": False},
    "lori_nf4_blocksize_32": {"mode": "nf4", "blocksize": 32}, "lori_fp4": {"mode": "fp4"},
    "lori_int8": {"mode": "int8"},
}


def part_base_loss(args: argparse.Namespace) -> dict[str, Any]:
    """Held-out loss of the untrained base (the pipeline's ``val_loss_before``) stored each way: fp32;
    lori's ``quantize_base`` (NF4 with and without double quantization, blocksize 32, FP4, int8);
    transformers' own QLoRA loading (``BitsAndBytesConfig(load_in_4bit, nf4, compute fp32)``) of the
    same dequantized folder. Everything computes in fp32 on the held-out examples of the default config."""
    import copy

    from _common import base_config, loaders_for
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from lori.ablation import held_out_loss
    from lori.training.module import build_model
    from lori.training.quantize import import_bitsandbytes, quantize_base

    import_bitsandbytes()
    config = base_config(args.tiny, args.workdir, **{"model.dtype": "float32"})
    fp32, tokenizer = build_model("tiny-llama" if args.tiny else config["model"]["model"], None, "float32", None)
    fp32.eval()
    if args.tiny:
        folder = args.workdir / "tiny_base"
        fp32.save_pretrained(folder)
    else:
        folder = Path(fp32.lori_load_info["cache_dir"])  # the GGUF dequantized to fp32 safetensors
    loader = loaders_for({"gsm8k": config}, tokenizer)["gsm8k"]
    losses = {"fp32": held_out_loss(fp32, loader)}
    log(f"[bench_memory] base_loss fp32 {losses['fp32']:.4f}")
    for name, settings in BASE_LOSS_VARIANTS.items():
        model = copy.deepcopy(fp32)
        settings = dict(settings)
        quantize_base(model, settings.pop("mode"), torch.float32, device="cpu", **settings)
        losses[name] = held_out_loss(model.eval(), loader)
        log(f"[bench_memory] base_loss {name} {losses[name]:.4f}")
        del model
        release_free_memory()
    for double_quant in (True, False):
        name = "transformers_nf4" + ("" if double_quant else "_no_double_quant")
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
                                   bnb_4bit_use_double_quant=double_quant)
        model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=quant, dtype=torch.float32,
                                                     device_map="cpu")
        for module in model.modules():  # the fp32 path lori's layers take (not the bf16 packed CPU kernel)
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False
        losses[name] = held_out_loss(model.eval(), loader)
        log(f"[bench_memory] base_loss {name} {losses[name]:.4f}")
        del model
        release_free_memory()
    relative = {k: round(v / losses["fp32"] - 1, 4) for k, v in losses.items() if k != "fp32"}
    return {"losses": {k: round(v, 4) for k, v in losses.items()}, "vs_fp32_relative": relative,
            "lori_nf4_vs_transformers_nf4": round(losses["lori_nf4"] / losses["transformers_nf4"] - 1, 4),
            "examples": config["data"].get("held_out"), "folder": str(folder) if not args.tiny else "tiny_base"}


def part_llama3(args: argparse.Namespace) -> dict[str, Any]:
    from lori.core import LoRIConfig
    from lori.training.base_model import build_from_arch_config
    from lori.training.memory_model import adapter_shape, base_weight_bytes
    from lori.training.quantize import quantize_base

    arch = args.workdir / "llama3_8b_2layers"
    arch.mkdir(parents=True, exist_ok=True)
    config = json.loads((REPO / "configs" / "arch" / "llama3_8b.json").read_text()) | {"num_hidden_layers": 2}
    config |= LLAMA3_TINY if args.tiny else {}
    (arch / "config.json").write_text(json.dumps(config, indent=1))
    lori = LoRIConfig()
    shape = adapter_shape(str(arch), lori.r, tuple(lori.target_modules))
    out: dict[str, Any] = {"arch": "configs/arch/llama3_8b.json, 2 layers" + (" (tiny widths)" if args.tiny else ""),
                           "params": shape.base_params}
    for mode in ("nf4", "int8"):
        model = build_from_arch_config(str(arch), device="meta", dtype=torch.bfloat16)
        model.to_empty(device="cpu")  # random init without transformers' (slow) initialisers
        with torch.no_grad():
            g = torch.Generator().manual_seed(0)
            for p in model.parameters():
                p.normal_(0.0, 0.02, generator=g)
        quantize_base(model, mode, torch.bfloat16)
        measured, term = stored_bytes(model), base_weight_bytes(shape, 2, mode)
        out[mode] = {"measured_bytes": measured, "dry_run_bytes": term, "ratio": round(measured / term, 5)}
        del model
        release_free_memory()
    out["met"] = all(abs(out[m]["ratio"] - 1) <= TARGETS["llama3_vs_dry_run_within"] for m in ("nf4", "int8"))
    return out


# ---- main --------------------------------------------------------------------------------
def commit() -> str:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=False)
    return done.stdout.strip() or "unknown"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", nargs="+", default=PARTS, choices=PARTS)
    parser.add_argument("--tiny", action="store_true", help="toy sizes: the test of this script")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per fresh process")
    parser.add_argument("--checkpointing-seq", type=int, default=1024, help="sequence length of the checkpointing part")
    parser.add_argument("--workdir", type=Path, help="runs and arch files (default: a fresh temp dir); "
                        "a pipeline run whose summary.json is there is read, not run again")
    parser.add_argument("--out", type=Path, help="JSON (default experiments/results/bench_memory.json)")
    parser.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.child:
        child(args)
        return {}
    args.workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench_memory_"))
    args.workdir.mkdir(parents=True, exist_ok=True)
    out = args.out or REPO / "experiments" / "results" / ("bench_memory_tiny.json" if args.tiny else "bench_memory.json")
    results: dict[str, Any] = {"command": "python experiments/bench_memory.py " + " ".join(argv or sys.argv[1:]),
                               "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "commit": commit(),
                               "device": "cpu", "threads": torch.get_num_threads(), "targets": TARGETS, "parts": {}}
    if out.is_file():  # parts measured before (another --parts run) are kept beside the new ones
        results["parts"] = json.loads(out.read_text()).get("parts", {})
    for part in args.parts:
        log(f"[bench_memory] {part}")
        start = time.perf_counter()
        results["parts"][part] = globals()[f"part_{part}"](args) | {
            "seconds": round(time.perf_counter() - start, 1), "commit": results["commit"], "date": results["date"],
            "command": results["command"]}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1))
    log(f"[bench_memory] wrote {out}")
    return results


if __name__ == "__main__":
    from _common import quiet

    quiet()
    main()
