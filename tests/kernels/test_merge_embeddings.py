import pytest
import torch

from vlmserve.kernels import reference
from vlmserve.kernels.merge_embeddings import merge_embeddings

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,hidden,n_mm", [(12, 64, 5), (40, 200, 17), (3, 32, 1)])
def test_merge_embeddings_places_rows_and_leaves_others(tokens, hidden, n_mm, dtype, device):
    embeds = torch.randn(tokens, hidden, dtype=dtype, device=device)
    # float32 vision embeddings into a lower-precision text stream: cast on write.
    mm = torch.randn(n_mm, hidden, dtype=torch.float32, device=device)
    positions = torch.randperm(tokens, device=device)[:n_mm].to(torch.int64)
    want = embeds.clone()
    reference.merge_embeddings(want, mm, positions)
    merge_embeddings(embeds, mm, positions)
    torch.testing.assert_close(embeds, want, atol=0, rtol=0)


def test_merge_embeddings_poisoned_rows_are_all_overwritten(device):
    # Every row is a placeholder and starts as NaN: any unwritten element survives as NaN.
    mm = torch.randn(9, 48, device=device)
    embeds = torch.full((9, 48), float("nan"), device=device)
    positions = torch.arange(8, -1, -1, device=device)
    merge_embeddings(embeds, mm, positions)
    torch.testing.assert_close(embeds, mm.flip(0), atol=0, rtol=0)


def test_merge_embeddings_rejects_hidden_mismatch(device):
    with pytest.raises(ValueError, match="mm_embeds"):
        merge_embeddings(torch.randn(4, 8, device=device), torch.randn(2, 6, device=device), torch.tensor([0, 1], device=device))
