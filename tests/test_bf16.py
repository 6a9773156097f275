"""bf16 compute with fp32 adapters: the fused node, masked entries, merging, dtype and precision
settings, PEFT baselines, and the chunked response-token loss (issue 15)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import yaml
from conftest import make_tiny_llama, make_tiny_qwen2
from pipeline_helpers import multiprocess_config, run_lori, tiny_config, write_config
from torch import nn
from torch.utils.data import DataLoader

import lori.training.base_model
import lori.training.module
from lori.commands.lightning_cli import parse_config
from lori.commands.pipeline_command import pipeline
from lori.core import (
    LoRIConfig,
    LoRIConfigError,
    adapter_from_model,
    calibrate,
    get_B,
    inject_lori,
    load_adapter,
    lori_layers,
    save_adapter,
    set_masks,
    trainable_parameters,
)
from lori.core.layer import LoRILinear
from lori.training import baselines
from lori.training.base_model import ModelLoadError, has_native_bf16, resolve_base_dtype
from lori.training.module import LoRIModule, check_precision, response_loss, split_lm_head
from lori.training.pipeline import format_summary

BF16 = torch.bfloat16
LORI = {"r": 4, "alpha": 8.0, "dropout": 0.0, "seed": 3}


def _layer(dtype: torch.dtype, masked: bool = False, p: float = 0.0) -> LoRILinear:
    torch.manual_seed(0)
    layer = LoRILinear(nn.Linear(12, 10).to(dtype), r=4, alpha=8, dropout=p, seed=0, path="m")
    layer.lori_B.data.normal_()
    if masked:
        layer.set_mask(torch.rand(10, 4) < 0.5)
    return layer.train()


def _trainable(layer: LoRILinear) -> torch.Tensor:
    return layer.lori_B if layer.lori_B_values is None else layer.lori_B_values


def _reference64(layer: LoRILinear, x: torch.Tensor) -> torch.Tensor:
    """The layer's formula in fp64 from the same (rounded) base weights, fp32 A and B."""
    base = layer.base_layer
    w, b = base.weight.double(), base.bias.double()
    return x @ w.t() + b + layer.scale * x @ layer.lori_A.double().t() @ layer.B().double().t()


# ---- the fused node in the compute dtype ------------------------------------------------------
@pytest.mark.parametrize("masked", [False, True])
def test_adapter_stays_fp32_on_a_bf16_base_and_the_fused_node_runs(masked):
    layer = _layer(BF16, masked)
    assert layer.lori_A.dtype == layer.lori_B.dtype == _trainable(layer).dtype == torch.float32
    x = torch.randn(3, 5, 12).to(BF16).requires_grad_()
    y = layer(x)
    assert y.dtype == BF16 and "LoRIMatmul" in y.grad_fn.name()
    g = torch.randn_like(y)
    dx, dt = torch.autograd.grad(y, [x, _trainable(layer)], g)
    assert dx.dtype == BF16 and dt.dtype == torch.float32
    # against fp64 autograd from the same operands: within bf16 rounding (2^-8 relative)
    x64 = x.detach().double().requires_grad_()
    t64 = _trainable(layer).detach().double().requires_grad_()
    ref_layer = _layer(BF16, masked)
    ref_layer.to(torch.float64)
    ref_layer.base_layer.weight.data.copy_(layer.base_layer.weight.double())
    (ref_layer.lori_B_values if masked else ref_layer.lori_B).data.copy_(t64)
    ref = _reference64(ref_layer, x64)
    torch.testing.assert_close(y.double(), ref, rtol=0.02, atol=0.05)
    rdx, rdt = torch.autograd.grad(ref, [x64, ref_layer.lori_B_values if masked else ref_layer.lori_B], g.double())
    torch.testing.assert_close(dx.double(), rdx, rtol=0.02, atol=0.05)
    torch.testing.assert_close(dt.double(), rdt, rtol=0.02, atol=0.05)


