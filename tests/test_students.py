"""Student sources: scratch, pretrained and teacher-initialised (kept layers) causal LMs.

Teachers are tiny Llama / Qwen3 / Mistral models built from configs with random weights and
saved with save_pretrained, so every check runs in seconds and without a hub.
"""
from __future__ import annotations

import json

import pytest
import torch

from orchestrator.errors import DistillError
from orchestrator.models import build_student
from orchestrator.students import build_lm_student, check_student_vocab, lm_student_config

VOCAB = 97
IDS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}  # some configs' defaults lie past VOCAB


def tiny(model_type: str, layers: int = 4, **extra) -> dict:
    return {"model_type": model_type, "vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": layers, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 64, **extra}


def save_teacher(root, cfg: dict, seed: int = 0):
    torch.manual_seed(seed)
    model = build_lm_student({"init": "scratch", "config": cfg}).eval()
    with torch.no_grad():  # norms start at exactly 1: make them distinct, so a wrong copy shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    path = root / cfg["model_type"]
    model.save_pretrained(str(path))
    return path, model


@pytest.fixture(params=[
    tiny("llama"),
    tiny("qwen3", tie_word_embeddings=True),
    # Qwen2 with sliding attention on layers >= 2: the kept layers carry their own types
    tiny("qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=2),
    # the other layouts init: teacher takes (decoder layers saved as model.layers.N), each with what
    # sets it apart: soft-capped / scaled logits, per-layer sliding windows or RoPE, fused projections
    tiny("gemma", head_dim=8, **IDS),
    tiny("gemma2", head_dim=8, query_pre_attn_scalar=8, sliding_window=8,
         layer_types=["sliding_attention", "full_attention"] * 2, **IDS),
    tiny("gemma3_text", head_dim=8, query_pre_attn_scalar=8, sliding_window=8,
         layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"], **IDS),
    tiny("phi3", **IDS),
    tiny("olmo2", **IDS),
    tiny("granite", logits_scaling=2.0, residual_multiplier=0.5, embedding_multiplier=3.0, **IDS),
    tiny("smollm3", no_rope_layers=[1, 1, 0, 1], **IDS),
], ids=["llama", "qwen3-tied", "qwen2-sliding", "gemma", "gemma2", "gemma3_text", "phi3", "olmo2", "granite", "smollm3"])
def teacher(request, tmp_path):
    return save_teacher(tmp_path, request.param)


def test_kept_layers_are_the_teachers(teacher):
    path, t = teacher
    s = build_lm_student({"init": "teacher", "path": str(path), "layers": [0, 2]}).eval()
    assert s.config.num_hidden_layers == 2 and len(s.model.layers) == 2
    ts, ss = t.state_dict(), s.state_dict()
    for j, i in enumerate([0, 2]):
        layer = {k.split(".", 3)[3]: v for k, v in ts.items() if k.startswith(f"model.layers.{i}.")}
        assert layer and all(torch.equal(ss[f"model.layers.{j}.{k}"], v) for k, v in layer.items())
        assert s.model.layers[j].self_attn.layer_idx == j  # indexes the KV cache
    for k in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(ss[k], ts[k]), k
    assert s.config.tie_word_embeddings == t.config.tie_word_embeddings
    if t.config.tie_word_embeddings:
        assert s.lm_head.weight.data_ptr() == s.model.embed_tokens.weight.data_ptr()
    for name in ("layer_types", "no_rope_layers"):  # per-layer settings travel with their layers
        if getattr(t.config, name, None):
            assert getattr(s.config, name) == [getattr(t.config, name)[0], getattr(t.config, name)[2]], name
    if t.config.model_type == "smollm3":
        assert s.config.no_rope_layers == [1, 0]
    if t.config.model_type == "qwen2":
        assert s.config.layer_types == ["full_attention", "sliding_attention"]
        assert s.model.layers[1].self_attn.sliding_window == 8 and s.model.layers[0].self_attn.sliding_window is None
    # generate() runs on the renumbered KV cache, and matches a full forward pass (greedy)
    prompt = torch.tensor([[5, 17, 3, 42]])
    out = s.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 10)
    with torch.no_grad():
        assert torch.equal(s(out[:, :-1]).logits[0, 3:].argmax(-1), out[0, 4:])


def test_all_layers_give_the_teachers_logits(teacher):
    path, t = teacher
    s = build_lm_student({"init": "teacher", "path": str(path), "layers": [0, 1, 2, 3]}).eval()
    x = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(s(x).logits, t(x).logits, atol=1e-5, rtol=0)


def test_kept_layers_compute_what_they_computed_in_the_teacher(teacher):
    """Layers [0, 2] of the student give the logits of the teacher cut to its layers 0 and 2 (the
    modules themselves, so each keeps its own sliding window / RoPE setting, and the mask each is
    given): the per-layer config lists were sliced with the layers. 20 positions: past the sliding
    windows of 8."""
    path, t = teacher
    s = build_lm_student({"init": "teacher", "path": str(path), "layers": [0, 2]}).eval()
    t.model.layers = torch.nn.ModuleList([t.model.layers[0], t.model.layers[2]])
    t.config.num_hidden_layers = 2  # some decoders loop over layers[:num_hidden_layers]
    if getattr(t.config, "layer_types", None):  # and pick layer i's mask by layer_types[i]
        t.config.layer_types = [t.config.layer_types[0], t.config.layer_types[2]]
    x = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(s(x, use_cache=False).logits, t(x, use_cache=False).logits, atol=1e-5, rtol=0)


def test_reordered_layers_differ_from_the_teacher(tmp_path):
    path, t = save_teacher(tmp_path, tiny("llama"))
    s = build_lm_student({"init": "teacher", "path": str(path), "layers": [3, 2, 1, 0]}).eval()
    assert torch.equal(s.model.layers[0].mlp.up_proj.weight, t.model.layers[3].mlp.up_proj.weight)
    x = torch.randint(0, VOCAB, (1, 12))
    with torch.no_grad():
        assert (s(x).logits - t(x).logits).abs().max() > 1e-3


def test_pretrained_and_scratch(tmp_path):
    path, t = save_teacher(tmp_path, tiny("mistral", layers=2))
    s = build_lm_student({"init": "pretrained", "path": str(path)})
    assert s.training and all(torch.equal(a, b) for a, b in zip(s.state_dict().values(), t.state_dict().values()))
    scratch = build_student({"arch": "causal_lm", "config": tiny("llama", layers=3)})  # the old spec still builds
    assert scratch.config.num_hidden_layers == 3 and scratch.config.vocab_size == VOCAB
    assert lm_student_config({"init": "teacher", "path": str(path), "layers": [1]}).num_hidden_layers == 1
    bf16 = build_lm_student({"init": "scratch", "config": tiny("llama", layers=1), "dtype": "bfloat16"})
    assert bf16.model.embed_tokens.weight.dtype == torch.bfloat16


def test_vocab_check_names_the_field(tmp_path):
    path, _ = save_teacher(tmp_path, tiny("llama", layers=2))
    check_student_vocab({"init": "pretrained", "path": str(path)}, VOCAB)
    check_student_vocab({"init": "teacher", "path": str(path), "layers": [0]}, VOCAB)
    with pytest.raises(DistillError, match=r"^student.path: the student's vocab_size 97 differs from the teachers' 100"):
        check_student_vocab({"init": "pretrained", "path": str(path)}, 100)
    with pytest.raises(DistillError, match=r"^student.config: the student's vocab_size 97 differs"):
        check_student_vocab({"init": "scratch", "config": tiny("llama")}, 50)


def test_gpt2_teacher_is_a_clear_error(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=32)).save_pretrained(
        str(tmp_path / "gpt2"))
    with pytest.raises(DistillError) as e:
        build_lm_student({"init": "teacher", "path": str(tmp_path / "gpt2"), "layers": [0]})
    msg = str(e.value)
    assert "GPT2LMHeadModel" in msg and "gpt2" in msg and "llama, mistral, qwen2, qwen3" in msg and "\n" not in msg



