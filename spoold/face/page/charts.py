"""The web page's charts (SPEC section 12), drawn on the server as SVG strings.

The page has no chart library and no script: a template inserts these strings with ``|safe``.
So every text in them that comes from outside (job, schedule and step ids, executor names) is
XML-escaped here, and they carry no script, no event handler and no ``style=`` (the page's
Content-Security-Policy forbids inline styles): the look comes from ``class=`` and the rules in
``CHART_CSS``, geometry and font sizes from presentation attributes. Every function is pure:
the time is passed in, nothing is read.

Each chart is an ``<svg role="img" aria-label=...>`` with a ``<title>`` that says in words what
it shows, and a ``<title>`` on every mark (a tooltip on hover).
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

__all__ = [
    "CHART_CSS",
    "DENSE_ROW",
    "DENSE_TOTAL",
    "OUTCOMES",
    "STEP_STATES",
    "hourly_chart",
    "human_duration",
    "runtime_chart",
    "step_graph",
    "timeline_chart",
]

#: The outcomes ``hourly_chart`` counts, stacked bottom-up in this order.
OUTCOMES = ("succeeded", "failed", "cancelled")
#: A step's states ``step_graph`` colours; any other is drawn with the class ``unknown``.
STEP_STATES = ("pending", "running", "succeeded", "failed", "skipped", "cancelled", "timed_out")
#: Above this many firings in the window a timeline row is drawn as bands, not one circle each
#: (a schedule firing every minute would otherwise put 1,440 circles with titles on the page).
DENSE_ROW = 200
#: And past this many circles in the whole timeline, its busiest rows are drawn as bands too
#: (twenty schedules firing every ten minutes would be 2,880 circles, about 340 kB).
DENSE_TOTAL = 1000

#: The rules the charts need, for page.css. Text and axes take the page's text colour
#: (currentColor), so a dark theme needs no rules of its own.
CHART_CSS = """\
/* Charts (spoold/face/page/charts.py): server-drawn SVG, coloured only here. */
svg.chart { display: block; max-width: 100%; height: auto; }
#chart-hourly, #chart-runtime, #timeline { max-width: 1080px; }
svg.chart text { fill: currentColor; }
svg.chart .muted { fill-opacity: .65; }
svg.chart .empty { fill-opacity: .6; font-style: italic; }
svg.chart .axis { stroke: currentColor; stroke-opacity: .45; }
svg.chart .grid { stroke: currentColor; stroke-opacity: .12; }
svg.chart .max { stroke: currentColor; stroke-opacity: .55; stroke-dasharray: 3 3; }
svg.chart .stripe { fill: currentColor; fill-opacity: .04; }
svg.chart .bar.succeeded { fill: #2e9e44; }
svg.chart .bar.failed { fill: #d1363b; }
svg.chart .bar.cancelled { fill: #8a8f98; }
svg.chart .whisker { stroke: #6b7380; stroke-width: 1.5; }
svg.chart .box { fill: #2f6fd6; fill-opacity: .3; stroke: #2f6fd6; }
svg.chart .median { stroke: #1d4fa8; stroke-width: 2.5; }
svg.chart .firing { fill: #2f6fd6; }
svg.chart .dense { fill: #2f6fd6; fill-opacity: .5; }
svg.chart .edge { fill: none; stroke: #8a8f98; stroke-width: 1.5; }
svg.chart .arrowhead { fill: #8a8f98; }
svg.chart .step rect { stroke-width: 1.5; fill-opacity: .18; }
svg.chart .step rect.pending { fill: #c9cdd3; stroke: #b4bac2; fill-opacity: .45; }
svg.chart .step rect.running { fill: #2f6fd6; stroke: #2f6fd6; }
svg.chart .step rect.succeeded { fill: #2e9e44; stroke: #2e9e44; }
svg.chart .step rect.failed { fill: #d1363b; stroke: #d1363b; }
svg.chart .step rect.cancelled { fill: #8a8f98; stroke: #8a8f98; }
svg.chart .step rect.timed_out { fill: #d1363b; stroke: #d1363b; stroke-dasharray: 4 3; }
svg.chart .step rect.skipped { fill: #8a8f98; stroke: #8a8f98; stroke-dasharray: 4 3; }
svg.chart .step rect.unknown { fill: #8a8f98; stroke: #8a8f98; stroke-dasharray: 1 3; }
"""

_BAND_GAP = 12  # px: firings closer than this on a banded timeline row make one band
_FONT = "system-ui, -apple-system, 'Segoe UI', sans-serif"
_CHAR_W = 6.2  # the width of a character at font-size 11, roughly: for placing legend items
_WIDE = 720  # the viewBox width of the charts that fill the container's width
# XML 1.0 cannot hold these characters even escaped; they would break the page's SVG.
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


# -- drawing helpers ------------------------------------------------------------------------------


def _esc(value: object) -> str:
    """Text or an attribute value, safe in XML and HTML (``&<>"'`` as references)."""
    return html.escape(_NOT_XML.sub("\ufffd", str(value)), quote=True)


def _num(value: float) -> str:
    """A coordinate: one decimal at most, none when whole (keeps the SVG small)."""
    text = f"{value:.1f}"
    if text.endswith(".0"):
        text = text[:-2]
    return "0" if text == "-0" else text


def _clip(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters with an ellipsis (before escaping: no cut entity)."""
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def _tag(
    name: str, attrs: Mapping[str, object], *, text: str | None = None, inner: str = ""
) -> str:
    """One element. Attribute names are this module's own; values and ``text`` are escaped;
    ``inner`` is markup made by ``_tag`` already."""
    rendered = "".join(
        f' {key}="{_num(value) if isinstance(value, float | int) else _esc(value)}"'
        for key, value in attrs.items()
        if value is not None
    )
    body = (_esc(text) if text is not None else "") + inner
    return f"<{name}{rendered}>{body}</{name}>" if body else f"<{name}{rendered}/>"


def _title(text: str) -> str:
    return _tag("title", {}, text=text)


def _svg(
    element_id: str, width: float, height: float, label: str, body: Sequence[str], *, fill: bool
) -> str:
    """The root element. ``fill``: the width is the container's (the viewBox scales to it);
    otherwise the drawing's own, shrunk when the container is narrower (CHART_CSS)."""
    attrs: dict[str, object] = {
        "xmlns": "http://www.w3.org/2000/svg",
        "id": element_id,
        "class": "chart",
        "viewBox": f"0 0 {_num(width)} {_num(height)}",
        "width": "100%" if fill else width,
        "height": None if fill else height,
        "role": "img",
        "aria-label": label,
        "font-family": _FONT,
        "font-size": 11,
    }
    return _tag("svg", attrs, inner=_title(label) + "".join(body))


def _empty_text(x: float, y: float, text: str) -> str:
    return _tag("text", {"class": "empty", "x": x, "y": y, "text-anchor": "middle"}, text=text)


def _line(x1: float, y1: float, x2: float, y2: float, cls: str, **extra: object) -> str:
    return _tag("line", {"class": cls, "x1": x1, "y1": y1, "x2": x2, "y2": y2, **extra})


def _utc(at: float, fmt: str) -> str:
    return datetime.fromtimestamp(at, UTC).strftime(fmt)


def _hour_step(hours: float, max_labels: int) -> int:
    """Hours between two axis labels: the smallest of 1, 2, 3, 6, 12, 24, 48, ... that puts at
    most ``max_labels`` labels on ``hours`` hours (so they always fall on the same clock times)."""
    for step in (1, 2, 3, 6, 12):
        if hours / step <= max_labels:
            return step
    return 24 * max(1, math.ceil(hours / 24 / max_labels))


def _hour_label(at: float, step: int) -> str:
    return _utc(at, "%H:00") if step < 24 else _utc(at, "%b %d")


def _count_step(top: int, max_lines: int = 4) -> int:
    """A gridline step for counts up to ``top``: 1, 2 or 5 times a power of ten."""
    raw = max(top / max_lines, 1)
    power: int = 10 ** math.floor(math.log10(raw))
    return next(m * power for m in (1, 2, 5, 10) if m * power >= raw)


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


# -- durations ------------------------------------------------------------------------------------

# (unit, its seconds, how many of it before the next unit)
_UNITS = (("ms", 0.001, 1000.0), ("s", 1.0, 60.0), ("min", 60.0, 60.0), ("h", 3600.0, 24.0))


def human_duration(seconds: float) -> str:
    """A run time as people read it: ``850 ms``, ``12.3 s``, ``4 min``, ``1.2 h``, ``3 d``.

    One decimal at most (whole milliseconds from 10 ms); a value that rounds up to the next unit
    is said in that unit (59.97 s is ``1 min``, not ``60 s``).
    """
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    for unit, size, limit in _UNITS:
        value = seconds / size
        text = f"{value:.0f}" if unit == "ms" and value >= 10 else _num(value)
        if float(text) < limit:
            return f"{text} {unit}"
    return f"{_num(seconds / 86400)} d"


# Steps for a linear time axis, in seconds: they land on round clock values.
_TIME_STEPS = (
    *(m * 10.0**e for e in (-3, -2, -1) for m in (1, 2, 5)),
    *(1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200),
)


def _time_step(top: float, max_ticks: int = 5) -> float:
    for step in _TIME_STEPS:
        if top / step <= max_ticks:
            return float(step)
    days = top / 86400 / max_ticks
    power = 10 ** math.floor(math.log10(days)) if days >= 1 else 1
    return 86400.0 * next(m * power for m in (1, 2, 5, 10) if m * power >= days)


# Ticks for a logarithmic time axis, in seconds.
_LOG_TICKS = (
    *(10.0**e for e in range(-6, 1)),
    *(10.0, 60.0, 600.0, 3600.0, 36000.0, 86400.0, 864000.0, 8640000.0, 86400000.0),
)


def _quantile(ordered: Sequence[float], q: float) -> float:
    """The ``q`` quantile of sorted values, interpolated between the two nearest ranks."""
    position = (len(ordered) - 1) * q
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


# -- 1. jobs finished per hour --------------------------------------------------------------------


def hourly_chart(finished: Iterable[tuple[float, str]], *, now: float, hours: int = 24) -> str:
    """Jobs finished per hour, stacked by outcome: ``<svg id="chart-hourly">``.

    ``finished``: (finished_at as a Unix timestamp, outcome) pairs; outcomes other than
    ``OUTCOMES`` are not counted. The bars are whole UTC hours, oldest left, the last one the
    hour ``now`` is in (so far): ``hours`` bars. A job outside them (older, or later than that
    hour: another host's clock) is not counted. Each bar segment (``rect class="bar OUTCOME"``)
    has a title like ``14:00-15:00: 12 succeeded``; the chart's title gives the totals.
    """
    if hours < 1:
        raise ValueError(f"hours must be at least 1, not {hours}")
    first = (math.floor(now / 3600) - (hours - 1)) * 3600  # the oldest bar's start
    counts = [dict.fromkeys(OUTCOMES, 0) for _ in range(hours)]
    for at, outcome in finished:
        if outcome in OUTCOMES and math.isfinite(at):
            index = math.floor((at - first) / 3600)
            if 0 <= index < hours:
                counts[index][outcome] += 1
    totals = {outcome: sum(c[outcome] for c in counts) for outcome in OUTCOMES}
    label = f"Jobs finished per hour, last {hours} h: " + ", ".join(
        f"{totals[outcome]} {outcome}" for outcome in OUTCOMES
    )

    left, right, top, bottom = 36.0, 52.0, 30.0, 22.0
    height = 220.0
    plot_w, plot_h = _WIDE - left - right, height - top - bottom
    base = top + plot_h
    slot = plot_w / hours
    peak = max(sum(c.values()) for c in counts)
    step = _count_step(peak)
    ceiling = step * max(1, math.ceil(peak / step))
    body: list[str] = []

    # Legend, top left: a swatch and "succeeded 123" per outcome.
    legend: list[str] = []
    x = left
    for outcome in OUTCOMES:
        text = f"{outcome} {totals[outcome]}"
        legend.append(
            _tag("rect", {"class": f"bar {outcome}", "x": x, "y": 8, "width": 10, "height": 10})
        )
        legend.append(_tag("text", {"x": x + 14, "y": 17}, text=text))
        x += 14 + len(text) * _CHAR_W + 18
    body.append(_tag("g", {"class": "legend"}, inner="".join(legend)))

    # Y axis: gridlines with their counts on the left.
    grid = [_tag("text", {"x": left - 6, "y": base + 4, "text-anchor": "end"}, text="0")]
    for value in range(step, ceiling + 1 if peak else 0, step):  # none on an empty chart
        y = base - value / ceiling * plot_h
        grid.append(_line(left, y, left + plot_w, y, "grid"))
        grid.append(
            _tag("text", {"x": left - 6, "y": y + 4, "text-anchor": "end"}, text=str(value))
        )
    body.append(_tag("g", {"class": "y-axis"}, inner="".join(grid)))

    # X axis: the baseline, a tick and a UTC label on the hours that are multiples of the step.
    label_step = _hour_step(hours, 4)
    axis = [_line(left, base, left + plot_w, base, "axis")]
    for index in range(hours + 1):
        start = first + index * 3600
        if (start // 3600) % label_step == 0:
            x = left + index * slot
            axis.append(_line(x, base, x, base + 4, "axis"))
            axis.append(
                _tag(
                    "text",
                    {"x": x, "y": base + 16, "text-anchor": "middle"},
                    text=_hour_label(start, label_step),
                )
            )
    body.append(_tag("g", {"class": "x-axis"}, inner="".join(axis)))

    if peak == 0:
        body.append(
            _empty_text(
                left + plot_w / 2, top + plot_h / 2, f"no jobs finished in the last {hours} h"
            )
        )
        return _svg("chart-hourly", _WIDE, height, label, body, fill=True)

    # The bars: one slot per hour, segments stacked in OUTCOMES order from the baseline.
    bars: list[str] = []
    width = max(slot * 0.8, 1.0)
    hour_fmt = "%H:00" if hours <= 24 else "%Y-%m-%d %H:00"
    for index, hour in enumerate(counts):
        start = first + index * 3600
        span = f"{_utc(start, hour_fmt)}-{_utc(start + 3600, '%H:00')}"
        x = left + index * slot + (slot - width) / 2
        bottom_y = base
        for outcome in OUTCOMES:
            if not hour[outcome]:
                continue
            h = hour[outcome] / ceiling * plot_h
            attrs = {"class": f"bar {outcome}", "x": x, "y": bottom_y - h, "width": width}
            bars.append(
                _tag(
                    "rect",
                    {**attrs, "height": h},
                    inner=_title(f"{span}: {hour[outcome]} {outcome}"),
                )
            )
            bottom_y -= h
    body.append(_tag("g", {"class": "bars"}, inner="".join(bars)))

    # The highest count, dashed across, named in the right margin.
    y = base - peak / ceiling * plot_h
    body.append(
        _tag(
            "g",
            {"class": "peak"},
            inner=_line(left, y, left + plot_w, y, "max")
            + _tag("text", {"x": left + plot_w + 4, "y": y + 4}, text=f"max {peak}")
            + _title(f"at most {_plural(peak, 'job')} in one hour"),
        )
    )
    return _svg("chart-hourly", _WIDE, height, label, body, fill=True)


# -- 2. run time per executor ---------------------------------------------------------------------


def runtime_chart(durations: Mapping[str, Sequence[float]]) -> str:
    """Run time per executor, one row each (sorted by name): ``<svg id="chart-runtime">``.

    ``durations``: seconds per run by executor; values that are not finite or are negative are
    left out, and an executor with none is not drawn. A row is a whisker from the shortest to
    the longest run with a box from p50 to p90 and a mark at p50, the number of runs under the
    name and ``min · p50 · p90 · max`` under the whisker. The axis is logarithmic (decades) when
    the longest run is more than 100 times the shortest (above zero), linear otherwise.
    """
    rows: list[tuple[str, list[float]]] = []
    for name in sorted(durations):
        values = sorted(float(v) for v in durations[name] if math.isfinite(v) and v >= 0)
        if values:
            rows.append((name, values))
    left, right, top, row_h = 140.0, 28.0, 8.0, 46.0
    plot_w = _WIDE - left - right
    if not rows:
        label = "Run time per executor: no runs yet"
        empty = [_empty_text(_WIDE / 2, 34, "no runs yet")]
        return _svg("chart-runtime", _WIDE, 56, label, empty, fill=True)

    runs = sum(len(values) for _, values in rows)
    label = f"Run time per executor: {_plural(len(rows), 'executor')}, {_plural(runs, 'run')}"
    highest = max(values[-1] for _, values in rows)
    lowest = min((v for _, values in rows for v in values if v > 0), default=0.0)
    place, ticks, scale = _runtime_scale(lowest, highest, left, plot_w)
    base = top + len(rows) * row_h
    height = base + 34
    body: list[str] = []

    axis = [_line(left, base, left + plot_w, base, "axis")]
    for value in ticks:
        x = place(value)
        axis.append(_line(x, top, x, base, "grid"))
        axis.append(_line(x, base, x, base + 4, "axis"))
        axis.append(
            _tag(
                "text",
                {"x": x, "y": base + 16, "text-anchor": "middle"},
                text=human_duration(value) if value else "0",
            )
        )
    if scale == "log":
        axis.append(
            _tag(
                "text",
                {"class": "muted", "x": left + plot_w, "y": base + 29, "text-anchor": "end"},
                text="log scale",
            )
        )
    body.append(_tag("g", {"class": "x-axis", "data-scale": scale}, inner="".join(axis)))

    for index, (name, values) in enumerate(rows):
        y0 = top + index * row_h
        mid = y0 + 12
        low, p50, p90, high = values[0], _quantile(values, 0.5), _quantile(values, 0.9), values[-1]
        said = " \u00b7 ".join(
            f"{what} {human_duration(v)}"
            for what, v in (("min", low), ("p50", p50), ("p90", p90), ("max", high))
        )
        x_low, x_high, x50, x90 = place(low), place(high), place(p50), place(p90)
        parts = [
            _title(f"{name}: {_plural(len(values), 'run')}; {said}"),
            _tag("text", {"x": left - 10, "y": mid + 4, "text-anchor": "end", "font-size": 12},
                 text=_clip(name, 20)),
            _tag("text", {"class": "muted", "x": left - 10, "y": mid + 18, "text-anchor": "end",
                          "font-size": 10}, text=_plural(len(values), "run")),
            _line(x_low, mid, x_high, mid, "whisker"),
            _line(x_low, mid - 5, x_low, mid + 5, "whisker"),
            _line(x_high, mid - 5, x_high, mid + 5, "whisker"),
            _tag("rect", {"class": "box", "x": x50, "y": mid - 7, "width": max(x90 - x50, 2.0),
                          "height": 14}),
            _line(x50, mid - 7, x50, mid + 7, "median"),
            _tag("text", {"class": "muted", "x": left, "y": mid + 22, "font-size": 10},
                 text=said),
        ]  # fmt: skip
        body.append(_tag("g", {"class": "executor", "data-executor": name}, inner="".join(parts)))
    return _svg("chart-runtime", _WIDE, height, label, body, fill=True)


def _runtime_scale(
    lowest: float, highest: float, left: float, width: float
) -> tuple[Callable[[float], float], list[float], str]:
    """Where a duration goes on the axis, the ticks, and ``log`` or ``linear``."""
    if lowest > 0 and highest / lowest > 100:
        # Ticks on round clock values (1 s, 10 s, 1 min, 10 min, 1 h): unevenly spaced on the
        # log axis, but each label reads as what it is, not "16.7 min".
        start = max(
            [t for t in _LOG_TICKS if t <= lowest], default=10.0 ** math.floor(math.log10(lowest))
        )
        end = min(
            [t for t in _LOG_TICKS if t >= highest], default=10.0 ** math.ceil(math.log10(highest))
        )
        low, span = math.log10(start), math.log10(end) - math.log10(start)

        def place_log(value: float) -> float:
            # Zero has no place on a log axis: it goes where the axis starts.
            return left + max(math.log10(max(value, start)) - low, 0.0) / span * width

        return place_log, [t for t in _LOG_TICKS if start <= t <= end], "log"
    step = _time_step(highest) if highest > 0 else 1.0
    end = step * max(1, math.ceil(highest / step - 1e-9))

    def place_linear(value: float) -> float:
        return left + value / end * width

    count = round(end / step)
    return place_linear, [i * step for i in range(count + 1)], "linear"


# -- 3. the next firings of the schedules ---------------------------------------------------------


def timeline_chart(firings: Mapping[str, Sequence[float]], *, now: float, hours: int = 24) -> str:
    """The schedules' firings from ``now`` to ``hours`` later: ``<svg id="timeline">``.

    One row per schedule id (sorted; one with no firing in the window too, empty). A firing is
    ``<circle class="firing" data-schedule="ID">`` titled with its UTC time; firings outside the
    window are left out. A row with more than ``DENSE_ROW`` firings (every few minutes), and the
    busiest rows while there are more than ``DENSE_TOTAL`` circles in all, are drawn as bands
    instead, ``<rect class="dense" data-schedule="ID">``: firings less than ``_BAND_GAP`` px
    apart (half an hour in 24 h) make one band, titled with how many and from when to when. So
    every firing is shown, a row costs at most ~45 bands (a schedule firing every second costs a
    few hundred bytes, not megabytes), and a window such as 09:00-17:00 stays a band of its own.
    """
    if hours < 1:
        raise ValueError(f"hours must be at least 1, not {hours}")
    end = now + hours * 3600
    names = sorted(firings)
    left, right, top, row_h = 160.0, 16.0, 6.0, 20.0
    plot_w = _WIDE - left - right
    if not names:
        label = "Schedule firings: no schedules"
        return _svg("timeline", _WIDE, 56, label, [_empty_text(_WIDE / 2, 34, "no schedules")],
                    fill=True)  # fmt: skip

    rows = [
        (name, sorted(t for t in firings[name] if math.isfinite(t) and now <= t <= end))
        for name in names
    ]
    total = sum(len(times) for _, times in rows)
    label = (
        f"Schedule firings in the next {hours} h: {_plural(len(rows), 'schedule')}, "
        f"{_plural(total, 'firing')}"
    )
    base = top + len(rows) * row_h
    height = base + 22
    per_px = (end - now) / plot_w

    def place(at: float) -> float:
        return left + (at - now) / per_px

    body: list[str] = []
    stripes = [
        _tag("rect", {"class": "stripe", "x": 0, "y": top + i * row_h, "width": _WIDE,
                      "height": row_h})
        for i in range(0, len(rows), 2)
    ]  # fmt: skip
    body.append(_tag("g", {"class": "stripes"}, inner="".join(stripes)))

    # Gridlines on the hours, labels on every few; "now" where the window starts.
    label_step = _hour_step(hours, 8)
    tick_step = 1 if hours <= 48 else label_step
    now_text = _tag("text", {"x": left, "y": base + 15, "text-anchor": "middle"}, text="now")
    axis = [_line(left, base, left + plot_w, base, "axis"), now_text]
    hour = math.ceil(now / 3600)
    while hour * 3600 <= end:
        x = place(hour * 3600)
        if hour % tick_step == 0:
            axis.append(_line(x, top, x, base, "grid"))
        if hour % label_step == 0 and x - left > 30:  # not over "now"
            axis.append(
                _tag(
                    "text",
                    {"x": x, "y": base + 15, "text-anchor": "middle"},
                    text=_hour_label(hour * 3600, label_step),
                )
            )
        hour += 1
    body.append(_tag("g", {"class": "x-axis"}, inner="".join(axis)))

    banded = {name for name, times in rows if len(times) > DENSE_ROW}
    circles = sum(len(times) for name, times in rows if name not in banded)
    for name, times in sorted(rows, key=lambda row: -len(row[1])):
        if circles <= DENSE_TOTAL:
            break
        if name not in banded:
            banded.add(name)
            circles -= len(times)
    for index, (name, times) in enumerate(rows):
        mid = top + index * row_h + row_h / 2
        parts = [
            _title(f"{name}: {_plural(len(times), 'firing')} in the next {hours} h"),
            _tag("text", {"x": left - 10, "y": mid + 4, "text-anchor": "end"},
                 text=_clip(name, 24)),
        ]  # fmt: skip
        if name in banded:
            parts.extend(_bands(name, times, place, mid, gap=_BAND_GAP * per_px))
        else:
            radius = min(4.0, max(1.5, plot_w / max(len(times), 1) / 2.5))
            parts.extend(
                _tag(
                    "circle",
                    {"class": "firing", "data-schedule": name, "cx": place(at), "cy": mid,
                     "r": radius},
                    inner=_title(_utc(at, "%Y-%m-%d %H:%M:%S UTC")),
                )
                for at in times
            )  # fmt: skip
        body.append(_tag("g", {"class": "schedule", "data-schedule": name}, inner="".join(parts)))
    return _svg("timeline", _WIDE, height, label, body, fill=True)


def _bands(
    name: str, times: Sequence[float], place: Callable[[float], float], mid: float, gap: float
) -> list[str]:
    """A dense row's firings as bands: firings closer than ``gap`` seconds join one."""
    groups: list[list[float]] = []  # [first, last, count]
    for at in times:
        if groups and at - groups[-1][1] < gap:
            groups[-1][1] = at
            groups[-1][2] += 1
        else:
            groups.append([at, at, 1])
    bands = []
    for first, last, count in groups:
        x = place(first) - 1
        said = f"{_plural(int(count), 'firing')}, {_utc(first, '%Y-%m-%d %H:%M:%S')}"
        if count > 1:
            said += f" to {_utc(last, '%Y-%m-%d %H:%M:%S')}"
        attrs = {"class": "dense", "data-schedule": name, "x": x, "y": mid - 5,
                 "width": max(place(last) + 1 - x, 2.0), "height": 10, "rx": 2}  # fmt: skip
        bands.append(_tag("rect", attrs, inner=_title(f"{name}: {said} UTC")))
    return bands


# -- 4. a job's steps -----------------------------------------------------------------------------


# A place in a column of the step graph: a step, or a waypoint of the arrow from a need to a
# step (need, step, column).
_Slot = str | tuple[str, str, int]


def step_graph(steps: Mapping[str, Mapping[str, Any]], needs: Mapping[str, Sequence[str]]) -> str:
    """A job's steps as a graph, ``<svg id="step-graph">``, drawn at its own size.

    ``steps``: per step id, its status entry (``state`` is read; missing means pending).
    ``needs``: per step id, the ids it needs; ids that are not steps are ignored. A step's
    column is the length of the longest chain of needs before it; within a column, steps sit
    near the steps they need. A step is ``<g class="step" data-step="ID" data-state="STATE">``
    with a ``rect`` of class STATE and the id; an arrow (``path class="edge"``) runs from each
    need to the step. Cycles are rejected at validation; given one anyway, its steps are
    placed in name order after what they need that is placed, and the drawing ends.
    """
    names = sorted(steps)
    if not names:
        return _svg("step-graph", 240, 48, "Steps: none", [_empty_text(120, 28, "no steps")],
                    fill=False)  # fmt: skip
    deps = {name: _known_needs(name, needs.get(name, ()), steps) for name in names}
    layer = _layers(names, deps)

    box_w, box_h, way_h, gap_x, gap_y, pad = 150.0, 30.0, 8.0, 56.0, 14.0, 12.0
    # An arrow that skips columns runs through a waypoint (a thin slot of its own) in each
    # column it crosses: between the boxes there, never behind one.
    columns: dict[int, list[_Slot]] = {}
    before: dict[_Slot, list[_Slot]] = {name: [] for name in names}  # where arrows come from
    routes: list[tuple[str, str, list[_Slot]]] = []  # need, step, the slots from one to other
    for name in names:
        columns.setdefault(layer[name], []).append(name)
    for name in names:
        for need in deps[name]:
            route: list[_Slot] = [need]
            for number in range(layer[need] + 1, layer[name]):  # none on a cycle's arrow
                way = (need, name, number)
                columns[number].append(way)
                before[way] = [route[-1]]
                route.append(way)
            before[name].append(route[-1])
            routes.append((need, name, [*route, name]))

    def tall(slot: _Slot) -> float:
        return box_h if isinstance(slot, str) else way_h

    def stacked(column: Sequence[_Slot]) -> float:
        return sum(tall(slot) for slot in column) + (len(column) - 1) * gap_y

    inner_h = max(stacked(column) for column in columns.values())
    last = max(columns)
    width = 2 * pad + (last + 1) * box_w + last * gap_x
    height = 2 * pad + inner_h

    # Column by column: each slot near the slots its arrows come from (fewer crossings), then
    # by id; a column is centred on the tallest.
    where: dict[_Slot, tuple[float, float]] = {}  # a slot's left end, at its middle
    for number in sorted(columns):
        column = columns[number]

        def key(slot: _Slot) -> tuple[float, str]:
            ys = [where[s][1] for s in before[slot] if s in where]
            return (sum(ys) / len(ys) if ys else 0.0, slot if isinstance(slot, str) else slot[0])

        column.sort(key=key)
        y = pad + (inner_h - stacked(column)) / 2
        for slot in column:
            where[slot] = (pad + number * (box_w + gap_x), y + tall(slot) / 2)
            y += tall(slot) + gap_y

    marker = (
        '<defs><marker id="step-arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7"'
        ' markerHeight="7" orient="auto"><path class="arrowhead" d="M0,0L10,5L0,10z"/>'
        "</marker></defs>"
    )
    edges: list[str] = []
    for need, name, route in routes:
        x1, y1 = where[need][0] + box_w, where[need][1]
        d = f"M{_num(x1)},{_num(y1)}"
        for slot in route[1:]:
            x2, y2 = where[slot]
            if slot == name:
                x2 -= 1  # the arrowhead's tip on the box's edge
            bend = max(abs(x2 - x1) / 2, 20.0)
            d += (
                f" C{_num(x1 + bend)},{_num(y1)} {_num(x2 - bend)},{_num(y2)} {_num(x2)},{_num(y2)}"
            )
            x1, y1 = x2 + box_w, y2
            if slot != name:
                d += f" L{_num(x1)},{_num(y1)}"
        edges.append(
            _tag(
                "path",
                {"class": "edge", "data-from": need, "data-to": name, "d": d, "fill": "none",
                 "marker-end": "url(#step-arrow)"},
            )
        )  # fmt: skip
    boxes: list[str] = []
    for name in names:
        x, y = where[name][0], where[name][1] - box_h / 2
        state = _state(steps[name])
        parts = [
            _title(f"{name}: {state}{_why(steps[name])}"),
            _tag("rect", {"class": state if state in STEP_STATES else "unknown", "x": x, "y": y,
                          "width": box_w, "height": box_h, "rx": 5}),
            _tag("text", {"x": x + box_w / 2, "y": y + box_h / 2 + 4, "text-anchor": "middle",
                          "font-size": 12}, text=_clip(name, 20)),
        ]  # fmt: skip
        boxes.append(
            _tag(
                "g", {"class": "step", "data-step": name, "data-state": state}, inner="".join(parts)
            )
        )
    counts: dict[str, int] = {}
    for name in names:
        state = _state(steps[name])
        counts[state] = counts.get(state, 0) + 1
    label = f"Steps: {_plural(len(names), 'step')}; " + ", ".join(
        f"{count} {state}" for state, count in sorted(counts.items())
    )
    body = [marker, _tag("g", {"class": "edges"}, inner="".join(edges)), *boxes]
    return _svg("step-graph", width, height, label, body, fill=False)


def _why(entry: object) -> str:
    """What a step's box says beside its state, as ``spoold status`` does: its error or exit
    code, and a failure the job went on after (``continue_on_error``)."""
    if not isinstance(entry, Mapping):
        return ""
    error, code = entry.get("error"), entry.get("exit_code")
    said = f": {error}" if error else (f": exit code {code}" if code not in (None, 0) else "")
    if entry.get("state") == "failed" and entry.get("continue_on_error") is True:
        said += " (continue_on_error: the job went on)"
    return said


def _state(entry: object) -> str:
    """A step's state from its status entry; pending until it has one."""
    state = entry.get("state") if isinstance(entry, Mapping) else None
    return str(state) if state else "pending"


def _known_needs(name: str, given: Sequence[str] | str, steps: Mapping[str, Any]) -> list[str]:
    """The needs of ``name`` that are other steps, once each, sorted."""
    if isinstance(given, str):  # `needs: build` written as one id, not a list
        given = [given]
    return sorted({need for need in given if need in steps and need != name})


def _layers(names: Sequence[str], deps: Mapping[str, Sequence[str]]) -> dict[str, int]:
    """Each step's column: 0 without needs, else one more than its furthest need's."""
    dependents: dict[str, list[str]] = {name: [] for name in names}
    waiting = {name: len(deps[name]) for name in names}
    for name in names:
        for need in deps[name]:
            dependents[need].append(name)
    layer: dict[str, int] = {}
    ready = [name for name in names if not waiting[name]]
    while ready:  # Kahn: a step is placed once all its needs are
        name = ready.pop()
        layer[name] = 1 + max((layer[need] for need in deps[name]), default=-1)
        for dependent in dependents[name]:
            waiting[dependent] -= 1
            if not waiting[dependent]:
                ready.append(dependent)
    for name in names:  # left over only on a cycle: one pass, so it ends
        if name not in layer:
            layer[name] = 1 + max((layer[n] for n in deps[name] if n in layer), default=-1)
    return layer