def test_fused_node_under_autocast_equals_plain_autograd(monkeypatch):
    """bf16 autocast over an fp32 base: the fused node casts as autocast would, gradients fp32."""
    layer = _layer(torch.float32, masked=True)
    x = torch.randn(4, 12, requires_grad=True)
    g = torch.randn(4, 10, dtype=BF16)
    with torch.autocast("cpu", dtype=BF16):
        fused = layer(x)
    assert fused.dtype == BF16 and "LoRIMatmul" in fused.grad_fn.name()
    fused_grads = torch.autograd.grad(fused, [x, layer.lori_B_values], g)
    monkeypatch.setattr(LoRILinear, "_fusable", lambda self, x, trainable: False)
    with torch.autocast("cpu", dtype=BF16):
        plain = layer(x)
    assert "LoRIMatmul" not in plain.grad_fn.name()
    torch.testing.assert_close(fused.float(), plain.float(), rtol=0.02, atol=0.02)
    for got, want in zip(fused_grads, torch.autograd.grad(plain, [x, layer.lori_B_values], g)):
        assert got.dtype == want.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=0.02, atol=0.02)


def test_fused_dropout_on_a_cast_input_leaves_the_input_alone():
    layer = _layer(torch.float32, p=0.5)
    x = torch.randn(6, 12)
    before = x.clone()
    with torch.autocast("cpu", dtype=BF16):
        layer(x)
    assert torch.equal(x, before)


def test_masked_entries_bit_identical_after_adamw_steps_in_bf16_mode():
    model = make_tiny_llama().to(BF16).train()
    inject_lori(model, LoRIConfig(r=4, alpha=8, dropout=0.05, sparsity=0.9))
    g = torch.Generator().manual_seed(0)
    for layer in lori_layers(model).values():  # entries outside the mask keep non-zero values
        layer.lori_B.data.copy_(torch.randn(layer.lori_B.shape, generator=g))
    set_masks(model, calibrate(get_B(model), 0.9, "model"))
    before = {p: b.clone() for p, b in get_B(model).items()}
    params = trainable_parameters(model)
    assert params and all(p.dtype == torch.float32 for p in params)
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.5)
    ids = torch.randint(0, 96, (2, 12), generator=g)
    for _ in range(3):
        logits = model(input_ids=ids).logits
        assert logits.dtype == BF16
        torch.nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten()).backward()
        assert all(p.grad.dtype == torch.float32 for p in params)
        opt.step()
        opt.zero_grad()
    assert all(t.dtype == torch.float32 for s in opt.state.values() for t in s.values() if t.dim())
    changed = False
    for path, layer in lori_layers(model).items():
        after = layer.B()
        outside = ~layer.lori_mask
        assert torch.equal(after[outside], before[path][outside]), path
        changed |= not torch.equal(after, before[path])
    assert changed


def test_calibration_and_adapter_files_read_fp32_B(tmp_path):
    model = make_tiny_llama().to(BF16)
    inject_lori(model, LoRIConfig(r=4, sparsity=0.9))
    for layer in lori_layers(model).values():
        layer.lori_B.data.normal_(generator=torch.Generator().manual_seed(1))
        layer.lori_B.data.add_(1e-4)  # below bf16 resolution at magnitude ~1: must survive
    B = get_B(model)
    assert all(b.dtype == torch.float32 for b in B.values())
    set_masks(model, calibrate(B, 0.9, "model"))
    save_adapter(adapter_from_model(model, LoRIConfig(r=4, sparsity=0.9)), tmp_path / "a")
    loaded = load_adapter(tmp_path / "a")
    for path, b in get_B(model).items():
        assert loaded.B[path].dtype == loaded.A[path].dtype == torch.float32
        assert torch.equal(loaded.B[path], b)


# ---- merging in bf16 --------------------------------------------------------------------------
def _bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """Spacing of bf16 numbers (8 significant bits) in the binade of |x| (normal range)."""
    a = x.float().abs().clamp(min=2.0**-126)
    return torch.exp2(torch.floor(torch.log2(a)) - 7)


