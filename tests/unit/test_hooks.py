"""Hook contexts leave the model exactly as they found it, also when the body raises."""

import pytest
import torch

from rankone.core.hooks import capture, frozen, map_output, replace_forward, stop_at
from tiny import make_model


def no_hooks(model):
    return all(not m._forward_hooks and not m._forward_pre_hooks and "forward" not in m.__dict__
               for m in model.modules())


def test_contexts_clean_up_on_error():
    model = make_model("llama")
    x = torch.tensor([[3, 4, 5, 6]])
    clean = model(input_ids=x).logits
    layer = model.model.layers[0]
    with pytest.raises(RuntimeError):
        with capture(model, ["model.layers.1.mlp.down_proj"]), map_output(layer.mlp, lambda h: h * 0), \
                replace_forward(model.model.layers[1], lambda *a, **k: 1 / 0), frozen(model):
            assert not any(p.requires_grad for p in model.parameters())
            raise RuntimeError("boom")
    assert no_hooks(model)
    assert all(p.requires_grad for p in model.parameters())
    assert torch.equal(model(input_ids=x).logits, clean)


def test_map_output_changes_only_inside():
    model = make_model("gpt2")
    x = torch.tensor([[3, 4, 5]])
    clean = model(input_ids=x).logits
    with map_output(model.transformer.h[1].mlp, lambda h: h + 1):
        assert not torch.allclose(model(input_ids=x).logits, clean)
    assert torch.equal(model(input_ids=x).logits, clean)


def test_stop_at_ends_the_pass_there_and_cleans_up():
    model = make_model("llama")
    x = torch.tensor([[3, 4, 5, 6]])
    ran = []
    later = model.model.layers[2].register_forward_hook(lambda *a: ran.append(1))
    with capture(model, ["model.layers.1.mlp.down_proj"]) as rec, stop_at(model.model.layers[1].mlp.down_proj) as st:
        model(input_ids=x)
    assert st.reached and ran == [] and "model.layers.1.mlp.down_proj" in rec.inputs
    with stop_at(model.lm_head, before=True) as st:
        model(input_ids=x)
    assert ran == [1] and st.input.shape == (1, 4, 32)  # the final norm's output, [batch, pos, d_model]
    later.remove()
    assert no_hooks(model)
    with pytest.raises(ZeroDivisionError):  # other errors pass through, and the hook still goes
        with stop_at(model.lm_head):
            1 / 0
    assert no_hooks(model)
