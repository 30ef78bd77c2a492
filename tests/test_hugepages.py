"""Weights in transparent huge pages (mixtral.hugepages): where they are, that they are freed, and that nothing else
changes (the same numbers, the same saved files)."""

import gc
import io

import pytest
import torch

from mixtral import MixtralConfig, MixtralForCausalLM, hugepages, quantize

pytestmark = pytest.mark.skipif(not hugepages.enabled(), reason="needs Linux with transparent huge pages not 'never'")


def mapping_of(address: int) -> tuple[int, int, set[str]] | None:
    """(start, end, VmFlags) of this process's mapping that holds `address`, from /proc/self/smaps; None: unmapped."""
    found = None
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                start, end = (int(a, 16) for a in head.split("-"))
                found = (start, end) if start <= address < end else None
            elif found and head == "VmFlags:":
                return (*found, set(line.split()[1:]))
    return None


def advised(t: torch.Tensor) -> bool:
    """The first byte of t lies in a mapping advised MADV_HUGEPAGE ('hg')."""
    m = mapping_of(t.data_ptr())
    return m is not None and "hg" in m[2]


def ours(t: torch.Tensor) -> bool:
    """t's storage is a mapping of hugepages.empty (not resizable: torch.frombuffer's), not torch's allocator's. Where
    torch's allocator takes memory from is the C library's business (a glibc heap can end up in a huge-page mapping,
    as seen once in a full test run), so what is not ours is tested this way rather than by its mapping's flags."""
    return not t.untyped_storage().resizable()


def test_large_cpu_tensors_get_huge_pages_small_ones_do_not(monkeypatch):
    t = hugepages.empty((1024, 1024), torch.float32)  # 4 MiB
    assert t.shape == (1024, 1024) and t.dtype == torch.float32 and t.is_contiguous()
    assert t.data_ptr() % hugepages.HUGE_PAGE == 0 and advised(t)
    assert t.untyped_storage().nbytes() == 4 << 20  # exactly its bytes: torch.save writes no slack
    t.fill_(3.0)
    buffer = io.BytesIO()
    torch.save(t, buffer)
    assert buffer.tell() < (4 << 20) + 4096
    assert torch.equal(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True), torch.full((1024, 1024), 3.0))

    assert ours(t)
    small = hugepages.empty((1023, 512), torch.float32)  # just under 2 MiB: no whole huge page in it
    assert not ours(small)
    monkeypatch.setenv("MIXTRAL_HUGEPAGES", "0")
    assert not hugepages.enabled() and not ours(hugepages.empty((1024, 1024), torch.float32))


def test_tail_past_the_last_whole_huge_page_is_not_advised():
    t = hugepages.empty(((3 << 20) // 4,), torch.float32)  # 3 MiB: one whole huge page, then 1 MiB
    start, end, flags = mapping_of(t.data_ptr())
    assert "hg" in flags and start == t.data_ptr() and end == t.data_ptr() + hugepages.HUGE_PAGE
    tail = mapping_of(t.data_ptr() + hugepages.HUGE_PAGE)
    assert tail is not None and "hg" not in tail[2]


def test_memory_goes_back_when_the_tensor_goes():
    t = hugepages.empty((2048, 1024), torch.float32)
    view = t[10:20]
    address = t.data_ptr()
    del t
    gc.collect()
    assert mapping_of(address) is not None  # a view keeps the storage, and so the mapping
    assert view.fill_(1.0).sum() == 10 * 1024
    del view
    gc.collect()
    assert mapping_of(address) is None


def test_moved_copies_only_what_huge_pages_take():
    big, small = torch.randn(1024, 1024), torch.randn(16, 16)
    moved = hugepages.moved(big)
    assert moved is not big and torch.equal(moved, big) and advised(moved)
    assert hugepages.moved(small) is small and not ours(small)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    """A tiny model whose embeddings and output layer are 8 MiB each (vocab 16384 x hidden 128, fp32; 2 MiB in int8)."""
    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=16384, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)
    path = tmp_path_factory.mktemp("big-vocab")
    MixtralForCausalLM(config).save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("quantization", [None, "int8"])
def test_from_pretrained_puts_large_weights_in_huge_pages(folder, quantization, monkeypatch, tmp_path):
    ids = torch.tensor([[5, 900, 16000, 17, 3]])
    model = MixtralForCausalLM.from_pretrained(folder, quantization=quantization, progress=False).eval()
    large = {n: t for n, t in model.state_dict().items() if t.numel() * t.element_size() >= hugepages.MIN_BYTES}
    assert large and all(advised(t) for t in large.values()), [n for n, t in large.items() if not advised(t)]
    monkeypatch.setenv("MIXTRAL_HUGEPAGES", "0")
    plain = MixtralForCausalLM.from_pretrained(folder, quantization=quantization, progress=False).eval()
    assert not [n for n, t in plain.state_dict().items() if ours(t)]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, plain(ids).logits)
    model.save_pretrained(tmp_path)  # the huge-page tensors save as any other
    again = MixtralForCausalLM.from_pretrained(tmp_path, progress=False).eval()
    with torch.no_grad():
        assert torch.equal(again(ids).logits, plain(ids).logits)


def test_quantize_after_loading_moves_the_quantized_weights(folder):
    model = MixtralForCausalLM.from_pretrained(folder, progress=False).eval()
    quantize(model, "int8", progress=False)
    qweight = dict(model.lm_head.named_buffers())["qweight"]
    assert qweight.dtype == torch.int8 and qweight.numel() == 2 << 20 and advised(qweight)


def test_static_cache_in_huge_pages_and_zeroed():
    from mixtral.cache import StaticCache

    cache = StaticCache(2, batch_size=4, max_len=2048, num_kv_heads=2, head_dim=64, dtype=torch.float32, device="cpu")
    for t in cache.keys + cache.values:  # 4 x 2 x 2048 x 64 fp32 = 4 MiB each
        assert advised(t) and not t.any()
