"""Two optimizers (a GAN's): a trial applies an optimizer remedy to both and a model change to the
first module trained, so the printed change names each optimizer with its model, and the model it
changed. Before, it printed `optimizer = torch.optim.Adam(model.parameters(), ...)`: generic names
for a change that had been made to both."""

import numpy as np
import pytest
import torch

from gradwatch.diagnose.advice import Context
from gradwatch.fix.candidates import adam, clip_norm, combine, lr_scale, reinit, zclip
from gradwatch.fix.names import read_names
from gradwatch.fix.trial import run_trial_in_process
from gradwatch.store.series import LayerInfo, RunSeries

GAN = '''
import torch
from torch import nn

torch.manual_seed(0)
gen = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
disc = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 1))
opt_d = torch.optim.SGD(disc.parameters(), lr=0.5)
opt_g = torch.optim.SGD(gen.parameters(), lr=0.2)
# BUILT
bce = nn.BCEWithLogitsLoss()
for step in range(6):
    real = torch.randn(16, 2) + 2.0
    fake = gen(torch.randn(16, 4))
    d_loss = bce(disc(real), torch.ones(16, 1)) + bce(disc(fake.detach()), torch.zeros(16, 1))
    opt_d.zero_grad(); d_loss.backward(); opt_d.step()
    g_loss = bce(disc(fake), torch.ones(16, 1))
    opt_g.zero_grad(); g_loss.backward(); opt_g.step()
'''


def _run(layers: list[str]) -> Context:
    """A recorded run of the GAN: the watch names the layers of every model after the first by it."""
    infos = [LayerInfo(name, "Linear", i, "param", 10) for i, name in enumerate(layers)]
    n = 4
    return Context(RunSeries(infos, np.arange(n), np.ones(n), np.full(n, 0.5), {}, meta={"optimizer": "SGD"}))


def _pasted(change: str) -> dict:
    ns: dict = {"__name__": "__main__"}
    exec(GAN.replace("# BUILT", change), ns)
    return ns


def test_each_optimizer_is_named_with_its_model_and_the_change_runs_pasted():
    names = read_names(GAN, _run(["0", "2", "disc.0", "disc.2"]))
    assert (names.model, names.optimizer) == ("gen", "opt_g")  # trained first: its layers are unprefixed
    ns = _pasted(names.complete(adam(names).code))
    assert isinstance(ns["opt_d"], torch.optim.Adam) and isinstance(ns["opt_g"], torch.optim.Adam)
    assert {id(p) for p in ns["opt_d"].param_groups[0]["params"]} == {id(p) for p in ns["disc"].parameters()}
    lowered = names.complete(lr_scale(0.1, names).code)
    assert "not found" not in lowered
    ns = _pasted(lowered)  # each its own lr x0.1, not the lr of the one the store recorded
    assert [ns[o].param_groups[0]["lr"] for o in ("opt_d", "opt_g")] == pytest.approx([0.05, 0.02])
    clip = names.complete(clip_norm(1.0, names).code)
    assert "gw.clip.attach(opt_d, gw.clip.ClipNorm(1))" in clip and "gw.clip.attach(opt_g, gw.clip.ClipNorm(1))" in clip
    assert names.complete(zclip(names).code).count("gw.clip.attach(") == 2
    init = names.complete(reinit(names).code)
    assert "gw.init_(gen, example_input=batch)" in init and "# gen only" in init
    # without a recorded run, the first module the source trains
    assert read_names(GAN).model == "gen"


def test_the_printed_change_is_what_the_trial_ran(tmp_path):
    """The trial's Adam + ZClip and the printed change pasted into the script train alike, bit for bit."""
    models: list = []

    def train():
        ns = {"__name__": "__main__"}
        exec(GAN, ns)
        models.append((ns["gen"], ns["disc"]))

    names = read_names(GAN, _run(["0", "2", "disc.0", "disc.2"]))
    cand = combine(adam(names), zclip(names))
    trial = run_trial_in_process(train, tmp_path / "t", cand, 100)
    assert trial.exit_code == 0
    torch.manual_seed(0)  # as the trial seeds it
    pasted = _pasted(names.complete(cand.code))
    for tried, mine in zip(models[0], (pasted["gen"], pasted["disc"])):
        for a, b in zip(tried.parameters(), mine.parameters()):
            assert torch.equal(a, b)


