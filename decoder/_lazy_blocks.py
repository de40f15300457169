"""Candidate block lengths compiled when the block policy could first want them.

An automatic block length has several candidates (1 = AR, 2, 4, ..., the drafter's block).
Each is its own compiled program, and the larger ones cost the most to compile and to time.
Yet the policy tries them upward from the smallest (``_autoblock``), and a job whose drafts are
seldom accepted never tries the large ones. A lazy warmup therefore readies AR and the smallest
speculative length only; before each decode call, ``next_wanted`` names the next larger
candidate once the observed acceptance says it could still win, and the engine compiles and
times it then (``SlotEngine.add_wanted_block``), with the batch's own state parked on the host.

Where the work left is known (a list of requests, or a job whose row count the preflight read),
a candidate must also pay for itself: the decode time it could save over that work, at its
likely throughput, must exceed what readying it would likely take (compile and timing). A
16-row job then decodes on with the lengths it has rather than spend ten seconds on one it
would use for a few calls; a stream of unknown length, or a million rows, always could pay.
"""

from __future__ import annotations

from typing import Callable

import jax
import numpy as np

from dflash_batch.decoder._autoblock import BlockPolicy


def next_wanted(policy: BlockPolicy, work_left: float | None = None,
                ready_seconds: Callable[[int], float] = lambda _block: 0.0) -> int | None:
    """The next candidate to compile and time, or None while no uncosted one could win.

    ``work_left``: tokens each slot still has to decode (None: unknown, as for a stream);
    ``ready_seconds(L)``: what compiling and timing L would likely take.

    For each candidate without a cost, smallest first:
    1. Its cost is bounded below (``cost_floor``) from the costs of the two largest timed
       lengths under it.
    2. While the largest of those (``below``) is untried (some of its q_k unseen) and the
       policy would try it, wait: its trial shows the acceptance that larger lengths are judged
       by, as the policy's own trials go upward from the cheapest.
    3. Otherwise the candidate is wanted when, at its cost floor and with the optimistic
       acceptance (unseen q_k as high as the last seen one), it could beat the best costed
       length by the policy's margin: that is when the policy would try it, were its cost known.
    4. And, with ``work_left`` known, when it pays back (``pays_back``); else the next one is asked.
    """
    if 1 not in policy.costs:
        return None
    bar = (1 + policy.margin) * policy.throughput(policy.best())
    for block in (b for b in policy.candidates if b not in policy.costs):
        below = max(b for b in policy.costs if b < block)
        if below > 1 and not policy.tally.seen(below).all() and policy.throughput(below, optimistic=True) > bar:
            return None
        if policy.expected_tokens(block, optimistic=True) / cost_floor(policy.costs, block) > bar:
            if work_left is None or pays_back(policy, block, work_left, ready_seconds(block)):
                return block
    return None


def pays_back(policy: BlockPolicy, block: int, work_left: float, add_seconds: float) -> bool:
    """Whether decoding ``work_left`` tokens per slot at ``block`` would save more seconds than
    ``add_seconds``, against the best costed length: at the cost floor (``cost_floor``) and the
    acceptance the seen q_k extend to (``likely_tokens``)."""
    now = 1.0 / policy.throughput(policy.best())  # seconds per token of a slot
    could = cost_floor(policy.costs, block) / likely_tokens(policy, block)
    return work_left * (now - could) > add_seconds


def likely_tokens(policy: BlockPolicy, block: int) -> float:
    """E[tokens per step | L] with the unseen q_k extended geometrically from the last two seen
    (q_k = q_j r^(k-j), r = q_j / q_(j-1), or q_1 when only q_1 is seen): acceptance falls off
    about so with each further draft. The optimistic bound (unseen q_k as high as the last seen)
    decides whether a length could win at all; what it would likely save decides whether to pay
    for it. The demo job (hybrid) saw q_1 = 0.55 at L=2: a bound of 9.3 tokens a step at L=16,
    an extension of 2.2, and L=16 then measured 1.9."""
    q = policy.acceptance()[1:block].astype(float)
    seen = policy.tally.seen(block)
    if seen.all():
        return policy.expected_tokens(block)
    last = int(np.flatnonzero(seen)[-1]) if seen.any() else -1
    if last < 0:
        return policy.expected_tokens(block, optimistic=True)
    r = q[last] / q[last - 1] if last > 0 and q[last - 1] > 0 else q[last]
    k = np.arange(len(q))
    q = np.where(seen, q, q[last] * min(r, 1.0) ** np.maximum(k - last, 0))
    return 1.0 + (1.0 - policy.tally.gated_share(block)) * float(q.sum())


def cost_floor(costs: dict[int, float], block: int) -> float:
    """A lower bound on the step cost at ``block`` from the costs of shorter lengths.

    A pass costs no less for more tokens, and each further token costs no less than the last
    did (flat while the device has room to spare, then rising), so the cost at L is at least
    the largest timed length's plus the marginal cost between the two largest, times the
    extra tokens. Half that margin is counted, because the timed costs are noisy.
    """
    shorter = sorted(b for b in costs if b < block)
    top = shorter[-1]
    if len(shorter) < 2:
        return costs[top]
    prev = shorter[-2]
    slope = max(0.0, (costs[top] - costs[prev]) / (top - prev))
    return costs[top] + 0.5 * slope * (block - top)


def merge_costs(policy: BlockPolicy, per_step: dict[int, list[float]], gated: dict[int, list[float]]) -> None:
    """Adds the costs of lengths timed after the first ones (each round beside AR's).

    The policy's AR cost stays the one measured first; the new lengths' costs are scaled to
    it by the ratio of the two AR measurements, so a slow spell of a shared machine during the
    later timing does not make the new lengths look dear (or cheap) against the earlier ones.
    """
    fresh = BlockPolicy(tuple(per_step))
    fresh.set_costs(per_step, gated)
    scale = policy.costs[1] / fresh.costs[1] if 1 in policy.costs and 1 in fresh.costs else 1.0
    policy.costs.update({b: c * scale for b, c in fresh.costs.items() if b not in policy.costs})
    policy.gated_costs.update({b: c * scale for b, c in fresh.gated_costs.items() if b not in policy.gated_costs})


def park(state):
    """A host copy of ``state`` and what ``unpark`` needs to put it back as it was."""
    leaves, tree = jax.tree.flatten(state)
    # Committed arrays (a mesh's) go back to their sharding; uncommitted ones (one device) must
    # stay uncommitted: a jitted call's cache key includes the difference, and would recompile.
    placement = [a.sharding if a.committed else None for a in leaves]
    return [np.array(a, copy=True) for a in leaves], (tree, placement)


def unpark(host_leaves, where):
    """The parked state back on its devices, in the layout it had (nothing recompiles)."""
    tree, placement = where
    return jax.tree.unflatten(tree, [jax.device_put(h, p) if p is not None else jax.device_put(h)
                                     for h, p in zip(host_leaves, placement)])
