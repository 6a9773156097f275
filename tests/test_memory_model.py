"""The memory model (lori/training/memory_model.py) and the budget search (memory_budget.py) behind
``lori dryrun``: a quantized base's bytes as bitsandbytes stores them, checkpointed activations, the
settings ladder, the paper's Llama-3-8B on a 12 GB card, and the command's options."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch
import yaml

from lori.commands.dryrun_command import budget_fits, format_budget_table, main, parse_size
from lori.core import LoRIConfig
from lori.training.memory_budget import cheapest, fits, ladder
from lori.training.memory_model import (
    GIB,
    AdapterShape,
    Plan,
    base_weight_bytes,
    memory_terms,
    quantized_weight_bytes,
)

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT / "configs" / "paper"
LLAMA_R32 = PAPER / "llama3_8b_r32_gsm8k.yaml"
DOC = ROOT / "docs" / "fit_your_gpu.md"
DOC_CONFIGS = [PAPER / f"{m}_r{r}_gsm8k.yaml" for m in ("llama3_8b", "mistral_7b") for r in (32, 64)]
DOC_BUDGETS = ["16GiB", "24GiB", "40GiB", "48GiB", "80GiB"]


def _bnb_bytes(tensor_or_state) -> int:
    """Bytes of a bitsandbytes QuantState, nested state included."""
    state = tensor_or_state
    total = sum(t.numel() * t.element_size() for t in (state.absmax, state.code, state.offset)
                if isinstance(t, torch.Tensor))
    return total + (_bnb_bytes(state.state2) if state.state2 is not None else 0)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("shape", [(96, 200), (64, 64), (1000, 77)])
def test_4bit_bytes_are_what_bitsandbytes_stores(quant_type, shape):
    import bitsandbytes.functional as F

    weight = torch.randn(*shape)
    codes, state = F.quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type=quant_type)
    stored = codes.numel() * codes.element_size() + _bnb_bytes(state)
    assert quantized_weight_bytes(*shape, quant_type) == stored


def test_int8_bytes_are_what_bitsandbytes_stores():
    import bitsandbytes.functional as F

    codes, scales, _ = F.int8_vectorwise_quant(torch.randn(96, 200).half())
    assert quantized_weight_bytes(96, 200, "int8") == codes.numel() + scales.numel() * scales.element_size()
    with pytest.raises(ValueError, match="nf3"):
        quantized_weight_bytes(96, 200, "nf3")


# a Llama-shaped toy: 2 layers of 7 linears, an untied head; every number checkable by hand
SHAPE = AdapterShape(
    base_params=2 * (4 * 64 * 64 + 3 * 64 * 128 + 128) + 2 * 100 * 64 + 64, layer_params=4 * 64 * 64 + 3 * 64 * 128 + 128,
    root_params=2 * 100 * 64 + 64, a_entries=2 * 8 * (4 * 64 + 2 * 64 + 128), adapted_weights=2 * (4 * 64 * 64 + 3 * 64 * 128),
    b_by_path=tuple((f"l{i}.{m}", 8 * (128 if m in ("gate", "up") else 64)) for i in range(2)
                    for m in ("q", "k", "v", "o", "gate", "up", "down")),
    trainable_dense=2 * 8 * (5 * 64 + 2 * 128), hidden=64, kv_hidden=64, intermediate=128, layers=2, vocab=100,
    linear_shapes=((64, 64),) * 4 + ((128, 64), (128, 64), (64, 128)),
)
PLAN = Plan("single", 1, False, 2, 4, 32)
LORI = LoRIConfig(r=8, alpha=16, dropout=0.0)


def test_a_quantized_base_stores_its_layers_in_half_a_byte_and_the_rest_as_is():
    linear = 2 * (4 * 64 * 64 + 3 * 64 * 128)
    assert base_weight_bytes(SHAPE, 2, None) == SHAPE.base_params * 2
    nf4 = base_weight_bytes(SHAPE, 2, "nf4")
    rest = (SHAPE.base_params - linear) * 2
    assert nf4 == rest + 2 * sum(quantized_weight_bytes(o, i, "nf4") for o, i in SHAPE.linear_shapes)
    assert 0.5 < quantized_weight_bytes(4096, 14336, "nf4") / (4096 * 14336) < 0.52  # codes + block scales
    assert base_weight_bytes(SHAPE, 2, "int8") == rest + linear + 4 * 2 * (4 * 64 + 2 * 128 + 64)
    terms = memory_terms(SHAPE, LORI, SHAPE.trainable_dense, False, dataclasses.replace(PLAN, quantize="nf4"))
    assert terms["weights"] == nf4 and terms["dequantized"] == 128 * 64 * 2  # one largest linear, bf16


def test_checkpointing_keeps_each_layer_input_and_one_layer():
    plain = memory_terms(SHAPE, LORI, SHAPE.trainable_dense, False, PLAN)
    ckpt = memory_terms(SHAPE, LORI, SHAPE.trainable_dense, False, dataclasses.replace(PLAN, checkpointing=True))
    tokens = 4 * 32
    assert ckpt["activations"] == 2 * tokens * 64 * 2 + plain["activations"] / 2
    assert {k: v for k, v in ckpt.items() if k not in ("activations", "total")} == \
        {k: v for k, v in plain.items() if k not in ("activations", "total")}


def test_lora_keeps_more_than_lori_for_the_same_setting():
    lora_trainable = SHAPE.a_entries + sum(n for _, n in SHAPE.b_by_path)
    for plan in (PLAN, dataclasses.replace(PLAN, autocast=True), dataclasses.replace(PLAN, quantize="nf4")):
        lori = memory_terms(SHAPE, LORI, SHAPE.trainable_dense, False, plan)
        lora = memory_terms(SHAPE, LORI, lora_trainable, False, plan, lora=True)
        assert lora["activations"] > lori["activations"] and lora["optimizer"] == 12 * lora_trainable


def test_the_ladder_keeps_the_global_batch_and_goes_from_cheap_to_slow():
    settings = ladder(PLAN, accumulate=8)
    assert all(s.micro_batch * s.accumulate == 32 for s in settings)
    labels = [s.label(settings[0]) for s in settings]
    assert labels[:3] == ["as configured", "checkpointing", "batch 2 x 16"]
    assert [s.quantize for s in settings] == [None] * 6 + ["int8"] * 6 + ["nf4"] * 6
    assert len(ladder(dataclasses.replace(PLAN, checkpointing=True, quantize="nf4", micro_batch=1), 8)) == 1


def test_cheapest_is_the_first_setting_that_fits():
    trainable = (SHAPE.trainable_dense, SHAPE.trainable_dense // 10)
    found = fits(SHAPE, LORI, trainable, PLAN, 8, budget_bytes=1e12)
    assert cheapest(found) is found[0] and all(f.fits for f in found)
    totals = sorted(max(f.lori_d, f.lori_s) for f in found)
    budget = (totals[0] + totals[1]) / 2  # only the smallest fits
    found = fits(SHAPE, LORI, trainable, PLAN, 8, budget)
    assert [f.fits for f in found].count(True) == 1 and max(cheapest(found).lori_d, cheapest(found).lori_s) == totals[0]
    assert cheapest(fits(SHAPE, LORI, trainable, PLAN, 8, budget_bytes=1)) is None


def test_llama3_8b_lori_fits_a_12_gb_card_with_nf4_and_checkpointing():
    """The issue's target: r = 32, batch 4 x 512, NF4 + checkpointing, one GPU: <= 12 GiB and <= QLoRA."""
    found = {f.setting: f for f in budget_fits(LLAMA_R32, {"12GiB": 12 * GIB})["12GiB"]}
    nf4 = next(f for s, f in found.items() if (s.quantize, s.checkpointing, s.micro_batch) == ("nf4", True, 4))
    assert nf4.fits and max(nf4.lori_d, nf4.lori_s) <= 12 * GIB
    assert nf4.lori_d <= nf4.lora and nf4.lori_s <= nf4.lora
    assert all(f.lori_d <= f.lora and f.lori_s <= f.lora for f in found.values())  # every setting of the ladder
    assert not next(iter(found.values())).fits  # as configured (bf16, no checkpointing) it does not


