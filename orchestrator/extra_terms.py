"""``train.extra_losses`` in the classification train loop: which stored teacher feature and which
student output each term compares (checked in the driver), and the terms' compute in the workers.

Pure torch, no Ray: the driver calls ``check_student_layers`` (prepare, before labeling) and
``resolve_terms`` (training, once the store's feature shapes are known), which turn the config into
plain data; each train worker builds ``ExtraTerms`` from that data (actors/student.py).

Where the student's side comes from (as for the teachers, orchestrator/feature_capture.py):
- ``student.arch hf``: an integer ``student_layer`` is a hidden-state index (0 = the embeddings,
  i = after layer i, negative from the last), or, for ``kind: attention`` with ``source: attention``,
  the index of a layer's attention probabilities [B, H, L, L] (0 .. n-1).
- ``student.arch mlp``: a module name (as ``named_modules()`` gives it), captured by a forward hook.
A token-level student output [B, L, D] compared with a pooled teacher feature [B, D] is pooled as
that teacher's features were (``pool`` cls or mean; mean for a teacher whose output was [B, D]).

With ``teacher: ensemble`` a term is the mean of the same term against each teacher (the hint one
projection per teacher, since their widths may differ). Relation terms need a few samples: a batch
smaller than that (an epoch's last) adds nothing for them. The hint projections train with the
student (they are in the optimiser and in every checkpoint as ``extra_terms``) and are never part
of the student's own state, so nothing of them is exported.
"""
from __future__ import annotations

import torch
from torch import nn

from .config import check_extra_loss
from .errors import DistillError
from .feature_capture import pool_tokens
from .feature_losses import RKDAngle, RKDDistance, SimilarityPreserving, build_extra_loss
from .features import feature_column

WHAT = {"hidden": "hidden state", "attention": "attention maps", "module": "module"}  # for messages
MIN_BATCH = {RKDDistance: 2, RKDAngle: 3, SimilarityPreserving: 2}  # samples a relation term needs


def _where(i: int) -> str:
    return f"train.extra_losses.{i}"


def _wants_attention(spec: dict) -> bool:
    return spec["kind"] == "attention" and spec["source"] == "attention"


def student_output(spec: dict, student: dict, width: int, where: str) -> dict:
    """Where term ``spec`` reads the student: {"kind": hidden | attention | module, "key", "shape"
    (per sample)}. ``student``: the student's build spec (num_classes may be missing); ``width``:
    tokens (arch hf) or features (mlp) per row. A layer the student lacks raises DistillError."""
    layer = spec["student_layer"]
    if student["arch"] == "hf":
        from .cls_students import cls_student_config

        config = cls_student_config(student)
        n = config.num_hidden_layers
        if not isinstance(layer, int):
            raise DistillError(f"{where}.student_layer: student.arch hf takes a hidden-state index "
                               f"(0 = embeddings .. {n}), got {layer!r}")
        if _wants_attention(spec):
            if not -n <= layer < n:
                raise DistillError(f"{where}.student_layer: attention maps index {layer} out of range: the student has "
                                   f"{n} layers (0 .. {n - 1})")
            return {"kind": "attention", "key": layer, "shape": [config.num_attention_heads, width, width]}
        if not -(n + 1) <= layer <= n:
            raise DistillError(f"{where}.student_layer: index {layer} out of range: the student has {n + 1} hidden "
                               f"states (0 = embeddings .. {n})")
        return {"kind": "hidden", "key": layer, "shape": [width, config.hidden_size]}
    from .models import MLPStudent

    with torch.device("meta"):  # the module tree and its shapes only: nothing computed
        model = MLPStudent(width, student.get("num_classes") or 2, student["hidden"])
    modules = {k: m for k, m in model.named_modules() if k}
    if not isinstance(layer, str) or layer not in modules:
        raise DistillError(f"{where}.student_layer: student.arch mlp takes a module name ({', '.join(modules)}), "
                           f"got {layer!r}")
    seen = {}

    def hook(_module, _inputs, out):  # returns None: the output passes on unchanged
        seen["shape"] = list(out.shape[1:])
    modules[layer].register_forward_hook(hook)
    model(torch.empty(2, width, device="meta"))
    return {"kind": "module", "key": layer, "shape": seen["shape"]}


def check_student_layers(extra_losses: list[dict], student: dict, width: int) -> None:
    """Before labeling: every term's student_layer exists in the student (DistillError if not)."""
    for i, spec in enumerate(extra_losses):
        student_output(check_extra_loss(spec, _where(i)), student, width, _where(i))


