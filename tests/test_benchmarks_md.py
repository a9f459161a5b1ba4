"""BENCHMARKS.md's generated tables are exactly what benchmarks/tables.py makes of the committed
summaries, so the document cannot drift from the numbers the benchmark commands wrote."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _tables():
    path = ROOT / "benchmarks" / "tables.py"
    spec = importlib.util.spec_from_file_location("bench_tables", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_regenerating_benchmarks_md_changes_nothing():
    tables = _tables()
    text = (ROOT / "BENCHMARKS.md").read_text()
    found = tables.markers(text)
    assert len(found) >= 33  # the tables converted so far; a lost marker fails here
    for _, paths, options in found:
        assert "command" in options  # every generated table names the command behind it
        assert all((ROOT / p).exists() for p in paths)
    assert tables.render(text) == text, "BENCHMARKS.md is out of date: python benchmarks/tables.py"


def _summary(groups, seconds=None):
    return {
        "base_config": {},
        "groups": [
            {
                "label": label,
                "seeds": seeds,
                "best_test_acc": [best, std],
                "final_test_acc": [best - 0.01, std],
                "train_seconds": [10.0, 1.0],
                "epochs": 3,
                "target_acc": 0.9,
                "epochs_to_target": to_target[0],
                "seconds_to_target": to_target[1],
            }
            for label, seeds, best, std, to_target in groups
        ],
    }


def _write(root, rel, data):
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def test_views_lay_out_the_summaries_numbers(tmp_path):
    tables = _tables()
    groups = [
        ("bp", 2, 0.9000, 0.0010, (3, 30.0)),
        ("fa", 2, 0.8512, 0.0200, (None, None)),
        ("fa+dbp", 1, 0.9125, 0.0, (2, 45.0)),  # one of two seeds diverged
    ]
    _write(tmp_path, "r/mnist/results.json", _summary(groups))
    _write(tmp_path, "r/mnist/epoch_seconds.json", {"bp": 10.04, "fa": 8.0, "fa+dbp": 20.0})
    text = tables.view_datasets(tmp_path, ["r/mnist/results.json"], {"diff": "gap"})
    rows = text.splitlines()
    assert rows[0] == "| run | MNIST best test acc (%) | gap |"
    assert rows[2] == "| bp | 90.00 ± 0.10 | — |"
    assert rows[3] == "| fa | 85.12 ± 2.00 | 4.88 |"
    assert rows[4] == "| fa+dbp | 91.25 (1 of 2 seeds diverged) | −1.25 |"
    gain = tables.view_datasets(tmp_path, ["r/mnist/results.json"], {"diff": "gain"})
    assert gain.splitlines()[3].endswith("| −4.88 |") and "| +1.25 |" in gain
    grid = tables.view_grid(tmp_path, ["r/mnist/results.json"], {}).splitlines()
    assert "epochs to bp's best (90.00 %)" in grid[0]
    assert grid[2] == "| bp | 90.00 ± 0.10 | 89.00 ± 0.10 | 10.0 | 3 | 30.0 |"
    assert grid[3].endswith("| not reached | — |")
    assert grid[4].endswith("| 2 (0.67×) | 45.0 (1.50×) |")


def test_a_changed_summary_changes_its_table_and_bad_markers_are_one_line_errors(tmp_path):
    tables = _tables()
    _write(tmp_path, "r/mnist/results.json", _summary([("bp", 3, 0.9, 0.01, (1, 1.0))]))
    doc = (
        "before\n<!-- table: datasets r/mnist/results.json command=x -->\nstale\n"
        "<!-- /table -->\nafter\n"
    )
    first = tables.render(doc, tmp_path)
    assert first.startswith("before\n") and first.endswith("<!-- /table -->\nafter\n")
    assert "| bp | 90.00 ± 1.00 |" in first and "stale" not in first
    assert "Generated from `r/mnist/results.json` (written by `x`)" in first
    assert tables.render(first, tmp_path) == first
    _write(tmp_path, "r/mnist/results.json", _summary([("bp", 3, 0.91, 0.01, (1, 1.0))]))
    assert tables.render(first, tmp_path) != first
    for marker, message in [
        ("nosuch r/mnist/results.json", "first word"),
        ("datasets r/missing.json", "cannot read"),
        ("datasets", "names no summary"),
        ('datasets r/mnist/results.json first="open', "closing quotation"),
    ]:
        with pytest.raises(tables.TableError, match=message):
            tables.render(f"<!-- table: {marker} -->\n<!-- /table -->\n", tmp_path)


def test_epochs_view_reads_the_histories_at_the_epochs_asked(tmp_path):
    tables = _tables()

    def history(accs, losses):
        return [
            {"epoch": e, "test_acc": a, "train_loss": ls}
            for e, (a, ls) in enumerate(zip(accs, losses, strict=True))
        ]

    summary = _summary([("anp", 2, 0.9, 0.0, (1, 1.0)), ("np", 2, 0.8, 0.0, (1, 1.0))])
    summary["histories"] = {
        "anp": [history([0.1, 0.5, 0.7], [2, 1, 0.5]), history([0.1, 0.6, 0.9], [2, 1, 0.25])],
        "np": [history([0.1, 0.2, 0.3], [2, 2, 2]), history([0.1, 0.2, 0.4], [2, 2, 2])],
    }
    _write(tmp_path, "r/mnist/results.json", summary)
    paths = ["r/mnist/results.json"]
    rows = tables.view_epochs(tmp_path, paths, {"epochs": "1,2", "best": "1", "loss": "1"})
    assert (
        rows.splitlines()[2]
        == "| anp | 55.00 ± 7.07 | 80.00 ± 14.14 | 80.00 ± 14.14 | 0.375 ± 0.177 |"
    )
    one = tables.view_epochs(tmp_path, paths, {"epochs": "1", "run": "1", "rows": "np"})
    assert one.splitlines()[2:] == ["| np | 20.00 |"]
    with pytest.raises(tables.TableError, match="in none of the summaries"):
        tables.view_epochs(tmp_path, paths, {"rows": "dfa"})


def test_records_view_fills_a_template_per_record_with_units(tmp_path):
    tables = _tables()
    data = {"results": [{"rule": "bp", "single": {"acc": 0.91234, "bytes": 3 * 2**20}}]}
    _write(tmp_path, "d.json", data)
    cols = "rule|{rule};acc|{single[acc]:pct:.2f};MiB|{single[bytes]:MiB:.1f};raw|{single[acc]:.3f}"
    text = tables.view_records(tmp_path, ["d.json"], {"at": "results", "cols": cols})
    assert text.splitlines() == [
        "| rule | acc | MiB | raw |",
        "|---|---:|---:|---:|",
        "| bp | 91.23 | 3.0 | 0.912 |",
    ]
    with pytest.raises(tables.TableError, match="cannot fill"):
        tables.view_records(tmp_path, ["d.json"], {"at": "results", "cols": "x|{nosuch}"})


def test_cells_view_reads_every_cell_from_the_files(tmp_path):
    tables = _tables()
    _write(tmp_path, "a.json", {"rows": [{"ms": 50.0}, {"ms": 20.0}], "n": 4988.6, "t": 8204.2})
    _write(tmp_path, "b.json", {"curve": {"0": 0.5971, "7": None}, "steps_to.1": 12})
    cells = (
        "|ratio|n|s;"
        "**ours**|**{rows[0][ms]/rows[1][ms]:.2f}×**|{n:sp:,.0f}|{t:k:.2f} s;"
        "x|{1[curve][0]:.3f}|{1[curve][7]} / {1[steps_to.1]}|{0[rows][1][ms]:.0f}"
    )
    text = tables.view_cells(tmp_path, ["a.json", "b.json"], {"cells": cells, "align": "lrrl"})
    assert text.splitlines() == [
        "| | ratio | n | s |",
        "|---|---:|---:|---|",
        "| **ours** | **2.50×** | 4 989 | 8.20 s |",
        "| x | 0.597 | — / 12 | 20 |",
    ]
    for options, message in [
        ({"cells": "a|b;c"}, "every row needs 2 cells"),
        ({"cells": "a|b;{nosuch}|c"}, "cannot fill"),
        ({"cells": "a|b", "align": "lx"}, "align must be"),
    ]:
        with pytest.raises(tables.TableError, match=message):
            tables.view_cells(tmp_path, ["a.json"], options)


def test_file_view_picks_a_table_and_rows_across_files(tmp_path):
    tables = _tables()
    first = (
        "# a\n\n| r | x |\n|---|---:|\n| bp | 1 |\n\ntext\n\n| r | y |\n|---|---:|\n| fa | 2 |\n"
    )
    (tmp_path / "a.md").write_text(first)
    (tmp_path / "b.md").write_text("| r | z |\n|---|---:|\n| bp | 9 |\n| twin | 3 |\n")
    second = tables.view_file(tmp_path, ["a.md"], {"table": "2"})
    assert second.splitlines() == ["| r | y |", "|---|---:|", "| fa | 2 |"]
    merged = tables.view_file(tmp_path, ["a.md", "b.md"], {"rows": "twin;bp"})
    assert merged.splitlines() == ["| r | x |", "|---|---:|", "| twin | 3 |", "| bp | 1 |"]
    with pytest.raises(tables.TableError, match="holds 2 tables"):
        tables.view_file(tmp_path, ["a.md"], {"table": "3"})


def test_pivot_and_alignment_views_group_the_records(tmp_path):
    tables = _tables()
    runs = [
        {"rule": "gd", "lr": 0.1, "loss": 0.0397, "steps": None},
        {"rule": "gd", "lr": 1.0, "loss": 5.2e-5, "steps": 2656},
        {"rule": "new", "lr": 1.0, "loss": 7.2e-15, "steps": 593},
    ]
    _write(tmp_path, "t.json", {"runs": runs})
    options = {"at": "runs", "row": "rule", "col": "lr", "colname": "η = {lr:g}"}
    text = tables.view_pivot(tmp_path, ["t.json"], {**options, "cell": "{loss:.2e} ({steps})"})
    assert text.splitlines() == [
        "| rule | η = 0.1 | η = 1 |",
        "|---|---:|---:|",
        "| gd | 3.97e-02 (—) | 5.20e-05 (2656) |",
        "| new | — | 7.20e-15 (593) |",
    ]

    def run(x, seed, score, shuffled, rule="bp", diverged=False):
        return {
            "rule": rule,
            "x": x,
            "seed": seed,
            "diverged": diverged,
            "align_score/2": score,
            "align_score_shuffled/2": shuffled,
        }

    _write(
        tmp_path,
        "s.json",
        {
            "runs": [
                run(8, 0, 0.5, 0.1),
                run(8, 1, 0.7, 0.2),
                run(64, 0, 0.9, 0.0),
                run(64, 1, 0.1, 0.9, rule="fa"),
                run(64, 2, 0.1, 0.9, diverged=True),
            ]
        },
    )
    text = tables.view_alignment(tmp_path, ["s.json"], {"layers": "conv1|2", "column": "{x} ch"})
    assert text.splitlines() == [
        "| layer | 8 ch | 64 ch |",
        "|---|---:|---:|",
        "| conv1 | 0.60 (0.15) | 0.90 (0.00) |",
    ]


def test_fixedpoint_and_solver_views(tmp_path):
    tables = _tables()

    def stats(values):
        done = [v for v in values if v is not None]
        mean = sum(done) / len(done) if done else None
        std = (sum((v - mean) ** 2 for v in done) / (len(done) - 1)) ** 0.5 if len(done) > 1 else 0
        return {"n": len(done), "mean": mean, "std": std if done else None}

    def entry(accs, eig, stops):
        return {
            "seeds": [0, 1, 2],
            "best_train_acc_stats": stats(accs),
            "best_test_acc_stats": stats(accs),
            "max_re_eig_W_max": eig,
            "diverged_at": stops,
        }

    _write(
        tmp_path,
        "m.json",
        {
            "multi_seed": {
                "gd lr 0.1": entry([0.9, 0.88, 0.92], [1.456, 1.42, 13.37], [None, None, 338]),
                "gd lr 3": entry([None, None, None], [0.5, 0.6, 0.7], [6, 6, 5]),
                "new lr 1": entry([0.8, None, 0.9], [0.5, 0.6, 0.7], [None, None, None]),
            }
        },
    )
    rows = tables.view_fixedpoint(tmp_path, ["m.json"], {}).splitlines()
    assert rows[0].endswith("| max Re λ(W) (seeds 0 / 1 / 2) | stopped at step |")
    assert rows[2] == "| gd | 0.1 | 90.0 ± 2.0 | 90.0 ± 2.0 | 1.46 / 1.42 / 13.4 | — / — / 338 |"
    assert rows[3] == "| gd | 3 | — | — | 0.50 / 0.60 / 0.70 | 6 / 6 / 5 |"
    assert rows[4].startswith("| new | 1 | 85.0 ± 7.1 (n = 2) |") and rows[4].endswith("| — |")

    def method(name, iterations, seconds, fraction):
        return {
            "method": name,
            "iterations": iterations,
            "seconds": seconds,
            "converged_fraction": fraction,
        }

    _write(
        tmp_path,
        "v.json",
        {
            "cases": [
                {
                    "case": "init",
                    "max_re_eig_W": 0.4855,
                    "methods": [method("a", 35, 0.0479, 1.0), method("b", 3, 1.58, 1.0)],
                },
                {
                    "case": "|λ| > 1",
                    "max_re_eig_W": 2.84,
                    "methods": [method("a", 2000, 0.2727, 0.9941), method("b", 10, 5.39, 0.30)],
                },
            ]
        },
    )
    assert tables.view_solver(tmp_path, ["v.json"], {"rows": "|λ| > 1;init"}).splitlines() == [
        "| network | max Re λ(W) | a | b |",
        "|---|---|---|---|",
        "| \\|λ\\| > 1 | 2.84 | 2000 / 273 / 0.99 | 10 / 5390 / 0.30 |",
        "| init | 0.49 | 35 / 48 | 3 / 1580 |",
    ]
