"""mmrec.hf: the transformers classes around mmrec's own model.

Tiny models (d_model 32, 2 layers, chunks of 8 tokens so that prompts and generations
cross memory-chunk borders) checked against mmrec's own forward pass and ``generate``.
"""

import json

import pytest
import torch

import mmrec
from mmrec.tokenizer import ByteTokenizer, train_bpe

transformers = pytest.importorskip("transformers")
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import mmrec.hf as mmrec_hf

SMALL = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.ffn_dim=64", "model.chunk_size=8",
         "model.memory.slots=16", "model.memory.dim=16"]
VARIANTS = {
    "mmrec": ("tiny", SMALL),
    "transformer": ("transformer-tiny", ["model.d_model=32", "model.n_layers=2", "model.n_heads=2",
                                         "model.ffn_dim=64", "model.tie_embeddings=false"]),
}


def small_model(name="tiny", overrides=SMALL, seed=0):
    recipe = mmrec.recipes.load(name, overrides)
    torch.manual_seed(seed)
    return recipe, mmrec.build(recipe).eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny MM-Rec model, its recipe and the folder save_pretrained wrote."""
    recipe, model = small_model()
    folder = tmp_path_factory.mktemp("hf")
    mmrec_hf.MMRecForCausalLM.from_mmrec(model, recipe).save_pretrained(folder)
    return recipe, model, folder


@pytest.fixture(scope="module")
def loaded(saved):
    return AutoModelForCausalLM.from_pretrained(saved[2]).eval()


def left_padded(rows, pad=0):
    """``(ids, attention_mask)`` of ``rows`` (1-D tensors) padded on the left."""
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, length - len(row):] = row
        mask[i, length - len(row):] = 1
    return ids, mask


def right_padded(rows, pad=0):
    """``(ids, attention_mask)`` of ``rows`` (1-D tensors) padded on the right."""
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)], mask[i, : len(row)] = row, 1
    return ids, mask


def random_rows(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 256, (n,), generator=g) for n in lengths]


def test_auto_classes_load_the_folder_and_give_mmrecs_logits(saved, loaded):
    recipe, model, folder = saved
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "mmrec" and config["recipe"] == recipe.model_dump(mode="json")
    assert isinstance(AutoConfig.from_pretrained(folder), mmrec_hf.MMRecConfig)
    assert isinstance(loaded, mmrec_hf.MMRecForCausalLM) and isinstance(loaded.model, mmrec.LanguageModel)
    assert loaded.model.head.weight is loaded.model.embed.weight  # tie_embeddings survives the load
    ids = torch.randint(0, 256, (3, 29))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


@pytest.mark.parametrize("arch", sorted(VARIANTS))
def test_save_load_round_trip(tmp_path, arch):
    recipe, model = small_model(*VARIANTS[arch])
    hf = mmrec_hf.MMRecForCausalLM.from_mmrec(model, recipe)
    hf.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert again.config.recipe == hf.config.recipe
    mine, theirs = model.state_dict(), again.model.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert (again.model.head.weight is again.model.embed.weight) == recipe.model.tie_embeddings
    # and back to a plain mmrec model, without transformers
    from mmrec.recipes.export import load_hf

    back_recipe, back = load_hf(tmp_path)
    assert back_recipe == recipe
    assert all(torch.equal(mine[k], back.state_dict()[k]) for k in mine)


def test_plugin_variant_round_trip(tmp_path):
    pytest.importorskip("mmrec_fifo_memory")  # the README's test command installs it
    recipe, model = small_model("tiny", [*SMALL[:5], "model.memory={\"kind\": \"fifo\", \"slots\": 4, \"dim\": 16}"])
    mmrec_hf.MMRecForCausalLM.from_mmrec(model, recipe).save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert again.config.recipe["model"]["memory"]["kind"] == "fifo"
    ids = torch.randint(0, 256, (2, 21))
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)


def test_config_refuses_a_bad_recipe():
    with pytest.raises(mmrec.recipes.RecipeError, match="model.memory.kind"):
        mmrec_hf.MMRecConfig(recipe={"name": "x", "model": {"arch": "mmrec", "vocab_size": 256, "d_model": 32,
                                                                 "n_layers": 1, "n_heads": 2, "ffn_dim": 64,
                                                                 "memory": {"kind": "nope"}}})
    with pytest.raises(ValueError, match="no recipe"):
        mmrec_hf.MMRecForCausalLM(mmrec_hf.MMRecConfig())


def test_config_takes_the_transformers_names_the_recipe_agrees_with(saved):
    """transformers passes its usual names (``vocab_size``, ``tie_word_embeddings``, ...) as
    keyword arguments: the recipe's own value is taken, another is refused naming the recipe
    field to change."""
    recipe, _, folder = saved
    tiny = mmrec.recipes.load("tiny").model
    config = mmrec_hf.MMRecConfig(recipe="tiny", tie_word_embeddings=tiny.tie_embeddings, vocab_size=tiny.vocab_size)
    assert config.tie_word_embeddings == tiny.tie_embeddings and config.vocab_size == tiny.vocab_size
    with pytest.raises(ValueError, match="model.tie_embeddings"):
        mmrec_hf.MMRecConfig(recipe="tiny", tie_word_embeddings=not tiny.tie_embeddings)
    fields = {"vocab_size": "vocab_size", "hidden_size": "d_model", "num_hidden_layers": "n_layers",
              "num_attention_heads": "n_heads", "max_position_embeddings": "max_seq_len"}
    for name, field in fields.items():
        with pytest.raises(ValueError, match=f"model.{field} in the recipe"):
            setattr(config, name, getattr(tiny, field) + 1)
        setattr(config, name, getattr(tiny, field))  # the recipe's value: nothing changes
    assert config.recipe == mmrec.recipes.load("tiny").model_dump(mode="json")
    assert AutoConfig.from_pretrained(folder, vocab_size=recipe.model.vocab_size).vocab_size == recipe.model.vocab_size
    with pytest.raises(ValueError, match="model.vocab_size"):
        AutoModelForCausalLM.from_pretrained(folder, vocab_size=recipe.model.vocab_size + 8)


@pytest.mark.parametrize("arch", sorted(VARIANTS))
def test_greedy_generate_equals_mmrec_generate(arch):
    recipe, model = small_model(*VARIANTS[arch])
    hf = mmrec_hf.MMRecForCausalLM.from_mmrec(model, recipe).eval()
    prompt = torch.randint(0, 256, (2, 13))
    expected = mmrec.generate(model, prompt, max_new_tokens=20, temperature=0)
    got = hf.generate(prompt, max_new_tokens=20, do_sample=False)
    assert torch.equal(got, expected)


VARIANT_SLOTS = [("memory", "memories", name) for name in mmrec.registry.names("memories")] + [
    ("recurrence", "recurrences", name) for name in mmrec.registry.names("recurrences")]


@pytest.mark.parametrize(("slot", "group", "kind"), VARIANT_SLOTS, ids=[f"{s}-{k}" for s, _, k in VARIANT_SLOTS])
def test_every_installed_variant_pads_and_reorders_its_state(slot, group, kind):
    """Built-in and plugin variants alike: left-padded greedy decoding gives mmrec.generate's
    tokens for each row, and beam search through the state gives what recomputing gives."""
    recipe, model = small_model("tiny", [*SMALL[:5], f'model.{slot}={{"kind": "{kind}"}}'])
    hf = mmrec_hf.MMRecForCausalLM.from_mmrec(model, recipe).eval()
    rows = random_rows([4, 13, 9])
    ids, mask = left_padded(rows)
    out = hf.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    for i, row in enumerate(rows):
        expected = mmrec.generate(model, row[None], max_new_tokens=8, temperature=0)[0, len(row):]
        assert torch.equal(out[i, ids.shape[1]:], expected)
    common = {"attention_mask": mask, "max_new_tokens": 5, "num_beams": 2, "pad_token_id": 0}
    assert torch.equal(hf.generate(ids, **common), hf.generate(ids, use_cache=False, **common))


def test_generate_steps_one_token_at_a_time_through_the_state(loaded, monkeypatch):
    lengths = []
    forward = loaded.model.forward

    def recording(ids, *args, **kwargs):
        lengths.append(ids.shape[1])
        return forward(ids, *args, **kwargs)

    monkeypatch.setattr(loaded.model, "forward", recording)
    loaded.generate(torch.randint(0, 256, (1, 17)), max_new_tokens=10, do_sample=False)
    assert lengths == [17] + [1] * 9


def test_generate_stops_at_eos(loaded):
    prompt = random_rows([9])[0]
    free = loaded.generate(prompt[None], max_new_tokens=16, do_sample=False)[0, 9:]
    eos = int(free[4])
    first = free.tolist().index(eos)
    stopped = loaded.generate(prompt[None], max_new_tokens=16, do_sample=False, eos_token_id=eos)[0, 9:]
    assert stopped.tolist() == free[: first + 1].tolist()
    # in a batch, a finished row is padded while the other goes on as it would alone
    other = random_rows([9], seed=2)[0]
    alone = loaded.generate(other[None], max_new_tokens=16, do_sample=False, eos_token_id=eos)[0, 9:]
    assert eos not in alone.tolist()  # the seed is chosen so that this row never emits it
    both = loaded.generate(torch.stack([prompt, other]), max_new_tokens=16, do_sample=False, eos_token_id=eos,
                           pad_token_id=0)
    assert both[0, 9:].tolist() == free[: first + 1].tolist() + [0] * (16 - first - 1)
    assert torch.equal(both[1, 9:], alone)


def test_left_padded_batch_equals_each_row_alone(loaded):
    rows = random_rows([5, 19, 11, 19, 2])
    ids, mask = left_padded(rows)
    with torch.no_grad():
        logits = loaded(ids, attention_mask=mask).logits
    out = loaded.generate(ids, attention_mask=mask, max_new_tokens=14, do_sample=False, pad_token_id=0)
    for i, row in enumerate(rows):
        with torch.no_grad():
            alone = loaded(row[None]).logits[0]
        # to float rounding: a padded row runs the delta layer's products at other sizes, whose
        # sums the CPU's BLAS may order otherwise (wrong masking would be off by O(1))
        torch.testing.assert_close(logits[i, ids.shape[1] - len(row):], alone, rtol=0, atol=1e-5)
        assert not logits[i, : ids.shape[1] - len(row)].any()  # zeros where the padding is
        expected = loaded.generate(row[None], max_new_tokens=14, do_sample=False)[0, len(row):]
        assert torch.equal(out[i, ids.shape[1]:], expected)


def test_right_padding_leaves_the_real_positions_alone(loaded):
    rows = random_rows([7, 12])
    ids, mask = right_padded(rows)
    with torch.no_grad():
        logits = loaded(ids, attention_mask=mask).logits
        assert torch.equal(logits[0, :7], loaded(rows[0][None]).logits[0])
        assert torch.equal(logits[1], loaded(rows[1][None]).logits[0])


@pytest.mark.parametrize("use_cache", [True, False])
def test_generate_refuses_a_prompt_padded_on_the_right(loaded, use_cache):
    """generate reads the next token from the last column, which is padding for a row that
    ends before it: such a prompt is refused, naming the fix (pad on the left)."""
    ids, mask = right_padded(random_rows([7, 12]))
    with pytest.raises(ValueError, match="padding_side='left'"):
        loaded.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0,
                        use_cache=use_cache)


def test_cache_gives_what_recomputing_gives_for_beams_and_sampling(loaded):
    """``use_cache=False`` reruns the whole sequence every step: the state must not change a thing."""
    ids, mask = left_padded(random_rows([6, 13, 9]))
    common = {"attention_mask": mask, "max_new_tokens": 10, "pad_token_id": 0}
    beams = loaded.generate(ids, num_beams=3, do_sample=False, **common)
    assert torch.equal(beams, loaded.generate(ids, num_beams=3, do_sample=False, use_cache=False, **common))
    sampling = dict(do_sample=True, temperature=0.7, top_k=50, top_p=0.9, num_return_sequences=2, **common)
    torch.manual_seed(3)
    sampled = loaded.generate(ids, **sampling)
    torch.manual_seed(3)
    assert torch.equal(sampled, loaded.generate(ids, use_cache=False, **sampling))
    assert sampled.shape == (6, 23)


@pytest.mark.parametrize("pad", [left_padded, right_padded])
def test_labels_give_mmrecs_loss_of_each_row_alone(loaded, pad):
    """The loss of a padded batch is mmrec's own loss of each row, unpadded, averaged over
    the tokens predicted (a row of n tokens predicts n - 1)."""
    rows = random_rows([8, 15, 3])
    ids, mask = pad(rows)
    with torch.no_grad():
        out = loaded(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
        alone = [loaded.model(row[None, :-1], targets=row[None, 1:]).loss for row in rows]
    predicted = [len(row) - 1 for row in rows]
    expected = sum(loss * n for loss, n in zip(alone, predicted)) / sum(predicted)
    assert out.state is None  # no state for a loss unless asked (use_cache=True)
    torch.testing.assert_close(out.loss, expected)


def test_the_loss_with_the_planning_loss_reaches_every_weight(loaded):
    """The planning head learns from the auxiliary loss alone, which mmrec's training adds."""
    ids, mask = left_padded(random_rows([8, 15]))
    labels = ids.masked_fill(mask == 0, -100)
    out = loaded(ids, attention_mask=mask, labels=labels, return_aux_loss=True)
    assert out.aux_loss is not None and out.aux_loss > 0
    loaded.zero_grad()
    (out.loss + out.aux_loss).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in loaded.parameters())
    loaded.zero_grad()


