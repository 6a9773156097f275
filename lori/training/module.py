"""LoRIModule: the LightningModule that holds an adapted causal LM and trains its adapter.

The nn.Module is built outside (``lori.training.base_model``) and adapted by ``lori.training.baselines.attach``: LoRI
(the default), or a baseline (``lori.training.baselines``: LoRA, DoRA, LoRA-FA, VeRA, IA3, AdaLoRA, rsLoRA,
PiSSA, LoRA+, full fine-tuning) with the same data, loss and optimizer settings. This class only
adds the loss, logging and the optimizer over the trainable tensors (dense B in LoRI-D, the kept
entries in LoRI-S; LoRA+ and LoRA-FA bring their own optimizers, AdaLoRA its penalty and rank
schedule). Phase changes (calibration, the LoRI-S reset) belong to ``lori.training.callbacks``.

Precision: ``dtype`` is the dtype of the frozen base and of the compute (``auto``: bfloat16 where
the hardware multiplies in bf16 natively, else float32); what trains is fp32 whatever it is, and
so is its optimizer state. Lightning's true-half precisions (``bf16-true``, ``16-true``) would
cast the adapter too and are refused; ``bf16-mixed`` (autocast) works with either base dtype.

Loss: the decoder runs to its last hidden state, the positions whose next-token label is a
response token are gathered, and the LM head + cross-entropy run on them chunk by chunk under
``torch.utils.checkpoint`` (``response_loss``), so no (batch x seq x vocab) logits exist at once.
"""

from __future__ import annotations

import math
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lori.core import (
    LoRIConfig,
    LoRIConfigError,
    base_fingerprint,
    count_trainable,
    lori_layers,
)
from lori.core.errors import LoRIError
from lori.core.layer import ADAPTER_DTYPE
from lori.core.protocol import OFFICIAL_SETTINGS, ProtocolError, check_protocol
from lori.training import baselines
from lori.training.activation_checkpointing import (
    disable_activation_checkpointing,
    enable_activation_checkpointing,
    strategy_checkpoints,
)
from lori.training.base_model import load_base_model, resolve_base_dtype, tiny_llama, tiny_tokenizer
from lori.training.quantize import QuantizeError, check_quantize, quantize_base, storage_line

TINY = "tiny-llama"  # random-init 2-layer Llama with the default model's tokenizer: for tests
TRUE_HALF = ("bf16-true", "16-true")  # Lightning precisions that cast the whole module
LOSS_CHUNK_LOGITS = 1 << 24  # logits per chunk of the response-token loss (64 MiB in fp32)
# config fields of causal LMs whose logits are not just head(last hidden state): plain loss
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


class CheckpointMismatchError(LoRIError, ValueError):
    """A checkpoint written for another base model or adapter shape."""


def build_model(
    name: str | None, gguf_file: str | None, dtype: str | torch.dtype, cache_dir: str | None,
    quantize: str | None = None,
) -> tuple[nn.Module, Any]:
    """Base model and tokenizer: ``tiny-llama``, the embedded default (None), a path or hub id.

    ``dtype`` as ``model.dtype`` (``auto`` follows the hardware, see ``resolve_base_dtype``);
    ``quantize`` as ``model.quantize`` (``lori.training.quantize``: every linear layer but the LM
    head stored in nf4, fp4 or int8, the rest in ``dtype``).
    """
    dtype = resolve_base_dtype(dtype)
    check_quantize(quantize, model=name, gguf_file=gguf_file)  # before loading: name, bitsandbytes, source
    if name == TINY:
        tokenizer = tiny_tokenizer(cache_dir)
        vocab = len(tokenizer)
        model = tiny_llama(vocab_size=vocab, max_position_embeddings=1024).to(dtype)
    else:
        model, tokenizer = load_base_model(name, gguf_file=gguf_file, dtype=dtype, cache_dir=cache_dir)
    if quantize is not None:
        if getattr(model.config, "quantization_config", None):  # a hub model stored quantized
            raise QuantizeError(f"model {name!r} is already stored quantized; drop model.quantize {quantize!r}")
        quantize_base(model, quantize, dtype)
    return model, tokenizer


