"""lori.core.io file by file: exactly what save_adapter writes, what each reader returns, what it refuses.

Hand-made adapters of three modules (two nested paths and one top-level module without a dot) and
hand-written PEFT folders and mask files, so each test runs in milliseconds; the round trips through
a model live in tests/test_core_io.py and tests/test_published_adapter.py.
"""

from __future__ import annotations

import io
import json
import pickle
import struct
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lori.core import Adapter, AdapterFileError, LoRIConfig, load_adapter, load_masks, save_adapter
from lori.core.adapter import SAVED_EMBEDDINGS, a_digest
from lori.core.io import (
    AIdentity,
    MaskRecord,
    find_mask_file,
    peft_key,
    read_a_identity,
    read_mask_record,
    read_peft_weights,
)

PATHS = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "head"]
DAMAGED = "; the file is damaged or comes from a diverged run"


def _adapter(seed: int = 3, masks: bool = True, meta: dict | None = None) -> Adapter:
    g = torch.Generator().manual_seed(0)
    A = {p: torch.randn(2, 3, generator=g) for p in PATHS}
    B = {p: torch.randn(5, 2, generator=g) for p in PATHS}
    M = {p: (B[p] > 0).to(torch.uint8) for p in PATHS} if masks else None  # not bool: saved as bool
    cfg = LoRIConfig(r=2, alpha=4.0, dropout=0.1, target_modules=["q_proj", "down_proj", "head"],
                     sparsity=0.5, granularity="module", seed=seed)
    return Adapter(cfg, A, B, M, base_model="org/base", base_fingerprint="00ff00ff00ff00ff",
                   meta={"stage": "lori_s"} if meta is None else meta)


def _peft_dir(directory: Path, config: dict, tensors: dict[str, torch.Tensor]) -> Path:
    """A PEFT LoRA folder written by hand: adapter_config.json + adapter_model.safetensors, no lori files."""
    directory.mkdir()
    (directory / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    return directory


def _peft_tensors(adapter_name: str = "") -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    name = f".{adapter_name}" if adapter_name else ""
    out = {}
    for path in ["model.layers.0.self_attn.q_proj", "head"]:
        out[f"base_model.model.{path}.lora_A{name}.weight"] = torch.randn(2, 3, generator=g)
        out[f"base_model.model.{path}.lora_B{name}.weight"] = torch.randn(5, 2, generator=g)
    return out


# ---- what save_adapter writes ------------------------------------------------------------------
def test_saved_directory_holds_exactly_the_peft_config_the_weights_the_meta_and_bool_masks(tmp_path):
    adapter = _adapter(meta={"stage": "lori_s", "data": Path("/data/gsm8k")})  # a Path: written as its str
    save_adapter(adapter, tmp_path / "ad")
    peft = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": "org/base", "r": 2,
        "lora_alpha": 4.0, "lora_dropout": 0.1, "target_modules": ["down_proj", "head", "q_proj"],
        "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "use_rslora": False,
        "use_dora": False, "init_lora_weights": True, "modules_to_save": None,
    }
    assert (tmp_path / "ad" / "adapter_config.json").read_text() == json.dumps(peft, indent=2)
    meta = {
        "format_version": 1, "lori": adapter.config.to_dict(), "base_model": "org/base",
        "base_fingerprint": "00ff00ff00ff00ff", "shapes": {p: [5, 3] for p in PATHS},
        "meta": {"stage": "lori_s", "data": "/data/gsm8k"},
    }
    assert (tmp_path / "ad" / "lori_meta.json").read_text() == json.dumps(meta, indent=2)
    weights = load_file(str(tmp_path / "ad" / "adapter_model.safetensors"))
    assert set(weights) == {peft_key(p, ab) for p in PATHS for ab in "AB"}
    assert all(torch.equal(weights[peft_key(p, "A")], adapter.A[p]) for p in PATHS)
    assert all(torch.equal(weights[peft_key(p, "B")], adapter.B[p]) for p in PATHS)
    masks = load_file(str(tmp_path / "ad" / "lori_masks.safetensors"))
    assert set(masks) == set(PATHS) and all(m.dtype == torch.bool for m in masks.values())
    assert all(torch.equal(masks[p], adapter.masks[p].bool()) for p in PATHS)
    with safe_open(str(tmp_path / "ad" / "lori_masks.safetensors"), "pt") as f:
        assert f.metadata() == {
            "format": "pt", "lori_mask.version": "1", "lori_mask.a_seed": "3",
            "lori_mask.a_digest": a_digest(adapter.A), "lori_mask.base_fingerprint": "00ff00ff00ff00ff",
            "lori_mask.r": "2", "lori_mask.sparsity": "0.5", "lori_mask.granularity": "module",
        }
    loaded = load_adapter(tmp_path / "ad")
    assert loaded.config == adapter.config and loaded.meta == {"stage": "lori_s", "data": "/data/gsm8k"}
    assert (loaded.base_model, loaded.base_fingerprint) == ("org/base", "00ff00ff00ff00ff")
    assert all(loaded.masks[p].dtype == torch.bool and torch.equal(loaded.masks[p], masks[p]) for p in PATHS)
    save_adapter(_adapter(masks=False), tmp_path / "dense")
    assert not (tmp_path / "dense" / "lori_masks.safetensors").exists()
    assert load_adapter(tmp_path / "dense").masks is None


