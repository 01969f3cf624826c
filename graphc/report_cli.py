"""`graphc report`: plots and an HTML page for a run folder or a search folder."""
from __future__ import annotations


def add_commands(sub) -> None:
    p = sub.add_parser("report", help="plot a training run or a search (PNG and HTML)",
                       description="Draw a run's loss, accuracy and learning rate per epoch and, "
                                   "when recorded (train --track-norms), its weight and gradient "
                                   "norms with warnings where gradients vanish or explode; or a "
                                   "search's metric against each hyperparameter. Writes PNGs "
                                   "and index.html.")
    p.add_argument("target", metavar="RUN|SEARCH", help="a run folder or a search --out folder")
    p.add_argument("-o", "--out", metavar="DIR", help="where to write (default: RUN/report)")
    p.set_defaults(run=cmd_report)


def cmd_report(args) -> int:
    from graphc.report import make_report
    report = make_report(args.target, args.out)
    for warning in report.warnings:
        print(f"warning: {warning}")
    names = ", ".join(name for name, _ in report.figures)
    print(f"wrote {report.page} ({names})")
    return 0
