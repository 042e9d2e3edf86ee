"""The CUDA route never depends on SciPy (issue item 6), checked without a GPU.

Each model's graphs are built, and its ``on_train_start``, one training step and one
``model(graphs)`` + ``score`` run, *as on* ``--device cuda`` while every tensor stays on the CPU
(:func:`pretend_cuda`): the code is handed ``torch.device("cuda")``, ``Tensor.device`` answers
``cuda`` (so runtime switches such as ``x.device.type == "cpu"`` take the accelerator branch),
and a torch function mode serves ``device=cuda`` requests on the CPU. The ``meta`` device cannot
stand in: torch's sparse CSR product has no meta kernel. Then:

* ``build_graphs(data, cuda)`` must hold torch tensors only, no SciPy matrix (RMBRec keeps its
  SciPy CSR copy only when ``device.type == "cpu"`` and ``cpu_kernel: scipy``);
* the step, the forward pass and the scores run with SciPy's sparse products and CSR row
  slicing made to raise, and with ``Tensor.numpy()`` refused unless the tensor was copied to the
  host first (``.cpu()``), as CUDA refuses it.

Graph *construction* may use SciPy (once, on the host, before ``to_device``); the samplers are
host code and run outside the ban. Control cases check that the ban does catch the CPU SciPy
kernels (RMBRec's ``cpu_kernel: scipy``, ``mbrec.graph.propagate`` on row subsets), so these
tests cannot pass vacuously.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from scipy.sparse import _base, _compressed
from torch.overrides import TorchFunctionMode

from mbrec.config import build_config
from mbrec.models.base import available_models
from mbrec.rundir import build_model, load_data
from mbrec.train import set_seed, train_step

REPO = Path(__file__).resolve().parents[1]
CUDA = torch.device("cuda")


class SciPyOnAcceleratorPath(AssertionError):
    pass


def _is_accelerator(device: Any) -> bool:
    try:
        return device is not None and not isinstance(device, bool) and torch.device(device).type == "cuda"
    except (TypeError, RuntimeError, ValueError):
        return False


def _is_cpu(device: Any) -> bool:
    try:
        return device is not None and not isinstance(device, bool) and torch.device(device).type == "cpu"
    except (TypeError, RuntimeError, ValueError):
        return False


class _CudaOnCpu(TorchFunctionMode):
    """Factories and ``.to``/``.cuda`` asked for ``cuda`` get the CPU. With ``forbid_host_copies``,
    ``Tensor.numpy()`` raises, as for a CUDA tensor, unless the tensor came from ``.cpu()`` /
    ``.to("cpu")`` (an explicit copy to the host, which works on CUDA too)."""

    def __init__(self, forbid_host_copies: bool) -> None:
        super().__init__()
        self.forbid_host_copies = forbid_host_copies
        self.host: dict[int, torch.Tensor] = {}  # id -> tensor (held, so the id stays its own)

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = dict(kwargs or {})
        if _is_accelerator(kwargs.get("device")):
            kwargs["device"] = torch.device("cpu")
        name = getattr(func, "__name__", "")
        if name == "cuda":
            return args[0]
        if name == "numpy" and self.forbid_host_copies and id(args[0]) not in self.host:
            raise SciPyOnAcceleratorPath("Tensor.numpy() of an accelerator tensor (CUDA refuses it)")
        to_cpu = any(_is_cpu(a) for a in args[1:]) or _is_cpu(kwargs.get("device"))
        to_host = name == "cpu" or (name == "to" and to_cpu)
        if name == "to":
            args = tuple(torch.device("cpu") if _is_accelerator(a) else a for a in args)
        out = func(*args, **kwargs)
        if to_host and isinstance(out, torch.Tensor):
            if out is args[0]:  # a CPU tensor's .cpu() is itself: keep the "accelerator" one apart
                out = out.clone()
            self.host[id(out)] = out
        return out


@contextlib.contextmanager
def pretend_cuda(forbid_host_copies: bool = False) -> Iterator[None]:
    """Run code as if its tensors lived on ``cuda`` while they stay on the CPU: ``Tensor.device``
    says ``cuda`` (so runtime checks such as ``x.device.type == "cpu"`` take the accelerator
    branch), ``is_cuda``/``is_cpu`` agree, and ``device=cuda`` requests are served on the CPU.
    (The ``meta`` device cannot stand in: torch's sparse CSR product has no meta kernel.)"""
    props = {"device": property(lambda self: CUDA), "is_cuda": property(lambda self: True),
             "is_cpu": property(lambda self: False)}
    assert not any(k in torch.Tensor.__dict__ for k in props)
    try:
        for k, v in props.items():
            setattr(torch.Tensor, k, v)
        with _CudaOnCpu(forbid_host_copies):
            yield
    finally:
        for k in props:
            if k in torch.Tensor.__dict__:
                delattr(torch.Tensor, k)


@contextlib.contextmanager
def no_scipy_sparse_products() -> Iterator[None]:
    """Every SciPy sparse product (``@``, ``*``, ``.dot``, vector/matrix/sparse kernels) and row
    slicing raise while this is active."""

    def refuse(what: str):
        def raiser(self, *args, **kwargs):
            raise SciPyOnAcceleratorPath(f"SciPy sparse {what} on the accelerator path ({type(self).__name__})")

        return raiser

    patched = [
        (_base._spbase, name) for name in ("_matmul_dispatch", "_rmatmul_dispatch", "dot", "_matmul_vector",
                                           "_matmul_multivector", "_matmul_sparse")
    ] + [(_compressed._cs_matrix, name) for name in ("_matmul_vector", "_matmul_multivector", "_matmul_sparse",
                                                     "__getitem__")]
    saved = [(cls, name, cls.__dict__[name]) for cls, name in patched if name in cls.__dict__]
    try:
        for cls, name, _ in saved:
            setattr(cls, name, refuse(name.strip("_")))
        yield
    finally:
        for cls, name, original in saved:
            setattr(cls, name, original)


def scipy_objects(obj: Any, path: str = "graphs") -> list[str]:
    """Where ``obj`` (lists, tuples, dicts, dataclasses, objects' attributes) holds SciPy matrices."""
    if isinstance(obj, (sp.spmatrix, getattr(sp, "sparray", sp.spmatrix))):
        return [path]
    if isinstance(obj, torch.Tensor) or obj is None or isinstance(obj, (int, float, str, np.ndarray)):
        return []
    if isinstance(obj, dict):
        return [p for k, v in obj.items() for p in scipy_objects(v, f"{path}[{k!r}]")]
    if isinstance(obj, (list, tuple)):
        return [p for i, v in enumerate(obj) for p in scipy_objects(v, f"{path}[{i}]")]
    if dataclasses.is_dataclass(obj):
        return [p for f in dataclasses.fields(obj) for p in scipy_objects(getattr(obj, f.name), f"{path}.{f.name}")]
    if hasattr(obj, "__dict__"):
        return [p for k, v in vars(obj).items() for p in scipy_objects(v, f"{path}.{k}")]
    return []


def _setup(name: str, overrides: list[str] | None = None):
    cfg = build_config(name, "synthetic", config_file=REPO / "configs" / name / "synthetic.yaml", overrides=overrides)
    data = load_data(cfg)
    set_seed(cfg.seed)
    return cfg, data


def _step_and_score(model, graphs, data, device: torch.device) -> dict[str, torch.Tensor]:
    """``on_train_start`` (pretraining), one ``train_step``, ``model(graphs)`` and ``score`` of
    every scored behavior (and ``embed(graphs, (b,))``, the evaluator's entry, where it exists),
    as on ``device`` (``cuda``: emulated), with SciPy products refused."""
    batch = next(iter(model.make_sampler(data).epoch(np.random.default_rng(0))))  # host code, outside the ban
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, foreach=False)  # torch's own CUDA choices are not tested
    users = torch.arange(min(8, data.n_users))
    scores = {}
    route = pretend_cuda(forbid_host_copies=True) if device.type == "cuda" else contextlib.nullcontext()
    with route, no_scipy_sparse_products():
        model.on_train_start(data, graphs, device)
        terms = train_step(model, graphs, batch, opt, device)
        assert torch.isfinite(terms["loss"]), terms
        model.eval()
        with torch.no_grad():
            emb = model(graphs)
            for b in model.scored_behaviors:
                scores[b] = model.score(emb, users.to(device), b)
                if hasattr(model, "embed"):  # the evaluator's entry: only what task b scores with
                    torch.testing.assert_close(model.score(model.embed(graphs, (b,)), users.to(device), b), scores[b])
    return scores


