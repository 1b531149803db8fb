"""The web page's SVG charts (spoold.face.page.charts): well-formed, escaped, free of script and
inline style, and saying the right numbers."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest

from spoold.face.page.charts import (
    CHART_CSS,
    DENSE_ROW,
    DENSE_TOTAL,
    hourly_chart,
    human_duration,
    runtime_chart,
    step_graph,
    timeline_chart,
)

NS = "{http://www.w3.org/2000/svg}"
NOW = datetime(2026, 12, 3, 14, 30, tzinfo=UTC).timestamp()  # 14:30 UTC
HOUR = 3600.0
HOSTILE = ['<script>alert("x")</script>', "a&b", "q'uote\"", 'x" onload="alert(1)', "ctl\x00\x1b"]


def at(hour: int, minute: int = 0, second: int = 0, day: int = 3) -> float:
    return datetime(2026, 12, day, hour, minute, second, tzinfo=UTC).timestamp()


def parse(svg: str, element_id: str) -> ET.Element:
    """The chart as XML, after checking what the page's CSP and |safe insertion need."""
    root = ET.fromstring(svg)
    assert root.tag == f"{NS}svg"
    assert root.get("id") == element_id
    assert root.get("role") == "img"
    assert root.get("aria-label")
    assert re.fullmatch(r"0 0 \d+(\.\d)? \d+(\.\d)?", root.get("viewBox", ""))
    assert root.find(f"{NS}title") is not None
    for element in root.iter():
        name = element.tag.removeprefix(NS)
        assert name not in {"script", "style", "foreignObject", "a", "image", "iframe"}, name
        for attribute in element.attrib:
            assert attribute != "style"
            assert not attribute.lower().startswith("on"), attribute
            assert "href" not in attribute
    # The same on the raw text, in case of a tag ElementTree would not see as such.
    assert "style=" not in svg
    assert "<script" not in svg.lower()
    for tag in re.findall(r"<[^/][^>]*>", svg):
        # Every tag is a name and double-quoted values with no quote inside: an escaped value
        # cannot be read as an attribute of its own.
        assert re.fullmatch(r'<[\w:-]+(\s+[\w:-]+="[^"<>]*")*\s*/?>', tag), tag
        names = re.findall(r'\s([\w:-]+)="[^"]*"', tag)
        assert not [n for n in names if n.lower().startswith("on") or n.lower() == "style"], tag
    return root


def titles(root: ET.Element) -> list[str]:
    return [element.text or "" for element in root.iter(f"{NS}title")]


def title_of(element: ET.Element) -> str:
    title = element.find(f"{NS}title")
    assert title is not None
    return title.text or ""


def texts(root: ET.Element) -> list[str]:
    return [element.text or "" for element in root.iter(f"{NS}text")]


def group(root: ET.Element, cls: str) -> ET.Element:
    found = [g for g in root.iter(f"{NS}g") if g.get("class") == cls]
    assert len(found) == 1, cls
    return found[0]


def num(element: ET.Element, attribute: str) -> float:
    return float(element.get(attribute, "nan"))


# -- all charts -----------------------------------------------------------------------------------

CHARTS: dict[str, Callable[[str], str]] = {
    "timeline": lambda hostile: timeline_chart({hostile: [NOW + 60], "ok": [NOW + 120]}, now=NOW),
    "timeline-dense": lambda hostile: timeline_chart(
        {hostile: [NOW + 30 * i for i in range(1, 2000)]}, now=NOW
    ),
    "chart-runtime": lambda hostile: runtime_chart({hostile: [1.0, 2.0], "ok": [3.0]}),
    "step-graph": lambda hostile: step_graph(
        {hostile: {"state": hostile}, "b": {"state": "running"}}, {"b": [hostile], hostile: []}
    ),
    # No user text goes into it, but an unknown outcome must not either.
    "chart-hourly": lambda hostile: hourly_chart([(NOW, hostile), (NOW, "failed")], now=NOW),
}


@pytest.mark.parametrize("hostile", HOSTILE)
@pytest.mark.parametrize("chart", sorted(CHARTS))
def test_hostile_text_is_escaped(chart: str, hostile: str) -> None:
    svg = CHARTS[chart](hostile)
    root = parse(svg, chart.removesuffix("-dense"))
    if chart == "chart-hourly":
        assert hostile not in svg
        assert root.get("aria-label", "").endswith("0 succeeded, 1 failed, 0 cancelled")
        return
    # It round-trips as text (control characters, which XML cannot hold, as U+FFFD).
    shown = hostile.replace("\x00", "\ufffd").replace("\x1b", "\ufffd")
    found = [e.get(a) for e in root.iter() for a in e.attrib if a.startswith("data-")]
    assert shown in found
    assert any(shown in title for title in titles(root))


