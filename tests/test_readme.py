"""The README's "On your architecture" example runs as written (on a tiny batch)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_hugging_face_example_in_the_readme_trains():
    pytest.importorskip("transformers")
    text = README.read_text()
    section = text[text.index("## On your architecture") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 256, (4, 17), generator=g)
    batches = [(tokens[:, :-1], tokens[:, 1:])] * 3
    scope = {"batches": batches}
    with pytest.warns(UserWarning, match="left out|leaves out|not decorrelated|Embedding"):
        exec(compile(code, str(README), "exec"), scope)  # our own README
    model = scope["model"]
    assert any("fa_feedback" in name for name, _ in model.named_buffers())
    assert any(name.endswith(".R") for name, _ in model.named_buffers())
