import pytest
import torch
import torch.nn.functional as F

from decorrelate import Loss, UserError, build_model
from decorrelate.models import ConvNet


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_mlp_shapes_and_parameter_count():
    model = build_model("mlp", (1, 28, 28), 10, widths=[1000, 1000, 1000])
    assert model(torch.zeros(5, 1, 28, 28)).shape == (5, 10)
    expected = (784 * 1000 + 1000) + 2 * (1000 * 1000 + 1000) + (1000 * 10 + 10)
    assert n_params(model) == expected


def test_convnet_matches_paper_layout_on_any_image_shape():
    model = build_model("convnet", (3, 32, 32), 100)
    convs = [m for m in model if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 32, 64, 64]
    assert sum(isinstance(m, torch.nn.MaxPool2d) for m in model) == 2
    linears = [m for m in model if isinstance(m, torch.nn.Linear)]
    assert linears[0].in_features == 64 * 8 * 8 and linears[0].out_features == 1000
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 100)
    small = ConvNet((1, 28, 28), 10, channels=[4, 4, 8, 8], widths=[16])
    assert small(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_activation_choices_are_applied():
    x = torch.linspace(-2, 2, 16).reshape(1, 1, 4, 4)
    leaky = build_model("mlp", (1, 4, 4), 2, widths=[16], activation="leaky-relu")
    assert leaky[2].negative_slope == pytest.approx(0.01)
    tanh = build_model("mlp", (1, 4, 4), 2, widths=[16], activation="tanh")
    assert isinstance(tanh[2], torch.nn.Tanh)
    ident = build_model("mlp", (1, 4, 4), 2, widths=[16], activation="identity")
    # an identity MLP is an affine map: f(2x) - f(x) == f(x) - f(0)
    f = ident
    assert torch.allclose(f(2 * x) - f(x), f(x) - f(torch.zeros_like(x)), atol=1e-5)


def test_bad_model_names_are_user_errors():
    with pytest.raises(UserError, match="choose one of: mlp, convnet"):
        build_model("resnet", (1, 28, 28), 10)
    with pytest.raises(UserError, match="activation"):
        build_model("mlp", (1, 28, 28), 10, activation="gelu")
    with pytest.raises(UserError, match="image input"):
        build_model("convnet", (64,), 10)


def test_losses():
    torch.manual_seed(0)
    out, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 0, 1])
    assert torch.allclose(Loss("cross-entropy")(out, y), F.cross_entropy(out, y))
    shifted = Loss("mse-shifted")
    target = shifted.target(y, 4)
    assert target[0].tolist() == pytest.approx([0.9, -0.1, -0.1, -0.1])
    per_sample = shifted(out, y, reduction="none")
    assert per_sample.shape == (6,)
    assert torch.allclose(per_sample, 0.5 * ((out - target) ** 2).sum(1))
    assert torch.allclose(shifted(out, y), per_sample.mean())
    plain = Loss("mse")(out, y, reduction="none")
    assert torch.allclose(plain, 0.5 * ((out - F.one_hot(y, 4).float()) ** 2).sum(1))
    with pytest.raises(UserError):
        Loss("hinge")
