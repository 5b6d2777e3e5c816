import torch
from safetensors.torch import save_file

from anybit.allocator import drop_file_pages
from anybit.io.checkpoint import read_safetensors_mmap


def _rss_file_kib() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("RssFile:"):
            return int(line.split()[1])
    return 0


def test_drop_file_pages_releases_a_checkpoint_map_and_keeps_its_values(tmp_path):
    w = torch.arange(4 << 20, dtype=torch.int32).view(1024, -1)  # 16 MiB
    save_file({"w": w}, str(tmp_path / "m.safetensors"))
    t = read_safetensors_mmap(tmp_path / "m.safetensors")["w"]
    assert int(t.sum()) == int(w.sum())  # every page touched: resident
    before = _rss_file_kib()
    freed = drop_file_pages([t])
    assert freed >= 16 << 20
    assert before - _rss_file_kib() >= 12 << 10  # at least 12 of the 16 MiB left the RSS
    assert torch.equal(t, w)  # read back from the file


def test_drop_file_pages_never_touches_anonymous_memory():
    a = torch.arange(1 << 20, dtype=torch.float32)
    keep = a.clone()
    assert drop_file_pages([a, None, torch.empty(0)]) == 0
    assert torch.equal(a, keep)
