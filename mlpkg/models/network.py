"""The multi-arm uplift network: a shared representation of the customer and heads per arm.

TARNet/DragonNet style, every arm (control included) shares one representation of the customer,
so arms with few logged rows borrow strength from the rest. Two kinds of heads sit on top of it
(``arm_heads``):

* ``"per_arm"``: one small two-layer head per arm (control included), so the network can express
  any response per arm (including a negative effect, the "sleeping dog"). Uplift is the
  difference between two heads, each fitted to its own arm's rows only.
* ``"factorised"``: a **baseline** (control) head trained by every row, plus one **effect**
  head shared by all treatment arms and fed with an embedding of the arm; arm ``k``'s logit is
  the baseline plus arm ``k``'s effect. An arm named ``"{coupon}@{channel}"`` is embedded as the
  sum of a coupon, a channel and an arm-specific embedding, so the arms that share a coupon or a
  channel share strength (an offer's appeal and a channel's reach show up in several arms),
  while the arm's own embedding keeps every arm free to differ. The rare control conversions are
  then not the only data that pins the baseline down, and the uplift is learned as the effect
  rather than as a difference between two separately noisy heads. The effects start near zero
  and take more optimizer steps to grow than per-arm heads do, so this head pays off on large
  campaigns (on 200,000-customer simulator campaigns it captured about 0.80 of the oracle's
  incremental conversions against 0.74-0.76 with per-arm heads) and not on short fits of a few
  thousand rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

#: Separator of coupon and channel in an arm name (``"PCT10@email"``).
ARM_SEPARATOR = "@"
#: The kinds of arm heads (see the module docstring).
ARM_HEADS = ("per_arm", "factorised")


def arm_factors(arms: Sequence[str]) -> tuple[list[int], list[int], int, int]:
    """Return the coupon and channel index of each treatment arm, for the factorised embedding.

    ``arms[0]`` is control and gets no factors. An arm ``"{coupon}@{channel}"`` takes the indices
    of its coupon and its channel; an arm without the separator is a factor of its own (its
    name as the "coupon") and shares no channel, index ``n_channels`` being a zero "no channel"
    slot.

    Args:
        arms: Arm names, control first.

    Returns:
        ``(coupon_index, channel_index, n_coupons, n_channels)``; the index lists have one entry
        per treatment arm.
    """
    parts = [str(a).split(ARM_SEPARATOR, 1) for a in list(arms)[1:]]
    coupons = list(dict.fromkeys(p[0] for p in parts))
    channels = list(dict.fromkeys(p[1] for p in parts if len(p) == 2))
    coupon_index = [coupons.index(p[0]) for p in parts]
    channel_index = [channels.index(p[1]) if len(p) == 2 else len(channels) for p in parts]
    return coupon_index, channel_index, len(coupons), len(channels)


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


class ArmEffectHead(nn.Module):
    """One head shared by every treatment arm, conditioned on a factorised arm embedding.

    Effect of arm ``a`` on a representation ``h``: ``W2 · elu(W1 · h + e[a]) + b2``, with
    ``e[a] = coupon[c(a)] + channel[h(a)] + own[a]``. All arms are evaluated in one broadcast
    add and one matmul, so scoring every arm for 65k customers stays cheap.

    Args:
        in_dim: Width of the shared representation.
        head_dim: Hidden width of the head (and of the arm embeddings).
        arms: Arm names, control first (see :func:`arm_factors`).
    """

    def __init__(self, in_dim: int, head_dim: int, arms: Sequence[str]) -> None:
        """Allocate the embeddings and the head; the effect starts near zero."""
        super().__init__()
        coupon_index, channel_index, n_coupons, n_channels = arm_factors(arms)
        self.register_buffer("coupon_index", torch.tensor(coupon_index, dtype=torch.long), persistent=False)
        self.register_buffer("channel_index", torch.tensor(channel_index, dtype=torch.long), persistent=False)
        self.coupon = nn.Parameter(torch.randn(n_coupons, head_dim) * 0.3)
        self.channel = nn.Parameter(torch.randn(n_channels, head_dim) * 0.3)
        # The arm's own part starts at zero: arms begin as pure coupon + channel combinations.
        self.own = nn.Parameter(torch.zeros(len(coupon_index), head_dim))
        self.hidden = nn.Linear(in_dim, head_dim)
        self.out = nn.Linear(head_dim, 2)
        with torch.no_grad():
            # A small start: every arm begins close to "no effect" and has to earn its uplift.
            self.out.weight.mul_(0.1)
            self.out.bias.zero_()

    def arm_embeddings(self) -> torch.Tensor:
        """Return the embedding of every treatment arm, ``[A - 1, head_dim]``."""
        # The extra zero row is the "no channel" slot of arms not named coupon@channel.
        channel = torch.cat([self.channel, self.channel.new_zeros(1, self.channel.shape[1])])
        return self.coupon[self.coupon_index] + channel[self.channel_index] + self.own

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Return per-arm effects ``[n, A - 1, 2]`` (conversion logit, log revenue) of ``h`` ``[n, d]``."""
        z = nn.functional.elu(self.hidden(h).unsqueeze(1) + self.arm_embeddings().unsqueeze(0))
        return self.out(z)