#: every registered model with its synthetic config, plus the options that switch code paths
CASES = [(name, []) for name in available_models()] + [
    ("lightgcn", ["model_args.mode=merged"]),
    ("lightgcn", ["model_args.mode=per_behavior"]),
    ("rmbrec", ["model_args.orm=irm_v2_code"]),  # the plain (unfused) autograd path
    ("rmbrec", ["model_args.encoder=lightgcn"]),
    ("rmbrec", ["model_args.padding=masked"]),
    ("copf", ["model_args.variant=wo_dfme"]),
    ("copf", ["model_args.variant=wo_cogcn"]),
    ("mbcgcn", ["model_args.pretrain_epochs=1"]),
    ("mbcgcn", ["model_args.pretrain_epochs=1", "model_args.pretrain_model=gcn"]),
]


@pytest.mark.parametrize(("name", "overrides"), CASES, ids=[" ".join([n, *o]) for n, o in CASES])
def test_cuda_route_uses_no_scipy(name: str, overrides: list[str]) -> None:
    cfg, data = _setup(name, overrides)
    with pretend_cuda():
        model = build_model(cfg, data, CUDA)
        graphs = model.build_graphs(data, CUDA)
    found = scipy_objects(graphs)
    assert not found, f"{name}: graphs built for cuda hold SciPy matrices at {found}"
    scores = _step_and_score(model, graphs, data, CUDA)
    assert set(scores) == set(model.scored_behaviors)
    for s in scores.values():
        assert s.shape == (min(8, data.n_users), data.n_items) and torch.isfinite(s).all()


