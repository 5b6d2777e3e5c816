import torch

from anybit.formats import FormatSpec
from anybit.formats import int as intfmt
from anybit.methods.rtn import search_shrink


def test_clip_search_never_worse_and_usually_better():
    w = torch.randn(32, 172, generator=torch.Generator().manual_seed(0))
    w[0, 3] = 8.0  # an outlier: clipping the range helps the rest of its group
    for bits, group in [(2, 32), (3, 64), (4, -1)]:
        spec = FormatSpec("int", bits, group, False)
        shrink = search_shrink(w, spec)
        assert shrink.shape == (32, intfmt.num_groups(group, 172)) and (shrink <= 1).all() and (shrink >= 0.8).all()
        e_plain = ((intfmt.fake_quantize(w, spec) - w) ** 2).sum()
        e_clip = ((intfmt.fake_quantize(w, spec, shrink) - w) ** 2).sum()
        assert e_clip <= e_plain
        if bits == 2:
            assert e_clip < 0.95 * e_plain
