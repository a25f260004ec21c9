"""HeadHunter search (arXiv 2506.10978, Algorithm 1), framework-free and resumable.

    selected = {}
    repeat `rounds` times:
        for each candidate (layer, head) not yet selected:
            score[(layer, head)] = score(selected ∪ {(layer, head)})   # mean objective over prompts × seeds
        add the `top_k` best-scoring candidates to `selected`

`score(HeadSet) -> float` is any callable (higher is better); `pipelines/headhunter.py` builds one
from a diffusers pipeline and an image objective. Ties keep candidate order; a non-finite score (NaN,
±inf) ranks last and is stored as null.

Resumable: with `state_path`, the state JSON is rewritten (atomically) after every scored candidate:
the search config, the completed rounds (selected heads and all candidate scores), the scores of the
round in progress, and the validation results. A rerun with the same config skips everything already
scored; a different config in an existing state file is an error unless `restart=True`.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

from .headsets import HeadSet

STATE_FORMAT = "attnlab.headhunter-state/1"

Pair = tuple[int, int]
Scorer = Callable[[HeadSet], float]
Validator = Callable[[HeadSet, int], Mapping[str, Any]]


class SingleProcess:
    """The search's view of the processes sharing it: rank, size, `exchange(value)` (every process's value, by
    rank) and `share(value)` (process 0's value, everywhere). One process: trivial. `pipelines/headhunter.py`
    has the torch.distributed one (torchrun / accelerate launch)."""

    rank, size = 0, 1

    def exchange(self, value) -> list:
        return [value]

    def share(self, value):
        return value


class SearchConfigMismatch(ValueError):
    """The state file belongs to a search with another configuration."""


def head_key(pair: Pair) -> str:
    """The JSON key of a candidate: ``"L7:H3"`` (also valid head-set syntax)."""
    return f"L{int(pair[0])}:H{int(pair[1])}"


@dataclass
class SearchResult:
    """selected: the final head set; order: the heads in the order they were selected;
    rounds: one record per completed round ({"round", "added", "added_scores", "scores", "seconds"});
    validation: the validator's results, index 0 = baseline (empty set), i = after round i;
    config: the search config; resumed_scores: candidate scores taken from the state file, not computed."""

    selected: HeadSet
    order: list[Pair]
    rounds: list[dict]
    validation: list[dict] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    evaluated: int = 0
    resumed_scores: int = 0

    @property
    def round_scores(self) -> list[Optional[float]]:
        """The best candidate score of each round (the score of that round's best set S ∪ {h})."""
        return [r["added_scores"][0] if r["added_scores"] else None for r in self.rounds]

    def summary(self) -> dict:
        """JSON-ready record of the search (config, per-round selection and scores, validation)."""
        return {
            "config": self.config,
            "selected": [list(p) for p in self.order],
            "heads": str(self.selected),
            "rounds": self.rounds,
            "validation": self.validation,
        }


def _open_state(path: Optional[Path], config: dict, restart: bool):
    """(the state to resume or None, an error message when the file holds another search)."""
    if path is None:
        return None, None
    path.parent.mkdir(parents=True, exist_ok=True)
    state = None if restart else load_state(path)
    if state is not None and state.get("config") != config:
        differing = _diff(state.get("config") or {}, config)
        return None, (f"{path} holds a search with a different config (differs in: {', '.join(differing)}); "
                      "pass --restart (restart=True) to discard it, or use another output folder")
    return state, None


def _score_batch(workers, score: Scorer, base: HeadSet, mine: Optional[Pair]) -> list:
    """Every process scores its candidate of the batch (`mine`, None when it has none); returns every process's
    (key, score, seconds) in rank order. A failure on any process is raised on all of them (never a hang)."""
    key = value = error = None
    t0 = time.perf_counter()
    if mine is not None:
        key = head_key(mine)
        try:
            value = _finite(score(base.union(HeadSet.from_pairs([mine]))))
        except Exception as exc:  # noqa: BLE001 - re-raised below, after the others have heard of it
            error = exc
    seconds = time.perf_counter() - t0
    results = workers.exchange((key, value, seconds, None if error is None else repr(error)))
    if error is not None:
        raise error
    failed = [(rank, r[3]) for rank, r in enumerate(results) if r[3] is not None]
    if failed:
        raise RuntimeError(f"scoring failed on process {failed[0][0]}: {failed[0][1]}")
    return [r[:3] for r in results if r[0] is not None]


def _normalise_candidates(candidates: Iterable[Sequence[int]]) -> list[Pair]:
    out: list[Pair] = []
    seen: set[Pair] = set()
    for item in candidates:
        try:
            layer, head = (int(x) for x in item)
        except (TypeError, ValueError):
            raise ValueError(f"candidates must be (layer, head) pairs of integers, got {item!r}") from None
        if layer < 0 or head < 0:
            raise ValueError(f"candidate {(layer, head)} has a negative layer or head")
        if (layer, head) not in seen:
            seen.add((layer, head))
            out.append((layer, head))
    return out


def _finite(value) -> Optional[float]:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"the score function must return a number, got {type(value).__name__}") from None
    return value if math.isfinite(value) else None


def _jsonable(config: Mapping) -> dict:
    try:
        return json.loads(json.dumps(dict(config), sort_keys=True))
    except TypeError as e:
        raise ValueError(f"search config must be JSON-serialisable: {e}") from None


def _diff(old: Mapping, new: Mapping) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [k for k in keys if old.get(k, "<missing>") != new.get(k, "<missing>")]


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)