@pytest.mark.parametrize("tied", [False, True])
def test_a_student_with_other_padding_rows_is_resized_to_the_ensembles(tmp_path, tied):
    """Qwen2.5 0.5B (151,936 rows) under 7B teachers (152,064), same 151,665 tokens, here 97 rows
    against 105 over 90 tokens: the student keeps its rows and gains the teachers' padding ones,
    each the mean row (so its logit is an average token's); it rebuilds and saves at 105 (the
    export through a pipeline run: tests/test_lm.py)."""
    from orchestrator.students import from_state

    path, t = save_teacher(tmp_path, tiny("llama", layers=2, tie_word_embeddings=tied))
    spec = check_student_vocab({"init": "pretrained", "path": str(path)}, 105, tokens=90)
    assert spec["vocab_size"] == 105 and lm_student_config(spec).vocab_size == 105
    s = build_lm_student(spec)
    emb, head = s.get_input_embeddings().weight, s.get_output_embeddings().weight
    assert emb.shape == head.shape == (105, 32) and s.config.vocab_size == 105
    assert torch.equal(emb[:VOCAB], t.get_input_embeddings().weight)
    assert torch.equal(head[:VOCAB], t.get_output_embeddings().weight)
    torch.testing.assert_close(emb[VOCAB:], t.get_input_embeddings().weight.mean(0).expand(8, -1))
    torch.testing.assert_close(head[VOCAB:], t.get_output_embeddings().weight.mean(0).expand(8, -1))
    assert (emb.data_ptr() == head.data_ptr()) == tied
    x = torch.randint(0, VOCAB, (1, 6))
    with torch.no_grad():  # the old rows' logits are the teacher's
        torch.testing.assert_close(s(x).logits[..., :VOCAB], t(x).logits, atol=1e-5, rtol=0)
    again = from_state(spec, s.state_dict())  # what evaluation and export rebuild from a checkpoint
    assert torch.equal(again.get_output_embeddings().weight, head)
    again.save_pretrained(str(tmp_path / "export"))
    assert json.loads((tmp_path / "export" / "config.json").read_text())["vocab_size"] == 105
    cut = build_lm_student(check_student_vocab({"init": "pretrained", "path": str(path)}, 92, tokens=90))
    assert cut.get_output_embeddings().weight.shape[0] == 92  # padding rows past the tokenizer cut
    assert torch.equal(cut.get_input_embeddings().weight, t.get_input_embeddings().weight[:92])


