"""protocol: official — the settings it fixes, and the optimiser behaviour of the official code."""

from __future__ import annotations

import math

import pytest
import torch
from pipeline_helpers import tiny_config, write_config

from lori.commands.pipeline_command import pipeline
from lori.core import load_adapter
from lori.core.protocol import OFFICIAL_SETTINGS, ProtocolError, apply_official, check_protocol
from lori.training.module import LoRIModule, _lr_lambda, clip_per_tensor

OFFICIAL_MODEL = {"weight_decay": 0.0, "loss_normalization": "sequence_sum", "gradient_clipping": "per_tensor",
                  "scheduler": "constant", "betas": (0.9, 0.999)}


def test_unknown_protocol_is_refused_by_name():
    assert check_protocol("official") == "official"
    with pytest.raises(ProtocolError, match="'paper'"):
        check_protocol("paper")


def _config(**model):
    return {"model": {"weight_decay": 0.0, "betas": [0.9, 0.999], "lori": {"dropout": 0.05},
                      "loss_normalization": "token_mean", "scheduler": "constant", "gradient_clipping": "global"}
            | model,
            "trainer": {"gradient_clip_val": None}, "data": {"max_length": 256, "max_prompt_length": 256}}


def test_settings_at_lori_defaults_take_the_official_values():
    config, defaults = _config(), _config()
    changed = apply_official(config, defaults)
    assert config["model"]["lori"]["dropout"] == 0.0
    assert config["model"]["loss_normalization"] == "sequence_sum"
    assert config["model"]["gradient_clipping"] == "per_tensor"
    assert config["trainer"]["gradient_clip_val"] is None  # a per-run value, as the scripts' grad_norm
    assert config["data"]["max_length"] == 256
    assert any(line.startswith("model.lori.dropout: 0.05 -> 0.0") for line in changed)
    assert not any(line.startswith("model.weight_decay") for line in changed)  # already official (0)


def test_settings_contradicting_the_protocol_are_all_named_in_one_error():
    config = _config(weight_decay=0.01, loss_normalization="token_mean", scheduler="cosine")
    with pytest.raises(ProtocolError) as err:
        apply_official(config, _config())
    message = str(err.value)
    assert "model.weight_decay=0.01" in message and "model.scheduler='cosine'" in message
    assert "apply_mask_in_backward.py" in message and "\n" not in message
    assert "loss_normalization" not in message  # at lori's default: set, not refused


def test_only_the_sections_of_the_command_are_touched():
    config = {"model": _config()["model"]}
    apply_official(config, _config())
    assert set(config) == {"model"}


def test_every_fixed_setting_cites_the_official_code():
    for fixed in OFFICIAL_SETTINGS:
        assert ".py:" in fixed.source or ".sh" in fixed.source or ".yaml:" in fixed.source, fixed


def test_the_module_refuses_non_official_optimiser_settings():
    with pytest.raises(ProtocolError, match="weight_decay=0.01"):
        LoRIModule("tiny-llama", protocol="official", weight_decay=0.01,
                   **{k: v for k, v in OFFICIAL_MODEL.items() if k != "weight_decay"})
    with pytest.raises(ProtocolError, match="model.lori.dropout=0.05"):
        LoRIModule("tiny-llama", protocol="official", **OFFICIAL_MODEL)  # LoRIConfig's dropout is 0.05


def test_official_warmup_ramp():
    official = _lr_lambda("constant", 3, 100, "official")
    lori = _lr_lambda("constant", 3, 100, "lori")
    assert [official(s) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]  # min(1, (s+1)/(w+1))
    assert [lori(s) for s in range(5)] == [1 / 3, 2 / 3, 1.0, 1.0, 1.0]
    assert _lr_lambda("constant", 0, 100, "official")(0) == 1.0


def _grads(seed=0):
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.zeros(n)) for n in (5, 7, 3)]
    for p, scale in zip(params, (1.0, 10.0, 0.01)):
        p.grad = scale * torch.randn(p.shape, generator=g)
    return params


def test_per_tensor_clipping_is_clip_grad_norm_of_each_tensor():
    params, reference = _grads(), _grads()
    clip_per_tensor(params, 0.5)
    for p, r in zip(params, reference):
        torch.nn.utils.clip_grad_norm_(r, 0.5)
        assert torch.equal(p.grad, r.grad)
    norms = [float(p.grad.norm()) for p in params]
    assert norms[0] == pytest.approx(0.5, rel=1e-5) and norms[1] == pytest.approx(0.5, rel=1e-5)
    assert norms[2] < 0.5  # under the limit: untouched


def test_sharded_per_tensor_clipping_uses_each_tensor_s_whole_norm():
    whole = _grads()
    clip_per_tensor(whole, 0.5)
    # two "ranks" each hold half of every tensor's gradient; the shard sum adds their squares
    shards = [_grads(), _grads()]
    halves = [[], []]
    for rank in (0, 1):
        for p in shards[rank]:
            n = p.numel() // 2
            keep = slice(0, n) if rank == 0 else slice(n, None)
            q = torch.nn.Parameter(torch.zeros_like(p.grad[keep]))
            q.grad = p.grad[keep].clone()
            halves[rank].append(q)
    squares = [torch.stack([q.grad.pow(2).sum() for q in halves[r]]) for r in (0, 1)]
    total = squares[0] + squares[1]
    for rank in (0, 1):
        clip_per_tensor(halves[rank], 0.5, shard_sum=lambda t: total)
    for p, a, b in zip(whole, *halves):
        torch.testing.assert_close(torch.cat([a.grad, b.grad]), p.grad)


