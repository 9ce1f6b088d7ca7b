"""Unit tests for quant/schemes.py: the scheme registry and every alias users know it by."""
from __future__ import annotations

import dataclasses

import pytest

from quant import schemes as S
from quant.schemes import (Scheme, UnknownSchemeError, all_names, get_scheme, list_aliases,
                           list_schemes, register_alias, register_scheme, resolve)

# The canonical names the rest of the pack (and users' saved workflows) rely on.
CANONICAL = ["none", "fp8-w8a8", "int8-w8a8", "fp8-block128", "int4-g128",
             "fp8-weight-only", "int8-weight-only", "fp8-scaled"]

# LightX2V mm_type strings -> (scheme, preferred backend). Written out by hand, not read back
# from the registry, so a typo in either place fails.
LIGHTX2V_MM = {
    "Default": ("none", None),
    "W-fp8-channel-sym-A-fp8-channel-sym-dynamic-Vllm": ("fp8-w8a8", "vllm"),
    "W-int8-channel-sym-A-int8-channel-sym-dynamic-Vllm": ("int8-w8a8", "vllm"),
    "W-fp8-channel-sym-A-fp8-channel-sym-dynamic-Q8F": ("fp8-w8a8", "q8f"),
    "W-int8-channel-sym-A-int8-channel-sym-dynamic-Q8F": ("int8-w8a8", "q8f"),
    "W-fp8-block128-sym-A-fp8-channel-group128-sym-dynamic-Deepgemm": ("fp8-block128", "deep-gemm"),
    "W-fp8-channel-sym-A-fp8-channel-sym-dynamic-Sgl": ("fp8-w8a8", "sgl-kernel"),
    "W-int8-channel-sym-A-int8-channel-sym-dynamic-Sgl": ("int8-w8a8", "sgl-kernel"),
    "W-int8-channel-sym-A-int8-channel-sym-dynamic-Torchao": ("int8-w8a8", "torchao"),
    "W-int4-group128-sym-Marlin": ("int4-g128", "vllm"),
}

LIGHTX2V_DIT = {
    "fp8-vllm": ("fp8-w8a8", "vllm"),
    "int8-vllm": ("int8-w8a8", "vllm"),
    "fp8-sgl": ("fp8-w8a8", "sgl-kernel"),
    "int8-sgl": ("int8-w8a8", "sgl-kernel"),
    "fp8-q8f": ("fp8-w8a8", "q8f"),
    "int8-q8f": ("int8-w8a8", "q8f"),
    "int8-torchao": ("int8-w8a8", "torchao"),
    "int4-g128-marlin": ("int4-g128", "vllm"),
    "fp8-b128-deepgemm": ("fp8-block128", "deep-gemm"),
}

# torchao quantize_component names: no backend preference; bare "int8" is weight-only here.
TORCHAO = {
    "none": ("none", None),
    "fp8-dynamic": ("fp8-w8a8", None),
    "fp8": ("fp8-w8a8", None),
    "fp8-weight-only": ("fp8-weight-only", None),
    "int8": ("int8-weight-only", None),
    "int4": ("int4-g128", None),
}

LLMC = {
    "w8a8-int8": ("int8-w8a8", None),
    "w8a8-fp8": ("fp8-w8a8", None),
    "w8a8-fp8block": ("fp8-block128", None),
    "fp8-scaled": ("fp8-scaled", None),
}

# LightX2V's T5/CLIP meaning of the bare names, only inside the encoder namespace.
ENCODER = {
    "int8": ("int8-w8a8", "vllm"),
    "fp8": ("fp8-w8a8", "vllm"),
}


def _check(resolved, expected, asked):
    scheme_name, backend = expected
    assert resolved.scheme is get_scheme(scheme_name)
    assert resolved.backend == backend
    assert resolved.asked_as == asked


# ---------------------------------------------------------------- canonical schemes
def test_canonical_names_are_registered():
    names = [s.name for s in list_schemes()]
    assert set(CANONICAL) <= set(names)
    assert len(names) == len(set(names))


@pytest.mark.parametrize("scheme", list_schemes(), ids=lambda s: s.name)
def test_every_scheme_resolves_by_its_own_name(scheme):
    assert get_scheme(scheme.name) is scheme
    r = resolve(scheme.name)
    assert r.scheme is scheme
    assert r.backend is None  # a canonical name carries no kernel preference
    # The encoder namespace must not shadow canonical names either.
    assert resolve(scheme.name, namespace="encoder").scheme is scheme


