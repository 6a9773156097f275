"""A run interrupted mid-LoRI-S and resumed ends with the same adapter as an uninterrupted one."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from pipeline_helpers import tiny_config, write_config

import lori.commands.pipeline_command as cli
from lori.core import load_adapter
from lori.data.datamodule import ResumableSampler

DROPOUT = 0.1


class Crash(RuntimeError):
    pass


class CrashAt(L.Callback):
    """Dies after the given optimizer step, before that step's checkpoint is written."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            raise Crash(f"killed at step {self.step}")


def crashing_factory(stage: str, step: int):
    real = cli.make_trainer_factory

    def factory(*args, **kwargs):
        make = real(*args, **kwargs)

        def wrapped(**kw):
            if kw["stage"] == stage:
                kw["callbacks"] = [*kw["callbacks"], CrashAt(step)]
            return make(**kw)

        return wrapped

    return factory


def run(tmp_path, name, crash=None, monkeypatch=None, **pipeline):
    cfg = tiny_config(tmp_path, output_dir=str(tmp_path / name), checkpoint_every=1, **pipeline)
    cfg["model"]["lori"]["dropout"] = DROPOUT  # the random stream must continue too
    path = write_config(tmp_path, cfg, f"{name}.yaml")
    if crash is not None:
        with monkeypatch.context() as m:
            m.setattr(cli, "make_trainer_factory", crashing_factory(*crash))
            with pytest.raises(Crash):
                cli.pipeline(["--config", str(path)])
    return cli.pipeline(["--config", str(path)])


STEPS = {"dense_steps": 6, "sparse_steps": 10, "held_out_loss": False}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    return run(tmp, "full", **STEPS), load_adapter(tmp / "full" / "lori_s")


# 8 training examples, batch 2: 4 batches per epoch; LoRI-S runs 10 steps = 2.5 epochs
@pytest.mark.parametrize("stage,step", [("lori_s", 6), ("lori_s", 8), ("lori_d", 3)],
                         ids=["mid-epoch-of-lori-s", "end-of-epoch-of-lori-s", "mid-lori-d"])
def test_resumed_run_ends_with_the_same_adapter(tmp_path, monkeypatch, uninterrupted, stage, step):
    full, expected = uninterrupted
    resumed = run(tmp_path, "resumed", crash=(stage, step), monkeypatch=monkeypatch, **STEPS)
    assert resumed["lori_d"]["steps"] == 6 and resumed["lori_s"]["steps"] == 10
    got = load_adapter(tmp_path / "resumed" / "lori_s")
    assert got.B.keys() == expected.B.keys()
    for path in expected.B:
        assert torch.equal(got.masks[path], expected.masks[path]), path
        assert torch.equal(got.B[path], expected.B[path]), path


def test_sampler_skips_consumed_batches_and_reshuffles_per_epoch():
    data = list(range(10))
    s = ResumableSampler(data, batch_size=3, seed=5)
    epoch0 = list(s)
    assert sorted(epoch0) == data
    s.set_epoch(1)
    epoch1 = list(s)
    assert epoch1 != epoch0 and sorted(epoch1) == data
    s.set_epoch(1)
    s.skip_batches = 2
    assert list(s) == epoch1[6:]  # the two consumed batches are skipped once
    assert list(s) == epoch1
    # two ranks split one permutation between them
    r0, r1 = (list(ResumableSampler(data, 3, 5, num_replicas=2, rank=k)) for k in (0, 1))
    assert sorted(r0 + r1) == data