def _first_step_B(tmp_path, name, **model):
    cfg = tiny_config(tmp_path, output_dir=str(tmp_path / name), dense_steps=1, sparse_steps=1, held_out_loss=False)
    cfg["model"].update(model)
    cfg["trainer"]["gradient_clip_val"] = 1e-12
    pipeline(["--config", str(write_config(tmp_path, cfg, f"{name}.yaml"))])
    return load_adapter(tmp_path / name / "lori_d").B


def test_per_tensor_clipping_reaches_training(tmp_path):
    # clipped to 1e-12 << Adam's eps, the first AdamW step is lr * g_clipped / eps: with per-tensor
    # clipping every B moves by the same norm lr * 1e-12 / 1e-8; with global clipping by shares of it
    lr = 0.01
    per_tensor = _first_step_B(tmp_path, "per_tensor", gradient_clipping="per_tensor")
    norms = torch.tensor([float(b.norm()) for b in per_tensor.values()])
    assert torch.allclose(norms, torch.full_like(norms, lr * 1e-4), rtol=1e-3)
    global_ = _first_step_B(tmp_path, "global", gradient_clipping="global")
    shares = torch.tensor([float(b.norm()) for b in global_.values()])
    assert math.isclose(float(shares.pow(2).sum().sqrt()), lr * 1e-4, rel_tol=1e-3)
    assert float(shares.max() / shares.min()) > 2.0


def test_a_key_the_command_does_not_have_is_left_out():
    model = {k: v for k, v in _config()["model"].items() if k != "gradient_clipping"}
    config = {"model": model}
    apply_official(config, _config())
    assert "gradient_clipping" not in config["model"] and config["model"]["lori"]["dropout"] == 0.0


def _run_tiny(tmp_path, capsys, **top):
    cfg = tiny_config(tmp_path, dense_steps=1, sparse_steps=1, held_out_loss=False) | top
    cfg["data"]["max_prompt_length"] = 32  # the tiny config's max_length is 64
    summary = pipeline(["--config", str(write_config(tmp_path, cfg))])
    return summary, capsys.readouterr().err


def test_the_top_level_switch_puts_the_run_under_the_official_settings(tmp_path, capsys):
    summary, err = _run_tiny(tmp_path, capsys, protocol="official")
    assert "protocol official set" in err and "model.gradient_clipping: 'global' -> 'per_tensor'" in err
    resolved = (tmp_path / "run" / "lori_d" / "resolved_config.yaml").read_text()
    assert "protocol: official" in resolved and "gradient_clipping: per_tensor" in resolved
    assert "loss_normalization: sequence_sum" in resolved and "dropout: 0.0" in resolved


def test_the_top_level_switch_refuses_contradicting_settings_before_loading(tmp_path):
    cfg = tiny_config(tmp_path) | {"protocol": "official"}
    cfg["model"]["weight_decay"] = 0.1
    with pytest.raises(ProtocolError, match="model.weight_decay=0.1"):
        pipeline(["--config", str(write_config(tmp_path, cfg))])
    assert not (tmp_path / "run").exists()


def test_sections_limit_which_settings_are_applied():
    config = _config()
    assert apply_official(config, _config(), sections=("trainer", "data")) == []
    assert config == _config()  # every fixed setting lives under "model"
    changed = apply_official(config, _config(), sections=("model",))
    assert config["model"]["lori"]["dropout"] == 0.0 and config["model"]["gradient_clipping"] == "per_tensor"
    assert len(changed) == 3  # dropout, loss normalization, clipping


def test_a_tuple_official_value_is_set_as_a_list_and_compared_entry_by_entry():
    config, defaults = _config(betas=[0.9, 0.95]), _config(betas=[0.9, 0.95])
    assert "model.betas: [0.9, 0.95] -> (0.9, 0.999)" in apply_official(config, defaults)
    assert config["model"]["betas"] == [0.9, 0.999] and isinstance(config["model"]["betas"], list)


@pytest.mark.parametrize(("model", "named"), [
    ({"weight_decay": [0.0]}, "model.weight_decay=[0.0]"),  # a list is no number
    ({"loss_normalization": 1}, "model.loss_normalization=1"),  # a number is no name
])
def test_values_of_another_kind_are_conflicts(model, named):
    with pytest.raises(ProtocolError, match=r"^protocol official fixes settings this config sets "
                       r"otherwise: (.+; )?" + named.replace("[", r"\[").replace("]", r"\]")):
        apply_official(_config(**model), _config())


def test_conflicts_are_joined_and_end_with_the_fix():
    with pytest.raises(ProtocolError) as err:
        apply_official(_config(weight_decay=0.01, scheduler="cosine"), _config())
    message = str(err.value)
    assert message.startswith("protocol official fixes settings this config sets otherwise: model.")
    assert message.count("; model.") == 1 and message.endswith(" -- remove them or use protocol: lori")


@pytest.mark.parametrize("section", [None, 3])
def test_a_section_that_is_no_mapping_has_no_keys(section):
    config = {"model": section, "trainer": {"gradient_clip_val": None}}
    assert apply_official(config, _config()) == [] and config["model"] == section

