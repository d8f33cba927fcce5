"""The trainer's plain parts around training: rates, counters from totals, TensorBoard scalars, where a run
resumes, and which run every rank trains."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import prometheus_client as prom
import pytest
import torch

from charles.flow import DEMAND_MAX, DEMAND_MIN, STALE_S, Demand, Pace
from charles.model.net import torch_threads
from charles.sections.trainer import TrainerConfig
from charles.trainer.checkpoint import CheckpointError
from charles.trainer.reporting import Deltas, Rates, Report, TensorBoardLog, TrainerMetrics
from charles.trainer.resume import check_resumable, resume
from charles.trainer.runs import RunDir, RunError, open_for_training, open_run
from charles.trainer.training import Trainer

LOG = logging.getLogger("test")


# ---- rates and counters -----------------------------------------------------------------------------------


def test_rates_are_the_change_over_the_window():
    r = Rates(window=3)
    r.look(10.0, batch=0, samples=0, wait_s=0.0)
    assert (r.batches_per_s, r.samples_per_s, r.data_wait) == (0.0, 0.0, 0.0)  # one look: no span yet
    r.look(12.0, batch=4, samples=64, wait_s=0.5)
    assert (r.batches_per_s, r.samples_per_s, r.data_wait) == (2.0, 32.0, 0.25)
    r.look(14.0, batch=4, samples=64, wait_s=2.5)
    r.look(16.0, batch=4, samples=64, wait_s=4.5)  # the window drops the first look: a stall shows
    assert r.batches_per_s == 0.0 and r.samples_per_s == 0.0 and r.data_wait == 1.0


def test_waiting_before_the_first_batch_is_not_counted_as_data_wait():
    r = Rates()
    r.look(0.0, 0, 0, 0.0, trained=False)
    r.look(5.0, 0, 0, 5.0, trained=False)
    assert r.data_wait == 0.0


def test_deltas_turn_totals_into_increments():
    d = Deltas()
    assert d.step("evicted", 5) == 5
    assert d.step("evicted", 5) == 0
    assert d.step("evicted", 8) == 3
    assert d.step("evicted", 2) == 0, "a total that went back (a restart of its owner) adds nothing"
    assert d.step("storage_queue", 1) == 1
    assert d.seen == {"evicted": 2, "storage_queue": 1}


def test_the_report_keeps_metrics_losses_and_derived_counters_current():
    registry = prom.CollectorRegistry()
    drops = prom.Counter("charles_drops_total", "drops", ["cause"], registry=registry)
    report = Report(TrainerMetrics(registry), drops, loss_history=8, world=2)

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    res = SimpleNamespace(loss=0.5, losses={"steering": 0.2, "throttle_brake": 0.3}, samples=4)
    report.trained(7, res)
    assert value("charles_trainer_samples_trained_total") == 8, "every rank trained as many"
    assert (value("charles_trainer_batch"), value("charles_trainer_loss", output="steering")) == (7, 0.2)
    assert value("charles_trainer_loss", output="total") == 0.5

    def stats(reused: int, evicted: int, inserted: int = 0, drawn: int = 0) -> dict:
        return {
            "steering": {
                "fill": 0.5,
                "reused": reused,
                "evicted": evicted,
                "inserted": inserted,
                "drawn": drawn,
            }
        }

    report.look(0.0, 7, 8, 0.0, trained=True, buffers=stats(3, 1, 40, 8), storage_dropped=2)
    report.look(2.0, 9, 16, 1.0, trained=True, buffers=stats(5, 1, 64, 16), storage_dropped=None)
    assert value("charles_trainer_samples_reused_total", output="steering") == 5
    assert value("charles_trainer_samples_inserted_total", output="steering") == 64
    assert value("charles_trainer_samples_drawn_total", output="steering") == 16
    assert value("charles_drops_total", cause="buffer_evicted") == 1
    assert value("charles_drops_total", cause="storage_queue") == 2
    assert value("charles_trainer_buffer_fill_ratio", output="steering") == 0.5
    assert (
        value("charles_trainer_batches_per_second") == 1.0
        and value("charles_trainer_data_wait_fraction") == 0.5
    )
    summary = report.summary()
    assert summary["loss"] == {"steering": 0.2, "throttle_brake": 0.3} and summary["loss_total"] == 0.5
    assert summary["loss_history"] == [[7, 0.5]] and summary["reused"] == {"steering": 5}
    assert (summary["samples_per_s"], summary["batches_per_s"], summary["data_wait"]) == (4.0, 1.0, 0.5)
    # flow control off (target_reuse 0, the default here): no demand asked, the gauge says 0
    assert "demand" not in summary["flow"] and value("charles_trainer_flow_demand") == 0
    assert summary["flow"] == {"insert_per_s": 12.0, "draw_per_s": 4.0}  # flow off: only the rates
    assert value("charles_trainer_flow_reuse") == pytest.approx(1 / 3)


def test_demand_asks_for_the_inserts_that_reach_the_target_reuse():
    d = Demand(target_reuse=4.0, window=3)
    assert d.look(0.0, 0, 0, trained=False) == DEMAND_MAX, "filling the buffers: as much as there is"
    # 100 inserted/s, 50 drawn/s: reuse 0.5; at 4 the trainer could do with 12.5 inserted/s
    d.look(10.0, 1000, 500, trained=True)
    assert d.look(20.0, 2000, 1000, trained=True) == pytest.approx(0.125)
    assert d.info() == {
        "demand": 0.125,
        "reuse": 0.5,
        "target_reuse": 4.0,
        "insert_per_s": 100.0,
        "draw_per_s": 50.0,
        "starved": 0.0,
    }
    # 10 inserted/s, 120 drawn/s (reuse 12): three times the inserts reach 4
    d.look(30.0, 2100, 1800, trained=True)
    d.look(40.0, 2200, 3000, trained=True)
    assert d.look(50.0, 2300, 4200, trained=True) == pytest.approx(3.0)
    # within a factor 2 of the target (reuse 2.5 or 7): no change asked, lumpy inserts are not news
    d.look(51.0, 2300, 4200, trained=True)
    d.look(52.0, 2310, 4225, trained=True)
    assert d.look(53.0, 2320, 4250, trained=True) == 1.0
    d.look(54.0, 2330, 4320, trained=True)
    assert d.look(55.0, 2340, 4390, trained=True) == 1.0
    # on target, but its buffers could not give a batch 75 % of the time: four times the data keeps it busy
    d.look(60.0, 2400, 4600, trained=True, starved_s=100.0)
    d.look(70.0, 2500, 5000, trained=True, starved_s=107.5)
    assert d.look(80.0, 2600, 5400, trained=True, starved_s=115.0) == pytest.approx(4.0)
    assert d.info()["starved"] == 0.75
    # far off in either direction: within [DEMAND_MIN, DEMAND_MAX]
    d.look(90.0, 2600 + 10**6, 5400, trained=True)
    d.look(100.0, 2600 + 2 * 10**6, 5400, trained=True)
    assert d.look(110.0, 2600 + 3 * 10**6, 5400, trained=True) == DEMAND_MIN
    # while the emptiest buffer is under half full nothing is evicted: no less data than it gets
    d.look(120.0, 0, 0, trained=True, fill=0.2)
    d.look(130.0, 1000, 50, trained=True, fill=0.3)
    assert d.look(140.0, 2000, 100, trained=True, fill=0.4) == 1.0
    assert d.look(150.0, 3000, 150, trained=True, fill=0.6) == DEMAND_MIN
    off = Demand(target_reuse=0.0)
    off.look(0.0, 0, 0, trained=True)
    off.look(1.0, 10, 10, trained=True)
    assert "demand" not in off.info(), "flow_reuse 0 asks for nothing"


def test_the_pace_follows_the_hungriest_trainer_within_its_floor_and_forgets_the_silent():
    p = Pace(floor=0.1, gain=0.5, settle_s=10.0)

    def at(now: float, **asks: float) -> float:
        for trainer, demand in asks.items():  # heartbeats every second in life; one per move here
            assert p.hear(trainer, demand, now)
        return p.step(now)

    assert p.step(0.0) == 1.0, "nobody asks: the configured pace"
    assert at(0.0, a=0.25) == pytest.approx(0.5), "half the error corrected at once"
    assert at(5.0, a=0.25) == pytest.approx(0.5), "then nothing until the trainer's window saw the move"
    assert at(10.0, a=0.25) == pytest.approx(0.25) and at(20.0, a=0.25) == pytest.approx(0.125)
    assert at(30.0, a=0.25) == 0.1, "never under the floor"
    assert at(40.0, a=0.25, b=4.0) == pytest.approx(0.2) and p.demand(40.0) == 4.0, "the hungriest wins"
    assert at(50.0, a=0.25, b=4.0) == pytest.approx(0.4) and at(60.0, b=4.0) == pytest.approx(0.8)
    assert at(70.0, b=4.0) == 1.0, "never over the configured pace"
    assert at(80.0, b=0.25) == pytest.approx(0.5)
    assert p.demand(80.0 + STALE_S + 1) is None and p.trainers == 0, "silent trainers are forgotten"
    assert p.step(100.0) == pytest.approx(0.5**0.5), "...and the pace walks back to 1"
    for bad in (float("nan"), float("inf"), -1.0, 0, "lots", None, True):
        assert not p.hear("trainer-x", bad, 100.0), bad
    assert p.trainers == 0
    # a busy collector ran at 0.2 of its pace though asked for 0.7: a cut starts from what it ran at
    p = Pace(floor=0.01, gain=0.5, settle_s=10.0)
    p.hear("a", 0.49, 0.0)
    assert p.step(0.0) == pytest.approx(0.7)
    p.hear("a", 0.25, 10.0)
    assert p.step(10.0, achieved=0.2) == pytest.approx(0.1), "0.2 x 0.25 ** 0.5, not 0.7 x 0.5"
    p.hear("a", 4.0, 20.0)
    assert p.step(20.0, achieved=0.05) == pytest.approx(0.2), "a rise starts from the scale asked for"


# ---- TensorBoard ------------------------------------------------------------------------------------------


class Recorder:
    def __init__(self) -> None:
        self.scalars: dict[str, tuple[float, int]] = {}
        self.closed = False

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.scalars[tag] = (value, step)

    def close(self) -> None:
        self.closed = True


def test_tensorboard_logs_one_batch_under_stable_tags():
    rec = Recorder()
    tb = TensorBoardLog(rec)
    rates = Rates()
    rates.look(0.0, 0, 0, 0.0)
    rates.look(2.0, 10, 160, 1.0)
    res = SimpleNamespace(loss=0.5, losses={"steering": 0.3}, metrics={"steering_mae": 0.1}, grad_norm=2.0)
    tb.step(10, res, lr=1e-3, rates=rates, fills={"steering": 0.75}, reused={"steering": 4})
    assert rec.scalars == {
        "loss/total": (0.5, 10),
        "loss/steering": (0.3, 10),
        "metrics/steering_mae": (0.1, 10),
        "train/lr": (1e-3, 10),
        "train/grad_norm": (2.0, 10),
        "throughput/samples_per_s": (80.0, 10),
        "throughput/batches_per_s": (5.0, 10),
        "data/wait_fraction": (0.5, 10),
        "buffer/steering": (0.75, 10),
        "reused/steering": (4, 10),
    }
    tb.close()
    assert rec.closed


def test_tensorboard_writes_event_files_in_the_runs_folder(tmp_path):
    tb = TensorBoardLog.open(tmp_path / "tb", resumed_batch=0, log=LOG)
    assert tb is not None
    res = SimpleNamespace(loss=1.0, losses={}, metrics=None, grad_norm=0.0)
    tb.step(1, res, lr=0.1, rates=Rates(), fills={}, reused={})
    tb.close()
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


# ---- resume -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mcfg():
    from charles.model.presets import get_config

    return get_config("tiny", width=64, height=36)


def _trainer(mcfg) -> Trainer:
    torch.manual_seed(0)
    with torch_threads(1):
        return Trainer(mcfg, TrainerConfig(lr=1e-3), torch.device("cpu"))


def test_a_trained_run_never_restarts_from_scratch(tmp_path):
    run = RunDir(tmp_path / "tiny" / "tiny_v1")
    run.create({})
    check_resumable(run, None, [])  # a new run: fine
    run.manifest.checkpoint, run.manifest.batch = "checkpoints/batch_000000040", 40
    with pytest.raises(CheckpointError, match="trained to batch 40"):
        check_resumable(run, None, [])
    with pytest.raises(CheckpointError, match="no_good_checkpoint"):
        check_resumable(RunDir(tmp_path / "tiny" / "tiny_v2"), None, [("bad", "refused")])
    check_resumable(run, SimpleNamespace(path=tmp_path, batch=40), [])  # one loads: fine


def test_resume_starts_new_continues_saved_and_refuses_lost(mcfg, tmp_path):
    run = open_run("tiny", tmp_path, model=mcfg.to_dict(), identity=mcfg.identity())
    t = _trainer(mcfg)
    fresh = resume(run, t, mcfg)
    assert fresh.path is None and fresh.refused == [] and fresh.started

    t.batch = 7
    saved = t.save(run.checkpoints, extra={"run": run.name})
    run.progress(7, 0, saved)
    again = _trainer(mcfg)
    got = resume(run, again, mcfg)
    assert (got.path, got.batch, again.batch) == (saved, 7, 7)

    for f in saved.iterdir():
        f.unlink()
    saved.rmdir()
    with pytest.raises(CheckpointError, match="no_good_checkpoint"):
        resume(run, _trainer(mcfg), mcfg)


# ---- which run every rank trains --------------------------------------------------------------------------


def test_rank_zero_chooses_and_locks_the_run_the_others_follow(tmp_path):
    open_run("tiny", tmp_path, version=2)
    sent: list[int] = []

    def send(v: int) -> int:
        sent.append(v)
        return v

    run0 = open_for_training("tiny", tmp_path, new=True, name="exp", broadcast=send)
    assert run0.name == "tiny_v3" and sent == [3] and run0.manifest.name == "exp"
    with pytest.raises(RunError, match="being trained by another trainer"):
        open_for_training("tiny", tmp_path, version=3)
    run1 = open_for_training("tiny", tmp_path, new=True, rank=1, broadcast=lambda v: 3)
    assert run1.name == "tiny_v3", "a rank > 0 trains rank 0's version, never a next one of its own"
    run0.unlock()
    with pytest.raises(RunError, match="only rank 0"):
        open_for_training("tiny", tmp_path, rank=1)