def _merge_layer(delta_scale: float) -> LoRILinear:
    torch.manual_seed(0)
    base = nn.Linear(64, 48, bias=False)
    base.weight.data.normal_(0, 0.05)
    layer = LoRILinear(base.to(BF16), r=8, alpha=16, dropout=0.0, seed=0, path="m")
    layer.lori_B.data.normal_(0, delta_scale)
    return layer


def test_merge_rounds_once_into_bf16():
    layer = _merge_layer(0.01)
    w0 = layer.weight.detach().clone()
    exact = w0.float() + layer._delta_fp32()
    layer.merge()
    assert layer.weight.dtype == BF16
    assert torch.equal(layer.weight, exact.to(BF16))  # one rounding of the fp32 sum
    layer.merge()  # idempotent
    assert torch.equal(layer.weight, exact.to(BF16))


@pytest.mark.parametrize("delta_scale", [1e-4, 1e-2, 1.0])
def test_merge_unmerge_drift_stays_within_one_bf16_ulp_over_10_cycles(delta_scale):
    """Bound: W1 = rnd(W0 + d), W2 = rnd(W1 - d) (``_add_delta``: fp32 sum, one rounding each).
    With M = max(|W0|, |W0 + d|) and u = ulp_bf16(M): |W1 - (W0 + d)| <= u/2; W1 - d = W0 + e with
    |e| <= u/2 stays in M's binade (W0 is a bf16 number below the binade's top by >= u), so its
    rounding errs by <= u/2 too: |W2 - W0| <= u, k = 1. A second cycle starts from W2 = rnd(y) with
    |W2 + d - W1| = |W2 - y| <= u/2, so merge lands on W1 again and unmerge on W2: no accumulation."""
    layer = _merge_layer(delta_scale)
    w0 = layer.weight.detach().clone()
    bound = _bf16_ulp(torch.maximum(w0.float().abs(), (w0.float() + layer._delta_fp32()).abs()))
    after = []
    for _ in range(10):
        layer.merge()
        layer.unmerge()
        after.append(layer.weight.detach().clone())
    drift = (after[-1].float() - w0.float()).abs()
    assert (drift <= bound).all(), float((drift / bound).max())
    assert all(torch.equal(a, after[0]) for a in after)  # stationary after the first cycle


# ---- dtype resolution and precision settings ---------------------------------------------------
def test_native_bf16_detection(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for caps, expected in [({"avx512_bf16": True}, True), ({"amx_bf16": True, "avx512_bf16": False}, True),
                           ({"avx2": True, "avx512_bf16": False, "amx_bf16": False}, False)]:
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda caps=caps: caps)
        assert has_native_bf16() is expected
        assert resolve_base_dtype("auto") == (BF16 if expected else torch.float32)
        assert resolve_base_dtype("auto", trains_base=True) == torch.float32  # full fine-tuning
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for supported in (True, False):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True, s=supported: s)
        assert has_native_bf16() is supported


def test_cpu_detection_without_get_capabilities(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delattr(torch.cpu, "get_capabilities")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert has_native_bf16()
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert not has_native_bf16()


def test_dtype_values_and_full_fine_tuning_rule():
    assert resolve_base_dtype("bfloat16") == BF16 and resolve_base_dtype("torch.float16") == torch.float16
    with pytest.raises(ModelLoadError, match="'float64'"):
        resolve_base_dtype("float64")
    with pytest.raises(ModelLoadError, match="float13"):
        resolve_base_dtype("float13")
    with pytest.raises(ModelLoadError, match="fp32 master"):
        resolve_base_dtype("bfloat16", trains_base=True)
    with pytest.raises(ValueError, match="fp32 master"):
        LoRIModule.check_options({"method": "full", "dtype": "bfloat16"})


@pytest.mark.parametrize("precision", ["bf16-true", "16-true"])
def test_true_half_precision_is_refused_before_loading(tmp_path, precision):
    with pytest.raises(LoRIConfigError, match="adapter stays fp32"):
        check_precision(precision)
    cfg = tiny_config(tmp_path)
    cfg["trainer"]["precision"] = precision
    cfg["model"]["model"] = "no/such-model"  # never loaded: the check comes first
    with pytest.raises(LoRIConfigError, match="model.dtype"):
        parse_config(write_config(tmp_path, cfg))
    check_precision("bf16-mixed")
    check_precision("32-true")


@pytest.fixture
def tiny(monkeypatch):
    """LoRIModule builds a conftest tiny Llama (vocab 96, in the requested dtype), no tokenizer."""
    def build(name, gguf_file, dtype, cache_dir, quantize=None):
        model = make_tiny_qwen2() if name == "qwen2" else make_tiny_llama()
        return model.to(resolve_base_dtype(dtype)).train(), None

    monkeypatch.setattr(lori.training.module, "build_model", build)


def _batches(n: int = 3, vocab: int = 96) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (2, 12), generator=g)
        labels = ids.clone()
        labels[:, :5] = -100  # prompt
        labels[1, 10:] = -100  # padding
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


