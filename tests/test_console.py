"""What ``lori`` prints: stage lines, a step progress bar and the summary, without the
dependencies' chatter; a user's own warnings still show; ``--verbose`` brings the detail back."""

from __future__ import annotations

import logging
import subprocess
import sys
import warnings

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from pipeline_helpers import TESTS, run_lori, tiny_config, write_config

from lori.training import console, progress

USER_WARNING = "a warning from the user's own callback"
# what Lightning, transformers and datasets print on their own in a default run
CHATTER = ("GPU available", "TPU available", "litlogger", "LeafSpec", "LightningCLI's args", "Seed set to",
           "Epoch 0/", "`Trainer.fit` stopped", "was configured so", "Loading weights", "tokenizing")


class WarnOnTrainStart(L.Callback):
    """A user's callback (named in the YAML) that raises its own warning."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        warnings.warn(USER_WARNING, UserWarning, stacklevel=1)


def _pipeline_config(tmp_path, name: str = "cfg.yaml"):
    cfg = tiny_config(tmp_path, dense_steps=2, sparse_steps=2, checkpoint_every=2)
    cfg["trainer"].pop("enable_progress_bar")  # the default: a bar
    cfg["trainer"]["callbacks"] = [{"class_path": "test_console.WarnOnTrainStart"}]
    return write_config(tmp_path, cfg, name)


def test_pipeline_prints_stage_lines_a_step_bar_and_the_users_warning_only(tmp_path):
    res = run_lori("pipeline", "--config", str(_pipeline_config(tmp_path)))
    text = res.stdout + res.stderr
    assert res.returncode == 0, text[-3000:]
    for noise in CHATTER:
        assert noise not in text, (noise, text[-3000:])
    assert "site-packages" not in text  # no warning raised (and located) inside a dependency
    warnings_shown = [line for line in res.stderr.splitlines() if "Warning" in line or "warn(" in line]
    assert warnings_shown, "the user's warning is missing"
    assert all(USER_WARNING in line or "warnings.warn" in line for line in warnings_shown), warnings_shown
    for line in ("LoRI-D -> calibration -> LoRI-S on tiny-llama: r=4",
                 "LoRI-D: 2 steps on 8 examples, 2,048 trainable (float32 base", "LoRI-D done in",
                 "calibration at step 2: kept 205 of 2,048 B entries", "LoRI-S: 2 steps on 8",
                 "LoRI-S done in", "2/2 steps", "loss "):
        assert line in res.stderr, (line, res.stderr[-3000:])
    assert "Epoch" not in res.stderr
    assert res.stdout.startswith("LoRI run summary")  # the result on stdout, progress on stderr


def test_verbose_brings_back_the_libraries_own_output(tmp_path):
    res = run_lori("pipeline", "--config", str(_pipeline_config(tmp_path)), "--verbose")
    text = res.stdout + res.stderr
    assert res.returncode == 0, text[-3000:]
    for detail in ("GPU available", "litlogger", "LightningCLI's args", "Seed set to", "LoRI-D done in"):
        assert detail in text, detail
    assert USER_WARNING in res.stderr


def test_help_of_every_command_prints_no_warning():
    commands = ["pipeline", "fit", "validate", "continual", "eval", "merge", "diagnose", "dryrun"]
    code = (
        "import sys\nfrom lori.commands.main import main\n"
        f"for command in {commands!r}:\n"
        "    sys.argv = ['lori', command, '--help']\n"
        "    try:\n        main()\n    except SystemExit:\n        pass\n"
        "    print('END OF', command)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                         cwd=TESTS.parent, check=False)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "warn" not in res.stderr.lower() and "site-packages" not in res.stderr, res.stderr[-2000:]
    assert res.stdout.count("END OF") == len(commands) and res.stdout.count("usage:") >= len(commands)


# ---- the pieces ---------------------------------------------------------------------------------

@pytest.fixture
def restore_console():
    """configure() changes process-wide logging levels and progress-bar switches: put them back."""
    from datasets.utils import logging as ds_logging
    from transformers.utils import logging as hf_logging

    levels = {name: logging.getLogger(name).level for name in console.LIGHTNING_LOGGERS}
    hf_bars, ds_bars = hf_logging.is_progress_bar_enabled(), ds_logging.is_progress_bar_enabled()
    yield
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)
    (hf_logging.enable_progress_bar if hf_bars else hf_logging.disable_progress_bar)()
    (ds_logging.enable_progress_bar if ds_bars else ds_logging.disable_progress_bar)()
    console.configure(verbose=True)  # only resets the flag


def test_pop_verbose_takes_the_flag_anywhere_or_the_environment(monkeypatch):
    monkeypatch.delenv(console.VERBOSE_ENV, raising=False)
    assert console.pop_verbose(["pipeline", "--verbose", "--config", "x"]) == (["pipeline", "--config", "x"], True)
    assert console.pop_verbose(["eval", "--model", "m"]) == (["eval", "--model", "m"], False)
    monkeypatch.setenv(console.VERBOSE_ENV, "1")
    assert console.pop_verbose(["eval"]) == (["eval"], True)
    monkeypatch.setenv(console.VERBOSE_ENV, "0")
    assert console.pop_verbose(["eval"]) == (["eval"], False)


def test_dependency_warnings_are_matched_by_their_module_not_hidden_everywhere(restore_console):
    message = "LightningCLI's args parameter is intended to run from within Python"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        console.configure(verbose=False)
        warnings.warn_explicit(message, UserWarning, "cli.py", 1, module="lightning.pytorch.cli")
        warnings.warn_explicit(message, UserWarning, "mine.py", 1, module="my_project.callbacks")
        warnings.warn_explicit("something else", UserWarning, "cli.py", 2, module="lightning.pytorch.cli")
        warnings.warn("a user's warning")
    shown = [(str(w.message), w.filename) for w in caught]
    assert (message, "cli.py") not in shown  # the dependency's own warning, at its source: filtered
    assert (message, "mine.py") in shown  # the same text from another module: shown
    assert ("something else", "cli.py") in shown  # another warning of the same module: shown
    assert any(text == "a user's warning" for text, _ in shown)


def test_configure_quiets_lightning_info_and_verbose_leaves_it(restore_console):
    for name in console.LIGHTNING_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO)  # as Lightning sets it on import
    console.configure(verbose=True)
    assert logging.getLogger("lightning.pytorch").getEffectiveLevel() == logging.INFO
    assert console.trainer_overrides({}) == {}
    console.configure(verbose=False)
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")  # "GPU available", tips
    assert not rank_zero.isEnabledFor(logging.INFO) and rank_zero.isEnabledFor(logging.WARNING)
    assert not logging.getLogger("lightning.fabric.utilities.seed").isEnabledFor(logging.INFO)
    assert console.trainer_overrides({}) == {"enable_model_summary": False}
    assert console.trainer_overrides({"enable_model_summary": True}) == {}  # asked for in the config
    logging.getLogger("lightning.pytorch").setLevel(logging.DEBUG)  # a user's own choice stays
    console.configure(verbose=False)
    assert logging.getLogger("lightning.pytorch").level == logging.DEBUG


def test_the_optional_kernel_record_of_bitsandbytes_is_dropped_and_only_it(restore_console):
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")  # bitsandbytes logs it at import
    filters = list(logger.filters)
    try:
        console.configure(verbose=False)
        console.configure(verbose=False)  # configuring twice adds one filter
        kernel = logger.makeRecord(logger.name, logging.WARNING, "ops.py", 1,
                                   "Failed to load CPU gemm_4bit_forward from kernels-community: %s", ("x",), None)
        other = logger.makeRecord(logger.name, logging.WARNING, "ops.py", 2, "another warning", (), None)
        assert not logger.filter(kernel) and logger.filter(other)
        assert sum(isinstance(f, console._DropRecords) for f in logger.filters) == 1
    finally:
        logger.filters[:] = filters


class _Regression(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.layer(x), y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_step_bar_counts_optimizer_steps_over_every_epoch(tmp_path, capsys):
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(16, 2, generator=g), torch.randn(16, 1, generator=g))
    loader = torch.utils.data.DataLoader(data, batch_size=2)  # 8 batches an epoch
    trainer = L.Trainer(max_epochs=3, accumulate_grad_batches=2, callbacks=[progress.StepProgressBar("LoRI-D")],
                        logger=False, enable_checkpointing=False, enable_model_summary=False,
                        default_root_dir=tmp_path, accelerator="cpu", devices=1)
    trainer.fit(_Regression(), loader)
    err = capsys.readouterr().err
    assert "LoRI-D  12/12 steps" in err  # 3 epochs x 8 batches / 2 accumulated, one bar for all epochs
    assert "loss " in err and "train/loss" not in err and "Epoch" not in err


def test_a_bar_is_added_unless_the_config_turns_bars_off_or_brings_one():
    assert [type(c) for c in progress.for_trainer("lori_d", {}, [])] == [progress.StepProgressBar]
    assert progress.for_trainer("lori_d", {}, [])[0].label == "LoRI-D"
    assert progress.for_trainer("lori_d", {"enable_progress_bar": False}, []) == []
    assert progress.for_trainer("lori_d", {"barebones": True}, []) == []
    assert progress.for_trainer("fit", {}, [TQDMProgressBar()]) == []


def test_format_metrics_drops_the_train_prefix_and_the_version():
    assert progress.format_metrics({"train/loss": 0.93214, "v_num": "lori_d", "val/loss": 1.5}) == (
        "loss 0.9321  val/loss 1.5")
