"""Every tiny fixture pipeline is a real diffusers pipeline that runs offline and deterministically."""

from __future__ import annotations

import pytest
import torch

from diffq.errors import UnsupportedModelError
from diffq.pipelines.adapters import adapter_for
from diffq.pipelines.testing import TINY_FAMILIES, tiny_call_kwargs, tiny_pipeline


def _image(pipe, family: str, seed: int) -> torch.Tensor:
    return pipe(**tiny_call_kwargs(family), generator=torch.Generator("cpu").manual_seed(seed)).images


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_fixture_generates_same_image_twice(family):
    pipe = tiny_pipeline(family)
    assert adapter_for(pipe).name == family
    a, b = _image(pipe, family, 0), _image(pipe, family, 0)
    assert a.shape == (1, 3, 32, 32) and a.dtype == torch.float32
    assert torch.isfinite(a).all() and 0 <= float(a.min()) and float(a.max()) <= 1
    assert torch.equal(a, b)
    assert not torch.equal(a, _image(pipe, family, 1)), "the seed must matter"


def test_same_seed_builds_identical_weights_and_other_seed_differs():
    a, b, c = tiny_pipeline("sd", seed=0), tiny_pipeline("sd", seed=0), tiny_pipeline("sd", seed=1)
    sa, sb, sc = a.unet.state_dict(), b.unet.state_dict(), c.unet.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)


def test_unknown_family_names_the_known_ones():
    with pytest.raises(UnsupportedModelError, match="sdxl"):
        tiny_pipeline("kandinsky")