def test_css_names_the_classes_the_charts_use() -> None:
    for cls in ("bar.succeeded", "bar.failed", "bar.cancelled", ".firing", ".dense", ".edge",
                "rect.pending", "rect.running", "rect.skipped", ".whisker", ".box", ".median",
                ".grid", ".axis", ".empty"):  # fmt: skip
        assert cls in CHART_CSS, cls
    assert "#2e9e44" in CHART_CSS.split("bar.succeeded")[1].split("}")[0]  # green
    assert "#d1363b" in CHART_CSS.split("bar.failed")[1].split("}")[0]  # red
    assert "url(" not in CHART_CSS and "@import" not in CHART_CSS


# -- 1. jobs finished per hour --------------------------------------------------------------------


def test_hourly_buckets_by_utc_hour_with_a_fixed_now() -> None:
    finished = [
        (at(14, 0, 0), "succeeded"),  # the start of the current hour: in it
        (at(14, 10), "succeeded"),
        (at(14, 29), "succeeded"),
        (at(14, 59, 59), "succeeded"),  # after now, in the current hour (another host's clock)
        (at(13, 0), "failed"),
        (at(13, 30), "failed"),
        (at(13, 59, 59), "cancelled"),
        (at(15, 0), "succeeded"),  # the next hour: not shown
        (at(15, 0, day=2), "failed"),  # the oldest bar's start: in it
        (at(14, 59, 59, day=2), "failed"),  # just before it: not
        (at(14, 0), "rejected"),  # not an outcome the chart counts
        (float("nan"), "succeeded"),
    ]
    root = parse(hourly_chart(finished, now=NOW), "chart-hourly")
    label = "Jobs finished per hour, last 24 h: 4 succeeded, 3 failed, 1 cancelled"
    assert root.get("aria-label") == label
    assert titles(root)[0] == label
    bars = list(group(root, "bars").iter(f"{NS}rect"))
    by_title = {title_of(b): b for b in bars}
    assert set(by_title) == {
        "14:00-15:00: 4 succeeded",
        "13:00-14:00: 2 failed",
        "13:00-14:00: 1 cancelled",
        "15:00-16:00: 1 failed",
    }
    assert by_title["14:00-15:00: 4 succeeded"].get("class") == "bar succeeded"
    # Heights in proportion; the 13:00 bar stacks cancelled on failed.
    four, two = by_title["14:00-15:00: 4 succeeded"], by_title["13:00-14:00: 2 failed"]
    assert num(four, "height") == pytest.approx(2 * num(two, "height"), abs=0.15)
    one = by_title["13:00-14:00: 1 cancelled"]
    assert num(one, "y") + num(one, "height") == pytest.approx(num(two, "y"), abs=0.1)
    # Oldest left, newest right.
    assert num(by_title["15:00-16:00: 1 failed"], "x") < num(two, "x") < num(four, "x")
    # Hour labels every 6 h, UTC; the highest count named.
    axis = texts(group(root, "x-axis"))
    assert axis == ["18:00", "00:00", "06:00", "12:00"]
    assert "max 4" in texts(root)
    legend = texts(group(root, "legend"))
    assert legend == ["succeeded 4", "failed 3", "cancelled 1"]


def test_hourly_other_window_and_gridlines() -> None:
    finished = [(NOW - i * 60, "succeeded") for i in range(37)]  # 31 in 14:xx, 6 in 13:xx
    root = parse(hourly_chart(finished, now=NOW, hours=6), "chart-hourly")
    assert (
        root.get("aria-label")
        == "Jobs finished per hour, last 6 h: 37 succeeded, 0 failed, 0 cancelled"
    )
    assert {t for t in titles(root) if ": " in t and "-" in t} >= {
        "14:00-15:00: 31 succeeded",
        "13:00-14:00: 6 succeeded",
    }
    assert len(list(group(root, "bars"))) == 2
    y_labels = texts(group(root, "y-axis"))
    assert y_labels[0] == "0" and 2 <= len(y_labels) <= 6
    assert int(y_labels[-1]) >= 30
    with pytest.raises(ValueError):
        hourly_chart([], now=NOW, hours=0)


