"""Prompt datasets from local JSONL and parquet, chat rendering, and the toy tasks."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from moe_rl.data import DataConfig, load_prompts, tokenize_prompts
from moe_rl.data.chat_template import plain_template, render_prompt
from moe_rl.data.toy_tasks import generate_tasks, write_jsonl
from moe_rl.rewards.countdown import check_countdown
from moe_rl.rewards.math_answer import answers_match

ROWS = [
    {"prompt": "What is 1 + 1?", "answer": "2", "source": "a"},
    {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 * 3?"}],
     "answer": "6", "source": "b"},
]


def _check(records):
    assert [r.index for r in records] == [0, 1]
    assert records[0].messages == [{"role": "system", "content": "Sys"}, {"role": "user", "content": "What is 1 + 1?"}]
    assert records[1].messages == ROWS[1]["prompt"]  # message lists are kept as given
    assert [r.label for r in records] == ["2", "6"]
    assert [r.metadata for r in records] == [{"source": "a"}, {"source": "b"}]


def test_jsonl(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    _check(load_prompts(DataConfig(path=str(p), system_prompt="Sys", cache_dir=str(tmp_path / "c"))))


def test_parquet(tmp_path):
    p = tmp_path / "d.parquet"
    # parquet needs one type per column: messages everywhere.
    rows = [dict(ROWS[0], prompt=[{"role": "system", "content": "Sys"}, {"role": "user", "content": ROWS[0]["prompt"]}]), ROWS[1]]
    pq.write_table(pa.Table.from_pylist(rows), p)
    _check(load_prompts(DataConfig(path=str(p), cache_dir=str(tmp_path / "c"))))


def test_verl_style_parquet_with_a_nested_answer(tmp_path):
    """verl's RL parquet layout (data_source, prompt as messages, ability, reward_model with the
    ground truth, extra_info) reads with answer_key=reward_model.ground_truth; a dotted key that is
    a column's whole name is that column; a missing nested field is named."""
    p = tmp_path / "train.parquet"
    rows = [{"data_source": "openai/gsm8k", "prompt": [{"role": "user", "content": f"Q{i}"}], "ability": "math",
             "reward_model": {"style": "rule", "ground_truth": str(i * 7)}, "extra_info": {"index": i}}
            for i in range(3)]
    pq.write_table(pa.Table.from_pylist(rows), p)
    recs = load_prompts(DataConfig(path=str(p), answer_key="reward_model.ground_truth", cache_dir=str(tmp_path / "c")))
    assert [r.label for r in recs] == ["0", "7", "14"]
    assert recs[1].messages == [{"role": "user", "content": "Q1"}]
    assert recs[2].metadata["data_source"] == "openai/gsm8k" and recs[2].metadata["extra_info"] == {"index": 2}
    with pytest.raises(ValueError, match="column 'reward_model' has no field 'answer'"):
        load_prompts(DataConfig(path=str(p), answer_key="reward_model.answer", cache_dir=str(tmp_path / "c")))
    with pytest.raises(ValueError, match="no column 'solution'"):
        load_prompts(DataConfig(path=str(p), answer_key="solution.text", cache_dir=str(tmp_path / "c")))
    flat = tmp_path / "flat.jsonl"
    flat.write_text(json.dumps({"prompt": "x", "a.b": "whole-name column"}) + "\n")
    assert load_prompts(DataConfig(path=str(flat), answer_key="a.b", cache_dir=str(tmp_path / "c")))[0].label == \
        "whole-name column"


def test_dataset_errors(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        load_prompts(DataConfig(path=str(tmp_path / "missing.jsonl")))
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"question": "x", "answer": "1"}) + "\n")
    with pytest.raises(ValueError, match="no column 'prompt'"):
        load_prompts(DataConfig(path=str(p), cache_dir=str(tmp_path / "c")))
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(ValueError, match="format=auto"):
        load_prompts(DataConfig(path=str(tmp_path / "d.txt")))
    with pytest.raises(ValueError, match="data.toy_task='sums' is not one of"):
        DataConfig(toy_task="sums")


def test_toy_tasks_are_correct_and_deterministic(tmp_path):
    arith = generate_tasks(50, task="arithmetic", seed=3)
    assert arith == generate_tasks(50, task="arithmetic", seed=3) != generate_tasks(50, task="arithmetic", seed=4)
    for row in arith:  # independent check: math-verify on the question's expression
        expr = row["prompt"].removeprefix("What is ").removesuffix("?")
        assert answers_match(row["answer"], f"${expr}$")
    for row in generate_tasks(50, task="countdown", seed=3):
        a = row["answer"]
        assert check_countdown(row["solution"], a["numbers"], a["target"]) is None
    p = write_jsonl(generate_tasks(5, task="countdown"), tmp_path / "cd.jsonl")
    recs = load_prompts(DataConfig(path=p, cache_dir=str(tmp_path / "c")))
    assert recs[0].label == generate_tasks(5, task="countdown")[0]["answer"]


class _NoTemplateTok:
    bos_token = "<s>"
    chat_template = None

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}


