"""Pickle-free checkpoint codec: fastfeed.checkpoint.codec.encode / decode and the leaf specs.

Every round trip goes through JSON (the tree and the specs are dumped with ``allow_nan=False``
and loaded back) and through raw bytes (each leaf is snapshotted the way a caller would), then
the result is compared type by type and value by value (:func:`assert_same`: nan equals nan,
``-0.0`` differs from ``0.0``, tensors and arrays by dtype, shape and bytes). Covered: a real
model and Adam optimizer state, the three RNG states, every plain type, random nested plain
values (hypothesis), tensors of every dtype and odd shape, numpy arrays of any byte order, every
kind of buffer, and every unsupported type and malformed input (a ConfigError naming the place).
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import json
import math
import random
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastfeed.checkpoint.codec import FORMAT, LeafSpec, decode, encode, spec_from_json, spec_to_json
from fastfeed.errors import ConfigError

# ---------------------------------------------------------------------------------------------
# Helpers


def snapshot(leaf: Any) -> bytes:
    """The caller's side: the C-contiguous raw bytes of a tensor or ndarray leaf."""
    if isinstance(leaf, torch.Tensor):
        flat = leaf.detach().resolve_conj().resolve_neg().contiguous().reshape(-1)
        return bytes(flat.view(torch.uint8).cpu().numpy().tobytes())
    return bytes(np.ascontiguousarray(leaf).tobytes())


def through_json(state: Any) -> tuple[dict[str, Any], list[LeafSpec], list[bytes]]:
    """Encode ``state``, pass the tree and specs through JSON text, snapshot the leaves."""
    tree, leaves, specs = encode(state)
    text = json.dumps({"tree": tree, "specs": [spec_to_json(s) for s in specs]}, allow_nan=False)
    doc = json.loads(text)
    return doc["tree"], [spec_from_json(d) for d in doc["specs"]], [snapshot(x) for x in leaves]


def roundtrip(
    state: Any, *, wrap: Callable[[bytes], Any] = bytes, map_location: str | torch.device | None = None
) -> Any:
    tree, specs, blobs = through_json(state)
    return decode(tree, specs, [wrap(b) for b in blobs], map_location=map_location)


def same_float(a: float, b: float) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)


def assert_same(a: Any, b: Any, path: str = "state") -> None:
    """``a`` and ``b`` have the same types and values all the way down (nan == nan)."""
    assert type(a) is type(b), f"{path}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert (a.dtype, a.shape) == (b.dtype, b.shape), f"{path}: {a.dtype} {a.shape} != {b.dtype} {b.shape}"
        assert snapshot(a) == snapshot(b), f"{path}: tensor bytes differ"
    elif isinstance(a, np.ndarray):
        assert (a.dtype.str, a.shape) == (b.dtype.str, b.shape), f"{path}: {a.dtype.str} {a.shape} != {b.dtype.str}"
        assert snapshot(a) == snapshot(b), f"{path}: array bytes differ"
    elif isinstance(a, np.generic):
        assert a.tobytes() == b.tobytes(), f"{path}: {a!r} != {b!r}"
    elif isinstance(a, float):
        assert same_float(a, b), f"{path}: {a!r} != {b!r}"
    elif isinstance(a, dict):
        ka, kb = list(a), list(b)
        assert len(ka) == len(kb), f"{path}: {len(ka)} keys != {len(kb)} keys"
        for i, (x, y) in enumerate(zip(ka, kb, strict=True)):
            assert_same(x, y, f"{path}.<key {i}>")
            assert_same(a[x], b[y], f"{path}[{x!r}]")
        assert hasattr(a, "_metadata") == hasattr(b, "_metadata"), f"{path}: _metadata"
        if hasattr(a, "_metadata"):
            assert_same(a._metadata, b._metadata, f"{path}._metadata")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{path}: length {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def test_assert_same_is_strict() -> None:
    assert_same([1.0, math.nan, (b"x",)], [1.0, math.nan, (b"x",)])
    for a, b in [(1, True), (1, 1.0), (0.0, -0.0), ((1,), [1]), ({"a": 1, "b": 2}, {"b": 2, "a": 1})]:
        with pytest.raises(AssertionError):
            assert_same(a, b)
    with pytest.raises(AssertionError):
        assert_same(np.float32(1), np.float64(1))
    with pytest.raises(AssertionError):
        assert_same(torch.zeros(2), torch.zeros(2, dtype=torch.float64))


@pytest.fixture
def _keep_rng() -> Iterator[None]:
    """Tests that reseed the global generators leave them as they found them."""
    saved = torch.get_rng_state(), np.random.get_state(), random.getstate()
    yield
    torch.set_rng_state(saved[0])
    np.random.set_state(saved[1])
    random.setstate(saved[2])


# ---------------------------------------------------------------------------------------------
# Real training state


def _model_and_optimizer() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    gen = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model(torch.randn(3, 4, generator=gen)).pow(2).sum().backward()
    opt.step()
    return model, opt


def test_model_and_adam_state_round_trip() -> None:
    model, opt = _model_and_optimizer()
    state = {"model": model.state_dict(), "optim": opt.state_dict(), "step": 3, "loader": {"epoch": 1, "pos": [4, 7]}}
    out = roundtrip(state)
    assert_same(state, out)
    assert type(out["model"]) is OrderedDict
    assert list(out["optim"]["state"]) == [0, 1, 2, 3]  # int keys survive JSON
    assert out["optim"]["param_groups"][0]["betas"] == (0.9, 0.999)

    # The decoded state loads and trains exactly like the original.
    model2 = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    model2.load_state_dict(out["model"])
    opt2 = torch.optim.Adam(model2.parameters())
    opt2.load_state_dict(out["optim"])
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(1))
    for m, o in ((model, opt), (model2, opt2)):
        o.zero_grad()
        m(x).pow(2).sum().backward()
        o.step()
    for p, q in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(p, q)


