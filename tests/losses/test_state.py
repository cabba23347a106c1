"""State across steps: round trips through `state_dict()`, lazily shaped state, lightly's
state dicts, `state_transaction`, failed calls, the memory bank's enqueue rule, and when
banks and centers move."""

from __future__ import annotations

import io
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from lossd.losses import (
    CO2Regularizer,
    DINOLoss,
    IBOTPatchLoss,
    MemoryBankModule,
    NTXentLoss,
    TiCoLoss,
    state_transaction,
)
from tests.golden import LOSS_RTOL
from tests.losses.cases import (
    CASES,
    STATEFUL_CASES,
    T,
    assert_same_state,
    assert_trees_equal,
    build,
    case_ids,
    cloned_state,
    detached_args,
    run_step,
    snapshot,
)

BY_NAME = {c["name"]: c for c in CASES}


def _through_bytes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Save and load a state dict as the server would persist it (no pickled code)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


# -- round trips ----------------------------------------------------------------------------

ROUND_TRIPS = [(c, k) for c in STATEFUL_CASES for k in range(1, len(c["steps"]))]


@pytest.mark.parametrize(
    ("case", "k"), ROUND_TRIPS, ids=[f"{c['name']}@{k}" for c, k in ROUND_TRIPS]
)
def test_state_dict_round_trip_continues_identically(case: dict[str, Any], k: int) -> None:
    uninterrupted = build(case)
    for step in case["steps"][:k]:
        run_step(uninterrupted, step)
    saved = _through_bytes(cloned_state(uninterrupted))
    resumed = build(case, load_state=False)  # fresh: a random bank, no center, no C
    resumed.load_state_dict(saved)
    assert_same_state(snapshot(resumed), snapshot(uninterrupted), "after load")
    for i, step in enumerate(case["steps"][k:], start=k):
        expected = run_step(uninterrupted, step)
        actual = run_step(resumed, step)
        assert_trees_equal(actual, expected, f"step {i}")
        assert_same_state(snapshot(resumed), snapshot(uninterrupted), f"step {i}")


def test_round_trips_cover_every_stateful_loss() -> None:
    assert {c["loss"] for c, _ in ROUND_TRIPS} == {
        "CO2Regularizer",
        "DINOLoss",
        "IBOTPatchLoss",
        "MemoryBankModule",
        "NTXentLoss",
        "TiCoLoss",
    }


# -- loading before the first batch ---------------------------------------------------------


def test_tico_covariance_loads_before_the_first_batch() -> None:
    case = BY_NAME["TiCoLoss/covariance"]
    fresh = TiCoLoss(**case["config"])
    assert fresh.C is None and "C" not in fresh.state_dict()
    fresh.load_state_dict(case["steps"][0]["state_after"])
    assert fresh.C is not None and fresh.C.dtype == torch.float32
    for step in case["steps"][1:]:
        result, _ = run_step(fresh, step)
        assert result.item() == pytest.approx(step["loss"], rel=LOSS_RTOL)
        torch.testing.assert_close(fresh.C, step["state_after"]["C"], rtol=LOSS_RTOL, atol=1e-6)


def test_tico_rejects_a_covariance_that_is_not_square() -> None:
    with pytest.raises(RuntimeError, match="square"):
        TiCoLoss().load_state_dict({"C": torch.zeros(3, 4)})


@pytest.mark.parametrize(
    ("name", "make"),
    [
        ("NTXentLoss/moco-bank", lambda: NTXentLoss(temperature=0.2, memory_bank_size=32)),
        (
            "CO2Regularizer/bank",
            lambda: CO2Regularizer(alpha=0.5, t_consistency=0.1, memory_bank_size=32),
        ),
        (
            "MemoryBankModule/feature_dim_first=False",
            lambda: MemoryBankModule(size=32, feature_dim_first=False),
        ),
    ],
    ids=["NTXentLoss", "CO2Regularizer", "MemoryBankModule"],
)
def test_bare_int_bank_loads_before_the_first_batch(name: str, make: Any) -> None:
    """A bank whose dim comes from the first batch accepts lightly's (n, dim) bank first."""
    case = BY_NAME[name]
    module = make()
    assert not any(k.endswith(".bank") or k == "bank" for k in module.state_dict())
    module.load_state_dict(case["state"])
    for i, step in enumerate(case["steps"]):
        result, _ = run_step(module, step)
        if step["loss"] is None:
            torch.testing.assert_close(result[1], step["outputs"]["bank"], rtol=0, atol=0)
        else:
            assert result.item() == pytest.approx(step["loss"], rel=LOSS_RTOL), f"step {i}"
        for key, value in step["state_after"].items():
            torch.testing.assert_close(module.state_dict()[key], value, rtol=LOSS_RTOL, atol=1e-6)


