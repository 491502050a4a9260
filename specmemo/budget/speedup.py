"""The speculative-decoding speedup model, with the verification's measured cost.

With per-token acceptance α and draft length k, a step commits (1 − α^(k+1)) / (1 − α) tokens
on average (Leviathan et al. 2023, eq. 1). Leviathan et al. price the step at k·c + 1 target-step
units, assuming the target verifies k + 1 tokens as fast as one. On a CPU it does not: a 6-token
forward of SmolLM2-135M costs 1.3–2.7× a one-token one depending on the dtype
(bench/cost_curve.py). With the measured cost curve C(n) = t(n)/t(1) (Sequoia's t(n)):

    speedup(k) = (1 − α^(k+1)) / ((1 − α) · (C(k+1) + k·c)).

c = one draft step's time over one target step's. A drafter that proposes only where it finds
something (n-gram lookup finds a match in about a quarter of steps on MT-Bench) drafts in a share s
of steps; the others commit one token at one step's cost, so

    speedup = (s · E + 1 − s) / (s · cost + 1 − s),   E and cost those of a drafting step.

Each input has a source: a pair profile that
`specmemo profile --save-profile` measured on this machine, a device profile's curve, or an
estimate (c from the draft's and target's weight bytes: a step streams its weights).
"""

import tomllib
from dataclasses import dataclass, replace
from pathlib import Path

from specmemo.host import cpu_class
from specmemo.budget.plan import HEAD_DRAFTERS
from specmemo.paths import profiles_dir

# Defaults when no measured pair profile exists. A small model draft of the same family
# typically accepts 0.6–0.8 of tokens (Leviathan et al. report 0.5–0.9); we take the cautious end.
# N-gram lookup in chat accepts less often but costs nothing (c ≈ 0; its index lookup is
# microseconds against a target step of tens of milliseconds).
DEFAULT_MODEL_ALPHA = 0.6
DEFAULT_NGRAM_ALPHA = 0.35
MAX_DRAFT_LEN = 16
KEEP_FRACTION = 0.96  # the speedup budget keeps ≥ 96% of the best predicted speedup


@dataclass(frozen=True)
class PairProfile:
    alpha: float
    c: float
    source: str                     # where α came from: "measured: <file>" or "default"
    curve: tuple[float, ...] = ()   # C(n) for n = 1..len; () is flat (every n costs one step)
    c_source: str = "default"
    curve_source: str = "flat: none measured"
    ranks: tuple[float, ...] = ()   # a tree drafter's rank acceptance (see grow_tree); () drafts chains
    ranks_source: str = ""
    drafted_share: float = 1.0     # the share of steps that draft at all (n-gram lookup: where it matches)
    drafted_share_source: str = "every step drafts"
    lookup: "PairProfile | None" = None   # ngram+head: the lookup's own profile (its α and share)

    def speedup(self, k: int) -> float:
        """Predicted for steps of at most k drafts, as the engine drafts them: the best chain of
        ≤ k (decoding/engine.DraftLength drafts each step's best k ≤ the plan's), or the best
        tree of ≤ k nodes; ngram+head: the lookup's best chain on the share of steps where it finds
        one (no draft cost), the head's best tree on the rest."""
        if self.lookup:
            s, alpha = self.lookup.drafted_share, self.lookup.alpha
            j = best_draft_len(alpha, 0.0, self.curve, k)
            tree = (1.0, 1.0)   # no ranks: a plain step where lookup finds nothing
            if self.ranks:      # the tree the engine's TreeShape picks (best_tree, every step drafting)
                parents = best_tree(list(self.ranks), self.c, self.curve, k)[0]
                tree = tree_gain(*grow_tree(list(self.ranks), len(parents) - 1), self.c, self.curve)
            return (s * expected_tokens_per_step(alpha, j) + (1 - s) * tree[0]) / \
                (s * step_cost(self.curve, j + 1) + (1 - s) * tree[1])
        if self.ranks:
            return best_tree(list(self.ranks), self.c, self.curve, k, self.drafted_share)[1]
        return max((predicted_speedup(self.alpha, self.c, j, self.curve, self.drafted_share) for j in range(1, k + 1)),
                   default=1.0)


def expected_tokens_per_step(alpha: float, k: int) -> float:
    if alpha >= 1.0:
        return k + 1.0
    return (1 - alpha ** (k + 1)) / (1 - alpha)


def step_cost(curve: tuple[float, ...], n: int) -> float:
    """C(n): a forward over n tokens in one-token forwards. Past the measured points, the last
    point's slope carries on."""
    if not curve or n <= 1:
        return 1.0
    if n <= len(curve):
        return curve[n - 1]
    slope = (curve[-1] - curve[0]) / (len(curve) - 1) if len(curve) > 1 else 0.0
    return curve[-1] + slope * (n - len(curve))


