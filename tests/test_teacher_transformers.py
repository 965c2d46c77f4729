"""The `transformers` backend with a tiny random causal LM built in the test (no download): the chat template
is applied, generation runs, tokens are counted, and its (random, hence invalid) replies become failure rows
with reasons after the repair requests."""
import json
import shutil

import pytest

from mira_spark.config import MiraConfig
from mira_spark.ingest import default_model_path
from mira_spark.teacher import TeacherConfigError, TeacherSettings, prepare_call, run_teacher_calls

CHAT_TEMPLATE = ("{% for m in messages %}[{{ m['role'] }}]\n{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}[assistant]\n{% endif %}")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-teacher")
    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    tokenizer.chat_template = CHAT_TEMPLATE
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096,
                         bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def transformers_settings(model: str) -> TeacherSettings:
    cfg = MiraConfig()
    cfg.teacher.backend, cfg.teacher.model, cfg.teacher.device = "transformers", model, "cpu"
    cfg.teacher.max_output_tokens, cfg.teacher.max_record_tokens = 8, 64
    return TeacherSettings.from_config(cfg)


def test_backend_applies_the_chat_template_and_counts_tokens(tiny_model):
    from transformers import AutoTokenizer

    from mira_spark.teacher.transformers_backend import TransformersBackend

    settings = transformers_settings(tiny_model)
    call = prepare_call("articulate", {"record_id": "r", "group_id": 0, "text": "def f():\n    return 1\n"}, settings)
    backend = TransformersBackend(settings)
    first = backend.complete(call, call.messages)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    expected = tokenizer.apply_chat_template(call.messages, add_generation_prompt=True)["input_ids"]
    assert first.tokens_in == len(expected)
    rendered = tokenizer.apply_chat_template(call.messages, add_generation_prompt=True, tokenize=False)
    assert rendered.startswith("[system]\n") and rendered.endswith("[assistant]\n")
    assert 1 <= first.tokens_out <= 8 and isinstance(first.text, str)
    assert backend.complete(call, call.messages).text == first.text   # greedy: deterministic


def test_random_model_replies_become_invalid_rows_with_reasons(ctx, tiny_model):
    t = ctx.cfg.teacher
    t.backend, t.model, t.device, t.max_output_tokens, t.max_record_tokens = "transformers", tiny_model, "cpu", 8, 64
    t.repair_attempts = 1
    rows = [("r1", 0, "def add(a, b):\n    return a + b\n"), ("r2", 0, "Plain prose about nothing much.")]
    requests = ctx.spark.createDataFrame(rows, "record_id string, group_id int, text string")
    run = run_teacher_calls(ctx, "articulate", requests)
    assert run.stats.calls_made == 2 and run.stats.failures == 2 and run.stats.requests_sent == 4
    for row in run.results.collect():
        assert row["status"] == "invalid" and row["attempts"] == 2
        assert row["error"].startswith("invalid reply after 1 repair request(s): ")
        assert row["tokens_in"] > 100 and 2 <= row["tokens_out"] <= 16
    stored = ctx.tables.read("teacher_calls").collect()
    assert all(r["backend"] == "transformers" and r["model"] == tiny_model and r["reply"] is not None for r in stored)
    t.retry_failed = False
    assert run_teacher_calls(ctx, "articulate", requests).stats.calls_made == 0


def test_model_without_chat_template_is_a_clear_error(tiny_model, tmp_path):
    from mira_spark.teacher.transformers_backend import TransformersBackend

    plain = tmp_path / "plain"
    shutil.copytree(tiny_model, plain)
    for name in ("chat_template.jinja", "chat_template.json"):
        (plain / name).unlink(missing_ok=True)
    config = json.loads((plain / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(TeacherConfigError, match="no chat template"):
        TransformersBackend(transformers_settings(str(plain)))