def test_gradient_checkpointing_gives_the_same_gradients():
    recipe, model = small_model()
    hf = mmrec_hf.MMRecForCausalLM.from_mmrec(model, recipe).train()
    ids = torch.randint(0, 256, (2, 20))

    def gradients():
        hf.zero_grad()
        hf(ids, labels=ids).loss.backward()
        return {name: p.grad.clone() for name, p in hf.named_parameters() if p.grad is not None}

    plain = gradients()
    hf.gradient_checkpointing_enable()
    assert hf.is_gradient_checkpointing and model.activation_checkpointing
    checkpointed = gradients()
    assert plain.keys() == checkpointed.keys() and len(plain) > 0
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7)
    hf.gradient_checkpointing_disable()
    assert not model.activation_checkpointing


def test_tuple_outputs_when_asked(loaded):
    ids = torch.randint(0, 256, (1, 9))
    logits, state = loaded(ids, return_dict=False)
    assert torch.equal(logits, loaded(ids).logits) and state.length == 9


def test_continuing_a_state_equals_one_pass(loaded):
    ids = torch.randint(0, 256, (2, 30))
    with torch.no_grad():
        whole = loaded(ids).logits
        first = loaded(ids[:, :11])
        second = loaded(ids[:, 11:], state=first.state)
    torch.testing.assert_close(torch.cat([first.logits, second.logits], 1), whole, rtol=1e-5, atol=1e-5)
    assert second.state.length == 30


