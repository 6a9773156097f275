"""The method registry (``lori.training.baselines.registry``): one battery over every entry.

A new method gets every check here by adding its ``Method(...)`` to
``lori.training.baselines.methods`` and its row to ``TRAINS`` below (nothing else:
``test_a_new_method_is_one_entry_and_its_row`` adds a throwaway one that way): the entry is complete for its
family, attaching it to a tiny Llama trains exactly the row's tensors and leaves the output equal to
the base's, its checkpoints keep what trains, its saved adapter reloads to the same logits, an option
of another method is refused, a quantized base is refused exactly when it changes the base. An unknown
name, and an old name (``renamed_from``), fail in one line. The overview table is rendered from the
entries, and docs/guide.md holds it as rendered. Whole fits per method are in test_baselines.
"""

from __future__ import annotations

import dataclasses
import functools
import pickle

import pytest
import torch

import lori.training.module
from lori.core import InjectionError, LoRIConfig, LoRIConfigError, base_fingerprint
from lori.training import baselines
from lori.training.base_model import tiny_llama
from lori.training.baselines import (
    BaselineOptions,
    BaselineOptionsError,
    all_methods,
    get_method,
    method_table,
)
from lori.training.baselines.__main__ import BEGIN, END, GUIDE, main, with_method_table
from lori.training.baselines.options import DEFAULTS, RULES
from lori.training.baselines.registry import (
    LORI_FIELDS,
    REGISTRY,
    Method,
    current_name,
    find_method,
    register,
)
from lori.training.module import LoRIModule
from lori.training.quantize import QuantizeError, check_quantize

LORI = LoRIConfig(r=4, alpha=8.0, dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"], seed=3)
ALL = "*"  # every parameter of the model trains
# the trainable tensors of each method, by a fragment of their names: one row per registry entry
TRAINS: dict[str, list[str] | str] = {
    "lori": [".lori_B"], "lori_d": [".lori_B"], "lora": [".lora_A.", ".lora_B."],
    "dora": [".lora_A.", ".lora_B.", "lora_magnitude_vector"], "lora_fa": [".lora_B."],
    "vera": ["vera_lambda_b", "vera_lambda_d"], "ia3": ["ia3_l"], "adalora": [".lora_A.", ".lora_B.", ".lora_E."],
    "rslora": [".lora_A.", ".lora_B."], "pissa": [".lora_A.", ".lora_B."], "loraplus": [".lora_A.", ".lora_B."],
    "full": ALL,
}
NAMES = [m.name for m in all_methods()]


def _ids() -> torch.Tensor:
    return torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))


@functools.cache
def _base_logits() -> torch.Tensor:
    return _logits(tiny_llama())


def _logits(model: torch.nn.Module) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=_ids()).logits


def _row(name: str) -> list[str] | str:
    assert name in TRAINS, f"method {name!r} has no row in TRAINS (tests/test_method_registry.py): add a row"
    return TRAINS[name]


@pytest.mark.parametrize("name", NAMES)
def test_the_entry_is_complete_for_its_family(name):
    entry = get_method(name)
    assert entry.name == name and entry.label and entry.trains and entry.built_with and entry.saved_as
    assert set(entry.reads) <= set(LORI_FIELDS) and set(entry.options) <= set(BaselineOptions.names())
    assert all(option in DEFAULTS for option in entry.options)
    assert (entry.peft_config is not None) == (entry.family == "peft")
    assert entry.runs_pipeline <= entry.sparsifies <= (entry.family == "lori")  # only LoRI's layers take a mask
    assert entry.trains_base <= (entry.changes_base is not None)  # a trained base cannot be a frozen 4-bit copy
    assert entry.frozen_seeded_a <= (TRAINS.get(name) != ALL and not any("_A" in f for f in _row(name)))
    assert not entry.renamed_from or set(entry.renamed_from).isdisjoint(NAMES)
    row = f"| `{name}`" + "".join(f" (was `{old}`)" for old in entry.renamed_from)
    assert f"\n{row} | {entry.trains} | {entry.built_with} | {entry.saved_as} |\n" in method_table()


