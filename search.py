"""
The optional steps of a calibration on the joint objective, with every layer compressed.
--refine: coordinate descent from the paper's plan; each layer in turn tries each move (switch
its policy; shift a quantum of budget to or from another layer). --confirm-routing: one move per
routed layer, from the best uniform policy to the layer's route. A move is kept only if it lowers
the KL on average and on most samples. `search` and `confirm_routing` are generic over the
objective, so tested on constructed ones; `confirm_plans` and `refine_plans` apply them to a
calibration's plans (calibrate.py).
"""
from __future__ import annotations

import polykv as K


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def is_better(new: list[float], old: list[float], min_win_share: float) -> bool:
    """Keep a change only if it lowers the mean KL AND lowers it on more than `min_win_share` of
    the samples: a change that wins on average through one or two samples is fitted to them."""
    wins = sum(n < o for n, o in zip(new, old))
    return mean(new) < mean(old) and wins > min_win_share * len(new)


def routing_moves(candidates=K.CANDIDATES, heads: int = 1) -> list:
    """One move per candidate policy (per KV head if heads > 1): the layer (head) switches to it.
    A move maps (layer, policies, budgets) to a candidate (policies, budgets, description) or None."""
    def switch(policy, head):
        def move(layer, policies, budgets):
            routed = K.reroute(policies, layer, policy, head, heads)
            where = f"layer {layer}" + ("" if head is None else f" head {head}")
            return None if routed == policies else (routed, budgets, f"{where} -> {policy}")
        return move
    return [switch(p, h) for h in ([None] if heads == 1 else range(heads)) for p in candidates]


def allocation_moves(order: list[int], quantum: int, low: int, high: int) -> list:
    """Two moves: `quantum` tokens into the layer from the least sensitive layer that can give
    (last in `order`), and out of it to the most sensitive one that can take."""
    def give(layer, policies, budgets):
        donor = next((l for l in reversed(order) if K.move_budget(budgets, l, layer, quantum, low, high)), None)
        return None if donor is None else (policies, K.move_budget(budgets, donor, layer, quantum, low, high),
                                           f"+{quantum} to layer {layer} from {donor}")

    def take(layer, policies, budgets):
        taker = next((l for l in order if K.move_budget(budgets, layer, l, quantum, low, high)), None)
        return None if taker is None else (policies, K.move_budget(budgets, layer, taker, quantum, low, high),
                                           f"-{quantum} from layer {layer} to {taker}")
    return [give, take]


def search(objective, policies: list[str], budgets: list[int], order: list[int], moves: list,
           max_evals: int = 100, max_sweeps: int = 3, min_win_share: float = 0.5):
    """Coordinate descent over layers in `order` (e.g. most sensitive first): each layer tries each move
    in turn, and a candidate replaces the plan only if `is_better`, so the result is never worse
    than the start. objective(policies, budgets) -> KL per sample.
    Returns (policies, budgets, mean KL, trace)."""
    best, evals = objective(policies, budgets), 1
    trace = [{"step": "start", "kl": mean(best)}]
    for _ in range(max_sweeps):
        changed = False
        for layer in order:
            for move in moves:
                candidate = move(layer, policies, budgets)
                if candidate is None or evals >= max_evals:
                    continue
                kls, evals = objective(candidate[0], candidate[1]), evals + 1
                if is_better(kls, best, min_win_share):
                    policies, budgets, best, changed = candidate[0], candidate[1], kls, True
                    trace.append({"step": candidate[2], "kl": mean(kls)})
        if not changed or evals >= max_evals:
            break
    trace.append({"step": "end", "kl": mean(best), "evaluations": evals})
    return policies, budgets, mean(best), trace


def confirm_routing(objective, routed: list[str], budgets: list[int], best: str, preference: list[dict],
                    min_win_share: float) -> tuple[list[str], list[dict]]:
    """Routing confirmed on the joint objective: from the best uniform policy at the plan's budgets,
    each layer the single-layer preference routes elsewhere switches to its route, the largest
    single-layer gain first, and keeps it only if the joint KL (every layer compressed) falls on
    average and on most samples (is_better). A preference measured with every other layer
    keeping its whole cache need not hold once they are compressed too; this keeps the routes that do.
    Returns (policies, trace); one joint evaluation per routed layer, and one for the start."""
    gain = lambda l: preference[l][best] - preference[l][routed[l]]  # noqa: E731
    order = sorted((l for l, p in enumerate(routed) if p != best), key=gain, reverse=True)
    switch = lambda l, policies, b: (K.reroute(policies, l, routed[l]), b, f"layer {l} -> {routed[l]}")  # noqa: E731
    policies, _, _, trace = search(objective, [best] * len(routed), budgets, order, [switch],
                                   max_evals=len(order) + 1, max_sweeps=1, min_win_share=min_win_share)
    return policies, trace


# -----------------------------------------------------------------------------
# The two steps on a budget's plans ({name: {policies, budgets, calibration record}}), in place


def confirm_plans(objective, plans: dict[str, dict], average: int, min_win_share: float) -> None:
    """--confirm-routing on a budget's plans, in place: each routed plan's routes confirmed on the
    joint objective (confirm_routing), the trace in its record. The budgets stay (with --order
    route-allocate: allocated from the routed policies' sensitivities, confirmed or not)."""
    for name, plan in plans.items():
        cal, best = plan["calibration"], plan["calibration"]["best_uniform"]
        if cal["signals"]["preference"]:  # allocation alone routes nothing
            n_routed = sum(p != best for p in plan["policies"])
            plan["policies"], cal["confirmation_trace"] = confirm_routing(
                objective, plan["policies"], plan["budgets"], best, cal["signals"]["preference"], min_win_share)
            kept = [f"layer {l} -> {p}" for l, p in enumerate(plan["policies"]) if p != best]
            print(f"[{average}] {name}: {len(kept)} of {n_routed} routes confirmed on the joint KL: "
                  f"{', '.join(kept) or 'none'}")


def refine_plans(objective, layer_kl: K.LayerKL, plans: dict[str, dict], low: int, high: int, quantum: int,
                 max_evals: int, min_win_share: float, candidates: list[str]) -> None:
    """--refine on a budget's plans, in place: the search from each plan, with the moves of the plan's
    lever (PolyKV: both), layers tried most sensitive first; the trace in its record."""
    for name, plan in plans.items():
        signals = plan["calibration"]["signals"]
        sens = signals["sensitivity"] or K.sensitivity(layer_kl, plan["policies"], signals["sensitivity_budget"])
        order = sorted(range(len(sens)), key=lambda l: -sens[l])
        moves = {"polykv": routing_moves(candidates) + allocation_moves(order, quantum, low, high),
                 "polykv_routing": routing_moves(candidates),
                 "polykv_allocation": allocation_moves(order, quantum, low, high)}[name]
        plan["policies"], plan["budgets"], _, plan["calibration"]["search_trace"] = search(
            objective, plan["policies"], plan["budgets"], order, moves, max_evals, min_win_share=min_win_share)