def _pooled_shape(s_shape: list, t_shape: list, spec: dict, pool: str) -> tuple[list, str | None]:
    """The student's per-sample shape after pooling to meet a [D] teacher feature, and the pool used."""
    if len(s_shape) == 2 and len(t_shape) == 1 and not _wants_attention(spec):
        return [s_shape[-1]], pool if pool in ("cls", "mean") else "mean"
    return s_shape, None


def resolve_terms(extra_losses: list[dict], teachers: list[dict], shapes: dict[str, list], student: dict,
                  width: int) -> list[dict]:
    """The terms as plain data for the train workers, each checked by a dry run on random inputs of
    the real shapes (a mismatch is one DistillError naming the term, teacher and layers).

    teachers: [{"name", "features", "pool"}] as configured; shapes: {feature column: per-sample shape}
    as stored (orchestrator/features.py); student: its build spec; width: its input length.
    """
    out = []
    for i, raw in enumerate(extra_losses):
        spec, where = check_extra_loss(raw, _where(i)), _where(i)
        s_out = student_output(spec, student, width, where)
        # ensemble: every teacher (config.py checks that each captures teacher_layer)
        named = [t for t in teachers if spec["teacher"] in ("ensemble", t["name"])]
        parts = []
        for t in named:
            column = feature_column(t["name"], spec["teacher_layer"])
            t_shape = list(shapes[column])
            s_shape, pool = _pooled_shape(s_out["shape"], t_shape, spec, t.get("pool", "mean"))
            try:
                term = build_extra_loss(raw, s_shape[-1], t_shape[-1], where)
                with torch.no_grad():
                    term(torch.randn(3, *s_shape), torch.randn(3, *t_shape))
            except (ValueError, RuntimeError) as e:
                raise DistillError(f"{where}: {spec['kind']} cannot compare the student's {WHAT[s_out['kind']]} "
                                   f"{spec['student_layer']!r} {s_shape} with teacher '{t['name']}' feature "
                                   f"{spec['teacher_layer']!r} {t_shape} ({str(e).splitlines()[0]}); "
                                   "pick layers of matching shapes (teachers[].pool, student_layer)") from None
            parts.append({"teacher": t["name"], "column": column, "shape": t_shape, "pool": pool,
                          "student_dim": s_shape[-1], "teacher_dim": t_shape[-1]})
        # spec: the entry as configured (build_extra_loss checks it again, defaults and all)
        out.append({"spec": dict(raw), "student": s_out, "parts": parts, "label": describe(spec, s_out, parts)})
    return out


def check_before_labeling(cfg, width: int) -> None:
    """prepare (before labeling): the terms' student layers exist. (train.strategy fsdp: the
    projections stay outside FSDP, replicated: actors/fsdp_terms.py.)"""
    from .prepare import lm_student_spec

    student = {"arch": "hf", **lm_student_spec(cfg)} if cfg.student.arch == "hf" else \
        {"arch": "mlp", "hidden": cfg.student.hidden}
    check_student_layers(cfg.train.extra_losses, student, width)


def plan_terms(cfg, store, extra_losses: list[dict], student: dict, width: int) -> list[dict]:
    """training (driver): resolve_terms with the feature shapes the store's first shard records."""
    import json

    import pyarrow.parquet as pq

    from .features import PREFIX, SHAPE_KEY

    with store.fs.open_input_file(store.shard_paths()[0]) as f:
        schema = pq.read_schema(f)
    shapes = {f.name: json.loads(f.metadata[SHAPE_KEY]) for f in schema if f.name.startswith(PREFIX)}
    teachers = [{"name": t.name, "features": t.features, "pool": t.pool} for t in cfg.teachers]
    return resolve_terms(extra_losses, teachers, shapes, student, width)


def describe(spec: dict, s_out: dict, parts: list[dict]) -> str:
    """One term for the log: kind x weight: teacher/layer -> student layer (+ projection)."""
    what = WHAT[s_out["kind"]]
    proj = "".join(f", projection {p['student_dim']}->{p['teacher_dim']}" for p in parts if spec["kind"] == "hint")
    teachers = "+".join(p["teacher"] for p in parts)
    return (f"{spec['kind']} x{spec['weight']:g}: {teachers}/{spec['teacher_layer']} -> student {what} "
            f"{spec['student_layer']}{proj}")


