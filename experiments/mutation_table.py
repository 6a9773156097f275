"""Kill rate per mutated file from mutmut's results (run after experiments/mutation.sh).

    python3 experiments/mutation_table.py [--markdown] [--only 'lori.eval.judge*' ...]

A mutant listed in experiments/mutation_equivalent.txt (``name  reason`` per line) is equivalent:
no test can tell it from the original, so it counts neither as killed nor as surviving. Rate =
killed / (tried - equivalent); "no tests" mutants (no selected test calls the function) count as
survivors. Files with no tried mutant are left out.
"""

from __future__ import annotations

import argparse
import fnmatch
import re
import subprocess
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EQUIVALENT = ROOT / "experiments" / "mutation_equivalent.txt"
KILLED = {"killed", "timeout", "segfault", "caught by type check"}
SURVIVED = {"survived", "no tests", "suspicious"}


def equivalent_names() -> set[str]:
    lines = EQUIVALENT.read_text().splitlines() if EQUIVALENT.exists() else []
    return {line.split()[0] for line in lines if line.strip() and not line.startswith("#")}


def results() -> dict[str, str]:
    """mutant name -> status, from ``mutmut results --all true`` in the current directory."""
    out = subprocess.run(["mutmut", "results", "--all", "true"], capture_output=True, text=True,
                         check=True).stdout
    return dict(m.groups() for m in re.finditer(r"^\s*(\S+): (.+?)\s*$", out, re.MULTILINE))


def module_of(name: str) -> str:
    return re.sub(r"\.x[_ǁ].*$", "", name)


def table(statuses: dict[str, str], equivalent: set[str], only: list[str] | None = None,
          ) -> list[tuple[str, Counter]]:
    by_module: dict[str, Counter] = defaultdict(Counter)
    for name, status in statuses.items():
        if only and not any(fnmatch.fnmatchcase(name, glob) for glob in only):
            continue
        row = by_module[module_of(name)]
        if name in equivalent:
            row["equivalent"] += 1
        elif status in KILLED:
            row["killed"] += 1
        elif status in SURVIVED:
            row["survived"] += 1
        else:
            row["not checked"] += 1
    rows = [(m, c) for m, c in sorted(by_module.items()) if c["killed"] + c["survived"] + c["equivalent"]]
    total = sum((c for _, c in rows), Counter())
    return [*rows, ("total", total)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", action="store_true", help="a Markdown table")
    parser.add_argument("--only", nargs="+", help="count only mutants matching these globs")
    args = parser.parse_args()
    rows = table(results(), equivalent_names(), args.only)
    head = ("module", "mutants", "killed", "survived", "equivalent", "not checked", "kill rate")
    lines = []
    for module, c in rows:
        tried = c["killed"] + c["survived"]
        rate = f"{100 * c['killed'] / tried:.1f}%" if tried else "-"
        lines.append((module, str(sum(c.values())), str(c["killed"]), str(c["survived"]),
                      str(c["equivalent"]), str(c["not checked"]), rate))
    if args.markdown:
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        for line in lines:
            print("| " + " | ".join(line) + " |")
    else:
        widths = [max(len(r[i]) for r in [head, *lines]) for i in range(len(head))]
        for line in [head, *lines]:
            print("  ".join(v.ljust(w) for v, w in zip(line, widths)))


if __name__ == "__main__":
    main()
