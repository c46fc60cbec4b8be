import pytest
import torch

from vfm.data.patches import patchify, unpatchify


@pytest.mark.parametrize("c,h,w,p", [(1, 28, 28, 7), (3, 8, 12, 4), (3, 32, 32, 16)])
def test_patchify_unpatchify_round_trip(c, h, w, p):
    x = torch.randn(2, c, h, w)
    patches = patchify(x, p)
    assert patches.shape == (2, (h // p) * (w // p), p * p * c)
    assert torch.equal(unpatchify(patches, p, (h // p, w // p), c), x)


def test_patch_layout_is_row_major_then_pixel_then_channel():
    # MAE's 'nchpwq -> nhwpqc': patch k = (row k // gw, col k % gw); inside it (y, x, channel)
    x = torch.arange(2 * 4 * 6, dtype=torch.float32).reshape(1, 2, 4, 6)
    p = 2
    patches = patchify(x, p)
    for k in range(6):
        r, c = divmod(k, 3)
        expected = [x[0, ch, r * p + i, c * p + j] for i in range(p) for j in range(p) for ch in range(2)]
        assert patches[0, k].tolist() == torch.stack(expected).tolist()


def test_patchify_rejects_sizes_that_do_not_divide():
    with pytest.raises(ValueError, match="not a multiple"):
        patchify(torch.zeros(1, 1, 10, 10), 4)
