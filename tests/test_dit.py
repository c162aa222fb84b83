"""The DiT backbone: no label dropout in any block, no training randomness from the global RNG (issue 12 item 5)."""

import torch

from diffem.networks import DiT


def _tiny(**kwargs) -> DiT:
    torch.manual_seed(0)
    options = dict(channels=1, sample_size=8, patch_size=2, num_layers=3, num_attention_heads=2,
                   attention_head_dim=8) | kwargs
    return DiT.from_options(**options)


def _label_spy(model: DiT) -> list[torch.Tensor]:
    """Record the labels that reach each block's embedding table."""
    seen = []
    for block in model.transformer_blocks:
        table = block.norm1.emb.class_embedder.embedding_table
        table.register_forward_hook(lambda module, args, out: seen.append(args[0].detach().clone()))
    return seen


def test_train_mode_forward_is_deterministic_and_leaves_the_global_rng_alone():
    model = _tiny().train()
    g = torch.Generator().manual_seed(1)
    x, c = torch.randn(64, 1, 8, 8, generator=g), torch.randn(64, generator=g)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = model(x, c)
    assert torch.equal(torch.get_rng_state(), state)  # nothing drawn from the global RNG
    torch.manual_seed(456)
    assert torch.equal(model(x, c), first)
    assert torch.equal(model.eval()(x, c), first)  # train mode changes nothing


def test_labels_are_never_dropped_in_any_block(tmp_path):
    model = _tiny().train()
    seen = _label_spy(model)
    x, c = torch.randn(256, 1, 8, 8), torch.randn(256)
    model(x, c).square().mean().backward()
    assert len(seen) == 4  # one per transformer block, and block 0's again for the output modulation
    assert all(labels.shape == (256,) and (labels == 0).all() for labels in seen)
    # The same for a model loaded from disk (built by from_pretrained, not from_options).
    model.save_pretrained(tmp_path / "dit")
    loaded = DiT.from_pretrained(tmp_path / "dit").train()
    seen = _label_spy(loaded)
    loaded(x, c)
    assert len(seen) == 4 and all((labels == 0).all() for labels in seen)
    assert torch.equal(loaded(x, c), model(x, c))
