"""``lori``: the command line. ``main`` hands each subcommand to its module in this package.

    lori pipeline --config configs/experiment/default.yaml    LoRI-D -> calibration -> LoRI-S
    lori fit      --config configs/experiment/default.yaml    one Trainer.fit (LightningCLI)
    lori <subcommand> --help                                  every option with its default

    pipeline                      pipeline_command.py
    fit | validate | test | predict   lightning_cli.py (LoRICLI: LightningCLI's own subcommands)
    continual                     continual_command.py
    eval                          eval_command.py
    merge                         merge_command.py
    diagnose                      diagnose_command.py
    dryrun                        dryrun_command.py

Errors in what the user gave (a ``LoRIError``, a parse error, a Trainer setting Lightning refuses)
end with one line ``lori: error: ...`` and exit code 2; a diverged run or a full disk with one line
and exit code 1; any other exception is a bug and keeps its traceback. ``python -m lori`` runs the
same ``main``.
"""

from __future__ import annotations

import sys

from jsonargparse import ArgumentError
from lightning.fabric.utilities.exceptions import MisconfigurationException

from lori.commands import (
    continual_command,
    diagnose_command,
    dryrun_command,
    eval_command,
    merge_command,
    pipeline_command,
)
from lori.commands.lightning_cli import LoRICLI
from lori.core.atomic_files import disk_full_message
from lori.core.errors import LoRIError
from lori.data.datamodule import TaskDataModule
from lori.training import console, moved_configs
from lori.training.module import LoRIModule

USAGE = """usage: lori {pipeline,fit,validate,test,predict,continual,eval,merge,diagnose,dryrun} [--config FILE] [options]

  pipeline   LoRI-D -> mask calibration -> LoRI-S, chained Trainer.fit calls (the main job)
  fit        one Trainer.fit of the configured module (LightningCLI)
  validate   held-out loss (LightningCLI)
  test       test loop (LightningCLI)
  predict    predict loop (LightningCLI)
  continual  safety adapter -> task t under M_t, evaluated after each phase (paper Fig. 3)
  eval       evaluate a base model, an adapter or a merged model on the paper's tasks (lori.commands.eval_command)
  merge      merge T adapters, evaluate on every task, write a Table-3-style table (lori.commands.merge_command)
  dryrun     trainable parameters and memory of a config on the meta device (no weights, no GPU)
  diagnose   |cos(ΔW)| and mask overlap between adapters, sparsity heatmaps (lori.commands.diagnose_command)

`lori <subcommand> --help` lists every option with its default. lori prints a line per stage, a
progress bar and a summary; `--verbose` (anywhere, or LORI_VERBOSE=1) shows Lightning's, transformers'
and datasets' own logs, warnings, model summaries and loading bars as well.
"""


# subcommand -> its entry point (argv after the subcommand); fit, validate, test and predict are
# LightningCLI's own subcommands (LoRICLI), and so is the error for a name not listed anywhere
COMMANDS = {
    "pipeline": pipeline_command.pipeline,
    "dryrun": dryrun_command.main,
    "continual": continual_command.continual,
    "eval": eval_command.main,
    "merge": merge_command.main,
    "diagnose": diagnose_command.main,
}


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``lori`` command; input errors end with one line and exit code 2."""
    argv, verbose = console.pop_verbose(list(sys.argv[1:] if argv is None else argv))
    console.configure(verbose)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return
    try:
        moved_configs.check(argv)  # a removed config file: one line naming the command that replaces it
        command = COMMANDS.get(argv[0])
        if command is not None:
            command(argv[1:])
        else:  # fit, validate, test, predict: LightningCLI's own subcommands
            LoRICLI(LoRIModule, TaskDataModule, args=argv, save_config_kwargs={"overwrite": True})
    except LoRIError as err:  # what the user gave: one line, no traceback
        print(f"lori: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except MisconfigurationException as err:  # a Trainer setting Lightning refuses
        print(f"lori: error: trainer: {' '.join(str(err).split())}", file=sys.stderr)
        raise SystemExit(2) from None
    except ArgumentError as err:  # a config or command-line option the parser refuses
        print(f"lori: error: {' '.join(str(err).split())}", file=sys.stderr)
        raise SystemExit(2) from None
    except FloatingPointError as err:  # a diverged run: say where, keep the checkpoints
        print(f"lori: error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    except Exception as err:  # a full disk: name the file and the free space; earlier files are kept
        message = disk_full_message(err)
        if message is None:
            raise
        print(f"lori: error: {message}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