def test_leaf_specs_describe_the_leaves() -> None:
    model, opt = _model_and_optimizer()
    tree, leaves, specs = encode({"model": model.state_dict(), "optim": opt.state_dict()})
    paths = [s.path for s in specs]
    assert paths[:4] == ["model.0.weight", "model.0.bias", "model.2.weight", "model.2.bias"]
    assert "optim.state.0.exp_avg" in paths
    i = paths.index("optim.state.0.exp_avg")
    assert leaves[i] is opt.state_dict()["state"][0]["exp_avg"]  # not copied
    assert specs[i] == LeafSpec("tensor", "float32", (8, 4), 128, "cpu", "optim.state.0.exp_avg")
    step = specs[paths.index("optim.state.0.step")]
    assert (step.shape, step.nbytes) == ((), 4)  # Adam's 0-dim step tensor
    for spec in specs:
        assert spec_from_json(json.loads(json.dumps(spec_to_json(spec)))) == spec
    assert json.loads(json.dumps(tree, allow_nan=False)) == tree


@pytest.mark.usefixtures("_keep_rng")
def test_rng_states_round_trip_and_restore() -> None:
    torch.manual_seed(7)
    np.random.seed(7)
    random.seed(7)
    np.random.standard_normal()  # numpy now caches a gaussian: has_gauss=1 and a float in its state
    state = {"rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}}
    expected = torch.rand(4), np.random.standard_normal(4), random.random()
    out = roundtrip(state)
    assert_same(state, out)
    assert out["rng"]["numpy"][4] != 0.0
    torch.set_rng_state(out["rng"]["torch"])
    np.random.set_state(out["rng"]["numpy"])
    random.setstate(out["rng"]["python"])
    assert torch.equal(torch.rand(4), expected[0])
    assert np.array_equal(np.random.standard_normal(4), expected[1])
    assert random.random() == expected[2]


# ---------------------------------------------------------------------------------------------
# Plain values


PLAIN: dict[str, Any] = {
    "none": None,
    "bools": [True, False],
    "ints": [0, 1, -1, 2**53 - 1, -(2**53 - 1), 2**53, 2**63, -(2**63) - 1, 2**64 + 5, 3**400],
    "huge_int": 2**20000,  # more digits than int <-> str conversion allows by default
    "floats": [0.0, -0.0, 1.5, -2.25, 1e-308, 5e-324, 1.7976931348623157e308, math.nan, math.inf, -math.inf, 0.1],
    "strs": ["", "plain", "ünïcødé ☃ 𝄞", '{"t": "leaf", "i": 0}', "nan", "0x1f", "\x00\n"],
    "bytes": [b"", b"\x00\xff" * 5, bytearray(b"abc"), bytearray()],
    "containers": [[], (), {}, OrderedDict(), [()], ((),), (1,), [[[]]]],
    "keys": {2: "int", -(2**70): "big", 1.5: "float", math.inf: "inf", None: "none", True: "bool", b"\x01": "bytes"},
    "tuple_keys": {(1, "a", (None, 2.5)): 1, (): 2, ("x",): 3},
    "order": {"b": 1, "a": 2, "c": 3},
    "odict": OrderedDict([("z", 1), ("y", OrderedDict([(0, "zero")]))]),
    "torch": [torch.Size([2, 3]), torch.Size([]), torch.float32, torch.bfloat16, torch.qint8, torch.bool],
    "devices": [torch.device("cpu"), torch.device("cuda:1"), torch.device("cuda"), torch.device("meta")],
    "np_scalars": [np.float32(1.5), np.float64(-0.0), np.int64(3), np.int8(-4), np.uint64(2**64 - 1), np.bool_(True)],
    "np_more": [np.float16(np.nan), np.complex64(1 + 2j), np.longlong(5), np.longdouble(1) / 3, np.uintc(9)],
    "np_keys": {np.int64(1): "a", np.float32(2.5): "b", torch.int64: "c", torch.device("cpu"): "d"},
    "nested": {"a": [{"b": ({"c": [1, (2.5, None)]},)}]},
}


def test_plain_values_round_trip() -> None:
    out = roundtrip(PLAIN)
    assert_same(PLAIN, out)
    assert type(out["np_more"][2]) is np.longlong  # not np.int64, though the dtype string is the same
    assert type(out["np_scalars"][2]) is np.int64


def test_tree_format_is_compact_and_tagged() -> None:
    tree, leaves, specs = encode({"a": 1, "b": [None, True, "x"], 2: (1.5, math.nan), "t": torch.ones(2)})
    assert tree == {
        "format": FORMAT,
        "root": {
            "t": "dict",
            "items": [
                ["a", 1],
                ["b", [None, True, "x"]],
                [2, {"t": "tuple", "items": [{"t": "float", "v": 1.5}, {"t": "float", "v": "nan"}]}],
                ["t", {"t": "leaf", "i": 0}],
            ],
        },
    }
    assert len(leaves) == len(specs) == 1
    assert encode(2**53)[0]["root"] == {"t": "int", "v": "0x20000000000000"}
    assert encode(-(2**53))[0]["root"] == {"t": "int", "v": "-0x20000000000000"}
    assert encode(b"\x00")[0]["root"] == {"t": "bytes", "v": "AA=="}


def test_decode_without_json() -> None:
    state = {"x": [1, 2.5, torch.arange(3)], (1, 2): b"k"}
    tree, leaves, specs = encode(state)
    assert_same(state, decode(tree, specs, [snapshot(x) for x in leaves]))


def test_same_tensor_twice_is_stored_twice() -> None:
    t = torch.arange(4.0)
    tree, leaves, specs = encode({"a": t, "b": [t]})
    assert len(leaves) == 2 and leaves[0] is t and leaves[1] is t
    assert [s.path for s in specs] == ["a", "b.0"]
    out = decode(tree, specs, [bytearray(snapshot(x)) for x in leaves])
    assert torch.equal(out["a"], t) and torch.equal(out["b"][0], t)
    assert out["a"].data_ptr() != out["b"][0].data_ptr()


def test_parameter_is_stored_as_plain_tensor() -> None:
    p = torch.nn.Parameter(torch.arange(3.0))
    _, leaves, _ = encode({"p": p})
    assert leaves[0] is p
    out = roundtrip({"p": p})
    assert type(out["p"]) is torch.Tensor and not out["p"].requires_grad
    assert torch.equal(out["p"], p.detach())


def test_root_leaf() -> None:
    tree, _, specs = encode(np.arange(3))
    assert tree["root"] == {"t": "leaf", "i": 0} and specs[0].path == "<root>"
    assert_same(roundtrip(np.arange(3)), np.arange(3))


# Hypothesis: random nested plain values.

_scalar_keys = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**200), max_value=2**200)
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=8)
)
_keys = st.recursive(_scalar_keys, lambda ch: st.lists(ch, max_size=3).map(tuple), max_leaves=6)
_NP_TYPES = [np.float16, np.float32, np.float64, np.int8, np.int32, np.int64, np.uint8, np.uint64, np.complex128]
_np_scalars = st.builds(
    lambda t, raw: np.frombuffer(raw[: np.dtype(t).itemsize], dtype=t)[0],  # any bit pattern: nan payloads too
    st.sampled_from(_NP_TYPES),
    st.binary(min_size=16, max_size=16),
) | st.booleans().map(np.bool_)
_scalars = (
    _scalar_keys
    | st.binary(max_size=8).map(bytearray)
    | _np_scalars
    | st.sampled_from([torch.float32, torch.bfloat16, torch.int64, torch.bool, torch.complex64])
    | st.sampled_from([torch.device("cpu"), torch.device("cuda", 3), torch.device("meta")])
    | st.lists(st.integers(0, 2**40), max_size=4).map(torch.Size)
    | st.lists(st.floats(width=32), max_size=4).map(lambda v: torch.tensor(v, dtype=torch.float32))
    | st.lists(st.integers(-(2**63), 2**63 - 1), max_size=4).map(lambda v: np.array(v, dtype=">i8"))
)
_values = st.recursive(
    _scalars,
    lambda ch: (
        st.lists(ch, max_size=4)
        | st.lists(ch, max_size=4).map(tuple)
        | st.dictionaries(_keys | _np_scalars, ch, max_size=4)
        | st.dictionaries(_keys, ch, max_size=4).map(OrderedDict)
    ),
    max_leaves=25,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_values)
