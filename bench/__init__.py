"""The size and speed benchmark: deltatar next to the archivers people already use.

Every workload replays a history of visits to one directory.  After each visit
deltatar and each peer record the tree, and the benchmark writes down how many
bytes each store holds, how long the append took and how much memory it used.
Next to them stands the *ideal*: what a zstd-3 stream of only the genuinely new
bytes of each visit would cost.  deltatar's size target is stated against that
ideal, so the benchmark computes it itself rather than trusting deltatar's own
accounting.

Run it through ``scripts/bench``; ``python -m bench.run --help`` lists the
options.  The results land in ``bench/out/results.json`` and ``bench/RESULTS.md``.
"""