def test_a_student_short_of_the_tokenizer_is_refused(tmp_path):
    path, _ = save_teacher(tmp_path, tiny("llama", layers=2))
    with pytest.raises(DistillError, match=r"^student.path: the student's vocab_size 97 is smaller than the "
                                           r"tokenizer's 100 tokens; the student must predict over the teachers' vocabulary$"):
        check_student_vocab({"init": "pretrained", "path": str(path)}, 120, tokens=100)
    with pytest.raises(DistillError, match=r"^lm.student_config: the student's vocab_size 97 is smaller"):
        check_student_vocab({"init": "scratch", "config": tiny("llama")}, 120, tokens=100, field="lm.student_config")
    spec = {"init": "pretrained", "path": str(path), "vocab_size": 120}  # a stale resize is dropped when equal
    assert check_student_vocab(spec, VOCAB, tokens=90) == {"init": "pretrained", "path": str(path)}

@pytest.mark.parametrize("layers, match", [
    ([], "non-empty"), (None, "non-empty"), ([0, 4], r"\[4\] out of range; the teacher has 4 layers"),
    ([-1], "out of range"), ([1, 2, 1], r"\[1\] repeated"), ([0.5], "out of range"),
])
def test_bad_layers_name_the_field(tmp_path, layers, match):
    path, _ = save_teacher(tmp_path, tiny("llama"))
    with pytest.raises(DistillError, match=r"^student.layers: .*" + match):
        build_lm_student({"init": "teacher", "path": str(path), "layers": layers})


def test_bad_specs(tmp_path):
    with pytest.raises(DistillError, match="^student.init: unknown 'copy'"):
        build_lm_student({"init": "copy"})
    with pytest.raises(DistillError, match="^student.path: required with init: pretrained"):
        build_lm_student({"init": "pretrained"})
    with pytest.raises(DistillError, match="^student.path: .* is not a from_pretrained directory"):
        build_lm_student({"init": "pretrained", "path": str(tmp_path)})
    path, _ = save_teacher(tmp_path, tiny("llama", layers=2))
    (path / "model.safetensors").unlink()
    with pytest.raises(DistillError, match="^student.path: init: teacher reads safetensors"):
        build_lm_student({"init": "teacher", "path": str(path), "layers": [0]})
    assert json.loads((path / "config.json").read_text())["num_hidden_layers"] == 2  # nothing written


