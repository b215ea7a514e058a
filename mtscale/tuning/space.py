"""Search space: the ``space:`` section of a tune YAML -> a Ray Tune ``param_space``.

Each hyper-parameter is addressed by the dotted key of the fine-tuning config it sets
(``train.lr``, ``layer_decay``, ``data.augment.rotate_deg`` ...). Keys may be written dotted or
nested (``train: {lr: ...}``); both flatten to ``train.lr``. Each value is one of::

    {choice: [a, b, c]}          one of the listed values, uniformly
    {uniform: [low, high]}       float in [low, high)
    {loguniform: [low, high]}    float, log-uniform in [low, high); low > 0
    {randint: [low, high]}       integer in [low, high)  (high exclusive, as numpy)
    {grid: [a, b, c]}            every value, each crossed with the other grid keys
    <plain value>                a constant (same as an override)

Optional modifiers on uniform / loguniform: ``{loguniform: [1e-5, 1e-2], q: 1e-5}``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mtscale.errors import ConfigError

KINDS = ("choice", "uniform", "loguniform", "randint", "grid")


@dataclass(frozen=True)
class Dim:
    """One searched hyper-parameter, before it becomes a Ray domain."""

    key: str
    """Dotted key in the fine-tuning config, e.g. ``train.lr``."""
    kind: str
    """choice | uniform | loguniform | randint | grid | const."""
    values: tuple
    """The listed values (choice, grid, const) or (low, high)."""
    q: float | None = None

    @property
    def is_log(self) -> bool:
        return self.kind == "loguniform"


def _is_spec(node: Any) -> bool:
    return isinstance(node, dict) and any(k in node for k in KINDS)


def _flatten(node: dict, prefix: str, out: dict[str, Any], where: str) -> None:
    for k, v in node.items():
        if not isinstance(k, str) or not k:
            raise ConfigError(f"{where}: found key {k!r}, expected a dotted config key such as train.lr")
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict) and not _is_spec(v):
            if not v:
                raise ConfigError(f"{where}.{key}: found an empty mapping, expected a search spec or a value")
            _flatten(v, key, out, where)
        else:
            out.pop(key, None)  # given twice (dotted in the YAML, nested by --set): the later wins
            out[key] = v


def _number(v: Any, path: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ConfigError(f"{path}: found {v!r}, expected a number")
    return v


def parse_dim(key: str, spec: Any, where: str = "space") -> Dim:
    """Validate one entry of the space; raises ConfigError naming ``where.key``."""
    path = f"{where}.{key}"
    if not _is_spec(spec):
        return Dim(key, "const", (spec,))
    kinds = [k for k in KINDS if k in spec]
    extra = sorted(set(spec) - set(KINDS) - {"q"})
    if len(kinds) != 1 or extra:
        raise ConfigError(
            f"{path}: found keys {sorted(spec)}, expected exactly one of {list(KINDS)} (plus optional q)"
        )
    kind = kinds[0]
    args = spec[kind]
    q = spec.get("q")
    if q is not None:
        if kind not in ("uniform", "loguniform"):
            raise ConfigError(f"{path}.q: only allowed with uniform or loguniform, found with {kind}")
        if _number(q, f"{path}.q") <= 0:
            raise ConfigError(f"{path}.q: found {q}, expected > 0")
    if not isinstance(args, (list, tuple)):
        raise ConfigError(f"{path}.{kind}: found {args!r}, expected a list")
    if kind in ("choice", "grid"):
        if len(args) < 1:
            raise ConfigError(f"{path}.{kind}: found an empty list, expected at least one value")
        return Dim(key, kind, tuple(args))
    if len(args) != 2:
        raise ConfigError(f"{path}.{kind}: found {len(args)} values, expected [low, high]")
    low, high = (_number(a, f"{path}.{kind}") for a in args)
    if kind == "randint" and not all(isinstance(a, int) for a in (low, high)):
        raise ConfigError(f"{path}.randint: found {list(args)}, expected two integers")
    if not low < high:
        raise ConfigError(f"{path}.{kind}: found [{low}, {high}], expected low < high")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"{path}.loguniform: found low={low}, expected > 0")
    return Dim(key, kind, (low, high), q)


def parse_space(space: dict | None, where: str = "space") -> list[Dim]:
    """Flatten and validate the ``space`` mapping into a list of ``Dim`` (YAML order)."""
    if space is None:
        return []
    if not isinstance(space, dict):
        raise ConfigError(f"{where}: found {type(space).__name__}, expected a mapping of dotted keys to specs")
    flat: dict[str, Any] = {}
    _flatten(space, "", flat, where)
    return [parse_dim(k, v, where) for k, v in flat.items()]


def to_ray_domain(dim: Dim, *, grid_choices: bool = False) -> Any:
    """The Ray Tune domain for ``dim``; ``grid_choices`` turns ``choice`` into a grid (grid search)."""
    from ray import tune

    if dim.kind == "const":
        return dim.values[0]
    if dim.kind == "grid" or (grid_choices and dim.kind == "choice"):
        return tune.grid_search(list(dim.values))
    if dim.kind == "choice":
        return tune.choice(list(dim.values))
    low, high = dim.values
    if dim.kind == "randint":
        return tune.randint(int(low), int(high))
    if dim.kind == "uniform":
        return tune.quniform(low, high, dim.q) if dim.q else tune.uniform(low, high)
    if dim.kind == "loguniform":
        return tune.qloguniform(low, high, dim.q) if dim.q else tune.loguniform(low, high)
    raise AssertionError(dim.kind)  # parse_dim admits nothing else


def to_param_space(dims: list[Dim], algorithm: str = "random") -> dict[str, Any]:
    """Ray ``param_space`` keyed by dotted config keys.

    ``random``: grid keys are crossed, the rest sampled (``num_samples`` times per grid point).
    ``grid``: every key must be grid / choice / const; choices become grid axes.
    ``optuna`` / ``hyperopt``: grid keys are not supported by those searchers.
    """
    if algorithm == "grid":
        bad = [d.key for d in dims if d.kind not in ("grid", "choice", "const")]
        if bad:
            raise ConfigError(
                f"space.{bad[0]}: search.algorithm grid needs grid / choice / constant values, "
                f"found {next(d.kind for d in dims if d.key == bad[0])}"
            )
    if algorithm in ("optuna", "hyperopt"):
        bad = [d.key for d in dims if d.kind == "grid"]
        if bad:
            raise ConfigError(f"space.{bad[0]}: grid is not supported with search.algorithm {algorithm}, use choice")
    return {d.key: to_ray_domain(d, grid_choices=algorithm == "grid") for d in dims}


def pbt_mutations(dims: list[Dim]) -> dict[str, Any]:
    """Mutation space for Population Based Training: every sampled (non-constant) key."""
    out: dict[str, Any] = {}
    for d in dims:
        if d.kind in ("choice", "grid"):
            out[d.key] = list(d.values)
        elif d.kind != "const":
            out[d.key] = to_ray_domain(d)
    if not out:
        raise ConfigError("space: scheduler pbt needs at least one searched (non-constant) key to mutate")
    return out


def grid_size(dims: list[Dim], algorithm: str = "random") -> int:
    """How many grid points the space has (1 without grid keys)."""
    n = 1
    for d in dims:
        if d.kind == "grid" or (algorithm == "grid" and d.kind == "choice"):
            n *= len(d.values)
    return n


def flatten_overrides(node: dict | None, where: str = "overrides") -> dict[str, Any]:
    """Dotted or nested overrides -> {dotted key: value} (values are constants, not specs)."""
    if node is None:
        return {}
    if not isinstance(node, dict):
        raise ConfigError(f"{where}: found {type(node).__name__}, expected a mapping of dotted keys to values")
    out: dict[str, Any] = {}
    _flatten(node, "", out, where)
    for k, v in out.items():
        if _is_spec(v):
            raise ConfigError(f"{where}.{k}: found a search spec, expected a plain value (searched keys go in space)")
    return out
