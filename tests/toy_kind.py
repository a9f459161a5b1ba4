"""A toy run kind for tests/test_experiments.py (importable by name in worker processes)."""

import json
from pathlib import Path

from decorrelate.experiments.kinds import RunKind


def toy_kind() -> RunKind:
    def execute(cfg, log, progress):
        out = Path(cfg["out"])
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(cfg))
        runs = 1 + (
            json.loads((out / "h.json").read_text())[0]["runs"] if (out / "h.json").exists() else 0
        )
        history = [{"square": cfg["x"] ** 2, "runs": runs}]
        (out / "h.json").write_text(json.dumps(history))
        return history

    def finished(out, cfg):
        path = Path(out) / "h.json"
        return json.loads(path.read_text()) if path.exists() else None

    return RunKind(
        "toy",
        make=lambda base, changes: {**base, **changes},
        to_dict=dict,
        identity=lambda saved: {k: v for k, v in saved.items() if k != "threads"},
        finished=finished,
        execute=execute,
        summarise=lambda history: history[-1],
        with_threads=lambda cfg, n: cfg,
    )
