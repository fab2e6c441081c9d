"""Evaluation reports of a mode file (``cmd report``): metrics, baselines, plots, JSON/Markdown/HTML."""

from .build import ReportResult, make_report
from .compose import REPORT_FORMAT, REPORT_VERSION
from .evaluation import Requirement, Thresholds, load_evaluate, parse_requirement

__all__ = ["REPORT_FORMAT", "REPORT_VERSION", "ReportResult", "Thresholds", "make_report", "Requirement",
           "load_evaluate", "parse_requirement"]
