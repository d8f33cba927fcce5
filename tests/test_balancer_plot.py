"""Pictures (PNG on request and for the viewer) and the Prometheus view of the same counts."""

from __future__ import annotations

import json

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from charles.balancer.balancer import Balancer, BalancerStats
from charles.balancer.metrics import BalancerMetrics
from charles.balancer.plot import histogram_png, histograms, main, plot_histograms
from charles.balancer.synthetic import samples_from_labels, synthetic_labels
from charles.sections.balancer import BalancerConfig

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == PNG_MAGIC
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


@pytest.fixture(scope="module")
def balancer() -> Balancer:
    b = Balancer(BalancerConfig(version=4, set_timeout_s=5.0))
    for k, s in enumerate(samples_from_labels(synthetic_labels(4000, seed=5))):
        b.add(s, k / 30.0)
    return b


def test_rows_carry_raw_emitted_and_cross_counts(balancer):
    st = balancer.stats(mark=False)
    rows, title = histograms(st)
    assert [r.name for r in rows] == ["steering", "throttle_brake"]
    steering = rows[0]
    assert steering.raw.sum() == 4000 and steering.emitted.sum() == st.groups["steering"].samples_emitted
    # steering's labels inside the throttle_brake sets: what v4's sub-balancing acts on
    assert steering.cross.sum() == st.groups["throttle_brake"].samples_emitted
    assert "v4" in title and "4,000" in title


def test_png_for_the_viewer_and_on_disk(balancer, tmp_path):
    data = histogram_png(balancer)
    w, h = png_size(data)
    assert w > 900 and h > 400, "three panels per output, two outputs"
    path = plot_histograms(balancer.stats(mark=False), tmp_path / "sub" / "balance.png")
    assert path.read_bytes()[:8] == PNG_MAGIC


def test_plain_counts_plot_too(tmp_path):
    counts = {"throttle": {"bins": ["0", "(0,0.5)", "1"], "raw": [90, 5, 5], "emitted": [4, 4, 4]}}
    w, h = png_size(plot_histograms(counts, tmp_path / "c.png").read_bytes())
    assert w < h * 3 and w > 300, "two panels, no cross column without cross counts"


def test_main_draws_a_synthetic_stream(tmp_path, capsys):
    out = tmp_path / "v2.png"
    argv = ["--version", "2", "--outputs", "steering,throttle,brake", "--synthetic", "3000"]
    argv += ["--out", str(out)]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["samples"] == 3000 and summary["version"] == 2 and out.read_bytes()[:8] == PNG_MAGIC


