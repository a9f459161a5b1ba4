"""The README's five lines on a user's own model, exactly as documented."""

import torch

import decorrelate as dc


def test_readme_five_lines_on_your_own_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(20, 30), torch.nn.ReLU(), torch.nn.Linear(30, 3))
    mix = torch.randn(20, 20)
    x, y = torch.randn(128, 20) @ mix, torch.randint(0, 3, (128,))  # correlated inputs
    model = dc.nn.decorrelate(model, "copi", lr=1e-3)
    rule = dc.get_rule("bp")
    rule.attach(model, dc.Loss("cross-entropy"))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    before = dc.nn.local_stats(model)
    for _ in range(150):
        opt.zero_grad()
        rule.backward(model, x, y)
        opt.step()
        dc.nn.local_update(model)
    after = dc.nn.local_stats(model)
    assert after["decor/0/offdiag"] < 0.5 * after["decor/0/offdiag_input"]
    assert after["decor/0/R_norm"] != before["decor/0/R_norm"]