def mixed(tokens: float, cost: float, share: float) -> float:
    """Tokens per step cost when a share of steps draft (committing `tokens` at `cost`) and the
    rest are plain one-token steps."""
    return (share * tokens + 1 - share) / (share * cost + 1 - share)


def predicted_speedup(alpha: float, c: float, k: int, curve: tuple[float, ...] = (), share: float = 1.0) -> float:
    """1.0 for k = 0 (plain decoding). share: of steps that draft (see the module's docstring)."""
    return mixed(expected_tokens_per_step(alpha, k), step_cost(curve, k + 1) + k * c, share)


def best_draft_len(alpha: float, c: float, curve: tuple[float, ...], max_k: int) -> int:
    """The k in 1..max_k with the highest predicted speedup (the first of equals)."""
    return max(range(1, max(1, max_k) + 1), key=lambda k: (predicted_speedup(alpha, c, k, curve), -k))


def batch_draft_counts(alphas: list[float], offered: list[int], fixed_tokens: int, curve) -> list[int]:
    """How many of each row's offered drafts one batched verification carries. Row b's j-th draft
    adds a committed token with probability α_b^j (its first j − 1 accepted too), and every draft
    widens the forward by one token. Taking drafts best first, keep the prefix that maximizes the
    batch's expected tokens per forward cost: (rows + Σ α_b^j) / C(fixed_tokens + drafts), C the
    measured cost curve (a tuple, see step_cost; or a function of the token count, e.g. the batch
    engine's ForwardCost). fixed_tokens: the forward's tokens without drafts (each
    decoding row's newest token, and prefill chunks). Drafts cost nothing to propose here (n-gram
    lookup); a row's kept drafts are always a prefix of its own."""
    cost = curve if callable(curve) else lambda n: step_cost(curve, n)
    gains = sorted(((a ** j, b) for b, (a, n) in enumerate(zip(alphas, offered)) for j in range(1, n + 1)),
                   reverse=True)
    best, best_m, total = len(alphas) / cost(fixed_tokens), 0, float(len(alphas))
    for m, (g, _) in enumerate(gains, 1):
        total += g
        rate = total / cost(fixed_tokens + m)
        if rate > best:
            best, best_m = rate, m
    counts = [0] * len(alphas)
    for _, b in gains[:best_m]:
        counts[b] += 1
    return counts


def pair_file(target: str, draft: str) -> Path:
    return profiles_dir() / "pairs" / f"{target}__{draft}.toml".replace("/", "_")


def read_pair(path: Path) -> tuple[dict, str]:
    """A pair profile's fields and where they came from. Its costs (c, the cost curves, the
    speedup) were measured on one host: on a CPU of another class (host.cpu_class)
    they are left out; what the drafter accepts (α, ranks, shares) holds on any."""
    if not path.exists():
        return {}, ""
    data = tomllib.loads(path.read_text())
    there, here = cpu_class(data["host"]) if "host" in data else None, cpu_class()
    if there is None or there == here:
        return data, path.name
    kept = {k: v for k, v in data.items() if k not in ("c", "speedup") and not k.startswith("cost_curve_")}
    return kept, f"{path.name} (acceptance only: its costs were measured on another CPU class, {there}; this one is {here})"