def test_bad_inputs_are_named(loaded):
    ids = torch.randint(1, 256, (2, 6))
    with pytest.raises(ValueError, match="padding between real tokens"):
        loaded(ids, attention_mask=torch.tensor([[1, 0, 1, 1, 1, 1], [1] * 6]))
    with pytest.raises(ValueError, match="masks every token"):
        loaded(ids, attention_mask=torch.tensor([[0] * 6, [1] * 6]))
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        loaded(ids.masked_fill(ids == ids[0, 0], 256))
    with pytest.raises(ValueError, match="inputs_embeds"):
        loaded(ids, inputs_embeds=torch.zeros(2, 6, 32))
    state = loaded(ids).state
    with pytest.raises(ValueError, match="continuation of a state cannot be padded"):
        loaded(ids[:, :2], state=state, attention_mask=torch.tensor([[1] * 6 + [0, 1], [1] * 8]))


def test_byte_tokenizer_gives_mmrecs_ids(tmp_path):
    text = "Byte-level: é, 日本, \U0001F600 and a literal <0x00>."
    mine = ByteTokenizer()
    mmrec_hf.hf_tokenizer(mine).save_pretrained(tmp_path)
    theirs = AutoTokenizer.from_pretrained(tmp_path)
    assert theirs(text).input_ids == mine.encode(text)
    assert theirs.decode(mine.encode(text)) == text
    assert theirs.pad_token_id == theirs.bos_token_id == theirs.eos_token_id == 0
    batch = theirs(["ab", "abcd"], padding=True, padding_side="left")
    assert batch.input_ids == [[0, 0, 97, 98], [97, 98, 99, 100]] and batch.attention_mask[0] == [0, 0, 1, 1]