def test_random_nested_values_round_trip(state: Any) -> None:
    assert_same(state, roundtrip(state))


# ---------------------------------------------------------------------------------------------
# Tensors and arrays

_DTYPES = [
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.uint8,
    torch.uint16,
    torch.uint32,
    torch.uint64,
    torch.bool,
    torch.complex64,
    torch.complex128,
] + [getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n)]


def _make(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    gen = torch.Generator().manual_seed(3)
    if dtype.is_complex:
        return torch.randn(shape, dtype=dtype, generator=gen)
    if dtype == torch.bool:
        return torch.randn(shape, generator=gen) > 0
    return (torch.randn(shape, generator=gen) * 50).to(dtype)


@pytest.mark.parametrize("shape", [(), (0,), (3, 0, 2), (2, 3)], ids=str)
@pytest.mark.parametrize("dtype", _DTYPES, ids=str)
def test_tensor_dtypes_and_shapes(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    t = _make(dtype, shape)
    _, _, specs = encode(t)
    assert specs[0].dtype == str(dtype).removeprefix("torch.")
    assert specs[0].nbytes == t.numel() * t.element_size()
    out = roundtrip({"t": t})
    assert_same({"t": t}, out)
    assert out["t"].device.type == "cpu"


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.arange(12.0).reshape(3, 4).t(),
        lambda: torch.arange(24, dtype=torch.bfloat16).reshape(4, 6)[:, ::2],
        lambda: torch.arange(3, dtype=torch.int16).expand(4, 3),
        lambda: torch.randn(3, dtype=torch.complex64).conj(),
        lambda: -torch.randn(2, 2, dtype=torch.complex64).conj().imag,
    ],
    ids=["transposed", "strided_bf16", "expanded", "conj", "neg_view"],
)
def test_non_contiguous_tensors(make: Callable[[], torch.Tensor]) -> None:
    t = make()
    out = roundtrip(t)
    assert out.is_contiguous() and out.shape == t.shape and out.dtype == t.dtype
    assert torch.equal(out, t.resolve_conj().resolve_neg())


