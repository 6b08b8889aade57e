"""LM store rows -> train-step tensors: the collate function of the Ray Train loop's LM batches,
and the decoding of their stored top-k targets (at the positions that carry loss only)."""
from __future__ import annotations

import numpy as np
import torch
from ray.data.collate_fn import ArrowBatchCollateFn

from orchestrator import codec


class LMBatch(ArrowBatchCollateFn):
    """An Arrow batch of LM store rows -> tensors, top-k still coded (decoded per step, at the
    positions that carry loss only).

    Out: input_ids [B, L] long; sel [B, L-1] bool (the positions that carry loss; all for text
    windows); gaps [B, L-1, k] and codes [B, L-1, w] as stored (zero where not selected: packed
    stores keep only the selected positions, as variable-length lists); position_ids [B, L]
    for packed instruction rows; each stored teacher feature named in ``features`` (float16, see
    orchestrator/lm_features.py dense_positions). Per-row tensors, so EpochBatches can cache and reshuffle them.
    """

    def __init__(self, columns: list[str], k: int, features: dict[str, list] | None = None):
        self.ids_col, self.lps_col, self.k = columns[-2], columns[-1], k
        self.features = features or {}  # train.extra_losses: {feature column: per-row shape as stored}

    def __call__(self, batch):
        from orchestrator.columns import list_values, to_numpy
        from orchestrator.lm_features import dense_positions

        x = to_numpy(batch.column("input_ids")).astype(np.int64)
        b, p = x.shape[0], x.shape[1] - 1
        packed = "loss_mask" in batch.column_names
        sel = to_numpy(batch.column("loss_mask"))[:, 1:].astype(bool) if packed else np.ones((b, p), bool)
        n = int(sel.sum())
        gaps, codes = list_values(batch.column(self.ids_col)), list_values(batch.column(self.lps_col))
        gaps, codes = gaps.reshape(n, -1), codes.reshape(n, -1)
        dense_g = np.zeros((b, p, gaps.shape[1]), gaps.dtype)
        dense_c = np.zeros((b, p, codes.shape[1]), codes.dtype)
        dense_g[sel], dense_c[sel] = gaps, codes
        out = {"input_ids": torch.from_numpy(x), "sel": torch.from_numpy(sel),
               "gaps": torch.from_numpy(dense_g), "codes": torch.from_numpy(dense_c)}
        if packed:
            out["position_ids"] = torch.from_numpy(to_numpy(batch.column("position_ids")).astype(np.int64))
        for col, shape in self.features.items():  # [B, L-1, D] per token (zero where unlabeled) or [B, D] pooled
            out[col] = torch.from_numpy(dense_positions(list_values(batch.column(col)), sel, shape))
        if "row" in batch.column_names:  # the store row: EpochBatches keeps its cache in row order
            out["row"] = torch.from_numpy(batch.column("row").to_numpy())
        return out


def decode_targets(gaps: torch.Tensor, codes: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stored top-k of N positions -> (ids long, logprobs float), each [N, k]."""
    if codes.dtype == torch.uint8:  # schema versions 2 and 3: through the store's codec
        ids_np, lps_np = codec.decode(gaps.numpy().reshape(len(gaps), -1), codes.numpy().reshape(len(codes), -1))
        gaps, codes = torch.from_numpy(ids_np), torch.from_numpy(lps_np)
    return gaps.long().view(-1, k), codes.float().view(-1, k)