def test_rmbrec_cuda_route_ignores_cpu_kernel_scipy() -> None:
    """``cpu_kernel: scipy`` (the default) is a CPU setting: on cuda the graphs carry no SciPy copy."""
    cfg, data = _setup("rmbrec", ["model_args.cpu_kernel=scipy"])
    with pretend_cuda():
        model = build_model(cfg, data, CUDA)
        graphs = model.build_graphs(data, CUDA)
    assert all(g.csr is None for g in graphs)
    _step_and_score(model, graphs, data, CUDA)


def test_the_ban_catches_rmbrec_cpu_scipy_kernel() -> None:
    """Control: on CPU with ``cpu_kernel: scipy`` RMBRec does use SciPy, and the ban sees it."""
    cfg, data = _setup("rmbrec", ["model_args.cpu_kernel=scipy"])
    cpu = torch.device("cpu")
    model = build_model(cfg, data, cpu)
    graphs = model.build_graphs(data, cpu)
    assert scipy_objects(graphs)
    with pytest.raises(SciPyOnAcceleratorPath):
        _step_and_score(model, graphs, data, cpu)


def test_rmbrec_torch_kernel_on_cpu_uses_no_scipy() -> None:
    """``cpu_kernel: torch`` on CPU is the GPU's code path: no SciPy in the step either."""
    cfg, data = _setup("rmbrec", ["model_args.cpu_kernel=torch"])
    cpu = torch.device("cpu")
    model = build_model(cfg, data, cpu)
    graphs = model.build_graphs(data, cpu)
    assert not scipy_objects(graphs)
    _step_and_score(model, graphs, data, cpu)


def test_pretend_cuda_switches_runtime_device_checks() -> None:
    """The emulation itself: runtime checks see ``cuda``, tensors stay usable on the CPU, a bare
    ``.numpy()`` is refused while ``.cpu().numpy()`` works, and everything is undone afterwards."""
    x = torch.ones(3)
    with pretend_cuda(forbid_host_copies=True):
        assert x.device.type == "cuda" and x.is_cuda and not x.is_cpu
        y = torch.zeros(3, device=x.device) + x.to("cuda")
        assert y.sum().item() == 3.0
        with pytest.raises(SciPyOnAcceleratorPath):
            y.numpy()
        assert y.cpu().numpy().sum() == 3.0
    assert x.device.type == "cpu" and not x.is_cuda and x.is_cpu
    assert x.numpy().sum() == 3.0


def test_shared_row_propagation_takes_the_torch_branch_on_cuda() -> None:
    """``mbrec.graph.propagate`` (rows subset) uses SciPy on CPU only: the ban sees it on CPU,
    not under the emulated CUDA device."""
    from mbrec import graph

    if not hasattr(graph, "propagate"):
        pytest.skip("mbrec.graph.propagate does not exist in this version")
    A = sp.random(30, 30, density=0.2, format="csr", dtype=np.float32, random_state=0)
    g = graph.to_device(A + A.T, "cpu", symmetric=True)
    x = torch.randn(30, 4, requires_grad=True)
    rows = torch.tensor([1, 5, 7])
    with no_scipy_sparse_products():
        with pytest.raises(SciPyOnAcceleratorPath):
            graph.propagate(g, x, rows)
        with pretend_cuda(forbid_host_copies=True):
            out = graph.propagate(g, x, rows)
            out.sum().backward()
    expected = torch.from_numpy((A + A.T).toarray()[[1, 5, 7]]) @ x.detach()
    torch.testing.assert_close(out.detach(), expected)
