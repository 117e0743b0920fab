"""Offline validation of terraform/: no terraform binary or provider registry needed.

1. Every .tf file parses (python-hcl2).
2. Structural facts of the root configuration and the node module (public access block, SSE,
   TLS-only bucket policy, 1-day lifecycle with multipart abort, one node module per node, typed
   and documented variables, secrets marked sensitive).
3. The node policy rendered from policy.json.tftpl grants exactly the key layout of
   docs/DESIGN.md, "Mailbox keys", checked by evaluating it on concrete requests with IAM's
   matching rules (wildcards, StringLike on s3:prefix).
4. `checkov -d terraform`, as a user runs it, fails nothing; every check the configuration skips on
   purpose is an inline `#checkov:skip=ID:reason` with its reason.

Prints one line per check and a closing "N passed, N failed"; exits 1 if anything failed.
Usage: check_terraform.py [--no-checkov | --only-checkov]
"""

import fnmatch
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import hcl2

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import node_policy  # noqa: E402

REPO = node_policy.REPO
TF = REPO / "terraform"
NODE = TF / "modules" / "node"
DESIGN = REPO / "docs" / "DESIGN.md"

BUCKET = "hoshino-example"
BUCKET_ARN = f"arn:aws:s3:::{BUCKET}"
SELF = "0123456789abcdef"
PEER = "fedcba9876543210"
SESSION = "00000000deadbeef"
SEQ = "0000000000000007"
STEM = f"{SESSION}-{SEQ}"  # the key's `<session>-<seq>` part


class Failure(Exception):
    pass


def check(condition, message):
    if not condition:
        raise Failure(message)


def value(block, name, where):
    """python-hcl2 wraps attribute values in one-element lists; unwrap with a clear error."""
    check(name in block, f"{where}: attribute `{name}` is missing")
    v = block[name]
    return v[0] if isinstance(v, list) and len(v) == 1 else v


def blocks(parsed, kind, type_):
    """All `kind "type_" "name"` blocks (kind = resource/data) as {name: body}."""
    found = {}
    for entry in parsed.get(kind, []):
        for t, named in entry.items():
            if t == type_:
                found.update(named)
    return found


def parse_all():
    parsed = {}
    for path in sorted(TF.rglob("*.tf")):
        if ".terraform" in path.parts:
            continue
        try:
            with path.open() as f:
                parsed[path] = hcl2.load(f)
        except Exception as e:  # hcl2 raises lark errors of several types
            raise Failure(f"{path.relative_to(REPO)}: does not parse as HCL2: {e}")
    check(parsed, f"no .tf files under {TF}")
    return parsed


def merged(parsed, directory):
    out = {}
    for path, body in parsed.items():
        if path.parent == directory:
            for key, items in body.items():
                out.setdefault(key, []).extend(items)
    return out


def only(mapping, what):
    check(len(mapping) == 1, f"expected exactly one {what}, found {sorted(mapping)}")
    return next(iter(mapping.items()))


# ---- structural checks -------------------------------------------------------------------------