def test_hourly_empty() -> None:
    root = parse(hourly_chart([], now=NOW), "chart-hourly")
    assert "no jobs finished in the last 24 h" in texts(root)
    assert not [g for g in root.iter(f"{NS}g") if g.get("class") == "bars"]
    assert "0 succeeded, 0 failed, 0 cancelled" in (root.get("aria-label") or "")
    # Old jobs only: as empty.
    root = parse(hourly_chart([(NOW - 2 * 86400, "failed")], now=NOW), "chart-hourly")
    assert "no jobs finished in the last 24 h" in texts(root)


# -- 2. run time per executor ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "said"),
    [
        (0, "0 ms"),
        (0.0004, "0.4 ms"),
        (0.85, "850 ms"),
        (0.9996, "1 s"),
        (12.34, "12.3 s"),
        (59.97, "1 min"),
        (240, "4 min"),
        (4320, "1.2 h"),
        (3 * 86400, "3 d"),
        (float("nan"), "?"),
    ],
)
def test_human_duration(seconds: float, said: str) -> None:
    assert human_duration(seconds) == said


def test_runtime_rows_sorted_with_quantiles_and_counts() -> None:
    durations = {
        "ssh": [10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0, 100.0, 110.0],
        "local": [1.5, 2.0, 12.34],
        "idle": [],
        "broken": [float("nan"), -1.0],
    }
    root = parse(runtime_chart(durations), "chart-runtime")
    assert root.get("aria-label") == "Run time per executor: 2 executors, 14 runs"
    rows = [g for g in root.iter(f"{NS}g") if g.get("class") == "executor"]
    assert [g.get("data-executor") for g in rows] == ["local", "ssh"]
    local_title = title_of(rows[0])
    assert local_title == "local: 3 runs; min 1.5 s · p50 2 s · p90 10.3 s · max 12.3 s"
    ssh_title = title_of(rows[1])
    assert ssh_title == "ssh: 11 runs; min 10 s · p50 1 min · p90 1.7 min · max 1.8 min"
    assert "11 runs" in texts(rows[1])
    assert group(root, "x-axis").get("data-scale") == "linear"
    # The box runs from p50 to p90, the whisker from min to max.
    box = rows[1].find(f"{NS}rect")
    assert box is not None and box.get("class") == "box"
    whisker = next(line for line in rows[1].iter(f"{NS}line") if line.get("class") == "whisker")
    assert (
        num(whisker, "x1") < num(box, "x") < num(box, "x") + num(box, "width") < num(whisker, "x2")
    )


def test_runtime_log_axis_when_spread_is_large() -> None:
    root = parse(runtime_chart({"a": [0.05, 1.0], "b": [30.0, 7200.0]}), "chart-runtime")
    axis = group(root, "x-axis")
    assert axis.get("data-scale") == "log"
    labels = texts(axis)
    assert labels[0] == "10 ms" and "log scale" in labels and "1 h" in labels
    # 100x exactly, and zero beside: still linear.
    root = parse(runtime_chart({"a": [0.0, 1.0, 100.0]}), "chart-runtime")
    assert group(root, "x-axis").get("data-scale") == "linear"


def test_runtime_empty() -> None:
    nothing: list[dict[str, list[float]]] = [{}, {"local": []}]
    for durations in nothing:
        root = parse(runtime_chart(durations), "chart-runtime")
        assert "no runs yet" in texts(root)


# -- 3. the next firings --------------------------------------------------------------------------


def test_timeline_rows_and_firings() -> None:
    firings = {
        "nightly": [at(2, 0, day=4)],
        "hourly": [at(h, 5) for h in range(15, 24)] + [at(h, 5, day=4) for h in range(15)],
        "past-and-far": [NOW - 60, NOW + 25 * HOUR],
    }
    root = parse(timeline_chart(firings, now=NOW), "timeline")
    assert root.get("aria-label") == "Schedule firings in the next 24 h: 3 schedules, 25 firings"
    rows = [g for g in root.iter(f"{NS}g") if g.get("class") == "schedule"]
    assert [g.get("data-schedule") for g in rows] == ["hourly", "nightly", "past-and-far"]
    circles = list(root.iter(f"{NS}circle"))
    assert len(circles) == 25
    assert all(c.get("class") == "firing" for c in circles)
    nightly = [c for c in circles if c.get("data-schedule") == "nightly"]
    assert [title_of(c) for c in nightly] == ["2026-12-04 02:00:00 UTC"]
    assert not [c for c in circles if c.get("data-schedule") == "past-and-far"]
    # Left to right in time; rows top to bottom.
    hourly = sorted(
        (c for c in circles if c.get("data-schedule") == "hourly"), key=lambda c: num(c, "cx")
    )
    assert title_of(hourly[0]) == "2026-12-03 15:05:00 UTC"
    assert num(hourly[0], "cy") < num(nightly[0], "cy")
    axis = texts(group(root, "x-axis"))
    assert axis[0] == "now" and "00:00" in axis and "18:00" in axis
    assert "15:00" not in axis  # 30 min after now: it would sit on "now"
    assert title_of(rows[2]) == "past-and-far: 0 firings in the next 24 h"


