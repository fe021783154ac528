"""Every trial config an experiment spec can produce, checked before Ray starts: rows, grid points, searched values.

What fails here would fail the same way in every retry of a trial (docs/refusals.md): a grid value or a
searched value the method config refuses, or a prompt setting the backbone's shape cannot take (read from its
model config, hisf/model/backbone_shape.py). Errors are ConfigErrors whose message names the spec key; the
spec parser (orchestrator/spec.py) turns them into SpecErrors.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Sequence

from hisf.config import ConfigError, TrialConfig, replace_path

# An integer search range is checked at every value it can draw when it has at most this many.
INT_VALUES_CHECKED = 1000


@dataclass(frozen=True)
class ParamRange:
    """One searched parameter of `search.params`: a range (low, high, log, int) or a list of choices."""

    key: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    # An integer parameter (e.g. method.depth) is sampled with suggest_int.
    int: bool = False
    choices: tuple[Any, ...] | None = None


def check_trial_configs(rows: Sequence[tuple[str, TrialConfig, bool]], grid: tuple[tuple[str, tuple[Any, ...]], ...],
                        params: tuple[ParamRange, ...]) -> None:
    """`rows`: (where, the row merged with base, searched?). Checks the row, or each grid point when there is a
    grid (a grid value overrides the row's); for searched rows every value the study can draw at each of those.
    A failure that hangs on another searched value (a searched depth against a searched cross layer) is left
    to trial start, where it fails at once as a ConfigError."""
    axes = [[(j, key, v) for j, v in enumerate(values)] for key, values in grid]
    points = list(itertools.product(*axes)) if grid else []
    for where, cfg, is_searched in rows:
        searched = {p.key for p in params} if is_searched else set()
        for key, values in grid:  # types and keys first, named by the value
            for j, v in enumerate(values):
                try:
                    replace_path(cfg, key, v)
                except ConfigError as e:
                    raise ConfigError(f"grid.{key}[{j}]: {e}") from None
        starts = []  # the configs the trials start from: the row, or the row at each grid point
        for point in points or [()]:
            at = cfg
            for _, key, v in point:
                at = replace_path(at, key, v)
            try:
                starts.append(fits(at))
            except ConfigError as e:
                if _key_of(e) in searched:  # every trial of this row sets it from the search
                    starts.append(at)
                    continue
                raise ConfigError(f"{_grid_label(point)}: {e} ({where})" if point else
                                  f"{where} merged with base: {e}") from None
        if searched:
            _check_searched(params, starts, where)


def fits(cfg: TrialConfig) -> TrialConfig:
    """Validated, and its method checked against the backbone's shape (read from the model config)."""
    from hisf.model.backbone_shape import backbone_shape, check_fits

    cfg.validate()
    check_fits(cfg.method, backbone_shape(cfg.backbone))
    return cfg


def search_values(p: ParamRange) -> list[tuple[str, Any]]:
    """(where, value) for what a study can draw: every choice; a range's low and high, and every integer of
    a small integer range (so 3 fusion heads between 1 and 4 fail here, not in trial 7)."""
    if p.choices is not None:
        return [(f".choices[{j}]", v) for j, v in enumerate(p.choices)]
    if not p.int:
        return [(".low", p.low), (".high", p.high)]
    low, high = int(p.low), int(p.high)
    if high - low + 1 > INT_VALUES_CHECKED:
        return [(".low", low), (".high", high)]
    return [(".low" if v == low else ".high" if v == high else f" = {v} (between low and high)", v)
            for v in range(low, high + 1)]


def _check_searched(params: tuple[ParamRange, ...], starts: list[TrialConfig], where: str) -> None:
    """Every value a study can draw, at each config the row's trials start from."""
    searched = {p.key for p in params}
    for p in params:
        for label, v in search_values(p):
            for at in starts:
                try:
                    with_v = replace_path(at, p.key, v)
                except ConfigError as e:  # an unknown key or a wrong type: wrong whatever else is drawn
                    raise ConfigError(f"search.params.{p.key}{label}: {e}{_int_hint(at, p)} ({where})") from None
                try:
                    fits(with_v)
                except ConfigError as e:
                    if _key_of(e) in searched - {p.key} or _fits_with_others(with_v, p, params):
                        continue
                    raise ConfigError(f"search.params.{p.key}{label}: {e} ({where})") from None


def _fits_with_others(cfg: TrialConfig, p: ParamRange, params: tuple[ParamRange, ...], tries: int = 256) -> bool:
    """Whether some values of the other searched parameters make `cfg` (holding p's value) fit: then the value
    is not wrong on its own, only some draws with it are."""
    others = [[(q.key, v) for _, v in search_values(q)] for q in params if q.key != p.key]
    for combo in itertools.islice(itertools.product(*others), tries) if others else ():
        try:
            at = cfg
            for key, v in combo:
                at = replace_path(at, key, v)
            fits(at)
            return True
        except ConfigError:
            continue
    return False


def _key_of(e: ConfigError) -> str:
    """The key path a config error names first (`method.depth: ...`)."""
    return str(e).split(":", 1)[0]


def _grid_label(point) -> str:
    if len(point) == 1:
        j, key, _ = point[0]
        return f"grid.{key}[{j}]"
    return "grid point {" + ", ".join(f"{key}: {v}" for _, key, v in point) + "}"


def _int_hint(cfg: TrialConfig, p: ParamRange) -> str:
    """A float range on an integer key: say how to make it an integer range."""
    if p.choices is not None or p.int or p.low != int(p.low):
        return ""
    try:
        replace_path(cfg, p.key, int(p.low))
    except ConfigError:
        return ""
    return f"; {p.key} takes integers: add `int: true` to the range"