@pytest.mark.parametrize(
    "arr",
    [
        np.arange(6, dtype=">f8").reshape(2, 3),
        np.arange(6, dtype=">i4").reshape(3, 2).T,
        np.array([1, 2, 65535], dtype="<u2"),
        np.array([True, False, True]),
        np.array([1 + 2j, -3j], dtype=">c16"),
        np.array([np.nan, -0.0, np.inf], dtype=np.float16),
        np.arange(3, dtype=np.longdouble) / 7,
        np.array(3.5),
        np.zeros((0, 4), dtype=">f4"),
        np.arange(20, dtype=np.int64).reshape(4, 5)[:, ::2],
    ],
    ids=["be_f8", "be_i4_T", "u2", "bool", "be_c16", "f2", "longdouble", "0dim", "empty", "strided"],
)
def test_ndarrays(arr: np.ndarray[Any, Any]) -> None:
    out = roundtrip({"a": arr})
    assert_same({"a": arr}, out)
    assert out["a"].dtype.str == arr.dtype.str  # big-endian stays big-endian
    np.testing.assert_array_equal(out["a"], arr)


# ---------------------------------------------------------------------------------------------
# Buffers


def _np_readonly(b: bytes) -> np.ndarray[Any, Any]:
    arr = np.frombuffer(b, dtype=np.uint8)
    assert not arr.flags.writeable
    return arr


