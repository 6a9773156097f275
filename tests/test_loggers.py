"""``trainer.logger``: the user's Lightning logger(s) in every stage of ``lori pipeline``, ``lori continual``
and ``lori fit``, with real CSV, MLflow (local file store) and W&B (offline) writing under tmp_path; then
the same run's checkpoints through ``LoRIModule.load_from_checkpoint`` (no Trainer, CPU, no warning:
the saved adapter's logits) and ``lori validate --ckpt_path``."""

from __future__ import annotations

import contextlib
import copy
import csv
import io
import json
import re
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.loggers import CSVLogger
from pipeline_helpers import tiny_config, write_config
from test_continual import continual_config

from lori.commands.continual_command import continual
from lori.commands.main import main
from lori.commands.pipeline_command import pipeline
from lori.core import LoRIConfigError, apply_adapter, load_adapter
from lori.training.loggers import RunLoggers, scoped, user_loggers
from lori.training.module import CheckpointMismatchError, LoRIModule, build_model
from lori.training.pipeline import make_trainer_factory

CSV = "lightning.pytorch.loggers.CSVLogger"


def csv_logger(save_dir: Path) -> dict:
    return {"class_path": CSV, "init_args": {"save_dir": str(save_dir), "name": "lori"}}


def csv_metrics(save_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every metric of the CSVLogger run under ``save_dir`` as ``{name: [(step, value), ...]}``."""
    (version,) = (save_dir / "lori").iterdir()  # one run: one version directory
    out: dict[str, list[tuple[int, float]]] = {}
    with open(version / "metrics.csv") as f:
        for row in csv.DictReader(f):
            for key, value in row.items():
                if key != "step" and value != "":
                    out.setdefault(key, []).append((int(row["step"]), float(value)))
    return out


def csv_hparams(save_dir: Path) -> dict:
    (version,) = (save_dir / "lori").iterdir()
    return yaml.safe_load((version / "hparams.yaml").read_text())


def wandb_records(save_dir: Path) -> tuple[dict[str, list[float]], dict]:
    """(history ``{key: [values]}``, config) of the one offline W&B run under ``save_dir``.

    The run file is a LevelDB-style log (7-byte file header, 32 KiB blocks, each chunk headed by
    crc32, length, type) of ``wandb_internal_pb2.Record`` messages.
    """
    from wandb.proto import wandb_internal_pb2

    (run_file,) = (save_dir / "wandb").glob("offline-run-*/run-*.wandb")
    data, pos, part, block = run_file.read_bytes(), 7, b"", 32768
    history: dict[str, list[float]] = {}
    config: dict = {}
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's zero trailer
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        part = (b"" if kind in (1, 2) else part) + data[pos + 7:pos + 7 + length]  # FULL, FIRST | MIDDLE, LAST
        pos += 7 + length
        if kind not in (1, 4):
            continue
        record = wandb_internal_pb2.Record()
        record.ParseFromString(part)
        if record.WhichOneof("record_type") == "history":
            for item in record.history.item:
                history.setdefault(item.key or "/".join(item.nested_key), []).append(json.loads(item.value_json))
        elif record.WhichOneof("record_type") == "config":
            for item in record.config.update:
                config[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return history, config


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory):
    """One pipeline with three loggers at once: CSV, MLflow (file store), W&B (offline)."""
    tmp = tmp_path_factory.mktemp("loggers")
    cfg = tiny_config(tmp, dense_steps=3, sparse_steps=2, checkpoint_every=1, sparse_alpha=16.0)  # LoRI-S: own alpha
    cfg["trainer"]["logger"] = [
        csv_logger(tmp / "csv"),
        {"class_path": "lightning.pytorch.loggers.MLFlowLogger",
         "init_args": {"tracking_uri": (tmp / "mlruns").as_uri(), "experiment_name": "lori"}},
        {"class_path": "lightning.pytorch.loggers.WandbLogger",
         "init_args": {"save_dir": str(tmp / "wandb"), "offline": True, "project": "lori"}},
    ]
    stderr, stdout = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as env, contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(stdout):
        env.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks for this to write a local file store
        env.setenv("WANDB_MODE", "offline")
        env.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # a call out would fail, not reach anyone
        env.delenv("WANDB_SILENT", raising=False)  # lori's quiet console sets it
        main(["pipeline", "--config", str(write_config(tmp, cfg))])
    return tmp, stderr.getvalue(), stdout.getvalue()


def test_csv_logger_gets_every_stage_under_its_name_and_the_hparams_once(logged_run):
    tmp, _, printed = logged_run
    metrics = csv_metrics(tmp / "csv")
    assert [step for step, _ in metrics["lori_d/train/loss"]] == [0, 1, 2]
    assert [step for step, _ in metrics["lori_s/train/loss"]] == [0, 1]
    assert metrics["lori_d/calibration/density"] == [(3, pytest.approx(0.1, abs=0.01))]
    assert metrics["lori_s/params/trainable_sparse"][0][1] < metrics["lori_d/params/trainable_dense"][0][1]
    assert not any(key.startswith(("train/", "eval/")) for key in metrics)  # nothing unprefixed
    hparams = csv_hparams(tmp / "csv")
    assert hparams["lr"] == 0.01 and hparams["lori"]["sparsity"] == 0.9 and hparams["held_out"] == 4
    assert hparams["pipeline"]["dense_steps"] == 3 and hparams["pipeline"]["sparse_steps"] == 2
    assert not (tmp / "run" / "tb").exists()  # the user's logger replaces TensorBoard
    assert "LoRI run summary" in printed and "tensorboard" not in printed  # the summary names no TB directory


def test_mlflow_file_store_holds_one_finished_run_with_both_stages(logged_run):
    from mlflow.tracking import MlflowClient

    tmp, _, _ = logged_run
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
        client = MlflowClient((tmp / "mlruns").as_uri())
        (run,) = client.search_runs([client.get_experiment_by_name("lori").experiment_id])
        assert run.info.status == "FINISHED"
        history = {key: [m.step for m in client.get_metric_history(run.info.run_id, key)]
                   for key in ("lori_d/train/loss", "lori_s/train/loss")}
    assert history == {"lori_d/train/loss": [0, 1, 2], "lori_s/train/loss": [0, 1]}
    assert {"lori_d/lr", "lori_s/lr", "lori_d/calibration/density"} <= set(run.data.metrics)
    params = run.data.params
    assert params["lr"] == "0.01" and params["pipeline/dense_steps"] == "3" and params["lori/r"] == "4"


def test_wandb_offline_run_has_both_stages_and_config_and_prints_nothing(logged_run):
    tmp, stderr, _ = logged_run
    history, config = wandb_records(tmp / "wandb")
    assert len(history["lori_d/train/loss"]) == 3 and len(history["lori_s/train/loss"]) == 2
    assert config["lr"] == 0.01 and config["pipeline"]["dense_steps"] == 3
    assert "wandb" not in stderr.lower()  # no banner, no warning, no sync advice
    assert "LoRI-D: 3 steps" in stderr and "LoRI-S done" in stderr  # lori's own lines are there


@pytest.mark.slow
def test_continual_stages_log_under_their_phase(tmp_path):
    cfg = yaml.safe_load(continual_config(tmp_path, "cont", safety_dense_steps=2, safety_sparse_steps=1,
                                          task_mask_steps=1, task_steps=1).read_text())
    cfg["trainer"]["logger"] = csv_logger(tmp_path / "csv")
    cfg["eval"] |= {"tasks": ["gsm8k"], "max_examples": 1, "max_new_tokens": 1}
    continual(["--config", str(write_config(tmp_path, cfg, "logged.yaml"))])
    metrics = csv_metrics(tmp_path / "csv")
    assert {"safety/lori_d/train/loss", "safety/lori_s/train/loss", "task_mask/lori_d/train/loss", "task/train/loss",
            "safety/lori_d/calibration/density", "task_mask/lori_d/calibration/density"} <= set(metrics)
    assert len(metrics["safety/lori_d/train/loss"]) == 2
    assert [step for step, _ in metrics["continual/gsm8k/accuracy"]] == [1, 2]  # the safety and task phases
    assert not (tmp_path / "cont" / "tb").exists()
    hparams = csv_hparams(tmp_path / "csv")
    assert hparams["continual"]["task_steps"] == 1 and hparams["lr"] == 0.01


def test_fit_uses_the_logger_given_on_the_command_line(tmp_path):
    cfg = tiny_config(tmp_path)
    del cfg["pipeline"]
    cfg["trainer"] |= {"max_steps": 2, "default_root_dir": str(tmp_path)}
    main(["fit", "--config", str(write_config(tmp_path, cfg)), "--trainer.logger", "CSVLogger",  # as in the README
          "--trainer.logger.save_dir", str(tmp_path / "csv"), "--trainer.logger.name", "lori"])
    metrics = csv_metrics(tmp_path / "csv")
    assert [step for step, _ in metrics["train/loss"]] == [0, 1]  # one stage: names as Lightning logs them
    hparams = csv_hparams(tmp_path / "csv")
    assert hparams["lr"] == 0.01 and hparams["lori"]["r"] == 4 and hparams["held_out"] == 4


def test_continual_scopes_its_phases_stage_names(tmp_path):
    run = RunLoggers(CSVLogger(str(tmp_path)), tmp_path)
    make = make_trainer_factory({"accelerator": "cpu", "enable_progress_bar": False}, tmp_path, 1, run)
    trainer = scoped(make, "task_mask")(stage="lori_d", max_steps=1, callbacks=[])
    assert [logger.stage for logger in trainer.loggers] == ["task_mask/lori_d"]
    assert make(stage="task", max_steps=1, callbacks=[]).loggers[0].stage == "task"
    assert make(stage="eval", max_steps=-1, callbacks=[], logger=False).loggers == []


def test_logger_false_disables_logging_and_the_default_is_tensorboard(tmp_path):
    assert RunLoggers(False, tmp_path).for_stage("lori_d") is False
    default = RunLoggers(None, tmp_path).for_stage("safety/lori_d")
    assert Path(default.log_dir) == tmp_path / "tb" / "safety" / "lori_d"
    assert RunLoggers(True, tmp_path).for_stage("lori_s").version == "lori_s"
    with pytest.raises(LoRIConfigError, match="trainer.logger must be"):
        user_loggers(["not a logger"])


# --- the run's checkpoints: LoRIModule.load_from_checkpoint and lori validate --ckpt_path ----------

@pytest.fixture(scope="module")
def run_dir(logged_run):
    return logged_run[0]


@pytest.fixture(scope="module")
def tiny_base():
    return build_model("tiny-llama", None, "float32", None)[0].eval()


@pytest.mark.parametrize("stage", ["lori_d", "lori_s"])
def test_load_from_checkpoint_gives_the_saved_adapters_logits_quietly(run_dir, tiny_base, stage):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = LoRIModule.load_from_checkpoint(run_dir / "run" / f"{stage}_ckpt" / "last.ckpt")
    assert [str(w.message) for w in caught if "lightning" in w.filename or "/lori/" in w.filename] == []
    assert module.phase == ("sparse" if stage == "lori_s" else "dense") and module.device.type == "cpu"
    ids = torch.randint(0, 100, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = module.eval()(ids)
        adapted = copy.deepcopy(tiny_base)
        apply_adapter(adapted, load_adapter(run_dir / "run" / stage))
        expected, base = adapted(input_ids=ids).logits, tiny_base(input_ids=ids).logits
    assert torch.allclose(logits, expected, atol=1e-6) and not torch.allclose(logits, base, atol=1e-4)


def test_a_checkpoint_missing_or_adding_an_adapter_key_still_fails(run_dir):
    ckpt = torch.load(run_dir / "run" / "lori_s_ckpt" / "last.ckpt", weights_only=True)
    module = LoRIModule.load_from_checkpoint(run_dir / "run" / "lori_s_ckpt" / "last.ckpt")
    state = dict(ckpt["state_dict"])
    key = next(k for k in state if k.endswith("lori_B_values"))
    with pytest.raises(CheckpointMismatchError, match="missing .*lori_B_values"):
        module.load_state_dict({k: v for k, v in state.items() if k != key})
    with pytest.raises(CheckpointMismatchError, match="unexpected .*lori_C"):
        module.load_state_dict(state | {key.replace("lori_B_values", "lori_C"): state[key]})
    with pytest.raises(RuntimeError, match="size mismatch"):
        module.load_state_dict(state | {key: torch.zeros(state[key].numel() + 1)})


def test_validate_cli_on_a_pipeline_checkpoint(run_dir, tmp_path, capsys):
    cfg = tiny_config(run_dir)
    del cfg["pipeline"]
    cfg["trainer"] |= {"logger": False, "default_root_dir": str(tmp_path)}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        main(["validate", "--config", str(write_config(tmp_path, cfg)),
              "--ckpt_path", str(run_dir / "run" / "lori_s_ckpt" / "last.ckpt")])
    shown = [w for w in caught if not issubclass(w.category, DeprecationWarning)]  # (hidden by default)
    assert [str(w.message) for w in shown if "lightning" in w.filename or "/lori/" in w.filename] == []
    loss = float(re.search(r"val/loss\W+([0-9.]+)", capsys.readouterr().out).group(1))
    summary = json.loads((run_dir / "run" / "summary.json").read_text())
    assert loss == pytest.approx(summary["lori_s"]["val_loss_after"], abs=1e-5)  # the LoRI-S model, not the base
