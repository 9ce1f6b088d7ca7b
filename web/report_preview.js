// Shows a QuantDiT node's report on the node itself once it has run, in the frontend's own text
// preview (the widget of the core "Preview as Text" node). The report stays a STRING output too.
// The preview widgets are not serialized: a workflow saved with them loads the same without this
// extension.
import { app } from "../../scripts/app.js";

const previews = window.comfyAPI?.textPreviewWidgets;

function writesReport(nodeData) {
  return nodeData.category?.startsWith("QuantDiT") && (nodeData.output_name ?? []).includes("report");
}

app.registerExtension({
  name: "QuantDiT.ReportPreview",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    // Frontends older than the text-preview helpers show nothing extra; the output still works.
    if (!previews || !writesReport(nodeData)) return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      previews.addTextPreviewWidgets(this);
      return result;
    };
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      previews.updateTextPreviewWidgets(this, message);
    };
  },
});
