"""The evaluation tasks run as the official LoRI code runs them (``protocol: official``).

``lori.eval.evaluator.Evaluator`` hands GSM8K, HumanEval, the NLU sets and the HEx-PHI-layout safety sets
to :class:`OfficialTasks` under ``protocol: official``; ``lori.eval.official`` holds the facts.

Per task (github.com/juzhengz/LoRI at 9183468):

* prompts: the official strings (``lori.data.prompts.format_example(..., "official",
  stage="eval")``), tokenised as the official code (``lori.data.tokenize.tokenize_prompts``: no
  special tokens and the over-length rule against the gold target; HumanEval with the tokenizer's
  special tokens), generated from those ids (``lori.eval.generate.generate_from_ids``);
* GSM8K, NLU, safety: greedy, ``max_new_tokens`` (512) new tokens (src/eval_model.py:307-317);
  the official answer rules (``lori.eval.answers.official_*``) and keyword judge
  (``lori.eval.judge.OfficialKeywordJudge``) read the decoded prompt + generation
  (``judge_text: prompt_and_generated``, the official reading and the default, l.325-328:
  ``batch_decode(prompt + new tokens, skip_special_tokens=True)``) or the generated text only
  (``generated``, lori's fix); the score of the other reading is reported beside, its name ending
  in ``_generated_only`` or ``_prompt_and_generated`` (``other_reading``);
* HumanEval: bigcode's sampling (temperature, top-p, top-k 0, ``n_samples`` per problem, seed)
  with at most 512 tokens of prompt + generation, its stop words and program assembly
  (``lori.eval.official.bigcode_candidate`` / ``bigcode_program``), pass@1/5/10.
"""

from __future__ import annotations

from typing import Any

from lori.data.prompts import format_example
from lori.data.tasks import get_task, prompt_task
from lori.data.tokenize import tokenize_prompts
from lori.eval.answers import (
    official_gsm8k_answer,
    official_gsm8k_correct,
    official_nlu_answer,
    official_nlu_index,
)
from lori.eval.generate import generate_from_ids
from lori.eval.judge import OfficialKeywordJudge
from lori.eval.metrics import ExactMatch, MultipleChoiceAccuracy, PassAtK, RefusalRate
from lori.eval.official import OFFICIAL_MAX_LENGTH_GENERATION, bigcode_candidate, bigcode_program
from lori.eval.passk import HUMANEVAL_STOP_OFFICIAL
from lori.eval.sandbox import run_many

Records = list[dict[str, Any]]
READING_SUFFIX = {"generated": "_generated_only", "prompt_and_generated": "_prompt_and_generated"}


