"""The Parquet manifest of a store: one row per sample, its schema, its checksums, and the
small safe filter language used by ``Store.select(where=...)``.

Row ``i`` describes sample ``i``: its frames are ``frames[offset : offset + length]`` of the
store's frames array. Fixed columns come first (see ``FIXED_COLUMNS``), then the split columns
``split_<name>`` and every source field, sorted by name. Source fields are typed per column from
their non-null values (bool, int64, float64 or string) and are nullable.
"""

from __future__ import annotations

import ast
import hashlib
import logging
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mtscale.errors import ConfigError

log = logging.getLogger(__name__)

FIXED_COLUMNS: dict[str, pa.DataType] = {
    "sample_id": pa.string(),
    "offset": pa.int64(),
    "length": pa.int32(),
    "label": pa.int32(),
    "source_file": pa.string(),
    "num_bodies": pa.int32(),
    "checksum": pa.string(),
}
"""Columns every manifest has, in this order. ``num_bodies`` counts the bodies kept (non-zero
in at least one frame); ``checksum`` is ``checksum_bytes`` of the sample's stored frames."""

RESERVED_FIELDS = ("sample_id", "offset", "length", "label", "checksum")
"""Field names a reader may not use (``source_file`` and ``num_bodies`` are filled by the writer;
a reader's own ``num_bodies`` is kept as ``source_num_bodies``)."""


def checksum_bytes(x: np.ndarray) -> str:
    """blake2b-64 hex digest of an array's stored (C-order, native little-endian) bytes."""
    return hashlib.blake2b(np.ascontiguousarray(x).data, digest_size=8).hexdigest()


def count_bodies(x_TMVC: np.ndarray) -> int:
    """Number of bodies that are non-zero in at least one frame."""
    return int(np.any(x_TMVC != 0, axis=(0, 2, 3)).sum())


def _scalar(name: str, v: Any) -> Any:
    if isinstance(v, np.generic):
        v = v.item()
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    raise ValueError(f"field {name!r}: found {type(v).__name__} value {v!r}, expected a scalar (int, float, str, bool or None)")


def clean_fields(fields: dict[str, Any]) -> dict[str, Any]:
    """Validate a reader's fields: scalar values, no reserved names."""
    out = {}
    for k, v in fields.items():
        if k in RESERVED_FIELDS:
            raise ValueError(f"field {k!r}: reserved manifest column, expected another name")
        out["source_num_bodies" if k == "num_bodies" else k] = _scalar(k, v)
    return out


def _column_type(name: str, values: list[Any]) -> tuple[pa.DataType, list[Any]]:
    present = [v for v in values if v is not None]
    if not present:
        return (pa.string() if name.startswith("split_") else pa.null()), values
    kinds = {type(v) for v in present}
    if kinds == {bool}:
        return pa.bool_(), values
    if kinds == {int}:
        return pa.int64(), values
    if kinds <= {int, float}:
        return pa.float64(), [None if v is None else float(v) for v in values]
    if kinds == {str}:
        return pa.string(), values
    log.warning("manifest column %r mixes %s; storing it as strings", name, sorted(k.__name__ for k in kinds))
    return pa.string(), [None if v is None else str(v) for v in values]


def _field(name: str, typ: pa.DataType) -> pa.Field:
    """Schema field of a manifest column: fixed columns are non-null except ``source_file``."""
    return pa.field(name, typ, nullable=name not in FIXED_COLUMNS or name == "source_file")


def build_manifest(rows: list[dict[str, Any]]) -> pa.Table:
    """Typed manifest table from row dicts (each has the fixed columns plus any fields)."""
    names: set[str] = set()
    for r in rows:
        names.update(r)
    missing = [c for c in FIXED_COLUMNS if c not in names and rows]
    if missing:
        raise ValueError(f"manifest rows: missing fixed columns {missing}")
    arrays, fields = [], []
    for name, typ in FIXED_COLUMNS.items():
        arrays.append(pa.array([r.get(name) for r in rows], type=typ))
        fields.append(_field(name, typ))
    for name in sorted(names - set(FIXED_COLUMNS)):
        typ, vals = _column_type(name, [r.get(name) for r in rows])
        arrays.append(pa.array(vals, type=typ))
        fields.append(_field(name, typ))
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


def concat_manifests(parts: list[pa.Table]) -> pa.Table:
    """One manifest from consecutive parts, typed exactly as ``build_manifest`` of all their rows
    would be (a column whose type differs between parts is re-typed over all its values)."""
    if not parts:
        return build_manifest([])
    if len(parts) == 1:
        return parts[0]
    names = set().union(*(t.column_names for t in parts))
    arrays, fields = [], []
    for name in [*FIXED_COLUMNS, *sorted(names - set(FIXED_COLUMNS))]:
        cols = [t.column(name) if name in t.column_names else None for t in parts]
        types = {c.type for c in cols if c is not None and c.type != pa.null()}
        if len(types) > 1:
            vals = [v for t, c in zip(parts, cols) for v in (c.to_pylist() if c is not None else [None] * t.num_rows)]
            typ, vals = _column_type(name, vals)
            arr = pa.chunked_array([pa.array(vals, type=typ)])
        else:
            typ = types.pop() if types else (pa.string() if name.startswith("split_") else pa.null())
            arr = pa.chunked_array([ch for t, c in zip(parts, cols)
                                    for ch in (c.cast(typ).chunks if c is not None else [pa.nulls(t.num_rows, typ)])], type=typ)
        arrays.append(arr)
        fields.append(_field(name, typ))
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields)).combine_chunks()


