"""lori's factor-space merges equal PEFT's ``add_weighted_adapter`` (what the official LoRI code runs).

For every combination type the paper uses, three lori adapters saved with ``save_adapter`` are
merged twice on a tiny fp32 Llama: by PEFT (``PeftModel.from_pretrained`` + ``load_adapter`` +
``add_weighted_adapter`` + ``set_adapter`` + ``merge_and_unload``, as src/merge_3_loras.py
l.58-66) and by ``lori.core.merge_factors``; the merged adapters' tensors and the logits agree.
DARE is compared with the same generator state at the first drop (torch's default generator
reseeded at PEFT's first ``torch.bernoulli`` call, lori's generator seeded alike), and with
PEFT 0.12.0's DARE (no rescale) by swapping in 0.12.0's ``random_pruning``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import peft.utils.merge_utils as peft_merge_utils
import pytest
import torch
from conftest import make_tiny_llama
from peft import PeftModel

from lori.core import (
    Adapter,
    DeltaMerge,
    LoRIConfig,
    adapter_from_model,
    calibrate,
    get_B,
    inject_lori,
    load_adapter,
    lori_layers,
    merge_factors,
    save_adapter,
    set_masks,
)
from lori.core.merge import PEFT_TYPES

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
NAMES = ["math", "code", "nlu"]
INPUT = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(3))
CASES = [("concat", None), ("linear", None), ("magnitude", 0.3), ("ties", 0.7), ("ties", 0.3),
         ("dare", 0.7), ("dare", 0.3), ("dare_ties", 0.7)]


def _adapter(seed: int, alpha: float = 8.0, sparsity: float | None = None) -> Adapter:
    """A LoRI adapter (A from its own seed) with a random non-zero B; LoRI-S-sparse with ``sparsity``."""
    model = make_tiny_llama()
    cfg = LoRIConfig(r=4, alpha=alpha, dropout=0.0, target_modules=TARGETS, seed=seed)
    inject_lori(model, cfg)
    g = torch.Generator().manual_seed(100 + seed)
    for layer in lori_layers(model).values():
        layer.lori_B.data.copy_(torch.randn(layer.lori_B.shape, generator=g) * 0.5)
    if sparsity is not None:  # B zero outside the mask, as the LoRI-S reset and training leave it
        masks = calibrate(get_B(model), sparsity)
        for path, layer in lori_layers(model).items():
            layer.lori_B.data.mul_(masks[path])
        set_masks(model, masks)
    return adapter_from_model(model, cfg, base_model="tiny")


def _dirs(tmp_path: Path, sparsity: float | None = None, alphas=(8.0, 8.0, 16.0)) -> list[Path]:
    return [save_adapter(_adapter(i, alpha, sparsity), tmp_path / name) for i, (name, alpha) in enumerate(zip(NAMES,
                                                                                                            alphas))]


def _peft_merge(dirs, weights, combination_type, density, seed):
    """The official code's merge (merge_3_loras.py l.58-66); DARE's default generator reseeded at its first draw."""
    model = PeftModel.from_pretrained(make_tiny_llama(), str(dirs[0]), adapter_name=NAMES[0])
    for name, d in zip(NAMES[1:], dirs[1:]):
        model.load_adapter(str(d), adapter_name=name)
    real, first = torch.bernoulli, [True]

    def bernoulli(*args, **kwargs):
        if first[0]:
            torch.manual_seed(seed)
            first[0] = False
        return real(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "bernoulli", bernoulli)
        model.add_weighted_adapter(NAMES, weights, "merge", combination_type=combination_type, density=density)
    model.set_adapter("merge")
    factors = {}
    for path, module in model.base_model.model.named_modules():
        if hasattr(module, "lora_A") and "merge" in module.lora_A:
            factors[path] = (module.lora_A["merge"].weight.detach().clone(), module.lora_B["merge"].weight.detach()
                             .clone(), module.scaling["merge"])
    merged = model.merge_and_unload().eval()
    with torch.no_grad():
        return merged(input_ids=INPUT).logits, factors


def _lori_merge(dirs, weights, method, density, seed, rescale=True):
    base = make_tiny_llama()
    order = [p for p, _ in base.named_modules()]
    merged = merge_factors([load_adapter(d) for d in dirs], weights, method, density=density or 1.0, seed=seed,
                           rescale=rescale, order=order)
    DeltaMerge(base, {p: merged.delta(p) for p in merged.A}).merge()
    with torch.no_grad():
        return base(input_ids=INPUT).logits, merged


def _assert_same(peft_out, lori_out, method):
    (peft_logits, factors), (lori_logits, merged) = peft_out, lori_out
    assert set(factors) == set(merged.A) and merged.config.scale == 1.0
    for path, (A, B, scaling) in factors.items():
        assert scaling == 1.0 and A.shape == merged.A[path].shape, (method, path)
        torch.testing.assert_close(merged.A[path], A, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(merged.B[path], B, atol=1e-6, rtol=1e-5)
    scale = peft_logits.abs().max()
    torch.testing.assert_close(lori_logits, peft_logits, atol=1e-5 * float(scale), rtol=0)
    with torch.no_grad():
        base_logits = make_tiny_llama()(input_ids=INPUT).logits
    assert (lori_logits - base_logits).abs().max() > 1e-2 * scale  # the merge acts


@pytest.mark.parametrize("method,density", CASES)
def test_merge_equals_peft_add_weighted_adapter(tmp_path, method, density):
    dirs = _dirs(tmp_path)
    weights = [0.4, 0.4, 0.4]
    peft_out = _peft_merge(dirs, weights, PEFT_TYPES[method], density if density is not None else 0.7, seed=5)
    lori_out = _lori_merge(dirs, weights, method, density, seed=5)
    _assert_same(peft_out, lori_out, method)
    assert lori_out[1].rank == (12 if method == "concat" else 4)


@pytest.mark.parametrize("method,density", [("concat", None), ("linear", None), ("magnitude", 0.3), ("ties", 0.7),
                                            ("dare", 0.7), ("dare_ties", 0.3)])
def test_lori_s_sparse_adapters_merge_as_peft(tmp_path, method, density):
    """LoRI-S adapters (90% of B exactly zero), the official scripts' LoRI-S weights."""
    dirs = _dirs(tmp_path, sparsity=0.9, alphas=(8.0, 8.0, 8.0))
    for d in dirs:
        B = torch.cat([b.flatten() for b in load_adapter(d).B.values()])
        assert 0.85 < (B == 0).float().mean() < 0.95
    weights = [0.4, 0.4, 0.4]
    peft_out = _peft_merge(dirs, weights, PEFT_TYPES[method], density if density is not None else 0.7, seed=11)
    _assert_same(peft_out, _lori_merge(dirs, weights, method, density, seed=11), method)