def test_lori_meta_json_wins_over_a_hand_edited_adapter_config(tmp_path):
    save_adapter(_adapter(), tmp_path / "ad")  # users point base_model_name_or_path at a local copy for PEFT
    peft = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    (tmp_path / "ad" / "adapter_config.json").write_text(json.dumps(peft | {"base_model_name_or_path": "/local",
                                                                          "r": 8}))
    loaded = load_adapter(tmp_path / "ad")
    assert loaded.base_model == "org/base" and loaded.config.r == 2
    assert read_a_identity(tmp_path / "ad").r == 2


# ---- plain PEFT folders ------------------------------------------------------------------------
def test_a_plain_peft_folder_imports_with_defaults_and_targets_read_from_its_keys(tmp_path):
    tensors = _peft_tensors("default")  # the adapter name in the key is allowed
    config = {"base_model_name_or_path": "org/base", "r": 2, "lora_alpha": 16}  # no peft_type, targets, dropout
    ad = load_adapter(_peft_dir(tmp_path / "plain", config, tensors))
    assert ad.config == LoRIConfig(r=2, alpha=16.0, dropout=0.0, target_modules=["head", "q_proj"], sparsity=0.0,
                                   granularity="model", seed=-1)
    assert (ad.base_model, ad.base_fingerprint, ad.masks, ad.meta) == ("org/base", None, None, {})
    assert sorted(ad.A) == ["head", "model.layers.0.self_attn.q_proj"]
    assert torch.equal(ad.A["head"], tensors["base_model.model.head.lora_A.default.weight"])
    assert torch.equal(ad.B["head"], tensors["base_model.model.head.lora_B.default.weight"])
    assert read_a_identity(tmp_path / "plain") == AIdentity(None, a_digest(ad.A), None, 2)  # no lori seed, no base
    # a list of targets is kept as written; a regex string names no module: read from the keys
    listed = load_adapter(_peft_dir(tmp_path / "listed", config | {"target_modules": ["q_proj", "head"],
                                                                     "lora_dropout": 0.1}, tensors))
    assert listed.config.target_modules == ["q_proj", "head"] and listed.config.dropout == 0.1
    regex = load_adapter(_peft_dir(tmp_path / "regex", config | {"target_modules": ".*q_proj"}, tensors))
    assert regex.config.target_modules == ["head", "q_proj"]


@pytest.mark.parametrize("flag", ["use_dora", "use_rslora"])
def test_a_dora_or_rslora_folder_is_refused(tmp_path, flag):
    directory = _peft_dir(tmp_path / "d", {"r": 2, "lora_alpha": 4, flag: True}, _peft_tensors())
    with pytest.raises(AdapterFileError) as info:
        load_adapter(directory)
    assert str(info.value) == "DoRA / rsLoRA adapters are not LoRI adapters and cannot be imported"


