"""The registry describes every loss truthfully: argument names, constructor defaults,
state names, return shapes and which inputs receive gradients."""

from __future__ import annotations

import inspect
from typing import Any

import pytest
import torch

from lossd.losses import MemoryBankModule, registry
from lossd.losses.registry import LOSSES, Kind, LossSpec, Returns
from tests.golden import LOSS_RTOL, leaves
from tests.losses.cases import (
    CASES,
    FIRST_CASE,
    STATEFUL_CASES,
    build,
    case_ids,
    detached_args,
    gradients,
    run_step,
    step_args,
)

_REQUIRED = inspect.Parameter.empty

#: lightly's constructors, in order, with their defaults (from the behavioural spec of
#: lightly.loss; where lightly 1.5 and 1.6 differ, lossd accepts the 1.5 API: the bank's
#: `size=65536`, MSN's `me_max_weight`). `_REQUIRED` marks a parameter without default.
LIGHTLY_CONSTRUCTORS: dict[str, list[tuple[str, Any]]] = {
    "BarlowTwinsLoss": [("lambda_param", 5e-3), ("gather_distributed", False)],
    "CO2Regularizer": [("alpha", 1), ("t_consistency", 0.05), ("memory_bank_size", 0)],
    "DCLLoss": [("temperature", 0.1), ("weight_fn", None), ("gather_distributed", False)],
    "DCLWLoss": [("temperature", 0.1), ("sigma", 0.5), ("gather_distributed", False)],
    "DINOLoss": [
        ("output_dim", 65536),
        ("warmup_teacher_temp", 0.04),
        ("teacher_temp", 0.04),
        ("warmup_teacher_temp_epochs", 30),
        ("student_temp", 0.1),
        ("center_momentum", 0.9),
        ("center_mode", "mean"),
    ],
    "HypersphereLoss": [("t", 1.0), ("lam", 1.0), ("alpha", 2.0)],
    "IBOTPatchLoss": [
        ("output_dim", 65536),
        ("teacher_temp", 0.04),
        ("student_temp", 0.1),
        ("center_mode", "mean"),
        ("center_momentum", 0.9),
    ],
    "KoLeoLoss": [("p", 2), ("eps", 1e-8)],
    "MemoryBankModule": [
        ("size", 65536),
        ("gather_distributed", False),
        ("feature_dim_first", True),
    ],
    "MMCRLoss": [("lmda", 5e-3)],
    "MSNLoss": [
        ("temperature", 0.1),
        ("sinkhorn_iterations", 3),
        ("regularization_weight", 1.0),
        ("gather_distributed", False),
        ("me_max_weight", None),
    ],
    "NegativeCosineSimilarity": [("dim", 1), ("eps", 1e-8)],
    "NTXentLoss": [("temperature", 0.5), ("memory_bank_size", 0), ("gather_distributed", False)],
    "PMSNCustomLoss": [
        ("target_distribution", _REQUIRED),
        ("temperature", 0.1),
        ("sinkhorn_iterations", 3),
        ("regularization_weight", 1),
        ("gather_distributed", False),
    ],
    "PMSNLoss": [
        ("temperature", 0.1),
        ("sinkhorn_iterations", 3),
        ("regularization_weight", 1),
        ("power_law_exponent", 0.25),
        ("gather_distributed", False),
    ],
    "SwaVLoss": [
        ("temperature", 0.1),
        ("sinkhorn_iterations", 3),
        ("sinkhorn_epsilon", 0.05),
        ("sinkhorn_gather_distributed", False),
    ],
    "SymNegCosineSimilarityLoss": [],
    "TiCoLoss": [("beta", 0.9), ("rho", 8.0), ("gather_distributed", False)],
    "VICRegLoss": [
        ("lambda_param", 25.0),
        ("mu_param", 25.0),
        ("nu_param", 1.0),
        ("gather_distributed", False),
        ("eps", 1e-4),
    ],
    "VICRegLLoss": [
        ("lambda_param", 25.0),
        ("mu_param", 25.0),
        ("nu_param", 1.0),
        ("alpha", 0.75),
        ("gather_distributed", False),
        ("eps", 1e-4),
        ("num_matches", (20, 4)),
    ],
}