def test_main_draws_recorded_labels_and_refuses_bad_files(tmp_path, capsys):
    csv = tmp_path / "labels.csv"
    rows = synthetic_labels(500, seed=1)
    csv.write_text("steering,throttle_brake\n" + "\n".join(f"{s},{t}" for s, t in rows))
    assert main(["--labels", str(csv), "--out", str(tmp_path / "rec.png"), "--kind", "steering=delta"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["samples"] == 500
    npy = tmp_path / "labels.npy"
    np.save(npy, rows)
    assert main(["--labels", str(npy), "--out", str(tmp_path / "npy.png")]) == 0
    bad = tmp_path / "bad.csv"
    bad.write_text("steer,gas\n0,1\n")
    assert main(["--labels", str(bad), "--out", str(tmp_path / "x.png")]) == 2
    assert "steering and throttle_brake" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_stats_survive_json_and_draw_the_same_picture(balancer):
    # what /histogram.json serves and `balance-plot --from` reads back
    st = balancer.stats(mark=False)
    back = BalancerStats.from_dict(json.loads(json.dumps(st.to_dict())))
    assert back.label_errors == st.label_errors and back.sets == st.sets and back.emit_rate == st.emit_rate
    assert (
        back.groups["steering"].fill["steering"].tolist() == st.groups["steering"].fill["steering"].tolist()
    )
    assert histogram_png(back) == histogram_png(st)


def test_prometheus_view_matches_the_stats(balancer):
    registry = CollectorRegistry()
    metrics = BalancerMetrics(balancer, clock=lambda: 1e6)
    registry.register(metrics)
    st = metrics.refresh()
    families = {f.name: f for f in text_string_to_metric_families(generate_latest(registry).decode())}

    def value(family: str, **labels: str) -> float:
        for s in families[family].samples:
            if s.labels == labels and not s.name.endswith("_created"):
                return s.value
        raise KeyError((family, labels))

    assert value("charles_balancer_samples_arrived") == 4000
    assert value("charles_balancer_acceptance_ratio") == pytest.approx(1.0)
    assert (
        value("charles_balancer_sets", group="steering", outcome="flushed")
        == st.groups["steering"].sets["flushed"]
    )
    assert value("charles_balancer_held_samples", group="throttle_brake") == st.groups["throttle_brake"].held
    arrivals = sum(
        s.value for s in families["charles_balancer_bin_arrivals"].samples if s.labels["output"] == "steering"
    )
    assert arrivals == 4000
    fill = sum(
        s.value for s in families["charles_balancer_bin_fill"].samples if s.labels["group"] == "steering"
    )
    assert fill == st.groups["steering"].held
    assert (
        value("charles_balancer_bin_emitted", group="steering", output="steering", bin="0")
        == st.groups["steering"].emitted["steering"][10]
    )


def _pixels(png: bytes) -> np.ndarray:
    import cv2

    return cv2.cvtColor(cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def test_the_live_picture_blits_bars_over_axes_drawn_once_and_shows_what_figure_shows():
    from charles.balancer.plot import LivePicture

    b = Balancer(BalancerConfig(version=3, set_timeout_s=5.0))
    stream = samples_from_labels(synthetic_labels(8000, seed=7))
    live = LivePicture()
    seen = []
    for k, s in enumerate(stream, 1):
        b.add(s, k / 30.0)
        if k in (3000, 3250, 8000):
            st = b.stats(k / 30.0)
            seen.append((live.render(st), live.full_draws, _pixels(histogram_png(st))))
    (first, draws_1, whole_1), (second, draws_2, whole_2), (third, draws_3, _) = seen
    # the first picture draws the axes; with the same y axes it is figure()'s picture pixel for pixel
    assert draws_1 == 1 and first.shape == whole_1.shape and first.dtype == np.uint8
    assert np.array_equal(first, whole_1)
    # 250 samples later the bars moved under the same axes: blitted, not drawn whole, and still exact
    assert draws_2 == 1, "the axes did not need drawing again"
    assert not np.array_equal(second, first), "new counts, new bars and titles"
    assert np.array_equal(second, whole_2)
    # later the tallest raw bars shrank to 0.55 of a 0.65 axis: still over half of it, the axes stay
    assert draws_3 == 1 and third.shape == first.shape


def test_the_live_picture_draws_its_axes_again_when_a_bar_outgrows_them():
    from charles.balancer.plot import LivePicture

    live = LivePicture()
    even = {"throttle": {"bins": ["0", "(0,0.5)", "1"], "raw": [30, 30, 30], "emitted": [4, 4, 4]}}
    live.render(even)
    live.render({"throttle": {**even["throttle"], "raw": [31, 30, 29]}})
    assert live.full_draws == 1
    tall = {"throttle": {**even["throttle"], "raw": [90, 5, 5]}}
    assert np.array_equal(live.render(tall), _pixels(histogram_png(tall)))
    assert live.full_draws == 2, "a bar at 0.9 does not fit an axis that ends at 0.4"
    other = {"steering": {"bins": ["(-1,0)", "0", "(0,1)"], "raw": [1, 2, 1], "emitted": [1, 1, 1]}}
    assert np.array_equal(live.render(other), _pixels(histogram_png(other)))
    assert live.full_draws == 3, "other panels, other axes"