def _fit(module: LoRIModule, precision: str, steps: int = 2) -> None:
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, precision=precision, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, train_dataloaders=DataLoader(_batches(), batch_size=None))


def test_module_in_bf16_trains_fp32_adapter_and_reports_it(tiny):
    module = LoRIModule(model="tiny", dtype="bfloat16", lori=LORI, lr=0.01)
    assert module.compute_dtype == BF16
    before = {p: b.clone() for p, b in get_B(module.model).items()}
    _fit(module, "32-true")
    info = module.precision_info()
    assert info == {"base": "bfloat16", "adapter": "float32", "compute": "bfloat16", "auto": False,
                    "trainer_precision": "32-true", "storage": "bfloat16", "gradient_checkpointing": False}
    assert any(not torch.equal(b, before[p]) for p, b in get_B(module.model).items())
    assert all(p.dtype == torch.float32 for p in trainable_parameters(module.model))


def test_bf16_mixed_trains_an_fp32_base_through_the_fused_node(tiny):
    module = LoRIModule(model="tiny", dtype="float32", lori=LORI, lr=0.01)
    seen = []
    for layer in lori_layers(module.model).values():
        layer.register_forward_hook(lambda m, args, out: seen.append(out.grad_fn.name() if out.requires_grad else ""))
    before = {p: b.clone() for p, b in get_B(module.model).items()}
    _fit(module, "bf16-mixed")
    assert seen and all("LoRIMatmul" in name for name in seen)
    assert module.precision_info()["compute"] == "bfloat16" and module.precision_info()["base"] == "float32"
    assert any(not torch.equal(b, before[p]) for p, b in get_B(module.model).items())


def test_a_trainer_built_outside_the_cli_with_bf16_true_is_refused(tiny):
    module = LoRIModule(model="tiny", lori=LORI)
    with pytest.raises(LoRIConfigError, match="bf16-true"):
        _fit(module, "bf16-true", steps=1)
    assert all(p.dtype == torch.float32 for p in trainable_parameters(module.model))


def test_fsdp_upcasts_a_16_bit_base_before_wrapping(tiny):
    from lightning.pytorch.strategies import FSDPStrategy

    module = LoRIModule(model="tiny", dtype="bfloat16", lori=LORI)
    module._trainer = SimpleNamespace(strategy=SimpleNamespace())
    module.configure_model()  # not FSDP: unchanged
    assert module.model.model.embed_tokens.weight.dtype == BF16
    module._trainer = SimpleNamespace(strategy=FSDPStrategy())
    with pytest.warns(UserWarning, match="FSDP"):
        module.configure_model()
    assert {p.dtype for p in module.model.parameters()} == {torch.float32}
    assert module.compute_dtype == torch.float32 and module.precision_info()["base"] == "float32"