@pytest.mark.parametrize(
    "wrap",
    [
        bytes,
        bytearray,
        lambda b: memoryview(bytearray(b)),
        memoryview,
        lambda b: np.frombuffer(bytearray(b), dtype=np.uint8),
        _np_readonly,
        lambda b: torch.tensor(list(b), dtype=torch.uint8),
        lambda b: memoryview(bytearray(1) + b)[1:],  # misaligned for the dtype: copied
        lambda b: torch.tensor([0, *b], dtype=torch.uint8)[1:],  # storage offset 1
        lambda b: memoryview(bytes(x for c in b for x in (c, 0)))[::2],  # not contiguous
    ],
    ids=["bytes", "bytearray", "mv_rw", "mv_ro", "np_rw", "np_ro", "tensor", "misaligned", "offset", "strided_mv"],
)
def test_buffer_kinds(wrap: Callable[[bytes], Any]) -> None:
    state = {"t": torch.arange(5, dtype=torch.float64), "a": np.arange(5, dtype=">f8"), "b": torch.tensor([True])}
    out = roundtrip(state, wrap=wrap)
    assert_same(state, out)
    out["t"].add_(1)  # writable (read-only buffers were copied; no warning either)
    out["a"] += 1


def test_writable_buffers_are_shared() -> None:
    tree, leaves, specs = encode({"t": torch.zeros(4), "a": np.zeros(4)})
    bufs = [bytearray(snapshot(x)) for x in leaves]
    out = decode(tree, specs, bufs)
    bufs[0][:4] = np.float32(2.0).tobytes()
    bufs[1][:8] = np.float64(3.0).tobytes()
    assert out["t"][0].item() == 2.0 and out["a"][0] == 3.0


def test_zero_size_leaves_take_empty_buffers() -> None:
    state = {"t": torch.empty(0, 3, dtype=torch.bfloat16), "a": np.empty((2, 0), dtype="<i4")}
    tree, _, specs = encode(state)
    assert [s.nbytes for s in specs] == [0, 0]
    for buf in (b"", bytearray(), np.empty(0, np.uint8), torch.empty(0, dtype=torch.uint8)):
        assert_same(state, decode(tree, specs, [buf, buf]))


# ---------------------------------------------------------------------------------------------
# Devices


@pytest.mark.parametrize("where", [None, "cpu", torch.device("cpu")])
def test_map_location_cpu(where: str | torch.device | None) -> None:
    out = roundtrip({"t": torch.arange(3)}, map_location=where)
    assert out["t"].device == torch.device("cpu")
    assert torch.equal(out["t"], torch.arange(3))


def test_saved_device_is_informational() -> None:
    tree, leaves, specs = encode({"t": torch.arange(3.0)})
    specs = [dataclasses.replace(specs[0], device="cuda:7")]
    out = decode(tree, specs, [snapshot(x) for x in leaves])
    assert out["t"].device == torch.device("cpu")


def test_bad_map_location() -> None:
    tree, leaves, specs = encode([torch.ones(1)])
    with pytest.raises(ConfigError, match="invalid map_location"):
        decode(tree, specs, [snapshot(leaves[0])], map_location="warp-drive:0")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_unavailable_map_location() -> None:
    tree, leaves, specs = encode({"t": torch.ones(1)})
    with pytest.raises(ConfigError, match=r"cannot move leaf 0 \('t'\) to cuda") as err:
        decode(tree, specs, [snapshot(leaves[0])], map_location="cuda")
    assert err.value.hint and "map_location" in err.value.hint


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_tensors() -> None:
    state = {"t": torch.arange(6, dtype=torch.bfloat16, device="cuda").reshape(2, 3).t()}
    tree, leaves, specs = encode(state)
    assert specs[0].device == "cuda:0"
    out = decode(tree, specs, [snapshot(x) for x in leaves])
    assert out["t"].device.type == "cpu" and torch.equal(out["t"], state["t"].cpu())
    out = decode(tree, specs, [snapshot(x) for x in leaves], map_location="cuda:0")
    assert out["t"].device == torch.device("cuda:0") and torch.equal(out["t"], state["t"])


# ---------------------------------------------------------------------------------------------
# Unsupported values


class Custom:
    pass


class Color(enum.IntEnum):
    RED = 1


class MyTensor(torch.Tensor):
    pass


Point = collections.namedtuple("Point", "x y")


def _nested_tensor() -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "nested tensors are in prototype stage"
        return torch.nested.nested_tensor([torch.ones(2), torch.ones(3)])


