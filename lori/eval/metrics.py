"""torchmetrics metrics for the LoRI evaluations, correct under DDP.

Every state is a count or a sum with ``dist_reduce_fx="sum"``, so ``compute()`` after a
distributed sync (or :meth:`~torchmetrics.Metric.merge_state`) equals the single-process result
for any split of the data across ranks.  Every item given to ``update`` counts: nothing is
dropped or de-duplicated (if a ``DistributedSampler`` pads the last batch with repeats, drop the
padding before ``update``: the metric cannot tell repeats from real items).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torchmetrics import Metric

from lori.eval.answers import canonical_task, gsm8k_correct
from lori.eval.judge import Judge, KeywordJudge
from lori.eval.passk import pass_at_k


def _count_state(metric: Metric, name: str, size: int | None = None) -> None:
    shape = () if size is None else (size,)
    metric.add_state(name, default=torch.zeros(shape, dtype=torch.float64),
                     dist_reduce_fx="sum", persistent=False)


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``num / den`` in float32, 0 where ``den == 0``."""
    safe = torch.where(den > 0, den, torch.ones_like(den))
    return torch.where(den > 0, num / safe, torch.zeros_like(num)).float()


class ExactMatch(Metric):
    """GSM8K accuracy: the number extracted from each generation equals the gold number.

    ``update(preds, targets)``: ``preds`` are generated texts (prompt excluded), ``targets`` the
    gold answers (``"... #### 42"`` or ``"42"``).  ``compute()`` returns the accuracy.

    Args:
        correct: ``correct(pred, target) -> bool`` for one item: lori's
            :func:`~lori.eval.answers.gsm8k_correct` (default) or the official rule
            :func:`~lori.eval.answers.official_gsm8k_correct`.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, correct: Callable[[str, str], bool] = gsm8k_correct, **kwargs) -> None:
        super().__init__(**kwargs)
        self.correct_fn = correct
        _count_state(self, "correct")
        _count_state(self, "total")

    def update(self, preds: Sequence[str], targets: Sequence[str]) -> None:
        """Add a batch of generations and their gold answers."""
        if len(preds) != len(targets):
            raise ValueError(f"{len(preds)} predictions but {len(targets)} targets")
        self.correct += sum(bool(self.correct_fn(p, t)) for p, t in zip(preds, targets))
        self.total += len(preds)

    def compute(self) -> torch.Tensor:
        """Accuracy in ``[0, 1]`` (0 before any update)."""
        return _ratio(self.correct, self.total)


class PassAtK(Metric):
    """Mean unbiased pass@k over problems.

    ``update(n, c)``: per problem, ``n`` samples of which ``c`` passed.  ``compute()`` returns
    ``{"pass@1": ..., "pass@5": ..., "pass@10": ...}`` (every k must be ``<= n``).
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, ks: Iterable[int] = (1, 5, 10), **kwargs) -> None:
        super().__init__(**kwargs)
        self.ks = tuple(int(k) for k in ks)
        if not self.ks:
            raise ValueError("ks must not be empty")
        _count_state(self, "pass_sum", len(self.ks))
        _count_state(self, "problems")

    def update(self, n: int | Sequence[int] | torch.Tensor,
               c: int | Sequence[int] | torch.Tensor) -> None:
        """Add problems (scalars for one problem, sequences/tensors for several)."""
        ns = torch.as_tensor(n).reshape(-1).tolist()
        cs = torch.as_tensor(c).reshape(-1).tolist()
        if len(ns) != len(cs):
            raise ValueError(f"{len(ns)} sample counts but {len(cs)} pass counts")
        values = [[pass_at_k(int(ni), int(ci), k) for k in self.ks] for ni, ci in zip(ns, cs)]
        if values:
            self.pass_sum += torch.tensor(values, dtype=torch.float64).sum(0)
        self.problems += len(ns)

    def compute(self) -> dict[str, torch.Tensor]:
        """``{"pass@k": mean over problems}``."""
        means = _ratio(self.pass_sum, self.problems.expand_as(self.pass_sum))
        return {f"pass@{k}": means[i] for i, k in enumerate(self.ks)}


