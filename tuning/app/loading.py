"""`tuning.load`: a predictor from an export, local or in a bucket (fetched into the local mirror
of its run dir first, tuning.app.location)."""
from __future__ import annotations

from pathlib import Path

from tuning.app import predictor
from tuning.app.location import fetch_export


def load(export_dir: str | Path) -> predictor.Predictor:
    """The export at `export_dir` (`runs/hymenoptera/best`, `s3://bucket/runs/hymenoptera/best`)."""
    return predictor.load(fetch_export(export_dir))
