from decorrelate.compare import reference_target, speedup_lines, summarise, time_to_accuracy


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