def test_saved_embeddings_are_recorded_with_their_shapes_not_loaded(tmp_path):
    tensors = _peft_tensors() | {"base_model.model.model.embed_tokens.weight": torch.zeros(11, 3),
                                 "base_model.model.lm_head.weight": torch.zeros(11, 3)}
    ad = load_adapter(_peft_dir(tmp_path / "p", {"r": 2, "lora_alpha": 4}, tensors))
    assert sorted(ad.A) == ["head", "model.layers.0.self_attn.q_proj"]
    assert ad.meta == {SAVED_EMBEDDINGS: {"shapes": {"model.embed_tokens": [11, 3], "lm_head": [11, 3]}, "reason": (
        "not loaded: PEFT's save_pretrained wrote the whole frozen embedding weights because the vocabulary "
        "was resized (the original LoRI code adds a '<PAD>' token, train_lori.py l.77-81); the base's rows "
        "are unchanged and lori needs no pad row")}}


def test_adapter_folder_refusals_in_full(tmp_path):
    directory = tmp_path / "ad"
    save_adapter(_adapter(), directory)
    weights = (directory / "adapter_model.safetensors").read_bytes()
    (directory / "adapter_model.safetensors").unlink()  # the config alone is not an adapter
    needs = f"{directory} is not an adapter directory (needs adapter_config.json and adapter_model.safetensors)"
    for read in (load_adapter, read_a_identity):
        with pytest.raises(AdapterFileError) as info:
            read(directory)
        assert str(info.value) == needs
    (directory / "adapter_model.safetensors").write_bytes(weights)
    peft = json.loads((directory / "adapter_config.json").read_text())
    (directory / "adapter_config.json").write_text(json.dumps(peft | {"peft_type": "LOHA"}))
    with pytest.raises(AdapterFileError) as info:
        load_adapter(directory)
    assert str(info.value) == f"{directory}: peft_type 'LOHA' is not LORA"
    key = "base_model.model.model.norm.weight"  # not a LoRA weight nor an embedding
    other = _peft_dir(tmp_path / "other", {"r": 2, "lora_alpha": 4}, _peft_tensors() | {key: torch.ones(3)})
    with pytest.raises(AdapterFileError) as info:
        load_adapter(other)
    assert str(info.value) == (
        f"unexpected key {key!r}: not a PEFT lora_A/lora_B weight nor a saved embed_tokens/lm_head weight; "
        "lori reads LoRA adapters only (no modules_to_save, no other PEFT method)")


def test_a_tensor_torch_cannot_hold_is_refused_naming_the_file(tmp_path):
    directory = _peft_dir(tmp_path / "p", {"r": 2, "lora_alpha": 4}, {})
    key = "base_model.model.q.lora_A.weight"  # a header written by hand: 6-bit floats, which torch has no dtype for
    header = json.dumps({key: {"dtype": "F6_E2M3", "shape": [2, 4], "data_offsets": [0, 6]}}).encode()
    header += b" " * (-len(header) % 8)
    weights = directory / "adapter_model.safetensors"
    weights.write_bytes(struct.pack("<Q", len(header)) + header + bytes(6))
    with pytest.raises(AdapterFileError) as info:
        load_adapter(directory)
    assert str(info.value).startswith(f"corrupt or unreadable safetensors file {weights}: ")
    assert "F6_E2M3" in str(info.value)


# ---- the A of a folder, read cheaply -----------------------------------------------------------
@pytest.mark.parametrize(("seed", "read"), [(3, 3), (0, 0), (-1, None)])
def test_read_a_identity_gives_lori_seeds_from_0_and_none_for_an_imported_a(tmp_path, seed, read):
    adapter = _adapter(seed=seed)
    save_adapter(adapter, tmp_path / "ad")
    assert read_a_identity(tmp_path / "ad") == AIdentity(read, a_digest(adapter.A), "00ff00ff00ff00ff", 2)
    assert MaskRecord.of(adapter.A, seed, None, None, None).seed == read


