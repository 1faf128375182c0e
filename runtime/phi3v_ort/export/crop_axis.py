"""The vision model's crop axis: dynamic, as the release declares it, or a fixed count, as older exports did.

Microsoft's export script for the published builds (onnx/builder.py in the model repository) and og's own phi3-v
test model declare `pixel_values` with the axes {0: num_images, 1: max_num_crops, 3: height, 4: width}: the runtime
then feeds only the crop slots a request uses (inputs/pipeline.py). This exporter declared a fixed 17 until then;
the graph is the same either way (the trace always ran with the axis dynamic), only the declared shape differs.
"""

from __future__ import annotations

from pathlib import Path

from phi3v_ort.package import contract

PIXEL_VALUES_AXES = {0: "num_images", 1: "max_num_crops", 3: "height", 4: "width"}


def declare_crop_slots(path: str | Path, slots: int | None) -> None:
    """Declare the crop axis of the vision model at `path` as a fixed `slots`, or dynamic (None). Only the .onnx
    file is rewritten: its weights stay where they are (`<name>.onnx.data`, same offsets). Builds the fixed-17
    twin of a package for the tests and benchmarks that compare both."""
    import onnx

    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    for graph_input in model.graph.input:
        if graph_input.name == contract.VISION_INPUTS["pixel_values"]:
            dim = graph_input.type.tensor_type.shape.dim[1]
            dim.Clear()
            if slots is None:
                dim.dim_param = PIXEL_VALUES_AXES[1]
            else:
                dim.dim_value = slots
            break
    else:
        raise ValueError(f"{path.name} has no {contract.VISION_INPUTS['pixel_values']} input")
    onnx.save_model(model, str(path))