@pytest.mark.parametrize("name,quantized,act", [
    ("none", False, False), ("fp8-w8a8", True, True), ("int8-w8a8", True, True),
    ("fp8-block128", True, True), ("int4-g128", True, False), ("fp8-weight-only", True, False),
    ("int8-weight-only", True, False), ("fp8-scaled", True, False),
])
def test_scheme_flags(name, quantized, act):
    s = get_scheme(name)
    assert s.is_quantized is quantized
    assert s.quantizes_activation is act


def test_scheme_formats_and_granularities():
    assert get_scheme("fp8-w8a8").weight_granularity == S.PER_CHANNEL
    assert get_scheme("fp8-w8a8").activation_granularity == S.PER_TOKEN
    assert get_scheme("fp8-block128").weight_granularity == S.BLOCK_128
    assert get_scheme("fp8-block128").activation_granularity == S.GROUP_128
    assert get_scheme("int4-g128").weight_format == S.INT4
    assert get_scheme("int4-g128").weight_granularity == S.GROUP_128
    assert get_scheme("fp8-scaled").weight_granularity == S.PER_TENSOR
    assert get_scheme("int8-w8a8").weight_format == S.INT8
    assert get_scheme("int8-w8a8").activation_format == S.INT8


# ---------------------------------------------------------------- aliases
@pytest.mark.parametrize("name", sorted(LIGHTX2V_MM))
def test_lightx2v_mm_type(name):
    _check(resolve(name), LIGHTX2V_MM[name], name)


@pytest.mark.parametrize("name", sorted(LIGHTX2V_DIT))
def test_lightx2v_dit_quant_scheme(name):
    _check(resolve(name), LIGHTX2V_DIT[name], name)


@pytest.mark.parametrize("name", sorted(TORCHAO))
def test_torchao_names(name):
    _check(resolve(name), TORCHAO[name], name)


@pytest.mark.parametrize("name", sorted(LLMC))
def test_llmc_names(name):
    _check(resolve(name), LLMC[name], name)


@pytest.mark.parametrize("name", sorted(ENCODER))
def test_encoder_namespace(name):
    _check(resolve(name, namespace="encoder"), ENCODER[name], name)


def test_encoder_and_common_meanings_of_int8_differ():
    # The whole point of the namespace: same word, different scheme.
    assert resolve("int8").scheme.name == "int8-weight-only"
    assert resolve("int8", namespace="encoder").scheme.name == "int8-w8a8"
    assert resolve("int8", namespace="encoder").backend == "vllm"


@pytest.mark.parametrize("name,expected", [
    ("fp8-vllm", ("fp8-w8a8", "vllm")),
    ("int4", ("int4-g128", None)),
    ("W-fp8-block128-sym-A-fp8-channel-group128-sym-dynamic-Deepgemm", ("fp8-block128", "deep-gemm")),
])
def test_encoder_namespace_falls_back_to_common(name, expected):
    _check(resolve(name, namespace="encoder"), expected, name)


def test_every_registered_alias_resolves_to_its_target():
    # Catches an alias shadowed by a canonical name or by another namespace's entry.
    aliases = list_aliases()
    assert len(aliases) >= len(LIGHTX2V_MM) + len(LIGHTX2V_DIT) + len(TORCHAO) + len(ENCODER)
    for ns in ("common", "encoder"):
        for a in list_aliases(ns):
            r = resolve(a.name, namespace=ns)
            assert r.scheme.name == a.scheme, a
            assert r.backend == a.backend, a


def test_list_aliases_filters_by_namespace():
    enc = {a.name for a in list_aliases("encoder")}
    assert enc == set(ENCODER)
    common = {a.name for a in list_aliases("common")}
    assert set(LIGHTX2V_MM) | set(LIGHTX2V_DIT) | set(TORCHAO) | set(LLMC) <= common


@pytest.mark.parametrize("asked,expected", [
    ("FP8-VLLM", ("fp8-w8a8", "vllm")),
    ("Int8-Sgl", ("int8-w8a8", "sgl-kernel")),
    ("w-fp8-channel-sym-a-fp8-channel-sym-dynamic-vllm", ("fp8-w8a8", "vllm")),
    ("W-INT4-GROUP128-SYM-MARLIN", ("int4-g128", "vllm")),
    ("default", ("none", None)),
    ("FP8-Dynamic", ("fp8-w8a8", None)),
    ("INT8", ("int8-weight-only", None)),
    ("  fp8-b128-deepgemm  ", ("fp8-block128", "deep-gemm")),  # surrounding blanks ignored
])
def test_aliases_are_case_insensitive(asked, expected):
    _check(resolve(asked), expected, asked)