def check_bucket(root):
    name, _ = only(blocks(root, "resource", "aws_s3_bucket"), "aws_s3_bucket")
    ref = f"aws_s3_bucket.{name}"

    def for_bucket(type_):
        found = {n: b for n, b in blocks(root, "resource", type_).items()
                 if value(b, "bucket", f"{type_}.{n}") in (f"${{{ref}.id}}", f"${{{ref}.bucket}}")}
        _, body = only(found, f"{type_} for {ref}")
        return body

    pab = for_bucket("aws_s3_bucket_public_access_block")
    for flag in ("block_public_acls", "block_public_policy", "ignore_public_acls", "restrict_public_buckets"):
        check(value(pab, flag, "public access block") is True, f"public access block: {flag} is not true")

    own = for_bucket("aws_s3_bucket_ownership_controls")
    check(value(value(own, "rule", "ownership"), "object_ownership", "ownership") == "BucketOwnerEnforced",
          "ownership controls: object_ownership is not BucketOwnerEnforced (ACLs would stay on)")

    sse = for_bucket("aws_s3_bucket_server_side_encryption_configuration")
    default = value(value(sse, "rule", "sse"), "apply_server_side_encryption_by_default", "sse")
    check(value(default, "sse_algorithm", "sse") in ("AES256", "aws:kms", "aws:kms:dsse"),
          "server-side encryption: unknown sse_algorithm")

    ver = for_bucket("aws_s3_bucket_versioning")
    status = value(value(ver, "versioning_configuration", "versioning"), "status", "versioning")
    check(status == "Disabled", f"versioning: status is {status!r}; the documented decision is Disabled")

    lc = for_bucket("aws_s3_bucket_lifecycle_configuration")
    rules = lc["rule"]
    whole_bucket = [r for r in rules if value(r, "status", "lifecycle rule") == "Enabled"
                    and value(r, "filter", "lifecycle rule") in ({}, [{}])]
    check(whole_bucket, "lifecycle: no enabled rule with an empty filter (covering the whole bucket)")
    rule = whole_bucket[0]
    check(value(value(rule, "expiration", "lifecycle"), "days", "lifecycle expiration") == 1,
          "lifecycle: expiration is not 1 day")
    check(value(value(rule, "abort_incomplete_multipart_upload", "lifecycle"), "days_after_initiation",
                "lifecycle abort") == 1,
          "lifecycle: incomplete multipart uploads are not aborted after 1 day")

    pol = for_bucket("aws_s3_bucket_policy")
    m = re.fullmatch(r"\$\{data\.aws_iam_policy_document\.(\w+)\.json\}", value(pol, "policy", "bucket policy"))
    check(m, "bucket policy: `policy` is not an aws_iam_policy_document's json")
    doc = blocks(root, "data", "aws_iam_policy_document").get(m.group(1))
    check(doc, f"bucket policy: data.aws_iam_policy_document.{m.group(1)} not found")
    tls_denied = False
    for st in doc["statement"]:
        conds = st.get("condition", [])
        if value(st, "effect", "bucket policy") != "Deny":
            continue
        if value(st, "actions", "bucket policy") != ["s3:*"]:
            continue
        resources = set(value(st, "resources", "bucket policy"))
        principals = st.get("principals", [])
        if {f"${{{ref}.arn}}", f"${{{ref}.arn}}/*"} <= resources and any(
                value(p, "identifiers", "principals") == ["*"] for p in principals):
            for c in conds:
                if (value(c, "test", "condition"), value(c, "variable", "condition"),
                        value(c, "values", "condition")) == ("Bool", "aws:SecureTransport", ["false"]):
                    tls_denied = True
    check(tls_denied, "bucket policy: no Deny of s3:* for everyone on bucket and objects when aws:SecureTransport is false")
    return ref


def check_node_module_instances(root, bucket_ref):
    modules = {}
    for entry in root.get("module", []):
        modules.update(entry)
    nodes = {n: b for n, b in modules.items() if value(b, "source", f"module.{n}") == "./modules/node"}
    name, body = only(nodes, 'module "node" call in the root configuration')
    check(value(body, "for_each", f"module.{name}") == "${var.nodes}",
          f"module.{name}: for_each is not var.nodes (one instance per node name)")
    check(value(body, "bucket_arn", f"module.{name}") == f"${{{bucket_ref}.arn}}",
          f"module.{name}: bucket_arn is not {bucket_ref}.arn")


def check_variables(parsed):
    count = 0
    for path, body in parsed.items():
        for entry in body.get("variable", []):
            for name, var in entry.items():
                where = f"{path.relative_to(REPO)}: variable {name}"
                check(str(value(var, "description", where)).strip(), f"{where}: empty description")
                value(var, "type", where)
                count += 1
    root = merged(parsed, TF)
    vars_ = {}
    for entry in root.get("variable", []):
        vars_.update(entry)
    for required in ("bucket_name", "nodes"):
        check(required in vars_, f"root variable {required} is missing")
        check(vars_[required].get("validation"), f"root variable {required} has no validation")
    node_type = value(vars_["nodes"], "type", "variable nodes")
    check("map(object(" in str(node_type).replace(" ", ""), f"variable nodes is not a map of objects: {node_type}")
    return count


