"""A recurrent layer's output read as its nonlinearity's activations: an RNN fed raw inputs of a large
scale saturates its own tanh, which no activation module shows (a tester's sensor RNN, ±700, was
told only of its W_hh). Checked against the fraction of |h| > 0.99 computed here."""

import torch
from torch import nn

import gradwatch as gw
from gradwatch.diagnose import diagnose


class Classifier(nn.Module):
    def __init__(self, cell: type[nn.Module]):
        super().__init__()
        self.rnn, self.fc = cell(3, 16, batch_first=True), nn.Linear(16, 2)

    def forward(self, x):
        _, h = self.rnn(x)
        h = h[0] if isinstance(h, tuple) else h  # an LSTM's (h_n, c_n)
        return self.fc(h[-1])  # the sequence output left unused: only the last state reaches the loss


def _train(scale: float, cell: type[nn.Module] = nn.RNN, watched: bool = True):
    torch.manual_seed(0)
    x, y = torch.randn(8, 16, 12, 3) * scale + 5 * scale, torch.randint(0, 2, (8, 16))
    model = Classifier(cell)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    watch = gw.watch(model, opt, warn=False, sample_every=1) if watched else None
    for i in range(8):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[i]), y[i]).backward()
        opt.step()
    if watch is not None:
        watch.close()
    with torch.no_grad():
        out, _ = model.rnn(x[0])
    return model, (watch.series() if watch is not None else None), float((out.abs() > 0.99).float().mean())


def test_a_recurrent_layer_on_raw_inputs_is_found_saturated_with_the_inputs_named():
    model, run, measured = _train(scale=100.0)
    column = run.column("rnn")
    assert run.layers[column].activation == "tanh"
    assert abs(float(run.metrics["saturated"][-1, column]) - measured) < 0.05 and measured > 0.9
    found = {f.kind: f for f in diagnose(run)}
    assert found["saturation"].layers == ("rnn",) and found["saturation"].causes[0].startswith("input scale")
    assert found["saturation"].remedies[0].action.startswith("Standardise the inputs")
    plain, _, _ = _train(scale=100.0, watched=False)  # the watch changes no weight
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), plain.state_dict().values()))


def test_standardised_inputs_and_an_lstm_read_as_theirs():
    _, run, measured = _train(scale=1.0)
    assert measured < 0.5 and "saturation" not in {f.kind for f in diagnose(run)}
    _, lstm, measured = _train(scale=100.0, cell=nn.LSTM)
    assert abs(float(lstm.metrics["saturated"][-1, lstm.column("rnn")]) - measured) < 0.05


def test_a_packed_sequence_is_read_by_its_rows_and_a_projected_lstm_not_as_tanh():
    from torch.nn.utils.rnn import pack_padded_sequence

    torch.manual_seed(0)
    gru, head = nn.GRU(3, 8, batch_first=True), nn.Linear(8, 1)
    lengths = torch.tensor([6, 4, 3, 2])
    x = torch.randn(4, 6, 3) * 50
    opt = torch.optim.SGD([*gru.parameters(), *head.parameters()], lr=0.01)
    watch = gw.watch(torch.nn.ModuleDict({"gru": gru, "head": head}), opt, warn=False, sample_every=1)
    out, h = gru(pack_padded_sequence(x, lengths, batch_first=True))
    head(h[-1]).sum().backward()
    opt.step()
    watch.close()
    run = watch.series()
    measured = float((out.data.abs() > 0.99).float().mean())  # the packed rows, no padding
    assert abs(float(run.metrics["saturated"][0, run.column("gru")]) - measured) < 1e-6
    from gradwatch.collect.layers import recurrent_activation

    assert [recurrent_activation(m) for m in (nn.LSTM(3, 8, proj_size=2), nn.LSTM(3, 8), nn.RNN(3, 8, nonlinearity="relu"),
                                               nn.Linear(3, 8))] == ["", "tanh", "relu", ""]  # (a projection is linear)
