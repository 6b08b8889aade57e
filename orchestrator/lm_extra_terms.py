"""``train.extra_losses`` in the LM train step (task lm). Pure torch, no Ray.

Each term compares a stored teacher feature (orchestrator/lm_features.py) with the student's
hidden state ``student_layer`` (an index into ``output_hidden_states``: 0 = the embeddings, i =
after layer i, negative from the last), taken from the same forward pass as the logits and at the
same positions as the teacher's:
- teacher ``pool: none``: one vector per labeled token (the positions whose top-k is stored); only
  ``hint`` (mse or cosine after the learned projection student width -> teacher width), averaged
  over the batch's labeled tokens.
- teacher ``pool: mean | cls``: one vector per store row, the student's pooled the same way over
  the same positions; ``hint`` and the relation terms (``rkd_distance``, ``rkd_angle``,
  ``similarity``), which relate the rows of a batch.
Refused, before any deployment (``check_lm_terms``): ``attention`` (the LM student's attention maps
have no stored teacher counterpart), relation terms on per-token features (they would relate
thousands of token vectors of a batch, mostly neighbours of one sequence: not what RKD / SP mean),
and train.on_policy (its sampled sequences have no stored teacher features). The projections
train, checkpoint, resume and stay out of the export as for classification
(orchestrator/extra_terms.py ``ExtraTerms``, whose bookkeeping this reuses); under
train.strategy fsdp the student's hidden states come through FSDP's forward
(output_hidden_states) and the projections stay outside it, replicated (actors/fsdp_terms.py).
"""
from __future__ import annotations

import torch

from .config import check_extra_loss
from .errors import DistillError
from .extra_terms import MIN_BATCH, ExtraTerms, describe
from .feature_losses import build_extra_loss
from .features import feature_column
from .lm_features import gather_student

RELATION = ("rkd_distance", "rkd_angle", "similarity")


def _where(i: int) -> str:
    return f"train.extra_losses.{i}"


def _student_width(cfg, where: str, layer) -> int:
    """The student's hidden size; its hidden-state index ``layer`` must exist (DistillError if not)."""
    from .prepare import lm_student_spec
    from .students import lm_student_config

    config = lm_student_config(lm_student_spec(cfg))
    n = config.num_hidden_layers
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise DistillError(f"{where}.student_layer: task lm takes a hidden-state index of the student "
                           f"(0 = embeddings .. {n}), got {layer!r}")
    if not -(n + 1) <= layer <= n:
        raise DistillError(f"{where}.student_layer: index {layer} out of range: the student has {n + 1} hidden "
                           f"states (0 = embeddings .. {n})")
    return config.hidden_size


def check_lm_terms(cfg) -> None:
    """prepare (task lm, before labeling): every term is one the LM step computes, on layers the
    student has, against teachers whose pool fits it. Raises a one-line DistillError."""
    if not cfg.train.extra_losses:
        return
    if cfg.train.on_policy is not None:
        raise DistillError("train.extra_losses: not with train.on_policy (the student's sampled sequences have no "
                           "stored teacher features); remove one of them")
    pools = {t.name: t.pool for t in cfg.teachers}
    for i, raw in enumerate(cfg.train.extra_losses):
        spec, where = check_extra_loss(raw, _where(i)), _where(i)
        if spec["kind"] == "attention":
            raise DistillError(f"{where}.kind: attention transfer is for task classification; task lm takes hint, "
                               "or rkd_distance / rkd_angle / similarity over pooled (mean, cls) teacher features")
        named = [n for n in pools if spec["teacher"] in ("ensemble", n)]
        if spec["kind"] in RELATION and (token := [n for n in named if pools[n] == "none"]):
            raise DistillError(f"{where}.kind: {spec['kind']} relates samples: task lm needs one vector per sequence, "
                               f"but teacher '{token[0]}' has pool none; set its teachers[].pool to mean or cls, "
                               "or use kind hint")
        _student_width(cfg, where, spec["student_layer"])


