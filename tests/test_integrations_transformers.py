"""cmdtool.integrations.transformers.load_state_dict_into: a state dict into a Transformers model as
``from_pretrained`` loads it (tied weights absent and tied again; everything else strict)."""

from __future__ import annotations

import os
import re

os.environ["HF_HUB_OFFLINE"] = "1"  # no network: models are built from configs

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from cmdtool.integrations.transformers import load_state_dict_into


def gpt2(seed: int, tie: bool = True) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=32, n_positions=16, n_embd=8, n_layer=1, n_head=2, bos_token_id=0,
                                      eos_token_id=0, tie_word_embeddings=tie))


def saved_state(model: GPT2LMHeadModel) -> dict[str, torch.Tensor]:
    """What a Hugging Face checkpoint holds (and ``cmd reconstruct`` gives back): no tied weights."""
    return {k: v.clone() for k, v in model.state_dict().items() if k != "lm_head.weight"}


def test_tied_weights_absent_are_tied_again():
    source, model = gpt2(1), gpt2(2)
    state = saved_state(source)
    with pytest.raises(RuntimeError, match="lm_head.weight"):  # what an --eval function meets
        model.load_state_dict(state, strict=True)
    load_state_dict_into(model, state)
    loaded = model.state_dict()
    assert set(loaded) == {*state, "lm_head.weight"}
    for name, tensor in state.items():
        assert torch.equal(loaded[name], tensor), name
    assert model.lm_head.weight is model.transformer.wte.weight  # one tensor, as from_pretrained leaves it
    assert torch.equal(loaded["lm_head.weight"], source.transformer.wte.weight)


def test_a_full_state_with_the_tied_key_loads_too():
    source, model = gpt2(1), gpt2(2)
    load_state_dict_into(model, source.state_dict())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in source.state_dict().items())


@pytest.mark.parametrize("spoil, problem", [
    (lambda s: s.pop("transformer.h.0.mlp.c_fc.weight"), "missing transformer.h.0.mlp.c_fc.weight"),
    (lambda s: s.update(extra=torch.zeros(2)), "unexpected extra"),
    (lambda s: s.update({"transformer.wpe.weight": torch.zeros(3, 8)}),
     "shape transformer.wpe.weight (3, 8) for (16, 8)"),
])
def test_other_keys_are_strict_and_nothing_is_loaded_on_refusal(spoil, problem):
    source, model = gpt2(1), gpt2(2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = saved_state(source)
    spoil(state)
    with pytest.raises(ValueError, match=re.escape(f"state dict does not fit GPT2LMHeadModel: {problem}")):
        load_state_dict_into(model, state)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_untied_model_needs_its_head():
    """Without tie_word_embeddings the head is its own weight: absent, it is missing."""
    source, model = gpt2(1, tie=False), gpt2(2, tie=False)
    with pytest.raises(ValueError, match="missing lm_head.weight"):
        load_state_dict_into(model, saved_state(source))
    load_state_dict_into(model, source.state_dict())
    assert torch.equal(model.lm_head.weight, source.lm_head.weight)
    assert not torch.equal(model.lm_head.weight, model.transformer.wte.weight)