class ExtraTerms(nn.Module):
    """The configured terms on one worker. Built before the student is wrapped (DDP / FSDP): it
    hooks the modules it reads; its own parameters are the hint projections only, a whole copy on
    every worker also under FSDP (their gradients averaged by ``sync_grads``).

    ``step(model, x, batch, pad_id)`` -> (logits [B, C], the weighted sum of the terms, a scalar):
    one forward pass of the student that also yields the outputs the terms read.
    """

    def __init__(self, resolved: list[dict], student: nn.Module):
        super().__init__()
        self.resolved = resolved
        self.losses = nn.ModuleList(
            nn.ModuleList(build_extra_loss(r["spec"], p["student_dim"], p["teacher_dim"]) for p in r["parts"])
            for r in resolved)
        self._seen: dict[str, torch.Tensor] = {}
        modules = dict(student.named_modules())
        for key in {r["student"]["key"] for r in resolved if r["student"]["kind"] == "module"}:
            modules[key].register_forward_hook(self._hook(key))  # output kept with its graph: it trains
        self.hidden = any(r["student"]["kind"] == "hidden" for r in resolved)
        self.attention = any(r["student"]["kind"] == "attention" for r in resolved)
        if self.attention:  # sdpa returns no attention probabilities
            student.set_attn_implementation("eager")
        self._sums = [0.0] * len(resolved)
        self._count = 0

    def _hook(self, key: str):
        def hook(_module, _inputs, output):
            self._seen[key] = output[0] if isinstance(output, (tuple, list)) else output
        return hook

    def _student(self, model, x: torch.Tensor, pad_id: int | None):
        """One forward: logits, {(kind, key): output}, the token mask (None: every position counts)."""
        self._seen, mask = {}, None
        if self.hidden or self.attention:  # arch hf: ids as orchestrator.cls_students.cls_logits reads them
            ids = x.round().long() if x.is_floating_point() else x.long()
            attn = torch.ones_like(ids) if pad_id is None else (ids != pad_id).long()
            mask = None if pad_id is None else attn
            out = model(input_ids=ids, attention_mask=attn, output_hidden_states=self.hidden,
                        output_attentions=self.attention)
            got = {**{("hidden", i): h for i, h in enumerate(out.hidden_states or ())},
                   **{("attention", i): a for i, a in enumerate(out.attentions or ())}}
            n = {"hidden": len(out.hidden_states or ()), "attention": len(out.attentions or ())}
            return out.logits, lambda kind, key: got[(kind, key % n[kind])], mask
        logits = model(x)
        seen, self._seen = self._seen, {}
        return logits, lambda kind, key: seen[key], mask

    def step(self, model, x: torch.Tensor, batch: dict, pad_id: int | None = None):
        logits, output, mask = self._student(model, x, pad_id)
        total = logits.new_zeros(())
        for j, (r, losses) in enumerate(zip(self.resolved, self.losses)):
            raw = output(r["student"]["kind"], r["student"]["key"])
            if len(raw) < MIN_BATCH.get(type(losses[0].loss), 1):
                continue  # a relation term on a batch too small to relate (an epoch's last)
            values = []
            for p, loss in zip(r["parts"], losses):
                t = batch[p["column"]].reshape(len(raw), *p["shape"])  # float16 from the store
                s = pool_tokens(raw, p["pool"], mask) if p["pool"] else raw
                values.append(loss(s, t, mask if s.dim() == 3 else None))
            term = torch.stack(values).mean()  # teacher: ensemble -> the mean over its teachers
            self._sums[j] += float(term.detach())
            total = total + term
        self._count += 1
        return logits, total

    def pop_means(self) -> dict[str, float]:
        """Each term's mean weighted value over the batches since the last call (for the history)."""
        out = {r["label"]: s / max(self._count, 1) for r, s in zip(self.resolved, self._sums)}
        self._sums, self._count = [0.0] * len(self.resolved), 0
        return out

    def sync_grads(self) -> None:
        """Average the projections' gradients over the workers before an optimiser step and its
        grad_clip (actors/student.py; DDP or FSDP does this for the student's in backward; these
        parameters live outside its wrapper)."""
        params = list(self.parameters())
        if not params or not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
            return
        for p in params:  # every rank reduces the same tensors, whatever its batches reached
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        torch.distributed.all_reduce(flat)
        flat /= torch.distributed.get_world_size()
        offset = 0
        for g in grads:
            g.copy_(flat[offset: offset + g.numel()].view_as(g))
            offset += g.numel()
