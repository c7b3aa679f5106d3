"""The offline toy tokenizer: ids the tiny models expect, round trips, chat template."""

import pytest
from transformers import AutoTokenizer

from moe_rl.data.tokenizer import build_tokenizer, save_tokenizer


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    save_tokenizer(d, vocab_size=512)
    return d


def test_special_ids_match_tiny_models(tok_dir):
    from moe_rl.models.tiny import tiny_hf_config

    tok = AutoTokenizer.from_pretrained(tok_dir)
    cfg = tiny_hf_config("qwen3")
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id) == (0, 1, 2)
    assert len(tok) <= cfg.vocab_size


@pytest.mark.parametrize("text", ["What is 3 + 4 * 2?", "<think>7*8=56</think> \\boxed{56}",
                                  "Ünïcödé 日本語 tabs\tand\nnewlines  ", "emoji 🙂 and bytes \x00\x7f"])
def test_round_trip(tok_dir, text):
    tok = AutoTokenizer.from_pretrained(tok_dir)
    ids = tok.encode(text, add_special_tokens=False)
    assert all(0 <= i < 512 for i in ids)
    assert tok.decode(ids) == text


def test_chat_template_and_vocab_size():
    tok = build_tokenizer(vocab_size=300)
    assert len(tok) == 300
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<s><|im_start|>user\nhi</s>\n<|im_start|>assistant\n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == 1 and ids.count(2) == 1 and ids.count(3) == 2  # bos, one eos, two <|im_start|>
    with pytest.raises(ValueError, match=r"vocab_size \(100\) must be >= 260"):
        build_tokenizer(vocab_size=100)