def check_precision(precision: Any) -> None:
    """Refuse a Lightning precision that would cast the fp32 adapter to 16 bits (names the fix)."""
    if str(precision) in TRUE_HALF:
        half = "bfloat16" if str(precision).startswith("bf16") else "float16"
        raise LoRIConfigError(
            f"trainer.precision {precision!r} casts the whole model, the trained adapter included, to {half}: "
            f"use model.dtype: {half} (the frozen base in {half}, the adapter stays fp32) with trainer.precision 32-true"
        )


class LoRIModule(L.LightningModule):
    """Causal-LM fine-tuning with a LoRI adapter (or a baseline, see ``method``).

    Args:
        model: base model: ``smollm2-135m-instruct`` (embedded default, shipped as GGUF),
            ``tiny-llama`` (random, for tests), a local Hugging Face directory or a hub id.
        gguf_file: GGUF file name inside ``model`` when it is a directory of GGUF files.
        dtype: dtype of the frozen base model and of the compute: ``float32``, ``bfloat16``,
            ``float16`` or ``auto`` (bfloat16 where the hardware has native bf16, else float32;
            see ``lori.training.base_model.resolve_base_dtype``). A, B and their optimizer state are fp32
            whatever it is. ``method: full`` trains the base, which needs fp32 master weights:
            ``auto`` gives float32 there and a 16-bit dtype is refused. The resolved dtype is
            ``self.compute_dtype``.
        cache_dir: where converted GGUF models are cached (default ``~/.cache/lori/models``).
        quantize: storage of the frozen base's linear layers (all but the LM head): ``null`` (``dtype``),
            ``nf4``, ``fp4`` or ``int8`` through bitsandbytes (``lori.training.quantize``); the LoRI layers
            wrap the quantized ones, A, B and the optimizer state stay fp32, compute is in ``dtype``.
            Refused with a method that trains the base (``full``, ``pissa``), FSDP or ZeRO-3.
        gradient_checkpointing: keep only each decoder layer's input between forward and backward and
            recompute the rest (non-reentrant; ``lori.training.activation_checkpointing``), on any strategy.
        method: ``lori`` (A frozen from the seed, B trained), ``lori_d`` (LoRI with sparsity
            0: the LoRI-D stage alone; named ``lora_frozen_a`` before), a PEFT baseline (``lora``,
            ``dora``, ``lora_fa``, ``vera``, ``ia3``, ``adalora``, ``rslora``, ``pissa``, ``loraplus``)
            or ``full`` (every base weight trained); one registry entry each
            (``lori.training.baselines.methods``; an unknown name is refused in one line listing
            them). r, alpha, dropout, targets and seed come from ``lori``.
        lori: the adapter's hyperparameters (rank, alpha, dropout, targets, sparsity, granularity, seed).
        baseline: options of the baselines that have their own (``lori.training.baselines.BaselineOptions``:
            LoRA+'s lr ratio, VeRA's d_initial, IA3's feed-forward modules, AdaLoRA's schedule,
            PiSSA's SVD iterations); an option of another method is refused.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay (applies only to trainable, i.e. kept, entries).
        betas: AdamW betas.
        scheduler: ``constant`` or ``cosine`` (decay to 0 over the fit's total steps).
        warmup_steps: linear warm-up steps before the schedule.
        loss_normalization: ``token_mean`` (mean over response tokens of the batch) or
            ``sequence_sum`` (the paper's: sum of response-token NLL per sequence, mean over sequences).
        gradient_clipping: how ``trainer.gradient_clip_val`` is applied: ``global`` (one norm over
            every trainable tensor, Lightning's) or ``per_tensor`` (each tensor clipped to the value on
            its own, as the official code's per-parameter optimizers do).
        protocol: ``lori`` or ``official`` (see ``lori.core.protocol``): under ``official`` the optimizer
            settings must be the official code's (weight decay 0, no dropout, sequence_sum, per-tensor
            clipping, constant learning rate) and warm-up follows its ramp min(1, (step+1)/(warmup+1)).
    """

    def __init__(
        self,
        model: str | None = "smollm2-135m-instruct",
        gguf_file: str | None = None,
        dtype: str = "float32",
        cache_dir: str | None = None,
        quantize: str | None = None,
        gradient_checkpointing: bool = False,
        method: str = "lori",
        lori: LoRIConfig = LoRIConfig(),  # noqa: B008 - a frozen-by-convention default
        baseline: baselines.BaselineOptions = baselines.BaselineOptions(),  # noqa: B008 - never mutated
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        scheduler: Literal["constant", "cosine"] = "constant",
        warmup_steps: int = 0,
        loss_normalization: Literal["token_mean", "sequence_sum"] = "token_mean",
        gradient_clipping: Literal["global", "per_tensor"] = "global",
        protocol: Literal["lori", "official"] = "lori",
    ) -> None:
        super().__init__()
        self.lori_config = lori if isinstance(lori, LoRIConfig) else LoRIConfig.from_dict(dict(lori))
        self.baseline = baselines.BaselineOptions.from_value(baseline)
        self.save_hyperparameters(ignore=["lori", "baseline"])
        # before the model loads: method options, dtype, clipping, protocol
        self.check_options(dict(self.hparams) | {"lori": self.lori_config, "baseline": self.baseline})
        self.method_entry = baselines.get_method(method)  # what this method trains, saves, checkpoints
        self.compute_dtype = resolve_base_dtype(dtype, trains_base=self.method_entry.trains_base)
        self.trainer_precision: str | None = None  # set by ``setup`` (the last Trainer's)
        self.model, self.tokenizer = build_model(model, gguf_file, self.compute_dtype, cache_dir, quantize)
        targets = baselines.target_paths(self.model, self.lori_config.target_modules)
        self.fingerprint = base_fingerprint(self.model, targets)  # before any weight is wrapped or trained
        self.lori_config = baselines.attach(self.model, method, self.lori_config, self.baseline)
        self.hparams["lori"] = self.lori_config.to_dict()  # plain types: checkpoints load weights_only
        self.hparams["baseline"] = self.baseline.given()
        self.method_options = baselines.resolved_options(method, self.lori_config, self.baseline)
        self.model.train()  # from_pretrained returns eval mode; adapter dropout must be live in training
        if gradient_checkpointing:
            enable_activation_checkpointing(self.model)
        self.phase = "dense"  # "dense" (LoRI-D) or "sparse" (LoRI-S); set by the callbacks
        self.strict_loading = self.method_entry.trains_base  # adapter checkpoints hold only the adapter, not the frozen base

    @staticmethod
    def check_options(options: Any, trainer: Any = None) -> None:
        """Validate parsed ``model:`` (and ``trainer:``) options before anything loads (names the bad value)."""
        lori = options.get("lori") if hasattr(options, "get") else None
        if lori is not None and not isinstance(lori, LoRIConfig):
            lori = LoRIConfig.from_dict(dict(lori))
        baseline = options.get("baseline") if hasattr(options, "get") else None
        if baseline is not None and not isinstance(baseline, baselines.BaselineOptions):
            baseline = dict(baseline)
        method = options.get("method", "lori")
        baselines.check_method_options(method, lori or LoRIConfig(), baselines.BaselineOptions.from_value(baseline))
        resolve_base_dtype(options.get("dtype", "float32"), trains_base=baselines.get_method(method).trains_base)
        check_optimizer_options(options)
        check_quantize(options.get("quantize"), method, options.get("model"),
                       options.get("gguf_file"), options.get("protocol", "lori"),
                       trainer.get("strategy") if hasattr(trainer, "get") else None)
        if trainer is not None and hasattr(trainer, "get"):
            check_precision(trainer.get("precision"))
        if options.get("gradient_clipping", "global") not in ("global", "per_tensor"):
            raise ValueError(f"gradient_clipping must be 'global' or 'per_tensor', got {options.get('gradient_clipping')!r}")
        if check_protocol(options.get("protocol", "lori")) == "official":
            check_official(options)
        if options.get("lr", 1.0) <= 0:
            raise ValueError(f"lr must be > 0, got lr={options.get('lr')!r}")
        if options.get("warmup_steps", 0) < 0:
            raise ValueError(f"warmup_steps must be >= 0, got warmup_steps={options.get('warmup_steps')!r}")

    # ---- precision ----------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        check_precision(self.trainer.precision)  # a Trainer built outside the CLI
        self.trainer_precision = str(self.trainer.precision)

    def configure_model(self) -> None:
        """Under FSDP, a 16-bit base is upcast to fp32 before wrapping (FSDP flattens one dtype
        per unit, and the adapter is fp32): sharded fp32 weights, compute in bf16 through
        ``trainer.precision: bf16-mixed`` (FSDP MixedPrecision), the official recipe."""
        from lightning.pytorch.strategies import FSDPStrategy

        if self._trainer is None:  # ``LoRIModule.load_from_checkpoint`` outside a Trainer: no strategy to fit
            return
        if self.hparams.get("gradient_checkpointing") and strategy_checkpoints(self.trainer.strategy):
            disable_activation_checkpointing(self.model)  # an older FSDP config's policy checkpoints the layers
        if not isinstance(self.trainer.strategy, FSDPStrategy):
            return
        if any(p.dtype != ADAPTER_DTYPE for p in self.model.parameters() if p.is_floating_point()):
            rank_zero_warn(f"FSDP shards one dtype per unit: the {self.compute_dtype} base is kept in float32 "
                           "(trainer.precision bf16-mixed computes in bf16)")
            self.model.to(ADAPTER_DTYPE)
            self.compute_dtype = ADAPTER_DTYPE

    @property
    def hparams_initial(self) -> Any:
        """The init arguments as loggers record them (``trainer.logger``), ``lori`` and ``baseline``
        included (saved as plain values after ``save_hyperparameters``)."""
        initial = super().hparams_initial
        initial.update(lori=self.hparams["lori"], baseline=self.hparams["baseline"])
        return initial

    def precision_info(self) -> dict[str, Any]:
        """What ran: dtypes of the frozen base, of the trained tensors and of the compute."""
        params = list(self.model.parameters())
        frozen = [p for p in params if not p.requires_grad] or params  # full fine-tuning: all train
        base = frozen[0].dtype
        trained = sorted({str(p.dtype).removeprefix("torch.") for p in params if p.requires_grad})
        precision, compute = self.trainer_precision, base  # (None: no Trainer ran in this process)
        if precision is not None and precision.endswith("-mixed"):
            compute = torch.bfloat16 if precision.startswith("bf16") else torch.float16
        return {"base": _name(base), "adapter": "/".join(trained) or "none", "compute": _name(compute),
                "auto": self.hparams.dtype == "auto", "trainer_precision": precision,
                "storage": storage_line(self.model, self.compute_dtype),
                "gradient_checkpointing": bool(self.hparams.get("gradient_checkpointing"))}

    # ---- forward / loss -------------------------------------------------------------------
    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    def loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Causal-LM loss over response tokens (labels != -100), from whole logits (b, t, vocab)."""
        logits, labels = logits[:, :-1].float(), labels[:, 1:]
        nll = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")  # (b, t)
        if self.hparams.loss_normalization == "sequence_sum":
            return nll.sum(1).mean()
        return nll.sum() / (labels != -100).sum().clamp(min=1)

    def model_step(self, batch: dict[str, Tensor]) -> Tensor:
        """The loss of one batch, the same in training, validation and test (``response_loss``,
        or ``loss`` over whole logits for a model without get_decoder / get_output_embeddings)."""
        split = split_lm_head(self.model)
        if split is None:
            logits = self(batch["input_ids"], batch.get("attention_mask"))
            return self.loss(logits, batch["labels"])
        decoder, head = split
        out = decoder(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), use_cache=False)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]  # (b, t, d)
        return response_loss(hidden, batch["labels"], head, self.hparams.loss_normalization)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = self.model_step(batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"non-finite training loss {loss.item()} at global step {self.global_step} "
                f"(phase {self.phase}); the last good checkpoint is kept"
            )
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        for name, term in self.method_entry.extra_losses.items():  # AdaLoRA: + its orthogonality penalty
            penalty = term(self.model)
            self.log(f"train/{name}", penalty, batch_size=batch["input_ids"].shape[0])
            loss = loss + penalty
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
        hp = self.hparams
        optimizer = baselines.build_optimizer(hp.method, self.model, hp.lr, hp.weight_decay, tuple(hp.betas),
                                              self.method_options)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        schedule = _lr_lambda(hp.scheduler, hp.warmup_steps, total, hp.get("protocol", "lori"))
        lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": lr_scheduler, "interval": "step"}}

    def configure_callbacks(self) -> list[L.Callback]:
        """The method's own callbacks in every fit (AdaLoRA's rank schedule)."""
        return self.method_entry.callbacks()

    def configure_gradient_clipping(
        self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """``global``: Lightning's clipping; ``per_tensor``: each trainable tensor on its own."""
        if self.hparams.get("gradient_clipping", "global") != "per_tensor" or gradient_clip_val is None:
            return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        if gradient_clip_algorithm not in (None, "norm"):
            raise ValueError(f"gradient_clipping per_tensor clips by norm; got algorithm {gradient_clip_algorithm!r}")
        params = [p for group in optimizer.param_groups for p in group["params"]]
        clip_per_tensor(params, float(gradient_clip_val), _shard_sum(self.trainer))

    def on_train_start(self) -> None:
        for logger in self.loggers:
            n = count_trainable(self.model)
            logger.log_metrics({f"params/trainable_{self.phase}": float(n)}, step=self.global_step)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True, on_epoch=False)

    # ---- saving -----------------------------------------------------------------------------
    def save_adapter(
        self, directory: str | Path, stage: str = "fit", extra: dict[str, Any] | None = None
    ) -> Path:
        """Write what was trained: a lori adapter dir (lori, lori_d), a PEFT adapter dir (the
        PEFT methods) or a Hugging Face model dir (full), with the base fingerprint and a few facts."""
        method = self.hparams.method
        meta = {"method": method, "stage": stage, "global_step": self.global_step,
                "trainable": count_trainable(self.model)} | dict(extra or {})
        if self.method_options:
            meta["options"] = self.method_options
        return self.method_entry.save(self.model, self.tokenizer, self.lori_config, directory, self.hparams.model,
                                      self.fingerprint, meta)

    # ---- checkpoints: what was trained, with phase, method and base-model identity ----------
    def checkpoint_keys(self) -> set[str]:
        """State-dict keys a checkpoint of this method keeps (see ``baselines.is_saved_key``)."""
        trainable = {f"model.{n}" for n, p in self.model.named_parameters() if p.requires_grad}
        return {k for k in self.state_dict() if baselines.is_saved_key(self.hparams.method, k, trainable)}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        keep = self.checkpoint_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint["lori"] = {"phase": self.phase, "fingerprint": self.fingerprint, "model": self.hparams.model,
                              "method": self.hparams.method, "alpha": self.lori_config.alpha}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_checkpoint(checkpoint, self)
        self.phase = checkpoint.get("lori", {}).get("phase", "dense")
        alpha = checkpoint.get("lori", {}).get("alpha")  # LoRI-S may train with its own (pipeline.sparse_alpha)
        if alpha is not None and alpha != self.lori_config.alpha:
            self.set_alpha(alpha)

    def set_alpha(self, alpha: float) -> None:
        """Give every LoRI layer (and the config saved with the adapter) a new alpha."""
        self.lori_config = replace(self.lori_config, alpha=alpha)
        for layer in lori_layers(self.model).values():
            layer.alpha, layer.scale = float(alpha), self.lori_config.scale

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """Load a checkpoint's tensors: all of them for ``method: full``; else the adapter's, strictly.

        An adapter checkpoint holds only what trained (``checkpoint_keys``; the base is rebuilt
        from ``model``), so the frozen base's keys are not reported missing (no warning from
        ``load_from_checkpoint``); a key this model lacks, or an adapter key the checkpoint lacks,
        raises CheckpointMismatchError, and a shape mismatch RuntimeError, whatever ``strict``.
        """
        if self.method_entry.trains_base:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        adapter = self.checkpoint_keys()  # (LoRI layers have taken the checkpoint's layout, dense or masked)
        missing = [key for key in result.missing_keys if key in adapter]
        if missing or result.unexpected_keys:
            raise CheckpointMismatchError(
                f"checkpoint does not hold this model's adapter: missing {missing[:3]}, "
                f"unexpected {result.unexpected_keys[:3]}"
            )
        return type(result)([], [])


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
    method = module.hparams.get("method", "lori")
    if baselines.current_name(info.get("method", "lori")) != method:  # a checkpoint from before a rename: the same
        raise CheckpointMismatchError(
            f"checkpoint was trained with method {info.get('method', 'lori')!r}, this run uses {method!r}"
        )
    if "state_dict" not in checkpoint:  # FSDP loaded the weights itself (the pipeline prechecks the file)
        return
    if module.method_entry.family == "lori":
        # B changes names with the phase (lori_B / lori_B_values): the A keys fix the layout
        mine = {k: tuple(v.shape) for k, v in module.state_dict().items() if k.endswith(".lori_A")}
        theirs = {k: tuple(v.shape) for k, v in checkpoint["state_dict"].items() if k.endswith(".lori_A")}
    else:
        keys = module.checkpoint_keys()
        mine = {k: tuple(v.shape) for k, v in module.state_dict().items() if k in keys}
        theirs = {k: tuple(v.shape) for k, v in checkpoint["state_dict"].items()}
    if set(mine) != set(theirs):
        raise CheckpointMismatchError(
            f"checkpoint adapts other modules than this model: {sorted(set(mine) ^ set(theirs))[:3]}"
        )
    for key, shape in mine.items():
        if theirs[key] != shape:
            raise CheckpointMismatchError(
                f"checkpoint adapter {key} has shape {theirs[key]}, this model's is {shape} (other rank?)"
            )


