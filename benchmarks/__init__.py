"""The benchmark suites and their runner (``python -m benchmarks``).

A suite is any ``benchmarks/<name>.py`` whose name does not start with ``_``;
the runner finds it, so a new suite appears in the report by being there.
Each suite keeps to this contract:

- its module docstring opens with one line saying what it compares (the
  report's title for it) and goes on to say why;
- it runs as ``python benchmarks/<name>.py [--quick] [--results-dir DIR]``
  and exits 0 when it measured everything;
- it writes ``DIR/<name>.md`` (its table, for people) and ``DIR/<name>.json``
  (every figure); DIR defaults to ``benchmarks/results``. ``--quick`` is a
  brief run that proves the suite works; it writes files only when
  ``--results-dir`` is given, so a quick run never replaces real results;
- its JSON has a top-level ``"summary"``: the figures the runner charts, a
  list of objects ``{"group", "label", "role", "value", "unit", "ratio",
  "better"}``. Rows of one ``group`` are measured alike; ``role`` is
  ``"ours"``, ``"baseline"`` (exactly one per group, ratio 1), ``"peer"`` or
  ``"reference"``; ``ratio`` is ``value`` over the baseline's value;
  ``better`` is ``"lower"`` or ``"higher"``;
- a suite that needs Postgres takes its DSN from ``GHAR_BENCH_DATABASE_URL``
  (the runner sets it: the machine's server, else an embedded one).
"""
