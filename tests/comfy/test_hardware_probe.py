"""The Hardware Probe node in the real ComfyUI runtime (CPU): its suggestions are options of the
nodes they feed, and a suggested scheme quantizes a model."""
import pytest

import tiny_dits


@pytest.fixture(scope="module")
def probed(comfy):
    nodes, _ = comfy
    return tuple(nodes.NODE_CLASS_MAPPINGS["QuantDiTHardwareProbe"].execute().result)


def combo_options(node_class, name):
    schema = node_class.define_schema()
    return next(i.options for i in schema.inputs if i.id == name)


def test_suggestions_are_options_of_the_quantize_nodes(comfy, probed):
    nodes, _ = comfy
    dit, encoder, report = probed
    assert dit in combo_options(nodes.NODE_CLASS_MAPPINGS["QuantDiTQuantizeModel"], "scheme")
    for name in ("QuantDiTQuantizeTextEncoder", "QuantDiTQuantizeCLIPVision"):
        assert encoder in combo_options(nodes.NODE_CLASS_MAPPINGS[name], "scheme")
    import comfy.model_management as mm
    if mm.get_torch_device().type == "cpu":
        assert (dit, encoder) == ("int8-weight-only", "int8-weight-only")
        assert report.startswith("QuantDiT hardware probe: CPU (cpu)") and "no CUDA GPU" in report
    else:  # the GPU machine: Triton is there, so a fused int8 W8A8 kernel is
        assert (dit, encoder) == ("int8-w8a8", "int8"), report
        assert "compute capability" in report and "int8-w8a8: " in report


def test_the_suggested_scheme_quantizes_a_model(comfy, models_dir, probed):
    files = tiny_dits.write(str(models_dir), "probe", seed=2)
    _, report = tiny_dits.quantize(comfy, tiny_dits.load(comfy, files, "wan"), probed[0])
    assert f"{probed[0]}: 20 layers" in report, report