class RefusalRate(Metric):
    """Fraction of responses that the judge calls refusals (HEx-PHI; over-refusal on benign data).

    ``update(prompts, responses)`` with generated responses only.
    """

    full_state_update = False

    def __init__(self, judge: Judge | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.judge = judge if judge is not None else KeywordJudge()
        _count_state(self, "refused")
        _count_state(self, "total")

    def update(self, prompts: Sequence[str], responses: Sequence[str]) -> None:
        """Judge a batch and count the refusals."""
        verdicts = self.judge(list(prompts), list(responses))
        if len(verdicts) != len(responses):
            raise ValueError(f"judge returned {len(verdicts)} verdicts for {len(responses)}")
        self.refused += sum(bool(v) for v in verdicts)
        self.total += len(responses)

    def compute(self) -> torch.Tensor:
        """Refusal rate in ``[0, 1]``."""
        return _ratio(self.refused, self.total)


class MultipleChoiceAccuracy(Metric):
    """Per-dataset accuracy of label indices plus the unweighted average over datasets.

    Args:
        tasks: the dataset names (fixed up front so every rank has the same state shape); names
            are canonicalised with :func:`lori.eval.answers.canonical_task` when known.

    ``update(preds, labels, task)``: ``preds``/``labels`` are label indices (``-1`` = no parsable
    answer, always wrong); ``task`` is one name for the whole batch or one name per item.
    ``compute()`` returns ``{task: acc, ..., "average": mean of per-task accuracies over tasks
    seen so far, "overall": pooled accuracy}`` (the paper's "Avg." is ``"average"``).
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, tasks: Sequence[str] = ("all",), **kwargs) -> None:
        super().__init__(**kwargs)
        self.tasks = [self._key(t) for t in tasks]
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"duplicate tasks in {list(tasks)}")
        _count_state(self, "correct", len(self.tasks))
        _count_state(self, "total", len(self.tasks))

    @staticmethod
    def _key(task: str) -> str:
        try:
            return canonical_task(task)
        except KeyError:
            return task

    def _task_ids(self, task: str | Sequence[str], size: int) -> torch.Tensor:
        names = [task] * size if isinstance(task, str) else list(task)
        if len(names) != size:
            raise ValueError(f"{len(names)} task names for {size} predictions")
        try:
            return torch.tensor([self.tasks.index(self._key(t)) for t in names], dtype=torch.long)
        except ValueError as err:
            raise KeyError(f"unknown task in {sorted(set(names))}; declared: {self.tasks}") from err

    def update(self, preds: torch.Tensor | Sequence[int], labels: torch.Tensor | Sequence[int],
               task: str | Sequence[str] | None = None) -> None:
        """Add a batch of predicted and gold label indices for ``task`` (default: the only one)."""
        preds_t = torch.as_tensor(preds).reshape(-1).cpu()
        labels_t = torch.as_tensor(labels).reshape(-1).cpu()
        if preds_t.numel() != labels_t.numel():
            raise ValueError(f"{preds_t.numel()} predictions but {labels_t.numel()} labels")
        if task is None:
            if len(self.tasks) != 1:
                raise ValueError(f"name the task: several are declared ({self.tasks})")
            task = self.tasks[0]
        ids = self._task_ids(task, preds_t.numel()).to(self.total.device)
        hits = (preds_t == labels_t).to(torch.float64).to(self.total.device)
        self.correct.index_add_(0, ids, hits)
        self.total.index_add_(0, ids, torch.ones_like(hits))

    def compute(self) -> dict[str, torch.Tensor]:
        """Per-task accuracies, their unweighted ``"average"`` and the pooled ``"overall"``."""
        acc = _ratio(self.correct, self.total)
        out = {t: acc[i] for i, t in enumerate(self.tasks)}
        seen = self.total > 0
        out["average"] = acc[seen].mean() if seen.any() else torch.tensor(0.0)
        out["overall"] = _ratio(self.correct.sum(), self.total.sum())
        return out