def test_unsharding_gives_lori_buffers_back_fp32():
    """FSDP's bf16 buffer_dtype leaves A and LoRI-S's frozen B entries bf16 after unwrapping, beside
    fp32 kept values: B could not be formed (scatter of fp32 into bf16) and A would be saved in bf16."""
    from lori.training.callbacks import adapter_buffers_to_fp32

    model = make_tiny_llama().train()
    inject_lori(model, LoRIConfig(r=4, alpha=8, sparsity=0.9))
    for layer in lori_layers(model).values():
        layer.lori_B.data.normal_(generator=torch.Generator().manual_seed(0))
    set_masks(model, calibrate(get_B(model), 0.9, "model"))
    for layer in lori_layers(model).values():  # what FSDP MixedPrecision(buffer_dtype=bf16) does
        layer.lori_A, layer.lori_B = layer.lori_A.to(BF16), layer.lori_B.to(BF16)
    with pytest.raises(RuntimeError, match="dtype"):
        get_B(model)
    adapter_buffers_to_fp32(model)
    for layer in lori_layers(model).values():
        assert layer.lori_A.dtype == layer.lori_B.dtype == layer.B().dtype == torch.float32
        assert layer.lori_index.dtype == torch.int64 and layer.lori_mask.dtype == torch.bool
        assert "lori_B" in layer.state_dict() and "lori_index" not in layer.state_dict()


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_peft_adapters_are_fp32_on_a_bf16_base(method):
    model = make_tiny_llama().to(BF16).train()
    baselines.attach(model, method, LoRIConfig(r=4, alpha=8, dropout=0.0))
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and all(p.dtype == torch.float32 for p in params)
    assert all(p.dtype == BF16 for p in model.parameters() if not p.requires_grad)
    ids = torch.randint(0, 96, (2, 8))
    logits = model(input_ids=ids).logits
    assert logits.dtype == BF16
    logits.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in params)


# ---- the chunked response-token loss ---------------------------------------------------------
def _loss_pair(module: LoRIModule, batch: dict) -> tuple[torch.Tensor, torch.Tensor, list, list]:
    """(chunked loss, plain loss, gradients of the trainables under each)."""
    params = [p for p in module.model.parameters() if p.requires_grad]
    chunked = module.model_step(batch)
    g_chunked = torch.autograd.grad(chunked, params)
    plain = module.loss(module(batch["input_ids"], batch["attention_mask"]), batch["labels"])
    g_plain = torch.autograd.grad(plain, params)
    return chunked, plain, list(g_chunked), list(g_plain)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("method", baselines.METHODS)
@pytest.mark.parametrize("normalization", ["token_mean", "sequence_sum"])
def test_chunked_loss_equals_the_plain_loss_and_its_gradients(tiny, monkeypatch, family, method, normalization):
    monkeypatch.setattr(lori.training.module, "LOSS_CHUNK_LOGITS", 96 * 3)  # 3 rows a chunk: several chunks
    module = LoRIModule(model=family, method=method, lori=LORI, loss_normalization=normalization)
    assert split_lm_head(module.model) is not None
    if method in baselines.LORI_METHODS:  # B = 0 at init gives B no direction to check: make it live
        for layer in lori_layers(module.model).values():
            layer.lori_B.data.normal_(0, 0.1, generator=torch.Generator().manual_seed(2))
    batch = _batches(1)[0]
    chunked, plain, g_chunked, g_plain = _loss_pair(module, batch)
    torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_chunked, g_plain):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    if method == "full":  # the LM head trains: its gradient comes through the chunks
        head = module.model.get_output_embeddings().weight
        assert head.requires_grad and any(g.shape == head.shape and g.abs().sum() > 0 for g in g_chunked)


def test_chunked_loss_keeps_no_whole_logits(tiny, monkeypatch):
    monkeypatch.setattr(lori.training.module, "LOSS_CHUNK_LOGITS", 96 * 4)
    module = LoRIModule(model="llama", lori=LORI)
    head = module.model.get_output_embeddings()
    rows = []
    head.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[0]))
    batch = _batches(1)[0]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        loss = module.model_step(batch)
    responses = int((batch["labels"][:, 1:] != -100).sum())
    assert sum(rows) == responses and max(rows) <= 4  # only response positions reach the head
    assert not any(s and s[-1] == 96 for s in saved)  # no logits kept for backward
    loss.backward()
    assert sum(rows) == 2 * responses  # each chunk recomputed once in backward


