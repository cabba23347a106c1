"""Speed of lossd's losses against straightforward implementations of the same formulas.

For each main loss, times forward + backward (the gradient of every input) at a realistic
size, for lossd and for a textbook version written below (the formula as papers and
reference repositories write it, without tricks). First checks that both agree, then
prints the median of several repeats and the ratio lossd / textbook (< 1: lossd is faster).

    python benchmarks/loss_speed.py            # realistic sizes
    python benchmarks/loss_speed.py --quick    # small sizes, a smoke test
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from lossd.losses import (
    BarlowTwinsLoss,
    DCLLoss,
    DINOLoss,
    KoLeoLoss,
    MSNLoss,
    NTXentLoss,
    SwaVLoss,
    TiCoLoss,
    VICRegLoss,
    state_transaction,
)

Inputs = list[Tensor]
Step = Callable[[Inputs], tuple[Tensor, Sequence[Tensor | None]]]


def forward_backward(
    loss_fn: Callable[[Inputs], Tensor], inputs: Inputs
) -> tuple[Tensor, Sequence[Tensor | None]]:
    """The loss and its gradient with respect to every input (None where none is asked)."""
    loss = loss_fn(inputs)
    wanted = [x for x in inputs if x.requires_grad]
    found = iter(torch.autograd.grad(loss.sum(), wanted, allow_unused=True))
    return loss.detach(), [next(found) if x.requires_grad else None for x in inputs]


# -- textbook implementations ------------------------------------------------------------------


def ntxent_textbook(out0: Tensor, out1: Tensor, tau: float) -> Tensor:
    """SimCLR: four B x B similarity blocks, self-similarities removed, one cross entropy."""
    batch = out0.shape[0]
    z0, z1 = F.normalize(out0, dim=1), F.normalize(out1, dim=1)
    l00 = torch.einsum("nc,mc->nm", z0, z0) / tau
    l01 = torch.einsum("nc,mc->nm", z0, z1) / tau
    l10 = torch.einsum("nc,mc->nm", z1, z0) / tau
    l11 = torch.einsum("nc,mc->nm", z1, z1) / tau
    off = ~torch.eye(batch, dtype=torch.bool)
    l00 = l00[off].view(batch, batch - 1)
    l11 = l11[off].view(batch, batch - 1)
    logits = torch.cat([torch.cat([l01, l00], dim=1), torch.cat([l10, l11], dim=1)])
    labels = torch.arange(batch).repeat(2)
    return F.cross_entropy(logits, labels)


class MocoTextbook:
    """MoCo: logits [<q, k>, <q, queue>] / tau with label 0; enqueue k after backward."""

    def __init__(self, queue: Tensor, tau: float) -> None:
        self.queue = queue.clone()  # (K, D)
        self.ptr = 0
        self.tau = tau

    def step(self, inputs: Inputs) -> tuple[Tensor, Sequence[Tensor | None]]:
        def loss_fn(xs: Inputs) -> Tensor:
            q, k = F.normalize(xs[0], dim=1), F.normalize(xs[1], dim=1)
            positive = torch.einsum("nc,nc->n", q, k).unsqueeze(1)
            negative = torch.einsum("nc,kc->nk", q, self.queue)
            logits = torch.cat([positive, negative], dim=1) / self.tau
            self._keys = k.detach()
            return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long))

        result = forward_backward(loss_fn, inputs)
        n, b = self.queue.shape[0], self._keys.shape[0]  # enqueue, dropping what does not fit
        fit = min(b, n - self.ptr)
        self.queue[self.ptr : self.ptr + fit] = self._keys[:fit]
        self.ptr = (self.ptr + fit) % n
        return result


def dcl_textbook(out0: Tensor, out1: Tensor, tau: float) -> Tensor:
    """DCL: -<x_i, y_i>/tau + logsumexp over the 2B - 2 negatives, both directions."""
    x, y = F.normalize(out0, dim=1), F.normalize(out1, dim=1)
    batch = x.shape[0]
    eye = torch.eye(batch, dtype=torch.bool)

    def one_way(a: Tensor, b: Tensor) -> Tensor:
        within = (a @ a.T / tau).masked_fill(eye, -math.inf)
        between = a @ b.T / tau
        positive = between.diagonal()
        negatives = torch.cat([within, between.masked_fill(eye, -math.inf)], dim=1)
        return (-positive + torch.logsumexp(negatives, dim=1)).mean()

    return 0.5 * (one_way(x, y) + one_way(y, x))


def barlow_textbook(z_a: Tensor, z_b: Tensor, lambd: float) -> Tensor:
    """Barlow Twins pseudo-code: standardize, cross-correlation, weight the off-diagonal."""
    n, d = z_a.shape

    def standardize(z: Tensor) -> Tensor:
        return (z - z.mean(0)) / torch.sqrt(z.var(0, unbiased=False) + 1e-5)

    c = standardize(z_a).T @ standardize(z_b) / n
    eye = torch.eye(d, dtype=torch.bool)
    c_diff = (c - eye.float()).pow(2)
    return c_diff[eye].sum() + lambd * c_diff[~eye].sum()


def vicreg_textbook(x: Tensor, y: Tensor) -> Tensor:
    """VICReg pseudo-code (lambda = mu = 25, nu = 1)."""
    n, d = x.shape
    invariance = F.mse_loss(x, y)
    x, y = x - x.mean(0), y - y.mean(0)
    std_x, std_y = torch.sqrt(x.var(0) + 1e-4), torch.sqrt(y.var(0) + 1e-4)
    variance = (F.relu(1 - std_x).mean() + F.relu(1 - std_y).mean()) / 2
    cov_x, cov_y = x.T @ x / (n - 1), y.T @ y / (n - 1)
    off = ~torch.eye(d, dtype=torch.bool)
    covariance = cov_x[off].pow(2).sum() / d + cov_y[off].pow(2).sum() / d
    return 25.0 * invariance + 25.0 * variance + 1.0 * covariance


class DinoTextbook:
    """DINO's reference loop over (teacher view, student view) pairs, then the center EMA."""

    def __init__(
        self,
        dim: int,
        n_teacher: int,
        tau_t: float = 0.04,
        tau_s: float = 0.1,
        momentum: float = 0.9,
    ) -> None:
        self.center = torch.zeros(1, dim)
        self.n_teacher, self.tau_t, self.tau_s, self.m = n_teacher, tau_t, tau_s, momentum

    def step(self, inputs: Inputs) -> tuple[Tensor, Sequence[Tensor | None]]:
        def loss_fn(xs: Inputs) -> Tensor:
            teacher, student = xs[: self.n_teacher], xs[self.n_teacher :]
            total, terms = torch.zeros(()), 0
            for iq, t in enumerate(teacher):
                q = F.softmax((t - self.center) / self.tau_t, dim=-1)
                for v, s in enumerate(student):
                    if v == iq:
                        continue
                    total = (
                        total + torch.sum(-q * F.log_softmax(s / self.tau_s, dim=-1), dim=-1).mean()
                    )
                    terms += 1
            with torch.no_grad():
                batch_center = torch.cat(teacher).mean(dim=0, keepdim=True)
                self._next = self.center * self.m + batch_center * (1 - self.m)
            return total / terms

        result = forward_backward(loss_fn, inputs)
        self.center = self._next
        return result


