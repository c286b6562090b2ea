"""Interactive, self-contained HTML reports: one run (``report.html``) and run comparisons."""

from evomerge.report.run_report import REPORT_FILE, build_report, refresh_report, write_run_report

__all__ = ["REPORT_FILE", "build_report", "refresh_report", "write_run_report"]
