"""Rollouts as Arrow record batches: one row per candidate trajectory, tensors as fixed-shape columns.

Scalar columns: input (global input index), task, seed (the input's degradation/noise seed),
candidate (0 = ODE), noise_seed, version (policy version that sampled it); after scoring also
psnr, ssim, lpips (NaN when not computed) and reward. Tensor columns (`pa.fixed_shape_tensor`,
float32): lq, gt, final (3, H, W) images in [0, 1]; states (S, N, C) tokens at the stored
schedule indices; log_probs (nfe,). The schema metadata holds the schedule and the stored indices.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

TENSOR_COLUMNS = ("lq", "gt", "final", "states", "log_probs")
INT_COLUMNS = ("input", "task", "seed", "candidate", "noise_seed", "version")
SCORE_COLUMNS = ("psnr", "ssim", "lpips", "reward")


def _tensor_array(x: torch.Tensor) -> pa.ExtensionArray:
    array = np.ascontiguousarray(x.detach().cpu().numpy().astype(np.float32, copy=False))
    return pa.FixedShapeTensorArray.from_numpy_ndarray(array)


def to_record_batch(columns: dict[str, torch.Tensor], schedule: list[float], kept: list[int]) -> pa.RecordBatch:
    """A record batch from per-row tensors (every column has the same first dim)."""
    rows = {len(v) for v in columns.values()}
    if len(rows) != 1:
        raise ValueError(f"rollout columns have different row counts: { {k: len(v) for k, v in columns.items()} }")
    arrays, names = [], []
    for name, value in columns.items():
        if name in TENSOR_COLUMNS:
            arrays.append(_tensor_array(value))
        elif name in INT_COLUMNS:
            arrays.append(pa.array(value.cpu().numpy().astype(np.int64)))
        elif name in SCORE_COLUMNS:
            arrays.append(pa.array(value.cpu().numpy().astype(np.float32)))
        else:
            raise ValueError(f"unknown rollout column {name!r}")
        names.append(name)
    meta = {"schedule": json.dumps(schedule), "kept_indices": json.dumps(kept)}
    return pa.RecordBatch.from_arrays(arrays, names=names, metadata=meta)


def with_scores(batch: pa.RecordBatch, scores: dict[str, torch.Tensor]) -> pa.RecordBatch:
    """`batch` plus the score columns (replacing any already there)."""
    table = pa.Table.from_batches([batch])
    for name, value in scores.items():
        if name not in SCORE_COLUMNS:
            raise ValueError(f"unknown score column {name!r}")
        column = pa.array(value.cpu().numpy().astype(np.float32))
        index = table.schema.get_field_index(name)
        table = table.set_column(index, name, column) if index >= 0 else table.append_column(name, column)
    return table.combine_chunks().to_batches()[0]


def column_tensor(batch: pa.RecordBatch | pa.Table, name: str) -> torch.Tensor:
    """One column as a torch tensor (tensor columns keep their fixed shape)."""
    column = batch.column(name)
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if isinstance(column.type, pa.FixedShapeTensorType):
        return torch.from_numpy(column.to_numpy_ndarray().copy())
    return torch.from_numpy(column.to_numpy(zero_copy_only=False).copy())


def to_tensors(batches: list[pa.RecordBatch]) -> dict[str, torch.Tensor]:
    """Concatenate record batches (in order) into a dict of tensors, one per column."""
    table = pa.Table.from_batches(batches)
    return {name: column_tensor(table, name) for name in table.schema.names}


def schedule_of(batch: pa.RecordBatch | pa.Table) -> tuple[list[float], list[int]]:
    meta = batch.schema.metadata or {}
    return json.loads(meta[b"schedule"]), json.loads(meta[b"kept_indices"])


def write_parquet(batches: list[pa.RecordBatch], path: str | Path) -> Path:
    """Write one iteration's rollouts atomically (temp file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".parquet.tmp")
    pq.write_table(pa.Table.from_batches(batches), tmp)
    os.replace(tmp, path)
    return path


def read_parquet(path: str | Path) -> pa.Table:
    return pq.read_table(path)
