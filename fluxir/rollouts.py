"""Rollouts as Arrow record batches: one row per candidate trajectory, tensors as fixed-shape columns.

`ROLLOUT_COLUMNS` and `SCORE_COLUMNS` are the schema every reader and writer goes through: the rollout
actor writes the first (`candidate_rows` builds them), the reward worker appends the second
(`with_scores`), the learner reads both (`fluxir.rl.learner_batch`). The schema metadata of a record
batch holds the sampling schedule and the stored state indices.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

INT64, FLOAT32, TENSOR = "int64", "float32", "tensor"  # Arrow kinds: scalar int64, scalar float32, fixed-shape float32
FROM_INPUT, FROM_SAMPLER, FROM_SHARD, FROM_REWARD = "input", "sampler", "shard", "reward"


@dataclass(frozen=True)
class Column:
    """One column of a rollout batch.

    kind: INT64 / FLOAT32 (one scalar per row) or TENSOR (`pa.fixed_shape_tensor`, float32).
    source: where the rollout actor takes the value from: FROM_INPUT (the input's own value, repeated
    for its K candidates), FROM_SAMPLER (`fluxir.rl.sample_candidates`' output), FROM_SHARD (the shard's
    input index and policy version); FROM_REWARD: appended by the reward worker.
    """
    name: str
    kind: str
    source: str
    meaning: str

    @property
    def writer(self) -> str:
        """Who writes the column: "rollout" (the rollout actor) or "reward" (the reward worker)."""
        return "reward" if self.source == FROM_REWARD else "rollout"

    def to_arrow(self, value: torch.Tensor) -> pa.Array:
        """The column's Arrow array from a tensor with one entry per row."""
        if self.kind == TENSOR:
            array = np.ascontiguousarray(value.detach().cpu().numpy().astype(np.float32, copy=False))
            return pa.FixedShapeTensorArray.from_numpy_ndarray(array)
        return pa.array(value.cpu().numpy().astype(np.int64 if self.kind == INT64 else np.float32))


ROLLOUT_COLUMNS = (
    Column("input", INT64, FROM_SHARD, "global index of the input in the stage's stream"),
    Column("task", INT64, FROM_INPUT, "degradation task id"),
    Column("seed", INT64, FROM_INPUT, "the input's degradation/noise seed"),
    Column("candidate", INT64, FROM_SAMPLER, "candidate index within the input's group, 0 = the ODE trajectory"),
    Column("noise_seed", INT64, FROM_SAMPLER, "seed of the candidate's exploration noise"),
    Column("version", INT64, FROM_SHARD, "policy version that sampled the row"),
    Column("lq", TENSOR, FROM_INPUT, "(3, H, W) degraded input image in [0, 1]"),
    Column("gt", TENSOR, FROM_INPUT, "(3, H, W) ground-truth image in [0, 1]"),
    Column("final", TENSOR, FROM_SAMPLER, "(3, H, W) the trajectory's decoded result in [0, 1]"),
    Column("states", TENSOR, FROM_SAMPLER, "(S, N, C) tokens at the stored schedule indices"),
    Column("log_probs", TENSOR, FROM_SAMPLER, "(nfe,) per-dimension step log-probs, 0 on ODE steps"),
)
SCORE_COLUMNS = (
    Column("psnr", FLOAT32, FROM_REWARD, "PSNR of final against gt"),
    Column("ssim", FLOAT32, FROM_REWARD, "SSIM of final against gt"),
    Column("lpips", FLOAT32, FROM_REWARD, "LPIPS of final against gt, NaN when the reward does not weigh it"),
    Column("reward", FLOAT32, FROM_REWARD, "the configured reward of final; NaN where a plug-in term failed"),
    Column("failed_term", INT64, FROM_REWARD, "1 + index in rl.reward.terms of the first term that failed, 0 = none"),
)
COLUMNS = {c.name: c for c in ROLLOUT_COLUMNS + SCORE_COLUMNS}
REWARD_READS = ("final", "gt", "lq", "task")  # what the reward worker scores


def column(name: str) -> Column:
    """The schema entry of `name`; ValueError naming it when the schema has no such column."""
    try:
        return COLUMNS[name]
    except KeyError:
        raise ValueError(f"unknown rollout column {name!r}; known: {', '.join(COLUMNS)}") from None