class MultiArmUpliftNet(nn.Module):
    """Shared MLP over embedded categoricals and numerics, then per-arm or factorised heads.

    Args:
        n_numeric: Number of numeric inputs (columns of ``x_num``).
        cat_cardinalities: Number of codes per categorical input, unknown bucket included.
        n_arms: Number of arms, control included.
        embedding_dim: Width of each categorical embedding.
        hidden_dim: Width of the shared representation.
        head_dim: Hidden width of the heads.
        dropout: Dropout rate in the shared representation.
        arms: Arm names in head order, control first; with factorised heads, names
            ``"{coupon}@{channel}"`` let arms that share a coupon or a channel share their
            embedding. ``None`` names the arms ``arm0, arm1, ...`` (no shared factors).
        arm_heads: ``"per_arm"`` (one head per arm) or ``"factorised"`` (baseline + shared
            arm-effect head); see the module docstring.
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
        arms: Sequence[str] | None = None,
        arm_heads: str = "per_arm",
    ) -> None:
        """Build the embeddings, the shared representation and the heads."""
        super().__init__()
        if n_arms < 2:
            raise ValueError(f"an uplift model needs at least two arms (control + one), got {n_arms}")
        if n_numeric + len(cat_cardinalities) == 0:
            raise ValueError("the network needs at least one numeric or categorical input")
        arms = [f"arm{i}" for i in range(n_arms)] if arms is None else [str(a) for a in arms]
        if len(arms) != n_arms:
            raise ValueError(f"got {len(arms)} arm names for {n_arms} arms")
        if arm_heads not in ARM_HEADS:
            raise ValueError(f"arm_heads must be one of {ARM_HEADS}, got {arm_heads!r}")
        self.n_numeric = int(n_numeric)
        self.cat_cardinalities = [int(c) for c in cat_cardinalities]
        self.n_arms = int(n_arms)
        self.arms = arms
        self.embedding_dim = int(embedding_dim)
        self.hidden_dim = int(hidden_dim)
        self.head_dim = int(head_dim)
        self.dropout = float(dropout)
        self.arm_heads = arm_heads
        self.embeddings = nn.ModuleList(nn.Embedding(c, embedding_dim) for c in self.cat_cardinalities)
        in_dim = self.n_numeric + embedding_dim * len(self.cat_cardinalities)
        self.representation = nn.Sequential(
            nn.Linear(in_dim, hidden_dim),
            nn.ELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, hidden_dim),
            nn.ELU(),
        )
        if arm_heads == "per_arm":
            self.heads = ArmHeads(hidden_dim, head_dim, self.n_arms)
        else:
            self.baseline = nn.Sequential(nn.Linear(hidden_dim, head_dim), nn.ELU(), nn.Linear(head_dim, 2))
            self.effects = ArmEffectHead(hidden_dim, head_dim, arms)

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
            "arms": list(self.arms),
            "arm_heads": self.arm_heads,
        }

    @torch.no_grad()
    def init_output_bias(self, conversion_rate: float, mean_revenue: float) -> None:
        """Start every arm at the base conversion rate and mean order value.

        Starting from the marginal rates rather than 0.5 / 1.0 removes the first epochs the
        network would otherwise spend learning two constants. Per-arm heads all start there;
        factorised heads start the baseline there, and the effects start near zero.

        Args:
            conversion_rate: Training conversion rate, in (0, 1).
            mean_revenue: Mean revenue of converted training rows, > 0.
        """
        p = min(max(float(conversion_rate), 1e-4), 1 - 1e-4)
        bias = self.heads.b2 if self.arm_heads == "per_arm" else self.baseline[-1].bias.unsqueeze(0)
        bias[:, 0] = torch.logit(torch.tensor(p))
        bias[:, 1] = torch.log(torch.tensor(max(float(mean_revenue), 1e-3)))

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
            log of the expected revenue given conversion under each arm (factorised heads:
            column 0 = control = the baseline; column ``k`` = baseline + arm ``k``'s effect).
        """
        return self._heads_of(self.representation_of(x_num, x_cat))

    def forward_relaxed(
        self, x_num: torch.Tensor, cat_weights: Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Score every arm with each categorical given as weights over its codes (for attributions).

        A one-hot row of weights is exactly :meth:`forward`; a row between one-hots embeds the
        category as the weighted mean of its embeddings, which integrated gradients needs to
        integrate along a straight path from a reference customer.

        Args:
            x_num: Float tensor ``[n, n_numeric]``.
            cat_weights: One float tensor ``[n, cardinality]`` per categorical input.

        Returns:
            ``(conv_logits, rev_log)`` as :meth:`forward`.
        """
        parts = [x_num] if self.n_numeric else []
        parts.extend(w @ emb.weight for w, emb in zip(cat_weights, self.embeddings, strict=True))
        return self._heads_of(self.representation(torch.cat(parts, dim=1)))

    def _heads_of(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.arm_heads == "per_arm":
            out = self.heads(h)
        else:
            base = self.baseline(h).unsqueeze(1)
            out = torch.cat([base, base + self.effects(h)], dim=1)
        return out[..., 0], out[..., 1]


class UpliftEnsemble(nn.Module):
    """``members`` independently initialised :class:`MultiArmUpliftNet` trained side by side.

    A deep ensemble: the members share the data, the batches and the optimizer step but no
    weights, so each learns as if alone (the training loss is the mean of the members' losses)
    and they differ by their initialisation and dropout. The ensemble predicts the mean of the
    members' conversion probabilities (and expected revenues); averaging removes most of the
    seed-to-seed spread of single networks, whose incremental conversions at one budget ranged
    over 42-76% of the oracle's on the same simulator rows (a 4-member mean reached 63%).
    :meth:`member_outputs` gives each member's scores, for the spread between members.

    Args:
        members: Number of members, at least 2.
        **member_config: :class:`MultiArmUpliftNet` arguments, the same for every member.
    """

    def __init__(self, members: int, **member_config: Any) -> None:
        """Build ``members`` networks from the same configuration (their weights drawn in turn)."""
        super().__init__()
        if int(members) < 2:
            raise ValueError(f"an ensemble needs at least two members, got {members}")
        self.members = nn.ModuleList(MultiArmUpliftNet(**member_config) for _ in range(int(members)))

    @property
    def arms(self) -> list[str]:
        """The arm names in head order (control first)."""
        return self.members[0].arms

    @property
    def n_arms(self) -> int:
        """The number of arms, control included."""
        return self.members[0].n_arms

    def config(self) -> dict[str, Any]:
        """Return the constructor arguments (``build_network(cfg)`` rebuilds the ensemble)."""
        return {**self.members[0].config(), "members": len(self.members)}

    def init_output_bias(self, conversion_rate: float, mean_revenue: float) -> None:
        """Start every member at the base rates (see :meth:`MultiArmUpliftNet.init_output_bias`)."""
        for member in self.members:
            member.init_output_bias(conversion_rate, mean_revenue)

    def member_outputs(self, x_num: torch.Tensor, x_cat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return every member's ``(conv_logits, rev_log)``, each ``[members, n, A]``."""
        outputs = [member(x_num, x_cat) for member in self.members]
        return torch.stack([o[0] for o in outputs]), torch.stack([o[1] for o in outputs])

    def forward(self, x_num: torch.Tensor, x_cat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the ensemble's ``(conv_logits, rev_log)`` ``[n, A]``: logits of the mean probability.

        The revenue output is the log of the members' mean expected revenue.
        """
        return self._mean_of(*self.member_outputs(x_num, x_cat))

    def forward_relaxed(
        self, x_num: torch.Tensor, cat_weights: Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the ensemble's scores with relaxed categoricals (as the members' ``forward_relaxed``)."""
        outputs = [member.forward_relaxed(x_num, cat_weights) for member in self.members]
        return self._mean_of(torch.stack([o[0] for o in outputs]), torch.stack([o[1] for o in outputs]))

    def _mean_of(self, logits: torch.Tensor, rev_log: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # log-mean-exp of log-sigmoid, then back to a logit: stable at extreme probabilities.
        log_k = torch.log(torch.tensor(float(len(self.members)), dtype=logits.dtype, device=logits.device))
        log_p = torch.logsumexp(nn.functional.logsigmoid(logits), dim=0) - log_k
        log_q = torch.logsumexp(nn.functional.logsigmoid(-logits), dim=0) - log_k
        rev = torch.logsumexp(rev_log.clamp(-20.0, 20.0), dim=0) - log_k
        return log_p - log_q, rev


def build_network(config: dict[str, Any]) -> MultiArmUpliftNet | UpliftEnsemble:
    """Rebuild a network from its ``config()``: an ensemble when it names ``members`` > 1."""
    config = dict(config)
    members = int(config.pop("members", 1))
    return UpliftEnsemble(members, **config) if members > 1 else MultiArmUpliftNet(**config)