def test_a_prompt_of_no_tokens_names_its_row(tmp_path):
    """transformers builds an empty tokenizer from a checkpoint directory without tokenizer
    files, and every prompt tokenizes to nothing: the first one is named, rather than a
    rollout of nothing failing later."""
    import transformers

    from moe_rl.models.tiny import save_tiny_hf

    empty = transformers.AutoTokenizer.from_pretrained(save_tiny_hf("qwen3_moe", tmp_path / "model"))
    recs = load_prompts(DataConfig(toy_num_prompts=3))
    with pytest.raises(ValueError, match=r"prompt \(dataset row 0\) tokenizes to no tokens: .* of 1 tokens\)"):
        tokenize_prompts(recs, empty)


def test_chat_rendering_and_length_filter(tmp_path):
    from moe_rl.data.tokenizer import build_tokenizer

    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]
    assert render_prompt(_NoTemplateTok(), msgs) == "<s>System: S\n\nUser: Q\n\nAssistant:" == plain_template(msgs, "<s>")
    recs = load_prompts(DataConfig(toy_num_prompts=6))  # toy tasks: no files at all
    assert len(recs) == 6 and recs[0].messages[0]["role"] == "system"
    tok = build_tokenizer(vocab_size=400)
    toks = tokenize_prompts(recs, tok)
    for t in toks:
        assert t.text.endswith("<|im_start|>assistant\n") and t.input_ids[0] == tok.bos_token_id
        assert t.input_ids == tok(t.text, add_special_tokens=False)["input_ids"]
    cut = sorted(t.num_tokens for t in toks)[2]
    kept = tokenize_prompts(recs, tok, max_prompt_tokens=cut)
    assert {t.record.index for t in kept} == {t.record.index for t in toks if t.num_tokens <= cut}


GOOD = json.dumps(ROWS[0]) + "\n"


def _load(tmp_path, name, text, **kw):
    p = tmp_path / name
    p.write_text(text)
    return load_prompts(DataConfig(path=str(p), cache_dir=str(tmp_path / "c"), **kw))


def test_an_empty_file_is_named_and_caught_by_the_preflight_check(tmp_path):
    """Not datasets' bare StopIteration; ``_files_and_format`` is what the launcher's preflight runs."""
    from moe_rl.data.dataset import _files_and_format

    with pytest.raises(ValueError, match=r"data.path: '.*empty.jsonl' is empty"):
        _load(tmp_path, "empty.jsonl", "")
    with pytest.raises(ValueError, match=r"data.path: '.*blank.jsonl' is empty"):
        _load(tmp_path, "blank.jsonl", "\n  \n")
    with pytest.raises(ValueError, match="is empty"):
        _files_and_format(DataConfig(path=str(tmp_path / "empty.jsonl")))
    with pytest.raises(ValueError, match="is empty"):
        _files_and_format(DataConfig(path=str(tmp_path / "[eb]*.jsonl")))  # a glob: any of its files


def test_a_line_that_is_not_json_is_named(tmp_path):
    """Not datasets' DatasetGenerationError without a line number."""
    with pytest.raises(ValueError, match=r"'.*bad.jsonl' line 3 is not valid JSON \(Expecting value.*'\{\"prompt\": \"b\""):
        _load(tmp_path, "bad.jsonl", GOOD + "\n" + '{"prompt": "b", "answer":\n' + GOOD)
    with pytest.raises(ValueError, match=r"'.*list.jsonl' line 2 is not a JSON object \(got list\)"):
        _load(tmp_path, "list.jsonl", GOOD + "[1, 2]\n")
    with pytest.raises(ValueError, match=r"'.*doc.json' is not valid JSON: Expecting ',' delimiter: line 3"):
        _load(tmp_path, "doc.json", '[{"prompt": "a", "answer": "1"},\n {"prompt": "b", "answer": "2"}\n')


def test_a_row_without_the_prompt_column_is_named(tmp_path):
    """Arrow fills a column a row lacks with None: not "prompt must be a string ... got NoneType"."""
    with pytest.raises(ValueError, match=r"'.*miss.jsonl' line 2 \(row 1\): column 'prompt' missing "
                                         r"\(keys: \['answer', 'question'\]\)"):
        _load(tmp_path, "miss.jsonl", GOOD + json.dumps({"question": "b", "answer": "2"}) + "\n")
    with pytest.raises(ValueError, match=r"'.*null.jsonl' line 2 \(row 1\): column 'prompt' is null"):
        _load(tmp_path, "null.jsonl", GOOD + json.dumps({"prompt": None, "answer": "2"}) + "\n")
    # a second file: the line is counted in that file, the row over all files
    (tmp_path / "first.jsonl").write_text(GOOD * 2)
    (tmp_path / "second.jsonl").write_text(GOOD + "\n" + json.dumps({"answer": "2", "source": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"'.*second.jsonl' line 3 \(row 3\): column 'prompt' missing"):
        load_prompts(DataConfig(path=str(tmp_path / "first.jsonl"), extra_paths=[str(tmp_path / "second.jsonl")],
                                cache_dir=str(tmp_path / "c")))
    p = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": "a", "answer": "1"}, {"prompt": None, "answer": "2"}]), p)
    with pytest.raises(ValueError, match=r"'.*d.parquet' row 1: column 'prompt' missing \(or null\)"):
        load_prompts(DataConfig(path=str(p), cache_dir=str(tmp_path / "c")))