def test_parse_size():
    assert parse_size("24GiB") == parse_size("24 gib") == parse_size("24") == 24 * GIB
    assert parse_size("24GB") == 24e9 and parse_size("81920MiB") == 80 * GIB and parse_size("0.5T") == 512 * GIB


@pytest.mark.parametrize("bad", ["24XB", "-3GiB", "0", "GiB", ""])
def test_a_bad_gpu_memory_is_one_line_and_exit_2(bad, capsys):
    with pytest.raises(SystemExit) as err:
        main([f"--gpu-memory={bad}", str(LLAMA_R32)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert err.value.code == 2 and len(lines) == 1 and lines[0].startswith("lori: error: --gpu-memory")


def test_an_unknown_quantize_name_is_one_line_and_exit_2(tmp_path, capsys):
    cfg = yaml.safe_load(LLAMA_R32.read_text())
    cfg["model"]["quantize"] = "nf3"
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(SystemExit) as err:
        main([str(path)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert err.value.code == 2 and len(lines) == 1 and lines[0].startswith("lori: error: ") and "nf3" in lines[0]


def test_dryrun_takes_config_as_every_subcommand_does(capsys):
    main(["--config", str(LLAMA_R32)])
    flag = capsys.readouterr().out
    main([str(LLAMA_R32)])
    assert flag == capsys.readouterr().out and "llama3_8b_r32_gsm8k" in flag
    main(["--gpu-memory", "24GiB", "--config", str(LLAMA_R32)])
    listing = capsys.readouterr().out.splitlines()
    rows = [line for line in listing if line.rstrip().endswith(("yes", "no"))]
    assert rows[0].split()[0] == "checkpointing" and rows[-1].split()[:2] == ["as", "configured"]
    assert listing[-1].strip() == "cheapest that fits: checkpointing"


def test_the_docs_table_is_what_the_dry_run_prints(capsys):
    """docs/fit_your_gpu.md carries `lori dryrun --gpu-memory 16GiB,...,80GiB` of the paper's configs."""
    main(["--gpu-memory", ",".join(DOC_BUDGETS), *map(str, DOC_CONFIGS)])
    table = capsys.readouterr().out.strip()
    assert table.splitlines()[0] == "| config | " + " | ".join(DOC_BUDGETS) + " |"
    assert table in DOC.read_text()
    assert re.search(r"llama3_8b_r32_gsm8k \| [^|]*nf4|int8", table)  # the 16 GiB column needs a quantized base
    assert format_budget_table([], DOC_BUDGETS, {}).count("\n") == 1  # header only
