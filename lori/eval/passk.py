"""pass@k (Chen et al., 2021) and HumanEval program assembly / functional-correctness evaluation.

Program assembly follows OpenAI human-eval: ``prompt + completion + "\\n" + test + "\\n" +
f"check({entry_point})"``.  The completion is first cut at the earliest of
:data:`HUMANEVAL_STOP` (a new top-level ``def``/``class``/``if __name__``/``print(``/comment),
as in the Codex paper: the model only has to write the function body and anything it appends at
top level afterwards (extra functions, demo prints, ``__main__`` blocks) is discarded.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from lori.eval.answers import truncate_at_stop
from lori.eval.sandbox import ExecResult, run_many

HUMANEVAL_STOP: tuple[str, ...] = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#")
# The stop words of the bigcode harness the official LoRI code evaluates HumanEval with
# (juzhengz/LoRI @ 9183468, bigcode/bigcode_eval/tasks/humaneval.py:52), for protocol "official".
HUMANEVAL_STOP_OFFICIAL: tuple[str, ...] = (
    "\nclass", "\ndef", "\n#", "\n@", "\nprint", "\nif", "\n```", "<file_sep>")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k estimate ``1 - C(n-c, k) / C(n, k)`` for one problem.

    Computed in the numerically stable product form ``1 - prod_{i=n-c+1}^{n} (1 - k / i)``.

    Args:
        n: samples generated for the problem.
        c: samples that passed (``0 <= c <= n``).
        k: the k of pass@k (``1 <= k <= n``).

    Raises:
        ValueError: ``k > n``, ``k < 1`` or ``c`` outside ``[0, n]``.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if k > n:
        raise ValueError(f"pass@{k} needs at least k={k} samples per problem, got n={n}")
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got c={c}, n={n}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


def estimate_pass_at_k(num_samples: int | Sequence[int], num_correct: Sequence[int],
                       k: int) -> list[float]:
    """Per-problem pass@k for several problems (``num_samples`` may be one shared ``n``)."""
    if isinstance(num_samples, int):
        num_samples = [num_samples] * len(num_correct)
    if len(num_samples) != len(num_correct):
        raise ValueError("num_samples and num_correct differ in length")
    return [pass_at_k(int(n), int(c), k) for n, c in zip(num_samples, num_correct)]


def humaneval_program(prompt: str, completion: str, test: str, entry_point: str,
                      stop: Sequence[str] | None = HUMANEVAL_STOP) -> str:
    """The program that checks one completion (completion cut at ``stop`` first)."""
    body = truncate_at_stop(completion, stop)
    return f"{prompt}{body}\n{test}\ncheck({entry_point})\n"


def _count_passes(results: Sequence[ExecResult], sizes: Sequence[int]) -> list[int]:
    counts, start = [], 0
    for size in sizes:
        counts.append(sum(r.passed for r in results[start:start + size]))
        start += size
    return counts


def evaluate_humaneval(
    problems: Sequence[Mapping[str, Any]],
    completions: Sequence[Sequence[str]],
    ks: Iterable[int] = (1, 5, 10),
    *,
    workers: int = 2,
    timeout: float = 5.0,
    stop: Sequence[str] | None = HUMANEVAL_STOP,
    **sandbox_kwargs: Any,
) -> dict[str, Any]:
    """Run every completion against its problem's tests and compute mean pass@k.

    Args:
        problems: HumanEval records with ``prompt``, ``test`` and ``entry_point``.
        completions: per problem, its ``n`` sampled completions (generated text only).
        ks: the k values; each must be ``<= n`` of every problem.
        workers: parallel sandboxes.
        timeout: seconds per program.
        stop: stop strings applied to each completion.
        **sandbox_kwargs: forwarded to :func:`lori.eval.sandbox.run_program`.

    Returns:
        ``{"pass@k": mean, ..., "n": [...], "c": [...], "results": [[ExecResult, ...], ...]}``.
    """
    if len(problems) != len(completions):
        raise ValueError(f"{len(problems)} problems but {len(completions)} completion lists")
    programs = [
        humaneval_program(p["prompt"], comp, p["test"], p["entry_point"], stop)
        for p, comps in zip(problems, completions) for comp in comps
    ]
    sizes = [len(comps) for comps in completions]
    flat = run_many(programs, workers=workers, timeout=timeout, **sandbox_kwargs)
    correct = _count_passes(flat, sizes)
    out: dict[str, Any] = {}
    for k in ks:
        out[f"pass@{k}"] = float(np.mean(estimate_pass_at_k(sizes, correct, k))) if sizes else 0.0
    nested, start = [], 0
    for size in sizes:
        nested.append(list(flat[start:start + size]))
        start += size
    out.update(n=sizes, c=correct, results=nested)
    return out
