"""``TaskDataModule``: one LoRI task as train / held-out dataloaders.

The data pool of a task is a local ``train_file`` when given, else the data the project's
pip packages ship (``default_records``). The pool is split by ``split_records`` into a
training part and a held-out part (validation loss / evaluation), e.g. the GSM8K test split
(1,319) into 1,119 train and 200 held-out problems with ``held_out=200, split_seed=0``.

The tokenizer is usually handed over by the pipeline (``set_tokenizer``) so that the model
and the data share one; ``tokenizer=`` (a local path or hub name) loads one instead.
"""

from __future__ import annotations

import logging
import warnings
from functools import partial
from typing import Any, Literal

import lightning as L
import torch
from torch.utils.data import DataLoader, DistributedSampler

from lori.data import sources
from lori.data.prompts import TEMPLATES, check_template
from lori.data.sources import DataError, safety_train_records  # noqa: F401 (re-exported)
from lori.data.tasks import default_records, get_task, load_local
from lori.data.tokenize import collate, pad_id_of, tokenize_prompts, tokenize_records_with_report

log = logging.getLogger(__name__)

# TaskDataModule resumes mid-epoch through its own state_dict (skipping the trained batches)
warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")


class ResumableSampler(DistributedSampler):
    """Epoch-seeded shuffle (``seed + epoch``, set by Lightning's ``set_epoch``) over this rank's
    share of the data, able to skip the batches a resumed run already trained on.

    With ``step_examples`` (examples per optimizer step over all ranks) each epoch keeps only the
    first ``(N // step_examples) * step_examples`` indices of the epoch's permutation before the
    ranks split it: the incomplete last global batch is dropped, as the official LoRI iterator
    does (get_datasets.py:433). Each rank then gets the same whole number of batches.

    Being a ``DistributedSampler``, Lightning keeps it under DDP instead of replacing it.
    """

    def __init__(self, dataset: Any, batch_size: int, seed: int, num_replicas: int = 1, rank: int = 0,
                 step_examples: int | None = None) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        if step_examples is not None and (step_examples < 1 or step_examples % num_replicas):
            raise DataError(f"examples per step {step_examples} is not a multiple of the "
                            f"{num_replicas} ranks")
        self.batch_size, self.skip_batches, self.step_examples = batch_size, 0, step_examples

    def _kept(self) -> int:
        """Indices of the whole epoch (all ranks) that are trained on."""
        n = len(self.dataset)
        return n // self.step_examples * self.step_examples if self.step_examples else n

    def __len__(self) -> int:
        return self._kept() // self.num_replicas if self.step_examples else super().__len__()

    def __iter__(self):
        if self.step_examples:
            generator = torch.Generator()
            generator.manual_seed(self.seed + self.epoch)  # DistributedSampler's permutation
            order = torch.randperm(len(self.dataset), generator=generator).tolist()
            indices = order[self.rank:self._kept():self.num_replicas]
        else:
            indices = list(super().__iter__())
        skip, self.skip_batches = self.skip_batches, 0  # only the first epoch after a resume
        return iter(indices[skip * self.batch_size:])


def accumulation_steps(global_batch_size: int, batch_size: int, world_size: int) -> int:
    """Accumulation steps giving ``global_batch_size`` examples per optimizer step; a clear error if none does."""
    per_step = batch_size * world_size
    if global_batch_size < 1 or global_batch_size % per_step:
        raise DataError(
            f"data.global_batch_size {global_batch_size} is not a multiple of data.batch_size {batch_size} x "
            f"world size {world_size} (= {per_step}): change the batch size, the device count or the global batch"
        )
    return global_batch_size // per_step


