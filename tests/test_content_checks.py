"""Content checks on shared files: a pickle under any name or wrapping is refused, everything else passes.

The pickles here are only ever written, never loaded: the one that would run a command calls ``os.system``.
"""

from __future__ import annotations

import bz2
import collections
import gzip
import io
import json
import lzma
import os
import pickle
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from registry_helpers import make_expert
from safetensors.torch import save_file

from expertmix.cli import main
from expertmix.errors import StoreError
from expertmix.hub.content import (
    ContentError,
    check_bytes,
    check_file,
    check_safetensors,
    head_problem,
    pickle_problem,
)
from expertmix.hub.repo import validate_expert_folder


class RunsACommand:
    """Unpickling this would run a shell command."""

    def __reduce__(self):
        return os.system, ("echo pwned",)


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def refusal(path: Path) -> str:
    with pytest.raises(ContentError) as err:
        check_file(path)
    return str(err.value)


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_a_renamed_pickle_of_any_protocol_is_refused_naming_the_file_and_what_it_imports(tmp_path, protocol):
    msg = refusal(write(tmp_path / "notes.txt", pickle.dumps(RunsACommand(), protocol=protocol)))
    assert msg.startswith(f"{tmp_path / 'notes.txt'}: content is a Python pickle that imports and calls code (")
    assert "system" in msg and msg.endswith("; weights must be safetensors")
    # a pickle that only imports (no call) is refused once it reaches its STOP
    msg = refusal(write(tmp_path / "weights.dat", pickle.dumps(os.system, protocol=protocol)))
    assert "a Python pickle that imports code" in msg
    # an OrderedDict of weights, the usual state_dict, imports collections.OrderedDict and calls it
    state = {"w": collections.OrderedDict(a=1.0)}
    assert "(collections.OrderedDict)" in refusal(write(tmp_path / "w.bin", pickle.dumps(state, protocol=protocol)))


def test_a_pickle_whose_import_comes_late_is_found_by_reading_the_whole_file(tmp_path):
    late = pickle.dumps({"pad": os.urandom(100_000), "w": collections.OrderedDict(a=1)}, protocol=4)
    assert head_problem(late[:512]) is None  # the head alone shows nothing
    assert "imports and calls code (collections.OrderedDict)" in refusal(write(tmp_path / "late.bin", late))
    with pytest.raises(ContentError, match=r"^state\.json: content is a Python pickle"):
        check_bytes("state.json", late)


@pytest.mark.parametrize("kind, compress", [("gzip", gzip.compress), ("bz2", bz2.compress), ("xz", lzma.compress)])
def test_a_compressed_pickle_is_refused(tmp_path, kind, compress):
    msg = refusal(write(tmp_path / "model.safetensors.gz", compress(pickle.dumps(RunsACommand()))))
    assert f"content ({kind}-compressed) is a Python pickle that imports and calls code" in msg


def test_torch_save_archives_legacy_files_and_tars_are_refused(tmp_path):
    torch.save({"w": torch.zeros(3)}, tmp_path / "weights.bin")
    assert "content (torch.save archive member weights/data.pkl) is a Python pickle that imports and calls " \
           "code (torch._utils._rebuild_tensor_v2" in refusal(tmp_path / "weights.bin")
    torch.save({"w": torch.zeros(3)}, tmp_path / "legacy.dat", _use_new_zipfile_serialization=False)
    assert "content is a Python pickle that imports and calls code" in refusal(tmp_path / "legacy.dat")
    # the archive gzip'd, then inside a tar.gz: still found
    archive = (tmp_path / "weights.bin").read_bytes()
    assert "gzip-compressed, torch.save archive member" in refusal(write(tmp_path / "w.gz", gzip.compress(archive)))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo("ckpt/weights.bin")
        info.size = len(archive)
        tar.addfile(info, io.BytesIO(archive))
    assert "(gzip-compressed, tar member ckpt/weights.bin, torch.save archive member weights/data.pkl)" \
        in refusal(write(tmp_path / "ckpt.tgz", buf.getvalue()))


def test_numpy_object_arrays_are_refused_and_plain_arrays_pass(tmp_path):
    np.save(tmp_path / "objects.npy", np.array([1, "a", None], dtype=object), allow_pickle=True)
    assert "is a NumPy array of Python objects (dtype '|O'), stored as a pickle" in refusal(tmp_path / "objects.npy")
    np.savez_compressed(tmp_path / "mixed.npz", w=np.arange(4.0), o=np.array([None], dtype=object))
    assert "content (zip member o.npy) is a NumPy array of Python objects" in refusal(tmp_path / "mixed.npz")
    np.save(tmp_path / "plain.npy", np.arange(10, dtype=np.float32))
    np.savez(tmp_path / "plain.npz", a=np.ones((3, 3)), b=np.arange(5))
    check_file(tmp_path / "plain.npy")
    check_file(tmp_path / "plain.npz")


def test_text_json_markdown_tokenizer_and_safetensors_pass(tmp_path, llama_seed):
    benign = {
        "notes.txt": b"plain notes\nwith lines\n",
        "config.json": json.dumps({"hidden_size": 64, "architectures": ["LlamaForCausalLM"]}).encode(),
        "README.md": b"---\nlicense: mit\n---\n# An expert\n\n* trained on (math)\n",
        # text that reads as a few protocol-0 opcodes (GLOBAL, REDUCE, MARK, INT...) but is no loadable pickle
        "cats.txt": b"cats\ndogs\n",
        "config.txt": b"config\nsettings\nReady to go\n",
        "marks.txt": b"((((((((\n",
        "numbers.txt": b"I1\nI2\nhello\n",
        "empty.txt": b"",
        # a pickle of plain data imports nothing, so loading it runs no code
        "plain.pkl.txt": pickle.dumps({"lr": 0.001, "steps": [1, 2, 3]}, protocol=4),
    }
    for name, data in benign.items():
        check_file(write(tmp_path / name, data))
        check_bytes(name, data)
    for p in llama_seed.iterdir():  # tokenizer.json, config.json, model.safetensors, ...
        check_file(p)
    check_safetensors(llama_seed / "model.safetensors")


