"""Config files that were folded into others, and the command that replaces each: a ``--config``
(or ``lori dryrun`` path) naming one of them stops with one line saying what to run instead
(``lori.commands.main`` calls ``check`` before any subcommand).

    configs/paper/baselines/llama3_8b_r32_<task>_<method>.yaml
        -> lori fit --config configs/paper/llama3_8b_r32_<task>.yaml --model.method <method>
           (full: --config configs/method/full.yaml; lori.training.fit_settings derives the rest)
    configs/experiment/<method>.yaml (full_ft.yaml: method full)
        -> lori fit --config configs/experiment/default.yaml --model.method <method>
    configs/paper/merge/<set>_<method>_<adaptation>.yaml
        -> lori merge --config configs/paper/merge/<set>.yaml --adaptation <adaptation> --method <method>
           (lori.training.merge_sets derives the row's adapters, weights, density and output_dir)
    configs/paper/continual/llama3_8b_r32_safety_then_<task>_<adaptation>.yaml
        -> lori continual --config configs/paper/continual/llama3_8b_r32_safety_then_<task>.yaml --adaptation <adaptation>
"""

from __future__ import annotations

import re
from pathlib import Path

from lori.core import LoRIConfigError
from lori.training.baselines.registry import current_name

# the methods of the removed files, by the names they had (lora_frozen_a: switched on as lori_d now)
_METHODS = "full|lora|dora|vera|ia3|lora_fa|lora_frozen_a|adalora|rslora|pissa|loraplus"
# a removed path (its tail) -> (the config that replaces it, the method switched on it)
_MOVED = (
    (re.compile(r"configs/paper/baselines/(?P<run>llama3_8b_r32_(?:nlu|gsm8k|codealpaca|saferpaca))"
                rf"_(?P<method>{_METHODS})\.yaml"), "configs/paper/{run}.yaml"),
    (re.compile(rf"configs/experiment/(?P<method>{_METHODS}|full_ft)\.yaml"), "configs/experiment/default.yaml"),
)


# a removed file (its tail) that one row of a composed config replaces -> the command that runs that row
_ROWS = (
    (re.compile(r"configs/paper/merge/(?P<set>llama3_8b_3tasks|llama3_8b_4tasks|mistral_7b_4tasks)_"
                r"(?P<method>concat|linear|magnitude|ties|dare)_(?P<adaptation>lora|lori_d|lori_s)\.yaml"),
     "lori merge --config configs/paper/merge/{set}.yaml --adaptation {adaptation} --method {method}"),
    (re.compile(r"configs/paper/continual/(?P<run>llama3_8b_r32_safety_then_(?:nlu|gsm8k|codealpaca))_"
                r"(?P<adaptation>lori_d|lori_s)\.yaml"),
     "lori continual --config configs/paper/continual/{run}.yaml --adaptation {adaptation}"),
)
_PRUNING_ROWS = ("magnitude", "ties", "dare")  # the paper prunes LoRA adapters only


class MovedConfigError(LoRIConfigError):
    """A config file that no longer exists because another config with an option replaces it."""


def replacement(path: str, subcommand: str = "fit") -> str | None:
    """The command that replaces the removed config ``path`` (None when it is not one)."""
    tail = Path(path).as_posix()
    for pattern, config in _MOVED:
        found = re.search(rf"(?:^|/){pattern.pattern}$", tail)
        if found is None:
            continue
        method = "full" if found["method"] == "full_ft" else current_name(found["method"])
        config = config.format(**found.groupdict())
        if subcommand == "dryrun":
            return f"lori dryrun --method {method} {config}"
        if method == "full" and config.startswith("configs/paper/"):
            return f"lori {subcommand} --config {config} --config configs/method/full.yaml"
        return f"lori {subcommand} --config {config} --model.method {method}"
    return _row_replacement(tail)


def _row_replacement(tail: str) -> str | None:
    for pattern, command in _ROWS:
        found = re.search(rf"(?:^|/){pattern.pattern}$", tail)
        if found is None:
            continue
        if not (found.groupdict().get("method") in _PRUNING_ROWS and found["adaptation"] != "lora"):  # never a file
            return command.format(**found.groupdict())
    return None


def check(argv: list[str]) -> None:
    """Refuse, in one line, a command naming a removed config that a composed one replaces.

    Raises:
        MovedConfigError: the first such path in ``argv`` (a ``lori`` command line, subcommand first).
    """
    subcommand = argv[0] if argv else "fit"
    for arg in argv[1:]:
        path = arg.split("=", 1)[1] if arg.startswith("--config=") else arg
        if not path.endswith(".yaml") or Path(path).exists():
            continue
        command = replacement(path, subcommand)
        if command is not None:
            raise MovedConfigError(f"{path} was removed (one config per setting now): use {command}")