def check_columns(present: Iterable[str], needed: Iterable[str], reader: str) -> None:
    """ValueError naming any column of `present` the schema does not know, or of `needed` not present."""
    present = list(present)
    for name in present:
        column(name)
    missing = [column(name).name for name in needed if name not in present]
    if missing:
        raise ValueError(f"{reader}: rollout column(s) {', '.join(map(repr, missing))} missing "
                         f"(have {', '.join(present)})")


def _names(source: str) -> tuple[str, ...]:
    return tuple(c.name for c in ROLLOUT_COLUMNS if c.source == source)


def _check_exact(given: Iterable[str], expected: tuple[str, ...], what: str) -> None:
    given = list(given)
    unknown = [name for name in given if name not in expected]
    if unknown:
        raise ValueError(f"{what}: unexpected column(s) {', '.join(map(repr, unknown))} (expected "
                         f"{', '.join(expected)})")
    check_columns(given, expected, what)


def candidate_rows(inputs: dict[str, torch.Tensor], sampled: dict[str, torch.Tensor], k: int, version: int,
                   first_index: int) -> dict[str, torch.Tensor]:
    """The `ROLLOUT_COLUMNS` (in that order) of one shard's n·K candidate rows, row b·K + j = input b's
    candidate j.

    inputs: the shard's n inputs (lq, gt, task, seed), each repeated for its K candidates; sampled:
    `sample_candidates`' output for them; `first_index`: the global index of the shard's first input;
    `version`: the policy version that sampled them.
    """
    _check_exact(inputs, _names(FROM_INPUT), "rollout inputs")
    _check_exact(sampled, _names(FROM_SAMPLER), "sampled candidates")
    n = len(inputs["seed"])
    shard = {"input": torch.arange(first_index, first_index + n).repeat_interleave(k, 0),
             "version": torch.full((n * k,), version)}
    rows = {}
    for c in ROLLOUT_COLUMNS:
        if c.source == FROM_INPUT:
            rows[c.name] = inputs[c.name].repeat_interleave(k, 0)
        else:
            rows[c.name] = (sampled if c.source == FROM_SAMPLER else shard)[c.name]
    return rows


def to_record_batch(columns: dict[str, torch.Tensor], schedule: list[float], kept: list[int]) -> pa.RecordBatch:
    """A record batch of schema columns (in the order given; every column has the same first dim).

    Any subset of the schema is accepted: a rollout shard writes `ROLLOUT_COLUMNS`, a teacher set of
    stage 2 only its images, states, task and seed.
    """
    rows = {len(v) for v in columns.values()}
    if len(rows) != 1:
        raise ValueError(f"rollout columns have different row counts: { {k: len(v) for k, v in columns.items()} }")
    arrays = [column(name).to_arrow(value) for name, value in columns.items()]
    meta = {"schedule": json.dumps(schedule), "kept_indices": json.dumps(kept)}
    return pa.RecordBatch.from_arrays(arrays, names=list(columns), metadata=meta)


def with_scores(batch: pa.RecordBatch, scores: dict[str, torch.Tensor]) -> pa.RecordBatch:
    """`batch` plus the score columns (replacing any already there)."""
    table = pa.Table.from_batches([batch])
    for name, value in scores.items():
        if name not in (c.name for c in SCORE_COLUMNS):
            raise ValueError(f"unknown score column {name!r}; known: {', '.join(c.name for c in SCORE_COLUMNS)}")
        array = COLUMNS[name].to_arrow(value)
        index = table.schema.get_field_index(name)
        table = table.set_column(index, name, array) if index >= 0 else table.append_column(name, array)
    return table.combine_chunks().to_batches()[0]


def column_tensor(batch: pa.RecordBatch | pa.Table, name: str) -> torch.Tensor:
    """One column as a torch tensor (tensor columns keep their fixed shape)."""
    array = batch.column(name)
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks()
    if isinstance(array.type, pa.FixedShapeTensorType):
        return torch.from_numpy(array.to_numpy_ndarray().copy())
    return torch.from_numpy(array.to_numpy(zero_copy_only=False).copy())


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
