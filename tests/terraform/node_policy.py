"""The node policy, rendered from terraform/modules/node/policy.json.tftpl: the same file Terraform
deploys through templatefile(). The template may use only ${bucket_arn} and ${node_id}, so this
substitution is exactly what templatefile() does with it; render() refuses any other directive.

Usage as a script: node_policy.py BUCKET_ARN NODE_ID  (prints the policy JSON)
"""

import json
import pathlib
import re
import sys

REPO = pathlib.Path(__file__).resolve().parents[2]
TEMPLATE = REPO / "terraform" / "modules" / "node" / "policy.json.tftpl"
VARIABLES = ("bucket_arn", "node_id")
NODE_ID = re.compile(r"^[0-9a-f]{16}$")


class TemplateError(Exception):
    pass


def render(bucket_arn: str, node_id: str, template: pathlib.Path = TEMPLATE) -> str:
    if not NODE_ID.match(node_id) or node_id == "0" * 16:
        raise TemplateError(f"node id {node_id!r} is not 16 lowercase hex digits (non-zero)")
    text = template.read_text()
    if "%{" in text:
        raise TemplateError(f"{template}: template directives (%{{...}}) are not supported by this renderer")
    used = set(re.findall(r"\$\{([^}]*)\}", text))
    unknown = used - set(VARIABLES)
    if unknown:
        raise TemplateError(f"{template}: interpolations {sorted(unknown)} are not template variables {VARIABLES}")
    values = {"bucket_arn": bucket_arn, "node_id": node_id}
    rendered = re.sub(r"\$\{(bucket_arn|node_id)\}", lambda m: values[m.group(1)], text)
    json.loads(rendered)  # a template that renders to invalid JSON fails here, not at apply time
    return rendered


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(f"usage: {sys.argv[0]} BUCKET_ARN NODE_ID")
    print(render(sys.argv[1], sys.argv[2]), end="")