def split_names(table: pa.Table) -> list[str]:
    return sorted(c[len("split_"):] for c in table.column_names if c.startswith("split_"))


def value_counts(col: pa.ChunkedArray) -> dict[str, int]:
    """Counts per value (``"null"`` for missing), keys as strings, sorted by value."""
    counts = pc.value_counts(col)
    pairs = [(v, int(n)) for v, n in zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist())]
    pairs.sort(key=lambda p: (p[0] is None, str(p[0]) if not isinstance(p[0], (int, float)) else "",
                              p[0] if isinstance(p[0], (int, float)) else 0))
    return {("null" if v is None else str(v)): n for v, n in pairs}


# ---------------------------------------------------------------- where-expressions

_CMP = {
    ast.Eq: pc.equal, ast.NotEq: pc.not_equal, ast.Lt: pc.less, ast.LtE: pc.less_equal,
    ast.Gt: pc.greater, ast.GtE: pc.greater_equal,
}


class _Where:
    """Evaluates a parsed expression over the manifest columns, vectorised with pyarrow."""

    def __init__(self, table: pa.Table, expr: str):
        self.table, self.expr = table, expr

    def fail(self, what: str) -> ConfigError:
        return ConfigError(f"where {self.expr!r}: {what}")

    def literal(self, node: ast.AST) -> Any:
        if isinstance(node, ast.Constant) and (node.value is None or isinstance(node.value, (bool, int, float, str))):
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) and isinstance(node.operand, ast.Constant) \
                and isinstance(node.operand.value, (int, float)) and not isinstance(node.operand.value, bool):
            return -node.operand.value
        raise self.fail(f"found {ast.unparse(node)!r}, expected a literal (number, string, True/False/None)")

    def operand(self, node: ast.AST) -> Any:
        if isinstance(node, ast.Name):
            if node.id not in self.table.column_names:
                raise self.fail(f"found unknown column {node.id!r}, expected one of {self.table.column_names}")
            return self.table.column(node.id)
        return self.literal(node)

    def compare(self, left: ast.AST, op: ast.cmpop, right: ast.AST) -> Any:
        a = self.operand(left)
        if isinstance(op, (ast.In, ast.NotIn)):
            if not isinstance(right, (ast.Tuple, ast.List, ast.Set)):
                raise self.fail(f"found 'in {ast.unparse(right)}', expected 'in (v1, v2, ...)'")
            values = [self.literal(e) for e in right.elts]
            if not isinstance(a, pa.ChunkedArray):
                raise self.fail(f"found literal {a!r} before 'in', expected a column name")
            try:
                res = pc.is_in(a, value_set=pa.array(values).cast(a.type) if values else pa.array([], a.type))
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
                raise self.fail(f"cannot compare column of type {a.type} with {values!r} ({e})") from None
            return pc.invert(res) if isinstance(op, ast.NotIn) else res
        if type(op) not in _CMP:
            raise self.fail(f"found operator {type(op).__name__}, expected ==, !=, <, <=, >, >=, in, not in")
        b = self.operand(right)
        if not isinstance(a, pa.ChunkedArray) and not isinstance(b, pa.ChunkedArray):
            raise self.fail("found a comparison between two literals, expected a column name on one side")
        try:
            return _CMP[type(op)](a, b)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, TypeError) as e:
            raise self.fail(f"cannot compare {ast.unparse(left)} with {ast.unparse(right)} ({e})") from None

    def eval(self, node: ast.AST) -> Any:
        if isinstance(node, ast.BoolOp):
            parts = [self.eval(v) for v in node.values]
            fn = pc.and_kleene if isinstance(node.op, ast.And) else pc.or_kleene
            out = parts[0]
            for p in parts[1:]:
                out = fn(out, p)
            return out
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            return pc.invert(self.eval(node.operand))
        if isinstance(node, ast.Compare):
            out, left = None, node.left
            for op, right in zip(node.ops, node.comparators):
                r = self.compare(left, op, right)
                out = r if out is None else pc.and_kleene(out, r)
                left = right
            return out
        if isinstance(node, ast.Name):
            col = self.operand(node)
            if not pa.types.is_boolean(col.type):
                raise self.fail(f"column {node.id!r} is {col.type}, expected a comparison (e.g. {node.id} == ...)")
            return col
        raise self.fail(f"found {ast.unparse(node)!r}, expected comparisons joined by and/or/not")


def evaluate_where(table: pa.Table, expr: str) -> np.ndarray:
    """Boolean mask (num_rows,) of the rows matching ``expr``; nulls never match.

    ``expr`` is a Python-like expression over manifest columns using only comparisons
    (``==, !=, <, <=, >, >=``, chained), ``in`` / ``not in`` with a tuple or list of literals,
    ``and`` / ``or`` / ``not`` and parentheses, e.g. ``"performer in (1, 2) and camera != 3"``.
    Nothing is ever passed to ``eval``.
    """
    try:
        tree = ast.parse(expr, mode="eval")
    except SyntaxError as e:
        raise ConfigError(f"where {expr!r}: syntax error at column {e.offset}, "
                          "expected a filter like \"performer in (1, 2) and camera != 3\"") from None
    mask = _Where(table, expr).eval(tree.body)
    if isinstance(mask, pa.ChunkedArray) and mask.num_chunks == 0:
        return np.zeros(len(table), dtype=bool)
    return np.asarray(pc.fill_null(mask, False).to_numpy(zero_copy_only=False), dtype=bool)