def test_bpe_tokenizer_gives_mmrecs_ids(tmp_path):
    pytest.importorskip("tokenizers")
    mine = train_bpe(["the quick brown fox jumps over the lazy dog\n" * 20, "héllo wörld\n" * 10], vocab_size=300)
    mmrec_hf.hf_tokenizer(mine).save_pretrained(tmp_path)
    theirs = AutoTokenizer.from_pretrained(tmp_path)
    text = "the lazy fox said héllo"
    assert theirs(text).input_ids == mine.encode(text)
    assert theirs.decode(mine.encode(text)) == text
    assert theirs.pad_token_id == mine.encode("\x00")[0]
    assert theirs.eos_token_id == theirs.bos_token_id == theirs.pad_token_id  # no special tokens: NUL's


SHARD_DOCUMENTS = ["The cat sat on the mat.", "A literal <|endoftext|> in a document is text.",
                   "Dogs and cats\nand mats.", "The mat, the cat, the dog."] * 2


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """A folder of token shards that ``python -m mmrec.data.prepare`` wrote (BPE, 300 tokens)."""
    from mmrec.data import prepare

    root = tmp_path_factory.mktemp("shards")
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in SHARD_DOCUMENTS))
    args = ["--input", str(root / "docs.jsonl"), "--out", str(root / "shards"), "--vocab-size", "300",
            "--val-fraction", "0.25", "--quiet"]
    assert prepare.main(args) == 0
    return root / "shards"