def pair_profile(target: str, draft: str, drafter_kind: str, dtype: str = "fp32",
                 device_curve: tuple[float, ...] = (), weight_ratio: float | None = None,
                 head_card: dict | None = None, device_curve_source: str = "") -> PairProfile:
    """α, c and the cost curve for this pair: measured ones from profiles/pairs/ (written by
    `specmemo profile --save-profile`; costs only where measured on a CPU of this machine's
    class), else the device profile's curve for `dtype`, c from the draft's and target's weight
    bytes (weight_ratio; 0 for n-gram lookup) and a default α. A draft head's α and rank
    acceptance default to its card's held-out figures."""
    if drafter_kind == "ngram+head":
        # Where lookup finds a match it drafts as n-gram does, elsewhere as the head does: both
        # parts measured in its own profile run where one was saved, else from the n-gram and head
        # pairs' profiles.
        own, own_name = read_pair(pair_file(target, draft))
        if "lookup_share" in own:
            head = pair_profile(target, draft, "head", dtype, device_curve, weight_ratio, head_card, device_curve_source)
            lookup = PairProfile(float(own["lookup_alpha"]), 0.0, f"measured: {own_name}", head.curve,
                                 drafted_share=float(own["lookup_share"]), drafted_share_source=f"measured: {own_name}")
        else:
            head = pair_profile(target, "head", "head", dtype, device_curve, weight_ratio, head_card, device_curve_source)
            lookup = pair_profile(target, "ngram", "ngram", dtype, device_curve, device_curve_source=device_curve_source)
        return replace(head, lookup=lookup, source=f"{head.source}; lookup: {lookup.source}",
                       drafted_share_source=f"every step drafts: lookup on the share where it finds a match "
                                            f"({lookup.drafted_share:.4f}, {lookup.drafted_share_source}), else the head")
    data, name = read_pair(pair_file(target, draft))
    held_out = (head_card or {}).get("evaluation", {})
    if "alpha" in data:
        alpha, source = float(data["alpha"]), f"measured: {name}"
    elif "first" in held_out:
        alpha, source = float(held_out["first"]), "the head's card: held-out first-token acceptance"
    else:
        alpha, source = (DEFAULT_NGRAM_ALPHA if drafter_kind == "ngram" else DEFAULT_MODEL_ALPHA), "default"
    if "c" in data:
        c, c_source = float(data["c"]), f"measured: {name}"
    elif (drafter_kind == "model" or drafter_kind in HEAD_DRAFTERS) and weight_ratio is not None:
        c, c_source = weight_ratio, f"estimated: {drafter_kind} weight bytes / target weight bytes"
    else:
        c, c_source = 0.0, "n-gram lookup: microseconds against a target step" if drafter_kind == "ngram" else "none"
    if f"cost_curve_{dtype}" in data:
        curve = tuple(float(x) for x in data[f"cost_curve_{dtype}"])
        curve_source = f"measured: {name}" + (f" on {data['host']}" if "host" in data else "")
    elif device_curve:
        curve, curve_source = tuple(device_curve), device_curve_source or f"device profile ({dtype})"
    else:
        curve, curve_source = (), "flat: none measured"
    ranks, ranks_source = (), ""
    if drafter_kind in HEAD_DRAFTERS:
        if "ranks" in data:
            # Ranks no measured tree offered come from the card.
            measured = [float(x) for x in data["ranks"]]
            ranks = tuple(measured + list(held_out.get("ranks", []))[len(measured):])
            ranks_source = f"measured: {name}" + (" (later ranks: the head's card)" if len(ranks) > len(measured) else "")
        elif "ranks" in held_out:
            ranks, ranks_source = tuple(held_out["ranks"]), "the head's card: held-out ranks"
    if "drafted_share" in data:
        share, share_source = float(data["drafted_share"]), f"measured: {name}"
    else:
        share, share_source = 1.0, "every step drafts (none measured)"
    return PairProfile(alpha, c, source, curve, c_source, curve_source, ranks, ranks_source, share, share_source)


def grow_tree(ranks: list[float], nodes: int) -> tuple[list[int], list[float]]:
    """The candidate tree of `nodes` draft nodes with the most expected accepted tokens when a
    node's r-th ranked child is the target's token with probability ranks[r - 1] at any depth
    (Sequoia's positional acceptance): grown best-first, each new node the one most likely to be
    reached and accepted. Returns (parents, root first as -1; each node's probability)."""
    parents, value, kids = [-1], [1.0], [0]
    for _ in range(nodes):
        gain = [value[i] * ranks[kids[i]] if kids[i] < len(ranks) else 0.0 for i in range(len(parents))]
        best = max(range(len(parents)), key=gain.__getitem__)
        if gain[best] <= 0:
            break
        parents.append(best)
        value.append(gain[best])
        kids.append(0)
        kids[best] += 1
    return parents, value


def tree_gain(parents: list[int], value: list[float], c: float, curve: tuple[float, ...]) -> tuple[float, float]:
    """A tree step's expected tokens (the accepted nodes plus the target's own) and its cost:
    verifying every node with the root, plus one draft step per node that has children."""
    expanded = len(set(parents[1:]))
    return 1 + sum(value[1:]), step_cost(curve, len(parents)) + expanded * c


def tree_speedup(parents: list[int], value: list[float], c: float, curve: tuple[float, ...],
                 share: float = 1.0) -> float:
    return mixed(*tree_gain(parents, value, c, curve), share)


def best_tree(ranks: list[float], c: float, curve: tuple[float, ...], max_nodes: int,
              share: float = 1.0) -> tuple[list[int], float]:
    """Sequoia's rule on this machine's cost curve: of the best trees of 1..max_nodes nodes, the
    one with the highest predicted speedup: (its parents, root first; that speedup)."""
    scored = [(tree_speedup(*tree, c, curve, share), tree[0]) for tree in
              (grow_tree(ranks, n) for n in range(1, max(1, max_nodes) + 1))]
    speedup, parents = max(scored, key=lambda s: (s[0], -len(s[1])))
    return parents, speedup
