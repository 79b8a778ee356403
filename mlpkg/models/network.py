"""The multi-arm uplift network: a shared representation with one head per arm.

TARNet/DragonNet style: every arm (control included) shares one representation of the customer,
so arms with few logged rows borrow strength from the rest, and each arm gets its own small
head, so the network can express a different response per arm (including a negative effect,
the "sleeping dog").
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn


class ArmHeads(nn.Module):
    """One two-layer head per arm, evaluated for all arms in one batched matmul.

    Head ``a`` maps the representation ``h`` to ``(conversion logit, log revenue)`` through
    ``W2[a] · elu(W1[a] · h + b1[a]) + b2[a]``. Keeping the per-arm weights in stacked tensors
    instead of a ``ModuleList`` turns 2·A small matmuls into two batched ones, which is what
    makes scoring every arm for 65k customers cheap.

    Args:
        in_dim: Width of the shared representation.
        head_dim: Hidden width of each head.
        n_arms: Number of arms (heads).
    """

    def __init__(self, in_dim: int, head_dim: int, n_arms: int) -> None:
        """Allocate and initialise the stacked head weights."""
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(n_arms, in_dim, head_dim))
        self.b1 = nn.Parameter(torch.zeros(n_arms, head_dim))
        self.w2 = nn.Parameter(torch.empty(n_arms, head_dim, 2))
        self.b2 = nn.Parameter(torch.zeros(n_arms, 2))
        for a in range(n_arms):
            # Same initialisation as nn.Linear would give each head on its own.
            nn.init.kaiming_uniform_(self.w1.data[a].T, a=5**0.5)
            nn.init.kaiming_uniform_(self.w2.data[a].T, a=5**0.5)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Return per-arm outputs of shape ``[n, A, 2]`` for a representation ``[n, in_dim]``."""
        # Arm-major [A, n, head_dim] intermediates: the expanded h is a stride-0 view, so neither
        # batched matmul copies its inputs, and only the small [A, n, 2] result is transposed.
        n_arms = self.w1.shape[0]
        z = torch.baddbmm(self.b1.unsqueeze(1), h.unsqueeze(0).expand(n_arms, -1, -1), self.w1)
        out = torch.baddbmm(self.b2.unsqueeze(1), nn.functional.elu(z), self.w2)
        return out.transpose(0, 1)


class MultiArmUpliftNet(nn.Module):
    """Shared MLP over embedded categoricals and numerics, then one head per arm.

    Args:
        n_numeric: Number of numeric inputs (columns of ``x_num``).
        cat_cardinalities: Number of codes per categorical input, unknown bucket included.
        n_arms: Number of arms, control included.
        embedding_dim: Width of each categorical embedding.
        hidden_dim: Width of the shared representation.
        head_dim: Hidden width of each arm head.
        dropout: Dropout rate in the shared representation.
    """

    def __init__(
        self,
        n_numeric: int,
        cat_cardinalities: Sequence[int],
        n_arms: int,
        *,
        embedding_dim: int = 4,
        hidden_dim: int = 64,
        head_dim: int = 32,
        dropout: float = 0.1,
    ) -> None:
        """Build the embeddings, the shared representation and the arm heads."""
        super().__init__()
        if n_arms < 2:
            raise ValueError(f"an uplift model needs at least two arms (control + one), got {n_arms}")
        if n_numeric + len(cat_cardinalities) == 0:
            raise ValueError("the network needs at least one numeric or categorical input")
        self.n_numeric = int(n_numeric)
        self.cat_cardinalities = [int(c) for c in cat_cardinalities]
        self.n_arms = int(n_arms)
        self.embedding_dim = int(embedding_dim)
        self.hidden_dim = int(hidden_dim)
        self.head_dim = int(head_dim)
        self.dropout = float(dropout)
        self.embeddings = nn.ModuleList(nn.Embedding(c, embedding_dim) for c in self.cat_cardinalities)
        in_dim = self.n_numeric + embedding_dim * len(self.cat_cardinalities)
        self.representation = nn.Sequential(
            nn.Linear(in_dim, hidden_dim),
            nn.ELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, hidden_dim),
            nn.ELU(),
        )
        self.heads = ArmHeads(hidden_dim, head_dim, self.n_arms)

    def config(self) -> dict[str, Any]:
        """Return the constructor arguments as a JSON-serialisable dict (``MultiArmUpliftNet(**cfg)``)."""
        return {
            "n_numeric": self.n_numeric,
            "cat_cardinalities": list(self.cat_cardinalities),
            "n_arms": self.n_arms,
            "embedding_dim": self.embedding_dim,
            "hidden_dim": self.hidden_dim,
            "head_dim": self.head_dim,
            "dropout": self.dropout,
        }

    @torch.no_grad()
    def init_output_bias(self, conversion_rate: float, mean_revenue: float) -> None:
        """Start every head at the base conversion rate and mean order value.

        Starting from the marginal rates rather than 0.5 / 1.0 removes the first epochs the
        network would otherwise spend learning two constants.

        Args:
            conversion_rate: Training conversion rate, in (0, 1).
            mean_revenue: Mean revenue of converted training rows, > 0.
        """
        p = min(max(float(conversion_rate), 1e-4), 1 - 1e-4)
        self.heads.b2[:, 0] = torch.logit(torch.tensor(p))
        self.heads.b2[:, 1] = torch.log(torch.tensor(max(float(mean_revenue), 1e-3)))

    def representation_of(self, x_num: torch.Tensor, x_cat: torch.Tensor) -> torch.Tensor:
        """Return the shared representation ``[n, hidden_dim]``."""
        parts = [x_num] if self.n_numeric else []
        parts.extend(emb(x_cat[:, j]) for j, emb in enumerate(self.embeddings))
        return self.representation(torch.cat(parts, dim=1))

    def forward(self, x_num: torch.Tensor, x_cat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Score every arm.

        Args:
            x_num: Float tensor ``[n, n_numeric]``.
            x_cat: Long tensor ``[n, n_categorical]``.

        Returns:
            ``(conv_logits, rev_log)``, both ``[n, A]``: the conversion logit of each arm and the
            log of the expected revenue given conversion under each arm.
        """
        out = self.heads(self.representation_of(x_num, x_cat))
        return out[..., 0], out[..., 1]