def check_node_module(parsed):
    mod = merged(parsed, NODE)
    text = "".join(p.read_text() for p in sorted(NODE.glob("*.tf")))
    check('templatefile("${path.module}/policy.json.tftpl"' in text,
          "modules/node: the policy is not rendered by templatefile() from policy.json.tftpl")
    policies = blocks(mod, "resource", "aws_iam_policy")
    _, pol = only(policies, "aws_iam_policy in modules/node")
    check(value(pol, "policy", "aws_iam_policy") == "${local.policy_json}",
          "modules/node: aws_iam_policy.policy is not local.policy_json (the rendered template)")
    for type_ in ("aws_iam_user_policy", "aws_iam_role_policy", "aws_iam_group_policy", "aws_iam_user_group_membership"):
        check(not blocks(mod, "resource", type_), f"modules/node: {type_} grants outside the template")
    for type_ in ("aws_iam_user", "aws_iam_access_key", "aws_iam_role", "aws_iam_instance_profile"):
        check(blocks(mod, "resource", type_), f"modules/node: no {type_} (identity must be selectable)")
    for type_ in ("aws_iam_user_policy_attachment", "aws_iam_role_policy_attachment"):
        _, attachment = only(blocks(mod, "resource", type_), f"{type_} in modules/node")
        check(value(attachment, "policy_arn", type_).startswith("${aws_iam_policy."),
              f"modules/node: {type_} attaches a policy other than the node's own")

    outputs = {}
    for entry in mod.get("output", []):
        outputs.update(entry)
    for name, out in outputs.items():
        v = str(out.get("value"))
        secret = "secret" in v or "environment_file" in name
        if secret:
            check(out.get("sensitive") in ([True], True), f"modules/node: output {name} carries a secret but is not sensitive")
    for required in ("node_id", "access_key_id", "secret_access_key", "role_arn", "instance_profile_name", "environment_file"):
        check(required in outputs, f"modules/node: output {required} is missing")

    # Outputs anywhere that pass a sensitive output on must be sensitive too.
    for path, body in parsed.items():
        for entry in body.get("output", []):
            for name, out in entry.items():
                if "environment_file" in str(out.get("value")) or "secret" in str(out.get("value")):
                    check(out.get("sensitive") in ([True], True),
                          f"{path.relative_to(REPO)}: output {name} passes secrets on but is not sensitive")


# ---- the policy, evaluated -------------------------------------------------------------------

def iam_like(pattern, s):
    """IAM's ARN and StringLike matching: * any run of characters (including /), ? one."""
    return fnmatch.fnmatchcase(s, pattern.replace("[", "[[]"))


def as_list(x):
    return x if isinstance(x, list) else [x]


def allowed(policy, action, resource, context=None):
    """Identity-policy evaluation: an explicit Deny wins, else any matching Allow."""
    context = context or {}
    verdict = False
    for st in policy["Statement"]:
        if not any(iam_like(a, action) for a in as_list(st["Action"])):
            continue
        if not any(iam_like(r, resource) for r in as_list(st["Resource"])):
            continue
        ok = True
        for op, conds in st.get("Condition", {}).items():
            for key, wanted in conds.items():
                got = context.get(key)
                if op == "StringLike":
                    ok &= got is not None and any(iam_like(w, got) for w in as_list(wanted))
                elif op == "StringEquals":
                    ok &= got in as_list(wanted)
                else:
                    raise Failure(f"policy uses condition operator {op} the evaluator does not model")
        if not ok:
            continue
        if st["Effect"] == "Deny":
            return False
        verdict = True
    return verdict


def check_design_key_layout():
    text = DESIGN.read_text()
    for layout in ("`v2/inbox/<dest:16hex>/<session:16hex>-<seq:16hex>.<src:16hex>`", "`v2/bell/<dest:16hex>`",
                   "`v2/nodes/<node:16hex>`"):
        check(layout in text, f"docs/DESIGN.md no longer describes the key {layout}: update policy.json.tftpl and this test")