def check_optimizer_options(options: Any) -> None:
    """AdamW's own range checks (``model.weight_decay`` >= 0, ``model.betas`` in [0, 1)), before the model loads."""
    if (options.get("weight_decay") or 0.0) < 0:
        raise LoRIConfigError(f"model.weight_decay must be >= 0, got {options.get('weight_decay')}")
    betas = options.get("betas") or (0.9, 0.999)
    if not all(0.0 <= b < 1.0 for b in betas):
        raise LoRIConfigError(f"model.betas must both be in [0, 1), got {list(betas)}")


def check_official(options: Any) -> None:
    """Refuse ``model:`` options that differ from the official code's (``lori.core.protocol``)."""
    bad = []
    for fixed in OFFICIAL_SETTINGS:
        section, _, key = fixed.key.partition(".")
        if section != "model":
            continue
        node: Any = options
        for part in key.split("."):
            node = node.get(part) if hasattr(node, "get") else getattr(node, part, None)
        value = tuple(node) if isinstance(node, list | tuple) else node
        if node is not None and value != fixed.value:
            bad.append(f"{fixed.key}={node!r} (official {fixed.value!r})")
    if bad:
        raise ProtocolError("protocol official needs the official code's settings: " + "; ".join(bad))


def clip_per_tensor(params: list[Tensor], max_norm: float, shard_sum: Any = None) -> None:
    """Clip each tensor's gradient to ``max_norm`` on its own (the official per-parameter clipping).

    Without sharding this is ``torch.nn.utils.clip_grad_norm_(p, max_norm)`` for every ``p``, exactly as
    src/apply_mask_in_backward.py:85 calls it. With sharded gradients (FSDP), ``shard_sum`` sums the
    per-tensor squared norms over ranks first, so each tensor is clipped by its whole norm.
    """
    with_grad = [p for p in params if p.grad is not None]
    if shard_sum is None:
        for p in with_grad:
            torch.nn.utils.clip_grad_norm_(p, max_norm)
        return
    squares = torch.stack([p.grad.detach().float().pow(2).sum() for p in with_grad]) if with_grad else None
    if squares is None:
        return
    norms = shard_sum(squares).sqrt()
    scale = (max_norm / (norms + 1e-6)).clamp(max=1.0)  # clip_grad_norm_'s coefficient
    for p, s in zip(with_grad, scale):
        p.grad.detach().mul_(s.to(p.grad.dtype))


