"""End of turn: completions end with the token the chat template closes a turn with, and generation stops on
every end id a model declares (config, tokenizer EOS, template turn end). Tokenizers of the llama-3, gemma3,
phi3, ChatML and mistral kinds are built here from the fixture vocabulary with their real templates."""
import pathlib

import numpy as np
import pytest
from fixtures import build_tokenizer

from so8t_jax import data, sampling
from so8t_jax.config import ModelConfig
from so8t_jax.loading import Model
from so8t_jax.rows import Row

LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
          "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
          "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
          "{{ content }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
GEMMA3 = ("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'assistant' %}{% set role = 'model' "
          "%}{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\n' + "
          "message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}"
          "{{'<start_of_turn>model\n'}}{% endif %}")
PHI3 = ("{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + "
        "'<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
        "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}"
        "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}"
        "{% endif %}")
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
MISTRAL = ("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
           "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% else %}{{ message['content'] + eos_token }}"
           "{% endif %}{% endfor %}")

# kind: (template, extra special tokens, bos, eos (the tokenizer's, deliberately not the turn end), turn end)
KINDS = {
    "llama3": (LLAMA3, ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                        "<|eot_id|>"], "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"),
    "gemma3": (GEMMA3, ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"], "<bos>", "<eos>", "<end_of_turn>"),
    "phi3": (PHI3, ["<s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"], "<s>", "<|endoftext|>",
             "<|end|>"),
    "chatml": (CHATML, [], "<|im_start|>", "<|endoftext|>", "<|im_end|>"),
    "mistral": (MISTRAL, ["<s>", "</s>", "[INST]", "[/INST]"], "<s>", "</s>", "</s>"),
}


def _tokenizer(kind):
    template, extra, bos, eos, _ = KINDS[kind]
    tok = build_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": extra, "bos_token": bos, "eos_token": eos})
    tok.chat_template = template
    return tok


def _model(tokenizer, eos_ids=()):
    cfg = ModelConfig(family="llama", vocab_size=len(tokenizer), d_model=8, n_layers=1, n_heads=2, n_kv_heads=1,
                      head_dim=4, ffn_dim=8, eos_token_ids=tuple(eos_ids))
    return Model(cfg, {}, pathlib.Path("tiny"), _tokenizer=tokenizer)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_turn_end_is_the_templates(kind):
    tok = _tokenizer(kind)
    end = tok.convert_tokens_to_ids(KINDS[kind][4])
    assert sampling.turn_end_id(tok) == end
    ids = sampling.eos_ids_of(_model(tok, eos_ids=[0]))
    assert ids[0] == end  # the id completions end with
    assert set(ids) == {0, end, tok.eos_token_id}  # generation stops on every one
    assert sampling.eos_ids_of(_model(tok), chat=False)[0] == tok.eos_token_id  # raw text: the document's EOS


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_encoded_completions_end_with_the_turn_end(kind):
    tok = _tokenizer(kind)
    end = tok.convert_tokens_to_ids(KINDS[kind][4])
    eos_ids = sampling.eos_ids_of(_model(tok))
    rows = [Row("What is 12 plus 30?", "The answer is 42."),
            Row(({"role": "user", "content": "Hello!"},), "Hello, how are you today?")]
    enc = data.encode_rows(rows, tok, 64, 64, eos_id=eos_ids[0], chat=True)
    for e, row in zip(enc, rows):
        assert e.completion_ids[-1] == end
        assert tok.decode(e.completion_ids[:-1]) == row.completion
        # the training example is the template's own rendering of the finished conversation, up to the turn end
        msgs = list(row.prompt) if isinstance(row.prompt, tuple) else [{"role": "user", "content": row.prompt}]
        full = tok.apply_chat_template(msgs + [{"role": "assistant", "content": row.completion}], tokenize=False)
        ours = tok.decode(list(e.prompt_ids) + list(e.completion_ids))
        assert full.startswith(ours) and full[len(ours):].strip() in ("", tok.eos_token)
    text = data.encode_rows([Row(None, "A plain document.")], tok, 64, 64, eos_id=eos_ids[0])[0]
    assert text.completion_ids[-1] == tok.eos_token_id  # a document ends with the EOS, not a turn end


def test_no_template_or_no_end_marker():
    tok = build_tokenizer()
    tok.chat_template = None
    assert sampling.turn_end_id(tok) is None
    assert sampling.eos_ids_of(_model(tok, eos_ids=[5]))[0] == tok.eos_token_id
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    assert sampling.turn_end_id(tok) is None
    tok.chat_template = "{{ raise_exception('no') }}"
    assert sampling.turn_end_id(tok) is None


def test_sampler_stops_on_every_end_id():
    """A one-layer model whose greedy choice is fixed by the lm_head: rows stop at whichever end id comes."""
    import jax
    import jax.numpy as jnp

    from so8t_jax import model as model_lib
    cfg = ModelConfig(family="llama", vocab_size=16, d_model=8, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=4,
                      ffn_dim=8)
    params = model_lib.init_params(cfg, jax.random.key(0))
    tokens = jnp.asarray([[3, 4, 5], [6, 7, 8]])
    mask = jnp.ones_like(tokens)
    free = sampling.make_sample_fn(cfg, 6, sampling.GREEDY, (), 0)(params, tokens, mask, jax.random.key(0))
    first = np.asarray(free.tokens_BxN)[:, 0]
    stop = sampling.make_sample_fn(cfg, 6, sampling.GREEDY, tuple(sorted({int(first[0]), int(first[1])})), 0)(
        params, tokens, mask, jax.random.key(0))
    assert np.asarray(stop.lengths_B).tolist() == [1, 1]
