"""VICRegLLoss: VICReg on global embeddings plus matched local features."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from . import _checks as check
from .vicreg_loss import VICRegLoss, covariance_loss, invariance_loss, variance_loss

Pair = tuple[Tensor, Tensor]


def nearest_neighbors(
    inputs: Tensor, candidates: Tensor, distances: Tensor, num_matches: int
) -> tuple[Tensor, Tensor]:
    """The `num_matches` input positions closest to their nearest candidate.

    Args:
        inputs: (B, N, D) features.
        candidates: (B, M, D) features.
        distances: (B, N, M) distances between input and candidate positions.
        num_matches: k; at most N are kept (-1: all).

    Returns:
        `(selected inputs, their nearest candidates)`, each (B, k, D), ordered by
        ascending distance (the order matters to VICReg's per-position statistics).
    """
    k = inputs.shape[1] if num_matches == -1 else min(num_matches, inputs.shape[1])
    nn_distance, nn_index = distances.topk(k=1, dim=2, largest=False)  # (B, N, 1) each
    _, keep = nn_distance.squeeze(-1).topk(k=k, dim=1, largest=False)  # (B, k), ascending
    partner = nn_index.squeeze(-1).gather(1, keep)  # (B, k): candidate of each kept input
    return _rows(inputs, keep), _rows(candidates, partner)


def _mean(terms: list[Tensor]) -> Tensor:
    """The mean of the terms, summed in order (as lightly accumulates them)."""
    total = terms[0]
    for term in terms[1:]:
        total = total + term
    return total / len(terms)


def _rows(x: Tensor, index: Tensor) -> Tensor:
    """x (B, N, D) at positions index (B, k) -> (B, k, D)."""
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


class VICRegLLoss(nn.Module):
    """VICRegL ("VICRegL: Self-Supervised Learning of Local Visual Features", Bardes et
    al., 2022).

    Args:
        lambda_param, mu_param, nu_param: VICReg weights (the local terms use nu / 2).
        alpha: weight of the global term; the local term gets 1 - alpha.
        gather_distributed: accepted; see the README on global batches.
        eps: VICReg's variance epsilon (> 0).
        num_matches: (k_a, k_b), how many nearest-neighbour matches to keep in each
            direction of a view pair (-1: all).
    """

    def __init__(
        self,
        lambda_param: float = 25.0,
        mu_param: float = 25.0,
        nu_param: float = 1.0,
        alpha: float = 0.75,
        gather_distributed: bool = False,
        eps: float = 1e-4,
        num_matches: tuple[int, int] = (20, 4),
    ) -> None:
        super().__init__()
        self.alpha = check.number("alpha", alpha)
        self.num_matches = _check_num_matches(num_matches)
        self.lambda_param = check.number("lambda_param", lambda_param)
        self.mu_param = check.number("mu_param", mu_param)
        self.nu_param = check.number("nu_param", nu_param)
        self.eps = check.positive("eps", eps)
        self.gather_distributed = check.flag("gather_distributed", gather_distributed)
        self.vicreg_loss = VICRegLoss(
            lambda_param=lambda_param,
            mu_param=mu_param,
            nu_param=0.5 * self.nu_param,
            gather_distributed=gather_distributed,
            eps=eps,
        )

    def forward(
        self,
        global_view_features: Sequence[Pair],
        global_view_grids: Sequence[Tensor],
        local_view_features: Sequence[Pair] | None = None,
        local_view_grids: Sequence[Tensor] | None = None,
    ) -> Tensor:
        """Loss of global (and optional local) views.

        Args:
            global_view_features: one `(g, l)` pair per global view: g (batch_size,
                dim) the pooled embedding, l (batch_size, H, W, local_dim) the local
                features.
            global_view_grids: one (batch_size, H, W, 2) grid of positions per global view.
            local_view_features: like the global ones, with their own H', W'.
            local_view_grids: (batch_size, H', W', 2) grids of the local views.

        Returns:
            `alpha * global + (1 - alpha) * local`, shape (1,) like lightly.
        """
        globals_, locals_ = _check_views(
            global_view_features, global_view_grids, local_view_features, local_view_grids
        )
        pairs = [
            (a, b)
            for a in range(len(globals_))
            for b in range(len(globals_) + len(locals_))
            if a != b
        ]
        views = globals_ + locals_
        global_loss = self._global_loss([g for (g, _), _ in views], pairs)
        local_loss = _mean([self._local_pair_loss(views[a], views[b]) for a, b in pairs])
        return (self.alpha * global_loss + (1 - self.alpha) * local_loss).reshape(1)

    def _global_loss(self, embeddings: list[Tensor], pairs: list[tuple[int, int]]) -> Tensor:
        """VICReg of the (B, dim) embeddings: invariance over the view pairs, variance and
        covariance averaged over all views."""
        inv = _mean([invariance_loss(embeddings[a], embeddings[b]) for a, b in pairs])
        var = _mean([variance_loss(g, self.eps) for g in embeddings])
        cov = _mean([covariance_loss(g) for g in embeddings])
        return self.lambda_param * inv + self.mu_param * var + self.nu_param * cov

    def _local_pair_loss(self, view_a: tuple[Pair, Tensor], view_b: tuple[Pair, Tensor]) -> Tensor:
        """VICReg of local features matched by feature distance and by grid distance."""
        (_, local_a), grid_a = view_a
        (_, local_b), grid_b = view_b
        a = local_a.flatten(1, 2)  # (B, H*W, D)
        b = local_b.flatten(1, 2)
        by_features = self._matched(a, b, *_distances(a, b))
        by_location = self._matched(a, b, *_distances(grid_a.flatten(1, 2), grid_b.flatten(1, 2)))
        return by_features + by_location

    def _matched(self, a: Tensor, b: Tensor, dist_ab: Tensor, dist_ba: Tensor) -> Tensor:
        k_a, k_b = self.num_matches
        a_kept, b_nearest = nearest_neighbors(a, b, dist_ab, k_a)
        b_kept, a_nearest = nearest_neighbors(b, a, dist_ba, k_b)
        vicreg = self.vicreg_loss.compute
        return 0.5 * (vicreg(a_kept, b_nearest) + vicreg(b_kept, a_nearest))


@torch.no_grad()
def _distances(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Pairwise distances a -> b (B, N, M) and b -> a (B, M, N), only used to pick matches.

    Both directions are computed rather than transposed, so that near ties break as
    lightly's do; float16/bfloat16 are measured in float32 (no half-precision cdist).
    """
    if a.dtype in (torch.float16, torch.bfloat16):
        a, b = a.float(), b.float()
    return torch.cdist(a, b), torch.cdist(b, a)


def _check_num_matches(value: object) -> tuple[int, int]:
    if (
        not isinstance(value, (list, tuple))
        or len(value) != 2
        or not all(
            isinstance(k, int) and not isinstance(k, bool) and (k >= 1 or k == -1) for k in value
        )
    ):
        raise check.fail("num_matches", "a pair of ints >= 1 (or -1 for all)", repr(value))
    return int(value[0]), int(value[1])


def _check_views(
    global_features: object, global_grids: object, local_features: object, local_grids: object
) -> tuple[list[tuple[Pair, Tensor]], list[tuple[Pair, Tensor]]]:
    """Validate the views; return (global, local) lists of ((g, l), grid)."""
    if (local_features is None) != (local_grids is None):
        raise check.fail(
            "local_view_features and local_view_grids",
            "both given or both None",
            f"{type(local_features).__name__} and {type(local_grids).__name__}",
        )
    globals_ = _views("global_view", global_features, global_grids, min_len=1)
    locals_ = (
        []
        if local_features is None
        else _views("local_view", local_features, local_grids, min_len=0)
    )
    if len(globals_) + len(locals_) < 2:
        raise check.fail(
            "global_view_features",
            "at least two views in total (global + local)",
            f"{len(globals_)} global and {len(locals_)} local view(s)",
        )
    (g0, l0), grid0 = globals_[0]
    check.min_batch("global_view_features[0][0]", g0)
    for kind, views in (("global", globals_), ("local", locals_)):
        for i, ((g, local), grid) in enumerate(views):
            name = f"{kind}_view_features[{i}]"
            check.same_shape("global_view_features[0][0]", g0, f"{name}[0]", g)
            check.size_at(f"{name}[1]", local, 0, g0.shape[0], "batch_size")
            check.size_at(f"{name}[1]", local, 3, l0.shape[3], "local_dim")
            # local features (and grids) of different views are compared by cdist
            check.same_dtype("global_view_features[0][1]", l0, f"{name}[1]", local)
            check.same_dtype("global_view_grids[0]", grid0, f"{kind}_view_grids[{i}]", grid)
    return globals_, locals_


def _views(kind: str, features: object, grids: object, min_len: int) -> list[tuple[Pair, Tensor]]:
    feats_name, grids_name = f"{kind}_features", f"{kind}_grids"
    if not isinstance(features, (list, tuple)) or len(features) < min_len:
        raise check.fail(
            feats_name,
            f"a list of at least {min_len} (embedding, local) pair(s)",
            check.describe(features),
        )
    if not isinstance(grids, (list, tuple)) or len(grids) != len(features):
        raise check.fail(
            grids_name,
            f"a list of {len(features)} grids, one per view in `{feats_name}`",
            check.describe(grids),
        )
    views = []
    for i, (view, grid) in enumerate(zip(features, grids)):
        g, local = check.pair(f"{feats_name}[{i}]", view)
        g = check.tensor(f"{feats_name}[{i}][0]", g, ndim=2, shape_hint="(batch_size, dim)")
        local = check.tensor(
            f"{feats_name}[{i}][1]", local, ndim=4, shape_hint="(batch_size, H, W, local_dim)"
        )
        grid = check.tensor(f"{grids_name}[{i}]", grid, ndim=4, shape_hint="(batch_size, H, W, 2)")
        if tuple(grid.shape) != (*local.shape[:3], 2):
            raise check.fail(
                f"{grids_name}[{i}]",
                f"of shape {(*local.shape[:3], 2)} to match the local features",
                f"shape {tuple(grid.shape)}",
            )
        views.append(((g, local), grid))
    return views