def test_bare_int_bank_takes_its_dim_from_the_first_batch() -> None:
    loss = NTXentLoss(memory_bank_size=8)
    loss(torch.randn(3, 5, requires_grad=True), torch.randn(3, 5))
    assert loss.memory_bank.bank.shape == (8, 5)
    assert loss.memory_bank.bank.dtype == torch.float32
    assert int(loss.memory_bank.bank_ptr) == 3


def test_bank_with_the_wrong_size_does_not_load() -> None:
    with pytest.raises(RuntimeError, match="bank"):
        MemoryBankModule(size=(4, 3)).load_state_dict(
            {"bank": torch.zeros(5, 3), "bank_ptr": torch.zeros(1, dtype=torch.long)}
        )
    with pytest.raises(RuntimeError, match="bank_ptr"):
        MemoryBankModule(size=(4, 3)).load_state_dict(
            {"bank": torch.zeros(4, 3), "bank_ptr": torch.tensor([4])}
        )


# -- lightly's own state dicts --------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "DINOLoss/schedule+center",
        "IBOTPatchLoss/center",
        "NTXentLoss/moco-bank",
        "CO2Regularizer/bank",
    ],
)
def test_lightly_state_dict_loads_as_is(name: str) -> None:
    """The state after lightly's first step (lightly's names and shapes: DINO `center`
    (1, 1, D), iBOT `center.center` (1, D), banks `memory_bank.bank`/`bank_ptr`) loads
    strictly into a fresh instance, which then continues like lightly."""
    case = BY_NAME[name]
    lightly_state = case["steps"][0]["state_after"]
    module = build(case, load_state=False)
    result = module.load_state_dict(lightly_state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for key, value in lightly_state.items():
        assert module.state_dict()[key].shape == value.shape
    step = case["steps"][1]
    value, _ = run_step(module, step)
    assert value.item() == pytest.approx(step["loss"], rel=LOSS_RTOL)
    for key, expected in step["state_after"].items():
        torch.testing.assert_close(module.state_dict()[key], expected, rtol=LOSS_RTOL, atol=1e-6)


def test_dino_and_ibot_state_shapes_are_lightlys() -> None:
    assert DINOLoss(output_dim=7).state_dict()["center"].shape == (1, 1, 7)
    assert IBOTPatchLoss(output_dim=7).state_dict()["center.center"].shape == (1, 7)


# -- state_transaction ----------------------------------------------------------------------


class Boom(Exception):
    """Raised inside a transaction by the tests."""


@pytest.mark.parametrize("case", STATEFUL_CASES, ids=case_ids(STATEFUL_CASES))
def test_transaction_commits_on_clean_exit(case: dict[str, Any]) -> None:
    reference = build(case)
    expected = run_step(reference, case["steps"][0])
    module = build(case)
    before = snapshot(module)
    with state_transaction(module):
        actual = run_step(module, case["steps"][0])  # forward and backward
        assert_same_state(snapshot(module), before, "inside the transaction")
    assert_trees_equal(actual, expected, "result")
    assert_same_state(snapshot(module), snapshot(reference), "after the transaction")
    # and the module goes on like the one that never used a transaction
    for step in case["steps"][1:]:
        assert_trees_equal(run_step(module, step), run_step(reference, step), "later step")


@pytest.mark.parametrize("case", STATEFUL_CASES, ids=case_ids(STATEFUL_CASES))
def test_transaction_drops_changes_when_the_block_raises(case: dict[str, Any]) -> None:
    module = build(case)
    before = snapshot(module)
    with pytest.raises(Boom), state_transaction(module):
        run_step(module, case["steps"][0])
        raise Boom
    assert_same_state(snapshot(module), before, "after the failed block")
    # nothing half-applied (e.g. a host copy of the bank pointer): the step replays exactly
    reference = build(case)
    for step in case["steps"]:
        assert_trees_equal(run_step(module, step), run_step(reference, step), "replay")
        assert_same_state(snapshot(module), snapshot(reference), "replay")


def test_transaction_drops_a_lazily_created_bank() -> None:
    loss = NTXentLoss(memory_bank_size=6)
    with pytest.raises(Boom), state_transaction(loss):
        loss(torch.randn(3, 4, requires_grad=True), torch.randn(3, 4))
        raise Boom
    assert loss.memory_bank.bank is None and int(loss.memory_bank.bank_ptr) == 0


def test_transactions_do_not_nest() -> None:
    loss = DINOLoss(output_dim=4)
    with (
        state_transaction(loss),
        pytest.raises(RuntimeError, match="nested"),
        state_transaction(loss),
    ):
        pass
    # the outer block ended; a new transaction is allowed again
    with state_transaction(loss):
        pass


def test_transaction_on_a_stateless_loss_is_harmless() -> None:
    case = BY_NAME["BarlowTwinsLoss/default"]
    module = build(case)
    with state_transaction(module):
        value, _ = run_step(module, case["steps"][0])
    assert value.item() == pytest.approx(case["steps"][0]["loss"], rel=LOSS_RTOL)


# -- a forward that raises changes nothing ----------------------------------------------------


def _bad_calls() -> list[tuple[str, Any]]:
    """(case name, a function making a bad call on a module that has taken one step)."""
    r = torch.randn
    return [
        ("NTXentLoss/moco-bank", lambda m: m(r(16, 12, requires_grad=True), r(16, 11))),
        ("NTXentLoss/moco-bank", lambda m: m(r(16, 11, requires_grad=True), r(16, 11))),
        ("CO2Regularizer/bank", lambda m: m(r(16, 7), r(16, 7))),
        ("MemoryBankModule/feature_dim_first=True", lambda m: m(r(16, 13), update=True)),
        ("MemoryBankModule/feature_dim_first=True", lambda m: m(r(16, 12), update="yes")),
        (
            "DINOLoss/schedule+center",
            lambda m: m([r(16, 32)] * 2, [r(16, 32)] * 2, teacher_temp=0.0),
        ),
        ("DINOLoss/schedule+center", lambda m: m([r(16, 32)], [r(16, 32)])),
        ("DINOLoss/schedule+center", lambda m: m([r(16, 32)] * 2, [r(16, 32)] * 2, epoch=-99)),
        ("DINOLoss/schedule+center", lambda m: m([r(16, 32)] * 2, [r(16, 32), r(15, 32)])),
        ("IBOTPatchLoss/center", lambda m: m(r(3, 32), r(3, 32), torch.ones(1, 2, 2).bool())),
        (
            "IBOTPatchLoss/center",
            lambda m: m(r(4, 32), r(4, 32), torch.ones(1, 2, 2).bool(), teacher_temp=-1.0),
        ),
        ("TiCoLoss/covariance", lambda m: m(r(1, 12), r(1, 12))),
        ("TiCoLoss/covariance", lambda m: m(r(4, 13), r(4, 13))),
        ("TiCoLoss/covariance", lambda m: m(r(4, 12), r(4, 12), update_covariance_matrix=1)),
    ]


BAD_CALLS = _bad_calls()


@pytest.mark.parametrize("in_transaction", [False, True], ids=["plain", "transaction"])
@pytest.mark.parametrize(
    ("name", "call"), BAD_CALLS, ids=[f"{n}#{i}" for i, (n, _) in enumerate(BAD_CALLS)]
)
def test_a_forward_that_raises_changes_no_state(name: str, call: Any, in_transaction: bool) -> None:
    case = BY_NAME[name]
    module = build(case)
    run_step(module, case["steps"][0])
    before = snapshot(module)
    with pytest.raises(ValueError, match="`"):
        if in_transaction:
            with state_transaction(module):
                call(module)
        else:
            call(module)
    assert_same_state(snapshot(module), before, name)


def test_a_failed_first_call_leaves_a_lazy_bank_unshaped() -> None:
    loss = NTXentLoss(memory_bank_size=6)
    with pytest.raises(ValueError, match="`out0`"):
        loss(torch.randn(3, 4, 2, requires_grad=True), torch.randn(3, 4, 2))
    assert loss.memory_bank.bank is None
    loss(torch.randn(3, 5, requires_grad=True), torch.randn(3, 5))
    assert loss.memory_bank.bank.shape == (6, 5)


# -- the memory bank's enqueue rule -------------------------------------------------------


def test_memory_bank_trace_drops_surplus_rows() -> None:
    """Semantics §2: n=5, batches of 3; rows that do not fit are dropped, never wrapped."""
    bank = MemoryBankModule(size=(5, 2), feature_dim_first=False)
    noise = bank.bank.clone()
    x = [torch.arange(6, dtype=torch.float32).reshape(3, 2) + 10 * i for i in range(4)]

    def stored() -> torch.Tensor:
        return bank.state_dict()["bank"]

    out, returned = bank(x[0], update=True)
    assert out is x[0]
    torch.testing.assert_close(returned, noise, rtol=0, atol=0)  # the bank before the batch
    expected = torch.cat([x[0], noise[3:]])
    torch.testing.assert_close(stored(), expected, rtol=0, atol=0)
    assert int(bank.bank_ptr) == 3

    _, returned = bank(x[1], update=True)
    torch.testing.assert_close(returned, expected, rtol=0, atol=0)
    expected = torch.cat([x[0], x[1][:2]])  # x1's third row is dropped
    torch.testing.assert_close(stored(), expected, rtol=0, atol=0)
    assert int(bank.bank_ptr) == 0

    _, returned = bank(x[2], update=True)
    torch.testing.assert_close(returned, expected, rtol=0, atol=0)
    expected = torch.cat([x[2], x[1][:2]])
    torch.testing.assert_close(stored(), expected, rtol=0, atol=0)
    assert int(bank.bank_ptr) == 3

    _, returned = bank(x[3], update=True)
    torch.testing.assert_close(returned, expected, rtol=0, atol=0)
    torch.testing.assert_close(stored(), torch.cat([x[2], x[3][:2]]), rtol=0, atol=0)
    assert int(bank.bank_ptr) == 0


def test_memory_bank_edge_cases() -> None:
    bank = MemoryBankModule(size=(4, 2))
    big = torch.arange(12, dtype=torch.float32).reshape(6, 2)
    _, returned = bank(big, update=True)
    assert returned.shape == (2, 4)  # feature_dim_first
    torch.testing.assert_close(bank.bank, big[:4], rtol=0, atol=0)  # only the first n rows
    assert int(bank.bank_ptr) == 0
    bank(big[:4] + 100, update=True)  # exactly filling the bank resets the pointer
    assert int(bank.bank_ptr) == 0
    bank(big[:1], update=False)  # no update: nothing moves
    torch.testing.assert_close(bank.bank, big[:4] + 100, rtol=0, atol=0)
    bank(big[:1].double(), update=True)  # stored rows are cast to the bank's dtype
    assert bank.bank.dtype == torch.float32 and int(bank.bank_ptr) == 1
    _, none = MemoryBankModule(size=0)(big, update=True)
    assert none is None


# -- when banks and centers move ------------------------------------------------------------


def _moco() -> NTXentLoss:
    return build(BY_NAME["NTXentLoss/moco-bank"])


def test_ntxent_bank_moves_only_when_out0_requires_grad() -> None:
    step = BY_NAME["NTXentLoss/moco-bank"]["steps"][0]
    a, b = step["args"]["out0"], step["args"]["out1"]
    loss = _moco()
    before = snapshot(loss)
    loss(a.clone(), b.clone().requires_grad_())  # out0 without grad: an evaluation step
    assert_same_state(snapshot(loss), before, "out0 without grad")
    with torch.no_grad():
        loss(a.clone().requires_grad_(), b.clone())
    assert_same_state(snapshot(loss), before, "under no_grad")
    loss(a.clone().requires_grad_(), b.clone())  # out1 without grad still enqueues
    assert int(loss.memory_bank.bank_ptr) == 16
    torch.testing.assert_close(loss.memory_bank.bank[:16], F.normalize(b, dim=1))


def test_ntxent_bank_value_under_no_grad_uses_the_bank() -> None:
    case = BY_NAME["NTXentLoss/moco-bank"]
    loss = build(case)
    with torch.no_grad():
        value = loss(**detached_args(case["steps"][0]))
    assert value.item() == pytest.approx(case["steps"][0]["loss"], rel=LOSS_RTOL)


@pytest.mark.parametrize(
    "name", ["DINOLoss/schedule+center", "IBOTPatchLoss/center", "CO2Regularizer/bank"]
)
def test_centers_and_co2_bank_move_under_no_grad(name: str) -> None:
    """lightly's rule: no_grad does not stop DINO/iBOT center updates or CO2's enqueue."""
    case = BY_NAME[name]
    module = build(case)
    for step in case["steps"]:
        with torch.no_grad():
            module(**detached_args(step))
        for key, expected in step["state_after"].items():
            torch.testing.assert_close(
                module.state_dict()[key], expected, rtol=LOSS_RTOL, atol=1e-6
            )


def test_dino_center_moves_in_eval_mode_too() -> None:
    case = BY_NAME["DINOLoss/schedule+center"]
    module = build(case).eval()
    run_step(module, case["steps"][0])
    torch.testing.assert_close(
        module.center, case["steps"][0]["state_after"]["center"], rtol=LOSS_RTOL, atol=1e-6
    )


# -- bank initialisation ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda: MemoryBankModule(size=(7, 3)).bank,
        lambda: NTXentLoss(memory_bank_size=(7, 3)).memory_bank.bank,
        lambda: CO2Regularizer(memory_bank_size=[7, 3]).memory_bank.bank,
    ],
    ids=["MemoryBankModule", "NTXentLoss", "CO2Regularizer"],
)
def test_bank_init_after_seed_is_normalized_randn(make: Any) -> None:
    torch.manual_seed(0)
    bank = make()
    torch.manual_seed(0)
    expected = F.normalize(torch.randn(7, 3), dim=-1)
    torch.testing.assert_close(bank, expected, rtol=0, atol=0)
    torch.testing.assert_close(bank.norm(dim=1), torch.ones(7))


