"""Keyed dropout masks: pure functions of their key, equal to an independent SplitMix64."""
import torch

from edgetune.runtime.peft.rng import key_seed, keyed_dropout, keyed_uniform, splitmix64_reference


def test_values_match_plain_python_splitmix64():
    key = (7, 3, 1, 12, "self_attn.q_proj", 0)
    u = keyed_uniform((4, 5), key, "cpu").flatten()
    seed = key_seed(key)
    assert [float(v) for v in u] == [splitmix64_reference(seed, i) for i in range(20)]


def test_same_key_same_mask_other_key_other_mask():
    x = torch.ones(3, 7, 11)
    a = keyed_dropout(x, 0.25, (0, 1, 2))
    assert torch.equal(a, keyed_dropout(x, 0.25, (0, 1, 2)))
    assert not torch.equal(a, keyed_dropout(x, 0.25, (0, 1, 3)))
    kept = (a != 0).float().mean().item()
    assert 0.65 < kept < 0.85  # about 1 - p
    assert torch.allclose(a[a != 0], torch.full_like(a[a != 0], 1 / 0.75))


def test_uniform_statistics():
    u = keyed_uniform((100_000,), ("stats",), "cpu")
    assert 0 <= u.min() and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.01
    assert abs(u.var().item() - 1 / 12) < 0.002


def test_key_parts_are_not_ambiguous():
    assert key_seed((1, 23)) != key_seed((12, 3))
    assert key_seed(("ab", "c")) != key_seed(("a", "bc"))


def test_a_seed_table_row_draws_what_its_key_draws():
    from edgetune.runtime.peft.rng import keyed_uniform, seed_table

    keys = [(7, 1, 0, 3, "self_attn.q_proj", 0), (7, 1, 0, 3, "mlp", 1)]
    table = seed_table(keys, "cpu")
    assert table.shape == (2, 2) and table.dtype == torch.int64
    for row, key in zip(table, keys):
        assert torch.equal(keyed_uniform((5, 33), row, "cpu"), keyed_uniform((5, 33), key, "cpu"))
    assert not torch.equal(keyed_uniform((5, 33), table[0], "cpu"), keyed_uniform((5, 33), table[1], "cpu"))
