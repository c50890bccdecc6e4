"""python -m lra.report: see lra.report.main."""

from lra.report import main

main()