#: lightly's forward parameters after the tensors, with their defaults.
LIGHTLY_FORWARD_DEFAULTS: dict[str, dict[str, Any]] = {
    "DINOLoss": {"teacher_temp": None, "epoch": None},
    "IBOTPatchLoss": {"teacher_temp": None},
    "MemoryBankModule": {"labels": None, "update": False},
    "MSNLoss": {"target_sharpen_temperature": 0.25},
    "PMSNLoss": {"target_sharpen_temperature": 0.25},
    "PMSNCustomLoss": {"target_sharpen_temperature": 0.25},
    "SwaVLoss": {"queue_outputs": None},
    "TiCoLoss": {"update_covariance_matrix": True},
    "VICRegLLoss": {"local_view_features": None, "local_view_grids": None},
}

#: Losses whose forward returns shape (1,) (they accumulate into `new_zeros(1)`).
RETURNS_SHAPE_1 = {"SwaVLoss", "VICRegLLoss"}

SPECS = list(LOSSES.values())
SPEC_IDS = list(LOSSES)


def test_there_are_twenty_losses_and_the_bank() -> None:
    assert set(LOSSES) == set(LIGHTLY_CONSTRUCTORS)
    assert list(LOSSES) == sorted(LOSSES)


def test_get_names_the_known_losses() -> None:
    assert registry.get("NTXentLoss") is LOSSES["NTXentLoss"]
    with pytest.raises(ValueError, match=r"`loss`.*NTXentLoss"):
        registry.get("NoSuchLoss")


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_arg_names_are_the_forward_parameters(spec: LossSpec) -> None:
    params = list(inspect.signature(spec.cls.forward).parameters)
    assert params[0] == "self"
    assert [a.name for a in spec.args] == params[1:]
    assert spec.name == spec.cls.__name__


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_constructor_matches_lightly(spec: LossSpec) -> None:
    expected = LIGHTLY_CONSTRUCTORS[spec.name]
    params = list(spec.constructor.parameters.values())
    assert [p.name for p in params] == [name for name, _ in expected]
    for param, (name, default) in zip(params, expected, strict=True):
        assert param.default == default, f"{name}: {param.default!r} != {default!r}"
        assert (
            type(param.default) is type(default)
            or default is _REQUIRED
            or (isinstance(default, (int, float)) and isinstance(param.default, (int, float)))
        ), f"{name}: {type(param.default)} vs {type(default)}"
    assert spec.required_config() == tuple(n for n, d in expected if d is _REQUIRED)


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_forward_defaults_match_lightly(spec: LossSpec) -> None:
    expected = LIGHTLY_FORWARD_DEFAULTS.get(spec.name, {})
    for arg in spec.args:
        default = spec.arg_default(arg.name)
        if arg.name in expected:
            assert default == expected[arg.name], arg.name
        else:
            assert default is _REQUIRED, f"{arg.name} should be required"


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_spec_is_consistent(spec: LossSpec) -> None:
    """grad flags fit the kinds; only tensor arguments are per-sample or get gradients."""
    for arg in spec.args:
        if arg.kind in (Kind.TENSOR_PAIR, Kind.PAIR_LIST):
            assert isinstance(arg.grad, tuple) and len(arg.grad) == 2, arg.name
        else:
            assert isinstance(arg.grad, bool), arg.name
        if not arg.is_tensor:
            assert arg.grad is False and arg.batch == registry.Batch.NONE, arg.name
    assert spec.returns == (Returns.OUTPUTS if spec.name == "MemoryBankModule" else Returns.LOSS)
    for arg in spec.args:
        if arg.batch == registry.Batch.VIEW_ROWS:  # the batch size comes from a ROWS argument
            assert spec.arg(arg.views_of).batch == registry.Batch.ROWS, arg.name


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_bank_slot_points_at_a_memory_bank(spec: LossSpec) -> None:
    if spec.bank is None:
        assert not any(s.endswith("bank") for s in spec.state)
        return
    assert spec.bank.size_arg in spec.constructor.parameters
    config = {
        **({"target_distribution": "uniform"} if spec.required_config() else {}),
        spec.bank.size_arg: (4, 3),
    }
    module = spec.cls(**config)
    bank = module.get_submodule(spec.bank.module) if spec.bank.module else module
    assert isinstance(bank, MemoryBankModule) and bank.bank.shape == (4, 3)
    prefix = f"{spec.bank.module}." if spec.bank.module else ""
    assert {f"{prefix}bank", f"{prefix}bank_ptr"} <= set(spec.state)


