"""Checkpoints of long steps (``ptool.checkpoint``, ``ptool.passes.distill.train``).

An interrupted ``train()`` saves its state and raises ``Interrupted``; the same call again resumes
at the step it stopped and ends bit-identical to an uninterrupted run; any other call (lr, data,
starting parameters) starts fresh; the file is gone once a run completes. End to end: ``ptool
convert`` with an attention transfer, stopped by a real SIGINT, exits 130 without an output file,
and the same command resumes and finishes.

The learned rotation resumes mid-site and skips the sites it finished, in ``learn_transform`` and
through the ``rotate`` pass; an attention conversion interrupted in its transfer and then in its
distillation ends with the same model.

In-process interrupts are a ``KeyboardInterrupt`` raised from ``loss_at`` or from a torch global
forward pre-hook at the n-th call of a module the training runs (what Ctrl-C does mid-step); real
signals go to a subprocess only, where a stray one cannot stop pytest.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from ptool import checkpoint
from ptool.passes.distill import Trained, train
from tests._signals import default_sigint

STEPS = 20


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one intra-op thread. With two per xdist worker on two busy cores, each op waits
    for a descheduled helper thread and a conversion here runs 10-50x slower (0.25 s vs 7-14 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def ckpt_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "checkpoints"
    monkeypatch.setenv(checkpoint.DIR_ENV, str(folder))
    monkeypatch.setenv(checkpoint.SECONDS_ENV, "3600")  # only the save on Ctrl-C
    return folder


def _run(*, stop_at: int | None = None, lr: float = 0.05, data_seed: int = 1, param_seed: int = 0,
         ) -> tuple[torch.Tensor, list[int], Trained]:
    """A small regression with dropout (so the RNG state matters); returns the trained weight, the
    steps whose loss was computed, and what ``train`` reported."""
    w = torch.nn.Parameter(torch.randn(8, 4, generator=torch.Generator().manual_seed(param_seed)))
    gen = torch.Generator().manual_seed(data_seed)
    x, y = torch.randn(4, 16, 8, generator=gen), torch.randn(4, 16, 4, generator=gen)
    torch.manual_seed(0)
    ran: list[int] = []

    def loss_at(step: int) -> torch.Tensor:
        if step == stop_at:
            raise KeyboardInterrupt
        ran.append(step)
        batch = torch.nn.functional.dropout(x[step % 4], 0.2, training=True)
        return (batch @ w - y[step % 4]).pow(2).mean()

    trained = train([w], steps=STEPS, lr=lr, loss_at=loss_at, desc="toy fit", identity=(x, y))
    return w.detach().clone(), ran, trained


def _files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.pt")) if folder.exists() else []


def test_interrupted_run_resumes_and_ends_identical(ckpt_dir, capsys):
    reference, ran, trained = _run()
    assert ran == list(range(STEPS)) and trained.resumed_from is None

    with pytest.raises(checkpoint.Interrupted) as info:
        _run(stop_at=7)
    assert info.value.path.is_file() and _files(ckpt_dir) == [info.value.path]
    assert info.value.path.name.startswith("toy-fit-")

    resumed, ran, trained = _run()
    assert trained.resumed_from == 7
    assert trained.notes("transfer") == {"transfer_resumed": "resumed from step 7 of 20"}
    assert ran == [0, *range(7, STEPS)]  # step 0's loss is computed once as the run's fingerprint
    assert torch.equal(resumed, reference)
    assert "toy fit: resumed from step 7 of 20" in capsys.readouterr().err
    assert _files(ckpt_dir) == []


def test_interrupted_twice_resumes_from_the_last_stop(ckpt_dir):
    reference, _, _ = _run()
    with pytest.raises(checkpoint.Interrupted):
        _run(stop_at=5)
    with pytest.raises(checkpoint.Interrupted):
        _run(stop_at=12)
    resumed, ran, trained = _run()
    assert trained.resumed_from == 12 and ran == [0, *range(12, STEPS)]
    assert torch.equal(resumed, reference)


@pytest.mark.parametrize("change", [{"lr": 0.01}, {"data_seed": 2}, {"param_seed": 3}])
def test_a_different_run_does_not_resume(ckpt_dir, change):
    with pytest.raises(checkpoint.Interrupted) as info:
        _run(stop_at=7)
    _, ran, trained = _run(**change)
    assert trained.resumed_from is None and ran == list(range(STEPS))
    assert _files(ckpt_dir) == [info.value.path]  # the other run's checkpoint is left for that run


def test_periodic_saves_leave_nothing_after_completion(ckpt_dir, monkeypatch):
    monkeypatch.setenv(checkpoint.SECONDS_ENV, "0")  # save after every step
    saved: list[int] = []
    real_save = checkpoint.Checkpoint.save
    monkeypatch.setattr(checkpoint.Checkpoint, "save", lambda self, state: (saved.append(state["step"]),
                                                                            real_save(self, state))[1])
    _run()
    assert saved == list(range(1, STEPS))  # after every step but the last
    assert _files(ckpt_dir) == [] and not list(ckpt_dir.glob(".*"))  # no temporary files either


def test_off_means_a_plain_interrupt_and_no_files(tmp_path, monkeypatch):
    monkeypatch.setenv(checkpoint.DIR_ENV, "off")
    with pytest.raises(KeyboardInterrupt) as info:
        _run(stop_at=7)
    assert not isinstance(info.value, checkpoint.Interrupted)
    with checkpoint.configured(checkpoint.Policy(tmp_path / "on")):  # an explicit policy wins over the env
        with pytest.raises(checkpoint.Interrupted):
            _run(stop_at=7)
    assert _files(tmp_path / "on")


def test_interrupt_before_the_first_step_saves_nothing(ckpt_dir):
    with pytest.raises(KeyboardInterrupt) as info:
        _run(stop_at=0)
    assert not isinstance(info.value, checkpoint.Interrupted) and _files(ckpt_dir) == []
    with pytest.raises(checkpoint.Interrupted):
        _run(stop_at=1)  # one whole step: worth saving
    assert _run()[2].resumed_from == 1


def test_unreadable_checkpoint_is_ignored(ckpt_dir, capsys):
    reference, _, _ = _run()
    with pytest.raises(checkpoint.Interrupted) as info:
        _run(stop_at=7)
    info.value.path.write_bytes(b"not a checkpoint")
    resumed, ran, trained = _run()
    assert trained.resumed_from is None and ran == list(range(STEPS))
    assert torch.equal(resumed, reference)
    assert "ignoring unreadable checkpoint" in capsys.readouterr().err
    assert _files(ckpt_dir) == []


def test_run_key_separates_values():
    t = torch.arange(4.0)
    assert checkpoint.run_key("a", t, 0.1) == checkpoint.run_key("a", t.clone(), 0.1)
    keys = {checkpoint.run_key(*parts) for parts in [("a", t, 0.1), ("a", t, 0.10000001), ("b", t, 0.1),
                                                     ("a", t.double(), 0.1), ("a", t.reshape(2, 2), 0.1),
                                                     ("a", t + 1e-7, 0.1), ("a", [t], 0.1)]}
    assert len(keys) == 7


def test_policy_from_env(monkeypatch, tmp_path):
    monkeypatch.setenv(checkpoint.DIR_ENV, str(tmp_path))
    monkeypatch.setenv(checkpoint.SECONDS_ENV, "2.5")
    assert checkpoint.policy() == checkpoint.Policy(tmp_path, 2.5)
    monkeypatch.setenv(checkpoint.SECONDS_ENV, "soon")
    with pytest.raises(ValueError, match="PTOOL_CHECKPOINT_SECONDS must be a number of seconds >= 0"):
        checkpoint.policy()
    monkeypatch.delenv(checkpoint.SECONDS_ENV)
    monkeypatch.delenv(checkpoint.DIR_ENV)
    assert checkpoint.policy().directory == Path.home() / ".cache" / "ptool" / "checkpoints"


def test_interrupts_deferred_holds_ctrl_c_to_the_end_of_the_block():
    # Python's own handler, whatever this process inherited (a backgrounded run ignores SIGINT)
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    finished = False
    try:
        with pytest.raises(KeyboardInterrupt):
            with checkpoint.interrupts_deferred():
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.01)  # the handler runs here: recorded, not raised
                finished = True
        assert finished
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, inherited)


def test_cli_no_checkpoint_and_env_policy(monkeypatch, tmp_path):
    from ptool.cli import build_parser
    from ptool.cli._ui import UI
    from ptool.cli.convert import _checkpoint_policy
    from ptool.errors import UsageError

    parser = build_parser()
    monkeypatch.setenv(checkpoint.DIR_ENV, str(tmp_path))
    assert _checkpoint_policy(parser.parse_args(["convert", "-o", "m.onnx"]), UI()).directory == tmp_path
    assert _checkpoint_policy(parser.parse_args(["convert", "-o", "m.onnx", "--no-checkpoint"]), UI()).directory is None
    monkeypatch.setenv(checkpoint.SECONDS_ENV, "-1")
    with pytest.raises(UsageError, match="PTOOL_CHECKPOINT_SECONDS"):
        _checkpoint_policy(parser.parse_args(["convert", "-o", "m.onnx"]), UI())


# -- end to end: attention conversion --------------------------------------------------------------


class Attention(torch.nn.Module):
    """One self-attention block (SDPA): the smallest model an attention conversion trains on."""

    def __init__(self, width: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.heads, self.qkv, self.out = heads, torch.nn.Linear(width, 3 * width), torch.nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.out(y.transpose(1, 2).reshape(b, n, -1))


def attention_case() -> tuple[Attention, tuple[torch.Tensor], list[tuple[torch.Tensor]]]:
    """The model, its example input and four calibration batches (seeded)."""
    torch.manual_seed(0)
    model = Attention().eval()
    batches = [(torch.randn(2, 8, 16),) for _ in range(5)]
    return model, batches[0], batches[1:]


def _interrupt_forward(kind: type, n: int):
    """A torch global forward pre-hook raising KeyboardInterrupt (Ctrl-C) at the ``n``-th call of a
    ``kind`` module under autograd, i.e. inside a training loop."""
    calls = 0

    def hook(module, args):
        nonlocal calls
        if isinstance(module, kind) and torch.is_grad_enabled():
            calls += 1
            if calls == n:
                raise KeyboardInterrupt

    return torch.nn.modules.module.register_module_forward_pre_hook(hook)


def _interrupt_kernel_call(n: int):
    """Ctrl-C at the ``n``-th attention-kernel call while training."""
    from ptool.passes.attention.kernel import AttentionKernel

    return _interrupt_forward(AttentionKernel, n)


def test_attention_conversion_resumes_to_the_same_model(ckpt_dir):
    import ptool

    spec = ["linear-attention:feature_map=hedgehog,transfer_steps=40,distill_steps=20"]
    model, example, calibration = attention_case()

    def convert():
        return ptool.transform(model, spec, example_inputs=example, calibration=calibration)

    reference = convert()
    # One kernel call per step; a stage's first call is its step 0 (and fingerprint). Run 1 stops at
    # transfer step 24 (call 25). Run 2 resumes there (calls 1-17: fingerprint + steps 24..39) and
    # stops at distillation step 10 (call 18 is its step 0, so call 28). Run 3 resumes at 10.
    for n in (25, 28):
        handle = _interrupt_kernel_call(n)
        try:
            with pytest.raises(checkpoint.Interrupted):
                convert()
        finally:
            handle.remove()
    resumed = convert()
    notes = resumed.report[0].notes
    assert notes["distill_resumed"] == "resumed from step 10 of 20"
    assert "transfer_resumed" not in notes  # the transfer had finished in run 2
    with torch.no_grad():
        assert torch.equal(resumed(*example), reference(*example))
    assert _files(ckpt_dir) == []


def _interrupt_parametrization_call(n: int):
    """Ctrl-C at the ``n``-th evaluation of a parametrized weight while training (the learned
    rotation's orthogonal factors)."""
    from torch.nn.utils.parametrize import ParametrizationList

    return _interrupt_forward(ParametrizationList, n)


def test_learn_transform_resumes_mid_site_and_skips_finished_sites(ckpt_dir, capsys):
    from ptool.passes.quant._learn import learn_transform

    gen = torch.Generator().manual_seed(0)
    sites = [(torch.randn(64, 16, generator=gen), [torch.randn(8, 16, generator=gen)]) for _ in range(3)]
    init = torch.eye(16, dtype=torch.float64)

    def learn_all(finished):
        return [learn_transform(x, w, init, blocks=1, steps=10, lr=1e-2, weight_bits=4, act_bits=8,
                                finished=finished) for x, w in sites]

    reference = learn_all(None)
    # two factor evaluations per loss (x and the one reader), 11 losses per site (fingerprint + 10
    # steps): call 22 + 2 * 5 + 1 is in site 2's step 5
    handle = _interrupt_parametrization_call(22 + 11)
    try:
        with pytest.raises(checkpoint.Interrupted):
            learn_all(checkpoint.finished_units("test stage"))
    finally:
        handle.remove()
    finished = checkpoint.finished_units("test stage")
    resumed = learn_all(finished)
    assert finished.reused == 1  # site 1 from its stored result
    assert "learned rotation: resumed from step 5 of 10" in capsys.readouterr().err  # site 2 mid-way
    for (t, t_inv, losses), (t_ref, t_inv_ref, losses_ref) in zip(resumed, reference, strict=True):
        assert torch.equal(t, t_ref) and torch.equal(t_inv, t_inv_ref) and losses == losses_ref
    finished.complete()
    assert list(ckpt_dir.iterdir()) == []


@pytest.mark.slow
def test_learned_rotation_rerun_skips_finished_sites(ckpt_dir):
    import ptool
    from ptool.passes.quant.rotate import Rotate
    from tests.passes.quant._fixtures import fixture

    f = fixture("llama")

    def rotate():
        return ptool.transform(f.model, [Rotate(method="learned", train_steps=8)], f.example_inputs,
                               example_kwargs=f.example_kwargs, calibration=f.batches(4))

    reference = rotate()
    handle = _interrupt_parametrization_call(40)  # in a later site's training (68 such calls in all)
    try:
        with pytest.raises(KeyboardInterrupt):
            rotate()
    finally:
        handle.remove()
    assert [p for p in ckpt_dir.iterdir() if p.is_dir()]  # the finished sites' folder
    resumed = rotate()
    notes, want = resumed.report[0].notes, reference.report[0].notes
    assert notes["learned_sites_resumed"].endswith("site(s) reused from an interrupted run")
    assert int(notes["learned_sites_resumed"].split()[0]) >= 5  # the residual readers' scalings at least
    assert notes["learned_loss"] == want["learned_loss"]
    with torch.no_grad():
        assert torch.equal(resumed(*f.example_inputs, **f.example_kwargs).logits,
                           reference(*f.example_inputs, **f.example_kwargs).logits)
    assert list(ckpt_dir.iterdir()) == []


# -- end to end: `ptool convert` stopped by SIGINT, then rerun ----------------------------------------

# The CLI's default model (MiniLM) takes minutes to convert, and a module:function model brings no
# calibration data; this runs the real `ptool convert` with the default model swapped for
# attention_case() (no transformers import: seconds, not tens of them).
_CLI = textwrap.dedent('''
    import signal, sys
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if the parent ignores SIGINT
    import ptool.cli._model as _model
    from ptool.frontends.loaders import LoadedModel, ModelKind
    from tests.test_checkpoint import attention_case

    def _tiny():
        model, example, calibration = attention_case()
        loaded = LoadedModel(ModelKind.TORCH, model, example, {}, source="test")
        return _model.ResolvedModel(loaded, "tiny attention", example, {}, [(c, {}) for c in calibration])

    _model._default = _tiny
    from ptool.cli import main
    sys.exit(main(sys.argv[1:]))
''')


@pytest.mark.slow
def test_cli_sigint_then_rerun_resumes(tmp_path):
    folder, out = tmp_path / "checkpoints", tmp_path / "out" / "model.onnx"
    root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, checkpoint.DIR_ENV: str(folder), checkpoint.SECONDS_ENV: "0",
           "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1"}  # a tiny model; idle threads would only fight the other tests for the cores
    steps = 1000  # a few ms each; the first run is stopped a step or two in, the margin keeps it from finishing
    argv = [sys.executable, "-c", _CLI, "convert", "-p",
            f"linear-attention:feature_map=hedgehog,transfer_steps={steps}", "-o", str(out)]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=default_sigint)
    deadline = time.monotonic() + 240
    while not _files(folder) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None and _files(folder), f"no checkpoint appeared: {proc.communicate()}"
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, (stdout, stderr)
    [saved] = _files(folder)
    assert stderr.strip() == f"ptool: interrupted: rerun the same command to resume (checkpoint in {saved})"
    assert "Traceback" not in stderr and not out.exists() and not out.parent.exists()

    rerun = subprocess.run(argv, env={**env, checkpoint.SECONDS_ENV: "3600"}, capture_output=True, text=True,
                           timeout=240)
    assert rerun.returncode == 0, rerun.stderr
    resumed = [line for line in rerun.stderr.splitlines() if "resumed from step" in line]
    assert len(resumed) == 1 and resumed[0].startswith("ptool: attention transfer: resumed from step ")
    assert 0 < int(resumed[0].split("resumed from step ")[1].split()[0]) < steps
    assert out.is_file() and _files(folder) == []