def test_read_peft_weights_only_a_reads_the_a_of_the_first_modules_in_path_order(tmp_path):
    save_adapter(_adapter(), tmp_path / "ad")
    A, B, embeddings = read_peft_weights(tmp_path / "ad" / "adapter_model.safetensors", only_A=2)
    assert sorted(A) == ["head", "model.layers.0.self_attn.q_proj"] and B == {} and embeddings == {}
    assert torch.equal(A["head"], _adapter().A["head"])
    only = {peft_key(p, "A"): a for p, a in _adapter().A.items()}  # the A chosen do not depend on the B present
    save_file(only, str(tmp_path / "a_only.safetensors"))
    A, B, _ = read_peft_weights(tmp_path / "a_only.safetensors", only_A=2)
    assert sorted(A) == ["head", "model.layers.0.self_attn.q_proj"] and B == {}


def test_read_a_identity_reads_only_the_a_it_digests(tmp_path):
    adapter = _adapter()
    adapter.B[PATHS[0]][0, 0] = float("nan")  # in a B: read_a_identity does not read it, load_adapter does
    save_adapter(adapter, tmp_path / "ad")
    assert read_a_identity(tmp_path / "ad").digest == a_digest(adapter.A)
    with pytest.raises(AdapterFileError) as info:
        load_adapter(tmp_path / "ad")
    assert str(info.value) == (f"{tmp_path / 'ad' / 'adapter_model.safetensors'}: tensor {peft_key(PATHS[0], 'B')} "
                               f"holds 1 NaN and 0 inf of 10 values{DAMAGED}")


# ---- mask files --------------------------------------------------------------------------------
def test_official_mask_file_skips_a_keys_and_converts_any_dtype_to_bool(tmp_path):
    q, d = "model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"
    raw = {  # an A key first and last: skipped wherever it is
        f"base_model.model.{q}.lora_A.default.weight": torch.ones(2, 3),
        f"base_model.model.{q}.lora_B.default.weight": torch.tensor([[1.0, 0.0]] * 5),
        f"base_model.model.{d}.lora_B.default.weight": torch.tensor([[0, 1]] * 5, dtype=torch.uint8),
        "plain.key": torch.tensor([2, 0]),  # a key that is no PEFT name is kept as it is
        f"base_model.model.{d}.lora_A.default.weight": torch.ones(2, 3),
    }
    torch.save(raw, tmp_path / "0.9_mask.pt")
    masks = load_masks(tmp_path / "0.9_mask.pt")
    assert list(masks) == [q, d, "plain.key"] and all(m.dtype == torch.bool for m in masks.values())
    assert torch.equal(masks[q], torch.tensor([[True, False]] * 5))
    assert torch.equal(masks[d], torch.tensor([[False, True]] * 5))
    assert torch.equal(masks["plain.key"], torch.tensor([True, False]))
    save_file({q: torch.tensor([[1.0, 0.0]] * 5)}, str(tmp_path / "float.safetensors"))  # a float safetensors file
    assert load_masks(tmp_path / "float.safetensors")[q].dtype == torch.bool


