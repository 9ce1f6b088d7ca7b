"""The result of a node that writes a report: its outputs, the report as the last STRING output,
and the same text as the node's `text` UI output. web/report_preview.js shows that text on the
node itself after a run, so the report can be read without wiring a Preview as Text node.
Those nodes' schemas set `has_intermediate_output`: ComfyUI then sends the text again when it
reuses a cached result, so the preview also fills on a run that did not execute the node."""
from __future__ import annotations

from comfy_api.latest import io, ui


def with_report(*outputs, report: str) -> io.NodeOutput:
    return io.NodeOutput(*outputs, report, ui=ui.PreviewText(report))
