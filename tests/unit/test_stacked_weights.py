"""quant/stacked_weights.py: when weights can run as one stacked GEMM operand without a copy."""
from __future__ import annotations

import pytest
import torch

from quant.stacked_weights import into_one_buffer, stacked


def test_halves_of_one_buffer_stack_into_a_view_of_it():
    buf = torch.arange(6 * 4, dtype=torch.int8).reshape(6, 4)
    a, b = buf[:2], buf[2:]
    view = stacked(a, b)
    assert view is not None and torch.equal(view, buf)
    assert view.data_ptr() == buf.data_ptr() and view.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr()


def test_three_consecutive_slices_stack_and_a_gap_between_any_two_does_not():
    buf = torch.arange(9 * 4, dtype=torch.int8).reshape(9, 4)
    assert torch.equal(stacked(buf[:2], buf[2:5], buf[5:]), buf)
    assert stacked(buf[:2], buf[2:5], buf[6:]) is None
    assert stacked(buf[:2], buf[3:5], buf[5:]) is None
    assert stacked(buf[:2]) is None  # one weight is not a group


@pytest.mark.parametrize("case", ["separate", "reversed", "gap", "width", "dtype", "strided"])
def test_anything_else_does_not_stack(case):
    buf = torch.zeros(8, 4, dtype=torch.int8)
    a, b = {
        "separate": (torch.zeros(2, 4, dtype=torch.int8), torch.zeros(2, 4, dtype=torch.int8)),
        "reversed": (buf[2:4], buf[:2]),
        "gap": (buf[:2], buf[3:5]),
        "width": (buf[:2], torch.zeros(16, dtype=torch.int8)[4:].reshape(2, 6)),
        "dtype": (buf[:2], buf[2:4].view(torch.uint8)),
        "strided": (buf[:2, :2], buf[2:4, :2]),
    }[case]
    assert stacked(a, b) is None


def test_into_one_buffer_copies_both_and_the_halves_stack():
    a = torch.randint(-128, 127, (3, 8), dtype=torch.int8)
    b = torch.randint(-128, 127, (5, 8), dtype=torch.int8)
    ha, hb = into_one_buffer(a, b)
    assert torch.equal(ha, a) and torch.equal(hb, b)
    assert ha.data_ptr() != a.data_ptr()  # copies: the sources are left as they are
    assert torch.equal(stacked(ha, hb), torch.cat([a, b]))


def test_into_one_buffer_takes_any_number_of_weights():
    parts = [torch.randn(n, 8) for n in (3, 1, 4)]
    pieces = into_one_buffer(*parts)
    assert all(torch.equal(a, b) for a, b in zip(pieces, parts))
    assert torch.equal(stacked(*pieces), torch.cat(parts))


def test_into_one_buffer_in_inference_mode_gives_ordinary_tensors():
    # The halves become nn.Parameters of the caller's modules, which inference tensors cannot be.
    with torch.inference_mode():
        a, b = torch.ones(2, 4), torch.zeros(2, 4)
        ha, hb = into_one_buffer(a, b)
        assert not ha.is_inference() and not hb.is_inference()
        torch.nn.Parameter(ha, requires_grad=False)


def test_into_one_buffer_refuses_weights_of_other_widths():
    with pytest.raises(ValueError, match="cannot stack"):
        into_one_buffer(torch.zeros(2, 4), torch.zeros(2, 5))
