import json

from decorrelate.experiments.compare import (
    reference_target,
    speedup_lines,
    summarise,
    time_to_accuracy,
)


def hist(accs, secs_per_epoch=2.0):
    return [{"epoch": e, "test_acc": a, "seconds": e * secs_per_epoch} for e, a in enumerate(accs)]


def test_time_to_accuracy_uses_the_seed_mean_curve():
    runs = [hist([0.1, 0.5, 0.8, 0.9]), hist([0.1, 0.7, 0.8, 0.95], 4.0)]
    # mean curve: 0.1, 0.6, 0.8, 0.925
    assert time_to_accuracy(runs, 0.6) == (1, 3.0)
    assert time_to_accuracy(runs, 0.9) == (3, 9.0)
    assert time_to_accuracy(runs, 0.99) == (None, None)
    assert reference_target(runs) == 0.925


def test_speedup_relative_to_the_first_group():
    ref = [hist([0.1, 0.5, 0.8, 0.9])]
    fast = [hist([0.1, 0.9, 0.92, 0.93], 3.0)]
    slow = [hist([0.1, 0.2, 0.3, 0.4])]
    target = reference_target(ref)
    groups = [
        summarise("bp", ref, target),
        summarise("bp+scaled", fast, target),
        summarise("fa", slow, target),
    ]
    assert groups[0]["epochs_to_target"] == 3 and groups[1]["epochs_to_target"] == 1
    lines = speedup_lines(groups)
    assert "0.33x the epochs, 0.50x the wall-clock" in lines[0]
    assert lines[1].startswith("fa did not reach bp's best test accuracy (90.00 %)")


def test_angle_plot_only_when_angles_were_logged(tmp_path):
    from decorrelate.plotting import angle_keys, plot_angles

    with_angles = {
        "fa": [[{"epoch": 0}, {"epoch": 1, "angle/0": 40.0, "angle/2": 70.0}]],
        "bp": [hist([0.1, 0.5])],
    }
    assert angle_keys(with_angles) == ["angle/0", "angle/2"]
    (path,) = plot_angles(with_angles, tmp_path)
    assert path.name == "angles_vs_epoch.png" and path.stat().st_size > 1000
    assert plot_angles({"bp": [hist([0.1, 0.5])]}, tmp_path / "none") == []


def test_demo_trains_both_groups_at_their_own_learning_rates(tiny, tmp_path):
    from decorrelate.experiments.compare import DEMO_GROUPS, run_demo

    small = {k: v for k, v in tiny.items() if k not in ("out", "epochs")}
    summary = run_demo(epochs=1, out=tmp_path / "demo", progress=False, overrides=small)
    assert [g["label"] for g in summary.groups] == list(DEMO_GROUPS)
    for label, group in DEMO_GROUPS.items():
        (config,) = (tmp_path / "demo").glob(f"{label.replace(' ', '_')}-s0/config.json")
        saved = json.loads(config.read_text())
        assert saved["lr"] == group["lr"] and saved["decor"] == group["decor"]
    assert "bp+scaled" in summary.table and "bp lr=3e-4" in summary.table.splitlines()[-1]


def test_a_finished_runs_last_lines_are_logged_before_its_result():
    """A worker's queue feeder may deliver the last epoch line after the run's result: the
    parent waits for the run's end marker, so no line is lost or reported after the summary."""
    import queue
    import threading

    from decorrelate.experiments import runner

    lines: queue.Queue = queue.Queue()
    logged: list[str] = []

    def late_feeder() -> None:
        threading.Event().wait(0.3)  # the result was already returned
        lines.put("np seed 0: epoch 2/2")
        lines.put((runner._END, 0))

    threading.Thread(target=late_feeder).start()
    ended: set[int] = set()
    runner._drain(lines, logged.append, ended, until=0)
    assert logged == ["np seed 0: epoch 2/2"] and ended == {0}