def _shard_sum(trainer: Any) -> Any:
    """A sum over ranks when the strategy shards gradients (FSDP), else None."""
    from lightning.pytorch.strategies import FSDPStrategy

    if not isinstance(getattr(trainer, "strategy", None), FSDPStrategy) or trainer.world_size <= 1:
        return None
    return lambda t: trainer.strategy.reduce(t, reduce_op="sum")


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def split_lm_head(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """(decoder, LM head) of a causal LM whose logits are ``head(decoder(...)[0])``, else None.

    None for a model without ``get_decoder`` / ``get_output_embeddings`` (or whose decoder is
    itself) and for configs that transform logits after the head (``_LOGIT_TRANSFORMS``: Gemma-2's
    soft-capping, Cohere's and Granite's scaling): those take the plain loss over whole logits.
    """
    get_decoder, get_head = getattr(model, "get_decoder", None), getattr(model, "get_output_embeddings", None)
    if get_decoder is None or get_head is None:
        return None
    config = getattr(model, "config", None)
    if any(getattr(config, name, None) not in (None, 1, 1.0) for name in _LOGIT_TRANSFORMS):
        return None
    decoder, head = get_decoder(), get_head()
    if decoder is None or head is None or decoder is model:
        return None
    return decoder, head


def response_loss(hidden: Tensor, labels: Tensor, head: nn.Module, normalization: str) -> Tensor:
    """``LoRIModule.loss(head(hidden), labels)`` without forming the logits of the whole batch.

        keep = labels[:, 1:] != -100                   (b, t-1): next token is a response token
        h = hidden[:, :-1][keep]                       (m, d)
        loss = sum_chunks CE_sum(head(h_c).float(), y_c) / (b | m)

    Each chunk of ``LOSS_CHUNK_LOGITS // vocab`` rows runs under ``torch.utils.checkpoint``: its
    logits are recomputed in backward instead of kept, so at most one chunk's logits (and their
    gradient) exist at a time. The head gets its gradient too when it trains (full fine-tuning).

    Args:
        hidden: last hidden states (b, t, d) after the final norm.
        labels: (b, t) token ids, -100 where no loss is taken.
        head: the LM head (d -> vocab).
        normalization: ``token_mean`` (sum / response tokens) or ``sequence_sum`` (sum / b).
    """
    targets = labels[:, 1:]
    keep = targets != -100  # (b, t-1)
    h, y = hidden[:, :-1][keep], targets[keep]  # (m, d), (m,)
    vocab = getattr(head, "out_features", None) or head.weight.shape[0]
    rows = max(1, LOSS_CHUNK_LOGITS // vocab)
    nll_sum = partial(_nll_sum, head)
    total = None
    for h_c, y_c in zip(h.split(rows), y.split(rows)):  # one (empty) chunk when m = 0
        if torch.is_grad_enabled():
            part = checkpoint(nll_sum, h_c, y_c, use_reentrant=False, preserve_rng_state=False)
        else:
            part = nll_sum(h_c, y_c)
        total = part if total is None else total + part
    if normalization == "sequence_sum":
        return total / labels.shape[0]
    return total / keep.sum().clamp(min=1)


def _nll_sum(head: nn.Module, h: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(head(h).float(), y, reduction="sum")


def _lr_lambda(kind: str, warmup: int, total: int, protocol: str = "lori"):
    def factor(step: int) -> float:
        if protocol == "official":  # src/mask_trainers.py:322 (scheduler constant there)
            return min(1.0, (step + 1) / (warmup + 1))
        if step < warmup:
            return (step + 1) / warmup
        if kind == "cosine":
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0

    return factor