def _gan_without_detach(models: list):
    """D's loss on the fake batch, not detached: G's gradients from it are zeroed by G's own step."""
    torch.manual_seed(0)
    gen = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    disc = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    opt_d = torch.optim.SGD(disc.parameters(), lr=0.5)
    opt_g = torch.optim.SGD(gen.parameters(), lr=0.2)
    models.append(gen)
    bce = torch.nn.BCEWithLogitsLoss()
    for _ in range(5):
        fake = gen(torch.randn(16, 4))
        d_loss = bce(disc(torch.randn(16, 2)), torch.ones(16, 1)) + bce(disc(fake), torch.zeros(16, 1))
        opt_d.zero_grad(); d_loss.backward(); opt_d.step()
        opt_g.zero_grad(); bce(disc(gen(torch.randn(16, 4))), torch.ones(16, 1)).backward(); opt_g.step()


def _head_only(models: list):
    """An optimizer that holds only the head: the body keeps its weights (on purpose, or the stalled-layers finding)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    opt = torch.optim.SGD(net[2].parameters(), lr=0.1)
    models.append(net)
    for _ in range(5):
        opt.zero_grad(); net(torch.randn(8, 4)).pow(2).mean().backward(); opt.step()


@pytest.mark.parametrize("script", [_gan_without_detach, _head_only])
def test_the_baseline_trial_trains_as_the_script_does_alone(tmp_path, script):
    """Every parameter of the model missing from an optimizer went into it at its first step: the
    discriminator's optimizer stepped the generator with D's gradients; a body left out was trained."""
    from gradwatch.fix import BASELINE

    alone: list = []
    script(alone)
    tried: list = []
    run_trial_in_process(lambda: script(tried), tmp_path / "b", BASELINE, 100)
    for a, b in zip(alone[0].parameters(), tried[0].parameters()):
        assert torch.equal(a, b)


def test_a_norm_layer_the_remedy_adds_is_trained_by_the_models_own_optimizer(tmp_path):
    from gradwatch.fix.candidates import norm

    models: list = []
    opts: list = []

    def train():
        torch.manual_seed(0)
        gen = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        disc = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
        opt_g, opt_d = torch.optim.SGD(gen.parameters(), lr=0.1), torch.optim.SGD(disc.parameters(), lr=0.1)
        models.append(gen)
        opts.extend([opt_g, opt_d])
        for _ in range(3):
            fake = gen(torch.randn(16, 4))
            opt_d.zero_grad(); disc(fake.detach()).mean().backward(); opt_d.step()
            opt_g.zero_grad(); disc(fake).mean().backward(); opt_g.step()

    run_trial_in_process(train, tmp_path / "n", norm("batch"), 100)
    held = [{id(p) for g in o.param_groups for p in g["params"]} for o in opts]
    gen_ids = {id(p) for p in models[0].parameters()}
    assert gen_ids <= held[0] and not gen_ids & held[1]  # BatchNorm's weights in opt_g, none of G's in opt_d


def test_a_model_change_goes_to_the_model_the_findings_name(tmp_path):
    """A GAN whose discriminator explodes: re-initialising or normalising the generator, the first
    model trained, measured a remedy that never touched the broken model."""
    from gradwatch.diagnose.finding import Finding
    from gradwatch.fix.candidates import aimed, findings_model, norm

    names = read_names(GAN, _run(["0", "2", "disc.0", "disc.2"]))
    exploding = [Finding("exploding_gradient", "error", 0, ("disc.2",), "m", {}),
                 Finding("dead_units", "warning", 5, ("disc.1",), "m", {})]
    assert findings_model(exploding, names) == "disc"
    assert findings_model([Finding("dead_units", "warning", 5, ("0", "disc.1"), "m", {})], names) is None  # both
    assert findings_model([Finding("exploding_gradient", "error", 0, ("2",), "m", {})], names) is None  # the first
    aimed_names = names.aimed_at("disc")
    cand = aimed(norm("batch", aimed_names), "disc")
    assert cand.spec["target"] == "disc" and "disc, _ = gw.modify.insert_norm(disc, 'batch', example_input=batch)" in cand.code
    assert "# disc only: the model the findings name" in aimed_names.complete(cand.code)

    built: dict = {}

    def train():
        ns = {"__name__": "__main__"}
        exec(GAN.replace("# BUILT", "built.update(gen=gen, disc=disc, opt_d=opt_d, opt_g=opt_g)"), {**ns, "built": built})

    run_trial_in_process(train, tmp_path / "t", cand, 100)
    def normalised(m):
        return any("BatchNorm" in type(x).__name__ for x in m.modules())

    assert normalised(built["disc"]) and not normalised(built["gen"])
    held = {id(p) for g in built["opt_d"].param_groups for p in g["params"]}
    assert {id(p) for p in built["disc"].parameters()} <= held  # its new weights are trained by its own optimizer
    missing = run_trial_in_process(train, tmp_path / "m", aimed(norm("batch"), "critic"), 100)
    assert missing.not_applied.startswith("no module the script calls 'critic'")


def test_diagnose_code_names_the_model_each_finding_is_in():
    """`gradwatch diagnose` prints its remedies with the script's names: a finding in the later
    model (its layers `disc.0`) gets `disc` and the optimizer that trains it, one in the first model
    (unprefixed: `gen`, built second) gets `gen` and `opt_g`, not the first optimizer built."""
    from gradwatch.fix.names import in_script_names, read_names

    names = read_names(GAN, _run(["0", "2", "disc.0", "disc.2"]))
    code = "gw.init_(model)\nfor group in optimizer.param_groups: group['lr'] = 0.05"
    assert in_script_names(code, names, ("disc.0",), ("disc", "bce")) == \
        "gw.init_(disc)\nfor group in opt_d.param_groups: group['lr'] = 0.05"
    assert in_script_names(code, names, ("0", "2"), ("disc", "bce")) == \
        "gw.init_(gen)\nfor group in opt_g.param_groups: group['lr'] = 0.05"
    assert in_script_names(code, names, ("0",), ()) == code  # (which model: the run does not say)
    one = read_names("import torch\nnet = torch.nn.Linear(2, 1)\nopt = torch.optim.SGD(net.parameters(), lr=0.1)\n")
    assert in_script_names("model.optimizer_x = optimizer  # the model", one) == "net.optimizer_x = opt  # the net"


def test_a_keyword_argument_named_optimizer_keeps_its_name_and_the_pasted_code_runs():
    """A tester's `gradwatch diagnose` printed `replace_rnn(model, opt=opt)` for a script whose
    optimizer is `opt`: renamed as a keyword too, the pasted line raised a TypeError."""
    import gradwatch as gw
    from gradwatch.fix.names import in_script_names

    one = read_names("import torch\nnet = torch.nn.RNN(2, 4)\nopt = torch.optim.SGD(net.parameters(), lr=0.1)\n")
    code = "model, _ = gw.modify.replace_rnn(model, optimizer=optimizer)  # model\nif optimizer == optimizer: pass"
    renamed = in_script_names(code, one)
    assert renamed == "net, _ = gw.modify.replace_rnn(net, optimizer=opt)  # net\nif opt == opt: pass"
    space = {"gw": gw, "net": torch.nn.Sequential(torch.nn.RNN(2, 4))}
    space["opt"] = torch.optim.SGD(space["net"].parameters(), lr=0.1)
    exec(renamed, space)
    assert isinstance(space["net"][0], torch.nn.GRU) and space["opt"].param_groups[0]["params"][0] is space["net"][0].weight_ih_l0