def check_policy():
    policy = json.loads(node_policy.render(BUCKET_ARN, SELF))
    check(policy.get("Version") == "2012-10-17", "policy: Version is not 2012-10-17")
    for st in policy["Statement"]:
        check(st.get("Effect") == "Allow", f"policy: statement {st.get('Sid')} is not an Allow")
        check("NotAction" not in st and "NotResource" not in st, f"policy: statement {st.get('Sid')} uses NotAction/NotResource")
        for a in as_list(st["Action"]):
            check("*" not in a, f"policy: wildcard action {a}")
        for r in as_list(st["Resource"]):
            check(r == BUCKET_ARN or any(r.startswith(f"{BUCKET_ARN}/v2/{p}/") for p in ("inbox", "bell", "nodes")),
                  f"policy: resource {r} is outside the bucket's inbox, bell and nodes prefixes")
    actions = {a for st in policy["Statement"] for a in as_list(st["Action"])}
    check(actions == {"s3:PutObject", "s3:GetObject", "s3:DeleteObject", "s3:ListBucket"},
          f"policy: actions are {sorted(actions)}, expected exactly Put/Get/DeleteObject and ListBucket")
    resources = {r for st in policy["Statement"] for r in as_list(st["Resource"])}
    check(BUCKET_ARN in resources, "policy: the bucket ARN itself is not covered (ListBucket needs it)")
    check(any(r.startswith(f"{BUCKET_ARN}/v2/inbox/") for r in resources),
          "policy: no object ARN scoped to an inbox prefix")

    obj = lambda key: f"{BUCKET_ARN}/{key}"  # noqa: E731
    own_bundle = f"v2/inbox/{SELF}/{STEM}.{PEER}"
    peer_bundle = f"v2/inbox/{PEER}/{STEM}.{SELF}"
    spoofed = f"v2/inbox/{PEER}/{STEM}.{PEER}"
    cases = [
        # (expected, action, resource, context, why)
        (True, "s3:PutObject", obj(peer_bundle), None, "deliver a bundle into a peer's inbox as itself"),
        (True, "s3:PutObject", obj(f"v2/inbox/{SELF}/{STEM}.{SELF}"), None, "deliver a bundle to itself"),
        (False, "s3:PutObject", obj(spoofed), None, "deliver a bundle claiming to be the peer"),
        (False, "s3:PutObject", obj(f"v2/inbox/{PEER}/{STEM}"), None, "deliver a bundle without sender"),
        (False, "s3:PutObject", obj(f"v2/inbox/{PEER}/{STEM}.{SELF.upper()}"), None, "deliver with the sender id in upper case"),
        (False, "s3:PutObject", obj(f"v2/inbox/{PEER}/{STEM}.{SELF}/x"), None, "deliver with a segment after its own id"),
        (False, "s3:PutObject", obj(f"v2/inbox/{PEER}/{STEM}.{PEER}/x.y"), None, "deliver with a non-hex sender after a crafted segment"),
        # Allowed by IAM (`*` matches `/` and `.`), but they end in `.<self>`: the strict parser
        # refuses them or reads <self> as the sender (least_privilege.rs checks both on moto).
        (True, "s3:PutObject", obj(f"v2/inbox/{PEER}/{STEM}.{PEER}/x.{SELF}"), None, "crafted: extra segment ending .<self>"),
        (True, "s3:PutObject", obj(f"v2/inbox/{PEER}/{STEM}.{PEER}.{SELF}"), None, "crafted: a peer's id before its own"),
        (True, "s3:PutObject", obj(f"v2/bell/{PEER}"), None, "ring a peer's bell"),
        (False, "s3:PutObject", obj(f"v1/inbox/{PEER}/{STEM}.{SELF}"), None, "write the retired v1 layout"),
        (False, "s3:PutObject", obj("v3/anything"), None, "write outside v2/inbox and v2/bell"),
        (True, "s3:GetObject", obj(own_bundle), None, "read its own inbox"),
        (True, "s3:DeleteObject", obj(own_bundle), None, "delete from its own inbox"),
        (False, "s3:GetObject", obj(peer_bundle), None, "read a peer's inbox"),
        (False, "s3:DeleteObject", obj(peer_bundle), None, "delete from a peer's inbox"),
        (True, "s3:GetObject", obj(f"v2/bell/{SELF}"), None, "watch its own bell"),
        (False, "s3:GetObject", obj(f"v2/bell/{PEER}"), None, "watch a peer's bell"),
        (False, "s3:DeleteObject", obj(f"v2/bell/{PEER}"), None, "delete a peer's bell"),
        (True, "s3:ListBucket", BUCKET_ARN, {"s3:prefix": f"v2/inbox/{SELF}/"}, "list its own inbox"),
        (True, "s3:ListBucket", BUCKET_ARN, {"s3:prefix": f"v2/inbox/{SELF}/{SESSION}-"}, "list one stream of its own inbox"),
        (False, "s3:ListBucket", BUCKET_ARN, {"s3:prefix": f"v2/inbox/{PEER}/"}, "list a peer's inbox"),
        (False, "s3:ListBucket", BUCKET_ARN, {"s3:prefix": "v2/inbox/"}, "list every inbox"),
        (False, "s3:ListBucket", BUCKET_ARN, {}, "list the whole bucket"),
        (True, "s3:PutObject", obj(f"v2/nodes/{SELF}"), None, "publish its own directory record"),
        (False, "s3:PutObject", obj(f"v2/nodes/{PEER}"), None, "publish a record under a peer's key"),
        (False, "s3:PutObject", obj(f"v2/nodes/{SELF}/x"), None, "publish below its own record key"),
        (False, "s3:PutObject", obj(f"v2/nodes/{SELF}{SELF}"), None, "publish a key that starts with its own id"),
        (True, "s3:GetObject", obj(f"v2/nodes/{PEER}"), None, "read a peer's directory record"),
        (True, "s3:GetObject", obj(f"v2/nodes/{SELF}"), None, "read its own directory record"),
        (False, "s3:DeleteObject", obj(f"v2/nodes/{PEER}"), None, "delete a peer's directory record"),
        (True, "s3:ListBucket", BUCKET_ARN, {"s3:prefix": "v2/nodes/"}, "list the directory"),
        (False, "s3:ListBucket", BUCKET_ARN, {"s3:prefix": "v2/"}, "list everything under v2/"),
        (False, "s3:GetObject", f"arn:aws:s3:::other-bucket/v2/inbox/{SELF}/{STEM}.{PEER}", None, "read another bucket"),
        (False, "s3:PutBucketPolicy", BUCKET_ARN, None, "change the bucket policy"),
        (False, "s3:ListAllMyBuckets", "*", None, "list the account's buckets"),
    ]
    for expected, action, resource, context, why in cases:
        got = allowed(policy, action, resource, context)
        check(got == expected, f"policy: {why}: {action} on {resource} {context or ''} is "
                               f"{'allowed' if got else 'denied'}, expected {'allowed' if expected else 'denied'}")
    return len(cases)


