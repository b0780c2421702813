"""areplica's benchmarks: ``python -m benchmarks [--quick]`` (see ``benchmarks/README.md``).

Every scenario runs its contenders side by side in one process and one run, alternating
their order round by round, and reports medians over the rounds. Results are written to
``benchmarks/results/latest.json`` and ``benchmarks/results/latest.md``.
"""