def test_peft_names_and_unequal_weights(tmp_path):
    """PEFT's own names, weights that differ per task (one negative: PEFT puts its sign on A)."""
    dirs = _dirs(tmp_path)
    weights = [0.5, 0.3, -0.2]
    for combination_type in ("cat", "linear", "magnitude_prune", "dare_linear"):
        peft_out = _peft_merge(dirs, weights, combination_type, 0.7, seed=2)
        _assert_same(peft_out, _lori_merge(dirs, weights, combination_type, 0.7, seed=2), combination_type)


def _random_pruning_0_12(tensor, density, rescale):
    """PEFT 0.12.0's random_pruning: the ``torch.div`` result is discarded, so nothing is rescaled."""
    mask = torch.bernoulli(torch.full_like(input=tensor, fill_value=density))
    pruned_tensor = tensor * mask
    if rescale:
        torch.div(input=pruned_tensor, other=density)
    return pruned_tensor


@pytest.mark.parametrize("method", ["dare", "dare_ties"])
def test_dare_without_rescale_is_peft_0_12(tmp_path, monkeypatch, method):
    dirs = _dirs(tmp_path)
    monkeypatch.setattr(peft_merge_utils, "random_pruning", _random_pruning_0_12)
    peft_out = _peft_merge(dirs, [0.4] * 3, PEFT_TYPES[method], 0.7, seed=3)
    _assert_same(peft_out, _lori_merge(dirs, [0.4] * 3, method, 0.7, seed=3, rescale=False), method)
    rescaled, _ = _lori_merge(dirs, [0.4] * 3, method, 0.7, seed=3, rescale=True)
    assert not torch.allclose(rescaled, peft_out[0], atol=1e-3)  # 0.12.0 differs from DARE's rescale


