"""Evaluation reports of a mode file (``cmd report``): metrics, baselines, plots, JSON/Markdown/HTML.
Names are imported from their modules on first use."""

from .._lazy import lazy_package

__all__ = ["REPORT_FORMAT", "REPORT_VERSION", "ReportResult", "Requirement", "Thresholds", "load_evaluate",
           "make_report", "parse_requirement"]

lazy_package(__name__, {
    ".build": ("ReportResult", "make_report"),
    ".compose": ("REPORT_FORMAT", "REPORT_VERSION"),
    ".evaluation": ("Requirement", "Thresholds", "load_evaluate", "parse_requirement"),
})