def test_timeline_dense_rows_are_bands() -> None:
    every_minute = [NOW + 60 * i for i in range(1, 1441)]
    # Every 30 s, but only from 09:00 to 11:00 and 13:00 to 14:00 (a gap between).
    windowed = [t for t in (NOW + 30 * i for i in range(2880)) if 9 <= (t % 86400) / HOUR < 11]
    windowed += [at(13, 0, day=4) + 30 * i for i in range(120)]
    firings = {f"busy{i}": every_minute for i in range(10)} | {
        "windowed": windowed,
        "few": [NOW + 60],
    }
    svg = timeline_chart(firings, now=NOW)
    root = parse(svg, "timeline")
    assert len(svg) < 12_000  # 10 rows of 1,440 firings would be ~2 MB as circles
    circles = list(root.iter(f"{NS}circle"))
    assert [c.get("data-schedule") for c in circles] == ["few"]
    bands = [r for r in root.iter(f"{NS}rect") if r.get("class") == "dense"]
    busy = [b for b in bands if b.get("data-schedule") == "busy0"]
    assert len(busy) == 1
    assert title_of(busy[0]) == (
        "busy0: 1440 firings, 2026-12-03 14:31:00 to 2026-12-04 14:30:00 UTC"
    )
    window = [b for b in bands if b.get("data-schedule") == "windowed"]
    assert len(window) == 2
    said = [title_of(b) for b in window]
    assert said[0].startswith("windowed: 240 firings, 2026-12-04 09:00:00 to 2026-12-04 10:59:30")
    assert said[1].startswith("windowed: 120 firings, 2026-12-04 13:00:00")
    assert len(windowed) > DENSE_ROW
    # Just at the limit: still circles.
    root = parse(timeline_chart({"x": every_minute[:DENSE_ROW]}, now=NOW), "timeline")
    assert len(list(root.iter(f"{NS}circle"))) == DENSE_ROW


def test_timeline_many_busy_rows_stay_light() -> None:
    # Twelve schedules every ten minutes (144 firings each), two hourly: the ten busiest rows
    # beyond DENSE_TOTAL circles become bands, by name when equally busy.
    ten_minutes = [NOW + 600 * i for i in range(1, 145)]
    firings = {f"s{i:02}": ten_minutes for i in range(12)}
    firings |= {"hourly1": ten_minutes[::6], "hourly2": ten_minutes[::6]}
    svg = timeline_chart(firings, now=NOW)
    root = parse(svg, "timeline")
    circles = list(root.iter(f"{NS}circle"))
    assert DENSE_TOTAL - 144 < len(circles) <= DENSE_TOTAL
    drawn = {c.get("data-schedule") for c in circles}
    assert {"hourly1", "hourly2"} <= drawn
    banded = {r.get("data-schedule") for r in root.iter(f"{NS}rect") if r.get("class") == "dense"}
    assert banded and not banded & drawn and len(banded | drawn) == 14
    assert len(svg) < 150_000


def test_timeline_empty() -> None:
    root = parse(timeline_chart({}, now=NOW), "timeline")
    assert "no schedules" in texts(root)
    root = parse(timeline_chart({"paused": []}, now=NOW), "timeline")
    assert not list(root.iter(f"{NS}circle"))
    assert "paused" in texts(root)


# -- 4. a job's steps -----------------------------------------------------------------------------


def boxes(root: ET.Element) -> dict[str, ET.Element]:
    return {g.get("data-step", ""): g for g in root.iter(f"{NS}g") if g.get("class") == "step"}


def box_rect(g: ET.Element) -> ET.Element:
    rect = g.find(f"{NS}rect")
    assert rect is not None
    return rect