def _progress(total: int, initial: int, desc: str, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm ships with diffusers' dependencies; without it, no bar
        return None
    return tqdm(total=total, initial=initial, desc=desc, unit="cand", dynamic_ncols=True, leave=True)


def load_state(path: Union[str, Path]) -> Optional[dict]:
    """The state dict of a search state file, None if the file does not exist."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not a valid HeadHunter state file ({e}); delete it or pass restart=True / --restart") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ValueError(f"{path}: format {state.get('format') if isinstance(state, dict) else None!r} is not "
                         f"{STATE_FORMAT!r}; delete it or pass restart=True / --restart")
    return state


def search(
    candidates: Iterable[Sequence[int]],
    score: Scorer,
    top_k: int = 3,
    rounds: int = 5,
    *,
    state_path: Union[str, Path, None] = None,
    config: Optional[Mapping[str, Any]] = None,
    restart: bool = False,
    validate: Optional[Validator] = None,
    progress: bool = True,
    on_round: Optional[Callable[[dict], None]] = None,
    workers=None,
) -> SearchResult:
    """Run (or resume) the greedy HeadHunter search.

    candidates: (layer, head) pairs to try (duplicates dropped, order kept: it breaks ties).
    score:      score(HeadSet) -> float, higher is better (the mean objective over the prompt–seed set).
    top_k:      heads added per round (>= 1). rounds: number of rounds (>= 1). A round with fewer than
                top_k candidates left takes them all; the search stops when none are left.
    state_path: JSON file holding the resumable state (None: nothing is written).
    config:     JSON-serialisable description of everything that determines the scores (model,
                objective, prompts, seeds, u, w, ...); with candidates, top_k and rounds it must match
                the state file's to resume.
    restart:    discard an existing state file instead of resuming it.
    validate:   optional validate(HeadSet, index) -> dict, run once for the empty set (index 0) before
                the first round and once after each round (index r); results are kept in the state.
    progress:   show a tqdm bar over the candidates of each round.
    on_round:   called with each completed round's record.
    workers:    the processes sharing the search (`SingleProcess` by default): each scores every size-th
                candidate of a round, the scores are exchanged after each batch so every process holds the
                same state, process 0 alone writes the state file and runs the validator. A round's
                "seconds" is then the scoring time summed over the processes.
    """
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be an integer >= 1 (heads added per round), got {top_k!r}")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be an integer >= 1, got {rounds!r}")
    pool = _normalise_candidates(candidates)
    if not pool:
        raise ValueError("no candidate heads to search (check the layer restriction)")
    if not callable(score):
        raise TypeError("score must be a callable score(HeadSet) -> float")
    full_config = _jsonable({**(config or {}), "candidates": [list(p) for p in pool], "top_k": top_k, "rounds": rounds})

    workers = workers if workers is not None else SingleProcess()
    lead = workers.rank == 0
    path = Path(state_path) if state_path is not None else None
    state, mismatch = workers.share(_open_state(path, full_config, restart) if lead else None)
    if mismatch:
        raise SearchConfigMismatch(mismatch)
    if state is None:
        state = {"format": STATE_FORMAT, "config": full_config, "rounds": [], "current": None, "validation": [],
                 "done": False}

    def save() -> None:
        if path is not None and lead:
            _write_json(path, state)

    save()
    evaluated = 0
    resumed = 0
    order: list[Pair] = [tuple(p) for r in state["rounds"] for p in r["added"]]

    def run_validation(index: int) -> None:
        """Validate the set selected after `index` rounds, once (indices are visited in order)."""
        if validate is None or (index < len(state["validation"]) and state["validation"][index] is not None):
            return
        heads = HeadSet.from_pairs(p for rec in state["rounds"][:index] for p in rec["added"])
        result = workers.share({"heads": str(heads), **dict(validate(heads, index))} if lead else None)
        state["validation"][index:index + 1] = [_jsonable(result)]
        save()

    for index in range(len(state["rounds"]) + 1):  # baseline, and rounds finished before an interruption
        run_validation(index)
    for r in range(len(state["rounds"]), rounds):
        chosen = set(order)
        remaining = [p for p in pool if p not in chosen]
        if not remaining:
            break
        current = state["current"]
        if current is None or current.get("round") != r:
            current = state["current"] = {"round": r, "scores": {}, "seconds": 0.0}
        scores: dict = current["scores"]
        base = HeadSet.from_pairs(order)
        todo = [p for p in remaining if head_key(p) not in scores]
        resumed += len(remaining) - len(todo)
        bar = _progress(len(remaining), len(remaining) - len(todo), f"HeadHunter round {r + 1}/{rounds}", progress)
        best = max((v for v in scores.values() if v is not None), default=None)
        try:
            for start in range(0, len(todo), workers.size):
                batch = todo[start:start + workers.size]
                mine = batch[workers.rank] if workers.rank < len(batch) else None
                for key, value, seconds in _score_batch(workers, score, base, mine):
                    current["seconds"] = round(current["seconds"] + seconds, 4)
                    scores[key] = value
                    evaluated += 1
                    if value is not None and (best is None or value > best):
                        best = value
                    if bar is not None:
                        bar.update(1)
                        if best is not None:
                            bar.set_postfix(best=f"{best:.4g}", refresh=False)
                save()
        finally:
            if bar is not None:
                bar.close()
        ranked = sorted(remaining, key=lambda p: (scores[head_key(p)] is None, -(scores[head_key(p)] or 0.0)))
        added = ranked[:top_k]
        record = {
            "round": r + 1,
            "added": [list(p) for p in added],
            "added_scores": [scores[head_key(p)] for p in added],
            "heads": str(HeadSet.from_pairs(order + added)),
            "scores": {head_key(p): scores[head_key(p)] for p in remaining},
            "seconds": current["seconds"],
        }
        state["rounds"].append(record)
        state["current"] = None
        order.extend(added)
        save()
        run_validation(r + 1)
        if on_round is not None:
            on_round(record)
    state["done"] = True  # also when the candidates ran out before `rounds` rounds
    save()
    return SearchResult(HeadSet.from_pairs(order), order, state["rounds"],
                        [v for v in state["validation"] if v is not None], full_config, evaluated, resumed)
