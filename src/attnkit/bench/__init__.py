"""`attnkit bench`: time, memory, FLOPs and error of every registered mechanism against SDPA, as a report.

    from attnkit.bench import quick_config, run_benchmark, write_report
    doc = run_benchmark(quick_config(mechanisms=["softmax"]))
    write_report(doc, "attnkit-report")

See docs/bench.md for what is measured and how.
"""

from attnkit.bench.report import terminal_summary, write_report
from attnkit.bench.runner import CELL_FIELDS, SCHEMA, run_benchmark
from attnkit.bench.workloads import BenchConfig, Variant, default_config, quick_config, select_variants

__all__ = ["BenchConfig", "Variant", "default_config", "quick_config", "select_variants", "run_benchmark",
           "write_report", "terminal_summary", "CELL_FIELDS", "SCHEMA"]
