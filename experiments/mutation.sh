#!/usr/bin/env bash
# Mutation testing (opt-in, never CI): mutmut 3.8.1 plants one-line bugs in lori/core and the eval
# scoring code (answers, judge, passk, sandbox, _isolation) and runs, for each, only the fast unit
# tests that call the mutated function ([tool.mutmut] in pyproject.toml selects them). A mutant
# no test notices "survived"; docs/mutation_testing.md lists the rates and every survivor's fate.
#
#     bash experiments/mutation.sh                          # everything: hours on 2 busy cores
#     bash experiments/mutation.sh 'lori.eval.judge*'       # one module (mutant-name globs), minutes
#     bash experiments/mutation.sh 'lori.core.layer*' 'lori.core.masks*'
#     mutmut results                  # survivors (and "no tests": functions no selected test calls)
#     mutmut show <mutant name>       # the diff of one mutant; mutmut browse for a full-screen view
#
# mutmut copies the package and tests/ into mutants/ (git-ignored) and runs pytest there, forking
# one worker per mutant (MUTMUT_CHILDREN, default 2) from a process that ran the tests once to map
# tests to functions; results are kept in mutants/ and a rerun tries only unchecked mutants (a
# mutant named on the command line is tried again). A source file changed since is mutated afresh.
# Run it in a clean checkout of the commit you report (git clone . /tmp/lori_mut): edits made
# while it runs would otherwise be mutated half-way. The table: python3 experiments/mutation_table.py
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
for pattern in "${@:-}"; do
    # shellcheck disable=SC2086 # no pattern: every mutant
    nice -n 10 mutmut run --max-children "${MUTMUT_CHILDREN:-2}" ${pattern:+"$pattern"}
done
python3 experiments/mutation_table.py