def test_a_safetensors_file_whose_header_length_starts_like_a_pickle_header_passes(tmp_path):
    """A 640-byte header makes the file start with 0x80 0x02, a protocol-2 pickle's first bytes."""
    path = tmp_path / "model.safetensors"
    save_file({"w": torch.ones(2)}, path, metadata={"note": ""})
    bare = int.from_bytes(path.read_bytes()[:8], "little")
    for pad in range(max(0, 0x280 - bare - 16), 0x280 - bare + 16):
        save_file({"w": torch.ones(2)}, path, metadata={"note": "x" * pad})
        head = path.read_bytes()[:2]
        if head[0] == 0x80 and 2 <= head[1] <= 5:
            break
    else:
        pytest.fail("no padding gave a header length starting 0x80 0x02..0x05")
    check_file(path)
    check_safetensors(path)
    assert head_problem(path.read_bytes()[:512]) is None


def test_a_large_benign_binary_passes_quickly(tmp_path):
    write(tmp_path / "random.bin.dat", os.urandom(32 << 20))
    save_file({"w": torch.randn(8 << 20)}, tmp_path / "big.safetensors")
    start = time.monotonic()
    check_file(tmp_path / "random.bin.dat")
    check_file(tmp_path / "big.safetensors")
    check_safetensors(tmp_path / "big.safetensors")
    assert time.monotonic() - start < 2


def test_a_compressed_pickle_past_the_cap_is_refused_as_a_possible_bomb():
    payload = 4 << 20
    huge = b"\x80\x04\x8e" + payload.to_bytes(8, "little") + bytes(payload) + b"cos\nsystem\n)R."
    packed = gzip.compress(huge)
    assert len(packed) < 64 << 10
    msg = pickle_problem(io.BytesIO(packed), max_decompressed=1 << 20)
    assert msg == "content (gzip-compressed) decompresses to over 1,048,576 bytes; refused as a possible " \
                  "decompression bomb"
    assert "imports and calls code (os.system)" in pickle_problem(io.BytesIO(packed))  # under the 1 GiB default
    # a gzip'd text file is read only as far as it takes to see it is no pickle
    assert pickle_problem(io.BytesIO(gzip.compress(b"just text\n" * 1_000_000)), max_decompressed=1 << 20) is None


def test_malformed_safetensors_headers_are_refused(tmp_path):
    good = tmp_path / "ok.safetensors"
    save_file({"w": torch.ones(4)}, good)
    data = good.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    cases = {
        "short.safetensors": (b"\x01\x02", "shorter than its header length"),
        "length.safetensors": ((10 ** 9).to_bytes(8, "little") + data[8:], "does not fit"),
        "json.safetensors": (data[:8] + b"#" * n + data[8 + n:], "header is not JSON"),
        "outside.safetensors": (None, "points outside the file"),
        "span.safetensors": (None, "holds 16 bytes, not the 8"),
    }
    for name, (blob, expected) in cases.items():
        if blob is None:
            bad = json.loads(json.dumps(header))
            if name == "outside.safetensors":
                bad["w"]["data_offsets"] = [0, 10 ** 6]
            else:
                bad["w"]["shape"] = [2]
            text = json.dumps(bad).encode().ljust(n)
            blob = len(text).to_bytes(8, "little") + text + data[8 + n:]
        with pytest.raises(ContentError, match=expected) as err:
            check_safetensors(write(tmp_path / name, blob))
        assert str(err.value).startswith(str(tmp_path / name))
    check_safetensors(good)


def test_a_folder_hiding_a_pickle_is_refused_before_it_is_shared(tmp_path, llama_seed):
    folder = make_expert(tmp_path / "e", llama_seed, "org/hidden", "toy", torch.ones(4))
    validate_expert_folder(folder)
    write(folder / "extra" / "notes.txt", gzip.compress(pickle.dumps(RunsACommand())))
    with pytest.raises(StoreError, match=r"notes\.txt: content \(gzip-compressed\) is a Python pickle"):
        validate_expert_folder(folder)
    (folder / "extra" / "notes.txt").unlink()
    write(folder / "model.safetensors", b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
    with pytest.raises(StoreError, match=r"model\.safetensors: safetensors header is not JSON"):
        validate_expert_folder(folder)


def test_cli_publish_of_a_disguised_pickle_to_the_local_store_fails_in_one_line_and_writes_nothing(
        tmp_path, llama_seed, home):
    folder = make_expert(tmp_path / "e", llama_seed, "org/disguised", "toy", torch.ones(4))
    torch.save({"w": torch.zeros(2)}, folder / "notes.txt")  # a torch.save archive named like a text file
    result = CliRunner().invoke(main, ["publish", str(folder)])
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output
    assert "notes.txt: content (torch.save archive member notes/data.pkl) is a Python pickle that imports and " \
           "calls code" in lines[0]
    store = home / "store"
    assert not (store / "repos").exists() or not any((store / "repos").iterdir())
    assert not (store / "blobs").exists() or not any(p.is_file() for p in (store / "blobs").rglob("*"))
    # without it the same folder publishes
    (folder / "notes.txt").write_text("plain notes\n")
    result = CliRunner().invoke(main, ["publish", str(folder)])
    assert result.exit_code == 0 and result.output.startswith("published org/disguised@"), result.output
