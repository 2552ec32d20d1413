"""Training-curve files: where one lies beside its result, reading it back, drawing it.

A curve file (written by the built-in ``training_curve`` plugin) is JSON lines, one object per
training progress report::

    {"phase": "meta-train", "step": 3, "total": 100, "seconds": 1.25, "loss": 0.71, "acc": 0.52}

``phase``, ``step``, ``total`` and ``seconds`` are always there; every other key is a metric the
learner reported, a number or null (where it was not finite). The file of result ``X.json`` is
``X.curve.jsonl`` in the same folder.
"""
from __future__ import annotations

import io
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .errors import MetabenchError

CURVE_SUFFIX = ".curve.jsonl"
PLOT_FORMATS = ("png", "svg")
#: Keys every curve line has; any other key is a metric.
FIXED_KEYS = ("phase", "step", "total", "seconds")
_FIRST_METRICS = ("loss", "acc")  # drawn first, in this order; other metrics follow by name
_DRAWABLE = 1e300  # larger values are drawn as gaps


def curve_path_for(result_path: str | Path) -> Path:
    """``<folder>/<stem>.curve.jsonl`` for the result file ``<folder>/<stem>.json``."""
    path = Path(result_path)
    return path.with_name(path.stem + CURVE_SUFFIX)


@dataclass
class CurvePoint:
    """One progress report read back from a curve file."""

    phase: str
    step: int
    total: int
    seconds: float
    metrics: dict[str, float | None] = field(default_factory=dict)


def _is_number(value: object) -> bool:
    """A finite number a float holds (not a bool; not NaN, an infinity or an integer too large for a float)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) <= sys.float_info.max


def parse_curve_line(line: str, where: str) -> CurvePoint:
    """One curve line as a CurvePoint; MetabenchError naming ``where`` (file and line) if malformed."""
    try:
        obj = json.loads(line)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, a number of over 4300 digits, nested too deeply
        reason = exc.msg if isinstance(exc, json.JSONDecodeError) else exc
        raise MetabenchError(f"{where}: not valid JSON ({reason}); each line must be one JSON object "
                             "like {\"phase\": \"meta-train\", \"step\": 1, \"total\": 10, \"seconds\": 0.1, "
                             "\"loss\": 0.7}") from None
    if not isinstance(obj, dict):
        raise MetabenchError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    problems = []
    if not isinstance(obj.get("phase"), str):
        problems.append("phase must be text")
    for key in ("step", "total"):
        if not (isinstance(obj.get(key), int) and not isinstance(obj.get(key), bool) and abs(obj[key]) < 2**63):
            problems.append(f"{key} must be an integer (64-bit)")
    if not _is_number(obj.get("seconds")):
        problems.append("seconds must be a finite number")
    metrics = {k: v for k, v in obj.items() if k not in FIXED_KEYS}
    bad = [k for k, v in metrics.items() if v is not None and not _is_number(v)]
    if bad:
        problems.append(f"metric(s) {', '.join(bad)} must be numbers or null")
    if problems:
        raise MetabenchError(f"{where}: not a training-curve line: {'; '.join(problems)}")
    return CurvePoint(obj["phase"], obj["step"], obj["total"], float(obj["seconds"]), metrics)


def read_curve(path: Path) -> list[CurvePoint]:
    """Every point of a curve file; MetabenchError naming the file (and line) on any problem."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MetabenchError(f"{path}: no such curve file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise MetabenchError(f"{path}: cannot read: {exc}") from None
    points = [parse_curve_line(line, f"{path} line {n}")
              for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
    if not points:
        raise MetabenchError(f"{path}: holds no progress reports")
    return points


def metric_names(points: list[CurvePoint]) -> list[str]:
    """The metrics with at least one number in ``points``: loss, acc, then the others by name."""
    present = {k for p in points for k, v in p.metrics.items() if v is not None}
    return [m for m in _FIRST_METRICS if m in present] + sorted(present - set(_FIRST_METRICS))


def render_curve(points: list[CurvePoint], fmt: str, title: str) -> bytes:
    """One panel per metric against step, one line per phase (Agg backend, no pyplot)."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    names = metric_names(points)
    if not names:
        raise ValueError("the curve holds no metric values to draw (every metric is null)")
    phases = list(dict.fromkeys(p.phase for p in points))
    rc = {"svg.hashsalt": "metabench-curve", "svg.fonttype": "none", "font.family": "DejaVu Sans",
          "font.size": 9, "path.simplify": False, "axes.unicode_minus": False}
    with matplotlib.rc_context(rc):
        fig = Figure(figsize=(8.0, 1.2 + 2.4 * len(names)), dpi=100)
        FigureCanvasAgg(fig)
        axes = fig.subplots(len(names), 1, sharex=True, squeeze=False)[:, 0]
        for ax, name in zip(axes, names):
            for i, phase in enumerate(phases):
                xy = [(p.step, p.metrics.get(name)) for p in points if p.phase == phase]
                xs = [x for x, _ in xy]
                # a gap where the value was not finite, or too large for the axes (their arithmetic overflows
                # near the largest float)
                ys = [math.nan if y is None or abs(y) > _DRAWABLE else y for _, y in xy]
                if any(not math.isnan(y) for y in ys):
                    ax.plot(xs, ys, color=f"C{i}", linewidth=1.0, marker="o" if len(xs) < 30 else None,
                            markersize=3, label=phase)
            ax.set_ylabel(name)
            ax.grid(linewidth=0.5, alpha=0.5)
            ax.legend(loc="best", fontsize=8)
        axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
        axes[-1].set_xlabel("step (counted within each phase)")
        axes[0].set_title(title)
        fig.tight_layout()
        buf = io.BytesIO()
        metadata = {"Date": None, "Creator": "metabench"} if fmt == "svg" else {"Software": None}
        fig.savefig(buf, format=fmt, metadata=metadata)
    return buf.getvalue()