def test_a_model_without_a_separable_head_takes_the_plain_loss(tiny):
    module = LoRIModule(model="llama", lori=LORI)

    class Wrapped(nn.Module):  # no get_decoder / get_output_embeddings
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, **kwargs):
            return self.inner(**kwargs)

    batch = _batches(1)[0]
    chunked = module.model_step(batch)
    module.model = Wrapped(module.model)
    assert split_lm_head(module.model) is None
    torch.testing.assert_close(module.model_step(batch), chunked, rtol=1e-5, atol=1e-6)
    capped = make_tiny_llama()
    capped.config.final_logit_softcapping = 30.0
    assert split_lm_head(capped) is None


def test_chunked_loss_with_no_response_token_is_zero_with_a_graph():
    hidden = torch.randn(2, 5, 8, requires_grad=True)
    head = nn.Linear(8, 11)
    labels = torch.full((2, 5), -100)
    loss = response_loss(hidden, labels, head, "token_mean")
    loss.backward()
    assert loss.item() == 0.0 and hidden.grad is not None


# ---- the pipeline records what ran ---------------------------------------------------------------
def test_pipeline_in_bf16_records_its_precision(tmp_path):
    cfg = tiny_config(tmp_path, dense_steps=2, sparse_steps=2)
    cfg["model"]["dtype"] = "bfloat16"
    summary = pipeline(["--config", str(write_config(tmp_path, cfg))])
    for stage in ("lori_d", "lori_s"):  # held-out loss (validation steps: the same chunked loss)
        assert 0 < summary[stage]["val_loss_after"] < float("inf")
    assert summary["precision"] == {"base": "bfloat16", "adapter": "float32", "compute": "bfloat16",
                                    "auto": False, "trainer_precision": "32-true", "storage": "bfloat16",
                                    "gradient_checkpointing": False}
    written = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert written["precision"] == summary["precision"]
    assert "precision: base bfloat16, adapter float32, compute bfloat16" in format_summary(summary)
    adapter = load_adapter(tmp_path / "run" / "lori_s")
    assert all(b.dtype == torch.float32 for b in adapter.B.values())
    for path, b in adapter.B.items():  # LoRI-S trained from zero inside its mask only
        assert not b[~adapter.masks[path]].any()


def test_auto_is_recorded(monkeypatch):
    monkeypatch.setattr(lori.training.base_model, "has_native_bf16", lambda: False)
    summary = {"precision": {"base": "float32", "adapter": "float32", "compute": "float32", "auto": True,
                             "trainer_precision": "32-true"}}
    line = lori.training.pipeline._precision_line(summary["precision"])
    assert "base float32 (model.dtype auto)" in line and "trainer.precision 32-true" in line
    assert resolve_base_dtype("auto") == torch.float32


def test_fsdp_pipeline_with_a_bf16_base_runs_on_two_processes(tmp_path):
    """The paper configs' bfloat16 base under the FSDP preset: upcast before wrapping, trains."""
    strategy = {"class_path": "fsdp_cpu.CPUFSDPStrategy",
                "init_args": {"sharding_strategy": "FULL_SHARD", "state_dict_type": "full"}}
    path = multiprocess_config(tmp_path, "fsdp_bf16", 2, strategy, checkpoint_every=2)
    cfg = yaml.safe_load(path.read_text())
    cfg["model"]["dtype"] = "bfloat16"
    path.write_text(yaml.safe_dump(cfg))
    done = run_lori("pipeline", "--config", str(path))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "FSDP shards one dtype per unit" in done.stderr
    summary = json.loads((tmp_path / "fsdp_bf16" / "summary.json").read_text())
    assert summary["precision"]["base"] == "float32" and summary["precision"]["adapter"] == "float32"
    adapter = load_adapter(tmp_path / "fsdp_bf16" / "lori_s")
    assert any(b.any() for b in adapter.B.values())
