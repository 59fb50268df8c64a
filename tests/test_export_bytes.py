"""Exported .safetensors files are byte-identical for the same weights (docs/exports.md, "Byte-identical files").

safetensors keeps ``__metadata__`` in a Rust HashMap seeded afresh for every file, so before models/export_bytes.py
the key order (and so the bytes) changed from one write to the next, within a process and across processes. Here
the same seeded weights are exported three times in each of two processes with different PYTHONHASHSEED
(the LoRA file, the kohya file, the SD 1.x and SDXL textual-inversion files): all six copies of each file match.
With the old writer each multi-key file had a 1/2 (LoRA: 2 keys) to 1/24 (kohya: 4 keys) chance per copy of
matching the first, so six matching copies were at most 1/32 likely.
"""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from safetensors.torch import save as reference_save

from models.export_bytes import safetensors_bytes, save_safetensors, sort_metadata_in_place

ROOT = Path(__file__).parents[1]

# One process: the same seeded weights exported 3 times; prints {file: [sha256 of each copy]}.
EXPORTS = r"""
import hashlib, json, sys
from pathlib import Path
import torch
from models.components import build_tiny  # first: models/ applies the torchvision fix-up peft's import needs
from models.export import export
from peft import LoraConfig
from models.policy import Policy
from models.textual_inversion import add_placeholder, export_textual_inversion_sdxl, trainable_rows

torch.manual_seed(0)
comps = build_tiny()
comps.text_encoder.add_adapter(LoraConfig(r=2, lora_alpha=4, init_lora_weights="gaussian",
                                          target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]))
add_placeholder(comps.tokenizer, comps.text_encoder, "<cat>", 2, None, torch.Generator().manual_seed(0))
policy = Policy(comps, "lora", lora_rank=2, lora_alpha=4, lora_targets=("to_q", "to_k", "to_v", "to_out.0", "conv1"))
g = torch.Generator().manual_seed(1)
with torch.no_grad():
    for p in [*policy.parameters(), *(p for n, p in comps.text_encoder.named_parameters() if "lora_" in n), trainable_rows(comps.text_encoder)]:
        p.copy_(torch.randn(p.shape, generator=g))
g = torch.Generator().manual_seed(2)
sdxl_rows = {"clip_l": torch.randn(2, 8, generator=g), "clip_g": torch.randn(2, 12, generator=g)}
out, hashes = Path(sys.argv[1]), {}
for k in range(3):
    export(policy, out / str(k))
    export_textual_inversion_sdxl(out / str(k) / "sdxl", {"<cat>": 2}, sdxl_rows)
    for path in sorted((out / str(k)).rglob("*.safetensors")):
        hashes.setdefault(path.relative_to(out / str(k)).as_posix(), []).append(hashlib.sha256(path.read_bytes()).hexdigest())
print(json.dumps(hashes))
"""

FILES = ["pytorch_lora_weights.safetensors", "kohya_lora.safetensors", "learned_embeds.safetensors", "sdxl/learned_embeds.safetensors"]


def _start_exports(out: Path, hash_seed: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONHASHSEED": hash_seed}
    return subprocess.Popen([sys.executable, "-c", EXPORTS, str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT, env=env)  # fmt: skip


def _hashes(proc: subprocess.Popen) -> dict[str, list[str]]:
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    return json.loads(stdout.strip().splitlines()[-1])


def test_exports_are_byte_identical_across_processes(tmp_path):
    procs = [_start_exports(tmp_path / "a", "1"), _start_exports(tmp_path / "b", "2")]  # side by side: the imports dominate
    try:
        a, b = (_hashes(p) for p in procs)
    finally:
        for p in procs:  # a failed or timed-out one must not outlive the test
            p.kill()
            p.wait()
    assert sorted(a) == sorted(b) == sorted(FILES)
    for name in FILES:
        assert len(set(a[name] + b[name])) == 1, (name, a[name], b[name])
    # not vacuous: the files carry metadata of several keys (the part safetensors wrote in random order)
    for name, least in (("pytorch_lora_weights.safetensors", 2), ("kohya_lora.safetensors", 4), ("sdxl/learned_embeds.safetensors", 1)):
        with safe_open(str(tmp_path / "a" / "0" / name), "pt") as f:
            assert len(f.metadata()) >= least, (name, f.metadata())
    first, other = (load_file(str(tmp_path / d / "0" / "kohya_lora.safetensors")) for d in ("a", "b"))
    assert first.keys() == other.keys() and all(torch.equal(first[k], other[k]) for k in first)


def test_bytes_are_a_function_of_tensors_and_metadata(tmp_path):
    """The writer itself: dict orders do not matter, the file reads back as safetensors wrote it, and
    without metadata the bytes are safetensors' own."""
    t = {"b": torch.arange(6.0).reshape(2, 3), "a": torch.ones(3, dtype=torch.float16), "c": torch.tensor([7], dtype=torch.int64)}
    meta = {f"k{i}": f"v{i}" for i in (3, 1, 4, 0, 2)}
    one = safetensors_bytes(t, meta)
    for _ in range(5):  # safetensors' own writer gives another key order on most of these calls
        assert safetensors_bytes(dict(reversed(list(t.items()))), dict(reversed(list(meta.items())))) == one
    assert safetensors_bytes(t) == reference_save(t)
    path = save_safetensors(t, tmp_path / "x.safetensors", meta)
    assert path.read_bytes() == one and not list(tmp_path.glob(".*"))  # no temporary file left
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == meta  # (safe_open returns it in a random order too: the order is in the bytes)
    assert b'{"__metadata__":{"k0":"v0","k1":"v1","k2":"v2","k3":"v3","k4":"v4"},' in one
    back = load_file(str(path))
    assert back.keys() == t.keys() and all(torch.equal(back[k], t[k]) and back[k].dtype == t[k].dtype for k in t)
    n = int.from_bytes(one[:8], "little")
    assert n % 8 == 0 and one[8:9] == b"{"  # the header keeps safetensors' 8-byte alignment
    with pytest.raises(TypeError, match="must be strings"):
        safetensors_bytes(t, {"rank": 4})


def test_sort_metadata_in_place_keeps_the_tensor_bytes(tmp_path):
    """A file another writer made (safetensors' own, metadata in its random order) gets sorted metadata; the
    data section is untouched and a second pass changes nothing."""
    from safetensors.torch import save_file

    t = {"w": torch.randn(4, 4, generator=torch.Generator().manual_seed(0))}
    meta = {"format": "pt", "lora_adapter_metadata": "{}", "z": "1", "a": "2"}
    path = tmp_path / "lora.safetensors"
    save_file(t, str(path), metadata=meta)
    before = path.read_bytes()
    sort_metadata_in_place(path)
    after = path.read_bytes()
    assert after == safetensors_bytes(t, meta)
    assert after[-64:] == before[-64:]  # the data: 16 float32 values, verbatim
    mtime = path.stat().st_mtime_ns
    sort_metadata_in_place(path)
    assert path.read_bytes() == after and path.stat().st_mtime_ns == mtime
    assert hashlib.sha256(after).hexdigest() == hashlib.sha256(safetensors_bytes(t, dict(sorted(meta.items())))).hexdigest()