@pytest.mark.parametrize("name", NAMES)
def test_attach_trains_its_row_keeps_the_base_output_and_saves_what_reloads(name, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    row, entry, base = _row(name), get_method(name), _base_logits()
    model = tiny_llama()
    fingerprint = base_fingerprint(model, baselines.target_paths(model, LORI.target_modules))
    config = baselines.attach(model, name, LORI)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if row == ALL:
        assert trainable == {n for n, _ in model.named_parameters()}
    else:
        assert trainable and all(any(f in n for f in row) for n in trainable), sorted(trainable)[:3]
        assert all(any(f in n for n in trainable) for f in row)  # every kind of tensor in the row trains
    assert torch.allclose(_logits(model), base, atol=1e-5)  # B = 0, IA3 ones, VeRA lambda_b 0, PiSSA W0 - BA + BA
    # checkpoints: what trains is kept (a resume restores it), the frozen base is not (unless it trains)
    kept = {k for k in model.state_dict() if entry.checkpoint_keeps(f"model.{k}", {f"model.{n}" for n in trainable})}
    assert trainable <= kept and (entry.trains_base or "model.embed_tokens.weight" not in kept)
    # save: a trained adapter (every trainable tensor moved) reloads to the same logits
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    live = _logits(model)
    out = entry.save(model, None, config, tmp_path / name, "tiny", fingerprint, {"method": name})
    if entry.family == "full":
        reloaded = AutoModelForCausalLM.from_pretrained(str(out))
    else:  # lori and PEFT adapters are PEFT dirs (PiSSA as a LoRA of rank 2r on the original base)
        reloaded = PeftModel.from_pretrained(tiny_llama(), str(out))
    assert not torch.allclose(live, base, atol=1e-4)
    assert torch.allclose(_logits(reloaded), live, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_an_option_of_another_method_is_refused(name):
    entry = get_method(name)
    other = next(o for o in BaselineOptions.names() if o not in entry.options)
    with pytest.raises(BaselineOptionsError, match=f"model.baseline.{other} .*not of method '{name}'"):
        baselines.check_method_options(name, LoRIConfig(), BaselineOptions.from_value({other: 1}))


@pytest.mark.parametrize("name", NAMES)
def test_a_quantized_base_is_refused_exactly_when_training_changes_it(name):
    entry = get_method(name)
    for mode in ("nf4", "int8"):
        if entry.changes_base or mode in entry.quantize_refused:
            with pytest.raises(QuantizeError, match=f"method '{name}'"):
                check_quantize(mode, name)
        else:
            check_quantize(mode, name)


def test_a_method_without_a_row_is_told_to_add_one():
    with pytest.raises(AssertionError, match="'qlora' has no row in TRAINS .*add a row"):
        _row("qlora")


@pytest.mark.parametrize("name", NAMES)
def test_the_entry_pickles(name):  # a spawned process (ddp_spawn) receives the LightningModule, entry included
    assert pickle.loads(pickle.dumps(get_method(name))).name == name


def test_every_option_has_a_default_and_a_rule():
    assert set(DEFAULTS) == set(BaselineOptions.names())
    assert set(RULES) | {"feedforward_modules"} == set(BaselineOptions.names())  # (a subset of the targets)
    assert {o for m in all_methods() for o in m.options} == set(BaselineOptions.names())  # each one is read


def test_an_unknown_method_fails_in_one_line_listing_every_method(monkeypatch):
    with pytest.raises(InjectionError) as err:
        get_method("qlora")
    message = str(err.value)
    assert "\n" not in message and "unknown method 'qlora'" in message and all(repr(n) in message for n in NAMES)

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(lori.training.module, "build_model", no_loading)
    with pytest.raises(InjectionError, match="unknown method 'qlora'"):
        LoRIModule(model="tiny", method="qlora")


@pytest.fixture
def renamed(monkeypatch):
    """A fake entry ``lora_renamed`` that was called ``lora_old``: LoRA under another name."""
    monkeypatch.setattr(baselines.registry, "REGISTRY", dict(REGISTRY))
    entry = dataclasses.replace(get_method("lora"), name="lora_renamed", renamed_from=("lora_old",))
    return register(entry)


def test_an_old_name_fails_in_one_line_naming_the_new_one(renamed, monkeypatch):
    with pytest.raises(LoRIConfigError) as err:
        get_method("lora_old")
    message = str(err.value)
    assert "\n" not in message and "'lora_old' is now called 'lora_renamed'" in message
    monkeypatch.setattr(lori.training.module, "build_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError))
    with pytest.raises(LoRIConfigError, match="now called 'lora_renamed'"):
        LoRIModule(model="tiny", method="lora_old")  # before the model loads
    assert get_method("lora_renamed") is renamed and current_name("lora_old") == "lora_renamed"
    assert current_name("lora") == "lora"  # files written before the rename name the same method


def test_a_taken_name_cannot_be_registered_again(renamed):
    for clash in (dataclasses.replace(renamed, renamed_from=()), dataclasses.replace(renamed, name="x")):
        with pytest.raises(ValueError, match="already registered"):
            register(clash)
    with pytest.raises(ValueError, match="needs a peft_config"):
        register(Method("y", "peft", "Y", "y", attach=renamed.attach, save=renamed.save,
                        checkpoint_keeps=renamed.checkpoint_keeps))


def test_the_public_names_are_views_of_the_table():
    assert baselines.METHODS == tuple(NAMES)
    assert baselines.LORI_METHODS == ("lori", "lori_d") and baselines.METHODS[-1] == "full"
    assert baselines.PEFT_METHODS == tuple(m.name for m in all_methods() if m.family == "peft")
    assert baselines.OPTIONS == {m.name: m.options for m in all_methods() if m.options}


def test_lora_frozen_a_is_now_lori_d(monkeypatch):
    """The one rename shipped: a config or command line naming lora_frozen_a fails in one line naming
    lori_d (tests/test_bad_input.py: through ``lori fit``); files of before read as lori_d
    (tests/test_baselines.py::test_files_written_as_lora_frozen_a_read_as_lori_d)."""
    with pytest.raises(LoRIConfigError) as err:
        get_method("lora_frozen_a")
    assert str(err.value) == ("model.method 'lora_frozen_a' is now called 'lori_d' (same method); "
                              "write model.method: lori_d")
    assert current_name("lora_frozen_a") == "lori_d" and find_method("lora_frozen_a") is get_method("lori_d")
    lori_d, lori = get_method("lori_d"), get_method("lori")  # LoRI-D alone: not the pipeline's method
    assert lori_d.renamed_from == ("lora_frozen_a",) and not lori_d.sparsifies and not lori_d.runs_pipeline
    assert lori.runs_pipeline and lori.sparsifies and lori_d.frozen_seeded_a and lori_d.family == "lori"


# ---- the overview table: rendered from the entries, copied into docs/guide.md by a command ------
def test_the_guide_holds_the_table_the_entries_render():
    text = GUIDE.read_text(encoding="utf-8")
    copy = text.split(BEGIN + "\n", 1)[1].split(END, 1)[0]
    assert copy == method_table(), "docs/guide.md's method table is stale: run python -m lori.training.baselines --write"
    assert with_method_table(text) == text and len(copy.splitlines()) == len(NAMES) + 2


def test_the_table_command_renews_only_the_table(tmp_path, capsys):
    doc = tmp_path / "doc.md"
    doc.write_text(f"# before\n{BEGIN}\n| stale |\n{END}\nafter\n")
    assert main(["--write", str(doc)]) == 0
    assert doc.read_text() == f"# before\n{BEGIN}\n{method_table()}{END}\nafter\n"
    assert main([]) == 0 and capsys.readouterr().out.endswith(method_table())
    doc.write_text("no markers\n")
    with pytest.raises(SystemExit) as err:
        main(["--write", str(doc)])
    assert err.value.code == 2 and "no method table to renew" in capsys.readouterr().err
    assert doc.read_text() == "no markers\n"


def test_a_new_method_is_one_entry_and_its_row(monkeypatch, tmp_path):
    """Add a throwaway method the way docs/extending.md says (one entry, its TRAINS row) and run it
    through the battery, LoRIModule, its optimizer, saving, the model card, the guide's table and
    ``lori fit``'s derived settings: none of them may need another edit."""
    from lori.training.fit_settings import derived_fit_settings
    from lori.training.model_card import write_module_card

    monkeypatch.setattr(baselines.registry, "REGISTRY", dict(REGISTRY))
    lora = get_method("lora")
    new = register(Method("lora_new", "peft", "LoRA-new", "A and B (a throwaway)", attach=lora.attach, save=lora.save,
                          checkpoint_keeps=lora.checkpoint_keeps, built_with="PEFT LoRA", saved_as="PEFT dir",
                          peft_config=lora.peft_config))
    monkeypatch.setitem(TRAINS, "lora_new", [".lora_A.", ".lora_B."])  # its test row
    for check in (test_the_entry_is_complete_for_its_family, test_an_option_of_another_method_is_refused,
                  test_a_quantized_base_is_refused_exactly_when_training_changes_it, test_the_entry_pickles):
        check("lora_new")
    test_attach_trains_its_row_keeps_the_base_output_and_saves_what_reloads("lora_new", tmp_path)
    guide = GUIDE.read_text(encoding="utf-8")  # the doc: renewed by the command, nothing written by hand
    renewed = with_method_table(guide)
    assert renewed.replace("| `lora_new` | A and B (a throwaway) | PEFT LoRA | PEFT dir |\n", "", 1) == guide
    monkeypatch.setattr(lori.training.module, "build_model", lambda *a, **k: (tiny_llama(), None))
    module = LoRIModule(model="tiny", method="lora_new", lori=dataclasses.asdict(LORI))
    assert module.method_entry is new and baselines.build_optimizer("lora_new", module.model, 0.1, 0.0, (0.9, 0.99), {})
    module.save_adapter(tmp_path / "adapter", stage="lora_new")
    card = write_module_card(tmp_path / "adapter", module, "lora_new").read_text()
    assert "- Method: LoRA-new (lori fit baseline)" in card
    pipeline = {"output_dir": "runs/x/name", "dense_steps": 5}
    derived = derived_fit_settings({"model": {"method": "lora_new"}, "pipeline": pipeline, "trainer": {}})
    assert derived["callbacks"][0]["init_args"]["directory"] == "runs/x/lora_new/name"
