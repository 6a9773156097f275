"""Adapter files: PEFT round trip both ways, masks, published formats, atomic writes, corrupt files."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import make_tiny_llama
from peft import LoraConfig, PeftModel, get_peft_model

from lori.core import (
    AdapterFileError,
    LoRIConfig,
    adapter_from_model,
    apply_adapter,
    calibrate,
    get_A,
    get_B,
    get_masks,
    inject_lori,
    load_adapter,
    load_masks,
    lori_layers,
    save_adapter,
    set_masks,
)
from lori.core import io as lori_io
from lori.core.adapter import a_digest, base_fingerprint
from lori.core.io import (
    AIdentity,
    MaskRecord,
    find_mask_file,
    official_mask_path,
    read_a_identity,
    read_mask_file,
    read_mask_record,
)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _lori_s_model(seed: int = 0):
    model = make_tiny_llama()
    cfg = LoRIConfig(r=4, alpha=8, dropout=0.0, seed=seed, sparsity=0.8)
    inject_lori(model, cfg)
    g = torch.Generator().manual_seed(seed)
    for layer in lori_layers(model).values():
        layer.lori_B.data.copy_(torch.randn(layer.lori_B.shape, generator=g))
    set_masks(model, calibrate(get_B(model), 0.8), reset=True)
    for layer in lori_layers(model).values():  # LoRI-S values inside the mask
        layer.lori_B_values.data.copy_(torch.randn(layer.lori_B_values.shape, generator=g) * 0.1)
    return model, cfg


def test_reloaded_adapter_gives_identical_logits(tmp_path, tokens):
    model, cfg = _lori_s_model()
    out = model(tokens).logits
    save_adapter(adapter_from_model(model, cfg, "tiny", {"stage": "lori_s"}), tmp_path / "ad")
    assert sorted(os.listdir(tmp_path / "ad")) == [
        "adapter_config.json", "adapter_model.safetensors", "lori_masks.safetensors", "lori_meta.json",
    ]
    loaded = load_adapter(tmp_path / "ad")
    assert loaded.config == cfg and loaded.meta == {"stage": "lori_s"}
    fresh = make_tiny_llama()
    apply_adapter(fresh, loaded)
    assert torch.equal(fresh(tokens).logits, out)
    assert all(torch.equal(get_masks(fresh)[p], m) for p, m in get_masks(model).items())


def test_lori_adapter_loads_in_peft_with_same_logits(tmp_path, tokens):
    model, cfg = _lori_s_model()
    out = model(tokens).logits
    save_adapter(adapter_from_model(model, cfg, "tiny"), tmp_path / "ad")
    peft_model = PeftModel.from_pretrained(make_tiny_llama(), str(tmp_path / "ad")).eval()
    assert torch.allclose(peft_model(tokens).logits, out, atol=1e-5)


@pytest.mark.parametrize("with_mask", [False, True])
def test_plain_peft_lora_adapter_imports(tmp_path, tokens, with_mask):
    torch.manual_seed(0)
    peft_cfg = LoraConfig(r=4, lora_alpha=16, lora_dropout=0.05, target_modules=TARGETS, init_lora_weights=False)
    peft_model = get_peft_model(make_tiny_llama(), peft_cfg).eval()
    peft_model.save_pretrained(str(tmp_path / "peft"))
    want = peft_model(tokens).logits
    mask_file = None
    if with_mask:  # a mask file as released by the original code: torch.save of PEFT-named bools
        named = {n: torch.ones_like(p, dtype=torch.bool) for n, p in peft_model.named_parameters() if "lora_B" in n}
        mask_file = tmp_path / "masks.pt"
        torch.save(named, mask_file)
    ad = load_adapter(tmp_path / "peft", mask_file=mask_file)
    assert ad.config.r == 4 and ad.config.scale == 4.0 and (ad.masks is not None) == with_mask
    model = make_tiny_llama()
    apply_adapter(model, ad)
    assert torch.allclose(model(tokens).logits, want, atol=1e-5)


def test_original_lori_mask_file_layout(tmp_path):
    keys = {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight": torch.rand(32, 4) > 0.5,
        "base_model.model.model.layers.1.mlp.down_proj.lora_B.default.weight": torch.rand(32, 4) > 0.5,
    }
    torch.save(keys, tmp_path / "mask.pt")
    masks = load_masks(tmp_path / "mask.pt")
    assert set(masks) == {"model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"}
    assert all(m.dtype == torch.bool for m in masks.values())


def test_atomic_save_keeps_old_directory_on_crash(tmp_path, monkeypatch):
    model, cfg = _lori_s_model(0)
    target = tmp_path / "ad"
    save_adapter(adapter_from_model(model, cfg), target)
    old_bytes = (target / "adapter_model.safetensors").read_bytes()
    model2, cfg2 = _lori_s_model(1)

    def crash(*args, **kwargs):
        raise RuntimeError("killed mid-write")

    monkeypatch.setattr(lori_io, "save_file", crash)
    with pytest.raises(RuntimeError):
        save_adapter(adapter_from_model(model2, cfg2), target)
    assert (target / "adapter_model.safetensors").read_bytes() == old_bytes
    assert sorted(os.listdir(tmp_path)) == ["ad"]  # no temporary left behind


def test_crash_between_renames_is_recovered(tmp_path, monkeypatch):
    model, cfg = _lori_s_model(0)
    target = tmp_path / "ad"
    save_adapter(adapter_from_model(model, cfg), target)
    real_replace, calls = os.replace, []

    def flaky(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError("power cut")
        real_replace(src, dst)

    monkeypatch.setattr(lori_io.os, "replace", flaky)
    with pytest.raises(OSError):
        save_adapter(adapter_from_model(_lori_s_model(1)[0], cfg), target)
    monkeypatch.setattr(lori_io.os, "replace", real_replace)
    assert not target.exists()
    assert load_adapter(target).config == cfg  # old directory restored from its backup


def test_corrupt_and_missing_files_are_named(tmp_path):
    model, cfg = _lori_s_model(0)
    target = tmp_path / "ad"
    with pytest.raises(AdapterFileError, match="not an adapter directory"):
        load_adapter(target)
    save_adapter(adapter_from_model(model, cfg), target)
    weights = target / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(AdapterFileError, match="adapter_model.safetensors"):
        load_adapter(target)
    save_adapter(adapter_from_model(model, cfg), target)
    (target / "lori_meta.json").write_text("{not json")
    with pytest.raises(AdapterFileError, match="lori_meta.json"):
        load_adapter(target)
    save_adapter(adapter_from_model(model, cfg), target)
    (target / "lori_masks.safetensors").write_bytes(b"garbage")
    with pytest.raises(AdapterFileError, match="lori_masks"):
        load_adapter(target)
    with pytest.raises(AdapterFileError, match="does not exist"):
        load_masks(tmp_path / "nope.pt")
    (tmp_path / "x.pt").write_bytes(b"not a pickle")
    with pytest.raises(AdapterFileError, match="x.pt"):
        load_masks(tmp_path / "x.pt")
    cfg_json = json.loads((target / "adapter_config.json").read_text())
    cfg_json["peft_type"] = "IA3"
    (target / "adapter_config.json").write_text(json.dumps(cfg_json))
    with pytest.raises(AdapterFileError, match="IA3"):
        load_adapter(target)


# ---- what a mask was calibrated under ---------------------------------------------------------
def test_a_digest_names_one_A_in_any_dtype():
    model, _ = _lori_s_model(seed=3)
    digest = a_digest(get_A(model))
    assert len(digest) == 16
    assert a_digest({p: a.to(torch.bfloat16) for p, a in get_A(model).items()}) == digest  # fp32 or bf16 copy
    assert a_digest(get_A(_lori_s_model(seed=3)[0])) == digest  # the same seed draws the same A
    assert a_digest(get_A(_lori_s_model(seed=4)[0])) != digest
    other = {p: a.clone() for p, a in get_A(model).items()}
    other[min(other)][0, 0] += 0.5  # one entry of a covered module
    assert a_digest(other) != digest


def test_saved_masks_record_their_A_and_read_back(tmp_path):
    model, cfg = _lori_s_model(seed=3)
    adapter = adapter_from_model(model, cfg, "tiny")
    save_adapter(adapter, tmp_path / "ad")
    masks, record = read_mask_file(tmp_path / "ad" / "lori_masks.safetensors")
    assert set(masks) == set(get_masks(model)) and all(m.dtype == torch.bool for m in masks.values())
    assert record == MaskRecord(seed=3, digest=a_digest(get_A(model)), base_fingerprint=adapter.base_fingerprint,
                                r=4, sparsity=0.8, granularity="model")
    assert record.base_fingerprint == base_fingerprint(make_tiny_llama(), list(get_A(model)))
    assert load_masks(tmp_path / "ad" / "lori_masks.safetensors").keys() == masks.keys()  # old callers: the dict
    # the adapter's A read cheaply from its files: seed, digest of the saved A, base, rank
    assert read_a_identity(tmp_path / "ad") == AIdentity(3, record.digest, adapter.base_fingerprint, 4)
    assert record.mismatch(read_a_identity(tmp_path / "ad")) is None


def test_mask_files_without_a_record(tmp_path):
    model, _ = _lori_s_model()
    lori_io.save_file(get_masks(model), str(tmp_path / "old.safetensors"))  # written before records existed
    assert read_mask_record(tmp_path / "old.safetensors") is None
    torch.save({"base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight": torch.ones(32, 4).bool()},
               tmp_path / "0.9_mask.pt")
    masks, record = read_mask_file(tmp_path / "0.9_mask.pt")
    assert record is None and set(masks) == {"model.layers.0.self_attn.q_proj"}
    assert MaskRecord.from_metadata(None) is None and MaskRecord.from_metadata({"format": "pt"}) is None


def test_mask_record_mismatch_names_seeds_digests_base_and_rank():
    rec = MaskRecord(seed=2, digest="aaaa", base_fingerprint="base1", r=4, sparsity=0.9, granularity="model")
    assert rec.mismatch(AIdentity(2, "aaaa", "base1", 4)) is None
    why = rec.mismatch(AIdentity(4, "bbbb", "base1", 4))
    assert "A seed 2 (digest aaaa)" in why and "A seed 4 (digest bbbb)" in why
    assert "imported A" in rec.mismatch(AIdentity(None, "bbbb"))
    assert rec.mismatch(AIdentity(2, "bbbb")) is not None  # digests decide, whatever the seeds say
    assert rec.mismatch(AIdentity(3, None)) is not None  # no digest on one side: seeds decide
    assert rec.mismatch(AIdentity(2, None)) is None
    assert "fingerprint" in rec.mismatch(AIdentity(2, "aaaa", "base2"))
    assert rec.mismatch(AIdentity(2, "aaaa", None)) is None  # unknown base: nothing to compare
    assert "r=4" in rec.mismatch(AIdentity(2, "aaaa", "base1", 8))
    assert MaskRecord.from_metadata(rec.to_metadata()) == rec
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in rec.to_metadata().items())


def test_mask_discovery_in_a_directory(tmp_path):
    assert official_mask_path(tmp_path, 0.9) == tmp_path / "masks" / "0.9_mask.pt"  # str() of the float
    assert official_mask_path(tmp_path, 0.99, "layer") == tmp_path / "layerwise_masks" / "0.99_mask.pt"
    with pytest.raises(AdapterFileError, match="0.9_mask.pt"):
        find_mask_file(tmp_path, 0.9)
    (tmp_path / "masks").mkdir()
    torch.save({}, tmp_path / "masks" / "0.9_mask.pt")
    assert find_mask_file(tmp_path, 0.9) == tmp_path / "masks" / "0.9_mask.pt"
    assert find_mask_file(tmp_path / "masks" / "0.9_mask.pt", 0.5) == tmp_path / "masks" / "0.9_mask.pt"
    (tmp_path / "calibration").mkdir()
    (tmp_path / "calibration" / "masks.safetensors").write_bytes(b"")
    assert find_mask_file(tmp_path, 0.9) == tmp_path / "calibration" / "masks.safetensors"  # a lori run dir first
    with pytest.raises(AdapterFileError, match="does not exist"):
        find_mask_file(tmp_path / "nowhere", 0.9)


def test_core_imports_without_lightning():
    import subprocess
    import sys

    code = "import sys, lori.core; bad = [m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning')]; print(bad)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


# --- lori.core.adapter: the Adapter's own checks, the base fingerprint, check_fits -----------


def test_adapter_refuses_modules_and_shapes_that_do_not_pair():
    from lori.core.adapter import Adapter, AdapterMismatchError
    cfg = LoRIConfig(r=4, alpha=8)
    A = {k: torch.zeros(4, 3) for k in "abcde"}
    with pytest.raises(AdapterMismatchError) as info:
        Adapter(cfg, A, {"a": torch.zeros(5, 4)})
    assert str(info.value) == "A and B cover different modules: ['b', 'c', 'd']"
    for a, b in [(torch.zeros(4, 3), torch.zeros(5, 2)), (torch.zeros(4), torch.zeros(5, 4))]:
        with pytest.raises(AdapterMismatchError) as info:
            Adapter(cfg, {"m": a}, {"m": b})
        assert str(info.value) == f"m: A {tuple(a.shape)} and B {tuple(b.shape)} are not (r x in) and (out x r)"


def _linears(n: int = 5) -> torch.nn.Sequential:
    g = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(80, 2) for _ in range(n)])
    for m in model:
        m.weight.data.copy_(torch.randn(2, 80, generator=g))
    return model


def test_base_fingerprint_covers_the_first_64_entries_of_4_modules_in_bf16():
    model = _linears()
    paths = [str(i) for i in range(5)]
    digest = base_fingerprint(model, paths)
    assert len(digest) == 16
    assert base_fingerprint(_linears().to(torch.bfloat16), paths) == digest  # fp32 or bf16 base
    with torch.no_grad():
        model[4].weight[0, 0] += 1.0  # a fifth module: not covered
        model[0].weight[0, 64] += 1.0  # entry 65: not covered
    assert base_fingerprint(model, paths) == digest
    model[0].lori_weight_head = model[0].weight.detach().reshape(-1)[:64].clone()  # a quantized layer's kept head
    with torch.no_grad():
        model[0].weight.zero_()
    assert base_fingerprint(model, paths) == digest
    with torch.device("meta"):
        assert base_fingerprint(_linears(), paths) == "meta"
    assert a_digest({"x": torch.empty(2, 2, device="meta")}) == "meta"


def test_base_fingerprint_refuses_a_merged_layer():
    from lori.core import merge_lori
    from lori.core.adapter import AdapterMismatchError
    model, _ = _lori_s_model()
    merge_lori(model)
    path = min(lori_layers(model))
    with pytest.raises(AdapterMismatchError) as info:
        base_fingerprint(model, [path])
    assert str(info.value) == f"{path} is merged; unmerge before fingerprinting the base"


def test_check_fits_names_the_module_the_embeddings_and_the_base():
    from lori.core.adapter import SAVED_EMBEDDINGS, Adapter, AdapterMismatchError, check_fits
    cfg = LoRIConfig(r=2, alpha=4, target_modules=["0"])
    model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Embedding(10, 3))
    adapter = Adapter(cfg, {"0": torch.zeros(2, 3)}, {"0": torch.zeros(5, 2)}, None, "base", "meta")
    check_fits(model, adapter)  # a "meta" fingerprint compares with nothing
    missing = Adapter(cfg, {"7": torch.zeros(2, 3)}, {"7": torch.zeros(5, 2)})
    with pytest.raises(AdapterMismatchError) as info:
        check_fits(model, missing)
    assert str(info.value) == "adapter module '7' does not exist in Sequential: the adapter was trained on another base model"
    for rows in (10, 11):  # the base vocabulary, or it plus one '<PAD>' row
        adapter.meta = {SAVED_EMBEDDINGS: {"shapes": {"1": (rows, 3)}}}
        check_fits(model, adapter)
    for rows, cols in [(9, 3), (12, 3), (10, 4)]:
        adapter.meta = {SAVED_EMBEDDINGS: {"shapes": {"1": (rows, cols)}}}
        with pytest.raises(AdapterMismatchError) as info:
            check_fits(model, adapter)
        assert str(info.value) == (
            f"the adapter file holds 1.weight ({rows} x {cols}), this base has (10 x 3): lori ignores saved "
            "embeddings only when they are the base vocabulary or it plus one added '<PAD>' row (the original "
            "LoRI code's); use the base the adapter was trained on")
    adapter.meta = {SAVED_EMBEDDINGS: {"shapes": {"2": (10, 3)}}}
    with pytest.raises(AdapterMismatchError) as info:
        check_fits(model, adapter)
    assert str(info.value) == ("the adapter file holds 2.weight (10 x 3), Sequential has no module '2': "
                               "the adapter was trained on another base model")
    adapter.meta, adapter.base_fingerprint = {}, "0123456789abcdef"
    mine = base_fingerprint(model, ["0"])
    with pytest.raises(AdapterMismatchError) as info:
        check_fits(model, adapter)
    assert str(info.value) == (f"adapter was trained on base 'base' (fingerprint 0123456789abcdef); this model's "
                               f"weights differ (fingerprint {mine}). Pass strict_base=False to apply it anyway.")
    check_fits(model, adapter, strict_base=False)
    with torch.device("meta"):  # a base on the meta device has no digest: nothing to compare
        check_fits(torch.nn.Sequential(torch.nn.Linear(3, 5)), adapter)
    weight_only = torch.nn.Module()  # a module without in_features: its weight's shape
    weight_only.w = torch.nn.Module()
    weight_only.w.weight = torch.nn.Parameter(torch.zeros(5, 3))
    check_fits(weight_only, Adapter(cfg, {"w": torch.zeros(2, 3)}, {"w": torch.zeros(5, 2)}))


def test_adapter_refuses_masks_that_do_not_match_b_and_fits_a_packed_quantized_weight():
    from lori.core.adapter import Adapter, AdapterMismatchError, check_fits
    cfg = LoRIConfig(r=2, alpha=4, target_modules=["q"])
    A, B = {"q": torch.zeros(2, 3)}, {"q": torch.zeros(5, 2)}
    for masks, got in [({}, "None"), ({"q": torch.ones(2, 2, dtype=torch.bool)}, "(2, 2)")]:
        with pytest.raises(AdapterMismatchError) as info:
            Adapter(cfg, A, B, masks)
        assert str(info.value) == f"mask of q has shape {got}, B has (5, 2)"
    packed = torch.nn.Module()  # a quantized layer: in/out features, its weight the packed storage
    packed.q = torch.nn.Module()
    packed.q.in_features, packed.q.out_features = 3, 5
    packed.q.weight = torch.nn.Parameter(torch.zeros(8, 1, dtype=torch.uint8), requires_grad=False)
    check_fits(packed, Adapter(cfg, A, B), strict_base=False)
