"""The measurement lab: `specdecode bench` (speed, acceptance, peers) and `specdecode check` (exactness).

prompts.py  prompt sets (MT-Bench, HumanEval via pip, user JSONL)
methods.py  one column = one method: our loop with a drafter at some k
peers.py    transformers and llama.cpp methods on the same weights
runner.py   builds the columns, runs them interleaved over the prompts
report.py   figures per method x category, results.json, report.md
plots.py    PNG plots
check.py    greedy identity and sampling G-test audits
commands.py the two CLI subcommands
"""