class OfficialTasks:
    """Evaluate one model the official way; each scoring method (``lori.eval.evaluator.OFFICIAL_SCORERS``)
    takes ``(task, records)`` and returns ``(metrics, samples)``.

    Args:
        model: the model (float32, adapter merged, for the official numbers).
        tokenizer: its tokenizer.
        settings: a ``lori.eval.evaluator.EvalSettings`` with ``protocol: official``.
    """

    def __init__(self, model: Any, tokenizer: Any, settings: Any) -> None:
        self.model, self.tokenizer, self.s = model, tokenizer, settings

    def formatted(self, task: str, records: Records) -> list[tuple[str, str]]:
        """The official ``(prompt, target)`` strings of the records."""
        return [format_example(r, prompt_task(task), self.s.template, "official", stage="eval")
                for r in records]

    def token_ids(self, task: str, records: Records) -> list[list[int]]:
        """The prompt token ids the official code generates from."""
        limit = OFFICIAL_MAX_LENGTH_GENERATION if get_task(task).score == "pass_at_k" else None
        encoded = tokenize_prompts(records, self.tokenizer, prompt_task(task), self.s.template,
                                   "official", max_length=limit)
        return [list(ids) for ids in encoded["input_ids"]]

    def generate(self, prompt_ids: list[list[int]], n: int = 1,
                 code: bool = False) -> list[list[list[int]]]:
        """New token ids per prompt: greedy (settings) or, for code, bigcode's sampling."""
        s = self.s
        if code:
            eos = getattr(self.tokenizer, "eos_token", None)
            kwargs: dict[str, Any] = {
                "max_new_tokens": OFFICIAL_MAX_LENGTH_GENERATION,
                "max_length": OFFICIAL_MAX_LENGTH_GENERATION, "do_sample": True,
                "temperature": s.temperature, "top_p": s.top_p, "num_return_sequences": n,
                "stop": [*HUMANEVAL_STOP_OFFICIAL, *([eos] if eos else [])], "keep_eos": True}
        else:
            kwargs = {"max_new_tokens": s.max_new_tokens, "do_sample": s.do_sample,
                      "temperature": s.temperature, "top_p": s.top_p}
        return generate_from_ids(self.model, self.tokenizer, prompt_ids, batch_size=s.batch_size,
                                 progress=s.progress, seed=s.seed, **kwargs)

    def texts(self, task: str, records: Records) -> tuple[list[str], list[str], list[str]]:
        """``(generated text, the text the rules read, the text the other reading reads)`` per record
        (one greedy generation; ``judge_text`` picks the reading)."""
        ids = self.token_ids(task, records)
        new = [seqs[0] for seqs in self.generate(ids)]
        decode = self.tokenizer.decode
        generated = [decode(seq, skip_special_tokens=True) for seq in new]
        with_prompt = [decode(p + seq, skip_special_tokens=True) for p, seq in zip(ids, new)]
        if self.s.judge_text == "prompt_and_generated":
            return generated, with_prompt, generated
        return generated, generated, with_prompt

    def other_reading(self, metric: str) -> str:
        """The name of ``metric`` as the reading ``judge_text`` did not pick scores it."""
        other = "generated" if self.s.judge_text == "prompt_and_generated" else "prompt_and_generated"
        return metric + READING_SUFFIX[other]

    def exact_match(self, task: str, records: Records) -> tuple[dict[str, float], list[dict[str, Any]]]:
        """GSM8K's official answer rule (``official_gsm8k_correct``) against the gold target."""
        targets = [t for _, t in self.formatted(task, records)]
        generated, read, other = self.texts(task, records)
        metric, other_metric = ExactMatch(official_gsm8k_correct), ExactMatch(official_gsm8k_correct)
        metric.update(read, targets)
        other_metric.update(other, targets)
        samples = [{"id": r["id"], "output": g, "pred": official_gsm8k_answer(x),
                    "gold": official_gsm8k_answer(t)}
                   for r, g, x, t in zip(records, generated, read, targets)]
        return {"accuracy": float(metric.compute()), self.other_reading("accuracy"): float(other_metric.compute()),
                "n": len(records)}, samples

    def nlu(self, task: str, records: Records) -> tuple[dict[str, float], list[dict[str, Any]]]:
        targets = [t for _, t in self.formatted(task, records)]
        generated, read, other = self.texts(task, records)
        preds = [official_nlu_answer(task, x) for x in read]
        golds = [official_nlu_index(task, official_nlu_answer(task, t)) for t in targets]
        scores = {}
        for name, answers in (("accuracy_generate", preds), (self.other_reading("accuracy_generate"),
                                                             [official_nlu_answer(task, x) for x in other])):
            metric = MultipleChoiceAccuracy([task])
            metric.update([official_nlu_index(task, p) for p in answers], golds, task)
            scores[name] = float(metric.compute()["average"])
        samples = [{"id": r["id"], "output": o, "pred": p, "gold": official_nlu_answer(task, t)}
                   for r, o, p, t in zip(records, generated, preds, targets)]
        return scores | {"n": len(records)}, samples

    def refusal(self, task: str, records: Records) -> tuple[dict[str, float], list[dict[str, Any]]]:
        generated, read, other = self.texts(task, records)
        prompts = [r["prompt"] for r in records]
        safe_judge = OfficialKeywordJudge()  # reads ``read``: prompt + generation, or the generation
        safety, other_safety, refusal = RefusalRate(safe_judge), RefusalRate(safe_judge), RefusalRate()
        safety.update(prompts, read)
        other_safety.update(prompts, other)
        refusal.update(prompts, generated)  # lori's judge, on the generated text
        verdicts = safe_judge(prompts, read)
        refused = refusal.judge(prompts, generated)
        samples = [{"id": r["id"], "output": o, "safe": bool(v), "refused": bool(f)}
                   for r, o, v, f in zip(records, generated, verdicts, refused)]
        return {"safety_score": float(safety.compute()),
                self.other_reading("safety_score"): float(other_safety.compute()),
                "refusal_rate": float(refusal.compute()), "n": len(records)}, samples

    def code(self, task: str, records: Records) -> tuple[dict[str, float], list[dict[str, Any]]]:
        """bigcode's HumanEval: sampled completions, its program assembly, pass@k in the sandbox."""
        n = self.s.n_samples
        prompts = [p for p, _ in self.formatted(task, records)]
        ids = self.token_ids(task, records)
        new = self.generate(ids, n=n, code=True)
        candidates = [[bigcode_candidate(self.tokenizer, p, pid + seq) for seq in seqs]
                      for p, pid, seqs in zip(prompts, ids, new)]
        programs = [bigcode_program(c, r["test"], r["entry_point"])
                    for r, cands in zip(records, candidates) for c in cands]
        results = run_many(programs, workers=self.s.sandbox_workers, timeout=self.s.sandbox_timeout)
        passed = [sum(res.passed for res in results[i * n:(i + 1) * n]) for i in range(len(records))]
        metric = PassAtK(ks=[k for k in (1, 5, 10) if k <= n])
        metric.update([n] * len(records), passed)
        samples = [{"id": r["id"], "completions": c, "passed": p}
                   for r, c, p in zip(records, candidates, passed)]
        out = {k: float(v) for k, v in metric.compute().items()}
        return out | {"n": len(records), "samples_per_problem": n}, samples
