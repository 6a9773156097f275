"""LoRIModule: the LightningModule that holds a LoRI-injected causal LM and trains only B.

The nn.Module is built outside (``lori.models``) and injected by ``lori.core``; this class only
adds the loss, logging and the optimizer over the trainable B (dense B in LoRI-D, the kept entries
in LoRI-S). Phase changes (calibration, the LoRI-S reset) belong to ``lori.callbacks``.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lori.core import LoRIConfig, base_fingerprint, count_trainable, inject_lori, lori_layers, trainable_parameters
from lori.models import load_base_model, tiny_llama

TINY = "tiny-llama"  # random-init 2-layer Llama with the default model's tokenizer: for tests


class CheckpointMismatchError(ValueError):
    """A checkpoint written for another base model or adapter shape."""


def build_model(name: str | None, gguf_file: str | None, dtype: str, cache_dir: str | None) -> tuple[nn.Module, Any]:
    """Base model and tokenizer: ``tiny-llama``, the embedded default (None), a path or hub id."""
    if name == TINY:
        _, tokenizer = load_base_model(None, cache_dir=cache_dir)
        vocab = len(tokenizer)
        return tiny_llama(vocab_size=vocab, max_position_embeddings=1024), tokenizer
    return load_base_model(name, gguf_file=gguf_file, dtype=dtype, cache_dir=cache_dir)


class LoRIModule(L.LightningModule):
    """Causal-LM fine-tuning with a LoRI adapter.

    Args:
        model: base model: ``smollm2-135m-instruct`` (embedded default, shipped as GGUF),
            ``tiny-llama`` (random, for tests), a local Hugging Face directory or a hub id.
        gguf_file: GGUF file name inside ``model`` when it is a directory of GGUF files.
        dtype: weight dtype of the base model (``float32``, ``bfloat16``).
        cache_dir: where converted GGUF models are cached (default ``~/.cache/lori/models``).
        lori: the adapter's hyperparameters (rank, alpha, dropout, targets, sparsity, granularity, seed).
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay (applies only to trainable, i.e. kept, entries).
        betas: AdamW betas.
        scheduler: ``constant`` or ``cosine`` (decay to 0 over the fit's total steps).
        warmup_steps: linear warm-up steps before the schedule.
        loss_normalization: ``token_mean`` (mean over response tokens of the batch) or
            ``sequence_sum`` (the paper's: sum of response-token NLL per sequence, mean over sequences).
    """

    def __init__(
        self,
        model: str | None = "smollm2-135m-instruct",
        gguf_file: str | None = None,
        dtype: str = "float32",
        cache_dir: str | None = None,
        lori: LoRIConfig = LoRIConfig(),  # noqa: B008 - a frozen-by-convention default
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        scheduler: Literal["constant", "cosine"] = "constant",
        warmup_steps: int = 0,
        loss_normalization: Literal["token_mean", "sequence_sum"] = "token_mean",
    ) -> None:
        super().__init__()
        self.lori_config = lori if isinstance(lori, LoRIConfig) else LoRIConfig.from_dict(dict(lori))
        self.save_hyperparameters(ignore=["lori"])
        self.hparams["lori"] = self.lori_config.to_dict()  # plain types: checkpoints load weights_only
        self.model, self.tokenizer = build_model(model, gguf_file, dtype, cache_dir)
        inject_lori(self.model, self.lori_config)
        self.model.train()  # from_pretrained returns eval mode; LoRI dropout must be live in training
        self.fingerprint = base_fingerprint(self.model, list(lori_layers(self.model)))
        self.phase = "dense"  # "dense" (LoRI-D) or "sparse" (LoRI-S); set by the callbacks
        self.strict_loading = False  # checkpoints hold only the adapter, not the frozen base

    @staticmethod
    def check_options(options: Any) -> None:
        """Validate parsed ``model:`` options before anything loads (names the bad value)."""
        lori = options.get("lori") if hasattr(options, "get") else None
        if lori is not None and not isinstance(lori, LoRIConfig):
            LoRIConfig.from_dict(dict(lori))
        if options.get("lr", 1.0) <= 0:
            raise ValueError(f"lr must be > 0, got lr={options.get('lr')!r}")
        if options.get("warmup_steps", 0) < 0:
            raise ValueError(f"warmup_steps must be >= 0, got warmup_steps={options.get('warmup_steps')!r}")

    # ---- forward / loss -------------------------------------------------------------------
    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    def loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Causal-LM loss over response tokens (labels != -100)."""
        logits, labels = logits[:, :-1].float(), labels[:, 1:]
        nll = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")  # (b, t)
        if self.hparams.loss_normalization == "sequence_sum":
            return nll.sum(1).mean()
        return nll.sum() / (labels != -100).sum().clamp(min=1)

    def model_step(self, batch: dict[str, Tensor]) -> Tensor:
        logits = self(batch["input_ids"], batch.get("attention_mask"))
        return self.loss(logits, batch["labels"])

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = self.model_step(batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"non-finite training loss {loss.item()} at global step {self.global_step} "
                f"(phase {self.phase}); the last good checkpoint is kept"
            )
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = self.model_step(batch)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = self.model_step(batch)
        self.log("test/loss", loss, sync_dist=True, batch_size=batch["input_ids"].shape[0])
        return loss

    # ---- optimisation ---------------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        params = trainable_parameters(self.model)
        hp = self.hparams
        optimizer = torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay, betas=tuple(hp.betas))
        total = max(1, int(self.trainer.estimated_stepping_batches))
        schedule = _lr_lambda(hp.scheduler, hp.warmup_steps, total)
        lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": lr_scheduler, "interval": "step"}}

    def on_train_start(self) -> None:
        if self.logger is not None:
            n = count_trainable(self.model)
            self.logger.log_metrics({f"params/trainable_{self.phase}": float(n)}, step=self.global_step)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True, on_epoch=False)

    # ---- checkpoints: adapter state only, with phase and base-model identity ---------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if ".lori_" in k}
        checkpoint["lori"] = {"phase": self.phase, "fingerprint": self.fingerprint, "model": self.hparams.model}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_checkpoint(checkpoint, self)
        self.phase = checkpoint.get("lori", {}).get("phase", "dense")


def check_checkpoint(checkpoint: dict[str, Any], module: LoRIModule) -> None:
    """Refuse a checkpoint written for another base model or adapter layout."""
    info = checkpoint.get("lori")
    if info is None:
        raise CheckpointMismatchError("checkpoint was not written by lori (no 'lori' entry)")
    if info.get("fingerprint") not in (module.fingerprint, "meta"):
        raise CheckpointMismatchError(
            f"checkpoint is for base model {info.get('model')!r} (fingerprint {info.get('fingerprint')}), "
            f"this run uses {module.hparams.model!r} (fingerprint {module.fingerprint})"
        )
    mine = {k: tuple(v.shape) for k, v in module.state_dict().items() if k.endswith(".lori_A")}
    theirs = {k: tuple(v.shape) for k, v in checkpoint["state_dict"].items() if k.endswith(".lori_A")}
    if set(mine) != set(theirs):
        raise CheckpointMismatchError(
            f"checkpoint adapts other modules than this model: {sorted(set(mine) ^ set(theirs))[:3]}"
        )
    for key, shape in mine.items():
        if theirs[key] != shape:
            raise CheckpointMismatchError(
                f"checkpoint adapter {key} has shape {theirs[key]}, this model's is {shape} (other rank?)"
            )


def _lr_lambda(kind: str, warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if kind == "cosine":
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0

    return factor