# ---- checkov -------------------------------------------------------------------------------------

def check_checkov():
    exe = shutil.which("checkov")
    check(exe, "checkov is not installed (scripts/bootstrap.sh installs it)")
    # Offline: no policy download (--skip-download), no mapping fetch, no PyPI version check.
    # Exactly the command a user runs: the suppressions are checkov's own inline
    # `#checkov:skip=ID:reason` comments, so the tool is clean without anything only we read.
    env = dict(os.environ, CKV_SKIP_PACKAGE_UPDATE_CHECK="true", BC_SKIP_MAPPING="TRUE")
    proc = subprocess.run(
        [exe, "-d", str(TF), "--framework", "terraform", "--skip-download", "--compact", "-o", "json"],
        capture_output=True, text=True, timeout=600, env=env,
    )
    try:
        report = json.loads(proc.stdout)
    except json.JSONDecodeError:
        raise Failure(f"checkov printed no JSON report (exit {proc.returncode}): {proc.stderr[-2000:]}")
    reports = report if isinstance(report, list) else [report]
    failed, skipped, parse_errors = [], [], 0
    for r in reports:
        failed += r.get("results", {}).get("failed_checks", [])
        skipped += r.get("results", {}).get("skipped_checks", [])
        parse_errors += r.get("summary", {}).get("parsing_errors", 0)
    check(parse_errors == 0, f"checkov could not parse {parse_errors} file(s)")
    check(proc.returncode == 0, f"checkov exited {proc.returncode}")
    check(not failed, "checkov: failed checks (fix them, or skip inline with a reason):\n" + "\n".join(
        f"  {f['check_id']} {f['check_name']} ({f['resource']}, {f['file_path']}:{f['file_line_range']})" for f in failed))
    for f in skipped:
        reason = (f.get("check_result") or {}).get("suppress_comment", "")
        check(len(reason.strip()) >= 20, f"checkov: {f['check_id']} on {f['resource']} is skipped without a reason")
    return len(skipped)


def main():
    args = set(sys.argv[1:])
    unknown = args - {"--no-checkov", "--only-checkov"}
    if unknown or len(args) > 1:
        sys.exit(f"usage: {sys.argv[0]} [--no-checkov | --only-checkov]")
    passed = failed = 0
    state = {}

    def step(name, fn):
        nonlocal passed, failed
        try:
            detail = fn()
            print(f"ok   {name}{f' ({detail})' if detail is not None else ''}")
            passed += 1
        except Failure as e:
            print(f"FAIL {name}: {e}")
            failed += 1

    def parse():
        state["parsed"] = parse_all()
        return f"{len(state['parsed'])} files"

    if "--only-checkov" in args:
        step("checkov -d terraform is clean", lambda: f"0 failures, {check_checkov()} inline skips, each with a reason")
        print(f"{passed} passed, {failed} failed")
        sys.exit(1 if failed else 0)

    step("every .tf file parses", parse)
    if "parsed" in state:
        root = merged(state["parsed"], TF)
        def bucket():
            state["bucket"] = check_bucket(root)

        step("bucket: public access blocked, ACLs off, SSE, versioning decision, 1-day lifecycle, TLS-only", bucket)
        if "bucket" in state:
            step("one node module instance per node", lambda: check_node_module_instances(root, state["bucket"]))
        step("variables are typed, documented, validated", lambda: f"{check_variables(state['parsed'])} variables")
        step("node module renders its policy from the template; secrets sensitive",
             lambda: check_node_module(state["parsed"]))
    step("DESIGN.md key layout is the one the policy encodes", check_design_key_layout)
    step("node policy grants exactly the mailbox layout", lambda: f"{check_policy()} requests evaluated")
    if "--no-checkov" not in args:
        step("checkov -d terraform is clean", lambda: f"0 failures, {check_checkov()} inline skips, each with a reason")
    print(f"{passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
