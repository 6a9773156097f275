"""Shared fixtures: tiny random-init causal LMs built locally (no download)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", help="run tests marked slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_slow = pytest.mark.skip(reason="slow: run with --runslow")
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "slow" in item.keywords and not config.getoption("--runslow"):
            item.add_marker(skip_slow)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Start the long subprocess runs the collected tests will read (tests/background_runs.py)."""
    import background_runs

    for name, fixture in background_runs.FIXTURES.items():
        if any(fixture in getattr(item, "fixturenames", ()) for item in session.items):
            background_runs.start(name)


def make_tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    """A 2-layer random Llama small enough for unit tests."""
    kwargs = dict(
        hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
        num_hidden_layers=2, vocab_size=96, max_position_embeddings=64,
    )
    kwargs.update(overrides)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return LlamaForCausalLM(LlamaConfig(**kwargs)).eval()


def make_tiny_qwen2(seed: int = 0) -> Qwen2ForCausalLM:
    """A 2-layer random Qwen2 (a second model family)."""
    cfg = Qwen2Config(
        hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
        num_hidden_layers=2, vocab_size=96, max_position_embeddings=64,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return Qwen2ForCausalLM(cfg).eval()


@pytest.fixture
def tiny_llama() -> LlamaForCausalLM:
    return make_tiny_llama()


@pytest.fixture
def tokens() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 96, (2, 12), generator=g)