def test_every_stateful_spec_has_a_stateful_case() -> None:
    stateful = {name for name, spec in LOSSES.items() if spec.state}
    assert stateful == {c["loss"] for c in STATEFUL_CASES}
    assert stateful == {
        "CO2Regularizer",
        "DINOLoss",
        "IBOTPatchLoss",
        "MemoryBankModule",
        "NTXentLoss",
        "TiCoLoss",
    }


@pytest.mark.parametrize("case", CASES, ids=case_ids(CASES))
def test_state_dict_after_one_step_holds_the_spec_state(case: dict[str, Any]) -> None:
    spec = LOSSES[case["loss"]]
    module = build(case, load_state=False)
    run_step(module, case["steps"][0])
    keys = set(module.state_dict())
    has_state = bool(case["steps"][0]["state_after"])  # e.g. NTXent without a bank has none
    assert keys == (set(spec.state) if has_state else set())
    assert keys == set(case["steps"][0]["state_after"])


@pytest.mark.parametrize("case", CASES, ids=case_ids(CASES))
def test_return_shape(case: dict[str, Any]) -> None:
    module = build(case)
    for step in case["steps"]:
        args = step_args(step)
        result = module(**args)
        if case["loss"] == "MemoryBankModule":
            output, bank = result
            assert output is args["output"]  # returned unchanged, as lightly does
            assert bank is not None and not bank.requires_grad
        elif case["loss"] in RETURNS_SHAPE_1:
            assert result.shape == (1,)
        else:
            assert result.shape == ()


def _expected_grad_flags(spec: LossSpec, args: dict[str, Any]) -> dict[str, Any]:
    """For every tensor in args: True if the spec says it receives a gradient."""
    flags: dict[str, Any] = {}
    for arg in spec.args:
        if arg.name not in args or args[arg.name] is None or not arg.is_tensor:
            continue
        value = args[arg.name]
        if arg.kind == Kind.TENSOR:
            flags[arg.name] = arg.grad
        elif arg.kind == Kind.TENSOR_LIST:
            flags[arg.name] = [arg.grad] * len(value)
        elif arg.kind == Kind.TENSOR_PAIR:
            flags[arg.name] = arg.grad
        else:  # PAIR_LIST
            flags[arg.name] = [arg.grad] * len(value)
    return flags


def _flatten_flags(flags: Any) -> list[bool]:
    if isinstance(flags, bool):
        return [flags]
    return [f for item in flags for f in _flatten_flags(item)]


@pytest.mark.parametrize(
    "case",
    [FIRST_CASE[n] for n in LOSSES if n != "MemoryBankModule"]
    + [
        c
        for c in CASES
        if c["name"] in ("SwaVLoss/queue", "VICRegLLoss/global+local", "CO2Regularizer/bank")
    ],
    ids=lambda c: c["name"],
)
def test_exactly_the_spec_grad_tensors_receive_gradients(case: dict[str, Any]) -> None:
    spec = LOSSES[case["loss"]]
    module = build(case)
    args = step_args(case["steps"][0])
    grads = gradients(module(**args), args)
    flags = _expected_grad_flags(spec, args)
    assert set(flags) == {k for k, v in args.items() if isinstance(v, (torch.Tensor, list, tuple))}
    for name, wanted in flags.items():
        got = [g is not None for g in leaves_or_none(grads[name])]
        assert got == _flatten_flags(wanted), f"{name}: got {got}, spec says {wanted}"
        for g in leaves_or_none(grads[name]):
            if g is not None:
                assert torch.isfinite(g).all() and g.abs().sum() > 0, name


def leaves_or_none(tree: Any) -> list[Any]:
    """The leaves of a gradient tree, keeping the Nones in place."""
    if tree is None or isinstance(tree, torch.Tensor):
        return [tree]
    return [x for item in tree for x in leaves_or_none(item)]


@pytest.mark.parametrize("case", CASES, ids=case_ids(CASES))
def test_runs_under_no_grad_on_inputs_without_grad(case: dict[str, Any]) -> None:
    module = build(case)
    step = case["steps"][0]
    args = detached_args(step)
    with torch.no_grad():
        result = module(**args)
    if step["loss"] is None:
        _, bank = result
        torch.testing.assert_close(bank, step["outputs"]["bank"], rtol=0, atol=0)
        return
    assert not result.requires_grad
    assert result.item() == pytest.approx(step["loss"], rel=LOSS_RTOL)
    assert all(not t.requires_grad for t in leaves(args))