class TaskDataModule(L.LightningDataModule):
    """Train / held-out dataloaders of one task.

    Args:
        task: a task of the registry ``lori.data.tasks.TASKS`` (``gsm8k``, ``mbpp``, ``humaneval``,
            ``nlu``, one NLU task such as ``boolq``, ``safety``, or with ``train_file`` also
            ``codealpaca`` / ``saferpaca`` / ``commonsense`` (commonsense_170k) / ``instruct``).
        tokenizer: name or path for ``AutoTokenizer``; None = handed over by ``set_tokenizer``.
        train_file: local JSON / JSONL / CSV file replacing the shipped data.
        field_map: ``{schema_field: file_field}`` renames for ``train_file``.
        held_out: held-out examples: a count, or a fraction in [0, 1).
        split_seed: seed of the train / held-out permutation.
        max_length: longest tokenised example.
        max_train_examples: cap on training examples (a random subset), None = all.
        batch_size: training batch size.
        eval_batch_size: held-out batch size (default: ``batch_size``).
        num_workers: DataLoader workers.
        template: ``alpaca``, ``chat`` or ``plain`` (ignored by ``protocol: official`` for the
            tasks the official code has; ``chat`` is refused with it).
        protocol: ``lori`` (default) or ``official``: the official LoRI code's data protocol
            (``lori.data.prompts`` / ``lori.data.tokenize``): its prompt strings byte for byte,
            no BOS, its over-length rule (cut the prompt to ``max_prompt_length``, then the
            response; nothing dropped), one example per distinct prompt (at the first
            occurrence, with the last one's target), and training epochs that drop the
            incomplete last global batch (``(N // G) * G`` examples per epoch, G = examples per
            optimizer step). ``lori`` keeps every example (duplicates included) and every batch,
            adds the tokenizer's special tokens (BOS) to the prompt, and drops an example whose
            prompt alone fills ``max_length``.
        max_prompt_length: prompt tokens kept by an over-long example under ``protocol:
            official`` (official config/config.yaml l.66: 256); unused by ``lori``.
        shuffle_seed: seed of the training shuffle; epoch e uses ``shuffle_seed + e``, so a
            resumed run (even mid-epoch) sees the same batches as an uninterrupted one.
        global_batch_size: examples per optimizer step over all devices and nodes (the paper's
            "batch size 32"); sets the Trainer's ``accumulate_grad_batches`` to
            ``global_batch_size / (batch_size x world size)``, which must be a whole number.
            None = ``batch_size`` x world size x the Trainer's own ``accumulate_grad_batches``.
    """

    def __init__(self, task: str = "gsm8k", tokenizer: str | None = None,
                 train_file: str | None = None, field_map: dict[str, str] | None = None,
                 held_out: int | float = 200, split_seed: int = 0, max_length: int = 256,
                 max_train_examples: int | None = None, batch_size: int = 4,
                 eval_batch_size: int | None = None, num_workers: int = 0,
                 template: str = "alpaca", protocol: Literal["lori", "official"] = "lori",
                 max_prompt_length: int = 256, shuffle_seed: int = 0,
                 global_batch_size: int | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self._tokenizer: Any = None
        self.train_records: list[dict[str, Any]] = []
        self.held_out_records: list[dict[str, Any]] = []
        self.train_dataset: Any = None
        self.val_dataset: Any = None
        self.reports: dict[str, Any] = {}
        self._resume_batches = 0  # batches of the current epoch already trained (from a checkpoint)

    @staticmethod
    def check_options(options: Any) -> None:
        """Refuse nonsense ``data:`` values before anything loads (raises DataError naming the value).

        The one place the ``data:`` settings are checked: the task name, template, protocol and
        lengths, sizes and ``held_out``'s range (whether ``held_out`` fits the pool is known once the
        data are loaded, in ``check_data``).

        Args:
            options: the parsed ``data:`` section (a mapping of this class's arguments).
        """
        get = options.get
        for name in ("batch_size", "eval_batch_size", "global_batch_size", "max_train_examples"):
            value = get(name)
            if value is not None and (isinstance(value, bool) or value < 1):
                raise DataError(f"data.{name} must be >= 1{'' if name == 'batch_size' else ' or null'}, "
                                f"got {value}")
        if get("max_length") is not None and get("max_length") < 2:
            raise DataError(f"data.max_length must be >= 2 tokens (a prompt and an answer token), got {get('max_length')}")
        if get("num_workers") is not None and get("num_workers") < 0:
            raise DataError(f"data.num_workers must be >= 0 (0 = load in the main process), got {get('num_workers')}")
        if get("template") is not None and get("template") not in TEMPLATES:
            raise DataError(f"unknown template {get('template')!r}; choose one of {list(TEMPLATES)}")
        held = get("held_out")
        if isinstance(held, float) and not 0.0 <= held < 1.0 or isinstance(held, int) and held < 0:
            raise DataError(f"data.held_out must be a count >= 0 or a fraction in [0, 1), got {held}")
        if get("task") is not None:
            get_task(get("task"))  # an unknown name fails listing the tasks
        if get("protocol") is not None:
            check_template(get("protocol"), get("template"))
        prompt, length = get("max_prompt_length"), get("max_length")
        if get("protocol") == "official" and prompt is not None and length is not None \
                and not 0 < prompt < length:
            raise DataError(f"protocol official needs 0 < max_prompt_length < max_length, got "
                            f"max_prompt_length={prompt}, max_length={length}")

    def state_dict(self) -> dict[str, Any]:
        """Saved in Lightning checkpoints: how far into the current epoch training got."""
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return {}
        done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        batches = trainer.num_training_batches
        if isinstance(batches, int | float) and batches != float("inf") and done >= batches:
            done = 0  # saved at the end of an epoch: the next one starts from its first batch
        return {"epoch": trainer.current_epoch, "batches_done": int(done)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume: the next training epoch skips the batches already trained on."""
        self._resume_batches = int(state_dict.get("batches_done", 0))

    def set_tokenizer(self, tokenizer: Any) -> None:
        """Use ``tokenizer`` (e.g. the model's); drops datasets tokenised with another one."""
        self._tokenizer = tokenizer
        self.train_dataset = self.val_dataset = None

    @property
    def tokenizer(self) -> Any:
        """The tokenizer: the one handed over, else loaded from ``hparams.tokenizer``."""
        if self._tokenizer is None and self.hparams.tokenizer:
            from transformers import AutoTokenizer

            try:
                self._tokenizer = AutoTokenizer.from_pretrained(self.hparams.tokenizer)
            except (OSError, ValueError) as err:
                raise DataError(f"cannot load tokenizer {self.hparams.tokenizer!r}: {err}") from err
        return self._tokenizer

    def load_records(self) -> list[dict[str, Any]]:
        """The task's data pool: ``train_file`` if set, else the shipped data."""
        hp = self.hparams
        if hp.train_file:
            return load_local(hp.train_file, hp.task, hp.field_map)
        return default_records(hp.task)

    def check_data(self) -> None:
        """Check settings, data and tokenizer before long work (load and split the data); raises DataError."""
        hp = self.hparams
        self.check_options(hp)
        records = self.load_records()
        if not records:
            where = hp.train_file or "the shipped data"
            raise DataError(f"task {hp.task!r}: no records in {where}")
        try:
            train, held = sources.split_records(records, hp.held_out, hp.split_seed)
        except ValueError as err:
            raise DataError(f"task {hp.task!r}: {err}") from err
        if not train:
            raise DataError(f"task {hp.task!r}: the training split is empty ({len(records)} "
                            f"records, held_out={hp.held_out})")
        self.train_records = train[: hp.max_train_examples] if hp.max_train_examples else train
        self.held_out_records = held
        if self.tokenizer is None:
            raise DataError("no tokenizer: pass tokenizer=<name or path> or call set_tokenizer()")

    def setup(self, stage: str | None = None) -> None:
        """Load, split and tokenise (once; again only after ``set_tokenizer``). At each fit, with
        ``global_batch_size`` set, also give the Trainer its accumulation steps."""
        trainer = getattr(self, "trainer", None)
        if trainer is not None and stage == "fit" and self.hparams.global_batch_size is not None:
            steps = accumulation_steps(self.hparams.global_batch_size, self.hparams.batch_size, trainer.world_size)
            if trainer.accumulate_grad_batches not in (1, steps):
                raise DataError(f"data.global_batch_size {self.hparams.global_batch_size} asks for "
                                f"{steps} accumulation steps, trainer.accumulate_grad_batches is "
                                f"{trainer.accumulate_grad_batches}: set one of the two")
            trainer.accumulate_grad_batches = steps
        if self.train_dataset is not None:
            return
        self.check_data()
        self.train_dataset = self._tokenize(self.train_records, "train")
        if not len(self.train_dataset):
            raise DataError(f"task {self.hparams.task!r}: every training example was dropped: "
                            f"{self.reports['train']} (raise max_length)")
        self.val_dataset = self._tokenize(self.held_out_records, "held_out")

    def _tokenize(self, records: list[dict[str, Any]], name: str) -> Any:
        hp = self.hparams
        ds, report = tokenize_records_with_report(records, self.tokenizer, hp.task, hp.template,
                                                  hp.max_length, hp.protocol, "train",
                                                  hp.max_prompt_length)
        self.reports[name] = report
        log.info("%s %s: %s", hp.task, name, report)
        return ds

    def step_examples(self) -> int:
        """Examples per optimizer step over all devices: ``global_batch_size`` if set, else
        ``batch_size`` x world size x the Trainer's ``accumulate_grad_batches``."""
        hp, trainer = self.hparams, getattr(self, "trainer", None)
        if hp.global_batch_size is not None:
            return hp.global_batch_size
        if trainer is None:
            return hp.batch_size
        return hp.batch_size * trainer.world_size * trainer.accumulate_grad_batches

    def _loader(self, dataset: Any, batch_size: int, shuffle: bool,
                padding_side: str = "right") -> DataLoader:
        sampler, drop_last = None, False
        if shuffle:
            trainer = getattr(self, "trainer", None)
            world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
            step = None
            if self.hparams.protocol == "official":  # drop the incomplete last global batch
                step, drop_last = self.step_examples(), True
                if len(dataset) < step:
                    raise DataError(f"task {self.hparams.task!r}: protocol official drops the "
                                    f"incomplete last batch, and {len(dataset)} training examples "
                                    f"fill no batch of {step}")
            sampler = ResumableSampler(dataset, batch_size, self.hparams.shuffle_seed, world, rank,
                                       step_examples=step)
            sampler.skip_batches, self._resume_batches = self._resume_batches, 0
        # its own generator: starting an epoch must not draw from the global stream (dropout)
        generator = torch.Generator().manual_seed(self.hparams.shuffle_seed)
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, generator=generator,
                          num_workers=self.hparams.num_workers, drop_last=drop_last,
                          collate_fn=partial(collate, pad_id=pad_id_of(self.tokenizer),
                                             padding_side=padding_side))

    def train_dataloader(self) -> DataLoader:
        """Shuffled (epoch-seeded, resumable) training batches, right-padded; under ``protocol:
        official`` without the incomplete last global batch of each epoch."""
        self.setup("fit")
        return self._loader(self.train_dataset, self.hparams.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        """Held-out batches in order, never dropping the last one; [] when nothing is held out."""
        self.setup("validate")
        if not len(self.val_dataset):
            return []
        size = self.hparams.eval_batch_size or self.hparams.batch_size
        return self._loader(self.val_dataset, size, shuffle=False)

    def generation_dataloader(self, records: list[dict[str, Any]] | None = None,
                              batch_size: int | None = None) -> DataLoader:
        """Left-padded prompts (``stage="eval"`` layout) of ``records`` (default: held-out);
        under ``protocol: official`` cut by the official rule at ``max_length`` /
        ``max_prompt_length`` (see ``tokenize_prompts``)."""
        hp = self.hparams
        if records is None and not self.held_out_records:
            self.check_data()
        records = self.held_out_records if records is None else records
        if not records:
            raise DataError(f"task {hp.task!r}: no records to generate for")
        if self.tokenizer is None:
            raise DataError("no tokenizer: pass tokenizer=<name or path> or call set_tokenizer()")
        if hp.protocol == "official":
            ds = tokenize_prompts(records, self.tokenizer, hp.task, hp.template, hp.protocol,
                                  hp.max_length, hp.max_prompt_length)
        else:
            ds = tokenize_prompts(records, self.tokenizer, hp.task, hp.template, hp.protocol)
        return self._loader(ds, batch_size or hp.eval_batch_size or hp.batch_size, shuffle=False,
                            padding_side="left")