def test_dare_drops_follow_the_seed_and_the_module_order(tmp_path):
    """Same seed, same drops; another seed or another module order, other drops."""
    ads = [load_adapter(d) for d in _dirs(tmp_path)]
    order = [p for p, _ in make_tiny_llama().named_modules()]
    a = merge_factors(ads, [0.4] * 3, "dare", density=0.5, seed=1, order=order)
    b = merge_factors(ads, [0.4] * 3, "dare", density=0.5, seed=1, order=order)
    c = merge_factors(ads, [0.4] * 3, "dare", density=0.5, seed=2, order=order)
    d = merge_factors(ads, [0.4] * 3, "dare", density=0.5, seed=1, order=sorted(ads[0].A))
    first = order[[p in ads[0].A for p in order].index(True)]
    assert all(torch.equal(a.B[p], b.B[p]) for p in a.B)
    assert not torch.equal(a.B[first], c.B[first])
    assert list(a.A) == [p for p in order if p in ads[0].A]
    assert any(not torch.equal(a.B[p], d.B[p]) for p in a.B)
    torch.manual_seed(1)
    e = merge_factors(ads, [0.4] * 3, "dare", density=0.5, seed=None, order=order)  # torch's default generator
    assert all(torch.equal(a.A[p], e.A[p]) for p in a.A)


PEFT_0_12 = os.environ.get("LORI_PEFT_0_12")  # a folder holding PEFT 0.12.0 (pip install --target DIR peft==0.12.0)
CHECK_0_12 = """
import sys, tempfile, pathlib
sys.path.insert(0, "tests")
import peft, test_merge_peft as t
assert peft.__version__ == "0.12.0", peft.__version__
for sparsity in (None, 0.9):
    for method, density in [("dare", 0.7), ("dare_ties", 0.3), ("linear", None), ("concat", None), ("ties", 0.7),
                            ("magnitude", 0.3)]:
        dirs = t._dirs(pathlib.Path(tempfile.mkdtemp()), sparsity=sparsity)
        p = t._peft_merge(dirs, [0.4] * 3, t.PEFT_TYPES[method], density or 0.7, seed=5)
        t._assert_same(p, t._lori_merge(dirs, [0.4] * 3, method, density, seed=5, rescale=False), method)
print("same as PEFT 0.12.0")
"""


@pytest.mark.skipif(PEFT_0_12 is None, reason="set LORI_PEFT_0_12 to a folder holding PEFT 0.12.0")
def test_against_the_pinned_peft_0_12():
    """The official code's PEFT itself (not the installed one): rescale=False is its DARE."""
    repo = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([PEFT_0_12, str(repo)]))
    done = subprocess.run([sys.executable, "-c", CHECK_0_12], check=False, cwd=repo, env=env, capture_output=True,
                          text=True)
    assert done.returncode == 0 and "same as PEFT 0.12.0" in done.stdout, done.stderr[-2000:]


def test_lori_merge_official_protocol_is_the_official_merge(tmp_path, monkeypatch):
    """`lori merge` with protocol official: every merged model gives PEFT 0.12.0's logits."""
    import lori.training.module
    from lori.training.merge_run import MergeConfig, run_merge

    monkeypatch.setattr(lori.training.module, "build_model", lambda *args, **kwargs: (make_tiny_llama(), None))
    dirs = _dirs(tmp_path, alphas=(8.0, 8.0, 8.0))
    seen = []

    def evaluate(model, tokenizer, tasks):
        with torch.no_grad():
            seen.append(model(input_ids=INPUT).logits)
        return {}

    types = ["cat", "linear", "magnitude_prune", "ties", "dare_linear", "dare_ties"]
    cfg = MergeConfig(base_model="tiny", adapters=[str(d) for d in dirs], tasks=NAMES, method=types,
                      weights=[0.4] * 3, protocol="official", evaluate=["x"], device="cpu", seed=9,
                      output_dir=str(tmp_path / "out"))
    results = run_merge(cfg, evaluate=evaluate)
    assert [r["density"] for r in results["rows"]] == [None, None, 0.7, 0.7, 0.7, 0.7]
    monkeypatch.setattr(peft_merge_utils, "random_pruning", _random_pruning_0_12)
    for logits, combination_type in zip(seen, types):
        want, _ = _peft_merge(dirs, [0.4] * 3, combination_type, 0.7, seed=9)
        torch.testing.assert_close(logits, want, atol=1e-5 * float(want.abs().max()), rtol=0)
