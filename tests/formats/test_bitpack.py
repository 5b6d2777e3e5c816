import pytest
import torch

from anybit.formats import bitpack


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("k", [1, 3, 7, 8, 64, 172, 173])
def test_round_trip_exact(bits, k):
    g = torch.Generator().manual_seed(bits * 1000 + k)
    codes = torch.randint(0, 1 << bits, (5, k), generator=g, dtype=torch.uint8)
    packed = bitpack.pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (5, bitpack.packed_bytes(k, bits))
    assert torch.equal(bitpack.unpack(packed, bits, k), codes)


def test_layout_is_little_endian_bit_stream():
    # 3-bit codes 1, 2, 7 -> stream bits 100 010 111 (LSB first) -> byte0 = 0b11010001, byte1 = 0b1
    packed = bitpack.pack(torch.tensor([[1, 2, 7]], dtype=torch.uint8), 3)
    assert packed.tolist() == [[0b11010001, 0b1]]
    packed4 = bitpack.pack(torch.tensor([[0xA, 0x5, 0x3]], dtype=torch.uint8), 4)
    assert packed4.tolist() == [[0x5A, 0x03]]


def test_leading_dims_and_errors():
    codes = torch.randint(0, 8, (2, 3, 10), dtype=torch.uint8)
    assert torch.equal(bitpack.unpack(bitpack.pack(codes, 3), 3, 10), codes)
    with pytest.raises(ValueError):
        bitpack.pack(codes, 9)
    with pytest.raises(ValueError):
        bitpack.unpack(bitpack.pack(codes, 3), 3, 11)
