"""Routing-stability report of a run: PNG plots and a Markdown summary.

    python tools/routing_report.py RUN_DIR --out DIR [--top N]

Reads RUN_DIR/metrics.jsonl (the routing/* metrics) and, when the run saved them,
RUN_DIR/routes/step_XXXXXXXX.pt route dumps; writes flip_frac_layers.png,
flip_frac_heatmap.png, expert_load.png, drift_pairs.png and summary.md into DIR
(see moe_rl/routing/report.py for what each shows). Exits 2 with a message naming the
file when the run has no routing metrics.
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", help="the run's output directory (holds metrics.jsonl)")
    ap.add_argument("--out", required=True, help="directory for the plots and summary.md")
    ap.add_argument("--top", type=int, default=5, help="how many worst layers the summary lists")
    args = ap.parse_args(argv)

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from moe_rl.routing.report import write_report

    try:
        paths = write_report(args.run_dir, args.out, top=args.top)
    except ValueError as e:  # ReportError included
        print(f"routing_report: error: {e}", file=sys.stderr)
        return 2
    for p in paths:
        print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