def test_encoder_aliases_are_case_insensitive():
    _check(resolve("INT8", namespace="encoder"), ("int8-w8a8", "vllm"), "INT8")
    _check(resolve("Fp8", namespace="encoder"), ("fp8-w8a8", "vllm"), "Fp8")


def test_all_names_lists_canonical_first_without_duplicates():
    names = all_names()
    assert len(names) == len(set(names))
    canon = [s.name for s in list_schemes()]
    assert names[:len(canon)] == canon
    for n in list(LIGHTX2V_MM) + list(LIGHTX2V_DIT) + list(TORCHAO) + list(LLMC):
        assert n in names
    for n in names:
        resolve(n)  # every advertised name must be accepted


# ---------------------------------------------------------------- errors
@pytest.mark.parametrize("bad", ["fp9", "int8-vllm2", "W-fp8-channel", "", "   ", None, 8])
def test_unknown_name_raises_with_valid_names(bad):
    with pytest.raises(UnknownSchemeError) as info:
        resolve(bad)
    msg = str(info.value)
    for name in CANONICAL:
        assert name in msg
    assert "fp8-vllm" in msg and "W-int4-group128-sym-Marlin" in msg  # aliases are listed too


def test_unknown_scheme_error_is_a_value_error():
    assert issubclass(UnknownSchemeError, ValueError)
    with pytest.raises(ValueError):
        resolve("no-such-scheme")


def test_get_scheme_takes_canonical_names_only():
    with pytest.raises(UnknownSchemeError, match="int8-w8a8"):
        get_scheme("int8-vllm")


def test_encoder_only_names_do_not_leak_into_other_namespaces():
    # An unknown namespace still falls back to "common", so "int8" keeps the torchao meaning.
    assert resolve("int8", namespace="text").scheme.name == "int8-weight-only"


# ---------------------------------------------------------------- immutability / registration
def test_scheme_is_frozen():
    s = get_scheme("int8-w8a8")
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.name = "hacked"
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.weight_format = S.INT4
    assert s.name == "int8-w8a8" and s.weight_format == S.INT8


def test_resolved_scheme_is_frozen():
    r = resolve("fp8-vllm")
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.backend = "sgl"


def test_registering_a_duplicate_scheme_raises():
    before = list_schemes()
    with pytest.raises(ValueError, match="twice"):
        register_scheme(get_scheme("fp8-w8a8"))
    with pytest.raises(ValueError, match="twice"):
        register_scheme(Scheme("int4-g128", S.INT8, S.PER_CHANNEL, S.NONE, S.NONE, None, 8, "dup"))
    assert list_schemes() == before
    assert get_scheme("int4-g128").weight_format == S.INT4  # the original was not replaced


def test_registering_a_duplicate_alias_raises():
    before = list_aliases()
    with pytest.raises(ValueError, match="twice"):
        register_alias("fp8-vllm", "fp8-w8a8", "vllm", "test")
    with pytest.raises(ValueError, match="twice"):
        register_alias("FP8-VLLM", "int8-w8a8", None, "test")  # duplicates are case-insensitive
    with pytest.raises(ValueError, match="twice"):
        register_alias("int8", "int8-w8a8", "vllm", "test", namespace="encoder")
    assert list_aliases() == before
    assert resolve("fp8-vllm").scheme.name == "fp8-w8a8"


def test_alias_to_unknown_scheme_raises():
    with pytest.raises(ValueError, match="unknown scheme"):
        register_alias("brand-new-alias", "fp6-w6a6", None, "test")
    with pytest.raises(UnknownSchemeError):
        resolve("brand-new-alias")


@pytest.mark.parametrize("wfmt,afmt", [("fp6", S.NONE), (S.INT8, S.INT4), ("bf16", S.NONE)])
def test_scheme_rejects_unknown_formats(wfmt, afmt):
    with pytest.raises(ValueError, match="unknown"):
        Scheme("bad", wfmt, S.PER_CHANNEL, afmt, S.NONE, None, 8, "bad")


def test_weight_only_partner_keeps_the_weight_format():
    from quant.schemes import weight_only_partner
    assert weight_only_partner(get_scheme("int8-w8a8")).name == "int8-weight-only"
    assert weight_only_partner(get_scheme("fp8-w8a8")).name == "fp8-weight-only"
    assert weight_only_partner(get_scheme("fp8-block128")).name == "fp8-weight-only"
    for name in ("int4-g128", "fp8-weight-only", "fp8-scaled"):
        assert weight_only_partner(get_scheme(name)) is get_scheme(name)
