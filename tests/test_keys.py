"""Key format: fixed vectors, so the format can never drift silently."""

import struct

import blake3
import pytest

from kvrack.clients import KeyBuilder, Layout, as_key

LLAMA3_8B = Layout(layers=32, kv_heads=8, head_dim=128, dtype="bfloat16", block_tokens=16)


def test_block_nbytes_matches_the_kv_formula():
    # 2 (K,V) * 32 layers * 8 heads * 128 dim * 2 bytes = 128 KiB per token; 16 tokens = 2 MiB
    assert LLAMA3_8B.block_nbytes == 2 * 1024 * 1024


def test_layout_id_vector():
    assert LLAMA3_8B.layout_id.hex() == "365545eb0b57fdb38a6374b7e9f60096"


def test_layout_id_changes_with_every_field():
    base = LLAMA3_8B
    variants = [Layout(33, 8, 128), Layout(32, 4, 128), Layout(32, 8, 64), Layout(32, 8, 128, dtype="float16"),
                Layout(32, 8, 128, block_tokens=32), Layout(32, 8, 128, tp_rank=1, tp_size=2),
                Layout(32, 8, 128, tp_size=2), Layout(32, 8, 128, kv_order="kv_layer_token_head_dim")]
    ids = {v.layout_id for v in variants}
    assert len(ids) == len(variants) and base.layout_id not in ids


def test_chain_vectors():
    kb = KeyBuilder(b"\x00" * 32, "meta-llama/Llama-3-8B", LLAMA3_8B)
    assert [k.hex() for k in kb.chain(list(range(48)))] == [
        "87f9b8c476b4697ba3b0aeb53b7c86db73c99ec577b09de3108058da741f7e78",
        "0199f83102e18c486c12abd01f69148e9641af8df745ded09e72597fe5314dfd",
        "8d1f2bd8e48b299e992723116aa8ad0cc59f6ace7eaffa3b3dc1957edf6fbd11",
    ]


def test_partial_chain_vector():
    kb = KeyBuilder(b"salt", "m", Layout(layers=1, kv_heads=1, head_dim=1, dtype="float16", block_tokens=2))
    assert [k.hex() for k in kb.chain([1, 2, 3, 4, 5], partial=True)] == [
        "efcecc5249107bd02cb130338e85dce00416e5bf9c67075ccb17f54bf91c8c7f",
        "8d205e5127c8b6203348c76f2d3f44a202217fc645abbee88997e0f455bcc714",
        "8a782c0ec36bc23f51d688e3ca9fad1568946a4f8b549b3e485b6a0141460944",
    ]
    assert len(kb.chain([1, 2, 3, 4, 5])) == 2  # full blocks only by default


def _field(b: bytes) -> bytes:
    return struct.pack("<Q", len(b)) + b


def test_format_is_the_documented_one():
    """key_0 = H(salt, model, layout_id, tokens_0); key_i = H(key_{i-1}, tokens_i)."""
    salt, model = b"tenant-salt", b"model-x"
    layout = Layout(layers=2, kv_heads=1, head_dim=4, block_tokens=2)
    tokens = [7, 8, 9, 10]
    k0 = blake3.blake3(b"kvrack-key-v1/root" + _field(salt) + _field(model) + _field(layout.layout_id)
                       + _field(struct.pack("<2I", 7, 8))).digest()
    k1 = blake3.blake3(b"kvrack-key-v1/next" + _field(k0) + _field(struct.pack("<2I", 9, 10))).digest()
    assert KeyBuilder(salt, model, layout).chain(tokens) == [k0, k1]


def test_salt_model_and_layout_separate_key_spaces():
    tokens = list(range(16))
    a = KeyBuilder(b"a", "m", LLAMA3_8B).chain(tokens)
    assert a != KeyBuilder(b"b", "m", LLAMA3_8B).chain(tokens)
    assert a != KeyBuilder(b"a", "n", LLAMA3_8B).chain(tokens)
    assert a != KeyBuilder(b"a", "m", Layout(32, 8, 128, dtype="float16")).chain(tokens)


def test_a_key_names_its_whole_prefix():
    kb = KeyBuilder(b"s", "m", LLAMA3_8B)
    x = kb.chain(list(range(32)))
    y = kb.chain(list(range(16)) + list(range(100, 116)))
    assert x[0] == y[0] and x[1] != y[1]
    z = kb.chain([5] * 16 + list(range(16, 32)))
    assert z[1] != x[1]  # same second block tokens, different prefix


def test_parents_and_as_key():
    keys = [bytes([i]) * 32 for i in range(3)]
    assert KeyBuilder.parents(keys) == [None, keys[0], keys[1]]
    assert as_key(keys[0]) == keys[0]
    with pytest.raises(ValueError, match="32 bytes"):
        as_key(b"short")


@pytest.mark.parametrize("bad", [dict(layers=0, kv_heads=1, head_dim=1), dict(layers=1, kv_heads=1, head_dim=1, dtype="f13"),
                                 dict(layers=1, kv_heads=1, head_dim=1, tp_rank=2, tp_size=2)])
def test_layout_rejects_bad_geometry(bad):
    with pytest.raises(ValueError):
        Layout(**bad)


def test_token_ids_must_fit_uint32():
    kb = KeyBuilder(b"s", "m", Layout(1, 1, 1, block_tokens=1))
    with pytest.raises(ValueError, match="token ids"):
        kb.chain([2**32])


def test_a_salt_changes_every_key_of_the_chain_and_no_salt_changes_nothing():
    kb = KeyBuilder(b"ns", "m", Layout(layers=2, kv_heads=2, head_dim=8, block_tokens=4))
    tokens = list(range(16))
    plain = kb.chain(tokens)
    assert kb.chain(tokens, salt=b"") == plain and kb.chain(tokens, salt="") == plain
    a, b = kb.chain(tokens, salt="tenant-a"), kb.chain(tokens, salt=b"tenant-b")
    assert not set(a) & set(plain) and not set(a) & set(b)
    assert kb.chain(tokens, salt="tenant-a") == a


def test_a_chain_extends_from_the_keys_already_built():
    kb = KeyBuilder(b"ns", "m", Layout(layers=2, kv_heads=2, head_dim=8, block_tokens=4))
    tokens = list(range(20))
    full = kb.chain(tokens, salt="s")
    assert kb.chain(tokens, salt="s", start=full[:2]) == full
    assert kb.chain(tokens[:12], salt="s", start=full[:3]) == full[:3]
