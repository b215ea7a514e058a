"""Per-sample class scores as Parquet: written by every fine-tuning run (``<run>/final/
scores_val.parquet`` and ``scores_test.parquet``, also under ``best/``) and by ``mtscale evaluate
--save-scores`` (``scores_<part>.parquet``); read by ``mtscale ensemble``.

One row per sample, in store-row order::

    sample_id   string   the manifest's id (what runs are matched on)
    row         int64    the store row
    label       int64    the true class
    score_0 ... score_{K-1}  float32   softmax probabilities (averaged over test clips)
    run         string   the run directory (or checkpoint) that scored it
    stream      string   its input stream (data.stream, e.g. ``bone``)
    part        string   ``val`` (the run's validation hold-out) or the scored part (``test``)

The file's metadata (key ``mtscale``, JSON) repeats run / stream / part and adds the format,
``kind`` (``softmax``), class names, store, split, clips and, for a fine-tuning run, how its
validation rows were chosen.

Axis letters: N samples, K classes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mtscale.errors import BadInputError
from mtscale.files import atomic_path

SCORES_FORMAT = "mtscale-scores/1"
META_KEY = b"mtscale"
KIND = "softmax"
"""What the score columns hold: softmax probabilities (what ``mtscale ensemble`` adds)."""


def scores_file(folder: str | Path, part: str) -> Path:
    """``<folder>/scores_<part>.parquet``."""
    return Path(folder) / f"scores_{part}.parquet"


@dataclass
class Scores:
    """The contents of one scores file."""

    sample_ids: np.ndarray  # (N,) str
    labels: np.ndarray  # (N,) int64
    scores_NK: np.ndarray  # (N, K) float32
    rows: np.ndarray  # (N,) int64
    meta: dict[str, Any] = field(default_factory=dict)
    path: str = ""

    @property
    def run(self) -> str:
        return str(self.meta.get("run", ""))

    @property
    def stream(self) -> str:
        return str(self.meta.get("stream", "joint"))

    @property
    def part(self) -> str:
        return str(self.meta.get("part", ""))

    @property
    def num_classes(self) -> int:
        return int(self.scores_NK.shape[1])

    def sorted_by_id(self) -> Scores:
        """The same rows ordered by sample id (how runs are aligned)."""
        o = np.argsort(self.sample_ids, kind="stable")
        return Scores(self.sample_ids[o], self.labels[o], self.scores_NK[o], self.rows[o], self.meta, self.path)


def write_scores(path: str | Path, *, sample_ids: list[str] | np.ndarray, rows: np.ndarray, labels: np.ndarray,
                 scores_NK: np.ndarray, run: str, stream: str, part: str, **meta: Any) -> Path:
    """Write a scores file atomically (see the module docstring); ``meta``: extra metadata
    (class_names, store, split, clips, ...)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    scores_NK = np.asarray(scores_NK, dtype=np.float32)
    n, k = scores_NK.shape
    ids = [str(s) for s in sample_ids]
    if not (len(ids) == len(rows) == len(labels) == n):
        raise ValueError(f"write_scores: {len(ids)} ids, {len(rows)} rows, {len(labels)} labels, {n} score rows")
    cols: dict[str, Any] = {"sample_id": pa.array(ids, pa.string()),
                            "row": pa.array(np.asarray(rows, dtype=np.int64)),
                            "label": pa.array(np.asarray(labels, dtype=np.int64))}
    for j in range(k):
        cols[f"score_{j}"] = pa.array(scores_NK[:, j])
    cols["run"] = pa.array([run] * n, pa.string())
    cols["stream"] = pa.array([stream] * n, pa.string())
    cols["part"] = pa.array([part] * n, pa.string())
    info = {"format": SCORES_FORMAT, "kind": KIND, "run": run, "stream": stream, "part": part,
            "num_classes": k, **meta}
    table = pa.table(cols).replace_schema_metadata({META_KEY: json.dumps(info, default=str).encode()})
    out = Path(path)
    with atomic_path(out) as tmp:
        pq.write_table(table, tmp)
    return out


def read_scores(path: str | Path) -> Scores:
    """Read a scores file; anything else is a one-line BadInputError."""
    import pyarrow.parquet as pq

    p = Path(path)
    if not p.is_file():
        raise BadInputError(str(p), None, "file not found", "a scores file (scores_<part>.parquet)")
    try:
        table = pq.read_table(p)
    except Exception as e:  # pyarrow raises several types for a file that is not Parquet
        raise BadInputError(str(p), None, f"not readable as Parquet ({type(e).__name__})", "a scores file") from None
    raw = (table.schema.metadata or {}).get(META_KEY)
    meta = json.loads(raw) if raw else {}
    if meta.get("format") != SCORES_FORMAT:
        raise BadInputError(str(p), None, f"format {meta.get('format')!r}",
                            f"{SCORES_FORMAT!r} (written by mtscale finetune / evaluate --save-scores)")
    k = int(meta["num_classes"])
    scores = np.stack([table.column(f"score_{j}").to_numpy() for j in range(k)], axis=1).astype(np.float32)
    return Scores(np.asarray(table.column("sample_id").to_pylist(), dtype=object),
                  table.column("label").to_numpy().astype(np.int64), scores,
                  table.column("row").to_numpy().astype(np.int64), meta, str(p))


def sample_ids(store: Any, rows: np.ndarray) -> list[str]:
    """The manifest's ``sample_id`` of each store row."""
    import pyarrow as pa

    taken = store.manifest.column("sample_id").take(pa.array(np.asarray(rows, dtype=np.int64)))
    return [str(s) for s in taken.to_pylist()]