def test_kept_layers_from_a_sharded_checkpoint(tmp_path):
    """Real teachers of a few GB and up are saved in shards (model-0000N-of-0000M.safetensors +
    model.safetensors.index.json): the student reads its layers across them, as from one file,
    and fetches only the shards' tensors it keeps."""
    path, t = save_teacher(tmp_path, tiny("llama", layers=4))
    sharded = tmp_path / "sharded"
    t.save_pretrained(str(sharded), max_shard_size="20KB")
    assert len(list(sharded.glob("model-*-of-*.safetensors"))) > 2 and not (sharded / "model.safetensors").exists()
    one = build_lm_student({"init": "teacher", "path": str(path), "layers": [3, 1]}).state_dict()
    many = build_lm_student({"init": "teacher", "path": str(sharded), "layers": [3, 1]}).state_dict()
    assert one.keys() == many.keys() and all(torch.equal(one[k], many[k]) for k in one)


@pytest.mark.parametrize("init", ["pretrained", "teacher"])
def test_a_quantized_checkpoint_is_no_student_source(tmp_path, init):
    path, _ = save_teacher(tmp_path, tiny("llama"))
    conf = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**conf, "quantization_config": {"quant_method": "gptq", "bits": 4}}))
    with pytest.raises(DistillError, match=r"student\.path: .* is quantized \(gptq in config\.json\); a student trains "
                                           r"full-precision weights"):
        build_lm_student({"init": init, "path": str(path), "layers": [0]})


def _tokenizers(tmp_path):
    """Two byte-level BPE tokenizers of 300 ids trained on different texts (other merges, so most
    ids are other tokens), and the first again with two tokens added past its end."""
    from tests.helpers_lm import corpus, make_tokenizer

    texts = corpus()
    ours = make_tokenizer(tmp_path / "ours", texts)
    make_tokenizer(tmp_path / "other", [t[::-1].upper() for t in texts])
    ours.add_tokens(["<extra_0>", "<extra_1>"])
    ours.save_pretrained(str(tmp_path / "wider"))
    return tmp_path / "ours", tmp_path / "other", tmp_path / "wider"


def test_a_pretrained_student_of_another_tokenizer_is_refused(tmp_path, caplog):
    """Its embedding rows follow its own ids: trained on the ensemble's, each row would learn
    another token. Same ids plus new ones past its end are fine (they become new rows)."""
    from orchestrator.vocab import check_student_tokenizer

    ours, other, wider = _tokenizers(tmp_path)
    with pytest.raises(DistillError, match=r"student\.path: .*other has another tokenizer than the ensemble's "
                                           r"\(.*ours\): [\d,]+ of 300 shared ids are other tokens \(id \d+ is .* "
                                           r"in the student's, .* in the ensemble's\), so its pretrained embeddings "
                                           r"would learn other tokens' ids"):
        check_student_tokenizer({"init": "pretrained", "path": str(other)}, ours)
    with caplog.at_level("INFO", logger="distill"):
        check_student_tokenizer({"init": "pretrained", "path": str(ours)}, wider)  # ours is a prefix of wider
    assert "as the same tokens; 2 ids only the ensemble has become new rows" in caplog.text
    check_student_tokenizer({"init": "pretrained", "path": str(ours)}, ours)
    resaved = tmp_path / "resaved"  # other bytes, same id -> token map (a fine-tune's re-save)
    resaved.mkdir()
    for f in ours.iterdir():
        text = f.read_text()
        (resaved / f.name).write_text(json.dumps(json.loads(text), indent=4) if f.suffix == ".json" else text)
    from orchestrator.models import tokenizer_hash

    assert tokenizer_hash(resaved) != tokenizer_hash(ours)
    caplog.clear()
    with caplog.at_level("INFO", logger="distill"):
        check_student_tokenizer({"init": "pretrained", "path": str(resaved)}, ours)
    assert "renamed" not in caplog.text
    check_student_tokenizer({"init": "scratch", "config": {}}, ours)
    check_student_tokenizer({"init": "pretrained", "path": str(tmp_path)}, ours)  # no tokenizer files: nothing to compare
