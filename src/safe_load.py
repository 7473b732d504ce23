"""Loading `.pt` files without running code: checkpoints, and weights files given as `model.pretrained`.

`torch.load(weights_only=True)` accepts only tensors and plain containers, so a crafted pickle is
refused instead of executed; every failure becomes one line naming the file. Below the stages that
read such files (models, training, evaluation, inference), so none has to import another for it.
"""
from __future__ import annotations

import hashlib
import pickle
import pickletools
import re
import warnings
import zipfile
from pathlib import Path

import torch

from src.errors import first_line, folder_or_file, missing


ZIP_MAGIC = b"PK\x03\x04"  # torch's file format (and numpy's .npz)
PICKLE_MAGIC = b"\x80"  # the protocol opcode every pickle since protocol 2 starts with
# A PyTorch checkpoint's zip holds its pickled object tree as this member, in a folder of its own.
TORCH_PICKLE = "data.pkl"
# Members only a TorchScript archive (torch.jit.save) holds beside its data.pkl.
TORCHSCRIPT_MEMBERS = ("/constants.pkl",)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; one-line message naming the file."""


def safe_torch_load(path: str | Path, map_location="cpu", *, mmap: bool = False):
    """`torch.load` restricted to tensors and plain containers, with one-line errors. `mmap`: the
    tensors are memory-mapped from the file, not read, until used (for a caller that needs only the
    other fields of a checkpoint of a few hundred MB)."""
    path = Path(path)
    folder, regular_file = folder_or_file(path, CheckpointError, "checkpoint")
    if folder:
        raise CheckpointError(f"{path}: a folder, not a checkpoint file")
    if not regular_file:
        raise CheckpointError(f"{path}: checkpoint file {missing(path, folder=False)}")  # a FIFO: not found, before
    if path.stat().st_size == 0:  # e.g. a copy that was interrupted
        raise CheckpointError(f"{path}: empty file (0 bytes), not a checkpoint")
    zipped = _is_zip(path)
    if zipped and _compressed_torch_zip(path):
        raise CheckpointError(f"{path}: not a file torch.save wrote: its zip members are compressed, and loading "
                              "would inflate each in memory whole (a zip bomb of 2 MB took 2 GB)")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols of files it then refuses
            warnings.simplefilter("ignore", UserWarning)
            # torch maps only its zip format: a file of the legacy one (torch < 1.6) is read whole as before
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap and zipped)
    except pickle.UnpicklingError as exc:
        # torch words it "Unsupported global" or "unsupported GLOBAL", depending on the version and the class.
        message = str(exc)
        crafted = _file_kind(path) != "other" and _unsupported_pickle_opcode(message)
        if "unsupported global" in message.lower() or crafted:
            raise CheckpointError(f"{path}: not a safe checkpoint: it holds Python objects other than tensors "
                                  "and plain data (refused: loading it could run code)") from None
        raise _unreadable(path, exc) from None
    except PermissionError as exc:  # was "not a PyTorch checkpoint", from a file that could not be opened
        raise CheckpointError(f"{path}: cannot read the checkpoint ({exc.strerror})") from None
    except Exception as exc:  # garbage makes torch.load raise almost anything (KeyError, EOFError, ...)
        raise _unreadable(path, exc) from None


def file_sha256(path: Path) -> str:
    """What names a checkpoint's (or an export's) exact bytes: galleries, reports and exports record it."""
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def unusual_layout(tensor: torch.Tensor) -> str | None:
    """What makes `tensor` other than a dense one holding its data, if anything: weights_only loads
    sparse, nested and meta (data-less) tensors, which weights cannot be (tracebacks further on)."""
    if tensor.is_meta:
        return "meta (data-less)"
    if tensor.is_nested:
        return "nested"
    return None if tensor.layout == torch.strided else str(tensor.layout)


def _unreadable(path: Path, exc: Exception) -> CheckpointError:
    """A file torch.load gave up on: a damaged checkpoint (the error may help) or another kind of file
    (a CSV, a config, an image: torch's IndexError or opcode complaint would only confuse; a TorchScript
    export: torch's advice to load it with weights_only=False would run its code)."""
    kind = _file_kind(path)
    if kind == "torchscript":
        return CheckpointError(f"{path}: a TorchScript export, not a training checkpoint (load it with "
                               "torch.jit.load; predict takes the checkpoint, or the ONNX export with --onnx)")
    if kind == "pickle":
        return CheckpointError(f"{path}: truncated or damaged checkpoint ({type(exc).__name__}: {first_line(exc)})")
    return CheckpointError(f"{path}: not a PyTorch checkpoint")


def holds_torch_pickle(member_names: list[str]) -> bool:
    """Whether a zip with these members is torch's format (a checkpoint or a TorchScript archive)."""
    return any(name.rpartition("/")[2] == TORCH_PICKLE for name in member_names)


def _is_zip(path: Path) -> bool:
    """Whether `path` starts as a zip does; False for a file that cannot be read (torch.load says why)."""
    try:
        with path.open("rb") as handle:
            return handle.read(len(ZIP_MAGIC)) == ZIP_MAGIC
    except OSError:
        return False


def _compressed_torch_zip(path: Path) -> bool:
    """Whether `path`, a zip (`_is_zip`), is torch's layout with a compressed member that torch.load
    reads: torch.save stores each as it is, torch.load inflates a compressed one whole before reading
    it. (torch.jit.save compresses its `code/`, which torch.load never reads.)"""
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except Exception:  # unreadable or damaged: torch.load says which
        return False
    return holds_torch_pickle([member.filename for member in members]) \
        and any(member.compress_type != zipfile.ZIP_STORED and "/code/" not in member.filename for member in members)


def _file_kind(path: Path) -> str:
    """What a file torch.load failed on is, from its first bytes and, for a zip, its member names:

    - "torchscript": a TorchScript archive (torch.jit.save);
    - "pickle": a pickle (every pickle of protocol 2 or later begins with PROTO, 0x80: torch's legacy
      format, pickle.dumps), torch's zip format, or a zip too damaged to list (a truncated checkpoint);
    - "other": anything else. Other files' first bytes can read as opcodes too (a PNG's 0x89, the `d`
      of a YAML file's `data:`), and other zips (a gallery's .npz) hold no data.pkl.
    """
    try:
        with path.open("rb") as handle:
            start = handle.read(len(ZIP_MAGIC))
        if start != ZIP_MAGIC:
            return "pickle" if start.startswith(PICKLE_MAGIC) else "other"
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except OSError:
        return "other"
    except Exception:  # zipfile raises many kinds for a damaged directory (BadZipFile, UnicodeDecodeError, ...)
        return "pickle"
    if any(name.endswith(TORCHSCRIPT_MEMBERS) for name in names):
        return "torchscript"
    return "pickle" if holds_torch_pickle(names) else "other"


def _unsupported_pickle_opcode(message: str) -> bool:
    """True when torch's safe unpickler stopped at a real pickle opcode it does not allow (a pickle
    of Python objects); False for a byte that is no opcode at all (text, JSON, random data)."""
    match = re.search(r"Unsupported operand (\d+)", message)
    return match is not None and chr(int(match.group(1))) in _PICKLE_OPCODES


_PICKLE_OPCODES = {opcode.code for opcode in pickletools.opcodes}