def test_step_graph_diamond_layers() -> None:
    steps = {
        "a": {"state": "succeeded"},
        "b": {"state": "running"},
        "c": {"state": "failed"},
        "d": {},
    }
    needs = {"b": ["a"], "c": ["a"], "d": ["b", "c", "ghost"], "ghost": ["a"]}
    root = parse(step_graph(steps, needs), "step-graph")
    found = boxes(root)
    assert sorted(found) == ["a", "b", "c", "d"]
    x = {name: num(box_rect(g), "x") for name, g in found.items()}
    y = {name: num(box_rect(g), "y") for name, g in found.items()}
    assert x["a"] < x["b"] == x["c"] < x["d"]
    assert y["b"] != y["c"]
    assert y["a"] == pytest.approx(y["d"]) == pytest.approx((y["b"] + y["c"]) / 2)
    assert {n: g.get("data-state") for n, g in found.items()} == {
        "a": "succeeded",
        "b": "running",
        "c": "failed",
        "d": "pending",
    }
    assert box_rect(found["c"]).get("class") == "failed"
    assert texts(found["d"]) == ["d"]
    edges = [p for p in root.iter(f"{NS}path") if p.get("class") == "edge"]
    assert sorted((e.get("data-from"), e.get("data-to")) for e in edges) == [
        ("a", "b"),
        ("a", "c"),
        ("b", "d"),
        ("c", "d"),
    ]
    assert all(e.get("marker-end") == "url(#step-arrow)" for e in edges)
    assert root.find(f"{NS}defs/{NS}marker[@id='step-arrow']") is not None
    assert root.get("aria-label") == "Steps: 4 steps; 1 failed, 1 pending, 1 running, 1 succeeded"


def test_step_graph_longest_path_and_arrows_around_boxes() -> None:
    # d needs a directly and through b -> c: its column is 3 (the longest chain), and the arrow
    # a -> d runs through waypoints, not behind b and c.
    steps: dict[str, dict[str, str]] = {name: {} for name in "abcd"}
    needs = {"b": ["a"], "c": ["b"], "d": ["a", "c"]}
    root = parse(step_graph(steps, needs), "step-graph")
    x = {name: num(box_rect(g), "x") for name, g in boxes(root).items()}
    assert x["a"] < x["b"] < x["c"] < x["d"]
    long = next(
        p for p in root.iter(f"{NS}path") if (p.get("data-from"), p.get("data-to")) == ("a", "d")
    )
    assert (long.get("d") or "").count("C") == 3  # a -> waypoint -> waypoint -> d


def test_step_graph_unknown_state_and_needs_given_as_text() -> None:
    root = parse(
        step_graph({"a": {"state": "exploded"}, "b": {"state": "skipped"}}, {"b": "a"}),
        "step-graph",
    )
    found = boxes(root)
    assert box_rect(found["a"]).get("class") == "unknown"
    assert found["a"].get("data-state") == "exploded"
    assert box_rect(found["b"]).get("class") == "skipped"
    assert num(box_rect(found["a"]), "x") < num(box_rect(found["b"]), "x")


def test_step_graph_cycle_ends() -> None:
    steps: dict[str, dict[str, str]] = {name: {} for name in "abcde"}
    needs = {"a": ["c"], "b": ["a"], "c": ["b"], "d": ["c", "d"], "e": []}
    root = parse(step_graph(steps, needs), "step-graph")
    assert sorted(boxes(root)) == ["a", "b", "c", "d", "e"]
    # The self-need is dropped; the cycle's three arrows and c -> d are drawn.
    assert len([p for p in root.iter(f"{NS}path") if p.get("class") == "edge"]) == 4


def test_step_graph_empty() -> None:
    root = parse(step_graph({}, {}), "step-graph")
    assert "no steps" in texts(root)


def test_a_step_box_says_why_it_failed_and_a_timed_out_one_is_drawn_as_such() -> None:
    """Seen: the page showed only `a: failed` whether the failure failed the job, was one the
    job went on after, or was a cut-off step; `timed_out` was drawn as an unknown state."""
    steps: dict[str, dict[str, Any]] = {
        "a": {"state": "failed", "exit_code": 9, "continue_on_error": True},
        "b": {"state": "failed", "error": "killed by signal SIGKILL"},
        "c": {"state": "timed_out", "error": "timed out after 3s"},
        "d": {"state": "skipped", "error": "a step it needs failed (b)"},
    }
    found = boxes(parse(step_graph(steps, {"d": ["b"]}), "step-graph"))
    titles = {name: g.findtext(f"{NS}title") for name, g in found.items()}
    assert titles == {
        "a": "a: failed: exit code 9 (continue_on_error: the job went on)",
        "b": "b: failed: killed by signal SIGKILL",
        "c": "c: timed_out: timed out after 3s",
        "d": "d: skipped: a step it needs failed (b)",
    }
    assert box_rect(found["c"]).get("class") == "timed_out"