def _quantized_tensor() -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantized tensor creation is deprecated
        return torch.quantize_per_tensor(torch.ones(2), 0.1, 0, torch.quint8)


def _self_list() -> list[Any]:
    x: list[Any] = [1]
    x.append(x)
    return x


def _odict_with_attr() -> OrderedDict[str, int]:
    d = OrderedDict(a=1)
    d.extra = 2  # type: ignore[attr-defined]
    return d


def _deep(n: int) -> list[Any]:
    x: list[Any] = []
    for _ in range(n):
        x = [x]
    return x


@pytest.mark.parametrize(
    ("make", "where", "what"),
    [
        (lambda: {"optim": {"x": {1, 2}}}, "state['optim']['x']", "a set"),
        (lambda: {"a": [0, frozenset()]}, "state['a'][1]", "a frozenset"),
        (lambda: {"p": Point(1, 2)}, "state['p']", "a namedtuple Point"),
        (lambda: {"o": Custom()}, "state['o']", "a Custom"),
        (lambda: {"f": lambda: 0}, "state['f']", "a callable function"),
        (lambda: {"d": collections.defaultdict(list)}, "state['d']", "a defaultdict (a subclass of dict)"),
        (lambda: {"e": Color.RED}, "state['e']", "an enum member Color.RED"),
        (lambda: {"c": 1 + 2j}, "state['c']", "a complex"),
        (lambda: {"n": [{"k": (1, np.str_("x"))}]}, "state['n'][0]['k'][1]", "numpy scalar of type str_"),
        (lambda: {"s": torch.eye(2).to_sparse()}, "state['s']", "layout torch.sparse_coo"),
        (
            lambda: {"q": _quantized_tensor()},
            "state['q']",
            "a quantized tensor",
        ),
        (lambda: {"m": torch.empty(2, device="meta")}, "state['m']", "meta device"),
        (lambda: {"u": torch.ones(2).as_subclass(MyTensor)}, "state['u']", "a tensor subclass MyTensor"),
        (lambda: {"n": _nested_tensor()}, "state['n']", "a nested tensor"),
        (lambda: {"o": np.array([1, "x"], dtype=object)}, "state['o']", "ndarray of dtype object"),
        (lambda: {"u": np.array(["ab"])}, "state['u']", "ndarray of dtype <U2"),
        (lambda: {"v": np.zeros(2, dtype=[("a", "<i4")])}, "state['v']", "ndarray of dtype"),
        (lambda: {"t": np.array(["2024-01-01"], dtype="M8[D]")}, "state['t']", "ndarray of dtype datetime64"),
        (lambda: {"ma": np.ma.array([1, 2])}, "state['ma']", "an ndarray subclass MaskedArray"),
        (lambda: {"k": {torch.ones(1): 1}}, "state['k']", "a tensor as a dict key"),
        (lambda: {"k": {frozenset(): 1}}, "state['k']", "a frozenset as a dict key"),
        (lambda: {"k": {Color.RED: 1}}, "state['k']", "as a dict key"),
        (lambda: {"r": _self_list()}, "state['r']", "a list that contains itself"),
        (lambda: {"o": _odict_with_attr()}, "state['o']", "instance attributes ['extra']"),
        (lambda: _deep(300), "state[0][0]", "nested deeper than 200 levels"),
    ],
)
def test_unsupported_values_name_the_path(make: Callable[[], Any], where: str, what: str) -> None:
    with pytest.raises(ConfigError) as err:
        encode(make())
    assert what in err.value.message
    assert f" {where}" in err.value.message
    assert err.value.hint


def test_unsupported_message_shape() -> None:
    with pytest.raises(ConfigError, match=r"^cannot checkpoint a set at state\['optim'\]\['x'\]: .*\. convert") as err:
        encode({"optim": {"x": {1}}})
    assert "sorted" in str(err.value.hint)


def test_deep_but_allowed_nesting() -> None:
    assert_same(roundtrip(_deep(150)), _deep(150))


# ---------------------------------------------------------------------------------------------
# Malformed input


def _valid() -> tuple[dict[str, Any], list[LeafSpec], list[bytes]]:
    return through_json({"a": [1, torch.arange(2, dtype=torch.float64)], "b": 2.5})


def _with_root(root: Any) -> dict[str, Any]:
    return {"format": FORMAT, "root": root}