def _as_saved_on_cuda(path: Path) -> None:
    """Rewrite a torch.save file so its storages say "cuda:0", as extract_mask.py's would on a GPU machine."""
    src = zipfile.ZipFile(io.BytesIO(path.read_bytes()))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
        for name in src.namelist():
            data = src.read(name)
            if name.endswith("data.pkl"):
                assert b"X\x03\x00\x00\x00cpu" in data
                data = data.replace(b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0")
            z.writestr(name, data)
    path.write_bytes(out.getvalue())


def test_a_mask_file_saved_on_a_gpu_loads_on_the_cpu(tmp_path):
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight"
    torch.save({key: torch.tensor([[True, False]] * 5)}, tmp_path / "0.9_mask.pt")
    _as_saved_on_cuda(tmp_path / "0.9_mask.pt")
    mask = load_masks(tmp_path / "0.9_mask.pt")["model.layers.0.self_attn.q_proj"]
    assert mask.device.type == "cpu" and torch.equal(mask, torch.tensor([[True, False]] * 5))


class _NotATensor:
    """A pickled object that is no tensor: weights_only unpickling must refuse it."""


def test_mask_pickle_is_read_weights_only_even_when_torch_is_told_otherwise(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # only applies where weights_only is not passed
    path = tmp_path / "evil.pt"
    torch.save({"m": torch.ones(2, dtype=torch.bool), "x": _NotATensor()}, path, pickle_module=pickle)
    with pytest.raises(AdapterFileError) as info:
        load_masks(path)
    assert str(info.value).startswith(f"cannot read mask file {path}: ") and "_NotATensor" in str(info.value)


def test_mask_file_refusals_in_full(tmp_path):
    missing = tmp_path / "nope.pt"
    for read in (load_masks, read_mask_record):
        with pytest.raises(AdapterFileError) as info:
            read(missing)
        assert str(info.value) == f"mask file {missing} does not exist"
    cases = {
        "list.pt": ([torch.ones(2)], "holds a list, not a dict of tensors"),
        "values.pt": ({"m": [1, 0]}, "holds values that are not tensors"),
    }
    for name, (obj, why) in cases.items():
        torch.save(obj, tmp_path / name)
        with pytest.raises(AdapterFileError) as info:
            load_masks(tmp_path / name)
        assert str(info.value) == f"mask file {tmp_path / name} {why}"
    nan = torch.tensor([[1.0, float("nan")], [float("inf"), 0.0]])  # a NaN float mask would read as True
    torch.save({"m": nan}, tmp_path / "nan.pt")
    save_file({"m": nan}, str(tmp_path / "nan.safetensors"))
    for name in ("nan.pt", "nan.safetensors"):
        with pytest.raises(AdapterFileError) as info:
            load_masks(tmp_path / name)
        assert str(info.value) == f"{tmp_path / name}: tensor m holds 1 NaN and 1 inf of 4 values{DAMAGED}"
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")  # read as safetensors, not unpickled
    with pytest.raises(AdapterFileError) as info:
        load_masks(tmp_path / "bad.safetensors")
    assert str(info.value).startswith(f"corrupt or unreadable safetensors file {tmp_path / 'bad.safetensors'}: ")


def test_find_mask_file_uses_the_granularity_folder_and_lists_where_it_looked(tmp_path):
    (tmp_path / "layerwise_masks").mkdir()
    torch.save({}, tmp_path / "layerwise_masks" / "0.9_mask.pt")
    assert find_mask_file(tmp_path, 0.9, "layer") == tmp_path / "layerwise_masks" / "0.9_mask.pt"
    with pytest.raises(AdapterFileError) as info:
        find_mask_file(tmp_path, 0.9)
    assert str(info.value) == (f"no mask file in {tmp_path}: looked for {tmp_path / 'lori_masks.safetensors'}, "
                               f"{tmp_path / 'calibration' / 'masks.safetensors'}, {tmp_path / 'masks' / '0.9_mask.pt'}")


# ---- the record of the A a mask was calibrated under -------------------------------------------
def test_a_identity_describes_itself():
    assert AIdentity(None, None).describe() == "an imported A (no lori seed) (digest unknown)"
    assert AIdentity(0, "abcd").describe() == "A seed 0 (digest abcd)"


def test_mask_record_of_no_modules_has_no_rank():
    assert MaskRecord.of({}, 0, None, None, None) == MaskRecord(0, a_digest({}), None, None, None, None)


def test_mask_record_mismatch_on_a_meta_digest_or_base_compares_what_is_known():
    rec = MaskRecord(seed=2, digest="meta", base_fingerprint="meta", r=4)  # calibrated on the meta device
    assert rec.mismatch(AIdentity(2, "bbbb", "base1", 4)) is None  # no digest: seeds decide, no base to compare
    assert rec.mismatch(AIdentity(3, "bbbb", "base1", 4)) == (
        "calibrated under A seed 2 (digest meta), the adapter has A seed 3 (digest bbbb)")
    known = MaskRecord(seed=2, digest="aaaa", base_fingerprint="base1", r=4)
    assert known.mismatch(AIdentity(5, "aaaa", "meta", 4)) is None  # digests agree: the seeds do not matter
    assert known.mismatch(AIdentity(2, "aaaa", "base2", 4)) == (
        "calibrated on base fingerprint base1, the adapter's base has fingerprint base2")
    assert known.mismatch(AIdentity(2, "aaaa", "base1", 8)) == "calibrated for r=4, the adapter has r=8"