def test_lazy_bank_init_draws_at_the_first_batch() -> None:
    torch.manual_seed(0)
    module = MemoryBankModule(size=7, feature_dim_first=False)
    _, bank = module(torch.ones(2, 3), update=True)
    torch.manual_seed(0)
    torch.testing.assert_close(bank, F.normalize(torch.randn(7, 3), dim=-1), rtol=0, atol=0)


def test_seeded_ntxent_bank_matches_lightly() -> None:
    """Semantics §7: torch.manual_seed(0); NTXentLoss(memory_bank_size=(5, 6)), calls (a, b)
    then (b, a): 1.58167 / 2.1305, grads of call 1 0.455874 / 0.432664, ptr 0 after."""
    a, b = T(4, 6, s=0), T(4, 6, s=1)
    torch.manual_seed(0)
    loss = NTXentLoss(memory_bank_size=(5, 6))
    x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
    first = loss(x, y)
    first.backward()
    assert first.item() == pytest.approx(1.58167, abs=2e-5)
    assert x.grad.norm().item() == pytest.approx(0.455874, abs=2e-6)
    assert y.grad.norm().item() == pytest.approx(0.432664, abs=2e-6)
    second = loss(b.clone().requires_grad_(), a.clone().requires_grad_())
    assert second.item() == pytest.approx(2.1305, abs=2e-4)
    assert int(loss.memory_bank.bank_ptr) == 0
