"""The weight average of stage 0: its update rule, its state round trip and swapping it in and out."""
import pytest
import torch

from fluxir.ema import WeightAverage


def _model():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    model.bias.requires_grad_(False)  # frozen weights are not averaged
    return model


def test_update_follows_the_warmed_up_decay():
    model = _model()
    ema = WeightAverage(model.named_parameters(), decay=0.9)
    assert set(ema.shadow) == {"weight"}
    expected = model.weight.detach().clone()
    for n in range(30):
        with torch.no_grad():
            model.weight.add_(1.0)
        ema.update()
        d = min(0.9, (1 + n) / (10 + n))
        expected = d * expected + (1 - d) * model.weight.detach()
    torch.testing.assert_close(ema.shadow["weight"], expected)
    assert ema.updates == 30


def test_swapped_in_restores_the_weights_and_state_round_trips():
    model = _model()
    ema = WeightAverage(model.named_parameters(), decay=0.5)
    with torch.no_grad():
        model.weight.mul_(3)
    ema.update()
    own = model.weight.detach().clone()
    with ema.swapped_in():
        assert torch.equal(model.weight, ema.shadow["weight"])
    assert torch.equal(model.weight, own)
    other = WeightAverage(_model().named_parameters(), decay=0.5)
    other.load_state_dict(ema.state_dict())
    assert torch.equal(other.shadow["weight"], ema.shadow["weight"]) and other.updates == 1
    with pytest.raises(ValueError, match="does not match"):
        WeightAverage(torch.nn.Linear(4, 2).named_parameters(), 0.5).load_state_dict(
            {"updates": 1, "shadow": {"other": torch.zeros(1)}})
    with pytest.raises(ValueError, match="decay"):
        WeightAverage(model.named_parameters(), decay=1.0)