def resolve_lm_terms(cfg, extra_losses: list[dict], shapes: dict[str, list]) -> list[dict]:
    """The terms as plain data for the train workers (as extra_terms.resolve_terms gives them), each
    checked by a dry run at the real widths. shapes: {feature column: per-row shape} as stored."""
    out = []
    for i, raw in enumerate(extra_losses):
        spec, where = check_extra_loss(raw, _where(i)), _where(i)
        width = _student_width(cfg, where, spec["student_layer"])
        s_out = {"kind": "hidden", "key": spec["student_layer"], "shape": [width]}
        parts = []
        for t in [t for t in cfg.teachers if spec["teacher"] in ("ensemble", t.name)]:
            column = feature_column(t.name, spec["teacher_layer"])
            if column not in shapes:
                raise DistillError(f"{where}.teacher_layer: the store has no column {column}; re-label with "
                                   f"teachers[].features listing {spec['teacher_layer']!r}")
            t_dim = int(shapes[column][-1])
            try:
                with torch.no_grad():
                    build_extra_loss(raw, width, t_dim, where)(torch.randn(3, width), torch.randn(3, t_dim))
            except (ValueError, RuntimeError) as e:
                raise DistillError(f"{where}: {spec['kind']} cannot compare the student's hidden state "
                                   f"{spec['student_layer']} [{width}] with teacher '{t.name}' feature "
                                   f"{spec['teacher_layer']} [{t_dim}] ({str(e).splitlines()[0]})") from None
            parts.append({"teacher": t.name, "column": column, "shape": list(shapes[column]), "pool": t.pool,
                          "student_dim": width, "teacher_dim": t_dim})
        out.append({"spec": dict(raw), "student": s_out, "parts": parts, "label": describe(spec, s_out, parts)})
    return out


def plan_lm_terms(cfg, store, extra_losses: list[dict]) -> list[dict]:
    """training (driver): resolve_lm_terms with the feature shapes the store's first shard records."""
    import json

    import pyarrow.parquet as pq

    from .features import PREFIX, SHAPE_KEY

    with store.fs.open_input_file(store.shard_paths()[0]) as f:
        schema = pq.read_schema(f)
    shapes = {f.name: json.loads(f.metadata[SHAPE_KEY]) for f in schema if f.name.startswith(PREFIX)}
    return resolve_lm_terms(cfg, extra_losses, shapes)


class LMExtraTerms(ExtraTerms):
    """The configured terms on one worker (task lm): hint projections, checkpointing, the per-term
    means and the gradient sync are ExtraTerms'; ``lm_step`` is the LM forward.

    ``lm_step(model, x, kwargs, sel, batch, head=None)``: x [B, L] ids, sel [B, L-1] bool (labeled
    positions), batch[column]: stored teacher features, [B, L-1, Dt] (per token, zero where
    unlabeled) or [B, Dt] (pooled, LMBatch) -> (rows at the labeled positions, the weighted terms'
    sum). rows: the logits [N, V]; with ``head`` (orchestrator/fused_head.py FusedHead) the final
    hidden states [N, H] for its fused head + loss instead: the terms read only hidden states, so
    the forward need not make the [B, L, V] logits.
    """

    def lm_step(self, model, x: torch.Tensor, kwargs: dict, sel: torch.Tensor, batch: dict, head=None):
        if head is None:
            out = model(input_ids=x, output_hidden_states=True, **kwargs)
            rows = out.logits[:, :-1][sel]
        else:
            rows, out = head.run(model, x, {**kwargs, "output_hidden_states": True}, sel)
        hidden, n = out.hidden_states, len(out.hidden_states)
        total = rows.new_zeros(())
        for j, (r, losses) in enumerate(zip(self.resolved, self.losses)):
            if len(x) < MIN_BATCH.get(type(losses[0].loss), 1):
                continue  # a relation term on a batch too small to relate (an epoch's last)
            h = hidden[r["student"]["key"] % n]
            values = []
            for p, loss in zip(r["parts"], losses):
                t = batch[p["column"]].to(h.device)
                t = t[sel] if p["pool"] == "none" else t  # [N, Dt]: the stored tokens, in row order
                values.append(loss(gather_student(h, sel, p["pool"]), t))
            term = torch.stack(values).mean()  # teacher: ensemble -> the mean over its teachers
            self._sums[j] += float(term.detach())
            total = total + term
        self._count += 1
        return rows, total


def feature_shapes(resolved: list[dict] | None) -> dict[str, list]:
    """The stored teacher feature columns the terms read, with their per-row shapes (LMBatch)."""
    return {p["column"]: p["shape"] for r in resolved or [] for p in r["parts"]}