def _in_dict(node: Any) -> dict[str, Any]:
    return _with_root({"t": "dict", "items": [["a", node]]})


@pytest.mark.parametrize(
    ("tree", "match"),
    [
        ([], "not a checkpoint tree: expected a JSON object"),
        ({"root": 1}, "no 'format' field"),
        ({"format": "fastfeed-tree/99", "root": 1}, "unknown checkpoint tree format 'fastfeed-tree/99'"),
        ({"format": FORMAT, "root": 1, "x": 2}, "expected the fields format and root"),
        ({"format": FORMAT}, "expected the fields format and root"),
        (_with_root({"x": 1}), "has no string tag 't'"),
        (_with_root({"t": 7}), "has no string tag 't'"),
        (_in_dict({"t": "pickle", "v": "cos\nsystem"}), r"at state\['a'\]: unknown node tag 'pickle'"),
        (_with_root({"t": "dict"}), r"missing fields \['items'\]"),
        (_with_root({"t": "float", "v": 1.5, "extra": 1}), r"unknown fields \['extra'\]"),
        (_in_dict(1.5), r"at state\['a'\]: bare float 1.5"),
        (_with_root([1, [2, {"t": "leaf", "i": 5}]]), r"at state\[1\]\[1\]: leaf index 5 out of range"),
        (_with_root({"t": "leaf", "i": "0"}), "leaf index '0' out of range"),
        (_with_root({"t": "leaf", "i": True}), "leaf index True out of range"),
        (_with_root({"t": "leaf", "i": -1}), "leaf index -1 out of range"),
        (_with_root({"t": "int", "v": "12"}), "hexadecimal string"),
        (_with_root({"t": "int", "v": " 0x1"}), "hexadecimal string"),
        (_with_root({"t": "float", "v": "NaN"}), "'nan', 'inf' or '-inf'"),
        (_with_root({"t": "float", "v": 2**60}), "'nan', 'inf' or '-inf'"),
        (_with_root({"t": "bytes", "v": "!!!!"}), "not valid base64"),
        (_with_root({"t": "bytearray", "v": 3}), "must be a base64 string"),
        (_with_root({"t": "dtype", "v": "__import__"}), "unknown torch dtype '__import__'"),
        (_with_root({"t": "device", "v": "warp:0"}), "invalid torch device 'warp:0'"),
        (_with_root({"t": "size", "v": [1, 2.0]}), "size node value must be a list of 64-bit integers"),
        (_with_root({"t": "size", "v": [2**64]}), "size node value must be a list of 64-bit integers"),
        (_with_root({"t": "dict", "items": {"a": 1}}), "items must be a list"),
        (_with_root({"t": "tuple", "items": "ab"}), "items must be a list"),
        (_with_root({"t": "dict", "items": [[1]]}), r"item 0 must be a \[key, value\] pair"),
        (_with_root({"t": "dict", "items": [[1, 2], [1, 3]]}), "duplicate dict key 1"),
        (_with_root({"t": "dict", "items": [[[1], 2]]}), "a list cannot be a dict key"),
        (_with_root({"t": "dict", "items": [[{"t": "leaf", "i": 0}, 2]]}), "a 'leaf' node cannot be a dict key"),
        (_with_root({"t": "odict", "items": [[{"t": "tuple", "items": [[]]}, 2]]}), "a list cannot be a dict key"),
        (_with_root({"t": "np", "dtype": "|O8", "v": ""}), "unsupported numpy scalar dtype '|O8'"),
        (_with_root({"t": "np", "dtype": "=f4", "v": "AAAAAA=="}), "unsupported numpy scalar dtype '=f4'"),
        (_with_root({"t": "np", "dtype": "<f4", "v": "AAAA"}), "needs 4 bytes, got 3"),
        (_with_root({"t": "np", "dtype": "<i8", "v": "AAAAAAAAAAA=", "char": "d"}), "type code 'd' does not match"),
        (_with_root({"t": "np", "dtype": "|b1", "v": "Ag=="}), "bool scalar holds the byte 2"),
        (_with_root(_deep(300)), "nested deeper than 200 levels"),
        (_with_root(("tuple",)), "unexpected value of type tuple"),
    ],
)
def test_malformed_trees(tree: Any, match: str) -> None:
    _, specs, blobs = _valid()
    with pytest.raises(ConfigError, match=match):
        decode(tree, specs, blobs)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda s: dataclasses.replace(s, nbytes=7), "nbytes is 7 but shape"),
        (lambda s: dataclasses.replace(s, dtype="float99"), "unknown tensor dtype 'float99'"),
        (lambda s: dataclasses.replace(s, dtype="qint8"), "unknown tensor dtype 'qint8'"),
        (lambda s: dataclasses.replace(s, kind="pickle"), "kind must be 'tensor' or 'ndarray'"),
        (lambda s: dataclasses.replace(s, shape=(-2,)), "shape must be a list of non-negative integers"),
        (lambda s: dataclasses.replace(s, kind="ndarray", dtype="<f4", device=None), "nbytes is 16 but"),
        (lambda s: dataclasses.replace(s, kind="ndarray", dtype="|O8", device=None), "unsupported ndarray dtype"),
        (lambda s: dataclasses.replace(s, kind="ndarray", dtype="<f8"), "an ndarray has no device"),
    ],
)
def test_malformed_specs(change: Callable[[LeafSpec], LeafSpec], match: str) -> None:
    tree, specs, blobs = _valid()
    with pytest.raises(ConfigError, match=r"malformed leaf 0 \('a.1'\): " + match):
        decode(tree, [change(specs[0])], blobs)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda d: {k: v for k, v in d.items() if k != "path"}, r"missing fields \['path'\]"),
        (lambda d: {**d, "pickle": 1}, r"unknown fields \['pickle'\]"),
        (lambda d: {**d, "shape": "2"}, "shape must be a list"),
        (lambda d: {**d, "shape": [2.0]}, "shape must be a list of non-negative integers"),
        (lambda d: {**d, "nbytes": "16"}, "nbytes must be a non-negative integer"),
        (lambda d: {**d, "device": 0}, "device must be a string or null"),
        (lambda d: {**d, "path": None}, "path must be a string"),
        (lambda d: [d], "expected a JSON object"),
    ],
)
def test_spec_from_json_rejects(change: Callable[[dict[str, Any]], Any], match: str) -> None:
    _, specs, _ = _valid()
    with pytest.raises(ConfigError, match=match):
        spec_from_json(change(spec_to_json(specs[0])))