def test_shards_tokenizer_gives_the_shards_ids_and_ends_text_with_their_eod_token(shards, tmp_path):
    """The tokenizer of a model trained on token shards: the ids the shards hold (a literal
    ``<|endoftext|>`` in a document is text there too), and their end-of-document token as
    the start, end and padding token."""
    from mmrec.data.shards import open_shards

    opened = open_shards(shards)
    eod = opened.eod_id
    mmrec_hf.hf_tokenizer(opened.tokenizer()).save_pretrained(tmp_path)
    theirs = AutoTokenizer.from_pretrained(tmp_path)
    assert theirs.eos_token == theirs.bos_token == theirs.pad_token == "<|endoftext|>"
    assert theirs.eos_token_id == theirs.bos_token_id == theirs.pad_token_id == eod
    stream = torch.cat([opened.train[:], opened.val[:]]).tolist()  # each document's ids, then eod
    assert stream.count(eod) == len(SHARD_DOCUMENTS) and stream[-1] == eod
    held, current = [], []
    for token in stream:
        if token == eod:
            held.append(current)
            current = []
        else:
            current.append(token)
    assert sorted(held) == sorted(theirs(d).input_ids for d in SHARD_DOCUMENTS)
    ids = theirs(SHARD_DOCUMENTS[1]).input_ids
    assert ids == opened.tokenizer().encode(SHARD_DOCUMENTS[1])  # and mmrec's tokenizer's
    assert theirs.decode(ids) == SHARD_DOCUMENTS[1]
    assert theirs.decode([*ids, eod], skip_special_tokens=True) == SHARD_DOCUMENTS[1]


def test_a_tokenizer_without_a_pad_token_is_refused():
    """No end-of-document token and no single token for the NUL byte: nothing to pad with."""
    import tokenizers as tk

    words = tk.Tokenizer(tk.models.WordLevel({"[UNK]": 0, "the": 1, "cat": 2}, unk_token="[UNK]"))
    words.pre_tokenizer = tk.pre_tokenizers.Whitespace()
    mine = mmrec.tokenizer.BPETokenizer(words)
    with pytest.raises(ValueError, match="no single token for the NUL byte"):
        mmrec_hf.hf_tokenizer(mine)
    with pytest.raises(ValueError, match="'</s>'"):
        mmrec_hf.hf_tokenizer(ByteTokenizer(), eod_token="</s>")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_generate_cuda_matches_mmrec_and_each_row_alone():
    """On a GPU mmrec.generate decodes with CUDA graphs (StaticDecoder) while transformers
    steps eagerly through the state: the same greedy tokens, padded or not."""
    recipe, model = small_model()
    model = model.cuda()
    hf = mmrec_hf.MMRecForCausalLM.from_mmrec(model, recipe).eval()
    rows = [row.cuda() for row in random_rows([5, 19, 11])]
    ids, mask = left_padded(rows)
    out = hf.generate(ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=24, do_sample=False, pad_token_id=0)
    for i, row in enumerate(rows):
        expected = mmrec.generate(model, row[None], max_new_tokens=24, temperature=0)[0, len(row):]
        assert torch.equal(out[i, ids.shape[1]:], expected)
    beams = hf.generate(ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=8, num_beams=3, pad_token_id=0)
    again = hf.generate(ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=8, num_beams=3, pad_token_id=0,
                        use_cache=False)
    assert torch.equal(beams, again)
