"""Reading ``.pdparams`` files without trusting them.

A ``.pdparams`` file is a Python pickle, and unpickling runs whatever code the file names (a
``__reduce__`` can call ``os.system``). People download LoRA files and share checkpoints, so nothing in
this project hands such a file to ``pickle.load`` or ``paddle.load``: :func:`load_pdparams` reads it
with an unpickler that resolves only the few globals a Paddle state dict of tensors is made of and
refuses every other one with :class:`UnsafeFileError` (one line, naming the file and the global).

What ``paddle.save(state_dict)`` writes (``paddle/framework/io.py``, protocols 2-4): a dict
``{name: numpy.ndarray, ..., "StructuredToParameterName@@": {name: tensor_name}}``; with protocol 2 or 3,
arrays over 1 GiB are split into ``name@@.i`` slices listed under ``"UnpackBigParamInfor@@"``. A dict that
is not a plain state dict is pickled with each tensor as a ``(tensor_name, ndarray)`` tuple instead. The
arrays pickle as ``numpy._core.multiarray._reconstruct`` (``numpy.core...`` before numpy 2) of
``numpy.ndarray`` with a ``numpy.dtype``; protocol 2 stores their bytes through ``_codecs.encode(text,
"latin1")``. That is the whole allow-list (plus ``collections.OrderedDict`` and ``builtins.tuple``); the
loaded object must then be such a dict of numeric arrays, or it is refused too.
"""
from __future__ import annotations

import codecs
import collections
import io
import pickle

import numpy as np

NAME_TABLE_KEY = "StructuredToParameterName@@"
BIG_PARAM_KEY = "UnpackBigParamInfor@@"  # sic, Paddle's spelling
PICKLE_SUFFIXES = (".pdparams", ".pd", ".pdopt", ".pt", ".pth", ".bin", ".ckpt", ".pkl")
"""File name endings of pickle-based weight formats (Paddle's and PyTorch's)."""


class UnsafeFileError(ValueError):
    """A weight file that is not a plain Paddle state dict of tensors; the message is one line."""

    def __init__(self, path: str, problem: str):
        problem = " ".join(str(problem).split())
        super().__init__(
            f"{path}: refused to load: {problem}; only a Paddle state dict of tensors is read from a pickle-based "
            f"file (code in a pickle would run), convert other files to .safetensors"
        )
        self.path = path


def _latin1_encode(text, encoding="latin1"):
    """``_codecs.encode`` as protocol-2 pickles use it for bytes (latin-1 only)."""
    if not isinstance(text, str) or codecs.lookup(encoding).name != "iso8859-1":
        raise pickle.UnpicklingError(f"_codecs.encode with {encoding!r}")
    return codecs.encode(text, "latin1")


_ALLOWED = {
    ("numpy._core.multiarray", "_reconstruct"): np.ndarray.__reduce__(np.empty(0))[0],
    ("numpy.core.multiarray", "_reconstruct"): np.ndarray.__reduce__(np.empty(0))[0],
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "tuple"): tuple,
}


class _StateDictUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"the pickle references {module}.{name}") from None

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("the pickle uses persistent ids (a PyTorch checkpoint?)")


def _array(value, key: str, path: str) -> np.ndarray:
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], str):
        value = value[1]  # paddle.save's (tensor_name, ndarray) form
    if not isinstance(value, np.ndarray) or type(value) is not np.ndarray:
        raise UnsafeFileError(path, f"entry {key!r} is a {type(value).__name__}, not a tensor")
    if value.dtype.hasobject:
        raise UnsafeFileError(path, f"entry {key!r} is an array of Python objects, not a tensor")
    return value


def _state_dict(loaded, path: str) -> dict:
    if not isinstance(loaded, dict):
        raise UnsafeFileError(path, f"it holds a {type(loaded).__name__}, not a state dict")
    loaded = dict(loaded)
    loaded.pop(NAME_TABLE_KEY, None)
    big = loaded.pop(BIG_PARAM_KEY, {})
    if not isinstance(big, dict):
        raise UnsafeFileError(path, f"{BIG_PARAM_KEY} is a {type(big).__name__}")
    for key, info in big.items():
        try:
            parts = [_array(loaded.pop(part), part, path) for part in info["slices"]]
            loaded[key] = np.concatenate(parts).reshape(tuple(int(n) for n in info["OriginShape"]))
        except (KeyError, TypeError, ValueError) as error:
            if isinstance(error, UnsafeFileError):
                raise
            raise UnsafeFileError(path, f"the split tensor {key!r} is inconsistent ({error})") from None
    bad = [key for key in loaded if not isinstance(key, str)]
    if bad:
        raise UnsafeFileError(path, f"key {bad[0]!r} is not a string")
    return {key: _array(value, key, path) for key, value in loaded.items()}


def load_pdparams(path: str) -> dict:
    """The tensors of a ``paddle.save`` state dict file as ``{name: numpy.ndarray}``.

    Raises:
        UnsafeFileError: the file references any other global, is not a pickle, or does not hold a
            state dict of numeric arrays. Nothing the file names is ever called.
        OSError: the file cannot be read.
    """
    with open(path, "rb") as handle:
        head = handle.read(4)
        handle.seek(0)
        if head[:2] == b"PK":
            raise UnsafeFileError(path, "it is a zip archive (a PyTorch checkpoint?), not a Paddle pickle")
        if head[:1] != b"\x80":
            raise UnsafeFileError(path, "it is not a pickle (protocol 2-5)")
        try:
            loaded = _StateDictUnpickler(io.BufferedReader(handle), encoding="latin1").load()
        except pickle.UnpicklingError as error:
            raise UnsafeFileError(path, str(error)) from None
        except Exception as error:  # only the allow-listed callables ran: anything else is a damaged file
            raise UnsafeFileError(path, f"it is damaged or not a state dict ({type(error).__name__}: {error})") from None
    return _state_dict(loaded, path)


def is_safetensors(path: str) -> bool:
    """Whether ``path`` is a safetensors file (by name, else by its header: 8-byte length, then '{')."""
    if path.endswith(".safetensors"):
        return True
    with open(path, "rb") as handle:
        head = handle.read(9)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 100_000_000