def test_spec_json_round_trip() -> None:
    for spec in [
        LeafSpec("tensor", "bfloat16", (2, 0, 3), 0, "cuda:1", "a.b"),
        LeafSpec("ndarray", ">c16", (), 16, None, "<root>"),
    ]:
        assert spec_from_json(json.loads(json.dumps(spec_to_json(spec)))) == spec


@pytest.mark.parametrize(
    ("buffers", "match"),
    [
        (lambda b: [b[0][:-1]], r"leaf 0 \('a.1'\): buffer holds 15 bytes, the spec says 16"),
        (lambda b: [b[0] + b"\x00"], "buffer holds 17 bytes"),
        (lambda b: [np.frombuffer(b[0], dtype=np.float32)], "a numpy buffer must be a 1-D uint8 array"),
        (lambda b: [np.frombuffer(b[0], dtype=np.uint8).reshape(2, 8)], "a numpy buffer must be a 1-D uint8 array"),
        (lambda b: [torch.zeros(4)], "a tensor buffer must be a 1-D uint8 tensor"),
        (lambda b: [torch.zeros(15, dtype=torch.uint8)], "buffer holds 15 bytes"),
        (lambda b: [12345], "buffer of type int is not bytes-like"),
        (lambda b: [], "1 leaf specs but 0 buffers"),
        (lambda b: [b[0], b[0]], "1 leaf specs but 2 buffers"),
    ],
)
def test_bad_buffers(buffers: Callable[[list[bytes]], list[Any]], match: str) -> None:
    tree, specs, blobs = _valid()
    with pytest.raises(ConfigError, match=match):
        decode(tree, specs, buffers(blobs))


def test_bool_leaves_must_hold_zero_or_one() -> None:
    tree, _, specs = encode({"t": torch.tensor([True, False]), "a": np.array([True, False])})
    with pytest.raises(ConfigError, match=r"leaf 0 \('t'\): a bool tensor holds bytes other than 0 and 1"):
        decode(tree, specs, [b"\x01\x02", b"\x01\x00"])
    with pytest.raises(ConfigError, match=r"leaf 1 \('a'\): a bool array holds bytes other than 0 and 1"):
        decode(tree, specs, [b"\x01\x00", b"\x01\xff"])


def test_decode_errors_are_value_errors() -> None:
    with pytest.raises(ValueError, match="unknown checkpoint tree format"):
        decode({"format": "pickle", "root": None}, [], [])
