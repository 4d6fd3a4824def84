"""The one training loop (voco_lib.loop.fit) on a tiny model: accumulation, logging, signals, NaN stop, resume."""

from __future__ import annotations

import os
import signal

import pytest
import torch
from torch import nn

from voco_lib.distributed import Runtime
from voco_lib.loop import PERF_KEY, Interrupted, LoopSpec, NonFiniteLoss, adamw, fit, seed_everything
from voco_lib.runs import checkpoint_paths, open_run, read_metrics

X = torch.linspace(-1, 1, 16).unsqueeze(1)
Y = 3 * X - 1


def _step(net, batch, step, micro, accum=1):
    """Mean squared error over micro-batch `micro` of the 16 points; an extra logged term."""
    n = len(X) // accum
    x, y = X[micro * n:(micro + 1) * n], Y[micro * n:(micro + 1) * n]
    err = (net(x) - y).pow(2).mean()
    return {"loss": err, "abs": (net(x) - y).abs().mean()}


def _fit(out, steps=6, accum=1, step_fn=None, resume=False, evaluate=None, checkpoint_every=2, model=None):
    seed_everything(0)
    model = model or nn.Linear(1, 1)
    opt, sched = adamw(model, 0.1, 0.0, warmup=1, steps=steps)
    spec = LoopSpec(steps, accum=accum, log_every=1, eval_every=3, checkpoint_every=checkpoint_every, keep_last=5,
                    tensorboard=False)
    fn = step_fn or (lambda net, b, s, m: _step(net, b, s, m, accum))
    with open_run(out, {"steps": steps, "accum": accum}, resume=resume) as run:
        fit(model, fn, opt, sched, run, Runtime(), spec, evaluate=evaluate, show_progress=False)
    return model


def _curve(out):
    return [{k: v for k, v in r.items() if k != PERF_KEY} for r in read_metrics(out)]


def test_logs_every_returned_term_and_evaluates_on_schedule(tmp_path):
    _fit(tmp_path / "a", evaluate=lambda step: {"score": float(step)})
    recs = _curve(tmp_path / "a")
    assert [(r["kind"], r["step"]) for r in recs if r["kind"] == "eval"] == [("eval", 0), ("eval", 3), ("eval", 6)]
    train = [r for r in recs if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    assert all({"loss", "abs", "lr", "grad_norm"} <= set(r) for r in train)
    assert train[0]["lr"] == 0.0 and train[1]["lr"] == pytest.approx(0.1)  # the lr each step used (warmup 1)
    assert train[-1]["loss"] < train[1]["loss"]


def test_accumulation_equals_the_full_batch(tmp_path):
    one = _fit(tmp_path / "one", accum=1)
    two = _fit(tmp_path / "two", accum=2)
    for a, b in zip(one.parameters(), two.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    la = [r["loss"] for r in read_metrics(tmp_path / "one", "train")]
    lb = [r["loss"] for r in read_metrics(tmp_path / "two", "train")]
    assert la == pytest.approx(lb, rel=1e-5)


def test_a_non_finite_loss_stops_before_it_changes_a_weight(tmp_path):
    seen = {}

    def nan_at_4(net, b, step, micro):
        out = _step(net, b, step, micro)
        if step == 3:  # the 4th step
            seen["w"] = [p.detach().clone() for p in net.parameters()]
            out["loss"] = out["loss"] * float("nan")
        return out

    seed_everything(0)
    model = nn.Linear(1, 1)
    with pytest.raises(NonFiniteLoss, match=r"at step 4.*step_00000002\.pt"):
        _fit(tmp_path / "nan", step_fn=nan_at_4, model=model)
    assert all(torch.equal(a, b) for a, b in zip(seen["w"], model.parameters()))  # the NaN step changed nothing
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert [p.name for p in checkpoint_paths(tmp_path / "nan")] == ["step_00000002.pt"]


def test_sigterm_checkpoints_then_raises_and_resume_is_exact(tmp_path):
    straight = _fit(tmp_path / "straight")

    def term_at_3(net, b, step, micro):
        if step == 2:  # during the 3rd step: it finishes, checkpoints, then the run stops
            os.kill(os.getpid(), signal.SIGTERM)
        return _step(net, b, step, micro)

    with pytest.raises(Interrupted) as e:
        _fit(tmp_path / "cut", step_fn=term_at_3)
    assert e.value.exit_code == 143 and "SIGTERM at step 3" in str(e.value)
    assert checkpoint_paths(tmp_path / "cut")[-1].name == "step_00000003.pt"
    resumed = _fit(tmp_path / "cut", resume=True)
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    assert _curve(tmp_path / "cut") == _curve(tmp_path / "straight")