@torch.no_grad()
def sinkhorn_textbook(scores: Tensor, iterations: int = 3, epsilon: float = 0.05) -> Tensor:
    """SwaV's distributed_sinkhorn without the distribution: exp, normalize, alternate."""
    q = torch.exp(scores / epsilon).T
    q /= q.sum()
    k, b = q.shape
    for _ in range(iterations):
        q /= q.sum(dim=1, keepdim=True)
        q /= k
        q /= q.sum(dim=0, keepdim=True)
        q /= b
    return (q * b).T


def swav_textbook(highs: Inputs, lows: Inputs, tau: float = 0.1) -> Tensor:
    """SwaV's training loop: codes from each high-resolution crop predict every other crop."""
    views = highs + lows
    loss = torch.zeros(())
    for i, high in enumerate(highs):
        q = sinkhorn_textbook(high.detach())
        sub = torch.zeros(())
        for v, z in enumerate(views):
            if v != i:
                sub = sub - torch.mean(torch.sum(q * F.log_softmax(z / tau, dim=1), dim=1))
        loss = loss + sub / (len(views) - 1)
    return loss / len(highs)


def msn_textbook(
    anchors: Tensor, targets: Tensor, prototypes: Tensor, tau: float = 0.1, sharpen: float = 0.25
) -> Tensor:
    """MSN: anchor assignments vs sharpened, Sinkhorn-balanced targets, plus me-max."""
    a, t, p = (F.normalize(x, dim=1) for x in (anchors, targets, prototypes))
    probs = F.softmax(a @ p.T / tau, dim=1)
    with torch.no_grad():
        target_probs = F.softmax(t @ p.T / tau, dim=1) ** (1 / sharpen)
        target_probs /= target_probs.sum(dim=1, keepdim=True)
        q = target_probs.T / target_probs.sum()  # Sinkhorn: prototypes x samples
        k, b = q.shape
        for _ in range(3):
            q = q / q.sum(dim=1, keepdim=True) / k
            q = q / q.sum(dim=0, keepdim=True) / b
        target_probs = (q * b).T.repeat(anchors.shape[0] // targets.shape[0], 1)
    cross_entropy = torch.mean(torch.sum(-target_probs * torch.log(probs), dim=1))
    mean_probs = probs.mean(dim=0)
    me_max = torch.sum(mean_probs * torch.log(mean_probs)) + math.log(k)
    return cross_entropy + me_max


class TicoTextbook:
    """TiCo: invariance + rho * x^T C x with C a running mean of x^T x / B."""

    def __init__(self, beta: float = 0.9, rho: float = 8.0) -> None:
        self.C: Tensor | None = None
        self.beta, self.rho = beta, rho

    def step(self, inputs: Inputs) -> tuple[Tensor, Sequence[Tensor | None]]:
        def loss_fn(xs: Inputs) -> Tensor:
            x, y = F.normalize(xs[0], dim=1), F.normalize(xs[1], dim=1)
            batch_cov = (x.T @ x).detach() / x.shape[0]
            previous = torch.zeros_like(batch_cov) if self.C is None else self.C
            self._next = self.beta * previous + (1 - self.beta) * batch_cov
            invariance = 1 - (x * y).sum(dim=1).mean()
            return invariance + self.rho * (x @ self._next * x).sum(dim=1).mean()

        result = forward_backward(loss_fn, inputs)
        self.C = self._next
        return result


def koleo_textbook(x: Tensor, eps: float = 1e-8) -> Tensor:
    """DINOv2's KoLeo: the distance of each point to its nearest neighbour on the sphere."""
    x = F.normalize(x, p=2, dim=-1, eps=eps)
    with torch.no_grad():
        dots = x @ x.T
        dots.view(-1)[:: x.shape[0] + 1].fill_(-1)  # not its own neighbour
        neighbour = dots.argmax(dim=1)
    distances = F.pairwise_distance(x, x[neighbour], p=2, eps=eps)
    return -torch.log(distances + eps).mean()


# -- the benchmarks ------------------------------------------------------------------------


@dataclass
class Bench:
    """One row: inputs, and fresh steps (forward + backward) for lossd and the textbook."""

    name: str
    size: str
    inputs: Callable[[], Inputs]
    lossd: Callable[[], Step]
    textbook: Callable[[], Step]


def _plain(fn: Callable[[Inputs], Tensor]) -> Callable[[], Step]:
    return lambda: lambda xs: forward_backward(fn, xs)


def _in_transaction(
    module: torch.nn.Module, fn: Callable[[torch.nn.Module, Inputs], Tensor]
) -> Step:
    """forward + backward inside one state_transaction, as the server runs a step."""

    def step(xs: Inputs) -> tuple[Tensor, Sequence[Tensor | None]]:
        with state_transaction(module):
            return forward_backward(lambda ys: fn(module, ys), xs)

    return step


def _randn(*shape: int) -> Tensor:
    return torch.randn(*shape).requires_grad_()


def _scores(batch: int, prototypes: int, dim: int = 128) -> Tensor:
    """SwaV's inputs: cosine similarities of unit features and unit prototypes."""
    features = F.normalize(torch.randn(batch, dim), dim=1)
    return (features @ F.normalize(torch.randn(prototypes, dim), dim=1).T).requires_grad_()


def benches(quick: bool) -> list[Bench]:
    """The table's rows; `quick` divides the sizes for a smoke test."""
    s = 8 if quick else 1

    def n(value: int) -> int:
        return max(4, value // s)

    b, d = n(512), n(128)
    bank_b, bank_n = n(256), n(65536)
    bank = F.normalize(torch.randn(bank_n, d), dim=1)

    def ntxent_bank(transaction: bool) -> Callable[[], Step]:
        def make() -> Step:
            module = NTXentLoss(temperature=0.2, memory_bank_size=(bank_n, d))
            module.memory_bank.load_state_dict({"bank": bank, "bank_ptr": torch.zeros(1).long()})
            if transaction:
                return _in_transaction(module, lambda m, xs: m(*xs))
            return lambda xs: forward_backward(lambda ys: module(*ys), xs)

        return make

    bt_b, bt_d = n(256), n(2048)
    dino_b, dino_d, n_t, n_s = n(128), n(16384), 2, 6
    sw_b, sw_k, n_high, n_low = n(256), n(3000), 2, 4
    msn_b, msn_d, msn_k, msn_v = n(256), n(256), n(1024), 2
    tico_b, tico_d = n(256), n(1024)
    ko_b, ko_d = n(512), n(768)

    def dino_lossd() -> Step:
        module = DINOLoss(output_dim=dino_d, teacher_temp=0.04)
        return _in_transaction(module, lambda m, xs: m(xs[:n_t], xs[n_t:]))

    return [
        Bench(
            "NTXent",
            f"B={b} D={d}",
            lambda: [_randn(b, d), _randn(b, d)],
            _plain(lambda xs: NTXentLoss(temperature=0.5)(*xs)),
            _plain(lambda xs: ntxent_textbook(xs[0], xs[1], tau=0.5)),
        ),
        Bench(
            "NTXent + bank",
            f"B={bank_b} D={d} bank={bank_n}",
            lambda: [_randn(bank_b, d), _randn(bank_b, d)],
            ntxent_bank(False),
            lambda: MocoTextbook(bank, 0.2).step,
        ),
        Bench(
            "NTXent + bank (transaction)",
            f"B={bank_b} D={d} bank={bank_n}",
            lambda: [_randn(bank_b, d), _randn(bank_b, d)],
            ntxent_bank(True),
            lambda: MocoTextbook(bank, 0.2).step,
        ),
        Bench(
            "DCL",
            f"B={b} D={d}",
            lambda: [_randn(b, d), _randn(b, d)],
            _plain(lambda xs: DCLLoss(temperature=0.1)(*xs)),
            _plain(lambda xs: dcl_textbook(xs[0], xs[1], tau=0.1)),
        ),
        Bench(
            "BarlowTwins",
            f"B={bt_b} D={bt_d}",
            lambda: [_randn(bt_b, bt_d), _randn(bt_b, bt_d)],
            _plain(lambda xs: BarlowTwinsLoss()(*xs)),
            _plain(lambda xs: barlow_textbook(xs[0], xs[1], lambd=5e-3)),
        ),
        Bench(
            "VICReg",
            f"B={bt_b} D={bt_d}",
            lambda: [_randn(bt_b, bt_d), _randn(bt_b, bt_d)],
            _plain(lambda xs: VICRegLoss()(*xs)),
            _plain(lambda xs: vicreg_textbook(*xs)),
        ),
        Bench(
            "DINO",
            f"B={dino_b} D={dino_d} views={n_t}+{n_s}",
            lambda: [_randn(dino_b, dino_d) for _ in range(n_t + n_s)],
            dino_lossd,
            lambda: DinoTextbook(dino_d, n_t).step,
        ),
        Bench(
            "SwaV",
            f"B={sw_b} K={sw_k} crops={n_high}+{n_low}",
            lambda: [_scores(sw_b, sw_k) for _ in range(n_high + n_low)],
            _plain(lambda xs: SwaVLoss()(xs[:n_high], xs[n_high:])),
            _plain(lambda xs: swav_textbook(xs[:n_high], xs[n_high:])),
        ),
        Bench(
            "MSN",
            f"B={msn_b}x{msn_v} D={msn_d} K={msn_k}",
            lambda: [_randn(msn_v * msn_b, msn_d), torch.randn(msn_b, msn_d), _randn(msn_k, msn_d)],
            _plain(lambda xs: MSNLoss()(*xs)),
            _plain(lambda xs: msn_textbook(xs[0], xs[1], xs[2])),
        ),
        Bench(
            "TiCo",
            f"B={tico_b} D={tico_d}",
            lambda: [_randn(tico_b, tico_d), _randn(tico_b, tico_d)],
            lambda: _in_transaction(TiCoLoss(), lambda m, xs: m(*xs)),
            lambda: TicoTextbook().step,
        ),
        Bench(
            "KoLeo",
            f"B={ko_b} D={ko_d}",
            lambda: [_randn(ko_b, ko_d)],
            _plain(lambda xs: KoLeoLoss()(*xs)),
            _plain(lambda xs: koleo_textbook(xs[0])),
        ),
    ]


# -- running -----------------------------------------------------------------------------------


def check_agreement(bench: Bench, steps: int = 2) -> str:
    """Run fresh lossd and textbook steps on the same inputs; raise if they disagree."""
    torch.manual_seed(0)
    lossd_step, textbook_step = bench.lossd(), bench.textbook()
    worst = 0.0
    for _ in range(steps):  # a second step exercises the state (bank, center, C)
        inputs = bench.inputs()
        value, grads = lossd_step(inputs)
        ref_value, ref_grads = textbook_step(inputs)
        torch.testing.assert_close(
            value.reshape(()),
            ref_value.reshape(()),
            rtol=1e-4,
            atol=1e-5,
            msg=lambda m: f"{bench.name}: loss: {m}",
        )
        for i, (g, r) in enumerate(zip(grads, ref_grads, strict=True)):
            if r is None:
                assert g is None or not g.abs().any(), f"{bench.name}: grad {i}"
                continue
            assert g is not None, f"{bench.name}: no gradient for input {i}"
            scale = r.abs().max().item()
            where = f"{bench.name}: grad {i}"
            torch.testing.assert_close(
                g, r, rtol=1e-3, atol=1e-5 * max(scale, 1e-3), msg=lambda m, w=where: f"{w}: {m}"
            )
            worst = max(worst, ((g - r).abs().max() / max(scale, 1e-12)).item())
    return f"{worst:.1e}"


def time_pair(bench: Bench, repeats: int, warmup: int = 2) -> dict[str, list[float]]:
    """Seconds of each timed forward + backward, for lossd and for the textbook.

    The two run interleaved (in alternating order), so that a change in the machine's load
    affects both alike; inputs are built outside the clock.
    """
    steps = {"lossd": bench.lossd(), "textbook": bench.textbook()}
    times: dict[str, list[float]] = {"lossd": [], "textbook": []}
    for i in range(warmup + repeats):
        order = ["lossd", "textbook"] if i % 2 == 0 else ["textbook", "lossd"]
        for name in order:
            inputs = bench.inputs()
            start = time.perf_counter()
            steps[name](inputs)
            elapsed = time.perf_counter() - start
            if i >= warmup:
                times[name].append(elapsed)
    return times


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke test)")
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats per row")
    parser.add_argument("--only", default="", help="run the rows whose name contains this")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    rows = [b for b in benches(args.quick) if args.only.lower() in b.name.lower()]
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, CPU; "
        f"median of {args.repeats} forward+backward steps"
    )
    header = (
        f"{'loss':<28} {'size':<30} {'lossd ms':>9} {'textbook ms':>12} {'ratio':>6} "
        f"{'ratio min':>10} {'max grad diff':>14}"
    )
    print(header)
    print("-" * len(header))
    for bench in rows:
        agreement = check_agreement(bench)
        times = time_pair(bench, args.repeats)
        ours, theirs = statistics.median(times["lossd"]), statistics.median(times["textbook"])
        best = min(times["lossd"]) / min(times["textbook"])
        print(
            f"{bench.name:<28} {bench.size:<30} {ours * 1e3:>9.1f} {theirs * 1e3:>12.1f} "
            f"{ours / theirs:>6.2f} {best:>10.2f} {agreement:>14}",
            flush=True,
        )
    print(
        "ratio = lossd / textbook of the medians (< 1: lossd faster); ratio min = the same "
        "of the fastest runs (steadier on a busy machine); max grad diff is relative to the "
        "largest gradient entry"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
